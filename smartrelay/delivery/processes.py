"""Delivery in separate processes (``[delivery] processes = N``), so that re-wrapping, DKIM
and the SMTP client run on other cores than the listener.

The main process keeps the listeners, the web endpoints and the storage; it starts N children
(``python -m smartrelay.delivery_process``), each a delivery manager with its own node id on the
same database: they claim due recipients exactly as several relay hosts do (docs/storage.md),
so nothing is delivered twice. Each child's standard input is a pipe from the main process:

- a byte on it means "work was queued" (SQLite has no LISTEN/NOTIFY across processes; on
  PostgreSQL the children also get the NOTIFY, and a second wake-up costs one empty claim);
- its end (the main process is gone, even after ``kill -9``) makes the child stop.

A child's log lines come back on its standard output, already formatted by the child as the
relay's log shows them (``delivery[N]`` before the text, :mod:`smartrelay.logs`), and are
written to the log as they came (one event each, :data:`~smartrelay.logs.PREFORMATTED`), so
one log shows everything; what it writes on its standard error is logged here, prefixed with
``delivery[N]``. So do its metrics: a ``metrics {json}`` line
(:func:`metrics_line`) every :data:`METRICS_INTERVAL` seconds while they change and once when
it stops, taken into :attr:`RelayMetrics.children <smartrelay.metrics.RelayMetrics.children>`
(kept when the child ends, so the totals survive its restart).

A child that exits while the relay runs is started again (after 1 s, doubling to at most a
minute while it keeps failing at once).
A reload of the relay (SIGHUP) is passed on to the children (SIGHUP), which re-read their
DKIM keys. On shutdown the children get SIGTERM and are waited for (SIGKILL after ``STOP_TIMEOUT``):
they finish or cut off what is on the wire like the in-process delivery manager does.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable

from attrs import evolve
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from smartrelay.config.model import DeliveryConfig
from smartrelay.logs import PREFORMATTED
from smartrelay.metrics import RelayMetrics
from smartrelay.reactor import IRelayReactor
from smartrelay.storage.store import QUEUE_CHANNEL, Store

log = Logger()

#: How long a delivery process may take to stop after SIGTERM before it is killed: its
#: manager's stop_grace (10 s, DeliveryTunables) plus ample room to commit outcomes.
STOP_TIMEOUT = 60.0
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
STABLE_AFTER = 30.0  # a child that ran this long resets the restart delay
WAKE = b"w"
#: A child sends its metrics this often (seconds) while they change, and when it stops.
METRICS_INTERVAL = 2.0
METRICS_PREFIX = "metrics "
#: A child's adaptive throttles' limits (docs/delivery.md, "Adaptive throttles").
ADAPTIVE_PREFIX = "adaptive "
#: A longer metrics line is not parsed (the figures of one process are a few kilobytes).
MAX_METRICS_LINE = 4 * 1024 * 1024
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


def metrics_line(metrics: RelayMetrics) -> str:
    """What a child writes on its standard output to send its figures to the main process."""
    return METRICS_PREFIX + json.dumps(metrics.snapshot(), separators=(",", ":")) + "\n"


def adaptive_line(metrics: RelayMetrics) -> str:
    """A child's adaptive throttle limits, a line for the main process."""
    return ADAPTIVE_PREFIX + json.dumps(metrics.adaptive.own(), separators=(",", ":")) + "\n"


