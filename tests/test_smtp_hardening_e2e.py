"""Issue 11 (hardening), the SMTP listener over real sockets on 127.0.0.1.

Each test replays an attack against the whole relay running in-process (RelayService on the
test reactor); the clients are blocking sockets in threads. Deadlines in these tests are
short (1-2 s) and the margins generous (the machine is shared): what is proved is that a
connection is cut at all, and within a bounded time, not the exact moment.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from attrs import evolve
from twisted.internet.defer import Deferred

from smartrelay.smtp.session import Admitted
from smartrelay.smtp.tls import ensure_certificate
from tests.conftest import real_reactor
from tests.support.relay import HOST, HOSTNAME, Relays, RunningRelay, free_ports
from tests.test_smtp_e2e import (
    CLIENT_NAME,
    CREDENTIAL,
    PASSWORD,
    SENDER,
    RawClient,
    add_credential,
    in_thread,
    no_verify,
    nothing_stored,
)

#: How much later than its deadline a cut may come on a loaded machine.
MARGIN = 8.0


@pytest_twisted.async_yield_fixture
async def relays(tmp_path: Path, database_url: str) -> AsyncIterator[Relays]:
    runner = Relays(real_reactor(), tmp_path, database_url)
    try:
        yield runner
    finally:
        await runner.stop_all()


@pytest_twisted.async_yield_fixture
async def sqlite_relays(tmp_path: Path) -> AsyncIterator[Relays]:
    runner = Relays(real_reactor(), tmp_path, f"sqlite:{tmp_path / 'smartrelay.db'}")
    try:
        yield runner
    finally:
        await runner.stop_all()


def wait_for_close(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closes or aborts ``sock`` (reading and dropping any bytes)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def served(port: int, within: float = 10.0) -> bool:
    """Whether a new client gets the 220 greeting (retrying while slots are freed)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        client = RawClient(port)
        try:
            if client.read().code == 220:
                return True
        finally:
            client.close()
        time.sleep(0.1)
    return False


# -- item 2: STARTTLS (or implicit TLS) then silence ----------------------------------------------
@pytest_twisted.ensureDeferred
async def test_starttls_then_silence_is_cut_and_the_slots_are_freed(sqlite_relays: Relays) -> None:
    slots, deadline = 4, 2.0
    relay = await sqlite_relays.start({"max_connections": slots, "tls_handshake_timeout": "2s"})
    port = relay.smtp_port

    def attack() -> dict[str, Any]:
        stuck = []
        for _ in range(slots):
            client = RawClient(port)
            assert client.read().code == 220
            client.command(f"EHLO {CLIENT_NAME}")
            assert client.command("STARTTLS").text == "220 2.0.0 Ready to start TLS"
            stuck.append(client)  # ... and never starts the handshake
        started = time.monotonic()
        locked_out = RawClient(port)
        try:
            full = locked_out.read().text
        finally:
            locked_out.close()
        cut = [wait_for_close(c.sock, deadline + MARGIN + 5) for c in stuck]
        since_start = time.monotonic() - started
        for client in stuck:
            client.close()
        return {"full": full, "cut": cut, "since_start": since_start, "served": served(port)}

    seen = await in_thread(attack)
    assert seen["full"] == "421 4.3.2 Too many connections, try again later"
    assert seen["since_start"] < deadline + MARGIN, seen
    assert seen["served"]


@pytest_twisted.ensureDeferred
async def test_implicit_tls_silence_is_cut(sqlite_relays: Relays, tmp_path: Path) -> None:
    """An ``ssl:`` listener: a client that connects and never sends its ClientHello, or
    stops in the middle of it, is cut at tls_handshake_timeout."""
    material = ensure_certificate("", "", str(tmp_path / "certs"), HOSTNAME)
    (port,) = free_ports(1)
    listen = (
        f"ssl:{port}:interface={HOST}:privateKey={material.key_path}"
        f":certKey={material.certificate_path}"
    )
    await sqlite_relays.start(
        {"listen": [listen], "max_connections": 2, "tls_handshake_timeout": "2s"}
    )

    def attack() -> tuple[float, float, bool]:
        silent = socket.create_connection((HOST, port), 10)
        partial = socket.create_connection((HOST, port), 10)
        partial.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello record
        try:
            return (
                wait_for_close(silent, 2.0 + MARGIN + 5),
                wait_for_close(partial, 2.0 + MARGIN + 5),
                handshake_works(port),
            )
        finally:
            silent.close()
            partial.close()

    silent_cut, partial_cut, works = await in_thread(attack)
    assert silent_cut < 2.0 + MARGIN and partial_cut < 2.0 + MARGIN
    assert works  # the slots were given back: a real client is served


