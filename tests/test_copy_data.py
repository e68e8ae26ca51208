"""``smartrelay-ctl copy-data``: every table from one engine to the other and back, ids and id
counters kept, batches bounded in rows and bytes, and the refusals (a non-empty target, a
running relay). Real SQLite files and a real PostgreSQL (a fresh database per target)."""

from __future__ import annotations

import json
import sqlite3
import tracemalloc
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, closing
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from smartrelay.storage import copying
from smartrelay.storage.copying import TABLES, CopyError, copy_data
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine, Row
from smartrelay.storage.migrations import SchemaError, latest_version, migrate
from tests.conftest import real_reactor
from tests.support.postgres import PostgresServer
from tests.support.run import assert_cli_error, ctl, query, write_config

HOUR_MS = 3600 * 1000
T0 = 1_700_000_000_000


@asynccontextmanager
async def opened(url: str, migrated: bool = True) -> AsyncIterator[IDatabaseEngine]:
    engine = create_engine(real_reactor(), url)
    await engine.start()
    try:
        if migrated:
            await migrate(engine, 0)
        yield engine
    finally:
        await engine.close()


async def sql(engine: IDatabaseEngine, statement: str, args: Sequence[Any] = ()) -> list[Row]:
    async def txn(cursor: ICursor) -> list[Row]:
        await cursor.execute(statement, args)
        return cursor.fetchall()

    return await engine.run_interaction("test_sql", txn)


async def many(engine: IDatabaseEngine, statement: str, rows: Sequence[Sequence[Any]]) -> None:
    async def txn(cursor: ICursor) -> None:
        if statement == MESSAGE:
            messages, bodies = _message_rows(rows)
            await cursor.executemany(_MESSAGE_ROW, messages)
            if bodies:
                await cursor.executemany(_BODY_ROW, bodies)
        else:
            await cursor.executemany(statement, rows)

    await engine.run_interaction("test_sql", txn)


async def content(engine: IDatabaseEngine) -> dict[str, list[Row]]:
    """Every row of every copied table, each column by name (sorted), rows sorted by key in
    Python (the engines collate text differently)."""
    found: dict[str, list[Row]] = {}
    for table in TABLES:
        names = sorted(await copying._columns(engine, table.name))
        # events.txid: an xid8 on PostgreSQL (read as text), 0 on SQLite and when copied.
        selected = ["CAST(txid AS TEXT)" if n == "txid" else n for n in names]
        rows = await sql(engine, f"SELECT {', '.join(selected)} FROM {table.name}")
        key_at = [names.index(k) for k in table.key]
        found[table.name] = sorted(rows, key=lambda row: tuple(row[i] for i in key_at))
    return found


