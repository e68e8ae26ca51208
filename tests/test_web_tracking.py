"""The tracking and unsubscribe endpoints over real HTTP (treq), on both engines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from attrs import frozen
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource

from smartrelay.config import SuppressionConfig
from smartrelay.events import DeliveredEvent
from smartrelay.listening import ListeningService
from smartrelay.metrics import RelayMetrics
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import NewMessage, Store, insert_events, to_ms
from smartrelay.tokens import TokenCodec, load_keyring
from smartrelay.web.service import loggable_path, web_service
from smartrelay.web.site import WebRoot
from smartrelay.web.tracking import (
    PIXEL_GIF,
    Tracking,
    is_machine_click,
    location_header,
    machine_reason,
    mask_address,
)
from tests.conftest import real_reactor
from tests.support.purge import purge_message_rows

BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/124.0.0.0 Safari/537.36"
)
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
NO_CACHE = "no-store, no-cache, must-revalidate, max-age=0"
THIRTY_DAYS = 30 * 86400.0

Response = Any  # treq's response (an IResponse with .content())


# --------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def codec(tmp_path: Path) -> TokenCodec:
    return TokenCodec(load_keyring(str(tmp_path / "secret.key")))


@pytest.fixture
def http() -> HTTPClient:
    """A real HTTP client; one connection per request, so nothing stays open after a test."""
    reactor = real_reactor()
    pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
    return HTTPClient(Agent(reactor, pool=pool))  # type: ignore[no-untyped-call]


@frozen
class Server:
    base: str
    service: ListeningService
    fatal: list[str]
    resource: IResource

    def url(self, path: str) -> str:
        return self.base + path


Serve = Callable[..., Awaitable[Server]]


@pytest_twisted.async_yield_fixture
async def serve(codec: TokenCodec, clock: Clock) -> AsyncIterator[Serve]:
    """Start a web service on 127.0.0.1, port 0, serving a Tracking app through the site's root
    (as the relay does); stopped after the test."""
    started: list[ListeningService] = []

    async def start(
        store_ready: Callable[[], Deferred[Store]],
        suppression: SuppressionConfig | None = None,
        metrics: RelayMetrics | None = None,
    ) -> Server:
        tracking = Tracking(
            store_ready, codec, clock, suppression or SuppressionConfig(), metrics=metrics
        )
        resource = WebRoot(tracking).resource()
        fatal: list[str] = []
        service = web_service(real_reactor(), "tcp:0:interface=127.0.0.1", resource, fatal.append)
        service.startService()
        started.append(service)
        assert fatal == []
        assert service.port is not None
        port = service.port.getHost().port  # type: ignore[attr-defined]
        return Server(f"http://127.0.0.1:{port}", service, fatal, resource)

    yield start
    for service in started:
        stopped = service.stopService()
        if stopped is not None:
            await stopped


@pytest_twisted.async_yield_fixture
async def web(serve: Serve, store: Store) -> AsyncIterator[Server]:
    yield await serve(lambda: succeed(store))


async def queue(store: Store, *recipients: str) -> dict[str, int]:
    """Queue one message; the recipients' ids by address."""
    queued = await store.queue_message(
        NewMessage(
            sender="app@example.com",
            recipients=recipients,
            raw=b"Subject: hi\r\n\r\nhello\r\n",
            tags=("welcome",),
        )
    )

    async def txn(cursor: ICursor) -> dict[str, int]:
        await cursor.execute(
            "SELECT address, id FROM recipients WHERE queue_id = ?", (queued.queue_id,)
        )
        return {str(r[0]): int(r[1]) for r in cursor.fetchall()}

    return await store.engine.run_interaction("ids", txn, readonly=True)


@frozen
class Event:
    type: str
    time: float
    queue_id: str | None
    recipient: str | None
    data: dict[str, Any]


async def events(store: Store, *types: str) -> list[Event]:
    wanted = types or ("opened", "clicked", "unsubscribed", "suppressed")

    async def txn(cursor: ICursor) -> list[Event]:
        marks = ", ".join("?" for _ in wanted)
        await cursor.execute(
            "SELECT type, time, queue_id, recipient, data FROM events"
            f" WHERE type IN ({marks}) ORDER BY id",
            wanted,
        )
        return [
            Event(str(r[0]), int(r[1]) / 1000, r[2], r[3], json.loads(r[4]))
            for r in cursor.fetchall()
        ]

    return await store.engine.run_interaction("events", txn, readonly=True)


async def delivered(store: Store, address: str, at: float) -> None:
    async def txn(cursor: ICursor) -> None:
        await cursor.execute("SELECT queue_id FROM recipients WHERE address = ?", (address,))
        row = cursor.fetchone()
        assert row is not None
        await insert_events(
            cursor,
            to_ms(at),
            [(str(row[0]), address, DeliveredEvent("mx.example.net", "250 ok", True, 1))],
        )

    await store.engine.run_interaction("delivered", txn)


