"""Claims due recipients from a shared database until none are left; prints the ids as JSON.

Run as ``python -m tests.support.claim_worker URL OWNER START_AT``: it waits until the wall
clock reaches START_AT so that several workers begin claiming at the same moment.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.internet.task import deferLater, react

from smartrelay.reactor import as_relay_reactor
from smartrelay.storage.engines import create_engine
from smartrelay.storage.store import Store


async def claim_all(reactor: object, url: str, owner: str, start_at: float) -> None:
    relay_reactor = as_relay_reactor(reactor)
    engine = create_engine(relay_reactor, url)
    await engine.start()
    store = Store(engine, relay_reactor)
    claimed: list[int] = []
    await deferLater(relay_reactor, max(0.0, start_at - time.time()), lambda: None)
    try:
        while True:
            batch = await store.claim_due(owner, limit=7, lease=3600)
            if not batch:
                break
            claimed.extend(c.id for c in batch)
            # A real worker delivers between claims; this also lets an SQLite peer take the
            # write lock (its busy handler polls) instead of one process holding it throughout.
            await deferLater(relay_reactor, 0.002, lambda: None)
    finally:
        await engine.close()
    print(json.dumps(claimed))


def main() -> None:
    url, owner, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
    react(lambda reactor: claim_all(reactor, url, owner, start_at))


if __name__ == "__main__":
    main()
