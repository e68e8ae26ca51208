"""The SMTP listeners end to end: the whole relay in-process, real clients over loopback sockets.

The relay (RelayService) runs on the test reactor; the clients (smtplib, swaks, raw sockets)
run in threads so the reactor keeps serving. What the relay stored is checked in the database,
on both engines wherever storage is involved (test ids end in [sqlite] and [postgresql]).
Unit tests of the protocol over StringTransport are in test_smtp_protocol.py.
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from attrs import frozen
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread

from smartrelay.passwords import hash_password
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import Store
from tests.conftest import real_reactor, service_missing
from tests.support.relay import HOST, HOSTNAME, RETURN_PATH_DOMAIN, Relays, RunningRelay

T = TypeVar("T")

CLIENT_NAME = "client.test"
SENDER = "app@sender.test"
CREDENTIAL = "billing-app"
PASSWORD = "correct horse battery staple"
QUEUED = re.compile(r"250 2\.0\.0 Ok: queued as (\S+)")
TIMEOUT = 15.0


# -- fixtures -------------------------------------------------------------------------------
@pytest_twisted.async_yield_fixture
async def relays(tmp_path: Path, database_url: str) -> AsyncIterator[Relays]:
    """Relays on the test's database, once per engine; all stopped at the end."""
    runner = Relays(real_reactor(), tmp_path, database_url)
    try:
        yield runner
    finally:
        await runner.stop_all()


@pytest_twisted.async_yield_fixture
async def sqlite_relays(tmp_path: Path) -> AsyncIterator[Relays]:
    """For tests of connection and session policy, which store nothing: SQLite only."""
    runner = Relays(real_reactor(), tmp_path, f"sqlite:{tmp_path / 'smartrelay.db'}")
    try:
        yield runner
    finally:
        await runner.stop_all()


@pytest.fixture(scope="module")
def swaks() -> str:
    path = shutil.which("swaks")
    if path is None:
        service_missing("swaks not installed")
        raise AssertionError("unreachable")
    support = subprocess.run([path, "--support"], capture_output=True, text=True, timeout=30)
    if "TLS supported" not in support.stdout + support.stderr:
        service_missing("swaks cannot do TLS (install libnet-ssleay-perl)")
    return path


# -- clients (run in a thread) ---------------------------------------------------------------
def in_thread(function: Callable[[], T]) -> Deferred[T]:
    """``await in_thread(f)``: run a blocking client while the reactor keeps serving."""
    return deferToThread(function)


