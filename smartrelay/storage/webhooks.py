"""The webhook sender's queries on ``webhook_endpoints`` and ``webhook_dead_letters`` (schema
012, docs/webhooks.md): the lease, the acknowledged position, the failure run, dead letters and
their replays. The admin side (listing, enabling, asking for a replay) is
:mod:`smartrelay.storage.webhook_admin`.

Every write to an endpoint's row, and to its dead letters, is conditional on the caller still
holding the endpoint's lease (``lease_owner``): a node that lost it (it stalled past
``lease_until`` and another node took over) changes nothing. Acknowledging is also conditional
on the position being the one the batch was read from.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import frozen

from smartrelay.storage.base import StoreBase, from_ms, marks, to_ms
from smartrelay.storage.event_positions import EventPosition, _range
from smartrelay.storage.interfaces import ICursor, Row

__all__ = ["ReplayRange", "WebhookEndpoint", "WebhookStore"]

_ENDPOINT_COLUMNS = (
    "url, position_txid, position_id, state, failing_since, attempts, next_attempt_at,"
    " last_error, lease_owner, lease_until"
)


@frozen
class WebhookEndpoint:
    """An endpoint's row as its sender reads it."""

    url: str
    position: EventPosition
    state: str
    failing_since: float | None
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    lease_owner: str | None
    lease_until: float | None
    #: The reader holds the lease (after :meth:`WebhookStore.webhook_lease`).
    held: bool = False


@frozen
class ReplayRange:
    """A dead-lettered range ``(after, upto]`` with a replay asked for, and its progress."""

    id: int
    url: str
    after: EventPosition
    upto: EventPosition
    #: Where the replay resumes (``after`` until a batch of it was acknowledged).
    resume: EventPosition
    attempts: int


def _endpoint(row: Row, held: bool) -> WebhookEndpoint:
    return WebhookEndpoint(
        url=str(row[0]),
        position=EventPosition(int(row[1]), int(row[2])),
        state=str(row[3]),
        failing_since=from_ms(row[4]),
        attempts=int(row[5]),
        next_attempt_at=from_ms(row[6]),
        last_error=None if row[7] is None else str(row[7]),
        lease_owner=None if row[8] is None else str(row[8]),
        lease_until=from_ms(row[9]),
        held=held,
    )


_HOLDING = "url = ? AND lease_owner = ?"
_DEAD_HOLDING = (
    "id = ? AND url = ? AND EXISTS (SELECT 1 FROM webhook_endpoints w"
    " WHERE w.url = ? AND w.lease_owner = ?)"
)


