"""Relay benchmark: Postfix vs SmartRelay (SQLite, then PostgreSQL), same message, same sink.

    make bench [BENCH_ARGS="--quick"]     # as root: Postfix insists on it
    make bench-queue                      # the queue run alone (about 6 minutes)
    .venv/bin/python bench/relay.py [--systems postfix,sqlite,postgresql|none] [--messages 5000]
        [--sessions 20] [--latency-messages 2000] [--latency-sessions 50] [--pg-fsync on|off]
        [--queue-run] [--queue-messages 100000] [--queue-next-hop refuse|defer] [--quick]
        [--keep]

Everything runs on loopback, one system at a time, each relaying to its own Postfix
`smtp-sink -c` (whose running counter this script reads from a pipe: the same count for every
system, and smtp-sink takes 12-27k msg/s here, far above what is measured):

* Postfix: a private instance (/etc/postfix copied to /tmp/smartrelay-bench-postfix/etc, its
  own queue beside it, smtpd on a free 127.0.0.1 port, `relayhost` = the sink), started with
  `postfix -c DIR start` and stopped after. Postfix's defaults are kept; what the script sets
  is printed (e.g. `default_destination_concurrency_limit` is 20, the same as SmartRelay's
  throttle here). The config directory has to be listed in /etc/postfix/main.cf's
  `alternate_config_directories`: the script adds it there once (and creates that file when the
  Debian package left it out).
* SmartRelay: `twistd smartrelay` with a temp config routing `*` to the sink, the full re-wrap
  chain (VERP, List-Unsubscribe, open and click tracking, DKIM RSA-2048 for example.com), on
  SQLite (WAL, synchronous=FULL), then on a throwaway PostgreSQL server (fsync on by default,
  as PostgreSQL ships; `--pg-fsync off` for the test suite's setting).

Every message is the same 5 KB multipart/alternative message (text, and HTML with 33 links), From
app@example.com (the DKIM-keyed domain), one recipient per message. After a warm-up (not
measured), for each system:

(a) throughput: `smtp-source -d` sends N messages over S sessions (one connection per session,
    a numbered recipient per message). accepted msg/s = N / smtp-source's wall time;
    end-to-end msg/s = N / (time from smtp-source's start until the sink has counted all N).
(b) latency: an asyncio client in this process (L sessions, M messages, PIPELINING) times each
    DATA-dot -> 250; p50 and p99.
(c) resources: peak RSS = the highest sum of VmRSS over the system's processes, sampled every
    second over the system's whole run (Postfix: `master` and all its children, i.e. smtpd,
    cleanup, qmgr, trivial-rewrite, smtp, anvil, postlogd...; SmartRelay: twistd and its children;
    the PostgreSQL server is a row of its own). Peak PSS is the same from
    /proc/PID/smaps_rollup, with pages shared between processes divided among them (the sum of
    RSS counts Postfix's shared libraries once per process). CPU s = user + system CPU of those
    processes during phase (a), children that exited included (their parent's cutime/cstime).
    Each system's phase (a) line also says how busy the whole machine was (/proc/stat: other
    work on the machine shows there) and the CPU this script used itself.

The queue run (`--queue-run`) shows SmartRelay's memory against its queue size: SmartRelay on
SQLite, its route pointing at a closed port (connection refused; `--queue-next-hop defer`: a
sink answering 4xx to DATA, which costs a re-wrap per attempt and takes about twice as long), so
everything stays queued and is retried on the default schedule (1m, 5m, ...). `smtp-source`
injects --queue-messages in ten steps; after each, and every 10 s for --queue-settle seconds
after the last, it prints the relay's VmRSS and VmHWM, the recipients queued and the deferrals
so far (from the database). BENCH_PYSPY=PREFIX records each SmartRelay process with py-spy
during phase (a).

The relay logs (twistd, Postfix's maillog, PostgreSQL's) are checked for errors after each
system; `--keep` keeps them (and everything else) in the temp dir. Ctrl-C stops everything.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import functools
import io
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg2  # noqa: E402
import twisted  # noqa: E402

from smartrelay import __version__ as smartrelay_version  # noqa: E402
from smartrelay.rewrap.dkim import generate_key  # noqa: E402
from tests.support.postgres import (  # noqa: E402
    PostgresServer,
    PostgresUnavailable,
    find_bindir,
    running_postgres,
)

HOST = "127.0.0.1"
SENDER = "app@example.com"
RECIPIENT = "user@example.net"
HELO = "bench.test"
POSTFIX_DIR = Path(tempfile.gettempdir()) / "smartrelay-bench-postfix"
SAMPLE_INTERVAL = 1.0  # a sample of Postfix's ~130 processes takes ~30 ms of CPU
THROTTLE_CONNECTIONS = 20  # SmartRelay's per-destination connections; Postfix's default is 20


def throttle_connections(delivery_processes: int) -> int:
    """Per process: throttles apply in each delivery process, the total stays 20."""
    return max(1, THROTTLE_CONNECTIONS // max(1, delivery_processes))


class BenchError(Exception):
    """A system under test failed; the message says how (one line)."""


# -- the message -----------------------------------------------------------------------------


def build_message() -> bytes:
    """About 5 KB: multipart/alternative, a text part and an HTML part with 33 links (LF line
    ends; smtp-source -F sends each line with CRLF)."""
    products = [
        ("Trail running shoes", "shoes-trail-42"),
        ("Merino wool socks (3 pairs)", "socks-merino-3"),
        ("Insulated water bottle", "bottle-750"),
        ("Headlamp 400 lm", "headlamp-400"),
        ("Packable rain jacket", "jacket-rain-m"),
        ("Running belt", "belt-run"),
        ("Sports sunglasses", "sunglasses-sport"),
        ("Energy gels (12)", "gels-12"),
        ("Compression sleeves", "sleeves-l"),
        ("GPS watch strap", "strap-gps"),
    ]
    text = [
        "Hello Alex,",
        "",
        "Your order 2026-118734 has shipped and should arrive on Thursday.",
        "",
        *(f"- {name}: https://shop.example.com/p/{slug}" for name, slug in products),
        "",
        "Track your parcel: https://shop.example.com/track/2026-118734",
        "Manage your e-mail preferences: https://shop.example.com/account/email",
        "",
        "Thank you for shopping with us.",
    ]
    rows = []
    for index, (name, slug) in enumerate(products):
        rows += [
            "<tr>",
            f'  <td><a href="https://shop.example.com/p/{slug}?utm_source=email&amp;'
            f'utm_campaign=shipping&amp;pos={index}">View</a></td>',
            f'  <td><a href="https://shop.example.com/p/{slug}?utm_source=email">{name}</a></td>',
            f'  <td><a href="https://shop.example.com/review/{slug}">Write a review</a></td>',
            "</tr>",
        ]
    html = [
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Your order has shipped</title>',
        "</head><body>",
        '<table width="600" cellpadding="4" style="font-family:Arial,sans-serif">',
        '<tr><td colspan="3"><h1>Your order has shipped</h1><p>Hello Alex, your order'
        " <b>2026-118734</b> is on its way and should arrive on Thursday.</p>",
        '<p><a href="https://shop.example.com/track/2026-118734">Track your parcel</a></p>'
        "</td></tr>",
        *rows,
        '<tr><td colspan="3"><p style="font-size:11px">'
        '<a href="https://shop.example.com/account/email">E-mail preferences</a> | '
        '<a href="https://shop.example.com/help">Help</a></p></td></tr>',
        "</table></body></html>",
    ]
    boundary = "=_bench_boundary_7f3a"
    lines = [
        "From: Example Shop <app@example.com>",
        "To: <user@example.net>",
        "Subject: Your order 2026-118734 has shipped",
        "Date: Mon, 23 Nov 2026 12:00:00 +0000",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/alternative; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 7bit",
        "",
        *text,
        f"--{boundary}",
        "Content-Type: text/html; charset=utf-8",
        "Content-Transfer-Encoding: 7bit",
        "",
        *html,
        f"--{boundary}--",
    ]
    assert not any(line.startswith(".") or len(line) > 990 for line in lines)
    return ("\n".join(lines) + "\n").encode()


# -- tools and the machine -------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    postfix: str
    postconf: str
    smtp_source: str
    smtp_sink: str
    pg_bindir: str


def find_tool(name: str) -> str | None:
    """Like tests/support/postfix.py: Debian puts Postfix's tools in /usr/sbin, often off PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/lib/postfix/sbin")


