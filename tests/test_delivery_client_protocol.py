"""The outbound SMTP client over StringTransport and task.Clock (no sockets): what it writes,
how it reads the replies, and its timeouts."""

from __future__ import annotations

import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.delivery.client import (
    COMMAND_TIMEOUT,
    DATA_BLOCK_TIMEOUT,
    DATA_END_TIMEOUT,
    DATA_PIECE,
    NO_SMTPUTF8,
    RecipientResult,
    ServerReply,
    SmtpClientError,
    SmtpConnection,
    TlsFailed,
    TlsUnavailable,
    _ReplyReader,
    dot_stuff,
)
from smartrelay.delivery.routing import NextHop

T = TypeVar("T")

HOP = NextHop("mx.example.net", 25, "mx")
EHLO_FULL = ["250-mx.example.net", "250-PIPELINING", "250-SIZE 10000000", "250 8BITMIME"]


class ClientTransport(StringTransport):
    """StringTransport that records STARTTLS, and whose buffer may hold ``limit`` bytes at
    most: past that it pauses its producer, as a socket does when the peer reads slowly."""

    def __init__(self, limit: int | None = None) -> None:
        StringTransport.__init__(self)
        self.limit = limit
        self.tls_context: object = None
        self.aborted = False

    def startTLS(self, contextFactory: object) -> None:
        self.tls_context = contextFactory

    def write(self, data: bytes) -> None:
        StringTransport.write(self, data)
        limit, producer = self.limit, self.producer
        if limit is not None and producer is not None and len(self.output()) > limit:
            producer.pauseProducing()

    def abortConnection(self) -> None:
        self.aborted = True
        StringTransport.abortConnection(self)

    def output(self) -> bytes:
        return bytes(self.value())  # type: ignore[no-untyped-call]

    def take(self) -> bytes:
        """What was written so far, emptying the buffer (the peer read it)."""
        value = self.output()
        self.clear()  # type: ignore[no-untyped-call]
        return value


class Session:
    """A client session on a StringTransport; the test plays the server."""

    def __init__(self, hop: NextHop = HOP, limit: int | None = None) -> None:
        self.clock = Clock()
        self.transport = ClientTransport(limit)
        self.reader = _ReplyReader()
        self.reader.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        self.connection = SmtpConnection(self.reader, hop, self.clock, "relay.test")

    def server(self, *lines: str) -> None:
        self.received("".join(line + "\r\n" for line in lines).encode())

    def received(self, data: bytes) -> None:
        self.reader.dataReceived(data)  # type: ignore[no-untyped-call]

    def lines(self) -> list[str]:
        """The command lines the client wrote since the last call."""
        return self.transport.take().decode().split("\r\n")[:-1]

    def lose(self, reason: type[Exception] = ConnectionDone) -> None:
        self.reader.connectionLost(Failure(reason()))


def run(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coroutine)


def result_of(deferred: Deferred[T]) -> T:
    """The result of a Deferred that has fired (its failure raised)."""
    results: list[T] = []
    failures: list[Failure] = []
    deferred.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "no result yet"
    return results[0]


def failure_of(deferred: Deferred[Any]) -> BaseException:
    failures: list[Failure] = []
    deferred.addErrback(failures.append)
    assert failures, "the Deferred has not failed"
    assert failures[0].value is not None
    return failures[0].value


def ready(session: Session, ehlo: list[str] | None = None) -> None:
    """Greeting and EHLO done (no STARTTLS offered unless ``ehlo`` says so)."""
    started = run(session.connection.start(starttls=False, require_tls=False))
    session.server("220 mx.example.net ESMTP")
    assert session.lines() == ["EHLO relay.test"]
    session.server(*(ehlo or EHLO_FULL))
    assert result_of(started) is None


