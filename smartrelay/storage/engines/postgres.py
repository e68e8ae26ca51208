"""PostgreSQL engine through txpostgres (psycopg2's asynchronous mode on the reactor).

Several relay processes or hosts may share one database: due work is claimed with
``FOR UPDATE SKIP LOCKED`` and a NOTIFY sent inside a transaction wakes every node's
listener when (and only if) it commits.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from txpostgres.txpostgres import Connection, Cursor
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
from smartrelay.storage.pool import NotifyingCursor, PooledEngine

log = Logger()
T = TypeVar("T")

_CHANNEL = re.compile(r"^[a-z_][a-z0-9_]*$")
# "INSERT INTO t (a, b) VALUES (?, 'x', ?)" with nothing after the values group.
_INSERT_VALUES = re.compile(r"^(\s*INSERT\s+INTO\s.*?\sVALUES\s*)(\([^()]*\))\s*$", re.I | re.S)
_ROWS_PER_INSERT = 500
BLOB_PIECE = 1 << 20  # bytes of a big value read or written per statement


@lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """``?`` placeholders (the portable form) to psycopg2's ``%s``; literal ``%`` doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


def _plain_row(row: Row) -> Row:
    return tuple(_plain(v) for v in row)


@implementer(ICursor)
class PostgresCursor(NotifyingCursor):
    """``begin``: a statement (BEGIN) sent in front of the first statement, in the same round
    trip; ``begun`` says whether it was sent."""

    def __init__(self, cursor: Cursor, begin: str | None = None) -> None:
        super().__init__()
        self._cursor = cursor
        self._has_rows = False
        self._begin = begin
        self.begun = False
        self.rowcount = -1

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Deferred[None]:
        query = to_pyformat(sql)
        if self._begin is not None:
            # psycopg2 sends one query string (parameters are bound on our side), and
            # PostgreSQL runs its statements in order: BEGIN costs no round trip of its own.
            query, self._begin, self.begun = f"{self._begin}; {query}", None, True
        d = self._cursor.execute(query, tuple(args))
        return d.addCallback(self._executed)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._executemany(sql, rows))

    async def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        # psycopg2's async mode has no executemany. An INSERT ... VALUES (...) becomes one
        # multi-row INSERT per chunk (one round trip); anything else runs row by row.
        match = _INSERT_VALUES.match(sql)
        total = 0
        if match is None:
            for row in rows:
                await self.execute(sql, row)
                total += max(self.rowcount, 0)
        else:
            head, group = match[1], match[2]
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start : start + _ROWS_PER_INSERT]
                flat = [value for row in chunk for value in row]
                await self.execute(head + ", ".join([group] * len(chunk)), flat)
                total += max(self.rowcount, 0)
        self._has_rows = False
        self.rowcount = total

    def _executed(self, _: object) -> None:
        self._has_rows = self._cursor.description is not None
        self.rowcount = self._cursor.rowcount

    def fetchone(self) -> Row | None:
        if not self._has_rows:
            return None
        row = self._cursor.fetchone()
        return None if row is None else _plain_row(row)

    def fetchall(self) -> list[Row]:
        if not self._has_rows:
            return []
        return [_plain_row(r) for r in self._cursor.fetchall()]

    def notify(self, channel: str) -> Deferred[None]:
        if not _CHANNEL.match(channel):
            raise ValueError(f"bad notification channel {channel!r}")
        return self.execute(f"NOTIFY {channel}")

    def read_blob(self, table: str, column: str, key_column: str, key: str) -> Deferred[bytes]:
        return Deferred.fromCoroutine(
            self._read_blob(check_identifiers(table, column, key_column), key)
        )

    async def _read_blob(self, names: tuple[str, ...], key: str) -> bytes:
        """In pieces of BLOB_PIECE bytes: a bytea comes back hex-encoded, so a whole big
        value would be in memory as text, then as a buffer, then as bytes."""
        table, column, key_column = names
        await self.execute(f"SELECT length({column}) FROM {table} WHERE {key_column} = ?", (key,))
        row = self.fetchone()
        if row is None:
            raise RuntimeError(f"read_blob: no {table} row for {key!r}")
        data = bytearray(int(row[0]))
        for start in range(0, len(data), BLOB_PIECE):
            await self.execute(
                f"SELECT substring({column} FROM ? FOR ?) FROM {table} WHERE {key_column} = ?",
                (start + 1, BLOB_PIECE, key),
            )
            piece = self.fetchone()
            assert piece is not None
            data[start : start + BLOB_PIECE] = piece[0]
        return bytes(data)

    def write_blob(
        self, table: str, column: str, key_column: str, key: str, head: bytes, body: SpooledBody
    ) -> Deferred[None]:
        return Deferred.fromCoroutine(
            self._write_blob(check_identifiers(table, column, key_column), key, head, body)
        )

    async def _write_blob(
        self, names: tuple[str, ...], key: str, head: bytes, body: SpooledBody
    ) -> None:
        """psycopg2 puts a parameter into the query text, hex-escaped: a 25 MB body would be
        in memory four times or more. Instead the file goes, in pieces, into a temporary large
        object (``lo_put`` appends without rewriting), which the server then copies into the
        row (``lo_get``) and drops, all inside the transaction."""
        table, column, key_column = names
        await self.execute("SELECT lo_create(0)")
        row = self.fetchone()
        assert row is not None
        oid = int(row[0])
        offset = 0
        for piece in itertools.chain((head,), body.chunks()):
            if piece:
                await self.execute("SELECT lo_put(CAST(? AS oid), ?, ?)", (oid, offset, piece))
                offset += len(piece)
        if offset != len(head) + body.size:
            raise RuntimeError(f"write_blob: {body.path} changed while being stored")
        await self.execute(
            f"UPDATE {table} SET {column} = lo_get(CAST(? AS oid)) WHERE {key_column} = ?",
            (oid, key),
        )
        await self.execute("SELECT lo_unlink(CAST(? AS oid))", (oid,))


