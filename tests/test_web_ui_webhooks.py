"""The queue page's "Webhooks" card (/ui/queue) over real HTTP, on both engines: each
endpoint's status, Enable / Disable, dead letters with Replay each, per endpoint and all; CSRF
refused; hostile urls and errors escaped. The dispatcher's rows are written by SQL (schema 012)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from twisted.internet.task import Clock

from smartrelay.config import parse_config
from smartrelay.events import DeliveredEvent
from smartrelay.storage.store import START, Store
from smartrelay.web.ui.queue import Queue
from tests.support.webhook_rows import add_events, dead_letter, endpoint, execute
from tests.support.webui import Browser, Site, hidden, ui_site

A = "https://a.example/hook"
HOSTILE = 'https://evil.example/"><script>alert(1)</script>'
GONE = "https://gone.example/hook"
NEW = "https://new.example/hook"


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path, store: Store, clock: Clock) -> AsyncIterator[Site]:
    config = parse_config(
        {
            "webhooks": [
                {"url": A, "secret": "one", "events": ["delivered"]},
                {"url": HOSTILE, "secret": "two"},
                {"url": NEW, "secret": "three"},
            ]
        }
    )
    async with ui_site(
        tmp_path, store, clock, lambda ui: {"queue": Queue(ui)}, extra={"config": config}
    ) as served:
        yield served


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


def notice(page: str) -> str:
    match = re.search(r'<div id="notice"[^>]*>\s*<p>(.*?)</p>', page, re.S)
    assert match is not None, "no notice"
    return match[1]


def rows(page: str, css: str) -> list[str]:
    return re.findall(rf'<tr class="{css}">(.*?)</tr>', page, re.S)


async def state(store: Store, url: str) -> tuple[object, ...]:
    [row] = await execute(
        store,
        "SELECT state, disabled_reason, failing_since, attempts, next_attempt_at"
        " FROM webhook_endpoints WHERE url = ?",
        (url,),
    )
    return row


async def requested(store: Store) -> dict[int, bool]:
    found = await execute(store, "SELECT id, replay_requested_at FROM webhook_dead_letters")
    return {int(r[0]): r[1] is not None for r in found}


@pytest_twisted.ensureDeferred
async def test_no_webhooks_no_card(tmp_path: Path, store: Store, clock: Clock) -> None:
    async with ui_site(tmp_path, store, clock, lambda ui: {"queue": Queue(ui)}) as served:
        browser, _ = await logged_in(served)
        code, _, page = await browser.request("GET", "/ui/queue")
        assert code == 200 and 'id="webhooks"' not in page


@pytest_twisted.ensureDeferred
async def test_status_enable_disable(site: Site) -> None:
    store, clock = site.store, site.clock
    await add_events(store, 3, DeliveredEvent("mx", "250", True, 1), clock.seconds())
    await endpoint(
        store,
        A,
        START,
        failing_since=store.now_ms() - 600_000,
        attempts=5,
        next_attempt_at=store.now_ms() + 60_000,
        last_error="HTTP 500 <img src=x onerror=alert(2)>",
        failures=5,
        last_success_at=store.now_ms() - 3_600_000,
    )
    await endpoint(store, GONE, START, state="disabled", disabled_at=store.now_ms(),
                   disabled_reason="HTTP 410 <b>gone</b>")  # fmt: skip
    await dead_letter(store, A, 30)
    browser, csrf = await logged_in(site)
    code, _, page = await browser.request("GET", "/ui/queue")
    assert code == 200 and 'id="webhooks-table"' in page
    endpoints = rows(page, "webhook")
    assert len(endpoints) == 4  # sorted by url: A, evil, gone, new
    a, evil, gone, new = endpoints
    assert A in a and "failing" in a and "5 attempt(s)" in a
    assert '<td class="num">3</td>' in a  # backlog: its types after its position
    assert "1 <span" in a and "(30 events)" in a
    assert "HTTP 500 &lt;img src=x onerror=alert(2)&gt;" in a and "<img" not in page
    assert "Replay its 1 dead letter(s)" in a and 'class="disable-webhook"' in a
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in evil and "<script>alert" not in page
    assert ">new<" in evil and "not sent to yet" in evil
    assert "not in the config" in gone and ">disabled<" in gone
    assert "HTTP 410 &lt;b&gt;gone&lt;/b&gt;" in gone and 'class="enable-webhook"' in gone
    assert NEW in new and "not in the config" not in new

    # Without the token (or with a wrong one) nothing changes.
    for token in ("", "x" * len(csrf)):
        for path in ("/ui/queue/webhooks/enable", "/ui/queue/webhooks/disable"):
            code, _, _ = await browser.request("POST", path, {"csrf": token, "url": GONE})
            assert code == 403
    assert (await state(store, GONE))[0] == "disabled"
    assert (await state(store, A))[0] == "active"

    page = await post(
        browser,
        "/ui/queue/webhooks/disable",
        {"csrf": csrf, "url": A, "reason": "receiver <migrating>"},
    )
    assert (
        notice(page) == f"Webhook endpoint {A} disabled: its events wait until it is enabled again."
    )
    assert (await state(store, A))[:2] == ("disabled", "by ui:ada: receiver <migrating>")
    assert "by ui:ada: receiver &lt;migrating&gt;" in rows(page, "webhook")[0]

    page = await post(browser, "/ui/queue/webhooks/enable", {"csrf": csrf, "url": A})
    assert notice(page) == f"Webhook endpoint {A} enabled: the relay sends to it again at once."
    assert await state(store, A) == ("active", None, None, 0, None)  # tried at once

    # A hostile url in the notice is escaped; a configured endpoint not sent to yet gets its row.
    page = await post(browser, "/ui/queue/webhooks/disable", {"csrf": csrf, "url": HOSTILE})
    assert "<script>alert" not in page
    assert "Webhook endpoint https://evil.example/&#34;&gt;&lt;script&gt;" in notice(page)
    assert (await state(store, HOSTILE))[:2] == ("disabled", "by ui:ada")

    page = await post(browser, "/ui/queue/webhooks/enable", {"csrf": csrf, "url": "https://x/"})
    assert "There is no webhook endpoint https://x/" in notice(page)
    assert 'class="notice problem-notice"' in page
    code, _, _ = await browser.request("POST", "/ui/queue/webhooks/enable", {"csrf": csrf})
    assert code == 400
    code, _, _ = await browser.request(
        "POST", "/ui/queue/webhooks/enable", {"csrf": csrf, "url": "x" * 3000}
    )
    assert code == 400


@pytest_twisted.ensureDeferred
async def test_dead_letters_replay(site: Site) -> None:
    store = site.store
    await endpoint(store, A, START)
    first = await dead_letter(store, A, 30, "HTTP 502 <script>bad()</script>")
    second = await dead_letter(store, A, 4)
    third = await dead_letter(store, HOSTILE, 9)
    browser, csrf = await logged_in(site)
    code, _, page = await browser.request("GET", "/ui/queue")
    dead = rows(page, "dead-letter")
    assert len(dead) == 3 and f'<td class="num">{first}</td>' in dead[0]
    assert "HTTP 502 &lt;script&gt;bad()&lt;/script&gt;" in dead[0] and "<script>bad" not in page
    assert all('class="replay-dead-letter"' in row for row in dead)
    assert "Replay all 3 dead letter(s)" in page

    for form in ({"id": str(first)}, {"all": "1"}, {"all": "1", "url": A}):
        for token in ("", "x" * len(csrf)):
            code, _, _ = await browser.request(
                "POST", "/ui/queue/webhooks/replay", {"csrf": token, **form}
            )
            assert code == 403
    # The right token from another origin (a cross-site form): refused too.
    code, _, _ = await browser.request(
        "POST",
        "/ui/queue/webhooks/replay",
        {"csrf": csrf, "all": "1"},
        Origin="https://evil.example",
    )
    assert code == 403
    assert await requested(store) == {first: False, second: False, third: False}

    page = await post(browser, "/ui/queue/webhooks/replay", {"csrf": csrf, "id": str(first)})
    assert notice(page) == (
        f"Dead letter {first} is queued for replay: the relay sends it shortly."
    )
    assert await requested(store) == {first: True, second: False, third: False}
    dead = rows(page, "dead-letter")
    assert "replay-dead-letter" not in dead[0] and "asked" in dead[0]

    page = await post(
        browser, "/ui/queue/webhooks/replay", {"csrf": csrf, "all": "1", "url": HOSTILE}
    )
    assert notice(page).startswith("1 dead letter(s) are queued for replay")
    assert await requested(store) == {first: True, second: False, third: True}
    page = await post(browser, "/ui/queue/webhooks/replay", {"csrf": csrf, "all": "1"})
    assert notice(page).startswith("3 dead letter(s) are queued for replay")
    assert await requested(store) == {first: True, second: True, third: True}

    # Gone meanwhile (the dispatcher sent it), or nothing left: said so.
    await execute(store, "DELETE FROM webhook_dead_letters")
    page = await post(browser, "/ui/queue/webhooks/replay", {"csrf": csrf, "id": str(second)})
    assert notice(page) == (
        f"There is no dead letter {second}: it was replayed or removed meanwhile."
    )
    page = await post(browser, "/ui/queue/webhooks/replay", {"csrf": csrf, "all": "1"})
    assert notice(page) == "There was no dead letter to replay."
    assert 'id="dead-letters-table"' not in page
    for form in ({}, {"id": "abc"}, {"id": "0"}, {"id": str(2**63)}, {"all": "yes"}):
        code, _, _ = await browser.request(
            "POST", "/ui/queue/webhooks/replay", {"csrf": csrf, **form}
        )
        assert code == 400, form
