"""Building a DeliveryManager in tests: a real re-wrap chain, and a fake connector whose
sessions answer as a script says (for managers driven by a ``task.Clock``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from smartrelay.delivery.client import (
    OutboundSession,
    RecipientResult,
    ServerReply,
    SmtpClientError,
)
from smartrelay.delivery.routing import NextHop
from smartrelay.rewrap.chain import RewrapChain, RewrapSettings
from smartrelay.rewrap.dkim import DkimSigner
from smartrelay.storage.store import Store
from smartrelay.tokens import TokenCodec, load_keyring

RELAY_HOSTNAME = "relay.test"
RETURN_PATH = "bounces.example.com"
OK = ServerReply(250, "2.0.0 Ok")


def chain_factory(directory: Path) -> Callable[[Store], RewrapChain]:
    """The relay's re-wrap chain (VERP, identity, tracking; no DKIM key), with a key ring in
    ``directory``."""
    codec = TokenCodec(load_keyring(str(directory / "secret.key")))
    settings = RewrapSettings(RELAY_HOSTNAME, "https://t.example.com", RETURN_PATH)
    return lambda store: RewrapChain(settings, codec, DkimSigner([]), store)


@define
class Sent:
    """One transaction a fake session was given, and when (on the test's clock)."""

    at: float
    host: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes


#: What a fake next hop answers to one transaction: a reply for every recipient, or an
#: exception to raise (the connection broke).
Answer = ServerReply | Exception


@define(eq=False)
class FakeSession:
    """An :class:`OutboundSession` that records what it is sent and answers from its
    connector's script; ``delay`` seconds on the clock pass before each answer."""

    connector: FakeConnector
    hop: NextHop
    tls: bool = False
    messages_sent: int = 0
    closed: bool = False
    pending: Deferred[None] | None = None

    @property
    def usable(self) -> bool:
        return not self.closed

    async def send(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> list[RecipientResult]:
        connector = self.connector
        connector.sent.append(
            Sent(connector.clock.seconds(), self.hop.host, sender, tuple(recipients), message)
        )
        if connector.delay > 0:
            self.pending = deferLater(connector.clock, connector.delay, lambda: None)
            try:
                await self.pending
            except CancelledError:
                raise SmtpClientError("connection lost: closed by us") from None
            finally:
                self.pending = None
        answer = connector.next_answer()
        if isinstance(answer, Exception):
            self.closed = True
            raise answer
        self.messages_sent += 1
        return [RecipientResult(r, answer) for r in recipients]

    async def quit(self) -> None:
        self.closed = True

    def close(self) -> None:
        """Closed under a send: that send fails, as a real connection's would."""
        self.closed = True
        if self.pending is not None:
            self.pending.cancel()


@define(eq=False)
class FakeConnector:
    """A :data:`~smartrelay.delivery.client.Connector` that dials nothing.

    ``refusals`` are taken one per connection attempt (a reply refuses the session, an
    exception fails the dial) before sessions are handed out; ``answers`` one per
    transaction, then ``default`` for ever after.
    """

    clock: IReactorTime
    answers: list[Answer] = field(factory=list)
    default: Answer = OK
    refusals: list[Answer] = field(factory=list)
    delay: float = 0.0
    sent: list[Sent] = field(factory=list)
    dials: list[float] = field(factory=list)
    sessions: list[FakeSession] = field(factory=list)

    def next_answer(self) -> Answer:
        return self.answers.pop(0) if self.answers else self.default

    async def __call__(self, hop: NextHop) -> tuple[OutboundSession | None, ServerReply | None]:
        self.dials.append(self.clock.seconds())
        if self.refusals:
            refusal = self.refusals.pop(0)
            if isinstance(refusal, Exception):
                raise refusal
            return None, refusal
        session = FakeSession(self, hop)
        self.sessions.append(session)
        return session, None


__all__ = ["FakeConnector", "FakeSession", "Sent", "chain_factory"]
