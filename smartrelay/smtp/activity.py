"""Whether the submission listener has clients: what the spare delivery processes go by
(``[delivery] spare_processes``, docs/delivery.md, "Spare delivery processes").

The listener is *busy* from the moment a session is admitted until no session has been open
for :data:`QUIET_AFTER` seconds. Becoming busy is said at once (a spare process stops
claiming before the new client's first message), becoming quiet after the pause, so that
clients that connect once per message, a few a second, do not switch the spares on and off
between their sessions.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["QUIET_AFTER", "ListenerActivity"]

#: Seconds without any open session before the listener counts as quiet.
QUIET_AFTER = 0.25


class ListenerActivity:
    """Counts the listener's open sessions and tells its observers when it becomes busy
    (True) or quiet (False)."""

    def __init__(self, clock: IReactorTime, quiet_after: float = QUIET_AFTER) -> None:
        self._clock = clock
        self._quiet_after = quiet_after
        self._open = 0
        self._quiet_call: IDelayedCall | None = None
        self._observers: list[Callable[[bool], object]] = []
        #: Whether the listener is busy now.
        self.busy = False

    def observe(self, observer: Callable[[bool], object]) -> None:
        """Call ``observer(busy)`` at every change from now on."""
        self._observers.append(observer)

    def opened(self) -> None:
        """A session was admitted."""
        self._open += 1
        if self._quiet_call is not None and self._quiet_call.active():
            self._quiet_call.cancel()
        self._quiet_call = None
        self._set(True)

    def closed(self) -> None:
        """An admitted session ended."""
        self._open = max(0, self._open - 1)
        if self._open == 0 and self.busy and self._quiet_call is None:
            self._quiet_call = self._clock.callLater(self._quiet_after, self._quiet)

    def _quiet(self) -> None:
        self._quiet_call = None
        if self._open == 0:
            self._set(False)

    def _set(self, busy: bool) -> None:
        if busy == self.busy:
            return
        self.busy = busy
        for observer in list(self._observers):
            observer(busy)
