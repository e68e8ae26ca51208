"""Giving freed heap memory back to the system (glibc's ``malloc_trim``), every 30 seconds.

The relay's peaks (a delivery window full of loaded messages, a burst of sessions, a big
message) are freed, but glibc keeps most of the freed memory in its arenas: only the top of
the main heap is returned on its own, and every thread (the SQLite connections, the signing
and worker threads) has an arena of its own. The process's RSS then stays at its highest
however little is in use, and creeps up as free chunks fragment. ``malloc_trim(0)`` hands
every whole free page of every arena back (``madvise(MADV_DONTNEED)``); the pages come back
on their next use. Measured in docs/performance.md ("Memory at 100,000 queued").

Elsewhere than glibc (musl, macOS) there is no such call, and the service does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

#: Seconds between two trims.
TRIM_INTERVAL = 30.0


def glibc_malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class MallocTrim(Service):
    """Calls ``trim`` every ``interval`` seconds while running (none: does nothing)."""

    name = "malloc-trim"

    def __init__(
        self,
        clock: IReactorTime,
        trim: Callable[[], object] | None,
        interval: float = TRIM_INTERVAL,
    ) -> None:
        self._trim = trim
        self._loop = LoopingCall(self.trim_now)
        self._loop.clock = clock
        self._interval = interval
        #: How many trims, and the longest one in seconds (for bench/ and tests).
        self.trims = 0
        self.longest = 0.0

    def trim_now(self) -> None:
        if self._trim is None:
            return
        started = time.perf_counter()
        self._trim()
        self.longest = max(self.longest, time.perf_counter() - started)
        self.trims += 1

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._trim is not None:
            self._loop.start(self._interval, now=False).addErrback(
                lambda f: log.failure("giving memory back failed", f)
            )

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()
        if self.trims:
            log.info(
                "memory: {trims} trim(s) of the heap, the longest {ms:.1f} ms",
                trims=self.trims,
                ms=self.longest * 1000,
            )
