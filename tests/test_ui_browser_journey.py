"""The reports UI in a real browser (headless Chromium), the way an operator uses it.

One relay (``twistd -n smartrelay`` on SQLite, tests/support/browser.py) and one browser
serve the module. Before the relay starts, traffic of three hours ago is written into its
database (tests/support/old_traffic.py) so that its roll-up counts it at once; the mail the
tests look for is sent through the relay's SMTP listener and delivered to a scripted next hop
(one recipient is deferred). Each test logs in if it needs to, so the tests do not depend on
their order. Screenshots of every page: artifacts/screenshots/.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from tests.support.browser import PASSWORD, USER, Chromium, UiRelay, wait_until
from tests.support.relay import HOST
from tests.support.run import query
from tests.support.smtp_peer import PeerLog, scripted_peer

pytestmark = pytest.mark.xdist_group("ui-browser-journey")

SENDER = "billing@shop.example"
DELIVERED = "ada.lovelace@example.org"
DEFERRED = "grace@slow.example"


def next_hop(address: str, attempt: int) -> tuple[int, str] | None:
    """Defers the first attempt to :data:`DEFERRED`; accepts everything else."""
    if address == DEFERRED and attempt == 1:
        return (451, "4.7.1 greylisted, come back later")
    return None


@pytest.fixture(scope="module")
def peer() -> Iterator[tuple[int, PeerLog]]:
    with scripted_peer(next_hop) as found:
        yield found


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, peer: tuple[int, PeerLog]) -> Iterator[UiRelay]:
    home: Path = tmp_path_factory.mktemp("ui-journey")
    relay = UiRelay(home, f"sqlite:{home / 'relay.db'}", peer[0])
    try:
        relay.start(hostile_traffic=False)
        relay.wait_for_rollup()
        yield relay
    finally:
        relay.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    with Chromium.started() as browser:
        yield browser


def send(relay: UiRelay, recipient: str, subject: str, tag: str) -> str:
    """One message through the relay's SMTP listener; its queue id."""
    message = EmailMessage()
    message["From"] = f"Shop Billing <{SENDER}>"
    message["To"] = recipient
    message["Subject"] = subject
    message["X-SmartRelay-Tag"] = tag
    message["X-SmartRelay-Meta-Order"] = "A-1042"
    message.set_content("Your invoice is attached.\n")
    message.add_alternative(
        '<p>Your invoice: <a href="https://shop.example/invoice/1042">view it</a></p>',
        subtype="html",
    )
    with smtplib.SMTP(HOST, relay.smtp_port, timeout=30) as client:
        assert client.ehlo()[0] == 250
        refused = client.send_message(message, SENDER, [recipient])
        assert refused == {}
    [(queue_id,)] = query(
        relay.database_url, "SELECT queue_id FROM recipients WHERE address = ?", (recipient,)
    )
    return str(queue_id)


@pytest.fixture(scope="module")
def mail(relay: UiRelay, peer: tuple[int, PeerLog]) -> dict[str, str]:
    """A delivered and a deferred message: recipient -> queue id, once both have settled."""
    sent = {
        DELIVERED: send(relay, DELIVERED, "Invoice 1042", "invoice"),
        DEFERRED: send(relay, DEFERRED, "Invoice 1043", "invoice"),
    }

    def settled() -> bool:
        states = dict(query(relay.database_url, "SELECT address, state FROM recipients"))
        return states.get(DELIVERED) == "delivered" and states.get(DEFERRED) == "deferred"

    wait_until(settled, "one message delivered and one deferred")
    return sent


def logged_in(chromium: Chromium, relay: UiRelay) -> None:
    """Log in unless the browser has a session already."""
    chromium.go(relay.url("/ui/"))
    if chromium.path.startswith("/ui/login"):
        chromium.login(relay)
    assert chromium.path == "/ui/", chromium.path


def event_types(chromium: Chromium) -> list[str]:
    """The types of the message page's timeline entries, in order (content warnings aside:
    this relay has no DKIM key, so every message warns about it)."""
    types = [li.get_attribute("data-type") for li in chromium.all("#message-timeline > li")]
    return [str(t) for t in types if t != "warning"]


