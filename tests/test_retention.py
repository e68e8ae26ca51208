"""Retention: the purge on both engines, with the store's clock injected (task.Clock).

Test ids end in [sqlite] and [postgresql]. The purge's pauses run on the real reactor
(``timer=``) with no minimum, so a pass takes as long as its transactions.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater

from smartrelay.config import RetentionConfig
from smartrelay.events import DeliveredEvent
from smartrelay.retention.purge import PurgePacing, Purger, PurgeReport, PurgeService
from smartrelay.storage.engines import create_engine
from smartrelay.storage.engines.sqlite import PAGE_SIZE
from smartrelay.storage.engines.sqlite import schema_sql as sqlite_schema_sql
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from smartrelay.storage.migrations import load_deltas, migrate, split_statements
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.store import NewFeedback, NewMessage, RecipientOutcome, Store
from tests.conftest import real_reactor
from tests.support.run import CTL, write_config

DAY = 86400.0
RETENTION = RetentionConfig(message_bodies=7 * DAY, events=90 * DAY, feedback_reports=30 * DAY)


def SQLITE_TYPES(sql: str) -> str:
    return sql.replace("$ID_PK", "INTEGER PRIMARY KEY AUTOINCREMENT").replace("$BLOB", "BLOB")


def purger(store: Store, retention: RetentionConfig = RETENTION, **pacing: Any) -> Purger:
    return Purger(
        store,
        retention,
        PurgePacing(min_pause=0.0, duty=1.0, sqlite_duty=1.0, **pacing),
        timer=real_reactor(),
    )


async def rows(store: Store, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute(sql, args)
        return cursor.fetchall()

    return await store.run("test_rows", txn, readonly=True)


async def count(store: Store, table: str) -> int:
    return int((await rows(store, f"SELECT COUNT(*) FROM {table}"))[0][0])


async def mark_rolled_up(store: Store, until_ms: int) -> None:
    """What the roll-up service records once it has counted every event before ``until_ms``."""

    async def txn(cursor: ICursor) -> None:
        await cursor.execute("DELETE FROM rollup_progress WHERE name = 'rollups'")
        await cursor.execute(
            "INSERT INTO rollup_progress (name, time_ms, last_id) VALUES ('rollups', ?, 0)",
            (until_ms,),
        )

    await store.run("test_rolled_up", txn)


async def send(store: Store, *recipients: str, body: bytes = b"Subject: hi\r\n\r\nbody\r\n") -> str:
    queued = await store.queue_message(NewMessage("app@example.com", recipients, body))
    return queued.queue_id


async def deliver_all(store: Store, owner: str = "node") -> int:
    """Claim every due recipient and record it delivered; returns how many."""
    claimed = await store.claim_due(owner, 10_000, 900)
    outcomes = [
        RecipientOutcome(
            c.id,
            c.queue_id,
            c.address,
            "delivered",
            1,
            None,
            "250 ok",
            (DeliveredEvent(mx="mx.example.net", reply="250 ok", tls=False, attempt=1),),
        )
        for c in claimed
    ]
    await store.record_outcomes(owner, outcomes)
    return len(claimed)


async def body_of(store: Store, queue_id: str) -> tuple[bytes, int | None, int | None]:
    (row,) = await rows(
        store,
        "SELECT b.raw, m.finished_at, m.body_purged_at FROM messages m"
        " LEFT JOIN message_bodies b ON b.queue_id = m.queue_id WHERE m.queue_id = ?",
        queue_id,
    )
    return b"" if row[0] is None else bytes(row[0]), row[1], row[2]


# -- what goes when ---------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_bodies_go_message_bodies_after_the_last_recipient_is_final(
    store: Store, clock: Clock
) -> None:
    finished = await send(store, "a@example.net")
    pending = await send(store, "b@example.net", "c@example.org")
    await deliver_all(store)  # all three delivered...
    # ...but a new recipient row of `pending` stays to deliver: make it unfinished again.
    await store.run(
        "test_unfinish",
        _execute(
            "UPDATE recipients SET next_attempt_at = ?, state = 'deferred' WHERE address = ?",
            0,
            "c@example.org",
        ),
    )
    await store.run(
        "test_unfinish_msg",
        _execute("UPDATE messages SET finished_at = NULL WHERE queue_id = ?", pending),
    )
    raw, finished_at, purged_at = await body_of(store, finished)
    assert raw and finished_at == store.now_ms() and purged_at is None

    clock.advance(7 * DAY - 1)
    assert (await purger(store).run_pass()).message_bodies == 0
    clock.advance(2)
    report = await purger(store).run_pass()
    assert report.message_bodies == 1 and report.messages == 0 and report.events == 0
    raw, _, purged_at = await body_of(store, finished)
    assert raw == b"" and purged_at == store.now_ms()
    # The message still shows in the history; the unfinished one keeps its body.
    assert (await body_of(store, pending))[0] != b""
    assert {e.type for e in await store.export_events(0, 100)} == {"received", "delivered"}
    # A second pass finds nothing more.
    assert not (await purger(store).run_pass()).anything


def _execute(sql: str, *args: Any) -> Any:
    async def txn(cursor: ICursor) -> None:
        await cursor.execute(sql, args)

    return txn


@pytest_twisted.ensureDeferred
async def test_finished_at_is_set_by_the_last_final_outcome_and_by_drop(
    store: Store, clock: Clock
) -> None:
    two = await send(store, "a@example.net", "b@example.net")
    claimed = await store.claim_due("node", 1, 900)
    await store.record_outcomes(
        "node",
        [
            RecipientOutcome(
                claimed[0].id, two, claimed[0].address, "delivered", 1, None, "250 ok", ()
            )
        ],
    )
    assert (await body_of(store, two))[1] is None  # one recipient still to deliver
    clock.advance(5)
    await deliver_all(store)
    assert (await body_of(store, two))[1] == store.now_ms()

    dropped = await send(store, "c@example.net")
    clock.advance(5)
    assert await store.drop_message(dropped) == ["c@example.net"]
    assert (await body_of(store, dropped))[1] == store.now_ms()


@pytest_twisted.ensureDeferred
async def test_events_messages_and_recipients_go_after_events(store: Store, clock: Clock) -> None:
    old = await send(store, "a@example.net", "b@example.net")
    await deliver_all(store)
    clock.advance(60 * DAY)
    recent = await send(store, "c@example.net")
    await deliver_all(store)
    unfinished = await send(store, "d@example.net")  # never delivered (a stuck queue)
    clock.advance(31 * DAY)  # `old` finished 91 days ago, `recent` 31
    await mark_rolled_up(store, store.now_ms())

    report = await purger(store).run_pass()
    assert report.messages == 1 and report.recipients == 2
    assert report.events == 4  # two received, two delivered of `old`
    queue_ids = {r[0] for r in await rows(store, "SELECT queue_id FROM messages")}
    assert queue_ids == {recent, unfinished}
    assert await count(store, "recipients") == 2
    exported = await store.export_events(0, 100)
    assert {e.queue_id for e in exported} == {recent, unfinished}
    assert not any(p.queue_id == old for p in await store.pending_recipients())


@pytest_twisted.ensureDeferred
async def test_events_are_kept_until_the_rollups_counted_them(store: Store, clock: Clock) -> None:
    await send(store, "a@example.net")
    await deliver_all(store)
    first_ms = store.now_ms()
    clock.advance(100 * DAY)
    assert (await purger(store).run_pass()).events == 0  # nothing rolled up yet
    await mark_rolled_up(store, first_ms)  # everything before the events' time only
    assert (await purger(store).run_pass()).events == 0
    await mark_rolled_up(store, first_ms + 1)
    assert (await purger(store).run_pass()).events == 2
    assert await count(store, "events") == 0


@pytest_twisted.ensureDeferred
async def test_report_totals_outlive_the_events(store: Store, clock: Clock) -> None:
    await send(store, "a@example.net")
    await send(store, "b@example.org")
    await deliver_all(store)
    hour = clock.seconds() // 3600 * 3600
    clock.advance(91 * DAY)
    assert await store.roll_up(clock.seconds() - 60, 1000) == 4
    report = await purger(store).run_pass()
    assert report.events == 4 and report.messages == 2
    totals = await store.rollup_totals(hour, hour + 3600)
    assert {key: n for key, (n, _) in totals.items()} == {
        ("received", ""): 2,
        ("delivered", ""): 2,
    }
    by_domain = await store.rollup_totals(hour, hour + 3600, recipient_domain="example.org")
    assert {key: n for key, (n, _) in by_domain.items()} == {
        ("received", ""): 1,
        ("delivered", ""): 1,
    }


@pytest_twisted.ensureDeferred
async def test_feedback_reports_go_after_feedback_reports(store: Store, clock: Clock) -> None:
    for state in ("new", "processed"):
        report_id = await store.store_feedback(
            NewFeedback("MAILER-DAEMON@example.net", ("b+x@bounces.example.com",), b"raw")
        )
        await store.run(
            "test_state",
            _execute("UPDATE feedback_reports SET state = ? WHERE report_id = ?", state, report_id),
        )
    clock.advance(30 * DAY - 1)
    assert (await purger(store).run_pass()).feedback_reports == 0
    clock.advance(2)
    assert (await purger(store).run_pass()).feedback_reports == 2
    assert await count(store, "feedback_reports") == 0


@pytest_twisted.ensureDeferred
async def test_a_backlog_goes_in_many_small_batches(store: Store, clock: Clock) -> None:
    for i in range(30):
        await send(store, f"r{i}@example.net", body=b"x" * 5000)
    await deliver_all(store)
    clock.advance(100 * DAY)
    await mark_rolled_up(store, store.now_ms())
    progress: list[tuple[str, int]] = []
    pass_ = Purger(
        store,
        RETENTION,
        PurgePacing(
            rows=7, messages=4, body_bytes=12_000, min_pause=0.0, duty=1.0, sqlite_duty=1.0
        ),
        progress=lambda kind, n: progress.append((kind, n)),
        timer=real_reactor(),
    )
    report = await pass_.run_pass()
    assert report.message_bodies == 30 and report.messages == 30 and report.events == 60
    bodies = [n for kind, n in progress if kind == "message_bodies"]
    # 12,000 bytes a batch: two 5,000-byte bodies each (a batch takes one at least).
    assert bodies == list(range(2, 31, 2))
    assert [n for kind, n in progress if kind == "events"] == [*range(7, 60, 7), 60]
    assert await count(store, "messages") == 0 and await count(store, "events") == 0


@pytest_twisted.ensureDeferred
async def test_dry_run_counts_what_a_pass_removes(store: Store, clock: Clock) -> None:
    await send(store, "a@example.net", "b@example.net")
    await deliver_all(store)
    await store.store_feedback(NewFeedback("x@example.net", ("b+x@b.example.com",), b"r"))
    clock.advance(100 * DAY)
    await mark_rolled_up(store, store.now_ms())
    counted = await purger(store).count()
    assert counted == {
        "message_bodies": 1,
        "messages": 1,
        "recipients": 2,
        "events": 4,
        "feedback_reports": 1,
    }
    report = await purger(store).run_pass()
    assert (
        report.message_bodies,
        report.messages,
        report.recipients,
        report.events,
        report.feedback_reports,
    ) == (1, 1, 2, 4, 1)


# -- several purgers, interruptions, the service -------------------------------------------
@pytest_twisted.ensureDeferred
async def test_concurrent_purgers_delete_each_row_once(
    store: Store, clock: Clock, database_url: str
) -> None:
    for i in range(200):
        await send(store, f"r{i}@example.net", f"s{i}@example.org")
    await deliver_all(store)
    clock.advance(100 * DAY)
    await mark_rolled_up(store, store.now_ms())
    other_engine = create_engine(real_reactor(), database_url)
    await other_engine.start()
    try:
        other = Store(other_engine, clock)
        reports: list[PurgeReport] = await gatherResults(
            [
                Deferred.fromCoroutine(purger(s, rows=25, messages=10).run_pass())
                for s in (store, other, store, other)
            ]
        )
    finally:
        await other_engine.close()
    assert sum(r.message_bodies for r in reports) == 200
    assert sum(r.messages for r in reports) == 200
    assert sum(r.recipients for r in reports) == 400
    assert sum(r.events for r in reports) == 800
    assert await count(store, "messages") == 0 and await count(store, "events") == 0


@pytest_twisted.ensureDeferred
async def test_service_runs_passes_and_outlives_database_errors(store: Store, clock: Clock) -> None:
    await send(store, "a@example.net")
    await deliver_all(store)
    clock.advance(8 * DAY)
    failures = [DatabaseUnavailable("gone"), RuntimeError("bug")]

    async def store_ready() -> Store:
        if failures:
            raise failures.pop(0)
        return store

    # The service's own clock schedules the passes; the batches here pause for 0 s.
    service = PurgeService(
        store_ready,
        clock,
        RETENTION,
        PurgePacing(min_pause=0.0, duty=1.0, sqlite_duty=1.0, interval=60, first_delay=10),
    )
    service.startService()
    clock.advance(10)  # first pass: database unavailable
    clock.advance(60)  # second: a bug
    assert service.passes == 0
    clock.advance(60)  # third: works

    # Its pauses between batches run on that clock too: keep moving it.
    def passed() -> bool:
        clock.advance(0)
        return service.passes == 1

    await _until(passed)
    ((queue_id,),) = await rows(store, "SELECT queue_id FROM messages")
    assert (await body_of(store, queue_id))[0] == b""
    assert service.stopService() is None  # no pass under way
    clock.advance(600)
    assert service.passes == 1 and not clock.getDelayedCalls()


async def _until(condition: Any) -> None:
    deadline = time.monotonic() + 10.0
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await deferLater(real_reactor(), 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_stop_interrupts_a_pass_between_batches(store: Store, clock: Clock) -> None:
    for i in range(20):
        await send(store, f"r{i}@example.net")
    await deliver_all(store)
    clock.advance(8 * DAY)
    slow = Purger(store, RETENTION, PurgePacing(messages=2, min_pause=0.2), timer=real_reactor())
    running = Deferred.fromCoroutine(slow.run_pass())
    await deferLater(real_reactor(), 0.3, lambda: None)
    slow.stop()
    with pytest.raises(Exception) as stopped:
        await running
    assert type(stopped.value).__name__ == "PurgeStopped"
    left = await rows(store, "SELECT COUNT(*) FROM messages WHERE body_purged_at IS NULL")
    assert 0 < int(left[0][0]) < 20
    assert (await purger(store).run_pass()).message_bodies == int(left[0][0])


# -- SQLite gives the space back ------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_sqlite_file_shrinks_after_a_purge(tmp_path: Path) -> None:
    path = tmp_path / "shrink.db"
    clock = Clock()
    clock.advance(1_700_000_000)
    engine = create_engine(real_reactor(), f"sqlite:{path}")
    await engine.start()
    try:
        await migrate(engine, 0)
        store = Store(engine, clock)
        assert (await rows(store, "PRAGMA auto_vacuum"))[0][0] == 2  # INCREMENTAL
        assert (await rows(store, "PRAGMA page_size"))[0][0] == PAGE_SIZE
        for i in range(200):
            await send(store, f"r{i}@example.net", body=os.urandom(40_000))
        await deliver_all(store)
        await store.run("checkpoint", _execute("PRAGMA wal_checkpoint(TRUNCATE)"), readonly=True)
        full = path.stat().st_size
        clock.advance(8 * DAY)
        report = await purger(store, vacuum_pages=2000).run_pass()
        assert report.message_bodies == 200 and report.pages_freed * PAGE_SIZE > 6_000_000
        await store.run("checkpoint", _execute("PRAGMA wal_checkpoint(TRUNCATE)"), readonly=True)
        shrunk = path.stat().st_size
        assert shrunk < full - 7_000_000, (full, shrunk)
        assert (await rows(store, "PRAGMA freelist_count"))[0][0] == 0
    finally:
        await engine.close()


# -- the schema change on a database with data -----------------------------------------------
def sqlite_at_version(path: Path, version: int) -> sqlite3.Connection:
    """A new SQLite file (incremental auto-vacuum, as the engine makes them) with the schema
    deltas 1..``version`` applied and recorded, written without SmartRelay's engine; an
    autocommit connection to it."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    deltas = load_deltas()[:version]
    for delta in deltas:
        for statement in split_statements(sqlite_schema_sql(delta.sql)):
            db.execute(statement)
    db.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at BIGINT NOT NULL)"
    )
    db.executemany(
        "INSERT INTO schema_version VALUES (?, ?, 0)", [(d.version, d.name) for d in deltas]
    )
    return db


