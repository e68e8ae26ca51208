"""What the reports UI reads: message search and detail, the queue by destination, the
feedback list, and the dashboard's top domains and URLs (schema ``010_report_indexes.sql``).

Every search filter is answered by an index on both engines (docs/storage.md, "Reports"):

* recipient, recipient ``@domain``, sender, sender ``@domain``, tag, metadata key=value: a
  range of ``message_terms``' primary key ``(term, received_at, queue_id)``, read newest first
  from the keyset position (the first of these filters drives; each other one is a seek of
  that same key per candidate);
* time range, and no filter at all: ``messages_received_order (received_at, queue_id)``;
* queue id: the primary key of ``messages``;
* outcome: one seek of ``recipients_state (state, queue_id)`` per message met while walking
  one of the two ranges above.

Filter values reach SQL only as parameters; the search terms are compared with ``=``, never
``LIKE``, so ``%`` and ``_`` are literal.
"""

from __future__ import annotations

import base64
import binascii
import email.header
import email.parser
import email.policy
import json
from collections.abc import Sequence
from typing import Any

from attrs import field, frozen

from smartrelay.events import DroppedEvent
from smartrelay.storage.base import StoreBase, chunks, from_ms, marks, to_ms
from smartrelay.storage.events import insert_events
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.queue import QUEUE_CHANNEL, mark_finished
from smartrelay.storage.rollups import (
    ALL_TAGS,
    DAY_MS,
    DOMAIN_TYPES,
    HOUR_MS,
    backfill_url_rollups,
)
from smartrelay.storage.search_terms import (
    MAX_TERM,
    metadata_term,
    recipient_domain_term,
    recipient_term,
    sender_domain_term,
    sender_term,
    stored_terms,
    tag_term,
)

#: The states a recipient can be in (storage/queue.py): the outcome filter's values.
RECIPIENT_STATES = (
    "queued",
    "delivering",
    "deferred",
    "delivered",
    "bounced",
    "expired",
    "suppressed",
    "dropped",
)
MAX_PAGE = 500
#: Recipients named on a search row (the others are counted by state).
FIRST_RECIPIENTS = 3
#: Bytes of a kept body read for the subject (search rows) and the header (message page).
SUBJECT_BYTES = 8192
HEADER_BYTES = 65536
MAX_HEADERS = 200
#: Events shown on a message's timeline (a link clicked by a bot thousands of times).
MAX_TIMELINE = 2000
_MAX_CURSOR = 300
_FEEDBACK_EVENT = {"bounce": "bounced", "complaint": "complained", "unsubscribe": "unsubscribed"}


async def backfill_report_tables(cursor: ICursor) -> None:
    """Schema 010's Python step: the terms of the messages already stored, and the URL
    roll-up of the clicks the roll-ups have already counted."""
    last = ""
    while True:
        await cursor.execute(
            "SELECT queue_id FROM messages WHERE queue_id > ? ORDER BY queue_id LIMIT 1000",
            (last,),
        )
        ids = [str(r[0]) for r in cursor.fetchall()]
        if not ids:
            break
        last = ids[-1]
        await cursor.executemany(
            "INSERT INTO message_terms (term, received_at, queue_id) VALUES (?, ?, ?)",
            await stored_terms(cursor, ids),
        )
    await backfill_url_rollups(cursor)


# -- values ------------------------------------------------------------------------------


