"""What only the SQLite engine does: a whole transaction in one trip to the connection's
thread, and its own quick retry while another process holds the database lock."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from smartrelay.storage.engines import sqlite as sqlite_engine
from smartrelay.storage.engines.sqlite import SqliteEngine
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.migrations import migrate
from tests.conftest import real_reactor


@pytest_twisted.async_yield_fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[SqliteEngine]:
    engine = SqliteEngine(real_reactor(), str(tmp_path / "relay.db"))
    await engine.start()
    await migrate(engine, 0)
    yield engine
    await engine.close()


async def count_suppressions(engine: SqliteEngine) -> int:
    async def txn(cursor: ICursor) -> int:
        await cursor.execute("SELECT COUNT(*) FROM suppressions")
        row = cursor.fetchone()
        assert row is not None
        return int(row[0])

    return await engine.run_interaction("count", txn, readonly=True)


def insert_suppression(address: str) -> str:
    return (
        f"INSERT INTO suppressions (address, reason, created_at) VALUES ('{address}', 'manual', 0)"
    )


def hold_write_lock(path: str, seconds: float, locked: threading.Event) -> threading.Thread:
    """Another process's writer, as far as SQLite can tell: its own connection holds the
    write lock for ``seconds``, then commits a row of its own."""

    def hold() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute(insert_suppression("other@example.net"))
            locked.set()
            time.sleep(seconds)
            other.execute("COMMIT")
        finally:
            other.close()

    thread = threading.Thread(target=hold)
    thread.start()
    return thread


@pytest_twisted.ensureDeferred
async def test_a_writer_waits_for_another_connections_lock_then_commits(
    sqlite: SqliteEngine,
) -> None:
    locked = threading.Event()
    holder = hold_write_lock(sqlite.path, 0.3, locked)
    assert locked.wait(5)

    async def txn(cursor: ICursor) -> int:
        await cursor.execute(insert_suppression("ours@example.net"))
        return int(cursor.rowcount)

    started = time.monotonic()
    assert await sqlite.run_interaction("write", txn) == 1
    waited = time.monotonic() - started
    holder.join()
    assert 0.25 < waited < 5  # it waited for the lock, then got it
    assert await count_suppressions(sqlite) == 2


@pytest_twisted.ensureDeferred
async def test_a_writer_gives_up_after_the_busy_timeout(
    sqlite: SqliteEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_engine, "BUSY_TIMEOUT_SECONDS", 0.1)
    locked = threading.Event()
    holder = hold_write_lock(sqlite.path, 1.0, locked)
    assert locked.wait(5)

    async def txn(cursor: ICursor) -> None:
        await cursor.execute(insert_suppression("ours@example.net"))

    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await sqlite.run_interaction("write", txn)
    finally:
        holder.join()
    assert await count_suppressions(sqlite) == 1  # the other writer's row only


@pytest_twisted.ensureDeferred
async def test_readers_are_not_blocked_by_a_writer(sqlite: SqliteEngine) -> None:
    locked = threading.Event()
    holder = hold_write_lock(sqlite.path, 1.0, locked)
    assert locked.wait(5)
    try:
        assert await count_suppressions(sqlite) == 0  # WAL: the last committed state
        assert holder.is_alive()  # read while the other writer still held the lock
    finally:
        holder.join()


@pytest_twisted.ensureDeferred
async def test_a_transaction_must_only_wait_for_its_cursor(sqlite: SqliteEngine) -> None:
    """The transaction runs on the connection's thread; waiting there for anything the
    reactor would fire cannot work, and is refused (rolled back) instead of hanging."""
    never: Deferred[None] = Deferred()

    async def txn(cursor: ICursor) -> None:
        await cursor.execute(insert_suppression("ours@example.net"))
        await never

    with pytest.raises(RuntimeError, match="waited for something other than its SQLite cursor"):
        await sqlite.run_interaction("waits", txn)
    assert await count_suppressions(sqlite) == 0


@pytest_twisted.ensureDeferred
async def test_one_trip_to_the_thread_per_transaction(
    sqlite: SqliteEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    trips = 0
    connection_class = sqlite_engine.SqliteConnection
    original_run = connection_class.run

    def counting_run(self: sqlite_engine.SqliteConnection, *args: object) -> object:
        nonlocal trips
        trips += 1
        return original_run(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(connection_class, "run", counting_run)

    async def txn(cursor: ICursor) -> None:
        for number in range(5):
            await cursor.execute(insert_suppression(f"a{number}@example.net"))
        await cursor.execute("SELECT address FROM suppressions ORDER BY address")
        assert len(cursor.fetchall()) == 5

    await sqlite.run_interaction("five", txn)
    assert trips == 1
