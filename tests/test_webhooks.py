"""The webhook sender (smartrelay/webhooks/dispatcher.py) against real HTTP receivers on
127.0.0.1 and a real database (both engines): order, retries, 410, dead letters and replays,
a hanging endpoint, two nodes sharing one endpoint."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from smartrelay.config.model import Webhook
from smartrelay.events import DeliveredEvent, OpenedEvent
from smartrelay.metrics import RelayMetrics
from smartrelay.reactor import IRelayReactor
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from smartrelay.storage.migrations import migrate
from smartrelay.storage.store import START, EventPosition, Store, insert_events, to_ms
from smartrelay.webhooks.dispatcher import WebhookService, WebhookTunables
from tests.conftest import real_reactor
from tests.support.postgres import PostgresServer
from tests.support.webhook_receiver import SECRET, Receiver, wait_for, wait_for_async

FAST = WebhookTunables(poll=0.1, lease=5.0, backoff_first=0.2, backoff_max=0.5)
_numbers = itertools.count()


@pytest.fixture
def reactor() -> IRelayReactor:
    return real_reactor()


@pytest.fixture
def live(engine: IDatabaseEngine, reactor: IRelayReactor) -> Store:
    """A store on the real clock (the sender and the store share it, as in the relay)."""
    return Store(engine, reactor)


@pytest_twisted.async_yield_fixture
async def receiver(reactor: IRelayReactor) -> AsyncIterator[Receiver]:
    r = Receiver(reactor)
    r.start()
    yield r
    await r.stop()


async def add_events(store: Store, n: int, kind: str = "delivered") -> None:
    """``n`` events in one transaction."""
    now = store.clock.seconds()

    async def txn(cursor: ICursor) -> None:
        rows = []
        for _ in range(n):
            i = next(_numbers)
            event: object = (
                DeliveredEvent("mx.example.net", "250 ok", True, i)
                if kind == "delivered"
                else OpenedEvent(f"UA {i}", "192.0.2.1", False)
            )
            rows.append((None, f"r{i}@example.net", event))
        await insert_events(cursor, to_ms(now), rows)  # type: ignore[arg-type]

    await store.run("test_events", txn)


async def all_ids(store: Store, types: tuple[str, ...] = ()) -> list[int]:
    """Every committed event's id in position order (of ``types``).

    On PostgreSQL the head (:meth:`Store.event_head`) stays behind an event while any
    transaction older than it is still open (the sender's own, say), so a read is made again
    until it holds every event the table has (for 20 s at most): the callers add none
    meanwhile.
    """
    for _ in range(400):
        [(count,)] = await sql(store, "SELECT COUNT(*) FROM events")
        head = await store.event_head()
        out: list[int] = []
        everything = 0
        after = START
        while True:
            page = await store.events_after(after, head, 1000, ())
            everything += len(page.events)
            out.extend(e.id for e in page.events if not types or e.type in types)
            after = page.end
            if page.exhausted:
                break
        if everything >= int(str(count)):
            return out
        await deferLater(real_reactor(), 0.05)
    raise AssertionError("the event head stayed behind the committed events for 20 s")


async def endpoint_row(store: Store, url: str) -> dict[str, object] | None:
    columns = (
        "position_txid, position_id, state, disabled_reason, failing_since, attempts,"
        " last_error, sent_events, failures, lease_owner, last_success_at"
    )

    async def txn(cursor: ICursor) -> dict[str, object] | None:
        await cursor.execute(f"SELECT {columns} FROM webhook_endpoints WHERE url = ?", (url,))
        row = cursor.fetchone()
        if row is None:
            return None
        return dict(zip([c.strip() for c in columns.split(",")], row, strict=True))

    return await store.run("test_row", txn, readonly=True)


async def sql(
    store: Store, statement: str, args: tuple[object, ...] = ()
) -> list[tuple[object, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[object, ...]]:
        await cursor.execute(statement, args)
        if statement.lstrip().upper().startswith("SELECT"):
            return [tuple(r) for r in cursor.fetchall()]
        return []

    return await store.run("test_sql", txn)


def hook(url: str, **kwargs: object) -> Webhook:
    settings: dict[str, object] = {"batch_size": 10, "batch_wait": 0.2, "timeout": 5.0}
    settings.update(kwargs)
    return Webhook(url=url, secret=SECRET, **settings)  # type: ignore[arg-type]


async def started(
    reactor: IRelayReactor,
    store: Store,
    webhooks: list[Webhook],
    node: str = "node-a",
    metrics: RelayMetrics | None = None,
    tunables: WebhookTunables = FAST,
) -> WebhookService:
    """A started service whose endpoints' rows exist (events from now on are theirs)."""

    async def ready() -> Store:
        return store

    service = WebhookService(reactor, ready, webhooks, node, metrics or RelayMetrics(), tunables)
    service.startService()
    urls = {webhook.url for webhook in webhooks}

    async def rows_made() -> bool:
        return all([await endpoint_row(store, url) is not None for url in urls])

    await wait_for_async(reactor, rows_made, "the endpoints' rows")
    return service


@pytest_twisted.ensureDeferred
async def test_retries_until_acknowledged_every_event_in_order(
    live: Store, reactor: IRelayReactor, receiver: Receiver
) -> None:
    await add_events(live, 3)  # before the endpoint existed: not its events
    before = set(await all_ids(live))
    receiver.answers = [500, 500, 503]
    metrics = RelayMetrics()
    service = await started(reactor, live, [hook(receiver.url)], metrics=metrics)
    try:
        for _ in range(5):
            await add_events(live, 7)
            await add_events(live, 2, "opened")
        expected = [i for i in await all_ids(live) if i not in before]
        assert len(expected) == 45
        await wait_for(
            reactor, lambda: len(receiver.acknowledged()) >= 45, "every event acknowledged"
        )
        # The receiver has answered the last POST; the sender records it a moment later (a
        # stop before that would send the last batch again at the next start: at least once).
        await wait_for_async(
            reactor,
            lambda: _row_if(live, receiver.url, sent_events=45),
            "the last acknowledgement recorded",
        )
    finally:
        await service.stopService()
    assert receiver.acknowledged() == expected  # each once at least, in position order
    assert all(p.signed for p in receiver.posts)
    assert all(len(p.events) <= 10 for p in receiver.posts)
    assert [p.status for p in receiver.posts[:3]] == [500, 500, 503]
    # The failed range was the one sent again.
    assert receiver.posts[3].ids == receiver.posts[0].ids[: len(receiver.posts[3].ids)]
    first = receiver.posts[0]
    assert first.headers["content-type"] == "application/json"
    assert first.headers["user-agent"].startswith("SmartRelay/")
    assert first.headers["x-smartrelay-batch"] == f"{first.ids[0]}-{first.ids[-1]}"
    assert set(first.events[0]) >= {"id", "type", "time", "queue_id", "recipient", "tags"}
    row = await endpoint_row(live, receiver.url)
    assert row is not None
    assert row["failing_since"] is None and row["attempts"] == 0 and row["last_error"] is None
    assert row["failures"] == 3 and row["sent_events"] == 45
    assert row["lease_owner"] is None  # released at the stop
    assert (int(str(row["position_txid"])), int(str(row["position_id"]))) >= (0, expected[-1])
    ok = metrics.webhook_posts.labels(endpoint=receiver.url, result="ok")._value.get()
    failed = metrics.webhook_posts.labels(endpoint=receiver.url, result="failed")._value.get()
    assert failed == 3 and ok == len(receiver.posts) - 3
    assert metrics.webhook_events_sent.labels(endpoint=receiver.url)._value.get() == 45


@pytest_twisted.ensureDeferred
async def test_only_the_configured_types_are_sent(
    live: Store, reactor: IRelayReactor, receiver: Receiver
) -> None:
    service = await started(reactor, live, [hook(receiver.url, events=("opened",))])
    try:
        await add_events(live, 30)
        await add_events(live, 4, "opened")
        await add_events(live, 30)
        opened = (await all_ids(live, ("opened",)))[-4:]
        await wait_for(reactor, lambda: len(receiver.acknowledged()) >= 4, "the opens")
        # The stretch of other types after them is passed over and stored as read.
        head = await live.event_head()
        await wait_for_async(
            reactor,
            lambda: _position_is(live, receiver.url, head),
            "the position past the last delivered events",
        )
    finally:
        await service.stopService()
    assert receiver.acknowledged() == opened
    assert {e["type"] for p in receiver.posts for e in p.events} == {"opened"}


async def _position_is(store: Store, url: str, head: EventPosition) -> bool:
    row = await endpoint_row(store, url)
    assert row is not None
    position = EventPosition(int(str(row["position_txid"])), int(str(row["position_id"])))
    return position >= head or (head.id == 0 and position.txid > 0)


@pytest_twisted.ensureDeferred
async def test_410_disables_until_enabled_again(
    live: Store, reactor: IRelayReactor, receiver: Receiver
) -> None:
    receiver.status = 410
    metrics = RelayMetrics()
    service = await started(reactor, live, [hook(receiver.url)], metrics=metrics)
    try:
        await add_events(live, 5)
        await wait_for(reactor, lambda: receiver.posts, "the first POST")
        row = await wait_for_async(
            reactor,
            lambda: _row_if(live, receiver.url, state="disabled"),
            "the endpoint disabled",
        )
        assert row["disabled_reason"] == "410 Gone from the receiver"
        await add_events(live, 5)
        await _pause(reactor, 1.0)
        assert len(receiver.posts) == 1  # nothing after the 410
        # An operator enables it (`webhooks enable`, the UI): sending resumes.
        receiver.status = 200
        assert await live.set_webhook_state(receiver.url, "active") is True
        await wait_for(reactor, lambda: len(receiver.acknowledged()) == 10, "the events")
    finally:
        await service.stopService()
    assert metrics.webhook_posts.labels(endpoint=receiver.url, result="gone")._value.get() == 1


async def _pause(reactor: IRelayReactor, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds)


async def _failed(store: Store, url: str) -> dict[str, object] | None:
    row = await endpoint_row(store, url)
    return row if row is not None and int(str(row["failures"])) >= 1 else None


async def _row_if(store: Store, url: str, **expected: object) -> dict[str, object] | None:
    row = await endpoint_row(store, url)
    if row is not None and all(row[k] == v for k, v in expected.items()):
        return row
    return None


@pytest_twisted.ensureDeferred
async def test_down_past_retry_for_dead_letters_then_replay_delivers_exactly_those(
    live: Store, reactor: IRelayReactor, receiver: Receiver
) -> None:
    receiver.status = 503
    service = await started(reactor, live, [hook(receiver.url, retry_for=3.0)])
    try:
        await add_events(live, 6)
        await add_events(live, 3, "opened")
        lost = await all_ids(live)
        lost = lost[-9:]
        dead = await wait_for_async(
            reactor,
            lambda: sql(
                live,
                "SELECT id, events, attempts, last_error, first_event_at,"
                " last_event_at, after_id, upto_id FROM webhook_dead_letters",
            ),
            "a dead letter",
        )
        assert len(dead) == 1
        dead_id, count, attempts, error, first_at, last_at = dead[0][:6]
        assert count == 9 and int(str(attempts)) >= 2
        assert str(error).startswith("503 Service Unavailable: receiver says no")
        assert len(str(error)) <= 300
        assert first_at is not None and last_at is not None
        # The receiver is back; nothing new: the dead range is not sent by itself.
        receiver.status = 200
        await _pause(reactor, 1.0)
        assert receiver.acknowledged() == []
        # A replay asked for (`webhooks dead replay`, the UI).
        assert await live.request_replay(int(str(dead_id))) == 1
        await wait_for_async(
            reactor,
            lambda: _none_left(live),
            "the replayed dead letter deleted",
        )
        assert receiver.acknowledged() == lost
        # New events flow again, and the run of failures ended with the first success.
        await add_events(live, 2)
        await wait_for(reactor, lambda: len(receiver.acknowledged()) == 11, "new events")
        row = await endpoint_row(live, receiver.url)
        assert row is not None and row["failing_since"] is None and row["attempts"] == 0
    finally:
        await service.stopService()


async def _none_left(store: Store) -> bool:
    return not await sql(store, "SELECT id FROM webhook_dead_letters")


@pytest_twisted.ensureDeferred
async def test_a_failed_replay_stays_listed_with_its_error(
    live: Store, reactor: IRelayReactor, receiver: Receiver
) -> None:
    receiver.status = 500
    service = await started(reactor, live, [hook(receiver.url, retry_for=0.5)])
    try:
        await add_events(live, 4)
        rows = await wait_for_async(
            reactor, lambda: sql(live, "SELECT id, attempts FROM webhook_dead_letters"), "dead"
        )
        dead_id, attempts = rows[0]
        posts = len(receiver.posts)
        await sql(live, "UPDATE webhook_dead_letters SET replay_requested_at = 1, last_error = ''"
                  " WHERE id = ?", (dead_id,))  # fmt: skip
        after = await wait_for_async(
            reactor,
            lambda: sql(
                live,
                "SELECT attempts, last_error FROM webhook_dead_letters"
                " WHERE replay_requested_at IS NULL AND last_error <> ''",
            ),
            "the replay's failure noted",
        )
        assert after[0][0] == int(str(attempts)) + 1
        assert str(after[0][1]).startswith("500 Internal Server Error")
        assert len(receiver.posts) > posts
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_hanging_endpoint_does_not_delay_another(
    live: Store, reactor: IRelayReactor, receiver: Receiver
) -> None:
    stuck = Receiver(reactor)
    stuck.status = None  # accepts, reads, never answers
    stuck.start()
    service = await started(
        reactor, live, [hook(stuck.url, timeout=60.0), hook(receiver.url, timeout=60.0)]
    )
    try:
        await add_events(live, 5)
        await wait_for(reactor, lambda: stuck.posts, "the stuck endpoint's POST")
        t0 = reactor.seconds()
        await add_events(live, 5)
        await wait_for(reactor, lambda: len(receiver.acknowledged()) == 10, "the other's events",
                       within=10.0)  # fmt: skip
        assert reactor.seconds() - t0 < 5.0
        assert len(stuck.posts) == 1 and not stuck.acknowledged()
    finally:
        await service.stopService()  # cancels the stuck POST
        await stuck.stop()


@pytest_twisted.ensureDeferred
async def test_a_timed_out_post_is_a_failure_and_sent_again(
    live: Store, reactor: IRelayReactor, receiver: Receiver
) -> None:
    receiver.answers = []
    receiver.status = None
    service = await started(reactor, live, [hook(receiver.url, timeout=0.5)])
    try:
        await add_events(live, 3)
        await wait_for(reactor, lambda: receiver.posts, "a POST")
        row = await wait_for_async(
            reactor, lambda: _failed(live, receiver.url), "the failure noted"
        )
        assert row["last_error"] == "no answer within 0.5 s"
        receiver.status = 200
        await wait_for(reactor, lambda: len(receiver.acknowledged()) == 3, "the events")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_refused_connection_and_redirect_are_failures(
    live: Store, reactor: IRelayReactor, receiver: Receiver
) -> None:
    from tests.support.relay import free_ports

    [port] = free_ports(1)
    closed = f"http://127.0.0.1:{port}/hook"
    receiver.status = 302
    service = await started(reactor, live, [hook(closed), hook(receiver.url)])
    try:
        await add_events(live, 2)
        refused = await wait_for_async(
            reactor, lambda: _failed(live, closed), "the refused connection noted"
        )
        assert str(refused["last_error"]).startswith("cannot connect:")
        redirected = await wait_for_async(
            reactor, lambda: _failed(live, receiver.url), "the redirect noted"
        )
        assert str(redirected["last_error"]).startswith("302 Found")
        # The redirect was not followed: every POST went to the receiver's own url.
        assert {p.headers[":path"] for p in receiver.posts} == {"/hook"}
        assert all(p.status == 302 for p in receiver.posts)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_cancels_the_post_in_flight_and_it_is_sent_again(
    live: Store, reactor: IRelayReactor, receiver: Receiver
) -> None:
    receiver.status = None
    service = await started(reactor, live, [hook(receiver.url, timeout=60.0)])
    await add_events(live, 4)
    await wait_for(reactor, lambda: receiver.posts, "a POST in flight")
    t0 = reactor.seconds()
    await service.stopService()
    assert reactor.seconds() - t0 < 2.0
    receiver.status = 200
    again = await started(reactor, live, [hook(receiver.url)])
    try:
        await wait_for(reactor, lambda: len(receiver.acknowledged()) == 4, "the same events")
        assert receiver.acknowledged() == receiver.posts[0].ids
    finally:
        await again.stopService()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> object:
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest_twisted.ensureDeferred
async def test_two_nodes_on_one_postgresql_send_each_event_once_and_take_over(
    pg_url: str, reactor: IRelayReactor
) -> None:
    engines: list[IDatabaseEngine] = []
    for _ in range(2):
        engine = create_engine(reactor, pg_url)
        await engine.start()
        engines.append(engine)
    await migrate(engines[0], 0)
    a_store, b_store = Store(engines[0], reactor), Store(engines[1], reactor)
    one, two = Receiver(reactor), Receiver(reactor)
    one.start()
    two.start()
    webhooks = [hook(one.url), hook(two.url, events=("opened",))]
    a = await started(reactor, a_store, webhooks, node="node-a")
    b = await started(reactor, b_store, webhooks, node="node-b")

    async def recorded(events: int) -> None:
        """Until the nodes have recorded ``events`` acknowledged events: a receiver's 2xx is
        on record only once its node has read it, and a stop before that cancels the POST,
        whose batch is then sent again (at least once, by design: docs/webhooks.md)."""

        async def counted() -> bool:
            rows = await sql(a_store, "SELECT SUM(sent_events) FROM webhook_endpoints")
            return int(str(rows[0][0])) == events

        await wait_for_async(reactor, counted, f"{events} acknowledged events on record")

    try:
        for i in range(6):
            await add_events(a_store if i % 2 else b_store, 5)
            await add_events(a_store, 1, "opened")
            await _pause(reactor, 0.1)
        everything, opens = await all_ids(a_store), await all_ids(a_store, ("opened",))
        await wait_for(reactor, lambda: len(one.acknowledged()) == 36, "endpoint one's events")
        await wait_for(reactor, lambda: len(two.acknowledged()) == 6, "endpoint two's events")
        for r in (one, two):  # once each: no event in two POSTs
            ids = [i for p in r.posts for i in p.ids]
            assert len(ids) == len(set(ids))
        assert one.acknowledged() == everything and two.acknowledged() == opens
        owners = {
            str(r[0]) for r in await sql(a_store, "SELECT lease_owner FROM webhook_endpoints")
        }
        # The node holding the leases stops (cleanly): the other takes over at once.
        holder, other = (a, b) if owners == {"node-a"} else (b, a)
        assert owners in ({"node-a"}, {"node-b"}, {"node-a", "node-b"})
        await recorded(36 + 6)
        await holder.stopService()
        await add_events(a_store, 4)
        await add_events(a_store, 1, "opened")
        await wait_for(reactor, lambda: len(one.acknowledged()) == 41, "events after the stop")
        await wait_for(reactor, lambda: len(two.acknowledged()) == 7, "the open after the stop")
        await recorded(41 + 7)
        # A node that vanished (its lease not released) is taken over once its lease expires.
        await other.stopService()
        await sql(a_store, "UPDATE webhook_endpoints SET lease_owner = 'vanished',"
                  " lease_until = ?", (to_ms(reactor.seconds() + 1.5),))  # fmt: skip
        c = await started(reactor, a_store, webhooks, node="node-c")
        try:
            await add_events(a_store, 3)
            await _pause(reactor, 0.8)
            assert len(one.acknowledged()) == 41  # the lease still held by "vanished"
            await wait_for(reactor, lambda: len(one.acknowledged()) == 44, "after the expiry")
        finally:
            await c.stopService()
        ids = [i for p in one.posts for i in p.ids]
        assert len(ids) == len(set(ids)) and one.acknowledged() == await all_ids(a_store)
    finally:
        for service in (a, b):
            if service.running:
                await service.stopService()
        await one.stop()
        await two.stop()
        for engine in engines:
            await engine.close()


@pytest_twisted.ensureDeferred
async def test_a_stop_before_the_store_opens_does_not_wait_for_it(reactor: IRelayReactor) -> None:
    """The storage stops after the webhooks (and only then fails its waiters)."""
    never: Deferred[Store] = Deferred()
    service = WebhookService(
        reactor, lambda: never, [hook("http://127.0.0.1:9/")], "n", RelayMetrics(), FAST
    )
    service.startService()
    t0 = reactor.seconds()
    stopped = service.stopService()
    stopped.addTimeout(5, reactor)
    await stopped
    assert reactor.seconds() - t0 < 2.0
    never.errback(RuntimeError("storage is shut down"))
