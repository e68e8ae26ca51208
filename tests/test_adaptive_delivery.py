"""Adaptive throttles in the delivery manager: on a task.Clock with a fake connector (what a
rate-limit reply does to the recipient and the destination), and end to end over real
sockets, on both engines, against a sink that refuses above a rate (the relay converges near
it, bounces nothing, and recovers when the sink relaxes)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import pytest_twisted
from attrs import define, evolve, field
from twisted.internet.defer import succeed
from twisted.internet.task import Clock, deferLater

from smartrelay.config import parse_config
from smartrelay.delivery.adaptive import AimdSettings
from smartrelay.delivery.client import ServerReply, SmtpConnector
from smartrelay.delivery.manager import DeliveryManager, DeliveryTunables
from smartrelay.delivery.mx import MxResolver
from smartrelay.metrics import RelayMetrics
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.session import Session
from smartrelay.storage.interfaces import IDatabaseEngine
from smartrelay.storage.store import NewMessage, Store
from smartrelay.timefmt import rfc3339
from tests.conftest import real_reactor
from tests.support.delivery_relay import (
    FAST_THROTTLE,
    Sinks,
    TrackingSinkBackend,
    count_events,
    events,
    eventually,
    recipient_states,
)
from tests.support.manager import FakeConnector, chain_factory
from tests.test_delivery_manager_clock import QUIET, Simulation, queue
from tests.test_mx import MX, FixtureResolver

SLOW_DOWN = ServerReply(421, "4.7.0 Try again later")


# -- on a clock ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["greeting", "transaction"])
@pytest_twisted.ensureDeferred
async def test_a_rate_limit_reply_cuts_pauses_briefly_and_retries_soon(
    store: Store, clock: Clock, tmp_path: Path, where: str
) -> None:
    connector = FakeConnector(clock)
    if where == "greeting":
        connector.refusals.append(SLOW_DOWN)
    else:
        connector.answers.append(SLOW_DOWN)
    metrics = RelayMetrics()
    tunables = evolve(
        QUIET, backoff_on_421=600.0, adaptive=AimdSettings(pause=5.0, retry_delay=15.0)
    )
    sim = Simulation(
        store,
        clock,
        tmp_path,
        connector,
        tunables,
        retry_schedule=["1h"],
        throttle=[{**FAST_THROTTLE, "max_rate": "100/s", "adaptive": True}],
    )
    sim.manager._metrics = metrics
    sim.manager.throttles.adaptive.on_change = lambda f: metrics.adaptive.set("main", f)
    t0 = clock.seconds()
    queue_id = await queue(store)
    await sim.start()
    try:
        await sim.run_until(lambda: len(connector.dials) == 2, before=t0 + 60)
        await sim.run_until(lambda: sim.manager._in_memory == 0, before=t0 + 60)
    finally:
        await sim.stop()
    # Deferred (never bounced), and tried again after 15 s, not the schedule's hour nor the
    # 421 back-off's 10 minutes (the rng of the simulation adds no jitter).
    [deferred] = await events(store, "deferred", queue_id)
    assert deferred.data["next_attempt"] == rfc3339(t0 + 15.0)
    assert 15.0 <= connector.dials[1] - t0 <= 15.1
    assert await recipient_states(store) == {"r@example.net": "delivered"}
    assert await count_events(store, "bounced") == 0
    # The destination's limits were cut, and are shown.
    [(process, figures)] = metrics.adaptive.all()
    assert process == "main" and figures.cut
    assert figures.destination == "example.net" and figures.domains == ("example.net",)
    assert (figures.rate, figures.connections) == (50.0, 10)
    assert figures.reason == "421 4.7.0 Try again later"


@pytest_twisted.ensureDeferred
async def test_a_421_that_is_no_rate_limit_still_backs_off(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    """On an adaptive throttle too, a 421 in a transaction that does not say "slow down"
    (a server shutting down) is the usual back-off, with no cut."""
    connector = FakeConnector(clock, answers=[ServerReply(421, "4.3.2 shutting down")])
    tunables = evolve(QUIET, backoff_on_421=100.0)
    sim = Simulation(
        store,
        clock,
        tmp_path,
        connector,
        tunables,
        retry_schedule=["10s"],
        throttle=[{**FAST_THROTTLE, "adaptive": True}],
    )
    t0 = clock.seconds()
    await queue(store)
    await sim.start()
    try:
        await sim.run_until(lambda: len(connector.dials) == 2, before=t0 + 101)
        await sim.run_until(lambda: sim.manager._in_memory == 0, before=t0 + 101)
    finally:
        await sim.stop()
    assert [round(t - t0) for t in connector.dials] == [0, 100]
    assert sim.manager.throttles.adaptive.figures() == []


# -- end to end -----------------------------------------------------------------------------------
SINK_RATE = 10  # messages a second the sink takes; above that: 421 4.7.0
#: Three domains at one MX host: one provider, one budget (``localhost``: the connector
#: resolves MX hosts with the system's resolver).
ZONE = {f"d{i}.test": [MX(10, "localhost")] for i in range(3)}


@define
class RateLimitingSink(TrackingSinkBackend):
    """Accepts ``limit`` recipients a second (a sliding window), refuses the rest with
    ``421 4.7.0 Try again later``; records when each RCPT was refused."""

    limit: int | None = None
    accepted: list[float] = field(factory=list)
    refused: list[float] = field(factory=list)

    def check_recipient(self, session: Session, address: str) -> Reply | None:
        now = time.monotonic()
        recent = [t for t in self.accepted[-50:] if now - t < 1.0]
        if self.limit is not None and len(recent) >= self.limit:
            self.refused.append(now)
            return Reply(421, "4.7.0", "Try again later")
        self.accepted.append(now)
        return None


# SQLite only: the adaptive limits live in the delivery process's memory, and the store only
# queues and records here as everywhere else (both engines: test_adaptive_delivery's clock
# tests above, test_delivery_e2e). The scenario takes ~27 s of real time (with a sink of
# 5/s, ~45 s): once is enough for a suite that must stay under 10 minutes.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_real_sockets_converge_near_the_sinks_rate_bounce_nothing_and_recover(
    engine: IDatabaseEngine, sinks: Sinks, tmp_path: Path
) -> None:
    reactor = real_reactor()
    store = Store(engine, reactor)  # real time: retries come due as the manager sees them
    backend = RateLimitingSink(limit=SINK_RATE)
    _, sink_port = await sinks.start(backend)
    # The ceiling: 100/s and 10 connections, 10 times what the sink takes. Short holds and
    # steps so the test takes seconds, not minutes.
    delivery = parse_config(
        {
            "delivery": {
                "routes": {"*": "mx"},
                "throttle": [
                    {"match": "*", "max_connections": 10, "max_rate": "100/s", "adaptive": True}
                ],
            }
        }
    ).delivery
    settings = AimdSettings(
        hold=2.0,
        max_hold=8.0,
        same_episode=1.0,
        step_interval=1.0,
        step_fraction=0.02,
        pause=1.0,
        retry_delay=1.0,
    )
    metrics = RelayMetrics()
    manager = DeliveryManager(
        reactor,
        delivery,
        lambda: succeed(store),
        MxResolver(FixtureResolver(dict(ZONE)), reactor, port=sink_port),
        SmtpConnector(reactor, "relay.test", delivery.connect_timeout, delivery.tls),
        chain_factory(tmp_path),
        tunables=DeliveryTunables(poll_interval=0.5, adaptive=settings),
        metrics=metrics,
    )
    key = "mx:localhost"  # the three domains' one MX provider: one budget

    def current() -> tuple[float, int] | None:
        for _, figures in metrics.adaptive.all():
            if figures.destination == key:
                return figures.rate, figures.connections
        return None

    total = 100
    for i in range(total):
        await store.queue_message(
            NewMessage("app@example.com", (f"r{i}@d{i % 3}.test",), b"Subject: x\r\n\r\nx\r\n")
        )
    started = time.monotonic()
    samples: list[float] = []
    manager.startService()
    try:

        async def all_delivered() -> bool | None:
            limits = current()
            if limits is not None and time.monotonic() - started > 10:
                samples.append(limits[0])
            done = await count_events(store, "delivered")
            return True if done == total else None

        await eventually(reactor, all_delivered, f"{total} deliveries", within=120, interval=0.5)
        took = time.monotonic() - started
        limits = current()
        assert limits is not None, "the limits were never cut"

        # Converged: after the first 10 s, the relay's rate limit stayed near the sink's
        # (AIMD saws around it), far below the ceiling.
        assert samples, "too few samples"
        median = statistics.median(samples)
        assert SINK_RATE / 4 <= median <= SINK_RATE * 3, (median, samples)
        # The backlog went at a good part of the sink's rate (about 55% measured; AIMD's saw
        # averages below the peak) ...
        assert total / took >= 0.3 * SINK_RATE, (total, took)
        # ... and the sink was not hammered: a fixed 100/s relay gets thousands of refusals.
        assert len(backend.refused) <= total, len(backend.refused)
        assert await count_events(store, "bounced") == 0
        assert set((await recipient_states(store)).values()) == {"delivered"}
        # One budget for the three domains, all listed.
        [(_, figures)] = [(p, f) for p, f in metrics.adaptive.all() if f.destination == key]
        assert set(figures.domains) == set(ZONE)

        # The sink relaxes: the limits climb back to the ceiling, and new mail flows freely.
        backend.limit = None
        refused_before = len(backend.refused)

        async def recovered() -> bool | None:
            return True if current() == (100.0, 10) else None

        await eventually(reactor, recovered, "limits back at the ceiling", within=90)
        for i in range(30):
            await store.queue_message(
                NewMessage("app@example.com", (f"s{i}@d0.test",), b"Subject: y\r\n\r\ny\r\n")
            )
        second = time.monotonic()

        async def second_batch() -> bool | None:
            return True if await count_events(store, "delivered") == total + 30 else None

        await eventually(reactor, second_batch, "30 more deliveries", within=60)
        assert len(backend.refused) == refused_before
        assert time.monotonic() - second < 30
        # Back at the ceiling, shown as not cut.
        [(_, figures)] = [(p, f) for p, f in metrics.adaptive.all() if f.destination == key]
        assert not figures.cut
    finally:
        await manager.stopService()
        await deferLater(reactor, 0, lambda: None)
