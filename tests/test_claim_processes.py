"""Two relay processes claiming due work from one database never get the same recipient."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest_twisted
from twisted.internet.threads import deferToThread

from smartrelay.storage.store import NewMessage, Store

ROOT = Path(__file__).resolve().parent.parent
RECIPIENTS = 1500


def run_workers(url: str, count: int) -> list[list[int]]:
    start_at = time.time() + 2.0
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.claim_worker", url, f"node-{i}", str(start_at)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    claims = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        claims.append(json.loads(out))
    return claims


@pytest_twisted.ensureDeferred
async def test_two_processes_never_claim_the_same_recipient(
    store: Store, database_url: str
) -> None:
    for batch in range(RECIPIENTS // 100):
        recipients = tuple(f"r{batch}-{i}@example.net" for i in range(100))
        await store.queue_message(NewMessage("app@example.com", recipients, b"Subject: x\r\n\r\n"))
    # The store's test clock is in 2023, so every recipient is due for the workers' real clock.
    claims = await deferToThread(run_workers, database_url, 2)
    first, second = (set(c) for c in claims)
    assert len(claims[0]) == len(first) and len(claims[1]) == len(second)
    assert first.isdisjoint(second)
    assert len(first | second) == RECIPIENTS
    # Both did real work: contention was exercised, not one process doing everything.
    assert first and second
