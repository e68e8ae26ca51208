"""The ESMTP server protocol over StringTransport and task.Clock (no sockets, no database)."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

import pytest
from attrs import evolve
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from smartrelay.smtp.listener import SmtpFactory
from smartrelay.smtp.protocol import MAX_DATA_LINE, MAX_PENDING_INPUT, SmtpServerProtocol
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.session import (
    Admitted,
    Envelope,
    ISmtpBackend,
    ListenerSettings,
    Session,
)
from smartrelay.smtp.volume_watch import HELD_REPLY
from smartrelay.spool import SpooledBody

SETTINGS = ListenerSettings(hostname="relay.test", max_message_size=10_000, max_recipients=3)


@implementer(ISmtpBackend)
class RecordingBackend:
    """Test double: records what the protocol hands over; replies are scripted."""

    offers_auth = True

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes, Session]] = []
        self.pending: Deferred[Reply] | None = None
        self.fail_next = False
        self.credentials = {"app": "secret"}
        self.refuse_domain = "refused.test"
        self.held: set[str] = set()  # credentials held by a volume alert

    def check_sender(self, session: Session) -> Reply | None:
        if session.credential in self.held:
            return HELD_REPLY
        return None

    def check_recipient(self, session: Session, address: str) -> Reply | None:
        if address.endswith("@" + self.refuse_domain):
            return Reply(550, "5.1.1", "No such recipient here")
        return None

    def check_credentials(self, name: str, password: str) -> Deferred[bool | Admitted]:
        return succeed(self.credentials.get(name) == password)

    def deliver(
        self, session: Session, envelope: Envelope, message: bytes | SpooledBody
    ) -> Deferred[Reply]:
        assert isinstance(message, bytes)  # no spool: every body comes in memory
        self.messages.append((envelope, message, session))
        if self.fail_next:
            return fail(RuntimeError("disk full"))
        if self.pending is not None:
            return self.pending
        return succeed(Reply(250, "2.0.0", f"Ok: queued as Q{len(self.messages)}"))


class TlsStringTransport(StringTransport):
    """StringTransport that records STARTTLS instead of performing a handshake.

    (StringTransport is not annotated; the ignores below are the only calls into it.)
    """

    tls_context: object = None

    def __init__(self, peer: IPv4Address) -> None:
        StringTransport.__init__(self, peerAddress=peer)

    def startTLS(self, contextFactory: object) -> None:
        self.tls_context = contextFactory

    def output(self) -> bytes:
        return bytes(self.value())  # type: ignore[no-untyped-call]

    def reset(self) -> None:
        self.clear()  # type: ignore[no-untyped-call]


@implementer(IOpenSSLServerConnectionCreator)
class FakeTlsContext:
    def serverConnectionForTLS(self, tlsProtocol: object) -> Any:
        raise NotImplementedError("not used: TlsStringTransport does no handshake")


class Client:
    def __init__(
        self,
        settings: ListenerSettings = SETTINGS,
        backend: RecordingBackend | None = None,
        ip: str = "127.0.0.1",
        factory: SmtpFactory | None = None,
    ) -> None:
        self.clock = Clock()
        self.backend = backend or RecordingBackend()
        self.factory = factory or SmtpFactory(settings, self.backend, self.clock, FakeTlsContext())
        self.transport = TlsStringTransport(IPv4Address("TCP", ip, 40000))
        protocol = self.factory.buildProtocol(IPv4Address("TCP", ip, 40000))
        assert isinstance(protocol, SmtpServerProtocol)
        self.protocol = protocol
        protocol.makeConnection(self.transport)  # type: ignore[no-untyped-call]

    def send(self, data: bytes) -> list[str]:
        """Feed ``data`` in one dataReceived call; return the reply lines it produced."""
        self.transport.reset()
        self.protocol.dataReceived(data)
        return self.lines()

    def lines(self) -> list[str]:
        return self.transport.output().decode("utf-8").splitlines()

    def codes(self, data: bytes) -> list[str]:
        """Final reply lines only (``250 ...``, not ``250-...``)."""
        return [line for line in self.send(data) if len(line) < 4 or line[3] == " "]

    def fake_tls(self) -> None:
        """What a completed STARTTLS handshake changes for the session."""
        assert self.codes(b"STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
        assert self.transport.tls_context is not None
        assert self.codes(b"EHLO client.test\r\n")[0].startswith("250 ")


def test_greeting_and_ehlo_extensions() -> None:
    client = Client()
    assert client.lines() == ["220 relay.test ESMTP SmartRelay"]
    lines = client.send(b"EHLO client.test\r\n")
    assert lines == [
        "250-relay.test",
        "250-PIPELINING",
        "250-SIZE 10000",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES",
        "250 STARTTLS",
    ]  # no AUTH in clear text


def test_a_whole_transaction_destuffs_and_normalises_line_ends() -> None:
    client = Client()
    replies = client.codes(
        b"EHLO c\r\nMAIL FROM:<app@example.com> BODY=8BITMIME\r\n"
        b"RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    )
    assert replies == [
        "250 STARTTLS",
        "250 2.1.0 Sender ok",
        "250 2.1.5 Recipient ok",
        "250 2.1.5 Recipient ok",
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    body = b"Subject: hi\r\n\r\n..leading dot\r\nbare lf line\nlast\r\n.\r\n"
    assert client.codes(body) == ["250 2.0.0 Ok: queued as Q1"]
    envelope, message, _ = client.backend.messages[0]
    assert envelope.sender == "app@example.com" and envelope.body == "8BITMIME"
    assert envelope.recipients == ["a@example.net", "b@example.org"]
    assert message == b"Subject: hi\r\n\r\n.leading dot\r\nbare lf line\r\nlast\r\n"


def test_data_split_across_reads_at_every_byte() -> None:
    client = Client()
    client.send(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
    stream = b"Subject: x\r\n\r\nline one\r\n.dot\r\n\r\n.\r\nNOOP\r\n"
    replies = []
    for i in range(len(stream)):
        replies += client.send(stream[i : i + 1])
    assert replies == ["250 2.0.0 Ok: queued as Q1", "250 2.0.0 Ok"]
    assert client.backend.messages[0][1] == b"Subject: x\r\n\r\nline one\r\ndot\r\n\r\n"


def test_pipelined_commands_wait_for_the_storage_commit() -> None:
    client = Client()
    client.backend.pending = Deferred()
    replies = client.codes(
        b"EHLO c\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n"
        b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<t@example.com>\r\nQUIT\r\n"
    )
    # Nothing after the final dot is answered before the message is stored.
    assert replies[-1] == "354 End data with <CR><LF>.<CR><LF>"
    client.transport.reset()
    client.backend.pending.callback(Reply(250, "2.0.0", "Ok: queued as LATE"))
    assert client.lines() == [
        "250 2.0.0 Ok: queued as LATE",
        "250 2.1.0 Sender ok",
        "221 2.0.0 Bye",
    ]
    assert client.transport.disconnecting


def test_storage_failure_answers_451_and_session_goes_on() -> None:
    client = Client()
    client.backend.fail_next = True
    replies = client.codes(
        b"HELO c\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n"
        b"x\r\n.\r\nNOOP\r\n"
    )
    assert replies[-2:] == ["451 4.3.0 Temporary storage failure, try again later", "250 2.0.0 Ok"]


@pytest.mark.parametrize(
    "injected",
    [b"RSET\r\n", b"MAIL FROM:<evil@attacker.test>\r\n", b"EHLO x\r\nMAIL FROM:<e@x.test>\r\n"],
)
def test_starttls_discards_pipelined_plaintext_and_resets_session(injected: bytes) -> None:
    client = Client()
    client.send(b"EHLO c\r\nMAIL FROM:<before@example.com>\r\n")
    assert client.protocol.session.envelope is not None
    replies = client.send(b"STARTTLS\r\n" + injected)
    assert replies == ["220 2.0.0 Ready to start TLS"]
    session = client.protocol.session
    assert session.tls and session.helo is None and session.envelope is None
    # The client must say EHLO again; the injected MAIL never happened.
    assert client.codes(b"MAIL FROM:<x@example.com>\r\n") == ["503 5.5.1 Send EHLO or HELO first"]


def test_auth_is_offered_and_accepted_only_after_tls() -> None:
    client = Client()
    client.send(b"EHLO c\r\n")
    plain = base64.b64encode(b"\0app\0secret")
    assert client.codes(b"AUTH PLAIN " + plain + b"\r\n") == [
        "538 5.7.11 Encryption required for authentication: STARTTLS first"
    ]
    client.fake_tls()
    assert client.send(b"EHLO c\r\n")[-1] == "250 AUTH PLAIN LOGIN"
    assert client.codes(b"AUTH PLAIN " + plain + b"\r\n") == ["235 2.7.0 Authentication successful"]
    assert client.protocol.session.credential == "app"


def test_auth_login_and_plain_with_challenge() -> None:
    client = Client()
    client.send(b"EHLO c\r\n")
    client.fake_tls()
    assert client.send(b"AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert client.send(base64.b64encode(b"app") + b"\r\n") == ["334 UGFzc3dvcmQ6"]
    assert client.send(base64.b64encode(b"secret") + b"\r\n") == [
        "235 2.7.0 Authentication successful"
    ]
    other = Client()
    other.send(b"EHLO c\r\n")
    other.fake_tls()
    assert other.send(b"AUTH PLAIN\r\n") == ["334 "]
    assert other.send(b"not base64!\r\n") == ["501 5.5.2 Cannot decode the response (base64)"]
    assert other.send(b"AUTH PLAIN\r\n*\r\n") == ["334 ", "501 5.0.0 Authentication cancelled"]


def test_a_held_credential_gets_451_at_mail_from() -> None:
    """A hold decided while a transaction is under way refuses the session's next MAIL."""
    client = Client()
    client.send(b"EHLO c\r\n")
    client.fake_tls()
    plain = base64.b64encode(b"\0app\0secret")
    assert client.codes(b"AUTH PLAIN " + plain + b"\r\n") == ["235 2.7.0 Authentication successful"]
    assert client.codes(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.net>\r\n") == [
        "250 2.1.0 Sender ok",
        "250 2.1.5 Recipient ok",
    ]
    client.backend.held.add("app")
    assert client.codes(b"DATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")[-1].startswith("250 ")
    [held] = client.codes(b"MAIL FROM:<app@example.com>\r\n")
    assert held.startswith("451 4.7.1 ") and "volume alert" in held
    assert client.codes(b"RCPT TO:<a@example.net>\r\n") == ["503 5.5.1 Send MAIL first"]
    client.backend.held.clear()  # released
    assert client.codes(b"MAIL FROM:<app@example.com>\r\n") == ["250 2.1.0 Sender ok"]


