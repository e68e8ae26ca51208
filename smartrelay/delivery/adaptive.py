"""Adaptive throttles: ``[[delivery.throttle]] adaptive = true`` (AIMD; docs/delivery.md,
"Adaptive throttles").

A throttle entry's ``max_rate`` and ``max_connections`` are its ceiling. When a destination
answers with a rate-limit signal (:func:`is_rate_signal`), :class:`AdaptiveLimits` cuts the
limits of its throttle key multiplicatively (``decrease``, never below the floor) and holds
them ``hold`` seconds; another cut while held doubles the hold (up to ``max_hold``). After the
hold, every ``step_interval`` without a signal raises them: additively (``step_fraction`` of
the ceiling) up to the rate the last cut started from, then faster (times ``probe``: that rate
was too much once, higher ones were never tried), until they are back at the ceiling. Signals
less than ``same_episode`` seconds after a cut answer mail sent under the old limits (several
connections get the same 421 at once): they do not cut again.

The state is per delivery process (as every throttle's is) and per throttle key; an adaptive
``*`` or domain entry is keyed by the provider of the domain's preferred MX host
(:func:`provider_key`), so the many domains one provider hosts share one budget.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from attrs import define, field, frozen
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from smartrelay.config import Throttle
from smartrelay.deliverability import organizational_domain
from smartrelay.feedback.smtp_replies import classify_reply
from smartrelay.metrics import MAX_LIMIT_DOMAINS, MAX_LIMIT_FIGURES, LimitFigures

__all__ = [
    "AdaptiveLimits",
    "AimdSettings",
    "is_rate_signal",
    "provider_key",
    "retry_soon",
]

log = Logger()


@frozen
class AimdSettings:
    """The controller's fixed numbers (not configuration keys); times in seconds."""

    #: A cut multiplies the rate and the connections by this.
    decrease: float = 0.5
    #: The floor: messages per second (6 a minute), and connections. Never above the ceiling.
    min_rate: float = 0.1
    min_connections: int = 1
    #: How long cut limits are held before they are raised; doubled by a cut while held.
    hold: float = 60.0
    max_hold: float = 15 * 60.0
    #: Signals this soon after a cut belong to it (answers to mail sent before it).
    same_episode: float = 2.0
    #: After the hold, one step up every this many seconds without a signal ...
    step_interval: float = 30.0
    #: ... of this fraction of the ceiling (rate and connections; at least one connection) ...
    step_fraction: float = 0.05
    #: ... and once the rate is past the one the last cut started from, times this if more.
    probe: float = 1.5
    #: After a signal, the destination sends nothing for this long (not the 421 back-off).
    pause: float = 5.0
    #: A recipient deferred by a rate-limit signal is tried again after this (+0 to 50%
    #: jitter), not on the retry schedule.
    retry_delay: float = 15.0

    def __attrs_post_init__(self) -> None:
        if not 0 < self.decrease < 1:
            raise ValueError(f"decrease must be between 0 and 1, not {self.decrease!r}")
        if not 0 < self.step_fraction <= 1:
            raise ValueError(f"step_fraction must be in (0, 1], not {self.step_fraction!r}")
        if not self.probe >= 1:
            raise ValueError(f"probe must be at least 1, not {self.probe!r}")
        if self.min_connections < 1:
            raise ValueError("min_connections must be at least 1")
        for name in ("min_rate", "hold", "step_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        for name in ("same_episode", "pause", "retry_delay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)!r}")
        if not self.max_hold >= self.hold:
            raise ValueError("max_hold must not be less than hold")


