"""``GET /api/events`` streaming a big database: events per second and the server's memory.

    .venv/bin/python bench/export_api.py [--events 1000000] [--engine sqlite|postgresql]
        [--keep FILE | --url URL] [--slow-seconds 5] [--generate-only]

Fills a database with ``--events`` events (bench/reports.py ``generate``, without its
roll-up; ``--keep FILE`` / ``--url URL`` reuse a database that holds them already), serves the
web root with the event API in a subprocess (``--serve``: the relay's own ``WebRoot`` and
``EventApi`` on a free loopback port, the relay's site), then streams all of them through
``http.client``: for ``--slow-seconds`` at about 160 KB/s (the server must wait, not buffer),
then as fast as it can read. The server's VmRSS is sampled from /proc every 0.2 s; printed:
before the request, the highest while slow and while fast, after, and VmHWM. Flat memory is
the claim. It prints numbers; it is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, succeed  # noqa: E402

from smartrelay.reactor import as_relay_reactor  # noqa: E402
from smartrelay.storage.api_tokens import generate_api_token  # noqa: E402
from smartrelay.storage.engines import create_engine  # noqa: E402
from smartrelay.storage.migrations import migrate  # noqa: E402
from smartrelay.storage.store import Store  # noqa: E402


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


async def count_events(reactor: Any, url: str) -> int:
    engine = create_engine(as_relay_reactor(reactor), url)
    await engine.start()
    try:
        await migrate(engine, 0)
        store = Store(engine, reactor)

        async def txn(cursor: Any) -> int:
            await cursor.execute("SELECT COUNT(*) FROM events")
            return int(cursor.fetchone()[0])

        return await store.run("count", txn, readonly=True)
    finally:
        await engine.close()


async def fill(reactor: Any, url: str, events: int) -> None:
    from reports import generate

    have = await count_events(reactor, url)
    if have >= events:
        print(f"database holds {have} events already", flush=True)
        return
    began = time.monotonic()
    made = await generate(
        url, messages=max(1, events // 10), events=events, reactor=reactor, roll_up=False
    )
    print(f"generated {made.events} events in {time.monotonic() - began:.1f} s", flush=True)


# -- the server (a subprocess) ---------------------------------------------------------------
async def serve(reactor: Any, url: str) -> None:
    from smartrelay.config import SuppressionConfig
    from smartrelay.tokens import TokenCodec, load_keyring
    from smartrelay.web.api import EventApi
    from smartrelay.web.service import web_service
    from smartrelay.web.site import WebRoot
    from smartrelay.web.tracking import Tracking

    relay_reactor = as_relay_reactor(reactor)
    engine = create_engine(relay_reactor, url)
    await engine.start()
    await migrate(engine, 0)
    store = Store(engine, reactor)
    token = generate_api_token()
    await store.add_api_token(f"bench-{os.getpid()}-{time.time_ns()}", token)
    with tempfile.TemporaryDirectory() as directory:
        codec = TokenCodec(load_keyring(os.path.join(directory, "secret.key")))
    tracking = Tracking(lambda: succeed(store), codec, reactor, SuppressionConfig())
    api = EventApi(lambda: succeed(store), reactor)
    service = web_service(
        relay_reactor,
        "tcp:0:interface=127.0.0.1",
        WebRoot(tracking, api=api).resource(),
        lambda reason: print(reason, file=sys.stderr),
    )
    service.startService()
    assert service.port is not None
    print(f"{service.port.getHost().port} {token}", flush=True)  # type: ignore[attr-defined]
    await Deferred()  # until killed


# -- the client ------------------------------------------------------------------------------
def stream(port: int, token: str, pid: int, slow_seconds: float) -> None:
    samples: list[tuple[float, int]] = []
    done = threading.Event()
    began = time.monotonic()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                samples.append((time.monotonic() - began, status(pid)["VmRSS"]))
            time.sleep(0.2)

    before = status(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("GET", "/api/events", headers={"Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    assert response.status == 200, (response.status, response.read(300))
    lines = 0
    slow_until = time.monotonic() + slow_seconds
    while time.monotonic() < slow_until:
        data = response.read(16 * 1024)
        if not data:
            break
        lines += data.count(b"\n")
        time.sleep(0.1)
    slow_end = time.monotonic() - began
    slow_lines = lines
    while True:
        data = response.read(256 * 1024)
        if not data:
            break
        lines += data.count(b"\n")
    total = time.monotonic() - began
    connection.close()
    time.sleep(2.0)
    done.set()
    sampler.join()
    after = status(pid)
    slow = [rss for t, rss in samples if t <= slow_end] or [0]
    fast = [rss for t, rss in samples if slow_end < t <= total] or [0]
    fast_seconds = total - slow_end
    print(f"events streamed: {lines} in {total:.1f} s", flush=True)
    print(f"  slow phase: {slow_lines} events in {slow_end:.1f} s (client reads ~160 KB/s)")
    print(
        f"  fast phase: {lines - slow_lines} events in {fast_seconds:.1f} s"
        f" = {(lines - slow_lines) / max(fast_seconds, 1e-9):,.0f} events/s"
    )
    print(f"server VmRSS before the request: {before['VmRSS'] / 1024:.1f} MB")
    print(f"server VmRSS max while slow:     {max(slow) / 1024:.1f} MB")
    print(f"server VmRSS max while fast:     {max(fast) / 1024:.1f} MB")
    print(f"server VmRSS after:              {after['VmRSS'] / 1024:.1f} MB")
    print(f"server VmHWM (peak, whole run):  {after['VmHWM'] / 1024:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--keep", help="SQLite: the database file, kept and reused")
    parser.add_argument("--url", help="an existing database, reused if filled")
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        task.react(lambda reactor: Deferred.fromCoroutine(serve(reactor, args.serve)))
        return
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url
        elif args.engine == "postgresql":
            from tests.support.postgres import running_postgres

            url = stack.enter_context(running_postgres()).create_database()
        elif args.keep:
            url = f"sqlite:{args.keep}"
        else:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="export-bench-"))
            url = f"sqlite:{os.path.join(directory, 'bench.db')}"
        try:
            task.react(lambda reactor: Deferred.fromCoroutine(fill(reactor, url, args.events)))
        except SystemExit as stop:  # react always ends by it; only a failure matters
            if stop.code:
                raise
        if args.generate_only:
            return
        server = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", url],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port, token = server.stdout.readline().split()
            stream(int(port), token, server.pid, args.slow_seconds)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


if __name__ == "__main__":
    main()
