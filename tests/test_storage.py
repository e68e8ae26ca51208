"""The storage layer on both engines (test ids end in [sqlite] and [postgresql])."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import Clock, deferLater

from smartrelay.config import SoftBouncePolicy, SuppressionConfig
from smartrelay.events import BouncedEvent, DeferredEvent, DeliveredEvent
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from smartrelay.storage.migrations import current_version, latest_version, migrate
from smartrelay.storage.pool import PooledEngine
from smartrelay.storage.store import (
    ClaimedRecipient,
    DuplicateName,
    NewMessage,
    RecipientOutcome,
    Store,
)
from smartrelay.timefmt import rfc3339
from tests.conftest import real_reactor
from tests.support.postgres import PostgresServer


def message(*recipients: str, key: str | None = None) -> NewMessage:
    return NewMessage(
        sender="app@example.com",
        recipients=recipients or ("a@example.net",),
        raw=b"Subject: hi\r\n\r\nbody \x00\xff bytes\r\n",
        client_ip="127.0.0.1",
        tags=("welcome",),
        metadata={"user": "42"},
        idempotency_key=key,
    )


async def count(engine: IDatabaseEngine, table: str) -> int:
    async def txn(cursor: ICursor) -> int:
        await cursor.execute(f"SELECT COUNT(*) FROM {table}")
        row = cursor.fetchone()
        assert row is not None
        return int(row[0])

    return await engine.run_interaction("count", txn, readonly=True)


@pytest_twisted.ensureDeferred
async def test_migrations_apply_once(engine: IDatabaseEngine) -> None:
    assert await current_version(engine) == latest_version() >= 1
    assert await migrate(engine, 0) == []
    for table in ("messages", "recipients", "events", "suppressions", "web_users"):
        assert await count(engine, table) == 0


@pytest_twisted.ensureDeferred
async def test_message_bodies_are_compressed_with_lz4_on_postgresql(
    engine: IDatabaseEngine,
) -> None:
    """Schema 017: cheaper TOAST compression for bodies where the server has LZ4 (Debian's
    PostgreSQL 15 has); SQLite has no such setting."""
    if engine.name != "postgresql":
        assert engine.name == "sqlite"
        return

    async def txn(cursor: ICursor) -> tuple[bool, str]:
        await cursor.execute(
            "SELECT 'lz4' = ANY (enumvals) FROM pg_settings"
            " WHERE name = 'default_toast_compression'"
        )
        row = cursor.fetchone()
        await cursor.execute(
            "SELECT attcompression FROM pg_attribute"
            " WHERE attrelid = 'message_bodies'::regclass AND attname = 'raw'"
        )
        column = cursor.fetchone()
        assert row is not None and column is not None
        return bool(row[0]), str(column[0])

    has_lz4, compression = await engine.run_interaction("compression", txn, readonly=True)
    assert has_lz4  # the server the tests start is Debian's, built with LZ4
    assert compression == "l"


@pytest_twisted.ensureDeferred
async def test_messages_queued_during_a_group_commit_share_the_next_one(store: Store) -> None:
    """One group commit of accepted messages at a time, on both engines: the first message
    goes alone, the four that come while it commits wait and go together in the next
    (docs/storage.md; a second commit in flight would have taken the second message alone)."""
    batches_before = store._queue_committer.batches
    queued = await gatherResults(
        [ensureDeferred(store.queue_message(message(f"r{i}@example.net"))) for i in range(5)]
    )
    assert len({q.queue_id for q in queued}) == 5
    assert store._queue_committer.batches - batches_before == 2


@pytest_twisted.ensureDeferred
async def test_queue_message_writes_message_recipients_and_events(
    store: Store, engine: IDatabaseEngine
) -> None:
    queued = await store.queue_message(message("a@example.net", "B@Example.ORG"))
    assert not queued.duplicate and len(queued.queue_id) == 16

    async def txn(cursor: ICursor) -> None:
        await cursor.execute(
            "SELECT sender, raw, tags, metadata, size"
            " FROM messages JOIN message_bodies USING (queue_id)"
        )
        sender, raw, tags, metadata, size = cursor.fetchall()[0]
        assert sender == "app@example.com"
        assert raw == b"Subject: hi\r\n\r\nbody \x00\xff bytes\r\n"
        assert json.loads(tags) == ["welcome"] and json.loads(metadata) == {"user": "42"}
        assert size == len(raw)
        await cursor.execute("SELECT address, domain, state FROM recipients ORDER BY id")
        assert cursor.fetchall() == [
            ("a@example.net", "example.net", "queued"),
            ("B@Example.ORG", "example.org", "queued"),
        ]
        await cursor.execute("SELECT type, queue_id, recipient, data FROM events ORDER BY id")
        events = cursor.fetchall()
        assert [(e[0], e[1], e[2]) for e in events] == [
            ("received", queued.queue_id, "a@example.net"),
            ("received", queued.queue_id, "B@Example.ORG"),
        ]
        assert json.loads(events[0][3]) == {
            "client_ip": "127.0.0.1",
            "credential": None,
            "size": len(raw),
        }

    await engine.run_interaction("check", txn, readonly=True)


@pytest_twisted.ensureDeferred
async def test_failed_transaction_leaves_nothing(engine: IDatabaseEngine) -> None:
    async def txn(cursor: ICursor) -> None:
        await cursor.execute(
            "INSERT INTO messages (queue_id, received_at, sender, size) VALUES ('Q1', 0, 's', 1)"
        )
        await cursor.execute("INSERT INTO message_bodies (queue_id, raw) VALUES ('Q1', ?)", (b"x",))
        await cursor.execute(
            "INSERT INTO recipients (queue_id, address, domain, state, updated_at)"
            " VALUES ('Q1', 'a@b', 'b', 'queued', 0)"
        )
        raise RuntimeError("crash between statements")

    with pytest.raises(RuntimeError):
        await engine.run_interaction("half", txn)
    assert await count(engine, "messages") == 0
    assert await count(engine, "message_bodies") == 0
    assert await count(engine, "recipients") == 0


@pytest_twisted.ensureDeferred
async def test_sql_error_rolls_back_and_engine_stays_usable(
    store: Store, engine: IDatabaseEngine
) -> None:
    async def txn(cursor: ICursor) -> None:
        await cursor.execute(
            "INSERT INTO suppressions (address, reason, created_at) VALUES ('x@y', 'manual', 0)"
        )
        await cursor.execute("INSERT INTO no_such_table VALUES (1)")

    await assert_rolled_back_and_usable(store, engine, txn, "no_such_table")


async def assert_rolled_back_and_usable(
    store: Store, engine: IDatabaseEngine, txn: Callable[[ICursor], Any], error: str
) -> None:
    """``txn`` (which writes suppressions) fails with ``error``, leaves none, and the engine
    stores the next one."""
    with pytest.raises(Exception, match=error):
        await engine.run_interaction("failing", txn)
    assert await count(engine, "suppressions") == 0
    await store.add_suppression("x@y", "manual")
    assert await count(engine, "suppressions") == 1


@pytest_twisted.ensureDeferred
async def test_idempotency_key_returns_first_queue_id_within_24h(
    store: Store, clock: Clock, engine: IDatabaseEngine
) -> None:
    first = await store.queue_message(message(key="order-1"))
    again = await store.queue_message(message(key="order-1"))
    assert again.duplicate and again.queue_id == first.queue_id
    other = await store.queue_message(message(key="order-2"))
    assert not other.duplicate
    clock.advance(24 * 3600 + 1)
    later = await store.queue_message(message(key="order-1"))
    assert not later.duplicate and later.queue_id != first.queue_id
    assert await count(engine, "messages") == 3


@pytest_twisted.ensureDeferred
async def test_claim_due_respects_limit_time_and_lease(store: Store, clock: Clock) -> None:
    for i in range(5):
        await store.queue_message(message(f"r{i}@example.net"))
    first = await store.claim_due("node-a", limit=3, lease=60)
    assert [c.address for c in first] == ["r0@example.net", "r1@example.net", "r2@example.net"]
    second = await store.claim_due("node-b", limit=10, lease=60)
    assert [c.address for c in second] == ["r3@example.net", "r4@example.net"]
    assert await store.claim_due("node-b", limit=10, lease=60) == []
    assert await store.count_recipients("delivering") == 5
    # The owner of the first batch died: after the lease the rows come due again.
    clock.advance(61)
    reclaimed = await store.claim_due("node-c", limit=10, lease=60)
    assert {c.id for c in reclaimed} == {c.id for c in first + second}


@pytest_twisted.ensureDeferred
async def test_a_claim_reads_its_messages_sizes_in_the_same_transaction(
    store: Store, clock: Clock
) -> None:
    small = await store.queue_message(message("a@example.net", "b@example.net"))
    big = NewMessage("app@example.com", ("c@example.net",), b"Subject: big\r\n\r\n" + b"x" * 5000)
    queued_big = await store.queue_message(big)
    claim = await store.claim_due_with_sizes("node-a", limit=10, lease=60)
    assert [c.address for c in claim.recipients] == [
        "a@example.net",
        "b@example.net",
        "c@example.net",
    ]
    assert claim.sizes == {small.queue_id: len(message().raw), queued_big.queue_id: len(big.raw)}
    assert await store.count_recipients("delivering") == 3
    empty = await store.claim_due_with_sizes("node-b", limit=10, lease=60)
    assert (empty.recipients, empty.sizes) == ((), {})


@pytest_twisted.ensureDeferred
async def test_postgresql_runs_as_many_transactions_at_once_as_it_has_connections(
    postgres_server: PostgresServer,
) -> None:
    """A delivery process's engine has two connections (relay.DELIVERY_PROCESS_CONNECTIONS):
    a third transaction waits until one of the two under way ends. (SQLite's transactions
    wait only for their own cursor.)"""
    url = postgres_server.create_database()
    engine = create_engine(real_reactor(), url, pool_size=2)
    await engine.start()
    started: list[int] = []
    gates = [Deferred[None]() for _ in range(3)]

    def holding(index: int) -> Callable[[ICursor], Any]:
        async def txn(cursor: ICursor) -> int:
            await cursor.execute("SELECT 1")
            started.append(index)
            await gates[index]
            return index

        return txn

    async def until_started(count: int) -> None:
        for _ in range(200):  # 10 s at most
            if len(started) >= count:
                return
            await deferLater(real_reactor(), 0.05, lambda: None)

    try:
        assert isinstance(engine, PooledEngine) and engine.pool_size == 2
        running = [engine.run_interaction(f"hold {i}", holding(i)) for i in range(3)]
        await until_started(2)
        await deferLater(real_reactor(), 0.3, lambda: None)
        assert sorted(started) == [0, 1]  # the third waits for a connection
        gates[0].callback(None)
        assert await running[0] == 0
        await until_started(3)
        assert sorted(started) == [0, 1, 2]
        gates[1].callback(None)
        gates[2].callback(None)
        assert await gatherResults(running[1:]) == [1, 2]
    finally:
        for gate in gates:  # closing waits for the transactions under way
            if not gate.called:
                gate.callback(None)
        await engine.close()
        postgres_server.drop_database(url)


@pytest_twisted.ensureDeferred
async def test_concurrent_transactions_all_commit(store: Store, engine: IDatabaseEngine) -> None:
    from twisted.internet.defer import Deferred, gatherResults

    results = await gatherResults(
        [
            Deferred.fromCoroutine(store.queue_message(message(f"r{i}@example.net")))
            for i in range(40)
        ]
    )
    assert len({r.queue_id for r in results}) == 40
    assert await count(engine, "recipients") == 40
    # Group commit: messages that arrived during a commit shared the next transaction.
    assert store._queue_committer.batches < 40


@pytest_twisted.ensureDeferred
async def test_a_failing_message_fails_alone_in_its_group(
    store: Store, engine: IDatabaseEngine
) -> None:
    from twisted.internet.defer import Deferred, DeferredList

    first = await store.queue_message(message("x@example.net"))
    # The same queue id again violates the primary key: that one message must fail, the
    # messages committed in the same group must not.
    clash = NewMessage("a@example.com", ("y@example.net",), b"x", queue_id=first.queue_id)
    submitted = [message(f"r{i}@example.net") for i in range(5)]
    submitted.insert(2, clash)
    results = await DeferredList(
        [Deferred.fromCoroutine(store.queue_message(m)) for m in submitted], consumeErrors=True
    )
    outcomes = [ok for ok, _ in results]
    assert outcomes == [True, True, False, True, True, True]
    assert await count(engine, "messages") == 6
    assert await count(engine, "recipients") == 6


@pytest_twisted.ensureDeferred
async def test_notify_wakes_listener_after_commit_only(
    store: Store, engine: IDatabaseEngine
) -> None:
    from twisted.internet.defer import Deferred

    from smartrelay.storage.store import QUEUE_CHANNEL
    from tests.conftest import real_reactor

    woken: list[int] = []
    waiter: Deferred[None] = Deferred()

    def wake() -> None:
        woken.append(1)
        if not waiter.called:
            waiter.callback(None)

    await engine.listen(QUEUE_CHANNEL, wake)

    async def rolled_back(cursor: ICursor) -> None:
        await cursor.notify(QUEUE_CHANNEL)
        raise RuntimeError("no commit")

    with pytest.raises(RuntimeError):
        await engine.run_interaction("rolled_back", rolled_back)
    await store.queue_message(message())
    waiter.addTimeout(10, real_reactor())
    await waiter
    assert woken == [1]


@pytest_twisted.ensureDeferred
async def test_claimed_messages_load_with_their_recipients_suppressions(
    store: Store, clock: Clock
) -> None:
    """One read gives the delivery manager a claimed batch's messages and the entries in
    force for its recipients (any case; expired ones left out)."""
    first = await store.queue_message(message("Kept@Example.net", "gone@example.net"))
    second = await store.queue_message(message())
    await store.add_suppression("kept@example.NET", "complaint")
    await store.add_suppression("gone@example.net", "soft_bounce", expires_at=clock.seconds() + 5)
    await store.add_suppression("other@example.net", "hard_bounce")
    clock.advance(6)
    loaded = await store.load_for_delivery(
        [first.queue_id, second.queue_id],
        ["Kept@Example.net", "gone@example.net", "a@example.net"],
    )
    assert set(loaded.messages) == {first.queue_id, second.queue_id}
    assert loaded.messages[first.queue_id].raw == message().raw
    assert set(loaded.suppressions) == {"kept@example.net"}
    assert loaded.suppressions["kept@example.net"].reason == "complaint"
    nothing = await store.load_for_delivery([], ["kept@example.net"])
    assert (nothing.messages, nothing.suppressions) == ({}, {})


@pytest_twisted.ensureDeferred
async def test_suppressions(store: Store, clock: Clock) -> None:
    await store.add_suppression("User@Example.com", "hard_bounce", note="5.1.1")
    await store.add_suppression("temp@example.com", "soft_bounce", expires_at=clock.seconds() + 100)
    active = await store.active_suppressions(["user@example.COM", "temp@example.com", "x@y"])
    assert set(active) == {"user@example.com", "temp@example.com"}
    assert active["user@example.com"].reason == "hard_bounce"
    assert active["user@example.com"].expires_at is None
    clock.advance(101)
    assert set(await store.active_suppressions(["temp@example.com"])) == set()
    assert [s.address for s in await store.list_suppressions()] == ["user@example.com"]
    assert len(await store.list_suppressions(include_expired=True)) == 2
    # Adding again replaces the entry.
    await store.add_suppression("temp@example.com", "complaint")
    assert (await store.active_suppressions(["temp@example.com"]))[
        "temp@example.com"
    ].reason == "complaint"
    assert await store.remove_suppression("USER@example.com") is True
    assert await store.remove_suppression("user@example.com") is False
    with pytest.raises(ValueError, match="unknown suppression reason"):
        await store.add_suppression("a@b", "because")


@pytest.mark.parametrize("table", ["smtp_credentials", "web_users"])
@pytest_twisted.ensureDeferred
async def test_login_tables(store: Store, table: str) -> None:
    logins = getattr(store, table)
    await logins.add("app1", "hash-1")
    with pytest.raises(DuplicateName):
        await logins.add("app1", "hash-2")
    assert await logins.password_hash("app1") == "hash-1"
    assert await logins.set_password("app1", "hash-3") is True
    assert await logins.set_password("nobody", "hash-3") is False
    assert await logins.password_hash("app1") == "hash-3"
    await logins.add("app0", "h")
    assert [login.name for login in await logins.list()] == ["app0", "app1"]
    assert await logins.remove("app1") is True
    assert await logins.remove("app1") is False
    assert await logins.password_hash("app1") is None


@pytest_twisted.ensureDeferred
async def test_pending_retry_and_drop(store: Store, clock: Clock) -> None:
    first = await store.queue_message(message("a@example.net", "b@example.net"))
    second = await store.queue_message(message("c@example.org"))
    pending = await store.pending_recipients()
    assert [(p.queue_id, p.address, p.state) for p in pending] == [
        (first.queue_id, "a@example.net", "queued"),
        (first.queue_id, "b@example.net", "queued"),
        (second.queue_id, "c@example.org", "queued"),
    ]
    assert [p.address for p in await store.pending_recipients(second.queue_id)] == ["c@example.org"]
    # A claimed recipient whose lease runs is left alone by retry; once the lease has run
    # out (its node died or got stuck), retry releases it.
    claimed = await store.claim_due("node", limit=1, lease=600)
    assert [c.address for c in claimed] == ["a@example.net"]
    clock.advance(10)
    assert await store.retry_now() == 2
    states = {p.address: p.state for p in await store.pending_recipients()}
    assert states["a@example.net"] == "delivering"
    clock.advance(600)
    assert await store.retry_now(first.queue_id) == 2
    states = {p.address: p.state for p in await store.pending_recipients()}
    assert states == {
        "a@example.net": "queued",
        "b@example.net": "queued",
        "c@example.org": "queued",
    }
    # Drop takes claimed recipients too (the owner's later outcome is then ignored).
    assert len(await store.claim_due("node", limit=10, lease=600)) == 3
    assert sorted(await store.drop_message(first.queue_id)) == ["a@example.net", "b@example.net"]
    states = {p.address: p.state for p in await store.pending_recipients()}
    assert states == {"c@example.org": "delivering"}
    assert await store.drop_message(first.queue_id) == []


@pytest_twisted.ensureDeferred
async def test_export_events_pages_and_filters(store: Store, clock: Clock) -> None:
    start = clock.seconds()
    for i in range(7):
        await store.queue_message(message(f"r{i}@example.net"))
        clock.advance(60)
    page = await store.export_events(0, 3)
    assert [e.recipient for e in page] == ["r0@example.net", "r1@example.net", "r2@example.net"]
    assert page[0].sender == "app@example.com" and page[0].tags == ("welcome",)
    assert page[0].metadata == {"user": "42"} and page[0].data["client_ip"] == "127.0.0.1"
    rest = await store.export_events(page[-1].id, 100)
    assert [e.recipient for e in rest] == [f"r{i}@example.net" for i in range(3, 7)]
    window = await store.export_events(0, 100, since=start + 120, until=start + 240)
    assert [e.recipient for e in window] == ["r2@example.net", "r3@example.net"]
    assert await store.export_events(0, 100, types=["delivered"]) == []


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_takes_back_its_claims(store: Store) -> None:
    await store.queue_message(message("a@example.net", "b@example.net"))
    await store.claim_due("node-a", limit=10, lease=900)
    await store.claim_due("node-b", limit=10, lease=900)  # nothing left for b
    assert await store.claim_due("node-a", limit=10, lease=900) == []
    assert await store.release_claims("node-b") == 0
    assert await store.release_claims("node-a") == 2
    again = await store.claim_due("node-a", limit=10, lease=900)
    assert sorted(c.address for c in again) == ["a@example.net", "b@example.net"]


def bounce(recipient: ClaimedRecipient, hard: bool) -> RecipientOutcome:
    event = BouncedEvent(
        category="invalid-recipient" if hard else "mailbox-full",
        hard=hard,
        status="5.1.1" if hard else "5.2.2",
        reply="550 no",
        source="smtp",
    )
    return RecipientOutcome(
        recipient.id,
        recipient.queue_id,
        recipient.address,
        "bounced",
        1,
        None,
        "550 no",
        (event,),
    )


@pytest_twisted.ensureDeferred
async def test_suppression_policy_from_delivery_outcomes(engine: IDatabaseEngine) -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    policy = SuppressionConfig(
        hard_bounce=None, soft_bounce=SoftBouncePolicy(count=2, within=3600, suppress_for=600)
    )
    store = Store(engine, clock, policy)
    await store.queue_message(message("hard@example.net", "soft@example.net"))
    hard, soft = sorted(await store.claim_due("n", limit=10, lease=60), key=lambda c: c.address)
    await store.record_outcomes("n", [bounce(hard, hard=True), bounce(soft, hard=False)])
    active = await store.active_suppressions(["hard@example.net", "soft@example.net"])
    assert set(active) == {"hard@example.net"}
    assert active["hard@example.net"].reason == "hard_bounce"
    assert active["hard@example.net"].expires_at is None

    # A second soft bounce within the hour suppresses for 10 minutes.
    await store.queue_message(message("Soft@example.net"))
    (again,) = await store.claim_due("n", limit=10, lease=60)
    await store.record_outcomes("n", [bounce(again, hard=False)])
    entry = (await store.active_suppressions(["soft@example.net"]))["soft@example.net"]
    assert entry.reason == "soft_bounce" and entry.expires_at == clock.seconds() + 600

    # A delivery clears a soft-bounce entry (not a hard one).
    await store.queue_message(message("soft@example.net", "hard@example.net"))
    delivered = [
        RecipientOutcome(
            c.id, c.queue_id, c.address, "delivered", 1, None, "250 ok", (_delivered_event(),)
        )
        for c in await store.claim_due("n", limit=10, lease=60)
    ]
    await store.record_outcomes("n", delivered)
    remaining = await store.active_suppressions(["soft@example.net", "hard@example.net"])
    assert set(remaining) == {"hard@example.net"}


@pytest_twisted.ensureDeferred
async def test_a_delivery_resets_the_soft_bounce_count(engine: IDatabaseEngine) -> None:
    """Issue 12: with the default policy (3 soft bounces within 7 days), two 552s, a delivery
    and one more 552 must not suppress the address: the delivery starts the count again."""
    clock = Clock()
    clock.advance(1_700_000_000)
    store = Store(engine, clock, SuppressionConfig())
    address = "full@example.net"

    async def attempt(outcome: Callable[[ClaimedRecipient], RecipientOutcome]) -> None:
        clock.advance(3600)
        await store.queue_message(message(address))
        (claimed,) = await store.claim_due("n", limit=10, lease=60)
        assert await store.record_outcomes("n", [outcome(claimed)]) == 1

    def full(recipient: ClaimedRecipient) -> RecipientOutcome:
        return bounce(recipient, hard=False)

    await attempt(full)
    await attempt(full)
    await attempt(delivered)
    await attempt(full)
    assert await store.active_suppressions([address]) == {}
    await attempt(full)
    assert await store.active_suppressions([address]) == {}
    # The third soft bounce since the delivery suppresses, for the policy's 30 days.
    await attempt(full)
    entry = (await store.active_suppressions([address]))[address]
    assert entry.reason == "soft_bounce" and entry.note == "3 soft bounces"
    assert entry.expires_at == clock.seconds() + 30 * 86400


def delivered(
    recipient: ClaimedRecipient, next_attempt_at: float | None = None
) -> RecipientOutcome:
    event: DeliveredEvent | DeferredEvent = (
        _delivered_event()
        if next_attempt_at is None
        else DeferredEvent("mx.example.net", "451 later", 1, rfc3339(next_attempt_at))
    )
    return RecipientOutcome(
        recipient.id,
        recipient.queue_id,
        recipient.address,
        event.type,
        1,
        next_attempt_at,
        event.reply,
        (event,),
    )


def _delivered_event() -> DeliveredEvent:
    return DeliveredEvent(mx="mx.example.net", reply="250 ok", tls=False, attempt=1)


@pytest_twisted.ensureDeferred
async def test_outcomes_of_several_owners_share_one_transaction(
    store: Store, engine: IDatabaseEngine, clock: Clock
) -> None:
    """Outcomes recorded at the same moment are written together; each owner hears how many
    of its rows it still held, and a row whose lease went to another owner is left alone."""
    await store.queue_message(message("c@example.net"))
    (c,) = await store.claim_due("node-a", limit=10, lease=60)
    await store.queue_message(message("a@example.net", "b@example.net"))
    a, b = sorted(await store.claim_due("node-a", limit=10, lease=900), key=lambda r: r.address)
    clock.advance(61)  # node-a's lease on c is over: c goes to node-b
    (c_again,) = await store.claim_due("node-b", limit=10, lease=60)
    assert c_again.id == c.id
    results = await gatherResults(
        [
            ensureDeferred(store.record_outcomes("node-a", [delivered(a), delivered(c)])),
            ensureDeferred(store.record_outcomes("node-a", [delivered(b, clock.seconds() + 300)])),
            ensureDeferred(store.record_outcomes("node-b", [delivered(c_again)])),
        ]
    )
    assert results == [1, 1, 1]

    async def txn(cursor: ICursor) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
        await cursor.execute(
            "SELECT address, state, next_attempt_at, lease_owner FROM recipients ORDER BY address"
        )
        recipients = cursor.fetchall()
        await cursor.execute(
            "SELECT recipient, type FROM events WHERE type <> 'received' ORDER BY recipient"
        )
        return recipients, cursor.fetchall()

    recipients, events = await engine.run_interaction("check", txn, readonly=True)
    due = int((clock.seconds() + 300) * 1000)
    assert recipients == [
        ("a@example.net", "delivered", None, None),
        ("b@example.net", "deferred", due, None),
        ("c@example.net", "delivered", None, None),
    ]
    assert events == [
        ("a@example.net", "delivered"),
        ("b@example.net", "deferred"),
        ("c@example.net", "delivered"),  # once: node-b's, not node-a's stale one
    ]


@pytest_twisted.ensureDeferred
async def test_suppression_lookups_at_the_same_moment_share_a_query(store: Store) -> None:
    await store.add_suppression("x@example.net", "manual")
    await store.add_suppression("y@example.net", "unsubscribe")
    queries = 0
    run_interaction = store.engine.run_interaction

    def counting(name: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal queries
        queries += name == "active_suppressions"
        return run_interaction(name, *args, **kwargs)

    store.engine.run_interaction = counting  # type: ignore[method-assign]
    lookups = [
        ensureDeferred(store.active_suppressions(addresses))
        for addresses in (["X@example.net"], ["y@example.net", "z@example.net"], ["z@example.net"])
    ]
    found = await gatherResults(lookups)
    assert [sorted(f) for f in found] == [["x@example.net"], ["y@example.net"], []]
    assert found[1]["y@example.net"].reason == "unsubscribe"
    assert queries == 2  # the first lookup alone, then the two that came while it ran


AWKWARD = [
    "50%s off@example.net",
    "100% sure@example.net",
    "o'brien@example.net",
    "zoë@exämple.net",
]


@pytest_twisted.ensureDeferred
async def test_write_many_runs_in_order_before_the_next_statement(engine: IDatabaseEngine) -> None:
    """Rows given to write_many are there for the transaction's next statement, values with
    placeholders' characters, quotes, non-ASCII text and bytes stored exactly."""
    body = bytes(range(256)) * 3

    async def txn(cursor: ICursor) -> list[Any]:
        await cursor.write_many(
            "INSERT INTO suppressions (address, reason, created_at) VALUES (?, ?, ?)",
            [(address, "manual", i) for i, address in enumerate(AWKWARD)],
        )
        await cursor.write_many(
            "INSERT INTO messages (queue_id, received_at, sender, size) VALUES (?, 0, ?, 1)",
            [("Q%s1", "a%b@example.com")],
        )
        await cursor.write_many(
            "INSERT INTO message_bodies (queue_id, raw) VALUES (?, ?)", [("Q%s1", body)]
        )
        # A literal "%" in the statement sent with the unsent writes.
        await cursor.execute(
            "SELECT address FROM suppressions WHERE address LIKE '%@%' ORDER BY created_at"
        )
        return [row[0] for row in cursor.fetchall()]

    assert await engine.run_interaction("write_many", txn) == AWKWARD

    async def check(cursor: ICursor) -> tuple[Any, ...]:
        await cursor.execute(
            "SELECT m.sender, b.raw FROM messages m JOIN message_bodies b USING (queue_id)"
            " WHERE queue_id = ?",
            ("Q%s1",),
        )
        row = cursor.fetchone()
        assert row is not None
        return tuple(row)

    assert await engine.run_interaction("check", check, readonly=True) == (
        "a%b@example.com",
        body,
    )


