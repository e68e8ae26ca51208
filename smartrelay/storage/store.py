"""The queries SmartRelay runs, written once for both engines.

Each public method is one transaction. Times cross this API as float seconds (the clock's
unit) and are stored as integer milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import field, frozen
from twisted.internet.interfaces import IReactorTime

from smartrelay.config import SuppressionConfig
from smartrelay.ids import new_queue_id
from smartrelay.spool import SpooledBody
from smartrelay.storage.batching import GroupCommitter
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine

QUEUE_CHANNEL = "smartrelay_queue"
FEEDBACK_CHANNEL = "smartrelay_feedback"
IDEMPOTENCY_WINDOW = 24 * 3600.0
_ROWS_PER_STATEMENT = 500  # at most 3,001 parameters a statement, under SQLite's 32,766
#: A message bigger than this is loaded with ICursor.read_blob rather than in the SELECT.
BIG_MESSAGE = 1 << 20

SUPPRESSION_REASONS = ("hard_bounce", "soft_bounce", "complaint", "unsubscribe", "manual")


def to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def from_ms(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


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

    @property
    def size(self) -> int:
        return len(self.raw) + (0 if self.spooled is None else self.spooled.size)


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
    events: tuple[tuple[str, dict[str, Any]], ...]


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


@frozen
class ExportedEvent:
    id: int
    type: str
    time: float
    queue_id: str | None
    recipient: str | None
    data: dict[str, Any]
    sender: str | None
    tags: tuple[str, ...]
    metadata: dict[str, str]


@frozen
class Suppression:
    address: str
    reason: str
    created_at: float
    expires_at: float | None
    note: str


@frozen
class NewSuppression:
    address: str
    reason: str = "manual"
    expires_at: float | None = None
    note: str = ""


@frozen
class Login:
    name: str
    created_at: float


class DuplicateName(Exception):
    """A credential or web user of that name exists already."""


class Store:
    def __init__(
        self,
        engine: IDatabaseEngine,
        clock: IReactorTime,
        suppression: SuppressionConfig | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        #: With a policy, delivery outcomes add and clear suppressions (docs/rewrap.md).
        self.suppression = suppression
        self.smtp_credentials = LoginTable(self, "smtp_credentials")
        self.web_users = LoginTable(self, "web_users")
        # SQLite has one writer at a time anyway; PostgreSQL overlaps a few commits.
        in_flight = 1 if engine.name == "sqlite" else 3
        self._queue_committer: GroupCommitter[NewMessage, QueuedMessage] = GroupCommitter(
            self._queue_batch, max_batch=200, max_in_flight=in_flight
        )
        # Outcomes: one commit at a time on both engines, so that outcomes wait in bigger
        # groups (a delivery process has a few dozen connections finishing at once).
        self._outcome_committer: GroupCommitter[tuple[str, tuple[RecipientOutcome, ...]], int] = (
            GroupCommitter(self._record_outcome_batch, max_batch=200)
        )
        self._suppression_reader: GroupCommitter[frozenset[str], dict[str, Suppression]] = (
            GroupCommitter(self._active_suppressions_batch, max_batch=200)
        )

    def _now_ms(self) -> int:
        return to_ms(self.clock.seconds())

    # -- queue ------------------------------------------------------------------------------
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
        now_ms = self._now_ms()
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
            await cursor.executemany(
                "INSERT INTO messages (queue_id, received_at, sender, size, client_ip,"
                " credential, tags, metadata, options, idempotency_key, raw)"
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
                        m.raw if m.spooled is None else b"",
                    )
                    for m, queue_id in new
                ],
            )
            for m, queue_id in new:
                if m.spooled is not None:
                    await cursor.write_blob(
                        "messages", "raw", "queue_id", queue_id, m.raw, m.spooled
                    )
            await cursor.executemany(
                "INSERT INTO recipients (queue_id, address, domain, state, attempts,"
                " next_attempt_at, updated_at) VALUES (?, ?, ?, 'queued', 0, ?, ?)",
                [
                    (queue_id, r, domain_of(r), now_ms, now_ms)
                    for m, queue_id in new
                    for r in m.recipients
                ],
            )
            await cursor.executemany(
                "INSERT INTO events (type, time, queue_id, recipient, data)"
                " VALUES ('received', ?, ?, ?, ?)",
                [
                    (now_ms, queue_id, r, _received_data(m))
                    for m, queue_id in new
                    for r in m.recipients
                ],
            )
            if new:
                await cursor.notify(QUEUE_CHANNEL)
            return results

        return await self.engine.run_interaction("queue_messages", txn)

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

    async def store_feedback(self, report: NewFeedback) -> str:
        """Keep a message that arrived at the inbound MX (a bounce, a complaint, a reply) for
        the feedback processor; returns its id."""
        now_ms = self._now_ms()
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

        return await self.engine.run_interaction("store_feedback", txn)

    async def claim_due(self, owner: str, limit: int, lease: float) -> list[ClaimedRecipient]:
        """Claim up to ``limit`` due recipients for ``owner`` until ``now + lease``.

        The claimed rows' ``next_attempt_at`` moves to the lease expiry, so if the owner dies
        they come due again by themselves. On PostgreSQL, ``SKIP LOCKED`` lets several nodes
        claim at once without waiting on, or ever getting, each other's rows.
        """
        now_ms = self._now_ms()
        skip_locked = " FOR UPDATE SKIP LOCKED" if self.engine.supports_skip_locked else ""

        async def txn(cursor: ICursor) -> list[ClaimedRecipient]:
            await cursor.execute(
                "UPDATE recipients SET state = 'delivering', lease_owner = ?,"
                " next_attempt_at = ?, updated_at = ?"
                " WHERE id IN (SELECT id FROM recipients"
                "  WHERE next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?"
                f"{skip_locked})"
                " RETURNING id, queue_id, address, domain, attempts",
                (owner, now_ms + to_ms(lease), now_ms, now_ms, limit),
            )
            return sorted(
                (
                    ClaimedRecipient(int(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]))
                    for r in cursor.fetchall()
                ),
                key=lambda c: c.id,
            )

        return await self.engine.run_interaction("claim_due", txn)

    async def release_claims(self, owner: str) -> int:
        """Make recipients claimed by ``owner`` due now: a restarted node takes back at once
        what it was delivering when it stopped or died, instead of waiting out the lease."""
        now_ms = self._now_ms()

        async def txn(cursor: ICursor) -> int:
            await cursor.execute(
                "UPDATE recipients SET next_attempt_at = ?, lease_owner = NULL, updated_at = ?,"
                " state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END"
                " WHERE lease_owner = ? AND state = 'delivering'",
                (now_ms, now_ms, owner),
            )
            return int(cursor.rowcount)

        return await self.engine.run_interaction("release_claims", txn)

    async def message_sizes(self, queue_ids: Iterable[str]) -> dict[str, int]:
        """The size in bytes of each message (what loading it will take), without loading it."""
        wanted = sorted(set(queue_ids))
        if not wanted:
            return {}

        async def txn(cursor: ICursor) -> dict[str, int]:
            sizes: dict[str, int] = {}
            for start in range(0, len(wanted), _ROWS_PER_STATEMENT):
                chunk = wanted[start : start + _ROWS_PER_STATEMENT]
                await cursor.execute(
                    "SELECT queue_id, size FROM messages"
                    f" WHERE queue_id IN ({', '.join('?' for _ in chunk)})",
                    chunk,
                )
                sizes.update((str(r[0]), int(r[1])) for r in cursor.fetchall())
            return sizes

        return await self.engine.run_interaction("message_sizes", txn, readonly=True)

    async def load_messages(self, queue_ids: Iterable[str]) -> dict[str, StoredMessage]:
        wanted = sorted(set(queue_ids))
        if not wanted:
            return {}

        async def txn(cursor: ICursor) -> dict[str, StoredMessage]:
            marks = ", ".join("?" for _ in wanted)
            # Big messages are read on their own, piece by piece (ICursor.read_blob).
            await cursor.execute(
                "SELECT queue_id, received_at, sender, tags, metadata, options,"
                f" CASE WHEN size <= ? THEN raw END FROM messages WHERE queue_id IN ({marks})",
                [BIG_MESSAGE, *wanted],
            )
            rows = cursor.fetchall()
            loaded = {}
            for r in rows:
                queue_id = str(r[0])
                raw = r[6]
                if raw is None:
                    raw = await cursor.read_blob("messages", "raw", "queue_id", queue_id)
                loaded[queue_id] = StoredMessage(
                    queue_id=queue_id,
                    received_at=int(r[1]) / 1000,
                    sender=str(r[2]),
                    tags=tuple(json.loads(r[3])),
                    metadata=json.loads(r[4]),
                    options=json.loads(r[5]),
                    raw=bytes(raw),
                )
            return loaded

        return await self.engine.run_interaction("load_messages", txn, readonly=True)

    async def record_outcomes(self, owner: str, outcomes: Sequence[RecipientOutcome]) -> int:
        """Commit delivery outcomes and their events; returns how many rows were still ours.

        A row whose lease another node has taken over (ours expired) is left alone: that node
        will deliver it again (at least once, never zero times). Outcomes recorded while
        another commit is under way share the next transaction (group commit).
        """
        return await self._outcome_committer.submit((owner, tuple(outcomes)))

    async def _record_outcome_batch(
        self, batch: Sequence[tuple[str, tuple[RecipientOutcome, ...]]]
    ) -> list[int]:
        now_ms = self._now_ms()

        async def txn(cursor: ICursor) -> list[int]:
            ours = await self._record_in_txn(
                cursor, now_ms, [(owner, o) for owner, outcomes in batch for o in outcomes]
            )
            return [sum(o.recipient_id in ours for o in outcomes) for _, outcomes in batch]

        return await self.engine.run_interaction("record_outcomes", txn)

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
        for start in range(0, len(outcomes), _ROWS_PER_STATEMENT):
            chunk = outcomes[start : start + _ROWS_PER_STATEMENT]
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
        events = [
            (event_type, now_ms, o.queue_id, o.address, json.dumps(data, sort_keys=True))
            for o in recorded
            for event_type, data in o.events
        ]
        if events:
            await cursor.executemany(
                "INSERT INTO events (type, time, queue_id, recipient, data) VALUES (?, ?, ?, ?, ?)",
                events,
            )
        if self.suppression is None:
            return ours
        if any(kind == "bounced" for o in recorded for kind, _ in o.events):
            # Rare: the suppression policy outcome by outcome, in order.
            for outcome in recorded:
                await self._apply_policy(cursor, now_ms, outcome, self.suppression)
            return ours
        delivered = sorted({o.address.lower() for o in recorded if o.state == "delivered"})
        for start in range(0, len(delivered), _ROWS_PER_STATEMENT):
            addresses = delivered[start : start + _ROWS_PER_STATEMENT]
            await cursor.execute(
                "DELETE FROM suppressions WHERE reason = 'soft_bounce'"
                f" AND address IN ({', '.join('?' for _ in addresses)})",
                addresses,
            )
        return ours

    async def _apply_policy(
        self, cursor: ICursor, now_ms: int, outcome: RecipientOutcome, policy: SuppressionConfig
    ) -> None:
        """Hard bounces suppress at once; ``count`` soft bounces (non-hard bounces, expiries)
        within ``within`` suppress for ``suppress_for``; a delivery clears a soft-bounce entry."""
        address = outcome.address
        if outcome.state == "delivered":
            await cursor.execute(
                "DELETE FROM suppressions WHERE address = ? AND reason = 'soft_bounce'",
                (address.lower(),),
            )
            return
        bounces = [data for kind, data in outcome.events if kind == "bounced"]
        if not bounces:
            return
        if any(data.get("hard") for data in bounces):
            note = str(bounces[0].get("reply", ""))[:200]
            await _suppress(cursor, address, "hard_bounce", now_ms, policy.hard_bounce, note)
            return
        soft = policy.soft_bounce
        await cursor.execute(
            "SELECT COUNT(*) FROM events"
            " WHERE lower(recipient) = ? AND time >= ? AND type = 'bounced'",
            (address.lower(), now_ms - to_ms(soft.within)),
        )
        row = cursor.fetchone()
        if row is not None and int(row[0]) >= soft.count:
            note = f"{int(row[0])} soft bounces"
            await _suppress(cursor, address, "soft_bounce", now_ms, soft.suppress_for, note)

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

        return await self.engine.run_interaction("pending_recipients", txn, readonly=True)

    async def retry_now(self, queue_id: str | None = None) -> int:
        """Make waiting recipients (of one message, or all) due now; returns how many.

        Waiting: ``queued``, ``deferred``, and ``delivering`` whose lease has run out (its
        node died or got stuck); those are released as a restarted node releases its own, so
        an outcome their old owner may still record is ignored (``record_outcomes``)."""
        now_ms = self._now_ms()

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

        return await self.engine.run_interaction("retry_now", txn)

    async def drop_message(self, queue_id: str) -> list[str]:
        """Stop delivering a message: its recipients not yet in a final state (``queued``,
        ``deferred``, ``delivering``) become ``dropped`` (one ``dropped`` event each).

        A ``delivering`` row loses its lease owner, so whatever outcome a node working on it
        records later is ignored and the row stays ``dropped`` (a copy already on the wire
        may still arrive)."""
        now_ms = self._now_ms()

        async def txn(cursor: ICursor) -> list[str]:
            await cursor.execute(
                "UPDATE recipients SET state = 'dropped', next_attempt_at = NULL,"
                " lease_owner = NULL, last_reply = 'dropped by the operator', updated_at = ?"
                " WHERE queue_id = ? AND next_attempt_at IS NOT NULL"
                " AND state IN ('queued', 'deferred', 'delivering') RETURNING address",
                (now_ms, queue_id),
            )
            dropped = [str(r[0]) for r in cursor.fetchall()]
            await insert_events(cursor, now_ms, "dropped", queue_id, dropped, {})
            return dropped

        return await self.engine.run_interaction("drop_message", txn)

    async def export_events(
        self,
        after_id: int,
        limit: int,
        since: float | None = None,
        until: float | None = None,
        types: Sequence[str] = (),
    ) -> list[ExportedEvent]:
        """One page of events with ``id > after_id`` in id order (keyset paging, so an export
        of any size runs in constant memory), with the message's sender, tags, metadata."""

        async def txn(cursor: ICursor) -> list[ExportedEvent]:
            sql = (
                "SELECT e.id, e.type, e.time, e.queue_id, e.recipient, e.data,"
                " m.sender, m.tags, m.metadata FROM events e"
                " LEFT JOIN messages m ON m.queue_id = e.queue_id WHERE e.id > ?"
            )
            args: list[Any] = [after_id]
            if since is not None:
                sql += " AND e.time >= ?"
                args.append(to_ms(since))
            if until is not None:
                sql += " AND e.time < ?"
                args.append(to_ms(until))
            if types:
                sql += f" AND e.type IN ({', '.join('?' for _ in types)})"
                args.extend(types)
            await cursor.execute(sql + " ORDER BY e.id LIMIT ?", (*args, limit))
            return [
                ExportedEvent(
                    id=int(r[0]),
                    type=str(r[1]),
                    time=int(r[2]) / 1000,
                    queue_id=None if r[3] is None else str(r[3]),
                    recipient=None if r[4] is None else str(r[4]),
                    data=json.loads(r[5]),
                    sender=None if r[6] is None else str(r[6]),
                    tags=tuple(json.loads(r[7])) if r[7] is not None else (),
                    metadata=json.loads(r[8]) if r[8] is not None else {},
                )
                for r in cursor.fetchall()
            ]

        return await self.engine.run_interaction("export_events", txn, readonly=True)

    async def count_recipients(self, state: str | None = None) -> int:
        async def txn(cursor: ICursor) -> int:
            if state is None:
                await cursor.execute("SELECT COUNT(*) FROM recipients")
            else:
                await cursor.execute("SELECT COUNT(*) FROM recipients WHERE state = ?", (state,))
            row = cursor.fetchone()
            return int(row[0]) if row else 0

        return await self.engine.run_interaction("count_recipients", txn, readonly=True)

    # -- suppressions -----------------------------------------------------------------------
    async def add_suppression(
        self,
        address: str,
        reason: str,
        expires_at: float | None = None,
        note: str = "",
    ) -> None:
        """Suppress ``address`` (case-insensitive); replaces an existing entry."""
        await self.add_suppressions([NewSuppression(address, reason, expires_at, note)])

    async def add_suppressions(self, entries: Sequence[NewSuppression]) -> None:
        """Add or replace several entries in one transaction (all or nothing)."""
        for entry in entries:
            if entry.reason not in SUPPRESSION_REASONS:
                raise ValueError(f"unknown suppression reason {entry.reason!r}")
        now_ms = self._now_ms()
        rows = [
            (
                e.address.lower(),
                e.reason,
                now_ms,
                None if e.expires_at is None else to_ms(e.expires_at),
                e.note,
            )
            for e in entries
        ]

        async def txn(cursor: ICursor) -> None:
            await cursor.executemany(
                "INSERT INTO suppressions (address, reason, created_at, expires_at, note)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (address) DO UPDATE SET reason = excluded.reason,"
                " created_at = excluded.created_at, expires_at = excluded.expires_at,"
                " note = excluded.note",
                rows,
            )

        await self.engine.run_interaction("add_suppressions", txn)

    async def remove_suppression(self, address: str) -> bool:
        async def txn(cursor: ICursor) -> bool:
            await cursor.execute("DELETE FROM suppressions WHERE address = ?", (address.lower(),))
            return int(cursor.rowcount) > 0

        return await self.engine.run_interaction("remove_suppression", txn)

    async def list_suppressions(self, include_expired: bool = False) -> list[Suppression]:
        now_ms = self._now_ms()

        async def txn(cursor: ICursor) -> list[Suppression]:
            sql = "SELECT address, reason, created_at, expires_at, note FROM suppressions"
            args: tuple[Any, ...] = ()
            if not include_expired:
                sql += " WHERE expires_at IS NULL OR expires_at > ?"
                args = (now_ms,)
            await cursor.execute(sql + " ORDER BY address", args)
            return [_suppression(row) for row in cursor.fetchall()]

        return await self.engine.run_interaction("list_suppressions", txn, readonly=True)

    async def active_suppressions(self, addresses: Iterable[str]) -> dict[str, Suppression]:
        """The entries in force now for any of ``addresses``, keyed by lower-cased address.

        Lookups made while another is under way share the next query (every delivery job
        asks, just before it sends); each still sees every entry committed before it asked.
        """
        wanted = frozenset(a.lower() for a in addresses)
        if not wanted:
            return {}
        return await self._suppression_reader.submit(wanted)

    async def _active_suppressions_batch(
        self, batch: Sequence[frozenset[str]]
    ) -> list[dict[str, Suppression]]:
        wanted = sorted(frozenset().union(*batch))
        now_ms = self._now_ms()

        async def txn(cursor: ICursor) -> dict[str, Suppression]:
            found: dict[str, Suppression] = {}
            for start in range(0, len(wanted), _ROWS_PER_STATEMENT):
                chunk = wanted[start : start + _ROWS_PER_STATEMENT]
                await cursor.execute(
                    "SELECT address, reason, created_at, expires_at, note FROM suppressions"
                    f" WHERE address IN ({', '.join('?' for _ in chunk)})"
                    " AND (expires_at IS NULL OR expires_at > ?)",
                    (*chunk, now_ms),
                )
                found.update((str(row[0]), _suppression(row)) for row in cursor.fetchall())
            return found

        found = await self.engine.run_interaction("active_suppressions", txn, readonly=True)
        return [{a: found[a] for a in addresses if a in found} for addresses in batch]