def handshake_works(port: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with (
                socket.create_connection((HOST, port), 10) as sock,
                no_verify().wrap_socket(sock) as tls,
            ):
                return tls.recv(100).startswith(b"220 ")
        except OSError:
            time.sleep(0.1)
    return False


@pytest_twisted.ensureDeferred
async def test_idle_tls_client_that_ignores_close_notify_is_cut(sqlite_relays: Relays) -> None:
    """After the idle timeout's 421 a TLS close waits for the client's close_notify; a client
    that never sends it is aborted after close_grace instead of holding its slot."""
    relay = await sqlite_relays.start({"idle_timeout": "1s", "max_connections": 1})
    factory = relay.service.submission
    assert factory is not None
    factory.settings = evolve(factory.settings, close_grace=2.0)
    port = relay.smtp_port

    def attack() -> tuple[bytes, float, bool]:
        client = RawClient(port)
        client.read()
        client.command(f"EHLO {CLIENT_NAME}")
        assert client.command("STARTTLS").code == 220
        tls = no_verify().wrap_socket(client.sock)
        received = b""
        tls.settimeout(1.0 + MARGIN)
        while not received.endswith(b"\r\n"):
            chunk = tls.recv(100)  # the 421; then the server's close_notify
            if not chunk:
                break
            received += chunk
        # Never answer close_notify (no unwrap): wait on the TCP connection itself.
        raw = socket.socket(fileno=os.dup(tls.fileno()))
        try:
            cut = wait_for_close(raw, 2.0 + MARGIN + 5)
        finally:
            raw.close()
            tls.close()
        return received, cut, served(port)

    received, cut, again = await in_thread(attack)
    assert received == b"421 4.4.2 Idle timeout, closing connection\r\n"
    assert cut < 2.0 + MARGIN
    assert again


# -- item 3: DATA one byte at a time --------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_trickled_data_is_cut_at_data_timeout_and_nothing_is_stored(relays: Relays) -> None:
    relay = await relays.start({"data_timeout": "2s"})

    def attack() -> tuple[str, float, bool]:
        client = RawClient(relay.smtp_port)
        try:
            client.read()
            client.command(f"EHLO {CLIENT_NAME}")
            assert client.command(f"MAIL FROM:<{SENDER}>").code == 250
            assert client.command("RCPT TO:<slow@example.net>").code == 250
            assert client.command("DATA").code == 354
            started = time.monotonic()
            while time.monotonic() - started < 2.0 + MARGIN + 5:
                client.sock.sendall(b"x")  # well inside any per-read timer
                readable, _, _ = select.select([client.sock], [], [], 0.3)
                if readable:
                    line = client.file.readline()
                    return line.decode(), time.monotonic() - started, client.closed_by_server()
            return "", time.monotonic() - started, False
        finally:
            client.close()

    reply, elapsed, closed = await in_thread(attack)
    assert reply == "421 4.4.2 DATA took too long, closing connection; message not accepted\r\n"
    assert 1.5 < elapsed < 2.0 + MARGIN
    assert closed
    await nothing_stored(relay.store)


# -- item 5: control characters in EHLO and the envelope ------------------------------------------
@pytest_twisted.ensureDeferred
async def test_control_characters_in_ehlo_and_envelope_are_refused(relays: Relays) -> None:
    relay = await relays.start()
    refused = "501 5.5.2 Control characters are not allowed in arguments"

    def attack() -> list[str]:
        client = RawClient(relay.smtp_port)
        try:
            client.read()
            replies = [
                # A lone CR: the Received header would get a forged line after it.
                client.command("EHLO evil\rAuthentication-Results: relay.test; dkim=pass").text,
                client.command("HELO evil\x00").text,
                client.command(f"EHLO {CLIENT_NAME}").text.split(" ")[0],
                client.command("MAIL FROM:<a\x1b[2J\x1b]0;pwned\x07@sender.test>").text,
                client.command("MAIL FROM:<a\u202eb@sender.test> SMTPUTF8").text,
                client.command(f"MAIL FROM:<{SENDER}>").text,
                client.command("RCPT TO:<r\x1b[31m@example.net>").text,
                client.command("RCPT TO:<r\r@example.net>").text,
                client.command("DATA").text,
            ]
            client.command("QUIT")
            return replies
        finally:
            client.close()

    replies = await in_thread(attack)
    assert replies == [
        refused,
        refused,
        "250",
        refused,
        refused,
        "250 2.1.0 Sender ok",
        refused,
        refused,
        "554 5.5.1 No valid recipients",
    ]
    await nothing_stored(relay.store)


# -- item 8: an overlong command line in several TCP writes ---------------------------------------
@pytest_twisted.ensureDeferred
async def test_long_line_in_several_writes_gets_one_reply(sqlite_relays: Relays) -> None:
    relay = await sqlite_relays.start()

    def attack() -> list[str]:
        client = RawClient(relay.smtp_port)
        try:
            client.read()
            client.command(f"EHLO {CLIENT_NAME}")
            client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # 4,500 bytes of one line in three writes, then its tail: a QUIT that must not run.
            for piece in (b"NOOP " + b"x" * 1500, b"x" * 1500, b"x" * 1500, b"QUIT\r\n"):
                client.send(piece)
                time.sleep(0.3)  # separate reads on the server
            answers = [client.command("NOOP").text]
            client.sock.settimeout(1.0)
            try:  # anything more (a second 500, a 221) would be here
                while extra := client.file.readline():
                    answers.append(extra.decode().strip())
            except TimeoutError:
                pass
            return answers
        finally:
            client.close()

    answers = await in_thread(attack)
    # The first read answer is the one for the long line; the NOOP's comes next.
    assert answers == ["500 5.5.2 Line too long", "250 2.0.0 Ok"], answers


# -- item 9: AUTH from many parallel sessions -----------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_parallel_sessions_cannot_bypass_the_auth_lockout(sqlite_relays: Relays) -> None:
    relay: RunningRelay = await sqlite_relays.start()
    await add_credential(relay)
    factory = relay.service.submission
    assert factory is not None
    backend = factory.backend
    checks: list[str] = []
    original = backend.check_credentials

    def counting(name: str, password: str) -> Deferred[bool | Admitted]:
        checks.append(password)
        return original(name, password)

    backend.check_credentials = counting  # type: ignore[method-assign]
    limit = factory.auth_limiter.max_failures
    sessions = 40
    wrong = base64.b64encode(f"\0{CREDENTIAL}\0wrong".encode()).decode()
    right = base64.b64encode(f"\0{CREDENTIAL}\0{PASSWORD}".encode()).decode()

    def attack() -> tuple[list[str], str]:
        clients = []
        for _ in range(sessions):
            client = RawClient(relay.smtp_port)
            client.read()
            client.command(f"EHLO {CLIENT_NAME}")
            assert client.command("STARTTLS").code == 220
            client.sock = no_verify().wrap_socket(client.sock)
            client.file = client.sock.makefile("rb")
            client.command(f"EHLO {CLIENT_NAME}")
            client.sock.settimeout(60)
            clients.append(client)
        for client in clients:  # all at once: every session has its AUTH under way
            client.send(f"AUTH PLAIN {wrong}\r\n".encode())
        answers = [client.read().text for client in clients]
        for client in clients:
            client.close()
        late = RawClient(relay.smtp_port)  # the right password, from the same address
        try:
            late.read()
            late.command(f"EHLO {CLIENT_NAME}")
            late.command("STARTTLS")
            late.sock = no_verify().wrap_socket(late.sock)
            late.file = late.sock.makefile("rb")
            late.command(f"EHLO {CLIENT_NAME}")
            return answers, late.command(f"AUTH PLAIN {right}").text
        finally:
            late.close()

    answers, late = await in_thread(attack)
    assert len(checks) <= limit, f"{len(checks)} password checks for {sessions} sessions"
    assert set(answers) <= {
        "535 5.7.8 Authentication credentials invalid",
        "421 4.7.0 Too many failed authentication attempts",
    }
    assert answers.count("421 4.7.0 Too many failed authentication attempts") >= sessions - limit
    assert late == "421 4.7.0 Too many failed authentication attempts"
