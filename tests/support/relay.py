"""The whole relay (RelayService) running in-process on the test reactor, on free loopback ports.

``Relays`` starts as many relays as a test needs (each from a config built by
``parse_config``) and stops every one still running at the end, whatever happened. A listener
that cannot bind, or a database that cannot be opened, would make RelayService stop the
reactor; here it is recorded instead, and starting the relay raises.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from smartrelay.config import Config, parse_config
from smartrelay.delivery.manager import DEFAULT_TUNABLES, DeliveryTunables
from smartrelay.reactor import IRelayReactor
from smartrelay.relay import RelayService
from smartrelay.storage.store import Store

HOST = "127.0.0.1"
HOSTNAME = "relay.test"
RETURN_PATH_DOMAIN = "bounces.relay.test"


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((HOST, 0))  # all bound at once, so the ports differ
        return [int(s.getsockname()[1]) for s in sockets]


class InProcessRelay(RelayService):
    """RelayService that records a fatal error instead of stopping the (shared) test reactor."""

    def fatal(self, reason: str) -> None:
        if self.failed_reason is None:
            self.failed_reason = reason


class RelayStartError(Exception):
    pass


async def start_in_process(
    reactor: IRelayReactor,
    make_config: Callable[[int, int], Config],
    attempts: int = 3,
    delivery_tunables: DeliveryTunables = DEFAULT_TUNABLES,
) -> RunningRelay:
    """Start a relay whose config ``make_config(smtp_port, inbound_port)`` builds on free
    ports, trying again (new ports) when a port was taken in the meantime."""
    reason = "not started"
    for _ in range(attempts):
        smtp_port, inbound_port = free_ports(2)
        service = InProcessRelay(
            make_config(smtp_port, inbound_port), reactor, delivery_tunables=delivery_tunables
        )
        service.startService()
        if service.failed_reason is None:
            try:
                store = await service.storage.when_ready()
            except Exception:
                await service.stopService()
                raise
            if service.failed_reason is None:
                return RunningRelay(service, store, smtp_port, inbound_port)
        reason = service.failed_reason or "failed"
        await service.stopService()
        if "cannot listen" not in reason:
            break  # only a port taken in the meantime is worth another try
    raise RelayStartError(reason)


class RunningRelay:
    """A started relay: its service, its Store, and the ports of its two SMTP listeners."""

    host = HOST

    def __init__(self, service: InProcessRelay, store: Store, smtp_port: int, inbound_port: int):
        self.service = service
        self.store = store
        self.smtp_port = smtp_port
        self.inbound_port = inbound_port

    @property
    def config(self) -> Config:
        return self.service.config

    async def stop(self) -> None:
        if self.service.running:
            await self.service.stopService()


def relay_config(
    data_dir: Path,
    database_url: str,
    smtp_port: int,
    inbound_port: int,
    unused_port: int,
    smtp: Mapping[str, Any] | None = None,
) -> Config:
    """A config with both SMTP listeners on 127.0.0.1 and everything else kept local.

    The web listener gets a port of its own and every delivery route points at a closed port,
    so that services added to RelayService later neither collide nor reach the network.
    """
    return parse_config(
        {
            "server": {"hostname": HOSTNAME, "data_dir": str(data_dir)},
            "database": {"url": database_url},
            "smtp": {"listen": [f"tcp:{smtp_port}:interface={HOST}"], **(smtp or {})},
            "inbound": {
                "listen": [f"tcp:{inbound_port}:interface={HOST}"],
                "return_path_domain": RETURN_PATH_DOMAIN,
            },
            "rewrap": {"secret_file": str(data_dir / "secret.key")},
            "web": {"listen": f"tcp:0:interface={HOST}"},
            "delivery": {"routes": {"*": f"smtp://{HOST}:{unused_port}"}},
        },
        str(data_dir / "smartrelay.toml"),
    )


class Relays:
    """Starts relays for one test; ``stop_all`` (from a fixture's teardown) stops them all."""

    def __init__(self, reactor: IRelayReactor, directory: Path, database_url: str) -> None:
        self.reactor = reactor
        self.directory = directory
        self.database_url = database_url
        self.started: list[RunningRelay] = []

    async def start(
        self, smtp: Mapping[str, Any] | None = None, data_dir: str = "var", attempts: int = 3
    ) -> RunningRelay:
        """A running relay on the test's database; ``smtp`` overrides ``[smtp]`` keys."""

        def make_config(smtp_port: int, inbound_port: int) -> Config:
            (unused_port,) = free_ports(1)
            return relay_config(
                self.directory / data_dir,
                self.database_url,
                smtp_port,
                inbound_port,
                unused_port,
                smtp,
            )

        relay = await start_in_process(self.reactor, make_config, attempts)
        self.started.append(relay)
        return relay

    async def stop_all(self) -> None:
        relays, self.started = self.started, []
        await stop_relays(relays)


async def stop_relays(relays: list[RunningRelay]) -> None:
    """Stop every relay, even when stopping one of them fails (then raise the first error)."""
    errors: list[Exception] = []
    for relay in relays:
        try:
            await relay.stop()
        except Exception as error:
            errors.append(error)
    if errors:
        raise errors[0]
