"""The dashboard (web/ui/dashboard.py) over real HTTP, on both engines: events written and
rolled up, then the page's figures, charts (well-formed SVG), links, filters, periods,
empty states and escaping."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlencode, urlsplit

import attrs
import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.web.iweb import IRequest
from twisted.web.test.requesthelper import DummyRequest

from smartrelay.events import (
    BouncedEvent,
    ClickedEvent,
    ComplainedEvent,
    DeferredEvent,
    DeliveredEvent,
    EventData,
    OpenedEvent,
)
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.migrations import migrate
from smartrelay.storage.store import NewMessage, Store, insert_events
from smartrelay.web.ui.context import UiError
from smartrelay.web.ui.dashboard import (
    DAY,
    HOUR,
    WARNING_LABELS,
    Period,
    _warning_chart,
    period_of,
)
from tests.conftest import real_reactor
from tests.support.webui import Browser, Site, ui_site

SVG = "{http://www.w3.org/2000/svg}"
XSS_TAG = "<script>alert(1)</script>"
XSS_ATTR = "\"'><img src=x onerror=alert(1)>"
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


@attrs.define
class Node:
    tag: str
    attr: dict[str, str]
    children: list[Node] = attrs.Factory(list)
    text: list[str] = attrs.Factory(list)

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def walk(self) -> list[Node]:
        found = [self]
        for child in self.children:
            found += child.walk()
        return found


class _Tree(HTMLParser):
    """The page as a tree (enough to find elements by id and read their text and links)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attributes: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attributes})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attributes: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attributes}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data)


class Page:
    def __init__(self, html: str) -> None:
        self.html = html
        tree = _Tree()
        tree.feed(html)
        self.root = tree.root

    def by_id(self, element_id: str) -> Node:
        for node in self.root.walk():
            if node.attr.get("id") == element_id:
                return node
        raise AssertionError(f"no element #{element_id} in the page")

    def has(self, element_id: str) -> bool:
        return any(node.attr.get("id") == element_id for node in self.root.walk())

    def figure(self, key: str) -> int:
        value = next(
            n for n in self.by_id(f"figure-{key}").walk() if "value" in n.attr.get("class", "")
        )
        return int(value.all_text().replace(",", ""))

    def figure_link(self, key: str) -> dict[str, list[str]]:
        link = next(n for n in self.by_id(f"figure-{key}").walk() if n.tag == "a")
        return parse_qs(urlsplit(link.attr["href"]).query)

    def svgs(self, element_id: str) -> list[ET.Element]:
        """Each ``<svg>`` inside the element, parsed as XML (it must be well-formed)."""
        section = self.by_id(element_id)
        # The raw markup of the section's charts, straight from the HTML.
        start = self.html.index(f'id="{element_id}"')
        end = self.html.index("</section>", start)
        raw = re.findall(r"<svg\b.*?</svg>", self.html[start:end], re.S)
        assert raw, f"no chart in #{element_id}"
        assert section is not None
        return [ET.fromstring(chart) for chart in raw]

    def table(self, element_id: str) -> list[tuple[str, list[str], str | None]]:
        """(first cell's text, the other cells' texts, the first cell's link) per row."""
        rows = []
        for row in self.by_id(element_id).walk():
            if row.tag != "tr" or not any(c.tag == "td" for c in row.children):
                continue
            cells = [c for c in row.children if c.tag == "td"]
            links = [n.attr["href"] for n in cells[0].walk() if n.tag == "a"]
            rows.append(
                (
                    cells[0].all_text(),
                    [c.all_text() for c in cells[1:]],
                    links[0] if links else None,
                )
            )
        return rows


def svg_text(chart: ET.Element) -> str:
    return " ".join(t for t in chart.itertext())


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path, store: Store, clock: Clock) -> AsyncIterator[Site]:
    async with ui_site(tmp_path, store, clock) as served:
        yield served


async def logged_in(site: Site) -> Browser:
    browser = site.browser()
    assert await browser.login() == 303
    return browser


async def get(browser: Browser, query: dict[str, str] | None = None) -> tuple[int, Page]:
    path = "/ui/" + ("?" + urlencode(query) if query else "")
    code, headers, body = await browser.request("GET", path)
    assert headers["content-type"].startswith("text/html")
    return code, Page(body)


