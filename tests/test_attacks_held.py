"""Attacks the relay held when it was tried as an attacker would, kept as a regression suite.

Each test replays one attack against the whole relay over loopback sockets: SMTP smuggling
with nine end-of-data shapes, STARTTLS command injection, pathological MIME (deep nesting,
thousands of headers or parts) through the re-wrap chain to a real SMTP peer, and a full disk
under a running ``twistd``. docs/security.md lists them with what each proves, beside the
other attack tests of the suite.
"""

from __future__ import annotations

import resource
import smtplib
import socket
import ssl
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import real_reactor
from tests.support.delivery_relay import (
    DeliveryRelays,
    count_events,
    eventually,
    recipient_states,
    smtp_route,
)
from tests.support.postfix import PostfixSink
from tests.support.relay import HOST, free_ports
from tests.support.run import Twistd, query, write_relay_config
from tests.support.traffic import wait_until

TIMEOUT = 30.0
SENDER = "app@sender.test"
VICTIM = "victim@victim.test"

#: Ends of data that some SMTP servers accept besides CRLF.CRLF (SMTP smuggling, 2023): a
#: relay that takes one of them for the end splits one message into two when it relays.
SMUGGLING_SHAPES: tuple[bytes, ...] = (
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\n\x00.\r\n",
)


class Line:
    """A plain socket reading SMTP replies (smtplib would not send the bytes we need)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), TIMEOUT)
        self.file = self.sock.makefile("rb")

    def read(self) -> tuple[int, str]:
        text = []
        while True:
            line = self.file.readline()
            assert line.endswith(b"\r\n"), f"connection closed or bad line: {line!r}"
            text.append(line[4:-2].decode())
            if line[3:4] == b" ":
                return int(line[:3]), "\n".join(text)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str) -> tuple[int, str]:
        self.send(line.encode() + b"\r\n")
        return self.read()

    def nothing_more(self, wait: float = 0.5) -> bytes:
        """What the server sends within ``wait`` seconds without being asked (nothing, we hope)."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(4096)
        except TimeoutError:
            return b""
        finally:
            self.sock.settimeout(TIMEOUT)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def smuggling_session(port: int, shapes: Sequence[bytes]) -> list[tuple[int, str]]:
    """One message per shape, each hiding a second transaction behind the shape; the reply to
    each final dot, and a check that nothing else was answered."""
    client = Line(port)
    try:
        assert client.read()[0] == 220
        assert client.command("EHLO client.test")[0] == 250
        replies = []
        for number, shape in enumerate(shapes):
            assert client.command(f"MAIL FROM:<{SENDER}>")[0] == 250
            assert client.command(f"RCPT TO:<rcpt{number}@example.net>")[0] == 250
            assert client.command("DATA")[0] == 354
            client.send(
                f"From: <{SENDER}>\r\nTo: <rcpt{number}@example.net>\r\n"
                f"Subject: shape {number}\r\n\r\nbefore the shape".encode()
                + shape
                + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{VICTIM}>\r\nDATA\r\n"
                f"From: <ceo@sender.test>\r\nSubject: smuggled {number}\r\n\r\n"
                f"smuggled body\r\n".encode()
                + b".\r\n"
            )
            replies.append(client.read())
            # Had the shape ended the data, the smuggled MAIL, RCPT and DATA would each have
            # been answered too; the next command's reply must be the next thing we read.
            assert client.nothing_more() == b""
        assert client.command("QUIT")[0] == 221
        return replies
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_smtp_smuggling_shapes_never_split_a_message(
    relays: DeliveryRelays, postfix_sink: PostfixSink, tmp_path: Path
) -> None:
    """Nine end-of-data shapes: each message is answered once and relayed as one message to
    Postfix's smtp-sink (which is itself lenient about line ends, so a shape the relay passed
    on unescaped would show up there as a second transaction); nothing reaches the victim."""
    relay = await relays.start(
        f"sqlite:{tmp_path / 'smartrelay.db'}", {"routes": smtp_route(postfix_sink.port)}
    )
    replies = await deferToThread(smuggling_session, relay.smtp_port, SMUGGLING_SHAPES)
    accepted = [reply for reply in replies if reply[0] == 250]
    for shape, (code, text) in zip(SMUGGLING_SHAPES, replies, strict=True):
        assert code == 250 or (code == 550 and text.startswith("5.6.")), (shape, code, text)
    assert accepted, replies  # the bare-LF shapes are taken as ordinary line ends

    async def all_delivered() -> int | None:
        delivered = await count_events(relay.store, "delivered")
        return delivered if delivered >= len(accepted) else None

    await eventually(real_reactor(), all_delivered, "the accepted messages delivered")
    received = await deferToThread(postfix_sink.wait_for_messages, len(accepted))
    assert len(received) == len(accepted)
    dumps = postfix_sink.messages()
    assert len(dumps) == len(accepted), [d.recipients for d in dumps]
    for dumped in dumps:
        assert VICTIM not in dumped.recipients
        assert dumped.sender != SENDER  # VERP return path, never the smuggled MAIL FROM
        assert "smuggled body" in dumped.text  # the hidden transaction stayed body text
    assert VICTIM not in await recipient_states(relay.store)