def find_tools(systems: Sequence[str], queue_run: bool) -> Tools:
    """Every tool the chosen runs need, or one clear line (BenchError) on what is missing."""
    if "postfix" in systems and os.geteuid() != 0:
        raise BenchError(
            "the Postfix run needs root (postfix -c DIR start); run as root, or choose"
            " --systems sqlite,postgresql"
        )
    missing = []
    found: dict[str, str] = {}
    needed = ["smtp-source", "smtp-sink", "postconf"]
    if "postfix" in systems:
        needed.append("postfix")
    for name in needed:
        path = find_tool(name)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if "postfix" in systems and not shutil.which("script"):
        missing.append("script (util-linux)")
    bindir = ""
    if "postgresql" in systems:
        try:
            bindir = find_bindir()
        except PostgresUnavailable:
            missing.append("initdb/pg_ctl (PostgreSQL server)")
    if missing:
        raise BenchError(
            f"missing {', '.join(missing)}: install the packages .ci/run installs"
            " (postfix, postgresql)"
        )
    return Tools(
        postfix=found.get("postfix", ""),
        postconf=found["postconf"],
        smtp_source=found["smtp-source"],
        smtp_sink=found["smtp-sink"],
        pg_bindir=bindir,
    )


def machine_lines(tools: Tools) -> list[str]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    postfix_version = _output([tools.postconf, "-dh", "mail_version"]) or "?"
    pg_version = ""
    if tools.pg_bindir:
        pg_version = _output([os.path.join(tools.pg_bindir, "postgres"), "--version"])
    return [
        f"machine: {os.cpu_count()} CPUs ({model}), {_mem_total_gib():.0f} GiB RAM,"
        f" Linux {platform.release()}",
        f"software: Python {platform.python_version()}, Twisted {twisted.__version__},"
        f" SmartRelay {smartrelay_version} (git {git_commit()}), Postfix {postfix_version},"
        f" SQLite {sqlite3.sqlite_version}" + (f", {pg_version}" if pg_version else ""),
        "command: " + shlex.join([sys.executable, *sys.argv]),
    ]


@functools.cache
def git_commit() -> str:
    """The checkout's commit at the start of the run (the relay runs this checkout's code)."""
    result = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else "not a git checkout"


def _mem_total_gib() -> float:
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _output(command: Sequence[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except OSError:
        return ""
    return result.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, seconds: float, alive: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"{what} exited while starting")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} is not listening on {HOST}:{port} after {seconds:.0f} s")


