"""The dashboard (``/ui/``): counts and rates for a period, read from the roll-ups only.

Counting events at page-load time does not scale (a million events a day); the hourly
roll-ups (storage/rollups.py) hold the counts, so a page reads at most a few thousand rows
whatever the volume. They trail the events by about a minute (the roll-up's lag), which the
page says.
"""

from __future__ import annotations

from datetime import UTC, datetime

from attrs import frozen
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from smartrelay.storage.rollups import Totals
from smartrelay.web.ui.context import UiContext, UiError, add_error_pages, arg

__all__ = ["Dashboard", "Period", "period_of"]

HOUR = 3600.0
DAY = 86400.0
#: The period choices: name -> (label, seconds).
PERIODS: dict[str, tuple[str, float]] = {
    "24h": ("Last 24 hours", DAY),
    "7d": ("Last 7 days", 7 * DAY),
    "30d": ("Last 30 days", 30 * DAY),
}
#: A custom period is at most this long (the roll-ups keep a row per hour).
MAX_PERIOD = 400 * DAY


@frozen
class Period:
    name: str  # "24h", "7d", "30d" or "custom"
    since: float  # start of the first hour counted
    until: float  # end (exclusive), the start of the hour after the last

    @property
    def hourly(self) -> bool:
        """Hourly buckets up to 2 days, daily ones beyond."""
        return self.until - self.since <= 2 * DAY


def _parse_day(text: str, field: str) -> float:
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise UiError(400, f"{field}: a date as YYYY-MM-DD, not {text!r}.") from None
    return day.timestamp()


def period_of(request: IRequest, now: float) -> Period:
    """The period a request asks for (``period=24h|7d|30d`` or ``since``/``until`` dates,
    ``until`` inclusive), in whole hours; a bad one is a :class:`UiError` (400)."""
    since_text = arg(request, "since", limit=10)
    until_text = arg(request, "until", limit=10)
    if since_text or until_text:
        since = _parse_day(since_text, "From") if since_text else now - 7 * DAY
        until = _parse_day(until_text, "To") + DAY if until_text else now
        if until <= since:
            raise UiError(400, "The period ends before it starts.")
        if until - since > MAX_PERIOD:
            raise UiError(400, "A period is at most 400 days long.")
        return Period("custom", since - since % HOUR, until - until % HOUR + HOUR)
    name = arg(request, "period", "24h", limit=10)
    if name not in PERIODS:
        raise UiError(400, f"No such period {name!r}: choose 24h, 7d or 30d.")
    end = now - now % HOUR + HOUR  # the current hour included
    return Period(name, end - PERIODS[name][1], end)


def total(totals: Totals, kind: str, detail: str | None = None, unique: bool = False) -> int:
    """The count of one event type (every detail, or one), or its unique count."""
    at = 1 if unique else 0
    return sum(
        value[at]
        for (event_type, event_detail), value in totals.items()
        if event_type == kind and (detail is None or event_detail == detail)
    )


class Dashboard:
    app = Klein()
    add_error_pages(app)

    def __init__(self, ui: UiContext) -> None:
        self.ui = ui

    @app.route("/", methods=["GET"])
    def show(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "dashboard", lambda: self._show(request))

    async def _show(self, request: IRequest) -> bytes:
        period = period_of(request, self.ui.clock.seconds())
        tag = arg(request, "tag", limit=200) or None
        sender_domain = arg(request, "sender_domain", limit=255) or None
        recipient_domain = arg(request, "recipient_domain", limit=255) or None
        store = await self.ui.store()
        totals = await store.rollup_totals(
            period.since, period.until, tag, sender_domain, recipient_domain
        )
        figures = self._figures(totals)
        return self.ui.page(
            request,
            "ui/dashboard.html",
            title="Dashboard",
            section="",
            period=period,
            periods=PERIODS,
            tag=tag or "",
            sender_domain=sender_domain or "",
            recipient_domain=recipient_domain or "",
            figures=figures,
            empty=not totals,
        )

    @staticmethod
    def _figures(totals: Totals) -> list[tuple[str, int, str]]:
        """(label, count, rate text) for the figures row."""
        received = total(totals, "received")
        delivered = total(totals, "delivered")
        bounced = total(totals, "bounced")
        hard = sum(v[0] for (t, d), v in totals.items() if t == "bounced" and d.endswith(":hard"))
        finals = delivered + bounced

        def rate(part: int, whole: int, of: str) -> str:
            return f"{100 * part / whole:.1f}% of {of}" if whole else ""

        complained = total(totals, "complained")
        opened = total(totals, "opened", "human", unique=True)
        clicked = total(totals, "clicked", "human", unique=True)
        unsubscribed = total(totals, "unsubscribed")
        return [
            ("Received", received, ""),
            ("Delivered", delivered, rate(delivered, finals, "finished")),
            ("Deferred", total(totals, "deferred"), "attempts to retry"),
            ("Bounced", bounced, rate(bounced, finals, "finished")),
            ("Hard bounces", hard, rate(hard, finals, "finished")),
            ("Soft bounces", bounced - hard, rate(bounced - hard, finals, "finished")),
            ("Complained", complained, rate(complained, delivered, "delivered")),
            ("Opened (unique)", opened, rate(opened, delivered, "delivered")),
            ("Opens", total(totals, "opened", "human"), "human, in all"),
            ("Machine opens", total(totals, "opened", "machine"), "proxies, scanners"),
            ("Clicked (unique)", clicked, rate(clicked, delivered, "delivered")),
            ("Unsubscribed", unsubscribed, rate(unsubscribed, delivered, "delivered")),
            ("Suppressed", total(totals, "suppressed"), "not sent"),
        ]