class WebhookStore(StoreBase):
    async def ensure_webhook_endpoint(self, url: str) -> None:
        """The endpoint's row, made at the events' head when it has none (a new endpoint
        gets the events from now on, not the history)."""
        head = await self.event_head()  # type: ignore[attr-defined]
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> None:
            await cursor.execute(
                "INSERT INTO webhook_endpoints (url, position_txid, position_id, created_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (url) DO NOTHING",
                (url, head.txid, head.id, now_ms),
            )

        await self.run("ensure_webhook_endpoint", txn)

    async def webhook_lease(
        self, url: str, owner: str, lease_for: float, renew_within: float
    ) -> WebhookEndpoint | None:
        """The endpoint's row; its lease taken for ``owner`` (until now + ``lease_for``) when
        it is free, expired, or ``owner``'s with less than ``renew_within`` seconds left.
        ``held`` says whether ``owner`` holds it. None when the row is gone. A look that
        changes nothing is a read only (cheap to repeat every second)."""
        now_ms = self.now_ms()
        until_ms = now_ms + to_ms(lease_for)
        renew_ms = now_ms + to_ms(renew_within)
        select = f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE url = ?"

        def settled(row: Row) -> WebhookEndpoint | None:
            """The row as it stands when no write is needed, else None."""
            holder, until = row[8], row[9]
            if holder == owner and until is not None and int(until) > renew_ms:
                return _endpoint(row, True)
            if holder not in (None, owner) and until is not None and int(until) > now_ms:
                return _endpoint(row, False)
            return None

        async def look(cursor: ICursor) -> tuple[bool, WebhookEndpoint | None]:
            await cursor.execute(select, (url,))
            row = cursor.fetchone()
            if row is None:
                return True, None
            endpoint = settled(row)
            return endpoint is not None, endpoint

        done, endpoint = await self.run("webhook_lease_look", look, readonly=True)
        if done:
            return endpoint

        async def take(cursor: ICursor) -> WebhookEndpoint | None:
            # Conditional again: another node may have taken it since the look.
            await cursor.execute(
                "UPDATE webhook_endpoints SET lease_owner = ?, lease_until = ? WHERE url = ?"
                " AND (lease_owner IS NULL OR lease_owner = ? OR lease_until IS NULL"
                " OR lease_until <= ?)",
                (owner, until_ms, url, owner, now_ms),
            )
            taken = int(cursor.rowcount) > 0
            await cursor.execute(select, (url,))
            row = cursor.fetchone()
            return None if row is None else _endpoint(row, taken)

        return await self.run("webhook_lease", take)

    async def release_webhook_lease(self, url: str, owner: str) -> None:
        """Give the lease up (a clean stop: another node may take over at once)."""

        async def txn(cursor: ICursor) -> None:
            await cursor.execute(
                f"UPDATE webhook_endpoints SET lease_owner = NULL, lease_until = NULL"
                f" WHERE {_HOLDING}",
                (url, owner),
            )

        await self.run("release_webhook_lease", txn)

    async def webhook_advance(
        self, url: str, owner: str, after: EventPosition, upto: EventPosition, sent: int
    ) -> bool:
        """The events in ``(after, upto]`` are acknowledged (``sent`` of them POSTed; 0 for a
        stretch with none of the endpoint's types): the position moves to ``upto``; after a
        POST, the failure run ends. False when the lease or the position changed."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> bool:
            if sent:
                sets = (
                    "position_txid = ?, position_id = ?, sent_events = sent_events + ?,"
                    " failing_since = NULL, attempts = 0, next_attempt_at = NULL,"
                    " last_error = NULL, last_success_at = ?"
                )
                args: tuple[object, ...] = (upto.txid, upto.id, sent, now_ms)
            else:
                sets, args = "position_txid = ?, position_id = ?", (upto.txid, upto.id)
            await cursor.execute(
                f"UPDATE webhook_endpoints SET {sets} WHERE {_HOLDING}"
                " AND position_txid = ? AND position_id = ?",
                (*args, url, owner, after.txid, after.id),
            )
            return int(cursor.rowcount) > 0

        return await self.run("webhook_advance", txn)

    async def webhook_failed(
        self, url: str, owner: str, error: str, next_attempt_at: float
    ) -> WebhookEndpoint | None:
        """A POST failed: one more failure and attempt, the run's start kept (or set now),
        the next attempt and the error noted. The row after, or None without the lease."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> WebhookEndpoint | None:
            await cursor.execute(
                "UPDATE webhook_endpoints SET failures = failures + 1, attempts = attempts + 1,"
                " failing_since = COALESCE(failing_since, ?), next_attempt_at = ?,"
                f" last_error = ? WHERE {_HOLDING}",
                (now_ms, to_ms(next_attempt_at), error, url, owner),
            )
            if int(cursor.rowcount) == 0:
                return None
            await cursor.execute(
                f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE url = ?", (url,)
            )
            row = cursor.fetchone()
            return None if row is None else _endpoint(row, True)

        return await self.run("webhook_failed", txn)

    async def webhook_disable(self, url: str, owner: str, reason: str) -> bool:
        """``state = 'disabled'`` with ``reason`` (the receiver answered 410)."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> bool:
            await cursor.execute(
                "UPDATE webhook_endpoints SET state = 'disabled', disabled_at = ?,"
                f" disabled_reason = ? WHERE {_HOLDING}",
                (now_ms, reason, url, owner),
            )
            return int(cursor.rowcount) > 0

        return await self.run("webhook_disable", txn)

    async def webhook_dead_letter(
        self,
        url: str,
        owner: str,
        after: EventPosition,
        upto: EventPosition,
        types: Sequence[str],
        attempts: int,
        error: str,
    ) -> int | None:
        """Move the endpoint's position from ``after`` past ``upto``, the events of ``types``
        in ``(after, upto]`` recorded as one dead letter (none for a range without any). The
        dead letter's id (0 when none was needed), or None without the lease or when the
        position changed."""
        now_ms = self.now_ms()
        sqlite = self.engine.name == "sqlite"

        async def txn(cursor: ICursor) -> int | None:
            await cursor.execute(
                f"UPDATE webhook_endpoints SET position_txid = ?, position_id = ? WHERE {_HOLDING}"
                " AND position_txid = ? AND position_id = ?",
                (upto.txid, upto.id, url, owner, after.txid, after.id),
            )
            if int(cursor.rowcount) == 0:
                return None
            where, args = _range(sqlite, after, upto)
            if types:
                where += f" AND e.type IN ({marks(len(types))})"
                args.extend(types)
            await cursor.execute(
                f"SELECT COUNT(*), MIN(e.time), MAX(e.time) FROM events e WHERE {where}", args
            )
            row = cursor.fetchone()
            count = int(row[0]) if row else 0
            if count == 0:
                return 0
            assert row is not None
            await cursor.execute(
                "INSERT INTO webhook_dead_letters (url, after_txid, after_id, upto_txid,"
                " upto_id, events, first_event_at, last_event_at, created_at, attempts,"
                " last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (url, after.txid, after.id, upto.txid, upto.id, count, row[1], row[2], now_ms,
                 attempts, error),
            )  # fmt: skip
            inserted = cursor.fetchone()
            assert inserted is not None
            return int(inserted[0])

        return await self.run("webhook_dead_letter", txn)

    async def webhook_replay_next(self, url: str) -> ReplayRange | None:
        """The oldest dead letter of ``url`` with a replay asked for."""

        async def txn(cursor: ICursor) -> ReplayRange | None:
            await cursor.execute(
                "SELECT id, url, after_txid, after_id, upto_txid, upto_id, replay_txid,"
                " replay_id, attempts FROM webhook_dead_letters"
                " WHERE url = ? AND replay_requested_at IS NOT NULL ORDER BY id LIMIT 1",
                (url,),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            after = EventPosition(int(row[2]), int(row[3]))
            resume = after
            if row[6] is not None and row[7] is not None:
                resume = max(after, EventPosition(int(row[6]), int(row[7])))
            return ReplayRange(
                id=int(row[0]),
                url=str(row[1]),
                after=after,
                upto=EventPosition(int(row[4]), int(row[5])),
                resume=resume,
                attempts=int(row[8]),
            )

        return await self.run("webhook_replay_next", txn, readonly=True)

    async def webhook_replay_progress(
        self, dead: ReplayRange, owner: str, upto: EventPosition, sent: int
    ) -> bool:
        """A replay batch up to ``upto`` was acknowledged: the row resumes there, or is
        deleted when ``upto`` is its end. False without the lease."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> bool:
            args = (dead.id, dead.url, dead.url, owner)
            if upto >= dead.upto:
                await cursor.execute(
                    f"DELETE FROM webhook_dead_letters WHERE {_DEAD_HOLDING}", args
                )
            else:
                await cursor.execute(
                    "UPDATE webhook_dead_letters SET replay_txid = ?, replay_id = ?"
                    f" WHERE {_DEAD_HOLDING}",
                    (upto.txid, upto.id, *args),
                )
            if int(cursor.rowcount) == 0:
                return False
            if sent:  # the receiver took them: a run of failures ends here too
                await cursor.execute(
                    "UPDATE webhook_endpoints SET sent_events = sent_events + ?,"
                    " last_success_at = ?, failing_since = NULL, attempts = 0,"
                    f" next_attempt_at = NULL, last_error = NULL WHERE {_HOLDING}",
                    (sent, now_ms, dead.url, owner),
                )
            return True

        return await self.run("webhook_replay_progress", txn)

    async def webhook_replay_failed(self, dead: ReplayRange, owner: str, error: str) -> bool:
        """A replay's POST failed: the request is cleared (the row stays in the list, its
        progress kept), one more attempt, the error noted."""

        async def txn(cursor: ICursor) -> bool:
            await cursor.execute(
                "UPDATE webhook_dead_letters SET replay_requested_at = NULL,"
                f" attempts = attempts + 1, last_error = ? WHERE {_DEAD_HOLDING}",
                (error, dead.id, dead.url, dead.url, owner),
            )
            return int(cursor.rowcount) > 0

        return await self.run("webhook_replay_failed", txn)