async def add_events(store: Store, time: float, rows: list[tuple[str, str, EventData]]) -> None:
    async def txn(cursor: ICursor) -> None:
        await insert_events(cursor, round(time * 1000), rows)

    await store.engine.run_interaction("events", txn)


def bounce(category: str, hard: bool) -> BouncedEvent:
    return BouncedEvent(category, hard, "5.1.1" if hard else "4.2.2", "550 no", "smtp")


def human_open() -> OpenedEvent:
    return OpenedEvent("Mozilla/5.0", "192.0.2.1", False)


def machine_open() -> OpenedEvent:
    return OpenedEvent("GoogleImageProxy", "192.0.2.9", True)


def click(url: str, machine: bool = False) -> ClickedEvent:
    return ClickedEvent("Mozilla/5.0", "192.0.2.1", machine, url)


DELIVERED = DeliveredEvent("mx.example", "250 ok", True, 1)
DEFERRED = DeferredEvent("mx.example", "451 later", 1, "2080-01-01T00:00:00Z")


async def traffic(site: Site) -> float:
    """Two messages received now (T), their outcomes at T + 10 s, rolled up to T + 60 s;
    returns T.

    m1 from app@shop.example (tag welcome) to a@gmail.com (delivered, opened twice by a
    human and once by a machine, a human click and a machine click on shop.example/offer,
    a complaint) and b@yahoo.com (hard bounce, invalid-recipient); m2 from
    news@other.example (no tag) to c@gmail.com (deferred, then a soft bounce, mailbox-full).
    """
    store = site.store
    now = site.clock.seconds()
    m1 = await store.queue_message(
        NewMessage("app@shop.example", ("a@gmail.com", "b@yahoo.com"), b"x", tags=("welcome",))
    )
    m2 = await store.queue_message(NewMessage("news@other.example", ("c@gmail.com",), b"y"))
    q1, q2 = m1.queue_id, m2.queue_id
    await add_events(
        store,
        now + 10,
        [
            (q1, "a@gmail.com", DELIVERED),
            (q1, "b@yahoo.com", bounce("invalid-recipient", hard=True)),
            (q2, "c@gmail.com", DEFERRED),
            (q2, "c@gmail.com", bounce("mailbox-full", hard=False)),
            (q1, "a@gmail.com", human_open()),
            (q1, "a@gmail.com", machine_open()),
            (q1, "a@gmail.com", human_open()),
            (q1, "a@gmail.com", click("https://shop.example/offer?u=1")),
            (q1, "a@gmail.com", click("https://shop.example/offer?u=2", machine=True)),
            (q1, "a@gmail.com", ComplainedEvent("abuse", "fbl.example")),
        ],
    )
    await store.roll_up(now + 60, 10_000)
    return now


