"""The relay's per-credential volume watch (docs/smtp.md, "Volume alerts"): a service in the
main process, fed by the submission backend with each message it accepts under an SMTP AUTH
credential, and asked at MAIL FROM whether a credential is held.

It counts with a :class:`~smartrelay.smtp.volume.VolumeMeter`; an alert writes the
``alert`` event (and, with ``hold``, the hold) in one transaction, logs a warning and counts
``smartrelay_alerts``. Baselines are saved every ``save_interval`` seconds and at stop, and
read back at start. The held set is the database's, read every ``poll_interval`` seconds
(other nodes' holds, the CLI's and the UI's releases); a hold this node decides is in force
here at once, before its transaction commits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from prometheus_client import Counter
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.config import SmtpConfig
from smartrelay.events import AlertEvent
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.volume import MAX_TRACKED, VolumeMeter, VolumeSettings, VolumeSpike
from smartrelay.storage.credential_volume import CredentialBaseline, CredentialVolumeStore
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.service import StorageStopped
from smartrelay.units import format_duration

__all__ = ["HELD_REPLY", "HeldCredentials", "VolumeGate", "VolumeWatch", "volume_settings"]

log = Logger()

ALERT_KIND = "credential-volume"
#: Seconds between reads of the held set.
POLL_INTERVAL = 5.0
#: Seconds between saves of the baselines learned.
SAVE_INTERVAL = 60.0
#: What a held credential's MAIL FROM gets (no name, no number: nothing the client could use
#: to pace a leak under the threshold).
HELD_REPLY = Reply(
    451,
    "4.7.1",
    "Mail from this credential is held after a volume alert (far more mail than usual,"
    " possibly a leaked password); the relay's operator must check it and release it",
)


def volume_settings(smtp: SmtpConfig) -> VolumeSettings | None:
    """The watch's settings, or None with ``on_volume_alert = "off"``."""
    if smtp.on_volume_alert == "off":
        return None
    return VolumeSettings(
        action=smtp.on_volume_alert,
        factor=smtp.volume_alert_factor,
        minimum=smtp.volume_alert_minimum,
        window=smtp.volume_alert_window,
    )


class VolumeGate(Protocol):
    """What the submission backend asks and tells about credentials' volume."""

    def check_sender(self, credential: str | None) -> Reply | None:
        """The reply to MAIL FROM in a session authenticated as ``credential``, None to go on."""

    def message_accepted(self, credential: str) -> None:
        """A message was queued under ``credential`` (after its commit)."""


