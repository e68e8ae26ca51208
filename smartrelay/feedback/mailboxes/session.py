"""What both readers' sessions need: connecting (TCP or implicit TLS), deadlines on every
server answer, and the one-line description of a failure (never with the password)."""

from __future__ import annotations

from typing import TypeVar

from attrs import frozen
from OpenSSL import SSL
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from smartrelay.config import FeedbackMailbox
from smartrelay.feedback.mailboxes.base import MailboxError
from smartrelay.feedback.mailboxes.tls import CaFileError, client_tls, load_ca_file
from smartrelay.reactor import IRelayReactor

T = TypeVar("T")


def mailbox_tls(mailbox: FeedbackMailbox) -> IOpenSSLClientConnectionCreator:
    """The TLS client settings for ``mailbox``'s server; its ``ca_file`` is read for each
    session, so one that cannot be read fails that session (MailboxError)."""
    try:
        ca = load_ca_file(mailbox.ca_file) if mailbox.ca_file else None
    except CaFileError as e:
        raise MailboxError(f"ca_file: {e}") from e
    return client_tls(mailbox.host, ca)


@frozen
class ReaderTunables:
    """Timing of the readers and their services (tests shorten them)."""

    #: Seconds to connect, and to wait for any one answer of the server.
    timeout: float = 120.0
    #: First wait after a failed session; doubled after each failure in a row, up to
    #: ``max_retry``.
    first_retry: float = 10.0
    max_retry: float = 1800.0
    #: Longest IMAP IDLE before it is renewed (RFC 2177: at most 29 minutes).
    max_idle: float = 25 * 60.0


DEFAULT_TUNABLES = ReaderTunables()


def endpoint_for(
    reactor: IRelayReactor,
    host: str,
    port: int,
    timeout: float,
    tls: IOpenSSLClientConnectionCreator | None,
) -> IStreamClientEndpoint:
    """TCP to ``host:port``, wrapped in TLS from the start when ``tls`` is given."""
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host.encode("idna"), port, timeout)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    return endpoint


async def answer(
    reactor: IRelayReactor, d: Deferred[T], seconds: float, protocol: Protocol | None, what: str
) -> T:
    """``d``'s result, or MailboxError if it takes more than ``seconds`` (the
    connection is then dropped: a server that stops answering ends the session)."""
    d.addTimeout(seconds, reactor)
    try:
        return await d
    except TimeoutError:
        if protocol is not None:
            abort(protocol)
        raise MailboxError(f"no answer from the server to {what} in {seconds:g} s") from None


def closed_before_the_command() -> MailboxError:
    """The failure of a command that a reader's client did not send: the connection was
    closed already (by stop() or the server), so no answer would ever come."""
    return MailboxError("the connection was closed before the command was sent")


def describe(error: BaseException | Failure) -> str:
    """One line for a failed session (the errors of Twisted's mail clients are bytes, lists,
    or connection failures with long reprs)."""
    if isinstance(error, Failure):
        error = error.value if error.value is not None else Exception(error.getErrorMessage())
    if isinstance(error, MailboxError):
        text = str(error)
    elif isinstance(error, SSL.Error):
        # [('SSL routines', '', 'certificate verify failed')]
        reasons = [str(item[-1]) for item in (error.args[0] if error.args else ()) if item] or [
            str(error)
        ]
        text = f"TLS error: {'; '.join(reasons)}"
    else:
        args = getattr(error, "args", ())
        parts = []
        for arg in args:
            parts.append(arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg))
        detail = " ".join(p for p in parts if p) or str(error)
        text = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    return " ".join(text.split())[:500]


def abort(protocol: Protocol) -> None:
    """Drop ``protocol``'s connection now, without waiting to send what is buffered."""
    transport = protocol.transport
    if transport is not None:
        drop = getattr(transport, "abortConnection", transport.loseConnection)
        drop()
