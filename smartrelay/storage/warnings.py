"""A message's content warnings (smartrelay/rewrap/content_checks.py): one ``warning`` event
per message, recorded once.

The event is inserted in the transaction that sets ``messages.warnings_checked_at``, and only
if that finds it NULL: a second writer (the message's next job, a retry after a restart,
another delivery process) inserts nothing. Calls made while a commit is under way share the
next transaction (group commit): a relay without DKIM keys records a warning for every
message, and this keeps that to a fraction of a transaction each.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime

from smartrelay.config import SuppressionConfig
from smartrelay.events import WarningEvent
from smartrelay.storage.base import StoreBase
from smartrelay.storage.batching import GroupCommitter
from smartrelay.storage.events import insert_events
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine

#: (queue id, the event)
WarningRecord = tuple[str, WarningEvent]


class WarningStore(StoreBase):
    def __init__(
        self,
        engine: IDatabaseEngine,
        clock: IReactorTime,
        suppression: SuppressionConfig | None = None,
    ) -> None:
        super().__init__(engine, clock, suppression)
        self._warning_committer: GroupCommitter[WarningRecord, bool] = GroupCommitter(
            self._record_warnings_batch, max_batch=200
        )

    async def record_warnings(self, queue_id: str, event: WarningEvent) -> bool:
        """Record the message's ``warning`` event unless its warnings are recorded already
        (or the message is gone); True if this call recorded it."""
        return await self._warning_committer.submit((queue_id, event))

    async def _record_warnings_batch(self, batch: Sequence[WarningRecord]) -> list[bool]:
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> list[bool]:
            recorded = []
            for queue_id, event in batch:
                await cursor.execute(
                    "UPDATE messages SET warnings_checked_at = ?"
                    " WHERE queue_id = ? AND warnings_checked_at IS NULL",
                    (now_ms, queue_id),
                )
                first = int(cursor.rowcount) == 1
                if first:
                    await insert_events(cursor, now_ms, [(queue_id, "", event)])
                recorded.append(first)
            return recorded

        return await self.run("record_warnings", txn)
