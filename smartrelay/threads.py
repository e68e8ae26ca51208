"""Threads of our own for blocking work, with results delivered on the reactor thread.

Twisted's ``deferToThreadPool`` goes through its ThreadPool's Team, coordinator and context
copying: about twice the reactor-side CPU of a plain queue. Delivery hops to a thread once or
twice per message (the SQLite transaction, the DKIM private-key operation), so the relay uses
this smaller thing instead: a queue, N threads, ``callFromThread`` for the result.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

T = TypeVar("T")

_Work = tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]

#: Seconds a thread may keep the GIL while another waits for it (Python's default: 5 ms).
#: 0.1 ms rather than 0.5: end to end +5% and acceptance p99 41-43 ms against 47-52 in three
#: alternating rounds (docs/performance.md, "Issue 19, third session"); 0.05 ms no better.
GIL_SWITCH_INTERVAL = 0.0001


def shorten_gil_switch_interval() -> None:
    """Make the reactor thread wait at most :data:`GIL_SWITCH_INTERVAL` for the GIL.

    Every C call that lets the GIL go (a socket send, zlib compressing a link's token, a
    SQLite step) must take it back, and while one of our worker threads runs Python (a
    SQLite transaction's rows, a DKIM signature's fields) that took up to the default 5 ms:
    with a busy worker, one 3 µs zlib call cost the reactor thread 2.8 ms, and a message
    makes a dozen such calls (docs/performance.md, "Issue 19, third session"). Called once
    by each process of the relay, at start-up (a process-wide setting)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)


class WorkerThreads:
    """``count`` threads taking functions from one queue, in the order they were given."""

    def __init__(self, reactor: IReactorFromThreads, count: int, name: str) -> None:
        if count < 1:
            raise ValueError(f"{name}: at least one thread is needed, not {count}")
        self._reactor = reactor
        self._count = count
        self._name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        if self._threads:
            return
        for index in range(self._count):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """``function(*args)`` on one of the threads; the Deferred fires on the reactor's."""
        if not self._threads:
            raise RuntimeError(f"{self._name}: the threads are not running")
        result: Deferred[T] = Deferred()
        self._queue.put((result, function, args))
        return result

    def stop(self) -> None:
        """Let the threads finish what was given to them, then end them (this waits)."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            result, function, args = item
            try:
                value = function(*args)
            except BaseException:
                self._reactor.callFromThread(result.errback, Failure())
            else:
                self._reactor.callFromThread(result.callback, value)