def test_failed_auth_is_slowed_then_cut_off() -> None:
    client = Client()
    client.send(b"EHLO c\r\n")
    client.fake_tls()
    wrong = b"AUTH PLAIN " + base64.b64encode(b"\0app\0wrong") + b"\r\n"
    assert client.codes(wrong) == ["535 5.7.8 Authentication credentials invalid"]
    # The next failure is answered only after a delay; input waits meanwhile.
    assert client.send(wrong + b"NOOP\r\n") == []
    client.transport.reset()
    client.clock.advance(client.factory.auth_limiter.delay("127.0.0.1") + 10)
    assert client.lines() == ["535 5.7.8 Authentication credentials invalid", "250 2.0.0 Ok"]
    for _ in range(20):
        client.send(wrong)
        client.clock.advance(9)  # longer than the longest delay, well inside the window
        if client.transport.disconnecting:
            break
    assert client.transport.disconnecting
    assert client.lines()[-1] == "421 4.7.0 Too many failed authentication attempts"
    # A new connection from the same address is cut off at once.
    again = Client(factory=client.factory)
    again.send(b"EHLO c\r\n")
    again.fake_tls()
    assert again.codes(wrong) == ["421 4.7.0 Too many failed authentication attempts"]


def test_require_tls_and_require_auth() -> None:
    tls_client = Client(evolve(SETTINGS, require_tls=True))
    assert tls_client.codes(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")[-1] == (
        "530 5.7.0 Must issue a STARTTLS command first"
    )
    auth_client = Client(evolve(SETTINGS, require_auth=True))
    auth_client.send(b"EHLO c\r\n")
    auth_client.fake_tls()
    assert auth_client.codes(b"MAIL FROM:<a@b.test>\r\n") == ["530 5.7.0 Authentication required"]


