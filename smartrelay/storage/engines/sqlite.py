"""SQLite engine: the embedded default.

sqlite3 is blocking, so each connection lives on its own dedicated thread, and a transaction
runs there whole: BEGIN, the transaction's statements and COMMIT in one trip to the thread.
The cursor it gets executes each statement at once and hands back a fired Deferred, so the
transaction code cannot tell it from txpostgres, and the database lock is held only as long as
SQLite works, never while the reactor is busy with something else. WAL mode with
``synchronous=FULL``: a commit is on disk before it returns. Writers use ``BEGIN IMMEDIATE``,
so two writers queue on the database lock instead of failing on a read-to-write upgrade.

Waiting for the lock: SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20... ms between
tries, far longer than another process (a delivery process of the same relay) holds the lock
for one of its transactions (well under a millisecond plus an fsync), so a busy writer would
mostly sleep. The connections have no busy handler; :func:`_retrying` tries again after
0.1 ms, doubling to at most 2 ms, for up to BUSY_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from smartrelay.reactor import IRelayReactor
from smartrelay.spool import SpooledBody
from smartrelay.storage.interfaces import (
    ICursor,
    IDatabaseEngine,
    Row,
    Transaction,
    check_identifiers,
)
from smartrelay.storage.pool import DatabaseUnavailable, NotifyingCursor, PooledEngine
from smartrelay.threads import WorkerThreads

T = TypeVar("T")

log = Logger()

BUSY_TIMEOUT_SECONDS = 30.0
WAL_SIZE_LIMIT = 64 << 20
#: Bytes a page of a database file this engine creates.
PAGE_SIZE = 16384
_FIRST_RETRY = 0.0001
_LONGEST_RETRY = 0.002
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_IOERR = 10
_SQLITE_FULL = 13


class SqliteConnection:
    """One sqlite3 connection, opened and used only on its own thread."""

    def __init__(self, reactor: IRelayReactor, path: str, index: int) -> None:
        self._path = path
        self._thread = WorkerThreads(reactor, 1, name=f"sqlite-{index}")
        self._db: sqlite3.Connection | None = None

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._thread.run(function, *args)

    def open(self) -> Deferred[None]:
        self._thread.start()
        d = self.run(self._open_in_thread)
        d.addErrback(self._stop_thread)  # no connection: no thread left behind either
        return d

    def _open_in_thread(self) -> None:
        directory = os.path.dirname(self._path)
        if directory and not os.path.isdir(directory):
            # Never created here: a typo'd path would start the relay on an empty queue.
            what = "is not a directory" if os.path.exists(directory) else "does not exist"
            raise sqlite3.OperationalError(f"directory {directory} {what}")
        # isolation_level=None: no implicit transactions; the engine issues BEGIN/COMMIT.
        # timeout=0: no busy handler of SQLite's own (see the module docstring).
        db = sqlite3.connect(self._path, timeout=0, isolation_level=None)
        try:
            # A new file (no table yet) gets 16 KiB pages: a 355 KB body went in at 160-200
            # a second with 4 KiB pages, 335-385 with 16 KiB (fewer overflow pages to chain
            # and log), and small messages lost nothing (docs/performance.md). It gives
            # space back as the purge frees pages (PRAGMA incremental_vacuum). On an
            # existing file neither changes anything.
            _retrying(db.execute, f"PRAGMA page_size={PAGE_SIZE}")
            _retrying(db.execute, "PRAGMA auto_vacuum=INCREMENTAL")
            _retrying(db.execute, "PRAGMA journal_mode=WAL")
            # The WAL file shrinks back to this after a checkpoint (a purge writes a lot).
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            db.close()
            raise
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


def create_data_dir_for(database_url: str, data_dir: str) -> None:
    """Create ``[server] data_dir`` if the SQLite file of ``database_url`` is directly in it.

    The engine creates no directory (a missing one is an error when it opens the file); the
    configured data directory is the one a first start may create. Raises OSError.
    """
    if not database_url.startswith("sqlite:"):
        return
    path = database_url.removeprefix("sqlite:")
    if path.startswith("//"):
        path = path[2:]
    if path == ":memory:" or not os.path.dirname(path):
        return
    if os.path.abspath(os.path.dirname(path)) == os.path.abspath(data_dir):
        os.makedirs(data_dir, exist_ok=True)


def _retrying(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, tried again while the database is locked by another connection."""
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    pause = _FIRST_RETRY
    while True:
        try:
            return function(*args)
        except sqlite3.OperationalError as error:
            code = getattr(error, "sqlite_errorcode", None)
            if code not in (_SQLITE_BUSY, _SQLITE_LOCKED) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, _LONGEST_RETRY)


