"""Giving freed heap memory back to the system (glibc's ``malloc_trim``), every 30 seconds.

The relay's peaks (a delivery window full of loaded messages, a burst of sessions, a big
message) are freed, but glibc keeps most of the freed memory in its arenas: only the top of
the main heap is returned on its own, and every thread (the SQLite connections, the signing
and worker threads) has an arena of its own. The process's RSS then stays at its highest
however little is in use, and creeps up as free chunks fragment. ``malloc_trim(0)`` hands
every whole free page of every arena back (``madvise(MADV_DONTNEED)``); the pages come back
on their next use. Measured in docs/performance.md ("Memory at 100,000 queued").

While it runs, the service also sets glibc's thresholds (``mallopt``) so that freed memory
stays with the process until the next trim: a block of up to :data:`MMAP_THRESHOLD` comes
from the heap rather than a mapping of its own, and the heap's top is given back only past
:data:`TRIM_THRESHOLD` (or by the trim). By default glibc maps and unmaps each buffer of a
few hundred KB, or hands the heap's top back, again and again, and each new page then costs
a page fault: some 200 a copy of a 355 KB newsletter in the delivery process, about a tenth
of its CPU (docs/performance.md, "Delivery process CPU (issue 19, second session)").

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
#: Blocks bigger than this get a mapping of their own (glibc's ``M_MMAP_THRESHOLD``; its
#: default is 128 KiB, raised as mapped blocks are freed, up to 32 MiB).
MMAP_THRESHOLD = 16 * 1024 * 1024
#: Free memory at the heap's top kept past this is given back at once (``M_TRIM_THRESHOLD``;
#: glibc's default: twice the mmap threshold). Below it, the trim gives it back.
TRIM_THRESHOLD = 64 * 1024 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class GlibcTrim:
    """glibc's ``malloc_trim(0)`` (calling the object), and its thresholds
    (:meth:`keep_freed_memory`)."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._trim = libc.malloc_trim
        self._trim.argtypes = [ctypes.c_size_t]
        self._trim.restype = ctypes.c_int
        self._mallopt = libc.mallopt
        self._mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        self._mallopt.restype = ctypes.c_int

    def __call__(self) -> int:
        return int(self._trim(0))

    def keep_freed_memory(self) -> bool:
        """Set :data:`MMAP_THRESHOLD` and :data:`TRIM_THRESHOLD` for the whole process;
        whether glibc took both."""
        mapped = self._mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        trimmed = self._mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        return bool(mapped and trimmed)


def glibc_malloc_trim() -> GlibcTrim | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return GlibcTrim(libc)
    except (OSError, AttributeError):
        return None


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
        if isinstance(self._trim, GlibcTrim) and not self._trim.keep_freed_memory():
            log.warn("memory: glibc did not take the malloc thresholds")
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
