"""Reading events by position (storage/event_positions.py): gap-free, in the order they
become visible, with filters, on both engines; PostgreSQL's late commits are not passed over."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg2
import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from smartrelay.events import DeliveredEvent, OpenedEvent
from smartrelay.storage.engines import create_engine
from smartrelay.storage.migrations import migrate
from smartrelay.storage.store import (
    START,
    EventPosition,
    NewMessage,
    Store,
    decode_cursor,
    encode_cursor,
    insert_events,
    to_ms,
)
from tests.conftest import real_reactor
from tests.support.postgres import PostgresServer


def test_cursor_round_trip_and_tampering() -> None:
    for position in (START, EventPosition(0, 1), EventPosition(2**40 + 7, 123_456_789)):
        cursor = encode_cursor(position)
        assert cursor.startswith("c1") and cursor.isascii()
        assert decode_cursor(cursor) == position
    good = encode_cursor(EventPosition(5, 9))
    for bad in ("", "c1", good[:-1], good + "A", "c2" + good[2:], good.replace("c1", "C1"),
                "c1" + "%" * 22, "c1" + "/" * 22, "c1" + "_" * 22):  # fmt: skip
        with pytest.raises(ValueError, match="bad cursor"):
            decode_cursor(bad)


@given(st.text(max_size=40))
def test_any_text_is_a_cursor_or_a_value_error(text: str) -> None:
    try:
        position = decode_cursor(text)
    except ValueError as error:
        assert str(error) == "bad cursor"
    else:
        assert encode_cursor(position) == text


async def _message(store: Store, queue_id: str, tags: tuple[str, ...] = ()) -> None:
    await store.queue_message(
        NewMessage(
            sender="app@example.com",
            recipients=("a@example.net",),
            raw=b"Subject: x\r\n\r\nbody\r\n",
            client_ip="127.0.0.1",
            credential=None,
            tags=tags,
            queue_id=queue_id,
        )
    )


async def _event(store: Store, queue_id: str | None, event: object, time: float) -> None:
    async def txn(cursor: object) -> None:
        await insert_events(cursor, to_ms(time), [(queue_id, "a@example.net", event)])  # type: ignore[arg-type, list-item]

    await store.run("test_event", txn)


@pytest_twisted.ensureDeferred
async def test_pages_cover_every_event_once_in_order(store: Store) -> None:
    await _message(store, "Q1", ("welcome",))
    await _message(store, "Q2", ("receipt",))
    for i in range(25):
        await _event(store, "Q1" if i % 2 else "Q2", DeliveredEvent("mx", "250", True, i), 1e9 + i)
    head = await store.event_head()
    seen: list[int] = []
    after = START
    while True:
        page = await store.events_after(after, head, 7)
        seen.extend(e.id for e in page.events)
        assert list(page.positions) == sorted(page.positions)
        assert all(after < p <= head for p in page.positions)
        after = page.end
        if page.exhausted:
            break
    assert after == head
    everything = await store.export_events(0, 1000)
    assert seen == [e.id for e in everything]  # received events included, in id order here
    assert len(seen) == len(set(seen)) == 27
    # Nothing more until something new is written; then only that.
    assert (await store.events_after(head, await store.event_head(), 100)).events == ()
    await _event(store, None, OpenedEvent("UA", "192.0.2.1", False), 2e9)
    page = await store.events_after(head, await store.event_head(), 100)
    assert [e.type for e in page.events] == ["opened"] and page.exhausted


@pytest_twisted.ensureDeferred
async def test_filters(store: Store) -> None:
    await _message(store, "Q1", ("welcome", "x"))
    await _message(store, "Q2", ("receipt",))
    for i in range(10):
        await _event(store, "Q1" if i % 2 else "Q2", DeliveredEvent("mx", "250", True, i), 1000 + i)
    head = await store.event_head()

    async def all_of(**filters: object) -> list[tuple[str, str | None, float]]:
        out: list[tuple[str, str | None, float]] = []
        after = START
        while True:
            page = await store.events_after(after, head, 3, **filters)  # type: ignore[arg-type]
            out.extend((e.type, e.queue_id, e.time) for e in page.events)
            after = page.end
            if page.exhausted:
                return out

    assert len(await all_of()) == 12
    assert {t for t, _, _ in await all_of(types=("received",))} == {"received"}
    assert len(await all_of(types=("delivered",))) == 10
    assert {q for _, q, _ in await all_of(tags=("welcome",))} == {"Q1"}
    assert len(await all_of(tags=("welcome",), types=("delivered",))) == 5
    assert [t for _, _, t in await all_of(types=("delivered",), since=1003, until=1006)] == [
        1003.0, 1004.0, 1005.0,
    ]  # fmt: skip
    assert await all_of(tags=("nope",)) == []
    assert await store.count_events_between(START, head) == 12
    assert await store.count_events_between(START, head, ("delivered",)) == 10
    assert await store.count_events_between(START, head, cap=4) == 4
    start = await store.position_before_time(1005)
    page = await store.events_after(start, head, 100, since=1005, until=2000)
    assert [e.time for e in page.events] == [1005.0 + i for i in range(5)]
    # No event that late: start at the head (nothing before it to scan).
    assert await store.position_before_time(3e9) == head


@pytest_twisted.async_yield_fixture
async def pg_store(postgres_server: PostgresServer) -> AsyncIterator[tuple[Store, str]]:
    """A store on a fresh PostgreSQL database, and its URL (only PostgreSQL commits a later
    id first: SQLite has one writer at a time)."""
    url = postgres_server.create_database()
    engine = create_engine(real_reactor(), url)
    await engine.start()
    await migrate(engine, 0)
    clock = Clock()
    clock.advance(1_700_000_000)
    yield Store(engine, clock), url
    await engine.close()
    postgres_server.drop_database(url)


@pytest_twisted.ensureDeferred
async def test_a_late_commit_is_read_after_it_commits_never_skipped(
    pg_store: tuple[Store, str],
) -> None:
    store, database_url = pg_store
    await _event(store, None, OpenedEvent(None, None, False), 1.0)
    early = await store.event_head()
    # A transaction that takes its id first and commits last.
    slow = psycopg2.connect(database_url)
    try:
        with slow.cursor() as cursor:
            cursor.execute(
                "INSERT INTO events (type, time, data) VALUES ('opened', 2000, '{\"slow\": true}')"
            )
        await _event(store, None, OpenedEvent("fast", None, False), 3.0)
        held = await store.event_head()
        page = await store.events_after(early, held, 100)
        # The fast one (a higher id, committed) waits behind the slow one's transaction: a
        # reader going by id would have moved past the slow one's lower id for ever.
        assert page.events == () and page.end == held
        slow.commit()
    finally:
        slow.close()
    page = await store.events_after(early, await store.event_head(), 100)
    assert [e.data.get("slow", False) for e in page.events] == [True, False]