def _transaction_in_thread(
    db: sqlite3.Connection, name: str, txn: Transaction[T], readonly: bool
) -> tuple[T, list[str]]:
    """A whole transaction on the connection's thread: BEGIN, ``txn``, COMMIT.

    A full disk or an I/O error is :class:`DatabaseUnavailable`, as a PostgreSQL outage is:
    nothing of the transaction was committed (SQLite rolls back a COMMIT that fails so), and
    callers wait and try again (delivery) or answer 451 (the listeners) until space is back.
    """
    try:
        _retrying(db.execute, "BEGIN" if readonly else "BEGIN IMMEDIATE")
        cursor = SqliteCursor(db)
        try:
            result = _run_synchronously(name, txn(cursor))
            _retrying(db.execute, "COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    log.failure("rollback of {name} failed", name=name)
            raise
    except sqlite3.OperationalError as error:
        code = (getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF  # the primary result code
        if code in (_SQLITE_FULL, _SQLITE_IOERR):
            raise DatabaseUnavailable(f"{name}: {error}") from error
        raise
    return result, cursor.pending_notifications


def _run_synchronously(name: str, awaitable: Awaitable[T]) -> T:
    """The result of a transaction coroutine whose every await is a cursor call (fired)."""
    steps = awaitable.__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    steps.close()
    raise RuntimeError(f"transaction {name} waited for something other than its SQLite cursor")


@implementer(ICursor)
class SqliteCursor(NotifyingCursor):
    """Runs each statement at once, on the connection's thread (inside a transaction there)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        super().__init__()
        self._db = db
        self._rows: list[Row] = []
        self._position = 0
        self.rowcount = -1

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Deferred[None]:
        try:
            cursor = _retrying(self._db.execute, sql, args)
            self._rows = cursor.fetchall()
        except Exception:
            return fail()
        self.rowcount = cursor.rowcount
        self._position = 0
        return succeed(None)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Deferred[None]:
        try:
            cursor = _retrying(self._db.executemany, sql, rows)
        except Exception:
            return fail()
        self._rows, self.rowcount, self._position = [], cursor.rowcount, 0
        return succeed(None)

    def write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> Deferred[None]:
        # A transaction runs whole on the connection's thread: no round trip to save.
        return self.executemany(sql, rows)

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

    def read_blob(self, table: str, column: str, key_column: str, key: str) -> Deferred[bytes]:
        try:
            table, column, key_column = check_identifiers(table, column, key_column)
            rows = _retrying(
                self._db.execute, f"SELECT rowid FROM {table} WHERE {key_column} = ?", (key,)
            ).fetchall()
            if len(rows) != 1:
                raise RuntimeError(f"read_blob: no single {table} row for {key!r}")
            # Incremental blob I/O: read straight into the bytes returned (SELECT would
            # assemble the value in SQLite's memory first, then copy it).
            with self._db.blobopen(table, column, int(rows[0][0]), readonly=True) as blob:
                data = blob.read()
        except Exception:
            return fail()
        return succeed(data)

    def write_blob(
        self, table: str, column: str, key_column: str, key: str, head: bytes, body: SpooledBody
    ) -> Deferred[None]:
        try:
            _write_blob(self._db, (table, column, key_column), key, head, body)
        except Exception:
            return fail()
        self._rows, self._position = [], 0
        return succeed(None)


def _write_blob(
    db: sqlite3.Connection,
    names: tuple[str, str, str],
    key: str,
    head: bytes,
    body: SpooledBody,
) -> None:
    """SQLite's incremental blob I/O: the row gets a zero-filled blob of the final size, then
    the file is copied into it piece by piece (memory: one piece, not the message)."""
    table, column, key_column = check_identifiers(*names)
    size = len(head) + body.size
    cursor = _retrying(
        db.execute,
        f"UPDATE {table} SET {column} = zeroblob(?) WHERE {key_column} = ? RETURNING rowid",
        (size, key),
    )
    rows = cursor.fetchall()
    if len(rows) != 1:
        raise RuntimeError(f"write_blob: no single {table} row for {key!r}")
    written = 0
    with db.blobopen(table, column, int(rows[0][0])) as blob:
        for piece in (head, *body.chunks()):
            if written + len(piece) > size:
                raise RuntimeError(f"write_blob: {body.path} grew while being stored")
            blob.write(piece)
            written += len(piece)
    if written != size:
        raise RuntimeError(f"write_blob: {body.path} shrank while being stored")


@implementer(IDatabaseEngine)
class SqliteEngine(PooledEngine[SqliteConnection]):
    name = "sqlite"
    supports_skip_locked = False

    def __init__(self, reactor: IRelayReactor, path: str, pool_size: int | None = None) -> None:
        super().__init__(2 if pool_size is None else pool_size, reactor)
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

    async def _transact(
        self, connection: SqliteConnection, name: str, txn: Transaction[T], readonly: bool
    ) -> tuple[T, Sequence[str]]:
        return await connection.run(_transaction_in_thread, connection.db, name, txn, readonly)

    def listen(self, channel: str, callback: Callable[[], object]) -> Deferred[None]:
        # One process owns an SQLite file, so notifications never leave it.
        self.add_local_observer(channel, callback)
        return succeed(None)

    def schema_sql(self, text: str) -> str:
        return schema_sql(text)

    def lock_statement(self) -> str | None:
        return None  # BEGIN IMMEDIATE already serialises every writer

    def version(self) -> str:
        return f"SQLite {sqlite3.sqlite_version}"


def schema_sql(text: str) -> str:
    """A schema delta's portable SQL as SQLite runs it (its ``$`` tokens replaced)."""
    return (
        text.replace("$ID_PK", "INTEGER PRIMARY KEY AUTOINCREMENT")
        .replace("$BLOB", "BLOB")
        .replace("$WITHOUT_ROWID", "WITHOUT ROWID")
        .replace("$EVENT_TXID_INDEX", "")
        .replace("$EVENT_TXID", "INTEGER NOT NULL DEFAULT 0")
    )
