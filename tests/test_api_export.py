"""``GET /api/events`` (smartrelay/web/api.py, docs/api.md) over real HTTP on 127.0.0.1, on
both engines: tokens, filters, the cursor across polls while events are written, CSV, a big
export streamed in chunks under backpressure, a client that leaves or stalls, the limits."""

from __future__ import annotations

import csv
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
import treq
from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, HTTPConnectionPool

from smartrelay.config import SuppressionConfig
from smartrelay.events import CSV_COLUMNS, DeliveredEvent, OpenedEvent, event_data
from smartrelay.listening import ListeningService
from smartrelay.storage.api_tokens import generate_api_token
from smartrelay.storage.store import NewMessage, Store, decode_cursor, to_ms
from smartrelay.tokens import TokenCodec, load_keyring
from smartrelay.web.api import EventApi, FailureLimiter
from smartrelay.web.service import web_service
from smartrelay.web.site import WebRoot
from smartrelay.web.tracking import Tracking
from tests.conftest import real_reactor

T0 = 1_800_000_000.0  # events' times: 2027-01-15


@frozen
class Api:
    url: str
    port: int
    api: EventApi
    token: str
    store: Store


@frozen
class Answer:
    code: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


async def serve(tmp_path: Path, store: Store, **options: Any) -> tuple[ListeningService, Api]:
    codec = TokenCodec(load_keyring(str(tmp_path / "secret.key")))
    tracking = Tracking(lambda: succeed(store), codec, Clock(), SuppressionConfig())
    options.setdefault("failure_delay", 0.0)
    api = EventApi(lambda: succeed(store), real_reactor(), **options)
    fatal: list[str] = []
    service: ListeningService = web_service(
        real_reactor(), "tcp:0:interface=127.0.0.1", WebRoot(tracking, api=api).resource(),
        fatal.append,
    )  # fmt: skip
    service.startService()
    assert fatal == [] and service.port is not None
    port = service.port.getHost().port  # type: ignore[attr-defined]
    token = generate_api_token()
    await store.add_api_token("crm", token)
    return service, Api(f"http://127.0.0.1:{port}", port, api, token, store)


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path, store: Store) -> AsyncIterator[Api]:
    service, api = await serve(tmp_path, store)
    yield api
    await service.stopService()  # type: ignore[misc]


