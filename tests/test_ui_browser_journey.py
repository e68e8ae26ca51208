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


def test_log_out(chromium: Chromium, relay: UiRelay, request: pytest.FixtureRequest) -> None:
    logged_in(chromium, relay)
    chromium.logout()
    assert chromium.path == "/ui/login"
    chromium.shot(request, "logged-out")
    # Back to the dashboard: its page is not cached (no-store) and the session is over.
    chromium.driver.back()
    chromium.loaded()
    chromium.check()
    assert chromium.path.startswith("/ui/login"), chromium.path
    chromium.driver.refresh()
    chromium.loaded()
    chromium.check()
    assert chromium.path.startswith("/ui/login"), chromium.path
    assert chromium.all("form.logout") == []
    chromium.shot(request, "back-after-logout")