def hdrs(values: dict[str, str]) -> Headers:
    return Headers({name: [value] for name, value in values.items()})


def header(response: Response, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return None if values is None else str(values[-1])


def tamper(token: str) -> str:
    """The token with one character in the middle changed."""
    i = len(token) // 2
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]


def assert_generic_page(body: bytes) -> None:
    text = body.decode("utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert len(body) < 2000
    for leak in ("Traceback", "Error", "Exception", "File ", ".py", "secret"):
        assert leak not in text


# --------------------------------------------------------------------------------------
# Open pixel


@pytest_twisted.ensureDeferred
async def test_pixel_serves_gif_and_records_open(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    ids = await queue(store, "reader@example.net")
    token = codec.open_token(ids["reader@example.net"])
    response = await http.get(
        web.url(f"/o/{token}.gif"),
        headers=hdrs({"User-Agent": BROWSER, "X-Forwarded-For": "203.0.113.9"}),
    )
    body = await response.content()
    assert response.code == 200
    assert body == PIXEL_GIF and len(body) == 43 and body.startswith(b"GIF89a\x01\x00\x01\x00")
    assert body[19:24] == b"!\xf9\x04\x01\x00"  # graphic control extension: transparent
    assert header(response, "Content-Type") == "image/gif"
    assert response.length == 43  # Content-Length (the client takes it out of the headers)
    assert header(response, "Cache-Control") == NO_CACHE
    assert header(response, "Pragma") == "no-cache"
    assert header(response, "Expires") == "0"
    [event] = await events(store)
    assert event.type == "opened" and event.recipient == "reader@example.net"
    assert event.queue_id is not None and event.time == store.clock.seconds()
    # The TCP peer, not X-Forwarded-For.
    assert event.data == {"user_agent": BROWSER, "ip": "127.0.0.1", "machine": False}


@pytest_twisted.ensureDeferred
async def test_pixel_with_bad_token_still_gets_gif_and_records_nothing(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    ids = await queue(store, "reader@example.net")
    rid = ids["reader@example.net"]
    for token in (
        tamper(codec.open_token(rid)),
        codec.unsubscribe_token(rid),  # another kind
        "not-a-token",
        codec.open_token(rid + 1000),  # authentic, but no such recipient
    ):
        response = await http.get(web.url(f"/o/{token}.gif"), headers=hdrs({"User-Agent": BROWSER}))
        assert response.code == 200
        assert await response.content() == PIXEL_GIF
        assert header(response, "Cache-Control") == NO_CACHE
    assert await events(store) == []


@pytest_twisted.ensureDeferred
async def test_pixel_from_image_proxy_is_machine(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    ids = await queue(store, "reader@example.net")
    token = codec.open_token(ids["reader@example.net"])
    for agent in (GMAIL_PROXY, "Mozilla/5.0", "YahooMailProxy; https://help.yahoo.com"):
        response = await http.get(web.url(f"/o/{token}.gif"), headers=hdrs({"User-Agent": agent}))
        assert await response.content() == PIXEL_GIF
    response = await http.get(web.url(f"/o/{token}.gif"), headers=hdrs({"User-Agent": ""}))
    await response.content()
    recorded = await events(store, "opened")
    assert [e.data["machine"] for e in recorded] == [True, True, True, True]
    assert recorded[0].data["user_agent"] == GMAIL_PROXY


# --------------------------------------------------------------------------------------
# Clicks

CLICK_URLS = [
    ("https://example.com/a?x=1&y=2", "https://example.com/a?x=1&y=2"),
    (
        "https://example.com/path%20with%20escapes?q=a%26b&r=%E4",
        "https://example.com/path%20with%20escapes?q=a%26b&r=%E4",
    ),
    ("http://example.com/page#frag", "http://example.com/page#frag"),
    (
        "https://example.com/s?q=hello+world&lang=en&empty=&flag#section-2",
        "https://example.com/s?q=hello+world&lang=en&empty=&flag#section-2",
    ),
    ("HTTPS://Example.COM/CaseKept?A=B", "HTTPS://Example.COM/CaseKept?A=B"),
    (
        "https://example.com/\u00fc/stra\u00dfe?name=Jos\u00e9&emoji=\U0001f600#caf\u00e9",
        "https://example.com/%C3%BC/stra%C3%9Fe?name=Jos%C3%A9&emoji=%F0%9F%98%80#caf%C3%A9",
    ),
    ("https://b\u00fccher.example/x?y=%C3%BC", "https://b%C3%BCcher.example/x?y=%C3%BC"),
    ("https://example.com/a b", "https://example.com/a%20b"),
]


@pytest_twisted.ensureDeferred
async def test_click_redirects_to_the_exact_url(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    ids = await queue(store, "reader@example.net")
    rid = ids["reader@example.net"]
    for url, location in CLICK_URLS:
        response = await http.get(
            web.url(f"/c/{codec.click_token(rid, url)}"),
            headers=hdrs({"User-Agent": BROWSER}),
            allow_redirects=False,
        )
        assert await response.content() == b""
        assert response.code == 302, url
        assert response.headers.getRawHeaders(b"location") == [location.encode("ascii")]
        assert header(response, "Cache-Control") == "no-store"
    recorded = await events(store)
    assert [e.type for e in recorded] == ["clicked"] * len(CLICK_URLS)
    assert [e.data["url"] for e in recorded] == [url for url, _ in CLICK_URLS]
    assert recorded[0].data == {
        "user_agent": BROWSER,
        "ip": "127.0.0.1",
        "machine": False,  # no delivered event: the timing rule does not apply
        "url": CLICK_URLS[0][0],
    }
    assert {e.recipient for e in recorded} == {"reader@example.net"}


@pytest_twisted.ensureDeferred
async def test_bad_click_token_is_404_never_a_redirect(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    ids = await queue(store, "reader@example.net")
    rid = ids["reader@example.net"]
    token = codec.click_token(rid, "https://example.com/")
    for bad in (
        tamper(token),
        token[:-1],
        token + "A",
        codec.open_token(rid),  # another kind
        codec.click_token(rid, "javascript:alert(1)"),  # authentic, but not http(s)
        codec.click_token(rid, "ftp://example.com/file"),
        codec.click_token(rid, "//evil.example/"),
        codec.click_token(rid, "https://"),
    ):
        response = await http.get(web.url(f"/c/{bad}"), allow_redirects=False)
        assert response.code == 404
        assert response.headers.getRawHeaders(b"location") is None
        assert header(response, "Content-Type") == "text/html; charset=utf-8"
        assert_generic_page(await response.content())
    assert await events(store) == []


@pytest_twisted.ensureDeferred
async def test_click_for_a_purged_recipient_still_redirects(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    response = await http.get(
        web.url(f"/c/{codec.click_token(424242, 'https://example.com/x')}"),
        allow_redirects=False,
    )
    assert response.code == 302
    assert header(response, "Location") == "https://example.com/x"
    assert await events(store) == []


@pytest_twisted.ensureDeferred
async def test_click_soon_after_delivery_is_machine(
    web: Server, store: Store, codec: TokenCodec, clock: Clock, http: HTTPClient
) -> None:
    ids = await queue(store, "reader@example.net")
    token = codec.click_token(ids["reader@example.net"], "https://example.com/")
    await delivered(store, "reader@example.net", clock.seconds())

    async def click(agent: str) -> None:
        response = await http.get(
            web.url(f"/c/{token}"), headers=hdrs({"User-Agent": agent}), allow_redirects=False
        )
        assert response.code == 302
        await response.content()

    clock.advance(1)
    await click(BROWSER)  # a scanner with a browser's user agent, 1 s after delivery
    clock.advance(3600)
    await click(BROWSER)  # a person, an hour later
    await click("python-requests/2.31.0")  # a script, an hour later
    recorded = await events(store, "clicked")
    assert [e.data["machine"] for e in recorded] == [True, False, True]


@pytest_twisted.ensureDeferred
async def test_head_records_nothing(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    ids = await queue(store, "reader@example.net")
    rid = ids["reader@example.net"]
    response = await http.head(
        web.url(f"/c/{codec.click_token(rid, 'https://example.com/?a=1&b=2')}"),
        allow_redirects=False,
    )
    assert response.code == 302
    assert header(response, "Location") == "https://example.com/?a=1&b=2"
    assert header(response, "Cache-Control") == "no-store"
    assert await response.content() == b""
    response = await http.head(web.url(f"/o/{codec.open_token(rid)}.gif"))
    assert response.code == 200
    assert header(response, "Content-Type") == "image/gif"
    assert header(response, "Cache-Control") == NO_CACHE
    assert await response.content() == b""
    response = await http.head(web.url(f"/c/{tamper(codec.click_token(rid, 'https://x.y/'))}"))
    assert response.code == 404
    assert response.headers.getRawHeaders(b"location") is None
    assert await events(store) == []


# --------------------------------------------------------------------------------------
# Unsubscribe


@pytest_twisted.ensureDeferred
async def test_unsubscribe_page(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    ids = await queue(store, "john.doe@example.net")
    response = await http.get(web.url(f"/u/{codec.unsubscribe_token(ids['john.doe@example.net'])}"))
    body = (await response.content()).decode("utf-8")
    assert response.code == 200
    assert header(response, "Content-Type") == "text/html; charset=utf-8"
    assert header(response, "Cache-Control") == "no-store"
    assert "default-src 'none'" in (header(response, "Content-Security-Policy") or "")
    assert '<form method="post">' in body
    assert '<input type="hidden" name="confirm" value="yes">' in body
    assert '<button type="submit">Unsubscribe</button>' in body
    assert "j***@example.net" in body and "john.doe" not in body
    assert '<meta charset="utf-8">' in body
    for external in ("src=", "<link", "<script", "url(", "http://", "https://"):
        assert external not in body
    assert await events(store) == [] and await store.list_suppressions() == []


@pytest_twisted.ensureDeferred
async def test_one_click_unsubscribe_is_idempotent(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    ids = await queue(store, "John.Doe@Example.NET")
    url = web.url(f"/u/{codec.unsubscribe_token(ids['John.Doe@Example.NET'])}")
    response = await http.post(url, data={"List-Unsubscribe": "One-Click"})
    assert response.code == 200
    assert header(response, "Content-Type") == "text/plain; charset=utf-8"
    assert await response.content() == b"Unsubscribed\n"
    [entry] = await store.list_suppressions()
    assert entry.address == "john.doe@example.net" and entry.reason == "unsubscribe"
    assert entry.expires_at is None and entry.created_at == store.clock.seconds()
    [event] = await events(store)
    assert event.type == "unsubscribed" and event.data == {"method": "one-click"}
    assert event.recipient == "John.Doe@Example.NET" and event.queue_id is not None

    store.clock.advance(60)  # type: ignore[attr-defined]
    again = await http.post(url, data={"List-Unsubscribe": "One-Click"})
    assert again.code == 200 and await again.content() == b"Unsubscribed\n"
    assert await store.list_suppressions() == [entry]
    assert len(await events(store)) == 1


@pytest_twisted.ensureDeferred
async def test_one_click_unsubscribe_multipart(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    ids = await queue(store, "reader@example.net")
    boundary = "----smartrelay-test-boundary"
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
        "One-Click\r\n"
        f"--{boundary}--\r\n"
    ).encode("ascii")
    response = await http.post(
        web.url(f"/u/{codec.unsubscribe_token(ids['reader@example.net'])}"),
        data=body,
        headers=hdrs({"Content-Type": f"multipart/form-data; boundary={boundary}"}),
    )
    assert response.code == 200 and await response.content() == b"Unsubscribed\n"
    [event] = await events(store)
    assert event.data == {"method": "one-click"}
    assert [s.reason for s in await store.list_suppressions()] == ["unsubscribe"]


@pytest_twisted.ensureDeferred
async def test_unsubscribe_from_the_page(
    serve: Serve, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    server = await serve(lambda: succeed(store), SuppressionConfig(unsubscribe=THIRTY_DAYS))
    ids = await queue(store, "john.doe@example.net")
    url = server.url(f"/u/{codec.unsubscribe_token(ids['john.doe@example.net'])}")

    # A POST that is neither RFC 8058 nor the page's form: asked again, nothing recorded.
    response = await http.post(url, data={"something": "else"})
    assert response.code == 400
    assert '<form method="post">' in (await response.content()).decode("utf-8")
    assert await events(store) == []

    response = await http.post(url, data={"confirm": "yes"})
    body = (await response.content()).decode("utf-8")
    assert response.code == 200
    assert header(response, "Content-Type") == "text/html; charset=utf-8"
    assert "You are unsubscribed" in body and "j***@example.net" in body
    [entry] = await store.list_suppressions()
    assert entry.reason == "unsubscribe"
    assert entry.expires_at == store.clock.seconds() + THIRTY_DAYS
    [event] = await events(store)
    assert event.data == {"method": "page"}
    response = await http.post(url, data={"confirm": "yes"})
    assert response.code == 200
    await response.content()
    assert len(await events(store)) == 1


@pytest_twisted.ensureDeferred
async def test_unsubscribe_with_bad_token_is_404(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    ids = await queue(store, "reader@example.net")
    rid = ids["reader@example.net"]
    for bad in (
        tamper(codec.unsubscribe_token(rid)),
        codec.open_token(rid),
        codec.unsubscribe_token(rid + 1000),  # authentic, but no such recipient
    ):
        response = await http.get(web.url(f"/u/{bad}"))
        assert response.code == 404
        assert_generic_page(await response.content())
        response = await http.post(web.url(f"/u/{bad}"), data={"List-Unsubscribe": "One-Click"})
        assert response.code == 404
        assert_generic_page(await response.content())
    assert await events(store) == [] and await store.list_suppressions() == []


@pytest_twisted.ensureDeferred
async def test_unsubscribe_replaces_other_reasons_without_shortening(
    store: Store, clock: Clock
) -> None:
    ids = await queue(store, "a@example.net", "b@example.net", "c@example.net")
    refs = {a: await store.recipient_ref(rid) for a, rid in ids.items()}
    assert refs["a@example.net"] is not None
    assert refs["a@example.net"].sender == "app@example.com"
    now = clock.seconds()
    await store.add_suppression("a@example.net", "hard_bounce")  # forever
    await store.add_suppression("b@example.net", "manual", expires_at=now + 10)
    await store.add_suppression("c@example.net", "unsubscribe", expires_at=now + 10)
    clock.advance(20)  # c's unsubscribe has expired: a new one counts again
    results = [
        await store.unsubscribe(ref, "page", SuppressionConfig(unsubscribe=THIRTY_DAYS))
        for ref in refs.values()
        if ref is not None
    ]
    assert results == [True, True, True]
    entries = {e.address: e for e in await store.list_suppressions()}
    assert {e.reason for e in entries.values()} == {"unsubscribe"}
    assert entries["a@example.net"].expires_at is None  # forever stays forever
    assert entries["b@example.net"].expires_at == clock.seconds() + THIRTY_DAYS
    assert entries["c@example.net"].expires_at == clock.seconds() + THIRTY_DAYS
    assert len(await events(store, "unsubscribed")) == 3
    assert await store.recipient_ref(2**64 - 1) is None
    assert await store.delivered_at(ids["a@example.net"]) is None


@pytest_twisted.ensureDeferred
async def test_complaint_suppresses_forever_once_and_outranks_an_unsubscribe(
    store: Store, clock: Clock
) -> None:
    """SPEC [suppression] complaint (default forever): the feedback issue's ARF reader calls
    this for the recipient a report names; a duplicate report records nothing more."""
    ids = await queue(store, "a@example.net", "b@example.net")
    ref_a = await store.recipient_ref(ids["a@example.net"])
    ref_b = await store.recipient_ref(ids["b@example.net"])
    assert ref_a is not None and ref_b is not None
    await store.unsubscribe(ref_b, "page", SuppressionConfig(unsubscribe=THIRTY_DAYS))

    assert await store.complain(ref_a, "abuse", "fbl.example.net", SuppressionConfig()) is True
    assert await store.complain(ref_a, "abuse", "fbl.example.net", SuppressionConfig()) is False
    assert await store.complain(ref_b, "abuse", "fbl.example.net", SuppressionConfig()) is True

    entries = {e.address: e for e in await store.list_suppressions()}
    assert {a: (e.reason, e.expires_at) for a, e in entries.items()} == {
        "a@example.net": ("complaint", None),
        "b@example.net": ("complaint", None),  # forever outlives the 30-day unsubscribe
    }
    complaints = await events(store, "complained")
    assert [(e.recipient, e.data) for e in complaints] == [
        ("a@example.net", {"feedback_type": "abuse", "source": "fbl.example.net"}),
        ("b@example.net", {"feedback_type": "abuse", "source": "fbl.example.net"}),
    ]
    active = await store.active_suppressions(["A@example.net"])
    assert active["a@example.net"].reason == "complaint"


@pytest_twisted.ensureDeferred
async def test_client_going_away_does_not_interrupt_the_unsubscribe(
    serve: Serve, store: Store, codec: TokenCodec
) -> None:
    asked: Deferred[None] = Deferred()
    gate: Deferred[None] = Deferred()

    async def ready() -> Store:
        if not asked.called:
            asked.callback(None)
        await gate
        return store

    server = await serve(lambda: Deferred.fromCoroutine(ready()))
    ids = await queue(store, "reader@example.net")
    token = codec.unsubscribe_token(ids["reader@example.net"])
    port = int(server.base.rsplit(":", 1)[1])
    reactor = real_reactor()
    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
    assert client.transport is not None
    body = b"List-Unsubscribe=One-Click"
    client.transport.write(
        f"POST /u/{token} HTTP/1.1\r\nHost: relay.example\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode("ascii")
        + body
    )
    await asked  # the request is being handled
    client.transport.loseConnection()
    await deferLater(reactor, 0.2, lambda: None)  # the server sees the connection close
    gate.callback(None)
    for _ in range(100):
        if await events(store):
            break
        await deferLater(reactor, 0.05, lambda: None)
    [event] = await events(store)
    assert event.type == "unsubscribed" and event.data == {"method": "one-click"}
    assert [s.reason for s in await store.list_suppressions()] == ["unsubscribe"]


# --------------------------------------------------------------------------------------
# Errors


@pytest_twisted.ensureDeferred
async def test_store_failure_is_a_generic_500(
    serve: Serve, codec: TokenCodec, http: HTTPClient
) -> None:
    def broken() -> Deferred[Store]:
        return fail(RuntimeError("database down: secret detail"))

    server = await serve(broken)
    for method in ("GET", "POST"):
        response = await http.request(
            method,
            server.url(f"/u/{codec.unsubscribe_token(7)}"),
            data={"List-Unsubscribe": "One-Click"} if method == "POST" else None,
        )
        assert response.code == 500
        assert header(response, "Content-Type") == "text/html; charset=utf-8"
        assert_generic_page(await response.content())
    # The recipient's pixel and link keep working; only the recording is lost (and logged).
    response = await http.get(server.url(f"/o/{codec.open_token(7)}.gif"))
    assert response.code == 200 and await response.content() == PIXEL_GIF
    response = await http.get(
        server.url(f"/c/{codec.click_token(7, 'https://example.com/')}"), allow_redirects=False
    )
    assert response.code == 302 and header(response, "Location") == "https://example.com/"


@pytest_twisted.ensureDeferred
async def test_unknown_paths_and_methods(serve: Serve, codec: TokenCodec, http: HTTPClient) -> None:
    server = await serve(lambda: fail(RuntimeError("unused")))
    for path in ("/", "/o/", "/c/", f"/o/{codec.open_token(1)}", "/x/y", "/u/a/b"):
        response = await http.get(server.url(path), allow_redirects=False)
        assert response.code == 404, path
        assert_generic_page(await response.content())
    response = await http.post(server.url(f"/o/{codec.open_token(1)}.gif"))
    assert response.code == 405
    assert set((header(response, "Allow") or "").split(", ")) == {"GET", "HEAD"}
    assert_generic_page(await response.content())


# --------------------------------------------------------------------------------------
# The service


@pytest_twisted.ensureDeferred
async def test_web_service_cannot_listen_is_fatal(serve: Serve) -> None:
    server = await serve(lambda: fail(RuntimeError("unused")))
    assert server.service.port is not None
    port = server.service.port.getHost().port  # type: ignore[attr-defined]
    fatal: list[str] = []
    busy = web_service(
        real_reactor(),
        f"tcp:{port}:interface=127.0.0.1",
        server.resource,
        fatal.append,
    )
    busy.startService()
    bad = web_service(real_reactor(), "nonsense:1", server.resource, fatal.append)
    bad.startService()
    assert len(fatal) == 2
    assert fatal[0].startswith(f"web: cannot listen on tcp:{port}:interface=127.0.0.1: ")
    assert fatal[1].startswith("web: cannot listen on nonsense:1: ")
    assert all("\n" not in line for line in fatal)
    assert busy.port is None
    assert busy.stopService() is None and bad.stopService() is None  # nothing to stop


def test_loggable_path_shortens_tokens() -> None:
    token = "AQKbcd9ZxxxxxxxxxxxxxxxxxxY"
    assert loggable_path(f"/c/{token}?q=1".encode()) == "/c/AQKbcd9Z\u2026"
    assert loggable_path(f"/o/{token}.gif".encode()) == "/o/AQKbcd9Z\u2026"
    assert loggable_path(b"/u/short") == "/u/short"
    assert loggable_path(b"/other/\xff") == "/other/\\xff"
    assert loggable_path(b"/" + b"a" * 500).endswith("\u2026")


# --------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize(
    ("agent", "reason"),
    [
        (None, "no-user-agent"),
        ("", "no-user-agent"),
        ("  ", "no-user-agent"),
        ("Mozilla/5.0", "apple-mail-privacy-protection"),
        (GMAIL_PROXY, "google-image-proxy"),
        (
            "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
            "yahoo-mail-proxy",
        ),
        ("Microsoft Office Existence Discovery", "microsoft-office-discovery"),
        ("Mozilla/5.0 (compatible; BingPreview/1.0b)", "security-scanner"),
        ("Barracuda Sentinel (EE)", "security-scanner"),
        ("Proofpoint URL Defense", "security-scanner"),
        ("Mimecast-URL-Protect", "security-scanner"),
        ("Symantec Click-time URL Protection", "security-scanner"),
        ("python-requests/2.31.0", "http-library"),
        ("curl/8.5.0", "http-library"),
        ("Go-http-client/1.1", "http-library"),
        ("Java/17.0.2", "http-library"),
        ("Mozilla/5.0 (X11; Linux x86_64) HeadlessChrome/120.0 Safari/537.36", "headless-browser"),
        ("Mozilla/5.0 (Unknown; Linux) AppleWebKit/538.1 PhantomJS/2.1.1", "headless-browser"),
        ("Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", "link-preview-bot"),
        (BROWSER, None),
        ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15", None),
        (
            "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)",
            None,
        ),
        ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15", None),
    ],
)
def test_machine_reason(agent: str | None, reason: str | None) -> None:
    assert machine_reason(agent) == reason


def test_is_machine_click() -> None:
    assert is_machine_click(1000.0, 999.0)
    assert is_machine_click(1000.0, 1000.5)  # recorded after the scanner's click
    assert not is_machine_click(1000.0, 990.0)
    assert not is_machine_click(1000.0, None)
    assert is_machine_click(1000.0, 990.0, delay=30)


def test_location_header_and_mask() -> None:
    assert location_header("https://x.y/?a=%20&b#c") == b"https://x.y/?a=%20&b#c"
    assert location_header("https://x.y/\u00e4\r\n\x7f") == b"https://x.y/%C3%A4%0D%0A%7F"
    assert mask_address("john.doe@example.com") == "j***@example.com"
    assert mask_address('"a@b"@example.com') == '"***@example.com'
    assert mask_address("nodomain") == "n***"


# --------------------------------------------------------------------------------------
# After a purge (retention, issue 13): first the body only, then the message's rows too

PURGES = pytest.mark.parametrize("rows", [False, True], ids=["body", "rows"])


async def purge(store: Store, recipient_id: int, rows: bool) -> str:
    """Purge the message of ``recipient_id`` (see :func:`purge_message_rows`); its queue id."""
    ref = await store.recipient_ref(recipient_id)
    assert ref is not None
    await purge_message_rows(store, ref.queue_id, rows)

    async def txn(cursor: ICursor) -> tuple[int, bytes | None]:
        await cursor.execute("SELECT COUNT(*) FROM recipients WHERE queue_id = ?", (ref.queue_id,))
        count = cursor.fetchone()
        await cursor.execute(
            "SELECT b.raw, m.body_purged_at FROM messages m LEFT JOIN message_bodies b"
            " ON b.queue_id = m.queue_id WHERE m.queue_id = ?",
            (ref.queue_id,),
        )
        message = cursor.fetchone()
        assert count is not None
        assert message is None or message[1] is not None
        return int(count[0]), None if message is None else bytes(message[0] or b"")

    # The purge did what it says: the rows are gone, or only the body is.
    count, raw = await store.engine.run_interaction("check", txn, readonly=True)
    assert (count == 0, raw) == ((True, None) if rows else (False, b""))
    assert (await store.recipient_ref(recipient_id) is None) == rows
    return ref.queue_id


@PURGES
@pytest_twisted.ensureDeferred
async def test_unsubscribe_after_a_purge(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient, rows: bool
) -> None:
    """The link (made at delivery, carrying the address) still suppresses the address once
    the message is purged; the page answers as for a live row, never a 404."""
    john, reader = "John.Doe@Example.NET", "reader@example.net"
    ids = await queue(store, john, reader)
    one_click = web.url(f"/u/{codec.unsubscribe_token(ids[john], john)}")
    page = web.url(f"/u/{codec.unsubscribe_token(ids[reader], reader)}")
    queue_id = await purge(store, ids[john], rows)

    response = await http.get(one_click)
    body = (await response.content()).decode("utf-8")
    assert response.code == 200
    assert '<form method="post">' in body
    assert "J***@Example.NET" in body and "John.Doe" not in body
    assert await events(store) == [] and await store.list_suppressions() == []

    for _ in range(2):  # idempotent
        response = await http.post(one_click, data={"List-Unsubscribe": "One-Click"})
        assert response.code == 200 and await response.content() == b"Unsubscribed\n"
        response = await http.post(page, data={"confirm": "yes"})
        body = (await response.content()).decode("utf-8")
        assert response.code == 200
        assert "You are unsubscribed" in body and "r***@example.net" in body
        store.clock.advance(60)  # type: ignore[attr-defined]

    entries = await store.list_suppressions()
    assert [(e.address, e.reason, e.expires_at) for e in entries] == [
        ("john.doe@example.net", "unsubscribe", None),
        ("reader@example.net", "unsubscribe", None),
    ]
    which = "a purged message" if rows else f"message {queue_id}"
    assert [e.note for e in entries] == [
        f"one-click unsubscribe, {which}",
        f"page unsubscribe, {which}",
    ]
    recorded = await events(store)
    assert [(e.type, e.queue_id, e.recipient, e.data) for e in recorded] == [
        ("unsubscribed", None if rows else queue_id, john, {"method": "one-click"}),
        ("unsubscribed", None if rows else queue_id, reader, {"method": "page"}),
    ]
    assert (await store.active_suppressions([john]))["john.doe@example.net"].reason == (
        "unsubscribe"
    )


@PURGES
@pytest_twisted.ensureDeferred
async def test_an_old_unsubscribe_token_works_while_the_row_is_kept(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient, rows: bool
) -> None:
    """A token made before tokens carried the address names the row only: it works after the
    body is purged, and is a 404 (recording nothing) once the row is gone."""
    ids = await queue(store, "reader@example.net")
    url = web.url(f"/u/{codec.unsubscribe_token(ids['reader@example.net'])}")
    queue_id = await purge(store, ids["reader@example.net"], rows)

    response = await http.get(url)
    body = await response.content()
    response_post = await http.post(url, data={"List-Unsubscribe": "One-Click"})
    body_post = await response_post.content()
    if rows:
        assert response.code == 404 and response_post.code == 404
        assert_generic_page(body)
        assert_generic_page(body_post)
        assert await events(store) == [] and await store.list_suppressions() == []
    else:
        assert response.code == 200 and b"r***@example.net" in body
        assert response_post.code == 200 and body_post == b"Unsubscribed\n"
        [event] = await events(store)
        assert (event.queue_id, event.recipient) == (queue_id, "reader@example.net")
        assert [s.address for s in await store.list_suppressions()] == ["reader@example.net"]


@pytest_twisted.ensureDeferred
async def test_an_unsubscribe_token_whose_id_names_another_row(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    """A row whose address is not the one in the token is not the token's recipient (its id
    was given again, e.g. in another database): the token's address is unsubscribed, the
    row's is left alone."""
    ids = await queue(store, "reader@example.net")
    url = web.url(f"/u/{codec.unsubscribe_token(ids['reader@example.net'], 'gone@example.org')}")
    response = await http.get(url)
    body = (await response.content()).decode("utf-8")
    assert response.code == 200 and "g***@example.org" in body and "r***" not in body
    response = await http.post(url, data={"List-Unsubscribe": "One-Click"})
    assert response.code == 200 and await response.content() == b"Unsubscribed\n"
    assert [s.address for s in await store.list_suppressions()] == ["gone@example.org"]
    [event] = await events(store)
    assert (event.queue_id, event.recipient) == (None, "gone@example.org")


@PURGES
@pytest_twisted.ensureDeferred
async def test_open_and_click_after_a_purge(
    web: Server, store: Store, codec: TokenCodec, http: HTTPClient, rows: bool
) -> None:
    """The pixel and the redirect keep working (the URL is in the token); they are recorded
    while the recipient's row is kept (only the body purged), and nothing is once it is gone."""
    ids = await queue(store, "reader@example.net")
    rid = ids["reader@example.net"]
    pixel = web.url(f"/o/{codec.open_token(rid)}.gif")
    target = "https://example.com/offer?id=7&utm_source=mail#top"
    click = web.url(f"/c/{codec.click_token(rid, target)}")
    queue_id = await purge(store, rid, rows)

    for _ in range(2):
        response = await http.get(pixel, headers=hdrs({"User-Agent": BROWSER}))
        assert response.code == 200 and await response.content() == PIXEL_GIF
        assert header(response, "Cache-Control") == NO_CACHE
        response = await http.get(
            click, headers=hdrs({"User-Agent": BROWSER}), allow_redirects=False
        )
        assert response.code == 302 and await response.content() == b""
        assert header(response, "Location") == target
    recorded = await events(store)
    if rows:
        assert recorded == []
    else:
        assert [(e.type, e.queue_id, e.recipient) for e in recorded] == [
            ("opened", queue_id, "reader@example.net"),
            ("clicked", queue_id, "reader@example.net"),
        ] * 2


@pytest_twisted.ensureDeferred
async def test_opens_clicks_and_unsubscribes_are_counted(
    serve: Serve, store: Store, codec: TokenCodec, http: HTTPClient
) -> None:
    metrics = RelayMetrics()
    web = await serve(lambda: succeed(store), metrics=metrics)
    ids = await queue(store, "reader@example.net")
    rid = ids["reader@example.net"]
    for agent in (BROWSER, GMAIL_PROXY, BROWSER):
        response = await http.get(
            web.url(f"/o/{codec.open_token(rid)}.gif"), headers=hdrs({"User-Agent": agent})
        )
        await response.content()
    response = await http.get(web.url("/o/not-a-token.gif"))  # records nothing
    await response.content()
    store.clock.advance(3600)  # type: ignore[attr-defined]
    click = web.url(f"/c/{codec.click_token(rid, 'https://example.com/')}")
    response = await http.get(click, headers=hdrs({"User-Agent": BROWSER}), allow_redirects=False)
    assert response.code == 302
    await response.content()
    unsubscribe = web.url(f"/u/{codec.unsubscribe_token(rid)}")
    for _ in range(2):  # the second records nothing: not counted
        response = await http.post(unsubscribe, data={"List-Unsubscribe": "One-Click"})
        assert response.code == 200
        await response.content()
    value = metrics.registry.get_sample_value
    assert value("smartrelay_opens_total", {"machine": "false"}) == 2
    assert value("smartrelay_opens_total", {"machine": "true"}) == 1
    assert value("smartrelay_clicks_total", {"machine": "false"}) == 1
    assert value("smartrelay_unsubscribes_total", {"method": "one-click"}) == 1
    assert len(await events(store, "opened")) == 3
