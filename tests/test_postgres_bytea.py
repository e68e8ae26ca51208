"""Binary values (message bodies) on PostgreSQL: sent in the bytea escape format, which is
about half the size of psycopg2's hex literal and cheaper for the server to parse, and only
where the connection's settings make that format mean what it says."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator

import psycopg2
import pytest
import pytest_twisted

from smartrelay.storage.engines import create_engine
from smartrelay.storage.engines.postgres import (
    _UTF8_CHECK_PIECE,
    _escaped_bytea,
    _is_utf8,
    _QuotedBytea,
    _text_usable,
)
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from smartrelay.storage.migrations import migrate
from smartrelay.storage.store import NewMessage, Store
from tests.conftest import real_reactor
from tests.support.postgres import PostgresServer

VALUES = [
    bytes(range(256)),
    b"",
    b"\\",
    b"'",
    b"''\\\\'",
    b"\\x41\\\\x42",  # what a hex literal starts with, as data
    b"%s %(x)s ? %%",  # placeholders of every kind, as data
    b"Subject: caf\xc3\xa9\r\n\r\n=C3=A9 \x00\x7f\xff\r\n.\r\n",
    random.Random(7).randbytes(65536),
]


def _value(row: tuple[memoryview] | None) -> bytes:
    """The bytea of a one-column row as bytes (psycopg2 gives a memoryview)."""
    assert row is not None
    return bytes(row[0])


@pytest_twisted.async_yield_fixture
async def pg_engine(postgres_server: PostgresServer) -> AsyncIterator[IDatabaseEngine]:
    url = postgres_server.create_database()
    engine = create_engine(real_reactor(), url)
    await engine.start()
    await migrate(engine, 0)
    try:
        yield engine
    finally:
        await engine.close()
        postgres_server.drop_database(url)


async def _round_trip(engine: IDatabaseEngine, settings: str | None = None) -> list[bytes]:
    """VALUES written by each way a statement is bound (the first statement of a
    transaction, batched writes, a statement sent on its own), read back in order."""

    async def txn(cursor: ICursor) -> list[bytes]:
        await cursor.execute("CREATE TEMPORARY TABLE blobs (id INTEGER, value BYTEA)")
        if settings is not None:
            await cursor.execute(settings)
        await cursor.execute("INSERT INTO blobs VALUES (?, ?)", (0, VALUES[0]))  # unsent: none
        await cursor.write_many(  # bound now, sent in front of the next statement
            "INSERT INTO blobs (id, value) VALUES (?, ?)",
            [(i, v) for i, v in enumerate(VALUES) if i > 0],
        )
        await cursor.execute("INSERT INTO blobs VALUES (?, ?)", (100, VALUES[-1]))
        await cursor.execute("SELECT value FROM blobs ORDER BY id")
        return [bytes(row[0]) for row in cursor.fetchall()]

    return await engine.run_interaction("round_trip", txn)


@pytest_twisted.ensureDeferred
async def test_bytea_values_come_back_as_they_were_written(pg_engine: IDatabaseEngine) -> None:
    assert await _round_trip(pg_engine) == [*VALUES, VALUES[-1]]


@pytest_twisted.ensureDeferred
async def test_without_standard_conforming_strings_values_go_hex_and_still_round_trip(
    pg_engine: IDatabaseEngine,
) -> None:
    """A session with ``standard_conforming_strings`` off reads a backslash in a literal as an
    escape: the escape format would then store other bytes; the check falls back to hex."""
    written = await _round_trip(pg_engine, "SET LOCAL standard_conforming_strings = off")
    assert written == [*VALUES, VALUES[-1]]
    assert await _round_trip(pg_engine) == [*VALUES, VALUES[-1]]  # and on again after it


def test_utf8_text_goes_as_it_is_into_a_utf8_database(postgres_server: PostgresServer) -> None:
    """A body that is UTF-8 text without NUL (all mail but a hostile client's) is written as
    it is, backslashes and quotes doubled: no escape for its line ends and 8-bit text."""
    connection = psycopg2.connect(postgres_server.dsn())
    try:
        assert _text_usable(connection)
        body = "Subject: caf\u00e9\r\n\r\n\\x41 ' \\ \x01\x7f text \u2603\r\n".encode()
        (quoted,) = _escaped_bytea((body,), connection)
        assert isinstance(quoted, _QuotedBytea)
        literal = quoted.getquoted()
        assert literal == (b"'" + body.replace(b"\\", b"\\\\").replace(b"'", b"''") + b"'::bytea")
        assert b"\r\n" in literal and "\u00e9".encode() in literal
        with connection.cursor() as cursor:
            cursor.execute(b"SELECT " + literal)
            assert _value(cursor.fetchone()) == body
        # Not UTF-8, or with a NUL: libpq's escapes, as before
        for bad in (b"caf\xe9\r\n", b"a\x00b", b"\xed\xa0\x80 a surrogate"):
            value = bad + b" text" * 20  # mostly printable: the escape format is shorter
            (quoted,) = _escaped_bytea((value,), connection)
            assert isinstance(quoted, _QuotedBytea)
            assert b"\\" in quoted.getquoted()  # an octal escape
            with connection.cursor() as cursor:
                cursor.execute(b"SELECT " + quoted.getquoted())
                assert _value(cursor.fetchone()) == value
    finally:
        connection.close()


@pytest.mark.parametrize("shift", [-3, -2, -1, 0, 1])
def test_utf8_is_checked_piece_by_piece_as_a_whole_would_be(shift: int) -> None:
    """A character cut by a piece's end still counts as valid, a bad sequence there not."""
    head = b"a" * (_UTF8_CHECK_PIECE + shift)
    for tail in ("\u00e9", "\u2603", "\U0001f600"):
        value = head + tail.encode() + b" text"
        assert _is_utf8(value)
        assert not _is_utf8(value[:-6])  # the character cut short at the end
        assert not _is_utf8(head + tail.encode()[:1] + b"a" + tail.encode()[1:])
    assert not _is_utf8(head + b"\xed\xa0\x80")  # an encoded surrogate
    assert _is_utf8(b"") and _is_utf8(b"plain")


def test_a_database_in_another_encoding_gets_escapes(postgres_server: PostgresServer) -> None:
    """The literal's bytes could be converted on the way: every byte but printable ASCII is
    escaped, and the values come back as they were."""
    admin = psycopg2.connect(postgres_server.dsn())
    admin.autocommit = True
    name = f"latin1_{os.getpid()}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0")
    try:
        connection = psycopg2.connect(postgres_server.dsn(name))
        connection.set_client_encoding("UTF8")
        try:
            assert not _text_usable(connection)
            body = "Subject: caf\u00e9\r\n".encode()
            (quoted,) = _escaped_bytea((body,), connection)
            assert isinstance(quoted, _QuotedBytea)
            assert quoted.getquoted() == b"'Subject: caf\\303\\251\\015\\012'::bytea"
            with connection.cursor() as cursor:
                cursor.execute(b"SELECT " + quoted.getquoted())
                assert _value(cursor.fetchone()) == body
        finally:
            connection.close()
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE {name}")
        admin.close()


