"""SQLite engine: the embedded default.

sqlite3 is blocking, so each connection lives on its own dedicated thread and the cursor facade
turns every statement into a Deferred; the transaction code above cannot tell the difference
from txpostgres. WAL mode with ``synchronous=FULL``: a commit is on disk before it returns.
Writers use ``BEGIN IMMEDIATE`` so two writers queue on the database lock (busy timeout)
instead of failing on a read-to-write upgrade.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from smartrelay.reactor import IRelayReactor
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine, Row
from smartrelay.storage.pool import NotifyingCursor, PooledEngine

T = TypeVar("T")

BUSY_TIMEOUT_SECONDS = 30.0


class SqliteConnection:
    """One sqlite3 connection, opened and used only on its own thread."""

    def __init__(self, reactor: IRelayReactor, path: str, index: int) -> None:
        self._reactor = reactor
        self._path = path
        self._thread = ThreadPool(minthreads=1, maxthreads=1, name=f"sqlite-{index}")
        self._db: sqlite3.Connection | None = None

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._thread, function, *args)

    def open(self) -> Deferred[None]:
        self._thread.start()
        d = self.run(self._open_in_thread)
        d.addErrback(self._stop_thread)  # no connection: no thread left behind either
        return d

    def _open_in_thread(self) -> None:
        directory = os.path.dirname(self._path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        # isolation_level=None: no implicit transactions; the engine issues BEGIN/COMMIT.
        db = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        self._db = db

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("SQLite connection is not open")
        return self._db

    def close(self) -> Deferred[None]:
        d = self.run(self._close_in_thread)
        d.addBoth(self._stop_thread)
        return d

    def _close_in_thread(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _stop_thread(self, result: T) -> T:
        if self._thread.started:
            self._thread.stop()
        return result


def _execute(db: sqlite3.Connection, sql: str, args: Sequence[Any]) -> tuple[list[Row], int]:
    cursor = db.execute(sql, args)
    rows = cursor.fetchall()
    return rows, cursor.rowcount


def _executemany(
    db: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]
) -> tuple[list[Row], int]:
    cursor = db.executemany(sql, rows)
    return [], cursor.rowcount


def _finish(db: sqlite3.Connection, commit: bool) -> None:
    if db.in_transaction:
        db.execute("COMMIT" if commit else "ROLLBACK")


@implementer(ICursor)
class SqliteCursor(NotifyingCursor):
    """Deferred-returning facade over a thread-confined sqlite3 connection."""

    def __init__(self, connection: SqliteConnection) -> None:
        super().__init__()
        self._connection = connection
        self._rows: list[Row] = []
        self._position = 0
        self.rowcount = -1

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Deferred[None]:
        d = self._connection.run(lambda: _execute(self._connection.db, sql, args))
        return d.addCallback(self._store)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Deferred[None]:
        d = self._connection.run(lambda: _executemany(self._connection.db, sql, rows))
        return d.addCallback(self._store)

    def _store(self, result: tuple[list[Row], int]) -> None:
        self._rows, self.rowcount = result
        self._position = 0

    def fetchone(self) -> Row | None:
        if self._position >= len(self._rows):
            return None
        row = self._rows[self._position]
        self._position += 1
        return row

    def fetchall(self) -> list[Row]:
        rows = self._rows[self._position :]
        self._position = len(self._rows)
        return rows

    def notify(self, channel: str) -> Deferred[None]:
        if channel not in self.pending_notifications:
            self.pending_notifications.append(channel)
        return succeed(None)


@implementer(IDatabaseEngine)
class SqliteEngine(PooledEngine[SqliteConnection]):
    name = "sqlite"
    supports_skip_locked = False

    def __init__(self, reactor: IRelayReactor, path: str, pool_size: int = 2) -> None:
        super().__init__(pool_size)
        self._reactor = reactor
        self.path = path
        self._opened = 0

    async def _open_connection(self) -> SqliteConnection:
        connection = SqliteConnection(self._reactor, self.path, self._opened)
        self._opened += 1
        await connection.open()
        return connection

    def _close_connection(self, connection: SqliteConnection) -> Deferred[None]:
        return connection.close()

    def _make_cursor(self, connection: SqliteConnection) -> SqliteCursor:
        return SqliteCursor(connection)

    async def _begin(self, connection: SqliteConnection, readonly: bool) -> None:
        statement = "BEGIN" if readonly else "BEGIN IMMEDIATE"
        await connection.run(connection.db.execute, statement)

    async def _end(self, connection: SqliteConnection, commit: bool) -> None:
        await connection.run(_finish, connection.db, commit)

    def listen(self, channel: str, callback: Callable[[], object]) -> Deferred[None]:
        # One process owns an SQLite file, so notifications never leave it.
        self.add_local_observer(channel, callback)
        return succeed(None)

    def schema_sql(self, text: str) -> str:
        return text.replace("$ID_PK", "INTEGER PRIMARY KEY AUTOINCREMENT").replace("$BLOB", "BLOB")

    def lock_statement(self) -> str | None:
        return None  # BEGIN IMMEDIATE already serialises every writer

    def version(self) -> str:
        return f"SQLite {sqlite3.sqlite_version}"
