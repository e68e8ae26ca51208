"""The reactor type every SmartRelay component receives (nothing imports the global reactor)."""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorProcess,
    IReactorSocket,
    IReactorSSL,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)


class IRelayReactor(
    IReactorCore,
    IReactorTime,
    IReactorTCP,
    IReactorSSL,
    IReactorThreads,
    IReactorFromThreads,
    IReactorFDSet,
    IReactorPluggableNameResolver,
    IReactorProcess,
    IReactorSocket,
):
    """The union of reactor interfaces SmartRelay relies on."""


def as_relay_reactor(reactor: object) -> IRelayReactor:
    """Type a real reactor object (installed by twistd or ``task.react``) as IRelayReactor."""
    return cast(IRelayReactor, reactor)