@pytest_twisted.ensureDeferred
async def test_the_page_shows_the_rolled_up_numbers_and_charts(site: Site) -> None:
    now = await traffic(site)
    browser = await logged_in(site)
    code, page = await get(browser, {"period": "24h"})
    assert code == 200
    expected = {
        "received": 3,
        "delivered": 1,
        "deferred": 1,
        "bounced": 2,
        "hard": 1,
        "soft": 1,
        "complained": 1,
        "opened": 1,
        "opens": 2,
        "machine_opens": 1,
        "clicked": 1,
        "clicks": 1,
        "unsubscribed": 0,
        "suppressed": 0,
    }
    assert {key: page.figure(key) for key in expected} == expected
    assert "33.3% of delivered + bounced" in page.by_id("figure-delivered").all_text()
    assert not page.has("dashboard-empty")

    # The lag: the roll-ups counted up to T + 60 s.
    lag = page.by_id("dashboard-lag")
    assert "Counts include the events up to" in lag.all_text()
    (stamp,) = [n for n in lag.walk() if n.tag == "time"]
    assert stamp.attr["datetime"].endswith("Z") and "problem" not in lag.attr.get("class", "")

    # Volume: 24 hourly bars, the outcomes stacked in the hour of T.
    (volume,) = page.svgs("chart-volume")
    assert volume.tag == f"{SVG}svg"
    assert len(volume.findall(f".//{SVG}g[@class='bar']")) == 24
    segments = {
        s.get("data-series") for s in volume.iter(f"{SVG}rect") if s.get("class") == "segment"
    }
    assert segments == {"delivered", "bounced", "deferred"}
    assert "Hourly, times in UTC" in svg_text(volume)

    # Bounces by category: hard and soft told apart, each row linking to bounced messages.
    (bounces,) = page.svgs("chart-bounces")
    text = svg_text(bounces)
    assert "invalid-recipient (hard)" in text and "mailbox-full (soft)" in text
    rows = page.table("table-bounces")
    assert [(r[0], r[1][0], r[1][1]) for r in rows] == [
        ("invalid-recipient", "hard", "1"),
        ("mailbox-full", "soft", "1"),
    ]
    link = urlsplit(rows[0][2] or "")
    assert link.path == "/ui/messages" and parse_qs(link.query)["outcome"] == ["bounced"]

    # Top recipient domains with their rates; each links to its messages of the period.
    (domains,) = page.svgs("chart-domains")
    assert "gmail.com" in svg_text(domains) and "yahoo.com" in svg_text(domains)
    table = {r[0]: (r[1], r[2]) for r in page.table("table-domains")}
    assert table["gmail.com"][0] == ["2", "1", "1", "1", "1", "50%", "50%"]
    assert table["yahoo.com"][0] == ["1", "0", "0", "1", "0", "0%", "100%"]
    query = parse_qs(urlsplit(table["gmail.com"][1] or "").query)
    assert query["recipient"] == ["@gmail.com"]
    since, until = query["since"][0], query["until"][0]
    assert since.endswith(":00") and until.endswith(":59")  # whole hours, the last included

    # Top clicked URLs, without their query; machine clicks apart.
    (urls,) = page.svgs("chart-urls")
    assert "https://shop.example/offer" in svg_text(urls) and "u=1" not in page.html
    assert page.table("table-urls") == [("https://shop.example/offer", ["1", "1"], None)]

    # No content warning in the roll-ups: the warnings chart's empty state.
    (warnings,) = page.svgs("chart-warnings")
    assert "No content warning in this period." in svg_text(warnings)

    # Figures link to their lists, with the period.
    assert page.figure_link("delivered")["outcome"] == ["delivered"]
    assert page.figure_link("complained") == {"kind": ["complaint"]}
    assert page.figure_link("received")["since"] == [since]
    del now


@pytest_twisted.ensureDeferred
async def test_filters_narrow_the_numbers_and_stay_in_the_links(site: Site) -> None:
    await traffic(site)
    browser = await logged_in(site)

    _, page = await get(browser, {"period": "24h", "tag": "welcome"})
    assert (page.figure("received"), page.figure("delivered"), page.figure("bounced")) == (2, 1, 1)
    assert page.figure_link("delivered")["tag"] == ["welcome"]
    assert page.by_id("tag").attr["value"] == "welcome"
    assert [r[0] for r in page.table("table-domains")] == ["gmail.com", "yahoo.com"]

    _, page = await get(browser, {"period": "7d", "sender_domain": "@Other.Example"})
    assert (page.figure("received"), page.figure("deferred"), page.figure("soft")) == (1, 1, 1)
    assert page.figure("delivered") == 0 and page.figure("hard") == 0
    assert page.figure_link("received")["sender"] == ["@other.example"]
    # The URL roll-up has no domains: the chart says so instead of showing unfiltered counts.
    assert "counted per tag only" in page.by_id("chart-urls").all_text()
    assert not page.has("table-urls")

    _, page = await get(browser, {"period": "30d", "recipient_domain": "yahoo.com"})
    assert (page.figure("received"), page.figure("bounced"), page.figure("hard")) == (1, 1, 1)
    assert page.figure("complained") == 0
    assert [r[0] for r in page.table("table-domains")] == ["yahoo.com"]
    assert page.figure_link("bounced")["recipient"] == ["@yahoo.com"]

    # A filter nothing matches: the empty state, with a way back.
    _, page = await get(browser, {"period": "24h", "tag": "nope"})
    empty = page.by_id("dashboard-empty")
    assert "with these filters" in empty.all_text()
    assert page.figure("received") == 0 and not page.has("chart-volume")
    clear = [n.attr["href"] for n in empty.walk() if n.tag == "a"]
    assert clear == ["/ui/?period=24h"]