def starttls_injection(port: int) -> dict[str, object]:
    """``STARTTLS`` and a pipelined command in one plaintext write, then the TLS session."""
    seen: dict[str, object] = {}
    client = Line(port)
    try:
        client.read()
        client.command("EHLO client.test")
        client.send(b"STARTTLS\r\nMAIL FROM:<injected@attacker.test>\r\n")
        seen["starttls"] = client.read()
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        tls = context.wrap_socket(client.sock, server_hostname="relay.test")
        tls.settimeout(TIMEOUT)
        reader = tls.makefile("rb")
        tls.sendall(b"NOOP\r\n")
        seen["first_in_tls"] = reader.readline()
        tls.sendall(b"MAIL FROM:<a@sender.test>\r\n")
        seen["mail_in_tls"] = reader.readline()
        tls.sendall(b"QUIT\r\n")
        reader.close()
        tls.close()
    finally:
        client.close()
    return seen


@pytest_twisted.ensureDeferred
async def test_starttls_command_injection_is_thrown_away(
    relays: DeliveryRelays, tmp_path: Path
) -> None:
    """CVE-2011-0411 class: what came in the clear after STARTTLS is never acted on inside
    TLS (the first reply there answers our NOOP, not the injected MAIL), and the session is
    reset (MAIL needs a new EHLO)."""
    relay = await relays.start(f"sqlite:{tmp_path / 'smartrelay.db'}", {"routes": {}})
    seen = await deferToThread(starttls_injection, relay.smtp_port)
    assert seen["starttls"] == (220, "2.0.0 Ready to start TLS")
    assert seen["first_in_tls"] == b"250 2.0.0 Ok\r\n"
    mail_reply = seen["mail_in_tls"]
    assert isinstance(mail_reply, bytes) and mail_reply.startswith(b"503 5.5.1"), mail_reply


def nested_message(depth: int) -> bytes:
    """A multipart nested ``depth`` deep with a linked HTML part at the bottom."""
    head = [f"From: <{SENDER}>", "To: <deep@example.net>", "Subject: deep", "MIME-Version: 1.0"]
    lines = ["\r\n".join(head)]
    for level in range(depth):
        lines.append(f'Content-Type: multipart/mixed; boundary="b{level}"\r\n\r\n--b{level}')
    lines.append(
        'Content-Type: text/html; charset="utf-8"\r\n\r\n'
        '<p><a href="https://example.org/deep">deep</a></p>'
    )
    for level in reversed(range(depth)):
        lines.append(f"--b{level}--")
    return ("\r\n".join(lines) + "\r\n").encode()


def many_headers_message(count: int) -> bytes:
    extra = "".join(f"X-Filler-{i}: value {i}\r\n" for i in range(count))
    return (
        f"From: <{SENDER}>\r\nTo: <headers@example.net>\r\nSubject: headers\r\n{extra}"
        'MIME-Version: 1.0\r\nContent-Type: text/html; charset="utf-8"\r\n\r\n'
        '<a href="https://example.org/h">x</a>\r\n'
    ).encode()


def many_parts_message(count: int) -> bytes:
    parts = "".join(
        f'--p\r\nContent-Type: text/html; charset="utf-8"\r\n\r\n'
        f'<a href="https://example.org/{i}">{i}</a>\r\n'
        for i in range(count)
    )
    return (
        f"From: <{SENDER}>\r\nTo: <parts@example.net>\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="p"\r\n\r\n{parts}--p--\r\n'
    ).encode()


def submit_raw(port: int, recipient: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=120) as client:
        client.ehlo()
        client.mail(SENDER)
        code, text = client.rcpt(recipient)
        assert code == 250, (code, text)
        return client.data(data)


