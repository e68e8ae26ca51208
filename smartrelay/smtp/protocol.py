"""The ESMTP server protocol shared by the submission and inbound listeners.

Written on ``Protocol`` rather than ``twisted.mail.smtp.ESMTP`` because that class falls short
where a relay's listener is judged (docs/smtp.md): its STARTTLS keeps lines buffered before the
handshake (the CVE-2011-0411 class of injection), its replies carry no enhanced status codes,
and it hands DATA to the message line by line with no size cap while streaming.

Commands are handled strictly one after another: while a command waits on a Deferred
(AUTH, the final dot), further pipelined input stays buffered, so replies keep their order.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.smtp import replies as R
from smartrelay.smtp.ratelimit import AuthFailureLimiter
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.session import (
    Admitted,
    Envelope,
    ISmtpBackend,
    ListenerSettings,
    Session,
    has_control,
    printable,
)
from smartrelay.spool import BodyWriter, Spool, SpooledBody

log = Logger()

COMMAND = 0
DATA = 1
AUTH_RESPONSE = 2

#: Input held while a command is under way before the transport is paused (backpressure).
MAX_PENDING_INPUT = 1 << 20
#: A DATA line longer than this is handed on in pieces instead of being buffered whole.
MAX_DATA_LINE = 64 * 1024

# Searches over DATA content that start with a literal, so that the regex engine skips to each
# candidate at C speed: on a 355 KB message each takes ~0.15 ms, where counting CR, LF and CRLF
# took 0.66 ms and a lookbehind-first pattern for a bare LF 3.8 ms (docs/performance.md).
_BARE_LF = re.compile(rb"\n(?<!\r\n)")
_BARE_CR = re.compile(rb"\r(?!\n)")
_STUFFED_DOT = re.compile(rb"\n\.")
_END_OF_DATA = re.compile(rb"\r\n\.\r\n")
_ADDRESS = re.compile(rb"^\s*(FROM|TO)\s*:\s*<([^<>\s]*)>\s*(.*)$", re.IGNORECASE)
_LOCAL_PART = re.compile(r"^[^\s@\"\\,;:<>()\[\]]+$|^\"(?:[^\"\\]|\\.)*\"$")
_DOMAIN = re.compile(r"^(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)*[^\W_](?:[\w-]{0,61}[^\W_])?$")
_ADDRESS_LITERAL = re.compile(r"^\[(?:IPv6:)?[0-9A-Fa-f:.]+\]$")


def parse_address(raw: bytes) -> tuple[str | None, bool]:
    """The address between the brackets as text (None if malformed), and whether it is ASCII."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, False
    ascii_only = text.isascii()
    if text == "":
        return "", True
    if len(text) > 254:
        return None, ascii_only
    local, at, domain = text.rpartition("@")
    if not at or not local or len(local) > 64 or not _LOCAL_PART.match(local):
        return None, ascii_only
    if not (_DOMAIN.match(domain) or _ADDRESS_LITERAL.match(domain)):
        return None, ascii_only
    return text, ascii_only


def parse_parameters(raw: bytes) -> dict[str, str] | None:
    """``KEY=VALUE KEY`` parameters of MAIL/RCPT, keys upper-cased; None if malformed."""
    out: dict[str, str] = {}
    for item in raw.split():
        try:
            text = item.decode("ascii")
        except UnicodeDecodeError:
            return None
        key, _, value = text.partition("=")
        if not key.isalnum() and not key.replace("-", "").isalnum():
            return None
        out[key.upper()] = value
    return out