# -- /proc: processes, CPU, memory -----------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (field 3, the state, is index 0)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(roots: Sequence[int]) -> list[int]:
    """``roots`` (those alive) and all their descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree: list[int] = []
    todo = [pid for pid in roots if os.path.exists(f"/proc/{pid}")]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of ``root`` and its live descendants, plus what the children they
    reaped used (cutime/cstime): a child that exits moves its time into its parent's."""
    ticks = 0
    for pid in process_tree([root]):
        fields = _stat(pid)
        if fields is not None:
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[int, int, int]:
    """Jiffies since boot over all CPUs: (busy, iowait, total), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy, iowait, busy + idle + iowait


def machine_usage(before: tuple[int, int, int]) -> str:
    """How busy the whole machine was since ``before`` (anything else running shows here)."""
    busy, iowait, total = (now - then for now, then in zip(machine_cpu(), before, strict=True))
    if total <= 0:
        return "machine ?"
    return f"machine ({os.cpu_count()} CPUs) {busy / total:.0%} busy, {iowait / total:.0%} iowait"


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM), 0 if the process is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


class MemorySampler:
    """Every SAMPLE_INTERVAL, sums VmRSS and PSS over each named group's process trees and
    keeps the peaks. A group's roots are looked up each time (a pid file may appear late)."""

    def __init__(self) -> None:
        self._groups: dict[str, Callable[[], list[int]]] = {}
        self.peak_rss_kib: dict[str, int] = {}
        self.peak_pss_kib: dict[str, int] = {}
        self.processes: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._lock = threading.Lock()

    def watch(self, name: str, roots: Callable[[], list[int]]) -> None:
        with self._lock:
            self._groups[name] = roots
            self.peak_rss_kib.setdefault(name, 0)
            self.peak_pss_kib.setdefault(name, 0)
            self.processes.setdefault(name, 0)
        if not self._thread.is_alive():
            self._thread.start()

    def sample(self) -> None:
        with self._lock:
            groups = list(self._groups.items())
        for name, roots in groups:
            pids = process_tree(roots())
            rss = sum(status_kib(pid, "VmRSS") for pid in pids)
            pss = sum(pss_kib(pid) for pid in pids)
            self.peak_rss_kib[name] = max(self.peak_rss_kib[name], rss)
            self.peak_pss_kib[name] = max(self.peak_pss_kib[name], pss)
            self.processes[name] = max(self.processes[name], len(pids))

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # nice 19, this thread only (Linux)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


# -- the sink --------------------------------------------------------------------------------


class CountingSink:
    """``smtp-sink -c`` on a free port: its running counter ("sess=N quit=N mesg=N", one per
    event, CR-separated) is read from a pipe by a thread, which notes when each count arrived."""

    def __init__(self, tools: Tools, options: Sequence[str] = ()) -> None:
        self.port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [tools.smtp_sink, *user, "-c", *options, f"{HOST}:{self.port}", "1024"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.count = 0
        self.last_change = 0.0  # perf_counter() when the count last changed
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="sink-counter", daemon=True)
        self._reader.start()
        try:
            wait_for_port(self.port, 10, lambda: self.process.poll() is None, "smtp-sink")
        except BenchError as error:
            self.stop()
            raise BenchError(f"{error}: {self.errors()}") from None

    def errors(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()[-500:]

    _COUNTER = re.compile(rb"sess=\d+ quit=\d+ mesg=(\d+)\r")

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            now = time.perf_counter()
            tail = (tail + chunk)[-200:]
            found = self._COUNTER.findall(tail)
            if found:
                count = found[-1]
                with self._changed:
                    if int(count) != self.count:
                        self.count = int(count)
                        self.last_change = now
                        self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, count: int, seconds: float) -> float:
        """perf_counter() time at which the sink's count reached ``count``."""
        deadline = time.monotonic() + seconds
        with self._changed:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise BenchError(
                        f"the sink has {self.count} of {count} messages after {seconds:.0f} s"
                    )
                self._changed.wait(min(left, 1.0))
            return self.last_change

    def stop(self) -> None:
        stop_process(self.process, signal.SIGTERM, 10)
        self._reader.join(timeout=5)
        self._stderr.close()


def stop_process(process: subprocess.Popen[bytes], sig: int, seconds: float) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- load: smtp-source and the latency client -------------------------------------------------


def smtp_source(tools: Tools, port: int, message_file: Path, messages: int, sessions: int) -> float:
    """Sends ``messages`` over ``sessions`` connections; returns its wall time in seconds."""
    # -d: each session keeps its connection for its next message; -N: a numbered recipient
    # per message (1user@example.net, 2user@...), as real mail has.
    command = [tools.smtp_source, "-d", "-N", "-s", str(sessions), "-m", str(messages)]
    command += ["-M", HELO, "-f", SENDER, "-t", RECIPIENT, "-F", str(message_file)]
    command.append(f"{HOST}:{port}")
    started = time.perf_counter()
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise BenchError(f"smtp-source failed: {lines[-1] if lines else result.returncode}")
    return elapsed


async def _expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise BenchError("the server closed the connection")
        if not line.startswith(code):
            raise BenchError(f"expected {code.decode()}, got {line.decode(errors='replace')!r}")
        if line[3:4] == b" ":
            return


