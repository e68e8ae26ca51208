"""An SMTP sink for delivery tests, built from SmartRelay's own listener protocol.

It records every message with its envelope and the connection it came on, counts concurrent
connections, and answers RCPT and the final dot from a script, so tests can make a next hop
that defers, bounces or accepts.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IListeningPort, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from smartrelay.reactor import IRelayReactor
from smartrelay.smtp.listener import SmtpFactory
from smartrelay.smtp.protocol import SmtpServerProtocol
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.session import (
    Admitted,
    Envelope,
    ISmtpBackend,
    ListenerSettings,
    Session,
)
from smartrelay.spool import SpooledBody


@define
class ReceivedMessage:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    connection: int


@implementer(ISmtpBackend)
@define
class SinkBackend:
    offers_auth: bool = False
    messages: list[ReceivedMessage] = field(factory=list)
    #: (session, address) -> a refusal, or None to accept
    rcpt_script: Callable[[Session, str], Reply | None] = lambda s, a: None
    #: message number (0-based) -> the reply to the final dot
    data_script: Callable[[int], Reply] = lambda n: Reply(250, "2.0.0", "Ok: sunk")
    credentials: dict[str, str] = field(factory=dict)
    connection_ids: dict[int, int] = field(factory=dict)

    def check_sender(self, session: Session) -> Reply | None:
        return None

    def check_recipient(self, session: Session, address: str) -> Reply | None:
        return self.rcpt_script(session, address)

    def check_credentials(self, name: str, password: str) -> Deferred[bool | Admitted]:
        return succeed(self.credentials.get(name) == password)

    def deliver(
        self, session: Session, envelope: Envelope, message: bytes | SpooledBody
    ) -> Deferred[Reply]:
        reply = self.data_script(len(self.messages))
        if reply.positive:
            self.messages.append(
                ReceivedMessage(
                    envelope.sender,
                    list(envelope.recipients),
                    message if isinstance(message, bytes) else message.read(),
                    session.tls,
                    self.connection_ids.setdefault(id(session), len(self.connection_ids)),
                )
            )
        return succeed(reply)


class SinkFactory(SmtpFactory):
    """Counts the most connections that were open at once."""

    max_seen = 0
    total_connections = 0

    def buildProtocol(self, addr: IAddress | None) -> SmtpServerProtocol:
        protocol = super().buildProtocol(addr)
        self.total_connections += 1
        self.max_seen = max(self.max_seen, len(self.connections))
        return protocol


async def start_sink(
    reactor: IRelayReactor,
    backend: SinkBackend,
    tls: IOpenSSLServerConnectionCreator | None = None,
) -> tuple[SinkFactory, IListeningPort, int]:
    settings = ListenerSettings(
        hostname="sink.test",
        max_message_size=50_000_000,
        max_recipients=1000,
        max_connections=1000,
        max_connections_per_client=1000,
    )
    factory = SinkFactory(settings, backend, reactor, tls, name="sink")
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return factory, port, int(port.getHost().port)  # type: ignore[attr-defined]