def test_size_parameter_over_the_limit() -> None:
    client = Client()
    assert client.codes(b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=10001\r\n")[-1] == (
        "552 5.3.4 Message size exceeds the fixed maximum message size"
    )
    assert client.codes(b"MAIL FROM:<a@b.test> SIZE=9000\r\n") == ["250 2.1.0 Sender ok"]


def test_oversize_data_is_discarded_while_streaming() -> None:
    client = Client()
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
    line = b"x" * 998 + b"\r\n"
    for _ in range(100):  # 100 KB against a 10 KB limit
        assert client.send(line) == []
        body = client.protocol._body
        assert body is None or body.buffered <= SETTINGS.max_message_size
    # One endless line is not buffered either.
    for _ in range(10):
        client.send(b"y" * 100_000)
        assert len(client.protocol._buffer) < 70_000
    assert client.codes(b"\r\n.\r\n") == [
        "552 5.3.4 Message size exceeds the fixed maximum message size"
    ]
    assert client.backend.messages == []
    assert client.codes(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_too_many_recipients() -> None:
    client = Client()
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    rcpts = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(5))
    assert (
        client.codes(rcpts)
        == ["250 2.1.5 Recipient ok"] * 3 + ["452 4.5.3 Too many recipients"] * 2
    )


def test_recipient_refused_by_backend_and_no_valid_recipients() -> None:
    client = Client()
    replies = client.codes(
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@refused.test>\r\nDATA\r\n"
    )
    assert replies[-2:] == ["550 5.1.1 No such recipient here", "554 5.5.1 No valid recipients"]


