"""The feedback processor on both engines: matching by each route, effects and suppression,
idempotency, the states and their reasons, and the service that runs it.

The classifier is injected: each test builds the typed :class:`Report` the parsers would
return (feedback/model.py), so these tests do not depend on the parsers' tables. The
end-to-end test (tests/test_feedback_e2e.py) runs the real classifier on real DSNs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import Clock, deferLater

from smartrelay.config import Config, InboundConfig, ServerConfig
from smartrelay.events import DeliveredEvent
from smartrelay.feedback.model import (
    ClassifiedRecipient,
    Complaint,
    FailedRecipient,
    Report,
    ReturnedMessage,
)
from smartrelay.feedback.processor import (
    FeedbackOutcome,
    FeedbackProcessor,
    FeedbackService,
    UnknownReport,
)
from smartrelay.metrics import RelayMetrics
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.store import NewFeedback, NewMessage, Store, insert_events
from smartrelay.tokens import TokenCodec, load_keyring
from tests.conftest import real_reactor
from tests.support.purge import purge_message_rows

DOMAIN = "bounces.example.com"
HOSTNAME = "relay.example.com"
CONFIG = Config(
    server=ServerConfig(hostname=HOSTNAME), inbound=InboundConfig(return_path_domain=DOMAIN)
)
DAY = 86400.0


@pytest.fixture
def codec(tmp_path: Path) -> TokenCodec:
    return TokenCodec(load_keyring(str(tmp_path / "secret.key")))


class Classifier:
    """Returns the report registered for the raw bytes; counts its calls."""

    def __init__(self) -> None:
        self.reports: dict[bytes, Report] = {}
        self.calls = 0

    def add(self, raw: bytes, report: Report) -> bytes:
        self.reports[raw] = report
        return raw

    def __call__(self, raw: bytes) -> Report:
        self.calls += 1
        return self.reports[raw]


@pytest.fixture
def classify() -> Classifier:
    return Classifier()


def processor_for(
    store: Store, codec: TokenCodec, classify: Callable[[bytes], Report], **kwargs: Any
) -> FeedbackProcessor:
    config = kwargs.pop("config", CONFIG)
    return FeedbackProcessor(lambda: succeed(store), codec, config, classify, **kwargs)


@pytest.fixture
def processor(store: Store, codec: TokenCodec, classify: Classifier) -> FeedbackProcessor:
    return processor_for(store, codec, classify)


# -- helpers ---------------------------------------------------------------------------------
async def queue(store: Store, *recipients: str) -> tuple[str, dict[str, int]]:
    """Queue one message: its queue id and the recipients' ids by address."""
    queued = await store.queue_message(
        NewMessage(
            sender="app@example.com", recipients=recipients, raw=b"Subject: hi\r\n\r\nhi\r\n"
        )
    )

    async def txn(cursor: ICursor) -> dict[str, int]:
        await cursor.execute(
            "SELECT address, id FROM recipients WHERE queue_id = ?", (queued.queue_id,)
        )
        return {str(r[0]): int(r[1]) for r in cursor.fetchall()}

    return queued.queue_id, await store.run("ids", txn, readonly=True)


async def delivered(store: Store, queue_id: str, address: str) -> None:
    async def txn(cursor: ICursor) -> None:
        await insert_events(
            cursor,
            store.now_ms(),
            [(queue_id, address, DeliveredEvent("mx.example.net", "250 ok", True, 1))],
        )

    await store.run("delivered", txn)


async def receive(store: Store, raw: bytes, *recipients: str) -> str:
    return await store.store_feedback(
        NewFeedback(sender="", recipients=recipients or (f"postmaster@{DOMAIN}",), raw=raw)
    )


@frozen
class Event:
    type: str
    queue_id: str | None
    recipient: str | None
    data: dict[str, Any]


async def events(store: Store) -> list[Event]:
    async def txn(cursor: ICursor) -> list[Event]:
        await cursor.execute(
            "SELECT type, queue_id, recipient, data FROM events"
            " WHERE type NOT IN ('received', 'delivered') ORDER BY id"
        )
        return [Event(str(r[0]), r[1], r[2], json.loads(r[3])) for r in cursor.fetchall()]

    return await store.run("events", txn, readonly=True)


async def suppressions(store: Store) -> dict[str, str]:
    return {s.address: s.reason for s in await store.list_suppressions()}