class LoginTable:
    """A table of names with password hashes (SMTP credentials, web users)."""

    def __init__(self, store: Store, table: str) -> None:
        self._store = store
        self._table = table

    async def add(self, name: str, password_hash: str) -> None:
        now_ms = self._store._now_ms()

        async def txn(cursor: ICursor) -> None:
            await cursor.execute(
                f"INSERT INTO {self._table} (name, password_hash, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (name, password_hash, now_ms),
            )
            if int(cursor.rowcount) == 0:
                raise DuplicateName(name)

        await self._store.engine.run_interaction(f"add_{self._table}", txn)

    async def set_password(self, name: str, password_hash: str) -> bool:
        async def txn(cursor: ICursor) -> bool:
            await cursor.execute(
                f"UPDATE {self._table} SET password_hash = ? WHERE name = ?",
                (password_hash, name),
            )
            return int(cursor.rowcount) > 0

        return await self._store.engine.run_interaction(f"password_{self._table}", txn)

    async def remove(self, name: str) -> bool:
        async def txn(cursor: ICursor) -> bool:
            await cursor.execute(f"DELETE FROM {self._table} WHERE name = ?", (name,))
            return int(cursor.rowcount) > 0

        return await self._store.engine.run_interaction(f"remove_{self._table}", txn)

    async def list(self) -> list[Login]:
        async def txn(cursor: ICursor) -> list[Login]:
            await cursor.execute(f"SELECT name, created_at FROM {self._table} ORDER BY name")
            return [Login(str(r[0]), int(r[1]) / 1000) for r in cursor.fetchall()]

        return await self._store.engine.run_interaction(f"list_{self._table}", txn, readonly=True)

    async def password_hash(self, name: str) -> str | None:
        async def txn(cursor: ICursor) -> str | None:
            await cursor.execute(f"SELECT password_hash FROM {self._table} WHERE name = ?", (name,))
            row = cursor.fetchone()
            return None if row is None else str(row[0])

        return await self._store.engine.run_interaction(f"hash_{self._table}", txn, readonly=True)


