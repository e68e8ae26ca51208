"""Whether the submission listener's clients are sending: what the spare delivery processes go
by (``[delivery] spare_processes``, docs/delivery.md, "Spare delivery processes").

The listener is *busy* from the moment a session is admitted or a client sends anything, and
*quiet* once no client has sent anything (nor connected) for :data:`QUIET_AFTER` seconds.
Becoming busy is said at once (a spare process stops claiming before the new client's first
message is in), becoming quiet after the pause, so that clients that send a few messages a
second, over one connection or a connection each, do not switch the spares on and off
between their messages. A connection left open and silent (a client's pool) is not a
client sending.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["QUIET_AFTER", "ListenerActivity"]

#: Seconds without a new session or a byte from a client before the listener is quiet.
QUIET_AFTER = 0.25


class ListenerActivity:
    """Hears of the listener's clients (:meth:`heard`) and tells its observers when it
    becomes busy (True) or quiet (False)."""

    def __init__(self, clock: IReactorTime, quiet_after: float = QUIET_AFTER) -> None:
        self._clock = clock
        self._quiet_after = quiet_after
        self._last = float("-inf")
        self._quiet_call: IDelayedCall | None = None
        self._observers: list[Callable[[bool], object]] = []
        #: Whether the listener is busy now.
        self.busy = False

    def observe(self, observer: Callable[[bool], object]) -> None:
        """Call ``observer(busy)`` at every change from now on."""
        self._observers.append(observer)

    def heard(self) -> None:
        """A session was admitted, or a client sent something. (Called for every read: it
        only notes the time, unless the listener was quiet.)"""
        self._last = self._clock.seconds()
        if not self.busy:
            self._set(True)
            self._quiet_call = self._clock.callLater(self._quiet_after, self._maybe_quiet)

    def _maybe_quiet(self) -> None:
        left = self._last + self._quiet_after - self._clock.seconds()
        if left > 0:
            self._quiet_call = self._clock.callLater(left, self._maybe_quiet)
            return
        self._quiet_call = None
        self._set(False)

    def stop(self) -> None:
        """No more timers (the relay is stopping)."""
        if self._quiet_call is not None and self._quiet_call.active():
            self._quiet_call.cancel()
        self._quiet_call = None

    def _set(self, busy: bool) -> None:
        if busy == self.busy:
            return
        self.busy = busy
        for observer in list(self._observers):
            observer(busy)
