"""The database gauges' queries (smartrelay/storage/metrics_queries.py), on both engines."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from smartrelay.metrics import DatabaseFigures, DestinationFigures, WebhookFigures
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.metrics_queries import TOP_DESTINATIONS
from smartrelay.storage.store import NewFeedback, NewMessage, Store


async def execute(store: Store, sql: str, *args: object) -> None:
    async def txn(cursor: ICursor) -> None:
        await cursor.execute(sql, args)

    await store.run("test", txn)


@pytest_twisted.ensureDeferred
async def test_an_empty_database_has_empty_figures(store: Store) -> None:
    figures = await store.metrics_figures((("http://hook.test/", ("delivered",)),))
    assert figures == DatabaseFigures(
        read_at=store.clock.seconds(),
        queue=(),
        feedback_reports=(),
        credentials_held=0,
        webhooks=(),
    )


@pytest_twisted.ensureDeferred
async def test_the_queue_by_destination_its_oldest_age_and_other(
    store: Store, clock: Clock
) -> None:
    # The oldest message of b.test waits since t0, then a.test's three recipients arrive.
    t0 = clock.seconds()
    await store.queue_message(NewMessage("s@x.test", ("one@b.test",), b"Subject: 1\r\n\r\n1"))
    clock.advance(100)
    await store.queue_message(
        NewMessage("s@x.test", ("a1@a.test", "a2@A.test", "a3@a.test", "b2@b.test"), b"x\r\n")
    )
    clock.advance(50)
    figures = await store.metrics_figures()
    assert figures.queue == (
        DestinationFigures("a.test", 3, 50.0),
        DestinationFigures("b.test", 2, 150.0),
    )
    assert figures.read_at == t0 + 150
    # A delivered recipient leaves the queue (a final state has no next attempt).
    [claimed] = [c for c in await store.claim_due("n", 10, 60) if c.address == "one@b.test"]
    await execute(
        store, "UPDATE recipients SET next_attempt_at = NULL, state = 'delivered' WHERE id = ?",
        claimed.id,
    )  # fmt: skip
    figures = await store.metrics_figures()
    assert DestinationFigures("b.test", 1, 50.0) in figures.queue


@pytest_twisted.ensureDeferred
async def test_past_the_top_destinations_the_rest_is_other(store: Store, clock: Clock) -> None:
    # TOP_DESTINATIONS domains with 2 recipients each, then 3 domains with 1 (the oldest).
    await store.queue_message(
        NewMessage("s@x.test", tuple(f"r@small{i}.test" for i in range(3)), b"x\r\n")
    )
    clock.advance(10)
    recipients = tuple(
        f"{who}@big{i:02}.test" for i in range(TOP_DESTINATIONS) for who in ("p", "q")
    )
    await store.queue_message(NewMessage("s@x.test", recipients, b"x\r\n"))
    figures = await store.metrics_figures()
    assert len(figures.queue) == TOP_DESTINATIONS + 1
    assert {d.destination for d in figures.queue[:-1]} == {
        f"big{i:02}.test" for i in range(TOP_DESTINATIONS)
    }
    assert all(d.recipients == 2 and d.oldest_age == 0 for d in figures.queue[:-1])
    assert figures.queue[-1] == DestinationFigures("other", 3, 10.0)


@pytest_twisted.ensureDeferred
async def test_reports_held_credentials_and_webhooks(store: Store, clock: Clock) -> None:
    for _ in range(3):
        await store.store_feedback(NewFeedback("", ("b@bounces.test",), b"x\r\n"))
    await execute(
        store,
        "UPDATE feedback_reports SET state = 'ignored' WHERE report_id IN"
        " (SELECT report_id FROM feedback_reports ORDER BY report_id LIMIT 1)",
    )
    now_ms = store.now_ms()
    for name, held in (("app1", None), ("app2", now_ms), ("app3", now_ms)):
        await store.smtp_credentials.add(name, "hash")
        await execute(
            store,
            "INSERT INTO credential_volume (credential, windows, updated_at, held_at)"
            " VALUES (?, 0, ?, ?)",
            name, now_ms, held,
        )  # fmt: skip
    # Events: 4 recipients' received events; the first endpoint has taken none of them.
    await store.queue_message(
        NewMessage("s@x.test", ("a@a.test", "b@a.test", "c@a.test", "d@a.test"), b"x\r\n")
    )
    head = await store.event_head()
    for url, state, position in (
        ("http://one.test/", "active", (0, 0)),
        ("http://two.test/", "disabled", (head.txid, head.id)),
        ("http://gone.test/", "active", (0, 0)),
    ):
        await execute(
            store,
            "INSERT INTO webhook_endpoints (url, position_txid, position_id, state, failures,"
            " sent_events, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            url, position[0], position[1], state, len(url), 2 * len(url), now_ms,
        )  # fmt: skip
    for _ in range(2):
        await execute(
            store,
            "INSERT INTO webhook_dead_letters (url, after_txid, after_id, upto_txid, upto_id,"
            " events, created_at, attempts, last_error) VALUES (?, 0, 0, 0, 1, 1, ?, 3, 'x')",
            "http://two.test/", now_ms,
        )  # fmt: skip
    configured = (
        ("http://one.test/", ("received", "delivered")),
        ("http://two.test/", ("received",)),
        ("http://new.test/", ("received",)),  # no row yet: no figures
    )
    figures = await store.metrics_figures(configured)
    assert figures.feedback_reports == (("ignored", 1), ("new", 2))
    assert figures.credentials_held == 2
    assert figures.webhooks == (
        WebhookFigures("http://gone.test/", False, 17, 34, 0, None),  # not configured
        WebhookFigures("http://one.test/", False, 16, 32, 0, 4),
        WebhookFigures("http://two.test/", True, 16, 32, 2, 0),
    )
    # Types count: an endpoint of other types has no backlog of received events.
    figures = await store.metrics_figures((("http://one.test/", ("bounced",)),))
    assert [w.backlog for w in figures.webhooks] == [None, 0, None]
