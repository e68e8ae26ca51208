"""Big message bodies on disk while they are received and stored, and a byte budget.

The listener keeps a body in memory up to ``SPOOL_THRESHOLD`` bytes (the fast path: almost all
transactional mail); past it, the body goes on into a file in ``<data_dir>/spool``, so memory
per client stays bounded however big the message. The file lives until the transaction that
stores it has ended (committed or failed) or the client went away, whichever comes first; the
files of a process that died are removed at the next start.

:class:`ByteBudget` bounds the bytes of bodies that are being handed to storage at once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import deque
from collections.abc import Iterator

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

log = Logger()

#: A body longer than this goes to a spool file (when the listener has a spool).
SPOOL_THRESHOLD = 1 << 20
#: At most this many bytes of spooled bodies are handed to storage at once (one body always).
HANDOFF_BUDGET = 64 << 20
#: Reads of a spool file, and writes of it into the database, go in pieces of this size.
CHUNK = 1 << 20
_PREFIX = "body-"


@frozen(eq=False)
class SpooledBody:
    """A received message's content in a file: valid until the delivery Deferred fires."""

    path: str
    size: int

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        with open(self.path, "rb") as file:
            while piece := file.read(size):
                yield piece

    def read(self) -> bytes:
        """All of it in memory (only where a whole copy cannot be avoided)."""
        with open(self.path, "rb") as file:
            return file.read()

    def header_block(self) -> bytes:
        """The start of the body up to and including the first empty line (CRLF CRLF; the
        listener has normalised line ends), or all of it without one."""
        with open(self.path, "rb") as file:
            head = b""
            while True:
                if head.startswith(b"\r\n"):
                    return head[:2]
                end = head.find(b"\r\n\r\n")
                if end >= 0:
                    return head[: end + 4]
                piece = file.read(64 * 1024)
                if not piece:
                    return head
                head += piece

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class BodyWriter:
    """Collects one message's DATA: in memory, then (past the threshold) in a spool file.

    Writing to the file is a plain write on the caller's thread: it goes to the page cache
    (no fsync: the database commit is what makes a message durable). If the file cannot be
    written (disk full), the writer keeps counting, stores nothing more, and ``error`` says
    why, so the listener can answer with a temporary failure at the final dot.
    """

    def __init__(self, directory: str | None, threshold: int = SPOOL_THRESHOLD) -> None:
        self._directory = directory
        self._threshold = threshold
        self._chunks: list[bytes] = []
        #: Bytes held in memory (at most the threshold, when there is a directory).
        self.buffered = 0
        self._fd: int | None = None
        self.path: str | None = None
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.error is not None:
            return
        if self._fd is None:
            self._chunks.append(data)
            self.buffered += len(data)
            if self._directory is not None and self.buffered > self._threshold:
                self._spill()
            return
        self._write_file(data)

    def _spill(self) -> None:
        assert self._directory is not None
        try:
            self._fd, self.path = tempfile.mkstemp(prefix=_PREFIX, dir=self._directory)
        except OSError as error:
            self._failed(error)
            return
        chunks, self._chunks, self.buffered = self._chunks, [], 0
        self._write_file(b"".join(chunks))

    def _write_file(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as error:
            self._failed(error)

    def _failed(self, error: OSError) -> None:
        log.warn("cannot spool a message body: {error}", error=error)
        self.error = error
        self.discard()

    def finish(self) -> bytes | SpooledBody:
        """The body: bytes when small, else the spool file (whose removal the caller owns)."""
        if self._fd is None:
            body = b"".join(self._chunks)
            self._chunks, self.buffered = [], 0
            return body
        assert self.path is not None
        os.close(self._fd)
        self._fd = None
        return SpooledBody(self.path, self.size)

    def discard(self) -> None:
        """Drop what was collected and remove the file (the message will not be stored)."""
        self._chunks, self.buffered = [], 0
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None


class ByteBudget:
    """Admits holders of a number of bytes while their sum stays within ``limit``; one
    holder always (a body bigger than the limit goes, alone). First come, first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.holders = 0
        self._waiting: deque[tuple[int, Deferred[None]]] = deque()

    def acquire(self, size: int) -> Deferred[None]:
        if not self._waiting and self._fits(size):
            self._take(size)
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append((size, waiter))
        return waiter

    def release(self, size: int) -> None:
        self.in_use -= size
        self.holders -= 1
        while self._waiting and self._fits(self._waiting[0][0]):
            wanted, waiter = self._waiting.popleft()
            self._take(wanted)
            waiter.callback(None)

    def _fits(self, size: int) -> bool:
        return self.holders == 0 or self.in_use + size <= self.limit

    def _take(self, size: int) -> None:
        self.in_use += size
        self.holders += 1


class Spool:
    """Where a listener's big bodies go: ``directory`` (made if missing)."""

    def __init__(
        self,
        directory: str | None,
        threshold: int = SPOOL_THRESHOLD,
        budget: int = HANDOFF_BUDGET,
    ) -> None:
        self.directory = directory
        self.threshold = threshold
        self.budget = ByteBudget(budget)

    def writer(self) -> BodyWriter:
        return BodyWriter(self.directory, self.threshold)

    def prepare(self) -> int:
        """Make the directory; remove the files a previous run left (it died while
        receiving). Returns how many were removed. Call before listening."""
        if self.directory is None:
            return 0
        os.makedirs(self.directory, exist_ok=True)
        removed = 0
        for name in os.listdir(self.directory):
            if name.startswith(_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))
                    removed += 1
        return removed


__all__ = ["BodyWriter", "ByteBudget", "Spool", "SpooledBody"]
