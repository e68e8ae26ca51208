"""Volume alerts' storage (storage/credential_volume.py) and the watch service
(smtp/volume_watch.py) on both engines, on a task.Clock: baselines saved and read back across
a restart, the alert event and the hold in one transaction, the held set read by the watch,
release."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest_twisted
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from smartrelay.events import AlertEvent
from smartrelay.metrics import RelayMetrics
from smartrelay.passwords import hash_password
from smartrelay.smtp.volume import LEARNING_WINDOWS, VolumeSettings
from smartrelay.smtp.volume_watch import HELD_REPLY, VolumeWatch
from smartrelay.storage.credential_volume import (
    CredentialBaseline,
    CredentialVolumeStore,
    HeldCredential,
)
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.service import StorageStopped
from smartrelay.storage.store import Store

WINDOW = 60.0
HASH = hash_password("not used here")


def ready(store: Store) -> Callable[[], Awaitable[CredentialVolumeStore]]:
    return lambda: succeed(store)


async def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    async def txn(cursor: Any) -> list[tuple[Any, ...]]:
        await cursor.execute(sql)
        return list(cursor.fetchall())

    return await store.run("t", txn)


@pytest_twisted.ensureDeferred
async def test_baselines_round_trip(store: Store, clock: Clock) -> None:
    await store.smtp_credentials.add("app", HASH)
    await store.smtp_credentials.add("other", HASH)
    now = clock.seconds()
    await store.save_baselines(
        [
            CredentialBaseline("app", 12.5, 7, now),
            CredentialBaseline("other", None, 0, now - 10),
            CredentialBaseline("gone", 3.0, 9, now),  # no such credential: skipped
        ]
    )
    assert await store.credential_baselines(10) == [
        CredentialBaseline("app", 12.5, 7, now),
        CredentialBaseline("other", None, 0, now - 10),
    ]
    await store.save_baselines([CredentialBaseline("app", 13.0, 8, now + 60)])
    assert (await store.credential_baselines(1)) == [CredentialBaseline("app", 13.0, 8, now + 60)]
    await store.smtp_credentials.remove("app")  # the row goes with the credential
    assert [b.credential for b in await store.credential_baselines(10)] == ["other"]


@pytest_twisted.ensureDeferred
async def test_alert_hold_and_release(store: Store, clock: Clock) -> None:
    await store.smtp_credentials.add("app", HASH)
    alert = AlertEvent("credential-volume", "app", 400, 20.0, "hold")
    assert await store.record_volume_alert(alert, "volume alert: 400 messages") is True
    assert [(h.credential, h.held_at, h.reason) for h in await store.held_credentials()] == [
        ("app", clock.seconds(), "volume alert: 400 messages")
    ]
    [(kind, queue_id, recipient, data)] = await rows(
        store, "SELECT type, queue_id, recipient, data FROM events"
    )
    assert (kind, queue_id, recipient) == ("alert", None, None)
    assert json.loads(data) == {
        "kind": "credential-volume",
        "credential": "app",
        "rate": 400,
        "baseline": 20.0,
        "action": "hold",
    }
    [(alerted_at, held_at, baseline, windows)] = await rows(
        store, "SELECT alerted_at, held_at, baseline, windows FROM credential_volume"
    )
    assert alerted_at == held_at == round(clock.seconds() * 1000)
    assert (baseline, windows) == (20.0, 0)
    recent = await store.recent_volume_alerts(clock.seconds() - 86400, 10)
    assert [(a.credential, a.rate, a.baseline, a.action) for a in recent] == [
        ("app", 400, 20.0, "hold")
    ]
    assert await store.release_credential("app") == "released"
    assert await store.held_credentials() == []
    assert await store.release_credential("app") == "not-held"
    assert await store.release_credential("nobody") == "unknown"
    # A warning alert keeps no hold; a removed credential's alert is not written.
    clock.advance(5)
    warn = AlertEvent("credential-volume", "app", 500, 21.5, "warn")
    assert await store.record_volume_alert(warn, None, windows=33) is True
    assert await store.held_credentials() == []
    [saved] = await store.credential_baselines(10)
    assert (saved.baseline, saved.windows, saved.updated_at) == (21.5, 33, clock.seconds())
    assert (
        await store.record_volume_alert(AlertEvent("credential-volume", "x", 1, 0, "warn"), None)
        is False
    )
    assert [a.rate for a in await store.recent_volume_alerts(clock.seconds() - 1, 10)] == [500]
    assert len(await store.recent_volume_alerts(0, 10)) == 2


def hold_settings(action: str = "hold") -> VolumeSettings:
    return VolumeSettings(action=action, factor=10.0, minimum=20, window=WINDOW)


def align(clock: Clock) -> None:
    clock.advance(math.ceil(clock.seconds() / WINDOW) * WINDOW - clock.seconds())


async def learn(watch: VolumeWatch, clock: Clock, who: str, per_window: int) -> None:
    """The first window (not learned), then LEARNING_WINDOWS windows of ``per_window``."""
    for _ in range(LEARNING_WINDOWS + 1):
        for _ in range(per_window):
            watch.message_accepted(who)
            clock.advance(1)
        clock.advance(WINDOW - clock.seconds() % WINDOW)
        await watch.settled()
    watch.message_accepted(who)


@pytest_twisted.ensureDeferred
async def test_watch_baseline_survives_a_restart(store: Store, clock: Clock) -> None:
    await store.smtp_credentials.add("app", HASH)
    align(clock)
    watch = VolumeWatch(clock, hold_settings("warn"), ready(store), save_interval=3600)
    watch.startService()
    await watch.settled()
    await learn(watch, clock, "app", 3)
    learned = watch.meter.baseline("app")
    assert learned[0] is not None and math.isclose(learned[0], 3.0)
    assert learned[1] == LEARNING_WINDOWS
    await watch.stopService()  # saves
    [saved] = await store.credential_baselines(10)
    assert (saved.baseline, saved.windows) == learned

    again = VolumeWatch(clock, hold_settings("warn"), ready(store))
    again.startService()
    await again.settled()
    assert again.meter.baseline("app") == learned
    # Trusted at once: a burst alerts without a new learning period.
    for _ in range(40):
        again.message_accepted("app")
    await again.settled()
    assert [json.loads(r[0])["rate"] for r in await rows(store, "SELECT data FROM events")] == [31]
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_watch_saves_now_and_then(store: Store, clock: Clock) -> None:
    await store.smtp_credentials.add("app", HASH)
    align(clock)
    watch = VolumeWatch(clock, hold_settings("warn"), ready(store), save_interval=30)
    watch.startService()
    await watch.settled()
    await learn(watch, clock, "app", 2)
    clock.advance(30)  # the save loop
    await watch.settled()
    [saved] = await store.credential_baselines(10)
    assert saved.baseline is not None and math.isclose(saved.baseline, 2.0)
    assert saved.windows == LEARNING_WINDOWS
    await watch.stopService()


@pytest_twisted.ensureDeferred
async def test_watch_hold_and_release(store: Store, clock: Clock) -> None:
    for name in ("app", "other"):
        await store.smtp_credentials.add(name, HASH)
    align(clock)
    metrics = RelayMetrics()
    watch = VolumeWatch(clock, hold_settings(), ready(store), metrics.alerts, poll_interval=5)
    watch.startService()
    await watch.settled()
    await learn(watch, clock, "app", 4)
    await learn(watch, clock, "other", 4)
    for _ in range(60):  # 15x: one alert, held at once
        watch.message_accepted("app")
    assert watch.check_sender("app") == HELD_REPLY
    assert watch.check_sender("other") is None and watch.check_sender(None) is None
    await watch.settled()
    assert [h.credential for h in await store.held_credentials()] == ["app"]
    events = await rows(store, "SELECT type, data FROM events")
    assert [(t, json.loads(d)["action"]) for t, d in events] == [("alert", "hold")]
    assert metrics.alerts.labels(kind="credential-volume", action="hold")._value.get() == 1
    clock.advance(5)  # a poll: still held (it is in the database)
    await watch.settled()
    assert watch.check_sender("app") == HELD_REPLY
    # Released by the CLI (another process): seen at the next poll, and re-armed.
    assert await store.release_credential("app") == "released"
    assert watch.check_sender("app") == HELD_REPLY
    clock.advance(5)
    await watch.settled()
    assert watch.check_sender("app") is None
    assert not watch.meter.alerting("app")
    for _ in range(60):  # a second burst: a second alert
        watch.message_accepted("app")
    await watch.settled()
    assert len(await rows(store, "SELECT id FROM events WHERE type = 'alert'")) == 2
    assert watch.check_sender("app") == HELD_REPLY
    # Held by another node: this node refuses its mail within a poll.
    await store.record_volume_alert(
        AlertEvent("credential-volume", "other", 99, 4.0, "hold"), "from node 2"
    )
    clock.advance(5)
    await watch.settled()
    assert watch.check_sender("other") == HELD_REPLY
    await watch.stopService()


class Flaky:
    """The store, whose first ``n`` reads of the held set and baselines find the database
    unavailable."""

    def __init__(self, store: Store, n: int) -> None:
        self.store = store
        self.n = n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _down(self) -> None:
        if self.n > 0:
            self.n -= 1
            raise DatabaseUnavailable("connection refused")

    async def credential_baselines(self, limit: int) -> list[CredentialBaseline]:
        self._down()
        return await self.store.credential_baselines(limit)

    async def held_credentials(self) -> list[HeldCredential]:
        self._down()
        return await self.store.held_credentials()


@pytest_twisted.ensureDeferred
async def test_watch_starts_without_the_database(store: Store, clock: Clock) -> None:
    """The database unavailable at start (and at the first poll): the watch still runs its
    polls, and picks the held set up once it answers; one-line warnings, no traceback."""
    await store.smtp_credentials.add("app", HASH)
    await store.record_volume_alert(AlertEvent("credential-volume", "app", 99, 4.0, "hold"), "x")
    flaky = Flaky(store, 2)
    watch = VolumeWatch(
        clock, hold_settings(), lambda: succeed(cast(Store, flaky)), poll_interval=5
    )
    watch.startService()
    await watch.settled()
    assert watch.check_sender("app") is None  # not read yet
    clock.advance(5)  # the first poll: still down
    await watch.settled()
    assert watch.check_sender("app") is None and flaky.n == 0
    clock.advance(5)
    await watch.settled()
    assert watch.check_sender("app") == HELD_REPLY
    await watch.stopService()


@pytest_twisted.ensureDeferred
async def test_watch_without_a_store_does_nothing(clock: Clock) -> None:
    """The storage never opened (fatal, reported by the storage service): no polls."""
    watch = VolumeWatch(clock, hold_settings(), lambda: fail(StorageStopped("shut down")))
    watch.startService()
    await watch.settled()
    clock.advance(60)
    await watch.settled()
    assert watch.check_sender("app") is None
    await watch.stopService()
