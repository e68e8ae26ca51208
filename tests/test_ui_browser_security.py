"""The reports UI's defences, checked in a real browser (headless Chromium).

One relay (``twistd -n smartrelay`` on PostgreSQL) and one browser serve the module. Mail
holding markup and script in every field a page shows (subject, From display name,
recipient local part, tags, metadata, link URLs, the next hop's reply texts) is sent through
the relay's SMTP listener with smtplib; old traffic with clicks on such URLs and such a tag
is written before the relay starts (its roll-up counts it at once, for the dashboard). Every
page that shows them must show them as text: no dialog opens, no CSP violation is reported
(the UI has no inline code, so one would mean data became code), no script, event handler or
``javascript:`` link appears in the document.
"""

from __future__ import annotations

import html
import http.server
import smtplib
import threading
from collections.abc import Iterator
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.browser import Chromium, PageProblem, UiRelay, wait_until
from tests.support.old_traffic import HOSTILE_TAG, HOSTILE_URLS
from tests.support.postgres import PostgresServer
from tests.support.relay import HOST
from tests.support.run import query
from tests.support.smtp_peer import PeerLog, scripted_peer

pytestmark = pytest.mark.xdist_group("ui-browser-security")

SCRIPT = "<script>alert(1)</script>"
IMG = "\"'><img src=x onerror=alert(1)>"
SENDER = "app@shop.example"
#: Valid dot-atom local parts (RFC 5322 atext) that would be markup or an attribute break-out.
HOSTILE_LOCAL = "x'/onmouseover='alert`1`'{}|"
RECIPIENT = f"{HOSTILE_LOCAL}@hostile.example"
BOUNCING = "bounce-me@hostile.example"
DEFERRED = "defer-me@hostile.example"
BOUNCE_REPLY = f"5.1.1 {SCRIPT} user unknown"
DEFER_REPLY = f"4.3.0 {IMG} try later"
#: The Diagnostic-Code of a bounce report (DSN) sent to the inbound listener.
FEEDBACK_REPLY = f"552 5.2.2 {SCRIPT} {IMG} mailbox full"
SUBJECT = f"{SCRIPT} {IMG}"
DISPLAY_NAME = f"{IMG} {SCRIPT}"
META = IMG
#: The hostile mail's tag (the old traffic's is HOSTILE_TAG, so its counts stay its own).
MAIL_TAG = IMG
LINKS = (
    "javascript:alert(1)",
    'https://evil.example/"><script>alert(1)</script>',
    "https://evil.example/?q=\"'><img src=x onerror=alert(1)>",
)

#: Every page of the UI (its sections and one message page) and where it must send a visitor
#: without a session.
PAGES = (
    "/ui/",
    "/ui/?period=7d&tag=welcome",
    "/ui/messages",
    "/ui/messages?recipient=a%40example.org",
    "/ui/messages/0123456789abcdef",
    "/ui/queue",
    "/ui/suppressions",
    "/ui/feedback",
    "/ui/deliverability",
)


def next_hop(address: str, attempt: int) -> tuple[int, str] | None:
    if address == BOUNCING:
        return (550, BOUNCE_REPLY)
    if address == DEFERRED:
        return (451, DEFER_REPLY)
    return None


@pytest.fixture(scope="module")
def peer() -> Iterator[tuple[int, PeerLog]]:
    with scripted_peer(next_hop) as found:
        yield found


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_server: PostgresServer,
    peer: tuple[int, PeerLog],
) -> Iterator[UiRelay]:
    home: Path = tmp_path_factory.mktemp("ui-security")
    relay = UiRelay(home, postgres_server.create_database(), peer[0])
    try:
        relay.start(hostile_traffic=True)
        relay.wait_for_rollup()
        yield relay
    finally:
        relay.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    with Chromium.started() as browser:
        yield browser


def hostile_message() -> EmailMessage:
    message = EmailMessage()
    message["From"] = Address(DISPLAY_NAME, addr_spec=SENDER)
    message["To"] = ", ".join((RECIPIENT, BOUNCING, DEFERRED))
    message["Subject"] = SUBJECT
    message["X-SmartRelay-Tag"] = MAIL_TAG
    message["X-SmartRelay-Meta-Note"] = META
    message.set_content("Hello.\n")
    links = "".join(f'<p><a href="{html.escape(link)}">link</a></p>' for link in LINKS)
    message.add_alternative(f"<html><body>{links}</body></html>", subtype="html")
    return message


