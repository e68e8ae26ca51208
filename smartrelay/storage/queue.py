"""The queue: messages, their recipients, claims and leases, delivery outcomes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import field, frozen
from twisted.internet.interfaces import IReactorTime

from smartrelay import suppression as policy
from smartrelay.config import SuppressionConfig
from smartrelay.events import BouncedEvent, DroppedEvent, EventData, ReceivedEvent
from smartrelay.ids import new_queue_id
from smartrelay.spool import SpooledBody
from smartrelay.storage.base import StoreBase, chunks, domain_of, marks, to_ms
from smartrelay.storage.batching import GroupCommitter
from smartrelay.storage.events import insert_events
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from smartrelay.storage.search_terms import insert_terms, message_terms
from smartrelay.storage.suppressions import (
    Suppression,
    active_suppressions_in,
    clear_soft_bounces,
    count_soft_bounces,
    write_suppressions,
)

QUEUE_CHANNEL = "smartrelay_queue"
IDEMPOTENCY_WINDOW = 24 * 3600.0
#: A message bigger than this is loaded with ICursor.read_blob rather than in the SELECT.
BIG_MESSAGE = 1 << 20


@frozen
class NewMessage:
    """An accepted message, as the SMTP listener hands it to storage."""

    sender: str
    recipients: tuple[str, ...]
    raw: bytes
    client_ip: str | None = None
    credential: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, str] = field(factory=dict)
    options: dict[str, bool] = field(factory=dict)
    idempotency_key: str | None = None
    #: Chosen by the caller when the id must appear in the message (its Received header).
    queue_id: str | None = None
    #: The rest of the message, after ``raw``, when it was too big to keep in memory.
    spooled: SpooledBody | None = None
    #: Submitted with a sandbox credential: recorded as delivered without leaving the relay.
    sandbox: bool = False

    @property
    def size(self) -> int:
        return len(self.raw) + (0 if self.spooled is None else self.spooled.size)


@frozen
class QueuedMessage:
    queue_id: str
    duplicate: bool = False


@frozen
class ClaimedRecipient:
    id: int
    queue_id: str
    address: str
    domain: str
    attempts: int


@frozen
class StoredMessage:
    queue_id: str
    received_at: float
    sender: str
    tags: tuple[str, ...]
    metadata: dict[str, str]
    options: dict[str, bool]
    raw: bytes
    #: Its content warnings are recorded already (``messages.warnings_checked_at``).
    warnings_checked: bool = False
    #: The SMTP credential it was submitted with (``messages.credential``), if any.
    credential: str | None = None
    #: Submitted with a sandbox credential (``messages.sandbox``, set at accept).
    sandbox: bool = False


@frozen
class Claim:
    """Recipients claimed for delivery, and the size in bytes of each one's message."""

    recipients: tuple[ClaimedRecipient, ...]
    sizes: dict[str, int]


@frozen
class LoadedForDelivery:
    """Claimed jobs' messages by queue id, read with their recipients' suppression entries."""

    messages: dict[str, StoredMessage]
    #: The suppression entries in force when the messages were loaded, by lower-cased address.
    suppressions: dict[str, Suppression]


@frozen
class RecipientOutcome:
    """A recipient's new state after a delivery attempt, with the events to record."""

    recipient_id: int
    queue_id: str
    address: str
    state: str  # delivered, deferred, bounced, expired
    attempts: int
    next_attempt_at: float | None
    reply: str
    events: tuple[EventData, ...]


@frozen
class PendingRecipient:
    queue_id: str
    address: str
    state: str
    attempts: int
    next_attempt_at: float
    last_reply: str | None
    sender: str
    received_at: float


async def mark_finished(cursor: ICursor, now_ms: int, queue_ids: Iterable[str]) -> None:
    """Set ``finished_at`` on those of the messages whose every recipient is now in a final
    state (retention counts from there); inside the transaction that finished them."""
    wanted = sorted(set(queue_ids))
    for chunk in chunks(wanted):
        await cursor.write_many(
            "UPDATE messages SET finished_at = ?"
            f" WHERE queue_id IN ({marks(len(chunk))}) AND finished_at IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM recipients r"
            "  WHERE r.queue_id = messages.queue_id AND r.next_attempt_at IS NOT NULL)",
            [(now_ms, *chunk)],
        )


