"""The hourly roll-up's speed: events per second it counts from a backlog.

    .venv/bin/python bench/rollup.py [--events 200000] [--batch 5000] [--engine sqlite]
        [--seed 1] [--mix full|delivery] [--load RATE,EVENTS_PER_MESSAGE,RELAY_CPU_MS]

Generates ``--events`` events of messages that are all different (each has its own sender domain
out of 2,000, recipient domain out of 5,000 and zero to three tags out of 300), the mix of a
transactional relay: received, then delivered (some deferred first), bounced (hard and soft,
several categories) or suppressed, and for a part of the delivered, machine and human opens and
clicks, spread over 48 hours. They are written straight into a fresh database (SQLite by
default; ``--engine postgresql`` starts a throwaway server from tests/support/postgres.py, and
the database is vacuumed and analysed after the fill, so that autovacuum's catching up with it
is not in the server's CPU). Then it runs ``store.roll_up(horizon, --batch)`` as the service
does until the backlog is counted, and prints events per second, the CPU seconds per 1,000
events (this process's, which runs SQLite's queries, plus, on PostgreSQL, the server's), the
slowest batch (the time its transaction holds SQLite's write lock) and the rows written. It
prints numbers; it is not a test.

``--mix delivery``: only what `make bench`'s load records (a ``received`` and a ``delivered``
event per message, no bounce, open or click), the messages still all different.

``--load RATE,EVENTS_PER_MESSAGE,RELAY_CPU_MS`` (figures of a ``bench/relay.py --rollup-cost``
run: its rate in msg/s, its events a message, the relay's CPU ms a message, the PostgreSQL
server's included): also the roll-up's CPU a message of that load (CPU per event x events a
message), its share of the delivery path's CPU, and the share of the time its transactions
would hold the database (SQLite's write lock) at that rate.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from relay import postmaster_pid, tree_cpu_seconds  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from smartrelay.events import (  # noqa: E402
    BouncedEvent,
    ClickedEvent,
    DeferredEvent,
    DeliveredEvent,
    EventData,
    OpenedEvent,
    ReceivedEvent,
    SuppressedEvent,
    event_data,
)
from smartrelay.reactor import as_relay_reactor  # noqa: E402
from smartrelay.storage.engines import create_engine  # noqa: E402
from smartrelay.storage.interfaces import ICursor  # noqa: E402
from smartrelay.storage.migrations import migrate  # noqa: E402
from smartrelay.storage.store import Store  # noqa: E402

START_MS = 1_700_000_000_000
SPAN_MS = 48 * 3600 * 1000
CATEGORIES = ["invalid-recipient", "mailbox-full", "reputation-block", "policy", "technical"]


def generate(
    count: int, rng: random.Random, mix: str = "full"
) -> Iterator[tuple[dict[str, Any], list[Any]]]:
    """(message row, [(time_ms, recipient, event)]) until ``count`` events are made;
    ``mix`` "delivery": received and delivered only."""
    made = 0
    n = 0
    while made < count:
        n += 1
        sender = f"app@s{rng.randrange(2000)}.example"
        recipient = f"user{n}@r{rng.randrange(5000)}.example"
        tags = [f"tag{rng.randrange(300)}" for _ in range(rng.choice((0, 1, 1, 2, 3)))]
        t = START_MS + rng.randrange(SPAN_MS)
        events: list[tuple[int, str, EventData]] = [(t, recipient, ReceivedEvent(900, None, None))]
        fate = rng.random()
        if mix == "delivery":
            events.append((t + 700, recipient, DeliveredEvent("mx", "250 ok", True, 1)))
        elif fate < 0.02:
            events.append((t + 5, recipient, SuppressedEvent("hard_bounce")))
        elif fate < 0.08:
            hard = rng.random() < 0.5
            category = rng.choice(CATEGORIES[:1] if hard else CATEGORIES[1:])
            events.append((t + 900, recipient, BouncedEvent(category, hard, "5.0.0", "no", "smtp")))
        else:
            if fate < 0.15:
                events.append((t + 500, recipient, DeferredEvent("mx", "451 later", 1, "")))
                t += 600_000
            events.append((t + 700, recipient, DeliveredEvent("mx", "250 ok", True, 1)))
            if rng.random() < 0.3:
                events.append((t + 2_000, recipient, OpenedEvent("proxy", "192.0.2.1", True)))
            for k in range(rng.choice((0, 0, 1, 2, 3))):
                events.append((t + 60_000 * (k + 1), recipient, OpenedEvent("UA", None, False)))
                if rng.random() < 0.3:
                    url = f"https://s.example/{n}"
                    click = ClickedEvent("UA", None, False, url)
                    events.append((t + 60_000 * (k + 1) + 5_000, recipient, click))
        made += len(events)
        message = {
            "queue_id": f"{n:016x}",
            "received_at": events[0][0],
            "sender": sender,
            "tags": json.dumps(tags),
        }
        yield message, events


async def fill(store: Store, count: int, seed: int, mix: str) -> tuple[int, int]:
    """Write the generated messages and events, 5,000 messages per transaction, the events
    in time order (as a relay writes them)."""
    items = list(generate(count, random.Random(seed), mix))
    for start in range(0, len(items), 5000):
        part = items[start : start + 5000]

        async def txn(cursor: ICursor, part: list[Any] = part) -> None:
            await cursor.executemany(
                "INSERT INTO messages (queue_id, received_at, sender, size, tags)"
                " VALUES (?, ?, ?, 900, ?)",
                [(m["queue_id"], m["received_at"], m["sender"], m["tags"]) for m, _ in part],
            )
            rows = sorted(
                (
                    time_ms,
                    event.type,
                    m["queue_id"],
                    recipient,
                    json.dumps(event_data(event), sort_keys=True),
                )
                for m, events in part
                for time_ms, recipient, event in events
            )
            await cursor.executemany(
                "INSERT INTO events (time, type, queue_id, recipient, data) VALUES (?, ?, ?, ?, ?)",
                rows,
            )

        await store.engine.run_interaction("fill", txn)
    return len(items), sum(len(e) for _, e in items)


def vacuum_analyze(url: str) -> None:
    connection = psycopg2.connect(url)
    try:
        connection.autocommit = True
        connection.cursor().execute("VACUUM ANALYZE")
    finally:
        connection.close()


async def count_rows(store: Store) -> int:
    async def txn(cursor: ICursor) -> int:
        await cursor.execute("SELECT COUNT(*) FROM rollups")
        row = cursor.fetchone()
        assert row is not None
        return int(row[0])

    return await store.engine.run_interaction("count", txn, readonly=True)


async def bench(
    reactor: Any, url: str, args: argparse.Namespace, server: Callable[[], list[int]]
) -> None:
    engine = create_engine(as_relay_reactor(reactor), url)
    await engine.start()
    try:
        await migrate(engine, 0)
        store = Store(engine, reactor)
        began = time.perf_counter()
        messages, events = await fill(store, args.events, args.seed, args.mix)
        print(
            f"generated {events} events of {messages} messages"
            f" in {time.perf_counter() - began:.1f} s"
        )
        if url.startswith("postgresql"):
            # Not the fill's autovacuum in the server's CPU below: a relay's tables are
            # vacuumed and analysed as they grow, not all at once.
            vacuum_analyze(url)
        horizon = (START_MS + SPAN_MS) / 1000 + 3600
        batches: list[float] = []
        counted = 0
        cpu_began = time.process_time()  # every thread's: SQLite's queries run in the pool's
        server_began = sum(tree_cpu_seconds(pid) for pid in server())
        began = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            n = await store.roll_up(horizon, args.batch)
            batches.append(time.perf_counter() - t0)
            counted += n
            if n < args.batch:
                break
        elapsed = time.perf_counter() - began
        cpu = time.process_time() - cpu_began
        server_cpu = sum(tree_cpu_seconds(pid) for pid in server()) - server_began
        assert counted == events, (counted, events)
        totals = await store.rollup_totals(START_MS / 1000 - 3600, horizon + 3600)
        assert sum(c for c, _ in totals.values()) == events
        print(
            f"{engine.name}: rolled up {counted} events in {elapsed:.2f} s:"
            f" {counted / elapsed:,.0f} events/s; {len(batches)} batches of {args.batch},"
            f" slowest {max(batches) * 1000:.0f} ms, median"
            f" {sorted(batches)[len(batches) // 2] * 1000:.0f} ms;"
            f" {await count_rows(store)} rollups rows"
        )
        per_event_ms = (cpu + server_cpu) / counted * 1000
        print(
            f"{engine.name}: CPU {cpu * 1000 / counted * 1000:.1f} ms per 1,000 events"
            + (f" + the server's {server_cpu * 1000 / counted * 1000:.1f} ms" if server() else "")
            + f" ({cpu:.2f} s{f' + {server_cpu:.2f} s' if server() else ''});"
            f" passes {elapsed / counted * 1000 * 1000:.1f} ms (wall time) per 1,000 events"
        )
        if args.load is not None:
            rate, per_message, relay_ms = args.load
            rollup_ms = per_event_ms * per_message
            print(
                f"at {rate:,.0f} msg/s of {per_message:.2f} events each: the roll-up costs"
                f" {rollup_ms:.3f} ms CPU a message against the relay's {relay_ms:.2f} ms:"
                f" {rollup_ms / relay_ms:.2%} of the delivery path's CPU; its transactions hold"
                f" the database {rate * per_message * elapsed / counted:.2%} of the time"
                f" (a pass every 10 s: {min(args.batch, rate * per_message * 10):,.0f} events)"
            )
    finally:
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mix", choices=("full", "delivery"), default="full")
    parser.add_argument(
        "--load",
        type=_load,
        metavar="RATE,EVENTS_PER_MESSAGE,RELAY_CPU_MS",
        help="a bench/relay.py --rollup-cost run's figures: the roll-up's share of them",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        server: Callable[[], list[int]] = list
        if args.engine == "postgresql":
            from tests.support.postgres import running_postgres

            postgres = stack.enter_context(running_postgres())
            url = postgres.create_database()
            server = functools.partial(postmaster_pid, postgres)
        else:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="rollup-bench-"))
            url = f"sqlite:{os.path.join(directory, 'bench.db')}"
        task.react(lambda reactor: Deferred.fromCoroutine(bench(reactor, url, args, server)))


def _load(text: str) -> tuple[float, float, float]:
    try:
        rate, per_message, relay_ms = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            "RATE,EVENTS_PER_MESSAGE,RELAY_CPU_MS: three numbers"
        ) from None
    return rate, per_message, relay_ms


if __name__ == "__main__":
    main()
