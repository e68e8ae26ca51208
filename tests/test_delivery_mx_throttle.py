"""``mx:`` throttles group the domains hosted on the same MX (the MX answer from a fixture)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import succeed
from twisted.internet.task import deferLater

from smartrelay.config import parse_config
from smartrelay.delivery.client import SmtpConnector
from smartrelay.delivery.manager import DeliveryManager, DeliveryTunables
from smartrelay.delivery.mx import MxResolver
from smartrelay.storage.queue import Claim
from smartrelay.storage.store import NewMessage, Store
from tests.conftest import real_reactor
from tests.support.delivery_relay import Sinks, TrackingSinkBackend, count_events, eventually
from tests.support.manager import chain_factory
from tests.test_mx import MX, FixtureResolver

ZONE = {"a.test": [MX(10, "localhost")], "b.test": [MX(10, "localhost")]}


@pytest.mark.parametrize(("match", "most_at_once"), [("mx:localhost", 1), ("*", 2)])
@pytest_twisted.ensureDeferred
async def test_domains_on_one_mx_share_its_throttle(
    store: Store, sinks: Sinks, tmp_path: Path, match: str, most_at_once: int
) -> None:
    reactor = real_reactor()
    backend = TrackingSinkBackend(delay=0.05, clock=reactor)
    factory, sink_port = await sinks.start(backend)
    delivery = parse_config(
        {
            "delivery": {
                "routes": {"*": "mx"},
                "throttle": [
                    {"match": m, "max_connections": 1, "max_rate": "100000/s"}
                    for m in dict.fromkeys([match, "*"])
                ],
            }
        }
    ).delivery
    manager = DeliveryManager(
        reactor,
        delivery,
        lambda: succeed(store),
        MxResolver(FixtureResolver(dict(ZONE)), reactor, port=sink_port),
        SmtpConnector(reactor, "relay.test", delivery.connect_timeout, delivery.tls),
        chain_factory(tmp_path),
    )
    for i in range(6):
        domain = "a.test" if i % 2 else "b.test"
        await store.queue_message(NewMessage("app@example.com", (f"r{i}@{domain}",), b"x\r\n"))
    manager.startService()
    try:

        async def all_delivered() -> bool | None:
            return True if await count_events(store, "delivered") == 6 else None

        await eventually(reactor, all_delivered, "6 deliveries", within=30)
    finally:
        await manager.stopService()
    # One connection at a time to the shared MX with an mx: throttle; one per domain without.
    assert factory.max_seen == most_at_once


@pytest_twisted.ensureDeferred
async def test_claims_are_spaced_when_wake_ups_come_fast(
    store: Store, sinks: Sinks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every commit of accepted mail wakes the manager; claims that find little are at least
    ``claim_spacing`` apart, and a wake-up inside that window is not lost but comes later."""
    reactor = real_reactor()
    _, sink_port = await sinks.start(TrackingSinkBackend(clock=reactor))
    delivery = parse_config(
        {"delivery": {"routes": {"*": f"smtp://127.0.0.1:{sink_port}"}}}
    ).delivery
    manager = DeliveryManager(
        reactor,
        delivery,
        lambda: succeed(store),
        MxResolver(FixtureResolver({}), reactor),
        SmtpConnector(reactor, "relay.test", delivery.connect_timeout, delivery.tls),
        chain_factory(tmp_path),
        tunables=DeliveryTunables(claim_spacing=0.5),
    )
    claims: list[float] = []
    claim_due = store.claim_due_with_sizes

    async def counting_claim_due(owner: str, limit: int, lease: float) -> Claim:
        claims.append(reactor.seconds())
        return await claim_due(owner, limit, lease)

    monkeypatch.setattr(store, "claim_due_with_sizes", counting_claim_due)
    manager.startService()
    try:

        async def started() -> bool | None:
            return True if claims else None

        await eventually(reactor, started, "the first claim")
        for _ in range(40):  # 40 wake-ups within 0.2 s
            manager.wake()
            await deferLater(reactor, 0.005, lambda: None)
        await store.queue_message(NewMessage("app@example.com", ("late@example.net",), b"x\r\n"))
        manager.wake()

        async def delivered() -> bool | None:
            return True if await count_events(store, "delivered") == 1 else None

        await eventually(reactor, delivered, "the late message", within=10)
    finally:
        await manager.stopService()
    gaps = [later - earlier for earlier, later in itertools.pairwise(claims)]
    assert len(claims) <= 4, claims
    assert all(gap >= 0.45 for gap in gaps), gaps