@frozen
class MessageFilters:
    """A message search; every filter set must match. Empty strings count as not set.

    ``recipient`` and ``sender``: an exact address (any letter case) or ``@domain``;
    ``metadata``: (key, value), both exact; ``since``/``until``: received in [since, until)
    (seconds); ``outcome``: one of :data:`RECIPIENT_STATES`, matched when any recipient of
    the message is in it now."""

    queue_id: str | None = None
    recipient: str | None = None
    sender: str | None = None
    tag: str | None = None
    metadata: tuple[str, str] | None = None
    since: float | None = None
    until: float | None = None
    outcome: str | None = None

    def terms(self) -> list[str]:
        """The search terms, most selective first (the first drives the query). Raises
        ValueError for a filter that cannot match anything stored."""
        terms: list[tuple[int, str]] = []
        for value, exact_rank, domain_rank, exact, domain in (
            (self.recipient, 0, 3, recipient_term, recipient_domain_term),
            (self.sender, 1, 5, sender_term, sender_domain_term),
        ):
            value = _set(value)
            if value is None:
                continue
            if value.startswith("@"):
                if len(value) == 1 or "@" in value[1:]:
                    raise ValueError(f"not a domain: {value!r} (write @example.com)")
                terms.append((domain_rank, domain(value[1:])))
            else:
                terms.append((exact_rank, exact(value)))
        tag = _set(self.tag)
        if tag is not None:
            terms.append((4, tag_term(tag)))
        if self.metadata is not None:
            key, value = self.metadata
            if "\x00" in key + value:
                raise ValueError("a search value cannot hold a NUL character")
            if key == "":
                raise ValueError("a metadata filter needs a key (key=value)")
            terms.append((2, metadata_term(key, value)))
        for _, term in terms:
            if len(term) > MAX_TERM:
                raise ValueError(f"search value too long (at most {MAX_TERM - 3} characters)")
        return [term for _, term in sorted(terms, key=lambda t: t[0])]

    def checked_outcome(self) -> str | None:
        outcome = _set(self.outcome)
        if outcome is not None and outcome not in RECIPIENT_STATES:
            raise ValueError(f"unknown outcome {outcome!r} (one of {', '.join(RECIPIENT_STATES)})")
        return outcome


def metadata_filter(text: str) -> tuple[str, str] | None:
    """A ``key=value`` search field as :attr:`MessageFilters.metadata` (split at the first
    ``=``; blank: None); ValueError without a ``=`` or a key."""
    text = text.strip()
    if not text:
        return None
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise ValueError("a metadata filter is key=value")
    return key.strip(), value.strip()


@frozen
class MessageRow:
    """One line of the search results. ``states``: (state, recipients in it), by state."""

    queue_id: str
    received_at: float
    sender: str
    recipients: int
    states: tuple[tuple[str, int], ...]
    #: None when the body is no longer kept (retention) or has no Subject header.
    subject: str | None
    tags: tuple[str, ...]
    size: int
    body_purged: bool
    #: The first :data:`FIRST_RECIPIENTS` recipients (address, state), in the order given.
    first_recipients: tuple[tuple[str, str], ...] = ()


@frozen
class MessagePage:
    rows: tuple[MessageRow, ...]
    #: Pass as ``after`` for the next page; None on the last page.
    next_cursor: str | None


@frozen
class RecipientDetail:
    id: int
    address: str
    state: str
    attempts: int
    last_reply: str | None
    next_attempt_at: float | None
    updated_at: float


@frozen
class TimelineEvent:
    id: int
    time: float
    type: str
    recipient: str | None
    data: dict[str, Any]


@frozen
class MessageDetail:
    """A message, its recipients and its timeline. When retention has deleted the message row
    but events remain, ``message_kept`` is False and the message's own fields are None/empty."""

    queue_id: str
    message_kept: bool
    received_at: float | None
    sender: str | None
    size: int | None
    client_ip: str | None
    credential: str | None
    tags: tuple[str, ...]
    metadata: dict[str, str]
    finished_at: float | None
    #: True when the raw body was deleted (retention); subject and headers are then None.
    body_purged: bool
    subject: str | None
    headers: tuple[tuple[str, str], ...] | None
    recipients: tuple[RecipientDetail, ...]
    #: Every event of the message in (time, id) order, at most MAX_TIMELINE of them.
    timeline: tuple[TimelineEvent, ...]
    timeline_truncated: bool = False
    #: Submitted with a sandbox credential: never sent to its recipients (docs/smtp.md).
    sandbox: bool = False


@frozen
class DestinationSummary:
    """Recipients still to deliver to one recipient domain."""

    domain: str
    recipients: int
    #: Of those, the ones that have had at least one attempt (deferred).
    deferred: int
    oldest_received_at: float
    next_attempt_at: float
    #: The most recent reply recorded for one of them (None before any attempt).
    last_reply: str | None


@frozen
class PendingRow:
    """A recipient still to deliver, on the page of its destination."""

    recipient_id: int
    queue_id: str
    address: str
    state: str
    attempts: int
    next_attempt_at: float
    last_reply: str | None
    sender: str
    received_at: float


@frozen
class PendingPage:
    rows: tuple[PendingRow, ...]
    next_cursor: str | None


@frozen
class FeedbackRow:
    report_id: str
    received_at: float
    sender: str
    state: str
    kind: str | None
    reason: str
    matched_by: str | None
    queue_id: str | None
    recipient: str | None
    processed_at: float | None
    #: The data of the bounced/complained/unsubscribed event the processor recorded for the
    #: report's copy (category, hard, status, reply ...; feedback_type, source), if any.
    diagnostics: dict[str, Any] | None