@pytest_twisted.ensureDeferred
async def test_migration_sets_finished_at_of_messages_already_finished(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite_at_version(path, 3)
    for queue_id in ("done", "open"):
        db.execute(
            "INSERT INTO messages (queue_id, received_at, sender, size, raw)"
            " VALUES (?, 1000, 's@example.com', 1, x'41')",
            (queue_id,),
        )
    db.executemany(
        "INSERT INTO recipients (queue_id, address, domain, state, next_attempt_at, updated_at)"
        " VALUES (?, ?, 'example.net', ?, ?, ?)",
        [
            ("done", "a@example.net", "delivered", None, 5000),
            ("done", "b@example.net", "bounced", None, 7000),
            ("open", "c@example.net", "delivered", None, 5000),
            ("open", "d@example.net", "deferred", 9000, 6000),
        ],
    )
    db.close()
    engine = create_engine(real_reactor(), f"sqlite:{path}")
    await engine.start()
    try:
        assert await migrate(engine, 0) == [4, *range(5, len(load_deltas()) + 1)]
        store = Store(engine, Clock())
        finished = dict(await rows(store, "SELECT queue_id, finished_at FROM messages"))
        assert finished == {"done": 7000, "open": None}
        # Version 7 moved the bodies to their own table.
        bodies = dict(await rows(store, "SELECT queue_id, raw FROM message_bodies"))
        assert {k: bytes(v) for k, v in bodies.items()} == {"done": b"A", "open": b"A"}
    finally:
        await engine.close()


# -- smartrelay-ctl purge --------------------------------------------------------------------
def _ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CTL), "--config", str(config), *args], capture_output=True, text=True, timeout=120
    )


