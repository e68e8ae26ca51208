"""Parsing of human-friendly durations, sizes and rates.

These are the value syntaxes of the config file (docs/configuration.md) and may be reused
by the CLI. Every parser raises :class:`ValueError` with a message meant for a user, and
never accepts a bare number where a unit is required.

- Durations: one or more ``<number><unit>`` groups, no spaces: ``"500ms"``, ``"90s"``,
  ``"15m"``, ``"2h"``, ``"5d"``, ``"1w"``, ``"1.5h"``, ``"1h30m"``. Result: float seconds.
- Sizes: an integer number of bytes, or ``<number><unit>`` with binary multiples:
  ``B``; ``KB``/``KiB`` = 1024; ``MB``/``MiB`` = 1024**2; ``GB``/``GiB`` = 1024**3;
  ``TB``/``TiB`` = 1024**4 (units are case-insensitive). Result: int bytes.
- Rates: ``<number>/<period>`` with period ``s``, ``min``, ``h``, ``d`` (also ``sec``,
  ``second``, ``minute``, ``hour``, ``day``): ``"1000/min"``. Result: float per second.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "DURATION_HINT",
    "RATE_HINT",
    "SIZE_HINT",
    "format_duration",
    "parse_duration",
    "parse_rate",
    "parse_size",
]

DURATION_HINT = 'use e.g. "90s", "15m", "2h", "5d"'
SIZE_HINT = 'use an integer number of bytes or e.g. "512KB", "25MB", "1GB"'
RATE_HINT = 'use e.g. "10/s", "1000/min", "50000/h", "100000/d"'

_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
# "ms" must come before "m" in the alternation.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")

_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1024,
    "kib": 1024,
    "mb": 1024**2,
    "mib": 1024**2,
    "gb": 1024**3,
    "gib": 1024**3,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)", re.IGNORECASE)

_RATE_PERIODS: dict[str, float] = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*([a-z]+)")


def parse_duration(text: str) -> float:
    """Parse a duration such as ``"90s"`` or ``"1h30m"`` into float seconds (may be 0)."""
    if not isinstance(text, str):
        raise ValueError(f"invalid duration {text!r} ({DURATION_HINT})")
    if not _DURATION_FULL.fullmatch(text):
        raise ValueError(f"invalid duration {text!r} ({DURATION_HINT})")
    total = 0.0
    for number, unit in _DURATION_PART.findall(text):
        total += float(number) * _DURATION_UNITS[unit]
    if not math.isfinite(total):
        raise ValueError(f"invalid duration {text!r}: too large")
    return total


def parse_size(value: int | str) -> int:
    """Parse a size (int bytes, or a string such as ``"25MB"``) into int bytes (may be 0)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r} ({SIZE_HINT})")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"invalid size {value!r} ({SIZE_HINT})")
    match = _SIZE.fullmatch(value.strip())
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r} ({SIZE_HINT})")
    number = float(match.group(1))
    result = number * _SIZE_UNITS[match.group(2).lower()]
    if not math.isfinite(result):
        raise ValueError(f"invalid size {value!r}: too large")
    return int(result)


def parse_rate(text: str) -> float:
    """Parse a rate such as ``"1000/min"`` into float events per second (may be 0)."""
    if not isinstance(text, str):
        raise ValueError(f"invalid rate {text!r} ({RATE_HINT})")
    match = _RATE.fullmatch(text.strip())
    if match is None or match.group(2) not in _RATE_PERIODS:
        raise ValueError(f"invalid rate {text!r} ({RATE_HINT})")
    result = float(match.group(1)) / _RATE_PERIODS[match.group(2)]
    if not math.isfinite(result):
        raise ValueError(f"invalid rate {text!r}: too large")
    return result


def format_duration(seconds: float) -> str:
    """Format seconds back into the largest exact unit, e.g. ``86400.0`` -> ``"1d"``."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"cannot format duration {seconds!r}")
    if seconds == 0:
        return "0s"
    for unit in ("w", "d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        count = seconds / size
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    millis = seconds * 1000
    if millis == int(millis):
        return f"{int(millis)}ms"
    return f"{seconds:g}s"