def bounce(
    address: str,
    status: str = "5.1.1",
    category: str = "invalid-recipient",
    hard: bool = True,
    action: str = "failed",
    diagnostic: str = "smtp; 550 5.1.1 user unknown",
    returned: ReturnedMessage | None = None,
) -> Report:
    recipient = FailedRecipient(address, action, status, 550, diagnostic)
    return Report(
        "bounce",
        (ClassifiedRecipient(recipient, category, hard),),
        bounce_source="dsn",
        returned=returned,
    )


def verp(codec: TokenCodec, recipient_id: int) -> str:
    return f"b+{codec.verp_token(recipient_id)}@{DOMAIN}"


# -- matching, route by route -------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_verp_bounce_records_the_bounce_and_suppresses(
    store: Store, codec: TokenCodec, classify: Classifier, processor: FeedbackProcessor
) -> None:
    queue_id, ids = await queue(store, "John@Example.NET", "other@example.net")
    await delivered(store, queue_id, "John@Example.NET")
    raw = classify.add(b"dsn 1", bounce("john@example.net"))
    report_id = await receive(store, raw, verp(codec, ids["John@Example.NET"]))

    outcome = await processor.process(report_id)

    assert outcome == FeedbackOutcome(
        report_id,
        "processed",
        "bounced: invalid-recipient (hard) for John@Example.NET",
        "bounce",
        "verp",
        queue_id,
        "John@Example.NET",
        events=1,
    )
    assert await events(store) == [
        Event(
            "bounced",
            queue_id,
            "John@Example.NET",
            {
                "category": "invalid-recipient",
                "hard": True,
                "status": "5.1.1",
                "reply": "smtp; 550 5.1.1 user unknown",
                "source": "dsn",
            },
        )
    ]
    assert await suppressions(store) == {"john@example.net": "hard_bounce"}
    [summary] = await store.list_feedback()
    assert (summary.state, summary.matched_by, summary.queue_id) == ("processed", "verp", queue_id)
    assert summary.processed_at == store.clock.seconds()


@pytest_twisted.ensureDeferred
async def test_verp_names_the_recipient_whatever_address_the_report_names(
    store: Store, codec: TokenCodec, classify: Classifier, processor: FeedbackProcessor
) -> None:
    """A forwarded recipient: the DSN's Final-Recipient is the forward target."""
    _, ids = await queue(store, "alias@example.org")
    raw = classify.add(
        b"dsn fwd", bounce("real.person@elsewhere.example", "5.2.2", "mailbox-full", False)
    )
    outcome = await processor.process(
        await receive(store, raw, verp(codec, ids["alias@example.org"]))
    )
    assert (outcome.state, outcome.recipient) == ("processed", "alias@example.org")
    [event] = await events(store)
    assert (event.recipient, event.data["category"], event.data["hard"]) == (
        "alias@example.org",
        "mailbox-full",
        False,
    )
    assert await suppressions(store) == {}  # one soft bounce: counted, not yet suppressed


@pytest_twisted.ensureDeferred
async def test_token_in_the_headers_of_a_report_without_envelope(
    store: Store, codec: TokenCodec, classify: Classifier, processor: FeedbackProcessor
) -> None:
    """A report fetched from a mailbox has no envelope: Delivered-To / X-Original-To / To."""
    queue_id, ids = await queue(store, "a@example.net")
    raw = classify.add(
        f"Delivered-To: {verp(codec, ids['a@example.net']).upper()}\r\nSubject: x\r\n\r\n".encode(),
        bounce("a@example.net"),
    )
    report_id = await store.store_feedback(NewFeedback(sender="", recipients=(), raw=raw))
    outcome = await processor.process(report_id)
    assert (outcome.state, outcome.matched_by, outcome.queue_id) == ("processed", "verp", queue_id)


@pytest_twisted.ensureDeferred
async def test_verp_of_the_returned_message_return_path(
    store: Store, codec: TokenCodec, classify: Classifier, processor: FeedbackProcessor
) -> None:
    _, ids = await queue(store, "a@example.net")
    returned = ReturnedMessage(return_path=verp(codec, ids["a@example.net"]))
    raw = classify.add(b"dsn rp", bounce("a@example.net", returned=returned))
    outcome = await processor.process(await receive(store, raw))
    assert (outcome.state, outcome.matched_by) == ("processed", "verp")