# -- greeting, EHLO, STARTTLS ---------------------------------------------------------------------
def test_ehlo_after_the_greeting_reads_the_extensions() -> None:
    session = Session()
    started = run(session.connection.start(starttls=True, require_tls=False))
    assert session.lines() == []  # nothing before the greeting
    session.server("220-mx.example.net ESMTP", "220 second line")
    assert session.lines() == ["EHLO relay.test"]
    session.server("250-mx.example.net hello", "250-PIPELINING", "250-size 1000", "250 SMTPUTF8")
    assert result_of(started) is None
    assert session.connection.greeting == ServerReply(220, "mx.example.net ESMTP\nsecond line")
    assert session.connection.extensions == {"PIPELINING": "", "SIZE": "1000", "SMTPUTF8": ""}
    assert not session.connection.tls


def test_helo_when_ehlo_is_refused() -> None:
    session = Session()
    started = run(session.connection.start(starttls=True, require_tls=False))
    session.server("220 old.example.net")
    assert session.lines() == ["EHLO relay.test"]
    session.server("502 5.5.2 what?")
    assert session.lines() == ["HELO relay.test"]
    session.server("250 old.example.net")
    assert result_of(started) is None
    assert session.connection.extensions == {}


def test_a_refusing_greeting_is_the_answer_for_every_recipient() -> None:
    session = Session()
    started = run(session.connection.start(starttls=True, require_tls=False))
    session.server("554 5.7.1 go away")
    assert result_of(started) == ServerReply(554, "5.7.1 go away")
    assert session.lines() == []  # no EHLO after a refusal


def test_starttls_then_ehlo_again() -> None:
    session = Session()
    started = run(session.connection.start(starttls=True, require_tls=False))
    session.server("220 mx.example.net ESMTP")
    session.lines()
    session.server("250-mx.example.net", "250-STARTTLS", "250 PIPELINING")
    assert session.lines() == ["STARTTLS"]
    assert session.transport.tls_context is None
    session.server("220 2.0.0 go ahead")
    assert session.transport.tls_context is not None
    assert session.lines() == ["EHLO relay.test"]
    session.server("250-mx.example.net", "250 SMTPUTF8")
    assert result_of(started) is None
    assert session.connection.tls
    assert session.connection.extensions == {"SMTPUTF8": ""}  # only what came after TLS


def test_a_refused_starttls_goes_on_in_the_clear_when_tls_is_opportunistic() -> None:
    session = Session()
    started = run(session.connection.start(starttls=True, require_tls=False))
    session.server("220 mx.example.net ESMTP")
    session.lines()
    session.server("250-mx.example.net", "250 STARTTLS")
    assert session.lines() == ["STARTTLS"]
    session.server("454 4.7.0 TLS not available")
    assert result_of(started) is None
    assert not session.connection.tls and session.transport.tls_context is None


@pytest.mark.parametrize("offered", [False, True])
def test_required_tls_fails_without_starttls(offered: bool) -> None:
    session = Session()
    started = run(session.connection.start(starttls=True, require_tls=True))
    session.server("220 mx.example.net ESMTP")
    session.lines()
    session.server("250-mx.example.net", "250 STARTTLS" if offered else "250 PIPELINING")
    if offered:
        assert session.lines() == ["STARTTLS"]
        session.server("454 4.7.0 TLS not available")
    assert isinstance(failure_of(started), TlsUnavailable)


def test_a_connection_lost_in_the_tls_handshake_is_a_tls_failure() -> None:
    session = Session()
    started = run(session.connection.start(starttls=True, require_tls=False))
    session.server("220 mx.example.net ESMTP")
    session.lines()
    session.server("250-mx.example.net", "250 STARTTLS")
    session.server("220 2.0.0 go ahead")
    session.lose(ConnectionLost)
    assert isinstance(failure_of(started), TlsFailed)


# -- AUTH to a smarthost --------------------------------------------------------------------------
SMARTHOST = NextHop(
    "smarthost.example.net", 587, "smarthost", require_tls=True, username="u", password="p w"
)


def smarthost_after_tls(session: Session, auth: str) -> Deferred[ServerReply | None]:
    started = run(session.connection.start(starttls=True, require_tls=True))
    session.server("220 smarthost.example.net ESMTP")
    session.lines()
    session.server("250-smarthost.example.net", "250 STARTTLS")
    session.lines()
    session.server("220 go ahead")
    assert session.lines() == ["EHLO relay.test"]
    session.server("250-smarthost.example.net", f"250 AUTH {auth}")
    return started