@implementer(IHandshakeListener)
class SmtpServerProtocol(Protocol):
    """One SMTP connection. ``factory`` is a :class:`smartrelay.smtp.listener.SmtpFactory`.

    Every state has a deadline: the TLS handshake (``tls_handshake_timeout``, then abort),
    commands (``idle_timeout``), DATA (``data_read_timeout`` per read and ``data_timeout``
    for the whole message), and closing itself (``close_grace``, then abort): a peer that
    neither reads nor answers TLS close_notify cannot keep its connection slot.
    """

    def __init__(
        self,
        settings: ListenerSettings,
        backend: ISmtpBackend,
        clock: IReactorTime,
        tls: IOpenSSLServerConnectionCreator | None,
        auth_limiter: AuthFailureLimiter,
        on_close: Callable[[SmtpServerProtocol], None] = lambda p: None,
        on_accepted: Callable[[int], None] = lambda recipients: None,
        on_input: Callable[[], None] | None = None,
    ) -> None:
        """``on_accepted(recipients)``: a message was accepted (2xx after DATA);
        ``on_input()``: the client sent something (every read)."""
        self.settings = settings
        self.backend = backend
        self.clock = clock
        self.tls = tls
        self.auth_limiter = auth_limiter
        self._on_close = on_close
        self._on_accepted = on_accepted
        self._on_input = on_input
        self.session = Session("", 0)
        #: Set by the factory when this connection is to be refused at the greeting.
        self.refusal: Reply | None = None
        self._buffer = bytearray()
        self._mode = COMMAND
        self._busy = False  # a command is waiting on a Deferred
        self._closing = False
        self._transport_paused = False
        self._shutdown_pending = False
        self._timer: IDelayedCall | None = None
        #: What ``_timer`` calls when it expires.
        self._timer_expired: Callable[[], None] | None = None
        self._data_deadline: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        self._handshaking = False
        self._lost = False
        self._discarding_line = False  # inside a command line that was too long
        self._bad_commands = 0
        # DATA state
        #: Where big bodies go (a backend without a spool gets every body as bytes).
        self._spool: Spool | None = getattr(backend, "spool", None)
        self._body: BodyWriter | None = None
        self._size = 0
        self._oversize = False
        self._has_nul = False
        self._has_bare_cr = False
        self._line_start = True  # the next DATA byte starts a line
        self._after_crlf = True  # the previous line ended in CRLF (or DATA just began)
        # AUTH state
        self._auth_mechanism = ""
        self._auth_user = ""

    # -- connection ---------------------------------------------------------------------------
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(peer, "host", "") or ""
        self.session = Session(host, int(getattr(peer, "port", 0) or 0))
        self.session.tls = self._transport_is_tls()
        if self.refusal is not None:
            self.send_and_close(self.refusal)
            return
        # Implicit TLS (an ssl: endpoint): the greeting waits in the TLS layer for the handshake.
        self.send(Reply(220, "", f"{self.settings.hostname} ESMTP SmartRelay"))
        if self.session.tls:
            self._start_handshake_timer()
        else:
            self._restart_timer(self.settings.idle_timeout)

    def _start_handshake_timer(self) -> None:
        self._handshaking = True
        self._restart_timer(self.settings.tls_handshake_timeout, self._handshake_timed_out)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake (implicit or after STARTTLS) is done."""
        if self._handshaking:
            self._handshaking = False
            self._restart_timer(self.settings.idle_timeout)

    def _transport_is_tls(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._lost = True
        self._cancel_timer()
        self._cancel_data_deadline()
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None
        self._buffer.clear()
        self._drop_body()
        self._on_close(self)

    def send(self, reply: Reply) -> None:
        if self.transport is not None:
            self.transport.write(reply.lines())

    def close(self) -> None:
        """Close after what was written; abort if that has not happened within close_grace."""
        self._closing = True
        self._cancel_timer()
        self._cancel_data_deadline()
        self._drop_body()
        if self.transport is not None and not self._lost:
            self.transport.loseConnection()
            if self._abort_timer is None and not self._lost:
                self._abort_timer = self.clock.callLater(
                    self.settings.close_grace, self._abort, "close did not complete"
                )

    def _abort(self, why: str) -> None:
        self._abort_timer = None
        self._closing = True
        self._cancel_timer()
        self._cancel_data_deadline()
        if self.transport is not None and not self._lost:
            log.info("{ip}: {why}: aborting the connection", ip=self.session.client_ip, why=why)
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        """The relay is stopping: say so now, or right after the reply under way."""
        if self._busy:
            self._shutdown_pending = True
        elif not self._closing:
            self.send_and_close(R.SHUTTING_DOWN)

    def send_and_close(self, reply: Reply) -> None:
        self.send(reply)
        self.close()

    # -- timers -------------------------------------------------------------------------------
    def _restart_timer(self, seconds: float, expired: Callable[[], None] | None = None) -> None:
        expired = expired or self._timed_out
        timer = self._timer
        if self._closing:
            self._cancel_timer()
        elif timer is not None and self._timer_expired == expired and timer.active():
            # Pushing a pending call later is an assignment (the reactor moves it when its
            # old time comes); a new call for every command line cost a heap entry and a
            # cancellation each (docs/performance.md, "Issue 19, third session").
            timer.reset(seconds)
        else:
            self._cancel_timer()
            self._timer = self.clock.callLater(seconds, expired)
            self._timer_expired = expired

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        log.info("{ip}: idle timeout", ip=self.session.client_ip)
        self.send_and_close(R.IDLE_TIMEOUT)

    def _handshake_timed_out(self) -> None:
        # Nothing can be said inside an unfinished handshake, and a graceful TLS close would
        # wait for it: abort.
        self._timer = None
        self._abort("TLS handshake timeout")

    def _cancel_data_deadline(self) -> None:
        if self._data_deadline is not None and self._data_deadline.active():
            self._data_deadline.cancel()
        self._data_deadline = None

    def _data_timed_out(self) -> None:
        """The DATA phase took longer than data_timeout: drop what came, 421, close."""
        self._data_deadline = None
        log.info(
            "{ip}: DATA not finished within {seconds}s ({size} bytes received): closing",
            ip=self.session.client_ip,
            seconds=self.settings.data_timeout,
            size=self._size,
        )
        self._drop_body()
        self.session.reset_transaction()
        self.send_and_close(R.DATA_TIMEOUT)

    # -- input --------------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._on_input is not None:
            self._on_input()
        self._buffer += data
        if self._handshaking:  # TLS hands over application data only after the handshake
            self.handshakeCompleted()
        if self._mode == DATA:
            self._restart_timer(self.settings.data_read_timeout)
        self._process()
        if (
            self._busy
            and not self._transport_paused
            and len(self._buffer) > MAX_PENDING_INPUT
            and self.transport is not None
        ):
            self._transport_paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _process(self) -> None:
        while not self._busy and not self._closing:
            if self._mode == DATA:
                if not self._consume_data():
                    return
                continue
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if self._discarding_line or len(self._buffer) > self.settings.max_command_line:
                    # Keep nothing of an overlong line, however many reads it spans; answer
                    # once, when it ends.
                    self._buffer.clear()
                    self._discarding_line = True
                return
            line = bytes(self._buffer[: newline + 1])
            del self._buffer[: newline + 1]
            if self._discarding_line or len(line) > self.settings.max_command_line:
                self._discarding_line = False
                self._restart_timer(self.settings.idle_timeout)
                self._mode = COMMAND  # an overlong AUTH response ends the exchange
                self._bad_command(R.LINE_TOO_LONG)
                continue
            self._restart_timer(self.settings.idle_timeout)
            text = line.rstrip(b"\r\n")
            if self._mode == AUTH_RESPONSE:
                self._auth_response(text)
            else:
                self._command(text)
        if not self._busy and self._transport_paused and self.transport is not None:
            self._transport_paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _wait(self, d: Deferred[Any]) -> None:
        """Hold further input until ``d`` has fired and its reply was sent.

        The client is not idle while it waits for us (a commit, a password check): the idle
        timer stops meanwhile. Otherwise a slow commit would end in 421 after the message
        was stored, and the client would send it again.
        """
        self._busy = True
        self._cancel_timer()

        def done(_: object) -> None:
            self._busy = False
            if self._shutdown_pending and not self._closing:
                self.send_and_close(R.SHUTTING_DOWN)
            if not self._closing:
                self._restart_timer(self.settings.idle_timeout)
                self._process()
                if not self._busy and self._transport_paused and self.transport is not None:
                    self._transport_paused = False
                    self.transport.resumeProducing()  # type: ignore[attr-defined]

        d.addBoth(done)

    def _bad_command(self, reply: Reply) -> None:
        self._bad_commands += 1
        if self._bad_commands > self.settings.max_bad_commands:
            self.send_and_close(R.TOO_MANY_ERRORS)
        else:
            self.send(reply)

    # -- commands -----------------------------------------------------------------------------
    def _command(self, line: bytes) -> None:
        verb, _, rest = line.strip().partition(b" ")
        name = verb.upper().decode("ascii", "replace")
        handler = getattr(self, f"smtp_{name}", None) if name.isalpha() else None
        if handler is None:
            self._bad_command(R.UNKNOWN_COMMAND)
            return
        handler(rest.strip())

    def smtp_HELO(self, rest: bytes) -> None:
        self._hello(rest, esmtp=False)

    def smtp_EHLO(self, rest: bytes) -> None:
        self._hello(rest, esmtp=True)

    def _hello(self, rest: bytes, esmtp: bool) -> None:
        if has_control(rest):
            # The name goes into Received: a CR or LF there would forge header lines.
            self._bad_command(R.CONTROL_CHARACTERS)
            return
        if not rest or b" " in rest:
            self._bad_command(Reply(501, "5.5.4", "Syntax: EHLO hostname"))
            return
        self.session.helo = rest.decode("utf-8", "replace")
        self.session.esmtp = esmtp
        self.session.reset_transaction()
        if not esmtp:
            self.send(Reply(250, "", self.settings.hostname))
            return
        lines = [
            self.settings.hostname,
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls is not None and not self.session.tls:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        self.send(Reply(250, "", "\n".join(lines)))

    def _auth_offered(self) -> bool:
        return bool(self.backend.offers_auth) and self.session.tls

    def smtp_NOOP(self, rest: bytes) -> None:
        self.send(R.OK)

    def smtp_RSET(self, rest: bytes) -> None:
        self.session.reset_transaction()
        self.send(R.RESET_OK)

    def smtp_QUIT(self, rest: bytes) -> None:
        self.send_and_close(R.BYE)

    def smtp_VRFY(self, rest: bytes) -> None:
        self.send(R.VRFY_REPLY)

    def smtp_HELP(self, rest: bytes) -> None:
        self.send(R.HELP_REPLY)

    def smtp_EXPN(self, rest: bytes) -> None:
        self.send(R.NOT_IMPLEMENTED)

    def smtp_BDAT(self, rest: bytes) -> None:
        self._bad_command(R.NOT_IMPLEMENTED)

    def smtp_STARTTLS(self, rest: bytes) -> None:
        if self.session.tls:
            self._bad_command(R.ALREADY_TLS)
            return
        if self.tls is None:
            self.send(R.TLS_UNAVAILABLE)
            return
        if rest:
            self._bad_command(Reply(501, "5.5.4", "STARTTLS takes no parameters"))
            return
        # Whatever the client pipelined after STARTTLS came in the clear and must not be
        # acted upon inside the TLS session (CVE-2011-0411): throw it away.
        self._buffer.clear()
        self.send(R.READY_FOR_TLS)
        self.transport.startTLS(self.tls)  # type: ignore[union-attr]
        self.session.tls = True
        self.session.reset_after_tls()
        self._start_handshake_timer()

    def smtp_AUTH(self, rest: bytes) -> None:
        if not self.backend.offers_auth:
            self._bad_command(R.AUTH_NOT_AVAILABLE)
            return
        if not self.session.tls:
            self.send(R.AUTH_NEEDS_TLS)
            return
        if self.session.helo is None or not self.session.esmtp:
            self._bad_command(R.BAD_SEQUENCE_HELO)
            return
        if self.session.credential is not None:
            self._bad_command(R.ALREADY_AUTHENTICATED)
            return
        if self.session.envelope is not None:
            self._bad_command(Reply(503, "5.5.1", "AUTH not allowed during a mail transaction"))
            return
        if self.auth_limiter.blocked(self.session.client_ip):
            self.send_and_close(R.TOO_MANY_AUTH_FAILURES)
            return
        mechanism, _, initial = rest.partition(b" ")
        self._auth_mechanism = mechanism.upper().decode("ascii", "replace")
        if self._auth_mechanism == "PLAIN":
            if initial.strip():
                self._auth_response(initial.strip())
            else:
                self._mode = AUTH_RESPONSE
                self.send(Reply(334, "", ""))
        elif self._auth_mechanism == "LOGIN":
            self._auth_user = ""
            if initial.strip():
                self._auth_response(initial.strip())
            else:
                self._mode = AUTH_RESPONSE
                self.send(Reply(334, "", base64.b64encode(b"Username:").decode()))
        else:
            self._bad_command(R.AUTH_MECHANISM)

    def _auth_response(self, line: bytes) -> None:
        self._mode = COMMAND
        if line.strip() == b"*":
            self.send(R.AUTH_CANCELLED)
            return
        try:
            decoded = base64.b64decode(line.strip(), validate=True)
        except (binascii.Error, ValueError):
            self._bad_command(R.AUTH_BAD_BASE64)
            return
        if self._auth_mechanism == "LOGIN" and not self._auth_user:
            self._auth_user = decoded.decode("utf-8", "replace") or "\0"
            self._mode = AUTH_RESPONSE
            self.send(Reply(334, "", base64.b64encode(b"Password:").decode()))
            return
        if self._auth_mechanism == "LOGIN":
            name, password = self._auth_user, decoded.decode("utf-8", "replace")
        else:
            parts = decoded.split(b"\0")
            if len(parts) != 3:
                self._bad_command(Reply(501, "5.5.2", "Malformed AUTH PLAIN response"))
                return
            authzid, authcid, secret = (p.decode("utf-8", "replace") for p in parts)
            if authzid and authzid != authcid:
                slowed = self._auth_failed()
                if slowed is not None:
                    self._wait(slowed)
                return
            name, password = authcid, secret
        # The limiter counts this check as under way until it is decided, so parallel
        # sessions cannot run more checks than the lockout allows (they wait, or get 421).
        admitted = self.auth_limiter.begin_attempt(self.session.client_ip)
        admitted.addCallback(self._auth_admitted, name, password)
        self._wait(admitted)

    def _auth_admitted(self, admitted: bool, name: str, password: str) -> Deferred[Any] | None:
        ip = self.session.client_ip
        if not admitted:
            if not self._closing:
                self.send_and_close(R.TOO_MANY_AUTH_FAILURES)
            return None
        if self._closing:
            self.auth_limiter.end_attempt(ip)
            return None
        d = self.backend.check_credentials(name, password)
        d.addCallbacks(self._auth_checked, self._auth_error, callbackArgs=(name,))
        return d

    def _auth_checked(self, valid: bool | Admitted, name: str) -> Deferred[None] | None:
        ip = self.session.client_ip
        # Counted even when the client has gone meanwhile: hanging up is no free guess.
        if valid:
            self.auth_limiter.record_success(ip)
        else:
            self.auth_limiter.record_failure(ip)
        self.auth_limiter.end_attempt(ip)
        if self._closing:
            return None
        if valid:
            self.session.credential = name
            self.session.sandbox = isinstance(valid, Admitted) and valid.sandbox
            log.info(
                "{ip}: authenticated as {name}", ip=self.session.client_ip, name=printable(name)
            )
            self.send(R.AUTH_OK)
            return None
        # Returning the delay's Deferred keeps the command (and the input) waiting on it.
        return self._answer_auth_failure()

    def _auth_failed(self) -> Deferred[None] | None:
        """Count a failure and answer it."""
        self.auth_limiter.record_failure(self.session.client_ip)
        return self._answer_auth_failure()

    def _answer_auth_failure(self) -> Deferred[None] | None:
        """Answer a counted failure, after a delay when the limiter asks for one."""
        ip = self.session.client_ip
        log.info("{ip}: authentication failed", ip=ip)
        if self.auth_limiter.blocked(ip):
            self.send_and_close(R.TOO_MANY_AUTH_FAILURES)
            return None
        delay = self.auth_limiter.delay(ip)
        if delay <= 0:
            self.send(R.AUTH_FAILED)
            return None
        # Slow the guesser down: the reply (and so the next attempt) waits.
        d: Deferred[None] = Deferred()
        self.clock.callLater(delay, d.callback, None)
        d.addCallback(lambda _: None if self._closing else self.send(R.AUTH_FAILED))
        return d

    def _auth_error(self, failure: Failure) -> None:
        self.auth_limiter.end_attempt(self.session.client_ip)
        log.failure("credential check failed", failure)
        if not self._closing:
            self.send(Reply(454, "4.7.0", "Temporary authentication failure"))

    def smtp_MAIL(self, rest: bytes) -> None:
        if self.session.helo is None:
            self._bad_command(R.BAD_SEQUENCE_HELO)
            return
        if self.settings.require_tls and not self.session.tls:
            self.send(R.TLS_REQUIRED)
            return
        if self.settings.require_auth and self.session.credential is None:
            self.send(R.AUTH_REQUIRED)
            return
        if self.session.envelope is not None:
            self._bad_command(R.BAD_SEQUENCE_NESTED_MAIL)
            return
        if has_control(rest):
            self._bad_command(R.CONTROL_CHARACTERS)
            return
        match = _ADDRESS.match(rest)
        if match is None or match[1].upper() != b"FROM":
            self._bad_command(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            return
        params = parse_parameters(match[3])
        if params is None:
            self._bad_command(R.SYNTAX_ERROR)
            return
        sender, ascii_only = parse_address(match[2])
        if sender is None:
            self._bad_command(R.BAD_ADDRESS)
            return
        envelope = Envelope(sender)
        for key, value in params.items():
            if key == "SIZE":
                if not value.isdigit():
                    self._bad_command(R.SYNTAX_ERROR)
                    return
                envelope.size_hint = int(value)
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                envelope.body = value.upper()
            elif key == "SMTPUTF8" and not value:
                envelope.smtputf8 = True
            elif key == "AUTH":
                pass  # RFC 4954 5: the submitter's identity; we record the login instead
            else:
                self.send(R.BAD_PARAMETER)
                return
        if not ascii_only and not envelope.smtputf8:
            self.send(R.NON_ASCII_WITHOUT_SMTPUTF8)
            return
        if envelope.size_hint is not None and envelope.size_hint > self.settings.max_message_size:
            self.send(R.MESSAGE_TOO_BIG)
            return
        refusal = self.backend.check_sender(self.session)
        if refusal is not None:
            self.send(refusal)
            return
        self.session.envelope = envelope
        self.send(R.SENDER_OK)

    def smtp_RCPT(self, rest: bytes) -> None:
        envelope = self.session.envelope
        if envelope is None:
            self._bad_command(R.BAD_SEQUENCE_MAIL)
            return
        if has_control(rest):
            self._bad_command(R.CONTROL_CHARACTERS)
            return
        match = _ADDRESS.match(rest)
        if match is None or match[1].upper() != b"TO":
            self._bad_command(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            return
        if match[3].strip():
            self.send(R.BAD_PARAMETER)
            return
        recipient, ascii_only = parse_address(match[2])
        if not recipient:
            self._bad_command(R.BAD_ADDRESS)
            return
        if not ascii_only and not envelope.smtputf8:
            self.send(R.NON_ASCII_WITHOUT_SMTPUTF8)
            return
        if len(envelope.recipients) >= self.settings.max_recipients:
            self.send(R.TOO_MANY_RECIPIENTS)
            return
        refusal = self.backend.check_recipient(self.session, recipient)
        if refusal is not None:
            self.send(refusal)
            return
        envelope.recipients.append(recipient)
        self.send(R.RECIPIENT_OK)

    def smtp_DATA(self, rest: bytes) -> None:
        envelope = self.session.envelope
        if envelope is None:
            self._bad_command(R.BAD_SEQUENCE_MAIL)
            return
        if not envelope.recipients:
            self.send(R.NO_VALID_RECIPIENTS)
            return
        self._mode = DATA
        self._body = self._new_body()
        self._size = 0
        self._oversize = self._has_nul = self._has_bare_cr = False
        self._line_start = self._after_crlf = True
        self.send(R.START_DATA)
        self._restart_timer(self.settings.data_read_timeout)
        self._cancel_data_deadline()
        self._data_deadline = self.clock.callLater(self.settings.data_timeout, self._data_timed_out)

    # -- DATA ---------------------------------------------------------------------------------
    def _consume_data(self) -> bool:
        """Take the complete lines of the buffer; True once the final dot was seen.

        Works on whole runs of lines with bytes methods (no per-line Python loop). Lines are
        de-dot-stuffed and a bare-LF line ending is taken as CRLF (as Postfix's "normalize").
        Only ``CRLF . CRLF`` ends the data. Past the size limit, content is counted and
        dropped, never buffered.
        """
        buffer = self._buffer
        last_newline = buffer.rfind(b"\n")
        if last_newline >= 0:
            if self._line_start and self._after_crlf and buffer.startswith(b".\r\n"):
                del buffer[:3]
                self._end_of_data()
                return True
            complete = bytes(buffer[: last_newline + 1])
            found = _END_OF_DATA.search(complete)
            if found is not None:
                end = found.start()
                del buffer[: end + 5]
                self._add_content(complete[: end + 2])
                self._end_of_data()
                return True
            del buffer[: last_newline + 1]
            self._add_content(complete)
        if len(buffer) > MAX_DATA_LINE:
            # A very long line: pass on all of it but a trailing CR (which may start a CRLF).
            cut = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
            piece = bytes(buffer[:cut])
            del buffer[:cut]
            self._add_content(piece)
        return False

    def _add_content(self, data: bytes) -> None:
        """Append ``data`` (whole lines, or a piece of a long line) to the message.

        A piece never ends with a CR (the caller keeps it for the LF that may follow), so a CR
        not followed by an LF here is a bare CR."""
        if self._line_start and data.startswith(b"."):
            data = data[1:]
        if b"\n." in data:
            data = _STUFFED_DOT.sub(b"\n", data)
        if b"\n" in data:
            self._after_crlf = data.endswith(b"\r\n")  # as sent, before normalising
            if _BARE_LF.search(data) is not None:
                if b"\r" in data:
                    data = _BARE_LF.sub(b"\r\n", data)
                else:  # LF line ends throughout, as many programs send them
                    data = data.replace(b"\n", b"\r\n")
        self._line_start = data.endswith(b"\n")
        self._size += len(data)
        if self._oversize:
            return
        if self._size > self.settings.max_message_size:
            self._oversize = True
            self._drop_body()
            return
        if b"\0" in data:
            self._has_nul = True
        if _BARE_CR.search(data) is not None:
            self._has_bare_cr = True
        if self._body is not None:
            self._body.write(data)

    def _new_body(self) -> BodyWriter:
        if self._spool is None:
            return BodyWriter(None)
        return self._spool.writer()

    def _drop_body(self) -> None:
        """Forget the body being received (and remove its spool file, if any)."""
        body, self._body = self._body, None
        if body is not None:
            body.discard()

    def _end_of_data(self) -> None:
        self._mode = COMMAND
        self._cancel_data_deadline()
        self._restart_timer(self.settings.idle_timeout)
        envelope = self.session.envelope
        writer, self._body = self._body, None
        self.session.reset_transaction()
        assert envelope is not None
        if self._oversize or writer is None:
            log.info(
                "{ip}: message of {size} bytes refused: too big",
                ip=self.session.client_ip,
                size=self._size,
            )
            self.send(R.MESSAGE_TOO_BIG)
            return
        if self._has_nul or self._has_bare_cr or writer.error is not None:
            writer.discard()
            if writer.error is not None:
                self.send(R.STORAGE_FAILED)
            else:
                self.send(R.NUL_IN_MESSAGE if self._has_nul else R.BARE_CR_IN_MESSAGE)
            return
        body = writer.finish()
        d = self.backend.deliver(self.session, envelope, body)
        if isinstance(body, SpooledBody):
            # The backend is done with the file once its Deferred fires, whatever the outcome.
            d.addBoth(_discarding, body)
        d.addErrback(self._deliver_failed)
        d.addCallback(self._delivered, len(envelope.recipients))
        self._wait(d)

    def _deliver_failed(self, failure: Failure) -> Reply:
        log.failure("storing a message failed", failure)
        return R.STORAGE_FAILED

    def _delivered(self, reply: Reply, recipients: int) -> None:
        if 200 <= reply.code < 300:
            self._on_accepted(recipients)
        if not self._closing:
            self.send(reply)


def _discarding(result: Any, body: SpooledBody) -> Any:
    body.discard()
    return result
