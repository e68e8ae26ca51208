"""The database gauges of ``/metrics`` (docs/metrics.md): shared state, read when scraped.

Every query is bounded in what it returns (at most :data:`TOP_DESTINATIONS` + 1 queue rows,
one row per feedback state, per webhook endpoint) and walks an index: the queue's through
``recipients_pending_domain`` (the partial index of recipients still to deliver, so a
finished history costs nothing), the reports' through ``feedback_reports_state``. The oldest
waiting recipient of a destination is its lowest id (ids grow with acceptance), whose
message's ``received_at`` is then read by primary key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from smartrelay.metrics import DatabaseFigures, DestinationFigures, WebhookFigures
from smartrelay.storage.base import StoreBase, marks
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.webhook_admin import WebhookAdminStore

__all__ = ["TOP_DESTINATIONS", "MetricsStore"]

#: Destinations with a gauge of their own; the rest are summed as ``other``.
TOP_DESTINATIONS = 50


class MetricsStore(StoreBase):
    async def metrics_figures(
        self, webhooks: Sequence[tuple[str, Sequence[str]]] = ()
    ) -> DatabaseFigures:
        """The gauges' figures now. ``webhooks``: the configured endpoints' (url, event
        types), whose backlog is counted (other endpoint rows get none)."""
        now_ms = self.now_ms()

        async def txn(
            cursor: ICursor,
        ) -> tuple[tuple[DestinationFigures, ...], tuple[tuple[str, int], ...], int]:
            queue = await _queue(cursor, now_ms)
            await cursor.execute(
                "SELECT state, COUNT(*) FROM feedback_reports GROUP BY state ORDER BY state"
            )
            reports = tuple((str(r[0]), int(r[1])) for r in cursor.fetchall())
            await cursor.execute("SELECT COUNT(*) FROM credential_volume WHERE held_at IS NOT NULL")
            row = cursor.fetchone()
            held = int(row[0]) if row else 0
            return queue, reports, held

        queue, reports, held = await self.run("metrics_figures", txn, readonly=True)
        # The endpoints as the operator sees them (Store mixes WebhookAdminStore in too).
        statuses = await cast(WebhookAdminStore, self).webhook_endpoints_status(dict(webhooks))
        return DatabaseFigures(
            read_at=now_ms / 1000,
            queue=queue,
            feedback_reports=reports,
            credentials_held=held,
            webhooks=tuple(
                WebhookFigures(
                    s.url,
                    s.state == "disabled",
                    s.failures,
                    s.sent_events,
                    s.dead_letters,
                    s.backlog,
                )
                for s in statuses
                if s.position is not None  # a configured url no relay has a row for yet
            ),
        )


async def _queue(cursor: ICursor, now_ms: int) -> tuple[DestinationFigures, ...]:
    """The :data:`TOP_DESTINATIONS` deepest destinations and ``other`` (when any)."""
    await cursor.execute(
        "SELECT domain, COUNT(*), MIN(id) FROM recipients WHERE next_attempt_at IS NOT NULL"
        " GROUP BY domain ORDER BY COUNT(*) DESC, domain LIMIT ?",
        (TOP_DESTINATIONS,),
    )
    top = [(str(r[0]), int(r[1]), int(r[2])) for r in cursor.fetchall()]
    rows = list(top)
    if len(top) == TOP_DESTINATIONS:
        await cursor.execute(
            "SELECT COUNT(*), MIN(id) FROM recipients WHERE next_attempt_at IS NOT NULL"
            f" AND domain NOT IN ({marks(len(top))})",
            [domain for domain, _, _ in top],
        )
        row = cursor.fetchone()
        if row is not None and int(row[0]) > 0:
            rows.append(("other", int(row[0]), int(row[1])))
    if not rows:
        return ()
    await cursor.execute(
        "SELECT r.id, m.received_at FROM recipients r JOIN messages m"
        f" ON m.queue_id = r.queue_id WHERE r.id IN ({marks(len(rows))})",
        [first for _, _, first in rows],
    )
    received = {int(r[0]): int(r[1]) for r in cursor.fetchall()}
    return tuple(
        DestinationFigures(
            destination,
            count,
            max(0.0, (now_ms - received.get(first, now_ms)) / 1000),
        )
        for destination, count, first in rows
    )
