"""Disk use per message at steady state, with short retention, on SQLite and PostgreSQL.

    .venv/bin/python bench/disk.py [--engines sqlite,postgresql] [--rate 50] [--duration 165]
        [--bodies 30s] [--events 90s] [--purge-every 15] [--seed 1] [--keep]

For each engine: `twistd smartrelay` (bench/relay.py's RelaySystem: the full re-wrap chain,
routing everything to a Postfix `smtp-sink`; on PostgreSQL a throwaway server with fsync on)
with `[retention] message_bodies` and `events` short, and the personalized load of
bench/load.py (every message different, one recipient each) sent at a steady --rate (each
second, that second's messages over 5 sessions). Every --purge-every seconds the script runs
`smartrelay-ctl purge` (one paced pass, as the relay's own service does every 5 minutes; a
pass still running skips the turn), after moving `rollup_progress` up to now (there is no
roll-up service yet in this code; it says every event so far is counted, so events go at the
`events` age, as they would with roll-ups that keep up). Every 5 s it samples the bytes on
disk (SQLite: the database file and its -wal, and the pages in use; PostgreSQL:
`pg_database_size` and, apart, the WAL directory `pg_wal`, which is the cluster's and sized by
`min_wal_size`/`max_wal_size`, not by the data) and the row counts.

What it reports, per engine:

* growth while every body is kept (before the first body purge): bytes per message sent;
* growth once bodies go but rows stay (between the first body purge and the first event
  purge): bytes per message whose body is purged;
* at steady state (after `events` + two purge turns: the size should stop growing; the script
  says by how much it still grew): the bytes on disk per message inside the `events` window
  (all bytes on disk / the message rows held), and the table sizes per row;
* the projection to the defaults (1,000,000 messages a day, bodies 7 days, events 90 days):
  7 M messages with their body and 83 M without, from the two per-message figures; then the
  same with 20 KB bodies and 4 events a message (opens and clicks: the load has none, its
  messages get `received` and `delivered` only), from the measured bytes per event and per
  body byte. The assumptions are printed with the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # smartrelay, tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # relay, load

import psycopg2
from relay import (
    BenchError,
    CountingSink,
    Outgoing,
    RelaySystem,
    Tools,
    find_tools,
    machine_lines,
    make_load,
    send_load,
    stop_process,
)

from smartrelay.units import parse_duration
from tests.support.postgres import running_postgres

SESSIONS = 5
SAMPLE_EVERY = 2.5
MIB = 2**20
DEFAULTS_PER_DAY = 1_000_000
DEFAULT_BODY_DAYS = 7
DEFAULT_EVENT_DAYS = 90


class RetentionRelay(RelaySystem):
    """bench/relay.py's relay with a short ``[retention]``."""

    def __init__(self, *args: object, bodies: str, events: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.bodies = bodies
        self.events = events

    def config(self) -> str:
        return (
            super().config()
            + f'[retention]\nmessage_bodies = "{self.bodies}"\nevents = "{self.events}"\n'
        )


@dataclass
class Sample:
    t: float  # seconds since the load started
    sent: int
    delivered: int
    messages: int  # message rows
    bodies: int  # message rows still holding their body
    events: int
    disk: int  # bytes on disk: SQLite file + WAL; PostgreSQL pg_database_size
    used: int  # SQLite: pages in use x page size; PostgreSQL: = disk
    wal: int  # SQLite: the -wal file; PostgreSQL: pg_wal


class Database:
    """Reads sizes and counts of the relay's database (never writes but rollup_progress)."""

    def __init__(self, url: str, pg_dsn: str | None) -> None:
        self.url = url
        self.pg_dsn = pg_dsn

    def _query(self, queries: Sequence[str]) -> list[int]:
        if self.url.startswith("sqlite:"):
            path = self.url.removeprefix("sqlite:")
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", 30, uri=True)) as db:
                return [int(db.execute(q).fetchone()[0] or 0) for q in queries]
        with contextlib.closing(psycopg2.connect(self.url)) as connection:
            cursor = connection.cursor()
            values = []
            for query in queries:
                cursor.execute(query)
                row = cursor.fetchone()
                values.append(int(row[0] or 0) if row else 0)
            return values

    def sample(self, t: float, sent: int, delivered: int) -> Sample:
        counts = [
            "SELECT COUNT(*) FROM messages",
            "SELECT COUNT(*) FROM messages WHERE body_purged_at IS NULL",
            "SELECT COUNT(*) FROM events",
        ]
        if self.url.startswith("sqlite:"):
            path = self.url.removeprefix("sqlite:")
            values = self._query(
                [*counts, "PRAGMA page_count", "PRAGMA freelist_count", "PRAGMA page_size"]
            )
            messages, bodies, events, pages, free, page_size = values
            wal = _size(path + "-wal")
            return Sample(
                t, sent, delivered, messages, bodies, events, _size(path) + wal,
                (pages - free) * page_size, wal,
            )  # fmt: skip
        values = self._query(
            [
                *counts,
                "SELECT pg_database_size(current_database())",
                "SELECT SUM(size) FROM pg_ls_waldir()",
            ]
        )
        messages, bodies, events, disk, wal = values
        return Sample(t, sent, delivered, messages, bodies, events, disk, disk, wal)

    def rolled_up_to(self, ms: int) -> None:
        """Say the roll-ups have counted every event before ``ms`` (never moves it back)."""
        sql = (
            "INSERT INTO rollup_progress (name, time_ms, last_id) VALUES ('rollups', {0}, 0)"
            " ON CONFLICT (name) DO UPDATE SET time_ms = excluded.time_ms, last_id = 0"
            " WHERE rollup_progress.time_ms < excluded.time_ms"
        )
        if self.url.startswith("sqlite:"):
            path = self.url.removeprefix("sqlite:")
            with contextlib.closing(sqlite3.connect(path, 30, isolation_level=None)) as db:
                db.execute(sql.format("?"), (ms,))
            return
        with contextlib.closing(psycopg2.connect(self.url)) as connection, connection:
            connection.cursor().execute(sql.format("%s"), (ms,))

    def kept_bodies(self) -> tuple[float, float]:
        """Mean stored size and mean size of the bodies still kept."""
        stored = "length(raw)" if self.url.startswith("sqlite:") else "pg_column_size(raw)"
        values = self._query(
            [
                f"SELECT SUM({stored}) FROM message_bodies",
                "SELECT SUM(size) FROM messages WHERE body_purged_at IS NULL",
                "SELECT COUNT(*) FROM messages WHERE body_purged_at IS NULL",
            ]
        )
        count = values[2] or 1
        return values[0] / count, values[1] / count

    def tables(self) -> list[tuple[str, int, int]]:
        """(table, bytes with its indexes (and TOAST), rows) for messages, recipients,
        events."""
        names = ("messages", "recipients", "events")
        if self.url.startswith("sqlite:"):
            path = self.url.removeprefix("sqlite:")
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", 30, uri=True)) as db:
                owner = dict(db.execute("SELECT name, tbl_name FROM sqlite_master"))
                sizes: dict[str, int] = {}
                for name, size in db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
                    table = owner.get(name, name)
                    sizes[table] = sizes.get(table, 0) + int(size)
                rows = {
                    n: int(db.execute(f"SELECT COUNT(*) FROM {n}").fetchone()[0]) for n in names
                }
            return [(n, sizes.get(n, 0), rows[n]) for n in names]
        with contextlib.closing(psycopg2.connect(self.url)) as connection:
            cursor = connection.cursor()
            result = []
            for n in names:
                cursor.execute(f"SELECT pg_total_relation_size('{n}'), (SELECT COUNT(*) FROM {n})")
                row = cursor.fetchone()
                assert row is not None
                result.append((n, int(row[0]), int(row[1])))
            return result


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class Sender:
    """Sends ``messages`` at ``rate`` a second (each second's share over SESSIONS sessions)."""

    def __init__(self, port: int, messages: Sequence[Outgoing], rate: int) -> None:
        self.port = port
        self.messages = messages
        self.rate = rate
        self.sent = 0
        self.late = 0.0  # the most a second's batch started late, seconds
        self.error: str | None = None
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> None:
        self.started = time.perf_counter()
        self._thread.start()

    def _run(self) -> None:
        try:
            for second in range(0, len(self.messages) // self.rate):
                due = self.started + second
                wait = due - time.perf_counter()
                if self._stop.wait(max(0.0, wait)):
                    return
                self.late = max(self.late, -wait)
                batch = self.messages[second * self.rate : (second + 1) * self.rate]
                send_load(self.port, batch, SESSIONS)
                self.sent += len(batch)
        except BenchError as error:
            self.error = str(error)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


_REMOVED = re.compile(r"removed (\d+) (message bodies|messages|events)")


@dataclass
class PurgeTurns:
    """``smartrelay-ctl purge`` every ``every`` seconds (a pass still running skips a turn)."""

    relay: RelaySystem
    db: Database
    every: float
    process: subprocess.Popen[bytes] | None = None
    passes: int = 0
    skipped: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    first_removal: dict[str, float] = field(default_factory=dict)  # kind -> t of the first
    _out: tempfile._TemporaryFileWrapper[bytes] | None = None
    _started_t: float = 0.0

    def turn(self, t: float) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.skipped += 1
                return
            self._collect()
        self.db.rolled_up_to(int(time.time() * 1000))
        self._out = tempfile.NamedTemporaryFile(prefix="smartrelay-disk-purge-")  # noqa: SIM115
        self._started_t = t
        self.process = subprocess.Popen(
            self.relay.ctl("purge"),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.DEVNULL,
        )

    def _collect(self) -> None:
        assert self.process is not None and self._out is not None
        self._out.seek(0)
        text = self._out.read().decode(errors="replace")
        self._out.close()
        self._out = None
        if self.process.returncode != 0:
            raise BenchError(f"smartrelay-ctl purge exited {self.process.returncode}: {text}")
        self.passes += 1
        for count, kind in _REMOVED.findall(text):
            self.removed[kind] = self.removed.get(kind, 0) + int(count)
            if int(count) and kind not in self.first_removal:
                self.first_removal[kind] = self._started_t
        self.process = None

    def finish(self) -> None:
        if self.process is not None:
            self.process.wait(timeout=120)
            self._collect()


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y on x."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


@dataclass
class EngineResult:
    engine: str
    lines: list[str] = field(default_factory=list)
    kept: float | None = None  # bytes per message, body kept
    purged: float | None = None  # bytes per message, body purged
    per_window_message: float | None = None
    per_event: float | None = None
    mean_body: float = 0.0
    fixed: int = 0  # bytes on disk with no message (the empty schema, the WAL)


def run_engine(
    engine: str,
    tools: Tools,
    args: argparse.Namespace,
    messages: Sequence[Outgoing],
    mean_body: float,
) -> EngineResult:
    result = EngineResult(engine, mean_body=mean_body)
    tmp = Path(tempfile.mkdtemp(prefix="smartrelay-bench-disk-"))
    stack = contextlib.ExitStack()
    relay: RetentionRelay | None = None
    sink: CountingSink | None = None
    sender: Sender | None = None
    purges: PurgeTurns | None = None
    try:
        if engine == "sqlite":
            url = f"sqlite:{tmp}/relay.db"
        else:
            server = stack.enter_context(running_postgres(durable=True))
            url = server.create_database()
            # Time runs ~100,000 times faster here than with the defaults' retention: the
            # autovacuum launcher's default minute between rounds would be months.
            with contextlib.closing(psycopg2.connect(server.dsn())) as admin:
                admin.autocommit = True
                admin.cursor().execute(f"ALTER SYSTEM SET autovacuum_naptime = '{args.pg_naptime}'")
                admin.cursor().execute("SELECT pg_reload_conf()")
        sink = CountingSink(tools)
        relay = RetentionRelay(
            f"SmartRelay/{'SQLite' if engine == 'sqlite' else 'PostgreSQL'}",
            tools,
            sink.port,
            url,
            tmp,
            delivery_processes=args.delivery_processes,
            bodies=args.bodies,
            events=args.events,
        )
        print(f"{relay.name}: starting (retention: bodies {args.bodies}, events {args.events})")
        relay.start()
        db = Database(url, None)
        deadline = time.monotonic() + 30
        while True:  # the listener may be up before the schema is
            try:
                empty = db.sample(0.0, 0, 0)
                break
            except (sqlite3.OperationalError, psycopg2.Error):
                if time.monotonic() > deadline:
                    raise BenchError("the relay's database has no schema after 30 s") from None
                time.sleep(0.2)
        result.fixed = empty.disk
        purges = PurgeTurns(relay, db, args.purge_every)
        sender = Sender(relay.port, messages, args.rate)
        samples: list[Sample] = [empty]
        header = (
            f"{'t s':>6}{'sent':>8}{'sink':>8}{'msg rows':>9}{'bodies':>8}{'events':>8}"
            f"{'disk MiB':>9}{'used MiB':>9}{'WAL MiB':>8}"
        )
        print("  " + header)
        sender.start()
        next_purge = args.purge_every
        next_sample = SAMPLE_EVERY
        end = args.duration
        while True:
            now = time.perf_counter() - sender.started
            if now >= end:
                break
            if sender.error:
                raise BenchError(f"sending: {sender.error}")
            if relay.process is not None and relay.process.poll() is not None:
                raise BenchError("the relay exited")
            if now >= next_purge:
                purges.turn(now)
                next_purge += args.purge_every
            if now >= next_sample:
                s = db.sample(now, sender.sent, sink.count)
                samples.append(s)
                if len(samples) % 3 == 1:
                    print(
                        f"  {s.t:>6.0f}{s.sent:>8,}{s.delivered:>8,}{s.messages:>9,}"
                        f"{s.bodies:>8,}{s.events:>8,}{s.disk / MIB:>9.1f}{s.used / MIB:>9.1f}"
                        f"{s.wal / MIB:>8.1f}"
                    )
                next_sample += SAMPLE_EVERY
            time.sleep(0.05)
        sender.stop()
        purges.finish()
        result.lines += analyse(result, samples, purges, sender, args, db)
    except BenchError as error:
        result.lines.append(f"FAILED: {error}")
        print(f"  FAILED: {error}")
    finally:
        if sender is not None:
            sender.stop()
        if purges is not None and purges.process is not None:
            stop_process(purges.process, signal.SIGTERM, 10)
        if relay is not None:
            relay.stop()
            problems = relay.check_logs()
            result.lines += problems
            for line in problems:
                print(f"  {line}")
        if sink is not None:
            sink.stop()
        stack.close()
        if args.keep:
            print(f"  kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def analyse(
    result: EngineResult,
    samples: list[Sample],
    purges: PurgeTurns,
    sender: Sender,
    args: argparse.Namespace,
    db: Database,
) -> list[str]:
    bodies_s = parse_duration(args.bodies)
    events_s = parse_duration(args.events)
    lines = [
        f"{result.engine}: {sender.sent:,} messages sent at {args.rate}/s (a second's batch"
        f" started at most {sender.late:.1f} s late); {purges.passes} purge passes"
        f" ({purges.skipped} turns skipped: a pass still running) removed "
        + ", ".join(f"{count:,} {kind}" for kind, count in purges.removed.items())
    ]
    first_body = purges.first_removal.get("message bodies", bodies_s + args.purge_every)
    first_event = purges.first_removal.get("events", events_s + args.purge_every)

    def per_message(lo: float, hi: float, value: Callable[[Sample], float]) -> float | None:
        """Growth of ``value`` per message row added, samples with lo <= t < hi."""
        return slope([(s.messages, value(s)) for s in samples if lo <= s.t < hi])

    # Pages in use (SQLite) / pg_database_size (PostgreSQL): the data, not the WAL's swings.
    result.kept = per_message(SAMPLE_EVERY, first_body, lambda s: s.used)
    result.purged = per_message(first_body + args.purge_every, first_event, lambda s: s.used)
    steady_from = first_event + 2 * args.purge_every
    steady = [s for s in samples if s.t >= steady_from]
    for name, value, (lo, hi) in (
        ("every body kept", result.kept, (SAMPLE_EVERY, first_body)),
        ("bodies purged, rows kept", result.purged, (first_body + args.purge_every, first_event)),
    ):
        lines.append(
            f"  growth per message, {name} (t {lo:.0f}-{hi:.0f} s): "
            + (f"{value:,.0f} bytes" if value is not None else "too few samples")
        )
    if len(steady) < 3:
        lines.append(
            f"  no steady state: the run ended before t = {steady_from:.0f} s"
            " (events retention + two purge turns); use a longer --duration"
        )
        return lines
    mean = lambda pick: sum(pick(s) for s in steady) / len(steady)  # noqa: E731
    disk, wal, used = mean(lambda s: s.disk), mean(lambda s: s.wal), mean(lambda s: s.used)
    rows, kept = mean(lambda s: s.messages), mean(lambda s: s.bodies)
    growth = slope([(s.t, s.disk) for s in steady]) or 0.0
    growth_used = slope([(s.t, s.used) for s in steady]) or 0.0
    result.per_window_message = disk / rows if rows else None
    lines.append(
        f"  steady state (t {steady[0].t:.0f}-{steady[-1].t:.0f} s, {len(steady)} samples):"
        f" {rows:,.0f} message rows in the events window ({kept:,.0f} holding their body),"
        f" {mean(lambda s: s.events):,.0f} events; on disk {disk / MIB:.1f} MiB"
        f" (in use {used / MIB:.1f} MiB)"
        + (
            f", WAL {wal / MIB:.1f} MiB"
            if result.engine == "sqlite"
            else f", and the cluster's pg_wal {wal / MIB:.1f} MiB apart"
        )
    )
    rate_bytes = (result.kept or 0) * args.rate
    lines.append(
        f"  still growing by {growth / 1024:,.1f} KiB/s on disk ({growth_used / 1024:,.1f} KiB/s"
        f" in use), against {rate_bytes / 1024:,.0f} KiB/s written by new messages"
        + (" (stopped growing)" if rate_bytes and abs(growth) < 0.1 * rate_bytes else "")
    )
    lines.append(
        f"  bytes on disk per message in the events window: {disk / rows:,.0f}"
        f" (= on disk / message rows; the empty database and its WAL are"
        f" {result.fixed / MIB:.1f} MiB of it)"
    )
    tables = db.tables()
    event_bytes = next(size for name, size, _ in tables if name == "events")
    event_rows = next(count for name, _, count in tables if name == "events")
    result.per_event = event_bytes / event_rows if event_rows else None
    body_stored, body_raw = db.kept_bodies()
    if body_raw:
        lines.append(
            f"  bodies kept at the end: {body_raw:,.0f} bytes on average, stored as"
            f" {body_stored:,.0f}"
            + (" (compressed in TOAST)" if result.engine == "postgresql" else "")
        )
    lines.append(
        "  tables with their indexes at the end: "
        + "; ".join(
            f"{name} {size / MIB:.1f} MiB, {count:,} rows"
            + (f", {size / count:,.0f} bytes a row" if count else "")
            for name, size, count in tables
        )
    )
    return lines


def projection(result: EngineResult) -> list[str]:
    if result.kept is None or result.purged is None:
        return [f"{result.engine}: no projection (a growth figure is missing)"]
    kept_n = DEFAULTS_PER_DAY * DEFAULT_BODY_DAYS
    purged_n = DEFAULTS_PER_DAY * (DEFAULT_EVENT_DAYS - DEFAULT_BODY_DAYS)
    total = kept_n * result.kept + purged_n * result.purged
    lines = [
        f"{result.engine}: {kept_n / 1e6:.0f} M messages x {result.kept:,.0f} B (body kept)"
        f" + {purged_n / 1e6:.0f} M x {result.purged:,.0f} B (body purged)"
        f" = {total / 1e9:,.0f} GB for this load (bodies {result.mean_body / 1024:.1f} KB"
        " on average, 2 events a message)"
    ]
    if result.per_event is not None and result.mean_body:
        per_body_byte = (result.kept - result.purged) / result.mean_body
        kept20 = result.purged + 2 * result.per_event + per_body_byte * 20 * 1024
        purged20 = result.purged + 2 * result.per_event
        total20 = kept_n * kept20 + purged_n * purged20
        lines.append(
            f"{result.engine}: with 20 KB bodies and 4 events a message (2 more,"
            f" {result.per_event:,.0f} B each as measured; {per_body_byte:.2f} B on disk per"
            " body byte as measured):"
            f" {kept_n / 1e6:.0f} M x {kept20:,.0f} B + {purged_n / 1e6:.0f} M x {purged20:,.0f} B"
            f" = {total20 / 1e9:,.0f} GB"
        )
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="SmartRelay's disk use per message; see the docstring."
    )
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--rate", type=int, default=50, help="messages a second")
    parser.add_argument("--duration", type=float, default=165.0, help="seconds of load per engine")
    parser.add_argument("--bodies", default="30s", help="[retention] message_bodies")
    parser.add_argument("--events", default="90s", help="[retention] events")
    parser.add_argument("--purge-every", type=float, default=15.0, help="seconds between purges")
    parser.add_argument(
        "--pg-naptime",
        default="1s",
        help="PostgreSQL's autovacuum_naptime (default 1s: scaled to the short retention)",
    )
    parser.add_argument("--delivery-processes", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if set(args.engines) - {"sqlite", "postgresql"}:
        parser.error("--engines: sqlite and/or postgresql")
    for key in ("bodies", "events"):
        try:
            parse_duration(getattr(args, key))
        except ValueError as error:
            parser.error(f"--{key}: {error}")
    return args


def main() -> int:
    args = parse_args()
    try:
        tools = find_tools(args.engines, False)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    count = int(args.rate * args.duration)
    messages = make_load(0, count, args.seed)
    mean_body = sum(len(m.data) for m in messages) / max(1, len(messages))
    head = [
        *machine_lines(tools),
        f"load: {args.rate} msg/s for {args.duration:.0f} s per engine, every message different"
        f" (bench/load.py seed {args.seed}, {mean_body / 1024:.1f} KB on average as sent), one"
        " recipient each, delivered to smtp-sink; no opens or clicks (events: received,"
        " delivered)",
        f"retention: message_bodies {args.bodies}, events {args.events}; smartrelay-ctl purge"
        f" every {args.purge_every:.0f} s (rollup_progress moved to now before each); the relay's"
        " own purge service runs too (a minute after start, then 5 minutes after each pass)",
        f"PostgreSQL: fsync on, autovacuum_naptime = {args.pg_naptime} (instead of 1min: the"
        " retention here is ~100,000 times shorter than the defaults'), the other autovacuum"
        " settings PostgreSQL's defaults (a table is vacuumed once 20 % of its rows are dead)",
    ]
    for line in head:
        print(line)
    print()
    results = [run_engine(engine, tools, args, messages, mean_body) for engine in args.engines]
    print()
    print("=" * 100)
    for line in head:
        print(line)
    print()
    for result in results:
        for line in result.lines:
            print(line)
        print()
    print(
        f"projection to the defaults ({DEFAULTS_PER_DAY:,} messages a day, bodies kept"
        f" {DEFAULT_BODY_DAYS} d, events {DEFAULT_EVENT_DAYS} d): steady state holds"
        f" {DEFAULT_BODY_DAYS} days of messages with their bodies and"
        f" {DEFAULT_EVENT_DAYS - DEFAULT_BODY_DAYS} days without; per-message figures are the"
        " growth figures above (they include the indexes; the WAL and the empty database are"
        " fixed costs, not per message); one recipient a message"
    )
    for result in results:
        for line in projection(result):
            print(line)
    print()
    print(f"total {time.perf_counter() - began:.0f} s")
    return 1 if any(line.startswith("FAILED") for r in results for line in r.lines) else 0


if __name__ == "__main__":
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