async def _suppress(
    cursor: ICursor,
    address: str,
    reason: str,
    now_ms: int,
    lasts: float | None,
    note: str,
) -> None:
    """Add or replace a suppression entry inside the caller's transaction."""
    expires_ms = None if lasts is None else now_ms + to_ms(lasts)
    await upsert_suppression(cursor, address.lower(), reason, now_ms, expires_ms, note)


async def upsert_suppression(
    cursor: ICursor, address: str, reason: str, now_ms: int, expires_ms: int | None, note: str
) -> None:
    """The suppression entry of ``address`` (lower-cased already), added or replaced."""
    await cursor.execute(
        "INSERT INTO suppressions (address, reason, created_at, expires_at, note)"
        " VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (address) DO UPDATE SET reason = excluded.reason,"
        " created_at = excluded.created_at, expires_at = excluded.expires_at,"
        " note = excluded.note",
        (address, reason, now_ms, expires_ms, note),
    )


async def insert_events(
    cursor: ICursor,
    time_ms: int,
    event_type: str,
    queue_id: str | None,
    recipients: Sequence[str | None],
    data: dict[str, Any],
) -> None:
    """One event row per recipient, inside the caller's transaction."""
    payload = json.dumps(data, sort_keys=True)
    await cursor.executemany(
        "INSERT INTO events (type, time, queue_id, recipient, data) VALUES (?, ?, ?, ?, ?)",
        [(event_type, time_ms, queue_id, r, payload) for r in recipients],
    )


def _received_data(message: NewMessage) -> str:
    return json.dumps(
        {
            "client_ip": message.client_ip,
            "credential": message.credential,
            "size": message.size,
        },
        sort_keys=True,
    )


def _suppression(row: Sequence[Any]) -> Suppression:
    return Suppression(
        address=str(row[0]),
        reason=str(row[1]),
        created_at=int(row[2]) / 1000,
        expires_at=from_ms(row[3]),
        note=str(row[4]),
    )