def test_the_escape_format_is_used_where_it_means_what_it_says(
    postgres_server: PostgresServer,
) -> None:
    connection = psycopg2.connect(postgres_server.dsn())
    try:
        body = b"Subject: x\r\n\r\n\\ ' \x00 \xe9 text\r\n"
        (quoted,) = _escaped_bytea((body,), connection)
        assert isinstance(quoted, _QuotedBytea)
        literal = quoted.getquoted()
        assert literal == (
            b"'Subject: x\\015\\012\\015\\012\\\\ '' \\000 \\351 text\\015\\012'::bytea"
        )
        hex_literal = connection.cursor().mogrify("%s", (body,))
        assert hex_literal.startswith(b"'\\x") and len(literal) < len(hex_literal)
        with connection.cursor() as cursor:
            cursor.execute(b"SELECT " + literal + b" = " + hex_literal)
            assert cursor.fetchone() == (True,)
        assert _escaped_bytea((1, "text"), connection) == (1, "text")  # nothing to quote
        # Mostly binary data is shorter in hex (four bytes a byte in the escape format)
        binary = bytes(range(256)) * 4
        assert _escaped_bytea((binary, body), connection)[0] == binary  # psycopg2's hex
        assert isinstance(_escaped_bytea((binary, body), connection)[1], _QuotedBytea)

        with connection.cursor() as cursor:
            cursor.execute("SET standard_conforming_strings = off")
        assert _escaped_bytea((body,), connection) == (body,)  # psycopg2's hex, then
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_a_queued_body_of_every_byte_loads_as_it_was_accepted(
    pg_engine: IDatabaseEngine,
) -> None:
    """Mail is mostly printable (the escape format goes), with every other byte value in it."""
    store = Store(pg_engine, real_reactor())
    raw = b"Subject: all bytes\r\n\r\n" + b"a line of text\r\n" * 200 + bytes(range(256))
    queued = await store.queue_message(
        NewMessage(
            sender="app@example.com",
            recipients=("a@example.net",),
            raw=raw,
            client_ip="127.0.0.1",
        )
    )
    loaded = await store.load_messages([queued.queue_id])
    assert loaded[queued.queue_id].raw == raw
