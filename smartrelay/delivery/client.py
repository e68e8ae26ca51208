"""The outbound SMTP client: one connection to a next hop, reused for several messages.

Its own small protocol (like the listener's) so that it pipelines MAIL/RCPT/DATA when the
server offers PIPELINING, reports a reply per recipient, reuses the connection with RSET
only when a transaction broke off, and says whether TLS was used.
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Protocol

from attrs import evolve, frozen
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.config import SourceAddress
from smartrelay.delivery.pools import SourceBoundEndpoint
from smartrelay.delivery.routing import NextHop
from smartrelay.reactor import IRelayReactor

COMMAND_TIMEOUT = 300.0  # RFC 5321 4.5.3.2: 5 minutes for MAIL, RCPT; we use it for all
DATA_END_TIMEOUT = 600.0  # 10 minutes for the reply to the final dot
DATA_BLOCK_TIMEOUT = 180.0  # RFC 5321 4.5.3.2.5: 3 minutes for the server to take more data
#: DATA goes out in pieces of about this size, each as the connection takes it.
DATA_PIECE = 64 * 1024


class SmtpClientError(Exception):
    """The connection or the session failed before a reply could be had (a temporary error)."""


class TlsFailed(SmtpClientError):
    """The TLS handshake after STARTTLS failed."""


class TlsUnavailable(SmtpClientError):
    """TLS is required but the server does not offer STARTTLS."""


@frozen
class ServerReply:
    code: int
    text: str  # the lines' texts joined by "\n"

    @property
    def line(self) -> str:
        """One line for logs and events: ``550 5.1.1 No such user``."""
        return f"{self.code} {' '.join(self.text.split())}"


#: The reply recorded for a non-ASCII address when the next hop does not offer SMTPUTF8
#: (RFC 6531 3.2): a permanent failure, category ``technical`` (the address may be valid;
#: the hop cannot take it), so the address is not suppressed as a hard bounce would be.
NO_SMTPUTF8 = ServerReply(553, "5.6.7 non-ASCII address and the next hop does not offer SMTPUTF8")


@frozen
class RecipientResult:
    address: str
    reply: ServerReply

    @property
    def delivered(self) -> bool:
        return 200 <= self.reply.code < 300


class _ReplyReader(LineOnlyReceiver):
    """Reads (multi-line) replies and hands them to waiters in order."""

    delimiter = b"\n"
    MAX_LENGTH = 65536

    def __init__(self) -> None:
        self._waiting: deque[Deferred[ServerReply]] = deque()
        self._lines: list[str] = []
        self.connected_deferred: Deferred[_ReplyReader] = Deferred()
        self.lost = False
        self.lost_reason: Failure | None = None

    def connectionMade(self) -> None:
        self.connected_deferred.callback(self)

    def expect(self) -> Deferred[ServerReply]:
        waiter: Deferred[ServerReply] = Deferred()
        if self.lost:
            waiter.errback(SmtpClientError(f"connection lost: {self._lost_text()}"))
        else:
            self._waiting.append(waiter)
        return waiter

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def lineReceived(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        code, separator, rest = text[:3], text[3:4], text[4:]
        if not code.isdigit():
            self._fail_all(SmtpClientError(f"bad reply line {text[:80]!r}"))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._lines.append(rest)
        if separator == "-":
            return
        reply = ServerReply(int(code), "\n".join(self._lines))
        self._lines = []
        if self._waiting:
            self._waiting.popleft().callback(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail_all(SmtpClientError("reply line too long"))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.lost_reason = reason
        self._fail_all(SmtpClientError(f"connection lost: {self._lost_text()}"))

    def _lost_text(self) -> str:
        if self.lost_reason is None or self.lost_reason.check(ConnectionDone):
            return "closed by the server"
        return " ".join(self.lost_reason.getErrorMessage().split())

    def _fail_all(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            waiter.errback(error)


#: A line that starts with a dot. Replaced by the regex, not ``bytes.replace``: the regex
#: goes from CR to CR at C speed, the replace's substring search is twice as slow on text.
_DOT_LINE = re.compile(rb"\r\n\.")


def dot_stuff(message: bytes) -> bytes:
    """The message as DATA content: dots doubled at line starts, ending in CRLF, then the dot."""
    return b"".join(dot_stuffed_pieces(message))


def dot_stuffed_pieces(message: bytes, piece: int = DATA_PIECE) -> Iterator[bytes]:
    """:func:`dot_stuff` of ``message`` in pieces of about ``piece`` bytes, so that a big
    message is never copied whole. A piece ends after a CRLF when there is one in reach, and
    never between a CR and its LF, so each piece is stuffed on its own."""
    view = memoryview(message)
    start, end_all = 0, len(message)
    line_start = True  # the next piece begins a line
    while start < end_all:
        end = min(start + piece, end_all)
        if end < end_all:
            cut = message.rfind(b"\r\n", start, end)
            if cut >= 0:
                end = cut + 2
            while end < end_all and message[end - 1] == 0x0D:
                end += 1  # keep a CR with what follows it
        chunk = bytes(view[start:end])
        if line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        yield _DOT_LINE.sub(b"\r\n..", chunk)
        line_start = chunk.endswith(b"\r\n")
        start = end
    yield b".\r\n" if message.endswith(b"\r\n") else b"\r\n.\r\n"


@implementer(IPushProducer)
class _DataWriter:
    """Writes DATA content to a transport piece by piece, pausing while the transport's
    buffer is full (backpressure), so a big message never sits in memory twice.

    ``done`` fires when everything was handed to the transport; it fails if the connection
    goes away first, or if the server takes nothing for ``block_timeout`` seconds (then the
    connection is aborted).
    """

    def __init__(
        self,
        transport: ITransport,
        pieces: Iterator[bytes],
        clock: IReactorTime,
        block_timeout: float,
    ) -> None:
        self._transport = transport
        self._pieces = pieces
        self._clock = clock
        self._block_timeout = block_timeout
        self._paused = False
        self._stopped = False
        self._timer: IDelayedCall | None = None
        self.done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._write_more()
        return self.done

    def pauseProducing(self) -> None:
        self._paused = True
        self._arm_timer()

    def resumeProducing(self) -> None:
        self._paused = False
        self._write_more()

    def stopProducing(self) -> None:
        self._finish(SmtpClientError("connection lost while sending the message"))

    def _write_more(self) -> None:
        while not self._paused and not self._stopped:
            piece = next(self._pieces, None)
            if piece is None:
                self._finish(None)
                return
            self._transport.write(piece)

    def _arm_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self._stopped:
            self._timer = self._clock.callLater(self._block_timeout, self._stalled)

    def _stalled(self) -> None:
        self._timer = None
        if self._paused and not self._stopped:
            self._finish(SmtpClientError("the server took no data for too long"))
            self._transport.abortConnection()  # type: ignore[attr-defined]

    def _finish(self, error: Exception | None) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        with contextlib.suppress(Exception):
            self._transport.unregisterProducer()  # type: ignore[attr-defined]
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)


class SmtpConnection:
    """An established SMTP session with one next hop."""

    def __init__(
        self, reader: _ReplyReader, hop: NextHop, clock: IReactorTime, helo_name: str
    ) -> None:
        self._reader = reader
        self.hop = hop
        self._clock = clock
        self._helo_name = helo_name
        self.extensions: dict[str, str] = {}
        self.tls = False
        #: The server's certificate chain (DER, its own first) once TLS is up (MTA-STS).
        self.peer_certificates: tuple[bytes, ...] = ()
        self.messages_sent = 0
        self.greeting = ServerReply(0, "")
        self._closed = False

    @property
    def usable(self) -> bool:
        return not (self._closed or self._reader.lost)

    async def _command(self, line: str, limit: float = COMMAND_TIMEOUT) -> ServerReply:
        waiter = self._reader.expect()
        self._reader.send(line.encode("utf-8") + b"\r\n")
        return await waiter.addTimeout(limit, self._clock)

    async def _reply(self, limit: float = COMMAND_TIMEOUT) -> ServerReply:
        return await self._reader.expect().addTimeout(limit, self._clock)

    async def _replies(
        self, waiters: Sequence[Deferred[ServerReply]], limit: float
    ) -> list[ServerReply]:
        """The replies ``waiters`` wait for (a pipelined group), each within ``limit``
        seconds of the previous one, else :class:`~twisted.internet.defer.TimeoutError` as
        ``addTimeout`` raises it. One timer for the group, pushed back at each reply: a
        timer made and cancelled for each reply of each message cost ~6 µs a reply."""
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            for waiter in waiters:
                waiter.cancel()

        timer = self._clock.callLater(limit, expire)
        replies: list[ServerReply] = []
        try:
            for waiter in waiters:
                replies.append(await waiter)
                if timer.active():
                    timer.reset(limit)
        except BaseException as error:
            # The replies not awaited fail too, now or when the connection goes (the
            # caller closes it): not an "Unhandled error in Deferred" each.
            for waiter in waiters:
                waiter.addErrback(lambda _: None)
            if timed_out and isinstance(error, CancelledError):
                raise DeferredTimeout(f"no reply within {limit} seconds") from None
            raise
        finally:
            if timer.active():
                timer.cancel()
        return replies

    async def start(self, starttls: bool, require_tls: bool) -> ServerReply | None:
        """Greeting, EHLO (HELO as fallback), STARTTLS, AUTH.

        Returns None when the session is ready, or the server's refusal (a reply that applies
        to every recipient, e.g. a 554 greeting). Raises SmtpClientError (temporary) when the
        session could not be set up.
        """
        self.greeting = await self._reply()
        if self.greeting.code != 220:
            return self.greeting
        refusal = await self._hello()
        if refusal is not None:
            return refusal
        if not self.tls and (starttls or require_tls):
            if "STARTTLS" in self.extensions:
                reply = await self._command("STARTTLS")
                if reply.code != 220:
                    if require_tls:
                        raise TlsUnavailable(f"STARTTLS refused: {reply.line}")
                else:
                    self._reader.transport.startTLS(_client_tls_options())  # type: ignore[union-attr]
                    try:
                        refusal = await self._hello()
                    except SmtpClientError as error:
                        raise TlsFailed(str(error)) from error
                    self.tls = True
                    self.peer_certificates = _peer_chain(self._reader.transport)
                    if refusal is not None:
                        return refusal
            elif require_tls:
                raise TlsUnavailable("the server does not offer STARTTLS")
        if self.hop.username is not None:
            return await self._authenticate()
        return None

    async def _hello(self) -> ServerReply | None:
        reply = await self._command(f"EHLO {self._helo_name}")
        if reply.code == 250:
            lines = reply.text.split("\n")[1:]
            self.extensions = {}
            for line in lines:
                keyword, _, params = line.strip().partition(" ")
                self.extensions[keyword.upper()] = params
            return None
        reply = await self._command(f"HELO {self._helo_name}")
        self.extensions = {}
        return None if reply.code == 250 else reply

    async def _authenticate(self) -> ServerReply | None:
        if not self.tls and not self.hop.implicit_tls:
            raise TlsUnavailable("refusing to send the smarthost password without TLS")
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user = (self.hop.username or "").encode()
        password = (self.hop.password or "").encode()
        if "PLAIN" in mechanisms or not mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password).decode()
            reply = await self._command(f"AUTH PLAIN {token}")
        elif "LOGIN" in mechanisms:
            reply = await self._command("AUTH LOGIN")
            if reply.code == 334:
                reply = await self._command(base64.b64encode(user).decode())
            if reply.code == 334:
                reply = await self._command(base64.b64encode(password).decode())
        else:
            raise SmtpClientError(f"no common AUTH mechanism (the server offers {mechanisms})")
        if reply.code != 235:
            # Our credentials are the problem, not the recipients: defer (as Postfix's
            # smtp_sasl_auth_soft_bounce), never bounce the whole spool.
            raise SmtpClientError(f"the smarthost refused our credentials: {reply.line}")
        return None

    async def send(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> list[RecipientResult]:
        """One transaction; a reply per recipient (the final one for those accepted).

        A non-ASCII address needs SMTPUTF8 (RFC 6531): MAIL FROM carries the parameter when
        the server offers it; when it does not, such a recipient (every recipient, when it is
        the sender) gets :data:`NO_SMTPUTF8` without being sent, the others go on."""
        needs_utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        if needs_utf8 and "SMTPUTF8" not in self.extensions:
            if not sender.isascii():
                return [RecipientResult(r, NO_SMTPUTF8) for r in recipients]
            plain = [r for r in recipients if r.isascii()]
            results = {r: RecipientResult(r, NO_SMTPUTF8) for r in recipients if not r.isascii()}
            if plain:
                results.update((x.address, x) for x in await self.send(sender, plain, message))
            return [results[r] for r in recipients]
        params = ""
        size = self.extensions.get("SIZE")
        if size is not None:
            params += f" SIZE={len(message)}"
        if "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if needs_utf8:
            params += " SMTPUTF8"
        commands = [f"MAIL FROM:<{sender}>{params}"] + [f"RCPT TO:<{r}>" for r in recipients]
        if "PIPELINING" in self.extensions:
            waiters = [self._reader.expect() for _ in range(len(commands) + 1)]
            self._reader.send("".join(c + "\r\n" for c in [*commands, "DATA"]).encode())
            replies = await self._replies(waiters, COMMAND_TIMEOUT)
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            mail_reply = await self._command(commands[0])
            if mail_reply.code != 250:
                await self._reset()
                return [RecipientResult(r, mail_reply) for r in recipients]
            rcpt_replies = [await self._command(c) for c in commands[1:]]
            data_reply = (
                await self._command("DATA")
                if any(r.code < 300 for r in rcpt_replies)
                else ServerReply(554, "5.5.1 no recipient accepted")
            )
        if mail_reply.code != 250:
            await self._reset()
            return [RecipientResult(r, mail_reply) for r in recipients]
        accepted = [
            r for r, reply in zip(recipients, rcpt_replies, strict=True) if reply.code < 300
        ]
        results = {
            r: RecipientResult(r, reply)
            for r, reply in zip(recipients, rcpt_replies, strict=True)
            if reply.code >= 300
        }
        if data_reply.code != 354:
            if accepted:
                for r in accepted:
                    results[r] = RecipientResult(r, data_reply)
            await self._reset()
            return [results[r] for r in recipients]
        final_reply = self._reader.expect()  # waiting before we write: it may come early
        with contextlib.suppress(SmtpClientError):
            # If the connection goes, the final reply's waiter fails and says so.
            await self._send_data(message)
        final = await final_reply.addTimeout(DATA_END_TIMEOUT, self._clock)
        self.messages_sent += 1
        for r in accepted:
            results[r] = RecipientResult(r, final)
        return [results[r] for r in recipients]

    async def _send_data(self, message: bytes) -> None:
        transport = self._reader.transport
        if transport is None or self._reader.lost:
            raise SmtpClientError("connection lost before the message")
        if len(message) <= DATA_PIECE:
            transport.write(dot_stuff(message))  # one piece: no producer needed
            return
        pieces = dot_stuffed_pieces(message)
        writer = _DataWriter(transport, pieces, self._clock, DATA_BLOCK_TIMEOUT)
        await writer.start()

    async def _reset(self) -> None:
        if self.usable:
            reply = await self._command("RSET")
            if reply.code != 250:
                self.close()

    async def quit(self) -> None:
        if self.usable and not self._reader.lost:
            with contextlib.suppress(Exception):
                await self._command("QUIT", limit=10)
        self.close()

    def close(self) -> None:
        self._closed = True
        if self._reader.transport is not None:
            self._reader.transport.loseConnection()


def _peer_chain(transport: object) -> tuple[bytes, ...]:
    """The certificates the server sent (DER), from the TLS connection under ``transport``."""
    try:
        chain = transport.getHandle().get_peer_cert_chain()  # type: ignore[attr-defined]
    except Exception:
        return ()
    return tuple(c.to_cryptography().public_bytes(Encoding.DER) for c in chain or ())


def _client_tls_options() -> ssl.CertificateOptions:
    # MTA-to-MTA TLS is opportunistic: certificates are not checked (RFC 3207 4.1), as
    # Postfix's "may" level does.
    return ssl.CertificateOptions(verify=False)


async def connect(
    reactor: IRelayReactor,
    hop: NextHop,
    helo_name: str,
    connect_timeout: float,
    source: SourceAddress | None = None,
) -> tuple[SmtpConnection, _ReplyReader]:
    """Open a TCP (or implicit TLS) connection to ``hop``; from ``source``'s address (a
    pool's, which also gives the HELO name) if given."""
    endpoint: IStreamClientEndpoint
    if source is None:
        endpoint = HostnameEndpoint(reactor, hop.host, hop.port, timeout=connect_timeout)
    else:
        endpoint = SourceBoundEndpoint(reactor, hop.host, hop.port, source, connect_timeout)
        helo_name = source.helo
    if hop.implicit_tls:
        endpoint = wrapClientTLS(_client_tls_options(), endpoint)
    reader = _ReplyReader()
    factory = Factory.forProtocol(lambda: reader)
    factory.noisy = False
    try:
        await endpoint.connect(factory)
    except Exception as error:  # refused, unreachable, timeout, DNS
        raise SmtpClientError(f"cannot connect to {hop.host}:{hop.port}: {error}") from error
    connection = SmtpConnection(reader, hop, reactor, helo_name)
    connection.tls = hop.implicit_tls
    return connection, reader


