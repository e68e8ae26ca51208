"""The delivery manager on a ``task.Clock``: a fake connector, a real store (SQLite), no real
time. Every timer the manager sets (retries, expiry, the 421 back-off, claim spacing, the poll)
runs on the test's clock, which the test moves from one timer to the next; the database's
answers come from the real reactor, and the test waits for them (see :class:`Simulation`)."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater

from smartrelay.config import parse_config
from smartrelay.delivery.client import ServerReply
from smartrelay.delivery.manager import DeliveryManager, DeliveryTunables
from smartrelay.delivery.mx import MxResolver
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.store import NewMessage, Store
from smartrelay.timefmt import rfc3339
from tests.conftest import real_reactor
from tests.support.delivery_relay import FAST_THROTTLE, events, recipient_states, select
from tests.support.manager import RETURN_PATH, FakeConnector, Sent, chain_factory
from tests.test_mx import FixtureResolver


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: what is tested here is the manager's timing, not the engine."""
    return f"sqlite:{tmp_path / 'smartrelay.db'}"


#: No timer but the ones a test is about: the safety-net poll is an hour away, and the
#: store's batched transactions start at once (they run on the real reactor, the manager's
#: gather timer would be on the test's clock).
QUIET = DeliveryTunables(poll_interval=3600.0, batch_gather=0.0)
TRY_LATER = ServerReply(451, "4.3.0 try later")
OK = ServerReply(250, "2.0.0 Ok")


class NoJitter(random.Random):
    """Retries exactly at the schedule's steps."""

    def uniform(self, a: float, b: float) -> float:
        return 0.0


def message(subject: str = "hello", size: int = 0) -> bytes:
    body = b"Hello.\r\n" + b"x" * max(0, size - 80) + b"\r\n"
    head = f"From: <app@example.com>\r\nTo: <r@example.net>\r\nSubject: {subject}\r\n\r\n"
    return head.encode() + body


class Simulation:
    """A manager on ``clock`` over ``store``, and the means to run it from timer to timer.

    The store's calls are counted while they run: the manager is *settled* when none is
    under way for a few turns of the real reactor; what happens next is then up to the clock.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        tmp_path: Path,
        connector: FakeConnector,
        tunables: DeliveryTunables = QUIET,
        spare: bool = False,
        **delivery: Any,
    ) -> None:
        self.store = store
        self.clock = clock
        self.connector = connector
        self.in_flight = 0
        self.claims: list[float] = []
        config = parse_config(
            {
                "delivery": {
                    "routes": {"*": "smtp://127.0.0.1:2525"},
                    "throttle": [FAST_THROTTLE],
                    **delivery,
                }
            }
        ).delivery
        for name in (
            "claim_due_with_sizes",
            "load_for_delivery",
            "record_outcomes_of",
            "hand_back",
        ):
            setattr(store, name, self._counted(name, getattr(store, name)))
        self.manager = DeliveryManager(
            clock,
            config,
            lambda: succeed(store),
            MxResolver(FixtureResolver({}), real_reactor()),
            connector,
            chain_factory(tmp_path),
            tunables=tunables,
            rng=NoJitter(),
            spare=spare,
        )

    def _counted(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            if name == "claim_due_with_sizes":
                self.claims.append(self.clock.seconds())
            self.in_flight += 1
            try:
                return await method(*args, **kwargs)
            finally:
                self.in_flight -= 1

        return counted

    async def settle(self) -> None:
        """Wait (in real time) until no store call has been under way for a while."""
        reactor = real_reactor()
        deadline = time.monotonic() + 20
        calm = 0
        while calm < 3:
            assert time.monotonic() < deadline, "the manager never settled"
            await deferLater(reactor, 0.005, lambda: None)
            calm = calm + 1 if self.in_flight == 0 else 0

    async def start(self) -> None:
        self.manager.startService()
        while not self.claims:
            await self.settle()
        await self.settle()

    def next_timer(self) -> float | None:
        times = [call.getTime() for call in self.clock.getDelayedCalls() if call.active()]
        return min(times) if times else None

    async def step(self) -> float:
        """Move the clock to the next timer and let what it starts settle; the new time."""
        await self.settle()
        when = self.next_timer()
        assert when is not None, "no timer left"
        self.clock.advance(max(0.0, when - self.clock.seconds()))
        await self.settle()
        return self.clock.seconds()

    async def run_until(self, done: Callable[[], bool], before: float) -> None:
        """Step from timer to timer until ``done()``; fail if the clock would pass ``before``."""
        await self.settle()  # what the test started runs before any timer
        while not done():
            when = self.next_timer()
            assert when is not None and when < before, (
                f"not done at {self.clock.seconds()}; next timer {when}, limit {before}"
            )
            await self.step()

    async def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` on, timer by timer."""
        end = self.clock.seconds() + seconds
        await self.settle()
        while (when := self.next_timer()) is not None and when <= end:
            await self.step()
        self.clock.advance(end - self.clock.seconds())
        await self.settle()

    async def run_until_idle(self, within: float) -> None:
        """Start, run until nothing claimed is left in memory (within ``within`` seconds of
        the clock), stop."""
        await self.start()
        try:
            await self.run_until(
                lambda: self.manager._in_memory == 0, before=self.clock.seconds() + within
            )
        finally:
            await self.stop()

    async def stop(self) -> None:
        stopping: Deferred[None] = self.manager.stopService()
        while not stopping.called:
            if self.next_timer() is None:
                await self.settle()
            else:
                await self.step()


