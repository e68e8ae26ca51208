"""Fair claiming across nodes: how a backlog splits between relays on one PostgreSQL.

    .venv/bin/python bench/fair_claims.py [--nodes 1,2,4] [--messages 800] [--delay 0.02]
        [--connections 4] [--window N]

For each node count: a fresh database gets ``--messages`` one-recipient messages due now (a
burst, or nodes restarting with a backlog), then that many relays start at once (in this
process, the relay's own code and default tunables; each its own data_dir and node id), each
delivering to a sink of its own on 127.0.0.1 that answers the final dot ``--delay`` seconds
late, at most ``--connections`` connections per node (the throttle). It prints how many
messages each node delivered, the smallest share, and messages per second until the last
delivery. ``--window N`` sets the claim window (``claim_ahead_min`` = N) instead of the
default, e.g. 5000 for the claiming before issue 19 (a node held up to 5,000 recipients).
The nodes share this process's CPU: the split shows who claims, not how fast separate
machines would go. It prints numbers; it is not a test.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from attrs import evolve
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults

from smartrelay.reactor import IRelayReactor, as_relay_reactor
from tests.support.delivery_relay import (
    FAST_THROTTLE,
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    eventually,
    queue_before_start,
    select,
    smtp_route,
)
from tests.support.postgres import PostgresServer, running_postgres
from tests.support.relay import RunningRelay


async def queue_backlog(reactor: IRelayReactor, url: str, messages: int) -> None:
    await queue_before_start(reactor, url, messages, "r{}@example.net", "fair {}")


async def one_run(
    reactor: IRelayReactor, server: PostgresServer, nodes: int, args: argparse.Namespace
) -> None:
    url = server.create_database()
    await queue_backlog(reactor, url, args.messages)
    with tempfile.TemporaryDirectory(prefix="fair-claims-") as directory:
        sinks = Sinks(reactor)
        relays = DeliveryRelays(reactor, Path(directory))
        if args.window is not None:
            relays.tunables = evolve(relays.tunables, claim_ahead_min=args.window)
        backends = [TrackingSinkBackend(delay=args.delay, clock=reactor) for _ in range(nodes)]
        try:
            ports = [(await sinks.start(backend))[1] for backend in backends]
            throttle = [{**FAST_THROTTLE, "max_connections": args.connections}]
            started = time.monotonic()
            running: list[RunningRelay] = await gatherResults(
                [
                    Deferred.fromCoroutine(
                        relays.start(
                            url,
                            {"routes": smtp_route(port), "throttle": throttle},
                            data_dir=f"node{i}",
                        )
                    )
                    for i, port in enumerate(ports)
                ]
            )

            async def done() -> bool | None:
                rows = await select(
                    running[0].store,
                    "SELECT count(*) FROM recipients WHERE state = 'delivered'",
                )
                return True if int(rows[0][0]) == args.messages else None

            await eventually(reactor, done, "every delivery", within=300, interval=0.02)
            elapsed = time.monotonic() - started
            manager = running[0].service.delivery
            window = manager.claim_window if manager is not None else 0
        finally:
            await relays.stop_all()
            await sinks.stop_all()
    shares = [len(backend.messages) for backend in backends]
    delivered = sum(shares)
    smallest = min(shares) / delivered
    print(
        f"{nodes} node(s), {args.messages} msgs, claim window {window}: split {shares}, "
        f"smallest share {smallest:.0%} (fair: {1 / nodes:.0%}), "
        f"{delivered / elapsed:.0f} msg/s end to end ({elapsed:.2f} s from start-up)",
        flush=True,
    )


async def bench(reactor: object, server: PostgresServer, args: argparse.Namespace) -> None:
    relay_reactor = as_relay_reactor(reactor)
    for nodes in args.nodes:
        await one_run(relay_reactor, server, nodes, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,4", help="node counts, comma-separated")
    parser.add_argument("--messages", type=int, default=800)
    parser.add_argument("--delay", type=float, default=0.02, help="sink's answer to the dot, s")
    parser.add_argument("--connections", type=int, default=4, help="per node (throttle)")
    parser.add_argument("--window", type=int, help="claim_ahead_min (5000: the old claiming)")
    args = parser.parse_args()
    args.nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
    if not args.nodes or min(args.nodes) < 1 or args.messages < 1:
        parser.error("--nodes and --messages must be positive")
    with running_postgres() as server:
        task.react(lambda reactor: Deferred.fromCoroutine(bench(reactor, server, args)))


if __name__ == "__main__":
    main()
