"""RFC 3339 UTC timestamps, as events, exports and the CLI show them."""

from __future__ import annotations

import datetime

from smartrelay.units import parse_duration


def rfc3339(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch; a time without an offset is taken as UTC."""
    moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


#: Unix seconds accepted as a time: 0 to the end of year 9999 (what RFC 3339 can spell).
_MAX_UNIX = 253402300799.0
_MAX_TIME_TEXT = 64


def parse_time_value(text: str, now: float) -> float:
    """A point in time as ``events export --since`` and ``GET /api/events?since=`` take it:
    a duration meaning that long before ``now`` (``24h``), unix seconds (``1764979200``,
    ``1764979200.5``), or an RFC 3339 time or date (``2026-12-05T10:00:00Z``,
    ``2026-12-05``; without an offset, UTC). ``ValueError`` with a short text otherwise."""
    shown = text if len(text) <= _MAX_TIME_TEXT else text[:_MAX_TIME_TEXT] + "..."
    problem = f"{shown!r} is neither an RFC 3339 time nor a duration nor unix seconds"
    if len(text) > _MAX_TIME_TEXT or not text.isascii() or not text.isprintable():
        raise ValueError(problem)
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    if text.replace(".", "", 1).isdigit() and not text.startswith("."):
        seconds = float(text)
        if seconds > _MAX_UNIX:
            raise ValueError(problem)
        return seconds
    try:
        return parse_rfc3339(text)
    except (ValueError, OverflowError):
        raise ValueError(problem) from None