def test_log_in(chromium: Chromium, relay: UiRelay, request: pytest.FixtureRequest) -> None:
    chromium.driver.delete_all_cookies()
    chromium.go(relay.url("/ui/"))
    assert chromium.path.startswith("/ui/login?"), chromium.path
    chromium.shot(request, "login")
    chromium.by_id("username").send_keys(USER)
    chromium.by_id("password").send_keys("not the password")
    chromium.submit(chromium.css("main form button[type=submit]"), allow=[r"status of 403"])
    assert "Wrong user name or password." in chromium.text(".problem")
    chromium.shot(request, "login-refused")
    chromium.by_id("password").send_keys(PASSWORD)
    chromium.submit(chromium.css("main form button[type=submit]"))
    assert chromium.path == "/ui/"
    assert chromium.text("header .who") == USER
    chromium.shot(request, "dashboard")


def test_the_dashboard_shows_the_counts(
    chromium: Chromium, relay: UiRelay, request: pytest.FixtureRequest
) -> None:
    logged_in(chromium, relay)
    # The old traffic's tag: the mail sent by these tests would be counted a minute later.
    chromium.by_id("tag").send_keys("old-traffic")
    chromium.submit(chromium.css("form.filters button[type=submit]"))
    path, _, args = chromium.path.partition("?")
    assert path == "/ui/" and parse_qs(args)["tag"] == ["old-traffic"], chromium.path
    figures = {
        f.find_element("css selector", ".label").text: f.find_element("css selector", ".value").text
        for f in chromium.all(".figures .figure")
    }
    # tests/support/old_traffic.py: 13 messages, 4 bounced (hard), 9 delivered and clicked.
    assert figures["Received"] == "13", figures
    assert figures["Delivered"] == "9", figures
    assert figures["Hard bounces"] == "4", figures
    assert figures["Clicked (unique)"] == "9", figures
    chromium.shot(request, "dashboard")
    chromium.phone_shot(request, "dashboard")


def test_the_dashboard_shows_charts(
    chromium: Chromium, relay: UiRelay, request: pytest.FixtureRequest
) -> None:
    logged_in(chromium, relay)
    chromium.go(relay.url("/ui/?period=24h&tag=old-traffic"))
    # The charts are server-rendered SVG, drawn at a visible size.
    for chart in ("chart-volume", "chart-bounces", "chart-domains", "chart-urls"):
        svg = chromium.css(f"#{chart} svg")
        assert svg.is_displayed(), chart
        assert svg.size["width"] > 200 and svg.size["height"] > 50, (chart, svg.size)
    domains = chromium.text("#table-domains")
    for domain in ("gmail.example", "yahoo.example", "outlook.example"):
        assert domain in domains
    urls = chromium.text("#table-urls")
    assert "https://shop.example/sale" in urls and "https://shop.example/account" in urls
    chromium.shot(request, "dashboard")
    chromium.scroll_to("#chart-volume")
    chromium.shot(request, "dashboard-charts")
    chromium.phone_shot(request, "dashboard-charts")


def test_search_a_message_and_open_its_timeline(
    chromium: Chromium, relay: UiRelay, mail: dict[str, str], request: pytest.FixtureRequest
) -> None:
    logged_in(chromium, relay)
    chromium.submit(chromium.css("nav a[href='/ui/messages']"))
    chromium.shot(request, "messages")
    chromium.by_id("recipient").send_keys(DELIVERED)
    chromium.submit(chromium.by_id("search-button"))
    path, _, args = chromium.path.partition("?")
    assert path == "/ui/messages" and parse_qs(args)["recipient"] == [DELIVERED]
    rows = chromium.all("#message-results tbody tr")
    assert len(rows) == 1, chromium.text("main")
    assert "Invoice 1042" in rows[0].text and "invoice" in rows[0].text
    chromium.shot(request, "search-results")
    chromium.submit(rows[0].find_element("css selector", "a.qid"))
    queue_id = mail[DELIVERED]
    assert chromium.path == f"/ui/messages/{queue_id}"
    facts = chromium.text("#message-facts")
    assert SENDER in facts and "Invoice 1042" in facts and "A-1042" in facts
    assert "delivered" in chromium.text("#message-recipients")
    timeline = event_types(chromium)
    assert timeline == ["received", "delivered"], timeline
    assert "250 2.0.0 Ok: accepted" in chromium.text("#message-timeline")
    chromium.shot(request, "message")
    chromium.phone_shot(request, "message")
    chromium.scroll_to("#message-timeline")
    chromium.shot(request, "message-timeline")


