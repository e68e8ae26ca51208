"""The web listener's limits and headers, with real sockets (issue 11, items 4 and 17).

In-process: the connection cap, the idle timeout and the missing ``Server`` header on every
kind of response. Then the attack itself on a real ``twistd`` whose open-files limit is low:
more idle HTTP connections than the process has descriptors must not stop SMTP.
"""

from __future__ import annotations

import json
import resource
import smtplib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from twisted.web.static import Data

from smartrelay.listening import ListeningService
from smartrelay.web.service import MAX_REQUEST_BODY, ConnectionCap, web_service
from tests.conftest import real_reactor
from tests.support.relay import free_ports
from tests.support.run import running_twistd, write_config

HOST = "127.0.0.1"


class Boom(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        raise RuntimeError("an error inside a resource")


def resources() -> IResource:
    root = Resource()  # type: ignore[no-untyped-call]
    root.putChild(b"ok", Data(b"fine", "text/plain"))  # type: ignore[no-untyped-call]
    root.putChild(b"boom", Boom())  # type: ignore[no-untyped-call]
    return root


Start = Callable[..., Awaitable[ListeningService]]


@pytest_twisted.async_yield_fixture
async def start() -> AsyncIterator[Start]:
    started: list[ListeningService] = []

    async def start(**limits: float) -> ListeningService:
        fatal: list[str] = []
        service = web_service(
            real_reactor(),
            "tcp:0:interface=127.0.0.1",
            resources(),
            fatal.append,
            **limits,  # type: ignore[arg-type]
        )
        service.startService()
        started.append(service)
        assert fatal == [] and service.port is not None
        return service

    yield start
    for service in started:
        stopped = service.stopService()
        if stopped is not None:
            await stopped


def port_of(service: ListeningService) -> int:
    assert service.port is not None
    return int(service.port.getHost().port)  # type: ignore[attr-defined]


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection; everything the server sends until it closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n".encode()


def head_of(response: bytes) -> tuple[int, dict[bytes, bytes]]:
    head = response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    status = int(head[0].split()[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def closed_by_server(s: socket.socket, within: float, since: float | None = None) -> float | None:
    """Seconds until the server closed ``s`` (EOF or reset), counted from ``since`` (default:
    now), or None if it is still open ``within`` seconds from now."""
    began = time.monotonic() if since is None else since
    s.settimeout(within)
    try:
        data = s.recv(1)
    except TimeoutError:
        return None
    except ConnectionResetError:
        data = b""
    assert data == b"", data
    return time.monotonic() - began


# -- Server header (item 17) ------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_no_server_header_on_any_response(start: Start) -> None:
    port = port_of(await start())
    requests = {
        200: get("/ok"),
        404: get("/nowhere"),
        500: get("/boom"),
        400: b"NOT A REQUEST LINE AT ALL\r\n\r\n",
    }
    for expected, request in requests.items():
        response: bytes = await deferToThread(exchange, port, request)
        status, headers = head_of(response)
        assert status == expected, response
        assert b"server" not in headers, response
        assert b"TwistedWeb" not in response and b"Twisted" not in response, response


# -- connection cap and idle timeout (item 4) -------------------------------------------------
@contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(socket.create_connection((HOST, port), timeout=10))
            for _ in range(count)
        ]


@pytest_twisted.ensureDeferred
async def test_connections_past_the_cap_are_closed_at_once(start: Start) -> None:
    service = await start(max_connections=5, idle_timeout=60.0)
    port = port_of(service)
    cap = service.factory
    assert isinstance(cap, ConnectionCap)

    def scenario() -> None:
        with idle_connections(port, 5) as held:
            deadline = time.monotonic() + 10
            while cap.open_connections < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert cap.open_connections == 5
            with socket.create_connection((HOST, port), timeout=10) as extra:
                waited = closed_by_server(extra, within=10)
            assert waited is not None and waited < 5, waited
            assert all(closed_by_server(s, within=0.2) is None for s in held)  # still open
            held.pop().close()
            deadline = time.monotonic() + 10
            while cap.open_connections > 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            status, _ = head_of(exchange(port, get("/ok")))  # room again
            assert status == 200

    await deferToThread(scenario)
    assert cap.refused == 1


@pytest_twisted.ensureDeferred
async def test_idle_connections_are_closed_after_the_idle_timeout(start: Start) -> None:
    port = port_of(await start(idle_timeout=1.0))

    def scenario() -> tuple[float | None, float | None]:
        began = time.monotonic()
        with (
            socket.create_connection((HOST, port), timeout=10) as silent,
            socket.create_connection((HOST, port), timeout=10) as partial,
        ):
            partial.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n")  # a request never finished
            return (
                closed_by_server(silent, within=20, since=began),
                closed_by_server(partial, within=20, since=began),
            )

    silent, partial = await deferToThread(scenario)
    assert silent is not None and 0.5 < silent < 15, silent
    assert partial is not None and 0.5 < partial < 15, partial


# -- the attack on a real twistd --------------------------------------------------------------
FILES = 160  # the relay's open-files limit (soft and hard) in this test; 1,024 under systemd
IDLE_CLIENTS = 300  # well past it
WEB_CAP = 40


def low_files_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES))