def test_auth_plain_after_starttls() -> None:
    session = Session(SMARTHOST)
    started = smarthost_after_tls(session, "LOGIN PLAIN")
    assert session.lines() == ["AUTH PLAIN AHUAcCB3"]  # base64 of "\0u\0p w"
    session.server("235 2.7.0 Authentication successful")
    assert result_of(started) is None and session.connection.tls


def test_auth_login_when_plain_is_not_offered() -> None:
    session = Session(SMARTHOST)
    started = smarthost_after_tls(session, "LOGIN")
    assert session.lines() == ["AUTH LOGIN"]
    session.server("334 VXNlcm5hbWU6")
    assert session.lines() == ["dQ=="]
    session.server("334 UGFzc3dvcmQ6")
    assert session.lines() == ["cCB3"]
    session.server("235 2.7.0 ok")
    assert result_of(started) is None


def test_refused_credentials_are_a_temporary_error() -> None:
    session = Session(SMARTHOST)
    started = smarthost_after_tls(session, "PLAIN")
    session.lines()
    session.server("535 5.7.8 bad credentials")
    error = failure_of(started)
    assert isinstance(error, SmtpClientError) and "refused our credentials" in str(error)


def test_no_password_in_the_clear() -> None:
    hop = NextHop("smarthost.example.net", 25, "smarthost", username="u", password="p")
    session = Session(hop)
    started = run(session.connection.start(starttls=True, require_tls=False))
    session.server("220 smarthost.example.net ESMTP")
    session.lines()
    session.server("250-smarthost.example.net", "250 AUTH PLAIN")  # and no STARTTLS
    assert isinstance(failure_of(started), TlsUnavailable)
    assert session.lines() == []  # no AUTH written


# -- one transaction ------------------------------------------------------------------------------
def test_pipelining_sends_mail_rcpt_and_data_in_one_write() -> None:
    session = Session()
    ready(session)
    message = b"Subject: hi\r\n\r\nHello.\r\n"
    sent = run(
        session.connection.send("app@example.com", ["a@example.net", "b@example.net"], message)
    )
    assert session.lines() == [
        f"MAIL FROM:<app@example.com> SIZE={len(message)} BODY=8BITMIME",
        "RCPT TO:<a@example.net>",
        "RCPT TO:<b@example.net>",
        "DATA",
    ]
    session.server("250 2.1.0 Ok", "250 2.1.5 Ok", "550 5.1.1 No such user")
    assert session.lines() == []  # the message waits for the 354
    session.server("354 go ahead")
    assert session.transport.take() == message + b".\r\n"
    assert not sent.called
    session.server("250 2.0.0 Ok: queued as X1")
    assert result_of(sent) == [
        RecipientResult("a@example.net", ServerReply(250, "2.0.0 Ok: queued as X1")),
        RecipientResult("b@example.net", ServerReply(550, "5.1.1 No such user")),
    ]
    assert session.connection.messages_sent == 1


def test_without_pipelining_one_command_at_a_time() -> None:
    session = Session()
    ready(session, ["250 mx.example.net"])
    sent = run(session.connection.send("app@example.com", ["a@example.net"], b"x\r\n"))
    assert session.lines() == ["MAIL FROM:<app@example.com>"]  # no SIZE, no BODY: not offered
    session.server("250 2.1.0 Ok")
    assert session.lines() == ["RCPT TO:<a@example.net>"]
    session.server("250 2.1.5 Ok")
    assert session.lines() == ["DATA"]
    session.server("354 go ahead")
    assert session.transport.take() == b"x\r\n.\r\n"
    session.server("250 2.0.0 Ok")
    assert [r.reply.code for r in result_of(sent)] == [250]


def test_no_recipient_accepted_means_no_data_and_a_reset() -> None:
    session = Session()
    ready(session, ["250 mx.example.net"])
    sent = run(session.connection.send("app@example.com", ["a@example.net"], b"x\r\n"))
    session.server("250 2.1.0 Ok")
    session.lines()
    session.server("450 4.2.1 try later")
    assert session.lines() == ["RSET"]
    session.server("250 2.0.0 Ok")
    assert result_of(sent) == [
        RecipientResult("a@example.net", ServerReply(450, "4.2.1 try later"))
    ]
    assert session.connection.usable


