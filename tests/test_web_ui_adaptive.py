"""The queue page's adaptive throttle limits (docs/delivery.md, "Adaptive throttles") over
real HTTP, on both engines: the Throttle column and the Adaptive throttles card, from the
figures of this process and of a delivery process (its ``adaptive`` line)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from twisted.internet.task import Clock

from smartrelay.config import Throttle
from smartrelay.delivery.adaptive import AdaptiveLimits, AimdSettings
from smartrelay.delivery.processes import adaptive_line
from smartrelay.metrics import LimitFigures, RelayMetrics
from smartrelay.storage.store import Store
from smartrelay.web.ui.queue import Queue
from tests.support.webui import Site, ui_site
from tests.test_web_ui_queue import defer, logged_in, queue

GOOGLE = Throttle("*", max_connections=20, max_rate_per_second=100.0, adaptive=True)


@pytest_twisted.async_yield_fixture
async def site(
    tmp_path: Path, store: Store, clock: Clock
) -> AsyncIterator[tuple[Site, RelayMetrics]]:
    metrics = RelayMetrics()
    async with ui_site(
        tmp_path,
        store,
        clock,
        lambda ui: {"queue": Queue(ui)},
        extra={"throttle_limits": metrics.adaptive},
    ) as served:
        yield served, metrics


def row_of(page: str, domain: str) -> str:
    match = re.search(
        r"<tr>\s*<td class=\"mono\"><a href=\"[^\"]*\">" + re.escape(domain) + r"</a>.*?</tr>",
        page,
        re.S,
    )
    assert match is not None, domain
    return match.group(0)


@pytest_twisted.ensureDeferred
async def test_cut_destinations_show_their_limits(site: tuple[Site, RelayMetrics]) -> None:
    served, metrics = site
    store, clock = served.store, served.clock
    await queue(store, clock, "a@gmail.com", "b@googlemail.com", "c@yahoo.com", "d@other.example")
    await defer(store, "a@gmail.com", "421 4.7.0 Try again later")

    # This process cut Google's shared key; a delivery process cut Yahoo's (its adaptive line,
    # with a hostile reply and domain that must be escaped).
    own = AdaptiveLimits(clock, AimdSettings(), lambda f: metrics.adaptive.set("main", f))
    own.signal("mx:.google.com", GOOGLE, "421 4.7.0 Try again later", "gmail.com")
    own.note_domain("mx:.google.com", "googlemail.com")
    child = RelayMetrics()
    child.adaptive.set(
        "main",
        [
            LimitFigures(
                "mx:.yahoodns.net",
                0.5,
                1,
                10.0,
                5,
                True,
                clock.seconds() + 60,
                "421 4.7.0 [TSS04] <script>alert(1)</script>",
                ("yahoo.com", "<img src=x>.example"),
            )
        ],
    )
    line = adaptive_line(child)
    assert metrics.adaptive.update_child(0, json.loads(line.split(" ", 1)[1]))

    browser, _ = await logged_in(served)
    code, _, page = await browser.request("GET", "/ui/queue")
    assert code == 200
    assert "<th>Throttle</th>" in page
    assert "50/s, 10 connections (of 100/s, 20)" in row_of(page, "gmail.com")
    assert "50/s, 10 connections (of 100/s, 20)" in row_of(page, "googlemail.com")
    assert "30/min, 1 connection (of 10/s, 5)" in row_of(page, "yahoo.com")
    assert "as configured" in row_of(page, "other.example")

    card = page[page.index('id="adaptive-throttles"') :]
    assert "mx:.google.com" in card and "mx:.yahoodns.net" in card
    assert ">main<" in card and ">d0<" in card
    assert "gmail.com, googlemail.com" in card
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in card
    assert "<img src=x>" not in page and "&lt;img src=x&gt;.example" in card
    own.stop()


@pytest_twisted.ensureDeferred
async def test_nothing_cut_no_card(site: tuple[Site, RelayMetrics]) -> None:
    served, metrics = site
    await queue(served.store, served.clock, "a@gmail.com")
    recovered = LimitFigures("mx:.google.com", 100.0, 20, 100.0, 20, False, 0.0, "", ("gmail.com",))
    metrics.adaptive.set("main", [recovered])
    browser, _ = await logged_in(served)
    code, _, page = await browser.request("GET", "/ui/queue")
    assert code == 200
    assert 'id="adaptive-throttles"' not in page
    assert "as configured" in row_of(page, "gmail.com")
