"""The webhook sender's queries (storage/webhooks.py) on both engines: the row made at the
head, the lease (taken, refused, expired, renewed, released), and every write conditional on
holding it (and acknowledging on the position)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from smartrelay.events import DeliveredEvent, OpenedEvent
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import START, EventPosition, Store, insert_events, to_ms

URL = "https://crm.example/hook"


async def events(store: Store, kinds: str) -> list[EventPosition]:
    """One event per letter (d: delivered, o: opened), one transaction each; positions."""
    for kind in kinds:
        event = (
            DeliveredEvent("mx", "250", True, 1) if kind == "d" else OpenedEvent(None, None, False)
        )

        async def txn(cursor: ICursor, event: object = event) -> None:
            await insert_events(cursor, to_ms(store.clock.seconds()), [(None, "a@x.org", event)])  # type: ignore[list-item]

        await store.run("test_event", txn)
    head = await store.event_head()
    page = await store.events_after(START, head, 10_000)
    return list(page.positions)


async def row(store: Store) -> tuple[object, ...]:
    async def txn(cursor: ICursor) -> tuple[object, ...]:
        await cursor.execute(
            "SELECT position_txid, position_id, state, failing_since, attempts, last_error,"
            " sent_events, failures, lease_owner, lease_until, disabled_reason"
            " FROM webhook_endpoints WHERE url = ?",
            (URL,),
        )
        found = cursor.fetchone()
        assert found is not None
        return tuple(found)

    return await store.run("test_row", txn, readonly=True)


@pytest_twisted.ensureDeferred
async def test_made_at_the_head_once(store: Store) -> None:
    await events(store, "dd")
    head = await store.event_head()
    await store.ensure_webhook_endpoint(URL)
    await events(store, "d")
    await store.ensure_webhook_endpoint(URL)  # already there: unchanged
    endpoint = await store.webhook_lease(URL, "a", 60, 30)
    assert endpoint is not None and endpoint.position == head and endpoint.state == "active"
    assert await store.webhook_lease("https://none/", "a", 60, 30) is None


@pytest_twisted.ensureDeferred
async def test_lease_taken_refused_expired_renewed_released(store: Store, clock: Clock) -> None:
    await store.ensure_webhook_endpoint(URL)
    a = await store.webhook_lease(URL, "a", 60, 30)
    assert a is not None and a.held and a.lease_owner == "a"
    until = a.lease_until
    b = await store.webhook_lease(URL, "b", 60, 30)
    assert b is not None and not b.held and b.lease_owner == "a"
    clock.advance(20)  # 40 s left: not renewed (no write)
    again = await store.webhook_lease(URL, "a", 60, 30)
    assert again is not None and again.held and again.lease_until == until
    clock.advance(15)  # 25 s left: renewed
    again = await store.webhook_lease(URL, "a", 60, 30)
    assert again is not None and again.held and again.lease_until == clock.seconds() + 60
    clock.advance(61)  # expired: b takes it over
    b = await store.webhook_lease(URL, "b", 60, 30)
    assert b is not None and b.held and b.lease_owner == "b"
    a = await store.webhook_lease(URL, "a", 60, 30)
    assert a is not None and not a.held
    await store.release_webhook_lease(URL, "a")  # not a's: nothing
    assert (await row(store))[8] == "b"
    await store.release_webhook_lease(URL, "b")
    assert (await row(store))[8:10] == (None, None)
    a = await store.webhook_lease(URL, "a", 60, 30)
    assert a is not None and a.held


@pytest_twisted.ensureDeferred
async def test_writes_need_the_lease_and_the_position(store: Store, clock: Clock) -> None:
    await store.ensure_webhook_endpoint(URL)
    positions = await events(store, "ddoddo")
    start = (await store.webhook_lease(URL, "a", 60, 30)).position  # type: ignore[union-attr]
    assert start == START or start < positions[0]
    # Not the holder: nothing changes.
    assert not await store.webhook_advance(URL, "b", start, positions[1], 2)
    assert await store.webhook_failed(URL, "b", "x", clock.seconds() + 5) is None
    assert not await store.webhook_disable(URL, "b", "410")
    assert await store.webhook_dead_letter(URL, "b", start, positions[-1], (), 1, "x") is None
    before = await row(store)
    assert before[6:8] == (0, 0) and before[2] == "active"
    # The holder, from the wrong position: nothing.
    assert not await store.webhook_advance(URL, "a", positions[0], positions[1], 1)
    assert await store.webhook_advance(URL, "a", start, positions[1], 2)
    r = await row(store)
    assert (int(r[0]), int(r[1])) == (positions[1].txid, positions[1].id) and r[6] == 2  # type: ignore[call-overload]
    # A failure run: started once, counted.
    first = await store.webhook_failed(URL, "a", "500 oops", clock.seconds() + 2)
    clock.advance(10)
    second = await store.webhook_failed(URL, "a", "503 later", clock.seconds() + 4)
    assert first is not None and second is not None
    assert second.failing_since == first.failing_since == clock.seconds() - 10
    assert second.attempts == 2 and second.last_error == "503 later"
    assert second.next_attempt_at == clock.seconds() + 4
    # Dead-lettered: only the opened ones counted; the position moves to the end.
    dead_id = await store.webhook_dead_letter(
        URL, "a", positions[1], positions[-1], ("opened",), 2, "503 later"
    )
    assert dead_id
    r = await row(store)
    assert (int(r[0]), int(r[1])) == (positions[-1].txid, positions[-1].id)  # type: ignore[call-overload]
    assert r[7] == 2  # failures

    async def dead(cursor: ICursor) -> list[tuple[object, ...]]:
        await cursor.execute(
            "SELECT events, attempts, last_error, first_event_at IS NOT NULL FROM"
            " webhook_dead_letters"
        )
        return [tuple(x) for x in cursor.fetchall()]

    assert await store.run("dead", dead) == [(2, 2, "503 later", True)]
    # A range without any of the types: the position moves, no row.
    more = await events(store, "d")
    assert (
        await store.webhook_dead_letter(URL, "a", positions[-1], more[-1], ("opened",), 3, "x") == 0
    )
    assert len(await store.run("dead", dead)) == 1
    # A success ends the run.
    assert await store.webhook_advance(URL, "a", more[-1], more[-1], 1)
    r = await row(store)
    assert r[3] is None and r[4] == 0 and r[5] is None
    assert await store.webhook_disable(URL, "a", "410 Gone from the receiver")
    assert (await row(store))[2] == "disabled"


@pytest_twisted.ensureDeferred
async def test_replay_progress_and_failure(store: Store) -> None:
    await store.ensure_webhook_endpoint(URL)
    positions = await events(store, "dodod")
    start = (await store.webhook_lease(URL, "a", 60, 30)).position  # type: ignore[union-attr]
    dead_id = await store.webhook_dead_letter(URL, "a", start, positions[-1], (), 4, "500")
    assert dead_id
    assert await store.webhook_replay_next(URL) is None  # no replay asked for

    async def ask(cursor: ICursor) -> None:
        await cursor.execute("UPDATE webhook_dead_letters SET replay_requested_at = 1")

    await store.run("ask", ask)
    dead = await store.webhook_replay_next(URL)
    assert dead is not None and dead.resume == dead.after == start and dead.upto == positions[-1]
    assert not await store.webhook_replay_progress(dead, "b", positions[1], 2)  # not b's lease
    assert await store.webhook_replay_progress(dead, "a", positions[1], 2)
    dead = await store.webhook_replay_next(URL)
    assert dead is not None and dead.resume == positions[1]
    assert await store.webhook_replay_failed(dead, "a", "502 bad gateway")
    assert await store.webhook_replay_next(URL) is None  # the request cleared, the row kept
    await store.run("ask", ask)
    dead = await store.webhook_replay_next(URL)
    assert dead is not None and dead.resume == positions[1] and dead.attempts == 5
    assert await store.webhook_replay_progress(dead, "a", positions[-1], 3)
    assert await store.webhook_replay_next(URL) is None
    assert (await row(store))[6] == 5  # sent_events

    async def left(cursor: ICursor) -> int:
        await cursor.execute("SELECT COUNT(*) FROM webhook_dead_letters")
        found = cursor.fetchone()
        return int(found[0]) if found else -1

    assert await store.run("left", left) == 0