def share_of_limits(delivery: DeliveryConfig, index: int) -> DeliveryConfig:
    """Delivery process ``index``'s part of the node's limits: ``max_connections`` and each
    throttle's connections and rate divided between the ``processes`` children, so that the
    config's figures hold for the node whatever the number of processes. A connection limit
    smaller than the number of processes still leaves each one connection (a child could
    not deliver what it claimed otherwise): the node may then open up to ``processes``."""
    count = delivery.processes
    if count <= 1:
        return delivery

    def share(total: int) -> int:
        return max(1, total // count + (1 if index < total % count else 0))

    return evolve(
        delivery,
        max_connections=share(delivery.max_connections),
        throttles=tuple(
            evolve(
                throttle,
                max_connections=share(throttle.max_connections),
                max_rate_per_second=throttle.max_rate_per_second / count,
            )
            for throttle in delivery.throttles
        ),
    )


def worker_command(config_path: str, index: int) -> list[str]:
    """The command line of delivery process ``index`` (this interpreter, this checkout)."""
    return [
        sys.executable,
        "-m",
        "smartrelay.delivery_process",
        "--config",
        config_path,
        "--index",
        str(index),
    ]


class _Child(ProcessProtocol):
    def __init__(self, owner: DeliveryProcesses, index: int) -> None:
        self.owner = owner
        self.index = index
        self.started_at = owner.reactor.seconds()
        self.ended: Deferred[None] = Deferred()
        self._partial = {1: b"", 2: b""}

    @property
    def process(self) -> IProcessTransport | None:
        transport = self.transport
        return transport if IProcessTransport.providedBy(transport) else None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        # A multi-line event (a traceback: its next lines start with a tab) stays one event.
        event: list[bytes] = []
        for line in lines:
            if event and line.startswith(b"\t"):
                event.append(line)
                continue
            if event:
                self._log_line(b"\n".join(event), childFD)
            event = [line]
        if event:
            self._log_line(b"\n".join(event), childFD)

    def _log_line(self, raw: bytes, fd: int) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text:
            return
        if fd == 1 and text.startswith(METRICS_PREFIX):
            self.owner._child_metrics(self.index, text[len(METRICS_PREFIX) :])
            return
        if fd == 1 and text.startswith(ADAPTIVE_PREFIX):
            self.owner._child_adaptive(self.index, text[len(ADAPTIVE_PREFIX) :])
            return
        level_name, _, rest = text.partition(" ")
        level = _LEVELS.get(level_name)
        if level is None:  # a traceback's next line, or an interpreter message on stderr
            level, rest = (LogLevel.error if fd == 2 else LogLevel.info), text
        if fd == 1:
            # Formatted by the child (smartrelay.logs.child_log_observer): written as it came.
            log.emit(level, "{line}", index=self.index, line=rest, **{PREFORMATTED: rest})
        else:
            log.emit(level, "delivery[{index}] {line}", index=self.index, line=rest)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            # A metrics line without its end was cut off (kill -9): its figures are lost.
            cut_off = rest.startswith((METRICS_PREFIX.encode(), ADAPTIVE_PREFIX.encode()))
            if rest and not (fd == 1 and cut_off):
                self._log_line(rest, fd)
        self.owner._ended(self, reason)
        self.ended.callback(None)


class DeliveryProcesses(Service):
    name = "delivery"

    def __init__(
        self,
        reactor: IRelayReactor,
        count: int,
        command: Callable[[int], list[str]],
        store_ready: Callable[[], Deferred[Store]],
        metrics: RelayMetrics | None = None,
    ) -> None:
        """``metrics``: the main process's, which the children's figures are added to."""
        self.reactor = reactor
        self._metrics = metrics
        self._families = {} if metrics is None else metrics.families()
        self._count = count
        self._command = command
        self._store_ready = store_ready
        self.children: dict[int, _Child] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._delays: dict[int, float] = {}
        self._starting: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._start_failed)

    def _start_failed(self, failure: Failure) -> None:
        if self.running:  # a storage failure is reported (fatal) by the storage service
            log.failure("delivery processes could not start", failure)

    async def _start(self) -> None:
        # Children start once the schema is migrated, so they never race the migration.
        store = await self._store_ready()
        if not self.running:
            return
        await store.engine.listen(QUEUE_CHANNEL, self.wake)
        for index in range(self._count):
            self._spawn(index)
        log.info("delivery: {count} delivery process(es) started", count=self._count)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if not self.running:
            return
        child = _Child(self, index)
        command = self._command(index)
        self.reactor.spawnProcess(
            child,
            command[0],
            command,
            env=dict(os.environ),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self.children[index] = child

    def wake(self) -> None:
        """Work was queued: tell every child (one byte each; pipes keep it if they are busy)."""
        for child in self.children.values():
            process = child.process
            if process is not None:
                process.write(WAKE)

    def reload(self) -> None:
        """The relay was told to reload (SIGHUP): so is every child (it re-reads its DKIM
        keys, which it signs with; smartrelay.delivery_process)."""
        for child in self.children.values():
            self._signal(child, "HUP")

    def _child_metrics(self, index: int, text: str) -> None:
        if self._metrics is None:
            return
        if not self._metrics.children.update(index, _json_line(text), self._families):
            log.warn("delivery[{index}]: a malformed metrics line was ignored", index=index)

    def _child_adaptive(self, index: int, text: str) -> None:
        if self._metrics is None:
            return
        if not self._metrics.adaptive.update_child(index, _json_line(text)):
            log.warn("delivery[{index}]: a malformed adaptive line was ignored", index=index)

    def _ended(self, child: _Child, reason: Failure) -> None:
        if self._metrics is not None:
            self._metrics.children.retire(child.index)
            self._metrics.adaptive.retire(child.index)
        if self.children.get(child.index) is child:
            del self.children[child.index]
        if not self.running:
            return
        ran = self.reactor.seconds() - child.started_at
        delay = RESTART_DELAY
        if ran < STABLE_AFTER:
            delay = min(self._delays.get(child.index, RESTART_DELAY / 2) * 2, MAX_RESTART_DELAY)
        self._delays[child.index] = delay
        how = "exited" if reason.check(ProcessDone) else reason.getErrorMessage()
        log.error(
            "delivery[{index}] {how}; starting it again in {delay:.0f} s",
            index=child.index,
            how=how,
            delay=delay,
        )
        self._restarts[child.index] = self.reactor.callLater(delay, self._spawn, child.index)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        children = list(self.children.values())
        for child in children:
            self._signal(child, "TERM")
        kill = self.reactor.callLater(STOP_TIMEOUT, self._kill, children)
        for child in children:
            await child.ended
        if kill.active():
            kill.cancel()

    def _kill(self, children: list[_Child]) -> None:
        for child in children:
            if not child.ended.called:
                log.error("delivery[{index}] did not stop: killing it", index=child.index)
                self._signal(child, "KILL")

    @staticmethod
    def _signal(child: _Child, name: str) -> None:
        process = child.process
        if process is None:
            return
        with contextlib.suppress(ProcessExitedAlready):
            process.signalProcess(name)


def _json_line(text: str) -> object:
    """A child's ``metrics`` or ``adaptive`` line decoded; None when too long or not JSON
    (the receiver then ignores it)."""
    if len(text) > MAX_METRICS_LINE:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