@pytest.mark.parametrize(
    ("shape", "recipient", "build"),
    [
        ("2,000-deep multipart", "deep@example.net", lambda: nested_message(2000)),
        ("10,000 header fields", "headers@example.net", lambda: many_headers_message(10_000)),
        ("10,000 MIME parts", "parts@example.net", lambda: many_parts_message(10_000)),
    ],
)
@pytest_twisted.ensureDeferred
async def test_pathological_mime_is_accepted_and_delivered(
    relays: DeliveryRelays,
    postfix_sink: PostfixSink,
    tmp_path: Path,
    shape: str,
    recipient: str,
    build: object,
) -> None:
    """Deep nesting and huge header or part counts go through the whole re-wrap chain
    (tracking, VERP, DKIM-free here) to a real SMTP peer within a bounded time: no recursion
    error, no quadratic blow-up, no stuck row."""
    assert callable(build)
    data: bytes = build()
    relay = await relays.start(
        f"sqlite:{tmp_path / 'smartrelay.db'}", {"routes": smtp_route(postfix_sink.port)}
    )
    code, text = await deferToThread(submit_raw, relay.smtp_port, recipient, data)
    assert code == 250, (shape, code, text)

    async def final() -> str | None:
        state = (await recipient_states(relay.store)).get(recipient)
        return state if state in ("delivered", "bounced") else None

    state = await eventually(real_reactor(), final, f"the {shape} message delivered", within=120)
    assert state == "delivered", shape
    [queue_id] = await deferToThread(postfix_sink.wait_for_messages, 1, 60.0)
    assert queue_id == text.decode().rsplit(" ", 1)[-1]


# -- disk full ------------------------------------------------------------------------------
def send_numbered(port: int, numbers: range, body: str) -> dict[int, tuple[int, str]]:
    """One message per number in one session: {n: (code, text of the final reply)}."""
    replies = {}
    with smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=TIMEOUT) as client:
        client.ehlo()
        for n in numbers:
            client.mail(SENDER)
            client.rcpt(f"full{n}@example.net")
            code, text = client.data(
                f"From: <{SENDER}>\r\nSubject: disk {n}\r\n\r\n{body}\r\nEND {n}\r\n".encode()
            )
            replies[n] = (code, text.decode())
    return replies


def test_disk_full_is_451_and_recovers_by_itself(tmp_path: Path, postfix_sink: PostfixSink) -> None:
    """The disk fills under a running relay (its file-size limit is lowered from outside, so
    every write past the current end of a file fails as on a full disk): mail gets 451 4.x,
    never 250 for what was not stored, and when space is back the same process accepts and
    delivers again without a restart; every message that got 250 reaches the peer."""
    [smtp_port] = free_ports(1)
    url = f"sqlite:{tmp_path / 'relay.db'}"
    config = write_relay_config(
        tmp_path,
        url,
        extra=(
            "[delivery.routes]\n"
            f'"*" = "smtp://{HOST}:{postfix_sink.port}"\n'
            "[[delivery.throttle]]\n"
            'match = "*"\n'
            'max_rate = "100000/s"\n'
        ),
        smtp_listen=f"tcp:{smtp_port}:interface={HOST}",
    )
    body = "x" * 76 + "\r\n"
    server = Twistd(config, tmp_path)
    try:
        server.wait_for("smtp: listening on")
        server.wait_for("delivery: node")
        before = send_numbered(smtp_port, range(0, 5), body * 10)
        assert {code for code, _ in before.values()} == {250}, before
        wait_until(lambda: True if len(postfix_sink.messages()) >= 5 else None, "5 delivered", 30)
        # Every file the relay has open may not grow by more than a few bytes from now on.
        biggest = max(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
        hard = resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (biggest + 1, hard))
        # The database and its WAL may each still grow up to that limit, and a checkpoint lets
        # the WAL start over from its beginning: send more than both can hold together.
        big = body * 2000  # 156 KB
        count = (2 * biggest + (2 << 20)) // len(big) + 1
        full = send_numbered(smtp_port, range(5, 5 + count), big)
        refused = {n: reply for n, reply in full.items() if reply[0] != 250}
        assert refused, f"the disk never filled: {full}"
        for code, text in refused.values():
            assert code == 451 and text.startswith("4."), (code, text)
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (hard, hard))
        deadline = time.monotonic() + 30
        while True:  # space is back: the relay takes mail again by itself
            after = send_numbered(smtp_port, range(5 + count, 6 + count), body * 10)
            if after[5 + count][0] == 250 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert after[5 + count][0] == 250, after
        accepted = 5 + (len(full) - len(refused)) + 1

        def delivered() -> int | None:
            rows = query(url, "SELECT COUNT(*) FROM recipients WHERE state = 'delivered'")
            return int(rows[0][0]) if int(rows[0][0]) >= accepted else None

        wait_until(delivered, f"{accepted} accepted messages delivered", 60)
        assert server.process.poll() is None, server.output
        print(f"\ndisk full: {len(refused)} of {len(full)} refused with 451, then recovered")
    finally:
        server.kill()
    rows = query(url, "SELECT COUNT(*) FROM messages")
    assert int(rows[0][0]) == accepted  # nothing refused was stored
