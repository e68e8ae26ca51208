"""When to try a deferred recipient again.

The ``[delivery]`` config gives a ``retry_schedule`` (seconds between attempts; past its end the
last step repeats) and a ``max_age``: the last attempt is made at that age, and if it fails
too the recipient expires and bounces with category ``expired``. A remote reply may name its
own delay ("try again in 15 minutes"), which then wins over the schedule. Pure functions: the
caller passes the clock's time and its random generator, so tests are deterministic.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import Final

__all__ = [
    "MAX_HINT",
    "MIN_HINT_DELAY",
    "next_attempt_delay",
    "retry_hint",
    "schedule_retry",
]

#: A hint in a reply is bounded to this many seconds (24 h).
MAX_HINT: Final = 86400.0
#: A hint, however small, never brings the next attempt closer than this (seconds).
MIN_HINT_DELAY: Final = 1.0

_UNITS: Final[dict[str, float]] = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

# A verb that asks for a later attempt, a short gap within the same clause (no digits, no
# sentence end), then a number or range and a unit; or a clock-style "00:05:00".
_NUMBER = r"\d+(?:\.\d+)?"
_HINT = re.compile(
    r"\b(?:try|retry|resend|re-send|come\s+back|wait|again)\b[^\d\n.;]{0,30}?"
    rf"(?:(?P<num>{_NUMBER})(?:\s*(?:-|\u2013|to)\s*(?P<upper>{_NUMBER}))?\s*"
    r"(?P<unit>seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|hr|h|days?|d)\b"
    r"|(?P<hh>\d{1,2}):(?P<mm>\d{2}):(?P<ss>\d{2})\b)",
    re.IGNORECASE,
)


def next_attempt_delay(
    schedule: Sequence[float], attempt: int, jitter: float, rng: random.Random
) -> float:
    """Seconds until the next attempt after ``attempt`` failed attempts (1 after the first).

    The step is ``schedule[attempt - 1]``, or the last step once past the end of the schedule;
    it is then moved by up to ``jitter`` of itself either way (uniformly; 0.1 = 10 %), and never
    returned negative.
    """
    if not schedule:
        raise ValueError("the retry schedule is empty")
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, not {attempt}")
    if not (jitter >= 0 and math.isfinite(jitter)):
        raise ValueError(f"jitter must be a non-negative fraction, not {jitter}")
    step = float(schedule[min(attempt, len(schedule)) - 1])
    if not (step >= 0 and math.isfinite(step)):
        raise ValueError(f"retry schedule steps must be non-negative seconds, not {step}")
    return max(0.0, step * (1.0 + rng.uniform(-jitter, jitter)))


def retry_hint(text: str) -> float | None:
    """The delay, in seconds, that a remote reply asks for, or ``None``.

    Recognises wordings such as "try again in 15 minutes", "retry after 60s", "please try
    again later in 5 min", "come back in 00:05:00", "wait 2 hours" (units: seconds, minutes,
    hours, days, and their usual abbreviations); for a range ("5-10
    minutes") the upper end. The first such phrase counts. Bounded to [0, 24 h].
    """
    m = _HINT.search(text)
    if m is None:
        return None
    if m.group("unit") is None:
        seconds = int(m.group("hh")) * 3600.0 + int(m.group("mm")) * 60.0 + int(m.group("ss"))
    else:
        number = float(m.group("upper") or m.group("num"))
        seconds = number * _UNITS[m.group("unit")[0].lower()]
    return min(max(seconds, 0.0), MAX_HINT)


def schedule_retry(
    *,
    now: float,
    first_attempt_at: float,
    attempt: int,
    schedule: Sequence[float],
    max_age: float,
    reply_text: str = "",
    jitter: float = 0.1,
    rng: random.Random,
) -> float | None:
    """The time of the next attempt, or ``None`` when the attempt that just failed was made
    at or after the deadline ``first_attempt_at + max_age`` (the caller then expires the
    recipient).

    ``attempt`` counts the failed attempts so far (1 after the first). A delay hinted in
    ``reply_text`` (:func:`retry_hint`) replaces the schedule's step, as it is (no jitter) but
    at least :data:`MIN_HINT_DELAY`; otherwise :func:`next_attempt_delay` decides. A next
    attempt that would fall past the deadline is moved to the deadline: the last attempt is
    made at ``max_age``, never given up before it.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, not {attempt}")
    deadline = first_attempt_at + max_age
    if now >= deadline:
        return None
    hint = retry_hint(reply_text) if reply_text else None
    if hint is not None:
        delay = max(hint, MIN_HINT_DELAY)
    else:
        delay = next_attempt_delay(schedule, attempt, jitter, rng)
    return min(now + delay, deadline)
