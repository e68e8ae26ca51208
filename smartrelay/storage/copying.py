"""Copy every row of one SmartRelay database into another, fresh one (``smartrelay-ctl
copy-data``): SQLite to PostgreSQL, or back.

The target is migrated to the source's schema version first and must be empty. Each table is
read in primary-key order by keyset (``WHERE key > last``, never OFFSET), up to the last key it
had when its copy began, and written a batch per target transaction: at most
:data:`ROWS_PER_BATCH` rows, and for the tables with raw bodies at most :data:`BATCH_BYTES`
bytes of them, a body bigger than :data:`BIG_VALUE` alone (read with ``read_blob``, written
with ``write_blob`` from a temporary file), so memory stays flat whatever the database holds.
Ids are kept (``recipients.id`` is inside every tracking and unsubscribe token sent,
``events.id`` is the export cursor) and the target's id counters are set past them. At the
end every table's row count is compared on both sides.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from smartrelay.spool import SpooledBody
from smartrelay.storage.base import marks, to_ms
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine, Row, check_identifiers
from smartrelay.storage.migrations import current_version, migrate

#: Rows per target transaction.
ROWS_PER_BATCH = 1000
#: Bytes of raw bodies per target transaction. psycopg2 holds a batch about six times over
#: while it sends it (hex-escaped parameters, then the statement), so this stays small.
BATCH_BYTES = 2 << 20
#: A body bigger than this is read with ``read_blob`` and written with ``write_blob``.
BIG_VALUE = 1 << 20
#: Seconds between two progress lines of one table.
PROGRESS_INTERVAL = 2.0


class CopyError(Exception):
    """The copy was refused or failed; the message is one line for the user."""


@frozen
class Table:
    """One table to copy. ``key``: its primary key columns (the keyset order); ``blob``: a
    column of raw bodies (only with a single text key); ``identity``: an auto-increment id
    column whose counter the target must continue; ``queue``: part of the delivery queue."""

    name: str
    key: tuple[str, ...]
    blob: str | None = None
    identity: str | None = None
    queue: bool = False
    #: Columns written as 0 whatever the source holds: ``events.txid`` (copied history comes
    #: first, in id order, docs/storage.md "Event positions"; a source's transaction ids mean
    #: nothing in the target).
    zeroed: tuple[str, ...] = ()


#: Every data table, in copy order (messages before the recipients that reference them).
#: ``schema_version`` is not copied: the target is migrated to the same version instead.
TABLES = (
    Table("suppressions", ("address",)),
    Table("smtp_credentials", ("name",)),
    Table("credential_volume", ("credential",)),
    Table("api_tokens", ("name",)),
    Table("webhook_endpoints", ("url",)),
    Table("webhook_dead_letters", ("id",), identity="id"),
    Table("web_users", ("name",)),
    Table("web_sessions", ("token_hash",)),
    Table("web_login_failures", ("key",)),
    Table("feedback_reports", ("report_id",), blob="raw"),
    Table("mailbox_messages", ("mailbox", "uid")),
    Table("rollup_progress", ("name",)),
    Table("rollups", ("hour", "tag", "sender_domain", "recipient_domain", "type", "detail")),
    Table("rollup_urls", ("hour", "tag", "url")),
    Table("rollup_urls_by_day", ("tag", "day", "url")),
    Table("rollups_by_tag", ("tag", "hour", "type", "detail")),
    Table("rollups_by_domain_day", ("tag", "day", "recipient_domain", "type")),
    Table("mta_sts_policies", ("domain",)),
    Table("tls_report_results", ("day", "policy_domain", "policy_id", "result", "mx_host")),
    Table("events", ("id",), identity="id", zeroed=("txid",)),
    Table("messages", ("queue_id",), queue=True),
    Table("message_bodies", ("queue_id",), blob="raw", queue=True),
    Table("message_terms", ("term", "received_at", "queue_id"), queue=True),
    Table("recipients", ("id",), identity="id", queue=True),
)


@frozen
class CopiedTable:
    name: str
    rows: int


@frozen
class CopyReport:
    schema_version: int
    tables: tuple[CopiedTable, ...]


_BY_NAME = {table.name: table for table in TABLES}
Progress = Callable[[str, int, int], None]


class ProgressLines:
    """``table: copied / total rows`` on ``out``, at most every ``interval`` seconds per table
    and once when the table is done."""

    def __init__(self, clock: IReactorTime, out: TextIO, interval: float = PROGRESS_INTERVAL):
        self._clock = clock
        self._out = out
        self._interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, table: str, copied: int, total: int) -> None:
        now = self._clock.seconds()
        done = copied >= total
        if not done and now - self._last.get(table, float("-inf")) < self._interval:
            return
        self._last[table] = now
        self._out.write(f"{table}: {copied} / {total} rows\n")
        self._out.flush()


def _key_sql(key: Sequence[str], op: str) -> str:
    """``key op (?...)`` for a one- or many-column key (a row-value comparison)."""
    if len(key) == 1:
        return f"{key[0]} {op} ?"
    return f"({', '.join(key)}) {op} ({marks(len(key))})"


async def _columns(engine: IDatabaseEngine, table: str) -> tuple[str, ...]:
    """The table's column names in their order (each engine has its catalogue)."""
    if engine.name == "sqlite":
        sql = "SELECT name FROM pragma_table_info(?) ORDER BY cid"
    else:
        sql = (
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position"
        )

    async def txn(cursor: ICursor) -> tuple[str, ...]:
        await cursor.execute(sql, (table,))
        return tuple(str(row[0]) for row in cursor.fetchall())

    return check_identifiers(*await engine.run_interaction("copy_columns", txn, readonly=True))


