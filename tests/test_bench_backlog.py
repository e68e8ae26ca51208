"""bench/backlog.py (the old backlog of `bench/relay.py --purge-backlog`) on both engines: its
rows are the relay's (event data as the relay writes it, readable by the export), all of the
old backlog is due with the default retention, and one purge pass removes exactly it."""

from __future__ import annotations

import importlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from smartrelay.config import RetentionConfig
from smartrelay.events import ADDED_LATER, FIELDS
from smartrelay.retention.purge import PurgePacing, Purger
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import Store
from tests.conftest import real_reactor

BENCH = Path(__file__).resolve().parent.parent / "bench"


def backlog_module() -> Any:
    """bench/ is not a package: its scripts import each other by name."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("backlog")


async def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute(sql)
        return [tuple(row) for row in cursor.fetchall()]

    return await store.run("test_rows", txn, readonly=True)


async def test_backlog_is_the_relays_rows_and_one_pass_purges_exactly_it(
    store: Store, database_url: str
) -> None:
    backlog = backlog_module()
    now = store.clock.seconds()
    filled = backlog.fill(database_url, 4_000, 30, seed=3, now=now)
    assert filled.events == 4_000
    assert 900 <= filled.messages <= 1_100  # about four events a message
    assert filled.kept_bodies == 30 and filled.kept_body_bytes > 30 * 2_900
    assert filled.recent_events == 60  # received and delivered of each

    types = Counter(t for (t,) in await rows(store, "SELECT type FROM events"))
    assert types["received"] == filled.messages + 30
    assert {"delivered", "bounced", "opened", "clicked"} <= set(types)
    for event_type, data in await rows(store, "SELECT type, data FROM events"):
        # The relay stores a field of ADDED_LATER only when it differs from its default
        # (``delivered.sandbox`` only for sandbox mail, which a backlog does not have).
        stored = [k for k in FIELDS[event_type] if k not in ADDED_LATER.get(event_type, {})]
        assert sorted(json.loads(data)) == sorted(stored)
    every_row = "SELECT DISTINCT type, time, queue_id, recipient, data FROM events"
    distinct = await rows(store, f"SELECT COUNT(*) FROM ({every_row}) AS e")
    assert distinct == [(filled.events + filled.recent_events,)]
    page = await store.export_events(0, 10_000, None, None, ())
    assert len(page) == filled.events + filled.recent_events

    purger = Purger(
        store,
        RetentionConfig(),
        PurgePacing(min_pause=0.0, duty=1.0, sqlite_duty=1.0),
        timer=real_reactor(),
    )
    assert await purger.count() == {
        "message_bodies": 30,
        "messages": filled.messages,
        "recipients": filled.messages,
        "events": 4_000,
        "feedback_reports": 0,
    }
    report = await purger.run_pass()
    assert (report.message_bodies, report.messages, report.recipients, report.events) == (
        30,
        filled.messages,
        filled.messages,
        4_000,
    )
    # What is left: the recent messages, their bodies gone, with their events.
    assert await rows(store, "SELECT COUNT(*) FROM messages") == [(30,)]
    assert await rows(store, "SELECT COUNT(*) FROM message_bodies") == [(0,)]
    assert await rows(store, "SELECT COUNT(*) FROM events") == [(60,)]


async def test_events_only_backlog(store: Store, database_url: str) -> None:
    backlog = backlog_module()
    filled = backlog.fill(database_url, 2_000, 0, seed=1, now=store.clock.seconds(), messages=False)
    assert (filled.events, filled.messages, filled.kept_bodies) == (2_000, 0, 0)
    purger = Purger(store, RetentionConfig())
    counts = await purger.count()
    assert (counts["events"], counts["messages"], counts["message_bodies"]) == (2_000, 0, 0)