@frozen
class FeedbackPage:
    rows: tuple[FeedbackRow, ...]
    next_cursor: str | None


@frozen
class DomainStats:
    """Roll-up counts of one recipient domain over a period."""

    domain: str
    received: int
    delivered: int
    deferred: int
    bounced: int
    complained: int

    @property
    def attempted(self) -> int:
        """Recipients that reached delivered or bounced."""
        return self.delivered + self.bounced

    @property
    def delivery_rate(self) -> float | None:
        return None if self.attempted == 0 else self.delivered / self.attempted

    @property
    def bounce_rate(self) -> float | None:
        return None if self.attempted == 0 else self.bounced / self.attempted


@frozen
class UrlStats:
    url: str
    clicks: int
    machine_clicks: int = field(default=0)

    @property
    def human_clicks(self) -> int:
        return self.clicks - self.machine_clicks


# -- cursors -----------------------------------------------------------------------------


def encode_cursor(*position: int | str) -> str:
    """An opaque page position (base64url of a JSON array)."""
    text = json.dumps(list(position), separators=(",", ":"), ensure_ascii=True)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kinds: Sequence[type]) -> list[Any]:
    """The position of a cursor made by :func:`encode_cursor` with values of ``kinds``;
    ValueError for anything else."""
    try:
        if len(cursor) > _MAX_CURSOR:
            raise ValueError("too long")
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        position = json.loads(raw.decode())
        if not isinstance(position, list) or len(position) != len(kinds):
            raise ValueError("wrong shape")
        for value, kind in zip(position, kinds, strict=True):
            if type(value) is not kind:
                raise ValueError("wrong type")
            if isinstance(value, int) and not 0 <= value <= 2**63 - 1:
                raise ValueError("out of range")
            if isinstance(value, str) and len(value) > 200:
                raise ValueError("too long")
        return position
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise ValueError(f"bad page cursor ({e})") from None


# -- the store ---------------------------------------------------------------------------


