"""Fair claiming across nodes (issue 19 point 3): relays sharing one PostgreSQL database each
deliver a share of the due work close to their capacity, none twice, none lost."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest_twisted
from attrs import evolve
from twisted.internet.defer import Deferred, gatherResults

from smartrelay.reactor import IRelayReactor
from smartrelay.storage.engines import create_engine
from smartrelay.storage.migrations import migrate
from smartrelay.storage.store import NewMessage, Store
from tests.conftest import real_reactor
from tests.support.delivery_relay import (
    FAST_THROTTLE,
    SENDER,
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    eventually,
    message_bytes,
    select,
    smtp_route,
)
from tests.support.postgres import PostgresServer
from tests.support.relay import RunningRelay

#: More than one claim window (200 recipients with the default 200 connections) per node, so
#: that the nodes come back for more while the other is still delivering.
MESSAGES = 600
#: Each sink answers the final dot this late: a node's capacity is bound by its receiver and
#: its connections, as in production, not by how fast it claims (and a node that starts a
#: little late on a loaded machine still finds work).
SINK_DELAY = 0.05
THROTTLE = [{**FAST_THROTTLE, "max_connections": 4}]


async def queue_backlog(reactor: IRelayReactor, url: str) -> set[str]:
    """``MESSAGES`` one-recipient messages due now, queued before any relay runs (a burst,
    or nodes restarting): the case where the first node to claim used to take everything."""
    engine = create_engine(reactor, url)
    await engine.start()
    try:
        await migrate(engine, 0)
        store = Store(engine, reactor)
        for i in range(MESSAGES):
            await store.queue_message(
                NewMessage(SENDER, (f"r{i}@example.net",), message_bytes(f"fair {i}"))
            )
    finally:
        await engine.close()
    return {f"r{i}@example.net" for i in range(MESSAGES)}


async def wait_until_delivered(reactor: IRelayReactor, store: Store) -> None:
    async def all_delivered() -> bool | None:
        rows = await select(store, "SELECT count(*) FROM recipients WHERE state = 'delivered'")
        return True if int(rows[0][0]) == MESSAGES else None

    await eventually(reactor, all_delivered, f"{MESSAGES} deliveries", within=120)


def received(backend: TrackingSinkBackend) -> list[str]:
    return [address for m in backend.messages for address in m.recipients]


@pytest_twisted.ensureDeferred
async def test_two_nodes_on_one_postgresql_each_deliver_a_fair_share(
    relays: DeliveryRelays, sinks: Sinks, postgres_server: PostgresServer
) -> None:
    """Before: the first node to claim took up to a 500-recipient batch (within a 5,000
    window) and the other found what was left (500 vs 100 here). Now a node claims no more
    than it can start working on soon and comes back for more as it finishes."""
    reactor = real_reactor()
    url = postgres_server.create_database()
    everyone = await queue_backlog(reactor, url)
    backends = [TrackingSinkBackend(delay=SINK_DELAY, clock=reactor) for _ in range(2)]
    ports = [(await sinks.start(backend))[1] for backend in backends]
    nodes: list[RunningRelay] = await gatherResults(
        [
            Deferred.fromCoroutine(
                relays.start(
                    url, {"routes": smtp_route(port), "throttle": THROTTLE}, data_dir=f"node{i}"
                )
            )
            for i, port in enumerate(ports)
        ]
    )
    await wait_until_delivered(reactor, nodes[0].store)
    shares = [received(backend) for backend in backends]
    counts = Counter(address for share in shares for address in share)
    assert set(counts) == everyone, "a recipient was lost"
    assert max(counts.values()) == 1, "a recipient was delivered twice"
    sizes = [len(share) for share in shares]
    assert min(sizes) >= MESSAGES // 4, f"unfair split {sizes}"


@pytest_twisted.ensureDeferred
async def test_one_node_comes_back_for_more_than_its_claim_window(
    relays: DeliveryRelays, sinks: Sinks, tmp_path: Path
) -> None:
    """SQLite, one node: a backlog three claim windows deep is all delivered, claimed again
    as deliveries finish (the poll, which would also find it, is pushed out of reach)."""
    relays.tunables = evolve(relays.tunables, poll_interval=600.0)
    reactor = real_reactor()
    url = f"sqlite:{tmp_path / 'smartrelay.db'}"
    everyone = await queue_backlog(reactor, url)
    backend = TrackingSinkBackend(delay=SINK_DELAY, clock=reactor)
    _, port = await sinks.start(backend)
    node = await relays.start(url, {"routes": smtp_route(port), "throttle": THROTTLE})
    assert node.service.delivery is not None
    assert node.service.delivery.claim_window < MESSAGES
    await wait_until_delivered(reactor, node.store)
    assert sorted(received(backend)) == sorted(everyone)