@pytest_twisted.ensureDeferred
async def test_smartrelay_id_of_the_returned_message(
    store: Store, classify: Classifier, processor: FeedbackProcessor
) -> None:
    queue_id, _ = await queue(store, "a@example.net", "B@example.net")
    returned = ReturnedMessage(smartrelay_id=queue_id, message_id="app-123@example.com")
    raw = classify.add(b"dsn id", bounce("b@example.net", returned=returned))
    outcome = await processor.process(await receive(store, raw))
    assert (outcome.state, outcome.matched_by, outcome.queue_id, outcome.recipient) == (
        "processed",
        "smartrelay-id",
        queue_id,
        "B@example.net",
    )
    assert [e.recipient for e in await events(store)] == ["B@example.net"]


@pytest_twisted.ensureDeferred
async def test_our_message_id_of_the_returned_message(
    store: Store, classify: Classifier, processor: FeedbackProcessor
) -> None:
    queue_id, _ = await queue(store, "a@example.net")
    ours = classify.add(
        b"dsn mid",
        bounce("a@example.net", returned=ReturnedMessage(message_id=f"{queue_id}@{HOSTNAME}")),
    )
    outcome = await processor.process(await receive(store, ours))
    assert (outcome.state, outcome.matched_by, outcome.queue_id) == (
        "processed",
        "message-id",
        queue_id,
    )

    # A Message-ID of another host is not ours: it names no message of ours.
    theirs = classify.add(
        b"dsn mid 2",
        bounce(
            "nobody@example.org", returned=ReturnedMessage(message_id=f"{queue_id}@app.example.com")
        ),
    )
    outcome = await processor.process(await receive(store, theirs))
    assert outcome.state == "unmatched"
    assert outcome.reason == "no message sent to nobody@example.org in the last 30 days"


@pytest_twisted.ensureDeferred
async def test_address_of_a_copy_sent_in_the_last_30_days(
    store: Store, clock: Clock, classify: Classifier, processor: FeedbackProcessor
) -> None:
    old_id, _ = await queue(store, "a@example.net")
    await delivered(store, old_id, "a@example.net")
    clock.advance(DAY)
    new_id, _ = await queue(store, "A@Example.net")
    await delivered(store, new_id, "A@Example.net")
    clock.advance(3600)
    raw = classify.add(b"dsn addr", bounce("a@example.net"))
    outcome = await processor.process(await receive(store, raw))
    # The latest copy, whatever the letter case.
    assert (outcome.state, outcome.matched_by, outcome.queue_id, outcome.recipient) == (
        "processed",
        "address",
        new_id,
        "A@Example.net",
    )

    clock.advance(31 * DAY)
    raw = classify.add(b"dsn addr late", bounce("a@example.net", "4.2.2", "mailbox-full", False))
    outcome = await processor.process(await receive(store, raw))
    assert outcome.state == "unmatched"
    assert outcome.reason == "no message sent to a@example.net in the last 30 days"


# -- forged tokens, unmatched, purged -------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_forged_or_mangled_token_changes_nothing(
    store: Store, codec: TokenCodec, classify: Classifier, processor: FeedbackProcessor
) -> None:
    queue_id, ids = await queue(store, "victim@example.net")
    await delivered(store, queue_id, "victim@example.net")
    good = codec.verp_token(ids["victim@example.net"])
    mangled = good[:-3] + ("a" if good[-3] != "a" else "b") + good[-2:]
    raw = classify.add(b"dsn forged", bounce("victim@example.net"))
    for local in (f"b+{mangled}", "b+aaaaaaaaaaaaaaaaaaaaaaaa", "b+not-base32!", f"u+{mangled}"):
        outcome = await processor.process(await receive(store, raw, f"{local}@{DOMAIN}"))
        assert outcome.state == "unmatched", local
        assert outcome.reason.startswith("forged or mangled token"), outcome.reason
    # A mail to a forged u+ address is not classified at all (the classifier knows no
    # report for these bytes).
    outcome = await processor.process(await receive(store, b"stop", f"u+{mangled}@{DOMAIN}"))
    assert (outcome.state, outcome.kind) == ("unmatched", "unsubscribe")
    assert outcome.reason.startswith("forged or mangled token: u+"), outcome.reason
    # No weaker route was tried: the address would have matched.
    assert await events(store) == []
    assert await suppressions(store) == {}


