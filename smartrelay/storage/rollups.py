"""The hourly roll-ups (``rollups``, ``rollup_progress``): event counts that outlive the events.

:meth:`RollupStore.roll_up` reads the events after where it stopped, in ``(time, id)`` order
(the ``events_time`` index), up to a horizon the caller keeps a little behind the clock
(docs/storage.md, "Roll-ups": an event must have committed before the roll-up passes its
time), counts them per hour, tag, sender domain, recipient domain, type and detail (a
``warning`` event once per kind it holds, the kind as detail), adds the
counts to ``rollups`` and moves ``rollup_progress`` on, all in one transaction: a pass that
fails or is killed leaves nothing half-counted, and two nodes on one PostgreSQL take turns
(an advisory lock), so an event is counted once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from smartrelay.storage.base import StoreBase, chunks, domain_of, from_ms, marks, to_ms
from smartrelay.storage.interfaces import ICursor

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
#: The types ``rollups_by_domain_day`` counts (the top recipient domains' columns).
DOMAIN_TYPES = ("received", "delivered", "deferred", "bounced", "complained")
#: The tag of the rows that count every event once, whatever the message's tags.
ALL_TAGS = "*"
_PROGRESS = "rollups"
_LOCK = "smartrelay:rollup"
_ENGAGEMENT = ("opened", "clicked")
WARNING = "warning"
#: ``data`` of a human open or click holds this text: insert_events writes ``data`` with
#: json.dumps (sort_keys, default separators), and a JSON string cannot hold an unescaped
#: quote, so a user agent or URL cannot fake it.
_HUMAN_PATTERN = "%" + json.dumps({"machine": False})[1:-1] + "%"
#: A ``delivered`` event of sandbox mail (``sandbox`` is stored only when true; the same
#: reasoning as above) is counted as this type, so that ``delivered`` counts only mail that
#: reached a receiver (docs/smtp.md, "Sandbox credentials").
SANDBOX_DELIVERED = "delivered-sandbox"
_SANDBOX_PATTERN = "%" + json.dumps({"sandbox": True})[1:-1] + "%"
_ROLLUP_COLUMNS = "hour, tag, sender_domain, recipient_domain, type, detail"
#: Rows per upsert statement (8 parameters each).
_UPSERT_ROWS = 250

#: Characters (and UTF-8 bytes) of a URL in ``rollup_urls``.
MAX_URL = 2000
#: Rows per ``rollup_urls`` upsert statement (5 parameters each).
_URL_UPSERT_ROWS = 400

#: (hour, tag, sender_domain, recipient_domain, type, detail)
RollupKey = tuple[int, str, str, str, str, str]
#: (hour, tag, url)
UrlKey = tuple[int, str, str]
#: (type, detail) -> (count, unique_count)
Totals = dict[tuple[str, str], tuple[int, int]]


def event_detail(event_type: str, data: dict[str, Any]) -> str:
    """The ``detail`` column of an event: a bounce's ``category:hard|soft``, an open's or a
    click's ``machine`` or ``human``, else ''. (A ``warning`` event counts once per kind:
    :func:`event_details`.)"""
    if event_type == "bounced":
        return f"{data.get('category', '')}:{'hard' if data.get('hard') else 'soft'}"
    if event_type in _ENGAGEMENT:
        return "machine" if data.get("machine") else "human"
    return ""


def event_details(event_type: str, data: dict[str, Any]) -> tuple[str, ...]:
    """The ``detail`` of each count an event adds: one, :func:`event_detail`; for a
    ``warning`` event, each kind it holds once (so the roll-ups count, per kind, the
    messages with that warning)."""
    if event_type == WARNING:
        warnings = data.get("warnings")
        if not isinstance(warnings, list):
            return ()
        kinds = (w.get("kind") for w in warnings if isinstance(w, dict))
        return tuple(dict.fromkeys(k for k in kinds if isinstance(k, str)))
    return (event_detail(event_type, data),)


class RollupStore(StoreBase):
    async def roll_up(self, horizon: float, limit: int) -> int:
        """Count up to ``limit`` events not counted yet with ``time < horizon`` into the
        hourly roll-ups, in one transaction; returns how many were counted (fewer than
        ``limit``: every event before the horizon is counted)."""
        if limit < 1:
            raise ValueError(f"roll_up: limit must be at least 1, not {limit}")
        horizon_ms = to_ms(horizon)

        async def txn(cursor: ICursor) -> int:
            lock = self.engine.lock_statement()
            if lock is not None:  # another node's pass waits for this one to commit
                await cursor.execute(lock, (_LOCK,))
            await cursor.execute(
                "SELECT time_ms, last_id FROM rollup_progress WHERE name = ?", (_PROGRESS,)
            )
            row = cursor.fetchone()
            position = None if row is None else (int(row[0]), int(row[1]))
            events = await _read_events(cursor, position, horizon_ms, limit)
            counts = await _aggregate(cursor, events, position)
            await _upsert(cursor, counts)
            await _upsert_summaries(cursor, counts)
            await _upsert_urls(cursor, _url_counts(events))
            if len(events) < limit:
                # Caught up: every event before the horizon is counted. (horizon_ms, 0) is
                # before every event at horizon_ms (ids start at 1).
                new_position = (horizon_ms, 0)
            else:
                new_position = (events[-1][0], events[-1][1])
            if position is None or new_position > position:  # never back (a slower clock)
                await cursor.execute(
                    "INSERT INTO rollup_progress (name, time_ms, last_id) VALUES (?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE"
                    " SET time_ms = excluded.time_ms, last_id = excluded.last_id",
                    (_PROGRESS, *new_position),
                )
            return len(events)

        return await self.run("roll_up", txn)

    async def rollup_position(self) -> float | None:
        """Every event with a time before this (seconds) is counted in the roll-ups; None
        before the first pass. Events before it may be deleted without losing a count."""

        async def txn(cursor: ICursor) -> float | None:
            await cursor.execute("SELECT time_ms FROM rollup_progress WHERE name = ?", (_PROGRESS,))
            row = cursor.fetchone()
            return None if row is None else from_ms(int(row[0]))

        return await self.run("rollup_position", txn, readonly=True)

    async def rollup_totals(
        self,
        since: float,
        until: float,
        tag: str | None = None,
        sender_domain: str | None = None,
        recipient_domain: str | None = None,
    ) -> Totals:
        """(type, detail) -> (count, unique_count) over the hours that begin in
        [``since``, ``until``), for one tag (None: every event) and optionally one sender
        and/or recipient domain."""

        async def txn(cursor: ICursor) -> Totals:
            where, args = _filter(since, until, tag, sender_domain, recipient_domain)
            await cursor.execute(
                "SELECT type, detail, SUM(count), SUM(unique_count)"
                f" FROM {_table(sender_domain, recipient_domain)}"
                f" WHERE {where} GROUP BY type, detail",
                args,
            )
            return {(str(r[0]), str(r[1])): (int(r[2]), int(r[3])) for r in cursor.fetchall()}

        return await self.run("rollup_totals", txn, readonly=True)

    async def rollup_series(
        self,
        since: float,
        until: float,
        tag: str | None = None,
        sender_domain: str | None = None,
        recipient_domain: str | None = None,
    ) -> dict[float, Totals]:
        """As :meth:`rollup_totals`, per hour: the hour's start (seconds) -> its totals, in
        time order; hours without events are absent."""

        async def txn(cursor: ICursor) -> dict[float, Totals]:
            where, args = _filter(since, until, tag, sender_domain, recipient_domain)
            await cursor.execute(
                "SELECT hour, type, detail, SUM(count), SUM(unique_count)"
                f" FROM {_table(sender_domain, recipient_domain)}"
                f" WHERE {where} GROUP BY hour, type, detail ORDER BY hour",
                args,
            )
            series: dict[float, Totals] = {}
            for r in cursor.fetchall():
                hour = int(r[0]) / 1000
                series.setdefault(hour, {})[(str(r[1]), str(r[2]))] = (int(r[3]), int(r[4]))
            return series

        return await self.run("rollup_series", txn, readonly=True)

    async def sender_domains_seen(self, since: float, until: float) -> list[tuple[str, int]]:
        """The sender domains (of the envelope sender, as the roll-ups count them) of the
        messages received in the hours that begin in [``since``, ``until``), with how many
        recipients' copies were received from each; most first, then by name."""

        async def txn(cursor: ICursor) -> list[tuple[str, int]]:
            await cursor.execute(
                "SELECT sender_domain, SUM(count) FROM rollups"
                " WHERE hour >= ? AND hour < ? AND tag = ? AND type = 'received'"
                " AND sender_domain <> '' GROUP BY sender_domain",
                (to_ms(since), to_ms(until), ALL_TAGS),
            )
            rows = [(str(r[0]), int(r[1])) for r in cursor.fetchall()]
            return sorted(rows, key=lambda row: (-row[1], row[0]))

        return await self.run("sender_domains_seen", txn, readonly=True)


