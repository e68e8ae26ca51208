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
from smartrelay.storage.event_positions import EventPosition, EventPositionStore
from smartrelay.storage.interfaces import ICursor

__all__ = ["BACKLOG_CAP", "TOP_DESTINATIONS", "MetricsStore"]

#: Destinations with a gauge of their own; the rest are summed as ``other``.
TOP_DESTINATIONS = 50
#: A webhook backlog is counted up to this many events (cheap however far behind it is).
BACKLOG_CAP = 100_000


class MetricsStore(StoreBase):
    async def metrics_figures(
        self, webhooks: Sequence[tuple[str, Sequence[str]]] = ()
    ) -> DatabaseFigures:
        """The gauges' figures now. ``webhooks``: the configured endpoints' (url, event
        types), whose backlog is counted (other endpoint rows get none)."""
        now_ms = self.now_ms()

        async def txn(
            cursor: ICursor,
        ) -> tuple[
            tuple[DestinationFigures, ...],
            tuple[tuple[str, int], ...],
            int,
            list[tuple[str, bool, int, int, int, EventPosition]],
        ]:
            queue = await _queue(cursor, now_ms)
            await cursor.execute(
                "SELECT state, COUNT(*) FROM feedback_reports GROUP BY state ORDER BY state"
            )
            reports = tuple((str(r[0]), int(r[1])) for r in cursor.fetchall())
            await cursor.execute("SELECT COUNT(*) FROM credential_volume WHERE held_at IS NOT NULL")
            row = cursor.fetchone()
            held = int(row[0]) if row else 0
            await cursor.execute("SELECT url, COUNT(*) FROM webhook_dead_letters GROUP BY url")
            dead = {str(r[0]): int(r[1]) for r in cursor.fetchall()}
            await cursor.execute(
                "SELECT url, state, failures, sent_events, position_txid, position_id"
                " FROM webhook_endpoints ORDER BY url"
            )
            endpoints = [
                (
                    str(r[0]),
                    str(r[1]) == "disabled",
                    int(r[2]),
                    int(r[3]),
                    dead.get(str(r[0]), 0),
                    EventPosition(int(r[4]), int(r[5])),
                )
                for r in cursor.fetchall()
            ]
            return queue, reports, held, endpoints

        queue, reports, held, endpoints = await self.run("metrics_figures", txn, readonly=True)
        # Store mixes both in (EventPositionStore before this one, as its MRO needs).
        positions = cast(EventPositionStore, self)
        types = dict(webhooks)
        figures: list[WebhookFigures] = []
        head: EventPosition | None = None
        for url, disabled, failures, sent, dead_letters, position in endpoints:
            backlog: int | None = None
            if url in types:
                if head is None:
                    head = await positions.event_head()
                backlog = await positions.count_events_between(
                    position, head, tuple(types[url]), cap=BACKLOG_CAP
                )
            figures.append(WebhookFigures(url, disabled, failures, sent, dead_letters, backlog))
        return DatabaseFigures(
            read_at=now_ms / 1000,
            queue=queue,
            feedback_reports=reports,
            credentials_held=held,
            webhooks=tuple(figures),
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