@pytest.mark.parametrize(
    ("body", "reply"),
    [
        (b"a\0b\r\n.\r\n", "550 5.6.0 Message contains NUL bytes"),
        (b"a\rb\r\n.\r\n", "550 5.6.0 Message contains a bare CR (CR not followed by LF)"),
    ],
)
def test_nul_and_bare_cr_are_refused(body: bytes, reply: str) -> None:
    client = Client()
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
    assert client.codes(body) == [reply]
    assert client.backend.messages == []


def test_only_crlf_dot_crlf_ends_data() -> None:
    client = Client()
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
    # Bare-LF dot lines (SMTP smuggling shapes) are content, not the end.
    assert client.send(b"one\n.\nMAIL FROM:<x@y.test>\r\nline\n.\r\n") == []
    assert client.codes(b"tail\r\n.\r\n") == ["250 2.0.0 Ok: queued as Q1"]
    message = client.backend.messages[0][1]
    assert b"MAIL FROM:<x@y.test>\r\n" in message and message.endswith(b"tail\r\n")


def test_lf_line_ends_throughout_become_crlf() -> None:
    """A message sent with LF line ends (as many programs write them), dot-stuffed,
    with a line longer than MAX_DATA_LINE, is stored with CRLF and unstuffed."""
    client = Client(evolve(SETTINGS, max_message_size=4 * MAX_DATA_LINE))
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
    long_line = b"x" * (MAX_DATA_LINE + 100)
    # The last line ends in CRLF: only CRLF . CRLF ends the data.
    body = b"Subject: lf\n\n..dot\n" + long_line + b"\n..\nlast\r\n"
    assert client.send(body) == []
    assert client.codes(b".\r\n") == ["250 2.0.0 Ok: queued as Q1"]
    expected = b"Subject: lf\r\n\r\n.dot\r\n" + long_line + b"\r\n.\r\nlast\r\n"
    assert client.backend.messages[0][1] == expected


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (
            b"MAIL FROM:<j\xc3\xb6rg@example.com>",
            "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter",
        ),
        (b"MAIL FROM:<j\xc3\xb6rg@example.com> SMTPUTF8", "250 2.1.0 Sender ok"),
        (b"MAIL FROM:<a@b.test> RET=HDRS", "555 5.5.4 Unsupported MAIL or RCPT parameter"),
        (b"MAIL FROM:<not an address>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"MAIL FROM:<no-domain>", "553 5.1.3 Bad address syntax"),
        (b"MAIL FROM:<a@b.test> SIZE=abc", "501 5.5.4 Syntax error in parameters or arguments"),
        (b"MAIL TO:<a@b.test>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"RCPT TO:<a@b.test>", "503 5.5.1 Send MAIL first"),
        (b"DATA", "503 5.5.1 Send MAIL first"),
        (b"BDAT 10 LAST", "502 5.5.1 Command not implemented"),
        (b"XYZZY", "502 5.5.1 Command not recognised"),
        (b"VRFY someone", "252 2.5.0 Cannot verify the user, but will accept the message"),
    ],
)
def test_command_replies(command: bytes, reply: str) -> None:
    client = Client()
    client.send(b"EHLO c\r\n")
    assert client.codes(command + b"\r\n") == [reply]