class ReportsStore(StoreBase):
    async def search_messages(
        self, filters: MessageFilters, after: str | None = None, limit: int = 50
    ) -> MessagePage:
        """Messages matching ``filters``, newest first by (received_at, queue_id), from the
        position ``after`` (a page's ``next_cursor``); keyset paging, never OFFSET."""
        limit = _check_limit(limit)
        terms = filters.terms()
        outcome = filters.checked_outcome()
        queue_id = _set(filters.queue_id)
        position = None if after is None else decode_cursor(after, (int, str))

        async def txn(cursor: ICursor) -> MessagePage:
            # t: the table walked in (received_at, queue_id) order.
            if terms:
                sql = "SELECT t.received_at, t.queue_id FROM message_terms t WHERE t.term = ?"
                args: list[Any] = [terms[0]]
            else:
                sql = "SELECT t.received_at, t.queue_id FROM messages t WHERE 1 = 1"
                args = []
            if queue_id is not None:
                sql += " AND t.queue_id = ?"
                args.append(queue_id)
            if filters.since is not None:
                sql += " AND t.received_at >= ?"
                args.append(to_ms(filters.since))
            if filters.until is not None:
                sql += " AND t.received_at < ?"
                args.append(to_ms(filters.until))
            if position is not None:
                sql += " AND (t.received_at, t.queue_id) < (?, ?)"
                args.extend(position)
            for term in terms[1:]:
                sql += (
                    " AND EXISTS (SELECT 1 FROM message_terms x WHERE x.term = ?"
                    " AND x.received_at = t.received_at AND x.queue_id = t.queue_id)"
                )
                args.append(term)
            if outcome is not None:
                # One seek of recipients_state (state, queue_id) per candidate: the newest
                # 50 of a common state come at once; a state no message has walks the whole
                # range (90 ms for 100,000 messages on SQLite). An IN (subquery) would first
                # build the set of every message in that state (300 ms for "delivered").
                sql += (
                    " AND EXISTS (SELECT 1 FROM recipients r"
                    " WHERE r.state = ? AND r.queue_id = t.queue_id)"
                )
                args.append(outcome)
            sql += " ORDER BY t.received_at DESC, t.queue_id DESC LIMIT ?"
            await cursor.execute(sql, (*args, limit + 1))
            found = [(int(r[0]), str(r[1])) for r in cursor.fetchall()]
            more = len(found) > limit
            found = found[:limit]
            rows = await _message_rows(cursor, [q for _, q in found])
            next_cursor = encode_cursor(*found[-1]) if more else None
            return MessagePage(tuple(rows[q] for _, q in found if q in rows), next_cursor)

        return await self.run("search_messages", txn, readonly=True)

    async def message_detail(self, queue_id: str) -> MessageDetail | None:
        """The message, its recipients and its timeline; None when nothing of it is stored."""

        async def txn(cursor: ICursor) -> MessageDetail | None:
            await cursor.execute(
                "SELECT m.received_at, m.sender, m.size, m.client_ip, m.credential, m.tags,"
                " m.metadata, m.finished_at, m.body_purged_at, substr(b.raw, 1, ?),"
                " b.queue_id IS NOT NULL, m.sandbox"
                " FROM messages m LEFT JOIN message_bodies b ON b.queue_id = m.queue_id"
                " WHERE m.queue_id = ?",
                (HEADER_BYTES, queue_id),
            )
            message = cursor.fetchone()
            await cursor.execute(
                "SELECT id, address, state, attempts, last_reply, next_attempt_at, updated_at"
                " FROM recipients WHERE queue_id = ? ORDER BY id",
                (queue_id,),
            )
            recipients = tuple(
                RecipientDetail(
                    id=int(r[0]),
                    address=str(r[1]),
                    state=str(r[2]),
                    attempts=int(r[3]),
                    last_reply=None if r[4] is None else str(r[4]),
                    next_attempt_at=from_ms(None if r[5] is None else int(r[5])),
                    updated_at=int(r[6]) / 1000,
                )
                for r in cursor.fetchall()
            )
            await cursor.execute(
                "SELECT id, time, type, recipient, data FROM events WHERE queue_id = ?"
                " ORDER BY time, id LIMIT ?",
                (queue_id, MAX_TIMELINE + 1),
            )
            events = cursor.fetchall()
            timeline = tuple(
                TimelineEvent(
                    id=int(e[0]),
                    time=int(e[1]) / 1000,
                    type=str(e[2]),
                    recipient=None if e[3] is None else str(e[3]),
                    data=_json_dict(e[4]),
                )
                for e in events[:MAX_TIMELINE]
            )
            truncated = len(events) > MAX_TIMELINE
            if message is None:
                if not timeline:
                    return None
                return MessageDetail(
                    queue_id=queue_id,
                    message_kept=False,
                    received_at=None,
                    sender=None,
                    size=None,
                    client_ip=None,
                    credential=None,
                    tags=(),
                    metadata={},
                    finished_at=None,
                    body_purged=True,
                    subject=None,
                    headers=None,
                    recipients=recipients,
                    timeline=timeline,
                    timeline_truncated=truncated,
                )
            kept = bool(message[10])
            headers = _headers(bytes(message[9])) if kept and message[9] is not None else None
            subject = None
            if headers is not None:
                subject = next((v for n, v in headers if n.lower() == "subject"), None)
            return MessageDetail(
                queue_id=queue_id,
                message_kept=True,
                received_at=int(message[0]) / 1000,
                sender=str(message[1]),
                size=int(message[2]),
                client_ip=None if message[3] is None else str(message[3]),
                credential=None if message[4] is None else str(message[4]),
                tags=tuple(_json_list(message[5])),
                metadata={str(k): str(v) for k, v in _json_dict(message[6]).items()},
                finished_at=from_ms(None if message[7] is None else int(message[7])),
                body_purged=not kept,
                subject=subject,
                headers=headers,
                recipients=recipients,
                timeline=timeline,
                timeline_truncated=truncated,
                sandbox=bool(message[11]),
            )

        return await self.run("message_detail", txn, readonly=True)

    async def deferred_by_destination(self, limit: int = 50) -> list[DestinationSummary]:
        """Recipients still to deliver (queued, deferred, delivering), grouped by recipient
        domain, the biggest groups first."""
        limit = _check_limit(limit)

        async def txn(cursor: ICursor) -> list[DestinationSummary]:
            # The pending rows only: recipients_pending_domain, grouped in its order.
            await cursor.execute(
                "SELECT r.domain, COUNT(*), SUM(CASE WHEN r.attempts > 0 THEN 1 ELSE 0 END),"
                " MIN(m.received_at), MIN(r.next_attempt_at), MAX(CASE WHEN r.last_reply IS"
                " NOT NULL THEN r.updated_at END)"
                " FROM recipients r JOIN messages m ON m.queue_id = r.queue_id"
                " WHERE r.next_attempt_at IS NOT NULL GROUP BY r.domain"
                " ORDER BY COUNT(*) DESC, r.domain LIMIT ?",
                (limit,),
            )
            groups = cursor.fetchall()
            summaries = []
            for domain, count, deferred, oldest, next_at, replied_at in groups:
                last_reply = None
                if replied_at is not None:
                    await cursor.execute(
                        "SELECT last_reply FROM recipients WHERE domain = ?"
                        " AND next_attempt_at IS NOT NULL AND last_reply IS NOT NULL"
                        " AND updated_at = ? ORDER BY id DESC LIMIT 1",
                        (domain, replied_at),
                    )
                    row = cursor.fetchone()
                    last_reply = None if row is None else str(row[0])
                summaries.append(
                    DestinationSummary(
                        domain=str(domain),
                        recipients=int(count),
                        deferred=int(deferred),
                        oldest_received_at=int(oldest) / 1000,
                        next_attempt_at=int(next_at) / 1000,
                        last_reply=last_reply,
                    )
                )
            return summaries

        return await self.run("deferred_by_destination", txn, readonly=True)

    async def deferred_messages(
        self, domain: str, after: str | None = None, limit: int = 50
    ) -> PendingPage:
        """The recipients still to deliver to ``domain``, oldest first (by recipient id; a
        retried row keeps its place), from the position ``after``."""
        limit = _check_limit(limit)
        position = None if after is None else decode_cursor(after, (int,))

        async def txn(cursor: ICursor) -> PendingPage:
            await cursor.execute(
                "SELECT r.id, r.queue_id, r.address, r.state, r.attempts, r.next_attempt_at,"
                " r.last_reply, m.sender, m.received_at"
                " FROM recipients r JOIN messages m ON m.queue_id = r.queue_id"
                " WHERE r.domain = ? AND r.next_attempt_at IS NOT NULL AND r.id > ?"
                " ORDER BY r.id LIMIT ?",
                (domain.lower(), -1 if position is None else position[0], limit + 1),
            )
            found = cursor.fetchall()
            rows = tuple(
                PendingRow(
                    recipient_id=int(r[0]),
                    queue_id=str(r[1]),
                    address=str(r[2]),
                    state=str(r[3]),
                    attempts=int(r[4]),
                    next_attempt_at=int(r[5]) / 1000,
                    last_reply=None if r[6] is None else str(r[6]),
                    sender=str(r[7]),
                    received_at=int(r[8]) / 1000,
                )
                for r in found[:limit]
            )
            more = len(found) > limit
            return PendingPage(rows, encode_cursor(rows[-1].recipient_id) if more else None)

        return await self.run("deferred_messages", txn, readonly=True)

    async def retry_destination(self, domain: str) -> int:
        """Make the waiting recipients of ``domain`` due now (as ``retry_now`` does for a
        message); returns how many."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> int:
            await cursor.execute(
                "UPDATE recipients SET next_attempt_at = ?, updated_at = ?, lease_owner = NULL,"
                " state = CASE WHEN state <> 'delivering' THEN state"
                "  WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END"
                " WHERE domain = ? AND next_attempt_at IS NOT NULL"
                " AND (state IN ('queued', 'deferred')"
                "  OR (state = 'delivering' AND next_attempt_at <= ?))",
                (now_ms, now_ms, domain.lower(), now_ms),
            )
            changed = int(cursor.rowcount)
            if changed:
                await cursor.notify(QUEUE_CHANNEL)
            return changed

        return await self.run("retry_destination", txn)

    async def drop_destination(self, domain: str, by: str) -> int:
        """Stop delivering to ``domain``: its recipients not yet in a final state become
        ``dropped`` with one ``dropped`` event each, as ``drop_message`` does (``last_reply``
        says who: ``dropped by {by}``); returns how many."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> int:
            await cursor.execute(
                "UPDATE recipients SET state = 'dropped', next_attempt_at = NULL,"
                " lease_owner = NULL, last_reply = ?, updated_at = ?"
                " WHERE domain = ? AND next_attempt_at IS NOT NULL"
                " AND state IN ('queued', 'deferred', 'delivering')"
                " RETURNING queue_id, address",
                (f"dropped by {by}"[:500], now_ms, domain.lower()),
            )
            dropped = [(str(r[0]), str(r[1])) for r in cursor.fetchall()]
            await mark_finished(cursor, now_ms, {q for q, _ in dropped})
            await insert_events(cursor, now_ms, ((q, a, DroppedEvent(by=by)) for q, a in dropped))
            return len(dropped)

        return await self.run("drop_destination", txn)

    async def recent_feedback(
        self,
        kind: str | None = None,
        state: str | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> FeedbackPage:
        """Feedback reports, newest first by (received_at, report_id), with the diagnostics
        the processor recorded as an event of the matched copy."""
        limit = _check_limit(limit)
        position = None if after is None else decode_cursor(after, (int, str))

        async def txn(cursor: ICursor) -> FeedbackPage:
            # The event the processor wrote for this report (its time is processed_at), or
            # the earlier one of the same copy a duplicate report was matched to.
            sql = (
                "SELECT f.report_id, f.received_at, f.sender, f.state, f.kind, f.reason,"
                " f.matched_by, f.queue_id, f.recipient, f.processed_at,"
                " (SELECT e.data FROM events e WHERE e.queue_id = f.queue_id"
                "  AND e.recipient = f.recipient AND e.time <= f.processed_at AND e.type ="
                "  CASE f.kind WHEN 'bounce' THEN 'bounced' WHEN 'complaint' THEN 'complained'"
                "  WHEN 'unsubscribe' THEN 'unsubscribed' END"
                "  ORDER BY e.time DESC, e.id DESC LIMIT 1)"
                " FROM feedback_reports f WHERE 1 = 1"
            )
            args: list[Any] = []
            if _set(kind) is not None:
                sql += " AND f.kind = ?"
                args.append(kind)
            if _set(state) is not None:
                sql += " AND f.state = ?"
                args.append(state)
            if position is not None:
                sql += " AND (f.received_at, f.report_id) < (?, ?)"
                args.extend(position)
            sql += " ORDER BY f.received_at DESC, f.report_id DESC LIMIT ?"
            await cursor.execute(sql, (*args, limit + 1))
            found = cursor.fetchall()
            rows = tuple(
                FeedbackRow(
                    report_id=str(r[0]),
                    received_at=int(r[1]) / 1000,
                    sender=str(r[2]),
                    state=str(r[3]),
                    kind=None if r[4] is None else str(r[4]),
                    reason=str(r[5] or ""),
                    matched_by=None if r[6] is None else str(r[6]),
                    queue_id=None if r[7] is None else str(r[7]),
                    recipient=None if r[8] is None else str(r[8]),
                    processed_at=from_ms(None if r[9] is None else int(r[9])),
                    diagnostics=None if r[10] is None else _json_dict(r[10]),
                )
                for r in found[:limit]
            )
            more = len(found) > limit
            next_cursor = None
            if more:
                next_cursor = encode_cursor(int(found[limit - 1][1]), str(found[limit - 1][0]))
            return FeedbackPage(rows, next_cursor)

        return await self.run("recent_feedback", txn, readonly=True)

    async def top_recipient_domains(
        self,
        since: float,
        until: float,
        tag: str | None = None,
        sender_domain: str | None = None,
        limit: int = 10,
    ) -> list[DomainStats]:
        """The recipient domains that received the most over the hours beginning in
        [since, until) (roll-ups), with their delivered, bounced ... counts."""
        limit = _check_limit(limit)

        tag_value = ALL_TAGS if tag is None else tag
        day_lo, day_hi, edges = _whole_days(to_ms(since), to_ms(until))
        if sender_domain is not None:  # not in the daily table: every hour from rollups
            day_lo, day_hi, edges = 0, 0, [(to_ms(since), to_ms(until))]
        columns = ", ".join(
            f"SUM(CASE WHEN type = '{t}' THEN count ELSE 0 END)" for t in DOMAIN_TYPES
        )

        async def txn(cursor: ICursor) -> list[DomainStats]:
            parts = [
                "SELECT recipient_domain, type, count FROM rollups_by_domain_day"
                " WHERE tag = ? AND day >= ? AND day < ?"
            ]
            args: list[Any] = [tag_value, day_lo, day_hi]
            for lo, hi in edges:
                if sender_domain is not None:
                    # That sender domain's rows only: a range of rollups_tag_sender_domain
                    # (tag, sender_domain, hour); the biggest sender of bench/reports.py has
                    # 35,000 of the month's 2 million (550 -> 33 ms CPU on SQLite).
                    part = (
                        "SELECT recipient_domain, type, count FROM rollups"
                        " WHERE tag = ? AND sender_domain = ? AND hour >= ? AND hour < ?"
                        f" AND type IN ({marks(len(DOMAIN_TYPES))})"
                    )
                    args += [tag_value, sender_domain.lower(), lo, hi, *DOMAIN_TYPES]
                    parts.append(part)
                    continue
                hours = _hour_starts(lo, hi)
                if not hours:
                    continue
                # One seek of the primary key (hour, tag, ...) per hour: that tag's rows only
                # (an hour range read every tag's rows). The ends are under 48 hours.
                part = (
                    "SELECT recipient_domain, type, count FROM rollups"
                    f" WHERE hour IN ({marks(len(hours))}) AND tag = ?"
                    f" AND type IN ({marks(len(DOMAIN_TYPES))})"
                )
                args += [*hours, tag_value, *DOMAIN_TYPES]
                parts.append(part)
            sql = (
                f"SELECT recipient_domain, {columns} FROM ({' UNION ALL '.join(parts)})"
                f" AS counted GROUP BY recipient_domain ORDER BY {columns.split(', ')[0]} DESC,"
                " recipient_domain LIMIT ?"
            )
            await cursor.execute(sql, (*args, limit))
            return [
                DomainStats(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]))
                for r in cursor.fetchall()
            ]

        return await self.run("top_recipient_domains", txn, readonly=True)

    async def top_urls(
        self, since: float, until: float, tag: str | None = None, limit: int = 10
    ) -> list[UrlStats]:
        """The most clicked URLs (scheme://host/path) over the hours beginning in
        [since, until): the whole UTC days from ``rollup_urls_by_day``, the hours at the ends
        from ``rollup_urls``."""
        limit = _check_limit(limit)

        tag_value = ALL_TAGS if tag is None else tag
        day_lo, day_hi, edges = _whole_days(to_ms(since), to_ms(until))

        async def txn(cursor: ICursor) -> list[UrlStats]:
            parts = [
                "SELECT url, count, machine_count FROM rollup_urls_by_day"
                " WHERE tag = ? AND day >= ? AND day < ?"
            ]
            args: list[Any] = [tag_value, day_lo, day_hi]
            for lo, hi in edges:
                parts.append(
                    "SELECT url, count, machine_count FROM rollup_urls"
                    " WHERE tag = ? AND hour >= ? AND hour < ?"
                )
                args += [tag_value, lo, hi]
            await cursor.execute(
                "SELECT url, SUM(count) AS clicks, SUM(machine_count)"
                f" FROM ({' UNION ALL '.join(parts)}) AS counted"
                " GROUP BY url ORDER BY clicks DESC, url LIMIT ?",
                (*args, limit),
            )
            return [UrlStats(str(r[0]), int(r[1]), int(r[2])) for r in cursor.fetchall()]

        return await self.run("top_urls", txn, readonly=True)