class HeldCredentials(Service):
    """The volume watch as an accepting process (``[smtp] processes``) sees it: the held set
    is the database's, read at start and every ``poll_interval`` seconds; each message
    accepted under a credential is passed to ``report`` (a line to the main process, whose
    :class:`VolumeWatch` counts it and decides the alerts)."""

    name = "volume-watch"

    def __init__(
        self,
        clock: IReactorTime,
        store_ready: Callable[[], Awaitable[CredentialVolumeStore]],
        report: Callable[[str], object],
        *,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._clock = clock
        self._store_ready = store_ready
        self._report = report
        self._poll_interval = poll_interval
        self._held: frozenset[str] = frozenset()
        self._loop: LoopingCall | None = None

    def check_sender(self, credential: str | None) -> Reply | None:
        if credential is not None and credential in self._held:
            return HELD_REPLY
        return None

    def message_accepted(self, credential: str) -> None:
        self._report(credential)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self._clock
        # _poll never fails (it logs); the loop ends only when stopped.
        self._loop.start(self._poll_interval, now=True)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _poll(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._read()).addErrback(self._failed)

    async def _read(self) -> None:
        store = await self._store_ready()
        self._held = frozenset(h.credential for h in await store.held_credentials())

    def _failed(self, failure: Failure) -> None:
        if failure.check(DatabaseUnavailable, StorageStopped):
            log.warn("volume watch: reading the held set: {error}", error=failure.value)
        else:
            log.failure("volume watch: reading the held set failed", failure)


class VolumeWatch(Service):
    name = "volume-watch"

    def __init__(
        self,
        clock: IReactorTime,
        settings: VolumeSettings,
        store_ready: Callable[[], Awaitable[CredentialVolumeStore]],
        alerts: Counter | None = None,
        *,
        poll_interval: float = POLL_INTERVAL,
        save_interval: float = SAVE_INTERVAL,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self._clock = clock
        self.settings = settings
        self.meter = VolumeMeter(settings, max_tracked)
        self._store_ready = store_ready
        self._alerts = alerts
        self._poll_interval = poll_interval
        self._save_interval = save_interval
        self._loops: list[LoopingCall] = []
        self._starting: Deferred[None] | None = None
        #: Credentials held (the database's set, and this node's holds in writing).
        self._held: set[str] = set()
        self._writing: set[str] = set()
        #: When this node last wrote a hold, by credential: a read of the held set begun
        #: before that may not show it yet.
        self._held_here_at: dict[str, float] = {}
        self._busy: set[Deferred[None]] = set()

    # -- what the SMTP side asks ----------------------------------------------------------
    def check_sender(self, credential: str | None) -> Reply | None:
        """The reply to MAIL FROM in a session authenticated as ``credential``, None to go on."""
        if credential is not None and credential in self._held:
            return HELD_REPLY
        return None

    def message_accepted(self, credential: str) -> None:
        """A message was queued under ``credential`` (after its commit)."""
        spike = self.meter.count(credential, self._clock.seconds())
        if spike is not None:
            self._track(Deferred.fromCoroutine(self._alert(spike)))

    async def refresh_held(self) -> None:
        """Read the held set now (after a release made in this process)."""
        await self._read_held(await self._store_ready())

    async def settled(self) -> None:
        """Wait for the start (baselines and held set read), the alert writes and the
        periodic work under way."""
        if self._starting is not None and not self._starting.called:
            await self._starting
        while self._busy:
            await next(iter(self._busy))

    # -- service ---------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._log_failure, "volume watch start")

    async def _start(self) -> None:
        try:
            store = await self._store_ready()
        except Exception as error:
            # The storage did not open (it reports that itself, as fatal) or stopped first.
            log.debug("volume watch: no store: {error}", error=error)
            return
        try:
            now = self._clock.seconds()
            for row in await store.credential_baselines(self.meter.max_tracked):
                self.meter.load(row.credential, row.baseline, row.windows, now)
            await self._read_held(store)
        except DatabaseUnavailable as error:
            # Credentials learn anew; the polls read the held set once the database is back.
            log.warn("volume watch: database unavailable at start ({error})", error=error)
        if not self.running:
            return
        tick = max(self.settings.window / 10, 0.1)
        for interval, work in (
            (self._poll_interval, self._poll),
            (self._save_interval, self._save),
            (tick, self._tick),
        ):
            loop = LoopingCall(work)
            loop.clock = self._clock
            loop.start(interval, now=False).addErrback(self._log_failure, "volume watch loop")
            self._loops.append(loop)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None:
            await self._starting
        await self.settled()
        await self._save_now()

    # -- periodic work ---------------------------------------------------------------------
    def _poll(self) -> Deferred[None]:
        return self._tracked_run(self.refresh_held(), "volume watch: reading the held set")

    def _save(self) -> Deferred[None]:
        return self._tracked_run(self._save_now(), "volume watch: saving baselines")

    def _tick(self) -> None:
        for credential in self.meter.tick(self._clock.seconds()):
            log.info(
                "volume alert for SMTP credential {credential!r} over: back under its threshold",
                credential=credential,
            )

    async def _save_now(self) -> None:
        changed = self.meter.take_changed()
        if not changed:
            return
        now = self._clock.seconds()
        store = await self._store_ready()
        await store.save_baselines(
            [CredentialBaseline(c.credential, c.baseline, c.windows, now) for c in changed]
        )

    async def _read_held(self, store: CredentialVolumeStore) -> None:
        began = self._clock.seconds()
        stored = {h.credential for h in await store.held_credentials()}
        now = self._clock.seconds()
        for credential in self._held - stored:
            if credential in self._writing or self._held_here_at.get(credential, -1) >= began:
                stored.add(credential)  # held here after this read began
                continue
            log.info("SMTP credential {credential!r} released", credential=credential)
            self.meter.release(credential, now)
            self._held_here_at.pop(credential, None)
        self._held = stored

    # -- alerts ----------------------------------------------------------------------------
    async def _alert(self, spike: VolumeSpike) -> None:
        settings = self.settings
        hold = settings.action == "hold"
        reason = None
        if hold:
            reason = (
                f"volume alert: {spike.rate} messages in {format_duration(settings.window)}"
                f" against a baseline of {spike.baseline:.1f} (factor {settings.factor:g})"
            )
            self._held.add(spike.credential)
            self._writing.add(spike.credential)
        log.warn(
            "volume alert: SMTP credential {credential!r} sent {rate} messages in the last"
            " {window}, baseline {baseline:.1f} per window (factor {factor:g}); {what}",
            credential=spike.credential,
            rate=spike.rate,
            window=format_duration(settings.window),
            baseline=spike.baseline,
            factor=settings.factor,
            what=(
                "its new mail is held (451 4.7.1) until `smartrelay-ctl smtp-credential"
                " release` (docs/smtp.md, Volume alerts)"
                if hold
                else "check it is not a leaked password (docs/smtp.md, Volume alerts)"
            ),
        )
        if self._alerts is not None:
            self._alerts.labels(kind=ALERT_KIND, action=settings.action).inc()
        event = AlertEvent(
            kind=ALERT_KIND,
            credential=spike.credential,
            rate=spike.rate,
            baseline=round(spike.baseline, 3),
            action=settings.action,
        )
        try:
            store = await self._store_ready()
            written = await store.record_volume_alert(
                event,
                reason,
                at=self._clock.seconds(),
                windows=self.meter.baseline(spike.credential)[1],
            )
            if hold and written:
                self._held_here_at[spike.credential] = self._clock.seconds()
            elif hold:  # the credential is gone: nothing to hold
                self._held.discard(spike.credential)
        finally:
            self._writing.discard(spike.credential)

    # -- plumbing --------------------------------------------------------------------------
    def _tracked_run(self, work: Awaitable[None], what: str) -> Deferred[None]:
        d = Deferred.fromCoroutine(_awaiting(work))
        d.addErrback(self._log_failure, what)
        self._track(d)
        return d

    def _track(self, d: Deferred[None]) -> None:
        d.addErrback(self._log_failure, "volume alert")
        self._busy.add(d)

        def done(result: object) -> object:
            self._busy.discard(d)
            return result

        d.addBoth(done)

    def _log_failure(self, failure: Failure, what: str) -> None:
        if failure.check(DatabaseUnavailable, StorageStopped):
            log.warn("{what}: {error}; trying again later", what=what, error=failure.value)
        else:
            log.failure("{what} failed", failure, what=what)


async def _awaiting(work: Awaitable[None]) -> None:
    await work