@pytest_twisted.ensureDeferred
async def test_unmatched_is_kept_with_its_reason(
    store: Store, classify: Classifier, processor: FeedbackProcessor
) -> None:
    raw = classify.add(b"dsn ?", bounce("stranger@example.org"))
    report_id = await receive(store, raw)
    outcome = await processor.process(report_id)
    assert outcome.state == "unmatched"
    [summary] = await store.list_feedback(state="unmatched")
    assert (summary.report_id, summary.kind) == (report_id, "bounce")
    assert summary.reason == "no message sent to stranger@example.org in the last 30 days"
    assert await store.list_feedback(state="new") == []
    with pytest.raises(UnknownReport):
        await processor.process("Rnosuchreport")


@pytest.mark.parametrize("kind", ["verp", "mailto", "smartrelay-id"])
@pytest_twisted.ensureDeferred
async def test_report_for_a_purged_message_is_unmatched(
    store: Store, codec: TokenCodec, classify: Classifier, processor: FeedbackProcessor, kind: str
) -> None:
    queue_id, ids = await queue(store, "gone@example.net")
    recipient_id = ids["gone@example.net"]
    await purge_message_rows(store, queue_id, rows=True)
    returned = ReturnedMessage(smartrelay_id=queue_id)
    raw = classify.add(b"dsn purged", bounce("gone@example.net", returned=returned))
    to = {
        "verp": verp(codec, recipient_id),
        "mailto": f"u+{codec.unsubscribe_mailto_token(recipient_id)}@{DOMAIN}",
        "smartrelay-id": f"postmaster@{DOMAIN}",
    }[kind]
    outcome = await processor.process(await receive(store, raw, to))
    assert outcome.state == "unmatched"
    assert "purged" in outcome.reason
    assert await events(store) == [] and await suppressions(store) == {}


# -- effects ---------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_soft_bounces_are_counted_by_the_policy(
    store: Store,
    codec: TokenCodec,
    classify: Classifier,
    clock: Clock,
    processor: FeedbackProcessor,
) -> None:
    """[suppression] soft_bounce: the third soft bounce within 7 days suppresses."""
    for n in range(3):
        _, ids = await queue(store, "full@example.net")
        raw = classify.add(
            f"dsn soft {n}".encode(), bounce("full@example.net", "4.2.2", "mailbox-full", False)
        )
        await processor.process(await receive(store, raw, verp(codec, ids["full@example.net"])))
        expected = {"full@example.net": "soft_bounce"} if n == 2 else {}
        assert await suppressions(store) == expected, n
        clock.advance(3600)
    assert [e.data["hard"] for e in await events(store)] == [False, False, False]


@pytest_twisted.ensureDeferred
async def test_late_dsn_after_delivery_is_recorded(
    store: Store, codec: TokenCodec, classify: Classifier, processor: FeedbackProcessor
) -> None:
    """The remote MX accepted the copy (``delivered``), then bounced it: the bounce counts."""
    queue_id, ids = await queue(store, "late@example.net")
    await delivered(store, queue_id, "late@example.net")
    raw = classify.add(b"dsn late", bounce("late@example.net"))
    outcome = await processor.process(
        await receive(store, raw, verp(codec, ids["late@example.net"]))
    )
    assert outcome.events == 1
    assert await suppressions(store) == {"late@example.net": "hard_bounce"}


@pytest_twisted.ensureDeferred
async def test_bounce_naming_no_recipient_with_our_verp_is_undetermined(
    store: Store, codec: TokenCodec, classify: Classifier, processor: FeedbackProcessor
) -> None:
    _, ids = await queue(store, "x@example.net")
    raw = classify.add(b"odd bounce", Report("bounce", (), bounce_source="text", note="odd text"))
    outcome = await processor.process(await receive(store, raw, verp(codec, ids["x@example.net"])))
    assert outcome.state == "processed"
    [event] = await events(store)
    assert (event.data["category"], event.data["hard"], event.data["reply"]) == (
        "undetermined",
        False,
        "odd text",
    )