def normalise_url(url: str) -> str:
    """The URL as ``rollup_urls`` counts it: scheme://host[:port]/path, lower-case scheme and
    host, without user info, query or fragment (a personalised query string would make one
    row per recipient), cut to :data:`MAX_URL` characters and UTF-8 bytes. A URL that does not
    parse is kept cut as it is."""
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
        port = f":{parts.port}" if parts.port is not None else ""
        reduced = f"{parts.scheme.lower()}://{host}{port}{parts.path}" if parts.scheme else url
    except ValueError:
        reduced = url
    cut = reduced[:MAX_URL].encode("utf-8", "surrogatepass")[:MAX_URL]
    return cut.decode("utf-8", "ignore")


def _table(sender_domain: str | None, recipient_domain: str | None) -> str:
    """Without a domain filter, the per-tag sums (``rollups_by_tag``, a few rows per hour)
    rather than ``rollups``, which has a row per hour and pair of domains that occurred."""
    return "rollups_by_tag" if sender_domain is None and recipient_domain is None else "rollups"


def _filter(
    since: float,
    until: float,
    tag: str | None,
    sender_domain: str | None,
    recipient_domain: str | None,
) -> tuple[str, list[Any]]:
    where = "hour >= ? AND hour < ? AND tag = ?"
    args: list[Any] = [to_ms(since), to_ms(until), ALL_TAGS if tag is None else tag]
    if sender_domain is not None:
        where += " AND sender_domain = ?"
        args.append(sender_domain.lower())
    if recipient_domain is not None:
        where += " AND recipient_domain = ?"
        args.append(recipient_domain.lower())
    return where, args


