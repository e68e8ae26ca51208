"""The cost of one read of ``/metrics``' database gauges (``store.metrics_figures``) on a big
queue and a long history.

    .venv/bin/python bench/metrics_gauges.py [--engine sqlite|postgresql] [--pending 200000]
        [--finished 1000000] [--domains 5000] [--reports 100000] [--events 200000]
        [--runs 20]

Fills a database (by SQL, in bulk) with ``--finished`` delivered recipients, ``--pending``
recipients still waiting spread over ``--domains`` recipient domains (a skewed spread: a few
big providers, a long tail), ``--reports`` feedback reports in four states and ``--events``
delivered events behind two webhook endpoints (one subscribed to them), then times ``--runs``
reads of the figures (what ``/metrics`` does at most every 5 s). It prints the median and the
max; it is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from smartrelay.events import DeliveredEvent  # noqa: E402
from smartrelay.reactor import as_relay_reactor  # noqa: E402
from smartrelay.storage.engines import create_engine  # noqa: E402
from smartrelay.storage.interfaces import ICursor  # noqa: E402
from smartrelay.storage.migrations import migrate  # noqa: E402
from smartrelay.storage.store import START, Store, insert_events  # noqa: E402

CHUNK = 5_000


async def fill(store: Store, args: argparse.Namespace) -> None:
    rng = random.Random(1)
    now_ms = store.now_ms()
    domains = [f"d{i}.test" for i in range(args.domains)]
    weights = [1.0 / (i + 1) for i in range(args.domains)]  # Zipf-like
    total = args.finished + args.pending
    messages = total // 3 + 1

    async def insert(sql: str, rows: list[tuple[Any, ...]]) -> None:
        async def txn(cursor: ICursor) -> None:
            for start in range(0, len(rows), 500):
                part = rows[start : start + 500]
                marks = ", ".join(["(" + ", ".join("?" * len(part[0])) + ")"] * len(part))
                await cursor.execute(sql + marks, [v for row in part for v in row])

        await store.run("bench_fill", txn)

    for start in range(0, messages, CHUNK):
        rows: list[tuple[Any, ...]] = [
            (f"Q{i:09d}", now_ms - (messages - i) * 10, "s@x.test", 100)
            for i in range(start, min(messages, start + CHUNK))
        ]
        await insert("INSERT INTO messages (queue_id, received_at, sender, size) VALUES ", rows)
    for start in range(0, total, CHUNK):
        rows = []
        for i in range(start, min(total, start + CHUNK)):
            domain = rng.choices(domains, weights)[0]
            pending = i >= args.finished
            rows.append(
                (
                    f"Q{i // 3:09d}",
                    f"r{i}@{domain}",
                    domain,
                    "deferred" if pending else "delivered",
                    now_ms + 60_000 if pending else None,
                    now_ms,
                )
            )
        await insert(
            "INSERT INTO recipients (queue_id, address, domain, state, next_attempt_at,"
            " updated_at) VALUES ",
            rows,
        )
    states = ("processed", "ignored", "unmatched", "new")
    for start in range(0, args.reports, CHUNK):
        rows = [
            (f"F{i:09d}", now_ms, "", "[]", b"x", states[i % 4])
            for i in range(start, min(args.reports, start + CHUNK))
        ]
        await insert(
            "INSERT INTO feedback_reports (report_id, received_at, sender, recipients, raw,"
            " state) VALUES ",
            rows,
        )
    # Events for the webhooks' backlog: a's types (delivered) are behind by --events.
    event = DeliveredEvent(mx="mx.test", reply="250 ok", tls=True, attempt=1)
    for start in range(0, args.events, CHUNK):
        batch = [
            ("Q000000000", f"r{i}@d0.test", event)
            for i in range(start, min(args.events, start + CHUNK))
        ]

        async def txn(cursor: ICursor, batch: list[Any] = batch) -> None:
            await insert_events(cursor, now_ms, batch)

        await store.run("bench_events", txn)
    await insert(
        "INSERT INTO webhook_endpoints (url, position_txid, position_id, created_at) VALUES ",
        [("http://a.test/", 0, 0, now_ms), ("http://b.test/", 0, 0, now_ms)],
    )


async def bench(reactor: Any, url: str, args: argparse.Namespace) -> None:
    relay_reactor = as_relay_reactor(reactor)
    engine = create_engine(relay_reactor, url)
    await engine.start()
    try:
        await migrate(engine, 0)
        store = Store(engine, relay_reactor)
        started = time.perf_counter()
        await fill(store, args)
        if engine.name == "postgresql":  # as autovacuum would have by then

            async def analyze(cursor: ICursor) -> None:
                await cursor.execute("ANALYZE")

            await store.run("bench_analyze", analyze)
        print(
            f"{engine.name}: filled {args.finished:,} finished + {args.pending:,} pending"
            f" recipients over {args.domains:,} domains, {args.reports:,} reports"
            f" in {time.perf_counter() - started:.0f} s"
        )
        webhooks = (("http://a.test/", ("delivered",)), ("http://b.test/", ("bounced",)))
        for name, hooks in (("without webhooks", ()), ("backlog only", webhooks)):
            started = time.perf_counter()
            for _ in range(args.runs):
                if hooks:
                    head = await store.event_head()
                    await store.count_events_between(START, head, ("delivered",), 100_000)
                else:
                    await store.metrics_figures(())
            print(f"  {name}: {(time.perf_counter() - started) * 1000 / args.runs:.1f} ms per read")
        times = []
        figures = None
        backlog = ""
        for _ in range(args.runs):
            started = time.perf_counter()
            figures = await store.metrics_figures(webhooks)
            times.append((time.perf_counter() - started) * 1000)
        assert figures is not None
        waiting = sum(d.recipients for d in figures.queue)
        backlog = ", ".join(
            f"{w.url} {w.backlog:,}" for w in figures.webhooks if w.backlog is not None
        )
        print(
            f"metrics_figures: median {statistics.median(times):.1f} ms,"
            f" max {max(times):.1f} ms over {args.runs} runs"
            f" ({len(figures.queue)} queue rows, {waiting:,} waiting; backlog {backlog})"
        )
    finally:
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--pending", type=int, default=200_000)
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--domains", type=int, default=5_000)
    parser.add_argument("--reports", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="metrics-bench-"))
        if args.engine == "postgresql":
            from tests.support.postgres import running_postgres

            url = stack.enter_context(running_postgres()).create_database()
        else:
            url = f"sqlite:{os.path.join(directory, 'bench.db')}"
        task.react(lambda reactor: Deferred.fromCoroutine(bench(reactor, url, args)))


if __name__ == "__main__":
    main()