class OutboundSession(Protocol):
    """What the delivery manager needs of a session with a next hop (:class:`SmtpConnection`
    is the one; tests give it fakes)."""

    hop: NextHop
    tls: bool
    messages_sent: int

    @property
    def usable(self) -> bool: ...

    async def send(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> list[RecipientResult]: ...

    async def quit(self) -> None: ...

    def close(self) -> None: ...


#: Opens a session with a next hop: a ready session, or the refusal that applies to every
#: recipient; raises :class:`SmtpClientError` (or a timeout) when none could be had.
Connector = Callable[[NextHop], Awaitable[tuple[OutboundSession | None, ServerReply | None]]]


@frozen
class SmtpConnector:
    """The :data:`Connector` that dials next hops over TCP with :func:`open_session`."""

    reactor: IRelayReactor
    helo_name: str
    connect_timeout: float
    tls_policy: str

    #: A pool's source address (and HELO name) the connections leave from; None: the
    #: system's default address and ``helo_name``.
    source: SourceAddress | None = None

    async def __call__(self, hop: NextHop) -> tuple[OutboundSession | None, ServerReply | None]:
        return await open_session(
            self.reactor, hop, self.helo_name, self.connect_timeout, self.tls_policy, self.source
        )

    def from_source(self, source: SourceAddress) -> SmtpConnector:
        """This connector, dialling from ``source`` (docs/delivery.md, "Source-address
        pools")."""
        return evolve(self, source=source)


async def open_session(
    reactor: IRelayReactor,
    hop: NextHop,
    helo_name: str,
    connect_timeout: float,
    tls_policy: str,
    source: SourceAddress | None = None,
) -> tuple[SmtpConnection | None, ServerReply | None]:
    """A ready session, or the refusal that applies to every recipient.

    In opportunistic mode a failed TLS handshake is retried once in the clear; with
    ``tls_policy == "required"`` (or a smarthost that asks for it) it is an error.
    """
    require_tls = tls_policy == "required" or hop.require_tls
    for starttls in (True, False):
        connection, _ = await connect(reactor, hop, helo_name, connect_timeout, source)
        try:
            refusal = await connection.start(starttls=starttls, require_tls=require_tls)
        except TlsFailed:
            connection.close()
            if require_tls or not starttls:
                raise
            continue
        except BaseException:
            connection.close()
            raise
        if refusal is not None:
            await connection.quit()
            return None, refusal
        return connection, None
    raise SmtpClientError("unreachable")  # pragma: no cover


__all__ = [
    "NO_SMTPUTF8",
    "Connector",
    "OutboundSession",
    "RecipientResult",
    "ServerReply",
    "SmtpClientError",
    "SmtpConnection",
    "SmtpConnector",
    "TlsFailed",
    "TlsUnavailable",
    "dot_stuff",
    "open_session",
]
