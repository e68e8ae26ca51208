"""A scripted next hop in a thread: a plain-socket SMTP server whose RCPT replies a test chooses.

The browser tests run the relay in another process and block in selenium, so the relay's
next hop cannot live on the test's reactor. This one runs in threads of the test process
and answers RCPT from ``script(address, attempt)`` (``attempt``: 1 for the first RCPT of
that address, 2 for the next...), so a test can make a recipient defer once and be
accepted on the retry, or bounce with a reply text of its choosing (hostile, for the
escaping tests). Everything else is accepted and recorded.
"""

from __future__ import annotations

import socketserver
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from attrs import define, field

from tests.support.relay import HOST

#: (code, text) of a RCPT reply, e.g. (451, "4.3.0 try later"); None accepts.
RcptScript = Callable[[str, int], tuple[int, str] | None]

#: A line or a message longer than this ends the session (a test peer, but bounded).
MAX_LINE = 4096
MAX_MESSAGE = 10 * 1024 * 1024


@define
class PeerLog:
    """What the peer saw; shared by its handler threads under ``lock``."""

    script: RcptScript
    lock: threading.Lock = field(factory=threading.Lock)
    attempts: Counter[str] = field(factory=Counter)
    #: (envelope sender, recipients, message bytes) of every accepted transaction.
    messages: list[tuple[str, list[str], bytes]] = field(factory=list)

    def rcpt(self, address: str) -> tuple[int, str] | None:
        with self.lock:
            self.attempts[address] += 1
            attempt = self.attempts[address]
        return self.script(address, attempt)

    def accepted(self, sender: str, recipients: list[str], data: bytes) -> None:
        with self.lock:
            self.messages.append((sender, recipients, data))

    def delivered_to(self) -> list[str]:
        with self.lock:
            return [r for _, recipients, _ in self.messages for r in recipients]

    def return_path(self, recipient: str) -> str | None:
        """The envelope sender (the relay's VERP address) of the copy ``recipient`` got."""
        with self.lock:
            found = [s for s, recipients, _ in self.messages if recipient in recipients]
        return found[0] if found else None


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = 30

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode("utf-8", "replace") + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        log = self.server.log
        self.reply("220 peer.test ESMTP scripted")
        sender = ""
        recipients: list[str] = []
        while True:
            raw = self.rfile.readline(MAX_LINE)
            if not raw or not raw.endswith(b"\n"):
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line[:4].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250-peer.test" if verb == "EHLO" else "250 peer.test")
                if verb == "EHLO":
                    self.reply("250-8BITMIME")
                    self.reply("250 SMTPUTF8")
            elif verb == "MAIL":
                sender = line.partition(":")[2].strip().split(" ")[0].strip("<>")
                recipients = []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                address = line.partition(":")[2].strip().split(" ")[0].strip("<>")
                refused = log.rcpt(address)
                if refused is None:
                    recipients.append(address)
                    self.reply("250 2.1.5 Ok")
                else:
                    self.reply(f"{refused[0]} {refused[1]}")
            elif verb == "DATA":
                if not recipients:
                    self.reply("554 5.5.1 No valid recipients")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data()
                if data is None:
                    return
                log.accepted(sender, recipients, data)
                recipients = []
                self.reply("250 2.0.0 Ok: accepted")
            elif verb == "RSET":
                recipients = []
                self.reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.2 Command not recognized")

    def _read_data(self) -> bytes | None:
        lines: list[bytes] = []
        size = 0
        while True:
            raw = self.rfile.readline(MAX_LINE)
            if not raw or not raw.endswith(b"\n"):
                return None
            if raw in (b".\r\n", b".\n"):
                return b"".join(lines)
            size += len(raw)
            if size > MAX_MESSAGE:
                return None
            lines.append(raw[1:] if raw.startswith(b".") else raw)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, log: PeerLog) -> None:
        super().__init__((HOST, 0), _Handler)
        self.log = log


@contextmanager
def scripted_peer(script: RcptScript) -> Iterator[tuple[int, PeerLog]]:
    """A peer on a free loopback port: ``(port, log)``; shut down on the way out."""
    log = PeerLog(script)
    server = _Server(log)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    try:
        yield int(server.server_address[1]), log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
