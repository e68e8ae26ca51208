"""The reports' store methods (storage/reports.py, schema 010), on both engines."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from smartrelay.events import (
    BouncedEvent,
    ClickedEvent,
    ComplainedEvent,
    DeferredEvent,
    DeliveredEvent,
    EventData,
    OpenedEvent,
)
from smartrelay.storage import migrations
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from smartrelay.storage.migrations import migrate
from smartrelay.storage.reports import (
    MAX_PAGE,
    MAX_TIMELINE,
    MessageFilters,
    MessagePage,
    decode_cursor,
    encode_cursor,
    metadata_filter,
)
from smartrelay.storage.rollups import normalise_url
from smartrelay.storage.store import NewMessage, RecipientRef, Store, insert_events
from tests.conftest import real_reactor

DAY = 86400.0


async def queue(
    store: Store,
    clock: Clock,
    sender: str,
    recipients: tuple[str, ...],
    subject: str = "hello",
    tags: tuple[str, ...] = (),
    metadata: dict[str, str] | None = None,
) -> str:
    """Queue a message one second after the previous one; its queue id."""
    clock.advance(1)
    raw = f"From: {sender}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    queued = await store.queue_message(
        NewMessage(sender, recipients, raw, tags=tags, metadata=metadata or {})
    )
    return queued.queue_id


async def execute(store: Store, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute(sql, args)
        if sql.startswith("SELECT"):
            return [tuple(r) for r in cursor.fetchall()]
        return []

    return await store.engine.run_interaction("test", txn)


async def set_state(store: Store, queue_id: str, address: str, state: str) -> None:
    pending = state in ("queued", "deferred", "delivering")
    await execute(
        store,
        "UPDATE recipients SET state = ?, next_attempt_at = ?, last_reply = ?"
        " WHERE queue_id = ? AND address = ?",
        (state, store.now_ms() if pending else None, f"reply {state}", queue_id, address),
    )


async def add_events(store: Store, time: float, rows: list[tuple[str, str, EventData]]) -> None:
    async def txn(cursor: ICursor) -> None:
        await insert_events(cursor, round(time * 1000), rows)

    await store.engine.run_interaction("events", txn)


async def everything(store: Store, filters: MessageFilters, limit: int = 50) -> list[str]:
    """The queue ids of every page of a search."""
    found: list[str] = []
    after = None
    while True:
        page = await store.search_messages(filters, after, limit)
        found += [r.queue_id for r in page.rows]
        if page.next_cursor is None:
            return found
        after = page.next_cursor


class Corpus:
    """Seven messages with different senders, recipients, tags, metadata and outcomes."""

    def __init__(self, ids: list[str], first: float) -> None:
        self.ids = ids
        self.first = first

    def newest_first(self, *indexes: int) -> list[str]:
        return [self.ids[i] for i in sorted(indexes, reverse=True)]


async def corpus(store: Store, clock: Clock) -> Corpus:
    first = clock.seconds() + 1
    ids = [
        await queue(store, clock, "App@Shop.example", ("Ann@Gmail.com", "bob@yahoo.com"),
                    tags=("welcome",), metadata={"user": "42", "plan": "pro"}),
        await queue(store, clock, "news@shop.example", ("carl@gmail.com",),
                    tags=("newsletter", "welcome"), metadata={"user": "43"}),
        await queue(store, clock, "alerts@bank.example", ("ann@gmail.com",),
                    tags=("alert",), metadata={"user": "42"}),
        await queue(store, clock, "a%b@odd.example", ("a%b@odd.example", "axb@odd.example")),
        await queue(store, clock, "x_y@odd.example", ("x_y@odd.example",),
                    metadata={"k=v": "w", "quote": "it's \"x\""}),
        await queue(store, clock, "app@shop.example", ("dora@outlook.com",), tags=("welcome",)),
        await queue(store, clock, "ops@bank.example", ("eve@gmail.com", "fred@gmail.com")),
    ]  # fmt: skip
    await set_state(store, ids[0], "Ann@Gmail.com", "delivered")
    await set_state(store, ids[0], "bob@yahoo.com", "bounced")
    await set_state(store, ids[1], "carl@gmail.com", "deferred")
    await set_state(store, ids[2], "ann@gmail.com", "delivered")
    await set_state(store, ids[3], "a%b@odd.example", "suppressed")
    await set_state(store, ids[3], "axb@odd.example", "expired")
    await set_state(store, ids[4], "x_y@odd.example", "dropped")
    await set_state(store, ids[6], "eve@gmail.com", "delivered")
    return Corpus(ids, first)


@pytest_twisted.ensureDeferred
async def test_search_by_every_filter(store: Store, clock: Clock) -> None:
    c = await corpus(store, clock)
    cases: list[tuple[MessageFilters, list[int]]] = [
        (MessageFilters(), [0, 1, 2, 3, 4, 5, 6]),
        (MessageFilters(queue_id=c.ids[2]), [2]),
        (MessageFilters(queue_id="nope"), []),
        # Recipient: exact (any case), or a whole domain.
        (MessageFilters(recipient="ann@gmail.com"), [0, 2]),
        (MessageFilters(recipient="ANN@GMAIL.COM"), [0, 2]),
        (MessageFilters(recipient="@gmail.com"), [0, 1, 2, 6]),
        (MessageFilters(recipient="@Yahoo.Com"), [0]),
        (MessageFilters(recipient="gmail.com"), []),  # not an address: no partial match
        # Sender: exact or domain.
        (MessageFilters(sender="app@shop.example"), [0, 5]),
        (MessageFilters(sender="@shop.example"), [0, 1, 5]),
        (MessageFilters(sender="@bank.example"), [2, 6]),
        (MessageFilters(tag="welcome"), [0, 1, 5]),
        (MessageFilters(tag="Welcome"), []),  # tags are exact
        (MessageFilters(metadata=("user", "42")), [0, 2]),
        (MessageFilters(metadata=("user", "4")), []),
        (MessageFilters(metadata=("k=v", "w")), [4]),
        (MessageFilters(metadata=("k", "v=w")), []),
        (MessageFilters(metadata=("quote", 'it\'s "x"')), [4]),
        # Time range: received in [since, until).
        (MessageFilters(since=c.first + 2, until=c.first + 5), [2, 3, 4]),
        (MessageFilters(since=c.first + 5), [5, 6]),
        (MessageFilters(until=c.first + 1), [0]),
        # Outcome: any recipient in that state now.
        (MessageFilters(outcome="delivered"), [0, 2, 6]),
        (MessageFilters(outcome="bounced"), [0]),
        (MessageFilters(outcome="deferred"), [1]),
        (MessageFilters(outcome="queued"), [5, 6]),
        (MessageFilters(outcome="expired"), [3]),
        (MessageFilters(outcome="suppressed"), [3]),
        (MessageFilters(outcome="dropped"), [4]),
        # Several filters: all must match.
        (MessageFilters(recipient="@gmail.com", tag="welcome"), [0, 1]),
        (MessageFilters(recipient="@gmail.com", outcome="delivered"), [0, 2, 6]),
        (MessageFilters(sender="@shop.example", metadata=("user", "42"), tag="welcome"), [0]),
        (MessageFilters(tag="welcome", since=c.first + 1), [1, 5]),
        (MessageFilters(tag="welcome", outcome="queued"), [5]),
        (MessageFilters(queue_id=c.ids[0], outcome="deferred"), []),
        (MessageFilters(queue_id=c.ids[1], recipient="@gmail.com"), [1]),
        # Blank values are not filters.
        (MessageFilters(recipient=" ", sender="", tag="", outcome=""), [0, 1, 2, 3, 4, 5, 6]),
    ]
    for filters, expected in cases:
        assert await everything(store, filters) == c.newest_first(*expected), filters
        # The same in pages of one: the cursor carries the position, not the filters.
        assert await everything(store, filters, limit=1) == c.newest_first(*expected), filters


@pytest_twisted.ensureDeferred
async def test_search_rows_summarise_the_message(store: Store, clock: Clock) -> None:
    c = await corpus(store, clock)
    page = await store.search_messages(MessageFilters(queue_id=c.ids[0]))
    (row,) = page.rows
    assert page.next_cursor is None
    assert row.queue_id == c.ids[0]
    assert row.received_at == c.first
    assert row.sender == "App@Shop.example"
    assert row.recipients == 2
    assert row.states == (("bounced", 1), ("delivered", 1))
    assert row.first_recipients == (("Ann@Gmail.com", "delivered"), ("bob@yahoo.com", "bounced"))
    assert row.subject == "hello"
    assert row.tags == ("welcome",)
    assert row.size > 0 and not row.body_purged

    # An encoded subject is decoded; a purged body has none.
    clock.advance(1)
    raw = b"Subject: =?utf-8?q?caf=C3=A9_<b>?=\r\nX: y\r\n\r\nbody"
    queued = await store.queue_message(NewMessage("s@x.example", ("r@y.example",), raw))
    (row,) = (await store.search_messages(MessageFilters(queue_id=queued.queue_id))).rows
    assert row.subject == "caf\u00e9 <b>"
    await execute(store, "DELETE FROM message_bodies WHERE queue_id = ?", (queued.queue_id,))
    (row,) = (await store.search_messages(MessageFilters(queue_id=queued.queue_id))).rows
    assert row.subject is None and row.body_purged

    # Only the first recipients are named (in the order given), whatever their number.
    clock.advance(1)
    many = tuple(f"r{n}@z.example" for n in (5, 1, 9, 3, 7))
    queued = await store.queue_message(NewMessage("s@x.example", many, b"Subject: x\r\n\r\n"))
    page = await store.search_messages(MessageFilters(sender="s@x.example"))
    assert [r.recipients for r in page.rows] == [5, 1]
    assert page.rows[0].first_recipients == tuple((a, "queued") for a in many[:3])
    assert page.rows[1].first_recipients == (("r@y.example", "queued"),)
    # A page of the most rows there can be (the first recipients are read 100 at a time).
    for n in range(MAX_PAGE - 2):
        await store.queue_message(NewMessage("s@x.example", (f"m{n}@z.example",), b"\r\n"))
    page = await store.search_messages(MessageFilters(sender="s@x.example"), limit=MAX_PAGE)
    assert len(page.rows) == MAX_PAGE and page.next_cursor is None
    assert all(len(r.first_recipients) == min(r.recipients, 3) for r in page.rows)
    assert page.rows[-1].first_recipients == (("r@y.example", "queued"),)


@pytest_twisted.ensureDeferred
async def test_keyset_pages_never_repeat_or_skip_when_mail_arrives(
    store: Store, clock: Clock
) -> None:
    old = [await queue(store, clock, "a@s.example", (f"u{i}@r.example",)) for i in range(23)]
    # Two messages in the same millisecond: the queue id orders them.
    clock.advance(1)
    same = [
        (await store.queue_message(NewMessage("a@s.example", ("z@r.example",), b"x"))).queue_id
        for _ in range(2)
    ]
    expected = sorted(same, reverse=True) + old[::-1]
    cutoff = clock.seconds() + 0.5
    seen: list[str] = []
    after = None
    for n in range(100):
        page = await store.search_messages(MessageFilters(sender="@s.example"), after, limit=4)
        seen += [r.queue_id for r in page.rows]
        # New mail between pages (newer than every row: never on a later page).
        await queue(store, clock, "a@s.example", (f"new{n}@r.example",))
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert seen == expected
    # The same over the messages index (no term filter), with a time range.
    seen = []
    after = None
    while True:
        page = await store.search_messages(MessageFilters(until=cutoff), after, 5)
        seen += [r.queue_id for r in page.rows]
        await queue(store, clock, "b@s.example", ("x@r.example",))
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert seen == expected


@pytest_twisted.ensureDeferred
async def test_a_tampered_cursor_is_a_clear_error(store: Store, clock: Clock) -> None:
    ids = [await queue(store, clock, "a@s.example", ("r@r.example",)) for _ in range(3)]
    page = await store.search_messages(MessageFilters(), limit=1)
    assert page.next_cursor is not None
    assert decode_cursor(page.next_cursor, (int, str))[1] == ids[2]
    bad = [
        "",
        "!!!!",
        page.next_cursor[:-3],
        page.next_cursor + "x",
        encode_cursor(1),  # wrong shape
        encode_cursor("1", ids[0]),  # wrong type
        encode_cursor(-1, ids[0]),  # out of range
        encode_cursor(2**63, ids[0]),
        encode_cursor(1, "x" * 201),
        "A" * 400,
        "eyJhIjoxfQ",  # {"a":1}
        "WzEsIjEiXQ==\u00e9",
    ]
    for cursor in bad:
        with pytest.raises(ValueError, match="bad page cursor"):
            await store.search_messages(MessageFilters(), after=cursor)
    with pytest.raises(ValueError, match="bad page cursor"):
        await store.deferred_messages("r.example", after=page.next_cursor)
    with pytest.raises(ValueError, match="bad page cursor"):
        await store.recent_feedback(after=encode_cursor(1))
    # A well-formed position the store never made is only a position.
    forged = encode_cursor(2**62, "'; DROP TABLE messages; --")
    assert [r.queue_id for r in (await store.search_messages(MessageFilters(), forged)).rows] == (
        ids[::-1]
    )


@pytest_twisted.ensureDeferred
async def test_hostile_filter_text_is_only_ever_a_value(store: Store, clock: Clock) -> None:
    c = await corpus(store, clock)
    literal = c.newest_first(3)
    # % and _ are literal characters, never wildcards.
    assert await everything(store, MessageFilters(recipient="a%b@odd.example")) == literal
    assert await everything(store, MessageFilters(recipient="a_b@odd.example")) == []
    assert await everything(store, MessageFilters(recipient="%")) == []
    assert await everything(store, MessageFilters(recipient="@%")) == []
    assert await everything(store, MessageFilters(sender="%@odd.example")) == []
    assert await everything(store, MessageFilters(sender="x_y@odd.example")) == c.newest_first(4)
    assert await everything(store, MessageFilters(sender="x%y@odd.example")) == []
    assert await everything(store, MessageFilters(tag="%")) == []
    assert await everything(store, MessageFilters(tag="_elcome")) == []
    hostile = [
        "' OR '1'='1",
        '" OR 1=1 --',
        "x'); DROP TABLE messages; --",
        "a@b.example' UNION SELECT queue_id, 1 FROM messages --",
        "\\",
        "*",
    ]
    for text in hostile:
        for filters in (
            MessageFilters(recipient=text),
            MessageFilters(recipient="@" + text.replace("@", "")),
            MessageFilters(sender=text),
            MessageFilters(tag=text),
            MessageFilters(metadata=(text, text)),
            MessageFilters(queue_id=text),
        ):
            assert await everything(store, filters) == [], filters
    assert len(await everything(store, MessageFilters())) == 7  # nothing dropped
    with pytest.raises(ValueError, match="NUL"):  # PostgreSQL text cannot hold one
        await store.search_messages(MessageFilters(recipient="a\x00@b.example"))
    with pytest.raises(ValueError, match="unknown outcome"):
        await store.search_messages(MessageFilters(outcome="delivered' OR 'x'='x"))
    with pytest.raises(ValueError, match="not a domain"):
        await store.search_messages(MessageFilters(recipient="@"))
    with pytest.raises(ValueError, match="too long"):
        await store.search_messages(MessageFilters(tag="x" * 600))
    with pytest.raises(ValueError, match="limit"):
        await store.search_messages(MessageFilters(), limit=0)


@pytest_twisted.ensureDeferred
async def test_message_detail_and_its_timeline_in_time_order(store: Store, clock: Clock) -> None:
    clock.advance(1)
    raw = (
        b"From: App <app@shop.example>\r\nSubject: =?utf-8?b?w6l0w6k=?=\r\n"
        b"X-Bad: =?utf-8?q?\xff?=\r\n\r\nbody\r\n"
    )
    queued = await store.queue_message(
        NewMessage(
            "app@shop.example",
            ("a@x.example", "b@y.example"),
            raw,
            client_ip="192.0.2.9",
            credential="shop",
            tags=("t1",),
            metadata={"user": "<script>"},
        )
    )
    q = queued.queue_id
    received = clock.seconds()
    claimed = {c.address: c for c in await store.claim_due("n", 10, 60)}
    a = claimed["a@x.example"]
    # Events written out of time order: a later one first (its id is smaller).
    await add_events(store, received + 30, [(q, "a@x.example", OpenedEvent("UA", None, False))])
    await add_events(
        store, received + 10, [(q, "a@x.example", DeliveredEvent("mx.x", "250 ok", True, 1))]
    )
    await add_events(
        store, received + 10, [(q, "b@y.example", DeferredEvent("mx.y", "451 later", 1, "t"))]
    )
    await add_events(
        store,
        received + 30,
        [(q, "a@x.example", ClickedEvent("UA", None, False, "https://x.example/?a=1"))],
    )
    await set_state(store, q, "a@x.example", "delivered")
    detail = await store.message_detail(q)
    assert detail is not None
    assert detail.message_kept and not detail.body_purged
    assert (detail.sender, detail.client_ip, detail.credential) == (
        "app@shop.example",
        "192.0.2.9",
        "shop",
    )
    assert detail.received_at == received and detail.size == len(raw)
    assert detail.tags == ("t1",) and detail.metadata == {"user": "<script>"}
    assert detail.subject == "\u00e9t\u00e9"
    assert detail.headers is not None and detail.headers[0] == ("From", "App <app@shop.example>")
    assert [h[0] for h in detail.headers] == ["From", "Subject", "X-Bad"]
    assert [(r.address, r.state) for r in detail.recipients] == [
        ("a@x.example", "delivered"),
        ("b@y.example", "delivering"),
    ]
    assert detail.recipients[0].id == a.id
    order = [(e.time - received, e.type, e.recipient) for e in detail.timeline]
    assert order == [
        (0, "received", "a@x.example"),
        (0, "received", "b@y.example"),
        (10, "delivered", "a@x.example"),
        (10, "deferred", "b@y.example"),
        (30, "opened", "a@x.example"),
        (30, "clicked", "a@x.example"),
    ]
    ids = [e.id for e in detail.timeline]
    assert ids[4] < ids[2]  # the open, written first, has a smaller id than the delivery
    assert detail.timeline[2].data == {"mx": "mx.x", "reply": "250 ok", "tls": True, "attempt": 1}
    assert not detail.timeline_truncated

    # Body purged: no subject or headers; message row gone: the events remain.
    await execute(store, "DELETE FROM message_bodies WHERE queue_id = ?", (q,))
    detail = await store.message_detail(q)
    assert detail is not None and detail.body_purged and detail.subject is None
    assert detail.headers is None
    await execute(store, "DELETE FROM messages WHERE queue_id = ?", (q,))
    detail = await store.message_detail(q)
    assert detail is not None and not detail.message_kept and detail.sender is None
    assert len(detail.timeline) == 6
    assert await store.message_detail("unknown") is None


@pytest_twisted.ensureDeferred
async def test_timeline_is_bounded(store: Store, clock: Clock) -> None:
    q = await queue(store, clock, "a@s.example", ("r@r.example",))
    click = ClickedEvent("bot", None, True, "https://x.example/")
    await add_events(store, clock.seconds() + 5, [(q, "r@r.example", click)] * MAX_TIMELINE)
    detail = await store.message_detail(q)
    assert detail is not None and detail.timeline_truncated
    assert len(detail.timeline) == MAX_TIMELINE
    assert detail.timeline[0].type == "received"


@pytest_twisted.ensureDeferred
async def test_queue_by_destination(store: Store, clock: Clock) -> None:
    q1 = await queue(store, clock, "a@s.example", ("a@Gmail.com", "b@gmail.com", "c@yahoo.com"))
    q2 = await queue(store, clock, "a@s.example", ("d@gmail.com", "e@outlook.com"))
    q3 = await queue(store, clock, "a@s.example", ("f@gmail.com",))
    await set_state(store, q3, "f@gmail.com", "delivered")  # finished: not in the queue
    claimed = {c.address: c for c in await store.claim_due("n", 10, 60)}
    assert "f@gmail.com" not in claimed
    clock.advance(5)
    await execute(
        store,
        "UPDATE recipients SET state = 'deferred', attempts = 1, last_reply = ?,"
        " updated_at = ?, next_attempt_at = ?, lease_owner = NULL WHERE address = ?",
        ("451 4.7.1 first", store.now_ms() - 1000, store.now_ms() + 60_000, "a@Gmail.com"),
    )
    await execute(
        store,
        "UPDATE recipients SET state = 'deferred', attempts = 2, last_reply = ?,"
        " updated_at = ?, next_attempt_at = ?, lease_owner = NULL WHERE address = ?",
        ("421 4.7.0 latest", store.now_ms(), store.now_ms() + 30_000, "d@gmail.com"),
    )
    groups = await store.deferred_by_destination()
    assert [(g.domain, g.recipients, g.deferred) for g in groups] == [
        ("gmail.com", 3, 2),
        ("outlook.com", 1, 0),
        ("yahoo.com", 1, 0),
    ]
    gmail = groups[0]
    assert gmail.last_reply == "421 4.7.0 latest"
    assert gmail.oldest_received_at == clock.seconds() - 5 - 2
    assert groups[1].last_reply is None
    assert [g.domain for g in await store.deferred_by_destination(limit=1)] == ["gmail.com"]

    page = await store.deferred_messages("GMAIL.com", limit=2)
    assert [(r.queue_id, r.address) for r in page.rows] == [
        (q1, "a@Gmail.com"),
        (q1, "b@gmail.com"),
    ]
    assert page.rows[0].last_reply == "451 4.7.1 first" and page.rows[0].attempts == 1
    assert page.next_cursor is not None
    page = await store.deferred_messages("gmail.com", after=page.next_cursor, limit=2)
    assert [(r.queue_id, r.address) for r in page.rows] == [(q2, "d@gmail.com")]
    assert page.next_cursor is None

    # Retry a destination: its waiting rows are due now (the live claim on b is kept).
    assert await store.retry_destination("Gmail.com") == 2
    due = {r.address: r for r in (await store.deferred_messages("gmail.com")).rows}
    assert due["a@Gmail.com"].next_attempt_at == clock.seconds()
    assert due["b@gmail.com"].state == "delivering"

    # Drop a destination: dropped events as drop_message writes, messages finished.
    clock.advance(100)  # the claim's lease has run out
    assert await store.drop_destination("gmail.com", "web user ann") == 3
    assert [g.domain for g in await store.deferred_by_destination()] == [
        "outlook.com",
        "yahoo.com",
    ]
    rows = await execute(
        store,
        "SELECT queue_id, recipient, data FROM events WHERE type = 'dropped'"
        " ORDER BY queue_id, recipient",
    )
    assert rows == [
        (q1, "a@Gmail.com", '{"by": "web user ann"}'),
        (q1, "b@gmail.com", '{"by": "web user ann"}'),
        (q2, "d@gmail.com", '{"by": "web user ann"}'),
    ]
    detail = await store.message_detail(q1)
    assert detail is not None
    assert {r.address: r.state for r in detail.recipients} == {
        "a@Gmail.com": "dropped",
        "b@gmail.com": "dropped",
        "c@yahoo.com": "delivering",
    }
    assert detail.recipients[0].last_reply == "dropped by web user ann"
    assert detail.finished_at is None  # c is still to deliver
    assert await store.drop_destination("yahoo.com", "ann") == 1
    detail = await store.message_detail(q1)
    assert detail is not None and detail.finished_at == clock.seconds()
    assert await store.drop_destination("yahoo.com", "ann") == 0
    assert await store.retry_destination("nowhere.example") == 0


@pytest_twisted.ensureDeferred
async def test_recent_feedback_with_its_diagnostics(store: Store, clock: Clock) -> None:
    q = await queue(store, clock, "a@s.example", ("u@x.example", "v@x.example"))
    t = store.now_ms()
    bounce = BouncedEvent("invalid-recipient", True, "5.1.1", "550 no such user", "dsn")
    await add_events(store, (t + 20) / 1000, [(q, "u@x.example", bounce)])
    complaint = ComplainedEvent("abuse", "fbl.example")
    await add_events(store, (t + 30) / 1000, [(q, "v@x.example", complaint)])
    reports = [
        ("R1", t + 10, "bounce", "processed", q, "u@x.example", t + 20, "bounced: ..."),
        ("R2", t + 25, "complaint", "processed", q, "v@x.example", t + 30, "complained"),
        ("R3", t + 26, "bounce", "unmatched", None, None, t + 26, "no token"),
        ("R4", t + 27, None, "new", None, None, None, ""),
        # A second DSN for u: the diagnostics of the first (the event it duplicated).
        ("R5", t + 40, "bounce", "processed", q, "u@x.example", t + 41, "duplicate"),
    ]
    for rid, received, kind, state, queue_id, recipient, processed, reason in reports:
        await execute(
            store,
            "INSERT INTO feedback_reports (report_id, received_at, sender, recipients, state,"
            " raw, kind, queue_id, recipient, processed_at, reason)"
            " VALUES (?, ?, '', '[]', ?, ?, ?, ?, ?, ?, ?)",
            (rid, received, state, b"x", kind, queue_id, recipient, processed, reason),
        )
    page = await store.recent_feedback()
    assert [r.report_id for r in page.rows] == ["R5", "R4", "R3", "R2", "R1"]
    by_id = {r.report_id: r for r in page.rows}
    assert by_id["R1"].diagnostics == {
        "category": "invalid-recipient",
        "hard": True,
        "status": "5.1.1",
        "reply": "550 no such user",
        "source": "dsn",
    }
    assert by_id["R5"].diagnostics == by_id["R1"].diagnostics
    assert by_id["R2"].diagnostics == {"feedback_type": "abuse", "source": "fbl.example"}
    assert by_id["R3"].diagnostics is None and by_id["R3"].reason == "no token"
    assert by_id["R4"].kind is None and by_id["R4"].processed_at is None
    kinds = await store.recent_feedback(kind="bounce")
    assert [r.report_id for r in kinds.rows] == ["R5", "R3", "R1"]
    states = await store.recent_feedback(state="processed", kind="bounce")
    assert [r.report_id for r in states.rows] == ["R5", "R1"]
    # Keyset pages.
    seen: list[str] = []
    after = None
    while True:
        page = await store.recent_feedback(after=after, limit=2)
        seen += [r.report_id for r in page.rows]
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert seen == ["R5", "R4", "R3", "R2", "R1"]
    assert (await store.recent_feedback(kind="' OR 1=1 --")).rows == ()


async def engagement_traffic(store: Store, clock: Clock) -> None:
    """Deliveries, bounces and clicks on personalised URLs over two hours."""
    q1 = await queue(
        store, clock, "a@Shop.example", ("a@gmail.com", "b@gmail.com"), tags=("promo",)
    )
    q2 = await queue(store, clock, "a@other.example", ("c@yahoo.com", "d@gmail.com"))
    claimed = {c.address: c for c in await store.claim_due("n", 10, 60)}
    refs = {a: RecipientRef(c.id, c.queue_id, a, "a@shop.example") for a, c in claimed.items()}
    delivered = DeliveredEvent("mx", "250 ok", True, 1)
    await add_events(
        store,
        clock.seconds(),
        [
            (q1, "a@gmail.com", delivered),
            (q1, "b@gmail.com", BouncedEvent("invalid-recipient", True, "5.1.1", "550", "smtp")),
            (q2, "c@yahoo.com", delivered),
            (q2, "d@gmail.com", delivered),
        ],
    )
    clicks = [
        ("a@gmail.com", "https://Shop.Example/p?u=1#top", False),
        ("a@gmail.com", "https://shop.example/p?u=2", False),
        ("b@gmail.com", "https://shop.example/p?u=3", True),
        ("c@yahoo.com", "https://shop.example/other", False),
        ("d@gmail.com", "https://shop.example/p", False),
    ]
    for address, url, machine in clicks:
        clock.advance(1800)
        await store.record_engagement(refs[address], ClickedEvent("UA", None, machine, url))
    opened = OpenedEvent("UA", None, False)
    await store.record_engagement(refs["c@yahoo.com"], opened)


@pytest_twisted.ensureDeferred
async def test_top_domains_and_urls(store: Store, clock: Clock) -> None:
    start = clock.seconds()
    await engagement_traffic(store, clock)
    assert await store.roll_up(clock.seconds() + 1, 1000) == 14
    since, until = start - 3600, clock.seconds() + 3600
    domains = await store.top_recipient_domains(since, until)
    assert [(d.domain, d.received, d.delivered, d.bounced) for d in domains] == [
        ("gmail.com", 3, 2, 1),
        ("yahoo.com", 1, 1, 0),
    ]
    assert domains[0].delivery_rate == pytest.approx(2 / 3)
    assert domains[0].bounce_rate == pytest.approx(1 / 3)
    assert [d.domain for d in await store.top_recipient_domains(since, until, limit=1)] == [
        "gmail.com"
    ]
    promo = await store.top_recipient_domains(since, until, tag="promo")
    assert [(d.domain, d.received, d.bounced) for d in promo] == [("gmail.com", 2, 1)]
    other = await store.top_recipient_domains(since, until, sender_domain="Other.example")
    assert [(d.domain, d.received) for d in other] == [("gmail.com", 1), ("yahoo.com", 1)]
    assert await store.top_recipient_domains(until, until + 3600) == []

    urls = await store.top_urls(since, until)
    assert [(u.url, u.clicks, u.machine_clicks, u.human_clicks) for u in urls] == [
        ("https://shop.example/p", 4, 1, 3),
        ("https://shop.example/other", 1, 0, 1),
    ]
    promo_urls = await store.top_urls(since, until, tag="promo")
    assert [(u.url, u.clicks) for u in promo_urls] == [("https://shop.example/p", 3)]
    # The period: hours beginning in [since, until).
    assert await store.top_urls(until, until + 3600) == []
    assert [u.url for u in await store.top_urls(since, until, limit=1)] == [
        "https://shop.example/p"
    ]


async def url_rows(engine: IDatabaseEngine) -> list[tuple[Any, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute(
            "SELECT hour, tag, url, count, machine_count FROM rollup_urls ORDER BY hour, tag, url"
        )
        return [tuple(r) for r in cursor.fetchall()]

    return await engine.run_interaction("rows", txn, readonly=True)


@pytest_twisted.ensureDeferred
async def test_url_rollup_is_idempotent_across_passes_and_a_restart(
    database_url: str, clock: Clock
) -> None:
    engine = create_engine(real_reactor(), database_url)
    await engine.start()
    try:
        await migrate(engine, 0)
        store = Store(engine, clock)
        await engagement_traffic(store, clock)
        # Counted in small batches, up to a horizon in the middle of the clicks.
        middle = clock.seconds() - 2 * 1800 + 1
        while await store.roll_up(middle, 3) == 3:
            pass
        half = await url_rows(engine)
        assert sum(r[3] for r in half if r[1] == "*") == 3
        assert await store.roll_up(middle, 1000) == 0  # again: nothing more
        assert await url_rows(engine) == half
    finally:
        await engine.close()
    # A restart: a new engine and store on the same database carry on where it stopped.
    engine = create_engine(real_reactor(), database_url)
    await engine.start()
    try:
        store = Store(engine, clock)
        assert await store.roll_up(clock.seconds() + 1, 1000) == 3
        assert await store.roll_up(clock.seconds() + 1, 1000) == 0
        rows = await url_rows(engine)
        star = [(r[2], r[3], r[4]) for r in rows if r[1] == "*"]
        totals: dict[str, list[int]] = {}
        for url, count, machine in star:
            cell = totals.setdefault(url, [0, 0])
            cell[0] += count
            cell[1] += machine
        assert totals == {"https://shop.example/p": [4, 1], "https://shop.example/other": [1, 0]}
        assert {r[1] for r in rows} == {"*", "promo"}
    finally:
        await engine.close()


def test_metadata_filter_text() -> None:
    assert metadata_filter(" user = 42 ") == ("user", "42")
    assert metadata_filter("k=v=w") == ("k", "v=w")
    assert metadata_filter("k=") == ("k", "")
    assert metadata_filter("  ") is None
    for bad in ("user", "=42"):
        with pytest.raises(ValueError, match="key=value"):
            metadata_filter(bad)


def test_url_normalisation() -> None:
    assert normalise_url("HTTPS://User:pw@Shop.Example:8443/a/b?x=1#f") == (
        "https://shop.example:8443/a/b"
    )
    assert normalise_url("https://shop.example") == "https://shop.example"
    assert normalise_url("mailto:x@y.example?subject=1") == "mailto://x@y.example"
    assert normalise_url("not a url") == "not a url"
    assert normalise_url("http://[::1") == "http://[::1"  # does not parse: kept as it is
    long = normalise_url("https://x.example/" + "\u00e9" * 3000)
    assert len(long) <= 2000 and len(long.encode()) <= 2000


@pytest_twisted.ensureDeferred
async def test_terms_are_written_with_the_message_and_purged_with_it(
    store: Store, clock: Clock
) -> None:
    q = await queue(
        store, clock, "A@S.example", ("b@R.example", "c@r.example"), tags=("t",),
        metadata={"k": "v", "long": "x" * 600},
    )  # fmt: skip
    rows = await execute(store, "SELECT term FROM message_terms WHERE queue_id = ?", (q,))
    assert sorted(r[0] for r in rows) == [
        'm:["k","v"]',
        "r:b@r.example",
        "r:c@r.example",
        "rd:r.example",
        "s:a@s.example",
        "sd:s.example",
        "t:t",
    ]  # the long metadata value is not a term
    await set_state(store, q, "b@R.example", "delivered")
    await set_state(store, q, "c@r.example", "delivered")
    await execute(store, "UPDATE messages SET finished_at = ? WHERE queue_id = ?", (1, q))
    batch = await store.purge_messages(store.now_ms(), 100, 1 << 20)
    assert batch.rows == 1
    assert await execute(store, "SELECT COUNT(*) FROM message_terms") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_migration_fills_terms_and_url_counts_of_what_is_stored(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = migrations.load_deltas()
    monkeypatch.setattr(migrations, "load_deltas", lambda: [d for d in every if d.version < 10])
    engine = create_engine(real_reactor(), database_url)
    await engine.start()
    try:
        assert await migrate(engine, 0) == list(range(1, 10))

        async def old_data(cursor: ICursor) -> None:
            for n in range(3):
                await cursor.execute(
                    "INSERT INTO messages (queue_id, received_at, sender, size, tags, metadata)"
                    " VALUES (?, ?, ?, 10, ?, ?)",
                    (
                        f"Q{n}",
                        1000 * n,
                        f"app@S{n}.example",
                        json.dumps([f"tag{n}", "all"]),
                        json.dumps({"user": str(n)}),
                    ),
                )
                await cursor.execute(
                    "INSERT INTO recipients (queue_id, address, domain, state, updated_at)"
                    " VALUES (?, ?, ?, 'delivered', 0)",
                    (f"Q{n}", f"U{n}@Gmail.com", "gmail.com"),
                )
            click = json.dumps({"url": "https://x.example/a?u=1", "machine": False})
            for n, time_ms in enumerate((5000, 6000, 7_200_000)):
                await cursor.execute(
                    "INSERT INTO events (type, time, queue_id, recipient, data)"
                    " VALUES ('clicked', ?, ?, ?, ?)",
                    (time_ms, f"Q{n}", f"U{n}@Gmail.com", click),
                )
            await cursor.execute(
                "INSERT INTO rollups (hour, tag, sender_domain, recipient_domain, type, detail,"
                " count, unique_count) VALUES (3600000, '*', 's0.example', 'gmail.com',"
                " 'delivered', '', 5, 0)"
            )
            # The roll-ups had counted the first two clicks.
            await cursor.execute(
                "INSERT INTO rollup_progress (name, time_ms, last_id) VALUES ('rollups', 6500, 0)"
            )

        await engine.run_interaction("old", old_data)
        monkeypatch.setattr(migrations, "load_deltas", lambda: every)
        assert (await migrate(engine, 0))[0] == 10
        store = Store(engine, Clock())
        assert await everything(store, MessageFilters(tag="all")) == ["Q2", "Q1", "Q0"]
        assert await everything(store, MessageFilters(recipient="u1@gmail.com")) == ["Q1"]
        assert await everything(store, MessageFilters(sender="@s2.example")) == ["Q2"]
        assert await everything(store, MessageFilters(metadata=("user", "0"))) == ["Q0"]
        assert await url_rows(engine) == [
            (0, "*", "https://x.example/a", 2, 0),
            (0, "all", "https://x.example/a", 2, 0),
            (0, "tag0", "https://x.example/a", 1, 0),
            (0, "tag1", "https://x.example/a", 1, 0),
        ]
        # The summaries of the roll-ups already there.
        assert await store.rollup_totals(0, 7200) == {("delivered", ""): (5, 0)}
        (gmail,) = await store.top_recipient_domains(0, DAY)
        assert (gmail.domain, gmail.delivered) == ("gmail.com", 5)
        # The third click is counted by the next pass, once.
        assert await store.roll_up(8_000, 100) == 1
        assert [r[3] for r in await url_rows(engine) if r[1] == "*"] == [2, 1]
    finally:
        await engine.close()


@pytest_twisted.ensureDeferred
async def test_empty_results(store: Store) -> None:
    assert await store.search_messages(MessageFilters()) == MessagePage((), None)
    assert await store.deferred_by_destination() == []
    assert (await store.deferred_messages("x.example")).rows == ()
    assert (await store.recent_feedback()).rows == ()
    assert await store.top_urls(0, 1e10) == []
    assert await store.top_recipient_domains(0, 1e10) == []


@pytest_twisted.ensureDeferred
async def test_summaries_agree_with_the_hourly_rollups_over_days(
    store: Store, clock: Clock
) -> None:
    """top_recipient_domains reads whole UTC days from rollups_by_domain_day and the hours at
    the ends from rollups; rollup_totals without a domain reads rollups_by_tag: the same
    counts as the hourly rows for any period."""
    start = clock.seconds()
    domains = ["a.example", "b.example", "c.example"]
    delivered = DeliveredEvent("mx", "250 ok", True, 1)
    bounce = BouncedEvent("policy", True, "5.7.1", "550", "smtp")
    for n in range(24):  # a message every 5 hours over 5 days
        clock.advance(5 * 3600)
        rcpts = tuple(f"u{n}.{k}@{domains[(n + k) % 3]}" for k in range(1 + n % 3))
        q = await queue(store, clock, f"s@{'x' if n % 2 else 'y'}.example", rcpts, tags=("t",))
        await add_events(
            store,
            clock.seconds() + 60,
            [(q, r, bounce if (n + k) % 4 == 0 else delivered) for k, r in enumerate(rcpts)]
            + [(q, rcpts[0], ClickedEvent("UA", None, n % 5 == 0, f"https://l.example/{n % 4}"))],
        )
    assert await store.roll_up(clock.seconds() + 3600, 10_000) > 0
    day = 86400.0
    first_day = start - start % day
    windows = [
        (start - day, clock.seconds() + day),  # everything
        (first_day + day, first_day + 3 * day),  # two whole days
        (first_day + day + 7200, first_day + 3 * day + 3600 * 5 + 1),  # days and both ends
        (first_day + day + 7200, first_day + day + 9 * 3600),  # within one day
        (first_day + 2 * day - 1800, first_day + 2 * day + 1800),  # across midnight
    ]
    for since, until in windows:
        for tag in (None, "t", "x"):
            expected = []
            for d in domains:
                totals = await store.rollup_totals(since, until, tag, recipient_domain=d)
                counts = {t: sum(c for (ty, _), (c, _) in totals.items() if ty == t)
                          for t in ("received", "delivered", "bounced")}  # fmt: skip
                if counts["received"] or counts["delivered"] or counts["bounced"]:
                    expected.append((d, counts["received"], counts["delivered"], counts["bounced"]))
            expected.sort(key=lambda e: (-e[1], e[0]))
            got = await store.top_recipient_domains(since, until, tag)
            assert [(g.domain, g.received, g.delivered, g.bounced) for g in got] == expected
            # rollups_by_tag: the sum of the per-domain hourly rows.
            whole: dict[tuple[str, str], list[int]] = {}
            for d in domains:
                for key, (c, u) in (
                    await store.rollup_totals(since, until, tag, recipient_domain=d)
                ).items():
                    cell = whole.setdefault(key, [0, 0])
                    cell[0] += c
                    cell[1] += u
            totals = await store.rollup_totals(since, until, tag)
            assert {k: list(v) for k, v in totals.items()} == whole
            series = await store.rollup_series(since, until, tag)
            assert sum(c for hour in series.values() for c, _ in hour.values()) == sum(
                c for c, _ in whole.values()
            )
            # rollup_urls_by_day: the hourly rows' sums.
            rows = await execute(
                store,
                "SELECT url, SUM(count), SUM(machine_count) FROM rollup_urls"
                " WHERE tag = ? AND hour >= ? AND hour < ? GROUP BY url",
                ("*" if tag is None else tag, round(since * 1000), round(until * 1000)),
            )
            urls = await store.top_urls(since, until, tag)
            assert sorted((u.url, u.clicks, u.machine_clicks) for u in urls) == sorted(rows)
            assert [u.clicks for u in urls] == sorted((u.clicks for u in urls), reverse=True)
    # With a sender domain (not in the daily table): the hourly rows only.
    got = await store.top_recipient_domains(
        start - day, clock.seconds() + day, sender_domain="x.example"
    )
    assert sum(g.received for g in got) == sum(1 + n % 3 for n in range(24) if n % 2)
