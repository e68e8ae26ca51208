"""Children of the main process: the delivery processes (``[delivery] processes``,
:mod:`smartrelay.delivery.processes`) and the accepting processes (``[smtp] processes``,
:mod:`smartrelay.smtp.processes`).

What they have in common lives here: each child is ``python -m MODULE --config PATH --index N``
on the same database, started once the schema is migrated; its standard input is a pipe from
the main process (its end, even after ``kill -9`` of the main process, makes the child stop);
its log lines come back on its standard output already formatted by the child as the relay's
log shows them (``KIND[N]`` before the text, :func:`smartrelay.logs.child_log_observer`) and
are written to the log as they came (:data:`~smartrelay.logs.PREFORMATTED`); what it writes on
standard error is logged here, prefixed with ``KIND[N]``. So do its metrics: a
``metrics {json}`` line (:func:`metrics_line`) every :data:`METRICS_INTERVAL` seconds while
they change and once when it stops, taken into :attr:`RelayMetrics.children
<smartrelay.metrics.RelayMetrics.children>` (kept when the child ends, so the totals survive its
restart). Lines of a kind's own (a delivery process's adaptive limits, an accepting process's
"queued") go to :meth:`ChildProcesses._child_line`.

A child that exits while the relay runs is started again (after 1 s, doubling to at most a
minute while it keeps failing at once). On shutdown the children get SIGTERM and are waited
for (SIGKILL after ``STOP_TIMEOUT``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from smartrelay.logs import PREFORMATTED
from smartrelay.metrics import RelayMetrics
from smartrelay.reactor import IRelayReactor
from smartrelay.storage.store import Store

__all__ = [
    "METRICS_INTERVAL",
    "METRICS_PREFIX",
    "ChildProcesses",
    "child_command",
    "json_line",
    "metrics_line",
]

log = Logger()

#: How long a child may take to stop after SIGTERM before it is killed: a delivery manager's
#: stop_grace (10 s, DeliveryTunables) plus ample room to commit outcomes.
STOP_TIMEOUT = 60.0
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
STABLE_AFTER = 30.0  # a child that ran this long resets the restart delay
#: A child sends its metrics this often (seconds) while they change, and when it stops.
METRICS_INTERVAL = 2.0
METRICS_PREFIX = "metrics "
#: A longer metrics line is not parsed (the figures of one process are a few kilobytes).
MAX_METRICS_LINE = 4 * 1024 * 1024
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


def metrics_line(metrics: RelayMetrics) -> str:
    """What a child writes on its standard output to send its figures to the main process."""
    return METRICS_PREFIX + json.dumps(metrics.snapshot(), separators=(",", ":")) + "\n"


def child_command(module: str, config_path: str, index: int) -> list[str]:
    """The command line of child ``index`` running ``module`` (this interpreter, this
    checkout)."""
    return [sys.executable, "-m", module, "--config", config_path, "--index", str(index)]


class _Child(ProcessProtocol):
    def __init__(self, owner: ChildProcesses, index: int) -> None:
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
        if fd == 1 and self.owner._child_line(self.index, text):
            return
        level_name, _, rest = text.partition(" ")
        level = _LEVELS.get(level_name)
        if level is None:  # a traceback's next line, or an interpreter message on stderr
            level, rest = (LogLevel.error if fd == 2 else LogLevel.info), text
        logger = self.owner.log
        if fd == 1:
            # Formatted by the child (smartrelay.logs.child_log_observer): written as it came.
            logger.emit(level, "{line}", index=self.index, line=rest, **{PREFORMATTED: rest})
        else:
            logger.emit(
                level, "{kind}[{index}] {line}", kind=self.owner.kind, index=self.index, line=rest
            )

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            # A line of figures without its end was cut off (kill -9): its figures are lost.
            if rest and not (fd == 1 and self.owner._cut_off(rest.decode("utf-8", "replace"))):
                self._log_line(rest, fd)
        self.owner._ended(self, reason)
        self.ended.callback(None)


class ChildProcesses(Service):
    """``count`` children of one kind, started once the storage is ready; see the module
    docstring. Subclasses say what their children are (:attr:`kind`, :meth:`_child_fds`,
    :meth:`_child_line`, :meth:`_prepare`)."""

    #: The service's name, and what the log calls a child (``delivery[N]``, ``smtp[N]``).
    kind = "child"
    #: What one child does, for the start-up line ("delivery": "3 delivery process(es)").
    noun = "child"

    @property
    def log(self) -> Logger:
        """Where the children's lines are logged (the subclass's module is the log's system)."""
        return log

    def __init__(
        self,
        reactor: IRelayReactor,
        count: int,
        command: Callable[[int], list[str]],
        store_ready: Callable[[], Deferred[Store]],
        metrics: RelayMetrics | None = None,
    ) -> None:
        """``metrics``: the main process's, which the children's figures are added to."""
        self.name = self.kind
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

    # -- what a kind of child adds ------------------------------------------------------------
    async def _prepare(self, store: Store) -> bool:
        """Before the first child starts (the schema is migrated); False: start none."""
        return True

    def _child_fds(self, index: int) -> dict[int, int | str]:
        """The child's file descriptors (``spawnProcess``'s ``childFDs``)."""
        return {0: "w", 1: "r", 2: "r"}

    def _child_line(self, index: int, text: str) -> bool:
        """A line of the child's standard output that is not a log line; True if taken."""
        return False

    def _cut_off(self, text: str) -> bool:
        """Whether an unfinished last line (the child was killed) is to be dropped."""
        return text.startswith(METRICS_PREFIX)

    def _metrics_key(self, index: int) -> int | str:
        return index

    def _child_gone(self, index: int) -> None:
        """Child ``index`` ended (before it is started again)."""

    # -- service ------------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._start_failed)

    def _start_failed(self, failure: Failure) -> None:
        if self.running:  # a storage failure is reported (fatal) by the storage service
            self.log.failure("{kind} processes could not start", failure, kind=self.kind)

    async def _start(self) -> None:
        # Children start once the schema is migrated, so they never race the migration.
        store = await self._store_ready()
        if not self.running or not await self._prepare(store):
            return
        for index in range(self._count):
            self._spawn(index)
        self.log.info(
            "{kind}: {count} {noun} process(es) started",
            kind=self.kind,
            count=self._count,
            noun=self.noun,
        )

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if not self.running:
            return
        child = _Child(self, index)
        command = self._command(index)
        self.reactor.spawnProcess(
            child, command[0], command, env=dict(os.environ), childFDs=self._child_fds(index)
        )
        self.children[index] = child

    def send(self, data: bytes) -> None:
        """Write ``data`` to every child's standard input."""
        for index in list(self.children):
            self.send_to(index, data)

    def send_to(self, index: int, data: bytes) -> None:
        """Write ``data`` to child ``index``'s standard input, if it runs."""
        child = self.children.get(index)
        process = None if child is None else child.process
        if process is not None:
            process.write(data)

    def reload(self) -> None:
        """The relay was told to reload (SIGHUP): so is every child."""
        for child in self.children.values():
            self._signal(child, "HUP")

    def _child_metrics(self, index: int, text: str) -> None:
        if self._metrics is None:
            return
        rows = json_line(text)
        if not self._metrics.children.update(self._metrics_key(index), rows, self._families):
            self.log.warn(
                "{kind}[{index}]: a malformed metrics line was ignored",
                kind=self.kind,
                index=index,
            )

    def _ended(self, child: _Child, reason: Failure) -> None:
        if self._metrics is not None:
            self._metrics.children.retire(self._metrics_key(child.index))
        self._child_gone(child.index)
        if self.children.get(child.index) is child:
            del self.children[child.index]
        stopping = self.parent is not None and not self.parent.running
        if not self.running or stopping:
            # The relay is stopping (a terminal's Ctrl-C reaches the children too).
            return
        ran = self.reactor.seconds() - child.started_at
        delay = RESTART_DELAY
        if ran < STABLE_AFTER:
            delay = min(self._delays.get(child.index, RESTART_DELAY / 2) * 2, MAX_RESTART_DELAY)
        self._delays[child.index] = delay
        how = "exited" if reason.check(ProcessDone) else reason.getErrorMessage()
        self.log.error(
            "{kind}[{index}] {how}; starting it again in {delay:.0f} s",
            kind=self.kind,
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
                self.log.error(
                    "{kind}[{index}] did not stop: killing it", kind=self.kind, index=child.index
                )
                self._signal(child, "KILL")

    @staticmethod
    def _signal(child: _Child, name: str) -> None:
        process = child.process
        if process is None:
            return
        with contextlib.suppress(ProcessExitedAlready):
            process.signalProcess(name)


def json_line(text: str) -> object:
    """A child's line of figures decoded; None when too long or not JSON (the receiver then
    ignores it)."""
    if len(text) > MAX_METRICS_LINE:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
