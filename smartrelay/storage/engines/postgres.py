"""PostgreSQL engine through txpostgres (psycopg2's asynchronous mode on the reactor).

Several relay processes or hosts may share one database: due work is claimed with
``FOR UPDATE SKIP LOCKED`` and a NOTIFY sent inside a transaction wakes every node's
listener when (and only if) it commits.
"""

from __future__ import annotations

import codecs
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any, TypeVar

import psycopg2
from psycopg2.extensions import ISQLQuote
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
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
from smartrelay.storage.pool import (
    CONNECT_TIMEOUT,
    RECONNECT_MAX,
    RECONNECT_MIN,
    CommitOutcomeUnknown,
    DatabaseUnavailable,
    NotifyingCursor,
    PooledEngine,
)

log = Logger()
T = TypeVar("T")

_CHANNEL = re.compile(r"^[a-z_][a-z0-9_]*$")
# "INSERT INTO t (a, b) VALUES (?, 'x', ?)" with nothing after the values group.
_INSERT_VALUES = re.compile(r"^(\s*INSERT\s+INTO\s.*?\sVALUES\s*)(\([^()]*\))\s*$", re.I | re.S)
_ROWS_PER_INSERT = 500
BLOB_PIECE = 1 << 20  # bytes of a big value read or written per statement
#: SQLSTATE classes and codes after which the server has ended the session: 08 (connection
#: exception), 57P01 admin_shutdown (pg_ctl stop/restart -m fast), 57P02 crash_shutdown,
#: 57P03 cannot_connect_now (starting up or shutting down).
_DISCONNECT_CODES = ("57P01", "57P02", "57P03")


def is_disconnect(connection: Connection, error: BaseException) -> bool:
    """The error means ``connection`` is gone (and anything uncommitted on it rolled back)."""
    if connection.closed:  # psycopg2 marks a connection it saw break (2) or we closed (1)
        return True
    if isinstance(error, psycopg2.InterfaceError):
        return True
    if isinstance(error, psycopg2.OperationalError):
        code = error.pgcode
        # No SQLSTATE: the failure was on our side of the socket (libpq), not a statement's.
        return code is None or code.startswith("08") or code in _DISCONNECT_CODES
    return False


class _Connection(Connection):
    """txpostgres' connection, telling us when the server goes away while it is idle.

    An idle connection stays a reader (for NOTIFY). When the server closes it, txpostgres
    lets psycopg2's error escape ``doRead`` (an "Unhandled Error" traceback in the log);
    here the connection closes quietly and ``on_lost`` is called (the LISTEN connection
    reconnects from it; a pooled one is replaced when it is next checked out).
    """

    on_lost: Callable[[], object] | None = None

    def doRead(self) -> None:
        try:
            super().doRead()
        except (psycopg2.Error, ValueError):
            # ValueError: libpq dropped the socket (fileno() -1) before psycopg2 marked the
            # connection closed, and txpostgres tried to watch it again.
            self.close()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            self.reactor.callLater(0, callback)


@lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """``?`` placeholders (the portable form) to psycopg2's ``%s``; literal ``%`` doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


@lru_cache(maxsize=1024)
def _around_placeholders(sql: str) -> tuple[str, ...]:
    """The text of ``sql`` before, between and after its ``?`` placeholders."""
    return tuple(sql.split("?"))


#: psycopg2's error for a string holding a NUL, which no text value of PostgreSQL can.
_NUL_IN_STRING = "A string literal cannot contain NUL (0x00) characters."


def _quoted_like_psycopg2(connection: Any) -> bool:
    """Whether :func:`_bind` may write the literals of ``str`` values for ``connection`` (a
    psycopg2 connection): psycopg2 writes a ``str`` in the connection's encoding, escaped by
    libpq's ``PQescapeStringConn``, which with ``standard_conforming_strings`` on only
    doubles each quote; so with UTF8 and that setting on (checked at every statement, as
    :func:`_escape_format_usable` does) the literal is the text, quotes doubled, in quotes."""
    return bool(
        connection.encoding == "UTF8"
        and connection.get_parameter_status("standard_conforming_strings") == "on"
    )


def _bind(
    pieces: tuple[str, ...],
    rows: Sequence[Sequence[Any]],
    quote: Callable[[Any], bytes],
    head: str = "",
) -> bytes:
    """``head``, then for each row the SQL text ``pieces`` (:func:`_around_placeholders`)
    joined by the row's values as SQL literals, the rows separated by commas (the groups of
    a multi-row INSERT; a statement is one row): what psycopg2's ``mogrify`` makes of the
    statement and its values (tests/test_postgres_binding.py compares them), for a
    connection where :func:`_quoted_like_psycopg2` holds. psycopg2 adapts each value through
    adapter objects, about 1 µs a value, and a group commit binds some 40 values a message:
    ``str``, ``int`` and None are written here (docs/performance.md), anything else (message
    bodies, floats, booleans) by ``quote``."""
    placeholders = len(pieces) - 1
    first, rest = pieces[0], pieces[1:]
    out: list[bytes] = []
    text = [head]
    for index, row in enumerate(rows):
        if len(row) != placeholders:
            raise TypeError(f"{placeholders} placeholders for {len(row)} values")
        text.append(", " + first if index else first)
        for value, piece in zip(row, rest, strict=True):
            kind = type(value)
            if kind is str:
                if "\x00" in value:
                    raise ValueError(_NUL_IN_STRING)
                text.append("'" + value.replace("'", "''") + "'")
            elif kind is int:
                # psycopg2 puts a space before a negative number: "1-%s" is not "1--5"
                text.append(str(value) if value >= 0 else f" {value}")
            elif value is None:
                text.append("NULL")
            else:
                out.append("".join(text).encode("utf-8"))
                out.append(quote(value))
                text = []
            text.append(piece)
    out.append("".join(text).encode("utf-8"))
    return out[0] if len(out) == 1 else b"".join(out)


def _statements(sql: str, rows: Sequence[Sequence[Any]]) -> Iterator[tuple[str, list[Any]]]:
    """The statements running ``sql`` once per row: an INSERT ... VALUES (...) as one
    multi-row INSERT per chunk of rows, anything else row by row."""
    match = _INSERT_VALUES.match(sql)
    if match is None:
        for row in rows:
            yield sql, list(row)
        return
    head, group = match[1], match[2]
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        yield head + ", ".join([group] * len(chunk)), [value for row in chunk for value in row]


#: A value holding every byte that escaping treats apart (backslash, quote, NUL, a control
#: character, a high byte), and the literal it must become for :func:`_escaped_bytea` to
#: be used: the bytea escape format with standard-conforming strings.
_ESCAPE_PROBE = b"\\'\x00\r\xff a"
_ESCAPED_PROBE = b"'\\\\''\\000\\015\\377 a'::bytea"


#: A hex bytea literal is two bytes a byte and this many more: ``'\x`` and ``'::bytea``.
_HEX_LITERAL_EXTRA = 11


class _QuotedBytea:
    """A bytea value already quoted: psycopg2 puts :meth:`getquoted` into the query."""

    __slots__ = ("_quoted",)

    def __init__(self, quoted: bytes) -> None:
        self._quoted = quoted

    def __conform__(self, protocol: object) -> _QuotedBytea | None:
        return self if protocol is ISQLQuote else None

    def getquoted(self) -> bytes:
        return self._quoted


def _escape_format_usable(connection: Any) -> bool:
    """Whether a bytea can go to ``connection`` (a psycopg2 connection) in the escape format.

    psycopg2 quotes a ``bytes`` value for a connection in the hex format (libpq's
    ``PQescapeByteaConn``): twice its size, and parsing that literal is most of what storing
    a message body costs the server (a 355 KB body: 4.0-4.3 ms of server CPU in hex against
    2.7 ms in the escape format, which is 1.1-1.2 times the size of mail's mostly printable
    bytes; docs/performance.md). The escape format comes from libpq's connection-less
    ``PQescapeBytea``, which escapes for standard-conforming strings when the last
    connection libpq heard from reported them on. So it is used only when this connection
    has them on and the probe comes out as that format says (checked at every statement, on
    the reactor thread, where libpq hears from the server: nothing changes it in between);
    otherwise psycopg2's hex literal goes, as before."""
    return (
        connection.get_parameter_status("standard_conforming_strings") == "on"
        and psycopg2.Binary(_ESCAPE_PROBE).getquoted() == _ESCAPED_PROBE
    )