@pytest_twisted.ensureDeferred
async def test_ctl_purge_dry_run_then_purge(
    store: Store, engine: IDatabaseEngine, tmp_path: Path, database_url: str
) -> None:
    # The fixture's clock is in 2023: to the CLI (real time) all of this is years old.
    queue_id = await send(store, "a@example.net", "b@example.net")
    await deliver_all(store)
    hour = store.clock.seconds() // 3600 * 3600
    assert await store.rollup_position() is None  # no roll-up yet: the purge does it first
    config = write_config(tmp_path, database_url)
    dry = _ctl(config, "purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "would remove 1 message bodies",
        "would remove 1 messages (2 recipients)",
        "would remove 4 events",
        "would remove 0 feedback reports",
    ]
    assert await count(store, "events") == 4
    done = _ctl(config, "purge")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:4] == [
        "removed 1 message bodies",
        "removed 1 messages (2 recipients)",
        "removed 4 events",
        "removed 0 feedback reports",
    ]
    assert await count(store, "messages") == 0 and await count(store, "events") == 0
    # The report totals outlive the events.
    totals = await store.rollup_totals(hour, hour + 3600)
    assert {key: n for key, (n, _) in totals.items()} == {
        ("received", ""): 2,
        ("delivered", ""): 2,
    }
    # The queue commands see nothing of it.
    assert _ctl(config, "queue", "list").stdout.strip() == "the queue is empty"
    for action in ("drop", "retry"):
        gone = _ctl(config, "queue", action, queue_id)
        assert gone.returncode == 1
        assert gone.stderr.strip().endswith(f"no waiting recipient for queue id {queue_id}")
    again = _ctl(config, "purge")
    assert again.stdout.splitlines()[:3] == [
        "removed 0 message bodies",
        "removed 0 messages (0 recipients)",
        "removed 0 events",
    ]


