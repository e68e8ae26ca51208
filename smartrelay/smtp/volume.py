"""Per-credential message counts, baselines and alert episodes (docs/smtp.md, "Volume
alerts"): the arithmetic only, no I/O; :mod:`smartrelay.smtp.volume_watch` feeds it and acts.

For each credential, :class:`VolumeMeter` keeps:

- the **rate**: messages in the last ``window``, a ring of :data:`BUCKETS` buckets of
  ``window / BUCKETS`` seconds each (O(1) per message, a fixed size per credential);
- the **baseline**: messages per window, learned from completed *tumbling* windows (aligned
  on multiples of ``window`` since the epoch). Each completed window's count ``x`` moves it by
  ``a * (x - baseline)`` with ``a = max(ALPHA, 1 / n)`` for the ``n``-th window learned: the
  plain mean of the first ``1 / ALPHA`` windows (a new credential's baseline is its average,
  not pulled towards zero), then an exponentially weighted mean with :data:`ALPHA`. A window
  without mail counts as 0. The first window a credential is seen in (this process may have
  started in the middle of it) and every window touched by an alert episode are not learned;
- the **episode**: an alert fires when the rate exceeds ``factor * baseline`` and reaches
  ``minimum``, once :data:`LEARNING_WINDOWS` windows have been learned. One alert per
  episode: with ``warn`` the episode ends (the watch re-arms) once the rate has stayed at or
  under the threshold for a whole window; with ``hold`` it ends when the credential is
  released (:meth:`VolumeMeter.release`).

Memory is bounded: at most ``max_tracked`` credentials, the least recently used forgotten
first (its baseline kept in :meth:`VolumeMeter.take_changed` for the watch to save).
"""

from __future__ import annotations

import math
from collections import OrderedDict

from attrs import frozen

__all__ = [
    "ALPHA",
    "BUCKETS",
    "LEARNING_WINDOWS",
    "MAX_TRACKED",
    "VolumeMeter",
    "VolumeSettings",
    "VolumeSpike",
]

#: Weight of the newest window in the baseline once past the first 20 windows. 0.05 gives a
#: half-life of 13.5 windows (2 h 15 min with the default 10-minute window): a customer whose
#: volume grows over hours or days moves the baseline with it, a jump within one window does
#: not (20 windows at 10x the old volume are needed to bring the baseline up to 6.4x).
ALPHA = 0.05
#: Windows a credential learns before its baseline is trusted (an hour with 10-minute windows).
LEARNING_WINDOWS = 6
#: Buckets per window for the sliding count (1 minute each with a 10-minute window).
BUCKETS = 10
#: Credentials kept in memory at most (about 400 bytes each: bench/volume_meter.py).
MAX_TRACKED = 10_000
#: ``windows`` stops counting here (it only says "learned enough").
MAX_WINDOWS = 1_000_000


@frozen
class VolumeSettings:
    action: str  # warn or hold
    factor: float
    minimum: int
    window: float


@frozen
class VolumeSpike:
    """An alert to raise: ``rate`` messages in the last window against ``baseline``."""

    credential: str
    rate: int
    baseline: float


@frozen
class LearnedBaseline:
    credential: str
    baseline: float | None
    windows: int


class _Credential:
    __slots__ = (
        "alerting",
        "baseline",
        "bucket",
        "counts",
        "last_above",
        "skip_window",
        "total",
        "window_count",
        "window_index",
        "windows",
    )

    def __init__(self, baseline: float | None, windows: int, bucket: int, window_index: int):
        self.counts = [0] * BUCKETS
        self.total = 0  # sum of counts: the rate
        self.bucket = bucket  # absolute index of the newest bucket
        self.window_index = window_index  # the tumbling window being counted
        self.window_count = 0
        self.skip_window = True  # this window is not learned (first seen, or in an episode)
        self.baseline = baseline
        self.windows = windows
        self.alerting = False
        self.last_above = 0.0


