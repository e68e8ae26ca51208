"""The feedback page (/ui/feedback) over real HTTP, on both engines: the list with its
diagnostics, the kind/state filters, keyset pages, and "Reprocess" through the relay's
feedback processor (the code path of ``smartrelay-ctl feedback reprocess``)."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from smartrelay.config import Config, InboundConfig, ServerConfig
from smartrelay.events import DeliveredEvent
from smartrelay.feedback.model import ClassifiedRecipient, Complaint, FailedRecipient, Report
from smartrelay.feedback.processor import FeedbackProcessor
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import NewFeedback, NewMessage, Store, insert_events
from smartrelay.tokens import TokenCodec, load_keyring
from smartrelay.web.ui.feedback import PAGE, Feedback
from tests.support.webui import Browser, Site, hidden, ui_site

DOMAIN = "bounces.example.com"
CONFIG = Config(
    server=ServerConfig(hostname="relay.example.com"),
    inbound=InboundConfig(return_path_domain=DOMAIN),
)
HOSTILE = "<script>alert(1)</script>"
HOSTILE_ADDRESS = "\"'><img/src=x/onerror=alert(1)>@evil.example"


class Classifier:
    """The typed report registered for each raw report (the parsers are tested elsewhere)."""

    def __init__(self) -> None:
        self.reports: dict[bytes, Report] = {}

    def __call__(self, raw: bytes) -> Report:
        return self.reports[raw]


def bounce(address: str, diagnostic: str = "smtp; 550 5.1.1 user unknown") -> Report:
    failed = FailedRecipient(address, "failed", "5.1.1", 550, diagnostic)
    return Report(
        "bounce", (ClassifiedRecipient(failed, "invalid-recipient", True),), bounce_source="dsn"
    )


@pytest_twisted.async_yield_fixture
async def served(
    tmp_path: Path, store: Store, clock: Clock
) -> AsyncIterator[tuple[Site, Classifier]]:
    classify = Classifier()
    codec = TokenCodec(load_keyring(str(tmp_path / "feedback.key")))
    processor = FeedbackProcessor(lambda: succeed(store), codec, CONFIG, classify)
    async with ui_site(
        tmp_path,
        store,
        clock,
        lambda ui: {"feedback": Feedback(ui)},
        extra={"feedback_processor": processor},
    ) as site:
        yield site, classify


async def receive(store: Store, raw: bytes) -> str:
    return await store.store_feedback(
        NewFeedback(
            sender="mailer-daemon@mx.example", recipients=(f"postmaster@{DOMAIN}",), raw=raw
        )
    )


async def sent(store: Store, address: str) -> str:
    queued = await store.queue_message(
        NewMessage(
            sender="app@example.com", recipients=(address,), raw=b"Subject: hi\r\n\r\nhi\r\n"
        )
    )

    async def txn(cursor: ICursor) -> None:
        await insert_events(
            cursor,
            store.now_ms(),
            [(queued.queue_id, address, DeliveredEvent("mx.example.net", "250 ok", True, 1))],
        )

    await store.run("delivered", txn)
    return queued.queue_id


async def logged_in(site: Site) -> tuple[Browser, str]:
    browser = site.browser()
    assert await browser.login() == 303
    code, _, page = await browser.request("GET", "/ui/feedback")
    assert code == 200, page
    return browser, hidden(page, "csrf")


def report_row(page: str, report_id: str) -> str:
    match = re.search(rf'<tr id="report-{report_id}">(.*?)</tr>', page, re.S)
    assert match is not None, report_id
    return match[1]


@pytest_twisted.ensureDeferred
async def test_empty_list_says_what_to_do(served: tuple[Site, Classifier]) -> None:
    site, _ = served
    browser, _ = await logged_in(site)
    code, _, page = await browser.request("GET", "/ui/feedback")
    assert "No feedback yet" in page
    code, _, page = await browser.request("GET", "/ui/feedback?kind=bounce")
    assert "No report of this kind or state" in page
    for bad in ("kind=nope", "state=%27%20OR%201%3D1", "after=garbage"):
        code, _, page = await browser.request("GET", "/ui/feedback?" + bad)
        assert code == 400, bad


@pytest_twisted.ensureDeferred
async def test_list_filters_and_diagnostics_then_reprocess_an_unmatched_report(
    served: tuple[Site, Classifier],
) -> None:
    site, classify = served
    store, clock = site.store, site.clock
    queue_id = await sent(store, "known@example.net")
    site_processor = site.ui.extra["feedback_processor"]
    classify.reports[b"dsn known"] = bounce("known@example.net", "smtp; 550 " + HOSTILE)
    matched = await receive(store, b"dsn known")
    await site_processor.process(matched)
    clock.advance(1)
    classify.reports[b"dsn late"] = bounce("late@example.net")
    unmatched = await receive(store, b"dsn late")
    await site_processor.process(unmatched)
    clock.advance(1)
    classify.reports[b"fbl"] = Report("complaint", complaint=Complaint("abuse", "fbl.example"))
    complaint = await receive(store, b"fbl")
    await site_processor.process(complaint)
    clock.advance(1)
    fresh = await receive(store, b"not yet processed")

    browser, csrf = await logged_in(site)
    code, _, page = await browser.request("GET", "/ui/feedback")
    assert 'id="feedback-table"' in page
    order = [page.index(f'id="report-{r}"') for r in (fresh, complaint, unmatched, matched)]
    assert order == sorted(order)  # newest first
    row = report_row(page, matched)
    assert "processed" in row and "verp" not in row and "address" in row
    assert f'href="/ui/messages/{queue_id}"' in row and "known@example.net" in row
    assert "invalid-recipient (hard)" in row and "5.1.1" in row
    assert "smtp; 550 &lt;script&gt;alert(1)&lt;/script&gt;" in row and "<script>" not in page
    row = report_row(page, unmatched)
    assert "unmatched" in row and "no message sent to late@example.net in the last 30 days" in row
    assert 'class="reprocess"' in row and f'name="report_id" value="{unmatched}"' in row
    # Only unmatched reports offer it.
    assert 'class="reprocess"' in report_row(page, complaint)
    assert 'class="reprocess"' not in report_row(page, matched) + report_row(page, fresh)
    assert "unmatched" in report_row(page, complaint)
    assert "new" in report_row(page, fresh)

    # Filters are query arguments (linkable), and both apply.
    code, _, page = await browser.request("GET", "/ui/feedback?kind=bounce")
    assert f"report-{matched}" in page and f"report-{unmatched}" in page
    assert f"report-{complaint}" not in page and f"report-{fresh}" not in page
    code, _, page = await browser.request("GET", "/ui/feedback?kind=bounce&state=unmatched")
    assert f"report-{unmatched}" in page and f"report-{matched}" not in page
    assert '<option value="unmatched" selected>' in page

    # Reprocess without the token: refused; nothing changes.
    for token in ("", "x" * len(csrf)):
        code, _, _ = await browser.request(
            "POST", "/ui/feedback/reprocess", {"csrf": token, "report_id": unmatched}
        )
        assert code == 403
    [summary] = [s for s in await store.list_feedback() if s.report_id == unmatched]
    assert summary.state == "unmatched"

    # The message turns up; reprocessing matches it, as `feedback reprocess ID` would.
    late_id = await sent(store, "late@example.net")
    code, headers, _ = await browser.request(
        "POST",
        "/ui/feedback/reprocess",
        {"csrf": csrf, "report_id": unmatched, "kind": "bounce", "state": "unmatched"},
    )
    assert code == 303
    location = headers["location"]
    assert location.startswith("/ui/feedback?kind=bounce&state=unmatched&notice=")
    code, _, page = await browser.request("GET", location)
    assert f"Report {unmatched} reprocessed: processed (bounced: invalid-recipient (hard)" in page
    assert f"report-{unmatched}" not in page  # no longer unmatched
    [summary] = [s for s in await store.list_feedback() if s.report_id == unmatched]
    assert (summary.state, summary.matched_by, summary.queue_id) == (
        "processed",
        "address",
        late_id,
    )
    assert {s.address for s in await store.list_suppressions()} == {
        "known@example.net",
        "late@example.net",
    }
    code, _, page = await browser.request("GET", "/ui/feedback")
    assert "invalid-recipient (hard)" in report_row(page, unmatched)

    code, headers, _ = await browser.request(
        "POST", "/ui/feedback/reprocess", {"csrf": csrf, "report_id": "Rnosuch"}
    )
    code, _, page = await browser.request("GET", headers["location"])
    assert "There is no feedback report Rnosuch." in page
    code, _, page = await browser.request("POST", "/ui/feedback/reprocess", {"csrf": csrf})
    assert code == 400


@pytest_twisted.ensureDeferred
async def test_keyset_pages(served: tuple[Site, Classifier]) -> None:
    site, _ = served
    ids = []
    for i in range(PAGE + 2):
        site.clock.advance(1)
        ids.append(await receive(site.store, f"report {i}".encode()))
    browser, _ = await logged_in(site)
    _, _, page = await browser.request("GET", "/ui/feedback?state=new")
    assert page.count('<tr id="report-') == PAGE
    match = re.search(r'id="next-page" href="([^"]*)"', page)
    assert match is not None
    nxt = html.unescape(match[1])
    assert "state=new" in nxt
    _, _, page = await browser.request("GET", nxt)
    assert [m for m in re.findall(r'<tr id="report-([^"]+)"', page)] == [ids[1], ids[0]]
    assert 'id="next-page"' not in page and 'id="first-page"' in page


@pytest_twisted.ensureDeferred
async def test_hostile_report_fields_are_escaped(served: tuple[Site, Classifier]) -> None:
    site, classify = served
    store = site.store
    classify.reports[b"hostile"] = bounce(HOSTILE_ADDRESS, HOSTILE)
    report_id = await receive(store, b"hostile")
    await site.ui.extra["feedback_processor"].process(report_id)
    await sent(store, HOSTILE_ADDRESS)
    await site.ui.extra["feedback_processor"].process(report_id, again=True)

    # A reason and source only a forged report would hold.
    async def txn(cursor: ICursor) -> None:
        await cursor.execute(
            "UPDATE feedback_reports SET reason = ?, matched_by = ? WHERE report_id = ?",
            (HOSTILE, "\"'><b>x", report_id),
        )

    await store.run("hostile", txn)
    browser, _ = await logged_in(site)
    _, _, page = await browser.request("GET", "/ui/feedback")
    assert "<script>" not in page and "<img/src" not in page and "<b>x" not in page
    row = report_row(page, report_id)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in row
    assert "&#34;&#39;&gt;&lt;img/src=x/onerror=alert(1)&gt;@evil.example" in row
    assert "&#34;&#39;&gt;&lt;b&gt;x" in row


@pytest_twisted.ensureDeferred
async def test_without_a_processor_reprocess_is_not_offered(
    tmp_path: Path, store: Store, clock: Clock
) -> None:
    async with ui_site(tmp_path, store, clock, lambda ui: {"feedback": Feedback(ui)}) as site:
        await store.store_feedback(NewFeedback(sender="", recipients=("x@y.example",), raw=b"x"))

        async def txn(cursor: ICursor) -> None:
            await cursor.execute("UPDATE feedback_reports SET state = 'unmatched'")

        await store.run("unmatched", txn)
        browser, csrf = await logged_in(site)
        code, _, page = await browser.request("GET", "/ui/feedback")
        assert "unmatched" in page and 'class="reprocess"' not in page
        [summary] = await store.list_feedback()
        code, headers, _ = await browser.request(
            "POST", "/ui/feedback/reprocess", {"csrf": csrf, "report_id": summary.report_id}
        )
        assert code == 303
        _, _, page = await browser.request("GET", headers["location"])
        assert "smartrelay-ctl feedback reprocess" in page