def test_mail_before_helo_and_nested_mail() -> None:
    client = Client()
    assert client.codes(b"MAIL FROM:<a@b.test>\r\n") == ["503 5.5.1 Send EHLO or HELO first"]
    assert client.codes(b"HELO c\r\nMAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n")[-1] == (
        "503 5.5.1 Sender already given; RSET first"
    )
    assert client.codes(b"RSET\r\nMAIL FROM:<a@b.test>\r\n") == [
        "250 2.0.0 Reset ok",
        "250 2.1.0 Sender ok",
    ]


def test_long_command_lines_and_bad_command_limit() -> None:
    client = Client()
    assert client.codes(b"NOOP " + b"x" * 5000 + b"\r\n") == ["500 5.5.2 Line too long"]
    assert client.codes(b"NOOP\r\n") == ["250 2.0.0 Ok"]
    replies = client.codes(b"BOGUS\r\n" * 20)
    assert replies[-1] == "421 4.7.0 Too many errors, closing connection"
    assert len(replies) == SETTINGS.max_bad_commands  # the rest was never answered
    assert client.transport.disconnecting


def test_no_idle_timeout_while_the_client_waits_for_the_commit() -> None:
    """A commit slower than idle_timeout: the 250 still comes (a 421 after storing the
    message would make the client send it again), then the idle timer runs again."""
    backend = RecordingBackend()
    backend.pending = Deferred()
    client = Client(backend=backend)
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    client.transport.reset()
    client.clock.advance(SETTINGS.idle_timeout * 3)
    assert client.lines() == []
    assert not client.transport.disconnecting
    backend.pending.callback(Reply(250, "2.0.0", "Ok: queued as Q1"))
    assert client.lines() == ["250 2.0.0 Ok: queued as Q1"]
    client.transport.reset()
    client.clock.advance(SETTINGS.idle_timeout + 1)
    assert client.lines() == ["421 4.4.2 Idle timeout, closing connection"]
    assert client.transport.disconnecting


def test_idle_and_data_timeouts() -> None:
    client = Client()
    client.send(b"EHLO c\r\n")
    client.clock.advance(SETTINGS.idle_timeout - 1)
    assert not client.transport.disconnecting
    client.send(b"NOOP\r\n")
    client.clock.advance(SETTINGS.idle_timeout - 1)
    assert not client.transport.disconnecting
    client.transport.reset()
    client.clock.advance(2)
    assert client.lines() == ["421 4.4.2 Idle timeout, closing connection"]
    assert client.transport.disconnecting

    slow = Client()
    slow.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
    slow.clock.advance(SETTINGS.data_timeout + 1)
    assert slow.transport.disconnecting


def test_backpressure_pauses_the_transport_while_a_command_waits() -> None:
    client = Client()
    client.backend.pending = Deferred()
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\nx\r\n.\r\n")
    client.send(b"NOOP\r\n" * (MAX_PENDING_INPUT // 6 + 10))
    assert client.transport.producerState == "paused"
    client.backend.pending.callback(Reply(250, "2.0.0", "Ok"))
    assert client.transport.producerState == "producing"


def factory_with(**changes: object) -> SmtpFactory:
    settings = evolve(SETTINGS, **changes)  # type: ignore[arg-type]
    return SmtpFactory(settings, RecordingBackend(), Clock(), None)


def test_allowlist_refuses_at_connect() -> None:
    factory = factory_with(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),))
    outsider = Client(factory=factory, ip="127.0.0.2")
    assert outsider.lines() == ["554 5.7.1 Access denied: your address is not allowed to connect"]
    assert outsider.transport.disconnecting
    insider = Client(factory=factory, ip="127.0.0.1")
    assert insider.lines() == ["220 relay.test ESMTP SmartRelay"]
    # With require_auth, anyone may connect (and must authenticate).
    open_factory = factory_with(
        allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),), require_auth=True
    )
    assert Client(factory=open_factory, ip="127.0.0.2").lines()[0].startswith("220 ")


