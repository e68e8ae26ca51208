"""What retention's purge does to one message, for the tests of what still works after it.

:func:`purge_message_rows` stands in for the purge (smartrelay/retention/purge.py) on one
message, with the statements the purge runs: point it at the real purge once that is in.
"""

from __future__ import annotations

from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import Store, to_ms


async def purge_message_rows(store: Store, queue_id: str, rows: bool) -> None:
    """Purge message ``queue_id`` as retention does: its body (``[retention]
    message_bodies``: ``raw`` emptied, ``body_purged_at`` set at the store's clock), and with
    ``rows`` its ``messages`` and ``recipients`` rows too (``[retention] events``)."""
    now_ms = to_ms(store.clock.seconds())

    async def txn(cursor: ICursor) -> None:
        await cursor.execute(
            "UPDATE messages SET raw = ?, body_purged_at = ? WHERE queue_id = ?",
            (b"", now_ms, queue_id),
        )
        if rows:
            await cursor.execute("DELETE FROM recipients WHERE queue_id = ?", (queue_id,))
            await cursor.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))

    await store.engine.run_interaction("purge_message_rows", txn)