def test_ctl_purge_killed_half_way_resumes(tmp_path: Path) -> None:
    """kill -9 in the middle of a pass: every batch before it is committed whole, and the
    next pass deletes exactly the rest."""
    path = tmp_path / "big.db"
    now_ms = int(time.time() * 1000)
    old_ms = now_ms - int(200 * DAY * 1000)
    db = sqlite_at_version(path, len(load_deltas()))
    total_old, total_new = 14_000, 1_000
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO events (type, time, queue_id, recipient, data)"
        " VALUES ('delivered', ?, ?, ?, '{}')",
        [(old_ms + i, f"Q{i}", f"r{i}@example.net") for i in range(total_old)]
        + [(now_ms - 1000 + i, f"N{i}", f"n{i}@example.net") for i in range(total_new)],
    )
    db.execute("INSERT INTO rollup_progress VALUES ('rollups', ?, 0)", (now_ms,))
    db.execute("COMMIT")
    db.close()
    config = write_config(tmp_path, f"sqlite:{path}")
    process = subprocess.Popen(
        [str(CTL), "--config", str(config), "purge"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    line = process.stderr.readline()  # the first progress line: some batches are in
    assert "purging events" in line, line
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    left = sqlite3.connect(path).execute("SELECT COUNT(*) FROM events").fetchone()[0]
    assert total_new < left < total_old + total_new
    resumed = _ctl(config, "purge")
    assert resumed.returncode == 0, resumed.stderr
    assert f"removed {left - total_new} events" in resumed.stdout.splitlines()
    remaining = sqlite3.connect(path).execute("SELECT MIN(time), COUNT(*) FROM events").fetchone()
    assert remaining == (now_ms - 1000, total_new)