# (time_ms, id, type, queue_id, recipient, data or None, sender, tags JSON)
_Event = tuple[int, int, str, str | None, str | None, str | None, str | None, str | None]


async def _read_events(
    cursor: ICursor, position: tuple[int, int] | None, horizon_ms: int, limit: int
) -> list[_Event]:
    """The next ``limit`` events after ``position`` before the horizon, in (time, id) order
    (an index range of ``events_time``), with their message's sender and tags (NULL when
    the message row is gone). ``data`` is read only for the types whose detail needs it."""
    after, args = "", []
    if position is not None:
        after = " AND (e.time, e.id) > (?, ?)"  # a row value: a range of the index
        args = [position[0], position[1]]
    await cursor.execute(
        "SELECT e.time, e.id,"
        f" CASE WHEN e.type = 'delivered' AND e.data LIKE ? THEN '{SANDBOX_DELIVERED}'"
        " ELSE e.type END, e.queue_id, e.recipient,"
        " CASE WHEN e.type IN ('bounced', 'opened', 'clicked', 'warning') THEN e.data END,"
        " m.sender, m.tags"
        " FROM events e LEFT JOIN messages m ON m.queue_id = e.queue_id"
        f" WHERE e.time < ?{after} ORDER BY e.time, e.id LIMIT ?",
        (_SANDBOX_PATTERN, horizon_ms, *args, limit),
    )
    return [_event_of(r) for r in cursor.fetchall()]


def _event_of(row: Sequence[Any]) -> _Event:
    """An events-join-messages row (time, id, type, queue_id, recipient, data, sender, tags)."""

    def text(value: object) -> str | None:
        return None if value is None else str(value)

    return (
        int(row[0]),
        int(row[1]),
        str(row[2]),
        text(row[3]),
        text(row[4]),
        text(row[5]),
        text(row[6]),
        text(row[7]),
    )


async def _aggregate(
    cursor: ICursor, events: Sequence[_Event], position: tuple[int, int] | None
) -> dict[RollupKey, list[int]]:
    """The batch's counts: key -> [count, unique_count]."""
    details = [event_details(e[2], json.loads(e[5])) if e[5] is not None else ("",) for e in events]
    # A human open (click) is unique when it is the first human open (click) of its
    # (queue_id, recipient): the pairs that had one before the batch, then the batch's own.
    candidates = {
        (e[3], e[4])
        for e, detail in zip(events, details, strict=True)
        if detail == ("human",) and e[3] is not None and e[4] is not None
    }
    seen = await _engaged_before(cursor, candidates, position)
    tag_lists: dict[str | None, tuple[str, ...]] = {}
    counts: dict[RollupKey, list[int]] = {}
    for e, event_details_ in zip(events, details, strict=True):
        time_ms, _, event_type, queue_id, recipient, _, sender, tags_json = e
        unique = 0
        if event_details_ == ("human",) and queue_id is not None and recipient is not None:
            key = (queue_id, recipient, event_type)
            if key not in seen:
                seen.add(key)
                unique = 1
        tags = tag_lists.get(tags_json)
        if tags is None:
            # The '*' row counts every event once; a message tagged '*' is counted there once.
            loaded = json.loads(tags_json) if tags_json is not None else []
            tags = tag_lists[tags_json] = tuple(dict.fromkeys((ALL_TAGS, *map(str, loaded))))
        hour = time_ms - time_ms % HOUR_MS
        sender_domain = domain_of(sender) if sender else ""
        recipient_domain = domain_of(recipient) if recipient else ""
        for tag in tags:
            for detail in event_details_:
                cell = counts.setdefault(
                    (hour, tag, sender_domain, recipient_domain, event_type, detail), [0, 0]
                )
                cell[0] += 1
                cell[1] += unique
    return counts


