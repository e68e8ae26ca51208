"""Webhook rows written by SQL as the dispatcher (smartrelay/webhooks/) writes them (schema
012), and events to count: what the webhooks' admin tests (store, CLI, UI) start from."""

from __future__ import annotations

from typing import Any

from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import EventPosition, Store, insert_events, to_ms

__all__ = ["add_events", "dead_letter", "endpoint", "execute"]


async def execute(store: Store, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute(sql, args)
        return [tuple(r) for r in cursor.fetchall()] if sql.startswith("SELECT") else []

    return await store.run("test", txn)


async def add_events(store: Store, count: int, event: object, time: float) -> None:
    async def txn(cursor: ICursor) -> None:
        rows = [(None, f"r{i}@example.net", event) for i in range(count)]
        await insert_events(cursor, to_ms(time), rows)  # type: ignore[arg-type]

    await store.run("test_events", txn)


async def endpoint(store: Store, url: str, position: EventPosition, **columns: Any) -> None:
    """An endpoint row as the dispatcher makes and updates it."""
    names = ["url", "position_txid", "position_id", "created_at", *columns]
    values = [url, position.txid, position.id, store.now_ms(), *columns.values()]
    await execute(
        store,
        f"INSERT INTO webhook_endpoints ({', '.join(names)})"
        f" VALUES ({', '.join('?' * len(names))})",
        tuple(values),
    )


async def dead_letter(
    store: Store, url: str, events: int, error: str = "HTTP 500", **columns: Any
) -> int:
    """A dead-letter row as the dispatcher moves a failed range there; its id."""
    names = ["url", "after_txid", "after_id", "upto_txid", "upto_id", "events"]
    names += ["first_event_at", "last_event_at", "created_at", "attempts", "last_error"]
    now = store.now_ms()
    values = [url, 0, 1, 0, 1 + events, events, now - 5000, now - 1000, now, 12, error]
    names += list(columns)
    values += list(columns.values())
    await execute(
        store,
        f"INSERT INTO webhook_dead_letters ({', '.join(names)})"
        f" VALUES ({', '.join('?' * len(names))})",
        tuple(values),
    )
    rows = await execute(store, "SELECT MAX(id) FROM webhook_dead_letters")
    return int(rows[0][0])