async def _next_id(engine: IDatabaseEngine, table: str, column: str) -> int:
    """The id the table's counter would give next (which may be past the largest id still in
    the table, when the newest rows were deleted)."""

    async def txn(cursor: ICursor) -> int:
        await cursor.execute(f"SELECT MAX({column}) FROM {table}")
        row = cursor.fetchone()
        largest = int(row[0]) if row and row[0] is not None else 0
        if engine.name == "sqlite":
            await cursor.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,))
        else:
            await cursor.execute(
                "SELECT pg_sequence_last_value(CAST(pg_get_serial_sequence(?, ?) AS regclass))",
                (table, column),
            )
        row = cursor.fetchone()
        counter = int(row[0]) if row and row[0] is not None else 0
        return max(largest, counter) + 1

    return await engine.run_interaction("copy_next_id", txn, readonly=True)


async def _set_next_id(engine: IDatabaseEngine, table: str, column: str, next_id: int) -> None:
    """Make the table's counter give ``next_id`` (or more) next."""

    if next_id <= 1:
        return

    async def txn(cursor: ICursor) -> None:
        if engine.name == "sqlite":
            # AUTOINCREMENT keeps the largest id ever used in sqlite_sequence (explicit ids
            # included); it is an ordinary table.
            await cursor.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,))
            row = cursor.fetchone()
            if row is None:
                await cursor.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, next_id - 1)
                )
            elif int(row[0]) < next_id - 1:
                await cursor.execute(
                    "UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (next_id - 1, table)
                )
        else:
            await cursor.execute(
                "SELECT setval(CAST(pg_get_serial_sequence(?, ?) AS regclass), ?, false)",
                (table, column, next_id),
            )

    await engine.run_interaction("copy_set_next_id", txn)


async def _count(engine: IDatabaseEngine, table: Table, upto: Row | None = None) -> int:
    """Rows of ``table`` (with a key up to ``upto``, when given)."""
    where = "" if upto is None else f" WHERE {_key_sql(table.key, '<=')}"

    async def txn(cursor: ICursor) -> int:
        await cursor.execute(f"SELECT COUNT(*) FROM {table.name}{where}", upto or ())
        row = cursor.fetchone()
        return int(row[0]) if row else 0

    return await engine.run_interaction("copy_count", txn, readonly=True)


async def _has_rows(engine: IDatabaseEngine, table: str) -> bool:
    async def txn(cursor: ICursor) -> bool:
        await cursor.execute(f"SELECT 1 FROM {table} LIMIT 1")
        return cursor.fetchone() is not None

    return await engine.run_interaction("copy_has_rows", txn, readonly=True)


async def _last_key(engine: IDatabaseEngine, table: Table) -> Row | None:
    order = ", ".join(f"{column} DESC" for column in table.key)

    async def txn(cursor: ICursor) -> Row | None:
        await cursor.execute(
            f"SELECT {', '.join(table.key)} FROM {table.name} ORDER BY {order} LIMIT 1"
        )
        return cursor.fetchone()

    return await engine.run_interaction("copy_last_key", txn, readonly=True)


