"""Delivery end to end: the whole relay in-process, mail in over real SMTP, out to real sinks.

The relay (RelayService) runs on the test reactor with ``[delivery.routes] "*"`` pointing at a
sink on 127.0.0.1: the scriptable in-process sink of ``tests/support/sink.py`` (which can defer,
bounce, delay and speak STARTTLS), a second relay (forwarder mode), or Postfix's ``smtp-sink``
for the 1,000-message run. Messages are submitted with smtplib (in threads); outcomes are
checked in the database (events, recipients.state) and at the sink, on both engines.
Timings are real: retries use schedules of a second (with the manager's 5-second poll for due
work cut to 0.5 s where a retry is waited for), and waits poll the database with a deadline.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_twisted
from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from smartrelay.passwords import hash_password
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.session import Session
from smartrelay.storage.store import NewMessage, Store
from smartrelay.timefmt import parse_rfc3339
from tests.conftest import real_reactor
from tests.support.delivery_relay import (
    FAST_THROTTLE,
    SENDER,
    DeliveryRelays,
    Event,
    Sinks,
    TrackingSinkBackend,
    count_events,
    events,
    eventually,
    message_bytes,
    recipient_states,
    select,
    sink_tls,
    smtp_route,
    submit,
    submit_many,
    wait_for_events,
)
from tests.support.postfix import (
    PostfixSink,
    find_postfix_tool,
    run_smtp_source,
)
from tests.support.postgres import PostgresServer
from tests.support.relay import HOSTNAME, RETURN_PATH_DOMAIN, RunningRelay, free_ports

SINK_OK = "250 2.0.0 Ok: sunk"
VERP = re.compile(rf"b\+\S+@{re.escape(RETURN_PATH_DOMAIN)}")
CREDENTIAL = "edge-relay"
PASSWORD = "s3cret forwarder password"


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def second_database_url(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> str:
    """Another empty database on the same engine as ``database_url``, for a second relay."""
    if database_url.startswith("sqlite:"):
        return f"sqlite:{tmp_path / 'second.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
def fast_poll(relays: DeliveryRelays) -> None:
    """The delivery manager looks for due recipients every 0.5 s instead of every 5 s.

    A deferred recipient is retried only when the manager next looks (docs/delivery.md: the
    5-second timer picks up deferred recipients as they come due), so with a 1-second retry
    schedule a test would spend most of its time waiting for that timer.
    """
    relays.tunables = evolve(relays.tunables, poll_interval=0.5)


def throttle(**settings: object) -> list[dict[str, object]]:
    return [{**FAST_THROTTLE, **settings}]


def without_control_headers(data: bytes) -> bytes:
    head, _, body = data.partition(b"\r\n\r\n")
    kept = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"x-smartrelay-")]
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def header_block(data: bytes) -> list[bytes]:
    return data.partition(b"\r\n\r\n")[0].split(b"\r\n")


# -- 1. one transaction per domain, headers, body --------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_three_recipients_on_two_domains_and_the_message_as_delivered(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    """Each recipient gets a copy of its own in its own transaction (its VERP return path,
    SPEC section 4, names the recipient); the copies for one domain share a connection."""
    reactor = real_reactor()
    backend = TrackingSinkBackend()
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(database_url, {"routes": smtp_route(sink_port)})
    body = (
        "First line.\r\n"
        ".A line that starts with a dot\r\n"
        "..two dots\r\n"
        ".\r\n"
        " leading space, trailing space \r\n"
        "last line\r\n"
    )
    data = message_bytes(
        "three recipients",
        headers=[
            "X-SmartRelay-Tag: welcome",
            "X-SmartRelay-Meta-User: 42",
            "X-SmartRelay-Track-Opens: no",
            "X-SmartRelay-Unsubscribe: no",
            "X-Custom: folded\r\n\tcontinuation",
        ],
        body=body,
    )
    recipients = ["a@one.test", "b@one.test", "c@two.test"]
    queue_id = await submit(relay.smtp_port, recipients, data)

    delivered = await wait_for_events(reactor, relay.store, "delivered", 3)
    assert sorted(e.recipient or "" for e in delivered) == recipients
    for event in delivered:
        assert event.queue_id == queue_id
        assert event.data == {"mx": "127.0.0.1", "reply": SINK_OK, "tls": False, "attempt": 1}
    assert await recipient_states(relay.store, queue_id) == dict.fromkeys(recipients, "delivered")

    # One transaction per recipient, the right RCPT in each, a VERP return path of its own.
    by_recipient = {tuple(m.recipients): m for m in backend.messages}
    assert sorted(by_recipient) == [(r,) for r in recipients]
    senders = [m.sender for m in backend.messages]
    assert all(VERP.fullmatch(sender) for sender in senders), senders
    assert len(set(senders)) == 3
    assert by_recipient[("a@one.test",)].connection == by_recipient[("b@one.test",)].connection
    # As stored, minus the control headers, plus X-SmartRelay-ID and Message-ID after the trace.
    rows = await select(relay.store, "SELECT raw FROM message_bodies WHERE queue_id = ?", queue_id)
    stored = bytes(rows[0][0])
    assert stored.endswith(data)
    trace = stored[: len(stored) - len(data)]
    assert trace.startswith(b"Received: ")
    expected = (
        trace
        + f"X-SmartRelay-ID: {queue_id}\r\nMessage-ID: <{queue_id}@{HOSTNAME}>\r\n".encode()
        + without_control_headers(data)
    )
    for received in backend.messages:
        assert received.data == expected
        smartrelay_headers = [
            line
            for line in header_block(received.data)
            if line.lower().startswith(b"x-smartrelay-")
        ]
        assert smartrelay_headers == [f"X-SmartRelay-ID: {queue_id}".encode()]
        assert received.data.partition(b"\r\n\r\n")[2] == body.encode()


@pytest_twisted.ensureDeferred
async def test_a_message_id_of_the_application_is_kept(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    backend = TrackingSinkBackend()
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(database_url, {"routes": smtp_route(sink_port)})
    data = message_bytes("own id", headers=["Message-ID: <order-17@app.test>"])
    queue_id = await submit(relay.smtp_port, ["x@example.net"], data)
    await wait_for_events(real_reactor(), relay.store, "delivered", 1)
    [received] = backend.messages
    headers = header_block(received.data)
    assert [h for h in headers if h.lower().startswith(b"message-id:")] == [
        b"Message-ID: <order-17@app.test>"
    ]
    assert f"X-SmartRelay-ID: {queue_id}".encode() in headers


@pytest_twisted.ensureDeferred
async def test_mail_arriving_while_delivery_starts_is_delivered_once(
    relays: DeliveryRelays, sinks: Sinks, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listeners take mail while the delivery manager is still starting and taking back
    its old claims (release_claims). Mail that arrives meanwhile must not be claimed before
    that release and then released and claimed a second time.

    The window is made deterministic, as a slow database at start-up would: release_claims
    finishes only once the new message has been stored."""
    reactor = real_reactor()
    release_claims = Store.release_claims
    releasing: Deferred[None] = Deferred()

    async def late_release_claims(self: Store, owner: str) -> int:
        releasing.callback(None)

        async def stored() -> bool | None:
            sql = "SELECT COUNT(*) FROM recipients"
            return True if int((await select(self, sql))[0][0]) else None

        await eventually(reactor, stored, "the new message to be stored", within=10)
        return await release_claims(self, owner)

    monkeypatch.setattr(Store, "release_claims", late_release_claims)
    backend = TrackingSinkBackend(delay=1.0, clock=reactor)  # still on the wire at the release
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(
        database_url, {"routes": smtp_route(sink_port)}, wait_for_delivery=False
    )
    await releasing  # the manager listens for new mail now
    await submit(relay.smtp_port, ["once@example.net"], message_bytes("start-up race"))
    await wait_for_events(reactor, relay.store, "delivered", 1)
    manager = relay.service.delivery
    assert manager is not None

    async def idle() -> bool | None:
        return True if not manager._workers else None

    await eventually(reactor, idle, "the delivery workers to finish")
    times = len(backend.messages)
    assert times == 1, f"the message reached the sink {times} times"
    assert await recipient_states(relay.store) == {"once@example.net": "delivered"}


