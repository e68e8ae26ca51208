"""The volume meter's arithmetic (smartrelay/smtp/volume.py) on a task.Clock: the sliding
rate, the baseline (mean, then exponentially weighted), the learning period, the minimum,
one alert per episode, re-arming, windows in alert not learned, the bound on credentials."""

from __future__ import annotations

import math

import pytest
from twisted.internet.task import Clock

from smartrelay.smtp.volume import (
    ALPHA,
    BUCKETS,
    LEARNING_WINDOWS,
    VolumeMeter,
    VolumeSettings,
    VolumeSpike,
)

WINDOW = 60.0


def settings(action: str = "warn", factor: float = 10.0, minimum: int = 20) -> VolumeSettings:
    return VolumeSettings(action=action, factor=factor, minimum=minimum, window=WINDOW)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(math.ceil(1_700_000_000 / WINDOW) * WINDOW)  # a window starts here
    return clock


def send(meter: VolumeMeter, clock: Clock, n: int, who: str = "app") -> list[VolumeSpike]:
    """``n`` messages spread over the first half of the current window."""
    spikes = []
    for _ in range(n):
        spike = meter.count(who, clock.seconds())
        if spike is not None:
            spikes.append(spike)
        clock.advance(WINDOW / 2 / max(n, 1))
    return spikes


def next_window(clock: Clock) -> None:
    clock.advance(WINDOW - clock.seconds() % WINDOW)


def same(pair: tuple[float | None, int], baseline: float, windows: int) -> bool:
    """``pair`` is (about ``baseline``, ``windows``)."""
    return pair[0] is not None and math.isclose(pair[0], baseline) and pair[1] == windows


def learn(meter: VolumeMeter, clock: Clock, counts: list[int], who: str = "app") -> None:
    """The first (unlearned) window, then one window per count; ends at a new window."""
    for n in [1, *counts]:
        assert send(meter, clock, n, who) == []
        next_window(clock)
    meter.count(who, clock.seconds())  # closes the last window


def test_sliding_rate(clock: Clock) -> None:
    meter = VolumeMeter(settings())
    start = clock.seconds()
    for _ in range(BUCKETS):  # one message per bucket
        meter.count("app", clock.seconds())
        clock.advance(WINDOW / BUCKETS)
    assert meter.rate("app", clock.seconds() - 1) == BUCKETS
    clock.advance(start + WINDOW - clock.seconds())
    assert meter.rate("app", clock.seconds()) == BUCKETS - 1  # the first bucket has left
    clock.advance(WINDOW)
    assert meter.rate("app", clock.seconds()) == 0
    assert meter.rate("unknown", clock.seconds()) == 0


def test_baseline_is_the_mean_then_exponentially_weighted(clock: Clock) -> None:
    meter = VolumeMeter(settings())
    assert meter.baseline("app") == (None, 0)
    learn(meter, clock, [4, 6, 5, 9])
    assert same(meter.baseline("app"), 6.0, 4)  # the first window not learned
    for i in range(16):  # 20 windows: still the plain mean
        send(meter, clock, 5 if i == 0 else 6)  # (+ the message that closed the last one)
        next_window(clock)
    meter.count("app", clock.seconds())
    expected = (4 + 6 + 5 + 9 + 6 * 16) / 20
    assert same(meter.baseline("app"), expected, 20)
    # The 21st window: weight ALPHA.
    send(meter, clock, 29)  # 30 with the message that closed the last window
    next_window(clock)
    meter.count("app", clock.seconds())
    assert meter.baseline("app")[0] == pytest.approx(expected + ALPHA * (30 - expected))


def test_idle_windows_count_as_zero(clock: Clock) -> None:
    meter = VolumeMeter(settings())
    learn(meter, clock, [10] * 20)
    before, windows = meter.baseline("app")
    assert before is not None and math.isclose(before, 10.0) and windows == 20
    clock.advance(WINDOW * 4)  # this window (1 message) and 3 empty ones
    meter.count("app", clock.seconds())
    b = before + ALPHA * (1 - before)
    assert same(meter.baseline("app"), b * (1 - ALPHA) ** 3, 24)
    clock.advance(WINDOW * 10_000)  # a long silence: closed in constant time
    meter.count("app", clock.seconds())
    assert meter.baseline("app")[0] == pytest.approx(0.0, abs=1e-9)


def test_no_alert_while_learning(clock: Clock) -> None:
    meter = VolumeMeter(settings())
    learn(meter, clock, [2] * (LEARNING_WINDOWS - 1))
    assert send(meter, clock, 200) == []  # 100x, but the baseline is not trusted yet
    next_window(clock)
    meter2 = VolumeMeter(settings())
    learn(meter2, clock, [2] * LEARNING_WINDOWS)
    spikes = send(meter2, clock, 200)
    assert len(spikes) == 1


