"""Issue 11 (hardening) at the protocol level: StringTransport and task.Clock, no sockets.

The same attacks over real sockets are in test_smtp_hardening_e2e.py.
"""

from __future__ import annotations

import base64

import pytest
from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from smartrelay.config import ConfigError, parse_config
from smartrelay.smtp.listener import SmtpFactory
from smartrelay.smtp.ratelimit import AuthFailureLimiter
from smartrelay.smtp.session import Admitted, has_control, printable
from tests.test_smtp_protocol import SETTINGS, Client, FakeTlsContext, RecordingBackend

ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.net>\r\n"


# -- item 2: a TLS handshake that never ends, and closes that never complete -------------------
def test_starttls_then_silence_is_aborted_at_the_handshake_deadline() -> None:
    client = Client()
    client.send(b"EHLO c\r\n")
    assert client.codes(b"STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
    client.clock.advance(SETTINGS.tls_handshake_timeout - 1)
    assert not client.transport.disconnecting
    client.clock.advance(2)
    # Aborted (nothing can be said inside an unfinished handshake), not a graceful close.
    assert client.transport.disconnected


def test_a_completed_handshake_hands_over_to_the_idle_timeout() -> None:
    client = Client()
    client.send(b"EHLO c\r\nSTARTTLS\r\n")
    client.clock.advance(SETTINGS.tls_handshake_timeout - 1)
    client.protocol.handshakeCompleted()
    client.clock.advance(SETTINGS.tls_handshake_timeout + 1)
    assert not client.transport.disconnecting
    client.transport.reset()
    client.clock.advance(SETTINGS.idle_timeout)
    assert client.lines() == ["421 4.4.2 Idle timeout, closing connection"]


def test_a_close_that_does_not_complete_is_aborted() -> None:
    """421 at the idle timeout, then loseConnection; a peer that neither reads nor answers
    TLS close_notify keeps the connection open: it is aborted after close_grace."""
    client = Client()
    client.clock.advance(SETTINGS.idle_timeout)
    assert client.lines()[-1] == "421 4.4.2 Idle timeout, closing connection"
    assert client.transport.disconnecting and not client.transport.disconnected
    client.clock.advance(SETTINGS.close_grace + 0.1)
    assert client.transport.disconnected


def test_a_close_that_completes_is_not_aborted() -> None:
    client = Client()
    client.send(b"QUIT\r\n")
    client.protocol.connectionLost()
    assert not client.clock.getDelayedCalls()


# -- item 3: slow DATA -------------------------------------------------------------------------
def test_trickled_data_hits_the_whole_data_deadline_and_nothing_is_stored() -> None:
    client = Client()
    client.send(ENVELOPE + b"DATA\r\n")
    elapsed = 0.0
    while not client.transport.disconnecting and elapsed < SETTINGS.data_timeout * 2:
        client.send(b"x")  # one byte every 7 s: each read is well inside data_read_timeout
        client.clock.advance(7)
        elapsed += 7
    assert SETTINGS.data_timeout <= elapsed < SETTINGS.data_timeout + 7
    assert client.lines()[-1] == (
        "421 4.4.2 DATA took too long, closing connection; message not accepted"
    )
    # The end of the message arriving afterwards stores nothing.
    client.protocol.dataReceived(b"\r\n.\r\n")
    assert client.backend.messages == []


def test_data_read_timeout_still_applies() -> None:
    client = Client()
    client.send(ENVELOPE + b"DATA\r\nSubject: x\r\n")
    client.clock.advance(SETTINGS.data_read_timeout + 1)
    assert client.transport.disconnecting
    assert client.backend.messages == []


def test_a_message_finished_in_time_is_stored_and_the_deadline_is_gone() -> None:
    client = Client()
    client.send(ENVELOPE + b"DATA\r\nSubject: x\r\n")
    for _ in range(5):
        client.clock.advance(SETTINGS.data_timeout / 6)
        client.send(b"X-Slow: yes\r\n")
    assert client.codes(b"Subject: x\r\n\r\nbody\r\n.\r\n")[0].startswith("250 ")
    client.clock.advance(20)  # past the old deadline: no 421
    assert not client.transport.disconnecting
    assert len(client.backend.messages) == 1


# -- item 5: control characters in EHLO/HELO, MAIL, RCPT ---------------------------------------
CONTROLS = [
    b"\r",
    b"\x00",
    b"\x1b[2J",
    b"\x7f",
    b"\t",
    "\u0085".encode(),  # C1 NEL
    "\u009b".encode(),  # C1 CSI
    "\u202e".encode(),  # right-to-left override
    "\u200b".encode(),  # zero-width space
    "\u2028".encode(),  # line separator
]


@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
def test_control_characters_in_helo_are_refused(verb: bytes, control: bytes) -> None:
    client = Client()
    reply = client.codes(verb + b" evil" + control + b"Authentication-Results: x\r\n")
    assert reply == ["501 5.5.2 Control characters are not allowed in arguments"]
    assert client.protocol.session.helo is None


@pytest.mark.parametrize("control", CONTROLS)
def test_control_characters_in_envelope_addresses_are_refused(control: bytes) -> None:
    client = Client()
    client.send(b"EHLO c\r\n")
    refused = "501 5.5.2 Control characters are not allowed in arguments"
    assert client.codes(b"MAIL FROM:<a" + control + b"@b.test> SMTPUTF8\r\n") == [refused]
    assert client.codes(b"MAIL FROM:<a@b.test> SIZE=1" + control + b"0\r\n") == [refused]
    assert client.codes(b"MAIL FROM:<a@b.test> SMTPUTF8\r\n") == ["250 2.1.0 Sender ok"]
    assert client.codes(b"RCPT TO:<r" + control + b"@example.net>\r\n") == [refused]
    assert client.protocol.session.envelope is not None
    assert client.protocol.session.envelope.recipients == []


def test_utf8_names_without_controls_are_still_accepted() -> None:
    client = Client()
    assert client.codes("EHLO bücher.example\r\n".encode())[0].startswith("250 ")
    assert client.codes("MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\n".encode()) == [
        "250 2.1.0 Sender ok"
    ]
    assert client.codes("RCPT TO:<δοκιμή@παράδειγμα.example>\r\n".encode()) == [
        "250 2.1.5 Recipient ok"
    ]


def test_has_control_and_printable() -> None:
    assert not has_control(b"host.example")
    assert not has_control("bücher.example".encode())
    assert all(has_control(c) for c in CONTROLS)
    assert printable("a\x1b[31mb\u202ec\r\n") == "a\\x1b[31mb\\u202ec\\r\\n"
    assert printable("jörg") == "jörg"


# -- item 8: an overlong command line split across reads ---------------------------------------
def test_long_line_across_reads_is_answered_once_and_its_tail_never_runs() -> None:
    client = Client()
    client.send(b"EHLO c\r\n")
    replies: list[str] = []
    for piece in (b"NOOP " + b"x" * 1500, b"x" * 1500, b"x" * 1500, b"QUIT\r\n"):
        replies += client.send(piece)
    replies += client.send(b"NOOP\r\n")
    assert replies == ["500 5.5.2 Line too long", "250 2.0.0 Ok"]
    assert not client.transport.disconnecting


def test_long_line_then_rest_of_pipeline_in_one_read() -> None:
    client = Client()
    replies = client.codes(b"NOOP " + b"x" * 3000 + b"RSET\r\nNOOP\r\n")
    assert replies == ["500 5.5.2 Line too long", "250 2.0.0 Ok"]


def test_overlong_lines_still_count_as_bad_commands() -> None:
    client = Client()
    for _ in range(SETTINGS.max_bad_commands + 1):
        for piece in (b"x" * 1500, b"x" * 1500, b"\r\n"):
            client.protocol.dataReceived(piece)
    assert client.transport.disconnecting
    assert client.lines()[-1] == "421 4.7.0 Too many errors, closing connection"


# -- item 9: parallel AUTH sessions --------------------------------------------------------------
class SlowCheckBackend(RecordingBackend):
    """Password checks that stay pending until the test decides them."""

    def __init__(self) -> None:
        super().__init__()
        self.checks: list[tuple[str, Deferred[bool | Admitted]]] = []

    def check_credentials(self, name: str, password: str) -> Deferred[bool | Admitted]:
        d: Deferred[bool | Admitted] = Deferred()
        self.checks.append((password, d))
        return d


def parallel_clients(count: int) -> tuple[SlowCheckBackend, Clock, list[Client]]:
    backend = SlowCheckBackend()
    factory = SmtpFactory(evolve(SETTINGS), backend, Clock(), FakeTlsContext())
    clients = []
    for _ in range(count):
        client = Client(backend=backend, factory=factory)
        client.send(b"EHLO c\r\n")
        client.fake_tls()
        clients.append(client)
    assert isinstance(factory.clock, Clock)
    return backend, factory.clock, clients


def auth(password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0app\0{password}".encode()) + b"\r\n"


def test_parallel_wrong_passwords_get_no_more_checks_than_the_lockout() -> None:
    backend, clock, clients = parallel_clients(40)
    for client in clients:
        client.send(auth("wrong"))
    limit = AuthFailureLimiter(clock).max_failures
    assert len(backend.checks) == limit  # the others wait
    for _, d in list(backend.checks):
        d.callback(False)
    clock.advance(60)  # the 535 delays
    assert len(backend.checks) == limit  # after 10 failures, no further check ever ran
    finals = [client.lines()[-1] for client in clients]
    assert finals.count("421 4.7.0 Too many failed authentication attempts") >= 40 - limit
    assert all(client.transport.disconnecting for client in clients[limit:])


def test_parallel_right_passwords_all_succeed_in_turn() -> None:
    """Legitimate parallel logins from one address are not locked out, only queued."""
    backend, _, clients = parallel_clients(25)
    for client in clients:
        client.send(auth("secret"))
    decided = 0
    while decided < len(backend.checks):
        backend.checks[decided][1].callback(True)
        decided += 1
    assert decided == 25
    ok = "235 2.7.0 Authentication successful"
    assert [client.lines()[-1] for client in clients] == [ok] * 25


def test_hanging_up_during_the_check_still_counts_the_failure() -> None:
    backend, _, (client,) = parallel_clients(1)
    client.send(auth("wrong"))
    client.protocol.connectionLost()
    backend.checks[0][1].callback(False)
    limiter = client.factory.auth_limiter
    assert limiter.failures("127.0.0.1") == 1
    assert limiter.in_flight("127.0.0.1") == 0


# -- the [smtp] timeout keys ---------------------------------------------------------------------
def test_timeout_keys_are_parsed_and_validated() -> None:
    defaults = parse_config({}).smtp
    assert (defaults.idle_timeout, defaults.tls_handshake_timeout, defaults.data_timeout) == (
        300.0,
        30.0,
        600.0,
    )
    keys = {"idle_timeout": "2m", "tls_handshake_timeout": "10s", "data_timeout": "1h"}
    smtp = parse_config({"smtp": keys}).smtp
    assert (smtp.idle_timeout, smtp.tls_handshake_timeout, smtp.data_timeout) == (120, 10, 3600)
    for key in keys:
        with pytest.raises(ConfigError, match=f"smtp.{key}"):
            parse_config({"smtp": {key: 30}})
        with pytest.raises(ConfigError, match=f"smtp.{key}"):
            parse_config({"smtp": {key: "0s"}})


def test_limiter_counts_checks_under_way() -> None:
    clock = Clock()
    limiter = AuthFailureLimiter(clock, max_failures=3)
    ip = "192.0.2.7"
    results: list[bool] = []
    for _ in range(5):
        limiter.begin_attempt(ip).addCallback(results.append)
    assert results == [True, True, True] and limiter.in_flight(ip) == 3
    limiter.record_success(ip)
    limiter.end_attempt(ip)  # a success makes room for one waiting attempt
    assert results == [True, True, True, True]
    limiter.record_failure(ip)
    limiter.end_attempt(ip)  # 1 failure + 2 under way: no room
    assert results == [True] * 4
    limiter.record_failure(ip)
    limiter.end_attempt(ip)  # 2 failures + 1 under way: still none
    assert results == [True] * 4
    limiter.record_failure(ip)
    limiter.end_attempt(ip)  # 3 failures: blocked, the waiting attempt is refused
    assert results == [True] * 4 + [False]
    assert limiter.blocked(ip) and limiter.in_flight(ip) == 0
    refused: list[bool] = []
    limiter.begin_attempt(ip).addCallback(refused.append)
    assert refused == [False]
    # Other clients are not affected.
    limiter.begin_attempt("192.0.2.8").addCallback(refused.append)
    assert refused == [False, True]


def test_limiter_refuses_waiting_attempts_once_blocked() -> None:
    limiter = AuthFailureLimiter(Clock(), max_failures=2)
    ip = "192.0.2.9"
    results: list[bool] = []
    for _ in range(4):
        limiter.begin_attempt(ip).addCallback(results.append)
    assert results == [True, True]
    for _ in range(2):
        limiter.record_failure(ip)
        limiter.end_attempt(ip)
    assert results == [True, True, False, False]
    assert limiter.in_flight(ip) == 0