async def _engaged_before(
    cursor: ICursor,
    pairs: set[tuple[str, str]],
    position: tuple[int, int] | None,
) -> set[tuple[str, str, str]]:
    """(queue_id, recipient, type) of the ``pairs`` that have a human open or click counted
    before (at or before ``position``).

    One query per chunk of queue ids, by the ``events_queue_id`` index. It has no condition
    on ``type`` or ``time`` on purpose: SQLite (without ANALYZE statistics) would then walk
    ``events_type_time``, every open and click ever recorded; only human opens and clicks
    match the LIKE, and the few rows are checked here.
    """
    seen: set[tuple[str, str, str]] = set()
    if position is None or not pairs:
        return seen
    by_queue: dict[str, set[str]] = {}
    for queue_id, recipient in pairs:
        by_queue.setdefault(queue_id, set()).add(recipient)
    queue_ids = sorted(by_queue)
    for chunk in chunks(queue_ids):
        recipients = sorted({r for q in chunk for r in by_queue[q]})
        # The recipients IN list narrows a message with many recipients inside the database;
        # the exact pairs are checked below.
        for recipient_chunk in chunks(recipients):
            await cursor.execute(
                "SELECT queue_id, recipient, type, time, id FROM events"
                f" WHERE queue_id IN ({marks(len(chunk))})"
                f" AND recipient IN ({marks(len(recipient_chunk))}) AND data LIKE ?",
                (*chunk, *recipient_chunk, _HUMAN_PATTERN),
            )
            for queue_id, recipient, event_type, time_ms, event_id in cursor.fetchall():
                if (
                    event_type in _ENGAGEMENT
                    and (int(time_ms), int(event_id)) <= position
                    and str(recipient) in by_queue[str(queue_id)]
                ):
                    seen.add((str(queue_id), str(recipient), str(event_type)))
    return seen


def _url_counts(events: Sequence[_Event]) -> dict[UrlKey, list[int]]:
    """The batch's clicks per (hour, tag, URL): key -> [count, machine_count]."""
    counts: dict[UrlKey, list[int]] = {}
    for time_ms, _, event_type, _, _, data, _, tags_json in events:
        if event_type != "clicked" or data is None:
            continue
        loaded = json.loads(data)
        url = loaded.get("url")
        if not isinstance(url, str):
            continue
        url = normalise_url(url)
        machine = 1 if loaded.get("machine") else 0
        tags = json.loads(tags_json) if tags_json is not None else []
        hour = time_ms - time_ms % HOUR_MS
        for tag in dict.fromkeys((ALL_TAGS, *map(str, tags))):
            cell = counts.setdefault((hour, tag, url), [0, 0])
            cell[0] += 1
            cell[1] += machine
    return counts


async def _upsert_urls(cursor: ICursor, counts: dict[UrlKey, list[int]]) -> None:
    """Add the clicks to ``rollup_urls`` and to its daily summary ``rollup_urls_by_day``."""
    rows = [(*key, cell[0], cell[1]) for key, cell in sorted(counts.items())]
    for chunk in chunks(rows, _URL_UPSERT_ROWS):
        await cursor.execute(
            "INSERT INTO rollup_urls (hour, tag, url, count, machine_count)"
            f" VALUES {', '.join([f'({marks(5)})'] * len(chunk))}"
            " ON CONFLICT (hour, tag, url) DO UPDATE"
            " SET count = rollup_urls.count + excluded.count,"
            " machine_count = rollup_urls.machine_count + excluded.machine_count",
            [value for row in chunk for value in row],
        )
    by_day: dict[tuple[str, int, str], list[int]] = {}
    for (hour, tag, url), (count, machine) in counts.items():
        cell = by_day.setdefault((tag, hour - hour % DAY_MS, url), [0, 0])
        cell[0] += count
        cell[1] += machine
    day_rows = [(*key, cell[0], cell[1]) for key, cell in sorted(by_day.items())]
    for day_chunk in chunks(day_rows, _URL_UPSERT_ROWS):
        await cursor.execute(
            "INSERT INTO rollup_urls_by_day (tag, day, url, count, machine_count)"
            f" VALUES {', '.join([f'({marks(5)})'] * len(day_chunk))}"
            " ON CONFLICT (tag, day, url) DO UPDATE"
            " SET count = rollup_urls_by_day.count + excluded.count,"
            " machine_count = rollup_urls_by_day.machine_count + excluded.machine_count",
            [value for row in day_chunk for value in row],
        )


