"""`smartrelay-ctl queue ...` and `events export`, run as the real console script."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from smartrelay.events import DeliveredEvent
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import ClaimedRecipient, NewMessage, RecipientOutcome, Store

CTL = Path(sys.executable).parent / "smartrelay-ctl"


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CTL), "--config", str(config), *args], capture_output=True, text=True, timeout=60
    )


async def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = await deferToThread(ctl, config, *args)
    return result


@pytest_twisted.ensureDeferred
async def test_queue_commands_and_event_export(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n')
    first = await store.queue_message(
        NewMessage("app@example.com", ("a@example.net", "b@example.net"), b"x", tags=("t1",))
    )
    second = await store.queue_message(NewMessage("app@example.com", ("c@example.org",), b"y"))

    listed = await run(config, "queue", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split("\t")[:3] for line in lines] == [
        [first.queue_id, "a@example.net", "queued"],
        [first.queue_id, "b@example.net", "queued"],
        [second.queue_id, "c@example.org", "queued"],
    ]
    one = await run(config, "queue", "list", second.queue_id)
    assert one.stdout.count("\n") == 1 and "c@example.org" in one.stdout

    retried = await run(config, "queue", "retry")
    assert retried.returncode == 0 and retried.stdout.strip() == "3 recipient(s) due now"

    dropped = await run(config, "queue", "drop", first.queue_id)
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.strip() == f"dropped 2 recipient(s) of {first.queue_id}"
    again = await run(config, "queue", "drop", first.queue_id)
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"smartrelay-ctl: error: no waiting recipient for queue id {first.queue_id}"
    )

    exported = await run(config, "events", "export")
    assert exported.returncode == 0, exported.stderr
    events = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [(e["type"], e["recipient"]) for e in events] == [
        ("received", "a@example.net"),
        ("received", "b@example.net"),
        ("received", "c@example.org"),
        ("dropped", "a@example.net"),
        ("dropped", "b@example.net"),
    ]
    assert events[0]["sender"] == "app@example.com" and events[0]["tags"] == ["t1"]
    assert events[0]["time"].endswith("Z") and events[0]["size"] == 1

    only = await run(config, "events", "export", "--type", "dropped", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(only.stdout)))
    assert [(r["type"], r["recipient"], r["queue_id"]) for r in rows] == [
        ("dropped", "a@example.net", first.queue_id),
        ("dropped", "b@example.net", first.queue_id),
    ]
    future = await run(config, "events", "export", "--since", "2999-01-01T00:00:00Z")
    assert future.returncode == 0 and future.stdout == ""
    bad = await run(config, "events", "export", "--since", "yesterday")
    assert bad.returncode == 1
    assert "neither an RFC 3339 time nor a duration" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1


@pytest_twisted.ensureDeferred
async def test_claimed_rows_are_listed_retried_and_dropped(
    store: Store, clock: Clock, database_url: str, tmp_path: Path
) -> None:
    """Issue 11 item 1: a row left ``delivering`` (its worker died or got stuck) could not be
    retried or dropped. A lease that ran out can be retried and dropped; a row a live worker
    holds can be dropped, and the outcome that worker records afterwards is ignored."""
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n')
    stuck = await store.queue_message(NewMessage("app@example.com", ("stuck@example.net",), b"x"))
    (stuck_row,) = await store.claim_due("dead-node", limit=10, lease=60)  # ran out long ago
    held = await store.queue_message(NewMessage("app@example.com", ("held@example.net",), b"y"))
    # The CLI runs on the real clock; this lease runs an hour past it.
    live_lease = time.time() - clock.seconds() + 3600
    (held_row,) = await store.claim_due("live-node", limit=10, lease=live_lease)

    listed = await run(config, "queue", "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [(r[0], r[2], r[4].split(":", 1)[0]) for r in rows] == [
        (stuck.queue_id, "delivering", "lease=expired"),
        (held.queue_id, "delivering", "lease=until"),
    ]

    retried = await run(config, "queue", "retry", stuck.queue_id)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == "1 recipient(s) due now"
    not_held = await run(config, "queue", "retry", held.queue_id)  # a live worker has it
    assert not_held.returncode == 1
    assert not_held.stderr.startswith(
        f"smartrelay-ctl: error: 1 recipient(s) of {held.queue_id} are being delivered right now"
    )
    assert await _states(store) == {"stuck@example.net": "queued", "held@example.net": "delivering"}
    # The dead node's late outcome no longer counts: the row was released.
    assert await store.record_outcomes("dead-node", [_delivered(stuck_row)]) == 0

    clock.advance(time.time() + 1 - clock.seconds())  # to where the CLI made it due
    (stuck_row,) = await store.claim_due("dead-node", limit=10, lease=60)
    for queue_id in (stuck.queue_id, held.queue_id):
        dropped = await run(config, "queue", "drop", queue_id)
        assert dropped.returncode == 0, dropped.stderr
        assert dropped.stdout.strip() == f"dropped 1 recipient(s) of {queue_id}"
    # The live worker finishes and records its outcome: the row stays dropped, no event.
    assert await store.record_outcomes("live-node", [_delivered(held_row)]) == 0
    assert await _states(store) == {"stuck@example.net": "dropped", "held@example.net": "dropped"}
    exported = await run(config, "events", "export", "--type", "delivered")
    assert exported.returncode == 0 and exported.stdout == ""
    empty = await run(config, "queue", "list")
    assert empty.stdout.strip() == "the queue is empty"


def _delivered(row: ClaimedRecipient) -> RecipientOutcome:
    return RecipientOutcome(
        row.id,
        row.queue_id,
        row.address,
        "delivered",
        1,
        None,
        "250 ok",
        (DeliveredEvent(mx="mx.example.net", reply="250 ok", tls=False, attempt=1),),
    )


async def _states(store: Store) -> dict[str, str]:
    async def txn(cursor: ICursor) -> dict[str, str]:
        await cursor.execute("SELECT address, state FROM recipients ORDER BY id")
        return {str(a): str(s) for a, s in cursor.fetchall()}

    return await store.engine.run_interaction("test_states", txn, readonly=True)
