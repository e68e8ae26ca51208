"""The Messages section of the reports UI (search, a message's page and timeline, retry and
drop), over real HTTP on both engines."""

from __future__ import annotations

import html
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from markupsafe import escape
from twisted.internet.task import Clock

from smartrelay.config import Config, SmtpConfig
from smartrelay.events import (
    BouncedEvent,
    ClickedEvent,
    ComplainedEvent,
    DeferredEvent,
    DeliveredEvent,
    EventData,
    ExpiredEvent,
    OpenedEvent,
    SuppressedEvent,
    UnsubscribedEvent,
)
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.reports import encode_cursor
from smartrelay.storage.store import NewMessage, Store, insert_events
from smartrelay.web.ui.context import UiContext, UiError
from smartrelay.web.ui.dashboard import Dashboard
from smartrelay.web.ui.messages import Messages, parse_time
from tests.support.webui import Browser, Site, hidden, ui_site

HOSTILE = "<script>alert(1)</script>\"'><img src=x onerror=alert(1)>"
#: A metadata key cannot hold "=" in the search form (key=value splits at the first one).
HOSTILE_KEY = HOSTILE.replace("=", ":")


def sections(ui: UiContext) -> dict[str, Any]:
    return {"": Dashboard(ui), "messages": Messages(ui)}


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path, store: Store, clock: Clock) -> AsyncIterator[Site]:
    async with ui_site(tmp_path, store, clock, sections=sections) as served:
        yield served


async def logged_in(site: Site) -> Browser:
    browser = site.browser()
    assert await browser.login() == 303
    return browser


async def queue(
    store: Store,
    clock: Clock,
    sender: str,
    recipients: tuple[str, ...],
    subject: str = "hello",
    tags: tuple[str, ...] = (),
    metadata: dict[str, str] | None = None,
    **more: Any,
) -> str:
    """Queue a message one minute after the previous one; its queue id."""
    clock.advance(60)
    raw = f"From: {sender}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    queued = await store.queue_message(
        NewMessage(sender, recipients, raw, tags=tags, metadata=metadata or {}, **more)
    )
    return queued.queue_id