@pytest_twisted.ensureDeferred
async def test_complaint_by_verp_and_by_returned_message(
    store: Store, codec: TokenCodec, classify: Classifier, processor: FeedbackProcessor
) -> None:
    queue_id, ids = await queue(store, "reader@example.net", "other@example.net")
    complaint = Complaint("abuse", "Yahoo! Mail AntiSpam Feedback Loop", "reader@example.net")
    by_verp = classify.add(b"arf 1", Report("complaint", complaint=complaint))
    outcome = await processor.process(
        await receive(store, by_verp, verp(codec, ids["other@example.net"]))
    )
    assert (outcome.state, outcome.kind, outcome.recipient) == (
        "processed",
        "complaint",
        "other@example.net",
    )

    returned = ReturnedMessage(smartrelay_id=queue_id, to=("reader@example.net",))
    by_id = classify.add(b"arf 2", Report("complaint", complaint=complaint, returned=returned))
    outcome = await processor.process(await receive(store, by_id))
    assert (outcome.matched_by, outcome.recipient) == ("smartrelay-id", "reader@example.net")
    assert [(e.type, e.recipient, e.data) for e in await events(store)] == [
        (
            "complained",
            address,
            {"feedback_type": "abuse", "source": "Yahoo! Mail AntiSpam Feedback Loop"},
        )
        for address in ("other@example.net", "reader@example.net")
    ]
    assert await suppressions(store) == {
        "other@example.net": "complaint",
        "reader@example.net": "complaint",
    }


@pytest_twisted.ensureDeferred
async def test_mailto_unsubscribe_whatever_the_content(
    store: Store, codec: TokenCodec, processor: FeedbackProcessor
) -> None:
    """The classifier is not even asked (the fixture's has no report for these bytes)."""
    queue_id, ids = await queue(store, "Reader@example.net")
    to = f"u+{codec.unsubscribe_mailto_token(ids['Reader@example.net']).upper()}@{DOMAIN.upper()}"
    outcome = await processor.process(await receive(store, b"\xff\x00 not even mail", to))
    assert (outcome.state, outcome.kind, outcome.matched_by, outcome.events) == (
        "processed",
        "unsubscribe",
        "mailto",
        1,
    )
    assert await events(store) == [
        Event("unsubscribed", queue_id, "Reader@example.net", {"method": "mailto"})
    ]
    assert await suppressions(store) == {"reader@example.net": "unsubscribe"}
    # A second mail: nothing more (already unsubscribed).
    again = await processor.process(await receive(store, b"Subject: stop\r\n\r\n", to))
    assert (again.state, again.events, again.reason) == (
        "processed",
        0,
        "duplicate: already unsubscribed",
    )
    assert len(await events(store)) == 1