class QueueStore(StoreBase):
    def __init__(
        self,
        engine: IDatabaseEngine,
        clock: IReactorTime,
        suppression: SuppressionConfig | None = None,
    ) -> None:
        super().__init__(engine, clock, suppression)
        # One group commit at a time on both engines: SQLite has one writer anyway. On
        # PostgreSQL a second one in flight mostly carried the one message that came just
        # after the first started, at the cost of a transaction: with one, end to end +8%
        # and acceptance +10% with 6% less CPU, p99 no worse (eight alternating rounds;
        # docs/performance.md, eleventh session). Its WAL is flushed in commit order anyway.
        self._queue_committer: GroupCommitter[NewMessage, QueuedMessage] = GroupCommitter(
            self._queue_batch, max_batch=200
        )
        # Outcomes: one commit at a time on both engines, so that outcomes wait in bigger
        # groups (a delivery process has a few dozen connections finishing at once).
        self._outcome_committer: GroupCommitter[
            tuple[str, tuple[RecipientOutcome, ...]], frozenset[int]
        ] = GroupCommitter(self._record_outcome_batch, max_batch=200)

    async def queue_message(self, message: NewMessage) -> QueuedMessage:
        """Store a message, its recipients and their ``received`` events durably.

        Returns once the transaction holding them has committed. Messages queued while another
        commit is under way are written together in the next transaction (group commit).
        With an idempotency key seen in the last 24 hours, nothing is written and the first
        message's queue id comes back with ``duplicate=True``.
        """
        return await self._queue_committer.submit(message)

    async def _queue_batch(self, messages: Sequence[NewMessage]) -> list[QueuedMessage]:
        """One transaction for a group of messages: a handful of statements, whatever its size."""
        now_ms = self.now_ms()
        queue_ids = [m.queue_id or new_queue_id(now_ms / 1000) for m in messages]

        async def txn(cursor: ICursor) -> list[QueuedMessage]:
            results = [QueuedMessage(q) for q in queue_ids]
            seen_keys: dict[str, str] = {}
            for i, message in enumerate(messages):
                key = message.idempotency_key
                if key is None:
                    continue
                first = seen_keys.get(key) or await self._idempotent_queue_id(cursor, key, now_ms)
                if first is not None:
                    results[i] = QueuedMessage(first, duplicate=True)
                else:
                    seen_keys[key] = queue_ids[i]
            new = [
                (m, r.queue_id) for m, r in zip(messages, results, strict=True) if not r.duplicate
            ]
            await cursor.write_many(
                "INSERT INTO messages (queue_id, received_at, sender, size, client_ip,"
                " credential, tags, metadata, options, idempotency_key, sandbox)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        queue_id,
                        now_ms,
                        m.sender,
                        m.size,
                        m.client_ip,
                        m.credential,
                        json.dumps(list(m.tags)),
                        json.dumps(m.metadata, sort_keys=True),
                        json.dumps(m.options, sort_keys=True),
                        m.idempotency_key,
                        int(m.sandbox),
                    )
                    for m, queue_id in new
                ],
            )
            await cursor.write_many(
                "INSERT INTO message_bodies (queue_id, raw) VALUES (?, ?)",
                [(queue_id, m.raw if m.spooled is None else b"") for m, queue_id in new],
            )
            for m, queue_id in new:
                if m.spooled is not None:
                    await cursor.write_blob(
                        "message_bodies", "raw", "queue_id", queue_id, m.raw, m.spooled
                    )
            await cursor.write_many(
                "INSERT INTO recipients (queue_id, address, domain, state, attempts,"
                " next_attempt_at, updated_at) VALUES (?, ?, ?, 'queued', 0, ?, ?)",
                [
                    (queue_id, r, domain_of(r), now_ms, now_ms)
                    for m, queue_id in new
                    for r in m.recipients
                ],
            )
            await insert_terms(
                cursor,
                (
                    (queue_id, now_ms, message_terms(m.sender, m.recipients, m.tags, m.metadata))
                    for m, queue_id in new
                ),
            )
            await insert_events(
                cursor,
                now_ms,
                (
                    (queue_id, r, ReceivedEvent(m.size, m.client_ip, m.credential))
                    for m, queue_id in new
                    for r in m.recipients
                ),
            )
            if new:
                await cursor.notify(QUEUE_CHANNEL)
            return results

        return await self.run("queue_messages", txn)

    async def _idempotent_queue_id(self, cursor: ICursor, key: str, now_ms: int) -> str | None:
        """The queue id of a message with this idempotency key in the last 24 hours."""
        lock = self.engine.lock_statement()
        if lock is not None:  # two nodes must not both take the same key
            await cursor.execute(lock, (f"idempotency:{key}",))
        await cursor.execute(
            "SELECT queue_id FROM messages WHERE idempotency_key = ? AND received_at >= ?"
            " ORDER BY received_at LIMIT 1",
            (key, now_ms - to_ms(IDEMPOTENCY_WINDOW)),
        )
        row = cursor.fetchone()
        return None if row is None else str(row[0])

    async def claim_due(self, owner: str, limit: int, lease: float) -> list[ClaimedRecipient]:
        """Claim up to ``limit`` due recipients for ``owner`` until ``now + lease``.

        The claimed rows' ``next_attempt_at`` moves to the lease expiry, so if the owner dies
        they come due again by themselves. On PostgreSQL, ``SKIP LOCKED`` lets several nodes
        claim at once without waiting on, or ever getting, each other's rows.
        """
        return list((await self.claim_due_with_sizes(owner, limit, lease)).recipients)

    async def claim_due_with_sizes(self, owner: str, limit: int, lease: float) -> Claim:
        """:meth:`claim_due`, and the size of each claimed recipient's message (what loading
        it will take: the delivery manager's byte window) in the same transaction."""
        now_ms = self.now_ms()
        skip_locked = " FOR UPDATE SKIP LOCKED" if self.engine.supports_skip_locked else ""

        async def txn(cursor: ICursor) -> Claim:
            await cursor.execute(
                "UPDATE recipients SET state = 'delivering', lease_owner = ?,"
                " next_attempt_at = ?, updated_at = ?"
                " WHERE id IN (SELECT id FROM recipients"
                "  WHERE next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?"
                f"{skip_locked})"
                " RETURNING id, queue_id, address, domain, attempts",
                (owner, now_ms + to_ms(lease), now_ms, now_ms, limit),
            )
            claimed = sorted(
                (
                    ClaimedRecipient(int(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]))
                    for r in cursor.fetchall()
                ),
                key=lambda c: c.id,
            )
            sizes: dict[str, int] = {}
            for chunk in chunks(sorted({c.queue_id for c in claimed})):
                await cursor.execute(
                    f"SELECT queue_id, size FROM messages WHERE queue_id IN ({marks(len(chunk))})",
                    chunk,
                )
                sizes.update((str(r[0]), int(r[1])) for r in cursor.fetchall())
            return Claim(tuple(claimed), sizes)

        return await self.run("claim_due", txn)

    async def release_claims(self, owner: str) -> int:
        """Make recipients claimed by ``owner`` due now: a restarted node takes back at once
        what it was delivering when it stopped or died, instead of waiting out the lease."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> int:
            await cursor.execute(
                "UPDATE recipients SET next_attempt_at = ?, lease_owner = NULL, updated_at = ?,"
                " state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END"
                " WHERE lease_owner = ? AND state = 'delivering'",
                (now_ms, now_ms, owner),
            )
            return int(cursor.rowcount)

        return await self.run("release_claims", txn)

    async def hand_back(self, owner: str, due: Sequence[tuple[int, float]]) -> frozenset[int]:
        """Give claimed recipients back to the queue, each due again at its time: (recipient
        id, clock seconds). Only rows ``owner`` still holds are touched (state back to
        ``queued``, or ``deferred`` after an attempt; attempts unchanged); their ids are
        returned. Any node may claim them once due."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> frozenset[int]:
            ours: set[int] = set()
            for chunk in chunks(due):
                await cursor.execute(
                    "UPDATE recipients SET next_attempt_at = CAST(v.column2 AS BIGINT),"
                    " lease_owner = NULL, updated_at = ?,"
                    " state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END"
                    f" FROM (VALUES {', '.join(['(?, ?)'] * len(chunk))}) AS v"
                    " WHERE recipients.id = v.column1 AND recipients.lease_owner = ?"
                    " AND recipients.state = 'delivering'"
                    " RETURNING recipients.id",
                    [
                        now_ms,
                        *(value for rid, at in chunk for value in (rid, to_ms(at))),
                        owner,
                    ],
                )
                ours.update(int(row[0]) for row in cursor.fetchall())
            return frozenset(ours)

        return await self.run("hand_back", txn)

    async def load_messages(self, queue_ids: Iterable[str]) -> dict[str, StoredMessage]:
        return (await self.load_for_delivery(queue_ids, ())).messages

    async def load_for_delivery(
        self, queue_ids: Iterable[str], recipients: Iterable[str]
    ) -> LoadedForDelivery:
        """The messages of ``queue_ids``, and the suppression entries in force for any of
        ``recipients``, in one transaction: the delivery manager loads claimed jobs with the
        answer to the re-wrap chain's suppression lookup (one read a claimed batch, not one
        a job)."""
        wanted = sorted(set(queue_ids))
        addresses = frozenset(a.lower() for a in recipients)
        now_ms = self.now_ms()
        if not wanted:
            return LoadedForDelivery({}, {})

        async def txn(cursor: ICursor) -> LoadedForDelivery:
            messages = await _messages_in(cursor, wanted)
            active = await active_suppressions_in(cursor, addresses, now_ms) if addresses else {}
            return LoadedForDelivery(messages, active)

        return await self.run("load_messages", txn, readonly=True)

    async def record_outcomes(self, owner: str, outcomes: Sequence[RecipientOutcome]) -> int:
        """Commit delivery outcomes and their events; returns how many rows were still ours.

        A row whose lease another node has taken over (ours expired) is left alone: that node
        will deliver it again (at least once, never zero times). Outcomes recorded while
        another commit is under way share the next transaction (group commit).
        """
        return len(await self.record_outcomes_of(owner, outcomes))

    async def record_outcomes_of(
        self, owner: str, outcomes: Sequence[RecipientOutcome]
    ) -> frozenset[int]:
        """:meth:`record_outcomes`, returning the recipient ids whose outcome was recorded
        (the rows still ours), e.g. to count exactly the events committed."""
        return await self._outcome_committer.submit((owner, tuple(outcomes)))

    async def _record_outcome_batch(
        self, batch: Sequence[tuple[str, tuple[RecipientOutcome, ...]]]
    ) -> list[frozenset[int]]:
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> list[frozenset[int]]:
            ours = await self._record_in_txn(
                cursor, now_ms, [(owner, o) for owner, outcomes in batch for o in outcomes]
            )
            return [
                frozenset(o.recipient_id for o in outcomes if o.recipient_id in ours)
                for _, outcomes in batch
            ]

        return await self.run("record_outcomes", txn)

    async def _record_in_txn(
        self,
        cursor: ICursor,
        now_ms: int,
        outcomes: Sequence[tuple[str, RecipientOutcome]],
    ) -> set[int]:
        """Outcomes of (owner, outcome) in a few statements however many there are: one
        UPDATE (of the rows each owner still holds) and one INSERT of events per chunk, one
        DELETE of soft-bounce entries for the delivered. Returns the ids updated."""
        ours: set[int] = set()
        for chunk in chunks(outcomes):
            await cursor.execute(
                "UPDATE recipients SET state = v.column2, attempts = v.column3,"
                " next_attempt_at = CAST(v.column4 AS BIGINT), last_reply = v.column5,"
                " lease_owner = NULL, updated_at = ?"
                f" FROM (VALUES {', '.join(['(?, ?, ?, ?, ?, ?)'] * len(chunk))}) AS v"
                " WHERE recipients.id = v.column1 AND recipients.lease_owner = v.column6"
                " RETURNING recipients.id",
                [
                    now_ms,
                    *(
                        value
                        for owner, o in chunk
                        for value in (
                            o.recipient_id,
                            o.state,
                            o.attempts,
                            None if o.next_attempt_at is None else to_ms(o.next_attempt_at),
                            o.reply,
                            owner,
                        )
                    ),
                ],
            )
            ours.update(int(row[0]) for row in cursor.fetchall())
        recorded = [o for _, o in outcomes if o.recipient_id in ours]
        await mark_finished(
            cursor, now_ms, {o.queue_id for o in recorded if o.next_attempt_at is None}
        )
        await insert_events(
            cursor,
            now_ms,
            ((o.queue_id, o.address, event) for o in recorded for event in o.events),
        )
        if self.suppression is not None:
            await self._apply_suppression_policy(cursor, now_ms, recorded, self.suppression)
        return ours

    async def _apply_suppression_policy(
        self,
        cursor: ICursor,
        now_ms: int,
        recorded: Sequence[RecipientOutcome],
        config: SuppressionConfig,
    ) -> None:
        """Write what :mod:`smartrelay.suppression` decides for each outcome, in order."""
        if not any(isinstance(e, BouncedEvent) for o in recorded for e in o.events):
            # The common case: only deliveries clear entries, in one statement per chunk.
            await clear_soft_bounces(
                cursor, (o.address.lower() for o in recorded if o.state == "delivered")
            )
            return
        now = now_ms / 1000
        for o in recorded:
            bounces = [(e.hard, e.reply) for e in o.events if isinstance(e, BouncedEvent)]
            decision = policy.after_outcome(config, o.address, now, o.state == "delivered", bounces)
            if isinstance(decision, policy.CountSoftBounces):
                count = await count_soft_bounces(cursor, decision.address, to_ms(decision.since))
                decision = policy.after_soft_bounces(config, decision.address, now, count)
            if isinstance(decision, policy.Suppress):
                await write_suppressions(cursor, now_ms, [decision])
            elif isinstance(decision, policy.ClearSoftBounce):
                await clear_soft_bounces(cursor, [decision.address])

    async def pending_recipients(
        self, queue_id: str | None = None, limit: int = 1000
    ) -> list[PendingRecipient]:
        """Recipients not yet in a final state, soonest due first."""

        async def txn(cursor: ICursor) -> list[PendingRecipient]:
            sql = (
                "SELECT r.queue_id, r.address, r.state, r.attempts, r.next_attempt_at,"
                " r.last_reply, m.sender, m.received_at FROM recipients r"
                " JOIN messages m ON m.queue_id = r.queue_id"
                " WHERE r.next_attempt_at IS NOT NULL"
            )
            args: list[Any] = []
            if queue_id is not None:
                sql += " AND r.queue_id = ?"
                args.append(queue_id)
            await cursor.execute(sql + " ORDER BY r.next_attempt_at, r.id LIMIT ?", (*args, limit))
            return [
                PendingRecipient(
                    str(r[0]),
                    str(r[1]),
                    str(r[2]),
                    int(r[3]),
                    int(r[4]) / 1000,
                    None if r[5] is None else str(r[5]),
                    str(r[6]),
                    int(r[7]) / 1000,
                )
                for r in cursor.fetchall()
            ]

        return await self.run("pending_recipients", txn, readonly=True)

    async def retry_now(self, queue_id: str | None = None) -> int:
        """Make waiting recipients (of one message, or all) due now; returns how many.

        Waiting: ``queued``, ``deferred``, and ``delivering`` whose lease has run out (its
        node died or got stuck); those are released as a restarted node releases its own, so
        an outcome their old owner may still record is ignored (``record_outcomes``)."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> int:
            sql = (
                "UPDATE recipients SET next_attempt_at = ?, updated_at = ?, lease_owner = NULL,"
                " state = CASE WHEN state <> 'delivering' THEN state"
                "  WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END"
                " WHERE next_attempt_at IS NOT NULL AND (state IN ('queued', 'deferred')"
                "  OR (state = 'delivering' AND next_attempt_at <= ?))"
            )
            args: list[Any] = [now_ms, now_ms, now_ms]
            if queue_id is not None:
                sql += " AND queue_id = ?"
                args.append(queue_id)
            await cursor.execute(sql, args)
            changed = int(cursor.rowcount)
            if changed:
                await cursor.notify(QUEUE_CHANNEL)
            return changed

        return await self.run("retry_now", txn)

    async def drop_message(self, queue_id: str, by: str = "queue drop") -> list[str]:
        """Stop delivering a message: its recipients not yet in a final state (``queued``,
        ``deferred``, ``delivering``) become ``dropped`` (one ``dropped`` event each, its
        ``by`` saying who: the CLI's ``queue drop``, the UI's ``ui:USERNAME``), their
        ``last_reply`` too (``dropped by {by}``).

        A ``delivering`` row loses its lease owner, so whatever outcome a node working on it
        records later is ignored and the row stays ``dropped`` (a copy already on the wire
        may still arrive)."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> list[str]:
            await cursor.execute(
                "UPDATE recipients SET state = 'dropped', next_attempt_at = NULL,"
                " lease_owner = NULL, last_reply = ?, updated_at = ?"
                " WHERE queue_id = ? AND next_attempt_at IS NOT NULL"
                " AND state IN ('queued', 'deferred', 'delivering') RETURNING address",
                (f"dropped by {by}"[:500], now_ms, queue_id),
            )
            dropped = [str(r[0]) for r in cursor.fetchall()]
            if dropped:
                await mark_finished(cursor, now_ms, [queue_id])
            await insert_events(
                cursor, now_ms, ((queue_id, r, DroppedEvent(by=by)) for r in dropped)
            )
            return dropped

        return await self.run("drop_message", txn)

    async def count_recipients(self, state: str | None = None) -> int:
        async def txn(cursor: ICursor) -> int:
            if state is None:
                await cursor.execute("SELECT COUNT(*) FROM recipients")
            else:
                await cursor.execute("SELECT COUNT(*) FROM recipients WHERE state = ?", (state,))
            row = cursor.fetchone()
            return int(row[0]) if row else 0

        return await self.run("count_recipients", txn, readonly=True)


