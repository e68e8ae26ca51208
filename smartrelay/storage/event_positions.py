"""Reading events in the order they become visible, from a position, without gaps: what the
webhooks and ``GET /api/events`` resume from (docs/storage.md, "Event positions").

A position is ``(txid, id)``. On PostgreSQL ``txid`` is the inserting transaction's id
(schema 011), and an event is read only once every transaction older than the oldest one still
running has ended (``pg_snapshot_xmin``): a row whose transaction commits late has a txid
above that horizon until it commits, so it is read later, never passed over. SQLite has one
writer at a time and gives ids in commit order: ``txid`` is always 0 and the id is the
position. Rows from before schema 011 and rows copied in by ``copy-data`` have txid 0 and come
first, in id order.

The cursor users see (``X-SmartRelay-Cursor``) is :func:`encode_cursor` of a position: opaque,
and refused by :func:`decode_cursor` (``ValueError``) when altered.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Sequence
from typing import Any

from attrs import frozen

from smartrelay.events import ExportedEvent
from smartrelay.storage.base import StoreBase, marks, to_ms
from smartrelay.storage.events import exported_event
from smartrelay.storage.interfaces import ICursor

__all__ = [
    "START",
    "EventPage",
    "EventPosition",
    "EventPositionStore",
    "decode_cursor",
    "encode_cursor",
]

#: Rows one page looks at, at most, when filters (types, times, tags) may skip most of them:
#: a filtered read of a long range is many short queries, never one long one. A page of
#: ``limit`` events looks at ``SCAN_PER_EVENT * limit`` rows (at least ``MIN_SCAN``), so a small
#: page (a webhook batch) does not walk 10,000 index entries to find its end.
SCAN_CHUNK = 10_000
MIN_SCAN = 1_000
SCAN_PER_EVENT = 4
_CURSOR_PREFIX = "c1"
_CURSOR = struct.Struct(">QQ")


@frozen(order=True)
class EventPosition:
    """Everything up to and including the event at ``(txid, id)``."""

    txid: int
    id: int


#: Before every event.
START = EventPosition(0, 0)


def encode_cursor(position: EventPosition) -> str:
    raw = _CURSOR.pack(position.txid, position.id)
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> EventPosition:
    """The position of a cursor :func:`encode_cursor` made; ``ValueError`` ("bad cursor")
    for anything else."""
    if not text.startswith(_CURSOR_PREFIX) or len(text) != len(_CURSOR_PREFIX) + 22:
        raise ValueError("bad cursor")
    try:
        raw = base64.urlsafe_b64decode(text[len(_CURSOR_PREFIX) :] + "==")
    except (binascii.Error, ValueError):
        raise ValueError("bad cursor") from None
    if len(raw) != _CURSOR.size or not text[len(_CURSOR_PREFIX) :].isascii():
        raise ValueError("bad cursor")
    txid, event_id = _CURSOR.unpack(raw)
    if txid >= 2**63 or event_id >= 2**63:
        raise ValueError("bad cursor")
    position = EventPosition(txid, event_id)
    if encode_cursor(position) != text:  # one spelling per position
        raise ValueError("bad cursor")
    return position


@frozen
class EventPage:
    """What :meth:`EventPositionStore.events_after` read."""

    #: The events that passed the filters, in position order.
    events: tuple[ExportedEvent, ...]
    #: Each event's position (same order).
    positions: tuple[EventPosition, ...]
    #: Every event up to here has been looked at: resume after it.
    end: EventPosition
    #: True when ``end`` is the ``upto`` the read was bounded by (nothing more to read now).
    exhausted: bool


class EventPositionStore(StoreBase):
    async def event_head(self) -> EventPosition:
        """The position up to which every event is visible now and for ever: a read bounded
        by it is complete (no event at or before it can still appear)."""

        async def txn(cursor: ICursor) -> EventPosition:
            if self.engine.name == "sqlite":
                await cursor.execute("SELECT MAX(id) FROM events")
                row = cursor.fetchone()
                return EventPosition(0, int(row[0]) if row and row[0] is not None else 0)
            await cursor.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
            row = cursor.fetchone()
            assert row is not None
            return EventPosition(int(row[0]), 0)

        return await self.run("event_head", txn, readonly=True)

    async def position_before_time(self, since: float) -> EventPosition:
        """A position before every event with ``time >= since``, committed or still to
        commit (where a read of the events since a time starts, instead of at :data:`START`):
        the head when there is none yet."""

        async def txn(cursor: ICursor) -> EventPosition:
            if self.engine.name == "sqlite":
                await cursor.execute(
                    "SELECT MIN(id), (SELECT MAX(id) FROM events) FROM events WHERE time >= ?",
                    (to_ms(since),),
                )
                row = cursor.fetchone()
                if row is None or row[1] is None:
                    return START
                if row[0] is None:
                    return EventPosition(0, int(row[1]))
                return EventPosition(0, int(row[0]) - 1)
            # A transaction still running may write such an event below the earliest one
            # committed: never start past the head.
            await cursor.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
            row = cursor.fetchone()
            assert row is not None
            head = EventPosition(int(row[0]), 0)
            # The events since then by their time index, the earliest position among them.
            await cursor.execute(
                "WITH r AS MATERIALIZED (SELECT txid, id FROM events WHERE time >= ?)"
                " SELECT txid::text, id FROM r ORDER BY txid, id LIMIT 1",
                (to_ms(since),),
            )
            row = cursor.fetchone()
            if row is None:
                return head
            return min(head, EventPosition(int(row[0]), int(row[1]) - 1))

        return await self.run("position_before_time", txn, readonly=True)

    async def events_after(
        self,
        after: EventPosition,
        upto: EventPosition,
        limit: int,
        types: Sequence[str] = (),
        tags: Sequence[str] = (),
        since: float | None = None,
        until: float | None = None,
    ) -> EventPage:
        """Up to ``limit`` events in ``(after, upto]``, in position order, with their
        message's sender, tags and metadata; only those of ``types``, with one of ``tags``,
        and with ``since <= time < until`` (each when given). ``upto`` should be an
        :meth:`event_head`. One page looks at :data:`SCAN_CHUNK` rows at most when filters
        apply (fewer for a small ``limit``), so it may hold fewer than ``limit`` events
        without the range being done: read on from ``page.end`` until ``page.exhausted``."""
        sqlite = self.engine.name == "sqlite"

        async def txn(cursor: ICursor) -> EventPage:
            if upto <= after:
                return EventPage((), (), after, True)
            bound, exhausted = upto, True
            filtered = bool(types or tags or since is not None or until is not None)
            if filtered:
                scan = min(SCAN_CHUNK, max(MIN_SCAN, SCAN_PER_EVENT * limit))
                found = await _nth_position(cursor, sqlite, after, upto, scan)
                if found is not None:
                    bound, exhausted = found, found == upto
            where, args = _range(sqlite, after, bound)
            if types:
                where += f" AND e.type IN ({marks(len(types))})"
                args.extend(types)
            if since is not None:
                where += " AND e.time >= ?"
                args.append(to_ms(since))
            if until is not None:
                where += " AND e.time < ?"
                args.append(to_ms(until))
            txid = "0" if sqlite else "e.txid::text"
            order = "e.id" if sqlite else "e.txid, e.id"
            await cursor.execute(
                f"SELECT {txid}, e.id, e.type, e.time, e.queue_id, e.recipient, e.data,"
                " m.sender, m.tags, m.metadata FROM events e"
                f" LEFT JOIN messages m ON m.queue_id = e.queue_id WHERE {where}"
                f" ORDER BY {order} LIMIT ?",
                (*args, limit),
            )
            rows = cursor.fetchall()
            end = bound
            if len(rows) >= limit:
                end, exhausted = EventPosition(int(rows[-1][0]), int(rows[-1][1])), False
            wanted = set(tags)
            events: list[ExportedEvent] = []
            positions: list[EventPosition] = []
            for r in rows:
                event = exported_event(r[1:])
                if wanted and wanted.isdisjoint(event.tags):
                    continue
                events.append(event)
                positions.append(EventPosition(int(r[0]), int(r[1])))
            return EventPage(tuple(events), tuple(positions), end, exhausted)

        return await self.run("events_after", txn, readonly=True)

    async def count_events_between(
        self, after: EventPosition, upto: EventPosition, types: Sequence[str] = (), cap: int = 0
    ) -> int:
        """How many events of ``types`` (all when empty) lie in ``(after, upto]``; with
        ``cap``, counting stops there (a backlog figure that stays cheap when it is huge)."""
        sqlite = self.engine.name == "sqlite"

        async def txn(cursor: ICursor) -> int:
            if upto <= after:
                return 0
            where, args = _range(sqlite, after, upto)
            if types:
                where += f" AND e.type IN ({marks(len(types))})"
                args.extend(types)
            inner = f"SELECT 1 FROM events e WHERE {where}"
            if cap > 0:
                inner += " LIMIT ?"
                args.append(cap)
            await cursor.execute(f"SELECT COUNT(*) FROM ({inner}) AS c", args)
            row = cursor.fetchone()
            return int(row[0]) if row else 0

        return await self.run("count_events_between", txn, readonly=True)


def _range(sqlite: bool, after: EventPosition, upto: EventPosition) -> tuple[str, list[Any]]:
    """The SQL condition ``after < position <= upto`` on ``events e``, and its arguments."""
    if sqlite:
        return "e.id > ? AND e.id <= ?", [after.id, upto.id]
    return (
        "(e.txid, e.id) > (CAST(? AS xid8), ?) AND (e.txid, e.id) <= (CAST(? AS xid8), ?)",
        [str(after.txid), after.id, str(upto.txid), upto.id],
    )


async def _nth_position(
    cursor: ICursor, sqlite: bool, after: EventPosition, upto: EventPosition, n: int
) -> EventPosition | None:
    """The position of the ``n``-th event after ``after`` (at most ``upto``), or None when
    there are fewer."""
    where, args = _range(sqlite, after, upto)
    columns, order = ("0, e.id", "e.id") if sqlite else ("e.txid::text, e.id", "e.txid, e.id")
    await cursor.execute(
        f"SELECT {columns} FROM events e WHERE {where} ORDER BY {order} LIMIT 1 OFFSET ?",
        (*args, n - 1),
    )
    row = cursor.fetchone()
    return None if row is None else EventPosition(int(row[0]), int(row[1]))