@pytest_twisted.ensureDeferred
async def test_periods_hourly_daily_custom(site: Site) -> None:
    now = await traffic(site)
    browser = await logged_in(site)
    today = Period("custom", now, now + 1).query()["since"]

    # Seven days: daily bars (the partial first day included), dates in UTC.
    _, page = await get(browser, {"period": "7d"})
    (volume,) = page.svgs("chart-volume")
    assert len(volume.findall(f".//{SVG}g[@class='bar']")) in (7, 8)
    assert "Daily, dates in UTC" in svg_text(volume)

    # A custom day holding the traffic: hourly, 24 bars, the numbers; the dates kept.
    _, page = await get(browser, {"period": "custom", "since": today, "until": today})
    assert page.figure("received") == 3
    (volume,) = page.svgs("chart-volume")
    assert len(volume.findall(f".//{SVG}g[@class='bar']")) == 24
    assert page.by_id("since").attr["value"] == today
    assert page.figure_link("received")["until"] == [f"{today} 23:59"]
    permalink = parse_qs(
        urlsplit(
            next(n.attr["href"] for n in page.by_id("dashboard-period").walk() if n.tag == "a")
        ).query
    )
    assert permalink == {"period": ["custom"], "since": [today], "until": [today]}

    # Dates without a period are a custom period; a preset ignores the dates sent with it.
    _, page = await get(browser, {"since": "2000-01-01", "until": "2000-01-31"})
    assert page.figure("received") == 0 and page.has("dashboard-empty")
    assert page.by_id("period").children[-1].attr.get("selected") is not None
    _, page = await get(browser, {"period": "24h", "since": "2000-01-01", "until": "2000-01-31"})
    assert page.figure("received") == 3

    # Bad periods are a 400 page saying what to fix.
    for query, words in (
        ({"period": "1y"}, "No such period"),
        ({"period": "custom", "since": "2026-13-01"}, "a date as YYYY-MM-DD"),
        ({"since": "2026-12-05", "until": "2026-12-01"}, "ends before it starts"),
        ({"since": "2020-01-01", "until": "2026-01-01"}, "at most 400 days"),
        ({"since": XSS_TAG}, "longer than 10"),
    ):
        code, page = await get(browser, query)
        assert code == 400, query
        assert words in page.html, query
        assert "<script>alert" not in page.html


@pytest_twisted.ensureDeferred
async def test_hostile_tags_domains_urls_and_categories_appear_escaped(site: Site) -> None:
    store, now = site.store, site.clock.seconds()
    hostile_domain = f"{XSS_ATTR}{XSS_TAG}.example"
    message = await store.queue_message(
        NewMessage(
            f"app@{hostile_domain}",
            (f"x@{hostile_domain}",),
            b"x",
            tags=(XSS_TAG, XSS_ATTR),
        )
    )
    url = f"https://e.example/{XSS_TAG}{XSS_ATTR}"
    await add_events(
        store,
        now + 1,
        [
            (message.queue_id, f"x@{hostile_domain}", DELIVERED),
            (message.queue_id, f"x@{hostile_domain}", bounce(XSS_ATTR + XSS_TAG, hard=True)),
            (message.queue_id, f"x@{hostile_domain}", click(url)),
        ],
    )
    await store.roll_up(now + 60, 1000)
    browser = await logged_in(site)
    for query in (
        {"period": "24h"},
        {"period": "24h", "tag": XSS_TAG},
        {"period": "24h", "tag": XSS_ATTR, "recipient_domain": hostile_domain},
        {"period": "24h", "sender_domain": hostile_domain},
    ):
        code, page = await get(browser, query)
        assert code == 200, query
        assert "<script>alert" not in page.html and "<img src=x" not in page.html, query
        assert page.figure("received") == 1 and page.figure("bounced") == 1, query
        for section in ("chart-volume", "chart-bounces", "chart-domains", "chart-warnings"):
            for chart in page.svgs(section):  # parses: well-formed whatever the text
                assert chart.find(f".//{SVG}script") is None
                assert not any(e.tag.endswith("img") for e in chart.iter())
        # The hostile texts are shown as text, in the charts and in the tables.
        assert hostile_domain in svg_text(page.svgs("chart-domains")[0]), query
        assert XSS_ATTR + XSS_TAG in svg_text(page.svgs("chart-bounces")[0]), query
        assert page.table("table-domains")[0][0] == hostile_domain
        assert query.get("tag", "") == page.by_id("tag").attr["value"]
    _, page = await get(browser, {"period": "24h"})
    (urls,) = page.svgs("chart-urls")
    assert f"https://e.example/{XSS_TAG}{XSS_ATTR}" in svg_text(urls)
    assert page.table("table-urls")[0][0] == url
    link = page.table("table-domains")[0][2] or ""
    assert parse_qs(urlsplit(link).query)["recipient"] == ["@" + hostile_domain.lower()]