def is_rate_signal(code: int, text: str, *, at_connect: bool = False) -> bool:
    """A reply that says "slow down" to the destination: a transient reply the classifier calls
    ``rate-limited`` (``421 4.7.0 Try again later``, ``451 4.7.1`` throttling, "too many
    connections"), or any 421 when connecting. A mailbox status (X.2.X: Gmail's ``450 4.2.1
    ... receiving mail too quickly``) limits one recipient, not the destination: not a signal
    (that recipient follows the retry schedule)."""
    if not 400 <= code < 500:
        return False
    if at_connect and code == 421:
        return True
    verdict = classify_reply(code, text)
    return verdict.category == "rate-limited" and not verdict.status.startswith("4.2.")


def retry_soon(
    *, now: float, first_attempt_at: float, max_age: float, delay: float, rng: random.Random
) -> float | None:
    """When a recipient deferred by a rate-limit signal is tried again: after ``delay`` (+0 to
    50%), at the deadline at the latest; None once the deadline has passed (it expires)."""
    deadline = first_attempt_at + max_age
    if now >= deadline:
        return None
    return min(now + delay * (1.0 + rng.uniform(0.0, 0.5)), deadline)


def provider_key(mx_host: str) -> str:
    """The throttle key of the provider behind an MX host: ``mx:`` and its registered domain
    by the public suffix list (``aspmx.l.google.com`` -> ``mx:.google.com``,
    ``mx1.example.co.uk`` -> ``mx:.example.co.uk``); a host that is its own registered domain,
    or has none, is its own key."""
    host = mx_host.strip().lower().rstrip(".")
    registered = organizational_domain(host)
    if registered is None or registered == host:
        return "mx:" + host
    return "mx:." + registered


@define
class _State:
    ceiling_rate: float
    ceiling_connections: int
    rate: float
    connections: int
    hold: float
    hold_until: float
    last_cut: float
    reason: str
    #: The rate the last cut started from (too much, then).
    cut_from: float = 0.0
    domains: dict[str, None] = field(factory=dict)
    timer: IDelayedCall | None = None

    @property
    def cut(self) -> bool:
        return self.rate < self.ceiling_rate or self.connections < self.ceiling_connections


