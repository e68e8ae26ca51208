"""Retention's purge applied to one message, for the tests of what still works after it."""

from __future__ import annotations

from twisted.internet.task import Clock, deferLater

from smartrelay.config import RetentionConfig
from smartrelay.retention.purge import PurgePacing, Purger
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.queue import mark_finished
from smartrelay.storage.store import Store
from tests.conftest import real_reactor


async def purge_message_rows(store: Store, queue_id: str, rows: bool) -> None:
    """Finish message ``queue_id`` (its recipients still to deliver become delivered, as the
    delivery path records them) and run the real purge on it: its body goes
    (``[retention] message_bodies``) and, with ``rows``, its ``messages`` and ``recipients``
    rows too (``[retention] events``). Other finished messages of the store go the same way."""

    async def finish(cursor: ICursor) -> None:
        await cursor.execute(
            "UPDATE recipients SET state = 'delivered', next_attempt_at = NULL,"
            " lease_owner = NULL WHERE queue_id = ? AND next_attempt_at IS NOT NULL",
            (queue_id,),
        )
        await mark_finished(cursor, store.now_ms(), [queue_id])

    await store.run("test_finish", finish)
    # The purge takes what finished strictly before now - retention: let a millisecond pass.
    if isinstance(store.clock, Clock):
        store.clock.advance(0.002)
    else:
        await deferLater(real_reactor(), 0.002, lambda: None)
    short, long = 0.001, 1000 * 86400.0
    retention = RetentionConfig(
        message_bodies=short, events=short if rows else long, feedback_reports=long
    )
    pacing = PurgePacing(min_pause=0.0, duty=1.0, sqlite_duty=1.0)
    await Purger(store, retention, pacing, timer=real_reactor()).run_pass()
