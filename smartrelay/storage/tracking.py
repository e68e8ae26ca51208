"""The queries behind the tracking and unsubscribe endpoints (SPEC sections 4 and 5), and
the recipient's other opt-out, a feedback-loop complaint.

Each method is one transaction. Events are written with :func:`insert_events`, at the
store's clock, naming the recipient's message (``queue_id``) and address like every other
event, so exports and webhooks see them with the message's sender, tags and metadata. What an
opt-out suppresses, and for how long, is the policy's (:mod:`smartrelay.suppression`).
"""

from __future__ import annotations

from attrs import frozen

from smartrelay import suppression as policy
from smartrelay.config import SuppressionConfig
from smartrelay.events import ClickedEvent, ComplainedEvent, OpenedEvent, UnsubscribedEvent
from smartrelay.storage.base import StoreBase, from_ms
from smartrelay.storage.events import insert_events
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from smartrelay.storage.suppressions import current_entry, write_suppressions

#: Recipient ids are BIGINT; a (authentic) token id above this cannot name a row.
_MAX_ROW_ID = 2**63 - 1


@frozen
class RecipientRef:
    """One ``recipients`` row, with its message's envelope sender."""

    recipient_id: int
    queue_id: str
    address: str
    sender: str


class TrackingStore(StoreBase):
    async def recipient_ref(self, recipient_id: int) -> RecipientRef | None:
        """The recipient a token names, or None when the row is gone (or never existed)."""
        if not 0 <= recipient_id <= _MAX_ROW_ID:
            return None

        async def txn(cursor: ICursor) -> RecipientRef | None:
            await cursor.execute(
                "SELECT r.id, r.queue_id, r.address, m.sender FROM recipients r"
                " JOIN messages m ON m.queue_id = r.queue_id WHERE r.id = ?",
                (recipient_id,),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            return RecipientRef(int(row[0]), str(row[1]), str(row[2]), str(row[3]))

        return await self.run("recipient_ref", txn, readonly=True)

    async def delivered_at(self, recipient_id: int) -> float | None:
        """When the recipient's latest ``delivered`` event was recorded (seconds), or None."""
        if not 0 <= recipient_id <= _MAX_ROW_ID:
            return None

        async def txn(cursor: ICursor) -> float | None:
            await cursor.execute(
                "SELECT MAX(e.time) FROM recipients r"
                " JOIN events e ON e.queue_id = r.queue_id AND e.recipient = r.address"
                " WHERE r.id = ? AND e.type = 'delivered'",
                (recipient_id,),
            )
            row = cursor.fetchone()
            return None if row is None or row[0] is None else from_ms(int(row[0]))

        return await self.run("delivered_at", txn, readonly=True)

    async def record_engagement(self, ref: RecipientRef, event: OpenedEvent | ClickedEvent) -> None:
        """One ``opened``/``clicked`` (or other) event row for the recipient, at the store's
        clock."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> None:
            await insert_events(cursor, now_ms, [(ref.queue_id, ref.address, event)])

        await self.run("record_engagement", txn)

    async def unsubscribe(self, ref: RecipientRef, method: str, config: SuppressionConfig) -> bool:
        """Suppress the recipient's address (reason ``unsubscribe``, for as long as ``config``
        says) and record an ``unsubscribed`` event ``{"method": method}``, in one transaction;
        see :meth:`suppress_recipient`."""
        return await self.unsubscribe_address(ref.address, ref.queue_id, method, config)

    async def unsubscribe_address(
        self, address: str, queue_id: str | None, method: str, config: SuppressionConfig
    ) -> bool:
        """:meth:`unsubscribe` by address: for a token whose recipient row is gone (purged),
        ``queue_id`` None (the event then names no message); see :meth:`suppress_address`."""
        entry = policy.unsubscribe(config, address, self.clock.seconds(), method, queue_id)
        return await self.suppress_address(address, queue_id, entry, UnsubscribedEvent(method))

    async def complain(
        self, ref: RecipientRef, feedback_type: str, source: str, config: SuppressionConfig
    ) -> bool:
        """A feedback-loop complaint (ARF, RFC 5965) about the recipient's copy: suppress the
        address (reason ``complaint``) and record a ``complained`` event ``{"feedback_type",
        "source"}``, in one transaction; see :meth:`suppress_recipient`. A report that arrives
        twice records one event."""
        entry = policy.complaint(
            config, ref.address, self.clock.seconds(), feedback_type, source, ref.queue_id
        )
        event = ComplainedEvent(feedback_type, source)
        return await self.suppress_recipient(ref, entry, event)

    async def suppress_recipient(
        self,
        ref: RecipientRef,
        entry: policy.Suppress,
        event: UnsubscribedEvent | ComplainedEvent,
    ) -> bool:
        """Write the recipient's own opt-out ``entry`` (unsubscribe, complaint) and record the
        recipient's ``event``, in one transaction; see :meth:`suppress_address`."""
        return await self.suppress_address(ref.address, ref.queue_id, entry, event)

    async def suppress_address(
        self,
        address: str,
        queue_id: str | None,
        entry: policy.Suppress,
        event: UnsubscribedEvent | ComplainedEvent,
    ) -> bool:
        """Write the opt-out ``entry`` (unsubscribe, complaint) of ``address`` and record its
        ``event`` (recipient ``address``, message ``queue_id``: None when the recipient's row
        is gone), in one transaction.

        Idempotent: when the address is already suppressed for the entry's reason (an entry in
        force now), nothing is written and False comes back; otherwise True. An entry in force
        for another reason is replaced but its lifetime never shortened
        (:func:`smartrelay.suppression.merge_opt_out`). Concurrent calls for the same address
        are serialised (PostgreSQL: an advisory lock on the address; SQLite serialises writers
        anyway), so two simultaneous POSTs record one event.
        """
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> bool:
            return await write_opt_out(cursor, self.engine, now_ms, address, queue_id, entry, event)

        return await self.run(f"suppress_{entry.reason}", txn)


async def write_opt_out(
    cursor: ICursor,
    engine: IDatabaseEngine,
    now_ms: int,
    address: str,
    queue_id: str | None,
    entry: policy.Suppress,
    event: UnsubscribedEvent | ComplainedEvent,
) -> bool:
    """:meth:`TrackingStore.suppress_address` inside the caller's transaction (the feedback
    processor records a report's opt-outs with the report's other effects)."""
    lock = engine.lock_statement()
    if lock is not None:
        await cursor.execute(lock, (f"suppression:{entry.address}",))
    old = await current_entry(cursor, entry.address)
    merged = policy.merge_opt_out(
        entry,
        None if old is None else old[0],
        None if old is None else old[1],
        now_ms / 1000,
    )
    if merged is None:
        return False
    await write_suppressions(cursor, now_ms, [merged])
    await insert_events(cursor, now_ms, [(queue_id, address, event)])
    return True