@pytest_twisted.ensureDeferred
async def test_empty_and_lagging_roll_ups_are_stated(site: Site) -> None:
    browser = await logged_in(site)
    _, page = await get(browser)
    assert "have not run yet" in page.by_id("dashboard-lag").all_text()
    assert "Send mail to the SMTP listener" in page.by_id("dashboard-empty").all_text()
    assert page.figure("received") == 0

    now = await traffic(site)
    site.clock.advance(3 * HOUR)  # the roll-ups stopped at T + 60 s
    _, page = await get(browser)
    lag = page.by_id("dashboard-lag")
    assert "problem" in lag.attr["class"] and "179 minutes behind" in lag.all_text()
    assert page.figure("received") == 3  # T is still within the last 24 hours
    del now


def request(**args: str) -> IRequest:
    dummy = DummyRequest([b""])
    dummy.args = {k.encode(): [v.encode()] for k, v in args.items()}
    return cast(IRequest, dummy)


def test_period_of_rounds_to_whole_hours() -> None:
    now = 1_800_000_000.0 + 1234  # 1234 s into an hour
    hour = now - now % HOUR
    assert period_of(request(), now) == Period("24h", hour + HOUR - DAY, hour + HOUR)
    assert period_of(request(period="30d"), now).hourly is False
    day = period_of(request(period="custom", since="2027-01-15", until="2027-01-15"), now)
    start = datetime(2027, 1, 15, tzinfo=UTC).timestamp()
    assert (day.since, day.until, day.hourly) == (start, start + DAY, True)
    assert len(day.buckets()) == 24
    # until defaults to now (its hour's end), since to 7 days before.
    open_end = period_of(request(since="2027-01-10"), now)
    assert open_end.until == hour + HOUR and open_end.name == "custom"
    assert len(Period("7d", hour + HOUR - 7 * DAY, hour + HOUR).buckets()) in (7, 8)
    with pytest.raises(UiError) as raised:
        period_of(request(period="custom", since="2027-02-01", until="2027-01-01"), now)
    assert raised.value.code == 400


def test_content_warnings_are_counted_per_kind() -> None:
    chart = _warning_chart(
        {
            ("warning", "no-dkim-key"): (3, 0),
            ("warning", "unfilled-placeholder"): (1, 0),
            ("warning", XSS_TAG): (2, 0),
            ("delivered", ""): (9, 0),
        }
    )
    parsed = ET.fromstring(str(chart))
    labels = [t.text for t in parsed.iter(f"{SVG}text") if t.get("class") == "row-label"]
    assert labels[0] == "From domain without a DKIM key" and len(labels) == 3
    assert XSS_TAG in labels and "Template placeholder left unfilled" in labels
    values = [t.text for t in parsed.iter(f"{SVG}text") if t.get("class") == "row-value"]
    assert values == ["3", "2", "1"]
    hovers = [t.text for t in parsed.iter(f"{SVG}title")]
    assert f"{XSS_TAG} ({XSS_TAG}): 2 messages" in hovers