# -- 2. connection reuse and throttles -------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_connections_are_reused_up_to_max_messages_per_connection(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    reactor = real_reactor()
    # The sink takes 20 ms per message, so mail submitted in a burst queues up at the relay.
    backend = TrackingSinkBackend(delay=0.02, clock=reactor)
    factory, sink_port = await sinks.start(backend)
    per_connection = 5
    relay = await relays.start(
        database_url,
        {
            "routes": smtp_route(sink_port),
            "throttle": throttle(max_connections=2, max_messages_per_connection=per_connection),
        },
    )
    count = 20
    mails = [([f"r{i}@example.net"], message_bytes(f"reuse {i}")) for i in range(count)]
    await submit_many(relay.smtp_port, mails)
    await wait_for_events(reactor, relay.store, "delivered", count)

    assert len(backend.messages) == count
    used = backend.messages_per_connection()
    assert max(used.values()) <= per_connection, used
    assert sum(used.values()) == count
    assert factory.total_connections < count, f"{factory.total_connections} connections"
    assert factory.total_connections >= count // per_connection
    # No job is left counted as in hand (the store's batches wait for such jobs' items).
    manager = relay.service.delivery
    assert manager is not None

    async def idle() -> bool | None:
        return True if not manager._workers else None

    await eventually(reactor, idle, "the delivery workers to finish")
    assert manager._jobs_in_hand == 0