async def _messages_in(cursor: ICursor, wanted: Sequence[str]) -> dict[str, StoredMessage]:
    # Big messages are read on their own, piece by piece (ICursor.read_blob).
    await cursor.execute(
        "SELECT m.queue_id, m.received_at, m.sender, m.tags, m.metadata, m.options,"
        " CASE WHEN m.size <= ? THEN b.raw END, b.queue_id IS NOT NULL,"
        " m.warnings_checked_at IS NOT NULL, m.credential, m.sandbox"
        " FROM messages m LEFT JOIN message_bodies b ON b.queue_id = m.queue_id"
        f" WHERE m.queue_id IN ({marks(len(wanted))})",
        [BIG_MESSAGE, *wanted],
    )
    rows = cursor.fetchall()
    loaded = {}
    for r in rows:
        queue_id = str(r[0])
        raw = r[6]
        if not r[7]:  # the body is gone (retention): only a finished message's
            raw = b""
        elif raw is None:
            raw = await cursor.read_blob("message_bodies", "raw", "queue_id", queue_id)
        loaded[queue_id] = StoredMessage(
            queue_id=queue_id,
            received_at=int(r[1]) / 1000,
            sender=str(r[2]),
            tags=tuple(json.loads(r[3])),
            metadata=json.loads(r[4]),
            options=json.loads(r[5]),
            raw=bytes(raw),
            warnings_checked=bool(r[8]),
            credential=None if r[9] is None else str(r[9]),
            sandbox=bool(r[10]),
        )
    return loaded