def body(size: int, seed: int) -> bytes:
    """``size`` bytes that are not text: every byte value, NULs included."""
    pattern = bytes((seed + i * 7) % 256 for i in range(4096))
    return (pattern * (size // len(pattern) + 1))[:size]


#: A message row with its body: ``many(engine, MESSAGE, [message(...)])`` writes both tables
#: (``message_bodies`` only while the body is kept), :func:`insert_message` does it on a
#: synchronous connection.
MESSAGE = "-- messages and message_bodies"
_MESSAGE_ROW = (
    "INSERT INTO messages (queue_id, received_at, sender, size, client_ip, credential, tags,"
    " metadata, options, idempotency_key, finished_at, body_purged_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_BODY_ROW = "INSERT INTO message_bodies (queue_id, raw) VALUES (?, ?)"


def _message_rows(
    rows: Sequence[Sequence[Any]],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(messages rows, message_bodies rows) of :func:`message` tuples."""
    messages = [(*row[:10], *row[11:]) for row in rows]
    bodies = [(row[0], row[10]) for row in rows if row[12] is None]
    return messages, bodies


def insert_message(execute: Callable[..., Any], row: Sequence[Any]) -> None:
    (message_row,), bodies = _message_rows([row])
    execute(_MESSAGE_ROW, message_row)
    for body_row in bodies:
        execute(_BODY_ROW, body_row)


RECIPIENT = (
    "INSERT INTO recipients (queue_id, address, domain, state, attempts, next_attempt_at,"
    " lease_owner, last_reply, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def message(queue_id: str, raw: bytes, **overrides: Any) -> tuple[Any, ...]:
    values = {
        "received_at": T0,
        "sender": "app@example.com",
        "client_ip": "192.0.2.1",
        "credential": "app",
        "tags": '["welcome", "tag-\u00e9"]',
        "metadata": '{"user": "42"}',
        "options": '{"track_opens": true}',
        "idempotency_key": None,
        "finished_at": None,
        "body_purged_at": None,
        **overrides,
    }
    return (
        queue_id,
        values["received_at"],
        values["sender"],
        len(raw),
        values["client_ip"],
        values["credential"],
        values["tags"],
        values["metadata"],
        values["options"],
        values["idempotency_key"],
        raw,
        values["finished_at"],
        values["body_purged_at"],
    )


async def seed(engine: IDatabaseEngine, now_ms: int) -> None:
    """Rows in every table, with NULLs, non-ASCII text, bodies with every byte value (one
    over 1 MB in each body table), recipients in every state, more rows than a test batch."""
    await many(
        engine,
        MESSAGE,
        [
            message("Q001small", b"Subject: hi\r\n\r\nhello\r\n", idempotency_key="key-1"),
            message("Q002big", body(1_500_000, 1), client_ip=None, credential=None),
            message("Q003purged", b"", finished_at=T0 + 5, body_purged_at=T0 + 9),
            *(message(f"Q1{i:02d}", body(300_000 + i, i), finished_at=T0 + i) for i in range(12)),
        ],
    )
    states = [
        ("queued", 0, now_ms + 60_000, None, None),
        ("deferred", 2, now_ms + 600_000, None, "451 4.7.1 try later"),
        ("delivered", 1, None, None, "250 2.0.0 ok \u2713"),
        ("bounced", 1, None, None, "550 5.1.1 no such user"),
        ("delivering", 3, now_ms - 1000, "node-a:123", None),  # a lease run out: not live
        ("expired", 9, None, None, "451 timeout"),
    ]
    recipients = []
    for n, queue_id in enumerate(
        ["Q001small", "Q002big", "Q003purged"] + [f"Q1{i:02d}" for i in range(12)]
    ):
        for k, (state, attempts, next_at, owner, reply) in enumerate(states):
            address = f"User{n}.{k}@Example.org"
            recipients.append(
                (queue_id, address, "example.org", state, attempts, next_at, owner, reply, T0 + k)
            )
    await many(engine, RECIPIENT, recipients)
    await many(
        engine,
        "INSERT INTO events (type, time, queue_id, recipient, data) VALUES (?, ?, ?, ?, ?)",
        [
            (
                ("received", "delivered", "bounced", "opened", "clicked")[i % 5],
                T0 + i * 1000,
                f"Q1{i % 12:02d}",
                None if i % 7 == 0 else f"user{i}@example.org",
                json.dumps({"n": i, "url": f"https://example.com/\u00fc/{i}"}),
            )
            for i in range(130)
        ],
    )
    await many(
        engine,
        "INSERT INTO suppressions (address, reason, created_at, expires_at, note)"
        " VALUES (?, ?, ?, ?, ?)",
        [
            ("a@example.com", "manual", T0, None, ""),
            ("b@example.com", "hard_bounce", T0 + 1, T0 + 86_400_000, "550 5.1.1"),
            ("c\u00e9@example.com", "complaint", T0 + 2, None, "note \u2603"),
        ],
    )
    for table in ("smtp_credentials", "web_users"):
        await many(
            engine,
            f"INSERT INTO {table} (name, password_hash, created_at) VALUES (?, ?, ?)",
            [("one", "$scrypt$ln=15,r=8,p=1$aaa$bbb", T0), ("two", "$scrypt$x$y$z", T0 + 5)],
        )
    await many(
        engine,
        "INSERT INTO credential_volume (credential, baseline, windows, updated_at, alerted_at,"
        " held_at, hold_reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            ("one", 12.5, 30, T0, T0 + 1, T0 + 2, "2400 messages \u2191"),
            ("two", None, 0, T0, None, None, None),
        ],
    )
    await many(
        engine,
        "INSERT INTO mta_sts_policies (domain, policy_id, mode, mx, max_age, fetched_at,"
        " expires_at, policy_text) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("a.example", "20261205", "enforce", "mx1.a.example\n*.a.example", 86400, T0,
             T0 + 86_400_000, "version: STSv1\r\nmode: enforce\r\n"),
            ("b\u00e9.example", "1", "testing", "mx.b.example", 60, T0, T0 + 60_000, ""),
        ],
    )  # fmt: skip
    await many(
        engine,
        "INSERT INTO tls_report_results (day, policy_domain, policy_id, mode, result, mx_host,"
        " sessions, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("2026-12-05", "a.example", "20261205", "enforce", "success", "mx1.a.example", 7, ""),
            ("2026-12-05", "a.example", "", "", "sts-policy-fetch-error", "", 1, "HTTP 500 \u2603"),
        ],
    )
    await many(
        engine,
        "INSERT INTO api_tokens (name, token_hash, created_at, last_used_at) VALUES (?, ?, ?, ?)",
        [("crm", "c" * 64, T0, None), ("bi\u00e9", "d" * 64, T0, T0 + 3)],
    )
    await many(
        engine,
        "INSERT INTO webhook_endpoints (url, position_txid, position_id, state, disabled_at,"
        " disabled_reason, failing_since, attempts, next_attempt_at, last_error, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("https://crm.example/h", 0, 17, "active", None, None, T0, 3, T0 + 60, "500", T0),
            ("https://b.example/\u00e9", 0, 0, "disabled", T0, "410 Gone", None, 0, None, None, T0),
        ],
    )
    await many(
        engine,
        "INSERT INTO webhook_dead_letters (url, after_txid, after_id, upto_txid, upto_id, events,"
        " first_event_at, last_event_at, created_at, attempts, last_error)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [("https://crm.example/h", 0, 3, 0, 9, 6, T0, T0 + 5, T0 + 9, 12, "timeout")],
    )
    await many(
        engine,
        "INSERT INTO web_sessions (token_hash, username, csrf, created_at, idle_until,"
        " expires_at) VALUES (?, ?, ?, ?, ?, ?)",
        [("a" * 64, "one", "csrf-1", T0, T0 + 10, T0 + 20), ("b" * 64, "two", "c2", T0, T0, T0)],
    )
    await many(
        engine,
        "INSERT INTO web_login_failures (key, failures, last_failure_at) VALUES (?, ?, ?)",
        [("ip:192.0.2.1", 3, T0), ("user:one\u2603", 1, T0 + 1)],
    )
    await many(
        engine,
        "INSERT INTO feedback_reports (report_id, received_at, sender, recipients, client_ip,"
        " state, processed_at, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                "R1",
                T0,
                "MAILER-DAEMON@mx.example.net",
                '["b-x@relay.test"]',
                "198.51.100.7",
                "new",
                None,
                body(2_100_000, 3),
            ),
            ("R2", T0 + 1, "", '["fbl@relay.test"]', None, "done", T0 + 2, b"ARF\r\n"),
        ],
    )
    await many(
        engine,
        "INSERT INTO feedback_reports (report_id, received_at, sender, recipients, state,"
        " processed_at, raw, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [("M3", T0 + 3, "", "[]", "ignored", T0 + 3, b"X: y\r\n\r\n", "too big \u2603")],
    )
    await many(
        engine,
        "INSERT INTO mailbox_messages (mailbox, uid, report_id, done_at) VALUES (?, ?, ?, ?)",
        [
            ("imaps://u@imap.example.com:993/INBOX", f"1796492754:{uid}", f"M{uid}", T0 + uid)
            for uid in range(1, 8)
        ]
        + [("pop3://u@pop.example.com:110", "000000017a3b2c1d", "M3", T0)],
    )
    await many(
        engine,
        "INSERT INTO rollups (hour, tag, sender_domain, recipient_domain, type, detail, count,"
        " unique_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (T0 // HOUR_MS * HOUR_MS + h * HOUR_MS, tag, "example.com", rd, kind, detail, c, c // 2)
            for c, (h, tag, rd, kind, detail) in enumerate(
                (h, tag, rd, kind, detail)
                for h in range(3)
                for tag in ("*", "welcome")
                for rd in ("example.org", "example.net")
                for kind, detail in (
                    ("delivered", ""),
                    ("bounced", "mailbox:hard"),
                    ("opened", "human"),
                )
            )
        ],
    )
    await many(
        engine,
        "INSERT INTO message_terms (term, received_at, queue_id) VALUES (?, ?, ?)",
        [(f"r:user{n}@example.org", T0 + n, f"Q1{n:02d}") for n in range(12)]
        + [('m:["user","\u00e9"]', T0, "Q001small"), ("t:welcome", T0, "Q002big")],
    )
    await many(
        engine,
        "INSERT INTO rollup_urls (hour, tag, url, count, machine_count) VALUES (?, ?, ?, ?, ?)",
        [
            (T0 // HOUR_MS * HOUR_MS + h * HOUR_MS, tag, f"https://example.com/\u00fc/{h}", 3, 1)
            for h in range(5)
            for tag in ("*", "welcome")
        ],
    )
    await many(
        engine,
        "INSERT INTO rollup_urls_by_day (tag, day, url, count, machine_count)"
        " VALUES (?, ?, ?, ?, ?)",
        [("*", d * 86_400_000, f"https://example.com/\u00fc/{d}", 7, 2) for d in range(3)],
    )
    await many(
        engine,
        "INSERT INTO rollups_by_tag (hour, tag, type, detail, count, unique_count)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(T0 // HOUR_MS * HOUR_MS + h * HOUR_MS, tag, "opened", "human", 4, 2)
         for h in range(4) for tag in ("*", "tag-\u00e9")],
    )  # fmt: skip
    await many(
        engine,
        "INSERT INTO rollups_by_domain_day (day, tag, recipient_domain, type, count)"
        " VALUES (?, ?, ?, ?, ?)",
        [(h * 86_400_000, "*", rd, "delivered", h + 1)
         for h in range(4) for rd in ("example.org", "\u00e9.example")],
    )  # fmt: skip
    await sql(
        engine,
        "INSERT INTO rollup_progress (name, time_ms, last_id) VALUES ('rollups', ?, ?)",
        (T0 + 100_000, 100),
    )


def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of a few rows and 1.2 MB of bodies: every table takes several, every kind."""
    monkeypatch.setattr(copying, "ROWS_PER_BATCH", 7)
    monkeypatch.setattr(copying, "BATCH_BYTES", 1_200_000)


@pytest_twisted.ensureDeferred
async def test_round_trip_sqlite_postgresql_sqlite(
    tmp_path: Path, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_batches(monkeypatch)
    reactor = real_reactor()
    now_ms = round(reactor.seconds() * 1000)
    lines: list[tuple[str, int, int]] = []
    async with (
        opened(f"sqlite:{tmp_path / 'first.db'}") as first,
        opened(postgres_server.create_database(), migrated=False) as second,
        opened(f"sqlite:{tmp_path / 'third.db'}", migrated=False) as third,
    ):
        await seed(first, now_ms)
        original = await content(first)
        assert all(original[t.name] for t in TABLES)  # something in every table

        report = await copy_data(first, second, reactor, progress=lambda *a: lines.append(a))
        assert report.schema_version == latest_version()
        assert {t.name: t.rows for t in report.tables} == {
            name: len(rows) for name, rows in original.items()
        }
        assert await content(second) == original
        report = await copy_data(second, third, reactor)
        assert await content(third) == original

        # Progress: per table, rising to its total.
        events = [(copied, total) for table, copied, total in lines if table == "events"]
        assert events[-1] == (130, 130) and len(events) == 19
        assert [c for c, _ in events] == sorted(c for c, _ in events)

        # Ids kept, and each engine's counter continues after them.
        for engine in (second, third):
            for table, column in (("events", "type, time, data"), ("recipients", None)):
                largest = (await sql(engine, f"SELECT MAX(id) FROM {table}"))[0][0]
                if column is None:
                    await sql(
                        engine,
                        RECIPIENT,
                        ("Q001small", "n@x.org", "x.org", "queued", 0, now_ms, None, None, now_ms),
                    )
                else:
                    await sql(engine, "INSERT INTO events (type, time) VALUES ('received', 1)")
                new_id = (await sql(engine, f"SELECT MAX(id) FROM {table}"))[0][0]
                assert new_id == largest + 1, (engine.name, table)


@pytest.mark.parametrize("direction", ["sqlite-to-postgresql", "postgresql-to-sqlite"])
@pytest_twisted.ensureDeferred
async def test_id_counter_continues_past_deleted_newest_rows(
    direction: str, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """Ids of rows deleted from the end are never given again: an export cursor past them
    would skip the new events."""
    sqlite_url = f"sqlite:{tmp_path / 'x.db'}"
    pg_url = postgres_server.create_database()
    source_url, target_url = (
        (sqlite_url, pg_url) if direction == "sqlite-to-postgresql" else (pg_url, sqlite_url)
    )
    async with opened(source_url) as source, opened(target_url, migrated=False) as target:
        await many(
            source,
            "INSERT INTO events (type, time) VALUES (?, ?)",
            [("received", i) for i in range(10)],
        )
        await sql(source, "DELETE FROM events WHERE id > 6")
        await copy_data(source, target, real_reactor(), with_queue=False)
        await sql(target, "INSERT INTO events (type, time) VALUES ('received', 99)")
        ids = [row[0] for row in await sql(target, "SELECT id FROM events ORDER BY id")]
        assert ids == [1, 2, 3, 4, 5, 6, 11]


@pytest_twisted.ensureDeferred
async def test_memory_stays_flat_with_big_bodies(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """68 MB of bodies (one of 12 MB, 1.5 MB and 500 KB ones) go through with a peak of Python
    memory far below them: batches are bounded in bytes, and a big body goes alone, from a
    file (psycopg2 would hold a parameter several times over, hex-escaped)."""
    reactor = real_reactor()
    async with (
        opened(f"sqlite:{tmp_path / 'big.db'}") as source,
        opened(postgres_server.create_database(), migrated=False) as target,
    ):
        for n in range(24):
            await many(source, MESSAGE, [message(f"B{n:03d}", body(1_500_000, n))])
        for n in range(40):
            await many(source, MESSAGE, [message(f"S{n:03d}", body(500_000, n))])
        await many(source, MESSAGE, [message("H", body(12_000_000, 5))])
        tracemalloc.start()
        try:
            report = await copy_data(source, target, reactor)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert {t.name: t.rows for t in report.tables}["messages"] == 65
        assert peak < 24_000_000, f"peak {peak / 1e6:.1f} MB"
        sizes = await sql(target, "SELECT queue_id, length(raw) FROM message_bodies")
        assert sorted(sizes) == sorted(
            [(f"B{n:03d}", 1_500_000) for n in range(24)]
            + [(f"S{n:03d}", 500_000) for n in range(40)]
            + [("H", 12_000_000)]
        )
        for queue_id, size, n in (
            ("B000", 1_500_000, 0),
            ("B023", 1_500_000, 23),
            ("S039", 500_000, 39),
            ("H", 12_000_000, 5),
        ):
            raw = await sql(
                target, "SELECT raw FROM message_bodies WHERE queue_id = ?", (queue_id,)
            )
            assert raw[0][0] == body(size, n), queue_id


@pytest_twisted.ensureDeferred
async def test_refuses_a_target_that_is_not_empty(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    target_url = postgres_server.create_database()
    async with opened(f"sqlite:{tmp_path / 's.db'}") as source, opened(target_url) as target:
        await seed(source, 0)
        await sql(
            target, "INSERT INTO web_users (name, password_hash, created_at) VALUES ('old', 'h', 1)"
        )
        await sql(target, "INSERT INTO events (type, time) VALUES ('received', 1)")
        with pytest.raises(CopyError, match=r"not empty \(table\(s\) web_users, events\)"):
            await copy_data(source, target, real_reactor())
        assert await sql(target, "SELECT COUNT(*) FROM messages") == [(0,)]
        assert await sql(target, "SELECT COUNT(*) FROM web_users") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_refuses_a_target_with_a_newer_schema(tmp_path: Path) -> None:
    async with (
        opened(f"sqlite:{tmp_path / 's.db'}") as source,
        opened(f"sqlite:{tmp_path / 't.db'}") as target,
    ):
        await sql(
            target, "INSERT INTO schema_version (version, name, applied_at) VALUES (99, 'x', 0)"
        )
        with pytest.raises(SchemaError, match="99 is newer than this SmartRelay"):
            await copy_data(source, target, real_reactor())


@pytest_twisted.ensureDeferred
async def test_live_lease_refuses_the_queue_but_not_the_history(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    reactor = real_reactor()
    now_ms = round(reactor.seconds() * 1000)
    async with (
        opened(f"sqlite:{tmp_path / 's.db'}") as source,
        opened(postgres_server.create_database(), migrated=False) as target,
    ):
        await seed(source, now_ms)
        # A relay delivering right now: its lease runs for another five minutes.
        await sql(
            source,
            "UPDATE recipients SET next_attempt_at = ? WHERE state = 'delivering'"
            " AND queue_id = 'Q001small'",
            (now_ms + 300_000,),
        )
        with pytest.raises(CopyError, match=r"1 recipient\(s\) are being delivered right now"):
            await copy_data(source, target, reactor)
        for table in TABLES:  # refused before anything was written
            assert await sql(target, f"SELECT COUNT(*) FROM {table.name}") == [(0,)]

        report = await copy_data(source, target, reactor, with_queue=False)
        copied = {t.name: t.rows for t in report.tables}
        assert "messages" not in copied and "recipients" not in copied
        assert copied["events"] == 130 and copied["feedback_reports"] == 3
        original, now = await content(source), await content(target)
        for table in TABLES:
            expected = [] if table.queue else original[table.name]
            assert now[table.name] == expected, table.name


@pytest_twisted.ensureDeferred
async def test_messages_arriving_during_the_copy_fail_it(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """A relay started while the queue is copied: its new message is noticed at the end."""
    path = tmp_path / "s.db"
    async with (
        opened(f"sqlite:{path}") as source,
        opened(postgres_server.create_database(), migrated=False) as target,
    ):
        await seed(source, 0)

        def arrive(table: str, copied: int, total: int) -> None:
            if table == "events" and copied == total:
                with closing(sqlite3.connect(path)) as db, db:
                    insert_message(db.execute, message("Z-late", b"late\r\n"))

        with pytest.raises(CopyError, match="the relay was running during the copy"):
            await copy_data(source, target, real_reactor(), progress=arrive)


@pytest_twisted.ensureDeferred
async def test_history_copy_while_the_relay_writes(
    tmp_path: Path, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--without-queue with a relay recording events and accepting messages meanwhile: each
    table is copied as it was when its copy began, and the final check passes."""
    small_batches(monkeypatch)
    path = tmp_path / "s.db"
    async with (
        opened(f"sqlite:{path}") as source,
        opened(postgres_server.create_database(), migrated=False) as target,
    ):
        await seed(source, 0)
        original = await content(source)
        written = []

        def relay_writes(table: str, copied: int, total: int) -> None:
            if table == "events" and copied < total:
                with closing(sqlite3.connect(path)) as db, db:
                    db.execute(
                        "INSERT INTO events (type, time, data) VALUES ('received', ?, '{}')",
                        (T0 + copied,),
                    )
                    insert_message(db.execute, message(f"Z{copied:04d}", b"new\r\n"))
                written.append(copied)

        report = await copy_data(
            source, target, real_reactor(), with_queue=False, progress=relay_writes
        )
        assert len(written) == 18  # during every batch but the last
        assert {t.name: t.rows for t in report.tables}["events"] == 130
        assert (await content(target))["events"] == original["events"]
        assert len((await content(source))["events"]) == 130 + 18


@pytest.mark.parametrize("target_engine", ["sqlite", "postgresql"])
@pytest_twisted.ensureDeferred
async def test_webhook_positions_from_postgresql_pass_over_no_event(
    target_engine: str, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """PostgreSQL positions (txid, id) are made txid-0 positions among the copied events: an
    endpoint resumes before every event it had not acknowledged (some again, none lost), and a
    dead letter's range keeps every event it had."""
    target_url = (
        f"sqlite:{tmp_path / 't.db'}"
        if target_engine == "sqlite"
        else postgres_server.create_database()
    )
    async with (
        opened(postgres_server.create_database()) as source,
        opened(target_url, migrated=False) as target,
    ):
        # Ids given in one order, committed in another: position order 1, 2, 4, 3, 5, 6.
        txids = {1: 100, 2: 100, 3: 102, 4: 101, 5: 103, 6: 103}
        await many(
            source,
            "INSERT INTO events (id, txid, type, time, data)"
            " VALUES (?, CAST(? AS xid8), 'opened', ?, '{}')",
            [(i, str(t), T0 + i) for i, t in txids.items()],
        )
        await many(
            source,
            "INSERT INTO webhook_endpoints (url, position_txid, position_id, created_at)"
            " VALUES (?, ?, ?, ?)",
            [("https://mid/", 101, 4, T0), ("https://end/", 103, 6, T0),
             ("https://start/", 0, 0, T0), ("https://between/", 102, 0, T0)],
        )  # fmt: skip
        await many(
            source,
            "INSERT INTO webhook_dead_letters (url, after_txid, after_id, upto_txid, upto_id,"
            " events, created_at, attempts, last_error, replay_requested_at, replay_txid,"
            " replay_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [("https://mid/", 100, 2, 102, 3, 2, T0, 5, "500", None, None, None),
             ("https://mid/", 100, 1, 103, 5, 4, T0, 5, "500", T0, 101, 4)],
        )  # fmt: skip
        await copy_data(source, target, real_reactor(), with_queue=False)
        endpoints = dict(
            (str(u), (int(t), int(i)))
            for u, t, i in await sql(
                target, "SELECT url, position_txid, position_id FROM webhook_endpoints"
            )
        )
        # Not yet acknowledged after (101, 4): 3, 5, 6. From (0, 2): 3, 4 (again), 5, 6.
        assert endpoints == {
            "https://mid/": (0, 2),
            "https://end/": (0, 6),
            "https://start/": (0, 0),
            "https://between/": (0, 2),  # 3 is after it
        }
        dead = await sql(
            target,
            "SELECT after_txid, after_id, upto_txid, upto_id, replay_txid, replay_id"
            " FROM webhook_dead_letters ORDER BY id",
        )
        # (after (100,2), upto (102,3)] held 4 and 3: ids (2, 4] hold both.
        assert [tuple(int(v) if v is not None else None for v in r) for r in dead] == [
            (0, 2, 0, 4, None, None),
            (0, 1, 0, 5, 0, 2),
        ]


def test_tables_are_every_table_of_the_schema(tmp_path: Path) -> None:
    """A table added by a later schema delta must be added to copying.TABLES (or copy-data
    would leave its rows behind)."""
    url = f"sqlite:{tmp_path / 'schema.db'}"
    config = write_config(tmp_path, url)
    assert ctl(config, "migrate").returncode == 0
    found = {
        str(name) for (name,) in query(url, "SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    assert found - {"schema_version", "sqlite_sequence"} == {t.name for t in TABLES}


def counts(lines: list[str]) -> dict[str, int]:
    """The summary's ``  table  rows`` lines."""
    return {line.split()[0]: int(line.split()[1]) for line in lines if line.startswith("  ")}


def test_cli_copy_data_end_to_end(tmp_path: Path, postgres_server: PostgresServer) -> None:
    """``smartrelay-ctl copy-data`` as a user runs it: the configured SQLite database into a
    PostgreSQL one given with a password that is never printed."""
    source_url = f"sqlite:{tmp_path / 'relay.db'}"
    config = write_config(tmp_path, source_url)
    assert ctl(config, "migrate").returncode == 0
    query(
        source_url,
        "INSERT INTO suppressions (address, reason, created_at) VALUES (?, ?, ?)",
        ("x@y.org", "manual", 1),
    )
    query(
        source_url,
        "INSERT INTO web_users (name, password_hash, created_at) VALUES (?, ?, ?)",
        ("admin", "h", 1),
    )
    insert_message(partial(query, source_url), message("Q1", b"Subject: x\r\n\r\nbody\r\n"))
    query(source_url, RECIPIENT, ("Q1", "a@b.org", "b.org", "queued", 0, 5, None, None, 1))
    target_url = postgres_server.create_database()
    with_password = target_url.replace("postgres@", "postgres:s3cret-pw@")
    result = ctl(config, "copy-data", "--to", with_password)
    assert result.returncode == 0, result.describe()
    shown = with_password.replace("s3cret-pw", "***")
    assert result.lines[0] == f"copied to {shown} (schema version {latest_version()}):"
    assert counts(result.lines) == {
        "suppressions": 1,
        "smtp_credentials": 0,
        "credential_volume": 0,
        "api_tokens": 0,
        "webhook_endpoints": 0,
        "webhook_dead_letters": 0,
        "web_users": 1,
        "web_sessions": 0,
        "web_login_failures": 0,
        "feedback_reports": 0,
        "mailbox_messages": 0,
        "rollup_progress": 0,
        "rollups": 0,
        "rollup_urls": 0,
        "rollup_urls_by_day": 0,
        "rollups_by_tag": 0,
        "rollups_by_domain_day": 0,
        "mta_sts_policies": 0,
        "tls_report_results": 0,
        "events": 0,
        "messages": 1,
        "message_bodies": 1,
        "message_terms": 0,  # the message was written straight into the tables
        "recipients": 1,
    }
    assert "web_users: 1 / 1 rows" in result.stderr.splitlines()
    assert query(target_url, "SELECT address FROM suppressions") == [("x@y.org",)]
    assert query(target_url, "SELECT queue_id, address FROM recipients") == [("Q1", "a@b.org")]

    # Again into the same (now filled) database: refused, one line, no password.
    again = ctl(config, "copy-data", "--to", with_password)
    line = assert_cli_error(again, "not empty", "copy into a fresh database")
    assert "s3cret-pw" not in again.stderr

    # --without-queue into another fresh one (back to SQLite).
    other = f"sqlite:{tmp_path / 'other.db'}"
    result = ctl(config, "copy-data", "--to", other, "--without-queue")
    assert result.returncode == 0, result.describe()
    assert set(counts(result.lines)) == {t.name for t in TABLES if not t.queue}
    assert result.lines[-1] == "the queue (messages, recipients) was not copied (--without-queue)"
    assert query(other, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert query(other, "SELECT name FROM web_users") == [("admin",)]

    # Bad targets: one line each, the password never shown.
    unreachable = ctl(config, "copy-data", "--to", "postgresql://u:pw-9@127.0.0.1:1/db")
    line = assert_cli_error(
        unreachable, "cannot open target database", "postgresql://u:***@127.0.0.1:1/db"
    )
    assert "pw-9" not in line
    assert_cli_error(ctl(config, "copy-data", "--to", "mysql://u:pw-9@h/db"), "--to: invalid")
    assert_cli_error(ctl(config, "copy-data", "--to", "sqlite::memory:"), "in-memory")
    newer = tmp_path / "newer.db"
    with closing(sqlite3.connect(newer)) as db, db:
        db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT, x INT)")
        db.execute("INSERT INTO schema_version VALUES (99, 'future', 0)")
    assert_cli_error(
        ctl(config, "copy-data", "--to", f"sqlite:{newer}"),
        f"target database sqlite:{newer}:",
        "99 is newer",
    )