def test_the_minimum_keeps_a_quiet_credential_quiet(clock: Clock) -> None:
    meter = VolumeMeter(settings(minimum=40))
    learn(meter, clock, [3] * LEARNING_WINDOWS)
    assert send(meter, clock, 35) == []  # 3 -> 36 (with the closing message): 12x, under 40
    next_window(clock)
    meter = VolumeMeter(settings(minimum=40))
    learn(meter, clock, [3] * LEARNING_WINDOWS)
    spikes = send(meter, clock, 45)
    assert [s.rate for s in spikes] == [40]  # fires as the count reaches the minimum
    assert spikes[0].baseline == pytest.approx(3.0)


def test_factor_threshold(clock: Clock) -> None:
    meter = VolumeMeter(settings(minimum=1))
    learn(meter, clock, [5] * LEARNING_WINDOWS)
    # 1 message closed the last window; 49 more: 50, not more than 10 x 5.
    assert send(meter, clock, 49) == []
    spikes = send(meter, clock, 1)
    assert [(s.credential, s.rate) for s in spikes] == [("app", 51)]


def test_one_alert_per_episode_then_rearmed(clock: Clock) -> None:
    meter = VolumeMeter(settings())
    learn(meter, clock, [4] * LEARNING_WINDOWS)
    baseline = meter.baseline("app")
    spikes = send(meter, clock, 300)
    assert len(spikes) == 1 and spikes[0].rate == 41
    assert meter.alerting("app")
    # Still far above in the next window: the same episode.
    next_window(clock)
    assert send(meter, clock, 300) == []
    # The burst stops: the rate falls under the threshold as its buckets leave the window,
    # and the episode ends a window after the last time it was above.
    ended: list[str] = []
    for _ in range(BUCKETS * 3):
        clock.advance(WINDOW / BUCKETS)
        ended += meter.tick(clock.seconds())
    assert ended == ["app"] and not meter.alerting("app")
    # Windows in the episode were not learned; the empty ones after it are (as 0).
    assert meter.baseline("app") == baseline
    clock.advance(WINDOW * 2)
    meter.tick(clock.seconds())
    meter.count("app", clock.seconds())
    b, windows = meter.baseline("app")
    assert b is not None and baseline[0] is not None
    assert b < baseline[0] and windows > baseline[1]
    assert len(send(meter, clock, 300)) == 1  # a new episode


def test_windows_in_alert_are_not_learned(clock: Clock) -> None:
    meter = VolumeMeter(settings())
    learn(meter, clock, [4] * LEARNING_WINDOWS)
    before = meter.baseline("app")
    for _ in range(5):  # five windows of 300: all in the episode
        send(meter, clock, 300)
        next_window(clock)
    meter.count("app", clock.seconds())
    assert meter.baseline("app") == before
    assert meter.take_changed()[-1].windows == before[1]


def test_hold_episode_lasts_until_release(clock: Clock) -> None:
    meter = VolumeMeter(settings(action="hold"))
    learn(meter, clock, [4] * LEARNING_WINDOWS)
    before = meter.baseline("app")
    assert len(send(meter, clock, 100)) == 1
    for _ in range(BUCKETS * 5):  # held: no mail, and the episode goes on
        clock.advance(WINDOW / BUCKETS)
        assert meter.tick(clock.seconds()) == []
    assert meter.alerting("app")
    meter.release("app", clock.seconds())
    assert not meter.alerting("app") and meter.rate("app", clock.seconds()) == 0
    assert meter.baseline("app") == before  # the held windows were not learned as 0
    assert len(send(meter, clock, 100)) == 1  # re-armed


def test_credentials_are_independent(clock: Clock) -> None:
    meter = VolumeMeter(settings())
    learn(meter, clock, [4] * LEARNING_WINDOWS, who="a")
    assert send(meter, clock, 100, who="b") == []  # b is new: learning
    assert len(send(meter, clock, 100, who="a")) == 1
    assert not meter.alerting("b")


def test_bounded_credentials(clock: Clock) -> None:
    meter = VolumeMeter(settings(), max_tracked=3)
    learn(meter, clock, [4, 4], who="old")
    for who in ("b", "c", "d"):
        meter.count(who, clock.seconds())
    assert len(meter) == 3
    assert meter.baseline("old") == (None, 0)  # forgotten, least recently used
    saved = {c.credential: (c.baseline, c.windows) for c in meter.take_changed()}
    assert same(saved["old"], 4.0, 2)  # its baseline is still saved
    assert meter.take_changed() == []


def test_loaded_baseline(clock: Clock) -> None:
    meter = VolumeMeter(settings())
    meter.load("app", 5.0, 30, clock.seconds())
    assert meter.baseline("app") == (5.0, 30)
    spikes = send(meter, clock, 60)
    assert [s.rate for s in spikes] == [51]  # trusted at once: learned before the restart
    meter.load("app", 99.0, 50, clock.seconds())  # a late read does not overwrite
    assert meter.baseline("app") == (5.0, 30)
