"""The deliverability page (/ui/deliverability) over real HTTP, with a real DNS server."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.names import client

from smartrelay.config import DkimKey
from smartrelay.deliverability import DeliverabilitySettings, DnsChecker, domain_plan
from smartrelay.events import WarningEvent
from smartrelay.rewrap.dkim import generate_key, load_key
from smartrelay.storage.store import NewMessage, Store
from smartrelay.web.ui.context import UiContext
from smartrelay.web.ui.deliverability import Deliverability
from tests.conftest import real_reactor
from tests.support.dnsserver import MX, TXT, A, StartDns, dns_server
from tests.support.webui import ui_site

__all__ = ["dns_server"]  # the fixture, used here

HOSTNAME = "relay.example.net"
HOSTILE = "x.example\"'><img src=x onerror=alert(1)>"


@pytest.fixture
def settings(tmp_path: Path) -> DeliverabilitySettings:
    path, _ = generate_key("example.com", "s1", "rsa", str(tmp_path / "dkim"))
    key = load_key(DkimKey("example.com", "s1", path, "rsa-sha256"))
    return DeliverabilitySettings(HOSTNAME, "bounces.example.com", (key,))


async def traffic(store: Store, clock: Clock) -> None:
    """Mail from three domains (one of them hostile), warnings for two messages, rolled up."""
    for sender, count in (("a@example.com", 3), ("b@other.example", 1), (f"c@{HOSTILE}", 1)):
        for _ in range(count):
            queued = await store.queue_message(NewMessage(sender, ("r@y.example",), b"\r\nx"))
            if sender.startswith("b@"):
                event = WarningEvent(({"kind": "no-dkim-key", "detail": "d"},))
                await store.record_warnings(queued.queue_id, event)
    clock.advance(120)
    await store.roll_up(clock.seconds(), 1000)


def text_of(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


@pytest_twisted.ensureDeferred
async def test_the_page_lists_domains_and_checks_one_in_dns(
    tmp_path: Path,
    store: Store,
    clock: Clock,
    settings: DeliverabilitySettings,
    dns_server: StartDns,
) -> None:
    plan = domain_plan("example.com", settings)
    dkim = next(r for r in plan.records if r.purpose == "dkim")
    port = dns_server(
        {
            "example.com": {
                "bounces.example.com": [TXT("v=spf1 a:relay.example.net -all"), MX(HOSTNAME)],
                dkim.name: [TXT(dkim.value[:255], dkim.value[255:])],
            },
            "example.net": {HOSTNAME: [A("192.0.2.25")]},
        }
    )
    make: Any = client.Resolver
    checker = DnsChecker(
        make(servers=[("127.0.0.1", port)], reactor=real_reactor()), real_reactor()
    )

    def sections(ui: UiContext) -> dict[str, Any]:
        return {"deliverability": Deliverability(ui, settings, checker)}

    async with ui_site(tmp_path, store, clock, sections) as site:
        browser = site.browser()
        code, headers, _ = await browser.request("GET", "/ui/deliverability")
        assert code == 303 and headers["location"].startswith("/ui/login")  # no session
        assert await browser.login() == 303

        code, _, empty = await browser.request("GET", "/ui/deliverability")
        assert code == 200 and "No mail was received in the last 30 days" in empty

        await traffic(store, clock)
        code, _, page = await browser.request("GET", "/ui/deliverability")
        assert code == 200
        shown = text_of(page)
        assert re.search(r"example\.com\s+3\s+strict\s+aligned", shown)
        assert re.search(r"other\.example\s+1\s+not signed\s+not aligned", shown)
        assert re.search(r"no-dkim-key\s+1\s+From domain", shown)
        # A hostile sender domain is shown as text, never as markup.
        assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
        assert 'href="/ui/deliverability?domain=example.com#records"' in page

        code, _, page = await browser.request("GET", "/ui/deliverability?domain=Example.COM")
        assert code == 200
        shown = text_of(page)
        assert "aligned (strict)" in shown and "d=example.com s=s1" in shown
        [records] = re.findall(r'<section class="card" id="records">.*?</section>', page, re.S)
        rows = {
            m[1]: m[2]
            for m in re.finditer(
                r"<tr>\s*<td><code>([^<]+)</code>.*?badge [a-z]+\">([^<]+)<", records, re.S
            )
        }
        assert rows == {
            "bounces.example.com": "published",  # SPF (the first row of the name) and MX
            "example.com": "not published",  # SPF of the From domain
            "s1._domainkey.example.com": "published",
            "_dmarc.example.com": "not published",
        }
        # The zone lines, ready to copy, the DKIM value in strings of 255 characters.
        zone_lines = [html.unescape(z) for z in re.findall(r"<pre>(.*?)</pre>", records, re.S)]
        assert dkim.zone_line in zone_lines and dkim.zone_line.count('" "') == 1
        assert "bounces.example.com. IN MX 10 relay.example.net." in zone_lines

        code, _, page = await browser.request("GET", "/ui/deliverability?domain=%3Cscript%3E")
        assert code == 400 and "<script>" not in page and "not a domain name" in page
