"""Delivery in separate processes (``[delivery] processes = N``), so that re-wrapping, DKIM
and the SMTP client run on other cores than the listener.

The main process keeps the listeners, the web endpoints and the storage; it starts N children
(``python -m smartrelay.delivery_process``, :mod:`smartrelay.child_processes`), each a delivery
manager with its own node id on the same database: they claim due recipients exactly as
several relay hosts do (docs/storage.md), so nothing is delivered twice. A byte on a child's
standard input means "work was queued" (SQLite has no LISTEN/NOTIFY across processes; on
PostgreSQL the children also get the NOTIFY, and a second wake-up costs one empty claim).
Besides its log and metrics lines, a child sends its adaptive throttles' limits
(``adaptive {json}``, docs/delivery.md, "Adaptive throttles").

``[delivery] spare_processes = M`` adds M children after those N, which start with their
claims held: they claim work only while no client of the main process's listener is
sending (``r`` on their standard input releases them, ``h`` holds them again; what they
have claimed they deliver either way), so that the listener keeps its core while clients
send and the queue gets every core when they do not (docs/delivery.md, "Spare delivery
processes").

A reload of the relay (SIGHUP) is passed on to the children (SIGHUP), which re-read their
DKIM keys. On shutdown they finish or cut off what is on the wire like the in-process
delivery manager does.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from smartrelay.child_processes import (
    METRICS_INTERVAL,
    METRICS_PREFIX,
    STOP_TIMEOUT,
    ChildProcesses,
    _Child,
    child_command,
    json_line,
    metrics_line,
)
from smartrelay.config.model import DeliveryConfig
from smartrelay.metrics import RelayMetrics
from smartrelay.reactor import IRelayReactor
from smartrelay.smtp.activity import ListenerActivity
from smartrelay.storage.store import QUEUE_CHANNEL, Store

__all__ = [
    "ADAPTIVE_PREFIX",
    "HOLD",
    "METRICS_INTERVAL",
    "METRICS_PREFIX",
    "RELEASE",
    "STOP_TIMEOUT",
    "WAKE",
    "DeliveryProcesses",
    "_Child",
    "adaptive_line",
    "claims_held",
    "is_spare",
    "metrics_line",
    "share_of_limits",
    "worker_command",
]

log = Logger()

WAKE = b"w"
#: To a spare delivery process: claim nothing more (clients are sending) / claim again.
HOLD = b"h"
RELEASE = b"r"
#: A child's adaptive throttles' limits (docs/delivery.md, "Adaptive throttles").
ADAPTIVE_PREFIX = "adaptive "


def adaptive_line(metrics: RelayMetrics) -> str:
    """A child's adaptive throttle limits, a line for the main process."""
    return ADAPTIVE_PREFIX + json.dumps(metrics.adaptive.own(), separators=(",", ":")) + "\n"


def share_of_limits(delivery: DeliveryConfig, index: int) -> DeliveryConfig:
    """Delivery process ``index``'s part of the node's limits: ``max_connections`` and each
    throttle's connections and rate divided between the children (``processes`` and
    ``spare_processes``), so that the config's figures hold for the node whatever the number
    of processes. A connection limit smaller than the number of processes still leaves each
    one connection (a child could not deliver what it claimed otherwise): the node may then
    open up to that number."""
    count = delivery.processes + delivery.spare_processes
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
    return child_command("smartrelay.delivery_process", config_path, index)


def claims_held(data: bytes) -> bool | None:
    """What bytes read from the main process say of a spare's claims: held (True), released
    (False), or nothing (None). The last hold or release byte is what holds now."""
    held, released = data.rfind(HOLD), data.rfind(RELEASE)
    return None if held == released else held > released


def is_spare(delivery: DeliveryConfig, index: int) -> bool:
    """Whether delivery process ``index`` is a spare one (they come after the others)."""
    return index >= delivery.processes


class DeliveryProcesses(ChildProcesses):
    """``processes`` delivery processes, and ``spare`` more that claim work only while
    ``activity`` says the listener is quiet (docs/delivery.md, "Spare delivery processes")."""

    kind = "delivery"
    noun = "delivery"

    def __init__(
        self,
        reactor: IRelayReactor,
        count: int,
        command: Callable[[int], list[str]],
        store_ready: Callable[[], Deferred[Store]],
        metrics: RelayMetrics | None = None,
        spare: int = 0,
        activity: ListenerActivity | None = None,
    ) -> None:
        super().__init__(reactor, count + spare, command, store_ready, metrics)
        self._spare_from = count
        self._activity = activity
        if spare and activity is not None:
            activity.observe(self._listener_busy)

    @property
    def log(self) -> Logger:
        return log

    def _spawn(self, index: int) -> None:
        super()._spawn(index)
        # A spare starts held; it is released at once if the listener is quiet.
        if index >= self._spare_from and not self._listener_is_busy():
            self.send_to(index, RELEASE)

    def _listener_is_busy(self) -> bool:
        return self._activity is None or self._activity.busy

    def _listener_busy(self, busy: bool) -> None:
        for index in list(self.children):
            if index >= self._spare_from:
                self.send_to(index, HOLD if busy else RELEASE)

    async def _prepare(self, store: Store) -> bool:
        await store.engine.listen(QUEUE_CHANNEL, self.wake)
        spares = self._count - self._spare_from
        if spares:
            log.info(
                "delivery: {spares} of the delivery processes spare (delivery[{first}] on):"
                " they claim work while no SMTP client is sending",
                spares=spares,
                first=self._spare_from,
            )
        return True

    def wake(self) -> None:
        """Work was queued: tell every child (one byte each; pipes keep it if they are busy)
        but the held spares, which would claim nothing (their release wakes them)."""
        spares_held = self._listener_is_busy()
        for index in list(self.children):
            if not (spares_held and index >= self._spare_from):
                self.send_to(index, WAKE)

    def _child_line(self, index: int, text: str) -> bool:
        if text.startswith(ADAPTIVE_PREFIX):
            if self._metrics is not None:
                rows = json_line(text[len(ADAPTIVE_PREFIX) :])
                if not self._metrics.adaptive.update_child(index, rows):
                    log.warn(
                        "delivery[{index}]: a malformed adaptive line was ignored", index=index
                    )
            return True
        return False

    def _cut_off(self, text: str) -> bool:
        return super()._cut_off(text) or text.startswith(ADAPTIVE_PREFIX)

    def _child_gone(self, index: int) -> None:
        if self._metrics is not None:
            self._metrics.adaptive.retire(index)
