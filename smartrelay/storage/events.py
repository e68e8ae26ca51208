"""The ``events`` table: the one helper that inserts event rows, and the export query."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from smartrelay.events import EventData, ExportedEvent, event_data
from smartrelay.storage.base import StoreBase, marks, to_ms
from smartrelay.storage.interfaces import ICursor

#: One event to insert: (queue_id, recipient, event).
EventRow = tuple[str | None, str | None, EventData]


async def insert_events(cursor: ICursor, time_ms: int, rows: Iterable[EventRow]) -> None:
    """Insert event rows at ``time_ms`` inside the caller's transaction (every event row is
    written here; ``data`` is :func:`smartrelay.events.event_data` as JSON, sorted keys)."""
    values = [
        (event.type, time_ms, queue_id, recipient, json.dumps(event_data(event), sort_keys=True))
        for queue_id, recipient, event in rows
    ]
    if values:
        await cursor.write_many(
            "INSERT INTO events (type, time, queue_id, recipient, data) VALUES (?, ?, ?, ?, ?)",
            values,
        )


class EventStore(StoreBase):
    async def export_events(
        self,
        after_id: int,
        limit: int,
        since: float | None = None,
        until: float | None = None,
        types: Sequence[str] = (),
    ) -> list[ExportedEvent]:
        """One page of events with ``id > after_id`` in id order (keyset paging, so an export
        of any size runs in constant memory), with the message's sender, tags, metadata."""

        async def txn(cursor: ICursor) -> list[ExportedEvent]:
            sql = (
                "SELECT e.id, e.type, e.time, e.queue_id, e.recipient, e.data,"
                " m.sender, m.tags, m.metadata FROM events e"
                " LEFT JOIN messages m ON m.queue_id = e.queue_id WHERE e.id > ?"
            )
            args: list[Any] = [after_id]
            if since is not None:
                sql += " AND e.time >= ?"
                args.append(to_ms(since))
            if until is not None:
                sql += " AND e.time < ?"
                args.append(to_ms(until))
            if types:
                sql += f" AND e.type IN ({marks(len(types))})"
                args.extend(types)
            await cursor.execute(sql + " ORDER BY e.id LIMIT ?", (*args, limit))
            return [exported_event(r) for r in cursor.fetchall()]

        return await self.run("export_events", txn, readonly=True)


def exported_event(r: Sequence[Any]) -> ExportedEvent:
    """An :class:`ExportedEvent` of a row ``(id, type, time, queue_id, recipient, data,
    sender, tags, metadata)`` (the event joined with its message)."""
    return ExportedEvent(
        id=int(r[0]),
        type=str(r[1]),
        time=int(r[2]) / 1000,
        queue_id=None if r[3] is None else str(r[3]),
        recipient=None if r[4] is None else str(r[4]),
        data=json.loads(r[5]),
        sender=None if r[6] is None else str(r[6]),
        tags=tuple(json.loads(r[7])) if r[7] is not None else (),
        metadata=json.loads(r[8]) if r[8] is not None else {},
    )
