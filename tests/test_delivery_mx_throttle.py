"""``mx:`` throttles group the domains hosted on the same MX (the MX answer from a fixture)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import succeed

from smartrelay.config import parse_config
from smartrelay.delivery.manager import DeliveryManager
from smartrelay.delivery.mx import MxResolver
from smartrelay.storage.store import NewMessage, Store
from tests.conftest import real_reactor
from tests.support.delivery_relay import Sinks, TrackingSinkBackend, count_events, eventually
from tests.test_mx import MX, FixtureResolver

ZONE = {"a.test": [MX(10, "localhost")], "b.test": [MX(10, "localhost")]}


@pytest.mark.parametrize(("match", "most_at_once"), [("mx:localhost", 1), ("*", 2)])
@pytest_twisted.ensureDeferred
async def test_domains_on_one_mx_share_its_throttle(
    store: Store, sinks: Sinks, match: str, most_at_once: int
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
        "relay.test",
        lambda: succeed(store),
        MxResolver(FixtureResolver(dict(ZONE)), reactor, port=sink_port),
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