def test_a_refused_mail_from_is_every_recipients_reply() -> None:
    session = Session()
    ready(session)
    sent = run(session.connection.send("app@example.com", ["a@example.net", "b@example.net"], b"x"))
    session.lines()
    session.server("553 5.1.8 bad sender", "503 5.5.1 no MAIL", "503 5.5.1 no MAIL", "503 no")
    assert session.lines() == ["RSET"]
    session.server("250 2.0.0 Ok")
    assert [r.reply for r in result_of(sent)] == [ServerReply(553, "5.1.8 bad sender")] * 2


def test_a_refused_data_is_the_accepted_recipients_reply() -> None:
    session = Session()
    ready(session)
    sent = run(session.connection.send("app@example.com", ["a@example.net", "b@example.net"], b"x"))
    session.lines()
    session.server("250 Ok", "250 Ok", "550 5.1.1 unknown", "451 4.3.0 local problem")
    assert session.lines() == ["RSET"]  # no message content after a refused DATA
    session.server("250 Ok")
    assert [r.reply.code for r in result_of(sent)] == [451, 550]


def test_a_reset_refused_closes_the_connection() -> None:
    session = Session()
    ready(session)
    sent = run(session.connection.send("app@example.com", ["a@example.net"], b"x"))
    session.lines()
    session.server("452 4.3.1 full", "503 no", "503 no")
    assert session.lines() == ["RSET"]
    session.server("500 5.5.1 what")
    assert [r.reply.code for r in result_of(sent)] == [452]
    assert not session.connection.usable and session.transport.disconnecting


def test_dot_stuffing_on_the_wire() -> None:
    session = Session()
    ready(session)
    message = b".leading dot\r\nmiddle\r\n.\r\n..two\r\nno final newline"
    sent = run(session.connection.send("app@example.com", ["a@example.net"], message))
    session.lines()
    session.server("250 Ok", "250 Ok", "354 go ahead")
    assert session.transport.take() == (
        b"..leading dot\r\nmiddle\r\n..\r\n...two\r\nno final newline\r\n.\r\n"
    )
    session.server("250 Ok")
    assert [r.reply.code for r in result_of(sent)] == [250]


def test_the_connection_is_reused_for_the_next_message() -> None:
    session = Session()
    ready(session)
    for n in range(3):
        sent = run(session.connection.send("app@example.com", ["a@example.net"], b"x\r\n"))
        assert session.lines()[0] == "MAIL FROM:<app@example.com> SIZE=3 BODY=8BITMIME"
        session.server("250 Ok", "250 Ok", "354 go ahead")
        session.transport.take()
        session.server(f"250 Ok {n}")
        assert result_of(sent)[0].reply == ServerReply(250, f"Ok {n}")
    assert session.connection.messages_sent == 3
    quitting = run(session.connection.quit())
    assert session.lines() == ["QUIT"]
    session.server("221 bye")
    result_of(quitting)
    assert session.transport.disconnecting and not session.connection.usable


# -- SMTPUTF8 (RFC 6531) --------------------------------------------------------------------------
def test_mail_from_asks_for_smtputf8_when_offered_and_needed() -> None:
    session = Session()
    ready(session, ["250-mx.example.net", "250-PIPELINING", "250 SMTPUTF8"])
    sent = run(session.connection.send("app@example.com", ["josé@example.net"], b"x\r\n"))
    lines = session.transport.take().decode("utf-8").split("\r\n")
    assert lines[:2] == ["MAIL FROM:<app@example.com> SMTPUTF8", "RCPT TO:<josé@example.net>"]
    session.server("250 Ok", "250 Ok", "354 go ahead")
    session.transport.take()
    session.server("250 Ok")
    assert [r.reply.code for r in result_of(sent)] == [250]
    # An all-ASCII transaction does not ask for it.
    run(session.connection.send("app@example.com", ["jose@example.net"], b"x\r\n"))
    assert session.lines()[0] == "MAIL FROM:<app@example.com>"


