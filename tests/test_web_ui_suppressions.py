"""The suppressions page (/ui/suppressions) over real HTTP, its store methods, and the web
listener's request-body bound, on both engines."""

from __future__ import annotations

import contextlib
import csv
import io
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, TaskDone, TaskStopped, cooperate
from twisted.internet.threads import deferToThreadPool
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from smartrelay.storage.store import NewSuppression, Store
from smartrelay.suppression_csv import (
    SuppressionFileError,
    parse_suppression_csv,
)
from smartrelay.timefmt import rfc3339
from smartrelay.web.service import MAX_REQUEST_BODY
from smartrelay.web.ui.suppressions import MAX_IMPORT, PAGE, Suppressions
from tests.conftest import real_reactor
from tests.support.webui import Browser, Site, hidden, ui_site

HOSTILE_NOTE = "<script>alert(1)</script>"
HOSTILE_ADDRESS = "\"'><img/src=x/onerror=alert(1)>@evil.example"


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path, store: Store, clock: Clock) -> AsyncIterator[Site]:
    """The page, parsing imports in the real reactor's thread pool (as the relay does)."""
    reactor = real_reactor()

    def in_thread(work: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    async with ui_site(
        tmp_path,
        store,
        clock,
        lambda ui: {"suppressions": Suppressions(ui)},
        extra={"in_thread": in_thread},
    ) as served:
        yield served


async def logged_in(site: Site) -> tuple[Browser, str]:
    browser = site.browser()
    assert await browser.login() == 303
    code, _, page = await browser.request("GET", "/ui/suppressions")
    assert code == 200, page
    return browser, hidden(page, "csrf")


async def follow(browser: Browser, code: int, headers: dict[str, str]) -> str:
    """The page a 303 leads to (the list with its notice)."""
    assert code == 303, (code, headers)
    location = headers["location"]
    assert location.startswith("/ui/suppressions?notice=")
    code, _, page = await browser.request("GET", location)
    assert code == 200
    return page


async def listed(store: Store) -> dict[str, tuple[str, float | None, str]]:
    return {
        e.address: (e.reason, e.expires_at, e.note)
        for e in await store.list_suppressions(include_expired=True)
    }


@implementer(IBodyProducer)
class Chunks:
    """``total`` bytes of ``fill`` in 64 KiB writes, produced lazily (never all in memory)."""

    def __init__(self, head: bytes, total: int, tail: bytes, known_length: bool) -> None:
        self.head, self.total, self.tail = head, total, tail
        self.length = len(head) + total + len(tail) if known_length else UNKNOWN_LENGTH

    def startProducing(self, consumer: Any) -> Deferred[None]:
        def chunks() -> Any:
            consumer.write(self.head)
            left = self.total
            while left > 0:
                size = min(65536, left)
                consumer.write(b"x" * size)
                left -= size
                yield None
            consumer.write(self.tail)

        self.task = cooperate(chunks())
        done: Deferred[None] = self.task.whenDone().addCallback(lambda _: None)
        return done.addErrback(lambda f: f.trap(TaskStopped))

    def pauseProducing(self) -> None:
        self.task.pause()

    def resumeProducing(self) -> None:
        self.task.resume()

    def stopProducing(self) -> None:
        with contextlib.suppress(TaskDone, TaskStopped):
            self.task.stop()


BOUNDARY = "----smartrelay-test-boundary"


def multipart(csrf: str, content: bytes, filename: str = "list.csv") -> tuple[bytes, bytes]:
    """(head, tail) of a multipart/form-data body around a file's ``content``."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{csrf}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file";'
        f' filename="{filename}"\r\nContent-Type: text/csv\r\n\r\n'
    ).encode()
    return head + content, f"\r\n--{BOUNDARY}--\r\n".encode()


async def upload(
    browser: Browser, body: bytes | IBodyProducer, path: str = "/ui/suppressions/import"
) -> tuple[int, dict[str, str], str]:
    reactor = real_reactor()
    pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
    agent = Agent(reactor, pool=pool)  # type: ignore[no-untyped-call]
    response = await treq.request(
        "POST",
        browser.base + path,
        agent=agent,
        allow_redirects=False,
        headers={  # type: ignore[arg-type]
            "Cookie": "; ".join(f"{k}={v}" for k, v in browser.cookies.items()),
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        },
        data=body,
    )
    text = (await response.content()).decode("utf-8")
    found = {k.decode().lower(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()}
    return response.code, found, text


async def import_file(browser: Browser, csrf: str, content: bytes) -> tuple[int, dict[str, str]]:
    head, tail = multipart(csrf, content)
    code, headers, _ = await upload(browser, head + tail)
    return code, headers


async def export(browser: Browser, query: str = "") -> tuple[dict[str, str], str]:
    code, headers, body = await browser.request("GET", "/ui/suppressions/export" + query)
    assert code == 200, body
    return headers, body


# -- the store ---------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_search_suppressions_by_address_domain_reason_in_keyset_pages(
    store: Store, clock: Clock
) -> None:
    clock.advance(1_800_000_000)
    await store.add_suppressions(
        [NewSuppression(f"user{i:02}@Example.com", "manual") for i in range(7)]
        + [
            NewSuppression("a@other.example", "hard_bounce"),
            NewSuppression("b@sub.example.com", "complaint"),
            NewSuppression("c_d%@ex_ample.com", "manual"),
            NewSuppression("old@example.com", "soft_bounce", expires_at=clock.seconds() - 1),
        ]
    )
    seen: list[str] = []
    after = None
    while True:
        page = await store.search_suppressions(domain="@EXAMPLE.com", after=after, limit=3)
        assert len(page.rows) <= 3
        seen += [e.address for e in page.rows]
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == [f"user{i:02}@example.com" for i in range(7)]  # not sub.example.com
    expired = await store.search_suppressions(domain="example.com", include_expired=True)
    assert expired.rows[0].address == "old@example.com"
    one = await store.search_suppressions(address="USER03@example.com")
    assert [e.address for e in one.rows] == ["user03@example.com"]
    bounces = await store.search_suppressions(reason="hard_bounce")
    assert [e.address for e in bounces.rows] == ["a@other.example"]
    # LIKE's wildcards in a domain are literal.
    assert [e.address for e in (await store.search_suppressions(domain="ex_ample.com")).rows] == [
        "c_d%@ex_ample.com"
    ]
    assert (await store.search_suppressions(domain="e%")).rows == ()
    assert (await store.search_suppressions(domain="exXample.com")).rows == ()
    assert (await store.search_suppressions(address="' OR 1=1 --")).rows == ()
    with pytest.raises(ValueError):
        await store.search_suppressions(limit=0)


@pytest_twisted.ensureDeferred
async def test_import_suppressions_counts_added_and_updated(store: Store, clock: Clock) -> None:
    clock.advance(1_800_000_000)
    await store.add_suppression("kept@example.com", "manual", None, "old")
    counts = await store.import_suppressions(
        [
            NewSuppression("new@example.com", "complaint"),
            NewSuppression("KEPT@example.com", "hard_bounce", None, "first"),
            NewSuppression("kept@example.com", "unsubscribe", None, "last wins"),
        ]
    )
    assert (counts.added, counts.updated) == (1, 1)
    assert await listed(store) == {
        "new@example.com": ("complaint", None, ""),
        "kept@example.com": ("unsubscribe", None, "last wins"),
    }
    with pytest.raises(ValueError):
        await store.import_suppressions([NewSuppression("x@example.com", "nope")])
    many = [NewSuppression(f"u{i}@bulk.example", "manual") for i in range(1200)]
    counts = await store.import_suppressions(many)
    assert (counts.added, counts.updated) == (1200, 0)


def test_the_csv_parser_keeps_good_rows_and_names_bad_lines() -> None:
    text = (
        "address,reason,expires_at,note\n"
        "good@example.com,complaint,,fine\n"
        "not an address,manual,,\n"
        "\n"
        "x@example.com,no_such_reason,,\n"
        "y@example.com,manual,yesterday,\n"
        "a@example.com,manual,,,too many\n"
        "z@example.com,,2030-01-01T00:00:00Z,\n"
    )
    parsed = parse_suppression_csv(io.StringIO(text, newline=""))
    assert [e.address for e in parsed.entries] == ["good@example.com", "z@example.com"]
    assert [(b.line, b.reason.split(":")[0]) for b in parsed.bad_lines] == [
        (3, "not an email address"),
        (
            5,
            "unknown reason 'no_such_reason' (one of hard_bounce, soft_bounce, complaint, "
            "unsubscribe, manual)",
        ),
        (6, "expires_at"),
        (7, "5 fields, expected 4"),
    ]
    with pytest.raises(SuppressionFileError, match="line 1: unknown column"):
        parse_suppression_csv(io.StringIO("address,colour\n"))
    with pytest.raises(SuppressionFileError, match="line 2: not CSV"):
        parse_suppression_csv(io.StringIO("a@b.example\n" + "x" * 200_000 + "\n"))
    parsed = parse_suppression_csv(io.StringIO("a\x00b@b.example\nc@d.example,\x00\n"))
    assert parsed.entries == () and len(parsed.bad_lines) == 2


# -- the page ----------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_add_search_and_remove_with_notices(site: Site) -> None:
    browser, csrf = await logged_in(site)
    code, _, page = await browser.request("GET", "/ui/suppressions")
    assert "The suppression list is empty" in page and 'id="suppression-add"' in page

    code, headers, _ = await browser.request(
        "POST",
        "/ui/suppressions/add",
        {"csrf": csrf, "address": " Someone@Example.com ", "note": "asked by phone"},
    )
    page = await follow(browser, code, headers)
    assert "someone@example.com is suppressed (manual)." in page
    code, headers, _ = await browser.request(
        "POST",
        "/ui/suppressions/add",
        {"csrf": csrf, "address": "t@example.org", "reason": "complaint", "expires": "30d"},
    )
    await follow(browser, code, headers)
    assert await listed(site.store) == {
        "someone@example.com": ("manual", None, "asked by phone"),
        "t@example.org": ("complaint", site.clock.seconds() + 30 * 86400, ""),
    }
    for form, text in (
        (
            {"address": "not an address"},
            "Not added: not an email address: &#39;not an address&#39;.",
        ),
        ({"address": "a@b.example", "expires": "soon"}, "Not added: expiry: invalid duration"),
        ({"address": "a@b.example", "expires": "999999999d"}, "at most 100 years"),
        ({"address": "a@b.example", "reason": "whim"}, "Not added: unknown reason."),
    ):
        code, headers, _ = await browser.request(
            "POST", "/ui/suppressions/add", {"csrf": csrf, **form}
        )
        page = await follow(browser, code, headers)
        assert text in page and "problem-notice" in page, form
    assert len(await listed(site.store)) == 2

    # Search: exact address, @domain, reason; filters are in the links.
    code, _, page = await browser.request("GET", "/ui/suppressions?q=SOMEONE@example.com")
    assert "someone@example.com" in page and "t@example.org" not in page
    code, _, page = await browser.request("GET", "/ui/suppressions?q=@example.org")
    assert "t@example.org" in page and "someone@example.com" not in page
    code, _, page = await browser.request("GET", "/ui/suppressions?reason=complaint")
    assert "t@example.org" in page and "someone@example.com" not in page
    assert 'href="/ui/suppressions/export?reason=complaint"' in page
    code, _, page = await browser.request("GET", "/ui/suppressions?q=@nowhere.example")
    assert "No entry matches this search" in page
    code, _, page = await browser.request("GET", "/ui/suppressions?reason=whim")
    assert code == 400

    # Remove per row.
    code, headers, _ = await browser.request(
        "POST", "/ui/suppressions/remove", {"csrf": csrf, "address": "someone@example.com"}
    )
    page = await follow(browser, code, headers)
    assert "someone@example.com was removed from the suppression list." in page
    code, headers, _ = await browser.request(
        "POST", "/ui/suppressions/remove", {"csrf": csrf, "address": "someone@example.com"}
    )
    page = await follow(browser, code, headers)
    assert "someone@example.com was not on the suppression list." in page
    assert set(await listed(site.store)) == {"t@example.org"}


@pytest_twisted.ensureDeferred
async def test_every_action_needs_the_csrf_token(site: Site) -> None:
    browser, csrf = await logged_in(site)
    await site.store.add_suppression("keep@example.com", "manual")
    for path, form in (
        ("/ui/suppressions/add", {"address": "x@example.com"}),
        ("/ui/suppressions/remove", {"address": "keep@example.com"}),
    ):
        for token in ("", "x" * len(csrf)):
            code, _, page = await browser.request("POST", path, {"csrf": token, **form})
            assert code == 403 and "out of date" in page, (path, token)
    head, tail = multipart("wrong", b"x@example.com\n")
    code, _, _ = await upload(browser, head + tail)
    assert code == 403
    assert set(await listed(site.store)) == {"keep@example.com"}
    # Without a session, nothing either.
    anonymous = site.browser()
    code, _, _ = await anonymous.request(
        "POST", "/ui/suppressions/add", {"csrf": csrf, "address": "x@example.com"}
    )
    assert code == 403
    code, headers, _ = await anonymous.request("GET", "/ui/suppressions/export")
    assert code == 303 and headers["location"].startswith("/ui/login?")


@pytest_twisted.ensureDeferred
async def test_a_forged_notice_shows_nothing(site: Site) -> None:
    browser, csrf = await logged_in(site)
    code, headers, _ = await browser.request(
        "POST", "/ui/suppressions/add", {"csrf": csrf, "address": "n@example.com"}
    )
    notice = parse_qs(urlsplit(headers["location"]).query)["notice"][0]
    payload, _, signature = notice.partition(".")
    # Another session's browser does not see this session's notice.
    other = site.browser()
    assert await other.login() == 303
    code, _, page = await other.request("GET", headers["location"])
    assert code == 200 and 'id="notice"' not in page
    for forged in (f"{payload}.{'0' * len(signature)}", "Imported 10000", payload, "x." * 2000):
        code, _, page = await browser.request("GET", "/ui/suppressions?notice=" + forged)
        assert code in (200, 400) and 'id="notice"' not in page, forged


@pytest_twisted.ensureDeferred
async def test_hostile_addresses_and_notes_are_shown_escaped(site: Site) -> None:
    browser, csrf = await logged_in(site)
    code, headers, _ = await browser.request(
        "POST",
        "/ui/suppressions/add",
        {"csrf": csrf, "address": HOSTILE_ADDRESS, "note": HOSTILE_NOTE},
    )
    page = await follow(browser, code, headers)  # the notice names the address
    for shown in (page, (await browser.request("GET", "/ui/suppressions"))[2]):
        assert "<script>alert" not in shown and "<img/src" not in shown
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
        assert "&#34;&#39;&gt;&lt;img/src=x/onerror=alert(1)&gt;@evil.example" in shown
    # A hostile file's bad lines are listed escaped too.
    code, headers = await import_file(browser, csrf, b"<script>x</script>\nok@example.com\n")
    page = await follow(browser, code, headers)
    assert "1 added, 0 updated, 1 refused" in page
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page


@pytest_twisted.ensureDeferred
async def test_import_reports_added_updated_refused_and_bad_lines(site: Site) -> None:
    browser, csrf = await logged_in(site)
    await site.store.add_suppression("kept@example.com", "manual", None, "old")
    content = (
        "\ufeffaddress,reason,expires_at,note\n"  # a spreadsheet's byte-order mark
        "new@example.com,complaint,,via UI\n"
        "kept@example.com,hard_bounce,2030-01-01T00:00:00Z,replaced\n"
        + "".join(f"bad{i} address,manual,,\n" for i in range(7))
        + "x@example.com,whim,,\n"
    ).encode()
    code, headers = await import_file(browser, csrf, content)
    page = await follow(browser, code, headers)
    assert "Imported: 1 added, 1 updated, 8 refused." in page
    assert page.count("<li>line ") == 5  # the first few bad lines, with their reasons
    assert "<li>line 4: not an email address: &#39;bad0 address&#39;</li>" in page
    assert await listed(site.store) == {
        "new@example.com": ("complaint", None, "via UI"),
        "kept@example.com": ("hard_bounce", 1_893_456_000.0, "replaced"),
    }
    # Files refused as a whole: nothing imported, a clear reason.
    for bad_file, text in (
        (
            b"address,colour\nz@example.com,red\n",
            "Nothing imported: line 1: unknown column(s) colour",
        ),
        (b"\xff\xfez@example.com\n", "Nothing imported: not UTF-8 text"),
        (b"z@example.com\n" + b"x" * 200_000, "Nothing imported: line 2: not CSV"),
        (b"", "Choose a CSV file to import."),
    ):
        code, headers = await import_file(browser, csrf, bad_file)
        page = await follow(browser, code, headers)
        assert text in page, bad_file
    assert len(await listed(site.store)) == 2


@pytest_twisted.ensureDeferred
async def test_export_then_import_into_a_fresh_store_is_the_same_list(
    site: Site, tmp_path: Path
) -> None:
    browser, _ = await logged_in(site)
    now = site.clock.seconds()
    entries = [
        NewSuppression("a@example.com", "complaint", None, 'say "hi", ok'),
        NewSuppression("b@example.org", "soft_bounce", now + 86400.5, "line\nbreak"),
        NewSuppression("c@example.org", "manual", None, HOSTILE_NOTE),
        NewSuppression("gone@example.net", "manual", now - 10, ""),  # expired
    ] + [NewSuppression(f"bulk{i:04}@example.net", "hard_bounce") for i in range(1500)]
    await site.store.add_suppressions(entries)
    headers, body = await export(browser)
    assert headers["content-type"] == "text/csv; charset=utf-8"
    assert headers["content-disposition"] == 'attachment; filename="suppressions.csv"'
    rows = list(csv.reader(io.StringIO(body, newline="")))
    assert rows[0] == ["address", "reason", "created_at", "expires_at", "note"]
    assert rows[1] == ["a@example.com", "complaint", rfc3339(now), "", 'say "hi", ok']
    assert len(rows) == 1 + 1503  # not the expired one; several export pages
    # The filters apply; expired ones with all=1.
    _, filtered = await export(browser, "?q=@example.org")
    assert [r[0] for r in csv.reader(io.StringIO(filtered))][1:] == [
        "b@example.org",
        "c@example.org",
    ]
    _, everything = await export(browser, "?all=1&q=gone@example.net")
    assert len(everything.splitlines()) == 2

    # Into a fresh store (the other site's database): the same list.
    before = {k: v for k, v in (await listed(site.store)).items() if k != "gone@example.net"}
    async with fresh_site(tmp_path, site) as (fresh, fresh_store):
        other, csrf = await logged_in(fresh)
        code, headers = await import_file(other, csrf, body.encode())
        page = await follow(other, code, headers)
        assert "Imported: 1503 added, 0 updated, 0 refused." in page
        assert await listed(fresh_store) == before


class fresh_site:
    """A second served UI over a new, empty SQLite store."""

    def __init__(self, tmp_path: Path, site: Site) -> None:
        self.tmp_path = tmp_path / "fresh"
        self.site = site

    async def __aenter__(self) -> tuple[Site, Store]:
        from smartrelay.storage.engines import create_engine
        from smartrelay.storage.migrations import migrate

        self.tmp_path.mkdir()
        reactor = real_reactor()
        self.engine = create_engine(reactor, f"sqlite:///{self.tmp_path}/fresh.db")
        await self.engine.start()
        await migrate(self.engine, 0)
        clock = Clock()
        store = Store(self.engine, clock)
        self.context = ui_site(
            self.tmp_path, store, clock, lambda ui: {"suppressions": Suppressions(ui)}
        )
        served = await self.context.__aenter__()
        return served, store

    async def __aexit__(self, *exc: object) -> None:
        await self.context.__aexit__(None, None, None)
        await self.engine.close()


@pytest_twisted.ensureDeferred
async def test_list_pages_by_keyset(site: Site) -> None:
    browser, _ = await logged_in(site)
    await site.store.add_suppressions(
        [NewSuppression(f"p{i:03}@example.com", "manual") for i in range(PAGE + 5)]
    )
    code, _, page = await browser.request("GET", "/ui/suppressions?q=@example.com")
    assert code == 200
    assert page.count('name="remove"') == PAGE
    assert f"p{PAGE - 1:03}@example.com" in page and f"p{PAGE:03}@example.com" not in page
    link = hidden_link(page, "next-page")
    assert "q=%40example.com" in link and f"after=p{PAGE - 1:03}%40example.com" in link
    _, _, page = await browser.request("GET", link)
    assert page.count('name="remove"') == 5 and 'id="next-page"' not in page
    assert 'id="first-page"' in page


def hidden_link(page: str, element_id: str) -> str:
    import html
    import re

    match = re.search(rf'id="{element_id}" href="([^"]*)"', page)
    assert match is not None, element_id
    return html.unescape(match[1])


# -- the request-body bound --------------------------------------------------------------
@pytest.mark.parametrize("known_length", [True, False], ids=["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_a_20_mb_upload_is_refused_without_holding_it(site: Site, known_length: bool) -> None:
    browser, csrf = await logged_in(site)
    head, tail = multipart(csrf, b"")
    tracemalloc.start()
    try:
        code, _, body = await upload(browser, Chunks(head, 20 * 1024 * 1024, tail, known_length))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 413, body
    assert "too big" in body
    assert peak < 4 * 1024 * 1024, f"{peak} bytes held for a 20 MB upload"
    assert await listed(site.store) == {}
    # The listener still serves, the session still works.
    code, _, _ = await browser.request("GET", "/ui/suppressions")
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_a_file_over_the_import_limit_is_refused_with_a_notice(site: Site) -> None:
    browser, csrf = await logged_in(site)
    assert MAX_IMPORT < MAX_REQUEST_BODY - 4096
    head, tail = multipart(csrf, b"a@example.com\n" * (MAX_IMPORT // 14 + 1))
    code, headers, _ = await upload(browser, head + tail)
    page = await follow(browser, code, headers)
    assert "Nothing imported: the file is larger than 5 MiB; split it." in page
    assert await listed(site.store) == {}


@pytest_twisted.ensureDeferred
async def test_small_forms_still_work_after_the_bound(site: Site) -> None:
    """The bound counts bytes per request: a keep-alive connection's next request starts
    from zero."""
    browser, csrf = await logged_in(site)
    for i in range(3):
        code, _, _ = await browser.request(
            "POST", "/ui/suppressions/add", {"csrf": csrf, "address": f"k{i}@example.com"}
        )
        assert code == 303
    assert len(await listed(site.store)) == 3
