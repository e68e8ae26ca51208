"""Reading a range of events page by page, with the filters ``smartrelay-ctl events export``
and ``GET /api/events`` share (docs/api.md), and the two forms they write (JSON lines, CSV).

A read covers the events after a start position up to the events' head taken when it
begins (:meth:`~smartrelay.storage.event_positions.EventPositionStore.event_head`): what it
returns is complete, and the head is where the next read resumes (the API's
``X-SmartRelay-Cursor``). A start given as a time begins at the position before the first
event of that time and keeps only the events with ``time >= since``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable, Sequence

from attrs import frozen

from smartrelay.events import CSV_COLUMNS, ExportedEvent, csv_row, event_json
from smartrelay.storage.event_positions import START, EventPage, EventPosition
from smartrelay.storage.store import Store

__all__ = [
    "PAGE_SIZE",
    "EventFilters",
    "csv_bytes",
    "csv_header",
    "event_pages",
    "jsonl_bytes",
    "start_position",
]

#: Events read (and written) at once: the memory an export holds is about one page.
PAGE_SIZE = 1000


@frozen
class EventFilters:
    """Which events a read keeps: of ``types`` (all when empty), with at least one of
    ``tags`` (any when empty), and with ``since <= time < until`` (each when given)."""

    types: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None


async def start_position(
    store: Store, cursor: EventPosition | None, since: float | None
) -> EventPosition:
    """Where a read starts: after ``cursor`` when given, else before the first event at or
    after ``since``, else at the first event."""
    if cursor is not None:
        return cursor
    if since is not None:
        return await store.position_before_time(since)
    return START


async def event_pages(
    store: Store,
    after: EventPosition,
    upto: EventPosition,
    filters: EventFilters,
    page_size: int | None = None,
) -> AsyncIterator[EventPage]:
    """The pages of the events in ``(after, upto]`` that pass ``filters``, in position order,
    one query each (a page may be empty while the range goes on: filters look at a bounded
    number of rows per query)."""
    size = PAGE_SIZE if page_size is None else page_size
    while after < upto:
        page = await store.events_after(
            after,
            upto,
            size,
            types=filters.types,
            tags=filters.tags,
            since=filters.since,
            until=filters.until,
        )
        yield page
        if page.exhausted or page.end <= after:
            return
        after = page.end


def jsonl_bytes(events: Iterable[ExportedEvent]) -> bytes:
    """One JSON object a line (UTF-8)."""
    return "".join(event_json(event) + "\n" for event in events).encode("utf-8")


def csv_header() -> bytes:
    """The CSV header line, as ``events export --format csv`` writes it."""
    return csv_bytes((), header=True)


def csv_bytes(events: Sequence[ExportedEvent], header: bool = False) -> bytes:
    """CSV rows (UTF-8) under :data:`~smartrelay.events.CSV_COLUMNS`."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(csv_row(event) for event in events)
    return out.getvalue().encode("utf-8")