def test_without_smtputf8_only_the_ascii_recipients_are_sent() -> None:
    session = Session()
    ready(session)
    sent = run(
        session.connection.send("app@example.com", ["josé@example.net", "jo@example.net"], b"x")
    )
    assert session.lines()[:2] == [
        "MAIL FROM:<app@example.com> SIZE=1 BODY=8BITMIME",
        "RCPT TO:<jo@example.net>",
    ]
    session.server("250 Ok", "250 Ok", "354 go ahead")
    session.transport.take()
    session.server("250 Ok")
    assert result_of(sent) == [
        RecipientResult("josé@example.net", NO_SMTPUTF8),
        RecipientResult("jo@example.net", ServerReply(250, "Ok")),
    ]


def test_a_non_ascii_sender_without_smtputf8_sends_nothing() -> None:
    session = Session()
    ready(session)
    sent = run(session.connection.send("josé@example.com", ["jo@example.net"], b"x"))
    assert result_of(sent) == [RecipientResult("jo@example.net", NO_SMTPUTF8)]
    assert session.transport.output() == b""


# -- replies that are not replies, and a lost connection ------------------------------------------
def test_a_reply_line_that_is_not_a_reply_fails_the_command_and_closes() -> None:
    session = Session()
    started = run(session.connection.start(starttls=False, require_tls=False))
    session.server("hello, I am not SMTP")
    error = failure_of(started)
    assert isinstance(error, SmtpClientError) and "bad reply line" in str(error)
    assert session.transport.disconnecting


def test_an_endless_reply_line_fails_the_command_and_closes() -> None:
    session = Session()
    started = run(session.connection.start(starttls=False, require_tls=False))
    session.received(b"220 " + b"x" * 70_000)
    error = failure_of(started)
    assert isinstance(error, SmtpClientError) and "too long" in str(error)
    assert session.transport.disconnecting


def test_a_connection_lost_mid_transaction_fails_it() -> None:
    session = Session()
    ready(session)
    sent = run(session.connection.send("app@example.com", ["a@example.net"], b"x"))
    session.server("250 Ok")
    session.lose()
    error = failure_of(sent)
    assert isinstance(error, SmtpClientError)
    assert str(error) == "connection lost: closed by the server"
    assert not session.connection.usable


@implementer(ILogObserver)
class Recorder:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def test_a_connection_lost_mid_pipeline_leaves_no_unhandled_error() -> None:
    """The replies still awaited when the first pipelined one fails are failed too: none may
    be left as an "Unhandled error in Deferred" (logged as critical) when garbage collected."""
    logged: list[dict[str, Any]] = []
    observer = Recorder(logged)
    globalLogPublisher.addObserver(observer)
    try:
        session = Session()
        ready(session)
        sent = run(session.connection.send("app@example.com", ["a@example.net"], b"x"))
        session.lose()
        assert isinstance(failure_of(sent), SmtpClientError)
        del sent, session
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
    unhandled = [e for e in logged if "Unhandled error" in (formatEvent(e) or "")]
    assert unhandled == []


# -- timeouts on the clock ------------------------------------------------------------------------
def test_no_greeting_times_out_after_the_command_timeout() -> None:
    session = Session()
    started = run(session.connection.start(starttls=False, require_tls=False))
    session.clock.advance(COMMAND_TIMEOUT - 1)
    assert not started.called
    session.clock.advance(1)
    assert isinstance(failure_of(started), DeferredTimeout)


def test_a_pipelined_reply_that_never_comes_times_out() -> None:
    session = Session()
    ready(session)
    sent = run(session.connection.send("app@example.com", ["a@example.net"], b"x"))
    session.server("250 Ok", "250 Ok")  # and no reply to DATA
    session.clock.advance(COMMAND_TIMEOUT - 1)
    assert not sent.called
    session.clock.advance(1)
    assert isinstance(failure_of(sent), DeferredTimeout)


