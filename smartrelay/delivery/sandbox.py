"""Sandbox credentials at delivery (docs/smtp.md, "Sandbox credentials").

A message submitted with a sandbox credential carries ``sandbox`` from accept
(``messages.sandbox``). The delivery manager queues its jobs on a destination of their own
(:meth:`SandboxRouting.destination`), never on the recipient domain's: there the copies are
re-wrapped as usual (VERP, tracking, DKIM; suppressions apply), then either handed to a
:class:`SandboxSession` that keeps them (``delivered`` with ``mx: "sandbox"`` and
:data:`SANDBOX_REPLY`), or sent to ``[delivery] sandbox_route`` (a local catcher), and
recorded with ``sandbox: true`` either way.
"""

from __future__ import annotations

from collections.abc import Sequence

from smartrelay.config import Route, Throttle
from smartrelay.delivery.client import RecipientResult, ServerReply
from smartrelay.delivery.routing import NextHop, ResolvedRoute, Router
from smartrelay.events import SANDBOX_MX

#: The reply recorded for it.
SANDBOX_REPLY = ServerReply(250, "2.0.0 sandbox credential: not sent, recorded as delivered")
#: The destination (and throttle) key of the sandbox jobs kept in the relay.
SANDBOX_KEY = "sandbox"
#: The throttle of sandbox destinations: their own, sharing nothing with real destinations
#: (a few "connections", no rate to speak of: nothing leaves the box, or it goes to a
#: local catcher).
SANDBOX_THROTTLE = Throttle(
    match="sandbox", max_connections=4, max_messages_per_connection=1000, max_rate_per_second=1e6
)
_HOP = NextHop(host=SANDBOX_MX, port=0, kind="static")


class SandboxSession:
    """An :class:`~smartrelay.delivery.client.OutboundSession` that sends nothing: every
    copy handed to it is answered with :data:`SANDBOX_REPLY`."""

    hop = _HOP
    tls = False

    def __init__(self) -> None:
        self.messages_sent = 0
        self._open = True

    @property
    def usable(self) -> bool:
        return self._open

    async def send(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> list[RecipientResult]:
        self.messages_sent += 1
        return [RecipientResult(address, SANDBOX_REPLY) for address in recipients]

    async def quit(self) -> None:
        self._open = False

    def close(self) -> None:
        self._open = False


class SandboxRouting:
    """Where sandbox jobs go: kept in the relay, or to ``sandbox_route`` (``smtp://``)."""

    def __init__(self, sandbox_route: str | None) -> None:
        self.route = sandbox_route
        self._router = None if sandbox_route is None else Router((Route("*", sandbox_route),))

    def destination(self, domain: str) -> tuple[str, ResolvedRoute]:
        """The destination key and route of a sandbox job for ``domain``: the key is never
        one a real destination has (those are domains or ``smtp://`` URLs)."""
        if self._router is None:
            return SANDBOX_KEY, ResolvedRoute(Route("*", "mx"), domain, None)
        resolved = self._router.route_for(domain)
        return f"{SANDBOX_KEY}:{self._router.destination_key(resolved)}", resolved

    @staticmethod
    def keeps(key: str) -> bool:
        """Jobs of this destination stay in the relay (a :class:`SandboxSession`)."""
        return key == SANDBOX_KEY


__all__ = [
    "SANDBOX_KEY",
    "SANDBOX_MX",
    "SANDBOX_REPLY",
    "SANDBOX_THROTTLE",
    "SandboxRouting",
    "SandboxSession",
]
