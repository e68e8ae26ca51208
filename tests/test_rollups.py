"""The hourly roll-ups (storage/rollups.py) and the service that runs them
(retention/rollup.py), on both engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

from smartrelay.events import (
    BouncedEvent,
    ClickedEvent,
    ComplainedEvent,
    DeferredEvent,
    DeliveredEvent,
    EventData,
    OpenedEvent,
)
from smartrelay.relay import RelayService
from smartrelay.retention.rollup import ROLLUP_LAG, RollupService
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.rollups import Totals
from smartrelay.storage.store import (
    ClaimedRecipient,
    NewMessage,
    RecipientOutcome,
    RecipientRef,
    Store,
    insert_events,
    to_ms,
)
from tests.conftest import real_reactor
from tests.support.relay import Relays, free_ports, relay_config

HOUR = 3600.0
#: The clock fixture's time, 1_700_000_000, is 800 s into its hour.
H0 = 1_699_999_200.0
H1 = H0 + HOUR


def outcome(
    c: ClaimedRecipient, state: str, *events: EventData, retry: float | None = None
) -> RecipientOutcome:
    return RecipientOutcome(c.id, c.queue_id, c.address, state, 1, retry, "reply", events)


def delivered(c: ClaimedRecipient) -> RecipientOutcome:
    return outcome(c, "delivered", DeliveredEvent("mx.example", "250 ok", True, 1))


def bounced(c: ClaimedRecipient, category: str, hard: bool) -> RecipientOutcome:
    return outcome(c, "bounced", BouncedEvent(category, hard, "5.1.1", "550 no", "smtp"))


def opened(machine: bool) -> OpenedEvent:
    return OpenedEvent("Mozilla/5.0 (machine)" if machine else "Mozilla/5.0", "192.0.2.1", machine)


def clicked() -> ClickedEvent:
    return ClickedEvent("Mozilla/5.0", "192.0.2.1", False, "https://shop.example/x")


async def make_traffic(store: Store, clock: Clock) -> int:
    """A realistic mix over two hours; returns the number of events written.

    Hour H0: m1 (App@Example.COM, tags welcome and promo) to a@Gmail.com (delivered) and
    b@yahoo.com (hard bounce); m2 (news@shop.example, no tags) to c@gmail.com (deferred) and
    d@Outlook.com (delivered). Hour H1: c soft-bounces; a opens twice as a human and once by
    a machine and clicks twice; d opens once by a machine, then twice as a human; a complaint
    arrives for a message whose row is gone.
    """
    assert clock.seconds() == H0 + 800
    m1 = await store.queue_message(
        NewMessage(
            sender="App@Example.COM",
            recipients=("a@Gmail.com", "b@yahoo.com"),
            raw=b"Subject: one\r\n\r\nx\r\n",
            tags=("welcome", "promo"),
        )
    )
    m2 = await store.queue_message(
        NewMessage(
            sender="news@shop.example",
            recipients=("c@gmail.com", "d@Outlook.com"),
            raw=b"Subject: two\r\n\r\ny\r\n",
        )
    )
    claimed = {c.address: c for c in await store.claim_due("n", limit=10, lease=60)}
    retry_at = clock.seconds() + 1800
    deferred = DeferredEvent("mx.gmail", "451 later", 1, "2023-11-14T23:00:00Z")
    await store.record_outcomes(
        "n",
        [
            delivered(claimed["a@Gmail.com"]),
            bounced(claimed["b@yahoo.com"], "invalid-recipient", hard=True),
            outcome(claimed["c@gmail.com"], "deferred", deferred, retry=retry_at),
            delivered(claimed["d@Outlook.com"]),
        ],
    )
    clock.advance(H1 + 200 - clock.seconds())
    (c_again,) = await store.claim_due("n", limit=10, lease=60)
    await store.record_outcomes("n", [bounced(c_again, "mailbox-full", hard=False)])
    a = RecipientRef(claimed["a@Gmail.com"].id, m1.queue_id, "a@Gmail.com", "App@Example.COM")
    d = RecipientRef(claimed["d@Outlook.com"].id, m2.queue_id, "d@Outlook.com", "x")
    engagements: list[tuple[RecipientRef, OpenedEvent | ClickedEvent]] = [
        (a, opened(machine=False)),
        (d, opened(machine=True)),
        (a, opened(machine=True)),
        (a, clicked()),
        (d, opened(machine=False)),
        (a, opened(machine=False)),
        (d, opened(machine=False)),
        (a, clicked()),
    ]
    for ref, event in engagements:
        clock.advance(1)
        await store.record_engagement(ref, event)

    async def orphan(cursor: ICursor) -> None:
        complaint = ComplainedEvent("abuse", "fbl.hotmail.example")
        await insert_events(
            cursor, store.now_ms(), [("0000000000000000", "x@Hotmail.COM", complaint)]
        )

    await store.engine.run_interaction("orphan", orphan)
    return 4 + 4 + 1 + 8 + 1


#: Every event (tag '*'), the whole time.
ALL: Totals = {
    ("received", ""): (4, 0),
    ("delivered", ""): (2, 0),
    ("deferred", ""): (1, 0),
    ("bounced", "invalid-recipient:hard"): (1, 0),
    ("bounced", "mailbox-full:soft"): (1, 0),
    ("opened", "human"): (4, 2),
    ("opened", "machine"): (2, 0),
    ("clicked", "human"): (2, 1),
    ("complained", ""): (1, 0),
}
#: The events of m1 (a and b), under either of its tags or its sender domain.
M1: Totals = {
    ("received", ""): (2, 0),
    ("delivered", ""): (1, 0),
    ("bounced", "invalid-recipient:hard"): (1, 0),
    ("opened", "human"): (2, 1),
    ("opened", "machine"): (1, 0),
    ("clicked", "human"): (2, 1),
}


async def rollup_rows(engine: IDatabaseEngine) -> list[tuple[Any, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute(
            "SELECT hour, tag, sender_domain, recipient_domain, type, detail, count,"
            " unique_count FROM rollups"
            " ORDER BY hour, tag, sender_domain, recipient_domain, type, detail"
        )
        return [tuple(r) for r in cursor.fetchall()]

    return await engine.run_interaction("rows", txn, readonly=True)


async def forget_rollups(engine: IDatabaseEngine) -> None:
    async def txn(cursor: ICursor) -> None:
        await cursor.execute("DELETE FROM rollups")
        await cursor.execute("DELETE FROM rollup_progress")

    await engine.run_interaction("forget", txn)


async def roll_up_all(store: Store, horizon: float, limit: int) -> int:
    """roll_up until a batch comes back short; the events counted."""
    total = 0
    while True:
        counted = await store.roll_up(horizon, limit)
        total += counted
        if counted < limit:
            return total


@pytest_twisted.ensureDeferred
async def test_counts_by_type_detail_tag_and_domains(store: Store, clock: Clock) -> None:
    written = await make_traffic(store, clock)
    assert await store.rollup_position() is None
    assert await store.roll_up(clock.seconds() + 1, 5000) == written == 18
    assert await store.rollup_position() == clock.seconds() + 1

    assert await store.rollup_totals(H0, H1 + HOUR) == ALL
    assert await store.rollup_totals(H0, H1 + HOUR, tag="welcome") == M1
    assert await store.rollup_totals(H0, H1 + HOUR, tag="promo") == M1
    assert await store.rollup_totals(H0, H1 + HOUR, sender_domain="EXAMPLE.com") == M1
    assert await store.rollup_totals(H0, H1 + HOUR, tag="nope") == {}
    assert await store.rollup_totals(H0, H1 + HOUR, sender_domain="shop.example") == {
        ("received", ""): (2, 0),
        ("delivered", ""): (1, 0),
        ("deferred", ""): (1, 0),
        ("bounced", "mailbox-full:soft"): (1, 0),
        ("opened", "human"): (2, 1),
        ("opened", "machine"): (1, 0),
    }
    # Recipient domains lower-cased: a@Gmail.com and c@gmail.com.
    assert await store.rollup_totals(H0, H1 + HOUR, recipient_domain="gmail.com") == {
        ("received", ""): (2, 0),
        ("delivered", ""): (1, 0),
        ("deferred", ""): (1, 0),
        ("bounced", "mailbox-full:soft"): (1, 0),
        ("opened", "human"): (2, 1),
        ("opened", "machine"): (1, 0),
        ("clicked", "human"): (2, 1),
    }
    assert await store.rollup_totals(
        H0, H1 + HOUR, tag="welcome", recipient_domain="yahoo.com"
    ) == {("received", ""): (1, 0), ("bounced", "invalid-recipient:hard"): (1, 0)}
    # The event of a message whose row is gone: no sender domain, only the '*' rows.
    assert await store.rollup_totals(H0, H1 + HOUR, sender_domain="") == {
        ("complained", ""): (1, 0)
    }
    assert await store.rollup_totals(H0, H1 + HOUR, recipient_domain="hotmail.com") == {
        ("complained", ""): (1, 0)
    }

    first_hour = {
        ("received", ""): (4, 0),
        ("delivered", ""): (2, 0),
        ("deferred", ""): (1, 0),
        ("bounced", "invalid-recipient:hard"): (1, 0),
    }
    assert await store.rollup_totals(H0, H1) == first_hour
    series = await store.rollup_series(H0, H1 + HOUR)
    assert list(series) == [H0, H1]
    assert series[H0] == first_hour
    assert series[H1] == {
        ("bounced", "mailbox-full:soft"): (1, 0),
        ("opened", "human"): (4, 2),
        ("opened", "machine"): (2, 0),
        ("clicked", "human"): (2, 1),
        ("complained", ""): (1, 0),
    }
    assert await store.rollup_totals(H1, H1 + HOUR) == series[H1]
    assert (await store.rollup_series(H0, H1 + HOUR, tag="welcome"))[H0] == {
        ("received", ""): (2, 0),
        ("delivered", ""): (1, 0),
        ("bounced", "invalid-recipient:hard"): (1, 0),
    }


@pytest_twisted.ensureDeferred
async def test_running_again_counts_nothing_twice(
    store: Store, clock: Clock, engine: IDatabaseEngine
) -> None:
    await make_traffic(store, clock)
    assert await store.roll_up(clock.seconds() + 1, 5000) == 18
    rows = await rollup_rows(engine)
    assert await store.roll_up(clock.seconds() + 1, 5000) == 0
    assert await store.roll_up(clock.seconds() + 100, 5000) == 0
    assert await rollup_rows(engine) == rows
    assert await store.rollup_totals(H0, H1 + HOUR) == ALL
    # A later open is counted once, and is not unique (a opened as a human before).
    clock.advance(200)
    ref = RecipientRef(1, (await first_queue_id(engine)), "a@Gmail.com", "App@Example.COM")
    await store.record_engagement(ref, opened(machine=False))
    assert await store.roll_up(clock.seconds() + 1, 5000) == 1
    totals = await store.rollup_totals(H0, H1 + HOUR)
    assert totals == ALL | {("opened", "human"): (5, 2)}


async def first_queue_id(engine: IDatabaseEngine) -> str:
    async def txn(cursor: ICursor) -> str:
        await cursor.execute("SELECT queue_id FROM messages WHERE sender = 'App@Example.COM'")
        row = cursor.fetchone()
        assert row is not None
        return str(row[0])

    return await engine.run_interaction("queue_id", txn, readonly=True)


@pytest_twisted.ensureDeferred
async def test_small_batches_give_the_rows_of_one_batch(
    store: Store, clock: Clock, engine: IDatabaseEngine
) -> None:
    """Unique opens and clicks split across batches (limit 1: every event its own batch) are
    decided from the events counted before, as within one batch."""
    await make_traffic(store, clock)
    horizon = clock.seconds() + 1
    assert await store.roll_up(horizon, 5000) == 18
    whole = await rollup_rows(engine)
    assert len(whole) == 29
    for limit in (1, 2, 5, 7):
        await forget_rollups(engine)
        assert await roll_up_all(store, horizon, limit) == 18
        assert await rollup_rows(engine) == whole, limit


@pytest_twisted.ensureDeferred
async def test_events_at_or_after_the_horizon_wait_for_it(
    store: Store, clock: Clock, engine: IDatabaseEngine
) -> None:
    t = clock.seconds()
    await store.record_engagement(RecipientRef(1, "q1", "a@x.example", "s"), opened(False))
    assert await store.roll_up(t, 5000) == 0  # time < horizon, strictly
    assert await store.rollup_position() == t
    assert await rollup_rows(engine) == []
    clock.advance(5)
    await store.record_engagement(RecipientRef(1, "q1", "a@x.example", "s"), opened(False))
    assert await store.roll_up(t + 0.001, 5000) == 1
    assert await store.rollup_position() == t + 0.001
    assert await store.rollup_totals(H0, H1) == {("opened", "human"): (1, 1)}
    # A node whose clock is behind never moves the position back (nor counts again).
    assert await store.roll_up(t - 100, 5000) == 0
    assert await store.rollup_position() == t + 0.001
    assert await store.roll_up(t + 5.001, 5000) == 1
    assert await store.rollup_totals(H0, H1) == {("opened", "human"): (2, 1)}
    assert await store.rollup_position() == t + 5.001
    with pytest.raises(ValueError, match="limit"):
        await store.roll_up(t + 10, 0)


@pytest_twisted.ensureDeferred
async def test_concurrent_roll_ups_count_each_event_once(
    database_url: str, engine: IDatabaseEngine, clock: Clock
) -> None:
    """Two stores on two engines (two nodes) rolling up one database at the same time."""
    events = 3000

    async def write(cursor: ICursor) -> None:
        base = to_ms(H0)
        for start in range(0, events, 500):
            for i in range(start, start + 500):
                await insert_events(
                    cursor,
                    base + i * 2000,
                    [(f"q{i % 97:015d}", f"r{i}@d{i % 7}.example", opened(i % 3 == 0))],
                )

    await engine.run_interaction("write", write)
    other_engine = create_engine(real_reactor(), database_url)
    await other_engine.start()
    try:
        one, two = Store(engine, clock), Store(other_engine, clock)
        horizon = H0 + events * 2 + 1
        counted = await gatherResults(
            [
                ensureDeferred(roll_up_all(one, horizon, 40)),
                ensureDeferred(roll_up_all(two, horizon, 40)),
                ensureDeferred(roll_up_all(one, horizon, 40)),
                ensureDeferred(roll_up_all(two, horizon, 40)),
            ]
        )
        assert sum(counted) == events
        totals = await one.rollup_totals(H0, H0 + 3 * HOUR)
        assert totals[("opened", "machine")][0] + totals[("opened", "human")][0] == events
        assert totals[("opened", "machine")] == (events // 3, 0)
        assert await one.rollup_position() == horizon
    finally:
        await other_engine.close()


# -- the service ---------------------------------------------------------------------------


class Flaky(Store):
    """A store whose roll_up fails with the given errors first."""

    def __init__(self, engine: IDatabaseEngine, clock: Clock, *errors: Exception) -> None:
        super().__init__(engine, clock)
        self.errors = list(errors)
        self.calls: list[float] = []

    async def roll_up(self, horizon: float, limit: int) -> int:
        self.calls.append(horizon)
        if self.errors:
            raise self.errors.pop(0)
        return await super().roll_up(horizon, limit)


@implementer(ILogObserver)
class Recorder:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    recorder = Recorder()
    globalLogPublisher.addObserver(recorder)
    yield recorder.events
    globalLogPublisher.removeObserver(recorder)


async def run_due(service: RollupService, clock: Clock) -> None:
    """Run the passes due now (a full batch schedules the next one at once)."""
    for _ in range(1000):
        clock.advance(0)
        await service.idle()
        if not any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
            return
    raise AssertionError("the roll-up never caught up")


@pytest_twisted.ensureDeferred
async def test_service_runs_passes_on_its_clock(store: Store, clock: Clock) -> None:
    written = await make_traffic(store, clock)
    service = RollupService(clock, store, interval=10, batch=5)
    service.startService()
    try:
        # The first pass runs at start. Only H0's 8 events are older than the lag: a full
        # batch of 5, then at once the next, 3.
        await run_due(service, clock)
        assert (service.passes, service.counted) == (2, 8)
        assert [call.getTime() for call in clock.getDelayedCalls()] == [clock.seconds() + 10]
        for _ in range(7):  # 70 s later, H1's events are older than the lag too
            clock.advance(10)
            await run_due(service, clock)
        assert service.counted == written
        assert await store.rollup_totals(H0, H1 + HOUR) == ALL
        passes = service.passes
        clock.advance(10)
        await run_due(service, clock)
        assert (service.passes, service.counted) == (passes + 1, written)
    finally:
        await service.stopService()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_service_keeps_going_after_errors(
    engine: IDatabaseEngine, clock: Clock, logged: list[LogEvent]
) -> None:
    store = Flaky(
        engine,
        clock,
        DatabaseUnavailable("connection refused"),
        DatabaseUnavailable("connection refused"),
        RuntimeError("boom"),
    )
    await store.record_engagement(RecipientRef(1, "q1", "a@x.example", "s"), opened(False))
    clock.advance(ROLLUP_LAG + 1)
    service = RollupService(clock, store, interval=10)
    service.startService()
    try:
        for _ in range(3):
            await run_due(service, clock)
            clock.advance(10)
        await run_due(service, clock)
        assert len(store.calls) == 4 and service.counted == 1
        assert await store.rollup_totals(H0, H1) == {("opened", "human"): (1, 1)}
    finally:
        await service.stopService()
    ours = [e for e in logged if e.get("log_namespace") == "smartrelay.retention.rollup"]
    texts = [str(e.get("log_format", "")) for e in ours]
    assert sum("database unavailable" in t for t in texts) == 1  # once per outage
    assert any("pass failed" in t for t in texts)
    failures = [e["log_failure"] for e in ours if "log_failure" in e]
    assert any(f.check(RuntimeError) for f in failures)
    assert any("working again" in t for t in texts)


class Slow(Store):
    """A store whose roll_up takes ``took`` seconds of the clock."""

    def __init__(self, engine: IDatabaseEngine, clock: Clock, took: float) -> None:
        super().__init__(engine, clock)
        self.test_clock = clock
        self.took = took

    async def roll_up(self, horizon: float, limit: int) -> int:
        counted = await super().roll_up(horizon, limit)
        self.test_clock.advance(self.took)
        return counted


@pytest_twisted.ensureDeferred
async def test_service_reports_each_pass_time(
    engine: IDatabaseEngine, clock: Clock, logged: list[LogEvent]
) -> None:
    """Each pass's events and duration are logged (debug) and summed in ``busy``: what
    bench/relay.py --rollup-cost reads."""
    store = Slow(engine, clock, 0.25)
    await store.record_engagement(RecipientRef(1, "q1", "a@x.example", "s"), opened(False))
    clock.advance(ROLLUP_LAG + 1)
    service = RollupService(clock, store, interval=10)
    service.startService()
    try:
        await run_due(service, clock)
        clock.advance(10)
        await run_due(service, clock)
    finally:
        await service.stopService()
    assert service.passes == 2 and service.busy == pytest.approx(0.5)
    passes = [
        e
        for e in logged
        if e.get("log_namespace") == "smartrelay.retention.rollup"
        and "roll-up pass" in str(e.get("log_format", ""))
    ]
    # The second pass counted nothing: no line (an idle relay's log stays quiet).
    assert [(e["counted"], e["took"], e["log_level"].name) for e in passes] == [
        (1, pytest.approx(0.25), "debug"),
    ]
    # The line bench/relay.py --rollup-cost parses (its _ROLLUP_PASS).
    assert formatEvent(passes[0]) == "roll-up pass: 1 events in 0.2500 s"


class Waiting(Store):
    """A store whose roll_up waits for the test."""

    def __init__(self, engine: IDatabaseEngine, clock: Clock) -> None:
        super().__init__(engine, clock)
        self.release: Deferred[None] = Deferred()
        self.calls = 0

    async def roll_up(self, horizon: float, limit: int) -> int:
        self.calls += 1
        await self.release
        return 0


@pytest_twisted.ensureDeferred
async def test_one_pass_at_a_time_and_stop_waits_for_it(
    engine: IDatabaseEngine, clock: Clock
) -> None:
    store = Waiting(engine, clock)
    ready: Deferred[Store] = Deferred()
    service = RollupService(clock, lambda: ready, interval=10)
    service.startService()
    clock.advance(100)
    assert store.calls == 0  # no store yet
    ready.callback(store)
    clock.advance(0)
    assert store.calls == 1
    clock.advance(100)  # the pass is still under way: no second one
    assert store.calls == 1
    stopped = service.stopService()
    assert not stopped.called
    store.release.callback(None)
    assert stopped.called
    clock.advance(100)
    assert store.calls == 1 and clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_stop_does_not_wait_for_a_store_that_never_opens(clock: Clock) -> None:
    service = RollupService(clock, lambda: Deferred(), interval=10)
    service.startService()
    clock.advance(100)
    stopped = service.stopService()
    assert stopped.called


@pytest_twisted.ensureDeferred
async def test_the_relay_runs_the_roll_up_in_its_main_process_only(
    tmp_path: Path, database_url: str
) -> None:
    relays = Relays(real_reactor(), tmp_path, database_url)
    try:
        relay = await relays.start()
        assert relay.service.rollup is not None and relay.service.rollup.running
        # Its first pass runs at start: the position is set (to now - ROLLUP_LAG).
        for _ in range(600):  # up to 30 s on a loaded machine
            if await relay.store.rollup_position() is not None:
                break
            await deferLater(0.05)
        position = await relay.store.rollup_position()
        assert position is not None and position <= real_reactor().seconds() - ROLLUP_LAG
    finally:
        await relays.stop_all()
    smtp_port, inbound_port, unused = free_ports(3)
    config = relay_config(tmp_path / "d", database_url, smtp_port, inbound_port, unused)
    config = attrs.evolve(config, delivery=attrs.evolve(config.delivery, processes=1))
    assert RelayService(config, real_reactor(), role="all").rollup is not None
    delivery = RelayService(config, real_reactor(), role="delivery")
    assert delivery.rollup is None
    with pytest.raises(KeyError):
        delivery.getServiceNamed("rollup")  # type: ignore[no-untyped-call]


def deferLater(seconds: float) -> Deferred[None]:
    return task.deferLater(real_reactor(), seconds, lambda: None)
