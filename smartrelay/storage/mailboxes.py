"""``mailbox_messages``: what the ``[[feedback.mailboxes]]`` readers have finished with.

A row says that a mailbox's message (by IMAP ``UIDVALIDITY:UID`` or POP3 UIDL) was stored as
a feedback report and processed; only its deletion or ``\\Seen`` flag may still be missing.
The readers look their listing up here before they download anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from smartrelay.storage.base import StoreBase, chunks, marks
from smartrelay.storage.interfaces import ICursor


class MailboxStore(StoreBase):
    async def mailbox_done(self, mailbox: str, uids: Sequence[str]) -> set[str]:
        """Those of ``uids`` that ``mailbox``'s reader has finished with."""

        async def txn(cursor: ICursor) -> set[str]:
            done: set[str] = set()
            for part in chunks(uids):
                await cursor.execute(
                    "SELECT uid FROM mailbox_messages"
                    f" WHERE mailbox = ? AND uid IN ({marks(len(part))})",
                    (mailbox, *part),
                )
                done.update(str(row[0]) for row in cursor.fetchall())
            return done

        return await self.run("mailbox_done", txn, readonly=True)

    async def mark_mailbox_done(self, mailbox: str, uid: str, report_id: str) -> None:
        """Remember that ``mailbox``'s message ``uid`` (report ``report_id``) is done."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> None:
            await cursor.execute(
                "INSERT INTO mailbox_messages (mailbox, uid, report_id, done_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (mailbox, uid) DO NOTHING",
                (mailbox, uid, report_id, now_ms),
            )

        await self.run("mark_mailbox_done", txn)

    async def forget_mailbox_messages(self, mailbox: str, listed: Sequence[str]) -> int:
        """Forget ``mailbox``'s rows whose message is not in ``listed`` (the mailbox's whole
        current listing, by the same kind of uid): they are gone from the server. Returns how
        many rows went. A listing of another UIDVALIDITY drops every older row."""

        async def find(cursor: ICursor) -> list[str]:
            await cursor.execute("SELECT uid FROM mailbox_messages WHERE mailbox = ?", (mailbox,))
            return [str(row[0]) for row in cursor.fetchall()]

        keep = set(listed)
        gone = [
            uid for uid in await self.run("mailbox_rows", find, readonly=True) if uid not in keep
        ]
        if not gone:
            return 0

        async def delete(cursor: ICursor) -> None:
            for part in chunks(gone):
                await cursor.execute(
                    "DELETE FROM mailbox_messages"
                    f" WHERE mailbox = ? AND uid IN ({marks(len(part))})",
                    (mailbox, *part),
                )

        await self.run("forget_mailbox_messages", delete)
        return len(gone)

    async def feedback_report_state(self, report_id: str) -> str | None:
        """The state of the feedback report with this id, or None when there is none."""

        async def txn(cursor: ICursor) -> str | None:
            await cursor.execute(
                "SELECT state FROM feedback_reports WHERE report_id = ?", (report_id,)
            )
            row = cursor.fetchone()
            return None if row is None else str(row[0])

        return await self.run("feedback_report_state", txn, readonly=True)
