"""What the IMAP and POP3 readers share: their interface, the mailbox's identity, the report
ids, and :class:`Intake`, which stores and processes one fetched message.

The order is what makes a reader safe to stop at any point (docs/feedback-mailboxes.md):
store the message (its report id is derived from the mailbox and the message's UID, so a
second store is a no-op), call ``process`` and wait for its commit, delete or flag the
message on the server, and only then remember it as done (``mailbox_messages``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from email.parser import BytesHeaderParser
from email.utils import getaddresses

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from smartrelay.config import FeedbackMailbox
from smartrelay.storage.feedback import NewFeedback
from smartrelay.storage.store import Store

__all__ = [
    "MAX_MESSAGE_SIZE",
    "IMailboxReader",
    "Intake",
    "MailboxError",
    "ProcessReport",
    "envelope_of",
    "mailbox_identity",
    "malformed_reason",
    "report_id_for",
]

log = Logger()

#: A message bigger than this is not downloaded: its header is kept as an ``ignored`` report.
MAX_MESSAGE_SIZE = 25 * 1024 * 1024
#: How much of a too-big message's header is kept.
MAX_KEPT_HEADER = 64 * 1024

#: The feedback processor's entry point: process the stored report with this id; the returned
#: awaitable completes once the outcome is committed.
ProcessReport = Callable[[str], Awaitable[object]]

_HEADER_FIELD = re.compile(rb"^[!-9;-~]+[ \t]*:")


class MailboxError(Exception):
    """A mailbox session failed (refused login, protocol error, ...); one line, no password."""


class IMailboxReader(Interface):
    """Reads one POP3 or IMAP mailbox: each message is stored, processed, then deleted or
    flagged. A :class:`~smartrelay.feedback.mailboxes.service.MailboxService` runs it."""

    label = Attribute("The mailbox's URL without its password: for logs and report ids.")
    passes = Attribute("How many times the reader has gone through the whole mailbox.")

    def session() -> Deferred[None]:
        """Connect, log in and take every new message; then, where the server can tell of
        new messages (IMAP IDLE), wait for them and take them, until :meth:`stop`. Fires
        when the session ends normally (the service waits ``interval`` and starts another);
        fails with the reason when it broke (the service backs off)."""

    def stop() -> None:
        """End the session under way (if any): its Deferred then fires soon."""


def mailbox_identity(mailbox: FeedbackMailbox) -> str:
    """``scheme://user@host:port/folder``: the mailbox, without its password and spelled one
    way whatever the URL's spelling (the default port written or not). Part of every report
    id, so it must not change while the mailbox is the same."""
    user = mailbox.username or ""
    at = f"{user}@" if user else ""
    host = mailbox.host.lower()
    if ":" in host:
        host = f"[{host}]"
    folder = f"/{mailbox.mailbox}" if mailbox.scheme in ("imap", "imaps") else ""
    return f"{mailbox.scheme}://{at}{host}:{mailbox.port}{folder}"


def report_id_for(identity: str, uid: str) -> str:
    """The feedback report id of a mailbox's message: the same on every fetch of it."""
    digest = hashlib.sha256(f"{identity}\n{uid}".encode()).hexdigest()
    return "M" + digest[:31]


def malformed_reason(raw: bytes) -> str | None:
    """Why ``raw`` is no message at all (and is kept as ``ignored``), or None."""
    if not raw.strip():
        return "malformed message: empty"
    if b"\0" in raw:
        return "malformed message: contains NUL bytes"
    if not _HEADER_FIELD.match(raw):
        return "malformed message: does not begin with a header field"
    return None


def envelope_of(raw: bytes) -> tuple[str, tuple[str, ...]]:
    """(sender, recipients) of a fetched message, from its header: the sender from
    ``Return-Path``, the recipients from ``Delivered-To``, ``X-Original-To`` and ``To`` (where
    the processor looks for our VERP token). Never raises; "" and () when absent."""
    end = raw.find(b"\r\n\r\n")
    end2 = raw.find(b"\n\n")
    ends = [e for e in (end, end2) if e != -1]
    header = raw[: min(ends)] if ends else raw
    try:
        message = BytesHeaderParser().parsebytes(header[:MAX_KEPT_HEADER])
        return_path = [str(v) for v in message.get_all("Return-Path") or ()]
        sender = ""
        for _name, address in getaddresses(return_path[:1]):
            sender = address
        fields: list[str] = []
        for name in ("Delivered-To", "X-Original-To", "To"):
            fields += [str(v) for v in message.get_all(name) or ()]
        recipients = dict.fromkeys(
            address for _name, address in getaddresses(fields[:100]) if "@" in address
        )
        return sender, tuple(recipients)[:100]
    except Exception:  # a hostile header: the message is still stored
        return "", ()


