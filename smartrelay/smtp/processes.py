"""Accepting processes (``[smtp] processes = N``, an addition; docs/smtp.md, "Accepting
processes"): N children that accept on the submission listeners' sockets, so that SMTP
sessions, parsing and the commits of what they accept run on more cores than one.

The main process binds the ``[smtp] listen`` sockets as before (as root under twistd, before it
drops privileges) but accepts no connection on them. It starts N children
(``python -m smartrelay.listener_process``, :mod:`smartrelay.child_processes`) that inherit the
sockets as file descriptors 3, 4, ... (one per endpoint, in the config's order) and accept on
them: the kernel hands each new connection to one of them. The inbound listener (bounces and
complaints) and the web stay in the main process. Besides its log and metrics lines, a child
sends:

- ``queued``: it committed messages. On SQLite a commit wakes only the committing process, so
  the main process wakes its delivery (or its delivery processes) in turn; on PostgreSQL the
  NOTIFY reaches every process and no such line is sent.
- ``volume "NAME"``: it accepted a message under the SMTP AUTH credential NAME, which the main
  process's volume watch counts (docs/smtp.md, "Volume alerts"); a hold it decides is read by
  the children from the database within :data:`~smartrelay.smtp.volume_watch.POLL_INTERVAL`.

A reload (SIGHUP) is passed on to the children, which re-read their TLS certificates.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from attrs import evolve
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from smartrelay.child_processes import ChildProcesses, child_command
from smartrelay.config.model import SmtpConfig
from smartrelay.metrics import RelayMetrics
from smartrelay.reactor import IRelayReactor
from smartrelay.storage.store import QUEUE_CHANNEL, Store

__all__ = [
    "FIRST_FD",
    "QUEUED",
    "VOLUME_PREFIX",
    "ListenerProcesses",
    "QueuedForwarder",
    "listener_command",
    "share_of_connections",
    "volume_line",
]

log = Logger()

#: The first inherited listening socket's file descriptor in a child.
FIRST_FD = 3
QUEUED = "queued"
VOLUME_PREFIX = "volume "
#: A longer credential name in a ``volume`` line is not taken (names are short).
MAX_VOLUME_LINE = 4096


def share_of_connections(smtp: SmtpConfig, index: int) -> SmtpConfig:
    """Accepting process ``index``'s part of ``max_connections``: the node's figure divided
    between the ``processes`` children (each at least 1), so that the node holds no more
    sessions than configured. ``max_connections_per_client`` stays each process's: a client
    whose connections all reach one process may still open that many."""
    count = smtp.processes
    if count <= 1:
        return smtp
    total = smtp.max_connections
    return evolve(
        smtp, max_connections=max(1, total // count + (1 if index < total % count else 0))
    )


def listener_command(config_path: str, index: int) -> list[str]:
    """The command line of accepting process ``index`` (this interpreter, this checkout)."""
    return child_command("smartrelay.listener_process", config_path, index)


def volume_line(credential: str) -> str:
    """What a child writes when it accepted a message under ``credential``."""
    return VOLUME_PREFIX + json.dumps(credential) + "\n"


class ListenerProcesses(ChildProcesses):
    kind = "smtp"
    noun = "accepting"

    def __init__(
        self,
        reactor: IRelayReactor,
        count: int,
        command: Callable[[int], list[str]],
        store_ready: Callable[[], Deferred[Store]],
        sockets: Callable[[], list[int] | None],
        on_queued: Callable[[], object],
        on_volume: Callable[[str], object] | None = None,
        metrics: RelayMetrics | None = None,
    ) -> None:
        """``sockets``: the listening sockets' file descriptors, in the order of ``[smtp]
        listen`` (None while one does not listen); ``on_queued``: a child committed messages
        (SQLite); ``on_volume``: a child accepted a message under this credential."""
        super().__init__(reactor, count, command, store_ready, metrics)
        self._sockets = sockets
        self._on_queued = on_queued
        self._on_volume = on_volume
        self._fds: list[int] = []

    @property
    def log(self) -> Logger:
        return log

    async def _prepare(self, store: Store) -> bool:
        fds = self._sockets()
        if fds is None:  # a listener failed to listen: reported as fatal by its service
            return False
        self._fds = fds
        return True

    def _child_fds(self, index: int) -> dict[int, int | str]:
        fds = super()._child_fds(index)
        for number, fd in enumerate(self._fds):
            fds[FIRST_FD + number] = fd
        return fds

    def _child_line(self, index: int, text: str) -> bool:
        if text == QUEUED:
            self._on_queued()
            return True
        if text.startswith(VOLUME_PREFIX):
            name: object = None
            if len(text) <= MAX_VOLUME_LINE:
                try:
                    name = json.loads(text[len(VOLUME_PREFIX) :])
                except ValueError:
                    name = None
            if not isinstance(name, str):
                log.warn("smtp[{index}]: a malformed volume line was ignored", index=index)
            elif self._on_volume is not None:
                self._on_volume(name)
            return True
        return False

    def _metrics_key(self, index: int) -> int | str:
        return f"smtp{index}"


class QueuedForwarder(Service):
    """In an accepting process on SQLite: after each commit that queued messages, one
    ``queued`` line to the main process (at most one per reactor turn), which wakes the
    delivery. On PostgreSQL the NOTIFY does that by itself, and this does nothing."""

    name = "queued-forwarder"

    def __init__(
        self,
        reactor: IRelayReactor,
        store_ready: Callable[[], Deferred[Store]],
        to_parent: Callable[[str], object],
    ) -> None:
        self._reactor = reactor
        self._store_ready = store_ready
        self._to_parent = to_parent
        self._pending = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        Deferred.fromCoroutine(self._start()).addErrback(lambda _: None)  # storage reports

    async def _start(self) -> None:
        store = await self._store_ready()
        if store.engine.name == "sqlite":
            await store.engine.listen(QUEUE_CHANNEL, self._queued)

    def _queued(self) -> None:
        if not self._pending:
            self._pending = True
            self._reactor.callLater(0, self._send)

    def _send(self) -> None:
        self._pending = False
        self._to_parent(QUEUED + "\n")
