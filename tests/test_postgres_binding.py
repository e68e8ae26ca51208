"""Statements bound on our side for PostgreSQL (``smartrelay.storage.engines.postgres``):
``_bind`` writes the literals of strings, integers and NULL itself, and must make exactly the
query psycopg2's ``mogrify`` makes, for every value, or fail where it fails."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any
from unittest.mock import patch

import psycopg2
import pytest
import pytest_twisted
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smartrelay.storage.engines import create_engine, postgres
from smartrelay.storage.engines.postgres import (
    PostgresCursor,
    _around_placeholders,
    _bind,
    _escaped_bytea,
    _quoted_like_psycopg2,
    _statements,
    to_pyformat,
)
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from tests.conftest import real_reactor
from tests.support.postgres import PostgresServer

# Strings a statement may carry: quotes, backslashes, placeholders of every kind, "--",
# non-ASCII, and (rejected by both) NUL and lone surrogates.
TEXT = st.lists(
    st.one_of(
        st.sampled_from(["'", "\\", "%", "%s", "?", "-", "\n", "\r", "\x00", "é", "\ud800"]),
        st.text(max_size=5),
    ),
    max_size=8,
).map("".join)
VALUES = st.one_of(
    TEXT,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=40),
)
# SQL text between the placeholders: anything but "?" (every "?" is one) and NUL (our SQL is
# the code's own text; psycopg2 reads a query as a C string).
SQL_TEXT = st.text(alphabet=st.characters(blacklist_characters="?\x00"), max_size=15)


@pytest.fixture(scope="module")
def connection(postgres_server: PostgresServer) -> Iterator[Any]:
    conn = psycopg2.connect(postgres_server.dsn())
    try:
        yield conn
    finally:
        conn.close()


def _mogrify(connection: Any, sql: str, args: list[Any]) -> bytes:
    """What psycopg2 alone makes of the statement (the way taken before ``_bind``)."""
    query: bytes = connection.cursor().mogrify(to_pyformat(sql), _escaped_bytea(args, connection))
    return query


def _quote(connection: Any) -> Any:
    return lambda value: _mogrify(connection, "?", [value])


def _outcome(call: Any) -> tuple[str, Any]:
    """("ok", the result), or ("error", None): a value both refuse may be refused for
    different faults first (a NUL and a lone surrogate in one string)."""
    try:
        return "ok", call()
    except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
        return "error", None


@settings(max_examples=400, deadline=None)
@given(texts=st.lists(SQL_TEXT, min_size=1, max_size=6), data=st.data())
@example(texts=["1-", ""], data=None)
@example(texts=["", " || ", ""], data=None)
def test_bind_makes_what_mogrify_makes(connection: Any, texts: list[str], data: Any) -> None:
    """For any statement and values, the same bytes as psycopg2's ``mogrify``, or an error
    where it has one (a NUL or a lone surrogate in a string)."""
    assert _quoted_like_psycopg2(connection)
    sql = "SELECT " + "?".join(texts)
    count = len(texts) - 1
    if data is None:  # the examples: a negative number after "-", quotes and backslashes
        args: list[Any] = [-5] if count == 1 else ["it's", "a\\b"]
    else:
        args = data.draw(st.lists(VALUES, min_size=count, max_size=count))
    ours = _outcome(lambda: _bind(_around_placeholders(sql), [args], _quote(connection)))
    theirs = _outcome(lambda: _mogrify(connection, sql, args))
    assert ours == theirs


class _PsycopgCursor:
    """What PostgresCursor asks of txpostgres' cursor to bind: psycopg2's own."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def mogrify(self, query: str, args: Any) -> bytes:
        result: bytes = self._connection.cursor().mogrify(query, args)
        return result

    def pollable(self) -> Any:
        return self._connection


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.tuples(VALUES, VALUES, st.integers(-5, 5)), min_size=1, max_size=30),
    chunk=st.sampled_from([1, 7, 500]),
)
def test_multi_row_inserts_are_what_mogrify_makes(
    connection: Any, rows: list[tuple[Any, ...]], chunk: int
) -> None:
    """The rows given to ``write_many``, bound a group each into multi-row INSERTs (chunks of
    ``_ROWS_PER_INSERT``), make the statements psycopg2 makes of the same rows."""
    sql = "INSERT INTO t (a, b, state, c) VALUES (?, ?, 'it''s', ?)"
    cursor = PostgresCursor(_PsycopgCursor(connection))  # type: ignore[arg-type]
    with patch.object(postgres, "_ROWS_PER_INSERT", chunk):
        ours = _outcome(lambda: list(cursor._bound_statements(sql, rows)))
        theirs = _outcome(
            lambda: [
                _mogrify(connection, statement, args) for statement, args in _statements(sql, rows)
            ]
        )
    assert ours == theirs