def no_verify() -> ssl.SSLContext:
    """A client TLS context accepting the relay's generated self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def smtp_client(port: int) -> smtplib.SMTP:
    return smtplib.SMTP(HOST, port, local_hostname=CLIENT_NAME, timeout=TIMEOUT)


def text(reply: tuple[int, bytes]) -> str:
    """``(250, b"2.1.0 Sender ok")`` -> ``"250 2.1.0 Sender ok"``."""
    return f"{reply[0]} {reply[1].decode()}"


def message(subject: str = "hello", headers: Sequence[str] = (), body: str = "Hi there.") -> bytes:
    lines = [f"From: <{SENDER}>", "To: <a@example.net>", f"Subject: {subject}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


def transaction(
    client: smtplib.SMTP, recipients: Sequence[str], data: bytes, sender: str = SENDER
) -> str:
    """MAIL, RCPT..., DATA on an open session; the reply to the final dot."""
    assert text(client.mail(sender)) == "250 2.1.0 Sender ok"
    for recipient in recipients:
        assert text(client.rcpt(recipient)) == "250 2.1.5 Recipient ok"
    return text(client.data(data))


def send(
    port: int,
    recipients: Sequence[str],
    data: bytes,
    starttls: bool = False,
    login: tuple[str, str] | None = None,
) -> str:
    """One message in one session with smtplib; the reply to the final dot."""
    with smtp_client(port) as client:
        client.ehlo()
        if starttls:
            client.starttls(context=no_verify())
            client.ehlo()
        if login is not None:
            client.login(*login)
        return transaction(client, recipients, data)


def queue_id_of(reply: str) -> str:
    match = QUEUED.fullmatch(reply)
    assert match is not None, reply
    return match[1]


@frozen
class Answer:
    code: int
    lines: tuple[str, ...]  # the text after the code, enhanced status code included

    @property
    def text(self) -> str:
        return f"{self.code} {self.lines[-1]}"


class RawClient:
    """A plain socket speaking SMTP byte by byte, for what smtplib will not do."""

    def __init__(self, port: int, source: str | None = None) -> None:
        address = None if source is None else (source, 0)
        self.sock = socket.create_connection((HOST, port), TIMEOUT, source_address=address)
        self.file = self.sock.makefile("rb")

    def read(self) -> Answer:
        lines: list[str] = []
        while True:
            line = self.file.readline()
            assert line.endswith(b"\r\n"), f"connection closed or bad line: {line!r}"
            lines.append(line[4:-2].decode())
            if line[3:4] == b" ":
                return Answer(int(line[:3]), tuple(lines))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str) -> Answer:
        self.send(line.encode() + b"\r\n")
        return self.read()

    def closed_by_server(self) -> bool:
        return self.file.read() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# -- the database ----------------------------------------------------------------------------
async def select(store: Store, sql: str, *args: object) -> list[tuple[Any, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute(sql, args)
        return cursor.fetchall()

    return await store.engine.run_interaction("test_select", txn, readonly=True)


async def count(store: Store, table: str) -> int:
    rows = await select(store, f"SELECT COUNT(*) FROM {table}")
    return int(rows[0][0])


async def count_received(store: Store) -> int:
    """``received`` events (delivery attempts, if any, add events of other types)."""
    rows = await select(store, "SELECT COUNT(*) FROM events WHERE type = 'received'")
    return int(rows[0][0])


async def recipients_of(store: Store, queue_id: str) -> list[str]:
    sql = "SELECT address FROM recipients WHERE queue_id = ? ORDER BY id"
    rows = await select(store, sql, queue_id)
    return [str(r[0]) for r in rows]


async def raw_of(store: Store, queue_id: str) -> bytes:
    rows = await select(store, "SELECT raw FROM message_bodies WHERE queue_id = ?", queue_id)
    assert len(rows) == 1, f"no message row for {queue_id}"
    return bytes(rows[0][0])


async def nothing_stored(store: Store) -> None:
    for table in ("messages", "recipients", "events"):
        assert await count(store, table) == 0, f"{table} is not empty"


async def add_credential(relay: RunningRelay) -> None:
    await relay.store.smtp_credentials.add(CREDENTIAL, hash_password(PASSWORD))


# -- 1. swaks: STARTTLS + AUTH, two recipients -------------------------------------------------
def run_swaks(
    swaks: str, port: int, to: str, mechanism: str, password: str, *extra: str
) -> tuple[int, str]:
    """swaks with STARTTLS and AUTH; its exit status and its whole transcript."""
    command = [swaks, "--server", f"{HOST}:{port}", "--ehlo", CLIENT_NAME, "--timeout", "15"]
    command += ["--tls", "--auth", mechanism, "--auth-user", CREDENTIAL]
    command += ["--auth-password", password, "--from", SENDER, "--to", to, *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest_twisted.ensureDeferred
async def test_swaks_tls_auth_two_recipients(relays: Relays, swaks: str, mechanism: str) -> None:
    relay = await relays.start()
    await add_credential(relay)
    extra = ["--header", "Subject: swaks e2e", "--body", "Body written by swaks."]
    status, output = await in_thread(
        lambda: run_swaks(swaks, relay.smtp_port, "a@x.test,b@y.test", mechanism, PASSWORD, *extra)
    )
    assert status == 0, output
    assert "235 2.7.0 Authentication successful" in output
    match = QUEUED.search(output)
    assert match is not None, output
    queue_id = match[1]

    store = relay.store
    rows = await select(store, "SELECT sender, client_ip, credential FROM messages")
    assert rows == [(SENDER, "127.0.0.1", CREDENTIAL)]
    assert await recipients_of(store, queue_id) == ["a@x.test", "b@y.test"]
    raw = await raw_of(store, queue_id)
    assert b"Body written by swaks." in raw and b"Subject: swaks e2e" in raw
    assert raw.startswith(b"Received: from client.test ([127.0.0.1])\r\n")
    assert f"by {HOSTNAME} (SmartRelay) with ESMTPSA id {queue_id};".encode() in raw
    events = await select(
        store,
        "SELECT recipient, data FROM events WHERE type = 'received' AND queue_id = ? ORDER BY id",
        queue_id,
    )
    assert [e[0] for e in events] == ["a@x.test", "b@y.test"]
    expected = {"client_ip": "127.0.0.1", "credential": CREDENTIAL, "size": len(raw)}
    assert [json.loads(e[1]) for e in events] == [expected, expected]
    assert await count_received(store) == 2


@pytest_twisted.ensureDeferred
async def test_swaks_wrong_password_is_refused(relays: Relays, swaks: str) -> None:
    relay = await relays.start()
    await add_credential(relay)
    status, output = await in_thread(
        lambda: run_swaks(swaks, relay.smtp_port, "a@x.test", "PLAIN", "wrong")
    )
    assert status != 0, output
    assert "535 5.7.8 Authentication credentials invalid" in output
    assert QUEUED.search(output) is None
    await nothing_stored(relay.store)


# -- 2. smtplib in the clear, control headers ---------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_control_headers_are_stored(relays: Relays) -> None:
    relay = await relays.start()
    data = message(
        headers=[
            "X-SmartRelay-Tag: welcome",
            "X-SmartRelay-Tag: onboarding",
            "X-SmartRelay-Meta-User: 42",
            "X-SmartRelay-Track-Opens: no",
        ]
    )
    reply = await in_thread(lambda: send(relay.smtp_port, ["a@example.net"], data))
    queue_id = queue_id_of(reply)
    sql = "SELECT tags, metadata, options, credential FROM messages WHERE queue_id = ?"
    rows = await select(relay.store, sql, queue_id)
    assert len(rows) == 1
    tags, metadata, options, credential = rows[0]
    assert json.loads(tags) == ["welcome", "onboarding"]
    assert json.loads(metadata) == {"User": "42"}
    assert json.loads(options) == {"track_opens": False}
    assert credential is None
    raw = await raw_of(relay.store, queue_id)
    assert f"with ESMTP id {queue_id}\r\n\tfor <a@example.net>;".encode() in raw
    assert raw.endswith(data)  # stored as sent, after the trace header
    assert await recipients_of(relay.store, queue_id) == ["a@example.net"]


@pytest_twisted.ensureDeferred
async def test_malformed_control_header_is_refused_and_nothing_stored(relays: Relays) -> None:
    relay = await relays.start()
    data = message(headers=["X-SmartRelay-Track-Opens: maybe"])
    reply = await in_thread(lambda: send(relay.smtp_port, ["a@example.net"], data))
    assert reply == "550 5.6.0 Bad control header: X-SmartRelay-Track-Opens must be yes or no"
    await nothing_stored(relay.store)


@pytest_twisted.ensureDeferred
async def test_idempotency_key_twice_gives_the_first_queue_id(relays: Relays) -> None:
    relay = await relays.start()
    data = message(headers=["X-SmartRelay-Idempotency-Key: order-1234"])

    def twice() -> list[str]:
        with smtp_client(relay.smtp_port) as client:
            client.ehlo()
            first = transaction(client, ["a@example.net", "b@example.net"], data)
            second = transaction(client, ["a@example.net", "b@example.net"], data)
            return [first, second]

    first, second = await in_thread(twice)
    assert queue_id_of(first) == queue_id_of(second)
    # Another connection, later: still the same id.
    third = await in_thread(lambda: send(relay.smtp_port, ["c@example.net"], data))
    assert queue_id_of(third) == queue_id_of(first)
    store = relay.store
    assert await select(store, "SELECT queue_id, idempotency_key FROM messages") == [
        (queue_id_of(first), "order-1234")
    ]
    assert await recipients_of(store, queue_id_of(first)) == ["a@example.net", "b@example.net"]
    assert await count(store, "recipients") == 2
    assert await count_received(store) == 2


# -- 3. STARTTLS, AUTH, require_tls, require_auth ------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_starttls_then_auth(relays: Relays) -> None:
    relay = await relays.start()
    await add_credential(relay)

    def session() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with smtp_client(relay.smtp_port) as client:
            client.ehlo()
            seen["before"] = dict(client.esmtp_features)
            seen["auth_in_clear"] = text(client.docmd("AUTH", "PLAIN AGFwcABwdw=="))
            seen["starttls"] = text(client.starttls(context=no_verify()))
            assert isinstance(client.sock, ssl.SSLSocket)
            seen["tls_version"] = client.sock.version()
            client.ehlo()
            seen["after"] = dict(client.esmtp_features)
            seen["login"] = text(client.login(CREDENTIAL, PASSWORD))
            seen["data"] = transaction(client, ["a@example.net"], message())
        return seen

    seen = await in_thread(session)
    assert "starttls" in seen["before"] and "auth" not in seen["before"]
    assert "pipelining" in seen["before"] and "enhancedstatuscodes" in seen["before"]
    assert seen["auth_in_clear"].startswith("538 5.7.11 ")
    assert seen["starttls"] == "220 2.0.0 Ready to start TLS"
    assert seen["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert "starttls" not in seen["after"]
    assert seen["after"]["auth"].split() == ["PLAIN", "LOGIN"]
    assert seen["login"] == "235 2.7.0 Authentication successful"
    queue_id = queue_id_of(seen["data"])
    sql = "SELECT credential FROM messages WHERE queue_id = ?"
    rows = await select(relay.store, sql, queue_id)
    assert rows == [(CREDENTIAL,)]
    raw = await raw_of(relay.store, queue_id)
    assert f"with ESMTPSA id {queue_id}".encode() in raw


@pytest_twisted.ensureDeferred
async def test_require_tls(sqlite_relays: Relays) -> None:
    relay = await sqlite_relays.start({"require_tls": True})

    def session() -> list[str]:
        with smtp_client(relay.smtp_port) as client:
            client.ehlo()
            clear = text(client.mail(SENDER))
            client.starttls(context=no_verify())
            client.ehlo()
            return [clear, text(client.mail(SENDER)), text(client.rset())]

    clear, after_tls, reset = await in_thread(session)
    assert clear == "530 5.7.0 Must issue a STARTTLS command first"
    assert after_tls == "250 2.1.0 Sender ok"
    assert reset == "250 2.0.0 Reset ok"


@pytest_twisted.ensureDeferred
async def test_implicit_tls_listener(sqlite_relays: Relays, tmp_path: Path) -> None:
    """An ``ssl:`` endpoint (port 465 style): TLS from the first byte, so AUTH is offered at
    once, STARTTLS is not, and the Received header says ESMTPS."""
    from smartrelay.smtp.tls import ensure_certificate
    from tests.support.relay import free_ports

    material = ensure_certificate("", "", str(tmp_path / "certs"), HOSTNAME)
    (port,) = free_ports(1)
    listen = (
        f"ssl:{port}:interface={HOST}:privateKey={material.key_path}"
        f":certKey={material.certificate_path}"
    )
    relay = await sqlite_relays.start({"listen": [listen]})

    def session() -> tuple[str, str, str]:
        with smtplib.SMTP_SSL(HOST, port, context=no_verify(), timeout=30) as client:
            client.ehlo(CLIENT_NAME)
            features = " ".join(sorted(client.esmtp_features))
            client.sendmail(SENDER, ["tls@example.net"], b"Subject: x\r\n\r\nbody\r\n")
            assert isinstance(client.sock, ssl.SSLSocket)
            return features, str(client.sock.version()), text(client.noop())

    features, version, noop = await in_thread(session)
    assert "auth" in features and "starttls" not in features
    assert version in ("TLSv1.2", "TLSv1.3") and noop == "250 2.0.0 Ok"

    async def raw_message(cursor: ICursor) -> bytes:
        await cursor.execute("SELECT raw FROM message_bodies")
        row = cursor.fetchone()
        assert row is not None
        return bytes(row[0])

    raw = await relay.store.engine.run_interaction("raw", raw_message, readonly=True)
    assert b"with ESMTPS id" in raw


@pytest_twisted.ensureDeferred
async def test_require_auth(sqlite_relays: Relays) -> None:
    # allowed_networks does not apply with require_auth (docs/smtp.md): 127.0.0.2 may connect.
    relay = await sqlite_relays.start({"require_auth": True, "allowed_networks": ["127.0.0.1/32"]})
    await add_credential(relay)

    def session() -> list[str]:
        client = RawClient(relay.smtp_port, source="127.0.0.2")
        try:
            greeting = client.read().text
            client.command(f"EHLO {CLIENT_NAME}")
            clear = client.command(f"MAIL FROM:<{SENDER}>").text
        finally:
            client.close()
        with smtp_client(relay.smtp_port) as smtp:
            smtp.ehlo()
            smtp.starttls(context=no_verify())
            smtp.ehlo()
            tls_only = text(smtp.mail(SENDER))
            smtp.login(CREDENTIAL, PASSWORD)
            return [greeting, clear, tls_only, text(smtp.mail(SENDER))]

    greeting, clear, tls_only, authenticated = await in_thread(session)
    assert greeting == f"220 {HOSTNAME} ESMTP SmartRelay"
    assert clear == "530 5.7.0 Authentication required"
    assert tls_only == "530 5.7.0 Authentication required"
    assert authenticated == "250 2.1.0 Sender ok"


# -- 4. PIPELINING -------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_pipelined_transaction_in_one_write(relays: Relays) -> None:
    relay = await relays.start()
    body = message(subject="pipelined", body="line one\r\n.leading dot\r\nline three")
    stuffed = body.replace(b"\r\n.", b"\r\n..")

    def session() -> tuple[list[Answer], bool]:
        client = RawClient(relay.smtp_port)
        try:
            answers = [client.read()]
            client.send(
                f"EHLO {CLIENT_NAME}\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<a@example.net>\r\n"
                "RCPT TO:<b@example.org>\r\nDATA\r\n".encode()
                + stuffed
                + b".\r\nQUIT\r\n"
            )
            answers += [client.read() for _ in range(7)]
            return answers, client.closed_by_server()
        finally:
            client.close()

    answers, closed = await in_thread(session)
    assert [a.code for a in answers] == [220, 250, 250, 250, 250, 354, 250, 221]
    assert "PIPELINING" in answers[1].lines
    assert [a.text for a in answers[2:6]] == [
        "250 2.1.0 Sender ok",
        "250 2.1.5 Recipient ok",
        "250 2.1.5 Recipient ok",
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    queue_id = queue_id_of(answers[6].text)
    assert answers[7].text == "221 2.0.0 Bye"
    assert closed
    assert await recipients_of(relay.store, queue_id) == ["a@example.net", "b@example.org"]
    raw = await raw_of(relay.store, queue_id)
    assert raw.endswith(body)  # dot-stuffing undone


# -- 5. security and limits -----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_client_outside_allowed_networks_is_refused_at_connect(
    sqlite_relays: Relays,
) -> None:
    relay = await sqlite_relays.start({"allowed_networks": ["127.0.0.1/32"]})

    def connect(port: int, source: str) -> tuple[Answer, bool]:
        client = RawClient(port, source=source)
        try:
            greeting = client.read()
            if greeting.code != 220:
                return greeting, client.closed_by_server()
            return greeting, client.command("QUIT").code == 221 and client.closed_by_server()
        finally:
            client.close()

    outsider = await in_thread(lambda: connect(relay.smtp_port, "127.0.0.2"))
    insider = await in_thread(lambda: connect(relay.smtp_port, "127.0.0.1"))
    inbound = await in_thread(lambda: connect(relay.inbound_port, "127.0.0.2"))
    assert outsider == (
        Answer(554, ("5.7.1 Access denied: your address is not allowed to connect",)),
        True,
    )
    assert insider[0].code == 220
    assert inbound[0].code == 220  # the inbound MX admits everyone


@pytest_twisted.ensureDeferred
async def test_inbound_listener_is_no_open_relay_and_keeps_feedback(relays: Relays) -> None:
    relay = await relays.start()
    bounce_address = f"b+anything@{RETURN_PATH_DOMAIN}"
    data = message(subject="Undelivered Mail Returned to Sender", body="The mail bounced.")

    def session() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with smtp_client(relay.inbound_port) as client:
            client.ehlo()
            seen["features"] = dict(client.esmtp_features)
            seen["mail"] = text(client.mail(""))
            seen["gmail"] = text(client.rcpt("x@gmail.com"))
            seen["ours"] = text(client.rcpt(bounce_address))
            seen["data"] = text(client.data(data))
            assert text(client.mail(SENDER)) == "250 2.1.0 Sender ok"
            seen["only_foreign"] = text(client.rcpt("victim@example.org"))
            seen["no_recipients"] = text(client.docmd("DATA"))
        return seen

    seen = await in_thread(session)
    assert "auth" not in seen["features"]
    assert seen["mail"] == "250 2.1.0 Sender ok"
    assert seen["gmail"] == "550 5.1.1 No such recipient here: <x@gmail.com>"
    assert seen["ours"] == "250 2.1.5 Recipient ok"
    assert seen["only_foreign"].startswith("550 5.1.1 ")
    assert seen["no_recipients"] == "554 5.5.1 No valid recipients"
    report_id = queue_id_of(seen["data"])
    sql = "SELECT report_id, sender, recipients, client_ip, state, raw FROM feedback_reports"
    rows = await select(relay.store, sql)
    assert len(rows) == 1
    stored_id, sender, recipients, client_ip, state, raw = rows[0]
    # Kept as it came; the feedback processor may have read it already (its bounce address
    # carries no token of ours, so it is unmatched).
    assert (stored_id, sender, client_ip) == (report_id, "", "127.0.0.1")
    assert state in ("new", "unmatched")
    assert json.loads(recipients) == [bounce_address]
    assert bytes(raw).endswith(data)
    await nothing_stored(relay.store)  # nothing queued for delivery


@pytest_twisted.ensureDeferred
async def test_oversize_message_is_refused_and_the_session_goes_on(relays: Relays) -> None:
    relay = await relays.start({"max_message_size": "20KB"})
    big = message(body=("x" * 70 + "\r\n") * 1000)  # 72 KB

    def session() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with smtp_client(relay.smtp_port) as client:
            client.ehlo()
            seen["size"] = client.esmtp_features["size"]
            seen["declared"] = text(client.mail(SENDER, ["SIZE=100000"]))
            seen["streamed"] = transaction(client, ["a@example.net"], big)
            seen["noop"] = text(client.noop())
            seen["small"] = transaction(client, ["a@example.net"], message(subject="small"))
        return seen

    seen = await in_thread(session)
    assert seen["size"] == "20480"
    too_big = "552 5.3.4 Message size exceeds the fixed maximum message size"
    assert seen["declared"] == too_big
    assert seen["streamed"] == too_big
    assert seen["noop"] == "250 2.0.0 Ok"
    queue_id = queue_id_of(seen["small"])
    assert await select(relay.store, "SELECT queue_id FROM messages") == [(queue_id,)]
    assert b"Subject: small" in await raw_of(relay.store, queue_id)


@pytest_twisted.ensureDeferred
async def test_too_many_recipients(relays: Relays) -> None:
    relay = await relays.start({"max_recipients": 3})

    def session() -> list[str]:
        with smtp_client(relay.smtp_port) as client:
            client.ehlo()
            client.mail(SENDER)
            replies = [text(client.rcpt(f"r{i}@example.net")) for i in range(5)]
            return [*replies, text(client.data(message()))]

    replies = await in_thread(session)
    assert replies[:3] == ["250 2.1.5 Recipient ok"] * 3
    assert replies[3:5] == ["452 4.5.3 Too many recipients"] * 2
    queue_id = queue_id_of(replies[5])
    assert await recipients_of(relay.store, queue_id) == [
        "r0@example.net",
        "r1@example.net",
        "r2@example.net",
    ]


@pytest_twisted.ensureDeferred
async def test_nul_byte_in_data_is_refused(relays: Relays) -> None:
    relay = await relays.start()
    data = message(body="before\0after")
    reply = await in_thread(lambda: send(relay.smtp_port, ["a@example.net"], data))
    assert reply == "550 5.6.0 Message contains NUL bytes"
    await nothing_stored(relay.store)


@pytest_twisted.ensureDeferred
async def test_connection_limit_per_client(sqlite_relays: Relays) -> None:
    relay = await sqlite_relays.start({"max_connections_per_client": 2})

    def session() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        first, second = RawClient(relay.smtp_port), RawClient(relay.smtp_port)
        try:
            seen["first"], seen["second"] = first.read().code, second.read().code
            third = RawClient(relay.smtp_port)
            try:
                seen["third"] = third.read().text
                seen["third_closed"] = third.closed_by_server()
            finally:
                third.close()
            # Another client address has its own count.
            other = RawClient(relay.smtp_port, source="127.0.0.3")
            try:
                seen["other"] = other.read().code
            finally:
                other.close()
            assert first.command("QUIT").code == 221 and first.closed_by_server()
        finally:
            first.close()
        try:
            # Once the server has seen the first connection go, a new one is welcome.
            seen["again"] = 0
            deadline = time.monotonic() + 5
            while seen["again"] != 220 and time.monotonic() < deadline:
                client = RawClient(relay.smtp_port)
                try:
                    seen["again"] = client.read().code
                finally:
                    client.close()
                time.sleep(0.02)
        finally:
            second.close()
        return seen

    seen = await in_thread(session)
    assert (seen["first"], seen["second"]) == (220, 220)
    assert seen["third"] == "421 4.7.0 Too many connections from your address"
    assert seen["third_closed"]
    assert seen["other"] == 220
    assert seen["again"] == 220


@pytest_twisted.ensureDeferred
async def test_total_connection_limit(sqlite_relays: Relays) -> None:
    relay = await sqlite_relays.start({"max_connections": 1})

    def session() -> list[str]:
        first = RawClient(relay.smtp_port)
        try:
            greeting = first.read().text
            second = RawClient(relay.smtp_port, source="127.0.0.4")
            try:
                return [greeting, second.read().text]
            finally:
                second.close()
        finally:
            first.close()

    greeting, refused = await in_thread(session)
    assert greeting.startswith("220 ")
    assert refused == "421 4.3.2 Too many connections, try again later"


# -- 6. durability across a restart ---------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_accepted_messages_survive_a_restart(relays: Relays) -> None:
    relay = await relays.start()
    clients, per_client = 4, 5  # N = 20 messages, from concurrent sessions

    def one_client(c: int) -> list[tuple[str, int]]:
        accepted = []
        with smtp_client(relay.smtp_port) as client:
            client.ehlo()
            for m in range(per_client):
                n = c * per_client + m
                reply = transaction(
                    client, [f"r{n}a@example.net", f"r{n}b@example.org"], message(f"msg {n}")
                )
                accepted.append((queue_id_of(reply), n))
        return accepted

    results: list[list[tuple[str, int]]] = await gatherResults(
        [deferToThread(one_client, c) for c in range(clients)]
    )
    accepted = dict(pair for batch in results for pair in batch)
    assert len(accepted) == clients * per_client

    await relay.stop()
    restarted = await relays.start()
    store = restarted.store
    assert await count(store, "messages") == len(accepted)
    assert await store.count_recipients() == 2 * len(accepted)
    rows = await select(store, "SELECT queue_id, address FROM recipients")
    expected = {
        (queue_id, f"r{n}{suffix}")
        for queue_id, n in accepted.items()
        for suffix in ("a@example.net", "b@example.org")
    }
    assert set(rows) == expected
    for queue_id, n in list(accepted.items())[:3]:
        assert f"Subject: msg {n}\r\n".encode() in await raw_of(store, queue_id)
    # And the restarted relay takes new mail.
    reply = await in_thread(lambda: send(restarted.smtp_port, ["new@example.net"], message()))
    assert await recipients_of(store, queue_id_of(reply)) == ["new@example.net"]


# -- 7. storage failure ------------------------------------------------------------------------
@pytest.mark.parametrize("breakage", ["drop_recipients_table", "close_engine"])
@pytest_twisted.ensureDeferred
async def test_storage_failure_gives_451_and_leaves_nothing(
    relays: Relays, database_url: str, breakage: str
) -> None:
    relay = await relays.start()
    store = relay.store
    if breakage == "drop_recipients_table":
        # The message row is inserted before the recipients fail: this checks the rollback.
        async def drop(cursor: ICursor) -> None:
            await cursor.execute("DROP TABLE recipients")

        await store.engine.run_interaction("drop", drop)
    else:
        await store.engine.close()

    def session() -> list[str]:
        with smtp_client(relay.smtp_port) as client:
            client.ehlo()
            first = transaction(client, ["a@example.net", "b@example.net"], message())
            second = transaction(client, ["c@example.net"], message())
            return [first, second, text(client.noop())]

    first, second, noop = await in_thread(session)
    failed = "451 4.3.0 Temporary storage failure, try again later"
    assert (first, second, noop) == (failed, failed, "250 2.0.0 Ok")

    # Look with an engine of our own: the relay's may be closed.
    engine = create_engine(real_reactor(), database_url)
    await engine.start()
    try:
        checker = Store(engine, real_reactor())
        assert await count(checker, "messages") == 0
        assert await count(checker, "events") == 0
        if breakage == "close_engine":
            assert await count(checker, "recipients") == 0
    finally:
        await engine.close()


# -- shutdown --------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_session_open_at_shutdown_is_not_left_hanging(sqlite_relays: Relays) -> None:
    relay = await sqlite_relays.start()
    client = await in_thread(lambda: RawClient(relay.smtp_port))
    try:
        assert (await in_thread(client.read)).code == 220
        assert (await in_thread(lambda: client.command(f"EHLO {CLIENT_NAME}"))).code == 250
        await relay.stop()

        def finish() -> str:
            client.sock.settimeout(2)
            try:
                for line in (f"MAIL FROM:<{SENDER}>", "RCPT TO:<a@example.net>", "DATA"):
                    if client.command(line).code >= 400:
                        return "refused"
                client.send(message() + b".\r\n")
                return client.read().text
            except TimeoutError:
                return "no reply"
            except (AssertionError, OSError):
                return "closed"

        outcome = await in_thread(finish)
    finally:
        client.close()
    # Told to come back later, or disconnected: either way the client retries.
    assert outcome in ("refused", "closed") or outcome.startswith(("421 4.3.0", "451 4.3.0"))
