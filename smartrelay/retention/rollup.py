"""The background roll-up: counts new events into the hourly ``rollups`` table.

Every :data:`ROLLUP_INTERVAL` seconds (soon again while batches come back full: after
:data:`CATCH_UP_PAUSE` times as long as the batch took) it calls
``store.roll_up(now - ROLLUP_LAG, ROLLUP_BATCH)``; each call is one transaction, idempotent
and restart-safe (:mod:`smartrelay.storage.rollups`). Only the relay's main process runs it;
nodes sharing one PostgreSQL may all run it (they take turns on an advisory lock).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.rollups import RollupStore

log = Logger()

#: How far behind the clock the roll-up reads (seconds). On PostgreSQL an event's row becomes
#: visible when its transaction commits, after its time was taken: the roll-up counts an
#: event only once its time is this far in the past, so that its transaction has committed
#: (docs/storage.md, "Roll-ups").
ROLLUP_LAG = 60.0
#: Seconds between passes when the roll-up has caught up.
ROLLUP_INTERVAL = 10.0
#: Events per transaction.
ROLLUP_BATCH = 5000
#: While catching up (full batches), the pause after a batch, as a multiple of the time it
#: took: the roll-up then holds the database at most a quarter of the time, and the delivery
#: path (whose commits wait behind a batch on SQLite) keeps the rest.
CATCH_UP_PAUSE = 3.0


class RollupService(Service):
    """Runs roll-up passes on ``clock``, one at a time, for as long as it runs.

    ``store``: the store, or a callable giving a Deferred of it once the database is open
    (``StorageService.when_ready``). Errors are logged and the pass is tried again at the next
    tick; ``stopService`` waits for a pass under way.
    """

    name = "rollup"

    def __init__(
        self,
        clock: IReactorTime,
        store: RollupStore | Callable[[], Awaitable[RollupStore]],
        interval: float = ROLLUP_INTERVAL,
        batch: int = ROLLUP_BATCH,
    ) -> None:
        self._clock = clock
        self._store: RollupStore | None = None
        self._store_ready: Callable[[], Awaitable[RollupStore]] | None = None
        if isinstance(store, RollupStore):
            self._store = store
        else:
            self._store_ready = store
        self._interval = interval
        self._batch = batch
        self._call: IDelayedCall | None = None
        self._pass: Deferred[bool] | None = None
        self._idle_waiters: list[Deferred[None]] = []
        self._failing = False
        self._took = 0.0
        #: Passes finished (whatever their outcome) and events counted, since the start.
        self.passes = 0
        self.counted = 0
        #: Seconds the passes that succeeded took (on SQLite, the write lock held), in all.
        self.busy = 0.0

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._store is not None:
            self._schedule(0)
        else:
            # Not a pass: stopService does not wait for the storage to open.
            Deferred.fromCoroutine(self._wait_for_store()).addErrback(self._no_store)

    async def _wait_for_store(self) -> None:
        assert self._store_ready is not None
        self._store = await self._store_ready()
        self._schedule(0)

    def _no_store(self, failure: Failure) -> None:
        """The storage did not open (it reports that itself, as fatal) or stopped first."""
        log.debug("roll-up: no store: {error}", error=failure.getErrorMessage())

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return self.idle()

    def idle(self) -> Deferred[None]:
        """Fires when no pass is under way (now, or when the one under way ends)."""
        if self._pass is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _schedule(self, delay: float) -> None:
        if self.running and self._call is None:
            self._call = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        store = self._store
        if not self.running or self._pass is not None or store is None:
            return
        self._pass = Deferred.fromCoroutine(self._run_pass(store))
        self._pass.addCallback(self._pass_done)

    async def _run_pass(self, store: RollupStore) -> bool:
        """One batch; True when it was full (more may be waiting)."""
        started = self._clock.seconds()
        try:
            counted = await store.roll_up(started - ROLLUP_LAG, self._batch)
        except DatabaseUnavailable as error:
            if not self._failing:
                log.warn(
                    "roll-up: database unavailable ({error}); trying again every {interval} s",
                    error=str(error),
                    interval=self._interval,
                )
            self._failing = True
            return False
        except Exception:
            log.failure(
                "roll-up pass failed; trying again in {interval} s", interval=self._interval
            )
            self._failing = True
            return False
        if self._failing:
            log.info("roll-up: working again")
            self._failing = False
        self.counted += counted
        self._took = max(self._clock.seconds() - started, 0.0)
        self.busy += self._took
        # One line per pass that counted something, at debug level (an idle relay's log stays
        # quiet): bench/relay.py --rollup-cost sums these; ``busy`` has every pass.
        if counted:
            log.debug(
                "roll-up pass: {counted} events in {took:.4f} s",
                counted=counted,
                took=self._took,
            )
        return counted >= self._batch

    def _pass_done(self, full: bool) -> None:
        self._pass = None
        self.passes += 1
        # A full batch: the next one soon, after a pause in proportion to the batch.
        self._schedule(self._took * CATCH_UP_PAUSE if full else self._interval)
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)