def test_each_pipelined_reply_has_the_command_timeout_from_the_one_before() -> None:
    """One timer for the group, pushed back at each reply: slow replies that each come
    within the timeout of the previous one are waited for, and a reply that does not come
    leaves nothing unhandled or scheduled behind it."""
    session = Session()
    ready(session)
    sent = run(session.connection.send("app@example.com", ["a@example.net", "b@example.net"], b"x"))
    for reply in ("250 Ok", "250 Ok", "250 Ok"):  # MAIL, RCPT, RCPT: each just in time
        session.clock.advance(COMMAND_TIMEOUT - 1)
        session.server(reply)
        assert not sent.called
    session.clock.advance(COMMAND_TIMEOUT - 1)  # and no reply to DATA
    assert not sent.called
    session.clock.advance(1)
    error = failure_of(sent)
    assert isinstance(error, DeferredTimeout)
    assert "no reply within" in str(error)
    assert session.clock.getDelayedCalls() == []


def test_a_pipelined_group_answered_in_time_leaves_no_timer() -> None:
    session = Session()
    ready(session)
    sent = run(session.connection.send("app@example.com", ["a@example.net"], b"x\r\n"))
    session.server("250 Ok", "250 Ok", "354 go ahead")
    session.transport.take()
    session.server("250 queued")
    assert [r.reply.code for r in result_of(sent)] == [250]
    assert session.clock.getDelayedCalls() == []


def test_the_reply_to_the_final_dot_may_take_ten_minutes() -> None:
    session = Session()
    ready(session)
    sent = run(session.connection.send("app@example.com", ["a@example.net"], b"x\r\n"))
    session.server("250 Ok", "250 Ok", "354 go ahead")
    assert session.transport.take().endswith(b"\r\n.\r\n")
    session.clock.advance(DATA_END_TIMEOUT - 1)
    assert not sent.called  # longer than the command timeout is fine here
    session.clock.advance(1)
    assert isinstance(failure_of(sent), DeferredTimeout)


# -- a big message: the DATA producer -------------------------------------------------------------
def big_message(size: int) -> bytes:
    line = b".a line that starts with a dot, and then some text to fill it up\r\n"
    return b"Subject: big\r\n\r\n" + line * (size // len(line))


def test_a_big_message_goes_out_as_the_connection_takes_it() -> None:
    limit = DATA_PIECE
    session = Session(limit=limit)
    ready(session)
    message = big_message(10 * DATA_PIECE)
    sent = run(session.connection.send("app@example.com", ["a@example.net"], message))
    session.lines()
    session.server("250 Ok", "250 Ok", "354 go ahead")
    wire = b""
    rounds = 0
    while session.transport.producer is not None:
        # The transport's buffer never holds much more than its limit and one piece.
        assert len(session.transport.output()) <= limit + 2 * DATA_PIECE
        wire += session.transport.take()
        session.transport.producer.resumeProducing()
        rounds += 1
    wire += session.transport.take()
    assert rounds >= 5
    assert wire == dot_stuff(message)
    session.server("250 2.0.0 Ok")
    assert [r.reply.code for r in result_of(sent)] == [250]


def test_a_message_of_one_piece_is_one_write_without_a_producer() -> None:
    session = Session()
    ready(session)
    message = big_message(DATA_PIECE - 100)
    sent = run(session.connection.send("app@example.com", ["a@example.net"], message))
    session.lines()
    session.server("250 Ok", "250 Ok", "354 go ahead")
    assert session.transport.producer is None
    assert session.transport.take() == dot_stuff(message)
    session.server("250 Ok")
    assert [r.reply.code for r in result_of(sent)] == [250]


def test_a_server_that_stops_reading_is_cut_off_after_the_block_timeout() -> None:
    session = Session(limit=DATA_PIECE)
    ready(session)
    sent = run(
        session.connection.send("app@example.com", ["a@example.net"], big_message(10 * DATA_PIECE))
    )
    session.server("250 Ok", "250 Ok", "354 go ahead")
    assert session.transport.producer is not None  # paused: the server reads nothing more
    session.clock.advance(DATA_BLOCK_TIMEOUT - 1)
    assert not session.transport.aborted
    session.clock.advance(1)
    assert session.transport.aborted
    session.lose(ConnectionLost)  # what the reactor reports after the abort
    error = failure_of(sent)
    assert isinstance(error, SmtpClientError) and "connection lost" in str(error)
