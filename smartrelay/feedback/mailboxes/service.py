"""One service per ``[[feedback.mailboxes]]`` entry: runs the reader's sessions, one after
another, with its own backoff.

A session that ends normally is followed by another after ``interval``; a failed one (a
refused login, a dead server, a broken connection, a database error) by one log line naming
the mailbox (never its password) and another try after a wait that doubles with each failure
in a row (``first_retry`` up to ``max_retry``). Nothing a mailbox does stops the relay.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from smartrelay.config import FeedbackMailbox
from smartrelay.feedback.mailboxes.base import (
    IMailboxReader,
    Intake,
    ProcessReport,
    mailbox_identity,
)
from smartrelay.feedback.mailboxes.imap import ImapReader
from smartrelay.feedback.mailboxes.pop3 import Pop3Reader
from smartrelay.feedback.mailboxes.session import DEFAULT_TUNABLES, ReaderTunables, describe
from smartrelay.reactor import IRelayReactor
from smartrelay.storage.store import Store

__all__ = ["MailboxService", "mailbox_services", "make_reader"]

log = Logger()


def make_reader(
    mailbox: FeedbackMailbox,
    reactor: IRelayReactor,
    when_ready: Callable[[], Deferred[Store]],
    process: ProcessReport,
    tunables: ReaderTunables = DEFAULT_TUNABLES,
) -> IMailboxReader:
    """The reader for ``mailbox``'s scheme."""
    intake = Intake(mailbox_identity(mailbox), when_ready, process)
    if mailbox.scheme in ("imap", "imaps"):
        return ImapReader(mailbox, intake, reactor, tunables)
    return Pop3Reader(mailbox, intake, reactor, tunables)


def mailbox_services(
    mailboxes: tuple[FeedbackMailbox, ...],
    reactor: IRelayReactor,
    when_ready: Callable[[], Deferred[Store]],
    process: ProcessReport,
    tunables: ReaderTunables = DEFAULT_TUNABLES,
) -> list[MailboxService]:
    """A :class:`MailboxService` for each configured mailbox."""
    return [
        MailboxService(
            make_reader(mailbox, reactor, when_ready, process, tunables),
            reactor,
            mailbox.interval,
            tunables,
        )
        for mailbox in mailboxes
    ]


class MailboxService(Service):
    """Runs ``reader``'s sessions until the service stops (see the module docstring)."""

    def __init__(
        self,
        reader: IMailboxReader,
        reactor: IRelayReactor,
        interval: float,
        tunables: ReaderTunables = DEFAULT_TUNABLES,
    ) -> None:
        self.reader = reader
        self.name = f"mailbox {reader.label}"
        self._reactor = reactor
        self._interval = interval
        self._tunables = tunables
        self._loop: Deferred[None] | None = None
        self._sleep: Deferred[None] | None = None
        #: Sessions that failed in a row (0 after a good one).
        self.failures = 0
        #: Sessions that ended normally.
        self.sessions = 0

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        log.info("mailbox {mailbox}: reading", mailbox=self.reader.label)
        self._loop = Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        retry = self._tunables.first_retry
        while self.running:
            try:
                await self.reader.session()
            except Exception as error:
                if not self.running:
                    return
                self.failures += 1
                log.warn(
                    "mailbox {mailbox}: {reason}; trying again in {retry:g} s",
                    mailbox=self.reader.label,
                    reason=describe(error),
                    retry=retry,
                )
                wait, retry = retry, min(retry * 2, self._tunables.max_retry)
            else:
                if self.failures:
                    log.info("mailbox {mailbox}: reading again", mailbox=self.reader.label)
                self.failures = 0
                self.sessions += 1
                retry = self._tunables.first_retry
                wait = self._interval
            if not self.running:
                return
            self._sleep = deferLater(self._reactor, wait, lambda: None)
            try:
                await self._sleep
            except CancelledError:
                return
            finally:
                self._sleep = None

    def stopService(self) -> Deferred[None]:
        """Ends the session under way; fires once it has (a message being stored or
        processed is finished first)."""
        super().stopService()  # type: ignore[no-untyped-call]
        self.reader.stop()
        if self._sleep is not None:
            self._sleep.cancel()
        loop, self._loop = self._loop, None
        if loop is None:
            return Deferred.fromCoroutine(_nothing())
        return loop


async def _nothing() -> None:
    return None