# -- helpers -----------------------------------------------------------------------------


def _whole_days(since_ms: int, until_ms: int) -> tuple[int, int, list[tuple[int, int]]]:
    """The hours that begin in [since, until) as whole UTC days [day_lo, day_hi) (read from a
    daily summary) and the hour ranges left at the two ends (read hourly)."""
    hours_end = -(-until_ms // HOUR_MS) * HOUR_MS  # past the last hour beginning before until
    day_lo = -(-since_ms // DAY_MS) * DAY_MS
    day_hi = hours_end // DAY_MS * DAY_MS
    if day_lo >= day_hi:
        return 0, 0, [(since_ms, until_ms)]
    return day_lo, day_hi, [(since_ms, day_lo), (day_hi, until_ms)]


def _hour_starts(since_ms: int, until_ms: int) -> list[int]:
    """The starts of the hours (roll-up rows' ``hour``) in [since, until): at most 48 for
    the ends that :func:`_whole_days` leaves."""
    first = -(-since_ms // HOUR_MS) * HOUR_MS
    return list(range(first, until_ms, HOUR_MS))


def _set(value: str | None) -> str | None:
    """A filter's value, None when not set (None or only blanks)."""
    if value is None:
        return None
    if "\x00" in value:
        raise ValueError("a search value cannot hold a NUL character")
    value = value.strip()
    return value or None


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")
    return limit


def _json_list(value: object) -> list[str]:
    try:
        loaded = json.loads(str(value)) if value is not None else []
    except ValueError:
        return []
    return [str(v) for v in loaded] if isinstance(loaded, list) else []


def _json_dict(value: object) -> dict[str, Any]:
    try:
        loaded = json.loads(str(value)) if value is not None else {}
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _headers(head: bytes) -> tuple[tuple[str, str], ...]:
    """The header fields of a message's first bytes, RFC 2047 words decoded, at most
    :data:`MAX_HEADERS`; a field that cannot be decoded is shown as received. (The compat32
    parser and ``decode_header``: the default policy's header objects cost milliseconds per
    message, too much for a page of 50.)"""
    for end in (b"\r\n\r\n", b"\n\n"):
        at = head.find(end)
        if at >= 0:
            head = head[: at + len(end)]
            break
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    fields: list[tuple[str, str]] = []
    for name, raw in parsed.items():
        fields.append((str(name), _decoded(raw)))
        if len(fields) >= MAX_HEADERS:
            break
    return tuple(fields)


def _decoded(raw: object) -> str:
    text = raw if isinstance(raw, str) else str(raw)
    try:
        value = str(email.header.make_header(email.header.decode_header(text)))
    except Exception:  # a hostile or broken encoded word: shown as it came
        value = text
    # Bytes that were not UTF-8 come back as lone surrogates, which no page can encode.
    value = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    return " ".join(value.split())[:2000]


def _subject(head: bytes) -> str | None:
    return next((v for n, v in _headers(head) if n.lower() == "subject"), None)


async def _message_rows(cursor: ICursor, queue_ids: Sequence[str]) -> dict[str, MessageRow]:
    """The search rows of ``queue_ids`` (three queries: recipient states, the first
    recipients, messages)."""
    if not queue_ids:
        return {}
    found: dict[str, MessageRow] = {}
    for chunk in chunks(queue_ids):
        await cursor.execute(
            "SELECT queue_id, state, COUNT(*) FROM recipients"
            f" WHERE queue_id IN ({marks(len(chunk))}) GROUP BY queue_id, state",
            chunk,
        )
        states: dict[str, dict[str, int]] = {}
        for queue_id, state, count in cursor.fetchall():
            states.setdefault(str(queue_id), {})[str(state)] = int(count)
        # One seek of recipients_queue_id per message, its rows sorted by id. "id + 0":
        # ordered by the bare id, PostgreSQL walks the primary key instead and filters
        # (320 ms for a message with 10,000 recipients among 200,000 rows; 2.6 ms so). Like
        # the state counts above, a message costs in proportion to its recipients.
        one = (
            "SELECT * FROM (SELECT queue_id, address, state, id FROM recipients"
            " WHERE queue_id = ? ORDER BY id + 0 LIMIT ?) AS r"
        )
        first: dict[str, list[tuple[int, str, str]]] = {}
        for part in chunks(chunk, 100):  # SQLite allows 500 terms in a compound SELECT
            await cursor.execute(
                " UNION ALL ".join([one] * len(part)),
                [value for queue_id in part for value in (queue_id, FIRST_RECIPIENTS)],
            )
            for queue_id, address, state, rid in cursor.fetchall():
                first.setdefault(str(queue_id), []).append((int(rid), str(address), str(state)))
        await cursor.execute(
            "SELECT m.queue_id, m.received_at, m.sender, m.size, m.tags,"
            " substr(b.raw, 1, ?), b.queue_id IS NOT NULL"
            " FROM messages m LEFT JOIN message_bodies b ON b.queue_id = m.queue_id"
            f" WHERE m.queue_id IN ({marks(len(chunk))})",
            (SUBJECT_BYTES, *chunk),
        )
        for r in cursor.fetchall():
            queue_id = str(r[0])
            kept = bool(r[6])
            subject = None
            if kept and r[5] is not None:
                subject = _subject(bytes(r[5]))
            by_state = states.get(queue_id, {})
            found[queue_id] = MessageRow(
                queue_id=queue_id,
                received_at=int(r[1]) / 1000,
                sender=str(r[2]),
                recipients=sum(by_state.values()),
                states=tuple(sorted(by_state.items())),
                subject=subject,
                tags=tuple(_json_list(r[4])),
                size=int(r[3]),
                body_purged=not kept,
                first_recipients=tuple((a, s) for _, a, s in sorted(first.get(queue_id, []))),
            )
    return found