async def backfill_url_rollups(cursor: ICursor) -> None:
    """Schema 010's step: count in ``rollup_urls`` the clicks still stored that the roll-ups
    counted before it existed (those before ``rollup_progress``); older ones are gone."""
    await cursor.execute(
        "SELECT time_ms, last_id FROM rollup_progress WHERE name = ?", (_PROGRESS,)
    )
    row = cursor.fetchone()
    if row is None:
        return
    position = (int(row[0]), int(row[1]))
    after = (-1, -1)
    while True:
        await cursor.execute(
            "SELECT e.time, e.id, e.type, e.queue_id, e.recipient, e.data, m.sender, m.tags"
            " FROM events e LEFT JOIN messages m ON m.queue_id = e.queue_id"
            " WHERE e.type = 'clicked' AND (e.time, e.id) > (?, ?) AND (e.time, e.id) < (?, ?)"
            " ORDER BY e.time, e.id LIMIT 5000",
            (*after, *position),
        )
        events = [_event_of(r) for r in cursor.fetchall()]
        if not events:
            return
        await _upsert_urls(cursor, _url_counts(events))
        after = (events[-1][0], events[-1][1])


async def _upsert_summaries(cursor: ICursor, counts: dict[RollupKey, list[int]]) -> None:
    """Add the batch's counts to the two summaries of ``rollups`` (schema 010): per hour x tag
    x type x detail (``rollups_by_tag``), and per UTC day x tag x recipient domain x type for
    the types of the top-domains table (``rollups_by_domain_day``)."""
    by_tag: dict[tuple[int, str, str, str], list[int]] = {}
    by_domain: dict[tuple[int, str, str, str], int] = {}
    for (hour, tag, _, recipient_domain, event_type, detail), (count, unique) in counts.items():
        cell = by_tag.setdefault((hour, tag, event_type, detail), [0, 0])
        cell[0] += count
        cell[1] += unique
        if event_type in DOMAIN_TYPES:
            key = (hour - hour % DAY_MS, tag, recipient_domain, event_type)
            by_domain[key] = by_domain.get(key, 0) + count
    rows = [(*key, cell[0], cell[1]) for key, cell in sorted(by_tag.items())]
    for chunk in chunks(rows, _UPSERT_ROWS):
        await cursor.execute(
            "INSERT INTO rollups_by_tag (hour, tag, type, detail, count, unique_count)"
            f" VALUES {', '.join([f'({marks(6)})'] * len(chunk))}"
            " ON CONFLICT (tag, hour, type, detail) DO UPDATE"
            " SET count = rollups_by_tag.count + excluded.count,"
            " unique_count = rollups_by_tag.unique_count + excluded.unique_count",
            [value for row in chunk for value in row],
        )
    domain_rows = [(*key, count) for key, count in sorted(by_domain.items())]
    for day_chunk in chunks(domain_rows, _URL_UPSERT_ROWS):
        await cursor.execute(
            "INSERT INTO rollups_by_domain_day (day, tag, recipient_domain, type, count)"
            f" VALUES {', '.join([f'({marks(5)})'] * len(day_chunk))}"
            " ON CONFLICT (tag, day, recipient_domain, type) DO UPDATE"
            " SET count = rollups_by_domain_day.count + excluded.count",
            [value for row in day_chunk for value in row],
        )


async def _upsert(cursor: ICursor, counts: dict[RollupKey, list[int]]) -> None:
    """Add ``counts`` to ``rollups``: a multi-row INSERT ... ON CONFLICT per chunk (each key
    once per statement, as PostgreSQL requires)."""
    rows = [(*key, cell[0], cell[1]) for key, cell in sorted(counts.items())]
    for chunk in chunks(rows, _UPSERT_ROWS):
        await cursor.execute(
            f"INSERT INTO rollups ({_ROLLUP_COLUMNS}, count, unique_count)"
            f" VALUES {', '.join([f'({marks(8)})'] * len(chunk))}"
            f" ON CONFLICT ({_ROLLUP_COLUMNS}) DO UPDATE"
            " SET count = rollups.count + excluded.count,"
            " unique_count = rollups.unique_count + excluded.unique_count",
            [value for row in chunk for value in row],
        )
