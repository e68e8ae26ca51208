"""Per-destination delivery limits: ``[[delivery.throttle]]`` (SPEC section 2).

:class:`Throttles` matches a destination (recipient domain, and the MX host once known) to
its throttle entry and keeps the state behind it: open connections per key and in total,
a :class:`TokenBucket` per key for the message rate, and a back-off time per key after a
``421`` or "too many connections".

Matching (:meth:`Throttles.settings_for`):

- ``mx:SUFFIX`` entries, when the MX host is known: ``mx:.google.com`` matches a host ending
  in ``.google.com``; ``mx:google.com`` (no leading dot) matches ``google.com`` and its
  subdomains. The longest suffix wins, and any ``mx:`` match beats a domain match.
- domain entries: ``gmail.com`` matches ``gmail.com`` and its subdomains; the longest wins.
- ``*`` last (the defaults of :class:`~smartrelay.config.Throttle` if there is no ``*``).

Keys (:meth:`Throttles.key_for`): an ``mx:`` entry is one shared state, named by the entry
(``mx:.google.com``: every domain hosted at Google counts against the same limits); a domain
or ``*`` entry gives each recipient domain its own state, named by the domain, unless it is
adaptive and the MX host is known: then the key is the MX host's provider
(:func:`~smartrelay.delivery.adaptive.provider_key`), so a provider's domains share one budget.

Adaptive entries (``adaptive = true``): :attr:`Throttles.adaptive` holds the limits cut by
rate-limit replies; the entry's numbers are their ceiling.

Everything runs on the clock given; nothing here schedules calls. State that carries no
information (no connections, a full bucket, no back-off) is dropped now and then, so memory
does not grow with the number of domains ever seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime

from smartrelay.config import Throttle
from smartrelay.delivery.adaptive import AdaptiveLimits, AimdSettings, provider_key
from smartrelay.delivery.routing import domain_key

__all__ = ["Throttles", "TokenBucket"]

# Time slack, in seconds. Clock times are large floats (about 1.7e9, precise to about 2.4e-7
# s), so elapsed times are a little off: a token due within this much time counts as there
# (after waiting exactly wait_time(), try_take() succeeds), and no wait is shorter (a shorter
# one could leave the clock where it is, and a caller polling in a loop would spin).
MIN_WAIT = 1e-6


class TokenBucket:
    """``rate_per_second`` tokens a second, at most ``burst`` saved up; starts full."""

    def __init__(
        self, clock: IReactorTime, rate_per_second: float, burst: float | None = None
    ) -> None:
        if not rate_per_second > 0 or math.isinf(rate_per_second):
            raise ValueError(f"rate_per_second must be positive, got {rate_per_second!r}")
        if burst is None:
            burst = max(1.0, rate_per_second)
        if not burst > 0:
            raise ValueError(f"burst must be positive, got {burst!r}")
        self._clock = clock
        self.rate = float(rate_per_second)
        self.burst = float(burst)
        self._tokens = self.burst
        self._last = clock.seconds()

    def _refill(self) -> None:
        now = self._clock.seconds()
        # max(): a wall clock that steps back must not take tokens away.
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    def tokens(self) -> float:
        """The tokens available now."""
        self._refill()
        return self._tokens

    def full(self) -> bool:
        return self.tokens() + self.rate * MIN_WAIT >= self.burst

    def try_take(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens if they are there now; False (and nothing taken) if not."""
        self._refill()
        if self._tokens + self.rate * MIN_WAIT >= n:
            self._tokens = max(0.0, self._tokens - n)
            return True
        return False

    def wait_time(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available (0 if now; ``inf`` if n > burst)."""
        self._refill()
        missing = n - self._tokens
        if missing <= self.rate * MIN_WAIT:
            return 0.0
        if n > self.burst + self.rate * MIN_WAIT:
            return math.inf
        return max(missing / self.rate, MIN_WAIT)

    def set_rate(self, rate_per_second: float, burst: float | None = None) -> None:
        """Change the rate (and burst; default one second's worth), keeping the tokens."""
        if not rate_per_second > 0 or math.isinf(rate_per_second):
            raise ValueError(f"rate_per_second must be positive, got {rate_per_second!r}")
        self._refill()
        self.rate = float(rate_per_second)
        self.burst = float(burst if burst is not None else max(1.0, rate_per_second))
        self._tokens = min(self._tokens, self.burst)


class Throttles:
    """Matches destinations to [[delivery.throttle]] entries and keeps their state."""

    def __init__(
        self,
        clock: IReactorTime,
        throttles: Sequence[Throttle],
        global_max_connections: int,
        *,
        prune_threshold: int = 1000,
        adaptive: AimdSettings | None = None,
    ) -> None:
        if global_max_connections < 1:
            raise ValueError(
                f"global_max_connections must be at least 1, got {global_max_connections!r}"
            )
        self._clock = clock
        self.global_max_connections = global_max_connections
        star: Throttle | None = None
        # mx: entries as (suffix, entry); domain entries by domain. The first entry for a
        # match wins (the config forbids duplicates).
        self._mx: list[tuple[str, Throttle]] = []
        self._domains: dict[str, Throttle] = {}
        for throttle in throttles:
            match = throttle.match.strip().lower()
            if match == "*":
                if star is None:
                    star = throttle
            elif match.startswith("mx:"):
                suffix = match[3:].rstrip(".")
                if suffix.lstrip(".") and all(s != suffix for s, _ in self._mx):
                    self._mx.append((suffix, throttle))
            else:
                self._domains.setdefault(domain_key(match), throttle)
        self._star = star if star is not None else Throttle()
        # Longest suffix first; sort() is stable, so file order among equals.
        self._mx.sort(key=lambda entry: -len(entry[0].lstrip(".")))
        self._connections: dict[str, int] = {}
        self._total = 0
        self._buckets: dict[str, TokenBucket] = {}
        self._backoff: dict[str, float] = {}
        self._prune_threshold = max(1, prune_threshold)
        self._prune_at = self._prune_threshold
        #: The limits of adaptive entries' keys, cut by rate-limit replies.
        self.adaptive = AdaptiveLimits(clock, adaptive)

    # -- matching

    def settings_for(self, domain: str, mx_host: str | None = None) -> Throttle:
        """The throttle entry for ``domain`` (delivered via ``mx_host``, if known)."""
        return self._match(domain, mx_host)

    def key_for(self, domain: str, mx_host: str | None = None) -> str:
        """The state key: the ``mx:`` entry's match, else the normalized recipient domain."""
        settings = self._match(domain, mx_host)
        if settings.match.startswith("mx:"):
            return settings.match
        if settings.adaptive and mx_host and mx_host.strip(" ."):
            return provider_key(mx_host)
        return domain_key(domain)

    def max_connections_for(self, key: str, settings: Throttle) -> int:
        """The connections ``key`` may have open now (an adaptive entry's may be cut)."""
        return self.adaptive.connections(key, settings)

    def _match(self, domain: str, mx_host: str | None) -> Throttle:
        if mx_host:
            host = mx_host.strip().lower().rstrip(".")
            for suffix, throttle in self._mx:  # longest first
                if _mx_matches(host, suffix):
                    return throttle
        candidate = domain_key(domain)
        while candidate:
            entry = self._domains.get(candidate)
            if entry is not None:
                return entry
            _, dot, parent = candidate.partition(".")
            candidate = parent if dot else ""
        return self._star

    # -- connections

    def acquire_connection(self, key: str, settings: Throttle) -> bool:
        """Count one more connection for ``key``, if allowed.

        False (and nothing counted) when the key has ``settings.max_connections`` open, the
        global maximum is reached, or the key is backed off (see :meth:`backed_off_until`).
        """
        if self.backed_off_until(key) is not None:
            return False
        open_now = self._connections.get(key, 0)
        limit = self.adaptive.connections(key, settings)
        if open_now >= limit or self._total >= self.global_max_connections:
            return False
        self._connections[key] = open_now + 1
        self._total += 1
        return True

    def release_connection(self, key: str) -> None:
        """Count one connection of ``key`` less. Never goes below zero."""
        open_now = self._connections.get(key, 0)
        if open_now <= 0:
            return
        if open_now == 1:
            del self._connections[key]
        else:
            self._connections[key] = open_now - 1
        self._total -= 1

    def connections(self, key: str) -> int:
        return self._connections.get(key, 0)

    def total_connections(self) -> int:
        return self._total

    # -- messages

    def take_message(self, key: str, settings: Throttle) -> float:
        """0 (and a token taken) when a message may be sent now; else the seconds to wait.

        While the key is backed off, the seconds until the back-off ends.
        """
        until = self.backed_off_until(key)
        if until is not None:
            return max(until - self._clock.seconds(), MIN_WAIT)
        rate = self.adaptive.rate(key, settings)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._maybe_prune()
            bucket = self._buckets[key] = TokenBucket(self._clock, rate)
        elif bucket.rate != rate:
            bucket.set_rate(rate)
        if bucket.try_take():
            return 0.0
        return max(bucket.wait_time(), MIN_WAIT)

    # -- back-off

    def back_off(self, key: str, seconds: float) -> None:
        """Send nothing to ``key`` for ``seconds`` (after a 421 / "too many connections").

        A back-off already running longer is kept.
        """
        until = self._clock.seconds() + max(0.0, seconds)
        if until > self._backoff.get(key, -math.inf):
            self._maybe_prune()
            self._backoff[key] = until

    def backed_off_until(self, key: str) -> float | None:
        """When the back-off of ``key`` ends (clock seconds), or None if it is not backed off."""
        until = self._backoff.get(key)
        if until is None:
            return None
        if until <= self._clock.seconds():
            del self._backoff[key]
            return None
        return until

    # -- memory

    def state_size(self) -> int:
        """Keys with any state (connections, rate bucket, back-off)."""
        return len(self._connections.keys() | self._buckets.keys() | self._backoff.keys())

    def _maybe_prune(self) -> None:
        """Drop state equal to a fresh one once the maps grow past a threshold."""
        if len(self._buckets) + len(self._backoff) < self._prune_at:
            return
        now = self._clock.seconds()
        for key in [k for k, until in self._backoff.items() if until <= now]:
            del self._backoff[key]
        for key in [k for k, bucket in self._buckets.items() if bucket.full()]:
            del self._buckets[key]
        # Amortized: the next sweep only after as much growth again.
        self._prune_at = max(self._prune_threshold, 2 * (len(self._buckets) + len(self._backoff)))


def _mx_matches(host: str, suffix: str) -> bool:
    if suffix.startswith("."):
        return host.endswith(suffix)
    return host == suffix or host.endswith("." + suffix)
