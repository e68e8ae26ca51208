"""The purge: deletes what ``[retention]`` says is old, in small paced batches.

A pass works through four kinds of data, oldest first, one batch (one short transaction, see
:mod:`smartrelay.storage.retention`) at a time: the bodies of finished messages, finished
messages with their recipients, events (never past what the roll-ups have counted, so report
totals outlive them), feedback reports; then, on SQLite, it gives freed pages back to the file
system. After each batch it pauses for ``(1 - duty) / duty`` times as long as the batch took,
so it holds the database at most ``duty`` of the time (5 % on PostgreSQL, 2 % on SQLite, whose
one write lock the delivery path's commits wait for), and the delivery path keeps the rest. A
pass that finds nothing to do costs five index lookups.

Nothing is remembered between batches: a pass interrupted (stopped, killed, the database gone)
is simply taken up by the next one, and several nodes purging one PostgreSQL at once delete
each row once (``SKIP LOCKED``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from attrs import evolve, frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from smartrelay.config import RetentionConfig
from smartrelay.storage.base import to_ms
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.store import PurgeBatch, PurgeCutoffs, Store

log = Logger()


@frozen
class PurgePacing:
    #: Rows per batch (events, feedback reports) and messages per batch.
    rows: int = 2000
    messages: int = 500
    #: Bytes of message bodies freed per batch at most (at least one message a batch): what a
    #: batch costs is mostly in proportion to them, and on SQLite the relay's commits wait.
    body_bytes: int = 1 << 20
    #: Share of the time the purge may spend in its transactions (PostgreSQL, where they run
    #: in the server beside the relay's).
    duty: float = 0.05
    #: The same on SQLite, where a batch holds the one write lock and its page work is the
    #: purging process's own CPU: at 5 % the delivery path lost up to 4 % (docs/performance.md,
    #: "Retention"); 2 % still purges several times what a relay sending a million messages a
    #: day makes.
    sqlite_duty: float = 0.02
    #: The shortest pause between two batches, seconds.
    min_pause: float = 0.01
    #: Seconds between the end of a pass and the start of the next.
    interval: float = 300.0
    #: Seconds after start-up before the first pass.
    first_delay: float = 60.0
    #: SQLite pages (4 KiB) given back to the file system per transaction.
    vacuum_pages: int = 1000


@frozen
class PurgeReport:
    """What one pass deleted."""

    message_bodies: int = 0
    messages: int = 0
    recipients: int = 0
    events: int = 0
    feedback_reports: int = 0
    #: SQLite pages given back to the file system.
    pages_freed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "message_bodies": self.message_bodies,
            "messages": self.messages,
            "recipients": self.recipients,
            "events": self.events,
            "feedback_reports": self.feedback_reports,
            "pages_freed": self.pages_freed,
        }

    @property
    def anything(self) -> bool:
        return any(self.as_dict().values())


class PurgeStopped(Exception):
    """The pass was asked to stop between two batches."""


class Purger:
    """Runs purge passes against ``store`` with the ``retention`` settings."""

    def __init__(
        self,
        store: Store,
        retention: RetentionConfig,
        pacing: PurgePacing | None = None,
        progress: Callable[[str, int], object] | None = None,
        timer: IReactorTime | None = None,
    ) -> None:
        """What is due is decided by the store's clock; ``timer`` (the store's clock unless
        given) times the batches and the pauses between them."""
        self._store = store
        self._clock = store.clock
        self._timer = timer or store.clock
        self._pacing = pacing or PurgePacing()
        sqlite = store.engine.name == "sqlite"
        self._duty = self._pacing.sqlite_duty if sqlite else self._pacing.duty
        self._retention = retention
        self._progress = progress
        self._pause: Deferred[None] | None = None
        self._stopping = False

    async def cutoffs(self, rolled_up_until: int | None = None) -> PurgeCutoffs:
        """What is due now; events only before ``rolled_up_until`` (ms; by default, where the
        roll-ups have got to)."""
        now = self._clock.seconds()
        if rolled_up_until is None:
            position = await self._store.rollup_position()
            rolled_up_until = 0 if position is None else to_ms(position)
        return PurgeCutoffs(
            bodies=to_ms(now - self._retention.message_bodies),
            messages=to_ms(now - self._retention.events),
            events=min(to_ms(now - self._retention.events), rolled_up_until),
            feedback_reports=to_ms(now - self._retention.feedback_reports),
        )

    async def count(self, rolled_up_until: int | None = None) -> dict[str, int]:
        """What a pass would delete now (``--dry-run``), the roll-ups being at
        ``rolled_up_until`` (ms; by default where they are)."""
        return await self._store.count_purgeable(await self.cutoffs(rolled_up_until))

    async def run_pass(self) -> PurgeReport:
        """Delete everything due now, batch by batch, with pauses; returns what went."""
        cutoffs = await self.cutoffs()
        pacing, store = self._pacing, self._store
        report = PurgeReport()

        bodies = await self._drain(
            "message_bodies",
            lambda: store.purge_bodies(cutoffs.bodies, pacing.messages, pacing.body_bytes),
            pacing.messages,
            byte_bounded=True,
        )
        report = evolve(report, message_bodies=bodies.rows)
        messages = await self._drain(
            "messages",
            lambda: store.purge_messages(cutoffs.messages, pacing.messages, pacing.body_bytes),
            pacing.messages,
            byte_bounded=True,
        )
        report = evolve(report, messages=messages.rows, recipients=messages.recipients)
        events = await self._drain(
            "events", lambda: store.purge_events(cutoffs.events, pacing.rows), pacing.rows
        )
        report = evolve(report, events=events.rows)
        feedback = await self._drain(
            "feedback_reports",
            lambda: store.purge_feedback_reports(cutoffs.feedback_reports, pacing.rows),
            pacing.rows,
        )
        report = evolve(report, feedback_reports=feedback.rows)
        pages = await self._drain(
            "pages_freed",
            lambda: self._free_pages(pacing.vacuum_pages),
            pacing.vacuum_pages,
        )
        return evolve(report, pages_freed=pages.rows)

    async def _free_pages(self, pages: int) -> PurgeBatch:
        return PurgeBatch(await self._store.free_pages(pages))

    async def _drain(
        self,
        name: str,
        batch: Callable[[], Awaitable[PurgeBatch]],
        full: int,
        byte_bounded: bool = False,
    ) -> PurgeBatch:
        """Run ``batch`` until one comes back short of ``full`` rows (or, for batches cut
        short by their byte budget, empty); the sum of all. Every batch that did something is
        followed by its pause."""
        rows = recipients = 0
        while True:
            if self._stopping:
                raise PurgeStopped()
            started = self._timer.seconds()
            done = await batch()
            took = max(self._timer.seconds() - started, 0.0)
            if done.rows == 0:
                return PurgeBatch(rows, recipients)
            rows += done.rows
            recipients += done.recipients
            if self._progress is not None:
                self._progress(name, rows)
            duty = self._duty
            await self._sleep(max(self._pacing.min_pause, took * (1 - duty) / duty))
            if done.rows < full and not byte_bounded:
                return PurgeBatch(rows, recipients)

    async def _sleep(self, seconds: float) -> None:
        self._pause = deferLater(self._timer, seconds, lambda: None)
        try:
            await self._pause
        except CancelledError:
            raise PurgeStopped() from None
        finally:
            self._pause = None

    def stop(self) -> None:
        """Make a pass under way stop after its current batch (PurgeStopped)."""
        self._stopping = True
        if self._pause is not None:
            self._pause.cancel()


class PurgeService(Service):
    """Runs a :class:`Purger` pass ``pacing.interval`` seconds after the last one ended."""

    name = "purge"

    def __init__(
        self,
        store_ready: Callable[[], Awaitable[Store]],
        clock: IReactorTime,
        retention: RetentionConfig,
        pacing: PurgePacing | None = None,
    ) -> None:
        self._store_ready = store_ready
        self._clock = clock
        self._retention = retention
        self._pacing = pacing or PurgePacing()
        self._purger: Purger | None = None
        self._timer: IDelayedCall | None = None
        self._running: Deferred[None] | None = None
        self.passes = 0  # passes completed, for tests

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._schedule(self._pacing.first_delay)

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._timer = self._clock.callLater(delay, self._start_pass)

    def _start_pass(self) -> None:
        self._timer = None
        self._running = Deferred.fromCoroutine(self._pass())

    async def _pass(self) -> None:
        try:
            store = await self._store_ready()
            self._purger = Purger(store, self._retention, self._pacing, timer=self._clock)
            report = await self._purger.run_pass()
            self.passes += 1
            if report.anything:
                log.info(
                    "purge: removed {message_bodies} message bodies, {messages} messages"
                    " ({recipients} recipients), {events} events, {feedback_reports} feedback"
                    " reports; {pages_freed} database pages freed",
                    **report.as_dict(),
                )
        except PurgeStopped:
            return
        except DatabaseUnavailable as error:
            log.warn("purge: database unavailable ({error}); trying again later", error=error)
        except Exception:
            log.failure("purge: a pass failed; trying again later")
        finally:
            self._purger = None
            self._running = None
        self._schedule(self._pacing.interval)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._purger is not None:
            self._purger.stop()
        running = self._running
        if running is None:
            return None
        done: Deferred[None] = Deferred()
        running.addBoth(lambda _: done.callback(None))
        return done
