"""The webhook sender's throughput: a backlog of events sent to a local receiver.

    .venv/bin/python bench/webhooks.py [--engine sqlite|postgresql] [--events 20000]
        [--batch-size 100] [--endpoints 1]

Fills a fresh database with ``--events`` delivered events (after the endpoints' rows were
made, so that they are the endpoints' backlog), starts the webhook service (the relay's own
code, default timing) towards ``--endpoints`` twisted.web receivers on 127.0.0.1 that answer
200 and parse every body, and prints how long until every endpoint acknowledged every event:
events per second, POSTs per second, and the process's CPU seconds. It prints numbers; it is
not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import tempfile
import time

from twisted.internet import task
from twisted.internet.defer import Deferred

from smartrelay.config.model import Webhook
from smartrelay.events import DeliveredEvent
from smartrelay.metrics import RelayMetrics
from smartrelay.reactor import as_relay_reactor
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.migrations import migrate
from smartrelay.storage.store import Store, insert_events, to_ms
from smartrelay.webhooks.dispatcher import WebhookService
from tests.support.webhook_receiver import SECRET, Receiver, wait_for


async def bench(reactor: object, url: str, args: argparse.Namespace) -> None:
    relay_reactor = as_relay_reactor(reactor)
    engine = create_engine(relay_reactor, url)
    await engine.start()
    await migrate(engine, 0)
    store = Store(engine, relay_reactor)
    receivers = [Receiver(relay_reactor) for _ in range(args.endpoints)]
    for r in receivers:
        r.start()
        await store.ensure_webhook_endpoint(r.url)
    now = to_ms(relay_reactor.seconds())
    for start in range(0, args.events, 5000):
        rows = [
            (None, f"r{i}@example.net", DeliveredEvent("mx.example.net", "250 2.0.0 ok", True, 1))
            for i in range(start, min(args.events, start + 5000))
        ]

        async def txn(cursor: ICursor, rows: list[object] = rows) -> None:  # type: ignore[assignment]
            await insert_events(cursor, now, rows)  # type: ignore[arg-type]

        await store.run("bench_events", txn)

    async def ready() -> Store:
        return store

    webhooks = [
        Webhook(url=r.url, secret=SECRET, batch_size=args.batch_size, batch_wait=2.0)
        for r in receivers
    ]
    service = WebhookService(relay_reactor, ready, webhooks, "bench", RelayMetrics())
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    service.startService()
    await wait_for(
        relay_reactor,
        lambda: all(len(r.acknowledged()) >= args.events for r in receivers),
        "every event acknowledged",
        within=3600,
    )
    took = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    await service.stopService()
    posts = sum(len(r.posts) for r in receivers)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    assert all(p.signed for r in receivers for p in r.posts)
    print(
        f"{engine.name}: {args.events} events x {args.endpoints} endpoint(s),"
        f" batch_size {args.batch_size}: {took:.2f} s,"
        f" {args.events * args.endpoints / took:,.0f} events/s, {posts / took:,.0f} POSTs/s;"
        f" CPU {cpu:.2f} s (sender, receivers and database in one process)"
    )
    for r in receivers:
        await r.stop()
    await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--endpoints", type=int, default=1)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.engine == "postgresql":
            from tests.support.postgres import running_postgres

            url = stack.enter_context(running_postgres()).create_database()
        else:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="webhook-bench-"))
            url = f"sqlite:{os.path.join(directory, 'bench.db')}"
        task.react(lambda reactor: Deferred.fromCoroutine(bench(reactor, url, args)))


if __name__ == "__main__":
    main()