def test_wrong_number_of_values_is_an_error(connection: Any) -> None:
    with pytest.raises(TypeError):
        _bind(_around_placeholders("SELECT ?, ?"), [[1]], _quote(connection))
    with pytest.raises(TypeError):
        _bind(_around_placeholders("SELECT ?"), [[1, 2]], _quote(connection))


def test_not_used_without_utf8_or_standard_conforming_strings(connection: Any) -> None:
    """Where a string's literal is not its text with quotes doubled, psycopg2 binds."""
    cursor = connection.cursor()
    try:
        cursor.execute("SET standard_conforming_strings = off")
        assert not _quoted_like_psycopg2(connection)
        cursor.execute("SET standard_conforming_strings = on")
        connection.set_client_encoding("LATIN1")
        assert not _quoted_like_psycopg2(connection)
    finally:
        connection.set_client_encoding("UTF8")
        cursor.execute("SET standard_conforming_strings = on")
        connection.commit()
    assert _quoted_like_psycopg2(connection)


@pytest_twisted.async_yield_fixture
async def pg_engine(postgres_server: PostgresServer) -> AsyncIterator[IDatabaseEngine]:
    url = postgres_server.create_database()
    engine = create_engine(real_reactor(), url)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()
        postgres_server.drop_database(url)


AWKWARD = ["it's", "a\\b", "\\'", "''", "%s %% ?", "-- not a comment", "é\u2028😀", ""]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("settings_sql", [None, "SET LOCAL standard_conforming_strings = off"])
async def test_values_come_back_as_written(
    pg_engine: IDatabaseEngine, settings_sql: str | None
) -> None:
    """Through each way a statement is bound (batched writes, a statement with unsent writes
    in front, a statement alone), with the server's settings as usual and with
    ``standard_conforming_strings`` off (psycopg2 binds then)."""

    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute("CREATE TEMPORARY TABLE t (id BIGINT, s TEXT, n BIGINT)")
        if settings_sql is not None:
            await cursor.execute(settings_sql)
        await cursor.write_many(
            "INSERT INTO t (id, s, n) VALUES (?, ?, ?)",
            [(i, text, -i) for i, text in enumerate(AWKWARD)],
        )
        await cursor.execute("INSERT INTO t (id, s, n) VALUES (?, ?, ?)", (100, "x'y", None))
        await cursor.execute("INSERT INTO t (id, s, n) VALUES (?, ?, ?)", (101, "1-", -(2**62)))
        await cursor.execute("SELECT id, s, n, 1-? FROM t WHERE s <> ? ORDER BY id", (-1, "?"))
        return cursor.fetchall()

    rows = await pg_engine.run_interaction("round_trip", txn)
    assert rows == [
        *((i, text, -i, 2) for i, text in enumerate(AWKWARD)),
        (100, "x'y", None, 2),
        (101, "1-", -(2**62), 2),
    ]


@pytest_twisted.ensureDeferred
async def test_a_nul_in_a_string_fails_the_statement(pg_engine: IDatabaseEngine) -> None:
    async def txn(cursor: ICursor) -> None:
        await cursor.execute("SELECT ?", ("a\x00b",))

    with pytest.raises(ValueError, match="NUL"):
        await pg_engine.run_interaction("nul", txn)