async def _live_leases(engine: IDatabaseEngine, now_ms: int) -> int:
    async def txn(cursor: ICursor) -> int:
        await cursor.execute(
            "SELECT COUNT(*) FROM recipients WHERE state = 'delivering' AND next_attempt_at > ?",
            (now_ms,),
        )
        row = cursor.fetchone()
        return int(row[0]) if row else 0

    return await engine.run_interaction("copy_leases", txn, readonly=True)


@frozen
class _Batch:
    """Rows read from the source; ``big``: the one row's body when it is a big one (its
    column in ``rows`` is then empty)."""

    rows: list[Row]
    big: bytes | None = None


class _TableCopy:
    """One table, batch by batch, from ``source`` to ``target``."""

    def __init__(
        self,
        source: IDatabaseEngine,
        target: IDatabaseEngine,
        table: Table,
        columns: tuple[str, ...],
        upto: Row,
        spool_dir: str,
    ) -> None:
        self.source = source
        self.target = target
        self.table = table
        self.columns = columns
        self.upto = upto
        self.spool_dir = spool_dir
        self._key_at = tuple(columns.index(column) for column in table.key)
        self._blob_at = None if table.blob is None else columns.index(table.blob)
        names = ", ".join(columns)
        self._select = f"SELECT {names} FROM {table.name}"
        self._insert = f"INSERT INTO {table.name} ({names}) VALUES ({marks(len(columns))})"
        self._order = " ORDER BY " + ", ".join(table.key)
        self._zeroed_at = tuple(columns.index(column) for column in table.zeroed)

    def _range(self, after: Row | None, upto: Row) -> tuple[str, tuple[Any, ...]]:
        where = _key_sql(self.table.key, "<=")
        if after is None:
            return f" WHERE {where}", tuple(upto)
        return f" WHERE {_key_sql(self.table.key, '>')} AND {where}", (*after, *upto)

    def key_of(self, row: Row) -> Row:
        return tuple(row[i] for i in self._key_at)

    def _zero(self, row: Row) -> Row:
        values = list(row)
        for i in self._zeroed_at:
            values[i] = "0"
        return tuple(values)

    async def read(self, after: Row | None) -> _Batch:
        if self.table.blob is None:
            return await self.source.run_interaction(
                f"copy_read_{self.table.name}", lambda c: self._read_rows(c, after), readonly=True
            )
        return await self.source.run_interaction(
            f"copy_read_{self.table.name}", lambda c: self._read_bodies(c, after), readonly=True
        )

    async def _read_rows(self, cursor: ICursor, after: Row | None) -> _Batch:
        where, args = self._range(after, self.upto)
        await cursor.execute(f"{self._select}{where}{self._order} LIMIT ?", (*args, ROWS_PER_BATCH))
        return _Batch(cursor.fetchall())

    async def _read_bodies(self, cursor: ICursor, after: Row | None) -> _Batch:
        """The next rows whose bodies add up to at most BATCH_BYTES, or one big one alone.
        Their sizes are read first (``length`` reads no body on either engine)."""
        table, blob = self.table.name, self.table.blob
        assert blob is not None and self._blob_at is not None
        where, args = self._range(after, self.upto)
        key = ", ".join(self.table.key)
        await cursor.execute(
            f"SELECT {key}, length({blob}) FROM {table}{where}{self._order} LIMIT ?",
            (*args, ROWS_PER_BATCH),
        )
        sizes = cursor.fetchall()
        if not sizes:
            return _Batch([])
        first_size = int(sizes[0][-1])
        if first_size > BIG_VALUE:
            first = tuple(sizes[0][:-1])
            (key_column,) = self.table.key
            others = ", ".join("NULL" if c == blob else c for c in self.columns)
            await cursor.execute(f"SELECT {others} FROM {table} WHERE {key_column} = ?", first)
            row = cursor.fetchone()
            if row is None:  # deleted since (a relay running while history is copied)
                return _Batch([])
            body = await cursor.read_blob(table, blob, key_column, first[0])
            return _Batch([row], body)
        total, upto = 0, tuple(sizes[0][:-1])
        for size_row in sizes:
            size = int(size_row[-1])
            if size > BIG_VALUE or total + size > BATCH_BYTES:
                break
            total += size
            upto = tuple(size_row[:-1])
        where, args = self._range(after, upto)
        await cursor.execute(f"{self._select}{where}{self._order}", args)
        return _Batch(cursor.fetchall())

    async def write(self, batch: _Batch) -> None:
        if batch.big is None:
            rows = batch.rows
            if self._zeroed_at:
                # As text: PostgreSQL takes '0' for an xid8, SQLite stores it as an integer.
                rows = [self._zero(row) for row in rows]
            await self.target.run_interaction(
                f"copy_write_{self.table.name}", lambda c: c.executemany(self._insert, rows)
            )
            return
        blob = self.table.blob
        assert blob is not None and self._blob_at is not None
        (row,) = batch.rows
        (key_column,) = self.table.key
        key = row[self._key_at[0]]
        # From a file, so that the engine can write it in pieces (psycopg2 would otherwise
        # put the whole value hex-escaped into the statement).
        fd, path = tempfile.mkstemp(prefix="copy-", dir=self.spool_dir)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(batch.big)
            body = SpooledBody(path, len(batch.big))
            empty = list(row)
            empty[self._blob_at] = b""

            async def txn(cursor: ICursor) -> None:
                await cursor.execute(self._insert, empty)
                await cursor.write_blob(self.table.name, blob, key_column, key, b"", body)

            await self.target.run_interaction(f"copy_write_{self.table.name}", txn)
        finally:
            os.unlink(path)