async def _latency_session(port: int, body: bytes, numbers: range, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await _expect(reader, b"220")
        writer.write(f"EHLO {HELO}\r\n".encode())
        await _expect(reader, b"250")
        for number in numbers:
            writer.write(
                f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<user{number}@example.net>\r\nDATA\r\n".encode()
            )
            await _expect(reader, b"250")
            await _expect(reader, b"250")
            await _expect(reader, b"354")
            writer.write(body + b".\r\n")
            started = time.perf_counter()
            await _expect(reader, b"250")
            latencies.append(time.perf_counter() - started)
        writer.write(b"QUIT\r\n")
        await _expect(reader, b"221")
    finally:
        writer.close()


async def _latency_run(port: int, body: bytes, messages: int, sessions: int) -> list[float]:
    latencies: list[float] = []
    shares = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    starts = [sum(shares[:i]) for i in range(sessions)]
    await asyncio.gather(
        *(
            _latency_session(port, body, range(start, start + share), latencies)
            for start, share in zip(starts, shares, strict=True)
            if share
        )
    )
    return latencies


def latency_client(port: int, body: bytes, messages: int, sessions: int) -> list[float]:
    """DATA-dot -> 250 times in seconds, sorted."""
    crlf = body.replace(b"\n", b"\r\n")
    return sorted(asyncio.run(_latency_run(port, crlf, messages, sessions)))


def percentile(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


# -- systems under test ----------------------------------------------------------------------


@dataclass
class Result:
    system: str
    accepted: float | None = None  # msg/s
    e2e: float | None = None  # msg/s
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_mib: float | None = None
    pss_mib: float | None = None
    cpu_s: float | None = None
    db_cpu_s: float | None = None  # the PostgreSQL server's, during phase (a)
    processes: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Settings:
    messages: int
    sessions: int
    latency_messages: int
    latency_sessions: int
    warmup: int
    timeout: float
    message_file: Path
    message: bytes
    keep: bool
    delivery_processes: int = 0


class System(abc.ABC):
    """A relay under test: started, listening on ``port``, relaying to the sink."""

    name = ""
    port = 0

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def roots(self) -> list[int]:
        """Pids whose process trees are the system (for memory and CPU)."""

    def db_roots(self) -> list[int]:
        """The database server's pids, if it is a process of its own."""
        return []

    def check_logs(self) -> list[str]:
        """Errors and warnings found in the system's logs (a summary and the first few)."""
        return []


def _problem_lines(
    path: Path, pattern: re.Pattern[str], what: str, ignore: re.Pattern[str] | None = None
) -> list[str]:
    """A count of the lines matching ``pattern`` (but not ``ignore``) and the first five."""
    found: list[str] = []
    count = 0
    with contextlib.suppress(OSError), open(path, errors="replace") as log:
        for line in log:
            if pattern.search(line) and not (ignore and ignore.search(line)):
                count += 1
                if len(found) < 5:
                    found.append("    " + line.rstrip()[:300])
    if not count:
        return []
    return [f"{what}: {count} problem line(s) in {path}", *found]


class PostfixSystem(System):
    name = "Postfix"

    def __init__(self, tools: Tools, sink_port: int) -> None:
        self.tools = tools
        self.sink_port = sink_port
        self.dir = POSTFIX_DIR
        self.conf = POSTFIX_DIR / "etc"  # config_directory; the queue is beside it, not in it
        self.port = free_port()
        self.settings: dict[str, str] = {}

    def _postfix(self, action: str) -> subprocess.CompletedProcess[str]:
        # Postfix reports start-up errors on the terminal only (or in the maillog): `script`
        # gives it one, so they show up here.
        command = f"{shlex.quote(self.tools.postfix)} -c {shlex.quote(str(self.conf))} {action}"
        return subprocess.run(
            ["script", "-eqc", command, "/dev/null"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def master_pid(self) -> int | None:
        try:
            pid = int((self.dir / "q" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if os.path.exists(f"/proc/{pid}") else None

    def roots(self) -> list[int]:
        pid = self.master_pid()
        return [pid] if pid else []

    def _allow_config_directory(self) -> None:
        """List our config directory in /etc/postfix/main.cf's alternate_config_directories
        (Postfix refuses any other); idempotent, other content untouched."""
        main_cf = Path("/etc/postfix/main.cf")
        if not main_cf.exists():  # the Debian package installed with "No configuration"
            main_cf.write_text(
                "# Created by SmartRelay's bench/relay.py for alternate_config_directories\n"
            )
            main_cf.chmod(0o644)
        current = subprocess.run(
            [self.tools.postconf, "-h", "alternate_config_directories"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        entries = [entry for entry in re.split(r"[\s,]+", current) if entry]
        if str(self.conf) in entries:
            return
        value = ", ".join([*entries, str(self.conf)])
        subprocess.run(
            [self.tools.postconf, "-e", f"alternate_config_directories = {value}"],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        if self.dir.exists():
            if self.master_pid() is not None:
                raise BenchError(
                    f"a Postfix from an earlier run still runs in {self.dir}:"
                    f" postfix -c {self.conf} stop"
                )
            shutil.rmtree(self.dir)
        self.dir.mkdir()
        shutil.copytree("/etc/postfix", self.conf)
        (self.dir / "q").mkdir()
        (self.dir / "data").mkdir()
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.dir / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        # Postfix's defaults, but for what a private loopback instance needs. Nothing here
        # tunes throughput: default_destination_concurrency_limit stays 20 (= SmartRelay's
        # throttle), the connection cache stays on demand, in_flow_delay stays 1s.
        main_cf = {
            "compatibility_level": "3.6",
            "queue_directory": f"{self.dir}/q",
            "data_directory": f"{self.dir}/data",
            "myhostname": "postfix.bench.test",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mydestination": "",
            "relayhost": f"[{HOST}]:{self.sink_port}",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "maillog_file": f"{self.dir}/maillog",
            "maillog_file_prefixes": "/tmp, /var",
        }
        (self.conf / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in main_cf.items())
        )
        master_cf = (self.conf / "master.cf").read_text()
        master_cf, replaced = re.subn(
            r"(?m)^smtp\s+inet\s.*$", f"{HOST}:{self.port} inet n - n - - smtpd", master_cf
        )
        if replaced != 1:
            raise BenchError("no 'smtp inet' line in /etc/postfix/master.cf")
        (self.conf / "master.cf").write_text(master_cf)
        self._allow_config_directory()
        result = self._postfix("start")
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip().replace("\r", "")
            raise BenchError(f"postfix -c {self.conf} start failed: {output}")
        wait_for_port(self.port, 30, lambda: True, "Postfix smtpd")
        names = [
            "default_destination_concurrency_limit",
            "smtp_connection_cache_on_demand",
            "in_flow_delay",
            "default_process_limit",
            "qmgr_message_active_limit",
        ]
        values = _output([self.tools.postconf, "-c", str(self.conf), *names])
        self.settings = dict(line.split(" = ", 1) for line in values.splitlines() if " = " in line)

    def stop(self) -> None:
        if not self.dir.exists():
            return
        master = self.master_pid()
        if master is not None:
            tree = process_tree([master])
            self._postfix("stop")
            deadline = time.monotonic() + 20
            while self.master_pid() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.master_pid() is not None:
                self._postfix("abort")
                time.sleep(1)
            for pid in tree:  # what outlived master (nothing, normally)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def cleanup(self, keep: bool) -> None:
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def check_logs(self) -> list[str]:
        pattern = re.compile(r"\b(warning|error|fatal|panic):")
        return _problem_lines(self.dir / "maillog", pattern, "Postfix maillog")


class RelaySystem(System):
    def __init__(
        self,
        name: str,
        tools: Tools,
        sink_port: int,
        database: str,
        tmp: Path,
        db_roots: Callable[[], list[int]] | None = None,
        delivery_processes: int = 0,
    ) -> None:
        self.name = name
        self.delivery_processes = delivery_processes
        self._db_roots = db_roots
        self.tools = tools
        self.sink_port = sink_port
        self.database = database
        self.tmp = tmp
        self.port = free_port()
        self.log = tmp / "relay.log"
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        key_path, _ = generate_key("example.com", "bench", "rsa", str(self.tmp / "dkim"))
        web_port = free_port()
        return (
            f'[server]\nhostname = "relay.bench.test"\ndata_dir = "{self.tmp}"\n'
            f'[database]\nurl = "{self.database}"\n'
            f'[smtp]\nlisten = ["tcp:{self.port}:interface={HOST}"]\n'
            "max_connections_per_client = 1000\n"
            '[inbound]\nlisten = []\nreturn_path_domain = "bounces.example.com"\n'
            f'[rewrap]\nsecret_file = "{self.tmp}/secret.key"\n'
            f'[web]\nlisten = "tcp:{web_port}:interface={HOST}"\n'
            f'base_url = "http://{HOST}:{web_port}"\n'
            f"[delivery]\nprocesses = {self.delivery_processes}\n"
            f'[delivery.routes]\n"*" = "smtp://{HOST}:{self.sink_port}"\n'
            f'[[delivery.throttle]]\nmatch = "*"\n'
            f"max_connections = {throttle_connections(self.delivery_processes)}\n"
            'max_messages_per_connection = 1000\nmax_rate = "100000/s"\n'
            '[[dkim.keys]]\ndomain = "example.com"\nselector = "bench"\n'
            f'private_key = "{key_path}"\nalgorithm = "rsa-sha256"\n'
        )

    def start(self) -> None:
        config = self.tmp / "relay.toml"
        config.write_text(self.config())
        twistd = Path(sys.executable).parent / "twistd"
        command = [str(twistd), "-n", "--pidfile=", "-l", str(self.log)]
        self.process = subprocess.Popen(
            [*command, "smartrelay", "--config", str(config)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        process = self.process
        wait_for_port(self.port, 60, lambda: process.poll() is None, "twistd smartrelay")

    def stop(self) -> None:
        # SIGTERM: a background process of a non-interactive shell ignores SIGINT.
        if self.process is not None:
            stop_process(self.process, signal.SIGTERM, 30)

    def roots(self) -> list[int]:
        return [self.process.pid] if self.process and self.process.poll() is None else []

    def db_roots(self) -> list[int]:
        return self._db_roots() if self._db_roots is not None else []

    def check_logs(self) -> list[str]:
        pattern = re.compile(r"#(error|critical|warn)\]|Traceback|Unhandled")
        expected = re.compile(r"no TLS certificate configured")  # no [smtp] tls_certificate
        return _problem_lines(self.log, pattern, "twistd log", ignore=expected)

    def delivered(self) -> int:
        """``delivered`` events in the relay's database (cross-check of the sink's count)."""
        return count_events(self.database, "delivered")


def count_events(database: str, event_type: str) -> int:
    query = "SELECT COUNT(*) FROM events WHERE type = %s"
    if database.startswith("sqlite:"):
        with contextlib.closing(sqlite3.connect(database.removeprefix("sqlite:"), 30)) as db:
            return int(db.execute(query.replace("%s", "?"), (event_type,)).fetchone()[0])
    with contextlib.closing(psycopg2.connect(database)) as connection:
        cursor = connection.cursor()
        cursor.execute(query, (event_type,))
        row = cursor.fetchone()
        return int(row[0]) if row else 0


def measure(
    system: System,
    sink: CountingSink,
    sampler: MemorySampler,
    settings: Settings,
    tools: Tools,
    result: Result,
) -> None:
    """Phases (a) and (b) against a started system; fills ``result``."""
    sampler.watch(system.name, system.roots)
    if settings.warmup:
        smtp_source(tools, system.port, settings.message_file, settings.warmup, settings.sessions)
        sink.wait_for(settings.warmup, settings.timeout)
    time.sleep(0.5)  # the relays' deliveries of the warm-up end; idle connections stay

    # (a) throughput
    profilers = start_profilers(system)
    try:
        base = sink.count
        cpu_before = sum(tree_cpu_seconds(pid) for pid in system.roots())
        db_cpu_before = sum(tree_cpu_seconds(pid) for pid in system.db_roots())
        machine_before = machine_cpu()
        own_before = time.process_time()
        started = time.perf_counter()
        accepted = smtp_source(
            tools, system.port, settings.message_file, settings.messages, settings.sessions
        )
        reached = sink.wait_for(base + settings.messages, settings.timeout)
        result.cpu_s = sum(tree_cpu_seconds(pid) for pid in system.roots()) - cpu_before
        usage = machine_usage(machine_before)
        own = time.process_time() - own_before
        if system.db_roots():
            db_cpu = sum(tree_cpu_seconds(pid) for pid in system.db_roots())
            result.db_cpu_s = db_cpu - db_cpu_before
    finally:
        for profiler in profilers:
            stop_process(profiler, signal.SIGINT, 60)  # py-spy writes its file on SIGINT
    result.accepted = settings.messages / accepted
    result.e2e = settings.messages / (reached - started)
    print(
        f"  {system.name}: accepted {result.accepted:,.0f} msg/s ({accepted:.2f} s),"
        f" end to end {result.e2e:,.0f} msg/s ({reached - started:.2f} s),"
        f" CPU {result.cpu_s:.1f} s; {usage}; this script {own:.1f} s CPU"
    )

    # (b) latency
    time.sleep(0.5)
    base = sink.count
    started = time.perf_counter()
    latencies = latency_client(
        system.port, settings.message, settings.latency_messages, settings.latency_sessions
    )
    accepted = time.perf_counter() - started
    reached = sink.wait_for(base + settings.latency_messages, settings.timeout)
    result.p50_ms = percentile(latencies, 0.5) * 1000
    result.p99_ms = percentile(latencies, 0.99) * 1000
    print(
        f"  {system.name}: DATA->250 p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms,"
        f" max {latencies[-1] * 1000:.1f} ms ({settings.latency_messages} messages,"
        f" {settings.latency_sessions} sessions: accepted"
        f" {settings.latency_messages / accepted:,.0f} msg/s, end to end"
        f" {settings.latency_messages / (reached - started):,.0f} msg/s)"
    )


def start_profilers(system: System) -> list[subprocess.Popen[bytes]]:
    """With BENCH_PYSPY=PREFIX, py-spy records each SmartRelay process during phase (a) into
    PREFIX.<engine>.<pid> (raw format, for flamegraph.pl or speedscope)."""
    prefix = os.environ.get("BENCH_PYSPY")
    if not prefix or not isinstance(system, RelaySystem) or not system.roots():
        return []
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise BenchError("BENCH_PYSPY is set but py-spy is not installed (pip install py-spy)")
    engine = system.name.rsplit("/", 1)[-1].lower()
    profilers = []
    for pid in process_tree(system.roots()):
        output = f"{prefix}.{engine}.{pid}"
        profilers.append(
            subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--nonblocking",
                    "-p",
                    str(pid),
                    "-f",
                    "raw",
                    "-r",
                    "200",
                    "-o",
                    output,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        print(f"  py-spy: recording process {pid} during the throughput phase into {output}")
    time.sleep(1)  # attached
    return profilers


def run_system(
    make: Callable[[CountingSink], System],
    tools: Tools,
    settings: Settings,
    extra: Callable[[System, Result], None] | None = None,
) -> Result:
    """Sink, system, both phases, stop; errors become the result's ``error``."""
    sampler = MemorySampler()
    sink: CountingSink | None = None
    system: System | None = None
    result = Result("?")
    try:
        sink = CountingSink(tools)
        system = make(sink)
        result.system = system.name
        print(f"{system.name}: starting")
        system.start()
        measure(system, sink, sampler, settings, tools, result)
        if extra is not None:
            extra(system, result)
        sampler.sample()
    except BenchError as error:
        result.error = str(error)
        print(f"  {result.system}: FAILED: {error}")
    except Exception as error:  # the other systems still run
        result.error = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        print(f"  {result.system}: FAILED: {result.error}")
    finally:
        sampler.stop()
        if system is not None:
            system.stop()
            result.notes += system.check_logs()
            name = system.name
            result.rss_mib = sampler.peak_rss_kib.get(name, 0) / 1024 or None
            result.pss_mib = sampler.peak_pss_kib.get(name, 0) / 1024 or None
            result.processes = sampler.processes.get(name)
        if sink is not None:
            sink.stop()
    for note in result.notes:
        print(f"  {note}")
    return result


# -- PostgreSQL --------------------------------------------------------------------------------


def postgres_settings(server: PostgresServer) -> str:
    names = ["fsync", "synchronous_commit", "wal_level", "shared_buffers", "max_connections"]
    with contextlib.closing(psycopg2.connect(server.dsn())) as db, db.cursor() as cursor:
        values = []
        for name in names:
            cursor.execute(f"SHOW {name}")
            row = cursor.fetchone()
            values.append(f"{name}={row[0] if row else '?'}")
    return ", ".join(values)


def postmaster_pid(server: PostgresServer) -> list[int]:
    try:
        pid = int(Path(server.directory, "data", "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    return [pid]


# -- the runs ----------------------------------------------------------------------------------


def run_postfix(tools: Tools, settings: Settings) -> Result:
    holder: list[PostfixSystem] = []

    def make(sink: CountingSink) -> System:
        holder.append(PostfixSystem(tools, sink.port))
        return holder[0]

    def extra(system: System, result: Result) -> None:
        assert isinstance(system, PostfixSystem)
        result.notes.append(
            "Postfix settings: "
            + ", ".join(f"{key}={value}" for key, value in system.settings.items())
        )

    try:
        return run_system(make, tools, settings, extra)
    finally:
        if holder:
            if settings.keep:
                print(f"  kept {holder[0].dir}")
            holder[0].cleanup(settings.keep)


def run_relay(
    name: str,
    tools: Tools,
    settings: Settings,
    database: Callable[[Path], str],
    db_roots: Callable[[], list[int]] | None = None,
) -> Result:
    tmp = Path(tempfile.mkdtemp(prefix="smartrelay-bench-"))
    try:
        url = database(tmp)

        def make(sink: CountingSink) -> System:
            return RelaySystem(
                name, tools, sink.port, url, tmp, db_roots, settings.delivery_processes
            )

        def extra(system: System, result: Result) -> None:
            assert isinstance(system, RelaySystem)
            expected = settings.warmup + settings.messages + settings.latency_messages
            deadline = time.monotonic() + 30  # outcomes are committed after the sink's 250
            delivered = system.delivered()
            while delivered < expected and time.monotonic() < deadline:
                time.sleep(0.2)
                delivered = system.delivered()
            if delivered != expected:
                result.notes.append(f"delivered events: {delivered}, expected {expected}")

        return run_system(make, tools, settings, extra)
    finally:
        if settings.keep:
            print(f"  kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run_postgresql(tools: Tools, settings: Settings, fsync: bool) -> tuple[Result, Result, str]:
    """SmartRelay on a throwaway PostgreSQL; also the server's own row and its settings."""
    server_row = Result("  + PostgreSQL server")
    with running_postgres(durable=fsync) as server:
        pg_settings = postgres_settings(server)
        print(f"PostgreSQL: {pg_settings}")
        sampler = MemorySampler()
        sampler.watch("postgres", lambda: postmaster_pid(server))

        def database(_: Path) -> str:
            return server.create_database()

        try:
            relay = run_relay(
                "SmartRelay/PostgreSQL", tools, settings, database, lambda: postmaster_pid(server)
            )
            sampler.sample()
        finally:
            sampler.stop()
        server_row.rss_mib = sampler.peak_rss_kib["postgres"] / 1024
        server_row.pss_mib = sampler.peak_pss_kib["postgres"] / 1024
        server_row.cpu_s = relay.db_cpu_s
        server_row.processes = sampler.processes["postgres"]
        log = Path(server.directory, "log")
        server_row.notes = _problem_lines(
            log, re.compile(r"\b(ERROR|FATAL|PANIC|WARNING):"), "PostgreSQL log"
        )
        for note in server_row.notes:
            print(f"  {note}")
    return relay, server_row, pg_settings


# -- the queue run -----------------------------------------------------------------------------


def queue_run(
    tools: Tools, settings: Settings, total: int, settle: float, next_hop: str
) -> list[str]:
    """SmartRelay/SQLite, its next hop failing: RSS against the number of queued messages."""
    tmp = Path(tempfile.mkdtemp(prefix="smartrelay-bench-queue-"))
    database = f"sqlite:{tmp}/relay.db"
    sink: CountingSink | None = None
    relay: RelaySystem | None = None
    lines: list[str] = []
    header = (
        f"{'accepted':>9} {'queued':>9} {'deferrals':>9} {'RSS MiB':>8} {'VmHWM MiB':>9}"
        f" {'DB MiB':>7} {'elapsed s':>9}  phase"
    )

    def counts() -> tuple[int, int]:
        """Recipients still to deliver, and deferred events (read-only: never creates the
        file, the relay may not have made it yet)."""
        uri = f"file:{tmp}/relay.db?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, 30, uri=True)) as db:
            queued = db.execute(
                "SELECT COUNT(*) FROM recipients WHERE next_attempt_at IS NOT NULL"
            ).fetchone()[0]
            deferrals = db.execute(
                "SELECT COUNT(*) FROM events WHERE type = 'deferred'"
            ).fetchone()[0]
        return int(queued), int(deferrals)

    def row(accepted: int, phase: str, started: float) -> str:
        assert relay is not None and relay.process is not None
        pid = relay.process.pid
        queued, deferrals = counts()
        db_bytes = sum(p.stat().st_size for p in tmp.glob("relay.db*"))
        line = (
            f"{accepted:>9,} {queued:>9,} {deferrals:>9,}"
            f" {status_kib(pid, 'VmRSS') / 1024:>8.1f} {status_kib(pid, 'VmHWM') / 1024:>9.1f}"
            f" {db_bytes / 2**20:>7.0f} {time.perf_counter() - started:>9.1f}  {phase}"
        )
        print("  " + line)
        return line

    try:
        if next_hop == "defer":
            sink = CountingSink(tools, ["-r", "data"])
            port, how = sink.port, "a sink answering 4xx to DATA"
        else:
            port, how = free_port(), "a closed port (connection refused)"
        relay = RelaySystem(
            "SmartRelay/SQLite (queue)",
            tools,
            port,
            database,
            tmp,
            delivery_processes=settings.delivery_processes,
        )
        title = (
            f"queue run: SmartRelay/SQLite, {total:,} messages, next hop {how}"
            f" (smtp-source, {settings.sessions} sessions, ten steps); retries on the default"
            " schedule (1m, 5m, ...)"
        )
        print(title)
        lines.append(title)
        relay.start()
        deadline = time.monotonic() + 30
        while True:  # the listener may be up before the schema is
            try:
                counts()
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise BenchError("the relay's database has no schema after 30 s") from None
                time.sleep(0.2)
        print("  " + header)
        lines.append(header)
        started = time.perf_counter()
        lines.append(row(0, "started", started))
        step = max(1, total // 10)
        accepted = 0
        while accepted < total:
            count = min(step, total - accepted)
            seconds = smtp_source(
                tools, relay.port, settings.message_file, count, settings.sessions
            )
            accepted += count
            lines.append(row(accepted, f"injected ({count / seconds:,.0f} msg/s)", started))
        end = time.perf_counter() + settle
        while time.perf_counter() < end:
            time.sleep(min(10.0, max(0.0, end - time.perf_counter())))
            lines.append(row(accepted, "idle: retries only", started))
        if relay.process is not None and relay.process.poll() is not None:
            raise BenchError("the relay exited during the queue run")
    except BenchError as error:
        lines.append(f"FAILED: {error}")
        print(f"  queue run FAILED: {error}")
    finally:
        if relay is not None:
            relay.stop()
            problems = relay.check_logs()
            lines += problems
            for line in problems:
                print(f"  {line}")
        if sink is not None:
            sink.stop()
        if settings.keep:
            print(f"  kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return lines


# -- the table ---------------------------------------------------------------------------------


def _cell(value: float | None, width: int, digits: int = 0) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>{width},.{digits}f}"


def table(results: Sequence[Result]) -> list[str]:
    head = (
        f"{'system':<24}{'accepted':>10}{'e2e':>8}{'p50':>8}{'p99':>8}{'peak RSS':>10}"
        f"{'peak PSS':>10}{'CPU':>7}{'procs':>7}"
    )
    unit = f"{'':<24}{'msg/s':>10}{'msg/s':>8}{'ms':>8}{'ms':>8}{'MiB':>10}{'MiB':>10}{'s':>7}"
    lines = [head, unit]
    for r in results:
        line = (
            f"{r.system:<24}{_cell(r.accepted, 10)}{_cell(r.e2e, 8)}{_cell(r.p50_ms, 8, 1)}"
            f"{_cell(r.p99_ms, 8, 1)}{_cell(r.rss_mib, 10, 1)}{_cell(r.pss_mib, 10, 1)}"
            f"{_cell(r.cpu_s, 7, 1)}{_cell(r.processes, 7)}"
        )
        if r.error:
            line += f"  FAILED: {r.error}"
        lines.append(line)
    postfix = next((r for r in results if r.system == "Postfix"), None)
    relays = [r for r in results if r.system.startswith("SmartRelay")]
    if postfix and postfix.accepted and postfix.e2e and relays:
        lines.append("")
        for r in relays:
            if r.accepted and r.e2e:
                engine = r.system.split("/", 1)[1]
                lines.append(
                    f"ratio SmartRelay/Postfix ({engine}): accepted"
                    f" {r.accepted / postfix.accepted:.2f}, end to end {r.e2e / postfix.e2e:.2f}"
                )
    return lines


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Postfix vs SmartRelay (SQLite, PostgreSQL) on loopback; see the docstring."
    )
    parser.add_argument("--systems", default="postfix,sqlite,postgresql")
    parser.add_argument("--messages", type=int, help="N, throughput phase (default 5000)")
    parser.add_argument("--sessions", type=int, default=20, help="S, smtp-source sessions")
    parser.add_argument("--latency-messages", type=int, help="M, latency phase (default 2000)")
    parser.add_argument("--latency-sessions", type=int, default=50)
    parser.add_argument("--warmup", type=int, help="messages before measuring (default 200)")
    parser.add_argument(
        "--delivery-processes",
        type=int,
        default=0,
        help="SmartRelay's [delivery] processes (default 0: the main process delivers)",
    )
    parser.add_argument("--pg-fsync", choices=("on", "off"), default="on")
    parser.add_argument("--queue-run", action="store_true", help="also the queue-size run")
    parser.add_argument("--queue-messages", type=int, help="default 100000")
    parser.add_argument(
        "--queue-next-hop",
        choices=("refuse", "defer"),
        default="refuse",
        help="queue run: a closed port, or smtp-sink -r data (4xx to DATA)",
    )
    parser.add_argument("--queue-settle", type=float, help="seconds sampled after (default 60)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--keep", action="store_true", help="keep temp dirs and logs")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "messages": (5000, 500),
        "latency_messages": (2000, 200),
        "warmup": (200, 50),
        "queue_messages": (100_000, 5000),
        "queue_settle": (60.0, 10.0),
    }
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    systems = [s.strip() for s in args.systems.split(",") if s.strip() and s.strip() != "none"]
    unknown = set(systems) - {"postfix", "sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    args.systems = systems
    return args


def main() -> int:
    args = parse_args()
    try:
        tools = find_tools(args.systems, args.queue_run)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    message = build_message()
    links = message.count(b"<a href=")
    began = time.perf_counter()
    for line in machine_lines(tools):
        print(line)
    if args.systems:
        print(
            f"load: N={args.messages} messages over S={args.sessions} smtp-source sessions"
            f" (after {args.warmup} warm-up); latency M={args.latency_messages} messages over"
            f" {args.latency_sessions} sessions"
        )
    print(
        f"message: {len(message):,} bytes (multipart/alternative, {links} links,"
        f" From {SENDER}); sink: smtp-sink -c"
    )
    print(
        "SmartRelay: SQLite WAL synchronous=FULL; full re-wrap chain incl. DKIM RSA-2048;"
        f" [delivery] processes = {args.delivery_processes}, throttle"
        f" {throttle_connections(args.delivery_processes)} connections to the sink"
        + (" in each" if args.delivery_processes > 1 else "")
    )
    print()
    results: list[Result] = []
    queue_lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="smartrelay-bench-msg-") as tmp:
        message_file = Path(tmp) / "message.eml"
        message_file.write_bytes(message)
        settings = Settings(
            messages=args.messages,
            sessions=args.sessions,
            latency_messages=args.latency_messages,
            latency_sessions=args.latency_sessions,
            warmup=args.warmup,
            timeout=120 + args.messages / 50,
            message_file=message_file,
            message=message,
            keep=args.keep,
            delivery_processes=args.delivery_processes,
        )
        pg_settings = ""
        if "postfix" in args.systems:
            results.append(run_postfix(tools, settings))
        if "sqlite" in args.systems:
            results.append(
                run_relay(
                    "SmartRelay/SQLite", tools, settings, lambda tmp: f"sqlite:{tmp}/relay.db"
                )
            )
        if "postgresql" in args.systems:
            try:
                relay, server, pg_settings = run_postgresql(tools, settings, args.pg_fsync == "on")
                results += [relay, server]
            except PostgresUnavailable as error:
                print(f"  PostgreSQL: FAILED: {error}")
                results.append(Result("SmartRelay/PostgreSQL", error=f"PostgreSQL: {error}"))
        if args.queue_run:
            print()
            queue_lines = queue_run(
                tools, settings, args.queue_messages, args.queue_settle, args.queue_next_hop
            )
    print()
    print("=" * 100)
    for line in machine_lines(tools):
        print(line)
    load = (
        f"N={args.messages} S={args.sessions} M={args.latency_messages} L={args.latency_sessions}, "
        if results
        else ""
    )
    print(
        f"{load}message {len(message):,} bytes with {links} links;"
        f" SmartRelay [delivery] processes={args.delivery_processes}"
        + (f"; PostgreSQL {pg_settings}" if pg_settings else "")
    )
    print()
    if results:
        for line in table(results):
            print(line)
        print(
            "accepted: N / smtp-source wall time; e2e: N / (smtp-source start -> sink has all N);"
            " p50/p99: DATA-dot -> 250; peak RSS/PSS: summed over the system's processes"
            " (sampled every second); CPU: user+system during the throughput phase"
        )
    if queue_lines:
        print()
        for line in queue_lines:
            print(line)
    print()
    print(f"total {time.perf_counter() - began:.0f} s")
    failed = any(r.error for r in results) or any(line.startswith("FAILED") for line in queue_lines)
    return 1 if failed else 0


if __name__ == "__main__":
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines as they come, even piped
    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so every finally: stops what it started.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