def open_many(port: int, count: int) -> list[socket.socket]:
    """Up to ``count`` connections (a connect the server never accepts is given up)."""
    sockets = []
    for _ in range(count):
        with suppress(OSError):
            sockets.append(socket.create_connection((HOST, port), timeout=2))
    return sockets


def test_idle_http_connections_past_the_fd_limit_do_not_stop_smtp(tmp_path: Path) -> None:
    smtp_port, inbound_port, web_port = free_ports(3)
    var = tmp_path / "var"
    config = write_config(
        tmp_path,
        f"sqlite:{var / 'relay.db'}",
        f'[server]\nhostname = "relay.test"\ndata_dir = {json.dumps(str(var))}\n'
        f'[smtp]\nlisten = ["tcp:{smtp_port}:interface=127.0.0.1"]\n'
        f'[inbound]\nlisten = ["tcp:{inbound_port}:interface=127.0.0.1"]\n'
        f"[rewrap]\nsecret_file = {json.dumps(str(var / 'secret.key'))}\n"
        f'[web]\nlisten = "tcp:{web_port}:interface=127.0.0.1"\n'
        f'max_connections = {WEB_CAP}\nidle_timeout = "3s"\n'
        '[delivery.routes]\n"*" = "smtp://127.0.0.1:9"\n',  # nothing is delivered here
    )
    with running_twistd(config, tmp_path, preexec=low_files_limit) as server:
        server.wait_for("database ready", timeout=60)
        assert f"open files limit: {FILES}" in server.output
        idle = open_many(web_port, IDLE_CLIENTS)
        try:
            assert len(idle) >= FILES, len(idle)  # more than the relay has descriptors
            with smtplib.SMTP(HOST, smtp_port, timeout=15) as smtp:
                refused = smtp.sendmail(
                    "app@example.com",
                    ["user@example.net"],
                    b"Subject: still here\r\n\r\nSMTP works.\r\n",
                )
            assert refused == {}
            # The relay closed what it could not keep, and the rest after idle_timeout.
            waits = [closed_by_server(s, within=20) for s in idle]
            assert all(wait is not None for wait in waits)
        finally:
            for s in idle:
                s.close()
        status, headers = head_of(exchange(web_port, get("/nowhere")))
        assert status == 404 and b"server" not in headers
        assert "web: 40 connections open" in server.wait_for("[web] max_connections")
        assert "EMFILE" not in server.output and "Too many open files" not in server.output
    assert "Traceback" not in server.output, server.output


def test_open_files_soft_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    limit = FILES

    def soft_below_hard() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit // 2, limit))

    var = tmp_path / "var"
    config = write_config(
        tmp_path,
        f"sqlite:{var / 'relay.db'}",
        f"[server]\ndata_dir = {json.dumps(str(var))}\n"
        '[smtp]\nlisten = []\n[inbound]\nlisten = []\n[web]\nlisten = "tcp:0:interface=127.0.0.1"\n'
        f"[rewrap]\nsecret_file = {json.dumps(str(var / 'secret.key'))}\n",
    )
    with running_twistd(config, tmp_path, preexec=soft_below_hard) as server:
        line = server.wait_for("open files limit", timeout=60)
        assert line.endswith(f"open files limit raised from {limit // 2} to {limit}"), line
        with open(f"/proc/{server.process.pid}/limits") as limits:
            row = next(r for r in limits if r.startswith("Max open files"))
        assert row.split()[3:5] == [str(limit), str(limit)], row


# -- request body size --------------------------------------------------------------------
def post_head(length: int | None) -> bytes:
    size = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"POST /ok HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n" + size + b"\r\n\r\n"


def send_body(port: int, head: bytes, chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Send ``head`` then ``chunks`` until the server stops reading; (its answer, bytes sent)."""
    sent = 0
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(head)
        try:
            for chunk in chunks:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while data := s.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
    return answer, sent


def chunked(total: int) -> Iterator[bytes]:
    piece = b"x" * 65536
    for _ in range(total // len(piece)):
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_is_refused_at_once(start: Start) -> None:
    port = port_of(await start())
    limit = MAX_REQUEST_BODY
    # Announced too big: 413 before a byte of the body is read.
    answer, _ = await deferToThread(send_body, port, post_head(limit + 1), iter(()))
    assert head_of(answer)[0] == 413 and answer.endswith(b"The request is too big.\n")
    # Chunked, growing past the limit: 413 and the connection closed, long before 100 MB.
    answer, _ = await deferToThread(send_body, port, post_head(None), chunked(100 << 20))
    assert head_of(answer)[0] == 413
    # At the limit it is taken (the resource answers; Data gives 405 to a POST here).
    body = b"y" * limit
    answer, _ = await deferToThread(send_body, port, post_head(limit), iter((body,)))
    assert head_of(answer)[0] != 413