@pytest.mark.parametrize(
    ("report", "reason"),
    [
        (Report("autoreply", note="vacation"), "autoreply"),
        (Report("other", note="a human reply"), "other: a human reply"),
        (
            bounce("a@example.net", "4.4.7", "expired", False, action="delayed"),
            "delayed-only (delayed)",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_ignored_reports(
    store: Store,
    codec: TokenCodec,
    classify: Classifier,
    processor: FeedbackProcessor,
    report: Report,
    reason: str,
) -> None:
    _, ids = await queue(store, "a@example.net")
    raw = classify.add(b"report", report)
    outcome = await processor.process(await receive(store, raw, verp(codec, ids["a@example.net"])))
    assert (outcome.state, outcome.reason) == ("ignored", reason)
    assert await events(store) == [] and await suppressions(store) == {}


@pytest_twisted.ensureDeferred
async def test_too_big_and_malformed_are_ignored(store: Store, codec: TokenCodec) -> None:
    def broken(raw: bytes) -> Report:
        raise ValueError("cannot parse this")

    small = processor_for(store, codec, broken, max_size=1000)
    big = await receive(store, b"x" * 1001)
    outcome = await small.process(big)
    assert (outcome.state, outcome.reason) == ("ignored", "too big: 1001 bytes (at most 1000)")
    outcome = await small.process(await receive(store, b"y" * 1000))
    assert (outcome.state, outcome.reason) == ("ignored", "malformed: cannot parse this")


# -- idempotency -----------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_the_same_report_twice_has_one_effect(
    store: Store, codec: TokenCodec, classify: Classifier, processor: FeedbackProcessor
) -> None:
    _, ids = await queue(store, "a@example.net")
    raw = classify.add(b"dsn twice", bounce("a@example.net", "4.2.2", "mailbox-full", False))
    to = verp(codec, ids["a@example.net"])
    report_id = await receive(store, raw, to)
    first = await processor.process(report_id)
    second = await processor.process(report_id)  # not new any more: left as it is
    assert (second.state, second.events, second.reason) == ("processed", 0, first.reason)
    again = await processor.process(report_id, again=True)  # feedback reprocess
    assert (again.state, again.events, again.reason) == (
        "processed",
        0,
        "duplicate: already bounced",
    )
    # A resent DSN: another report with the same content.
    resent = await processor.process(await receive(store, raw, to))
    assert (resent.state, resent.events) == ("processed", 0)
    assert len(await events(store)) == 1


@pytest_twisted.ensureDeferred
async def test_concurrent_processing_of_one_report_has_one_effect(
    store: Store, codec: TokenCodec, classify: Classifier
) -> None:
    """Two processors (two nodes, or the relay and ``feedback reprocess``) at once."""
    _, ids = await queue(store, "a@example.net")
    raw = classify.add(b"dsn race", bounce("a@example.net"))
    report_id = await receive(store, raw, verp(codec, ids["a@example.net"]))
    one, two = processor_for(store, codec, classify), processor_for(store, codec, classify)
    results = await DeferredList(
        [Deferred.fromCoroutine(p.process(report_id)) for p in (one, two)],
        consumeErrors=True,
    )
    outcomes = [r for ok, r in results if ok]
    assert len(outcomes) == 2, results
    assert sorted(o.events for o in outcomes) == [0, 1]
    assert all(o.state == "processed" for o in outcomes)
    assert len(await events(store)) == 1


# -- the service -----------------------------------------------------------------------------
class FlakyStore(Store):
    """Fails the next ``process_feedback`` transactions with the errors in ``failures``."""

    failures: list[Exception]

    async def run(self, name: str, txn: Any, readonly: bool = False) -> Any:
        if name == "process_feedback" and getattr(self, "failures", None):
            raise self.failures.pop(0)
        return await super().run(name, txn, readonly)


async def states(store: Store) -> dict[str, str]:
    return {s.report_id: s.state for s in await store.list_feedback()}


async def eventually(check: Callable[[], Any], what: str, limit: float = 30.0) -> None:
    """Poll ``await check()`` on the real reactor until it is true (a loaded machine)."""
    waited = 0.0
    while not await check():
        assert waited < limit, f"not within {limit} s: {what}"
        await deferLater(real_reactor(), 0.05, lambda: None)
        waited += 0.05


@pytest_twisted.ensureDeferred
async def test_service_processes_new_reports_at_start_and_each_commit(
    store: Store, codec: TokenCodec, classify: Classifier
) -> None:
    _, ids = await queue(store, "a@example.net", "b@example.net")
    raw = classify.add(b"dsn svc", bounce("a@example.net"))
    before = await receive(store, raw, verp(codec, ids["a@example.net"]))
    sweep = Clock()
    service = FeedbackService(
        sweep, lambda: succeed(store), lambda: processor_for(store, codec, classify), page=1
    )
    service.startService()
    try:
        await eventually(
            lambda: _state_is(store, before, "processed"), "the report left new is processed"
        )
        # Committed while the service runs: the notification wakes it (the sweep clock
        # never moves).
        raw = classify.add(b"dsn svc 2", bounce("b@example.net"))
        after = await receive(store, raw, verp(codec, ids["b@example.net"]))
        await eventually(lambda: _state_is(store, after, "processed"), "the new report")
    finally:
        await stop(service)
    assert sorted(e.recipient or "" for e in await events(store)) == [
        "a@example.net",
        "b@example.net",
    ]


async def stop(service: FeedbackService) -> None:
    stopped = service.stopService()
    if stopped is not None:
        await stopped


async def _state_is(store: Store, report_id: str, state: str) -> bool:
    return (await states(store)).get(report_id) == state


@pytest_twisted.ensureDeferred
async def test_a_failure_leaves_the_report_new_and_never_blocks_the_others(
    engine: Any, clock: Clock, codec: TokenCodec, classify: Classifier
) -> None:
    store = FlakyStore(engine, clock)
    _, ids = await queue(store, "a@example.net", "b@example.net", "c@example.net")
    reports = []
    for address in ("a@example.net", "b@example.net"):
        raw = classify.add(address.encode(), bounce(address))
        reports.append(await receive(store, raw, verp(codec, ids[address])))
        clock.advance(1)  # arrival order: a, then b
    store.failures = [RuntimeError("one bad report")]
    sweep = Clock()
    service = FeedbackService(
        sweep,
        lambda: succeed(store),
        lambda: processor_for(store, codec, classify),
        sweep_interval=60,
    )
    service.startService()
    try:
        # a failed (left new); b after it was processed all the same.
        await eventually(lambda: _state_is(store, reports[1], "processed"), "b processed")
        assert (await states(store))[reports[0]] == "new"
        # The database goes away: the pass stops, the report stays new.
        raw = classify.add(b"c", bounce("c@example.net"))
        store.failures = [DatabaseUnavailable("connection refused")]
        reports.append(await receive(store, raw, verp(codec, ids["c@example.net"])))
        await eventually(lambda: _failed_and_idle(store, service), "the failed pass ends")
        assert [(await states(store))[r] for r in reports] == ["new", "processed", "new"]
        # The next sweep takes both.
        sweep.advance(60)
        await eventually(
            lambda: _all_processed(store), "the sweep processes what failures left new"
        )
    finally:
        await stop(service)
    assert len(await events(store)) == 3


async def _failed_and_idle(store: FlakyStore, service: FeedbackService) -> bool:
    """The notification of c's commit (asynchronous on PostgreSQL) started a pass, which met
    the failure and ended."""
    return not store.failures and service._running is None


async def _all_processed(store: Store) -> bool:
    return set((await states(store)).values()) == {"processed"}


@pytest_twisted.ensureDeferred
async def test_failed_recipients_per_report_are_bounded(
    store: Store,
    classify: Classifier,
    processor: FeedbackProcessor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("smartrelay.feedback.processor.MAX_RECIPIENTS", 2)
    addresses = ("a@example.net", "b@example.net", "c@example.net")
    queue_id, _ = await queue(store, *addresses)
    blocks = tuple(r for a in addresses for r in bounce(a).recipients)
    report = Report("bounce", blocks, returned=ReturnedMessage(smartrelay_id=queue_id))
    outcome = await processor.process(await receive(store, classify.add(b"many", report)))
    assert (outcome.state, outcome.events) == ("processed", 2)
    assert [e.recipient for e in await events(store)] == ["a@example.net", "b@example.net"]


@pytest_twisted.ensureDeferred
async def test_two_reports_of_one_bounce_at_once_have_one_effect(
    store: Store, codec: TokenCodec, classify: Classifier
) -> None:
    """A resent DSN processed at the same moment as the first (two nodes, on PostgreSQL)."""
    _, ids = await queue(store, "a@example.net")
    raw = classify.add(b"dsn race 2", bounce("a@example.net", "4.2.2", "mailbox-full", False))
    to = verp(codec, ids["a@example.net"])
    reports = [await receive(store, raw, to) for _ in range(2)]
    one, two = processor_for(store, codec, classify), processor_for(store, codec, classify)
    results = await DeferredList(
        [Deferred.fromCoroutine(p.process(r)) for p, r in zip((one, two), reports, strict=True)],
        consumeErrors=True,
    )
    outcomes = [r for ok, r in results if ok]
    assert len(outcomes) == 2, results
    assert sorted(o.events for o in outcomes) == [0, 1]
    assert len(await events(store)) == 1


@pytest_twisted.ensureDeferred
async def test_recorded_feedback_is_counted_once(
    store: Store, codec: TokenCodec, classify: Classifier
) -> None:
    metrics = RelayMetrics()
    processor = processor_for(store, codec, classify, metrics=metrics)
    queue_id, ids = await queue(store, "a@example.net", "b@example.net", "c@example.net")
    await delivered(store, queue_id, "a@example.net")
    dsn = classify.add(b"dsn m", bounce("a@example.net"))
    for _ in range(2):  # a resent DSN records nothing more
        await processor.process(await receive(store, dsn, verp(codec, ids["a@example.net"])))
    complaint = Complaint("abuse", "FBL", "b@example.net")
    arf = classify.add(b"arf m", Report("complaint", complaint=complaint))
    await processor.process(await receive(store, arf, verp(codec, ids["b@example.net"])))
    to = f"u+{codec.unsubscribe_mailto_token(ids['c@example.net'])}@{DOMAIN}"
    for _ in range(2):  # already unsubscribed: not counted again
        await processor.process(await receive(store, b"Subject: stop\r\n\r\n", to))
    value = metrics.registry.get_sample_value
    bounced = {"category": "invalid-recipient", "hard": "true", "source": "dsn"}
    assert value("smartrelay_recipients_bounced_total", bounced) == 1
    assert value("smartrelay_complaints_total") == 1
    assert value("smartrelay_unsubscribes_total", {"method": "mailto"}) == 1
    assert sorted(e.type for e in await events(store)) == [
        "bounced",
        "complained",
        "unsubscribed",
    ]
