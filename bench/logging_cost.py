"""CPU per log line: twistd's observer against the relay's (smartrelay.logs), and a delivery
process's line on its way to the log, before (formatted by the child, then again by the
main process) and after (formatted once, by the child).

    .venv/bin/python bench/logging_cost.py [--lines 50000] [--repeat 5] [--ms-per-message 4.2]

Each figure is the best of ``--repeat`` runs of ``--lines`` events, in CPU microseconds per
line (time.process_time), through a ``Logger`` and a ``LogPublisher`` as in the relay, written
to /dev/null (a text file, flushed each line, as twistd does). The events are the relay's
own per-message lines: the acceptance line and the delivery outcome line. The share of a
message's CPU is per message (one accepted line; one outcome line from a delivery process)
over ``--ms-per-message`` (CPU ms a message of SmartRelay in ``make bench``, processes = 1:
~21 s for 5,000 messages, docs/performance.md); the main process's share over
``--main-ms-per-message`` (its CPU a message: ~90% of a core at ~850 accepted msg/s).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any, cast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    eventAsText,
    textFileLogObserver,
)

from smartrelay.delivery import processes
from smartrelay.delivery.processes import DeliveryProcesses, _Child
from smartrelay.logs import child_log_observer, relay_log_observer
from smartrelay.reactor import IRelayReactor

_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


def accepted(log: Logger) -> None:
    log.info(
        "{queue_id}: accepted from={sender} rcpts={count} size={size} ip={ip}{dup}",
        queue_id="0KQ3X7M2A9F4",
        sender="orders@shop.example.com",
        count=1,
        size=6712,
        ip="127.0.0.1",
        dup="",
    )


def delivered(log: Logger) -> None:
    log.info(
        "{queue_id}: to=<{rcpt}> dest={dest} {state} reply={reply!r}",
        queue_id="0KQ3X7M2A9F4",
        rcpt="jane.doe+1234@example.net",
        dest="mx1.example.net",
        state="delivered",
        reply="250 2.0.0 Ok: queued as 4Rb1xK2nQwz9",
    )


def old_child_format(event: LogEvent) -> str | None:
    """The delivery process's formatter before (``LEVEL text``, git 7406698)."""
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    if not text:
        return None
    name = getattr(event.get("log_level"), "name", "info")
    return "".join(f"{name} {line}\n" for line in text.splitlines())


def old_parent_line(log: Logger, raw: bytes, index: int) -> None:
    """The main process's handling of a child's line before (git 7406698)."""
    text = raw.decode("utf-8", "replace").rstrip("\r")
    level_name, _, rest = text.partition(" ")
    level = _LEVELS.get(level_name) or LogLevel.info
    log.emit(level, "delivery[{index}] {line}", index=index, line=rest)


def per_line(run: Callable[[], None], lines: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(lines):
            run()
        best = min(best, time.process_time() - start)
    return best / lines * 1e6


def logger(observer: ILogObserver, namespace: str) -> Logger:
    return Logger(namespace=namespace, observer=LogPublisher(observer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ms-per-message", type=float, default=4.2)
    parser.add_argument("--main-ms-per-message", type=float, default=1.06)
    args = parser.parse_args()
    out: IO[Any] = open(os.devnull, "w")  # noqa: SIM115

    old_main = logger(textFileLogObserver(out), "smartrelay.smtp.backends")
    new_main = logger(relay_log_observer(out), "smartrelay.smtp.backends")
    old_accept = per_line(lambda: accepted(old_main), args.lines, args.repeat)
    new_accept = per_line(lambda: accepted(new_main), args.lines, args.repeat)

    # A delivery process's outcome line, then the main process writing it (both processes'
    # CPU, one after the other here).
    old_pipe, new_pipe = io.StringIO(), io.StringIO()
    old_child = logger(FileLogObserver(old_pipe, old_child_format), "smartrelay.delivery.manager")
    new_child = logger(child_log_observer(new_pipe, 0), "smartrelay.delivery.manager")
    old_parent = logger(textFileLogObserver(out), "smartrelay.delivery.processes")
    new_parent = logger(relay_log_observer(out), "smartrelay.delivery.processes")
    # The main process's real reader of a child's output, logging to the relay's observer.
    processes.log.observer = new_parent.observer
    receiver = _Child(
        DeliveryProcesses(
            cast(IRelayReactor, MemoryReactorClock()), 1, lambda i: [], lambda: Deferred()
        ),
        0,
    )

    def old_delivery() -> None:
        old_pipe.seek(0)
        old_pipe.truncate()
        delivered(old_child)
        for raw in old_pipe.getvalue().encode().split(b"\n")[:-1]:
            old_parent_line(old_parent, raw, 0)

    def new_delivery() -> None:
        new_pipe.seek(0)
        new_pipe.truncate()
        delivered(new_child)
        receiver.childDataReceived(1, new_pipe.getvalue().encode())

    old_delivery_us = per_line(old_delivery, args.lines, args.repeat)
    new_delivery_us = per_line(new_delivery, args.lines, args.repeat)
    # The main process's part alone: a child's line received and written.
    old_raw = old_pipe.getvalue().encode().split(b"\n")[0]
    new_raw = new_pipe.getvalue().encode()
    old_forward = per_line(lambda: old_parent_line(old_parent, old_raw, 0), args.lines, args.repeat)
    new_forward = per_line(lambda: receiver.childDataReceived(1, new_raw), args.lines, args.repeat)
    print(f"sample (new): {new_pipe.getvalue().rstrip()}")
    print(f"CPU µs per line, best of {args.repeat} x {args.lines:,} lines:")
    print(f"{'line':<44}{'before':>9}{'after':>9}{'saved':>9}")
    for name, before, after in (
        ("accepted (main process)", old_accept, new_accept),
        ("delivered (child + main process)", old_delivery_us, new_delivery_us),
        ("  of which the main process", old_forward, new_forward),
    ):
        print(f"{name:<44}{before:9.1f}{after:9.1f}{1 - after / before:9.0%}")
    before = old_accept + old_delivery_us
    after = new_accept + new_delivery_us
    budget = args.ms_per_message * 1000
    main_before, main_after = old_accept + old_forward, new_accept + new_forward
    main_budget = args.main_ms_per_message * 1000
    print(
        f"main process per message (accepted + a child's delivered line): "
        f"{main_before:.1f} -> {main_after:.1f} µs, {main_before / main_budget:.1%} -> "
        f"{main_after / main_budget:.1%} of its {args.main_ms_per_message} ms CPU a message"
    )
    print(
        f"per message (1 accepted + 1 delivered line): {before:.1f} -> {after:.1f} µs, "
        f"{before / budget:.1%} -> {after / budget:.1%} of {args.ms_per_message} ms CPU a message"
    )


if __name__ == "__main__":
    main()