async def queue(store: Store, *recipients: str, data: bytes | None = None) -> str:
    queued = await store.queue_message(
        NewMessage("app@example.com", recipients or ("r@example.net",), data or message())
    )
    return queued.queue_id


# -- deferral and retry at the scheduled times ----------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_deferred_recipient_is_retried_at_each_step_of_the_schedule(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    connector = FakeConnector(clock, answers=[TRY_LATER, TRY_LATER, TRY_LATER])
    sim = Simulation(store, clock, tmp_path, connector, retry_schedule=["1m", "5m", "15m"])
    t0 = clock.seconds()
    queue_id = await queue(store)
    await sim.start()
    try:
        assert [s.at for s in connector.sent] == [t0]
        # Nothing happens before the first step is over...
        await sim.advance(59.9)
        assert len(connector.sent) == 1
        assert await recipient_states(store) == {"r@example.net": "deferred"}
        # ...and each retry comes at its step (the timer rounds up by 10 ms at most).
        await sim.run_until(lambda: len(connector.sent) == 4, before=t0 + 3600)
    finally:
        await sim.stop()
    times = [s.at - t0 for s in connector.sent]
    expected = [0.0, 60.0, 360.0, 1260.0]
    assert all(e <= t <= e + 0.05 for t, e in zip(times, expected, strict=True)), times
    deferred = await events(store, "deferred", queue_id)
    assert [e.data["attempt"] for e in deferred] == [1, 2, 3]
    nexts = [e.data["next_attempt"] for e in deferred]
    assert nexts == [
        rfc3339(sent.at + step)
        for sent, step in zip(connector.sent[:3], (60, 300, 900), strict=True)
    ]
    [delivered] = await events(store, "delivered", queue_id)
    assert delivered.data["attempt"] == 4
    assert await recipient_states(store) == {"r@example.net": "delivered"}


