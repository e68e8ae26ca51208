"""Memory against message size: N concurrent big messages through a real relay.

    .venv/bin/python bench/memory.py [--messages 10] [--size-mb 24] [--engine sqlite|postgresql]
        [--processes 1] [--keep]

The case of issue 11, item 7: ten clients each send one 24 MB message at the same time to
`twistd -n smartrelay` (SQLite by default; `--engine postgresql` uses a throwaway server from
tests/support/postgres.py), which relays them through the full re-wrap chain, with
`[delivery] processes = 1`, to Postfix's `smtp-sink`. The script prints, for the listener (the
twistd process) and the delivery child: RSS at rest before the clients start, and the peak
(VmHWM, the kernel's high-water mark, so no peak falls between samples), plus how long it took
until every message was delivered (the `delivered` events in the database).

The message is a multipart/mixed message: a short HTML part with a link (so the tracking
step has work) and a base64 attachment that makes up the size. It prints numbers; it is not a
test. To measure older code, put its checkout first on PYTHONPATH (the delivery child inherits
the environment).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg2  # noqa: E402

from tests.support.postgres import running_postgres  # noqa: E402

HOST = "127.0.0.1"
SENDER = "app@example.com"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, seconds: float, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited ({process.returncode}) before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {port} within {seconds} s")


def status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def delivery_child(pid: int) -> int | None:
    for child in children(pid):
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as cmdline:
            if b"smartrelay.delivery_process" in cmdline.read():
                return child
    return None


def build_message(size: int, number: int) -> bytes:
    rng = random.Random(number)
    raw = rng.randbytes(size * 3 // 4)
    encoded = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    head = (
        f"From: <{SENDER}>\r\nTo: <user{number}@example.net>\r\nSubject: big message {number}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        '<html><body><p>Your report: <a href="https://example.com/r">open</a></p></body></html>\r\n'
        "--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="report.bin"\r\n\r\n'
    ).encode()
    return head + encoded + b"--b1--\r\n"


def send(port: int, message: bytes, number: int, errors: list[str]) -> None:
    try:
        with smtplib.SMTP(HOST, port, local_hostname="bench.test", timeout=600) as client:
            client.ehlo()
            client.sendmail(SENDER, [f"user{number}@example.net"], message)
    except Exception as error:  # reported, not raised: the other clients go on
        errors.append(f"client {number}: {error}")


def delivered(engine: str, url: str) -> int:
    sql = "SELECT COUNT(*) FROM events WHERE type = 'delivered'"
    if engine == "sqlite":
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:"), timeout=30)) as db:
            return int(db.execute(sql).fetchone()[0])
    with contextlib.closing(psycopg2.connect(url)) as db, db.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
        return int(row[0]) if row else 0


@contextlib.contextmanager
def database(engine: str, directory: Path) -> Iterator[str]:
    if engine == "sqlite":
        yield f"sqlite:{directory / 'smartrelay.db'}"
        return
    with running_postgres(durable=True) as server:
        yield server.create_database()


def smtp_sink() -> str:
    found = shutil.which("smtp-sink") or shutil.which(
        "smtp-sink", path="/usr/sbin:/usr/lib/postfix/sbin"
    )
    if found is None:
        raise SystemExit("smtp-sink not found (apt-get install postfix, see MACHINE-NOTES)")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--size-mb", type=float, default=24.0)
    parser.add_argument("--engine", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    size = int(args.size_mb * 1024 * 1024)
    directory = Path(tempfile.mkdtemp(prefix="smartrelay-bench-memory-"))
    print(
        f"{args.messages} concurrent messages of {args.size_mb:g} MB, {args.engine},"
        f" [delivery] processes = {args.processes}; temp dir {directory}"
    )
    sink_port, smtp_port = free_port(), free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(
        [smtp_sink(), *user, f"{HOST}:{sink_port}", "1000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    relay: subprocess.Popen[bytes] | None = None
    try:
        wait_for_port(sink_port, 10, sink, "smtp-sink")
        with database(args.engine, directory) as url:
            var = directory / "var"
            config = directory / "smartrelay.toml"
            config.write_text(
                f'[server]\nhostname = "relay.test"\ndata_dir = {json.dumps(str(var))}\n'
                f"[database]\nurl = {json.dumps(url)}\n"
                f'[smtp]\nlisten = ["tcp:{smtp_port}:interface={HOST}"]\n'
                f'max_message_size = "{int(args.size_mb) + 2}MB"\n'
                f'[inbound]\nlisten = ["tcp:0:interface={HOST}"]\n'
                f"[rewrap]\nsecret_file = {json.dumps(str(var / 'secret.key'))}\n"
                f'[web]\nlisten = "tcp:0:interface={HOST}"\n'
                f"[delivery]\nprocesses = {args.processes}\n"
                f'[delivery.routes]\n"*" = "smtp://{HOST}:{sink_port}"\n'
                '[[delivery.throttle]]\nmatch = "*"\nmax_connections = 20\n'
                'max_rate = "100000/s"\n',
                encoding="utf-8",
            )
            log = open(directory / "twistd.log", "wb")  # noqa: SIM115
            relay = subprocess.Popen(
                [str(BIN / "twistd"), "-n", "smartrelay", "--config", str(config)],
                cwd=directory,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            wait_for_port(smtp_port, 60, relay, "twistd smartrelay")
            child = None
            deadline = time.monotonic() + 30
            while args.processes and child is None and time.monotonic() < deadline:
                child = delivery_child(relay.pid)
                time.sleep(0.2)
            time.sleep(2)  # settle: start-up done, nothing to do
            rest = (status_kib(relay.pid, "VmRSS"), status_kib(child, "VmRSS") if child else 0)
            messages = [build_message(size, n) for n in range(args.messages)]
            errors: list[str] = []
            threads = [
                threading.Thread(target=send, args=(smtp_port, m, n, errors))
                for n, m in enumerate(messages)
            ]
            del messages
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            accepted = time.monotonic() - started
            if errors:
                print("\n".join(errors))
            while delivered(args.engine, url) < args.messages - len(errors):
                if relay.poll() is not None:
                    raise SystemExit("the relay exited; see twistd.log")
                if time.monotonic() - started > 600:
                    raise SystemExit("not delivered within 10 minutes")
                time.sleep(0.2)
            done = time.monotonic() - started
            peak = (status_kib(relay.pid, "VmHWM"), status_kib(child, "VmHWM") if child else 0)
            mib = 1024.0
            print(f"accepted all in {accepted:.1f} s, delivered all in {done:.1f} s")
            print(f"{'process':<16}{'RSS at rest':>14}{'peak RSS':>12}")
            print(f"{'listener':<16}{rest[0] / mib:>11.0f} MB{peak[0] / mib:>9.0f} MB")
            if child:
                print(f"{'delivery child':<16}{rest[1] / mib:>11.0f} MB{peak[1] / mib:>9.0f} MB")
            relay.terminate()
            relay.wait(30)
            relay = None
    finally:
        if relay is not None:
            relay.kill()
            relay.wait()
        sink.kill()
        sink.wait()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
