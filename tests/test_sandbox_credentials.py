"""Sandbox credentials (issue 18 point 4, docs/smtp.md "Sandbox credentials"): mail submitted
with one is accepted, stored and re-wrapped as usual, then recorded as ``delivered`` with
``sandbox: true`` without leaving the relay (or sent to ``[delivery] sandbox_route``).

Real relays on loopback with real SMTP sinks, the real ``smartrelay-ctl``, both engines."""

from __future__ import annotations

import email
import email.policy
import io
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock, deferLater

from smartrelay.config import ConfigError, parse_config
from smartrelay.events import (
    CSV_COLUMNS,
    SANDBOX_MX,
    DeliveredEvent,
    ExportedEvent,
    csv_row,
    event_data,
    event_object,
)
from smartrelay.metrics import RelayMetrics
from smartrelay.passwords import hash_password, verify_password
from smartrelay.smtp.replies import Reply
from smartrelay.storage.copying import copy_data
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.queue import RecipientOutcome
from smartrelay.storage.reports import TimelineEvent
from smartrelay.storage.rollups import SANDBOX_DELIVERED
from smartrelay.storage.store import NewMessage, Store
from smartrelay.web.ui.messages import describe_event
from tests.conftest import real_reactor
from tests.support.delivery_relay import (
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    events,
    select,
    smtp_route,
    submit,
    wait_for_events,
)
from tests.support.postfix import PostfixSink
from tests.support.postgres import PostgresServer
from tests.support.relay import RETURN_PATH_DOMAIN, free_ports
from tests.support.run import (
    Twistd,
    assert_cli_error,
    assert_ok,
    call,
    ctl,
    ctl_all,
    query,
    write_config,
    write_relay_config,
)
from tests.support.traffic import states, wait_until
from tests.support.webui import ui_site
from tests.test_copy_data import opened
from tests.test_web_ui_messages import add_events, logged_in, queue, sections

STAGE, PROD = ("staging-app", "stage-pw-0123456789"), ("prod-app", "prod-pw-0123456789")
HTML = (
    b"From: Shop <news@sender.test>\r\n"
    b"To: <fan@example.net>\r\n"
    b"Subject: staging run\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b'<html><body><a href="https://shop.example.com/p?a=1">buy</a></body></html>\r\n'
)


async def add_credentials(store: Store) -> None:
    await store.smtp_credentials.add(STAGE[0], hash_password(STAGE[1]), sandbox=True)
    await store.smtp_credentials.add(PROD[0], hash_password(PROD[1]))


async def message_flags(store: Store) -> dict[str, tuple[str | None, bool]]:
    rows = await select(store, "SELECT queue_id, credential, sandbox FROM messages")
    return {str(q): (c, bool(s)) for q, c, s in rows}


async def sandbox_delivered(store: Store) -> dict[str, dict[str, Any]]:
    """queue id -> the ``delivered`` event's data, of every delivered event."""
    return {str(e.queue_id): e.data for e in await events(store, "delivered")}


