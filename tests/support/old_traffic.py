"""Traffic of a few hours ago, written into a database before the relay under test starts.

The relay's roll-up counts an event only once it is ``ROLLUP_LAG`` (60 s) old, so mail sent
during a browser test would not reach the dashboard for a minute. This writes messages,
delivery outcomes, opens and clicks through the store's own methods, on a clock set
:data:`HOURS_AGO` hours back; the relay's first roll-up pass counts them at start-up. The
browser tests call :func:`run` on the test's reactor; it also runs on its own:

    python -m tests.support.old_traffic DATABASE_URL [--hostile]

``--hostile`` adds clicks on URLs that hold markup and a ``javascript:`` URL (the dashboard's
top URLs show them) and a tag holding markup. It prints the number of events written.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from smartrelay.events import BouncedEvent, ClickedEvent, DeliveredEvent, OpenedEvent
from smartrelay.reactor import as_relay_reactor
from smartrelay.storage.engines import create_engine
from smartrelay.storage.migrations import migrate
from smartrelay.storage.queue import NewMessage, RecipientOutcome
from smartrelay.storage.store import Store, to_ms
from smartrelay.storage.tracking import RecipientRef

HOURS_AGO = 3
#: Recipient domains of the old traffic and how many messages each gets.
DOMAINS = {"gmail.example": 6, "yahoo.example": 4, "outlook.example": 3}
URLS = ("https://shop.example/sale", "https://shop.example/account")
#: Clicked URLs with markup in them (``--hostile``).
HOSTILE_URLS = (
    "https://evil.example/<script>alert(1)</script>",
    "https://evil.example/\"'><img src=x onerror=alert(1)>",
    "javascript:alert(1)",
)
HOSTILE_TAG = "<script>alert(1)</script>"


async def fill(store: Store, clock: Clock, hostile: bool) -> int:
    """Messages to :data:`DOMAINS`: every third bounces (hard), the others are delivered,
    opened and clicked; returns the number of events written."""
    written = 0
    number = 0
    clicks = 0
    for domain, count in DOMAINS.items():
        for _ in range(count):
            number += 1
            clock.advance(60)
            tags = ("old-traffic", HOSTILE_TAG) if hostile else ("old-traffic",)
            address = f"user{number}@{domain}"
            queued = await store.queue_message(
                NewMessage(
                    sender="news@shop.example",
                    recipients=(address,),
                    raw=f"Subject: Old news {number}\r\n\r\nHello\r\n".encode(),
                    tags=tags,
                    metadata={"campaign": "autumn"},
                )
            )
            (claimed,) = await store.claim_due("old-traffic", limit=1, lease=60)
            if number % 3 == 0:
                state = "bounced"
                event: Any = BouncedEvent(
                    "invalid-recipient", True, "5.1.1", "550 5.1.1 no such user", "smtp"
                )
            else:
                state = "delivered"
                event = DeliveredEvent(f"mx.{domain}", "250 2.0.0 ok", False, 1)
            done = RecipientOutcome(
                claimed.id, queued.queue_id, address, state, 1, None, "", (event,)
            )
            await store.record_outcomes("old-traffic", [done])
            written += 2
            if state != "delivered":
                continue
            ref = RecipientRef(claimed.id, queued.queue_id, address, "news@shop.example")
            clock.advance(30)
            await store.record_engagement(ref, OpenedEvent("Mozilla/5.0", "192.0.2.1", False))
            urls = HOSTILE_URLS if hostile else URLS
            url = urls[clicks % len(urls)]
            clicks += 1
            await store.record_engagement(ref, ClickedEvent("Mozilla/5.0", "192.0.2.1", False, url))
            written += 2
    return written


async def run(reactor: Any, url: str, hostile: bool) -> int:
    """Create the schema of the database at ``url`` if need be and :func:`fill` it."""
    engine = create_engine(as_relay_reactor(reactor), url)
    await engine.start()
    try:
        clock = Clock()
        clock.advance(time.time() - HOURS_AGO * 3600)
        await migrate(engine, to_ms(clock.seconds()))
        return await fill(Store(engine, clock), clock, hostile)
    finally:
        await engine.close()


async def _main(reactor: Any, url: str, hostile: bool) -> None:
    print(await run(reactor, url, hostile))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--hostile", action="store_true")
    args = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(_main(reactor, args.url, args.hostile)))


if __name__ == "__main__":
    main()