@pytest.fixture(scope="module")
def hostile_mail(relay: UiRelay) -> str:
    """The hostile message's queue id, once its recipients are delivered, bounced and
    deferred."""
    with smtplib.SMTP(HOST, relay.smtp_port, timeout=30) as client:
        assert client.ehlo()[0] == 250
        refused = client.send_message(hostile_message(), SENDER, [RECIPIENT, BOUNCING, DEFERRED])
        assert refused == {}

    def settled() -> bool:
        states = dict(query(relay.database_url, "SELECT address, state FROM recipients"))
        return (
            states.get(RECIPIENT) == "delivered"
            and states.get(BOUNCING) == "bounced"
            and states.get(DEFERRED) == "deferred"
        )

    wait_until(settled, "the hostile message delivered, bounced and deferred")
    [(queue_id,)] = query(
        relay.database_url, "SELECT queue_id FROM recipients WHERE address = ?", (BOUNCING,)
    )
    return str(queue_id)


def logged_in(chromium: Chromium, relay: UiRelay) -> None:
    chromium.go(relay.url("/ui/"))
    if chromium.path.startswith("/ui/login"):
        chromium.login(relay)
    assert chromium.path == "/ui/", chromium.path


# -- the checks themselves -------------------------------------------------------------------
class _Page(http.server.BaseHTTPRequestHandler):
    """/csp: a page under the UI's CSP with injected markup; /open: the same without a CSP;
    /broken: a page whose script fails."""

    def do_GET(self) -> None:
        body = f"<!DOCTYPE html><title>x</title><p>{SCRIPT}</p><p>{IMG}</p>".encode()
        kind = "text/html; charset=utf-8"
        if self.path == "/broken":
            body = b'<!DOCTYPE html><title>x</title><script src="/broken.js"></script>'
        elif self.path == "/broken.js":
            body, kind = b"undefinedFunction();", "text/javascript"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        if self.path == "/csp":
            self.send_header(
                "Content-Security-Policy",
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:",
            )
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_the_checks_catch_markup_that_became_code(chromium: Chromium) -> None:
    """What every other test relies on: an injection is reported, under the CSP (violations)
    and without it (the alert dialog, the live markup); so is a script error."""
    server = http.server.ThreadingHTTPServer((HOST, 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://{HOST}:{server.server_address[1]}"
        with pytest.raises(PageProblem, match="CSP violation"):
            chromium.go(base + "/csp")
        with pytest.raises(AssertionError, match="markup from data is live"):
            chromium.assert_inert()
        with pytest.raises(PageProblem, match="an alert dialog is open"):
            chromium.driver.get(base + "/open")
            chromium.check()
        with pytest.raises(PageProblem, match="undefinedFunction is not defined"):
            chromium.go(base + "/broken")
    finally:
        server.shutdown()
        server.server_close()
        chromium.console()  # what this test caused is not the next test's


# -- sessions and CSRF -----------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_a_page_without_a_session_shows_the_login(
    chromium: Chromium, relay: UiRelay, page: str, request: pytest.FixtureRequest
) -> None:
    chromium.driver.delete_all_cookies()
    chromium.go(relay.url(page))
    assert chromium.path == "/ui/login?" + "next=" + quote(page, safe=""), chromium.path
    assert chromium.all("#username") and chromium.all("#password")
    assert chromium.all("form.logout") == []
    chromium.shot(request, "login")


def test_after_logging_in_the_login_goes_on_to_the_page_asked_for(
    chromium: Chromium, relay: UiRelay, request: pytest.FixtureRequest
) -> None:
    chromium.driver.delete_all_cookies()
    chromium.go(relay.url("/ui/?period=7d&tag=welcome"))
    chromium.login(relay)
    assert chromium.path == "/ui/?period=7d&tag=welcome", chromium.path
    assert chromium.by_id("tag").get_attribute("value") == "welcome"
    chromium.shot(request, "dashboard-7d")


@pytest.mark.parametrize("token", ["forged", ""])
def test_a_form_with_a_wrong_or_no_csrf_token_is_refused(
    chromium: Chromium, relay: UiRelay, request: pytest.FixtureRequest, token: str
) -> None:
    logged_in(chromium, relay)
    # Selenium's own scripts are not bound by the page's CSP: tamper with the hidden field.
    chromium.driver.execute_script(
        "var f = document.querySelector('form.logout input[name=csrf]');"
        " if (arguments[0]) { f.value = arguments[0]; } else { f.remove(); }",
        token,
    )
    chromium.submit(chromium.css("form.logout button"), allow=[r"status of 403"])
    assert chromium.path == "/ui/logout"
    assert "This form is out of date" in chromium.text("main")
    chromium.shot(request, "refused")
    # The session is still there: the forged logout did nothing.
    chromium.go(relay.url("/ui/"))
    assert chromium.path == "/ui/"


def test_a_suppression_posted_with_a_forged_csrf_token_is_not_added(
    chromium: Chromium, relay: UiRelay, request: pytest.FixtureRequest
) -> None:
    address = "forged-form@example.net"
    logged_in(chromium, relay)
    chromium.go(relay.url("/ui/suppressions"))
    chromium.by_id("add-address").send_keys(address)
    chromium.driver.execute_script(
        "document.querySelector('#suppression-add input[name=csrf]').value = 'forged';"
    )
    chromium.submit(chromium.by_id("suppression-add-button"), allow=[r"status of 403"])
    assert "This form is out of date" in chromium.text("main")
    chromium.shot(request, "refused")
    assert (
        query(relay.database_url, "SELECT 1 FROM suppressions WHERE address = ?", (address,)) == []
    )
    chromium.go(relay.url(f"/ui/suppressions?q={quote(address)}"))
    assert chromium.all("#suppression-table tbody tr") == []


# -- hostile data ---------------------------------------------------------------------------
def assert_shown_as_text(chromium: Chromium, *texts: str) -> None:
    chromium.check()
    chromium.assert_inert()
    shown = chromium.text("main")
    for text in texts:
        assert text in shown, f"{text!r} not shown as text on {chromium.path}"


def test_filters_holding_markup_are_shown_as_text(
    chromium: Chromium, relay: UiRelay, request: pytest.FixtureRequest
) -> None:
    logged_in(chromium, relay)
    hostile = f"{SCRIPT}{IMG}"
    chromium.go(relay.url(f"/ui/?tag={quote(hostile)}&sender_domain={quote(IMG)}"))
    assert_shown_as_text(chromium)
    assert chromium.by_id("tag").get_attribute("value") == hostile
    assert chromium.by_id("sender_domain").get_attribute("value") == IMG
    chromium.shot(request, "dashboard-filters")
    short = '"><i>x</i>'  # a period is at most 10 characters
    chromium.go(relay.url(f"/ui/?period={quote(short)}"), allow=[r"status of 400"])
    assert_shown_as_text(chromium, short)
    assert chromium.all("main i") == []
    chromium.shot(request, "bad-period")


def test_the_dashboard_shows_a_hostile_tag_as_text(
    chromium: Chromium, relay: UiRelay, hostile_mail: str, request: pytest.FixtureRequest
) -> None:
    logged_in(chromium, relay)
    chromium.go(relay.url(f"/ui/?period=24h&tag={quote(HOSTILE_TAG)}"))
    assert_shown_as_text(chromium)
    figures = {
        f.find_element("css selector", ".label").text: f.find_element("css selector", ".value").text
        for f in chromium.all(".figures .figure")
    }
    # tests/support/old_traffic.py: 13 messages with that tag (the hostile mail has another).
    assert figures["Received"] == "13", figures
    chromium.shot(request, "dashboard-hostile-tag")


def test_the_dashboard_shows_hostile_urls_as_text(
    chromium: Chromium, relay: UiRelay, request: pytest.FixtureRequest
) -> None:
    logged_in(chromium, relay)
    chromium.go(relay.url(f"/ui/?period=24h&tag={quote(HOSTILE_TAG)}"))
    assert_shown_as_text(chromium, *HOSTILE_URLS[:2])
    # The top URLs of the old traffic's clicks: as text in the chart and in its table.
    urls = chromium.text("#table-urls")
    for url in HOSTILE_URLS[:2]:
        assert url in urls, urls
    chart = chromium.css("#chart-urls svg").get_attribute("textContent") or ""
    assert "<script>alert(1)</script>" in chart, chart
    chromium.scroll_to("#chart-urls")
    chromium.shot(request, "dashboard-hostile-urls")


def test_the_message_list_shows_hostile_mail_as_text(
    chromium: Chromium, relay: UiRelay, hostile_mail: str, request: pytest.FixtureRequest
) -> None:
    logged_in(chromium, relay)
    # Filters holding markup and quotes reach SQL as parameters: each finds the message.
    for field, value in (("tag", MAIL_TAG), ("recipient", RECIPIENT), ("meta", f"Note={META}")):
        chromium.go(relay.url(f"/ui/messages?{field}={quote(value)}"))
        assert_shown_as_text(chromium, SCRIPT, IMG, MAIL_TAG)
        assert chromium.by_id(field).get_attribute("value") == value
        [row] = chromium.all("#message-results tbody tr")
        assert hostile_mail in row.text and SUBJECT in row.text, row.text
    chromium.shot(request, "messages")


def test_the_message_page_shows_hostile_mail_as_text(
    chromium: Chromium, relay: UiRelay, hostile_mail: str, request: pytest.FixtureRequest
) -> None:
    logged_in(chromium, relay)
    chromium.go(relay.url(f"/ui/messages/{hostile_mail}"))
    chromium.css("#message-headers summary").click()  # the headers, with the From line
    assert_shown_as_text(
        chromium, SUBJECT, MAIL_TAG, META, RECIPIENT, BOUNCE_REPLY, DEFER_REPLY, DISPLAY_NAME
    )
    facts = chromium.text("#message-facts")
    assert f"Note = {META}" in facts, facts
    recipients = chromium.text("#message-recipients")
    assert RECIPIENT in recipients and BOUNCE_REPLY in recipients, recipients
    chromium.shot(request, "message")
    chromium.scroll_to("#message-timeline")
    chromium.shot(request, "message-timeline")


def test_the_queue_shows_hostile_replies_as_text(
    chromium: Chromium, relay: UiRelay, hostile_mail: str, request: pytest.FixtureRequest
) -> None:
    logged_in(chromium, relay)
    chromium.go(relay.url("/ui/queue"))
    assert_shown_as_text(chromium, "hostile.example", DEFER_REPLY)
    chromium.shot(request, "queue")
    chromium.go(relay.url("/ui/queue/hostile.example"))
    assert_shown_as_text(chromium, DEFER_REPLY, DEFERRED, hostile_mail)
    chromium.shot(request, "queue-destination")


def test_suppressions_show_hostile_addresses_and_notes_as_text(
    chromium: Chromium, relay: UiRelay, hostile_mail: str, request: pytest.FixtureRequest
) -> None:
    logged_in(chromium, relay)
    # The hard bounce suppressed its address on its own; add one more with a hostile note.
    address = f"{HOSTILE_LOCAL}@suppressed.example"
    chromium.go(relay.url("/ui/suppressions"))
    chromium.by_id("add-address").send_keys(address)
    chromium.by_id("add-note").send_keys(f"{SCRIPT}{IMG}")
    chromium.submit(chromium.by_id("suppression-add-button"))
    assert_shown_as_text(chromium, address, BOUNCING, f"{SCRIPT}{IMG}")
    chromium.shot(request, "suppressions")
    chromium.go(relay.url(f"/ui/suppressions?q={quote(address)}"))
    assert_shown_as_text(chromium, address)
    [row] = chromium.all("#suppression-table tbody tr")
    assert f"{SCRIPT}{IMG}" in row.text
    assert row.find_element("css selector", "input[name=address]").get_attribute("value") == address


def dsn(return_path: str, recipient: str, queue_id: str) -> bytes:
    """A bounce report (RFC 3464) about ``recipient``'s copy, its diagnostic hostile."""
    return (
        "From: MAILER-DAEMON@mx.hostile.example\r\n"
        f"To: <{return_path}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n'
        "\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
        f"Your message could not be delivered. {SCRIPT}\r\n"
        "\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.hostile.example\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        "Action: failed\r\nStatus: 5.2.2\r\n"
        f"Diagnostic-Code: smtp; {FEEDBACK_REPLY}\r\n"
        "\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"X-SmartRelay-ID: {queue_id}\r\nSubject: x\r\n"
        "\r\n--b--\r\n"
    ).encode()


def test_feedback_shows_hostile_diagnostics_as_text(
    chromium: Chromium,
    relay: UiRelay,
    hostile_mail: str,
    peer: tuple[int, PeerLog],
    request: pytest.FixtureRequest,
) -> None:
    return_path = peer[1].return_path(RECIPIENT)
    assert return_path is not None
    with smtplib.SMTP(HOST, relay.inbound_port, timeout=30) as client:
        assert client.ehlo()[0] == 250
        client.sendmail("", [return_path], dsn(return_path, RECIPIENT, hostile_mail))
    wait_until(
        lambda: query(
            relay.database_url, "SELECT state FROM feedback_reports WHERE state = 'processed'"
        ),
        "the bounce report processed",
    )
    logged_in(chromium, relay)
    chromium.go(relay.url("/ui/feedback"))
    assert_shown_as_text(chromium, RECIPIENT, hostile_mail)
    table = chromium.text("#feedback-table")
    assert FEEDBACK_REPLY.split(" ", 1)[1] in table, table
    chromium.shot(request, "feedback")


def test_the_deliverability_page_is_clean(
    chromium: Chromium, relay: UiRelay, hostile_mail: str, request: pytest.FixtureRequest
) -> None:
    logged_in(chromium, relay)
    chromium.go(relay.url("/ui/deliverability"))
    assert_shown_as_text(chromium, "shop.example")
    chromium.shot(request, "deliverability")