async def copy_data(
    source: IDatabaseEngine,
    target: IDatabaseEngine,
    clock: IReactorTime,
    with_queue: bool = True,
    progress: Progress | None = None,
    spool_dir: str | None = None,
) -> CopyReport:
    """Copy the data tables of ``source`` into ``target`` (started engines).

    ``with_queue``: also messages and recipients, which needs the relay stopped (refused while
    any recipient has a lease in the future; fails if messages arrived during the copy).
    Without it, the history only, which a running relay does not disturb. ``spool_dir``: where
    a big body is put on its way (the system's temporary directory by default). Raises
    :class:`CopyError` (and :class:`~smartrelay.storage.migrations.SchemaError`).
    """
    version = await current_version(source)
    await migrate(target, to_ms(clock.seconds()))
    target_version = await current_version(target)
    if target_version != version:
        raise CopyError(
            f"the source database is at schema version {version}, the target at"
            f" {target_version}; run 'smartrelay-ctl migrate' on the source first"
        )
    tables = [t for t in TABLES if with_queue or not t.queue]
    columns: dict[str, tuple[str, ...]] = {}
    for table in tables:
        columns[table.name] = await _columns(source, table.name)
        if set(columns[table.name]) != set(await _columns(target, table.name)):
            raise CopyError(f"table {table.name} has different columns in the target")
    filled = [t.name for t in TABLES if await _has_rows(target, t.name)]
    if filled:
        raise CopyError(
            f"the target database is not empty (table(s) {', '.join(filled)}):"
            " copy into a fresh database"
        )
    messages_before = 0
    if with_queue:
        leases = await _live_leases(source, to_ms(clock.seconds()))
        if leases:
            raise CopyError(
                f"{leases} recipient(s) are being delivered right now (a lease in the future):"
                " stop the relay first, or copy the history only with --without-queue"
            )
        messages_before = await _count(source, _BY_NAME["messages"])

    with tempfile.TemporaryDirectory(prefix="smartrelay-copy-", dir=spool_dir) as spool:
        copied: list[tuple[Table, Row | None, int]] = []
        for table in tables:
            upto = await _last_key(source, table)
            rows = 0
            if upto is not None:
                total = await _count(source, table, upto)
                rows = await _copy_table(
                    _TableCopy(source, target, table, columns[table.name], upto, spool),
                    total,
                    progress,
                )
            elif progress is not None:
                progress(table.name, 0, 0)
            copied.append((table, upto, rows))

    if source.name != "sqlite":
        await _convert_webhook_positions(source, target)

    for table in tables:
        if table.identity is not None:
            next_id = await _next_id(source, table.name, table.identity)
            await _set_next_id(target, table.name, table.identity, next_id)

    if with_queue:
        messages_after = await _count(source, _BY_NAME["messages"])
        leases = await _live_leases(source, to_ms(clock.seconds()))
        if messages_after != messages_before or leases:
            raise CopyError(
                "the relay was running during the copy"
                f" ({messages_before} messages before, {messages_after} after,"
                f" {leases} recipient(s) being delivered): stop it and copy again into a"
                " fresh database"
            )
    differences = []
    for table, upto, rows in copied:
        in_source = 0 if upto is None else await _count(source, table, upto)
        in_target = await _count(target, table)
        if not in_source == in_target == rows:
            differences.append(
                f"{table.name}: {in_source} in the source, {in_target} in the target"
                f" ({rows} copied)"
            )
    if differences:
        raise CopyError(
            "row counts differ after the copy (the source changed while it was copied?): "
            + "; ".join(differences)
        )
    return CopyReport(version, tuple(CopiedTable(t.name, rows) for t, _, rows in copied))