@implementer(IDatabaseEngine)
class PostgresEngine(PooledEngine[Connection]):
    name = "postgresql"
    supports_skip_locked = True

    def __init__(self, reactor: IRelayReactor, dsn: str, pool_size: int = 4) -> None:
        super().__init__(pool_size)
        self._reactor = reactor
        self._dsn = dsn
        # txpostgres hands NOTIFY observers to a Cooperator; give it one on our reactor.
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))
        self._listener: Connection | None = None
        self._channels: dict[str, list[Callable[[], object]]] = {}
        self._server_version = "?"

    def _new_connection(self) -> Connection:
        return Connection(reactor=self._reactor, cooperator=self._cooperator)

    async def _open_connection(self) -> Connection:
        connection = self._new_connection()
        await connection.connect(self._dsn)
        if self._server_version == "?":
            cursor = connection.cursor()
            await cursor.execute("SHOW server_version")
            row = cursor.fetchone()
            self._server_version = str(row[0]) if row else "?"
        return connection

    def _close_connection(self, connection: Connection) -> Deferred[None]:
        connection.close()
        return succeed(None)

    async def _transact(
        self, connection: Connection, name: str, txn: Transaction[T], readonly: bool
    ) -> tuple[T, Sequence[str]]:
        if readonly:
            # At READ COMMITTED (PostgreSQL's default level) each statement of a transaction
            # sees what was committed when it started, so a read-only transaction is the same
            # as its statements run on their own: no BEGIN and COMMIT round trips.
            cursor = PostgresCursor(connection.cursor())
            return await txn(cursor), cursor.pending_notifications
        cursor = PostgresCursor(connection.cursor(), begin="BEGIN")
        try:
            result = await txn(cursor)
            if cursor.begun:
                await connection.cursor().execute("COMMIT")
        except BaseException:
            if cursor.begun:
                try:
                    await connection.cursor().execute("ROLLBACK")
                except Exception:
                    log.failure("rollback of {name} failed", name=name)
            raise
        return result, cursor.pending_notifications

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await super()._close()

    def listen(self, channel: str, callback: Callable[[], object]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._listen(channel, callback))

    async def _listen(self, channel: str, callback: Callable[[], object]) -> None:
        if not _CHANNEL.match(channel):
            raise ValueError(f"bad notification channel {channel!r}")
        if self._listener is None:
            listener = self._new_connection()
            await listener.connect(self._dsn)
            if self._closed:  # closed while we were connecting
                listener.close()
                raise RuntimeError("database closed")
            self._listener = listener
            listener.addNotifyObserver(self._on_notify)
        if channel not in self._channels:
            await self._listener.runOperation(f"LISTEN {channel}")
        self._channels.setdefault(channel, []).append(callback)

    def _on_notify(self, notify: Any) -> None:
        for callback in self._channels.get(notify.channel, ()):
            try:
                callback()
            except Exception:
                log.failure("notification observer for {channel} failed", channel=notify.channel)

    def schema_sql(self, text: str) -> str:
        return text.replace(
            "$ID_PK", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
        ).replace("$BLOB", "BYTEA")

    def lock_statement(self) -> str | None:
        return "SELECT pg_advisory_xact_lock(hashtext(?))"

    def version(self) -> str:
        return f"PostgreSQL {self._server_version}"
