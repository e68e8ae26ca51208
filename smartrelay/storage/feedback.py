"""The ``feedback_reports`` table: messages received at the inbound MX, kept raw."""

from __future__ import annotations

import json

from attrs import frozen

from smartrelay.ids import new_queue_id
from smartrelay.spool import SpooledBody
from smartrelay.storage.base import StoreBase
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.queue import BIG_MESSAGE

FEEDBACK_CHANNEL = "smartrelay_feedback"


@frozen
class NewFeedback:
    """A message received by the inbound listener, kept raw until the feedback issue's
    processor classifies it."""

    sender: str
    recipients: tuple[str, ...]
    raw: bytes
    client_ip: str | None = None
    report_id: str | None = None
    #: The message, when it was too big to keep in memory (``raw`` is then empty).
    spooled: SpooledBody | None = None


class FeedbackStore(StoreBase):
    async def store_feedback(self, report: NewFeedback, notify: bool = True) -> str:
        """Keep a message that arrived at the inbound MX (a bounce, a complaint, a reply) for
        the feedback processor; returns its id. ``notify``: wake the feedback service to
        process it (a mailbox reader, which processes what it stores itself, does not)."""
        now_ms = self.now_ms()
        report_id = report.report_id or "R" + new_queue_id(now_ms / 1000)

        async def txn(cursor: ICursor) -> str:
            await cursor.execute(
                "INSERT INTO feedback_reports (report_id, received_at, sender, recipients,"
                " client_ip, state, raw) VALUES (?, ?, ?, ?, ?, 'new', ?)",
                (
                    report_id,
                    now_ms,
                    report.sender,
                    json.dumps(list(report.recipients)),
                    report.client_ip,
                    report.raw if report.spooled is None else b"",
                ),
            )
            if report.spooled is not None:
                await cursor.write_blob(
                    "feedback_reports", "raw", "report_id", report_id, report.raw, report.spooled
                )
            if notify:
                await cursor.notify(FEEDBACK_CHANNEL)
            return report_id

        return await self.run("store_feedback", txn)

    async def load_feedback(self, report_id: str, max_size: int) -> StoredFeedback | None:
        """The report ``report_id`` (None when there is no such report), its raw bytes only
        when they are at most ``max_size`` bytes (read in pieces when big)."""

        async def txn(cursor: ICursor) -> StoredFeedback | None:
            await cursor.execute(
                "SELECT report_id, received_at, sender, recipients, state, length(raw),"
                " CASE WHEN length(raw) <= ? THEN raw END FROM feedback_reports"
                " WHERE report_id = ?",
                (min(max_size, BIG_MESSAGE), report_id),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            size = int(row[5] or 0)
            raw: bytes | None = None
            if row[6] is not None:
                raw = bytes(row[6])
            elif size <= max_size:  # big: read in pieces
                raw = bytes(
                    await cursor.read_blob("feedback_reports", "raw", "report_id", report_id)
                )
            return StoredFeedback(
                report_id=str(row[0]),
                received_at=int(row[1]) / 1000,
                sender=str(row[2]),
                recipients=tuple(json.loads(row[3])),
                state=str(row[4]),
                size=size,
                raw=raw,
            )

        return await self.run("load_feedback", txn, readonly=True)

    async def feedback_ids(
        self, state: str, after: tuple[float, str] | None = None, limit: int = 100
    ) -> list[tuple[float, str]]:
        """(received_at, report_id) of up to ``limit`` reports in ``state``, in arrival order,
        after the position ``after`` (keyset paging: a page costs the same however far)."""

        async def txn(cursor: ICursor) -> list[tuple[float, str]]:
            sql = "SELECT received_at, report_id FROM feedback_reports WHERE state = ?"
            args: list[object] = [state]
            if after is not None:
                after_ms = round(after[0] * 1000)
                sql += " AND (received_at > ? OR (received_at = ? AND report_id > ?))"
                args += [after_ms, after_ms, after[1]]
            await cursor.execute(sql + " ORDER BY received_at, report_id LIMIT ?", (*args, limit))
            return [(int(r[0]) / 1000, str(r[1])) for r in cursor.fetchall()]

        return await self.run("feedback_ids", txn, readonly=True)

    async def list_feedback(
        self, state: str | None = None, limit: int = 1000
    ) -> list[FeedbackSummary]:
        """Reports (of one state, or all), oldest first, with the processor's verdict."""

        async def txn(cursor: ICursor) -> list[FeedbackSummary]:
            if state is None:
                await cursor.execute(
                    f"{_LIST_COLUMNS} ORDER BY received_at, report_id LIMIT ?", (limit,)
                )
            else:
                await cursor.execute(
                    f"{_LIST_COLUMNS} WHERE state = ? ORDER BY received_at, report_id LIMIT ?",
                    (state, limit),
                )
            return [_summary(row) for row in cursor.fetchall()]

        return await self.run("list_feedback", txn, readonly=True)

    async def feedback_summary(self, report_id: str) -> FeedbackSummary | None:
        async def txn(cursor: ICursor) -> FeedbackSummary | None:
            await cursor.execute(f"{_LIST_COLUMNS} WHERE report_id = ?", (report_id,))
            row = cursor.fetchone()
            return None if row is None else _summary(row)

        return await self.run("feedback_summary", txn, readonly=True)

    async def store_ignored_feedback(self, report: NewFeedback, reason: str) -> str:
        """Keep a message that will not be classified (too big, malformed) with state
        ``ignored`` and ``reason``, so that it is visible and never fetched again; returns its
        id. ``report.raw`` may be a part of the message (its header)."""
        now_ms = self.now_ms()
        report_id = report.report_id or "R" + new_queue_id(now_ms / 1000)

        async def txn(cursor: ICursor) -> str:
            await cursor.execute(
                "INSERT INTO feedback_reports (report_id, received_at, sender, recipients,"
                " client_ip, state, processed_at, raw, reason)"
                " VALUES (?, ?, ?, ?, ?, 'ignored', ?, ?, ?)",
                (
                    report_id,
                    now_ms,
                    report.sender,
                    json.dumps(list(report.recipients)),
                    report.client_ip,
                    now_ms,
                    report.raw,
                    reason,
                ),
            )
            return report_id

        return await self.run("store_ignored_feedback", txn)


#: The states of a report (SPEC section 6, ``feedback list``).
FEEDBACK_STATES = ("new", "processed", "ignored", "unmatched")
_LIST_COLUMNS = (
    "SELECT report_id, received_at, sender, recipients, client_ip, state, processed_at, kind,"
    " reason, matched_by, queue_id, recipient FROM feedback_reports"
)


@frozen
class StoredFeedback:
    """A stored report as the processor reads it: ``raw`` is None when the report is bigger
    than the processor takes (it is then not loaded at all)."""

    report_id: str
    received_at: float
    sender: str
    recipients: tuple[str, ...]
    state: str
    size: int
    raw: bytes | None


@frozen
class FeedbackSummary:
    """One line of ``feedback list``: a report and the processor's verdict on it."""

    report_id: str
    received_at: float
    sender: str
    recipients: tuple[str, ...]
    client_ip: str | None
    state: str
    processed_at: float | None
    kind: str | None
    reason: str
    matched_by: str | None
    queue_id: str | None
    recipient: str | None


@frozen
class FeedbackVerdict:
    """What the processor decided about a report; written by :func:`finish_report`."""

    state: str  # processed, ignored, unmatched
    reason: str = ""
    kind: str | None = None
    matched_by: str | None = None
    queue_id: str | None = None
    recipient: str | None = None
    recipient_id: int | None = None


async def finish_report(
    cursor: ICursor, report_id: str, expected_state: str, verdict: FeedbackVerdict, now_ms: int
) -> bool:
    """Set the report's verdict if it is still in ``expected_state``, inside the transaction
    that records its effects; False when another processor got there first (the caller then
    rolls its effects back)."""
    await cursor.execute(
        "UPDATE feedback_reports SET state = ?, reason = ?, kind = ?, matched_by = ?,"
        " queue_id = ?, recipient = ?, recipient_id = ?, processed_at = ?"
        " WHERE report_id = ? AND state = ?",
        (
            verdict.state,
            verdict.reason[:500],
            verdict.kind,
            verdict.matched_by,
            verdict.queue_id,
            verdict.recipient,
            verdict.recipient_id,
            now_ms,
            report_id,
            expected_state,
        ),
    )
    return int(cursor.rowcount) == 1


async def recipient_by_id(cursor: ICursor, recipient_id: int) -> tuple[int, str, str, str] | None:
    """(id, queue_id, address, sender) of a ``recipients`` row, or None when it is gone."""
    if not 0 <= recipient_id <= 2**63 - 1:
        return None
    await cursor.execute(
        "SELECT r.id, r.queue_id, r.address, m.sender FROM recipients r"
        " JOIN messages m ON m.queue_id = r.queue_id WHERE r.id = ?",
        (recipient_id,),
    )
    row = cursor.fetchone()
    return None if row is None else (int(row[0]), str(row[1]), str(row[2]), str(row[3]))


async def message_recipients(cursor: ICursor, queue_id: str) -> list[tuple[int, str, str, str]]:
    """(id, queue_id, address, sender) of each recipient of message ``queue_id`` (none when
    the message is unknown or purged)."""
    await cursor.execute(
        "SELECT r.id, r.queue_id, r.address, m.sender FROM recipients r"
        " JOIN messages m ON m.queue_id = r.queue_id WHERE r.queue_id = ? ORDER BY r.id",
        (queue_id,),
    )
    return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in cursor.fetchall()]