async def _copy_table(copy: _TableCopy, total: int, progress: Progress | None) -> int:
    rows = 0
    after: Row | None = None
    while True:
        batch = await copy.read(after)
        if not batch.rows:
            break
        await copy.write(batch)
        rows += len(batch.rows)
        after = copy.key_of(batch.rows[-1])
        if progress is not None:
            progress(copy.table.name, rows, max(total, rows))
    if progress is not None and rows < total:
        progress(copy.table.name, rows, total)
    return rows


async def _convert_webhook_positions(source: IDatabaseEngine, target: IDatabaseEngine) -> None:
    """Webhook positions from a PostgreSQL source, made positions among the copied events
    (which all have txid 0 in the target, in id order).

    A position up to which events are done (an endpoint's, a dead letter's ``after`` and its
    replay progress) ``(x, i)`` becomes ``(0, j)``, ``j`` the smallest id among the source's
    events after ``(x, i)``, less one (the source's largest id when there is none): no event
    after it is passed over; some before it may be sent again. A dead letter's ``upto`` (the
    end of a range to send) becomes the largest id among the events at or before it, so that
    its range keeps every event it had (and maybe more)."""

    async def done_upto(cursor: ICursor, txid: int, event_id: int) -> int:
        await cursor.execute(
            "SELECT MIN(id) FROM events WHERE (txid, id) > (CAST(? AS xid8), ?)",
            (str(txid), event_id),
        )
        row = cursor.fetchone()
        if row is not None and row[0] is not None:
            return int(row[0]) - 1
        await cursor.execute("SELECT MAX(id) FROM events")
        row = cursor.fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    async def range_end(cursor: ICursor, txid: int, event_id: int) -> int:
        await cursor.execute(
            "SELECT MAX(id) FROM events WHERE (txid, id) <= (CAST(? AS xid8), ?)",
            (str(txid), event_id),
        )
        row = cursor.fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    async def read(cursor: ICursor) -> tuple[list[Row], list[Row]]:
        await cursor.execute("SELECT url, position_txid, position_id FROM webhook_endpoints")
        endpoints = cursor.fetchall()
        await cursor.execute(
            "SELECT id, after_txid, after_id, upto_txid, upto_id, replay_txid, replay_id"
            " FROM webhook_dead_letters"
        )
        return endpoints, cursor.fetchall()

    async def convert(cursor: ICursor) -> tuple[list[Row], list[Row]]:
        endpoints, dead = await read(cursor)
        new_endpoints: list[Row] = []
        for url, txid, event_id in endpoints:
            new_endpoints.append((await done_upto(cursor, int(txid), int(event_id)), url))
        new_dead: list[Row] = []
        for dead_id, after_txid, after_id, upto_txid, upto_id, replay_txid, replay_id in dead:
            after = await done_upto(cursor, int(after_txid), int(after_id))
            upto = max(after, await range_end(cursor, int(upto_txid), int(upto_id)))
            replay = None
            if replay_txid is not None and replay_id is not None:
                replay = await done_upto(cursor, int(replay_txid), int(replay_id))
            new_dead.append((after, upto, None if replay is None else 0, replay, dead_id))
        return new_endpoints, new_dead

    endpoints, dead = await source.run_interaction("copy_webhook_positions", convert, readonly=True)

    async def write(cursor: ICursor) -> None:
        if endpoints:
            await cursor.executemany(
                "UPDATE webhook_endpoints SET position_txid = 0, position_id = ? WHERE url = ?",
                endpoints,
            )
        if dead:
            await cursor.executemany(
                "UPDATE webhook_dead_letters SET after_txid = 0, after_id = ?, upto_txid = 0,"
                " upto_id = ?, replay_txid = ?, replay_id = ? WHERE id = ?",
                dead,
            )

    await target.run_interaction("copy_webhook_positions", write)
