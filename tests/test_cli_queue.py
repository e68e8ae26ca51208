"""`smartrelay-ctl queue ...` and `events export`, run as the real console script."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet.threads import deferToThread

from smartrelay.storage.store import NewMessage, Store

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
