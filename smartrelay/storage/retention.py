"""The retention queries: each deletes one small batch, in one short transaction.

Every batch is an index range (the partial indexes of schema 004, ``events_time``,
``feedback_reports_recent``) read from its oldest end with a LIMIT, so a batch costs the
same whatever the table holds, and no transaction holds the database for long. Batches are
idempotent: what a batch deletes is gone, so a pass killed half-way, run again, or run by two
nodes at once against one PostgreSQL (whose ``SKIP LOCKED`` keeps them off each other's rows)
deletes each row once. The pacing between batches is the purge service's
(:mod:`smartrelay.retention.purge`).
"""

from __future__ import annotations

from attrs import frozen

from smartrelay.storage.base import StoreBase, marks
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.search_terms import delete_terms


@frozen
class PurgeCutoffs:
    """Integer milliseconds: what is older than each is due for deletion."""

    bodies: int  # messages finished before this lose their raw body (message_bodies row)
    messages: int  # messages finished before this go, with their recipients
    events: int  # events before this go (never past what the roll-ups have counted)
    feedback_reports: int  # feedback reports received before this go


@frozen
class PurgeBatch:
    """What one batch deleted."""

    rows: int
    #: Recipient rows deleted with their messages (messages batches only).
    recipients: int = 0


class RetentionStore(StoreBase):
    def _skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED" if self.engine.supports_skip_locked else ""

    async def _finished_batch(
        self, cursor: ICursor, extra: str, before_ms: int, limit: int, max_bytes: int
    ) -> list[str]:
        """Queue ids of up to ``limit`` finished messages (oldest first) whose bodies add up to
        at most ``max_bytes`` (at least one): freeing a body costs in proportion to its size."""
        await cursor.execute(
            "SELECT queue_id, CASE WHEN body_purged_at IS NULL THEN size ELSE 0 END"
            f" FROM messages WHERE finished_at IS NOT NULL{extra} AND finished_at < ?"
            f" ORDER BY finished_at LIMIT ?{self._skip_locked()}",
            (before_ms, limit),
        )
        queue_ids: list[str] = []
        total = 0
        for queue_id, size in cursor.fetchall():
            total += int(size)
            if queue_ids and total > max_bytes:
                break
            queue_ids.append(str(queue_id))
        return queue_ids

    async def purge_bodies(self, before_ms: int, limit: int, max_bytes: int) -> PurgeBatch:
        """Delete the raw body of up to ``limit`` messages (at most ``max_bytes`` of bodies, or
        one) finished before ``before_ms``."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> PurgeBatch:
            queue_ids = await self._finished_batch(
                cursor, " AND body_purged_at IS NULL", before_ms, limit, max_bytes
            )
            if not queue_ids:
                return PurgeBatch(0)
            where = f"queue_id IN ({marks(len(queue_ids))})"
            await cursor.execute(f"DELETE FROM message_bodies WHERE {where}", queue_ids)
            await cursor.execute(
                f"UPDATE messages SET body_purged_at = ? WHERE {where}", (now_ms, *queue_ids)
            )
            return PurgeBatch(max(int(cursor.rowcount), 0))

        return await self.run("purge_bodies", txn)

    async def purge_messages(self, before_ms: int, limit: int, max_bytes: int) -> PurgeBatch:
        """Delete up to ``limit`` messages (bodies still kept adding up to at most
        ``max_bytes``, or one) finished before ``before_ms``, with their recipients; their
        events go by their own time (:meth:`purge_events`)."""

        async def txn(cursor: ICursor) -> PurgeBatch:
            queue_ids = await self._finished_batch(cursor, "", before_ms, limit, max_bytes)
            if not queue_ids:
                return PurgeBatch(0)
            where = f"queue_id IN ({marks(len(queue_ids))})"
            await cursor.execute(f"DELETE FROM message_bodies WHERE {where}", queue_ids)
            await delete_terms(cursor, queue_ids)
            await cursor.execute(f"DELETE FROM recipients WHERE {where}", queue_ids)
            recipients = max(int(cursor.rowcount), 0)
            await cursor.execute(f"DELETE FROM messages WHERE {where}", queue_ids)
            return PurgeBatch(max(int(cursor.rowcount), 0), recipients)

        return await self.run("purge_messages", txn)

    async def purge_events(self, before_ms: int, limit: int) -> PurgeBatch:
        """Delete up to ``limit`` of the oldest events before ``before_ms``."""

        async def txn(cursor: ICursor) -> PurgeBatch:
            await cursor.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE time < ?"
                f" ORDER BY time, id LIMIT ?{self._skip_locked()})",
                (before_ms, limit),
            )
            return PurgeBatch(max(int(cursor.rowcount), 0))

        return await self.run("purge_events", txn)

    async def purge_feedback_reports(self, before_ms: int, limit: int) -> PurgeBatch:
        """Delete up to ``limit`` of the oldest feedback reports received before ``before_ms``."""

        async def txn(cursor: ICursor) -> PurgeBatch:
            await cursor.execute(
                "DELETE FROM feedback_reports WHERE report_id IN (SELECT report_id"
                " FROM feedback_reports WHERE received_at < ?"
                f" ORDER BY received_at LIMIT ?{self._skip_locked()})",
                (before_ms, limit),
            )
            return PurgeBatch(max(int(cursor.rowcount), 0))

        return await self.run("purge_feedback_reports", txn)

    async def count_purgeable(self, cutoffs: PurgeCutoffs) -> dict[str, int]:
        """What a pass would delete now (``purge --dry-run``): index range counts."""

        async def txn(cursor: ICursor) -> dict[str, int]:
            queries = {
                "message_bodies": (
                    "SELECT COUNT(*) FROM messages WHERE finished_at IS NOT NULL"
                    " AND body_purged_at IS NULL AND finished_at < ?",
                    cutoffs.bodies,
                ),
                "messages": (
                    "SELECT COUNT(*) FROM messages WHERE finished_at IS NOT NULL"
                    " AND finished_at < ?",
                    cutoffs.messages,
                ),
                "recipients": (
                    "SELECT COUNT(*) FROM recipients WHERE queue_id IN (SELECT queue_id"
                    " FROM messages WHERE finished_at IS NOT NULL AND finished_at < ?)",
                    cutoffs.messages,
                ),
                "events": ("SELECT COUNT(*) FROM events WHERE time < ?", cutoffs.events),
                "feedback_reports": (
                    "SELECT COUNT(*) FROM feedback_reports WHERE received_at < ?",
                    cutoffs.feedback_reports,
                ),
            }
            counts = {}
            for name, (sql, before_ms) in queries.items():
                await cursor.execute(sql, (before_ms,))
                row = cursor.fetchone()
                counts[name] = 0 if row is None else int(row[0])
            return counts

        return await self.run("count_purgeable", txn, readonly=True)

    async def free_pages(self, pages: int) -> int:
        """SQLite with ``auto_vacuum = INCREMENTAL``: give up to ``pages`` free pages back to
        the file system (``PRAGMA incremental_vacuum``); returns how many. 0 elsewhere, and on
        an SQLite file made without incremental auto-vacuum (docs/storage.md says how to
        convert one)."""
        if self.engine.name != "sqlite":
            return 0

        async def txn(cursor: ICursor) -> int:
            await cursor.execute("PRAGMA auto_vacuum")
            row = cursor.fetchone()
            if row is None or int(row[0]) != 2:  # 2 = INCREMENTAL
                return 0
            await cursor.execute("PRAGMA freelist_count")
            row = cursor.fetchone()
            before = 0 if row is None else int(row[0])
            if before == 0:
                return 0
            # Python's sqlite3 steps the pragma once, freeing one page, whatever its argument.
            for _ in range(min(pages, before)):
                await cursor.execute("PRAGMA incremental_vacuum(1)")
            await cursor.execute("PRAGMA freelist_count")
            row = cursor.fetchone()
            return before - (0 if row is None else int(row[0]))

        return await self.run("incremental_vacuum", txn)
