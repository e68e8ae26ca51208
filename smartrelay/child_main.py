"""What a child process of the relay runs (:mod:`smartrelay.child_processes`): a delivery
process (:mod:`smartrelay.delivery_process`) or an accepting process
(:mod:`smartrelay.listener_process`), never started by hand.

It runs a :class:`~smartrelay.relay.RelayService` in the child's role, logs each event on
standard output as the relay's log shows it, its level in front (``LEVEL TIMESTAMP [SYSTEM]
KIND[N] TEXT``, :func:`smartrelay.logs.child_log_observer`), sends its metrics there too, takes
each read on standard input as "work was queued" (a delivery process; a spare one also reads
"hold" and "release" there), re-reads its keys and
certificates on SIGHUP, and stops, as on SIGTERM, when standard input is closed.

Like the twistd plugin (``tap.py``), an entry point (a composition root): it sits at the top of
the package, so that no module under it imports upwards.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import IO, Literal

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.child_processes import METRICS_INTERVAL, metrics_line
from smartrelay.config import ConfigError, load_config
from smartrelay.delivery.processes import ADAPTIVE_PREFIX, adaptive_line, claims_held
from smartrelay.gc_freeze import freeze_startup_objects
from smartrelay.logs import child_log_observer
from smartrelay.metrics import RelayMetrics
from smartrelay.rewrap.dkim import DkimError
from smartrelay.smtp.tls import TlsError
from smartrelay.threads import shorten_gil_switch_interval

__all__ = ["MetricsReporter", "WakePipe", "run"]


@implementer(IReadDescriptor)
class WakePipe:
    """Standard input: each read means "work was queued" (``on_wake``, with what was read:
    a spare delivery process's hold and release bytes come this way too); its end means
    "stop"."""

    def __init__(
        self, fd: int, on_wake: Callable[[bytes], object], on_end: Callable[[], object]
    ) -> None:
        self._fd = fd
        self._on_wake = on_wake
        self._on_end = on_end
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Failure | None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return Failure(net_error.ConnectionLost())
        if not data:
            return Failure(net_error.ConnectionDone())
        self._on_wake(data)
        return None

    def connectionLost(self, reason: Failure) -> None:
        self._on_end()

    def logPrefix(self) -> str:
        return "wake-pipe"


class MetricsReporter:
    """Writes the process's figures (a ``metrics {json}`` line) when they changed, and with
    ``adaptive`` (a delivery process) its adaptive throttles' limits."""

    def __init__(self, metrics: RelayMetrics, out: IO[str], adaptive: bool = True) -> None:
        self._metrics = metrics
        self._out = out
        self._adaptive = adaptive
        self._last = ""
        # No adaptive line until a limit is cut (most relays have no adaptive throttle).
        self._last_adaptive = ADAPTIVE_PREFIX + "[]\n"

    def send(self) -> None:
        """The metrics line, and the adaptive throttles' limits line, each if it changed."""
        lines = [(metrics_line(self._metrics), "_last")]
        if self._adaptive:
            lines.append((adaptive_line(self._metrics), "_last_adaptive"))
        for line, last in lines:
            if line == getattr(self, last):
                continue
            setattr(self, last, line)
            try:
                self._out.write(line)
                self._out.flush()
            except (OSError, ValueError):  # the main process is gone (a closed pipe)
                pass


def run(role: Literal["delivery", "listener"], argv: Sequence[str] | None = None) -> None:
    """Run a child process of ``role`` (its command line: ``--config PATH --index N``)."""
    # A reload signal (SIGHUP) may come while this process starts: ignored until
    # handle_stop_signals below makes it a reload, rather than killing the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    kind = "delivery" if role == "delivery" else "smtp"
    what = "delivery process" if role == "delivery" else "accepting process"
    parser = argparse.ArgumentParser(prog=f"smartrelay {what}")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        raise SystemExit(f"critical smartrelay: {error}") from None
    if role == "delivery" and config.delivery.nice:
        # Before any thread starts: threads inherit it (Linux sets it per thread).
        os.nice(config.delivery.nice)

    from twisted.internet import reactor  # the composition root takes the global reactor

    from smartrelay.reactor import as_relay_reactor
    from smartrelay.relay import RelayService, handle_stop_signals, stop_reactor

    relay_reactor = as_relay_reactor(reactor)
    shorten_gil_switch_interval()
    globalLogBeginner.beginLoggingTo(
        [child_log_observer(sys.stdout, args.index, kind)], redirectStandardIO=False
    )

    def to_parent(line: str) -> None:
        try:
            sys.stdout.write(line)
            sys.stdout.flush()
        except (OSError, ValueError):  # the main process is gone (a closed pipe)
            pass

    try:
        relay = RelayService(
            config, relay_reactor, role=role, worker_index=args.index, to_parent=to_parent
        )
    except (TlsError, DkimError) as error:
        raise SystemExit(f"critical smartrelay: {error}") from None

    def wake(data: bytes) -> None:
        delivery = relay.delivery
        if delivery is None:
            return
        held = claims_held(data)
        if held is not None:
            delivery.hold_claims(held)
        delivery.wake()

    def parent_gone() -> None:
        stop_reactor(relay_reactor)

    # Ctrl-C in a terminal reaches this process as well as its parent, which then sends
    # SIGTERM: a second signal must not try to stop the reactor again. SIGHUP (from the
    # parent's reload, or a terminal's hangup) re-reads the keys and certificates and never
    # stops it.
    handle_stop_signals(relay_reactor, on_reload=relay.reload)
    relay_reactor.addReader(WakePipe(0, wake, parent_gone))
    reporter = MetricsReporter(relay.metrics, sys.stdout, adaptive=role == "delivery")
    sending = LoopingCall(reporter.send)
    sending.clock = relay_reactor

    def stop() -> Deferred[None]:
        if sending.running:
            sending.stop()
        # The last figures once the relay has recorded its last outcomes.
        return relay.stopService().addBoth(lambda _: reporter.send())

    relay_reactor.callWhenRunning(relay.startService)
    relay_reactor.callWhenRunning(freeze_startup_objects)  # gc_freeze.py
    relay_reactor.callWhenRunning(sending.start, METRICS_INTERVAL, now=False)
    relay_reactor.addSystemEventTrigger("before", "shutdown", stop)
    relay_reactor.run()
