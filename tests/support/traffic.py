"""Numbered test messages submitted over SMTP, and what became of them (the sink, the database).

Each message carries ``END-OF-MESSAGE n`` as its last line, so a dump that has it arrived
whole; the relay's ``X-SmartRelay-ID`` names its queue id.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from tests.support.postfix import PostfixSink
from tests.support.relay import HOST
from tests.support.run import query

T = TypeVar("T")

SENDER = "app@sender.test"
QUEUED = re.compile(r"Ok: queued as (\S+)")
TRAILER = re.compile(r"^END-OF-MESSAGE (\d+)$", re.MULTILINE)


def message(n: int) -> bytes:
    return (
        f"From: <{SENDER}>\r\nTo: <r{n}@example.net>\r\nSubject: test message {n}\r\n\r\n"
        f"Message {n}.\r\nEND-OF-MESSAGE {n}\r\n"
    ).encode()


def submit_share(port: int, numbers: list[int]) -> dict[str, int]:
    """Messages ``numbers`` in one SMTP session: {queue id: n} of those accepted."""
    accepted = {}
    with smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=30) as client:
        client.ehlo()
        for n in numbers:
            client.mail(SENDER)
            code, text = client.rcpt(f"r{n}@example.net")
            assert code == 250, f"RCPT: {code} {text!r}"
            code, text = client.data(message(n))
            match = QUEUED.search(text.decode())
            if code == 250 and match is not None:
                accepted[match[1]] = n
    return accepted


def submit_all(port: int, messages: int, sessions: int) -> dict[str, int]:
    """Messages 0..messages-1 over ``sessions`` concurrent sessions: {queue id: n}."""
    shares = [list(range(i, messages, sessions)) for i in range(sessions)]
    with ThreadPoolExecutor(sessions) as pool:
        results = list(pool.map(lambda share: submit_share(port, share), shares))
    return {queue_id: n for result in results for queue_id, n in result.items()}


def wait_until(condition: Callable[[], T | None], what: str, timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def complete_dumps(sink: PostfixSink) -> Counter[str]:
    """How many times each queue id reached the sink whole (its last line was written)."""
    seen: Counter[str] = Counter()
    for dumped in sink.messages():
        queue_id = dumped.header("X-SmartRelay-ID")
        if queue_id is not None and TRAILER.search(dumped.text):
            seen[queue_id] += 1
    return seen


def states(url: str) -> Counter[str]:
    """How many recipients are in each state."""
    rows = query(url, "SELECT state, COUNT(*) FROM recipients GROUP BY state")
    return Counter({str(s): int(c) for s, c in rows})
