"""The ``feedback_reports`` table: messages received at the inbound MX, kept raw."""

from __future__ import annotations

import json

from attrs import frozen

from smartrelay.ids import new_queue_id
from smartrelay.spool import SpooledBody
from smartrelay.storage.base import StoreBase
from smartrelay.storage.interfaces import ICursor

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
    async def store_feedback(self, report: NewFeedback) -> str:
        """Keep a message that arrived at the inbound MX (a bounce, a complaint, a reply) for
        the feedback processor; returns its id."""
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
            await cursor.notify(FEEDBACK_CHANNEL)
            return report_id

        return await self.run("store_feedback", txn)

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
