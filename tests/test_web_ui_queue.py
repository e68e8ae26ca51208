"""The queue page (/ui/queue) over real HTTP, on both engines: destinations, their messages,
retry and drop per destination and per message."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest_twisted
from twisted.internet.task import Clock

from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import NewMessage, Store
from smartrelay.web.ui.queue import PAGE, Queue
from tests.support.webui import Browser, Site, hidden, ui_site

HOSTILE_REPLY = "451 <script>alert(1)</script>"
HOSTILE_RECIPIENT = "\"'><img/src=x/onerror=alert(1)>@evil.example"
HOSTILE_DOMAIN_RECIPIENT = 'x@"><svg/onload=alert(1)>.example'


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path, store: Store, clock: Clock) -> AsyncIterator[Site]:
    async with ui_site(tmp_path, store, clock, lambda ui: {"queue": Queue(ui)}) as served:
        yield served


async def execute(store: Store, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute(sql, args)
        return [tuple(r) for r in cursor.fetchall()] if sql.startswith("SELECT") else []

    return await store.engine.run_interaction("test", txn)


async def queue(
    store: Store, clock: Clock, *recipients: str, sender: str = "s@shop.example"
) -> str:
    clock.advance(1)
    raw = f"From: {sender}\r\nSubject: hi\r\n\r\nbody\r\n".encode()
    return (await store.queue_message(NewMessage(sender, recipients, raw))).queue_id


async def defer(store: Store, address: str, reply: str, later: float = 3600) -> None:
    """The recipient was tried once and is due in ``later`` seconds."""
    await execute(
        store,
        "UPDATE recipients SET state = 'deferred', attempts = 1, last_reply = ?,"
        " updated_at = ?, next_attempt_at = ? WHERE address = ?",
        (reply, store.now_ms(), store.now_ms() + round(later * 1000), address),
    )


async def recipients(store: Store) -> dict[str, tuple[str, int | None, str | None]]:
    rows = await execute(
        store, "SELECT address, state, next_attempt_at, last_reply FROM recipients"
    )
    return {str(r[0]): (str(r[1]), r[2], r[3]) for r in rows}


async def dropped_events(store: Store) -> list[tuple[str, str]]:
    rows = await execute(
        store, "SELECT queue_id, recipient FROM events WHERE type = 'dropped' ORDER BY id"
    )
    return [(str(r[0]), str(r[1])) for r in rows]


async def logged_in(site: Site) -> tuple[Browser, str]:
    browser = site.browser()
    assert await browser.login() == 303
    code, _, page = await browser.request("GET", "/ui/queue")
    assert code == 200, page
    return browser, hidden(page, "csrf")


async def post(browser: Browser, path: str, form: dict[str, str]) -> str:
    """POST, then the page the 303 leads to."""
    code, headers, page = await browser.request("POST", path, form)
    assert code == 303, (code, page)
    code, _, page = await browser.request("GET", headers["location"])
    assert code == 200
    return page


def link(page: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}" href="([^"]*)"', page)
    assert match is not None, element_id
    return html.unescape(match[1])


@pytest_twisted.ensureDeferred
async def test_empty_queue_says_so(site: Site) -> None:
    browser, _ = await logged_in(site)
    code, _, page = await browser.request("GET", "/ui/queue")
    assert code == 200
    assert "The queue is empty: every message was delivered or finished." in page
    assert 'aria-current="page">Queue<' in page


@pytest_twisted.ensureDeferred
async def test_destinations_with_retry_and_drop_all(site: Site) -> None:
    store, clock = site.store, site.clock
    q1 = await queue(store, clock, "a@gmail.com", "b@gmail.com", "c@yahoo.com")
    q2 = await queue(store, clock, "d@gmail.com")
    await defer(store, "a@gmail.com", "451 4.7.1 try later")
    await defer(store, "c@yahoo.com", HOSTILE_REPLY)
    browser, csrf = await logged_in(site)
    code, _, page = await browser.request("GET", "/ui/queue")
    assert 'id="queue-table"' in page
    assert page.index(">gmail.com<") < page.index(">yahoo.com<")  # biggest first
    assert 'href="/ui/queue/gmail.com"' in page
    assert "Drop all 3 recipient(s)" in page and "Drop all 1 recipient(s)" in page
    assert 'class="danger"' in page
    assert "451 4.7.1 try later" in page
    assert "<script>alert" not in page and "451 &lt;script&gt;alert(1)&lt;/script&gt;" in page

    # Without the token (or with a wrong one) nothing happens.
    for token in ("", "x" * len(csrf)):
        for path in ("/ui/queue/retry", "/ui/queue/drop"):
            code, _, _ = await browser.request("POST", path, {"csrf": token, "domain": "gmail.com"})
            assert code == 403
    assert {a: s for a, (s, _, _) in (await recipients(store)).items()} == {
        "a@gmail.com": "deferred",
        "b@gmail.com": "queued",
        "c@yahoo.com": "deferred",
        "d@gmail.com": "queued",
    }

    # Retry now: gmail's waiting recipients are due now, yahoo's untouched.
    clock.advance(10)
    page = await post(browser, "/ui/queue/retry", {"csrf": csrf, "domain": "GMAIL.com"})
    assert "3 recipient(s) to gmail.com are due now." in page
    now_ms = store.now_ms()
    state = await recipients(store)
    assert state["a@gmail.com"][1] == now_ms and state["d@gmail.com"][1] == now_ms
    assert state["c@yahoo.com"][1] == now_ms - 10_000 + 3_600_000

    # Drop all: dropped, with one dropped event each, and the operator named.
    page = await post(browser, "/ui/queue/drop", {"csrf": csrf, "domain": "gmail.com"})
    assert "Dropped 3 recipient(s) to gmail.com." in page
    state = await recipients(store)
    for address in ("a@gmail.com", "b@gmail.com", "d@gmail.com"):
        assert state[address] == ("dropped", None, "dropped by ui:ada"), address
    assert state["c@yahoo.com"][0] == "deferred"
    assert sorted(await dropped_events(store)) == sorted(
        [(q1, "a@gmail.com"), (q1, "b@gmail.com"), (q2, "d@gmail.com")]
    )
    assert ">gmail.com<" not in page and ">yahoo.com<" in page
    page = await post(browser, "/ui/queue/drop", {"csrf": csrf, "domain": "gmail.com"})
    assert "Nothing was waiting for gmail.com" in page
    page = await post(browser, "/ui/queue/retry", {"csrf": csrf, "domain": "gmail.com"})
    assert "Nothing was waiting for gmail.com" in page
    code, _, _ = await browser.request("POST", "/ui/queue/drop", {"csrf": csrf})
    assert code == 400


@pytest_twisted.ensureDeferred
async def test_destination_page_with_retry_and_drop_per_message(site: Site) -> None:
    store, clock = site.store, site.clock
    many = await queue(store, clock, *(f"r{i:03}@example.net" for i in range(PAGE + 3)))
    q_other = await queue(store, clock, "one@example.net", "two@else.example")
    await defer(store, "one@example.net", "452 mailbox full")
    await defer(store, "two@else.example", "452 mailbox full")
    browser, csrf = await logged_in(site)
    code, _, page = await browser.request("GET", "/ui/queue/example.net")
    assert code == 200 and 'id="destination-table"' in page
    assert page.count('class="drop-message"') == PAGE
    assert f'href="/ui/messages/{many}"' in page
    assert "Drop 1 message" in page and "Retry now" in page
    second = link(page, "next-page")
    code, _, page = await browser.request("GET", second)
    assert page.count('class="drop-message"') == 4 and 'id="next-page"' not in page
    assert "452 mailbox full" in page and 'id="first-page"' in page
    code, _, page = await browser.request("GET", "/ui/queue/example.net?after=garbage")
    assert code == 400

    # Per message, without the token: refused.
    for path in ("/ui/queue/message/retry", "/ui/queue/message/drop"):
        code, _, _ = await browser.request(
            "POST", path, {"queue_id": q_other, "domain": "example.net"}
        )
        assert code == 403

    # Retry one message: every waiting recipient of it (both domains) is due now.
    clock.advance(5)
    page = await post(
        browser,
        "/ui/queue/message/retry",
        {"csrf": csrf, "queue_id": q_other, "domain": "example.net"},
    )
    assert f"2 recipient(s) of message {q_other} are due now." in page
    assert 'id="destination-table"' in page  # back on the destination's page
    state = await recipients(store)
    assert state["two@else.example"][1] == store.now_ms()

    # Drop one message: its recipients only, with dropped events and the operator.
    page = await post(
        browser,
        "/ui/queue/message/drop",
        {"csrf": csrf, "queue_id": q_other, "domain": "example.net"},
    )
    assert f"Dropped message {q_other}: 2 recipient(s)." in page
    state = await recipients(store)
    assert state["one@example.net"] == ("dropped", None, "dropped by ui:ada")
    assert state["two@else.example"] == ("dropped", None, "dropped by ui:ada")
    assert state["r000@example.net"][0] == "queued"
    assert sorted(await dropped_events(store)) == [
        (q_other, "one@example.net"),
        (q_other, "two@else.example"),
    ]
    page = await post(
        browser,
        "/ui/queue/message/drop",
        {"csrf": csrf, "queue_id": q_other, "domain": "example.net"},
    )
    assert f"Nothing of message {q_other} was waiting" in page
    page = await post(browser, "/ui/queue/message/retry", {"csrf": csrf, "queue_id": "nope"})
    assert "Nothing of message nope was waiting" in page and 'id="queue-table"' in page


@pytest_twisted.ensureDeferred
async def test_the_cli_still_records_the_operator(store: Store, clock: Clock) -> None:
    q = await queue(store, clock, "a@example.com")
    assert await store.drop_message(q) == ["a@example.com"]
    assert (await recipients(store))["a@example.com"][2] == "dropped by queue drop"


@pytest_twisted.ensureDeferred
async def test_hostile_recipients_senders_and_domains_are_escaped(site: Site) -> None:
    store, clock = site.store, site.clock
    await queue(store, clock, HOSTILE_RECIPIENT, sender="<script>s</script>@x.example")
    await queue(store, clock, HOSTILE_DOMAIN_RECIPIENT)
    await defer(store, HOSTILE_RECIPIENT, HOSTILE_REPLY)
    browser, csrf = await logged_in(site)
    domain = '"><svg/onload=alert(1)>.example'
    code, _, page = await browser.request("GET", "/ui/queue")
    assert "<svg/onload" not in page and "<script>" not in page
    assert "&#34;&gt;&lt;svg/onload=alert(1)&gt;.example" in page
    assert f'href="/ui/queue/{quote(domain, safe="")}"' in page
    code, _, page = await browser.request("GET", "/ui/queue/" + quote(domain, safe=""))
    assert code == 200 and "<svg/onload" not in page
    assert "&#34;&gt;&lt;svg/onload=alert(1)&gt;.example" in page
    code, _, page = await browser.request("GET", "/ui/queue/evil.example")
    assert code == 200
    for raw in ("<img/src", "<script>"):
        assert raw not in page
    assert "&#34;&#39;&gt;&lt;img/src=x/onerror=alert(1)&gt;@evil.example" in page
    assert "&lt;script&gt;s&lt;/script&gt;@x.example" in page
    assert "451 &lt;script&gt;alert(1)&lt;/script&gt;" in page
    # A notice naming a hostile domain is escaped too.
    page = await post(browser, "/ui/queue/retry", {"csrf": csrf, "domain": domain})
    assert (
        "<svg/onload" not in page and "to &#34;&gt;&lt;svg/onload=alert(1)&gt;.example are" in page
    )
