"""Postfix's test tools as real peers: ``smtp-sink`` (a next hop that dumps what it gets) and
``smtp-source`` (a bulk SMTP client). Both come with the ``postfix`` package and need no
running Postfix (docs: /work/shared/MACHINE-NOTES.md).

``PostfixSink`` runs ``smtp-sink -d DIR/%M.``: one file per transaction, starting with
``X-Mail-Args:``/``X-Rcpt-Args:`` lines (the envelope), then the message as received.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from attrs import frozen

from tests.support.relay import HOST, free_ports

DEFAULT_SENDER = "app@example.com"


def find_postfix_tool(name: str) -> str | None:
    """``smtp-sink`` or ``smtp-source`` (Debian puts them in /usr/sbin, often off PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/lib/postfix/sbin")
    return found


@frozen
class DumpedMessage:
    file: str
    sender: str
    recipients: tuple[str, ...]
    #: The message as smtp-sink wrote it (its own Received line first), lines joined by "\n".
    text: str

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` in the message (not the dump's own lines)."""
        prefix = name.lower() + ":"
        for line in self.text.split("\n"):
            if not line:
                return None
            if line.lower().startswith(prefix):
                return line.split(":", 1)[1].strip()
        return None


class PostfixSink:
    """``smtp-sink`` on a free loopback port, dumping every transaction into ``directory``
    (which must be writable by ``nobody`` when the tests run as root)."""

    def __init__(self, path: str, directory: Path, options: Sequence[str] = ()) -> None:
        self.path = path
        self.directory = directory
        self.options = list(options)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, port: int) -> list[str]:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        template = f"{self.directory}/%M."
        return [self.path, *user, "-d", template, *self.options, f"{HOST}:{port}", "1000"]

    def start(self, attempts: int = 3) -> None:
        for _ in range(attempts):
            [port] = free_ports(1)
            process = subprocess.Popen(
                self.command(port),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if _wait_listening(port, process):
                self.port, self.process = port, process
                return
            process.kill()
            process.wait()
        raise RuntimeError(f"smtp-sink did not start: {' '.join(self.command(0))}")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None

    def messages(self) -> list[DumpedMessage]:
        """Every transaction dumped so far (one still being written may be partial)."""
        found = []
        for entry in sorted(os.listdir(self.directory)):
            path = self.directory / entry
            try:
                text = path.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n")
            except FileNotFoundError:
                continue
            found.append(_parse_dump(str(path), text))
        return found

    def wait_for_messages(self, count: int, timeout: float = 30.0) -> list[str]:
        """The ``X-SmartRelay-ID`` of every dumped message once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            ids = [m.header("X-SmartRelay-ID") for m in self.messages()]
            if len(ids) >= count and all(ids):
                return [i for i in ids if i is not None]
            if time.monotonic() > deadline:
                raise AssertionError(f"smtp-sink has {len(ids)} of {count} messages")
            time.sleep(0.1)


@contextmanager
def running_postfix_sink(path: str, options: Sequence[str] = ()) -> Iterator[PostfixSink]:
    """A started :class:`PostfixSink` dumping into a fresh directory; stopped and removed on
    the way out. The directory is under the system temp dir and world-writable: as root,
    smtp-sink writes as ``nobody``, who cannot enter pytest's private tmp_path."""
    directory = tempfile.mkdtemp(prefix="smartrelay-smtp-sink-")
    try:
        os.chmod(directory, 0o777)
        sink = PostfixSink(path, Path(directory), options)
        try:
            sink.start()
            yield sink
        finally:
            sink.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _parse_dump(file: str, text: str) -> DumpedMessage:
    sender = ""
    recipients: list[str] = []
    lines = text.split("\n")
    start = 0
    for start, line in enumerate(lines):  # noqa: B007 - start is used after the loop
        name, _, value = line.partition(": ")
        if name == "X-Mail-Args":
            sender = value.split()[0].strip("<>") if value else ""
        elif name == "X-Rcpt-Args":
            recipients.append(value.split()[0].strip("<>"))
        elif not name.startswith("X-"):
            break
    return DumpedMessage(file, sender, tuple(recipients), "\n".join(lines[start:]))


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def run_smtp_source(
    path: str,
    port: int,
    count: int,
    sessions: int,
    recipient: str,
    sender: str = DEFAULT_SENDER,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """``smtp-source -s SESSIONS -m COUNT -f SENDER -t RECIPIENT 127.0.0.1:PORT``."""
    command = [path, "-s", str(sessions), "-m", str(count), "-f", sender, "-t", recipient]
    return subprocess.run(
        [*command, f"{HOST}:{port}"], capture_output=True, text=True, timeout=timeout
    )
