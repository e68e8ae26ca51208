"""Issue 11 item 1, end to end: a poisoned message (a bad link URL, or any bug that makes the
re-wrap chain or the worker raise) ends with a defined outcome, gives its place in the delivery
window back, and mail after it still flows. Real relay, real SMTP on 127.0.0.1, real sink."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from attrs import evolve

from smartrelay.delivery.client import SmtpConnection
from smartrelay.rewrap import chain as chain_module
from smartrelay.rewrap.chain import OutgoingCopy
from tests.conftest import real_reactor
from tests.support.delivery_relay import (
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    events,
    eventually,
    message_bytes,
    recipient_states,
    select,
    smtp_route,
    submit,
    wait_for_events,
)
from tests.support.relay import RunningRelay

BAD_LINK = b'<a href="https://shop.example.com/caf\xe9">caf\xe9</a>'
LONG_LINK = b'<a href="https://shop.example.com/?q=' + b"x" * 9000 + b'">long</a>'
POISONED = (
    b"From: Shop <news@example.com>\r\nTo: <fan@example.net>\r\nSubject: poisoned\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    b"<html><body>" + BAD_LINK + b"\r\n" + LONG_LINK + b"\r\n"
    b'<a href="https://shop.example.com/fine">fine</a></body></html>\r\n'
)


@pytest.fixture
def fast_poll(relays: DeliveryRelays) -> None:
    relays.tunables = evolve(relays.tunables, poll_interval=0.5)


async def nothing_left_in_flight(relay: RunningRelay) -> None:
    """No recipient row still claimed, and the manager's window empty again."""
    manager = relay.service.delivery
    assert manager is not None

    async def settled() -> bool | None:
        rows = await select(
            relay.store, "SELECT COUNT(*) FROM recipients WHERE state = ?", "delivering"
        )
        return True if int(rows[0][0]) == 0 and manager._in_memory == 0 else None

    await eventually(real_reactor(), settled, "no recipient left delivering", within=20)