class AdaptiveLimits:
    """The AIMD state of every adaptive throttle key of one process.

    ``on_change`` is called after every change with the figures of all keys (for the
    metrics and the UI). Timers run on ``clock``; :meth:`stop` cancels them.
    """

    def __init__(
        self,
        clock: IReactorTime,
        settings: AimdSettings | None = None,
        on_change: Callable[[list[LimitFigures]], None] | None = None,
    ) -> None:
        self._clock = clock
        self.settings = settings or AimdSettings()
        self.on_change = on_change
        self._states: dict[str, _State] = {}
        #: Keys back at their ceiling, shown at it (oldest recovery first; bounded).
        self._recovered: dict[str, LimitFigures] = {}

    # -- reading
    def rate(self, key: str, throttle: Throttle) -> float:
        """Messages per second allowed for ``key`` now."""
        state = self._states.get(key) if throttle.adaptive else None
        return throttle.max_rate_per_second if state is None else state.rate

    def connections(self, key: str, throttle: Throttle) -> int:
        """Connections allowed for ``key`` now."""
        state = self._states.get(key) if throttle.adaptive else None
        return throttle.max_connections if state is None else state.connections

    def figures(self) -> list[LimitFigures]:
        """Every key cut now, then those that recovered (at their ceiling)."""
        cut = [self._figures(key, state) for key, state in self._states.items()]
        return cut + list(self._recovered.values())[: max(0, MAX_LIMIT_FIGURES - len(cut))]

    def note_domain(self, key: str, domain: str) -> None:
        """Recipient domain ``domain`` is delivered under ``key`` (for the UI's queue page)."""
        if self._note(key, domain):
            self._changed()

    def _note(self, key: str, domain: str) -> bool:
        state = self._states.get(key)
        if state is None or not domain or domain in state.domains:
            return False
        if len(state.domains) >= MAX_LIMIT_DOMAINS:
            del state.domains[next(iter(state.domains))]
        state.domains[domain] = None
        return True

    # -- changing
    def signal(self, key: str, throttle: Throttle, reason: str, domain: str = "") -> bool:
        """``key`` answered with a rate-limit signal (the reply ``reason``): cut its limits
        unless a cut just happened. True if they were cut."""
        if not throttle.adaptive:
            return False
        s = self.settings
        now = self._clock.seconds()
        state = self._states.get(key)
        if state is None:
            ceiling_rate = throttle.max_rate_per_second
            ceiling_connections = throttle.max_connections
            state = _State(
                ceiling_rate,
                ceiling_connections,
                ceiling_rate,
                ceiling_connections,
                hold=s.hold,
                hold_until=-math.inf,
                last_cut=-math.inf,
                reason="",
            )
            self._states[key] = state
            self._recovered.pop(key, None)
        if now - state.last_cut < s.same_episode:
            if self._note(key, domain):
                self._changed()
            return False
        self._note(key, domain)
        old_rate, old_connections = state.rate, state.connections
        state.cut_from = old_rate
        floor_rate = min(s.min_rate, state.ceiling_rate)
        floor_connections = min(s.min_connections, state.ceiling_connections)
        state.rate = max(floor_rate, state.rate * s.decrease)
        state.connections = max(floor_connections, math.floor(state.connections * s.decrease))
        # A cut while held (the last cut was not enough) holds twice as long.
        state.hold = min(s.max_hold, state.hold * 2) if now < state.hold_until else s.hold
        state.hold_until = now + state.hold
        state.last_cut = now
        state.reason = _short(reason)
        log.info(
            "adaptive throttle {key}: cut {old} -> {new} ({reason}); held {hold}s",
            key=key,
            old=_limits(old_rate, old_connections),
            new=_limits(state.rate, state.connections),
            reason=state.reason,
            hold=_number(state.hold),
        )
        self._schedule(key, state, state.hold)
        self._changed()
        return True

    def stop(self) -> None:
        for state in self._states.values():
            if state.timer is not None and state.timer.active():
                state.timer.cancel()
            state.timer = None

    def _schedule(self, key: str, state: _State, delay: float) -> None:
        if state.timer is not None and state.timer.active():
            state.timer.cancel()
        state.timer = self._clock.callLater(delay, self._step, key)

    def _step(self, key: str) -> None:
        state = self._states.get(key)
        if state is None:
            return
        state.timer = None
        s = self.settings
        old_rate, old_connections = state.rate, state.connections
        step = state.ceiling_rate * s.step_fraction
        if state.rate >= state.cut_from:
            step = max(step, state.rate * (s.probe - 1))
        state.rate = min(state.ceiling_rate, state.rate + step)
        step_connections = max(1, math.floor(state.ceiling_connections * s.step_fraction))
        state.connections = min(state.ceiling_connections, state.connections + step_connections)
        quiet = self._clock.seconds() - state.last_cut
        log.info(
            "adaptive throttle {key}: raised {old} -> {new} (no rate-limit reply for {quiet}s)",
            key=key,
            old=_limits(old_rate, old_connections),
            new=_limits(state.rate, state.connections),
            quiet=_number(quiet),
        )
        if state.cut:
            self._schedule(key, state, s.step_interval)
        else:
            del self._states[key]
            self._recovered[key] = self._figures(key, state)
            while len(self._recovered) > MAX_LIMIT_FIGURES:
                del self._recovered[next(iter(self._recovered))]
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.figures())

    def _figures(self, key: str, state: _State) -> LimitFigures:
        return LimitFigures(
            destination=key,
            rate=state.rate,
            connections=state.connections,
            ceiling_rate=state.ceiling_rate,
            ceiling_connections=state.ceiling_connections,
            cut=state.cut,
            hold_until=state.hold_until,
            reason=state.reason,
            domains=tuple(state.domains),
        )


def _short(reply: str) -> str:
    text = " ".join(reply.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _number(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _limits(rate: float, connections: int) -> str:
    return f"{_number(rate)}/s {connections} conn"
