"""The webhooks' admin queries (storage/webhook_admin.py) on both engines, over rows written by
SQL as the dispatcher writes them (schema 012): status with backlogs, enable / disable, the
dead-letter list and replay requests."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from smartrelay.events import DeliveredEvent, OpenedEvent
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import START, Store
from smartrelay.storage.webhook_admin import BACKLOG_CAP
from tests.support.webhook_rows import add_events, dead_letter, endpoint, execute

A = "https://a.example/hook"
B = "https://b.example/hook"
GONE = "https://gone.example/hook"
NEW = "https://new.example/hook"


@pytest_twisted.ensureDeferred
async def test_status_of_every_endpoint_with_backlog(store: Store, clock: Clock) -> None:
    assert await store.webhook_endpoints_status({}) == []
    await add_events(store, 3, DeliveredEvent("mx", "250 ok", True, 1), clock.seconds())
    middle = await store.event_head()
    await add_events(store, 4, DeliveredEvent("mx", "250 ok", True, 1), clock.seconds())
    await add_events(store, 5, OpenedEvent(None, None, False), clock.seconds())
    now = clock.seconds()
    await endpoint(store, A, START, last_success_at=store.now_ms() - 60_000, sent_events=3)
    await endpoint(
        store,
        B,
        middle,
        failing_since=store.now_ms() - 3_600_000,
        attempts=7,
        next_attempt_at=store.now_ms() + 30_000,
        last_error="HTTP 503: <b>busy</b>",
        failures=7,
    )
    await endpoint(store, GONE, middle, state="disabled", disabled_at=store.now_ms(),
                   disabled_reason="HTTP 410")  # fmt: skip
    await dead_letter(store, B, 40)
    await dead_letter(store, B, 2)
    await dead_letter(store, GONE, 9)
    configured = {A: ["delivered", "opened"], B: ["delivered"], NEW: ["bounced"]}

    status = {s.url: s for s in await store.webhook_endpoints_status(configured)}
    assert list(status) == sorted([A, B, GONE, NEW])
    a, b, gone, new = status[A], status[B], status[GONE], status[NEW]
    assert (a.state, a.in_config, a.events) == ("active", True, ("delivered", "opened"))
    assert a.position == START and a.backlog == 12 and a.backlog_text == "12"
    assert a.last_success_at == pytest.approx(now - 60) and a.sent_events == 3
    assert (a.dead_letters, a.dead_events, a.failing_since, a.attempts) == (0, 0, None, 0)
    # Only its types, only after its position.
    assert b.backlog == 4 and b.position == middle
    assert b.failing_since == pytest.approx(now - 3600) and b.attempts == 7
    assert b.next_attempt_at == pytest.approx(now + 30) and b.failures == 7
    assert b.last_error == "HTTP 503: <b>busy</b>"
    assert (b.dead_letters, b.dead_events) == (2, 42)
    # Out of the config: kept, marked, its backlog not counted (nothing sends it).
    assert (gone.state, gone.in_config, gone.events, gone.backlog) == ("disabled", False, (), None)
    assert gone.disabled_reason == "HTTP 410" and gone.disabled_at == pytest.approx(now)
    assert (gone.dead_letters, gone.dead_events, gone.backlog_text) == (1, 9, "-")
    # Configured, no relay has sent to it yet.
    assert (new.state, new.in_config, new.position, new.backlog) == ("new", True, None, None)
    assert new.events == ("bounced",)


@pytest_twisted.ensureDeferred
async def test_backlog_stops_counting_at_the_cap(store: Store, clock: Clock) -> None:
    async def txn(cursor: ICursor) -> None:
        # One statement: BACKLOG_CAP + 5 rows, as fast as the engine can.
        if store.engine.name == "sqlite":
            await cursor.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                " INSERT INTO events (type, time) SELECT 'delivered', ? FROM n",
                (BACKLOG_CAP + 5, store.now_ms()),
            )
        else:
            await cursor.execute(
                "INSERT INTO events (type, time, txid) SELECT 'delivered', ?,"
                " pg_current_xact_id() FROM generate_series(1, ?)",
                (store.now_ms(), BACKLOG_CAP + 5),
            )

    await store.run("many", txn)
    await endpoint(store, A, START)
    [status] = await store.webhook_endpoints_status({A: ["delivered"]})
    assert status.backlog == BACKLOG_CAP and status.backlog_capped
    assert status.backlog_text == "100,000+"


@pytest_twisted.ensureDeferred
async def test_enable_and_disable(store: Store, clock: Clock) -> None:
    await add_events(store, 2, DeliveredEvent("mx", "250 ok", True, 1), clock.seconds())
    await endpoint(
        store,
        A,
        START,
        failing_since=store.now_ms() - 1000,
        attempts=4,
        next_attempt_at=store.now_ms() + 600_000,
        last_error="timeout",
        sent_events=10,
        failures=4,
    )
    clock.advance(5)
    assert await store.set_webhook_state(A, "disabled", "maintenance by the receiver")
    [s] = await store.webhook_endpoints_status({A: ["delivered"]})
    assert (s.state, s.disabled_reason) == ("disabled", "maintenance by the receiver")
    assert s.disabled_at == pytest.approx(clock.seconds())
    assert s.attempts == 4 and s.last_error == "timeout"  # disabling keeps the failure run
    assert s.position == START and s.backlog == 2  # and its place

    assert await store.set_webhook_state(A, "active")
    [s] = await store.webhook_endpoints_status({A: ["delivered"]})
    assert (s.state, s.disabled_at, s.disabled_reason) == ("active", None, None)
    # Tried at once: no failure run, no wait; the totals stay.
    assert (s.failing_since, s.attempts, s.next_attempt_at, s.last_error) == (None, 0, None, None)
    assert (s.sent_events, s.failures, s.position) == (10, 4, START)

    # No row: False, unless asked to make it (at the events' head, as the dispatcher does).
    assert not await store.set_webhook_state(NEW, "disabled", "not yet")
    configured = {NEW: ["delivered"]}
    assert [(s.url, s.state) for s in await store.webhook_endpoints_status(configured)] == [
        (A, "active"),
        (NEW, "new"),
    ]
    head = await store.event_head()
    assert await store.set_webhook_state(NEW, "disabled", "not yet", create=True)
    s = (await store.webhook_endpoints_status(configured))[1]
    assert (s.state, s.disabled_reason, s.position, s.backlog) == ("disabled", "not yet", head, 0)
    assert await store.set_webhook_state(NEW, "active", create=True)  # the row exists: kept
    s = (await store.webhook_endpoints_status(configured))[1]
    assert (s.state, s.position) == ("active", head)
    with pytest.raises(ValueError):
        await store.set_webhook_state(A, "paused")  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_dead_letters_and_replay_requests(store: Store, clock: Clock) -> None:
    assert await store.list_dead_letters() == []
    assert await store.request_replay(None) == 0
    assert await store.request_replay(1) == 0
    first = await dead_letter(store, A, 100, "HTTP 500 <script>x</script>")
    clock.advance(1)
    second = await dead_letter(store, B, 7)
    # A replay under way (it got part of the way, then failed): its progress is kept.
    third = await dead_letter(store, B, 3, "timeout", replay_txid=0, replay_id=2)
    listed = await store.list_dead_letters()
    assert [d.id for d in listed] == [first, second, third]
    d = listed[0]
    assert (d.url, d.events, d.attempts) == (A, 100, 12)
    assert d.last_error == "HTTP 500 <script>x</script>"
    assert d.created_at == pytest.approx(clock.seconds() - 1)
    assert d.first_event_at == pytest.approx(d.created_at - 5)
    assert d.last_event_at == pytest.approx(d.created_at - 1)
    assert (d.replay_requested_at, d.replay_started) == (None, False)
    assert listed[2].replay_started
    assert [d.id for d in await store.list_dead_letters(B)] == [second, third]
    assert [d.id for d in await store.list_dead_letters(B, limit=1)] == [second]
    assert await store.list_dead_letters("https://other.example/") == []
    await endpoint(store, GONE, START)
    assert await store.webhook_urls() == {A, B, GONE}

    clock.advance(10)
    assert await store.request_replay(second) == 1
    assert await store.request_replay(second, url=A) == 0  # not A's
    assert await store.request_replay(10_000) == 0
    rows = {d.id: d for d in await store.list_dead_letters()}
    assert rows[second].replay_requested_at == pytest.approx(clock.seconds())
    assert rows[first].replay_requested_at is None and rows[third].replay_requested_at is None

    clock.advance(10)
    assert await store.request_replay_ids(None, url=B) == [second, third]
    rows = {d.id: d for d in await store.list_dead_letters()}
    assert rows[third].replay_requested_at == pytest.approx(clock.seconds())
    progress = await execute(
        store, "SELECT replay_txid, replay_id FROM webhook_dead_letters WHERE id = ?", (third,)
    )
    assert progress == [(0, 2)]
    assert rows[first].replay_requested_at is None
    assert await store.request_replay(None) == 3

    # What --wait watches: gone (sent), failed again, still waiting.
    await execute(store, "DELETE FROM webhook_dead_letters WHERE id = ?", (second,))
    await execute(
        store,
        "UPDATE webhook_dead_letters SET replay_requested_at = NULL, attempts = attempts + 1,"
        " last_error = 'HTTP 502' WHERE id = ?",
        (third,),
    )
    states = await store.dead_letter_states([first, second, third])
    assert [(s.id, s.state, s.last_error) for s in states] == [
        (first, "waiting", None),
        (second, "sent", None),
        (third, "failed", "HTTP 502"),
    ]
