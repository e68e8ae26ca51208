"""smartrelay.delivery.retry: the retry schedule, jitter, hints in replies and expiry."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartrelay.config import DeliveryConfig
from smartrelay.delivery.retry import (
    MAX_HINT,
    next_attempt_delay,
    retry_hint,
    schedule_retry,
)
from smartrelay.units import parse_duration

SCHEDULE = tuple(parse_duration(s) for s in ["1m", "5m", "15m", "30m", "1h", "2h", "4h", "8h"])
MAX_AGE = parse_duration("5d")
T0 = 1_700_000_000.0


def test_the_schedule_is_the_configured_default() -> None:
    assert SCHEDULE == (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0)
    assert DeliveryConfig().retry_schedule == SCHEDULE
    assert DeliveryConfig().max_age == MAX_AGE


# --- next_attempt_delay ----------------------------------------------------------------------


@pytest.mark.parametrize(("attempt", "delay"), [(i + 1, d) for i, d in enumerate(SCHEDULE)])
def test_each_failed_attempt_takes_its_step(attempt: int, delay: float) -> None:
    assert next_attempt_delay(SCHEDULE, attempt, 0.0, random.Random(1)) == delay


@pytest.mark.parametrize("attempt", [9, 10, 50, 10_000])
def test_past_the_end_the_last_step_repeats(attempt: int) -> None:
    assert next_attempt_delay(SCHEDULE, attempt, 0.0, random.Random(1)) == 28800.0


def test_a_single_step_schedule_repeats() -> None:
    assert [next_attempt_delay([90.0], n, 0.0, random.Random(1)) for n in (1, 2, 3)] == [90.0] * 3


def test_jitter_spreads_within_bounds_and_around_the_step() -> None:
    rng = random.Random(42)
    draws = [next_attempt_delay(SCHEDULE, 3, 0.1, rng) for _ in range(2000)]
    assert all(810.0 <= d <= 990.0 for d in draws)
    assert min(draws) < 820.0 and max(draws) > 980.0  # uses both sides of the range
    assert 890.0 < sum(draws) / len(draws) < 910.0  # centred on the step
    assert len(set(draws)) > 1900  # actually random


def test_jitter_is_deterministic_for_a_seed() -> None:
    a = [next_attempt_delay(SCHEDULE, n, 0.1, random.Random(7)) for n in range(1, 12)]
    b = [next_attempt_delay(SCHEDULE, n, 0.1, random.Random(7)) for n in range(1, 12)]
    assert a == b


def test_jitter_above_one_never_gives_a_negative_delay() -> None:
    rng = random.Random(3)
    draws = [next_attempt_delay(SCHEDULE, 1, 3.0, rng) for _ in range(500)]
    assert min(draws) == 0.0
    assert all(0.0 <= d <= 240.0 for d in draws)


@given(
    st.lists(st.floats(0.0, 1e7, allow_nan=False), min_size=1, max_size=12),
    st.integers(1, 100),
    st.floats(0.0, 1.0),
    st.integers(0, 2**32),
)
def test_jitter_property(schedule: list[float], attempt: int, jitter: float, seed: int) -> None:
    delay = next_attempt_delay(schedule, attempt, jitter, random.Random(seed))
    step = schedule[min(attempt, len(schedule)) - 1]
    assert delay >= 0.0
    assert step * (1 - jitter) <= delay <= step * (1 + jitter)


@pytest.mark.parametrize(
    ("schedule", "attempt", "jitter"),
    [
        ([], 1, 0.1),
        (SCHEDULE, 0, 0.1),
        (SCHEDULE, -1, 0.1),
        (SCHEDULE, 1, -0.1),
        (SCHEDULE, 1, float("nan")),
        ([-5.0], 1, 0.1),
        ([float("inf")], 1, 0.1),
    ],
)
def test_bad_arguments_are_rejected(schedule: list[float], attempt: int, jitter: float) -> None:
    with pytest.raises(ValueError):
        next_attempt_delay(schedule, attempt, jitter, random.Random(1))


# --- retry_hint ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("4.7.0 Try again in 15 minutes", 900.0),
        ("Greylisted, please try again in 300 seconds", 300.0),
        ("Too many connections, retry after 60s", 60.0),
        ("4.7.1 Greylisting in action, please come back in 00:05:00", 300.0),
        ("4.7.0 Temporarily deferred, please try again later in 5 min", 300.0),
        ("4.3.2 Service busy, retry in 2 hours", 7200.0),
        ("4.7.1 Please wait 90 secs before retrying", 90.0),
        ("4.7.0 Please retry in 1.5h", 5400.0),
        ("4.7.0 Rate limited. Try again in 5-10 minutes", 600.0),
        ("4.7.0 Rate limited. Try again in 5 to 10 minutes", 600.0),
        ("4.7.0 Rate limited. Try again in 5\u201310 minutes", 600.0),
        ("4.2.0 Greylisted, RETRY AFTER 120 SECONDS", 120.0),
        ("451 too busy\nplease try again in 30 minutes", 1800.0),
        ("4.7.0 Try again in 48 hours", MAX_HINT),  # hints are capped at 24 h
        ("4.7.0 Try again in 2 days", MAX_HINT),
        ("4.7.0 Try again in 0 seconds", 0.0),
    ],
)
def test_retry_hint(text: str, seconds: float | None) -> None:
    assert retry_hint(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "4.2.1 The user you are trying to contact is receiving mail too quickly. Please\n"
        "4.2.1 resend your message at a later time. If the user is able to receive\n"
        "4.2.1 mail at that time, your message will be delivered.",
        "4.7.0 Try again later, closing connection. (EHLO)",
        "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume",
        "Too many connections from 192.0.2.1 (20 max), try again",
        "4.2.2 Mailbox full, 2 messages waiting",
        "Please wait for 2 messages",
        "Please try with 2 hosts",
        "",
    ],
)
def test_no_hint(text: str) -> None:
    assert retry_hint(text) is None


@given(st.text(max_size=200))
def test_a_hint_is_always_within_bounds(text: str) -> None:
    hint = retry_hint(text)
    assert hint is None or 0.0 <= hint <= MAX_HINT


# --- schedule_retry --------------------------------------------------------------------------


def retry(
    attempt: int, *, now: float | None = None, reply_text: str = "", jitter: float = 0.0
) -> float | None:
    return schedule_retry(
        now=T0 + sum(SCHEDULE[: attempt - 1]) if now is None else now,
        first_attempt_at=T0,
        attempt=attempt,
        schedule=SCHEDULE,
        max_age=MAX_AGE,
        reply_text=reply_text,
        jitter=jitter,
        rng=random.Random(5),
    )


def test_follows_the_schedule() -> None:
    assert retry(1, now=T0) == T0 + 60.0
    assert retry(2, now=T0 + 60.0) == T0 + 60.0 + 300.0
    assert retry(9, now=T0 + 3600.0) == T0 + 3600.0 + 28800.0


def test_the_jitter_is_applied_by_default() -> None:
    at = schedule_retry(
        now=T0,
        first_attempt_at=T0,
        attempt=1,
        schedule=SCHEDULE,
        max_age=MAX_AGE,
        rng=random.Random(5),
    )
    assert at is not None
    assert T0 + 54.0 <= at <= T0 + 66.0
    assert at != T0 + 60.0


def test_a_hint_wins_over_the_schedule_without_jitter() -> None:
    assert retry(5, now=T0, reply_text="4.7.0 Try again in 15 minutes", jitter=0.5) == T0 + 900
    assert retry(1, now=T0, reply_text="Greylisted, please try again in 300 seconds") == T0 + 300
    assert retry(8, now=T0, reply_text="Too many connections, retry after 60s") == T0 + 60.0


def test_a_hint_is_at_least_one_second() -> None:
    assert retry(1, now=T0, reply_text="Try again in 0 seconds") == T0 + 1.0


def test_a_reply_without_a_hint_follows_the_schedule() -> None:
    text = "4.2.1 The user you are trying to contact is receiving mail too quickly."
    assert retry(3, now=T0, reply_text=text) == T0 + 900.0


def test_the_last_attempt_is_at_max_age_and_a_failure_there_expires() -> None:
    deadline = T0 + MAX_AGE
    assert retry(20, now=deadline - 28800.0) == deadline  # exactly at the deadline
    # A step that would land past the deadline lands on it: the message is not given up early.
    assert retry(20, now=deadline - 28799.0) == deadline
    assert retry(20, now=deadline - 1.0) == deadline
    # An attempt made at (or after) the deadline that fails is the last one.
    assert retry(20, now=deadline) is None
    assert retry(20, now=deadline + 1.0) is None
    # A hint does not extend the life of a message either.
    assert retry(3, now=deadline - 60.0, reply_text="try again in 2 hours") == deadline
    assert retry(3, now=deadline - 60.0, reply_text="try again in 30 seconds") == deadline - 30


def test_max_age_of_three_minutes_is_tried_at_three_minutes() -> None:
    """Issue 11 item 13: with max_age = "3m" the relay gave up after 80 s (1m, then 5m would
    pass the deadline); the attempts are now at 0, 1m and 3m, and only then it expires."""
    now, attempt, times = T0, 1, [T0]
    while (
        at := schedule_retry(
            now=now,
            first_attempt_at=T0,
            attempt=attempt,
            schedule=SCHEDULE,
            max_age=180.0,
            rng=random.Random(3),
        )
    ) is not None:
        times.append(at)
        now, attempt = at, attempt + 1
    assert times[0] == T0 and T0 + 54.0 <= times[1] <= T0 + 66.0
    assert times[2:] == [T0 + 180.0]


def test_a_whole_life_on_the_default_schedule() -> None:
    """A recipient that is always deferred gets 8 + N attempts, the last at 5 days, then
    expires."""
    now, attempt, times = T0, 1, []
    while (at := retry(attempt, now=now)) is not None:
        times.append(at)
        now, attempt = at, attempt + 1
    steps = [b - a for a, b in zip([T0, *times], times, strict=False)]
    assert steps[:8] == list(SCHEDULE)
    assert set(steps[8:-1]) == {28800.0}
    assert 0 < steps[-1] <= 28800.0
    assert times[-1] == T0 + MAX_AGE
    assert len(times) == 8 + int((MAX_AGE - sum(SCHEDULE)) // 28800.0) + 1


def test_zero_max_age_expires_at_once() -> None:
    assert (
        schedule_retry(
            now=T0,
            first_attempt_at=T0,
            attempt=1,
            schedule=SCHEDULE,
            max_age=0.0,
            rng=random.Random(1),
        )
        is None
    )


def test_bad_attempt_is_rejected_even_with_a_hint() -> None:
    with pytest.raises(ValueError):
        retry(0, now=T0, reply_text="try again in 5 minutes")