class VolumeMeter:
    """Counts, learns and decides; times are the caller's clock's seconds."""

    def __init__(self, settings: VolumeSettings, max_tracked: int = MAX_TRACKED) -> None:
        if settings.window <= 0:
            raise ValueError("the window must be positive")
        self.settings = settings
        self.max_tracked = max_tracked
        self._width = settings.window / BUCKETS
        self._states: OrderedDict[str, _Credential] = OrderedDict()
        #: Credentials whose baseline changed since :meth:`take_changed` (with the learned
        #: values of those forgotten meanwhile).
        self._changed: dict[str, LearnedBaseline] = {}
        #: Credentials in an alert episode.
        self._alerting: set[str] = set()

    def __len__(self) -> int:
        return len(self._states)

    # -- feeding ------------------------------------------------------------------------------
    def load(self, credential: str, baseline: float | None, windows: int, now: float) -> None:
        """A baseline read back from the database (at start-up). A credential already counted
        since the start keeps its episode and rate, and takes the stored baseline unless it
        has learned a window of its own."""
        state = self._states.get(credential)
        if state is None:
            if len(self._states) >= self.max_tracked:
                return
            self._states[credential] = _Credential(
                baseline, windows, self._bucket(now), self._window(now)
            )
            self._states.move_to_end(credential, last=False)  # loaded: not recently used
        elif state.windows == 0:
            state.baseline, state.windows = baseline, windows

    def count(self, credential: str, now: float) -> VolumeSpike | None:
        """One message accepted for ``credential`` at ``now``; a spike when this message
        starts an alert episode."""
        state = self._state(credential, now)
        self._advance(credential, state, now)
        state.counts[state.bucket % BUCKETS] += 1
        state.total += 1
        state.window_count += 1
        above = self._above(state)
        if state.alerting:
            if above:
                state.last_above = now
            return None
        if not above or state.windows < LEARNING_WINDOWS:
            return None
        state.alerting = True
        state.skip_window = True
        state.last_above = now
        self._alerting.add(credential)
        return VolumeSpike(credential, state.total, state.baseline or 0.0)

    def tick(self, now: float) -> list[str]:
        """Bring the credentials in an episode up to ``now``; with ``warn``, the episodes
        that end (the rate at or under the threshold for a whole window). Returns those."""
        ended = []
        for credential in list(self._alerting):
            state = self._states.get(credential)
            if state is None:
                self._alerting.discard(credential)
                continue
            self._advance(credential, state, now)
            if not state.alerting:
                ended.append(credential)
        return ended

    def release(self, credential: str, now: float) -> None:
        """The credential's hold was released: its episode ends, its rate starts again from
        nothing (the mail refused meanwhile was not counted) and the current window is not
        learned."""
        self._alerting.discard(credential)
        state = self._states.get(credential)
        if state is None:
            return
        self._advance(credential, state, now)
        state.alerting = False
        state.counts = [0] * BUCKETS
        state.total = 0
        state.window_count = 0
        state.skip_window = True

    # -- reading ------------------------------------------------------------------------------
    def rate(self, credential: str, now: float) -> int:
        state = self._states.get(credential)
        if state is None:
            return 0
        self._advance(credential, state, now)
        return state.total

    def baseline(self, credential: str) -> tuple[float | None, int]:
        """(baseline, windows learned) of ``credential`` ((None, 0) when unknown)."""
        state = self._states.get(credential)
        return (None, 0) if state is None else (state.baseline, state.windows)

    def alerting(self, credential: str) -> bool:
        state = self._states.get(credential)
        return state is not None and state.alerting

    def take_changed(self) -> list[LearnedBaseline]:
        """The baselines learned since the last call (to save), and forget that they were."""
        changed = list(self._changed.values())
        self._changed.clear()
        return changed

    # -- inside -------------------------------------------------------------------------------
    def _bucket(self, now: float) -> int:
        return math.floor(now / self._width)

    def _window(self, now: float) -> int:
        return math.floor(now / self.settings.window)

    def _threshold(self, state: _Credential) -> float:
        return self.settings.factor * (state.baseline or 0.0)

    def _above(self, state: _Credential) -> bool:
        return state.total >= self.settings.minimum and state.total > self._threshold(state)

    def _state(self, credential: str, now: float) -> _Credential:
        state = self._states.get(credential)
        if state is not None:
            self._states.move_to_end(credential)
            return state
        state = _Credential(None, 0, self._bucket(now), self._window(now))
        self._states[credential] = state
        while len(self._states) > self.max_tracked:
            gone, old = self._states.popitem(last=False)
            self._alerting.discard(gone)
            # A forgotten credential's baseline is saved with the next flush.
            if gone in self._changed:
                self._changed[gone] = LearnedBaseline(gone, old.baseline, old.windows)
        return state

    def _advance(self, credential: str, state: _Credential, now: float) -> None:
        """Expire the buckets older than the window, close the tumbling windows that ended,
        and end a ``warn`` episode that has stayed under the threshold for a window."""
        bucket = self._bucket(now)
        if bucket > state.bucket:
            for step in range(1, min(bucket - state.bucket, BUCKETS) + 1):
                index = (state.bucket + step) % BUCKETS
                state.total -= state.counts[index]
                state.counts[index] = 0
            state.bucket = bucket
        window = self._window(now)
        if window > state.window_index:
            if not state.skip_window and not state.alerting:
                self._learn(credential, state, state.window_count, 1)
            idle = window - state.window_index - 1
            if idle > 0 and not state.alerting:
                self._learn(credential, state, 0, idle)
            state.window_index = window
            state.window_count = 0
            state.skip_window = state.alerting
        if (
            state.alerting
            and self.settings.action == "warn"
            and not self._above(state)
            and now - state.last_above >= self.settings.window
        ):
            state.alerting = False
            self._alerting.discard(credential)
        elif state.alerting and self._above(state):
            state.last_above = now

    def _learn(self, credential: str, state: _Credential, count: int, times: int) -> None:
        """``times`` completed windows of ``count`` messages each."""
        mean_steps = max(0, min(times, math.ceil(1 / ALPHA) - state.windows))
        for _ in range(mean_steps):
            n = state.windows + 1
            if state.baseline is None:
                state.baseline = float(count)
            else:
                state.baseline += max(ALPHA, 1 / n) * (count - state.baseline)
            state.windows = n
        rest = times - mean_steps
        if rest > 0:
            keep = (1 - ALPHA) ** rest
            base = state.baseline if state.baseline is not None else float(count)
            state.baseline = base * keep + count * (1 - keep)
            state.windows = min(state.windows + rest, MAX_WINDOWS)
        self._changed[credential] = LearnedBaseline(credential, state.baseline, state.windows)