async def recent_copy(cursor: ICursor, address: str, since_ms: int) -> tuple[str, str] | None:
    """(queue_id, address as sent) of the latest copy sent to ``address`` (any letter case)
    at or after ``since_ms``: the latest ``delivered`` event, else the latest ``received``
    one. Index-backed (``events_recipient_time``): the recipient's own events only."""
    for event_type in ("delivered", "received"):
        await cursor.execute(
            "SELECT queue_id, recipient FROM events WHERE lower(recipient) = ? AND time >= ?"
            " AND type = ? AND queue_id IS NOT NULL ORDER BY time DESC, id DESC LIMIT 1",
            (address.lower(), since_ms, event_type),
        )
        row = cursor.fetchone()
        if row is not None:
            return str(row[0]), str(row[1])
    return None


async def copy_has_event(cursor: ICursor, queue_id: str, address: str, event_type: str) -> bool:
    """Whether message ``queue_id``'s copy to ``address`` already has an event of the type."""
    await cursor.execute(
        "SELECT 1 FROM events WHERE queue_id = ? AND recipient = ? AND type = ? LIMIT 1",
        (queue_id, address, event_type),
    )
    return cursor.fetchone() is not None


def _summary(row: tuple[object, ...]) -> FeedbackSummary:
    return FeedbackSummary(
        report_id=str(row[0]),
        received_at=int(row[1]) / 1000,  # type: ignore[call-overload]
        sender=str(row[2]),
        recipients=tuple(json.loads(str(row[3]))),
        client_ip=None if row[4] is None else str(row[4]),
        state=str(row[5]),
        processed_at=None if row[6] is None else int(row[6]) / 1000,  # type: ignore[call-overload]
        kind=None if row[7] is None else str(row[7]),
        reason=str(row[8] or ""),
        matched_by=None if row[9] is None else str(row[9]),
        queue_id=None if row[10] is None else str(row[10]),
        recipient=None if row[11] is None else str(row[11]),
    )
