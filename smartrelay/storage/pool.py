"""A fixed set of database connections and the one transaction runner both engines share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from smartrelay.spool import SpooledBody
from smartrelay.storage.interfaces import ICursor, Row, Transaction

T = TypeVar("T")
C = TypeVar("C")

log = Logger()


class DatabaseUnavailable(Exception):
    """The database cannot be reached now (a restart, a network cut): try again later.

    Raised once the pool has dropped the broken connection and, when that was safe, tried the
    transaction again. Nothing of the transaction was committed, unless the error is a
    :class:`CommitOutcomeUnknown`."""


class CommitOutcomeUnknown(DatabaseUnavailable):
    """The connection broke while COMMIT was on its way: the transaction may have committed
    or not. Never retried by the pool: a caller whose transaction is not idempotent (storing
    a message) must not run it again as if it had failed."""


#: Reconnecting after a connection broke: first wait, and the most it grows to (doubling).
RECONNECT_MIN = 0.05
RECONNECT_MAX = 1.0
#: How long opening one connection may take before it counts as failed.
CONNECT_TIMEOUT = 10.0


class _Slot(Generic[C]):
    """One place in the pool: a connection, or None after it broke (reopened on checkout)."""

    def __init__(self, connection: C | None) -> None:
        self.connection = connection


class PooledEngine(ABC, Generic[C]):
    """Runs transactions on a fixed pool of connections of type ``C``.

    Subclasses say how to open and close a connection, whether one is broken, and how to run
    one transaction on it; everything else (checking connections out, replacing broken ones
    with backoff, trying a transaction again when that is safe, notifications after commit,
    waiting for work under way at close) lives here once.
    """

    def __init__(self, pool_size: int, clock: IReactorTime | None = None) -> None:
        self._pool_size = pool_size
        self._clock = clock
        self._slots: list[_Slot[C]] = []
        self._free: DeferredQueue[_Slot[C]] = DeferredQueue()
        self._observers: dict[str, list[Callable[[], object]]] = {}
        self._closed = False
        # Reconnecting: no new attempt before _retry_at; _backoff doubles per failure.
        self._backoff = 0.0
        self._retry_at = float("-inf")
        self._down_since: float | None = None
        self._last_error = ""

    @property
    def pool_size(self) -> int:
        """How many transactions may run at once (one a connection)."""
        return self._pool_size

    @property
    def _connections(self) -> list[C]:
        return [slot.connection for slot in self._slots if slot.connection is not None]

    # -- what an engine supplies ------------------------------------------------------------
    @abstractmethod
    async def _open_connection(self) -> C: ...

    @abstractmethod
    def _close_connection(self, connection: C) -> Deferred[None]: ...

    def _is_broken(self, connection: C) -> bool:
        """True when ``connection`` is known to be unusable (closed by the server)."""
        return False

    @abstractmethod
    async def _transact(
        self, connection: C, name: str, txn: Transaction[T], readonly: bool
    ) -> tuple[T, Sequence[str]]:
        """Begin, ``txn``, commit (or roll back if anything raises) on ``connection``: the
        result and the channels the transaction notified. A broken connection is reported as
        :class:`DatabaseUnavailable` (or :class:`CommitOutcomeUnknown`), anything else as it
        was raised."""

    # -- shared machinery -------------------------------------------------------------------
    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            for _ in range(self._pool_size):
                slot = _Slot(await self._open_connection())
                self._slots.append(slot)
                self._free.put(slot)
        except BaseException:
            await self._close()  # what did open must not linger (threads, sockets)
            raise

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Take every connection back first: this waits for transactions under way.
        for _ in self._slots:
            await self._free.get()
        await gatherResults([self._close_connection(c) for c in self._connections])
        self._slots.clear()

    def run_interaction(
        self, name: str, txn: Transaction[T], readonly: bool = False
    ) -> Deferred[T]:
        return Deferred.fromCoroutine(self._run_interaction(name, txn, readonly))

    async def _run_interaction(self, name: str, txn: Transaction[T], readonly: bool) -> T:
        # After a server restart every pooled connection is dead, and one may not know it yet:
        # a transaction that failed on a broken connection (before COMMIT was sent, so the
        # server rolled it back) runs again on another, up to once per connection.
        attempts = self._pool_size + 1
        for attempt in range(1, attempts + 1):
            if self._closed:
                raise RuntimeError(f"database closed; cannot run {name}")
            slot = await self._checkout()
            connection = slot.connection
            assert connection is not None
            try:
                result, notifications = await self._transact(connection, name, txn, readonly)
            except DatabaseUnavailable as error:
                self._discard(slot)
                self._free.put(slot)
                if isinstance(error, CommitOutcomeUnknown) or attempt == attempts:
                    raise
                log.info(
                    "database: {name} failed on a broken connection ({error}); trying again",
                    name=name,
                    error=error,
                )
                continue
            except BaseException:
                self._free.put(slot)
                raise
            self._free.put(slot)
            self._fire_local(notifications)
            return result
        raise AssertionError("unreachable")

    def add_local_observer(self, channel: str, callback: Callable[[], object]) -> None:
        self._observers.setdefault(channel, []).append(callback)

    def _fire_local(self, channels: Sequence[str]) -> None:
        for channel in channels:
            for callback in self._observers.get(channel, ()):
                try:
                    callback()
                except Exception:
                    log.failure("notification observer for {channel} failed", channel=channel)

    async def _checkout(self) -> _Slot[C]:
        """A slot with a live connection; a broken one is reopened first (with backoff)."""
        slot = await self._free.get()
        if slot.connection is not None and not self._is_broken(slot.connection):
            return slot
        self._discard(slot)
        try:
            slot.connection = await self._reconnect()
        except BaseException:
            self._free.put(slot)
            raise
        return slot

    def _discard(self, slot: _Slot[C]) -> None:
        connection, slot.connection = slot.connection, None
        if connection is not None:
            self._close_connection(connection).addErrback(
                lambda f: log.failure("closing a broken connection failed", f)
            )

    async def _reconnect(self) -> C:
        """A new connection, or DatabaseUnavailable at once while the last attempt failed
        less than the backoff ago (an SMTP client then hears 4xx now, not after a wait)."""
        assert self._clock is not None, "an engine whose connections break needs a clock"
        now = self._clock.seconds()
        if self._closed:
            raise DatabaseUnavailable("database closed")
        if now < self._retry_at:
            raise DatabaseUnavailable(f"database unavailable: {self._last_error}")
        try:
            connection = await self._open_connection()
        except Exception as error:
            self._last_error = " ".join(str(error).split()) or type(error).__name__
            self._backoff = min(max(self._backoff * 2, RECONNECT_MIN), RECONNECT_MAX)
            self._retry_at = self._clock.seconds() + self._backoff
            if self._down_since is None:
                self._down_since = now
                log.warn(
                    "database unavailable ({error}); reconnecting with backoff",
                    error=self._last_error,
                )
            raise DatabaseUnavailable(f"database unavailable: {self._last_error}") from error
        if self._down_since is not None:
            log.info(
                "database connection restored after {seconds:.1f} s",
                seconds=self._clock.seconds() - self._down_since,
            )
        self._backoff, self._retry_at, self._down_since = 0.0, float("-inf"), None
        return connection


@implementer(ICursor)
class NotifyingCursor(ABC):
    """Cursor base keeping the channels to wake once the transaction commits."""

    rowcount: int

    def __init__(self) -> None:
        self.pending_notifications: list[str] = []

    @abstractmethod
    def execute(self, sql: str, args: Sequence[Any] = ()) -> Deferred[None]: ...

    @abstractmethod
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Deferred[None]: ...

    @abstractmethod
    def write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> Deferred[None]: ...

    @abstractmethod
    def fetchone(self) -> Row | None: ...

    @abstractmethod
    def fetchall(self) -> list[Row]: ...

    @abstractmethod
    def notify(self, channel: str) -> Deferred[None]: ...

    @abstractmethod
    def read_blob(self, table: str, column: str, key_column: str, key: str) -> Deferred[bytes]: ...

    @abstractmethod
    def write_blob(
        self, table: str, column: str, key_column: str, key: str, head: bytes, body: SpooledBody
    ) -> Deferred[None]: ...


__all__ = [
    "CommitOutcomeUnknown",
    "DatabaseUnavailable",
    "ICursor",
    "NotifyingCursor",
    "PooledEngine",
]
