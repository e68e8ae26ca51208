"""Slowing down SMTP AUTH brute force, per client address.

The SMTP listener asks :meth:`AuthFailureLimiter.blocked` before it answers AUTH (``421 4.7.0``
and disconnect when True). Before each password check it waits for
:meth:`~AuthFailureLimiter.begin_attempt`, which counts the check as under way: failures
plus checks under way never exceed ``max_failures``, so parallel sessions from one client
cannot run more checks than a single session could (extra attempts wait for a check to be
decided, and are refused once the client is blocked). It then calls
:meth:`~AuthFailureLimiter.record_failure` or :meth:`~AuthFailureLimiter.record_success`,
and :meth:`~AuthFailureLimiter.end_attempt`; after a failure it waits
:meth:`~AuthFailureLimiter.delay` seconds before it sends the ``535`` reply.

Clients are keyed by address; IPv6 addresses are grouped by their /64 network by default
(``ipv6_prefix``), since one IPv6 host usually has a whole /64 to pick addresses from, and an
IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) counts as its IPv4 address. A string that is
not an IP address is used as it is.

Memory stays bounded: checks under way and waiting attempts are bounded by the open
connections; each client keeps at most ``max_failures`` timestamps, clients whose
last failure is older than the window are dropped as new failures come in, and past
``max_entries`` clients the one whose last failure is the oldest is forgotten.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

__all__ = ["AuthFailureLimiter"]


class AuthFailureLimiter:
    """Counts failed AUTH attempts per client within a sliding window."""

    def __init__(
        self,
        clock: IReactorTime,
        window: float = 300.0,
        max_failures: int = 10,
        base_delay: float = 1.0,
        max_delay: float = 8.0,
        *,
        max_entries: int = 100_000,
        ipv6_prefix: int = 64,
    ) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window!r}")
        if max_failures < 1:
            raise ValueError(f"max_failures must be at least 1, got {max_failures!r}")
        if base_delay < 0 or max_delay < 0:
            raise ValueError("base_delay and max_delay must not be negative")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries!r}")
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be 0 to 128, got {ipv6_prefix!r}")
        self._clock = clock
        self.window = window
        self.max_failures = max_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_entries = max_entries
        self.ipv6_prefix = ipv6_prefix
        # client key -> times of its most recent failures (oldest first). Ordered by the time
        # of the last failure, oldest client first (an entry moves to the end on each failure).
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        #: client key -> password checks under way, and attempts waiting for one to end.
        self._in_flight: dict[str, int] = {}
        self._waiting: dict[str, deque[Deferred[bool]]] = {}

    def __len__(self) -> int:
        """How many clients are tracked (including some whose failures have expired)."""
        return len(self._failures)

    def record_failure(self, ip: str) -> None:
        """Count a failed AUTH attempt from ``ip``."""
        now = self._clock.seconds()
        self._prune(now)
        key = self.key(ip)
        times = self._failures.get(key)
        if times is None:
            while len(self._failures) >= self.max_entries:
                self._failures.popitem(last=False)
            times = self._failures[key] = deque(maxlen=self.max_failures)
        else:
            self._failures.move_to_end(key)
        times.append(now)

    def begin_attempt(self, ip: str) -> Deferred[bool]:
        """Fires True when a password check of ``ip`` may start (call :meth:`end_attempt`
        once it is decided), False when ``ip`` is blocked."""
        if self.blocked(ip):
            return succeed(False)
        key = self.key(ip)
        if self._room(ip, key):
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            return succeed(True)
        waiter: Deferred[bool] = Deferred()
        self._waiting.setdefault(key, deque()).append(waiter)
        return waiter

    def end_attempt(self, ip: str) -> None:
        """A check admitted by :meth:`begin_attempt` is decided (and recorded)."""
        key = self.key(ip)
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        self._admit(ip, key)

    def in_flight(self, ip: str) -> int:
        """Password checks of ``ip`` under way."""
        return self._in_flight.get(self.key(ip), 0)

    def _room(self, ip: str, key: str) -> bool:
        return self.failures(ip) + self._in_flight.get(key, 0) < self.max_failures

    def _admit(self, ip: str, key: str) -> None:
        """Let waiting attempts of ``key`` go on (True) while there is room, or refuse them
        all (False) once the client is blocked."""
        waiting = self._waiting.get(key)
        while waiting:
            if self.blocked(ip):
                refused = list(waiting)
                waiting.clear()
                for waiter in refused:
                    waiter.callback(False)
                break
            if not self._room(ip, key):
                break
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            waiting.popleft().callback(True)  # may re-enter end_attempt (a synchronous check)
        if waiting is not None and not waiting and self._waiting.get(key) is waiting:
            del self._waiting[key]

    def record_success(self, ip: str) -> None:
        """Forget the failures of ``ip`` (a successful AUTH)."""
        self._failures.pop(self.key(ip), None)

    def failures(self, ip: str) -> int:
        """Failures of ``ip`` within the window (counted up to ``max_failures``)."""
        times = self._failures.get(self.key(ip))
        if times is None:
            return 0
        since = self._clock.seconds() - self.window
        while times and times[0] <= since:
            times.popleft()
        return len(times)

    def delay(self, ip: str) -> float:
        """Seconds to wait before answering the next AUTH reply to ``ip``.

        0 while there is at most one failure in the window, then
        ``base_delay * 2 ** (failures - 2)``, at most ``max_delay``.
        """
        count = self.failures(ip)
        if count < 2:
            return 0.0
        # The exponent is bounded by max_failures, but keep 2 ** n finite for huge settings.
        exponent = min(count - 2, 64)
        return float(min(self.base_delay * 2.0**exponent, self.max_delay))

    def blocked(self, ip: str) -> bool:
        """True once ``max_failures`` failures of ``ip`` fall within the window."""
        return self.failures(ip) >= self.max_failures

    def key(self, ip: str) -> str:
        """The table key of a client address (see the module docstring)."""
        try:
            address = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return ip
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            network = ipaddress.IPv6Network((address, self.ipv6_prefix), strict=False)
            return str(network)
        return str(address)

    def _prune(self, now: float) -> None:
        """Drop clients whose last failure left the window (they are at the front)."""
        since = now - self.window
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if times and times[-1] > since:
                break
            del self._failures[key]