@pytest_twisted.ensureDeferred
async def test_a_failed_read_is_a_500_page(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    await traffic(site)
    browser = await logged_in(site)

    async def broken(*args: object, **kwargs: object) -> list[object]:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(site.store, "top_urls", broken)
    code, page = await get(browser, {"period": "24h"})
    assert code == 500 and "Something went wrong" in page.html
    assert "database went away" not in page.html
    monkeypatch.undo()
    code, page = await get(browser, {"period": "24h"})
    assert code == 200 and page.figure("received") == 3


@pytest_twisted.ensureDeferred
async def test_top_domains_of_one_sender_read_only_its_rows(tmp_path: Path) -> None:
    """The dashboard filtered by a sender domain: top_recipient_domains reads that domain's
    rows of ``rollups`` by rollups_tag_sender_domain, not every row of the period (a month
    of bench/reports.py: 2 million rows, 550 ms of CPU on SQLite, instead of 35,000)."""
    engine = create_engine(real_reactor(), f"sqlite:{tmp_path / 'plans.db'}")
    await engine.start()
    try:
        await migrate(engine, 0)
        store = Store(engine, Clock())
        plans: list[str] = []
        run = store.run

        async def explaining(name: str, txn: Any, readonly: bool = False) -> Any:
            async def wrapped(cursor: ICursor) -> Any:
                original = cursor.execute

                async def execute(sql: str, args: Any = ()) -> None:
                    await original("EXPLAIN QUERY PLAN " + sql, args)
                    plans.extend(" ".join(str(c) for c in row) for row in cursor.fetchall())
                    await original(sql, args)

                cursor.execute = execute  # type: ignore[method-assign,assignment]
                return await txn(cursor)

            return await run(name, wrapped, readonly)

        store.run = explaining  # type: ignore[method-assign]
        await store.top_recipient_domains(0, 30 * DAY, sender_domain="big.example")
        await store.top_recipient_domains(1800, 30 * DAY + 1800, "welcome", "big.example")
    finally:
        await engine.close()
    reads = [plan for plan in plans if " rollups " in f"{plan} "]
    assert reads, plans
    assert all("rollups_tag_sender_domain (tag=? AND sender_domain=?" in p for p in reads), plans


@pytest_twisted.ensureDeferred
async def test_the_warnings_chart_shows_what_the_roll_ups_counted(site: Site) -> None:
    """A message's ``warning`` event (written as the re-wrap writes it), rolled up: the chart
    has the roll-ups' counts per detail (the kind, once the roll-ups count per kind)."""
    store, now = site.store, site.clock.seconds()
    message = await store.queue_message(NewMessage("app@shop.example", ("a@gmail.com",), b"x"))
    warnings = [{"kind": "no-dkim-key", "detail": "shop.example"}, {"kind": XSS_TAG, "detail": ""}]

    async def txn(cursor: ICursor) -> None:
        await cursor.execute(
            "INSERT INTO events (type, time, queue_id, recipient, data) VALUES (?, ?, ?, ?, ?)",
            (
                "warning",
                round(now * 1000) + 5,
                message.queue_id,
                None,
                json.dumps({"warnings": warnings}),
            ),
        )

    await store.engine.run_interaction("warning", txn)
    await store.roll_up(now + 60, 1000)
    counted = {
        detail: count
        for (kind, detail), (count, _) in (
            await store.rollup_totals(now - HOUR, now + HOUR)
        ).items()
        if kind == "warning"
    }
    assert counted and sum(counted.values()) >= 1
    browser = await logged_in(site)
    _, page = await get(browser, {"period": "24h"})
    (chart,) = page.svgs("chart-warnings")
    labels = [t.text for t in chart.iter(f"{SVG}text") if t.get("class") == "row-label"]
    values = [t.text for t in chart.iter(f"{SVG}text") if t.get("class") == "row-value"]
    expected = sorted(
        (
            (count, WARNING_LABELS.get(detail, detail or "unnamed"))
            for detail, count in counted.items()
        ),
        key=lambda row: (-row[0], row[1]),
    )
    assert sorted(zip(values, labels, strict=True)) == sorted(
        (str(c), label) for c, label in expected
    )
    assert "<script>alert" not in page.html
