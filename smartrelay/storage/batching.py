"""Group commit: requests that arrive while a transaction is in flight share the next one.

One fsync (SQLite) or one round of commit latency (PostgreSQL) then serves many SMTP sessions,
and no caller hears back before the transaction holding its request has committed. Reads that
many callers make at once (the suppression lookup before each delivery) are batched the same
way: one query for all, started after each caller asked.

A committer that is idle starts a batch at once, for a single item if need be. Where a few
milliseconds more per item cost nothing and each transaction costs CPU, it may instead
gather items for a while (:meth:`GroupCommitter.gather`; the delivery's, see
:meth:`~smartrelay.storage.store.Store.gather_delivery_batches`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.storage.pool import DatabaseUnavailable

Item = TypeVar("Item")
Result = TypeVar("Result")

log = Logger()


class GroupCommitter(Generic[Item, Result]):
    """Runs ``run_batch`` over queued items, at most ``max_in_flight`` batches at a time.

    If a batch of several items fails, each item is retried alone, so one bad item fails only
    its own caller; but not when the database was unavailable: every caller gets that error
    (a commit whose outcome is unknown may have stored the whole batch, and storing each item
    again would store it twice).
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        max_batch: int = 200,
        max_in_flight: int = 1,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._pending: list[tuple[Item, Deferred[Result]]] = []
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self.batches = 0  # committed transactions, for tests and metrics
        self._gather = 0.0
        self._clock: IReactorTime | None = None
        self._others_may_join: Callable[[int], bool] = lambda pending: True
        self._oldest_at = 0.0  # when the oldest pending item came (with gather only)
        self._last_done = 0.0  # when the last batch ended (with gather only)
        self._gathering: IDelayedCall | None = None

    def gather(
        self,
        seconds: float,
        clock: IReactorTime,
        others_may_join: Callable[[int], bool] | None = None,
    ) -> None:
        """Start a batch ``seconds`` after its oldest item came or the last batch ended,
        whichever is later, not at once (0: at once), while ``others_may_join(items
        pending)`` says more items may come; a batch already full (``max_batch`` items)
        starts at once. So a busy committer runs at most one batch per ``seconds`` plus a
        commit's time, and an item waits at most for the batch in flight, ``seconds``, and
        its own batch."""
        self._gather = seconds
        self._clock = clock
        if others_may_join is not None:
            self._others_may_join = others_may_join

    def submit(self, item: Item) -> Deferred[Result]:
        result: Deferred[Result] = Deferred()
        if not self._pending and self._clock is not None:
            self._oldest_at = self._clock.seconds()
        self._pending.append((item, result))
        self._maybe_start()
        return result

    def _maybe_start(self) -> None:
        while self._pending and self._in_flight < self.max_in_flight:
            waiting = len(self._pending)
            if self._gather > 0 and waiting < self._max_batch and self._others_may_join(waiting):
                assert self._clock is not None  # set with the gather time
                since = max(self._oldest_at, self._last_done)
                wait = since + self._gather - self._clock.seconds()
                if wait > 0:
                    if self._gathering is None:
                        self._gathering = self._clock.callLater(wait, self._gathered)
                    return
            if self._gathering is not None:  # started sooner (full, or nobody else to wait for)
                self._gathering.cancel()
                self._gathering = None
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            self._in_flight += 1
            Deferred.fromCoroutine(self._run(batch))

    def _gathered(self) -> None:
        self._gathering = None
        self._maybe_start()

    async def _run(self, batch: list[tuple[Item, Deferred[Result]]]) -> None:
        try:
            await self._commit(batch)
        finally:
            self._in_flight -= 1
            if self._clock is not None:
                self._last_done = self._clock.seconds()
            self._maybe_start()

    async def _commit(self, batch: list[tuple[Item, Deferred[Result]]]) -> None:
        try:
            results = await self._run_batch([item for item, _ in batch])
        except Exception:
            failure = Failure()
            if len(batch) == 1 or failure.check(DatabaseUnavailable):
                for _, waiter in batch:
                    waiter.errback(failure)
                return
            log.info(
                "group commit of {n} failed ({error}); retrying one by one",
                n=len(batch),
                error=failure.getErrorMessage(),
            )
            for one in batch:
                await self._commit([one])
            return
        self.batches += 1
        for (_, waiter), result in zip(batch, results, strict=True):
            waiter.callback(result)