async def execute(store: Store, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute(sql, args)
        return [tuple(r) for r in cursor.fetchall()] if sql.startswith("SELECT") else []

    return await store.engine.run_interaction("test", txn)


async def set_state(
    store: Store, queue_id: str, address: str, state: str, reply: str = "", attempts: int = 1
) -> None:
    pending = state in ("queued", "deferred", "delivering")
    await execute(
        store,
        "UPDATE recipients SET state = ?, next_attempt_at = ?, last_reply = ?, attempts = ?"
        " WHERE queue_id = ? AND address = ?",
        (
            state,
            store.now_ms() + 3_600_000 if pending else None,
            reply or f"reply {state}",
            attempts,
            queue_id,
            address,
        ),
    )


async def add_events(store: Store, time: float, rows: list[tuple[str, str, EventData]]) -> None:
    async def txn(cursor: ICursor) -> None:
        await insert_events(cursor, round(time * 1000), rows)

    await store.engine.run_interaction("events", txn)


async def add_raw_event(
    store: Store, time: float, queue_id: str, kind: str, data: dict[str, Any]
) -> None:
    """An event row of a type this module's vocabulary may not have (``warning``)."""
    await execute(
        store,
        "INSERT INTO events (type, time, queue_id, recipient, data) VALUES (?, ?, ?, NULL, ?)",
        (kind, round(time * 1000), queue_id, json.dumps(data, sort_keys=True)),
    )


def result_ids(page: str) -> list[str]:
    """The queue ids in the results table, in order."""
    match = re.search(r'<table id="message-results">(.*?)</table>', page, re.S)
    if match is None:
        return []
    return re.findall(r'<a class="mono qid" href="/ui/messages/([^"?/]+)">', match[1])


def link(page: str, element_id: str) -> str | None:
    match = re.search(rf'<a id="{element_id}" href="([^"]*)"', page)
    return None if match is None else html.unescape(match[1])


DAY = "%Y-%m-%d"


def utc(seconds: float, form: str = "%Y-%m-%d %H:%M") -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime(form)


async def search(browser: Browser, **query: str) -> tuple[int, str]:
    code, _, page = await browser.request("GET", "/ui/messages?" + urlencode(query))
    return code, page


class Corpus:
    def __init__(self, ids: list[str], times: list[float]) -> None:
        self.ids = ids
        self.times = times

    def newest_first(self, *indexes: int) -> list[str]:
        return [self.ids[i] for i in sorted(indexes, reverse=True)]


async def corpus(store: Store, clock: Clock) -> Corpus:
    ids: list[str] = []
    times: list[float] = []
    for sender, recipients, tags, metadata in [
        ("App@Shop.example", ("Ann@Gmail.com", "bob@yahoo.com"), ("welcome",), {"user": "42"}),
        ("news@shop.example", ("carl@gmail.com",), ("newsletter", "welcome"), {"user": "43"}),
        ("alerts@bank.example", ("ann@gmail.com",), ("alert",), {"user": "42", "plan": "pro"}),
        ("x_y@odd.example", ("a%b@odd.example",), (), {"k": "a=b"}),
        ("app@shop.example", ("dora@outlook.com",), ("welcome",), {}),
    ]:
        ids.append(await queue(store, clock, sender, recipients, tags=tags, metadata=metadata))
        times.append(clock.seconds())
        clock.advance(3600)  # an hour apart: the time filters below work in minutes
    await set_state(store, ids[0], "Ann@Gmail.com", "delivered")
    await set_state(store, ids[0], "bob@yahoo.com", "bounced")
    await set_state(store, ids[1], "carl@gmail.com", "deferred")
    await set_state(store, ids[2], "ann@gmail.com", "delivered")
    await set_state(store, ids[3], "a%b@odd.example", "suppressed")
    return Corpus(ids, times)


@pytest_twisted.ensureDeferred
async def test_search_by_each_filter(site: Site) -> None:
    c = await corpus(site.store, site.clock)
    browser = await logged_in(site)
    cases: list[tuple[dict[str, str], list[int]]] = [
        ({}, [0, 1, 2, 3, 4]),
        ({"queue_id": c.ids[2]}, [2]),
        ({"queue_id": "nope"}, []),
        ({"recipient": "ann@gmail.com"}, [0, 2]),  # any letter case
        ({"recipient": "@GMAIL.com"}, [0, 1, 2]),
        ({"recipient": "a%b@odd.example"}, [3]),  # % is literal
        ({"recipient": "a_b@odd.example"}, []),
        ({"sender": "app@shop.example"}, [0, 4]),
        ({"sender": "@shop.example"}, [0, 1, 4]),
        ({"sender": "@bank.example"}, [2]),
        ({"tag": "welcome"}, [0, 1, 4]),
        ({"tag": "Welcome"}, []),
        ({"meta": "user=42"}, [0, 2]),
        ({"meta": " user = 43 "}, [1]),
        ({"meta": "k=a=b"}, [3]),  # split at the first "="
        ({"meta": "plan=pro", "tag": "alert"}, [2]),
        ({"outcome": "delivered"}, [0, 2]),
        ({"outcome": "bounced"}, [0]),
        ({"outcome": "deferred"}, [1]),
        ({"outcome": "queued"}, [4]),
        ({"outcome": "expired"}, []),
        ({"since": utc(c.times[2])}, [2, 3, 4]),  # to the minute, UTC
        ({"since": utc(c.times[2], "%Y-%m-%dT%H:%M:%S")}, [2, 3, 4]),
        ({"until": utc(c.times[1])}, [0, 1]),  # the named minute included
        ({"since": utc(c.times[1]), "until": utc(c.times[3])}, [1, 2, 3]),
        ({"since": utc(c.times[0], DAY), "until": utc(c.times[4], DAY)}, [0, 1, 2, 3, 4]),
        ({"until": utc(c.times[0] - 86400, DAY)}, []),
        ({"sender": "@shop.example", "outcome": "delivered", "recipient": "@gmail.com"}, [0]),
    ]  # fmt: skip
    for query, expected in cases:
        code, page = await search(browser, **query)
        assert code == 200, (query, page)
        assert result_ids(page) == c.newest_first(*expected), query
        # The form shows the search it answered.
        for name, value in query.items():
            assert f'id="{name}" name="{name}" value="{escape(value.strip())}"' in page or (
                f'<option value="{value}" selected>' in page
            ), (name, value)
    # A row: received time, queue id, sender, recipients' states, subject, tags, size.
    code, page = await search(browser, queue_id=c.ids[0])
    row = re.search(r"<tbody>(.*?)</tbody>", page, re.S)
    assert row is not None
    assert "<time datetime=" in row[1] and ">App@Shop.example<" in row[1]
    assert '<div>Ann@Gmail.com <span class="badge delivered">delivered</span></div>' in row[1]
    assert '<div>bob@yahoo.com <span class="badge bounced">bounced</span></div>' in row[1]
    assert " in all:" not in row[1]  # every recipient is named
    assert ">hello<" in row[1] and '<span class="badge tag">welcome</span>' in row[1]
    assert re.search(r'<td class="num">\d+ B</td>', row[1])
    # Beyond the first three, the recipients are counted by state.
    q = await queue(
        site.store, site.clock, "s@x.example", tuple(f"r{n}@z.example" for n in range(5))
    )
    await set_state(site.store, q, "r4@z.example", "bounced")
    code, page = await search(browser, queue_id=q)
    assert code == 200
    assert re.findall(r"<div>(r\d@z.example) <span", page) == [
        "r0@z.example",
        "r1@z.example",
        "r2@z.example",
    ]
    assert "5 in all:</span>" in page
    assert '<span class="badge bounced">bounced &times;&nbsp;1</span>' in page
    assert '<span class="badge queued">queued &times;&nbsp;4</span>' in page
    # A purged body says so instead of a subject.
    await execute(site.store, "DELETE FROM message_bodies WHERE queue_id = ?", (c.ids[0],))
    code, page = await search(browser, queue_id=c.ids[0])
    assert "(body purged)" in page and ">hello<" not in page


@pytest_twisted.ensureDeferred
async def test_bad_filters_are_a_clear_400_above_the_form(site: Site) -> None:
    await corpus(site.store, site.clock)
    browser = await logged_in(site)
    cases: list[tuple[dict[str, str], str]] = [
        ({"outcome": "lost"}, "Outcome: choose one of"),
        ({"since": "yesterday"}, "From: write a UTC date as 2026-12-05"),
        ({"until": "2026-13-01"}, "To: write a UTC date"),
        ({"since": "2026-12-05", "until": "2026-12-04"}, "The time range ends before it starts."),
        ({"meta": "user"}, "Metadata: write key=value"),
        ({"meta": "=42"}, "Metadata: write key=value"),
        ({"recipient": "@"}, "Not a domain"),
        ({"sender": "@x@y"}, "Not a domain"),
        ({"meta": "k=" + "x" * 600}, "Search value too long"),
        ({"tag": "x" * 401}, "longer than 400 characters"),
        ({"limit": "0"}, "limit: a number of rows from 1 to 200"),
        ({"limit": "many"}, "limit: a number of rows"),
    ]
    for query, message in cases:
        code, page = await search(browser, **query)
        assert code == 400, (query, code)
        problem = re.search(r'<p class="problem" id="search-problem" role="alert">(.*?)</p>', page)
        assert problem is not None and message in html.unescape(problem[1]), (query, page)
        assert page.index("search-problem") < page.index('id="message-search"')
        assert 'id="message-results"' not in page
    # NUL and bad UTF-8 in a value are 400s too, never 500s.
    for name in ("queue_id", "sender", "meta", "since", "outcome"):
        code, _, page = await browser.request("GET", f"/ui/messages?{name}=a%00b")
        assert code == 400 and "cannot hold a NUL character" in page, name
    code, _, page = await browser.request("GET", "/ui/messages?sender=%ff")
    assert code == 400 and "not valid UTF-8" in page


def test_parse_time_forms() -> None:
    assert parse_time("2026-12-05", "From") == datetime(2026, 12, 5, tzinfo=UTC).timestamp()
    end = datetime(2026, 12, 6, tzinfo=UTC).timestamp()
    assert parse_time("2026-12-05", "To", end=True) == end
    assert parse_time("2026-12-05T23:59", "To", end=True) == end
    assert parse_time("2026-12-05 23:59:59Z", "To", end=True) == end
    assert (
        parse_time(" 2026-12-05 14:30 UTC ", "From")
        == datetime(2026, 12, 5, 14, 30, tzinfo=UTC).timestamp()
    )
    for bad in ("", "5/12/2026", "2026-12-05 25:00", "2026-12-05T14:30+02:00", "now"):
        with pytest.raises(UiError):
            parse_time(bad, "From")


@pytest_twisted.ensureDeferred
async def test_paging_forward_through_three_pages_keeps_the_filters(site: Site) -> None:
    ids = []
    for n in range(8):
        ids.append(await queue(site.store, site.clock, "app@shop.example", (f"r{n}@x.example",),
                               tags=("paged",) if n != 5 else ("other",)))  # fmt: skip
    paged = [q for n, q in enumerate(ids) if n != 5][::-1]  # newest first
    browser = await logged_in(site)
    first = "/ui/messages?" + urlencode({"tag": "paged", "limit": "3"})
    code, _, page = await browser.request("GET", first)
    assert code == 200 and link(page, "page-newest") is None
    seen: list[list[str]] = [result_ids(page)]
    while (older := link(page, "page-older")) is not None:
        assert "tag=paged" in older and "limit=3" in older and "after=" in older
        code, _, page = await browser.request("GET", older)
        assert code == 200
        seen.append(result_ids(page))
        # Back to the first page, with the same filters and no cursor.
        newest = link(page, "page-newest")
        assert newest is not None and "after" not in newest
        code, _, again = await browser.request("GET", newest)
        assert result_ids(again) == seen[0]
    assert [len(p) for p in seen] == [3, 3, 1]
    assert [q for p in seen for q in p] == paged  # in order, no repeat, nothing skipped


@pytest_twisted.ensureDeferred
async def test_a_tampered_cursor_is_a_400_with_a_start_again_link(site: Site) -> None:
    await corpus(site.store, site.clock)
    browser = await logged_in(site)
    for cursor in (
        "garbage!",
        encode_cursor("not", "ints"),
        encode_cursor(1, 2, 3),
        "A" * 1000,
        encode_cursor(1, "x")[:-2],
    ):
        code, page = await search(browser, tag="welcome", after=cursor)
        assert code == 400, cursor
        assert "This page link is damaged or out of date." in page
        assert link(page, "start-again") == "/ui/messages?tag=welcome"
        assert 'id="message-results"' not in page


@pytest_twisted.ensureDeferred
async def test_empty_states_say_what_to_do(tmp_path: Path, store: Store, clock: Clock) -> None:
    config = Config(smtp=SmtpConfig(listen=("tcp:2525:interface=192.0.2.1",)))
    async with ui_site(
        tmp_path, store, clock, sections=sections, extra={"config": config}
    ) as served:
        browser = await logged_in(served)
        code, page = await search(browser)
        assert code == 200
        assert "No mail yet: send to the SMTP listener at" in page
        assert "<code>tcp:2525:interface=192.0.2.1</code>" in page
        await queue(store, clock, "a@s.example", ("r@r.example",))
        code, page = await search(browser, recipient="nobody@r.example")
        assert code == 200 and "No message matches" in page
        assert "search by <code>@example.com</code>" in page and "No mail yet" not in page


@pytest_twisted.ensureDeferred
async def test_the_timeline_shows_every_event_in_order_in_words(site: Site) -> None:
    store, clock = site.store, site.clock
    q = await queue(
        store,
        clock,
        "app@shop.example",
        ("a@x.example", "b@y.example", "c@z.example"),
        subject="Your order",
        tags=("orders",),
        metadata={"user": "42"},
        client_ip="192.0.2.9",
        credential="shop",
    )
    t = clock.seconds()
    a, b, c = "a@x.example", "b@y.example", "c@z.example"
    # Written out of time order: the page orders by time (then by id).
    written: list[tuple[float, str, EventData]] = [
        (70, a, OpenedEvent("Mozilla/5.0 (Phone)", "198.51.100.7", False)),
        (60, a, OpenedEvent("GoogleImageProxy", "66.249.0.1", True)),
        (10, a, DeliveredEvent("mx.x.example", "250 2.0.0 ok id=77", True, 1)),
        (10, b, DeferredEvent("mx.y.example", "451 4.7.1 greylisted", 1, "2080-01-01T10:00:00Z")),
        (20, b, BouncedEvent("bad-mailbox", True, "5.1.1", "550 5.1.1 no such user", "smtp")),
        (30, c, SuppressedEvent("complaint")),
        (
            80,
            a,
            ClickedEvent("Mozilla/5.0 (Phone)", None, False, "https://shop.example/o?id=1&x=2"),
        ),
        (90, a, UnsubscribedEvent("one-click")),
        (100, a, ComplainedEvent("abuse", "feedback@isp.example")),
        (110, b, ExpiredEvent(5)),
    ]
    for offset, recipient, event in written:
        await add_events(store, t + offset, [(q, recipient, event)])
    await add_raw_event(
        store,
        t + 5,
        q,
        "warning",
        {
            "warnings": [
                {"kind": "no-dkim-key", "detail": "no DKIM key for shop.example"},
                {"kind": "unfilled-placeholder", "detail": "{{ first_name }} in the HTML part"},
            ]
        },
    )
    await add_raw_event(store, t + 120, q, "future-type", {"colour": "blue"})
    await set_state(store, q, a, "delivered", "250 2.0.0 ok id=77")
    await set_state(store, q, b, "bounced", "550 5.1.1 no such user")
    await set_state(store, q, c, "suppressed")

    browser = await logged_in(site)
    code, _, page = await browser.request("GET", f"/ui/messages/{q}")
    assert code == 200
    timeline = re.search(r'<ol class="timeline" id="message-timeline">(.*?)</ol>', page, re.S)
    assert timeline is not None
    types = re.findall(r'<li class="[^"]+" data-type="([^"]+)">', timeline[1])
    assert types == [
        "received", "received", "received", "warning", "delivered", "deferred", "bounced",
        "suppressed", "opened", "opened", "clicked", "unsubscribed", "complained", "expired",
        "future-type",
    ]  # fmt: skip
    items = re.findall(r'<li class="[^"]+" data-type="[^"]+">(.*?)</li>\n(?=<li class|$)',
                       timeline[1], re.S)  # fmt: skip
    assert len(items) == len(types)
    text = [html.unescape(re.sub(r"<[^>]+>", " ", item)) for item in items]
    words = [" ".join(t.split()) for t in text]
    assert "Received from the application" in words[0] and "192.0.2.9" in words[0]
    assert "Credential shop" in words[0] and "Size" in words[0]
    assert "Content warnings found at re-wrap" in words[3]
    assert "No DKIM key signs the From domain" in words[3]
    assert "{{ first_name }} in the HTML part" in words[3]
    assert "Delivered" in words[4] and "mx.x.example" in words[4]
    assert "250 2.0.0 ok id=77" in words[4] and "TLS yes" in words[4] and "a@x.example" in words[4]
    assert "Deferred" in words[5] and "451 4.7.1 greylisted" in words[5]
    assert 'datetime="2080-01-01T10:00:00Z"' in items[5]  # next attempt, as a <time>
    assert "Bounced (hard" in words[6] and "bad-mailbox" in words[6] and "5.1.1" in words[6]
    assert "550 5.1.1 no such user" in words[6]
    assert "the receiving server's reply" in words[6]
    assert "suppression list" in words[7] and "complaint" in words[7] and "c@z.example" in words[7]
    assert "Opened by a machine" in words[8] and "GoogleImageProxy" in words[8]
    assert "Opened by a person" in words[9] and "198.51.100.7" in words[9]
    assert "Clicked a link by a person" in words[10]
    assert "https://shop.example/o?id=1&x=2" in words[10] and "Mozilla/5.0 (Phone)" in words[10]
    assert "Unsubscribed" in words[11] and "one-click" in words[11]
    assert "Complaint" in words[12] and "abuse" in words[12] and "feedback@isp.example" in words[12]
    assert "Expired" in words[13] and "Attempts 5" in words[13]
    assert "Event future-type" in words[14] and "colour blue" in words[14]
    # The warnings are also shown prominently above everything else.
    card = page.index('id="message-warnings"')
    assert card < page.index('id="message-facts"')
    assert "No DKIM key signs the From domain" in page[card : page.index("</section>", card)]
    # Facts and recipients.
    facts = re.search(r'<dl class="facts wide" id="message-facts">(.*?)</dl>', page, re.S)
    assert facts is not None
    flat = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", facts[1])).split())
    for expected in ("Sender app@shop.example", "Client 192.0.2.9", "Credential shop",
                     "Tags orders", "user = 42", "Subject Your order", "Body kept"):  # fmt: skip
        assert expected in flat, expected
    recipients = re.search(r'<table id="message-recipients">(.*?)</table>', page, re.S)
    assert recipients is not None
    assert recipients[1].count("<tr>") == 4  # the header and three recipients
    assert '<span class="badge bounced">bounced</span>' in recipients[1]
    assert "550 5.1.1 no such user" in recipients[1]
    # Nothing is waiting: no actions.
    assert 'id="retry-form"' not in page and 'id="drop-form"' not in page


@pytest_twisted.ensureDeferred
async def test_retry_and_drop_need_the_csrf_token_and_work(site: Site) -> None:
    store = site.store
    q = await queue(store, site.clock, "app@shop.example", ("a@x.example", "b@y.example"))
    await set_state(store, q, "a@x.example", "deferred", "451 try later", attempts=2)
    await set_state(store, q, "b@y.example", "delivered")
    browser = await logged_in(site)
    code, _, page = await browser.request("GET", f"/ui/messages/{q}")
    assert code == 200 and 'id="retry-form"' in page and 'id="drop-form"' in page
    csrf = hidden(page, "csrf")
    due = await execute(store, "SELECT next_attempt_at FROM recipients WHERE address = ?",
                        ("a@x.example",))  # fmt: skip
    assert due[0][0] > store.now_ms()

    # Without the token, or with a wrong one: refused, nothing changed.
    for form in ({}, {"csrf": "wrong"}):
        for action in ("retry", "drop"):
            code, _, _ = await browser.request("POST", f"/ui/messages/{q}/{action}", form)
            assert code == 403, (form, action)
    detail = await store.message_detail(q)
    assert detail is not None
    assert [r.state for r in detail.recipients] == ["deferred", "delivered"]
    assert detail.recipients[0].next_attempt_at == due[0][0] / 1000
    # A GET is not an action.
    code, _, _ = await browser.request("GET", f"/ui/messages/{q}/retry")
    assert code == 405

    code, headers, _ = await browser.request("POST", f"/ui/messages/{q}/retry", {"csrf": csrf})
    assert code == 303 and headers["location"] == f"/ui/messages/{q}?done=retried"
    detail = await store.message_detail(q)
    assert detail is not None and detail.recipients[0].state == "deferred"
    assert detail.recipients[0].next_attempt_at == store.now_ms() / 1000
    code, _, page = await browser.request("GET", headers["location"])
    assert "Retry requested" in page and 'id="action-notice"' in page

    code, headers, _ = await browser.request("POST", f"/ui/messages/{q}/drop", {"csrf": csrf})
    assert code == 303 and headers["location"] == f"/ui/messages/{q}?done=dropped"
    detail = await store.message_detail(q)
    assert detail is not None
    assert [r.state for r in detail.recipients] == ["dropped", "delivered"]
    assert [e.type for e in detail.timeline][-1] == "dropped"
    code, _, page = await browser.request("GET", headers["location"])
    assert "Dropped: its waiting recipients will not be sent." in page
    assert 'data-type="dropped"' in page and "Dropped: it will not be sent" in page
    assert 'id="retry-form"' not in page  # nothing waits any more

    # Again: nothing to do, said so; an unknown message: 404.
    code, headers, _ = await browser.request("POST", f"/ui/messages/{q}/retry", {"csrf": csrf})
    assert code == 303 and headers["location"].endswith("?done=retry-none")
    code, headers, _ = await browser.request("POST", f"/ui/messages/{q}/drop", {"csrf": csrf})
    assert code == 303 and headers["location"].endswith("?done=drop-none")
    code, _, page = await browser.request("POST", "/ui/messages/NOPE/drop", {"csrf": csrf})
    assert code == 404
    # A made-up notice is not shown.
    code, _, page = await browser.request("GET", f"/ui/messages/{q}?done=%3Cb%3Ehi")
    assert code == 200 and 'id="action-notice"' not in page and "<b>hi" not in page


@pytest_twisted.ensureDeferred
async def test_hostile_values_are_shown_escaped(site: Site) -> None:
    store = site.store
    q = await queue(
        store,
        site.clock,
        f"x{HOSTILE}@evil.example",
        (f"r{HOSTILE}@evil.example",),
        subject=HOSTILE,
        tags=(HOSTILE,),
        metadata={HOSTILE_KEY: HOSTILE},
        client_ip=HOSTILE,
        credential=HOSTILE,
    )
    r = f"r{HOSTILE}@evil.example"
    t = site.clock.seconds()
    await set_state(store, q, r, "deferred", reply=f"451 {HOSTILE}")
    await add_events(store, t + 1, [(q, r, DeferredEvent(HOSTILE, f"451 {HOSTILE}", 1, HOSTILE))])
    await add_events(
        store, t + 2, [(q, r, BouncedEvent(HOSTILE, False, HOSTILE, HOSTILE, HOSTILE))]
    )
    await add_events(
        store, t + 3, [(q, r, ClickedEvent(HOSTILE, HOSTILE, True, f"javascript:{HOSTILE}"))]
    )
    await add_events(store, t + 4, [(q, r, OpenedEvent(HOSTILE, HOSTILE, False))])
    await add_raw_event(
        store,
        t + 5,
        q,
        "warning",
        {"warnings": [{"kind": HOSTILE, "detail": HOSTILE}], HOSTILE: HOSTILE},
    )
    await add_raw_event(store, t + 6, q, HOSTILE, {HOSTILE: [HOSTILE]})
    browser = await logged_in(site)
    pages = []
    code, page = await search(browser)
    assert code == 200 and result_ids(page) == [q]
    pages.append(page)
    code, page = await search(browser, recipient=r, tag=HOSTILE, meta=f"{HOSTILE_KEY}={HOSTILE}")
    assert code == 200 and result_ids(page) == [q]
    pages.append(page)
    code, page = await search(browser, sender=HOSTILE, outcome=HOSTILE)  # a 400 echoes it
    assert code == 400
    pages.append(page)
    code, _, page = await browser.request("GET", f"/ui/messages/{q}")
    assert code == 200 and page.count('data-type="') == 7
    pages.append(page)
    escaped = str(escape(HOSTILE))
    for page in pages:
        body = page[page.index("<main") :]
        assert "<script" not in body and "<img" not in body and "onerror=alert(1)>" not in body
        assert escaped in body
    assert pages[3].count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 15


@pytest_twisted.ensureDeferred
async def test_an_unknown_message_is_a_404_page(site: Site) -> None:
    browser = await logged_in(site)
    for path in ("/ui/messages/NOSUCHID", "/ui/messages/" + "x" * 500, "/ui/messages/a/b/c"):
        code, headers, page = await browser.request("GET", path)
        assert code == 404, path
        assert "<h1>Not found</h1>" in page
        assert headers["content-type"].startswith("text/html")
    code, _, page = await browser.request("GET", "/ui/messages/%3Cscript%3Ealert(1)")
    assert code == 404 and "&lt;script&gt;alert(1)" in page and "<script>alert" not in page


LONG_REPLY = "550-5.1.1 " + "The email account that you tried to reach does not exist. " * 6
LONG_URL = "https://shop.example/" + "averylongpathsegment" * 10 + "?utm_source=x&id=" + "9" * 80


def phone_pages(base: str, paths: list[str], cookies: dict[str, str], shots: Path) -> list[Any]:
    """Each page at 375 px in headless Chromium: (path, page width, viewport width, alert)."""
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=375,900", "--no-first-run"):  # fmt: skip
        options.add_argument(flag)
    options.unhandled_prompt_behavior = "ignore"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    found = []
    try:
        driver.set_page_load_timeout(60)
        driver.set_window_size(375, 900)
        driver.get(base + "/ui/login")
        for name, value in cookies.items():
            driver.add_cookie({"name": name, "value": value, "path": "/ui/"})
        for n, path in enumerate(paths):
            driver.get(base + path)
            wide, view = driver.execute_script(
                "return [document.documentElement.scrollWidth,"
                " document.documentElement.clientWidth]"
            )
            try:
                driver.switch_to.alert.dismiss()
                alert = True
            except NoAlertPresentException:
                alert = False
            driver.save_screenshot(str(shots / f"phone-{n}.png"))
            found.append((path, wide, view, alert, driver.title))
    finally:
        driver.quit()
    return found


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_long_values_wrap_on_a_phone(site: Site, tmp_path: Path) -> None:
    """Headless Chromium at 375 px: long addresses, replies, URLs, subjects and tags wrap, so
    no page scrolls sideways (a table may, inside its own frame); hostile text opens no alert."""
    from twisted.internet.threads import deferToThread

    store, clock = site.store, site.clock
    long_address = "bob." + "y" * 80 + "@yahoo.example"
    q = await queue(store, clock, "newsletter-" + "x" * 80 + "@shop.example",
                    ("ann@gmail.example", long_address), subject="Digest " * 30 + HOSTILE,
                    tags=("t" * 90, HOSTILE), metadata={"campaign": "c" * 150, "k": HOSTILE},
                    client_ip="192.0.2.9", credential="shop")  # fmt: skip
    t = clock.seconds()
    await set_state(store, q, long_address, "deferred", LONG_REPLY, attempts=2)
    written: list[tuple[float, str, EventData]] = [
        (10, long_address, DeferredEvent("mx." + "m" * 60 + ".example", LONG_REPLY, 1, "x")),
        (20, "ann@gmail.example", ClickedEvent(HOSTILE + "U" * 200, None, False, LONG_URL)),
    ]
    for offset, recipient, event in written:
        await add_events(store, t + offset, [(q, recipient, event)])
    await add_raw_event(store, t + 5, q, "warning", {"warnings": [
        {"kind": "double-escaped-link", "detail": LONG_URL + "&amp;amp;x=1"}]})  # fmt: skip
    browser = await logged_in(site)
    paths = ["/ui/messages", f"/ui/messages/{q}", "/ui/messages?sender=" + "s" * 390]
    found = await deferToThread(phone_pages, site.url, paths, browser.cookies, tmp_path)
    assert [f[0] for f in found] == paths
    for path, wide, view, alert, title in found:
        assert title.endswith("SmartRelay") and "Log in" not in title, (path, title)
        assert 300 < view <= 375 and wide <= view, (path, wide, view)
        assert not alert, path