@pytest_twisted.ensureDeferred
async def test_claiming_resumes_when_the_memory_window_has_room(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    """With more due work than ``max_in_memory``, claiming stops and starts again as
    deliveries finish (not only at the next poll, which this test pushes out of reach)."""
    relays.tunables = evolve(relays.tunables, max_in_memory=4, poll_interval=600.0)
    reactor = real_reactor()
    backend = TrackingSinkBackend(delay=0.01, clock=reactor)
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(
        database_url,
        {"routes": smtp_route(sink_port), "throttle": throttle(max_connections=1)},
    )
    count = 20
    mails = [([f"r{i}@example.net"], message_bytes(f"window {i}")) for i in range(count)]
    await submit_many(relay.smtp_port, mails)
    await wait_for_events(reactor, relay.store, "delivered", count)
    assert len(backend.messages) == count


@pytest_twisted.ensureDeferred
async def test_trickled_messages_reuse_the_connection(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    """One message at a time, each submitted once the previous one is delivered: a relay that
    keeps no idle connection opens one per message (Postfix keeps them for 2 s)."""
    reactor = real_reactor()
    backend = TrackingSinkBackend()
    factory, sink_port = await sinks.start(backend)
    relay = await relays.start(database_url, {"routes": smtp_route(sink_port)})
    count = 5
    for i in range(count):
        await submit(relay.smtp_port, [f"t{i}@example.net"], message_bytes(f"trickle {i}"))
        await wait_for_events(reactor, relay.store, "delivered", i + 1)
    assert len(backend.messages) == count
    assert factory.total_connections < count, (
        f"{factory.total_connections} connections for {count} messages to one destination"
    )


@pytest_twisted.ensureDeferred
async def test_throttle_max_connections(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    reactor = real_reactor()
    backend = TrackingSinkBackend(delay=0.02, clock=reactor)
    factory, sink_port = await sinks.start(backend)
    relay = await relays.start(
        database_url,
        {"routes": smtp_route(sink_port), "throttle": throttle(max_connections=2)},
    )
    count = 30
    mails = [([f"r{i}@example.net"], message_bytes(f"throttle {i}")) for i in range(count)]
    queue_ids = await submit_many(relay.smtp_port, mails)
    await wait_for_events(reactor, relay.store, "delivered", count)
    assert factory.max_seen <= 2, f"{factory.max_seen} connections at once"
    assert len(backend.messages) == count
    delivered_ids = {
        line.split(b": ", 1)[1].decode()
        for m in backend.messages
        for line in header_block(m.data)
        if line.startswith(b"X-SmartRelay-ID: ")
    }
    assert delivered_ids == set(queue_ids)


# -- 3. temporary and permanent failures -----------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_4xx_at_the_final_dot_then_2xx(
    relays: DeliveryRelays, sinks: Sinks, database_url: str, fast_poll: None
) -> None:
    reactor = real_reactor()
    answers: list[Reply] = []

    def data_script(_: int) -> Reply:
        answers.append(
            Reply(451, "4.3.0", "try later") if not answers else Reply(250, "2.0.0", "Ok: sunk")
        )
        return answers[-1]

    backend = TrackingSinkBackend(data_script=data_script)
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(
        database_url, {"routes": smtp_route(sink_port), "retry_schedule": ["1s"]}
    )
    queue_id = await submit(relay.smtp_port, ["late@example.net"], message_bytes("retry"))
    await wait_for_events(reactor, relay.store, "delivered", 1, within=30)

    history = [
        e
        for e in await events(relay.store, queue_id=queue_id)
        if e.type not in ("received", "warning")  # the message's content warnings
    ]
    assert [e.type for e in history] == ["deferred", "delivered"]
    deferred, delivered = history
    assert deferred.recipient == delivered.recipient == "late@example.net"
    assert set(deferred.data) == {"mx", "reply", "attempt", "next_attempt"}
    assert deferred.data["mx"] == "127.0.0.1"
    assert deferred.data["reply"] == "451 4.3.0 try later"
    assert deferred.data["attempt"] == 1
    times = await select(
        relay.store, "SELECT time FROM events WHERE type = 'deferred' AND queue_id = ?", queue_id
    )
    delay = parse_rfc3339(deferred.data["next_attempt"]) - int(times[0][0]) / 1000
    assert 0.85 <= delay <= 1.15, f"next attempt {delay:.3f} s after the deferral"
    assert delivered.data == {"mx": "127.0.0.1", "reply": SINK_OK, "tls": False, "attempt": 2}
    assert await recipient_states(relay.store, queue_id) == {"late@example.net": "delivered"}
    assert [a.code for a in answers] == [451, 250]
    assert len(backend.messages) == 1


@pytest_twisted.ensureDeferred
async def test_5xx_at_rcpt_bounces_that_recipient_only(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    reactor = real_reactor()

    def rcpt_script(_: Session, address: str) -> Reply | None:
        return Reply(550, "5.1.1", "user unknown") if address.startswith("unknown@") else None

    backend = TrackingSinkBackend(rcpt_script=rcpt_script)
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(database_url, {"routes": smtp_route(sink_port)})
    recipients = ["known@example.net", "unknown@example.net", "other@example.org"]
    queue_id = await submit(relay.smtp_port, recipients, message_bytes("bounce one"))

    async def settled() -> bool | None:
        states = await recipient_states(relay.store, queue_id)
        return True if all(s in ("delivered", "bounced") for s in states.values()) else None

    await eventually(reactor, settled, "every recipient delivered or bounced")
    assert await recipient_states(relay.store, queue_id) == {
        "known@example.net": "delivered",
        "unknown@example.net": "bounced",
        "other@example.org": "delivered",
    }
    [bounced] = await events(relay.store, "bounced")
    assert bounced.recipient == "unknown@example.net"
    assert bounced.data == {
        "category": "invalid-recipient",
        "hard": True,
        "status": "5.1.1",
        "reply": "550 5.1.1 user unknown",
        "source": "smtp",
    }
    delivered = await events(relay.store, "delivered")
    assert sorted(e.recipient or "" for e in delivered) == [
        "known@example.net",
        "other@example.org",
    ]
    assert await count_events(relay.store, "deferred") == 0
    assert sorted(m.recipients for m in backend.messages) == [
        ["known@example.net"],
        ["other@example.org"],
    ]


@pytest_twisted.ensureDeferred
async def test_dead_port_defers_then_expires(
    relays: DeliveryRelays, database_url: str, fast_poll: None
) -> None:
    reactor = real_reactor()
    [dead_port] = free_ports(1)  # nothing listens there
    relay = await relays.start(
        database_url,
        {"routes": smtp_route(dead_port), "retry_schedule": ["1s"], "max_age": "2s"},
    )
    queue_id = await submit(relay.smtp_port, ["nobody@example.net"], message_bytes("dead"))
    await wait_for_events(reactor, relay.store, "expired", 1, within=30)

    history = [e for e in await events(relay.store, queue_id=queue_id) if e.type != "received"]
    types = [e.type for e in history]
    deferrals = types.count("deferred")
    assert deferrals >= 1 and types == ["deferred"] * deferrals + ["expired", "bounced"], types
    for attempt, event in enumerate(history[:deferrals], start=1):
        assert set(event.data) == {"mx", "reply", "attempt", "next_attempt"}
        assert event.data["attempt"] == attempt
        reply = event.data["reply"]
        assert reply.startswith(f"451 4.4.1 cannot connect to 127.0.0.1:{dead_port}: "), reply
        assert "refused" in reply.lower(), reply
    expired, bounced = history[deferrals:]
    assert expired.data == {"attempts": deferrals + 1}
    assert bounced.data["category"] == "expired"
    assert bounced.data["hard"] is False
    assert bounced.data["status"] == "4.4.7"
    assert bounced.data["source"] == "smtp"
    assert bounced.data["reply"].startswith("451 4.4.1 cannot connect to ")
    assert await recipient_states(relay.store, queue_id) == {"nobody@example.net": "expired"}


@pytest_twisted.ensureDeferred
async def test_the_last_attempt_is_made_at_max_age(
    relays: DeliveryRelays, database_url: str, fast_poll: None
) -> None:
    """Issue 11 item 13: the relay gave up when the next retry would land past the deadline
    (attempts at 0 and 2 s, expired at 2 s with max_age = 3 s); the last attempt is at 3 s."""
    reactor = real_reactor()
    [dead_port] = free_ports(1)  # nothing listens there
    relay = await relays.start(
        database_url,
        {"routes": smtp_route(dead_port), "retry_schedule": ["2s"], "max_age": "3s"},
    )
    queue_id = await submit(relay.smtp_port, ["late@example.net"], message_bytes("late"))
    await wait_for_events(reactor, relay.store, "expired", 1, within=30)
    rows = await select(
        relay.store,
        "SELECT e.type, e.time - m.received_at FROM events e"
        " JOIN messages m ON m.queue_id = e.queue_id WHERE e.queue_id = ? ORDER BY e.id",
        queue_id,
    )
    types = [str(t) for t, _ in rows]
    # Attempts at about 0 and 2 s, the last at 3 s; on a loaded machine the first may come
    # late enough that the 2 s retry is already at the deadline (one deferral fewer).
    assert types[0] == "received" and types[-2:] == ["expired", "bounced"], types
    assert set(types[1:-2]) == {"deferred"}, types
    expired_after_ms = int(rows[-2][1])
    assert expired_after_ms >= 3000, expired_after_ms  # not before max_age


# -- 4. TLS to the next hop ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sink_has_tls", "policy"),
    [(True, "opportunistic"), (False, "opportunistic"), (True, "required")],
)
@pytest_twisted.ensureDeferred
async def test_starttls_to_the_next_hop(
    relays: DeliveryRelays,
    sinks: Sinks,
    database_url: str,
    tmp_path: Path,
    sink_has_tls: bool,
    policy: str,
) -> None:
    backend = TrackingSinkBackend()
    tls = sink_tls(tmp_path / "sink") if sink_has_tls else None
    _, sink_port = await sinks.start(backend, tls)
    relay = await relays.start(database_url, {"routes": smtp_route(sink_port), "tls": policy})
    await submit(relay.smtp_port, ["tls@example.net"], message_bytes("tls"))
    [delivered] = await wait_for_events(real_reactor(), relay.store, "delivered", 1)
    assert delivered.data["tls"] is sink_has_tls
    [received] = backend.messages
    assert received.tls is sink_has_tls


@pytest_twisted.ensureDeferred
async def test_tls_required_and_no_starttls_defers(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    backend = TrackingSinkBackend()
    factory, sink_port = await sinks.start(backend)  # no STARTTLS
    relay = await relays.start(
        database_url, {"routes": smtp_route(sink_port), "tls": "required", "retry_schedule": ["1h"]}
    )
    queue_id = await submit(relay.smtp_port, ["secret@example.net"], message_bytes("tls"))
    [deferred] = await wait_for_events(real_reactor(), relay.store, "deferred", 1)
    assert deferred.data["reply"].startswith("451 4.4.1 "), deferred.data
    assert "STARTTLS" in deferred.data["reply"]
    assert factory.total_connections >= 1  # it did talk to the sink, and sent nothing
    assert backend.messages == []
    assert await count_events(relay.store, "delivered") == 0
    assert await recipient_states(relay.store, queue_id) == {"secret@example.net": "deferred"}


async def edge_and_central(
    relays: DeliveryRelays,
    sinks: Sinks,
    database_url: str,
    second_database_url: str,
    password: str,
    edge_delivery: dict[str, object] | None = None,
) -> tuple[TrackingSinkBackend, RunningRelay, RunningRelay]:
    """Forwarder mode: an edge relay whose smarthost is a central relay (AUTH required, the
    credential CREDENTIAL/PASSWORD) delivering to a sink; the edge logs in with ``password``."""
    backend = TrackingSinkBackend()
    _, sink_port = await sinks.start(backend)
    central = await relays.start(
        second_database_url,
        {"routes": smtp_route(sink_port)},
        smtp={"require_auth": True},
        data_dir="central",
    )
    await central.store.smtp_credentials.add(CREDENTIAL, hash_password(PASSWORD))
    edge = await relays.start(
        database_url,
        {
            "routes": smtp_route(central.smtp_port, "smtp+starttls", f"{CREDENTIAL}:{password}"),
            **(edge_delivery or {}),
        },
        data_dir="edge",
    )
    return backend, central, edge


# -- 5. forwarder mode: relay A -> smarthost relay B -> sink ---------------------------------------
@pytest_twisted.ensureDeferred
async def test_forwarder_mode_through_a_second_relay(
    relays: DeliveryRelays, sinks: Sinks, database_url: str, second_database_url: str
) -> None:
    reactor = real_reactor()
    backend, central, edge = await edge_and_central(
        relays, sinks, database_url, second_database_url, quote(PASSWORD)
    )
    body = "Sent through the edge.\r\n.dot line\r\n"
    data = message_bytes(
        "forwarded",
        headers=[
            "X-SmartRelay-Tag: forwarded",
            "X-SmartRelay-Meta-Order: 17",
            "X-SmartRelay-Unsubscribe: no",
        ],
        body=body,
    )
    recipients = ["far@example.net", "near@example.net"]  # one job: one transaction upstream
    edge_id = await submit(edge.smtp_port, recipients, data)

    at_edge = await wait_for_events(reactor, edge.store, "delivered", 2)
    at_central = await wait_for_events(reactor, central.store, "delivered", 2)
    # The edge hands the message over once, as accepted, over TLS, authenticated.
    assert {e.queue_id for e in at_edge} == {edge_id}
    assert {e.data["tls"] for e in at_edge} == {True}
    replies = {e.data["reply"] for e in at_edge}
    assert len(replies) == 1, f"the edge sent the message more than once: {replies}"
    [reply] = replies
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    central_id = reply.rpartition(" ")[2]
    assert central_id != edge_id
    assert {e.queue_id for e in at_central} == {central_id}
    received = await events(central.store, "received")
    assert sorted(e.recipient or "" for e in received) == recipients
    for event in received:
        assert event.queue_id == central_id
        assert event.data["credential"] == CREDENTIAL
        assert event.data["client_ip"] == "127.0.0.1"
    # The control headers reached the central relay, which applied them.
    rows = await select(central.store, "SELECT tags, metadata, options FROM messages")
    assert [(json.loads(t), json.loads(m), json.loads(o)) for t, m, o in rows] == [
        (["forwarded"], {"Order": "17"}, {"unsubscribe": False})
    ]

    assert sorted(m.recipients for m in backend.messages) == [[r] for r in recipients]
    for sunk in backend.messages:
        assert VERP.fullmatch(sunk.sender), sunk.sender
        headers = header_block(sunk.data)
        assert [h for h in headers if h.lower().startswith(b"x-smartrelay-")] == [
            f"X-SmartRelay-ID: {central_id}".encode()
        ]
        assert len([h for h in headers if h.lower().startswith(b"message-id:")]) == 1
        assert not [h for h in headers if h.lower().startswith(b"list-unsubscribe")]
        assert sunk.data.partition(b"\r\n\r\n")[2] == body.encode()


@pytest_twisted.ensureDeferred
async def test_forwarder_mode_never_splits_a_header_at_a_lone_cr(
    relays: DeliveryRelays, sinks: Sinks, database_url: str, second_database_url: str
) -> None:
    """Issue 11 item 5: a bare CR inside a header (the client's EHLO text in ``Received:``)
    went to the smarthost as it was (which refused it: 550 5.6.0 bare CR). It becomes a space,
    so no header line starts there, and the message is delivered."""
    reactor = real_reactor()
    backend, central, edge = await edge_and_central(
        relays, sinks, database_url, second_database_url, quote(PASSWORD)
    )
    raw = (
        b"Received: from evil\rAuthentication-Results: edge; dkim=pass ([127.0.0.1])\r\n"
        b"\tby edge.test (SmartRelay) with ESMTP; Sat, 5 Dec 2026 12:00:00 +0000\r\n"
        + message_bytes("lone cr")
    )
    # As the listener stores it (its EHLO check is another matter): straight into the queue.
    await edge.store.queue_message(NewMessage(SENDER, ("far@example.net",), raw))
    await wait_for_events(reactor, edge.store, "delivered", 1)
    await wait_for_events(reactor, central.store, "delivered", 1)
    (sunk,) = backend.messages
    lines = re.split(rb"\r\n|\r|\n", sunk.data.partition(b"\r\n\r\n")[0])
    assert not [line for line in lines if line.lower().startswith(b"authentication-results")]
    assert b"from evil Authentication-Results: edge; dkim=pass" in sunk.data


@pytest_twisted.ensureDeferred
async def test_forwarder_with_a_wrong_password_defers(
    relays: DeliveryRelays, sinks: Sinks, database_url: str, second_database_url: str
) -> None:
    """A smarthost refusing our credentials is our configuration problem, not the
    recipient's: the mail must wait in the queue (Postfix: smtp_sasl_auth_soft_bounce)."""
    backend, central, edge = await edge_and_central(
        relays, sinks, database_url, second_database_url, "wrong", {"retry_schedule": ["1h"]}
    )
    queue_id = await submit(edge.smtp_port, ["far@example.net"], message_bytes("wrong password"))

    async def attempted() -> list[Event] | None:
        found = [e for e in await events(edge.store, queue_id=queue_id) if e.type != "received"]
        return found or None

    outcome = await eventually(real_reactor(), attempted, "a delivery attempt at the edge")
    assert [e.type for e in outcome] == ["deferred"], outcome
    reply = outcome[0].data["reply"]
    assert reply.startswith("451 4.4.1 ") and "535 5.7.8" in reply, outcome[0].data
    assert await recipient_states(edge.store, queue_id) == {"far@example.net": "deferred"}
    assert await count_events(central.store, "received") == 0
    assert backend.messages == []


# -- 6. 1,000 messages through Postfix's smtp-source and smtp-sink ---------------------------------
@pytest_twisted.ensureDeferred
async def test_1000_messages_reach_postfix_smtp_sink(
    relays: DeliveryRelays, postfix_sink: PostfixSink, database_url: str
) -> None:
    reactor = real_reactor()
    count = 1000
    relay = await relays.start(
        database_url,
        {"routes": smtp_route(postfix_sink.port), "throttle": throttle(max_connections=20)},
    )
    source = find_postfix_tool("smtp-source")
    if source is not None:
        done: subprocess.CompletedProcess[str] = await deferToThread(
            run_smtp_source, source, relay.smtp_port, count, 20, "user@example.net"
        )
        assert done.returncode == 0, done.stdout + done.stderr
    else:
        mails = [(["user@example.net"], message_bytes(f"bulk {i}")) for i in range(count)]
        await submit_many(relay.smtp_port, mails)

    async def all_delivered() -> int | None:
        delivered = await count_events(relay.store, "delivered")
        return delivered if delivered >= count else None

    await eventually(reactor, all_delivered, f"{count} delivered events", within=60)
    rows = await select(
        relay.store,
        "SELECT r.queue_id, r.address, r.state,"
        " (SELECT COUNT(*) FROM events e WHERE e.type = 'delivered'"
        "  AND e.queue_id = r.queue_id AND e.recipient = r.address)"
        " FROM recipients r",
    )
    assert len(rows) == count
    assert {(r[1], r[2], int(r[3])) for r in rows} == {("user@example.net", "delivered", 1)}
    assert await count_events(relay.store, "delivered") == count

    def sink_has_all() -> list[str]:
        return postfix_sink.wait_for_messages(count, timeout=30)

    at_sink = await deferToThread(sink_has_all)
    assert sorted(at_sink) == sorted(str(r[0]) for r in rows)  # each queue id exactly once
