"""A fixed set of database connections and the one transaction runner both engines share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from smartrelay.spool import SpooledBody
from smartrelay.storage.interfaces import ICursor, Row, Transaction

T = TypeVar("T")
C = TypeVar("C")

log = Logger()


class PooledEngine(ABC, Generic[C]):
    """Runs transactions on a fixed pool of connections of type ``C``.

    Subclasses say how to open and close a connection and how to run one transaction on it;
    everything else (checking connections out, notifications after commit, waiting for work
    under way at close) lives here once.
    """

    def __init__(self, pool_size: int) -> None:
        self._pool_size = pool_size
        self._connections: list[C] = []
        self._free: DeferredQueue[C] = DeferredQueue()
        self._observers: dict[str, list[Callable[[], object]]] = {}
        self._closed = False

    # -- what an engine supplies ------------------------------------------------------------
    @abstractmethod
    async def _open_connection(self) -> C: ...

    @abstractmethod
    def _close_connection(self, connection: C) -> Deferred[None]: ...

    @abstractmethod
    async def _transact(
        self, connection: C, name: str, txn: Transaction[T], readonly: bool
    ) -> tuple[T, Sequence[str]]:
        """Begin, ``txn``, commit (or roll back if anything raises) on ``connection``: the
        result and the channels the transaction notified."""

    # -- shared machinery -------------------------------------------------------------------
    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            for _ in range(self._pool_size):
                connection = await self._open_connection()
                self._connections.append(connection)
                self._free.put(connection)
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
        for _ in self._connections:
            await self._free.get()
        await gatherResults([self._close_connection(c) for c in self._connections])
        self._connections.clear()

    def run_interaction(
        self, name: str, txn: Transaction[T], readonly: bool = False
    ) -> Deferred[T]:
        return Deferred.fromCoroutine(self._run_interaction(name, txn, readonly))

    async def _run_interaction(self, name: str, txn: Transaction[T], readonly: bool) -> T:
        if self._closed:
            raise RuntimeError(f"database closed; cannot run {name}")
        connection = await self._free.get()
        try:
            result, notifications = await self._transact(connection, name, txn, readonly)
        finally:
            self._free.put(connection)
        self._fire_local(notifications)
        return result

    def add_local_observer(self, channel: str, callback: Callable[[], object]) -> None:
        self._observers.setdefault(channel, []).append(callback)

    def _fire_local(self, channels: Sequence[str]) -> None:
        for channel in channels:
            for callback in self._observers.get(channel, ()):
                try:
                    callback()
                except Exception:
                    log.failure("notification observer for {channel} failed", channel=channel)


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


__all__ = ["ICursor", "NotifyingCursor", "PooledEngine"]