def test_add_and_remove_a_suppression(
    chromium: Chromium, relay: UiRelay, request: pytest.FixtureRequest
) -> None:
    address = "no-more-mail@example.net"
    logged_in(chromium, relay)
    chromium.go(relay.url("/ui/suppressions"))
    chromium.shot(request, "suppressions")
    chromium.by_id("add-address").send_keys(address)
    chromium.by_id("add-note").send_keys("asked by phone")
    chromium.submit(chromium.by_id("suppression-add-button"))
    assert address in chromium.text("#notice")
    row = next(r for r in chromium.all("#suppression-table tbody tr") if address in r.text)
    assert "manual" in row.text and "asked by phone" in row.text
    # In the relay's database (written by the relay's process).
    assert query(
        relay.database_url,
        "SELECT reason, expires_at, note FROM suppressions WHERE address = ?",
        (address,),
    ) == [("manual", None, "asked by phone")]
    chromium.shot(request, "suppression-added")

    chromium.by_id("q").send_keys(address)
    chromium.submit(chromium.by_id("suppression-search-button"))
    [row] = chromium.all("#suppression-table tbody tr")
    chromium.submit(row.find_element("css selector", "form.remove button"))
    assert address in chromium.text("#notice")
    assert not any(address in r.text for r in chromium.all("#suppression-table tbody tr"))
    assert query(relay.database_url, "SELECT address FROM suppressions") == []
    chromium.shot(request, "suppression-removed")


def test_retry_a_deferred_message(
    chromium: Chromium,
    relay: UiRelay,
    mail: dict[str, str],
    peer: tuple[int, PeerLog],
    request: pytest.FixtureRequest,
) -> None:
    queue_id = mail[DEFERRED]
    logged_in(chromium, relay)
    chromium.go(relay.url("/ui/queue"))
    [row] = [r for r in chromium.all("#queue-table tbody tr") if "slow.example" in r.text]
    assert "greylisted, come back later" in row.text
    chromium.shot(request, "queue")
    chromium.submit(row.find_element("css selector", "a"))
    assert chromium.path == "/ui/queue/slow.example"
    [row] = chromium.all("#destination-table tbody tr")
    assert queue_id in row.text and DEFERRED in row.text and "deferred" in row.text
    chromium.shot(request, "queue-destination")
    chromium.submit(row.find_element("css selector", "form.retry-message button"))
    assert "1" in chromium.text("#notice")
    chromium.shot(request, "queue-retried")
    # The relay delivers it now (the next hop takes the second attempt).
    wait_until(lambda: DEFERRED in peer[1].delivered_to(), "the retried message at the next hop")
    chromium.go(relay.url(f"/ui/messages/{queue_id}"))
    chromium.wait(
        lambda d: "delivered" in chromium.text("#message-recipients"), "the delivered state"
    )
    timeline = event_types(chromium)
    assert timeline == ["received", "deferred", "delivered"], timeline
    chromium.shot(request, "message-retried")


def test_log_out(chromium: Chromium, relay: UiRelay, request: pytest.FixtureRequest) -> None:
    logged_in(chromium, relay)
    chromium.logout()
    assert chromium.path == "/ui/login"
    chromium.shot(request, "logged-out")
    # Back to the dashboard: the session is over. Chromium may show the old page from its
    # back-forward cache without asking the server (it does so for no-store pages in some
    # runs), so what counts is the next request: a reload lands on the login page.
    chromium.driver.back()
    chromium.loaded()
    chromium.check()
    chromium.driver.refresh()
    chromium.loaded()
    chromium.check()
    assert chromium.path.startswith("/ui/login"), chromium.path
    assert chromium.all("form.logout") == []
    chromium.shot(request, "back-after-logout")