def header_of(raw: bytes) -> bytes:
    """The header of ``raw`` (up to and with the empty line), at most MAX_KEPT_HEADER."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(separator)
        if end != -1:
            return raw[: min(end + len(separator), MAX_KEPT_HEADER)]
    return raw[:MAX_KEPT_HEADER]


@frozen
class Fetched:
    """What the intake did with one message: its report id, and whether it was new."""

    report_id: str
    stored: bool


class Intake:
    """Stores and processes the messages of one mailbox; remembers the ones done."""

    def __init__(
        self, identity: str, when_ready: Callable[[], Deferred[Store]], process: ProcessReport
    ) -> None:
        self.identity = identity
        self._when_ready = when_ready
        self._process = process

    def report_id(self, uid: str) -> str:
        return report_id_for(self.identity, uid)

    async def done(self, uids: list[str]) -> set[str]:
        """Those of ``uids`` already stored, processed and deleted/flagged."""
        store = await self._when_ready()
        return await store.mailbox_done(self.identity, uids)

    async def stored(self, uid: str) -> bool:
        """Whether message ``uid`` is stored already (a session broke after storing it)."""
        store = await self._when_ready()
        return await store.feedback_report_state(self.report_id(uid)) is not None

    async def take(self, uid: str, raw: bytes) -> Fetched:
        """Store the message ``uid`` and process it. A message stored before (a session
        broke after storing it) is not stored again, and processed only if it was not yet
        (its report is still ``new``): ``raw`` may then be empty."""
        store = await self._when_ready()
        report_id = self.report_id(uid)
        state = await store.feedback_report_state(report_id)
        stored = False
        if state is None:
            reason = malformed_reason(raw)
            sender, recipients = envelope_of(raw)
            report = NewFeedback(sender, recipients, raw, report_id=report_id)
            if reason is not None:
                await self._store_ignored(store, report, reason)
                return Fetched(report_id, stored=True)
            try:
                # Not notified: processed just below. A notification would start the
                # feedback service's pass on it as well (the report is processed once either
                # way, the second finding it done, but the work was done twice).
                await store.store_feedback(report, notify=False)
            except Exception:
                # A duplicate id: another session stored it first (it processes it too).
                if await store.feedback_report_state(report_id) is None:
                    raise
                return Fetched(report_id, stored=False)
            stored = True
        elif state != "new":
            return Fetched(report_id, stored=False)  # processed (or ignored) already
        await self._process(report_id)
        return Fetched(report_id, stored)

    async def take_too_big(self, uid: str, size: int, header: bytes) -> Fetched:
        """Keep the header of a message too big to download, as ``ignored``."""
        store = await self._when_ready()
        report_id = self.report_id(uid)
        if await store.feedback_report_state(report_id) is not None:
            return Fetched(report_id, stored=False)
        header = header_of(header)
        sender, recipients = envelope_of(header)
        reason = f"message too big: {size} bytes (more than {MAX_MESSAGE_SIZE}); not downloaded"
        report = NewFeedback(sender, recipients, header, report_id=report_id)
        await self._store_ignored(store, report, reason)
        return Fetched(report_id, stored=True)

    async def _store_ignored(self, store: Store, report: NewFeedback, reason: str) -> None:
        try:
            await store.store_ignored_feedback(report, reason)
        except Exception:
            if report.report_id is None:
                raise
            if await store.feedback_report_state(report.report_id) is None:
                raise
            return
        log.info(
            "mailbox {mailbox}: message {report_id} ignored: {reason}",
            mailbox=self.identity,
            report_id=report.report_id,
            reason=reason,
        )

    async def finished(self, uid: str) -> None:
        """Remember message ``uid`` as done (it is deleted or flagged on the server)."""
        store = await self._when_ready()
        await store.mark_mailbox_done(self.identity, uid, self.report_id(uid))

    async def forget_unlisted(self, listed: list[str]) -> None:
        """Forget the done messages that are no longer in the mailbox."""
        store = await self._when_ready()
        await store.forget_mailbox_messages(self.identity, listed)