def _text_usable(connection: Any) -> bool:
    """Whether bytes that are UTF-8 text may go in a bytea literal as they are
    (:func:`_bytea_literal`): the client and the database both UTF8, so that nothing converts
    the literal's bytes on the way (the escape format must be usable as well)."""
    return bool(
        connection.encoding == "UTF8"
        and connection.get_parameter_status("server_encoding") == "UTF8"
    )


def _escaped_bytea(args: Sequence[Any], connection: Any) -> tuple[Any, ...]:
    """``args`` with each ``bytes`` value quoted in the escape format when the connection
    allows it (:func:`_escape_format_usable`) and that is the shorter literal, else as they
    are (psycopg2 quotes them in hex)."""
    if not any(type(value) is bytes for value in args):
        return tuple(args)
    if not _escape_format_usable(connection):
        return tuple(args)
    text = _text_usable(connection)
    return tuple(_bytea_literal(value, text) if type(value) is bytes else value for value in args)


def _bytea_literal(value: bytes, text: bool) -> _QuotedBytea | bytes:
    """The bytea literal of ``value`` in the escape format (:func:`_escape_format_usable`
    holds), or ``value`` itself where psycopg2's hex literal is shorter.

    With ``text`` (:func:`_text_usable`), a value that is UTF-8 text without NUL (mail: an
    8bit body is UTF-8, any other is ASCII) goes as it is, only its backslashes doubled and
    its quotes doubled: the escape format takes every other byte literally (PostgreSQL's
    manual, "bytea Escape Format"), and the query text stays valid UTF-8. That is a fifth
    of the work of libpq's escaping (4.7 against 25.6 µs for a 7.5 KB body, whose every line
    end it writes ``\\015\\012``) and a shorter literal for the server to parse
    (docs/performance.md, thirteenth session)."""
    if text and b"\x00" not in value and (value.isascii() or _is_utf8(value)):
        escaped = value.replace(b"\\", b"\\\\").replace(b"'", b"''")
        return _QuotedBytea(b"".join((b"'", escaped, b"'::bytea")))  # one copy
    return _shorter_literal(value)


#: Bytes decoded at a time to check that a value is UTF-8: the text made on the way stays
#: small whatever the value's size (a whole 25 MB body could make a 100 MB string).
_UTF8_CHECK_PIECE = 1 << 16