@pytest_twisted.ensureDeferred
async def test_a_failing_write_many_fails_its_transaction(
    store: Store, engine: IDatabaseEngine
) -> None:
    """An error of a row given to write_many (here a duplicate key, found only when the rows
    are sent) fails the whole transaction: nothing of it stays, and the engine goes on."""

    async def txn(cursor: ICursor) -> None:
        await cursor.write_many(
            "INSERT INTO suppressions (address, reason, created_at) VALUES (?, 'manual', 0)",
            [("first@example.net",), ("dup@example.net",), ("dup@example.net",)],
        )
        await cursor.notify("smartrelay_test")

    await assert_rolled_back_and_usable(store, engine, txn, r"(?i)unique|duplicate")


@pytest_twisted.ensureDeferred
async def test_accepting_a_group_is_one_round_trip_on_postgresql(
    store: Store, engine: IDatabaseEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a group commit of accepted messages (INSERTs into five tables and a
    NOTIFY) goes as one query string, BEGIN to COMMIT: one round trip instead of seven."""
    if engine.name != "postgresql":
        assert engine.name == "sqlite"  # one trip to the connection's thread anyway
        return
    from txpostgres import txpostgres

    sent: list[str] = []
    execute = txpostgres.Cursor.execute

    def counting(self: Any, query: Any, params: Any = None) -> Any:
        sent.append(query.decode() if isinstance(query, bytes) else str(query))
        return execute(self, query, params)

    monkeypatch.setattr(txpostgres.Cursor, "execute", counting)
    queued = await store.queue_message(message("a@example.net", "b@example.net"))
    monkeypatch.undo()
    assert len(sent) == 1, sent
    [query] = sent
    assert query.startswith("BEGIN; INSERT INTO messages ") and query.endswith("; COMMIT")
    assert "NOTIFY " in query and queued.queue_id in query
    assert await count(engine, "recipients") == 2
    assert await count(engine, "message_terms") > 0
