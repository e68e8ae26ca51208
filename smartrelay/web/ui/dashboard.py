"""The dashboard (``/ui/``): counts, rates and charts for a period, read from the roll-ups only.

Counting events at page-load time does not scale (a million events a day); the hourly
roll-ups (storage/rollups.py) hold the counts, so a page reads a few thousand summary rows
whatever the volume: the series of the period (the figures are its sums), the top recipient
domains, the top clicked URLs and the roll-ups' position. The roll-ups trail the events by
about a minute (the roll-up's lag); the page says up to when it counts.

Every figure and chart row links to the list it counts where one exists (the message search
with the same period and filters, or the feedback list), and every link keeps the period and
the filters, so a dashboard view is a URL.

Above them, when there is any, a card of volume alerts (docs/smtp.md): the credentials held,
each with a Release button (web/ui/alerts.py), and the alerts of the last 24 hours.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from attrs import frozen
from klein import Klein
from markupsafe import Markup
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from smartrelay.storage.reports import DomainStats, UrlStats
from smartrelay.storage.rollups import Totals
from smartrelay.web.charts import (
    Bar,
    RateRow,
    Series,
    format_percent,
    horizontal_bars,
    rate_bars,
    stacked_bars,
)
from smartrelay.web.templating import percent
from smartrelay.web.ui.alerts import NOTICES as ALERT_NOTICES
from smartrelay.web.ui.alerts import RECENT_ALERTS
from smartrelay.web.ui.context import UiContext, UiError, add_error_pages, arg, ui_session
from smartrelay.web.ui.notices import read_notice

__all__ = ["Dashboard", "Filters", "Period", "period_of", "total"]

HOUR = 3600.0
DAY = 86400.0
#: The period choices: name -> (label, seconds).
PERIODS: dict[str, tuple[str, float]] = {
    "24h": ("Last 24 hours", DAY),
    "7d": ("Last 7 days", 7 * DAY),
    "30d": ("Last 30 days", 30 * DAY),
}
CUSTOM = "custom"
#: A custom period is at most this long (the roll-ups keep a row per hour).
MAX_PERIOD = 400 * DAY
#: Rows of the top domains, top URLs and bounce categories.
TOP = 10
#: The outcomes the volume chart stacks, bottom up (what became of each recipient's copy).
VOLUME_OUTCOMES = ("delivered", "bounced", "deferred", "expired", "suppressed", "dropped")
#: The content warnings computed at re-wrap (docs/deliverability.md); other kinds are shown
#: as they are.
WARNING_LABELS: Mapping[str, str] = {
    "no-dkim-key": "From domain without a DKIM key",
    "double-escaped-link": "Double-escaped &amp;amp; in a link",
    "unfilled-placeholder": "Template placeholder left unfilled",
    "no-text-alternative": "HTML part without a text alternative",
}
#: The roll-ups are this far behind the clock when all is well (ROLLUP_LAG plus a pass or
#: two); beyond it the page says they are behind.
LAG_WARNING = 15 * 60.0


@frozen
class Period:
    name: str  # "24h", "7d", "30d" or "custom"
    since: float  # start of the first hour counted
    until: float  # end (exclusive), the start of the hour after the last

    @property
    def hourly(self) -> bool:
        """Hourly buckets up to 2 days, daily ones beyond."""
        return self.until - self.since <= 2 * DAY

    def query(self) -> dict[str, str]:
        """The dashboard's GET arguments for this period (a custom one as whole days)."""
        if self.name != CUSTOM:
            return {"period": self.name}
        return {"period": CUSTOM, "since": _day(self.since), "until": _day(self.until - 1)}

    def buckets(self) -> list[float]:
        """The starts of the chart's buckets: every hour, or every UTC day, of the period."""
        step = HOUR if self.hourly else DAY
        start = self.since - self.since % step
        return [start + i * step for i in range(int((self.until - start + step - 1) // step))]


@frozen
class Filters:
    """The dashboard's optional filters (None: not set); domains lower-case, no ``@``."""

    tag: str | None = None
    sender_domain: str | None = None
    recipient_domain: str | None = None

    @classmethod
    def of(cls, request: IRequest) -> Filters:
        def domain(name: str) -> str | None:
            return arg(request, name, limit=255).lstrip("@").lower() or None

        return cls(
            arg(request, "tag", limit=200) or None,
            domain("sender_domain"),
            domain("recipient_domain"),
        )

    @property
    def any(self) -> bool:
        return any((self.tag, self.sender_domain, self.recipient_domain))

    def query(self) -> dict[str, str | None]:
        return {
            "tag": self.tag,
            "sender_domain": self.sender_domain,
            "recipient_domain": self.recipient_domain,
        }


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


def _minute(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


def _parse_day(text: str, field: str) -> float:
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise UiError(400, f"{field}: a date as YYYY-MM-DD, not {text!r}.") from None
    return day.timestamp()


def period_of(request: IRequest, now: float) -> Period:
    """The period a request asks for, in whole hours; a bad one is a :class:`UiError` (400).

    ``period=24h|7d|30d`` ends with the current hour (dates sent along are ignored: the
    form always sends them); ``period=custom``, or dates without ``period``, is
    ``since``/``until`` (UTC dates, ``until`` inclusive; ``since`` defaults to 7 days
    before ``until``, ``until`` to now)."""
    name = arg(request, "period", limit=10)
    since_text = arg(request, "since", limit=10)
    until_text = arg(request, "until", limit=10)
    if name == CUSTOM or (not name and (since_text or until_text)):
        until = _parse_day(until_text, "To") + DAY if until_text else now
        since = _parse_day(since_text, "From") if since_text else until - 7 * DAY
        since -= since % HOUR
        until += -until % HOUR  # up to the end of its hour
        if until <= since:
            raise UiError(400, "The period ends before it starts: choose a To date after From.")
        if until - since > MAX_PERIOD:
            raise UiError(400, "A period is at most 400 days long.")
        return Period(CUSTOM, since, until)
    name = name or "24h"
    if name not in PERIODS:
        raise UiError(400, f"No such period {name!r}: choose 24h, 7d, 30d or custom.")
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


def sum_series(series: Mapping[float, Totals]) -> Totals:
    """The totals of a period from its hourly series (one query instead of two)."""
    summed: dict[tuple[str, str], list[int]] = {}
    for hour in series.values():
        for key, (count, unique) in hour.items():
            cell = summed.setdefault(key, [0, 0])
            cell[0] += count
            cell[1] += unique
    return {key: (cell[0], cell[1]) for key, cell in summed.items()}


@frozen
class Figure:
    """One number of the figures row; ``link``: the list it counts, when there is one."""

    key: str
    label: str
    value: int
    rate: str = ""
    link: str | None = None


@frozen
class Link:
    """A chart row as a line of the table under the chart (the figures behind it)."""

    label: str
    link: str | None
    cells: tuple[str, ...]


class Dashboard:
    app = Klein()
    add_error_pages(app)

    def __init__(self, ui: UiContext) -> None:
        self.ui = ui

    @app.route("/", methods=["GET"])
    def show(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "dashboard", lambda: self._show(request))

    async def _show(self, request: IRequest) -> bytes:
        now = self.ui.clock.seconds()
        period = period_of(request, now)
        filters = Filters.of(request)
        since, until = period.since, period.until
        store = await self.ui.store()
        # The three reads are independent: run at once, they take the time of the slowest
        # (the engines' pools have two connections or more; the readers do not block).
        series_read = Deferred.fromCoroutine(
            store.rollup_series(
                since, until, filters.tag, filters.sender_domain, filters.recipient_domain
            )
        )
        domains_read: Deferred[list[DomainStats]] | None = None
        if filters.recipient_domain is None:
            domains_read = Deferred.fromCoroutine(
                store.top_recipient_domains(
                    since, until, filters.tag, filters.sender_domain, limit=TOP
                )
            )
        urls_read: Deferred[list[UrlStats]] | None = None
        if filters.sender_domain is None and filters.recipient_domain is None:
            # rollup_urls is per hour x tag x URL: it has no domains to filter by.
            urls_read = Deferred.fromCoroutine(store.top_urls(since, until, filters.tag, limit=TOP))
        try:
            series = await series_read
            totals = sum_series(series)
            if domains_read is None:
                # top_recipient_domains cannot filter by recipient domain: this one's counts.
                domains = [_domain_stats(filters.recipient_domain or "", totals)] if totals else []
            else:
                domains = await domains_read
            urls = None if urls_read is None else await urls_read
        finally:
            # When one read fails, the others' results (or failures) are not waited for:
            # they must not be logged as unhandled errors later.
            for read in (series_read, domains_read, urls_read):
                if read is not None:
                    read.addErrback(lambda _: None)
        position = await store.rollup_position()
        # Volume alerts (docs/smtp.md): the card on top, read from the tables, not roll-ups.
        held = await store.held_credentials()
        volume_alerts = await store.recent_volume_alerts(now - DAY, RECENT_ALERTS)
        links = _Links(self.ui, period, filters)
        return self.ui.page(
            request,
            "ui/dashboard.html",
            title="Dashboard",
            section="",
            period=period,
            periods=PERIODS,
            tag=filters.tag or "",
            sender_domain=filters.sender_domain or "",
            recipient_domain=filters.recipient_domain or "",
            filtered=filters.any,
            since_day=_day(since),
            until_day=_day(until - 1),
            figures=_figures(totals, links),
            empty=not totals,
            position=position,
            lag=None if position is None else max(now - position, 0.0),
            lag_warning=LAG_WARNING,
            charts=self._charts(period, series, totals, domains, urls, links),
            permalink=links.dashboard(),
            clear_link=links.dashboard(tag=None, sender_domain=None, recipient_domain=None),
            urls_link=links.dashboard(sender_domain=None, recipient_domain=None),
            held=held,
            volume_alerts=volume_alerts,
            notice=read_notice(request, ui_session(request), ALERT_NOTICES),
        )

    def _charts(
        self,
        period: Period,
        series: Mapping[float, Totals],
        totals: Totals,
        domains: list[DomainStats],
        urls: list[UrlStats] | None,
        links: _Links,
    ) -> dict[str, Any]:
        return {
            "volume": _volume_chart(period, series),
            "volume_links": [
                (outcome, total(totals, outcome), links.messages(outcome=outcome))
                for outcome in VOLUME_OUTCOMES
                if total(totals, outcome)
            ],
            **_bounce_chart(totals, links),
            **_domain_chart(domains, links),
            **_url_chart(urls),
            "warnings": _warning_chart(totals),
        }


class _Links:
    """The links of one dashboard view, every one keeping its period and filters."""

    def __init__(self, ui: UiContext, period: Period, filters: Filters) -> None:
        self.ui = ui
        self.period = period
        self.filters = filters

    def dashboard(self, **changes: str | None) -> str:
        return self.ui.url("", **{**self.period.query(), **self.filters.query(), **changes})

    def messages(self, outcome: str | None = None, recipient_domain: str | None = None) -> str:
        """The message search of the period (messages received in it) with the filters."""
        domain = recipient_domain or self.filters.recipient_domain
        return self.ui.url(
            "messages",
            since=_minute(self.period.since),
            until=_minute(self.period.until - 60),  # the search's until includes its minute
            tag=self.filters.tag,
            sender=None if self.filters.sender_domain is None else "@" + self.filters.sender_domain,
            recipient=None if domain is None else "@" + domain,
            outcome=outcome,
        )

    def feedback(self, kind: str) -> str:
        return self.ui.url("feedback", kind=kind)


def _rate(part: int, whole: int, of: str) -> str:
    """A share of a whole it is part of (never shown as 0% or 100% unless it is)."""
    return f"{format_percent(part, whole)} of {of}" if whole else ""


def _ratio(part: int, whole: int, of: str) -> str:
    """A ratio that may pass 100%: opens and clicks in a period include those of mail
    delivered before it."""
    return f"{percent(part, whole)} of {of}" if whole else ""


def _figures(totals: Totals, links: _Links) -> list[Figure]:
    received = total(totals, "received")
    delivered = total(totals, "delivered")
    bounced = total(totals, "bounced")
    hard = sum(v[0] for (t, d), v in totals.items() if t == "bounced" and d.endswith(":hard"))
    finished = delivered + bounced
    complained = total(totals, "complained")
    opened = total(totals, "opened", "human", unique=True)
    clicked = total(totals, "clicked", "human", unique=True)
    unsubscribed = total(totals, "unsubscribed")
    return [
        Figure("received", "Received", received, "recipients' copies", links.messages()),
        Figure(
            "delivered",
            "Delivered",
            delivered,
            _rate(delivered, finished, "delivered + bounced"),
            links.messages("delivered"),
        ),
        Figure(
            "deferred",
            "Deferred",
            total(totals, "deferred"),
            "attempts to retry",
            links.messages("deferred"),
        ),
        Figure(
            "bounced",
            "Bounced",
            bounced,
            _rate(bounced, finished, "delivered + bounced"),
            links.messages("bounced"),
        ),
        Figure(
            "hard", "Hard bounces", hard, _rate(hard, bounced, "bounces"), links.feedback("bounce")
        ),
        Figure(
            "soft",
            "Soft bounces",
            bounced - hard,
            _rate(bounced - hard, bounced, "bounces"),
            links.feedback("bounce"),
        ),
        Figure(
            "complained",
            "Complained",
            complained,
            _rate(complained, delivered, "delivered"),
            links.feedback("complaint"),
        ),
        Figure("opened", "Opened (unique)", opened, _ratio(opened, delivered, "delivered")),
        Figure("opens", "Opens", total(totals, "opened", "human"), "human, in all"),
        Figure(
            "machine_opens",
            "Machine opens",
            total(totals, "opened", "machine"),
            "proxies and scanners, not counted above",
        ),
        Figure("clicked", "Clicked (unique)", clicked, _ratio(clicked, delivered, "delivered")),
        Figure("clicks", "Clicks", total(totals, "clicked", "human"), "human, in all"),
        Figure(
            "unsubscribed",
            "Unsubscribed",
            unsubscribed,
            _rate(unsubscribed, delivered, "delivered"),
            links.feedback("unsubscribe"),
        ),
        Figure(
            "suppressed",
            "Suppressed",
            total(totals, "suppressed"),
            "not sent",
            links.messages("suppressed"),
        ),
        Figure(
            "expired",
            "Expired",
            total(totals, "expired"),
            "gave up retrying",
            links.messages("expired"),
        ),
    ]


def _volume_chart(period: Period, series: Mapping[float, Totals]) -> Markup:
    """Volume over time stacked by outcome; every bucket of the period, zeros included."""
    starts = period.buckets()
    step = HOUR if period.hourly else DAY
    first = starts[0]
    values = {outcome: [0] * len(starts) for outcome in VOLUME_OUTCOMES}
    for hour, counts in series.items():
        index = int((hour - first) // step)
        if not 0 <= index < len(starts):
            continue
        for (event_type, _), (count, _) in counts.items():
            if event_type in values:
                values[event_type][index] += count
    layers = [
        Series(outcome, tuple(values[outcome]))
        for outcome in VOLUME_OUTCOMES
        if outcome in ("delivered", "bounced", "deferred") or any(values[outcome])
    ]
    return stacked_bars(
        [datetime.fromtimestamp(start, UTC) for start in starts],
        layers,
        step="hour" if period.hourly else "day",
        title="Volume by outcome",
        empty_message="No delivery outcome in this period.",
    )


def _bounce_chart(totals: Totals, links: _Links) -> dict[str, Any]:
    """Bounces by category, hard ones red and soft ones amber (the label says which)."""
    rows = sorted(
        (
            (count, *_category(detail))
            for (event_type, detail), (count, _) in totals.items()
            if event_type == "bounced" and count
        ),
        key=lambda row: (-row[0], row[1], row[2]),
    )
    shown, rest = rows[:TOP], rows[TOP:]
    bars = [
        Bar(
            f"{category} ({hardness})",
            count,
            title=f"{category}, {hardness} bounce: {count:,}",
            key="bounced" if hardness == "hard" else "deferred",
        )
        for count, category, hardness in shown
    ]
    if rest:
        bars.append(Bar("other categories", sum(row[0] for row in rest)))
    bounced = sum(row[0] for row in rows)
    table = [
        Link(
            category,
            links.messages("bounced"),
            (hardness, f"{count:,}", format_percent(count, bounced)),
        )
        for count, category, hardness in shown
    ]
    chart = horizontal_bars(
        bars,
        title="Bounces by category",
        empty_message="No bounce in this period.",
        width=480.0,
    )
    return {"bounces": chart, "bounce_rows": table, "bounce_link": links.feedback("bounce")}


def _category(detail: str) -> tuple[str, str]:
    category, _, hardness = detail.rpartition(":")
    return category or "unclassified", hardness if hardness in ("hard", "soft") else "soft"


def _domain_stats(domain: str, totals: Totals) -> DomainStats:
    return DomainStats(
        domain,
        total(totals, "received"),
        total(totals, "delivered"),
        total(totals, "deferred"),
        total(totals, "bounced"),
        total(totals, "complained"),
    )


def _domain_chart(domains: list[DomainStats], links: _Links) -> dict[str, Any]:
    """Top recipient domains: each bar is the domain's delivered + bounced, split by them
    (the rates of DomainStats); the table adds the received, deferred and complained."""
    rows = [
        RateRow(
            stats.domain or "(no domain)",
            stats.attempted,
            {"delivered": stats.delivered, "bounced": stats.bounced},
        )
        for stats in domains
    ]
    table = [
        Link(
            stats.domain or "(no domain)",
            links.messages(recipient_domain=stats.domain) if stats.domain else None,
            (
                f"{stats.received:,}",
                f"{stats.delivered:,}",
                f"{stats.deferred:,}",
                f"{stats.bounced:,}",
                f"{stats.complained:,}",
                format_percent(stats.delivered, stats.attempted),
                format_percent(stats.bounced, stats.attempted),
            ),
        )
        for stats in domains
    ]
    chart = rate_bars(
        rows,
        title="Top recipient domains",
        outcomes=("delivered", "bounced"),
        empty_message="No delivered or bounced mail in this period.",
    )
    return {"domains": chart, "domain_rows": table}


def _url_chart(urls: list[UrlStats] | None) -> dict[str, Any]:
    """Top clicked URLs (scheme://host/path); None when a domain filter is set (the URL
    roll-up is per tag only)."""
    if urls is None:
        return {"urls": None, "url_rows": []}
    bars = [
        Bar(
            url.url,
            url.clicks,
            title=f"{url.url}: {url.clicks:,} clicks ({url.machine_clicks:,} by machines)",
            key="clicked",
        )
        for url in urls
    ]
    table = [
        Link(url.url, None, (f"{url.human_clicks:,}", f"{url.machine_clicks:,}")) for url in urls
    ]
    chart = horizontal_bars(
        bars,
        title="Top clicked URLs",
        empty_message="No tracked click in this period.",
        label_width=300.0,
    )
    return {"urls": chart, "url_rows": table}


def _warning_chart(totals: Totals) -> Markup:
    """Messages with each content warning (the ``warning`` events counted per kind)."""
    rows = sorted(
        (
            (count, detail, WARNING_LABELS.get(detail, detail or "unnamed"))
            for (event_type, detail), (count, _) in totals.items()
            if event_type == "warning" and count
        ),
        key=lambda row: (-row[0], row[1]),
    )
    bars = [
        Bar(label, count, title=f"{label} ({kind}): {count:,} messages")
        for count, kind, label in rows
    ]
    return horizontal_bars(
        bars,
        title="Content warnings (messages)",
        empty_message="No content warning in this period.",
        label_width=320.0,
    )
