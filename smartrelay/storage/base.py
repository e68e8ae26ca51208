"""What every topic store shares: the engine, the clock, one way of running a query.

A query is written once, as ``async def txn(cursor: ICursor) -> T`` inside the method that
needs it, and run with :meth:`StoreBase.run` (one transaction; committed if it returns). Times
cross the storage API as float seconds (the clock's unit) and are stored as integer
milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from twisted.internet.interfaces import IReactorTime

from smartrelay.config import SuppressionConfig
from smartrelay.storage.interfaces import IDatabaseEngine, Transaction

T = TypeVar("T")
Item = TypeVar("Item")

#: Rows (or IN-list values) per statement: at most 3,001 parameters, under SQLite's 32,766.
ROWS_PER_STATEMENT = 500


def to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def from_ms(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def marks(n: int) -> str:
    """``?, ?, ...``: ``n`` placeholders for an IN list or a VALUES row."""
    return ", ".join("?" * n)


def chunks(items: Sequence[Item], size: int = ROWS_PER_STATEMENT) -> Iterator[Sequence[Item]]:
    """``items`` in slices of at most ``size`` (one statement each)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class StoreBase:
    """The state every topic store (queue, suppressions, events, ...) works with.

    The topic stores are mixins of :class:`smartrelay.storage.store.Store`; each takes the same
    constructor arguments and passes them on (``super().__init__``).
    """

    def __init__(
        self,
        engine: IDatabaseEngine,
        clock: IReactorTime,
        suppression: SuppressionConfig | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        #: With a policy, delivery outcomes add and clear suppressions (smartrelay.suppression).
        self.suppression = suppression

    def now_ms(self) -> int:
        return to_ms(self.clock.seconds())

    async def run(self, name: str, txn: Transaction[T], readonly: bool = False) -> T:
        """Run ``txn`` in one transaction (named for logs and retries)."""
        return await self.engine.run_interaction(name, txn, readonly=readonly)