# -- end to end -------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_sandbox_mail_is_recorded_delivered_and_never_reaches_the_receiver(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    reactor = real_reactor()
    backend = TrackingSinkBackend()
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(database_url, {"routes": smtp_route(sink_port)})
    await add_credentials(relay.store)
    await relay.store.add_suppression("blocked@example.net", "manual")

    staged = await submit(relay.smtp_port, ["fan@example.net", "two@example.org"], HTML, STAGE)
    blocked = await submit(relay.smtp_port, ["blocked@example.net"], HTML, STAGE)
    real = await submit(relay.smtp_port, ["fan@example.net"], HTML, PROD)
    await wait_for_events(reactor, relay.store, "delivered", 3)
    await wait_for_events(reactor, relay.store, "suppressed", 1)

    # The fact "sandbox" was taken at AUTH and written on the message row at accept.
    assert await message_flags(relay.store) == {
        staged: (STAGE[0], True),
        blocked: (STAGE[0], True),
        real: (PROD[0], False),
    }
    received = await events(relay.store, "received")
    assert {e.data["credential"] for e in received} == {STAGE[0], PROD[0]}

    delivered = await events(relay.store, "delivered")
    sandboxed = [e for e in delivered if e.queue_id == staged]
    assert sorted(str(e.recipient) for e in sandboxed) == ["fan@example.net", "two@example.org"]
    for event in sandboxed:
        assert event.data["sandbox"] is True and event.data["mx"] == SANDBOX_MX
        assert event.data["reply"].startswith("250 2.0.0 sandbox")
        assert event.data["tls"] is False
    (normal,) = [e for e in delivered if e.queue_id == real]
    assert "sandbox" not in normal.data  # stored only when true: old rows' shape
    assert normal.data["mx"] == "127.0.0.1"
    # Suppressions apply to sandbox mail as to real mail.
    (suppressed,) = await events(relay.store, "suppressed")
    assert suppressed.queue_id == blocked and suppressed.data == {"reason": "manual"}
    states = await select(relay.store, "SELECT queue_id, state FROM recipients")
    expected = [(staged, "delivered"), (staged, "delivered"), (blocked, "suppressed")]
    expected.append((real, "delivered"))
    assert sorted((str(q), str(s)) for q, s in states) == sorted(expected)

    # Only the real credential's copy reached the receiving server.
    await deferLater(reactor, 0.3, lambda: None)
    (arrived,) = backend.messages
    assert arrived.recipients == ["fan@example.net"]
    assert f"X-SmartRelay-ID: {real}".encode() in arrived.data

    # Exported (events export, webhooks, the API): sandbox true / false on every delivered.
    exported = await relay.store.export_events(0, 100, types=("delivered",))
    flags = {(e.queue_id, e.recipient): event_object(e)["sandbox"] for e in exported}
    assert flags == {
        (staged, "fan@example.net"): True,
        (staged, "two@example.org"): True,
        (real, "fan@example.net"): False,
    }