@pytest_twisted.ensureDeferred
async def test_poisoned_messages_end_with_an_outcome_and_later_mail_flows(
    relays: DeliveryRelays,
    sinks: Sinks,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reactor = real_reactor()
    backend = TrackingSinkBackend()
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(database_url, {"routes": smtp_route(sink_port)})

    # Whatever bug there may be in the chain for one message: here the signer raises on it.
    real_apply = chain_module.DkimStep.apply

    def signer_with_a_bug(self: Any, copy: OutgoingCopy) -> Any:
        if b"Subject: explodes" in copy.message.raw:
            raise ValueError("a bug in the signer")
        return real_apply(self, copy)

    monkeypatch.setattr(chain_module.DkimStep, "apply", signer_with_a_bug)

    poisoned = await submit(relay.smtp_port, ["fan@example.net"], POISONED)
    broken = await submit(relay.smtp_port, ["victim@example.net"], message_bytes("explodes"))
    await wait_for_events(reactor, relay.store, "bounced", 1, within=20)
    later = await submit(relay.smtp_port, ["later@example.net"], message_bytes("later"))
    await wait_for_events(reactor, relay.store, "delivered", 2, within=20)
    await nothing_left_in_flight(relay)

    # The bad links went out untracked, byte for byte; the good one is tracked.
    by_subject = {m.data.split(b"Subject: ")[1].split(b"\r\n")[0]: m for m in backend.messages}
    assert sorted(by_subject) == [b"later", b"poisoned"]
    body = by_subject[b"poisoned"].data
    assert BAD_LINK in body and LONG_LINK in body
    assert b"https://shop.example.com/fine" not in body
    # The message no copy could be made of bounced, category technical, with the reason.
    (bounce,) = await events(relay.store, "bounced")
    assert bounce.queue_id == broken and bounce.recipient == "victim@example.net"
    assert bounce.data["category"] == "technical" and bounce.data["hard"] is False
    assert bounce.data["status"] == "5.3.0"
    assert bounce.data["reply"] == "554 5.3.0 re-wrap failed: ValueError: a bug in the signer"
    assert await recipient_states(relay.store) == {
        "fan@example.net": "delivered",
        "victim@example.net": "bounced",
        "later@example.net": "delivered",
    }
    assert {e.queue_id for e in await events(relay.store, "delivered")} == {poisoned, later}


@pytest_twisted.ensureDeferred
async def test_a_job_whose_worker_raises_gets_an_outcome_and_frees_its_slot(
    relays: DeliveryRelays,
    sinks: Sinks,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    fast_poll: None,
) -> None:
    """A bug outside the chain (here: the SMTP client raises on one message) used to kill
    the worker with the job in hand: no outcome, the row claimed for 15 minutes, its place in
    the window held. It is now deferred (451 4.3.0), retried, and expires at max_age."""
    reactor = real_reactor()
    backend = TrackingSinkBackend()
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(
        database_url,
        {"routes": smtp_route(sink_port), "retry_schedule": ["1s"], "max_age": "2s"},
    )
    real_send = SmtpConnection.send

    async def send_with_a_bug(
        self: SmtpConnection, sender: str, recipients: Any, message: bytes
    ) -> Any:
        if b"Subject: explodes" in message:
            raise RuntimeError("a bug in the client")
        return await real_send(self, sender, recipients, message)

    monkeypatch.setattr(SmtpConnection, "send", send_with_a_bug)

    broken = await submit(relay.smtp_port, ["victim@example.net"], message_bytes("explodes"))
    await wait_for_events(reactor, relay.store, "deferred", 1, within=20)
    fine = await submit(relay.smtp_port, ["fine@example.net"], message_bytes("fine"))
    await wait_for_events(reactor, relay.store, "expired", 1, within=30)
    await wait_for_events(reactor, relay.store, "delivered", 1, within=20)
    await nothing_left_in_flight(relay)

    history = [
        e
        for e in await events(relay.store, queue_id=broken)
        if e.type not in ("received", "warning")  # the message's content warnings
    ]
    assert history[0].type == "deferred"
    assert history[0].data["reply"] == "451 4.3.0 internal error while sending"
    assert [e.type for e in history[-2:]] == ["expired", "bounced"]
    assert [e.queue_id for e in await events(relay.store, "delivered")] == [fine]
    assert [m.recipients for m in backend.messages] == [["fine@example.net"]]


@pytest_twisted.ensureDeferred
async def test_a_chain_that_fails_for_the_whole_message_defers_it(
    relays: DeliveryRelays,
    sinks: Sinks,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    fast_poll: None,
) -> None:
    """When the chain fails for a whole message (not one copy: its suppression look-up, say),
    the job is deferred (451 4.3.0) and retried, never left claimed; other mail flows."""
    reactor = real_reactor()
    backend = TrackingSinkBackend()
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(
        database_url,
        {"routes": smtp_route(sink_port), "retry_schedule": ["1s"], "max_age": "2s"},
    )
    real_run = chain_module.RewrapChain.run

    async def run_with_a_bug(self: Any, message: Any, recipients: Any, *more: Any) -> Any:
        if b"Subject: explodes" in message.raw:
            raise ConnectionError("the suppression look-up failed")
        return await real_run(self, message, recipients, *more)

    monkeypatch.setattr(chain_module.RewrapChain, "run", run_with_a_bug)

    broken = await submit(relay.smtp_port, ["victim@example.net"], message_bytes("explodes"))
    fine = await submit(relay.smtp_port, ["fine@example.net"], message_bytes("fine"))
    await wait_for_events(reactor, relay.store, "expired", 1, within=30)
    await wait_for_events(reactor, relay.store, "delivered", 1, within=20)
    await nothing_left_in_flight(relay)

    history = [
        e
        for e in await events(relay.store, queue_id=broken)
        if e.type not in ("received", "warning")  # the message's content warnings
    ]
    assert history[0].type == "deferred"
    assert history[0].data["reply"] == "451 4.3.0 re-wrapping the message failed"
    assert [e.type for e in history[-2:]] == ["expired", "bounced"]
    assert [e.queue_id for e in await events(relay.store, "delivered")] == [fine]