def _is_utf8(value: bytes) -> bool:
    """Whether ``value`` is UTF-8 (strict: no surrogates, nothing past U+10FFFF, as
    PostgreSQL checks a UTF8 query's text)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(value)
    try:
        for start in range(0, len(view), _UTF8_CHECK_PIECE):
            decoder.decode(view[start : start + _UTF8_CHECK_PIECE])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _shorter_literal(value: bytes) -> _QuotedBytea | bytes:
    """The escape format spends four bytes on each byte that is not printable ASCII: mostly
    binary data (not mail, but anything a hostile client sends) is shorter in hex, two
    bytes each, and is left to psycopg2 for that."""
    quoted = psycopg2.Binary(value).getquoted()
    if len(quoted) > 2 * len(value) + _HEX_LITERAL_EXTRA:
        return value
    return _QuotedBytea(quoted)


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


def _plain_row(row: Row) -> Row:
    return tuple(_plain(v) for v in row)


@implementer(ICursor)
class PostgresCursor(NotifyingCursor):
    """``begin``: a statement (BEGIN) sent in front of the first statement, in the same round
    trip; ``begun`` says whether it was sent.

    Writes given to :meth:`write_many`, and NOTIFY, are bound here at once (psycopg2 binds
    parameters on our side anyway) and wait in ``_unsent``: they go in front of the next
    statement, or of COMMIT (:meth:`commit`), in one query string. PostgreSQL runs the
    statements of a string in order and stops at the first error. A transaction of writes
    alone (a group commit of accepted messages: five INSERTs and a NOTIFY) is then one round
    trip, BEGIN to COMMIT, instead of seven, each of which waited for the busy reactor.
    """

    def __init__(self, cursor: Cursor, begin: str | None = None) -> None:
        super().__init__()
        self._cursor = cursor
        self._has_rows = False
        self._begin = begin
        self.begun = False
        self.rowcount = -1
        self._unsent: list[bytes] = []

    @property
    def has_unsent(self) -> bool:
        return bool(self._unsent)

    def _with_unsent(self, statement: bytes | None) -> bytes:
        """``statement`` after the unsent writes (and BEGIN, if not sent yet), as one string."""
        parts, self._unsent = self._unsent, []
        if self._begin is not None:
            parts.insert(0, self._begin.encode("ascii"))
            self._begin, self.begun = None, True
        if statement is not None:
            parts.append(statement)
        return b"; ".join(parts)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Deferred[None]:
        # Bound here (psycopg2 binds on our side anyway): the query goes without parameters,
        # so a "%" in a bound value is never taken for a placeholder. With unsent writes (or
        # BEGIN), in one query string: PostgreSQL runs its statements in order, so BEGIN and
        # the unsent writes cost no round trip of their own.
        try:
            query = self._bound_query(sql, args)
        except Exception:
            return fail()
        if self._unsent or self._begin is not None:
            query = self._with_unsent(query)
        return self._cursor.execute(query).addCallback(self._executed)

    def _bound_query(self, sql: str, args: Sequence[Any]) -> bytes:
        """``sql`` with ``args`` bound, as psycopg2 would bind them (:func:`_bind`)."""
        connection = self._cursor.pollable()
        if _quoted_like_psycopg2(connection):
            return _bind(_around_placeholders(sql), (args,), self._quoter(connection))
        return self._mogrified(connection, sql, args)

    def _bound_statements(self, sql: str, rows: Sequence[Sequence[Any]]) -> Iterator[bytes]:
        """The statements of :func:`_statements`, bound: an INSERT's rows one group each."""
        connection = self._cursor.pollable()
        if not _quoted_like_psycopg2(connection):
            for statement, args in _statements(sql, rows):
                yield self._mogrified(connection, statement, args)
            return
        quote = self._quoter(connection)
        match = _INSERT_VALUES.match(sql)
        if match is None:
            for row in rows:
                yield _bind(_around_placeholders(sql), (row,), quote)
            return
        head, group = match[1], _around_placeholders(match[2])
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            yield _bind(group, rows[start : start + _ROWS_PER_INSERT], quote, head)

    def _mogrified(self, connection: Any, sql: str, args: Sequence[Any]) -> bytes:
        """psycopg2's binding of the whole statement (bodies in the escape format if shorter)."""
        query: bytes = self._cursor.mogrify(to_pyformat(sql), _escaped_bytea(args, connection))
        return query

    def _quoter(self, connection: Any) -> Callable[[Any], bytes]:
        """psycopg2's literal of one value, a message body in the escape format if shorter;
        whether that format may be used is checked once, at the statements' first body (as
        :func:`_escaped_bytea` checks it once for a statement's values)."""
        escape: bool | None = None
        text = False

        def quote(value: Any) -> bytes:
            nonlocal escape, text
            if type(value) is bytes:
                if escape is None:
                    escape = _escape_format_usable(connection)
                    text = escape and _text_usable(connection)
                if escape:
                    quoted = _bytea_literal(value, text)
                    if isinstance(quoted, _QuotedBytea):
                        return quoted.getquoted()
            literal: bytes = self._cursor.mogrify("%s", (value,))
            return literal

        return quote

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._executemany(sql, rows))

    async def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        # psycopg2's async mode has no executemany. An INSERT ... VALUES (...) becomes one
        # multi-row INSERT per chunk (one round trip); anything else runs row by row.
        total = 0
        for statement, args in _statements(sql, rows):
            await self.execute(statement, args)
            total += max(self.rowcount, 0)
        self._has_rows = False
        self.rowcount = total

    def write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> Deferred[None]:
        try:
            self._unsent.extend(self._bound_statements(sql, rows))
        except Exception:
            return fail()
        self._has_rows = False
        self.rowcount = -1
        return succeed(None)

    def flush(self) -> Deferred[None]:
        """Send the unsent writes (and BEGIN, if not sent yet) now."""
        return self._cursor.execute(self._with_unsent(None)).addCallback(self._executed)

    def commit(self) -> Deferred[None]:
        """COMMIT, after the unsent writes (and BEGIN, when nothing was sent before: the
        whole transaction), in one round trip."""
        return self._cursor.execute(self._with_unsent(b"COMMIT")).addCallback(self._executed)

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
        self._unsent.append(f"NOTIFY {channel}".encode("ascii"))  # sent with COMMIT at the latest
        return succeed(None)

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

    def __init__(self, reactor: IRelayReactor, dsn: str, pool_size: int | None = None) -> None:
        super().__init__(4 if pool_size is None else pool_size, reactor)
        self._reactor = reactor
        self._dsn = dsn
        # txpostgres hands NOTIFY observers to a Cooperator; give it one on our reactor.
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))
        self._listener: _Connection | None = None
        self._channels: dict[str, list[Callable[[], object]]] = {}
        self._relisten_call: IDelayedCall | None = None
        self._relisten_delay = 0.0
        self._server_version = "?"

    def _new_connection(self) -> _Connection:
        return _Connection(reactor=self._reactor, cooperator=self._cooperator)

    async def _connect(self) -> _Connection:
        """A new connection, given up on (closed) after CONNECT_TIMEOUT: psycopg2's
        asynchronous connect has no timeout of its own."""
        connection = self._new_connection()
        timer = self._reactor.callLater(CONNECT_TIMEOUT, connection.close)
        try:
            await connection.connect(self._dsn)
        except Exception:
            if not timer.active():
                raise DatabaseUnavailable(f"no connection within {CONNECT_TIMEOUT:.0f} s") from None
            raise
        finally:
            if timer.active():
                timer.cancel()
        return connection

    async def _open_connection(self) -> Connection:
        connection = await self._connect()
        if self._server_version == "?":
            cursor = connection.cursor()
            await cursor.execute("SHOW server_version")
            row = cursor.fetchone()
            self._server_version = str(row[0]) if row else "?"
        return connection

    def _is_broken(self, connection: Connection) -> bool:
        return bool(connection.closed)

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
            try:
                result = await txn(cursor)
                if cursor.has_unsent:  # writes in a read-only transaction: sent as they are
                    await cursor.flush()
                return result, cursor.pending_notifications
            except Exception as error:
                if is_disconnect(connection, error):
                    raise DatabaseUnavailable(f"{name}: {_text(error)}") from error
                raise
        cursor = PostgresCursor(connection.cursor(), begin="BEGIN")
        committing = False
        try:
            result = await txn(cursor)
            if cursor.begun or cursor.has_unsent:
                if connection.closed:
                    raise DatabaseUnavailable(f"{name}: connection closed before COMMIT")
                committing = True
                await cursor.commit()
        except BaseException as error:
            if isinstance(error, DatabaseUnavailable):
                raise
            if isinstance(error, Exception) and is_disconnect(connection, error):
                # Before COMMIT was sent, the server rolls back what a lost session began;
                # once it was sent, it may have committed: only the caller can tell whether
                # running the transaction again is harmless.
                if committing:
                    raise CommitOutcomeUnknown(
                        f"{name}: connection lost during COMMIT: {_text(error)}"
                    ) from error
                raise DatabaseUnavailable(f"{name}: {_text(error)}") from error
            if cursor.begun:
                try:
                    await connection.cursor().execute("ROLLBACK")
                except Exception:
                    log.failure("rollback of {name} failed", name=name)
            raise
        return result, cursor.pending_notifications

    async def _close(self) -> None:
        if self._relisten_call is not None and self._relisten_call.active():
            self._relisten_call.cancel()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            listener.on_lost = None
            listener.close()
        await super()._close()

    def listen(self, channel: str, callback: Callable[[], object]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._listen(channel, callback))

    async def _listen(self, channel: str, callback: Callable[[], object]) -> None:
        if not _CHANNEL.match(channel):
            raise ValueError(f"bad notification channel {channel!r}")
        if self._listener is None and self._relisten_call is None:
            self._listener = await self._open_listener(())
        if self._listener is not None and channel not in self._channels:
            await self._listener.runOperation(f"LISTEN {channel}")
        # (While the LISTEN connection is being re-established, the channel is listened to
        # when it is.)
        self._channels.setdefault(channel, []).append(callback)

    async def _open_listener(self, channels: Sequence[str]) -> _Connection:
        listener = await self._connect()
        try:
            if self._closed:  # closed while we were connecting
                raise RuntimeError("database closed")
            for channel in channels:
                await listener.runOperation(f"LISTEN {channel}")
        except BaseException:
            listener.close()
            raise
        listener.addNotifyObserver(self._on_notify)
        listener.on_lost = self._listener_lost
        return listener

    def _listener_lost(self) -> None:
        """The LISTEN connection broke (a server restart): reconnect with backoff. NOTIFYs
        sent meanwhile are lost, so every observer is called once it is back."""
        if self._closed:
            return
        self._listener = None
        log.warn("database: LISTEN connection lost; reconnecting")
        self._relisten_delay = RECONNECT_MIN
        self._relisten_call = self._reactor.callLater(self._relisten_delay, self._relisten)

    def _relisten(self) -> None:
        Deferred.fromCoroutine(self._try_relisten())

    async def _try_relisten(self) -> None:
        channels = list(self._channels)
        listener: _Connection | None = None
        try:
            listener = await self._open_listener(channels)
            for channel in list(self._channels):  # listened to while we were connecting
                if channel not in channels:
                    await listener.runOperation(f"LISTEN {channel}")
        except Exception as error:
            if listener is not None:
                listener.on_lost = None
                listener.close()
            if self._closed:
                return
            self._relisten_delay = min(self._relisten_delay * 2, RECONNECT_MAX)
            log.debug(
                "database: LISTEN reconnect failed ({error}); again in {delay} s",
                error=_text(error),
                delay=self._relisten_delay,
            )
            self._relisten_call = self._reactor.callLater(self._relisten_delay, self._relisten)
            return
        self._relisten_call = None
        self._listener = listener
        log.info("database: LISTEN connection re-established")
        for channel in list(self._channels):
            self._fire(channel)

    def _on_notify(self, notify: Any) -> None:
        self._fire(notify.channel)

    def _fire(self, channel: str) -> None:
        for callback in self._channels.get(channel, ()):
            try:
                callback()
            except Exception:
                log.failure("notification observer for {channel} failed", channel=channel)

    def schema_sql(self, text: str) -> str:
        return (
            text.replace("$ID_PK", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
            .replace("$BLOB", "BYTEA")
            .replace("$WITHOUT_ROWID", "")
            .replace("$EVENT_TXID_INDEX", _EVENT_TXID_INDEX)
            .replace("$EVENT_TXID", "xid8 NOT NULL DEFAULT '0'")
        )

    def lock_statement(self) -> str | None:
        return "SELECT pg_advisory_xact_lock(hashtext(?))"

    def version(self) -> str:
        return f"PostgreSQL {self._server_version}"


#: Schema 011 (docs/storage.md, "Event positions"): existing rows keep txid 0 (no table
#: rewrite), new rows get their transaction's id.
_EVENT_TXID_INDEX = (
    "ALTER TABLE events ALTER COLUMN txid SET DEFAULT pg_current_xact_id();\n"
    "CREATE INDEX events_position ON events (txid, id);"
)


def _text(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