@pytest_twisted.ensureDeferred
async def test_sandbox_route_gets_the_rewrapped_copy_marked_sandbox(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    reactor = real_reactor()
    receiver, catcher = TrackingSinkBackend(), TrackingSinkBackend()
    _, receiver_port = await sinks.start(receiver)
    _, catcher_port = await sinks.start(catcher)
    (web_port,) = free_ports(1)
    relay = await relays.start(
        database_url,
        {
            "routes": smtp_route(receiver_port),
            "sandbox_route": f"smtp://127.0.0.1:{catcher_port}",
        },
        extra={
            "web": {
                "listen": f"tcp:{web_port}:interface=127.0.0.1",
                "base_url": f"http://127.0.0.1:{web_port}",
            }
        },
    )
    await add_credentials(relay.store)

    staged = await submit(relay.smtp_port, ["fan@example.net"], HTML, STAGE)
    real = await submit(relay.smtp_port, ["fan@example.net"], HTML, PROD)
    delivered = await wait_for_events(reactor, relay.store, "delivered", 2)

    by_queue = {e.queue_id: e.data for e in delivered}
    assert by_queue[staged]["sandbox"] is True
    assert by_queue[staged]["mx"] == "127.0.0.1" and by_queue[staged]["reply"].startswith("250")
    assert "sandbox" not in by_queue[real]
    (caught,) = catcher.messages
    (arrived,) = receiver.messages
    assert f"X-SmartRelay-ID: {staged}".encode() in caught.data
    assert f"X-SmartRelay-ID: {real}".encode() in arrived.data
    # Re-wrapped exactly as real mail: VERP return path, a tracked link, no control headers.
    assert re.fullmatch(rf"b\+[a-z2-7]+@{re.escape(RETURN_PATH_DOMAIN)}", caught.sender)
    parsed = email.message_from_bytes(caught.data, policy=email.policy.default)
    html = parsed.get_content()
    assert re.search(rf'href="http://127\.0\.0\.1:{web_port}/c/[^"]+"', html), html
    assert parsed["List-Unsubscribe"] is not None


@pytest_twisted.ensureDeferred
async def test_a_credential_changed_later_does_not_change_mail_already_accepted(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    """The sandbox flag travels on the message row: the manager reads that, never the
    credential. The receiver defers the first attempt; the credential changes meanwhile."""
    reactor = real_reactor()
    attempts: list[int] = []

    def first_deferred(n: int) -> Reply:
        attempts.append(n)
        return Reply(451, "4.3.0", "later") if len(attempts) == 1 else Reply(250, "2.0.0", "ok")

    backend = TrackingSinkBackend(data_script=first_deferred)
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(
        database_url, {"routes": smtp_route(sink_port), "retry_schedule": ["1s"]}
    )
    await add_credentials(relay.store)
    queued = await submit(relay.smtp_port, ["fan@example.net"], HTML, PROD)
    await wait_for_events(reactor, relay.store, "deferred", 1)

    async def flip(cursor: ICursor) -> None:
        await cursor.execute("UPDATE smtp_credentials SET sandbox = 1 WHERE name = ?", (PROD[0],))

    await relay.store.engine.run_interaction("test_flip", flip)
    (event,) = await wait_for_events(reactor, relay.store, "delivered", 1)
    assert event.queue_id == queued and "sandbox" not in event.data
    assert len(attempts) == 2 and len(backend.messages) == 1  # deferred, then delivered
    # Mail submitted from now on with that credential is sandbox mail.
    later = await submit(relay.smtp_port, ["fan@example.net"], HTML, PROD)
    delivered = await wait_for_events(reactor, relay.store, "delivered", 2)
    assert [e.data.get("sandbox") for e in delivered if e.queue_id == later] == [True]
    assert len(attempts) == 2 and len(backend.messages) == 1


# -- the CLI ----------------------------------------------------------------------------------
def test_cli_adds_and_lists_sandbox_credentials(tmp_path: Path, database_url: str) -> None:
    config = write_config(tmp_path, database_url)
    sandbox, plain = ctl_all(
        config,
        call("smtp-credential", "add", "stage", "--sandbox"),
        call("smtp-credential", "add", "prod"),
    )
    added = assert_ok(sandbox)
    assert added.lines[0].startswith("sandbox SMTP credential 'stage' added")
    assert len(added.lines) == 2
    assert assert_ok(plain).lines[0].startswith("SMTP credential 'prod' added")
    rows = query(database_url, "SELECT name, sandbox, password_hash FROM smtp_credentials")
    flags = {str(name): int(flag) for name, flag, _ in rows}
    assert flags == {"stage": 1, "prod": 0}
    hashes = {str(name): str(h) for name, _, h in rows}
    assert verify_password(added.lines[1], hashes["stage"])

    listed = assert_ok(ctl(config, "smtp-credential", "list"))
    columns = [line.split("\t") for line in listed.lines]
    # Backward compatible: a plain credential keeps its two columns; a sandbox one has a
    # fourth, "sandbox", after the (empty) hold column.
    assert [c[0] for c in columns] == ["prod", "stage"]
    assert len(columns[0]) == 2
    assert len(columns[1]) == 4 and columns[1][2:] == ["", "sandbox"]

    # Held and sandbox: both columns filled.
    query(
        database_url,
        "INSERT INTO credential_volume (credential, baseline, windows, updated_at, held_at,"
        " hold_reason) VALUES ('stage', 1.0, 3, 0, 1700000000000, 'volume alert')",
    )
    duplicate, listed_again, help_text = ctl_all(
        config,
        call("smtp-credential", "add", "stage", "--sandbox"),
        call("smtp-credential", "list"),
        call("smtp-credential", "add", "--help"),
    )
    assert_cli_error(duplicate, "'stage'", "exists")
    stage_line = assert_ok(listed_again).lines[1].split("\t")
    assert stage_line[0] == "stage" and stage_line[2].startswith("held since ")
    assert stage_line[3] == "sandbox" and len(stage_line) == 4
    assert "--sandbox" in assert_ok(help_text).stdout


# -- storage, both engines --------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_store_keeps_the_sandbox_flags(store: Store) -> None:
    await store.smtp_credentials.add("stage", "hash-s", sandbox=True)
    await store.smtp_credentials.add("prod", "hash-p")
    stage, prod = (
        await store.smtp_credentials.check_record("stage"),
        (await store.smtp_credentials.check_record("prod")),
    )
    assert stage is not None and (stage.password_hash, stage.sandbox) == ("hash-s", True)
    assert prod is not None and (prod.password_hash, prod.sandbox) == ("hash-p", False)
    assert await store.smtp_credentials.check_record("nobody") is None
    assert [(x.name, x.sandbox) for x in await store.smtp_credentials.list()] == [
        ("prod", False),
        ("stage", True),
    ]
    # The web users' table has no such flag and is unchanged.
    await store.web_users.add("admin", "hash-w")
    assert [(x.name, x.sandbox) for x in await store.web_users.list()] == [("admin", False)]

    sandboxed = await store.queue_message(
        NewMessage("a@x.test", ("r@y.test",), b"Subject: s\r\n\r\nx\r\n", credential="stage",
                   sandbox=True)
    )  # fmt: skip
    plain = await store.queue_message(NewMessage("a@x.test", ("r@y.test",), b"\r\nx\r\n"))
    loaded = await store.load_messages([sandboxed.queue_id, plain.queue_id])
    assert loaded[sandboxed.queue_id].sandbox is True
    assert loaded[plain.queue_id].sandbox is False


@pytest_twisted.ensureDeferred
async def test_rollups_count_sandbox_deliveries_apart(store: Store, clock: Clock) -> None:
    queued = await store.queue_message(NewMessage("a@x.test", ("r1@y.test", "r2@y.test"), b"x"))
    claimed = await store.claim_due("n", limit=10, lease=60)

    outcomes = [
        RecipientOutcome(
            c.id, queued.queue_id, c.address, "delivered", 1, None, "250",
            (DeliveredEvent("mx", "250 ok", False, 1, sandbox=c.address == "r1@y.test"),),
        )
        for c in claimed
    ]  # fmt: skip
    await store.record_outcomes("n", outcomes)
    assert await store.roll_up(clock.seconds() + 1, 100) == 4  # 2 received, 2 delivered
    rows = await select(store, "SELECT type, SUM(count) FROM rollups WHERE tag = '*' GROUP BY type")
    assert {str(t): int(n) for t, n in rows} == {
        "received": 2,
        "delivered": 1,
        SANDBOX_DELIVERED: 1,
    }


@pytest_twisted.ensureDeferred
async def test_copy_data_carries_the_sandbox_columns(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    reactor = real_reactor()
    async with (
        opened(f"sqlite:{tmp_path / 'first.db'}") as first,
        opened(postgres_server.create_database(), migrated=False) as second,
        opened(f"sqlite:{tmp_path / 'third.db'}", migrated=False) as third,
    ):
        store = Store(first, reactor)
        await store.smtp_credentials.add("stage", "hash-s", sandbox=True)
        await store.smtp_credentials.add("prod", "hash-p")
        kept = await store.queue_message(NewMessage("a@x.test", ("r@y.test",), b"x", sandbox=True))
        sent = await store.queue_message(NewMessage("a@x.test", ("r@y.test",), b"y"))
        await copy_data(first, second, reactor)
        await copy_data(second, third, reactor)
        for engine in (second, third):
            copy = Store(engine, reactor)
            listed = await copy.smtp_credentials.list()
            assert [(x.name, x.sandbox) for x in listed] == [("prod", False), ("stage", True)]
            loaded = await copy.load_messages([kept.queue_id, sent.queue_id])
            assert (loaded[kept.queue_id].sandbox, loaded[sent.queue_id].sandbox) == (True, False)


# -- the forms users see ----------------------------------------------------------------------
def _exported(data: dict[str, Any]) -> ExportedEvent:
    return ExportedEvent(1, "delivered", 1.7e9, "Q1", "r@x.test", data, "a@x.test", (), {})


def test_event_forms_carry_sandbox() -> None:
    kept = DeliveredEvent(SANDBOX_MX, "250 2.0.0 sandbox", False, 1, sandbox=True)
    assert event_data(kept) == {
        "mx": SANDBOX_MX,
        "reply": "250 2.0.0 sandbox",
        "tls": False,
        "attempt": 1,
        "sandbox": True,
    }
    assert event_object(_exported(event_data(kept)))["sandbox"] is True
    # A row without the key (real mail, or written before sandbox existed): sandbox false.
    old = {"mx": "mx.x", "reply": "250 ok", "tls": True, "attempt": 1}
    assert event_data(DeliveredEvent("mx.x", "250 ok", True, 1)) == old
    assert event_object(_exported(old))["sandbox"] is False
    # CSV: a column of its own, the last, so the columns before it keep their places.
    assert CSV_COLUMNS[-1] == "sandbox"
    assert csv_row(_exported(event_data(kept)))["sandbox"] == "true"
    assert csv_row(_exported(old))["sandbox"] == "false"
    out = io.StringIO()
    json.dump(event_object(_exported(old)), out)
    assert '"sandbox": false' in out.getvalue()


def test_metrics_count_sandbox_deliveries_apart() -> None:
    metrics = RelayMetrics()
    metrics.count_events(
        [
            DeliveredEvent(SANDBOX_MX, "250", False, 1, sandbox=True),
            DeliveredEvent(SANDBOX_MX, "250", False, 1, sandbox=True),
            DeliveredEvent("mx.x", "250", True, 1),
        ]
    )
    value = metrics.own_registry.get_sample_value
    assert value("smartrelay_recipients_delivered_total") == 1
    assert value("smartrelay_recipients_sandbox_delivered_total") == 2


def test_timeline_marks_sandbox_deliveries() -> None:
    def entry(data: dict[str, Any]) -> Any:
        return describe_event(TimelineEvent(1, 1.7e9, "delivered", "r@x.test", data))

    kept = entry({"mx": SANDBOX_MX, "reply": "250 2.0.0 sandbox", "tls": False, "attempt": 1,
                  "sandbox": True})  # fmt: skip
    assert kept.headline.startswith("Sandbox: recorded as delivered, never sent")
    assert ("Sandbox", "yes: submitted with a sandbox credential") in [
        (f.label, f.value) for f in kept.facts
    ]
    routed = entry({"mx": "127.0.0.1", "reply": "250 ok", "tls": False, "attempt": 1,
                    "sandbox": True})  # fmt: skip
    assert routed.headline.startswith("Sandbox: sent to the sandbox route")
    real = entry({"mx": "mx.x", "reply": "250 ok", "tls": True, "attempt": 1})
    assert real.headline.startswith("Delivered:")
    assert "Sandbox" not in [f.label for f in real.facts]


# -- configuration ----------------------------------------------------------------------------
def _delivery(**keys: Any) -> dict[str, Any]:
    return {"database": {"url": "sqlite:/tmp/x.db"}, "delivery": keys}


def test_sandbox_route_config() -> None:
    assert parse_config(_delivery()).delivery.sandbox_route is None
    route = "smtp://127.0.0.1:1025"
    assert parse_config(_delivery(sandbox_route=route)).delivery.sandbox_route == route
    for bad, fragment in [
        ("", "must not be empty"),
        ("smtp+starttls://u:p@catcher:587", "must be an smtp://host:port URL"),
        ("http://127.0.0.1:8025", "route target"),
        ("smtp://127.0.0.1:1025/x", "must not have a path"),
        (25, "expected a string"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config(_delivery(sandbox_route=bad))
        assert info.value.key == "delivery.sandbox_route", bad
        assert fragment in info.value.problem, (bad, info.value.problem)
        assert "u:p" not in str(info.value)


@pytest_twisted.ensureDeferred
async def test_message_page_marks_sandbox_mail(tmp_path: Path, store: Store, clock: Clock) -> None:
    """The reports UI over real HTTP: a sandbox message's page has the badge and its
    timeline says it was never sent; a real message's page has neither."""
    async with ui_site(tmp_path, store, clock, sections=sections) as site:
        browser = await logged_in(site)
        staged = await queue(store, clock, "app@x.test", ("r@y.test",), credential="stage",
                             sandbox=True)  # fmt: skip
        real = await queue(store, clock, "app@x.test", ("r@y.test",), credential="prod")
        kept = DeliveredEvent(SANDBOX_MX, "250 2.0.0 sandbox", False, 1, sandbox=True)
        await add_events(store, clock.seconds(), [(staged, "r@y.test", kept)])
        sent = DeliveredEvent("mx.y.test", "250 ok", True, 1)
        await add_events(store, clock.seconds(), [(real, "r@y.test", sent)])

        code, _, page = await browser.request("GET", f"/ui/messages/{staged}")
        assert code == 200
        assert 'class="badge sandbox"' in page
        assert "Sandbox: recorded as delivered, never sent (sandbox credential)" in page
        code, _, page = await browser.request("GET", f"/ui/messages/{real}")
        assert code == 200
        assert 'class="badge sandbox"' not in page and "Sandbox:" not in page
        assert "Delivered: the receiving server accepted it" in page


# -- as users run it: twistd, a delivery process, smartrelay-ctl, swaks, Postfix's smtp-sink --
def swaks_as(swaks_path: str, port: int, login: tuple[str, str], to: str) -> str:
    command = [swaks_path, "--server", f"127.0.0.1:{port}", "--ehlo", "client.test"]
    command += ["--timeout", "15", "--tls", "--auth", "LOGIN", "--auth-user", login[0]]
    command += ["--auth-password", login[1], "--from", "app@sender.test", "--to", to]
    command += ["--header", "Subject: sandbox run"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    transcript = done.stdout + done.stderr
    assert done.returncode == 0, transcript
    match = re.search(r"<~  250 2\.0\.0 Ok: queued as (\S+)", transcript)
    assert match is not None, transcript
    return match[1]


def test_twistd_relay_with_a_delivery_process(
    tmp_path: Path, database_url: str, postfix_sink: PostfixSink
) -> None:
    swaks_path = shutil.which("swaks")
    assert swaks_path is not None, "swaks is not installed"
    (smtp_port,) = free_ports(1)
    config = write_relay_config(
        tmp_path,
        database_url,
        extra=(
            "[delivery]\nprocesses = 1\n[delivery.routes]\n"
            f'"*" = "smtp://127.0.0.1:{postfix_sink.port}"\n'
        ),
        smtp_listen=f"tcp:{smtp_port}:interface=127.0.0.1",
    )
    stage, prod = ctl_all(
        config,
        call("smtp-credential", "add", "stage", "--sandbox"),
        call("smtp-credential", "add", "prod"),
    )
    stage_login = ("stage", assert_ok(stage).lines[1])
    prod_login = ("prod", assert_ok(prod).lines[1])
    relay = Twistd(config, tmp_path)
    try:
        relay.wait_for("smtp: listening on")
        relay.wait_for("delivery[0] delivery: node")
        staged = swaks_as(swaks_path, smtp_port, stage_login, "fan@example.net")
        real = swaks_as(swaks_path, smtp_port, prod_login, "fan@example.net")
        wait_until(
            lambda: True if states(database_url)["delivered"] == 2 else None,
            "both delivered",
            timeout=60,
        )
        assert postfix_sink.wait_for_messages(1) == [real]
        relay.wait_for(f"{staged}: to=<fan@example.net> dest=sandbox delivered")
    finally:
        relay.stop(signal.SIGTERM, timeout=30)
        relay.kill()
    rows = query(
        database_url, "SELECT queue_id, data FROM events WHERE type = 'delivered' ORDER BY id"
    )
    data = {str(q): json.loads(d) for q, d in rows}
    assert data[staged]["sandbox"] is True and data[staged]["mx"] == SANDBOX_MX
    assert "sandbox" not in data[real]
    # Nothing of the sandbox mail arrived.
    assert [m.header("X-SmartRelay-ID") for m in postfix_sink.messages()] == [real]
    assert "Traceback" not in relay.output