@pytest_twisted.ensureDeferred
async def test_a_retry_hint_in_the_reply_sets_the_next_attempt(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    hinted = ServerReply(450, "4.2.0 greylisted, try again in 7 minutes")
    connector = FakeConnector(clock, answers=[hinted])
    sim = Simulation(store, clock, tmp_path, connector, retry_schedule=["1m"])
    t0 = clock.seconds()
    await queue(store)
    await sim.start()
    try:
        await sim.advance(7 * 60 - 1)
        assert len(connector.sent) == 1  # not at the schedule's 1 minute
        await sim.run_until(lambda: len(connector.sent) == 2, before=t0 + 7 * 60 + 1)
    finally:
        await sim.stop()
    assert await recipient_states(store) == {"r@example.net": "delivered"}


# -- expiry at max_age ----------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_the_last_attempt_is_made_at_max_age_then_the_recipient_expires(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    connector = FakeConnector(clock, default=TRY_LATER)
    sim = Simulation(store, clock, tmp_path, connector, retry_schedule=["1m"], max_age="210s")
    t0 = clock.seconds()
    queue_id = await queue(store)
    await sim.start()
    try:
        await sim.run_until(
            lambda: sim.manager._in_memory == 0 and len(connector.sent) == 5, before=t0 + 3600
        )
        await sim.advance(3600)  # and nothing after it
    finally:
        await sim.stop()
    times = [s.at - t0 for s in connector.sent]
    # Every minute, then once more at the deadline (not given up before it), then never.
    expected = [0.0, 60.0, 120.0, 180.0, 210.0]
    assert all(e <= t <= e + 0.05 for t, e in zip(times, expected, strict=True)), times
    assert await recipient_states(store) == {"r@example.net": "expired"}
    [expired] = await events(store, "expired", queue_id)
    assert expired.data == {"attempts": 5}
    [bounced] = await events(store, "bounced", queue_id)
    assert bounced.data["category"] == "expired" and bounced.data["status"] == "4.4.7"
    assert len(await events(store, "deferred", queue_id)) == 4


# -- the 421 back-off -----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["greeting", "transaction"])
@pytest_twisted.ensureDeferred
async def test_a_421_backs_the_destination_off(
    store: Store, clock: Clock, tmp_path: Path, where: str
) -> None:
    """A 421 (refusing the session, or in a transaction) keeps the destination's workers away
    for ``backoff_on_421``, although its recipients come due again after 10 seconds."""
    busy = ServerReply(421, "4.3.2 too busy")
    connector = FakeConnector(clock)
    if where == "greeting":
        connector.refusals.append(busy)
    else:
        connector.answers.append(busy)
    tunables = evolve(QUIET, backoff_on_421=100.0)
    sim = Simulation(store, clock, tmp_path, connector, tunables, retry_schedule=["10s"])
    t0 = clock.seconds()
    await queue(store)
    await sim.start()
    try:
        await sim.advance(99)
        # Claimed again when due (at 10 s), but not sent before the back-off is over.
        assert len(sim.claims) >= 2 and sim.claims[1] - t0 <= 10.1
        assert len(connector.dials) == 1
        await sim.run_until(lambda: len(connector.dials) == 2, before=t0 + 101)
        await sim.run_until(lambda: sim.manager._in_memory == 0, before=t0 + 101)
    finally:
        await sim.stop()
    assert [round(t - t0) for t in connector.dials] == [0, 100]
    assert await recipient_states(store) == {"r@example.net": "delivered"}


@pytest_twisted.ensureDeferred
async def test_a_refused_session_is_the_answer_for_every_job_queued_for_it(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    connector = FakeConnector(clock, refusals=[ServerReply(554, "5.7.1 go away")])
    sim = Simulation(
        store, clock, tmp_path, connector, throttle=[{**FAST_THROTTLE, "max_connections": 1}]
    )
    for i in range(3):
        await queue(store, f"r{i}@example.net")
    await sim.run_until_idle(within=10)
    assert len(connector.dials) == 1 and connector.sent == []
    assert set((await recipient_states(store)).values()) == {"bounced"}


# -- what a throttle holds goes back to the database ----------------------------------------------
async def held_back_rows(store: Store) -> list[tuple[str, float]]:
    """(address, due time) of the rows handed back: waiting, no lease owner."""
    rows = await select(
        store,
        "SELECT address, next_attempt_at FROM recipients"
        " WHERE state IN ('queued', 'deferred') AND lease_owner IS NULL ORDER BY id",
    )
    return [(str(a), int(t) / 1000) for a, t in rows]


async def slow_backlog(
    store: Store, clock: Clock, tmp_path: Path, connector: FakeConnector, count: int = 30
) -> tuple[Simulation, list[str]]:
    """A destination throttled to 1 message a second, ``count`` recipients queued for it."""
    slow = [{**FAST_THROTTLE, "max_connections": 1, "max_rate": "1/s"}]
    sim = Simulation(
        store, clock, tmp_path, connector, DeliveryTunables(batch_gather=0.0), throttle=slow
    )
    everyone = [f"r{i}@example.net" for i in range(count)]
    for address in everyone:
        await queue(store, address)
    return sim, everyone


async def assert_each_delivered_once(
    store: Store, sent: Sequence[Sent], everyone: list[str]
) -> None:
    recipients = [r for s in sent for r in s.recipients]
    assert sorted(recipients) == sorted(everyone), "lost or sent twice"
    assert set((await recipient_states(store)).values()) == {"delivered"}


@pytest_twisted.ensureDeferred
async def test_a_throttled_backlog_waits_in_the_database_and_is_delivered_once_at_its_rate(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    """1 message a second: what would wait more than ``throttle_hold`` (10 s) goes back to the
    database due 5 s before its turn, found again by the 5-second poll; every recipient is
    sent exactly once, and the throttle's rate is kept (30 messages in about 30 s)."""
    connector = FakeConnector(clock)
    sim, everyone = await slow_backlog(store, clock, tmp_path, connector)
    t0 = clock.seconds()
    await sim.start()
    try:
        held = await held_back_rows(store)
        assert 15 <= len(held) <= 20, held
        assert sim.manager._in_memory + len(held) + len(connector.sent) == 30
        # Due 5 s before its turn, one a second, the first of them 6-ish s from now.
        dues = [at - t0 for _, at in held]
        assert dues == sorted(dues) and 4 <= dues[0] <= 8 and dues[-1] <= 30, dues
        await sim.run_until(lambda: len(connector.sent) == 30, before=t0 + 45)
        await sim.run_until(lambda: sim.manager._in_memory == 0, before=t0 + 50)
    finally:
        await sim.stop()
    await assert_each_delivered_once(store, connector.sent, everyone)
    assert connector.sent[-1].at - t0 <= 36, [round(s.at - t0, 1) for s in connector.sent]


@pytest_twisted.ensureDeferred
async def test_a_421_hands_back_what_is_queued_for_the_destination(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    """A 421 backs the destination off for 100 s: the jobs queued behind it are not held in
    memory meanwhile (the claim window stays free for other mail); they come back before the
    back-off ends and are all delivered once."""
    busy = ServerReply(421, "4.3.2 too busy")
    connector = FakeConnector(clock, answers=[busy])
    tunables = evolve(DeliveryTunables(batch_gather=0.0), backoff_on_421=100.0)
    one = [{**FAST_THROTTLE, "max_connections": 1}]
    sim = Simulation(
        store, clock, tmp_path, connector, tunables, throttle=one, retry_schedule=["10s"]
    )
    everyone = [f"r{i}@example.net" for i in range(20)]
    for address in everyone:
        await queue(store, address)
    t0 = clock.seconds()
    await sim.start()
    try:
        await sim.advance(20)
        assert len(connector.sent) == 1
        assert sim.manager._in_memory == 0, "held in memory while backed off"
        held = await held_back_rows(store)
        assert len(held) == 20  # the 421'd one (deferred, due at 10 s, claimed, handed back)
        # Due before the back-off ends, within ``hand_back_max`` after it at the latest.
        assert all(95 <= at - t0 <= 160 for _, at in held), held
        await sim.run_until(lambda: len(connector.sent) == 21, before=t0 + 165)
        await sim.run_until(lambda: sim.manager._in_memory == 0, before=t0 + 170)
    finally:
        await sim.stop()
    assert [round(t - t0) for t in connector.dials] == [0, 100]
    await assert_each_delivered_once(store, connector.sent[1:], everyone)


@pytest.mark.parametrize("committed", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_hand_back_the_database_did_not_confirm_is_tried_again_and_nothing_sent_twice(
    store: Store, clock: Clock, tmp_path: Path, committed: bool
) -> None:
    """The database is unavailable for the first two hand-backs, which committed nothing or
    (``committed``) committed the first before the connection was lost: the jobs are not
    sent from memory meanwhile, the hand-back is tried again, and every recipient is sent
    exactly once in the end."""
    real_hand_back = store.hand_back
    failures = [2]

    async def flaky(owner: str, due: Sequence[tuple[int, float]]) -> frozenset[int]:
        if failures[0] > 0:
            if committed and failures[0] == 2:
                await real_hand_back(owner, due)
            failures[0] -= 1
            raise DatabaseUnavailable("the server is restarting")
        return await real_hand_back(owner, due)

    store.hand_back = flaky  # type: ignore[method-assign]
    connector = FakeConnector(clock)
    sim, everyone = await slow_backlog(store, clock, tmp_path, connector)
    t0 = clock.seconds()
    await sim.start()
    try:
        await sim.advance(1.0)  # two pauses (0.25 s, 0.5 s), then the third try
        assert failures == [0]
        assert len(await held_back_rows(store)) >= 15
        assert len(connector.sent) <= 3  # one a second, from what was kept in memory
        await sim.run_until(lambda: len(connector.sent) == 30, before=t0 + 60)
        await sim.run_until(lambda: sim.manager._in_memory == 0, before=t0 + 65)
    finally:
        await sim.stop()
    await assert_each_delivered_once(store, connector.sent, everyone)


@pytest_twisted.ensureDeferred
async def test_a_refused_destinations_queued_jobs_are_recorded_in_one_transaction(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    """Issue 19: the jobs that share a refusal used to be recorded one commit each, their
    messages held in memory meanwhile (thousands, with a next hop down and a long queue).
    Now one ``record_outcomes_of`` takes them all, and the windows end empty."""
    connector = FakeConnector(clock, refusals=[TRY_LATER])
    sim = Simulation(
        store, clock, tmp_path, connector, throttle=[{**FAST_THROTTLE, "max_connections": 1}]
    )
    recorded: list[int] = []
    record = store.record_outcomes_of

    async def counted(owner: str, outcomes: Any) -> frozenset[int]:
        recorded.append(len(outcomes))
        return await record(owner, outcomes)

    store.record_outcomes_of = counted  # type: ignore[method-assign]
    for i in range(40):
        await queue(store, f"r{i}@example.net", f"s{i}@example.org")
    await sim.run_until_idle(within=10)
    assert len(connector.dials) == 1 and connector.sent == []
    assert recorded == [80]
    assert sim.manager._in_memory == 0 and sim.manager._in_memory_bytes == 0
    states = await recipient_states(store)
    assert len(states) == 80 and set(states.values()) == {"deferred"}
    assert len(await events(store, "deferred")) == 80


# -- claim spacing --------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_claims_are_spaced_and_a_wake_up_inside_the_spacing_is_not_lost(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    connector = FakeConnector(clock)
    tunables = evolve(QUIET, claim_spacing=0.5)
    sim = Simulation(store, clock, tmp_path, connector, tunables)
    await sim.start()
    t0 = clock.seconds()
    try:
        assert len(sim.claims) == 1
        for _ in range(40):  # 40 wake-ups within 0.2 s
            sim.manager.wake()
            await sim.advance(0.005)
        await queue(store, "late@example.net")  # its commit wakes the manager (SQLite: locally)
        assert connector.sent == []
        await sim.run_until(lambda: len(connector.sent) == 1, before=t0 + 1.1)
    finally:
        await sim.stop()
    gaps = [later - earlier for earlier, later in itertools.pairwise(sim.claims)]
    assert all(gap >= 0.5 for gap in gaps), gaps
    assert len(sim.claims) <= 3, sim.claims
    assert connector.sent[0].at - t0 <= 0.51


@pytest_twisted.ensureDeferred
async def test_a_full_batch_is_followed_by_the_next_claim_at_once(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    """Spacing applies to claims that found little: a full batch means more is waiting."""
    connector = FakeConnector(clock)
    tunables = evolve(QUIET, claim_spacing=5.0, claim_batch=2)
    sim = Simulation(store, clock, tmp_path, connector, tunables)
    for i in range(5):
        await queue(store, f"r{i}@example.net")
    await sim.start()
    try:
        assert sim.claims == [clock.seconds()] * 3  # 2 + 2 + 1, no clock time between them
        await sim.run_until(lambda: len(connector.sent) == 5, before=clock.seconds() + 1)
    finally:
        await sim.stop()


# -- a spare delivery process ([delivery] spare_processes) --------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_spare_claims_only_while_released(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    """A spare's manager starts held: it claims nothing, however often it is woken, until it
    is released; held again, it delivers what it has claimed and claims no more."""
    connector = FakeConnector(clock, delay=2.0)
    sim = Simulation(store, clock, tmp_path, connector, spare=True)
    for i in range(3):
        await queue(store, f"first{i}@example.net")
    sim.manager.startService()
    try:
        for _ in range(5):
            sim.manager.wake()
            await sim.advance(1.0)
        assert sim.claims == [] and connector.sent == []
        sim.manager.hold_claims(False)
        await sim.settle()
        assert len(sim.claims) == 1  # at once, not at the next poll
        sim.manager.hold_claims(True)  # while the three are on the wire
        for i in range(3):
            await queue(store, f"second{i}@example.net")
            sim.manager.wake()  # as the main process's wake-ups would
        await sim.advance(30.0)
        assert sorted(s.recipients[0] for s in connector.sent) == [
            f"first{i}@example.net" for i in range(3)
        ]
        assert len(sim.claims) == 1
        sim.manager.hold_claims(False)
        await sim.run_until(lambda: len(connector.sent) == 6, before=clock.seconds() + 5)
        assert len(sim.claims) == 2
    finally:
        await sim.stop()


# -- the byte window ------------------------------------------------------------------------------
@pytest.mark.parametrize(("window", "at_once"), [(2.5, 2), (0.5, 1)])
@pytest_twisted.ensureDeferred
async def test_the_byte_window_bounds_the_messages_under_way(
    store: Store, clock: Clock, tmp_path: Path, window: float, at_once: int
) -> None:
    """Six 100 KB messages, each taking 10 s to send; the throttle allows 20 connections.
    A window of 2.5 messages has two under way at once; one smaller than a message still
    lets them go, one at a time."""
    size = 100_000
    connector = FakeConnector(clock, delay=10.0)
    tunables = evolve(QUIET, max_in_memory_bytes=int(size * window))
    sim = Simulation(store, clock, tmp_path, connector, tunables)
    for i in range(6):
        await queue(store, f"r{i}@example.net", data=message(f"big {i}", size))
    most_bytes = 0
    under_way: list[int] = []

    def watch() -> bool:
        nonlocal most_bytes
        most_bytes = max(most_bytes, sim.manager._in_memory_bytes)
        under_way.append(sum(1 for s in connector.sent if s.at > clock.seconds() - 10))
        return sim.manager._in_memory == 0 and len(connector.sent) == 6

    await sim.start()
    try:
        await sim.run_until(watch, before=clock.seconds() + 100)
    finally:
        await sim.stop()
    assert max(under_way) == at_once, under_way
    starts = sorted({round(s.at - connector.sent[0].at) for s in connector.sent})
    assert starts == [10 * i for i in range(6 // at_once)], starts
    assert most_bytes <= max(int(size * window), size + 4096)
    assert sim.manager._in_memory_bytes == 0
    assert set((await recipient_states(store)).values()) == {"delivered"}


@pytest_twisted.ensureDeferred
async def test_messages_that_cannot_be_loaded_wait_in_the_window_and_are_loaded_later(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    """The database goes away between claiming recipients and loading their messages: the
    jobs stay claimed, counted once in the windows, and are loaded after the back-off; every
    message is delivered once and the windows end empty (they used to be counted again by
    the next claim round, and the windows leaked until delivery stopped)."""
    connector = FakeConnector(clock)
    sim = Simulation(store, clock, tmp_path, connector)
    load = store.load_for_delivery
    failures = 2

    async def flaky_load(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise DatabaseUnavailable("the server is restarting")
        return await load(*args, **kwargs)

    store.load_for_delivery = flaky_load  # type: ignore[method-assign]
    for i in range(3):
        await queue(store, f"r{i}@example.net", data=message(f"m {i}"))
    await sim.start()
    try:
        await sim.run_until(lambda: len(connector.sent) == 3, before=clock.seconds() + 30)
        await sim.settle()
    finally:
        await sim.stop()
    assert failures == 0
    assert sorted(r for s in connector.sent for r in s.recipients) == [
        "r0@example.net",
        "r1@example.net",
        "r2@example.net",
    ]
    assert (sim.manager._in_memory, sim.manager._in_memory_bytes) == (0, 0)
    assert set((await recipient_states(store)).values()) == {"delivered"}


# -- the fake connector is the manager's only way out ---------------------------------------------
@pytest_twisted.ensureDeferred
async def test_every_recipient_gets_its_own_copy_through_the_chain(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    connector = FakeConnector(clock)
    sim = Simulation(store, clock, tmp_path, connector)
    await queue(store, "a@example.net", "b@example.net")
    await sim.start()
    try:
        await sim.run_until(lambda: len(connector.sent) == 2, before=clock.seconds() + 5)
    finally:
        await sim.stop()
    assert sorted(r for s in connector.sent for r in s.recipients) == [
        "a@example.net",
        "b@example.net",
    ]
    assert all(s.sender.endswith(f"@{RETURN_PATH}") for s in connector.sent)  # VERP
    assert len(connector.sessions) == 1  # one connection for both copies
    assert all(s.closed for s in connector.sessions)


def hold_outcome_commits(store: Store) -> list[Deferred[None]]:
    """Make each outcome commit wait for its gate, appended to the list returned (outside
    the Simulation's count of store calls, so that a held commit does not keep it from
    settling)."""
    held: list[Deferred[None]] = []
    record = store.record_outcomes_of

    async def held_record(*args: Any, **kwargs: Any) -> Any:
        gate: Deferred[None] = Deferred()
        held.append(gate)
        await gate
        return await record(*args, **kwargs)

    store.record_outcomes_of = held_record  # type: ignore[method-assign]
    return held


# -- outcomes committed while the connection goes on ---------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_connection_goes_on_while_its_last_outcome_is_committed(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    connector = FakeConnector(clock)
    sim = Simulation(store, clock, tmp_path, connector)
    held = hold_outcome_commits(store)
    await queue(store, "first@example.net")
    await sim.start()
    await sim.advance(0.5)
    assert len(connector.sent) == 1 and len(held) == 1
    await queue(store, "second@example.net")  # its commit wakes the manager
    await sim.run_until(lambda: len(connector.sent) == 2, before=clock.seconds() + 1)
    # The first outcome is still being committed; its connection took the second job.
    assert len(connector.sessions) == 1
    assert len(held) == 2
    assert await recipient_states(store) == {
        "first@example.net": "delivering",
        "second@example.net": "delivering",
    }
    stopping: Deferred[None] = sim.manager.stopService()
    await sim.advance(60)
    assert not stopping.called  # the stop waits for the outcomes handed over
    for gate in held:
        gate.callback(None)
    await sim.stop()
    assert stopping.called
    assert await recipient_states(store) == {
        "first@example.net": "delivered",
        "second@example.net": "delivered",
    }


@pytest_twisted.ensureDeferred
async def test_outcomes_not_yet_committed_keep_their_jobs_place_in_the_byte_window(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    """While the outcome commits are held up (a database that stopped answering), the
    workers go on only as far as the byte window lets them: a job keeps its bytes until its
    outcome is committed, so nothing more is loaded or sent until the commits come through."""
    size = 100_000
    connector = FakeConnector(clock)
    tunables = evolve(QUIET, max_in_memory_bytes=int(size * 2.5))
    sim = Simulation(store, clock, tmp_path, connector, tunables)
    held = hold_outcome_commits(store)
    for i in range(6):
        await queue(store, f"r{i}@example.net", data=message(f"big {i}", size))
    await sim.start()
    try:
        await sim.advance(30)
        assert len(connector.sent) == 2  # the two jobs the window holds, sent
        assert len(held) == 2  # their outcomes waiting
        assert sim.manager._in_memory_bytes <= int(size * 2.5)
        for _ in range(20):
            while held:
                held.pop(0).callback(None)
            await sim.advance(1)
            if len(connector.sent) == 6 and sim.manager._in_memory == 0:
                break
    finally:
        while held:
            held.pop(0).callback(None)
        await sim.stop()
    assert sorted(r for s in connector.sent for r in s.recipients) == [
        f"r{i}@example.net" for i in range(6)
    ]
    assert set((await recipient_states(store)).values()) == {"delivered"}


# -- the suppression entries loaded with the messages --------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_job_that_waited_looks_its_recipients_up_again(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    """The entries read with a claimed batch's messages answer the chain's lookup for jobs
    that start at once (no read a job); a job that waited longer than
    ``suppressions_fresh_for`` (here 5 s for its throttle's turn) asks again, and an entry
    added in the meantime keeps its copy from going out."""
    connector = FakeConnector(clock)
    one_per_5s = {"match": "*", "max_connections": 1, "max_rate": "12/min"}
    sim = Simulation(store, clock, tmp_path, connector, throttle=[one_per_5s])
    lookups: list[list[str]] = []
    lookup = store.active_suppressions

    async def counted(addresses: Any) -> Any:
        addresses = list(addresses)
        lookups.append(addresses)
        return await lookup(addresses)

    store.active_suppressions = counted  # type: ignore[method-assign]
    await queue(store, "first@example.net")
    await queue(store, "second@example.net")
    await sim.start()
    await sim.advance(0.5)
    assert [s.recipients for s in connector.sent] == [("first@example.net",)]
    assert lookups == []  # answered by the read that loaded the message
    await store.add_suppression("second@example.net", "complaint")
    try:
        await sim.run_until(lambda: sim.manager._in_memory == 0, before=clock.seconds() + 30)
    finally:
        await sim.stop()
    assert lookups == [["second@example.net"]]
    assert len(connector.sent) == 1
    assert await recipient_states(store) == {
        "first@example.net": "delivered",
        "second@example.net": "suppressed",
    }


# -- idle connections and the stop grace ----------------------------------------------------------
@pytest.mark.parametrize(("later", "sessions"), [(1.5, 1), (2.5, 2)])
@pytest_twisted.ensureDeferred
async def test_an_idle_connection_waits_idle_connection_seconds_for_more(
    store: Store, clock: Clock, tmp_path: Path, later: float, sessions: int
) -> None:
    connector = FakeConnector(clock)
    sim = Simulation(store, clock, tmp_path, connector)  # idle_connection = 2 s
    await queue(store, "first@example.net")
    await sim.start()
    try:
        await sim.advance(later)
        await queue(store, "second@example.net")  # its commit wakes the manager
        await sim.run_until(lambda: len(connector.sent) == 2, before=clock.seconds() + 1)
    finally:
        await sim.stop()
    assert len(connector.sessions) == sessions
    assert all(s.closed for s in connector.sessions)


@pytest_twisted.ensureDeferred
async def test_at_stop_a_send_past_the_grace_is_cut_and_deferred(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    connector = FakeConnector(clock, delay=100.0)  # the next hop takes 100 s for the dot
    sim = Simulation(store, clock, tmp_path, connector, evolve(QUIET, stop_grace=7.0))
    await queue(store)
    await sim.start()
    assert len(connector.sent) == 1
    stopping_at = clock.seconds() + 1
    await sim.advance(1)
    await sim.stop()
    assert clock.seconds() == stopping_at + 7.0
    assert await recipient_states(store) == {"r@example.net": "deferred"}
    [deferred] = await events(store, "deferred")
    assert deferred.data["reply"] == "451 4.4.1 connection lost: closed by us"


# -- the tunables ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    [
        {"claim_batch": 0},
        {"max_in_memory_bytes": -1},
        {"poll_interval": 0.0},
        {"lease": float("nan")},
        {"claim_spacing": -0.1},
        {"database_retry_min": 3.0},  # above the default maximum
        {"throttle_hold": 0.0},
        {"hand_back_max": 5.0},  # below the default throttle_hold
        {"batch_gather": -0.001},
        {"batch_gather": float("nan")},
    ],
)
def test_tunables_out_of_range_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(change)).rsplit("_", 1)[0]):
        DeliveryTunables(**change)


def test_the_default_tunables_are_todays_numbers() -> None:
    assert DeliveryTunables() == DeliveryTunables(
        claim_batch=500,
        max_in_memory=5000,
        claim_ahead_per_connection=1,
        claim_ahead_min=100,
        throttle_hold=10.0,
        hand_back_max=60.0,
        max_in_memory_bytes=32 * 1024 * 1024,
        lease=900.0,
        poll_interval=5.0,
        backoff_on_421=60.0,
        stop_grace=10.0,
        idle_connection=2.0,
        claim_spacing=0.1,
        batch_gather=0.002,
        database_retry_min=0.25,
        database_retry_max=2.0,
    )
