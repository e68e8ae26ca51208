"""The queries behind the tracking and unsubscribe endpoints (SPEC sections 4 and 5), and
the recipient's other opt-out, a feedback-loop complaint.

Each function is one transaction. Events are written with :func:`insert_events`, at the
store's clock, naming the recipient's message (``queue_id``) and address like every other
event, so exports and webhooks see them with the message's sender, tags and metadata.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen

from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import Store, from_ms, insert_events, to_ms, upsert_suppression

__all__ = [
    "RecipientRef",
    "complain",
    "delivered_at",
    "recipient_ref",
    "record_engagement",
    "suppress_recipient",
    "unsubscribe",
]

#: Recipient ids are BIGINT; a (authentic) token id above this cannot name a row.
_MAX_ROW_ID = 2**63 - 1


@frozen
class RecipientRef:
    """One ``recipients`` row, with its message's envelope sender."""

    recipient_id: int
    queue_id: str
    address: str
    sender: str


async def recipient_ref(store: Store, recipient_id: int) -> RecipientRef | None:
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

    return await store.engine.run_interaction("recipient_ref", txn, readonly=True)


async def delivered_at(store: Store, recipient_id: int) -> float | None:
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

    return await store.engine.run_interaction("delivered_at", txn, readonly=True)


async def record_engagement(
    store: Store, ref: RecipientRef, event_type: str, data: dict[str, Any]
) -> None:
    """One ``opened``/``clicked`` (or other) event row for the recipient, at the store's clock."""
    now_ms = to_ms(store.clock.seconds())

    async def txn(cursor: ICursor) -> None:
        await insert_events(cursor, now_ms, event_type, ref.queue_id, [ref.address], data)

    await store.engine.run_interaction("record_engagement", txn)


async def unsubscribe(
    store: Store, ref: RecipientRef, method: str, suppress_for: float | None
) -> bool:
    """Suppress the recipient's address (reason ``unsubscribe``) and record an
    ``unsubscribed`` event ``{"method": method}``, in one transaction; see
    :func:`suppress_recipient`."""
    return await suppress_recipient(
        store,
        ref,
        "unsubscribe",
        suppress_for,
        "unsubscribed",
        {"method": method},
        f"{method} unsubscribe, message {ref.queue_id}",
    )


async def complain(
    store: Store, ref: RecipientRef, feedback_type: str, source: str, suppress_for: float | None
) -> bool:
    """A feedback-loop complaint (ARF, RFC 5965) about the recipient's copy: suppress the
    address (reason ``complaint``) and record a ``complained`` event ``{"feedback_type",
    "source"}``, in one transaction; see :func:`suppress_recipient`. A report that arrives
    twice records one event."""
    return await suppress_recipient(
        store,
        ref,
        "complaint",
        suppress_for,
        "complained",
        {"feedback_type": feedback_type, "source": source},
        f"{feedback_type} report from {source or 'unknown'}, message {ref.queue_id}",
    )


async def suppress_recipient(
    store: Store,
    ref: RecipientRef,
    reason: str,
    suppress_for: float | None,
    event_type: str,
    event_data: dict[str, Any],
    note: str,
) -> bool:
    """Suppress the recipient's address for ``reason`` and record the recipient's
    ``event_type`` event, in one transaction (the recipient's own opt-outs: unsubscribes,
    complaints).

    ``suppress_for`` is the suppression's lifetime in seconds (None: forever). Idempotent: when
    the address is already suppressed for ``reason`` (an entry in force now), nothing is
    written and False comes back; otherwise True.

    An entry in force for another reason (``hard_bounce``, ``manual``, ...) is replaced, like
    :meth:`Store.add_suppressions` does, with ``reason`` (the recipient's own wish outlives,
    e.g., an operator removing a manual entry), but its lifetime is never shortened: the entry
    expires at the later of the two expiries (None, forever, wins). Concurrent calls for the
    same address are serialised (PostgreSQL: an advisory lock on the address; SQLite
    serialises writers anyway), so two simultaneous POSTs record one event.
    """
    address = ref.address.lower()
    now_ms = to_ms(store.clock.seconds())
    new_expiry = None if suppress_for is None else now_ms + to_ms(suppress_for)

    async def txn(cursor: ICursor) -> bool:
        lock = store.engine.lock_statement()
        if lock is not None:
            await cursor.execute(lock, (f"suppression:{address}",))
        await cursor.execute(
            "SELECT reason, expires_at FROM suppressions WHERE address = ?", (address,)
        )
        row = cursor.fetchone()
        expires_ms = new_expiry
        if row is not None:
            old_reason = str(row[0])
            old_expiry = None if row[1] is None else int(row[1])
            in_force = old_expiry is None or old_expiry > now_ms
            if in_force and old_reason == reason:
                return False
            if in_force:
                expires_ms = (
                    None
                    if old_expiry is None or new_expiry is None
                    else max(old_expiry, new_expiry)
                )
        await upsert_suppression(cursor, address, reason, now_ms, expires_ms, note)
        await insert_events(cursor, now_ms, event_type, ref.queue_id, [ref.address], event_data)
        return True

    return await store.engine.run_interaction(f"suppress_{reason}", txn)
