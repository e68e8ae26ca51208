"""A throttled backlog beside free mail on one node: how long the free mail waits.

    .venv/bin/python bench/throttled_claims.py [--slow 300] [--rate 2] [--free 500]
        [--engine sqlite|postgresql] [--hold SECONDS]

One relay (in this process, the relay's own code and default tunables), two sinks on
127.0.0.1: ``slow.test`` goes to one whose throttle allows ``--rate`` messages a second on one
connection, everything else to a free one. ``--slow`` one-recipient messages for slow.test
are queued first (due now); once the node is delivering them, ``--free`` messages for
free.test are queued through the node's own store (which wakes it, as accepted mail does).
It prints when the first and the last free message arrived (seconds after they were queued),
the free mail's rate, and what the node held of the slow backlog then. ``--hold 1e9`` turns
the hand-back off (the claiming before it: the window filled by the slow backlog). It prints
numbers; it is not a test.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from attrs import evolve
from twisted.internet import task
from twisted.internet.defer import Deferred

from smartrelay.reactor import IRelayReactor, as_relay_reactor
from smartrelay.storage.store import NewMessage
from tests.support.delivery_relay import (
    FAST_THROTTLE,
    SENDER,
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    eventually,
    message_bytes,
    queue_before_start,
    select,
)
from tests.support.postgres import running_postgres


async def queue_slow(reactor: IRelayReactor, url: str, count: int) -> None:
    await queue_before_start(reactor, url, count, "s{}@slow.test", "slow {}")


async def run(reactor: IRelayReactor, url: str, args: argparse.Namespace) -> None:
    await queue_slow(reactor, url, args.slow)
    with tempfile.TemporaryDirectory(prefix="throttled-claims-") as directory:
        sinks = Sinks(reactor)
        relays = DeliveryRelays(reactor, Path(directory))
        if args.hold is not None:
            relays.tunables = evolve(
                relays.tunables, throttle_hold=args.hold, hand_back_max=max(args.hold, 60.0)
            )
        slow_sink, free_sink = TrackingSinkBackend(), TrackingSinkBackend()
        try:
            slow_port = (await sinks.start(slow_sink))[1]
            free_port = (await sinks.start(free_sink))[1]
            routes = {
                "slow.test": f"smtp://127.0.0.1:{slow_port}",
                "*": f"smtp://127.0.0.1:{free_port}",
            }
            throttle = [
                FAST_THROTTLE,
                {"match": "slow.test", "max_connections": 1, "max_rate": f"{args.rate}/s"},
            ]
            node = await relays.start(url, {"routes": routes, "throttle": throttle})

            async def slow_started() -> bool | None:
                return True if slow_sink.messages else None

            await eventually(reactor, slow_started, "the slow backlog", within=30)
            queued = time.monotonic()
            for i in range(args.free):
                await node.store.queue_message(
                    NewMessage(SENDER, (f"f{i}@free.test",), message_bytes(f"free {i}"))
                )
            first: list[float] = []

            async def free_done() -> bool | None:
                if free_sink.messages and not first:
                    first.append(time.monotonic() - queued)
                return True if len(free_sink.messages) >= args.free else None

            await eventually(reactor, free_done, "the free mail", within=600, interval=0.02)
            last = time.monotonic() - queued
            rows = await select(
                node.store,
                "SELECT state, count(*) FROM recipients WHERE domain = 'slow.test'"
                " GROUP BY state ORDER BY state",
            )
            manager = node.service.delivery
            window = manager.claim_window if manager is not None else 0
        finally:
            await relays.stop_all()
            await sinks.stop_all()
    slow_states = ", ".join(f"{state} {n}" for state, n in rows)
    hold = "off" if args.hold is not None and args.hold >= 1e6 else f"{args.hold or 10.0:g} s"
    print(
        f"{args.engine}, hold {hold}, claim window {window}: {args.free} free messages queued"
        f" behind {args.slow} at {args.rate:g}/s: first arrived after {first[0]:.2f} s, last"
        f" after {last:.2f} s ({args.free / last:.0f} msg/s); slow.test then: {slow_states}",
        flush=True,
    )


async def bench(reactor: object, args: argparse.Namespace) -> None:
    relay_reactor = as_relay_reactor(reactor)
    if args.engine == "postgresql":
        with running_postgres() as server:
            await run(relay_reactor, server.create_database(), args)
    else:
        with tempfile.TemporaryDirectory(prefix="throttled-db-") as directory:
            await run(relay_reactor, f"sqlite:{Path(directory) / 'smartrelay.db'}", args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", type=int, default=300, help="messages for slow.test, first")
    parser.add_argument("--rate", type=float, default=2.0, help="slow.test's messages/s")
    parser.add_argument("--free", type=int, default=500, help="messages for free.test, after")
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--hold", type=float, help="throttle_hold, s (1e9: no hand-back)")
    args = parser.parse_args()
    if args.slow < 1 or args.free < 1 or not args.rate > 0:
        parser.error("--slow, --free and --rate must be positive")
    task.react(lambda reactor: Deferred.fromCoroutine(bench(reactor, args)))


if __name__ == "__main__":
    main()