def test_connection_limits() -> None:
    factory = factory_with(max_connections=3, max_connections_per_client=2)
    a1 = Client(factory=factory, ip="127.0.0.1")
    Client(factory=factory, ip="127.0.0.1")
    third = Client(factory=factory, ip="127.0.0.1")
    assert third.lines() == ["421 4.7.0 Too many connections from your address"]
    Client(factory=factory, ip="127.0.0.5")
    fourth = Client(factory=factory, ip="127.0.0.6")
    assert fourth.lines() == ["421 4.3.2 Too many connections, try again later"]
    # Closing one frees its place.
    a1.protocol.connectionLost()
    assert Client(factory=factory, ip="127.0.0.6").lines()[0].startswith("220 ")
    assert factory.per_client["127.0.0.1"] == 1


def reference_data(stream: bytes) -> tuple[bytes, bytes]:
    """Line-by-line model of DATA (RFC 5321 4.5.2 + our bare-LF policy): (message, rest)."""
    out: list[bytes] = []
    position = 0
    after_crlf = True
    while True:
        newline = stream.index(b"\n", position)
        line = stream[position : newline + 1]
        position = newline + 1
        if line == b".\r\n" and after_crlf:
            return b"".join(out), stream[position:]
        after_crlf = line.endswith(b"\r\n")
        if line.startswith(b"."):
            line = line[1:]
        out.append(line[:-2] + b"\r\n" if after_crlf else line[:-1] + b"\r\n")


def send_data_in_pieces(stream: bytes, cuts: list[int]) -> tuple[Client, list[str]]:
    """A client in DATA sends ``stream`` in reads cut at ``cuts``; it and the replies."""
    client = Client(evolve(SETTINGS, max_message_size=1_000_000))
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
    replies: list[str] = []
    previous = 0
    for cut in [*sorted(c for c in cuts if c < len(stream)), len(stream)]:
        replies += client.send(stream[previous:cut])
        previous = cut
    return client, replies


line_text = st.binary(max_size=30).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
)
data_line = st.tuples(
    st.sampled_from([b"", b".", b".."]), line_text, st.sampled_from([b"\r\n", b"\n"])
).map(lambda t: t[0] + t[1] + t[2])


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(data_line, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_data_parsing_matches_the_line_by_line_model(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(lines) + b"\r\n.\r\nNOOP\r\n"
    expected_message, rest = reference_data(stream)
    client, replies = send_data_in_pieces(stream, cuts)
    # The CRLF before the dot guarantees the end is seen after a CRLF line.
    assert client.backend.messages, replies
    assert client.backend.messages[0][1] == expected_message
    if rest == b"NOOP\r\n":  # otherwise a generated ".\r\n" line ended the data early
        assert replies[-2:] == ["250 2.0.0 Ok: queued as Q1", "250 2.0.0 Ok"]


raw_line_text = st.binary(max_size=30).map(lambda b: b.replace(b"\n", b""))
raw_data_line = st.tuples(
    st.sampled_from([b"", b".", b".."]),
    st.one_of(raw_line_text, st.sampled_from([b"\r", b"a\rb", b"\0", b"x\r"])),
    st.sampled_from([b"\r\n", b"\n"]),
).map(lambda t: t[0] + t[1] + t[2])


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(raw_data_line, max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=8),
)
def test_bare_cr_and_nul_are_refused_as_the_line_model_says(
    lines: list[bytes], cuts: list[int]
) -> None:
    """Lines with CRs and NULs anywhere: the message is refused (NUL first, then a CR not
    followed by LF once bare LFs are CRLF) exactly when the line-by-line model says so,
    however the stream is cut into reads."""
    stream = b"".join(lines) + b"\r\n.\r\nNOOP\r\n"
    expected_message, _ = reference_data(stream)
    client, replies = send_data_in_pieces(stream, cuts)
    bare_cr = expected_message.replace(b"\r\n", b"").count(b"\r") > 0
    if b"\0" in expected_message:
        assert not client.backend.messages
        assert "550 5.6.0 Message contains NUL bytes" in replies
    elif bare_cr:
        assert not client.backend.messages
        assert "550 5.6.0 Message contains a bare CR (CR not followed by LF)" in replies
    else:
        assert client.backend.messages[0][1] == expected_message
