"""Numbered schema deltas (``schema/NNN_name.sql``), applied in order, each exactly once.

The server applies pending deltas at start and ``smartrelay-ctl migrate`` does it by hand.
All pending deltas run in one transaction (DDL is transactional on both engines), under a
lock so two processes starting together against one PostgreSQL do not race.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from importlib import resources

from attrs import frozen

from smartrelay.storage.interfaces import ICursor, IDatabaseEngine

_DELTA_NAME = re.compile(r"^(\d{3})_(\w+)\.sql$")


class SchemaError(Exception):
    """The database cannot be brought to the schema this version of SmartRelay needs."""


@frozen
class Delta:
    version: int
    name: str
    sql: str


def load_deltas() -> list[Delta]:
    deltas = []
    for entry in (resources.files("smartrelay.storage") / "schema").iterdir():
        match = _DELTA_NAME.match(entry.name)
        if match:
            deltas.append(Delta(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    deltas.sort(key=lambda d: d.version)
    versions = [d.version for d in deltas]
    if versions != list(range(1, len(deltas) + 1)):
        raise SchemaError(f"schema deltas are not numbered 1..N: {versions}")
    return deltas


def split_statements(sql: str) -> list[str]:
    """Statements of a delta file: ``--`` comments dropped, split at ``;``."""
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def python_steps(engine_name: str) -> dict[int, Callable[[ICursor], Awaitable[None]]]:
    """Steps run after a delta's SQL, in the same transaction, for what portable SQL cannot
    do (reading JSON columns, asking the server what it supports): version -> step."""
    from smartrelay.storage.reports import backfill_report_tables

    steps: dict[int, Callable[[ICursor], Awaitable[None]]] = {10: backfill_report_tables}
    if engine_name == "postgresql":
        steps[17] = lz4_body_compression
    return steps


async def lz4_body_compression(cursor: ICursor) -> None:
    """Schema 017 on PostgreSQL: LZ4 for message bodies where the server has it."""
    await cursor.execute(
        "SELECT 1 FROM pg_settings"
        " WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)"
    )
    if cursor.fetchone() is not None:
        await cursor.execute("ALTER TABLE message_bodies ALTER COLUMN raw SET COMPRESSION lz4")


def latest_version() -> int:
    return len(load_deltas())


async def migrate(engine: IDatabaseEngine, now_ms: int) -> list[int]:
    """Apply the pending deltas; returns the versions applied (empty when up to date)."""
    deltas = load_deltas()
    steps = python_steps(engine.name)

    async def txn(cursor: ICursor) -> list[int]:
        lock = engine.lock_statement()
        if lock is not None:
            await cursor.execute(lock, ("smartrelay:migrate",))
        await cursor.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
        )
        await cursor.execute("SELECT version FROM schema_version")
        applied = {int(row[0]) for row in cursor.fetchall()}
        newest_known = deltas[-1].version if deltas else 0
        if applied and max(applied) > newest_known:
            raise SchemaError(
                f"database schema version {max(applied)} is newer than this SmartRelay "
                f"knows ({newest_known}); upgrade SmartRelay"
            )
        done = []
        for delta in deltas:
            if delta.version in applied:
                continue
            for statement in split_statements(engine.schema_sql(delta.sql)):
                await cursor.execute(statement)
            step = steps.get(delta.version)
            if step is not None:
                await step(cursor)
            await cursor.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (delta.version, delta.name, now_ms),
            )
            done.append(delta.version)
        return done

    return await engine.run_interaction("migrate", txn)


async def current_version(engine: IDatabaseEngine) -> int:
    async def txn(cursor: ICursor) -> int:
        await cursor.execute("SELECT MAX(version) FROM schema_version")
        row = cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    return await engine.run_interaction("schema_version", txn, readonly=True)