async def request(
    url: str,
    token: str | None,
    params: Sequence[tuple[str, str]] = (),
    method: str = "GET",
    path: str = "/api/events",
    chunks: list[bytes] | None = None,
) -> Answer:
    reactor = real_reactor()
    pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
    agent = Agent(reactor, pool=pool)  # type: ignore[no-untyped-call]
    headers: dict[bytes | str, bytes | str] = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    query = ("?" + urlencode(list(params))) if params else ""
    response = await treq.request(method, url + path + query, agent=agent, headers=headers)
    got: list[bytes] = [] if chunks is None else chunks
    await treq.collect(response, got.append)
    found = {k.decode().lower(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()}
    return Answer(response.code, found, b"".join(got))


async def fill(
    store: Store,
    events: int,
    start: float = T0,
    tags: Sequence[Sequence[str]] = (("welcome",), ("receipt", "eu")),
    blob: int = 0,
) -> None:
    """Messages Q0, Q1, ... (one per ``tags`` entry, with a metadata value of ``blob``
    characters), then ``events`` delivered/opened events over them, one second apart from
    ``start``, written 1,000 per transaction."""
    for i, message_tags in enumerate(tags):
        await store.queue_message(
            NewMessage(
                sender="app@example.com",
                recipients=(f"r{i}@example.net",),
                raw=b"Subject: x\r\n\r\nbody\r\n",
                tags=tuple(message_tags),
                metadata={"blob": "x" * blob} if blob else {},
                queue_id=f"Q{i}",
            )
        )
    await add_events(store, events, start, len(tags))


async def add_events(store: Store, count: int, start: float, messages: int = 2) -> None:
    for first in range(0, count, 1000):
        rows = []
        for i in range(first, min(count, first + 1000)):
            event = (
                DeliveredEvent("mx", "250 ok", True, i)
                if i % 3
                else OpenedEvent("UA", "192.0.2.1", False)
            )
            q = i % messages
            data = json.dumps(event_data(event), sort_keys=True)
            rows.append((event.type, to_ms(start + i), f"Q{q}", f"r{q}@example.net", data))

        async def txn(cursor: Any, rows: list[tuple[Any, ...]] = rows) -> None:
            await cursor.executemany(
                "INSERT INTO events (type, time, queue_id, recipient, data) VALUES (?, ?, ?, ?, ?)",
                rows,
            )

        await store.run("test_events", txn)


async def table_ids(store: Store) -> list[int]:
    async def txn(cursor: Any) -> list[int]:
        await cursor.execute("SELECT id FROM events ORDER BY id")
        return [int(r[0]) for r in cursor.fetchall()]

    return await store.run("test_ids", txn)


# -- authentication ------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_tokens_none_wrong_removed_right(site: Api) -> None:
    await fill(site.store, 3)
    answer = await request(site.url, None)
    assert answer.code == 401 and answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.text.count("\n") == 1 and "Bearer" in answer.text
    altered = site.token[:-1] + ("B" if site.token.endswith("A") else "A")
    for wrong in ("nope", altered, "srt_" + "x" * 43, "x" * 5000):
        answer = await request(site.url, wrong)
        assert answer.code == 401 and "invalid_token" in answer.headers["www-authenticate"]
        assert answer.text == "The token is not valid.\n"
    answer = await request(site.url, site.token)
    assert answer.code == 200 and len(answer.lines()) == 3 + 2  # 2 received events
    other = generate_api_token()
    await site.store.add_api_token("gone", other)
    assert (await request(site.url, other)).code == 200
    assert await site.store.remove_api_token("gone")
    assert (await request(site.url, other)).code == 401
    assert [t.name for t in await site.store.list_api_tokens()] == ["crm"]


@pytest_twisted.ensureDeferred
async def test_wrong_tokens_are_slowed_then_refused(tmp_path: Path, store: Store) -> None:
    limiter = FailureLimiter(real_reactor(), limit=3, window=60.0)
    service, site = await serve(tmp_path, store, failure_delay=1.0, failures=limiter)
    try:
        began = time.monotonic()
        assert (await request(site.url, "srt_wrong")).code == 401
        assert time.monotonic() - began >= 0.9  # the delay of a failure
        began = time.monotonic()
        assert (await request(site.url, site.token)).code == 200
        for _ in range(2):
            assert (await request(site.url, "srt_wrong")).code == 401
        # The 4th attempt in the minute: 429 at once, even with the right token.
        began = time.monotonic()
        for token in ("srt_wrong", site.token):
            answer = await request(site.url, token)
            assert answer.code == 429 and answer.headers["retry-after"] == "60"
            assert answer.text.count("\n") == 1
        assert time.monotonic() - began < 0.9
    finally:
        await service.stopService()  # type: ignore[misc]


def test_failure_limiter_forgets_and_stays_bounded() -> None:
    clock = Clock()
    limiter = FailureLimiter(clock, limit=2, window=60.0, max_clients=3)
    limiter.failed("a")
    limiter.failed("a")
    assert limiter.blocked("a") and not limiter.blocked("b")
    clock.advance(61)
    assert not limiter.blocked("a")
    for name in "bcdef":
        limiter.failed(name)
        limiter.failed(name)
    assert len(limiter._failures) == 3
    assert not limiter.blocked("b") and limiter.blocked("f")


# -- the query ------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_every_filter(site: Api) -> None:
    await fill(site.store, 30, tags=(("welcome",), ("receipt", "eu"), ()))
    everything = (await request(site.url, site.token)).lines()
    assert len(everything) == 33
    assert [e["id"] for e in everything] == sorted(e["id"] for e in everything)

    async def ids(*params: tuple[str, str]) -> list[int]:
        answer = await request(site.url, site.token, params)
        assert answer.code == 200, answer.text
        return [e["id"] for e in answer.lines()]

    def expect(keep: Any) -> list[int]:
        return [e["id"] for e in everything if keep(e)]

    assert await ids(("type", "opened")) == expect(lambda e: e["type"] == "opened")
    both = expect(lambda e: e["type"] in ("opened", "received"))
    assert await ids(("type", "opened,received")) == both
    assert await ids(("type", "opened"), ("type", "received")) == both
    assert await ids(("type", " opened , received")) == both
    assert await ids(("tag", "welcome")) == expect(lambda e: "welcome" in e["tags"])
    either = expect(lambda e: {"welcome", "eu"} & set(e["tags"]))
    assert await ids(("tag", "welcome"), ("tag", "eu")) == either
    assert await ids(("tag", "nothing")) == []
    assert await ids(("tag", "eu"), ("type", "opened")) == expect(
        lambda e: "eu" in e["tags"] and e["type"] == "opened"
    )

    def at(e: dict[str, Any]) -> float:
        return float(decode_time(e["time"]))

    for since in (str(int(T0 + 10)), "2027-01-15T08:00:10Z", "2027-01-15T08:00:10.000+00:00"):
        assert await ids(("since", since)) == expect(lambda e: at(e) >= T0 + 10)
    assert await ids(("since", str(T0 + 10)), ("until", str(T0 + 20))) == expect(
        lambda e: T0 + 10 <= at(e) < T0 + 20
    )
    midnight = T0 - 8 * 3600
    assert await ids(("until", "2027-01-15")) == expect(lambda e: at(e) < midnight)
    assert len(expect(lambda e: at(e) < midnight)) == 3  # the received events (in 2023)
    # A duration ago (from the time now, 2026): the received events are older, the rest newer.
    now = time.time()
    assert await ids(("until", "24h")) == expect(lambda e: at(e) < now - 86400)
    assert await ids(("since", "24h")) == expect(lambda e: at(e) >= now - 86400)
    # A cursor: what came after it.
    first = await request(site.url, site.token)
    cursor = first.headers["x-smartrelay-cursor"]
    assert await ids(("since", cursor)) == []
    await add_events(site.store, 4, T0 + 100)
    later = await request(site.url, site.token, [("since", cursor), ("type", "delivered")])
    assert [e["type"] for e in later.lines()] == ["delivered"] * 2
    assert later.headers["x-smartrelay-cursor"] != cursor


def decode_time(text: str) -> float:
    from smartrelay.timefmt import parse_rfc3339

    return parse_rfc3339(text)


@pytest_twisted.ensureDeferred
async def test_bad_parameters_are_400_with_one_line(site: Api) -> None:
    cursor = (await request(site.url, site.token)).headers["x-smartrelay-cursor"]
    cases: list[tuple[list[tuple[str, str]], str]] = [
        ([("sinse", "1")], "unknown parameter 'sinse'"),
        ([("type", "sent")], "type: unknown event type 'sent'"),
        ([("type", "opened,")], "type: unknown event type ''"),
        ([("type", "")], "type: unknown event type ''"),
        ([("since", "yesterday")], "since: 'yesterday' is neither"),
        ([("since", "")], "since: '' is neither"),
        ([("since", cursor[:-1] + "x")], "since: bad cursor"),
        ([("since", "c1" + "A" * 22 + "A")], "since: bad cursor"),
        ([("since", "1"), ("since", "2")], "since given more than once"),
        ([("until", "2027-02-30")], "until: '2027-02-30' is neither"),
        ([("until", "9" * 100)], "until: "),
        ([("format", "xml")], "format: 'xml' is not jsonl or csv"),
        ([("format", "csv"), ("format", "jsonl")], "format given more than once"),
        ([("tag", "")], "tag: empty or longer than 200 characters"),
        ([("tag", "t" * 201)], "tag: empty or longer"),
        ([("tag", str(i)) for i in range(51)], "tag: at most 50 values"),
        ([("tag", "a\x00b")], "tag: control characters"),
    ]
    for params, text in cases:
        answer = await request(site.url, site.token, params)
        assert answer.code == 400, (params, answer.text)
        assert answer.text.startswith(text) and answer.text.count("\n") == 1, answer.text
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"
        assert len(answer.text) < 200
    # Bytes that are not UTF-8 (percent-encoded on the wire).
    bad = await request(site.url, site.token, path="/api/events?tag=%ff%fe")
    assert bad.code == 400 and bad.text == "tag: not UTF-8\n"


@pytest_twisted.ensureDeferred
async def test_other_methods_and_paths(site: Api) -> None:
    for method in ("HEAD", "POST", "PUT", "DELETE", "PATCH"):
        answer = await request(site.url, site.token, method=method)
        assert answer.code == 405 and answer.headers["allow"] == "GET", method
    for path in ("/api/", "/api/event", "/api/events/x", "/api/events/"):
        answer = await request(site.url, site.token, path=path)
        assert answer.code == 404 and answer.text == "No such API path.\n", path


# -- the cursor across polls --------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_polling_with_the_cursor_while_events_are_written(site: Api) -> None:
    await fill(site.store, 10)
    writing = True

    async def writer() -> None:
        start = T0 + 1000
        while writing:
            await add_events(site.store, 7, start)
            start += 7
            await deferLater(real_reactor(), 0.005, lambda: None)

    written = Deferred.fromCoroutine(writer())
    seen: list[int] = []
    cursor: str | None = None
    polls = 0
    began = time.monotonic()
    while time.monotonic() - began < 3.0 or polls < 10:
        answer = await request(site.url, site.token, [("since", cursor)] if cursor else [])
        assert answer.code == 200
        seen.extend(e["id"] for e in answer.lines())
        cursor = answer.headers["x-smartrelay-cursor"]
        polls += 1
    writing = False
    await written
    final = await request(site.url, site.token, [("since", cursor)] if cursor else [])
    seen.extend(e["id"] for e in final.lines())
    ids = await table_ids(site.store)
    assert len(ids) > 100
    assert len(seen) == len(set(seen))  # no event twice
    assert sorted(seen) == ids  # none lost
    again = await request(site.url, site.token, [("since", final.headers["x-smartrelay-cursor"])])
    assert again.code == 200 and again.body == b""


# -- CSV ------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_csv(site: Api) -> None:
    await fill(site.store, 12)
    answer = await request(site.url, site.token, [("format", "csv"), ("type", "delivered")])
    assert answer.code == 200
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert answer.headers["cache-control"] == "no-store"
    reader = csv.DictReader(io.StringIO(answer.text))
    assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
    rows = list(reader)
    jsonl = (await request(site.url, site.token, [("type", "delivered")])).lines()
    assert len(rows) == len(jsonl) == 8
    for row, event in zip(rows, jsonl, strict=True):
        assert int(row["id"]) == event["id"] and row["type"] == "delivered"
        assert json.loads(row["tags"]) == event["tags"] and row["tls"] == "true"
        assert row["attempt"] == str(event["attempt"])
    # No event: the header alone.
    empty = await request(site.url, site.token, [("format", "csv"), ("tag", "none")])
    assert empty.text == ",".join(CSV_COLUMNS) + "\n"


# -- streaming ------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_big_export_is_streamed_in_chunks(tmp_path: Path, store: Store) -> None:
    service, site = await serve(tmp_path, store, page_size=500)
    try:
        await fill(store, 30_000)
        chunks: list[bytes] = []
        answer = await request(site.url, site.token, chunks=chunks)
        assert answer.code == 200
        assert answer.headers["content-type"] == "application/x-ndjson; charset=utf-8"
        assert answer.headers["cache-control"] == "no-store"
        assert "content-length" not in answer.headers  # chunked: written as it is read
        assert len(chunks) >= 30
        ids = [e["id"] for e in answer.lines()]
        assert ids == await table_ids(store)  # 30,002: every one, once, in order
        assert site.api.pages_read >= 30_002 // 500
        # The cursor is the head taken as the export started. On PostgreSQL the head is the
        # cluster's oldest running transaction, which any later write (the token's
        # last-used time, another database of the cluster) moves on: it is not compared for
        # equality. What a client relies on: polling from it gives no event twice.
        cursor = answer.headers["x-smartrelay-cursor"]
        assert decode_cursor(cursor) <= await store.event_head()
        again = await request(site.url, site.token, [("since", cursor)])
        assert (again.code, again.lines()) == (200, [])
    finally:
        await service.stopService()  # type: ignore[misc]


def _raw_get(port: int, token: str, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\n\r\n"
    )
    return sock


def _read_some(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    return data


def _read_all(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything until the server closes or the terminal chunk arrives; and whether the
    response was complete."""
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):
        try:
            more = sock.recv(1 << 20)
        except ConnectionResetError:
            return data, False
        if not more:
            return data, False
        data += more
    return data, True


async def wait_until(check: Any, within: float = 20.0) -> None:
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < within, "timed out"
        await deferLater(real_reactor(), 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_stops_the_reading(tmp_path: Path, store: Store) -> None:
    service, site = await serve(tmp_path, store, page_size=100)
    try:
        await fill(store, 6_000, blob=2000)  # about 14 MB of JSON in 61 pages
        sock = await deferToThread(_raw_get, site.port, site.token, 8192)
        head = await deferToThread(_read_some, sock, 50_000)
        assert head.startswith(b"HTTP/1.1 200 ")
        await wait_until(lambda: site.api.running == {"crm": 1})
        await deferToThread(sock.close)
        await wait_until(lambda: not site.api.running)
        stopped_at = site.api.pages_read
        await deferLater(real_reactor(), 0.5, lambda: None)
        assert site.api.pages_read == stopped_at < 40  # not one page more, far from the end
    finally:
        await service.stopService()  # type: ignore[misc]


@pytest_twisted.ensureDeferred
async def test_backpressure_holds_the_reading_and_a_stalled_client_is_cut(
    tmp_path: Path, store: Store
) -> None:
    service, site = await serve(tmp_path, store, page_size=100, idle_timeout=2.0)
    try:
        await fill(store, 6_000, blob=2000)
        # A slow reader: reads nothing for a while, then everything.
        sock = await deferToThread(_raw_get, site.port, site.token, 8192)
        await wait_until(lambda: site.api.pages_read > 0)
        await deferLater(real_reactor(), 1.0, lambda: None)
        held = site.api.pages_read
        assert held < 40  # the socket buffers hold a few pages; the reading waits
        data, complete = await deferToThread(_read_all, sock)
        sock.close()
        assert complete and data.count(b'"type":') == 6_002
        assert site.api.pages_read - held > 20
        # A stalled one: cut after the idle timeout, the reading stopped.
        sock = await deferToThread(_raw_get, site.port, site.token, 8192)
        await wait_until(lambda: site.api.running == {"crm": 1})
        began = time.monotonic()
        await wait_until(lambda: not site.api.running, within=30.0)
        assert time.monotonic() - began >= 1.5
        data, complete = await deferToThread(_read_all, sock)
        sock.close()
        assert not complete and data.count(b'"type":') < 3_000
    finally:
        await service.stopService()  # type: ignore[misc]


@pytest_twisted.ensureDeferred
async def test_at_most_two_exports_per_token(tmp_path: Path, store: Store) -> None:
    service, site = await serve(tmp_path, store, page_size=100)
    try:
        await fill(store, 6_000, blob=2000)
        first = await deferToThread(_raw_get, site.port, site.token, 8192)
        second = await deferToThread(_raw_get, site.port, site.token, 8192)
        await wait_until(lambda: site.api.running == {"crm": 2})
        answer = await request(site.url, site.token)
        assert answer.code == 429 and answer.headers["retry-after"] == "10"
        assert answer.text == "2 exports with this token are running already.\n"
        other = generate_api_token()
        await store.add_api_token("other", other)
        assert (await request(site.url, other, [("type", "received")])).code == 200
        for sock in (first, second):
            sock.close()
        await wait_until(lambda: not site.api.running)
        assert (await request(site.url, site.token, [("type", "received")])).code == 200
    finally:
        await service.stopService()  # type: ignore[misc]


@pytest.mark.parametrize("since", ["1", "2026-12-05", "2026-12-05T10:00:00Z", "24h"])
def test_time_forms(since: str) -> None:
    from smartrelay.web.api import parse_query

    query = parse_query({b"since": [since.encode()]}, 1_800_000_000.0)
    assert query.cursor is None and query.filters.since is not None


@pytest_twisted.ensureDeferred
async def test_a_database_failure_in_the_middle_cuts_the_response(
    tmp_path: Path, store: Store
) -> None:
    service, site = await serve(tmp_path, store, page_size=100)
    try:
        await fill(store, 6_000, blob=2000)
        sock = await deferToThread(_raw_get, site.port, site.token, 8192)
        await wait_until(lambda: site.api.pages_read > 0)

        async def txn(cursor: Any) -> None:
            await cursor.execute("ALTER TABLE events RENAME TO events_gone")

        await store.run("test_break", txn)  # the next page's query fails
        data, complete = await deferToThread(_read_all, sock)
        sock.close()
        assert data.startswith(b"HTTP/1.1 200 ") and not complete  # no last chunk
        assert b"Traceback" not in data and data.count(b'"type":') < 6_000
        await wait_until(lambda: not site.api.running)
    finally:
        await service.stopService()  # type: ignore[misc]
