"""Relay benchmark: acceptance (durable 250) and end-to-end delivery to a sink.

Starts Postfix's `smtp-sink` and `twistd smartrelay` with a temporary config routing `*` to
the sink (SQLite by default, or --database URL), drives it with S concurrent SMTP sessions
sending N messages in all (asyncio clients in this process), and prints accepted msg/s, the
DATA-dot -> 250 latency percentiles, and end-to-end msg/s (until every recipient has its
`delivered` event). The full re-wrap chain runs (VERP, List-Unsubscribe, open and click
tracking, DKIM RSA-2048 for the From domain).

    .venv/bin/python bench/accept.py --messages 5000 --sessions 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smartrelay.rewrap.dkim import generate_key  # noqa: E402

BODY = (
    b"From: app@example.com\r\nTo: user@example.net\r\nSubject: benchmark\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
    b"X-SmartRelay-Tag: bench\r\n\r\n"
    + b'<p>Hello <a href="https://example.com/x?a=1&amp;b=2">link</a></p>\r\n'
    * 70
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if not line.startswith(code):
            raise RuntimeError(f"expected {code!r}, got {line!r}")
        if line[3:4] == b" ":
            return


async def session(port: int, count: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await expect(reader, b"220")
    writer.write(b"EHLO bench.test\r\n")
    await expect(reader, b"250")
    for _ in range(count):
        writer.write(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n")
        await expect(reader, b"250")
        await expect(reader, b"250")
        await expect(reader, b"354")
        writer.write(BODY + b".\r\n")
        started = time.perf_counter()
        await expect(reader, b"250")
        latencies.append(time.perf_counter() - started)
    writer.write(b"QUIT\r\n")
    await expect(reader, b"221")
    writer.close()


async def drive(port: int, messages: int, sessions: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    per = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    started = time.perf_counter()
    await asyncio.gather(*(session(port, n, latencies) for n in per))
    return time.perf_counter() - started, latencies


def wait_for_port(port: int, deadline: float) -> None:
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("relay did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--database", default="", help="database URL (default: temp SQLite)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smartrelay-bench-") as tmp:
        port = free_port()
        sink_port = free_port()
        database = args.database or f"sqlite:{tmp}/bench.db"
        # The full re-wrap chain runs: VERP, List-Unsubscribe, tracking, DKIM RSA-2048.
        key_path, _ = generate_key("example.com", "bench", "rsa", f"{tmp}/dkim")
        config = Path(tmp) / "bench.toml"
        config.write_text(
            f'[server]\nhostname = "bench.test"\ndata_dir = "{tmp}"\n'
            f'[database]\nurl = "{database}"\n'
            f'[smtp]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
            "max_connections_per_client = 1000\n"
            f"[inbound]\nlisten = []\n"
            f'[delivery.routes]\n"*" = "smtp://127.0.0.1:{sink_port}"\n'
            f'[[delivery.throttle]]\nmatch = "*"\nmax_connections = 20\n'
            f'max_messages_per_connection = 1000\nmax_rate = "100000/s"\n'
            f'[[dkim.keys]]\ndomain = "example.com"\nselector = "bench"\n'
            f'private_key = "{key_path}"\n'
        )
        sink_cmd = ["smtp-sink", f"127.0.0.1:{sink_port}", "1000"]
        if os.geteuid() == 0:
            sink_cmd[1:1] = ["-u", "nobody"]
        sink = subprocess.Popen(sink_cmd)
        twistd = Path(sys.executable).parent / "twistd"
        relay = subprocess.Popen(
            [
                str(twistd),
                "-n",
                "--pidfile=",
                "-l",
                f"{tmp}/relay.log",
                "smartrelay",
                "--config",
                str(config),
            ],
            cwd=ROOT,
        )
        try:
            wait_for_port(port, time.time() + 20)
            cpu_before = _cpu_seconds(relay.pid)
            profiler = None
            if os.environ.get("BENCH_PYSPY"):
                command = ["py-spy", "record", "-p", str(relay.pid), "-f", "raw", "-r", "200"]
                profiler = subprocess.Popen(
                    [*command, "-o", os.environ["BENCH_PYSPY"]],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)
            started = time.perf_counter()
            elapsed, latencies = asyncio.run(drive(port, args.messages, args.sessions))
            delivered_after = wait_delivered(database, args.messages, started)
            cpu = _cpu_seconds(relay.pid) - cpu_before
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=30)
            rss = _rss_kib(relay.pid)
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(timeout=30)
            sink.terminate()
            sink.wait(timeout=10)
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    engine = database.split(":", 1)[0]
    print(f"engine={engine} messages={args.messages} sessions={args.sessions} size={len(BODY)}B")
    print(f"accepted: {args.messages / elapsed:,.0f} msg/s ({elapsed:.2f} s)")
    print(
        f"end to end (all delivered to the sink): {args.messages / delivered_after:,.0f} msg/s"
        f" ({delivered_after:.2f} s)"
    )
    print(
        f"DATA->250 latency ms: p50={p(0.5):.1f} p90={p(0.9):.1f} p99={p(0.99):.1f}"
        f" max={latencies[-1] * 1000:.1f} mean={statistics.mean(latencies) * 1000:.1f}"
    )
    print(
        f"relay peak RSS: {rss / 1024:.0f} MiB; relay CPU: {cpu:.2f} s"
        f" ({cpu / elapsed * 100:.0f}% of one core, {cpu / args.messages * 1e6:.0f} us/msg)"
    )


def count_delivered(database: str) -> int:
    if database.startswith("sqlite:"):
        import sqlite3

        with sqlite3.connect(database.removeprefix("sqlite:"), timeout=30) as db:
            return int(
                db.execute("SELECT COUNT(*) FROM events WHERE type = 'delivered'").fetchone()[0]
            )
    import psycopg2

    with psycopg2.connect(database) as db, db.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM events WHERE type = 'delivered'")
        row = cursor.fetchone()
        return int(row[0]) if row else 0


def wait_delivered(database: str, expected: int, started: float) -> float:
    """Seconds from ``started`` until every message has its delivered event."""
    deadline = time.time() + 600
    while time.time() < deadline:
        if count_delivered(database) >= expected:
            return time.perf_counter() - started
        time.sleep(0.05)
    raise SystemExit("not everything was delivered within 10 minutes")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
