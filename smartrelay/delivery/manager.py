"""The delivery manager: claims due recipients, queues them per destination, delivers.

Due work is claimed from the database in batches (with a lease, docs/storage.md), grouped into
jobs (one message for one destination domain, all its recipients there in one transaction),
and put on a per-destination queue in memory. Each destination has up to its throttle's
``max_connections`` workers; a worker keeps its connection for up to
``max_messages_per_connection`` messages and sends at the throttle's rate. Every outcome is
committed (recipient state + event) before the worker moves on.

Everything that drives it comes in: the clock (every timer and "now"), the connector (how a
session with a next hop is opened), the re-wrap chain, and its tunables. Tests run it on a
``task.Clock`` with a fake connector.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import socket
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence

from attrs import field, frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.config import DeliveryConfig, Pool, SourceAddress, Throttle
from smartrelay.delivery.adaptive import AimdSettings, is_rate_signal, retry_soon
from smartrelay.delivery.client import (
    Connector,
    OutboundSession,
    RecipientResult,
    ServerReply,
    SmtpClientError,
)
from smartrelay.delivery.mta_sts import MtaSts, StsGate
from smartrelay.delivery.mx import MxResolver, PermanentRoutingError, TemporaryRoutingError
from smartrelay.delivery.pools import PoolChooser, first_that_reaches
from smartrelay.delivery.retry import schedule_retry
from smartrelay.delivery.routing import NextHop, ResolvedRoute, Router
from smartrelay.delivery.sandbox import SANDBOX_THROTTLE, SandboxRouting, SandboxSession
from smartrelay.delivery.throttle import Throttles
from smartrelay.events import (
    BouncedEvent,
    DeferredEvent,
    DeliveredEvent,
    EventData,
    ExpiredEvent,
    SuppressedEvent,
)
from smartrelay.feedback.smtp_replies import classify_reply
from smartrelay.metrics import RelayMetrics
from smartrelay.rewrap.chain import RewrapChain
from smartrelay.rewrap.headers import split_header_block
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.service import StorageStopped
from smartrelay.storage.store import (
    QUEUE_CHANNEL,
    ClaimedRecipient,
    RecipientOutcome,
    Store,
    StoredMessage,
    Suppression,
)
from smartrelay.timefmt import rfc3339

log = Logger()


@frozen
class DeliveryTunables:
    """The delivery manager's fixed numbers (not configuration keys); times in seconds."""

    #: Recipients claimed in one transaction, at most.
    claim_batch: int = 500
    #: Recipients held in destination queues (claimed, not yet recorded), at most.
    max_in_memory: int = 5000
    #: Fair claiming across nodes: recipients claimed ahead per delivery connection
    #: (``[delivery] max_connections``); a node holds at most that many times its connections
    #: (never fewer than ``claim_ahead_min``, never more than ``max_in_memory``) and comes
    #: back for more when half of them are finished (docs/delivery.md, "Claims").
    claim_ahead_per_connection: int = 1
    claim_ahead_min: int = 100
    #: Queued jobs that their throttle (its rate, a back-off) will hold longer than this are
    #: handed back to the database, due ``throttle_hold / 2`` before their turn, so that a
    #: throttled destination does not fill the claim window and starve the others.
    throttle_hold: float = 10.0
    #: ... due again no later than this after the throttle's back-off (if any) ends: a cut
    #: adaptive rate may recover sooner than estimated.
    hand_back_max: float = 60.0
    #: Bytes of messages held in destination queues and being delivered, at most (one job is
    #: always admitted, so a message bigger than this still goes, alone).
    max_in_memory_bytes: int = 32 * 1024 * 1024
    #: A claimed recipient not finished in this time is claimed again elsewhere.
    lease: float = 15 * 60.0
    #: Safety net beside NOTIFY, and how soon a deferred recipient is seen at the latest.
    poll_interval: float = 5.0
    #: A 421 reply backs the destination's throttle off for this long.
    backoff_on_421: float = 60.0
    #: At shutdown, how long deliveries under way may take to finish.
    stop_grace: float = 10.0
    #: How long an idle connection waits for the next message.
    idle_connection: float = 2.0
    #: Between claims that find less than a full batch, at least.
    claim_spacing: float = 0.1
    #: The suppression lookups before jobs and the outcomes after them wait this long for
    #: other jobs' to share their transaction (Store.gather_delivery_batches); 0: not at all.
    batch_gather: float = 0.002
    #: The suppression entries read with a job's message (one read a loaded batch) answer
    #: the re-wrap chain's lookup if the job starts within this many seconds of that read;
    #: a job that waited longer (a throttled destination) looks its recipients up again.
    suppressions_fresh_for: float = 1.0
    #: While the database is unavailable (a restart): first pause before trying again, and
    #: the most it grows to (doubling). Claims, and outcomes already known, are tried again so.
    database_retry_min: float = 0.25
    database_retry_max: float = 2.0
    #: Adaptive throttles' numbers (cut, hold, steps up, the pause and retry after a
    #: rate-limit reply): smartrelay/delivery/adaptive.py.
    adaptive: AimdSettings = field(factory=AimdSettings)

    def __attrs_post_init__(self) -> None:
        for name in (
            "claim_batch",
            "max_in_memory",
            "max_in_memory_bytes",
            "claim_ahead_per_connection",
            "claim_ahead_min",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        for name in ("lease", "poll_interval", "database_retry_min", "throttle_hold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        for name in (
            "backoff_on_421",
            "stop_grace",
            "idle_connection",
            "claim_spacing",
            "batch_gather",
            "suppressions_fresh_for",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)!r}")
        if not self.database_retry_max >= self.database_retry_min:
            raise ValueError("database_retry_max must not be less than database_retry_min")
        if not self.hand_back_max >= self.throttle_hold:
            raise ValueError("hand_back_max must not be less than throttle_hold")


#: Today's numbers, as the relay runs with them.
DEFAULT_TUNABLES = DeliveryTunables()


@frozen
class Job:
    """One message for one destination domain."""

    message: StoredMessage
    domain: str
    recipients: tuple[ClaimedRecipient, ...]
    #: The suppression entries in force for the recipients when the message was loaded (by
    #: lower-cased address), and the clock's time then.
    suppressions: Mapping[str, Suppression]
    loaded_at: float


@frozen
class ClaimedJob:
    """A job whose message is not loaded yet: it waits for room in the byte window."""

    queue_id: str
    domain: str
    recipients: tuple[ClaimedRecipient, ...]
    size: int


class Destination:
    """A queue of jobs sharing next hops and a throttle (a domain, or a smarthost)."""

    def __init__(
        self,
        key: str,
        route: ResolvedRoute,
        throttle_key: str,
        settings: Throttle,
        pool: Pool | None = None,
        pick: str = "",
    ):
        self.key = key
        self.route = route
        self.throttle_key = throttle_key
        self.settings = settings
        #: The source-address pool of its mail (docs/delivery.md): a pool's mail has queues
        #: (and connections) of its own; None: the default address.
        self.pool = pool
        #: What a pool's ``hash`` selection hashes (the preferred MX host, or the key).
        self.pick = pick or key
        self.jobs: deque[Job] = deque()
        self.workers = 0
        self.wake_call: IDelayedCall | None = None
        #: Workers with an open connection and nothing to do, waiting for a job (or not).
        self.idle: list[Deferred[bool]] = []
        #: Seconds a worker takes per job (a moving average; None: none finished yet): with
        #: the connection limit, how fast its queue goes when the receiver is the bottleneck.
        self.job_seconds: float | None = None

    def note_job_seconds(self, seconds: float) -> bool:
        """Count one job's time; True on the first."""
        first = self.job_seconds is None
        self.job_seconds = seconds if first else 0.8 * (self.job_seconds or 0.0) + 0.2 * seconds
        return first

    def wait_for_job(self, clock: IReactorTime, seconds: float) -> Deferred[bool]:
        """True when a job is queued within ``seconds``, else False."""
        waiter: Deferred[bool] = Deferred()
        self.idle.append(waiter)
        timer = clock.callLater(seconds, self._idle_timeout, waiter)

        def done(result: bool) -> bool:
            if timer.active():
                timer.cancel()
            return result

        return waiter.addCallback(done)

    def _idle_timeout(self, waiter: Deferred[bool]) -> None:
        if waiter in self.idle:
            self.idle.remove(waiter)
            waiter.callback(False)

    def wake_idle(self, value: bool) -> None:
        waiters, self.idle = self.idle, []
        for waiter in waiters:
            waiter.callback(value)


class DeliveryManager(Service):
    name = "delivery"

    def __init__(
        self,
        clock: IReactorTime,
        config: DeliveryConfig,
        store_ready: Callable[[], Deferred[Store]],
        mx_resolver: MxResolver,
        connector: Connector,
        chain_factory: Callable[[Store], RewrapChain],
        *,
        tunables: DeliveryTunables = DEFAULT_TUNABLES,
        node_id: str | None = None,
        rng: random.Random | None = None,
        metrics: RelayMetrics | None = None,
        source_connector: Callable[[SourceAddress], Connector] | None = None,
        mta_sts: MtaSts | None = None,
        spare: bool = False,
    ) -> None:
        """``connector`` opens a session with a next hop (:class:`SmtpConnector` in
        production); ``chain_factory`` builds the re-wrap chain once the store is ready;
        ``metrics``: where recorded outcomes are counted (docs/metrics.md);
        ``source_connector``: the connector dialling from a pool's source address
        (``SmtpConnector.from_source``), required when ``config.pools`` has pools;
        ``mta_sts``: the recipient domains' MTA-STS policies, applied on ``mx`` routes (None:
        not looked up); ``spare``: a spare delivery process's manager (``[delivery]
        spare_processes``), which claims only while :meth:`hold_claims` lets it."""
        if config.pools and source_connector is None:
            raise ValueError("[[delivery.pools]] need a source_connector")
        self._source_connector = source_connector
        self._pools = PoolChooser(config.pools)
        self._clock = clock
        self._metrics = metrics
        self._config = config
        self.tunables = tunables
        self._store_ready = store_ready
        self._store: Store | None = None
        self._connector = connector
        self._chain_factory = chain_factory
        self._chain: RewrapChain | None = None
        self._mx = mx_resolver
        self._sts = mta_sts
        self.router = Router(config.routes)
        self._sandbox = SandboxRouting(config.sandbox_route)
        self.throttles = Throttles(
            clock, config.throttles, config.max_connections, adaptive=tunables.adaptive
        )
        if metrics is not None:
            self.throttles.adaptive.on_change = lambda figures: metrics.adaptive.set(
                "main", figures
            )
        self.node_id = node_id or f"{socket.gethostname()}-{secrets.token_hex(4)}"
        # A stable id (see node_id_for) lets a restarted node take back its own claims.
        self._rng = rng or random.Random()
        self._destinations: dict[str, Destination] = {}
        self._in_memory = 0
        #: Jobs taken from a destination's queue whose outcome is not yet handed to the store:
        #: the store's batched transactions wait for others only while there are some.
        self._jobs_in_hand = 0
        #: Recipients this node holds claimed at most: what it can start working on soon, so
        #: that the nodes sharing a database each take a share close to their capacity.
        self.claim_window = min(
            tunables.max_in_memory,
            max(
                tunables.claim_ahead_min,
                config.max_connections * tunables.claim_ahead_per_connection,
            ),
        )
        #: A spare process claims nothing while this is set (it starts so: the main process
        #: says when no client of its listener is sending).
        self._claims_held = spare
        self._spare = spare
        #: Bytes of the messages of the jobs admitted (queued or being delivered).
        self._in_memory_bytes = 0
        #: Claimed jobs waiting for room in the byte window, in claim order.
        self._claimed_jobs: deque[ClaimedJob] = deque()
        self._admitting = False
        self._admit_again = False
        #: Claiming stopped with due work maybe left, because a window was full.
        self._held_back = False
        self._pumping = False
        self._pump_again = False
        self._last_claim = float("-inf")
        self._spaced_wake: IDelayedCall | None = None
        self._claim_failures = 0
        self._load_failures = 0  # loading admitted jobs' messages, in a row
        self._poll_call: IDelayedCall | None = None
        self._starting: Deferred[None] | None = None
        self._workers: set[Deferred[None]] = set()
        #: Outcomes being recorded while their workers went on to the next job.
        self._recording: set[Deferred[None]] = set()
        self._connections: set[OutboundSession] = set()

    # -- service ------------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._start_failed)

    def _start_failed(self, failure: Failure) -> None:
        if not self.running:
            return  # stopped while starting: nothing to report
        if failure.check(StorageStopped, StorageFailed):
            return  # the storage service has reported it (fatal, one line)
        log.failure("delivery could not start", failure)

    async def _start(self) -> None:
        try:
            store = await self._store_ready()
        except Exception as error:
            raise StorageFailed(str(error)) from error
        # Take back our own claims first: nothing may be claimed (by us) before that, or the
        # release would hand a recipient being delivered to the next claim as well.
        failures = 0
        while True:
            try:
                released = await store.release_claims(self.node_id)
                if not self._spare:
                    # A spare is woken by the main process only (which listens itself and
                    # passes wake-ups on), and not at all while it is held.
                    await store.engine.listen(QUEUE_CHANNEL, self.wake)
                break
            except DatabaseUnavailable as error:
                if not self.running:
                    return
                if failures == 0:
                    log.warn("delivery: cannot start yet ({error}); trying again", error=error)
                await self._database_pause(failures)
                failures += 1
        if not self.running:
            return
        # Waiting pays only while other jobs in hand may still ask: a lookup's own job is
        # one of them, an outcome's is not (a lone connection never waits).
        store.gather_delivery_batches(
            self.tunables.batch_gather,
            self._clock,
            lookups_may_join=lambda waiting: self._jobs_in_hand > waiting,
            outcomes_may_join=lambda waiting: self._jobs_in_hand > 0,
        )
        self._chain = self._chain_factory(store)
        self._store = store
        log.info(
            "delivery: node {node} started{spare}{released}",
            node=self.node_id,
            spare=" (a spare: it claims work while no SMTP client is sending)"
            if self._spare
            else "",
            released=f", taking back {released} recipient(s) it had claimed" if released else "",
        )
        self.wake()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self.throttles.adaptive.stop()
        for call in (self._poll_call, self._spaced_wake):
            if call is not None and call.active():
                call.cancel()
        for destination in list(self._destinations.values()):
            if destination.wake_call is not None and destination.wake_call.active():
                destination.wake_call.cancel()
            destination.wake_idle(False)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        # Work under way may finish its current message and commit its outcome; what is still
        # on the wire after the stop grace is cut off and recorded as deferred (it may then be
        # delivered twice: at least once, never zero times). Queued jobs stay claimed and come
        # back when their lease runs out.
        if self._workers:
            grace = self._clock.callLater(self.tunables.stop_grace, self._cut_connections)
            for worker in list(self._workers):
                await worker
            if grace.active():
                grace.cancel()
        while self._recording:  # the outcomes the workers handed over before they ended
            await next(iter(self._recording))
        if self._sts is not None:
            await self._sts.flush()  # the last sessions' TLS results

    def _cut_connections(self) -> None:
        for connection in list(self._connections):
            connection.close()

    # -- claiming -----------------------------------------------------------------------------
    def wake(self) -> None:
        """New or due work may be waiting. Claims are ``claim_spacing`` apart at least (unless
        the last one came back full): every commit of accepted mail wakes every delivery
        process, and a claim is a write transaction."""
        if not self._may_pump():
            return
        if self._spaced_wake is not None and self._spaced_wake.active():
            return
        wait = self._last_claim + self.tunables.claim_spacing - self._clock.seconds()
        if wait > 0:
            self._spaced_wake = self._clock.callLater(wait, self.wake)
            return
        self._start_pump()

    def _refill(self) -> None:
        """Claim now (half the claim window is free), not ``claim_spacing`` later."""
        if not self._may_pump():
            return
        if self._spaced_wake is not None and self._spaced_wake.active():
            self._spaced_wake.cancel()
        self._start_pump()

    def hold_claims(self, held: bool) -> None:
        """Held: claim nothing more (what is claimed is still delivered); released: claim
        again at once. A spare delivery process is held while the listener's clients send
        (docs/delivery.md, "Spare delivery processes")."""
        if held == self._claims_held:
            return
        self._claims_held = held
        if not held:
            self._refill()

    def _may_pump(self) -> bool:
        """Whether a claim may start now; if one is running, it goes round once more."""
        if not self.running or self._store is None:
            return False
        if self._pumping:
            self._pump_again = True
            return False
        return True

    def _start_pump(self) -> None:
        Deferred.fromCoroutine(self._pump()).addErrback(
            lambda f: log.failure("claiming due work failed", f)
        )

    async def _pump(self) -> None:
        assert self._store is not None
        self._pumping = True
        try:
            while self.running:
                self._pump_again = False
                if self._claims_held:
                    break  # hold_claims(False) claims again
                room = self.claim_window - self._in_memory
                if room <= 0 or self._bytes_full():
                    self._held_back = True  # _finish wakes us when there is room again
                    self._hand_back_held()  # unless a throttle holds the room
                    break
                self._last_claim = self._clock.seconds()
                claim = await self._store.claim_due_with_sizes(
                    self.node_id,
                    limit=min(self.tunables.claim_batch, room),
                    lease=self.tunables.lease,
                )
                claimed = claim.recipients
                if claimed:
                    await self._enqueue(claimed, claim.sizes)
                if self._claim_failures:
                    log.info("delivery: claiming works again")
                    self._claim_failures = 0
                if len(claimed) < min(self.tunables.claim_batch, room):
                    break
        except DatabaseUnavailable as error:
            # A claim that failed before its COMMIT was sent claimed nothing; one whose COMMIT
            # outcome is unknown may have: those rows come back when their lease runs out.
            if self._claim_failures == 0:
                log.warn("delivery: cannot claim due work ({error}); trying again", error=error)
            self._claim_failures += 1
        finally:
            self._pumping = False
            self._schedule_poll()
            if self._claim_failures:
                self._wake_at(self._clock.seconds() + self._database_delay(self._claim_failures))
        if self._pump_again:
            self._pump_again = False
            self.wake()

    def _wake_at(self, when: float) -> None:
        """Look for due work at ``when`` (a deferred recipient's retry), if before the poll."""
        delay = max(0.0, when - self._clock.seconds()) + 0.01
        if self._poll_call is not None and self._poll_call.active():
            if self._poll_call.getTime() <= self._clock.seconds() + delay:
                return
            self._poll_call.cancel()
        if self.running:
            self._poll_call = self._clock.callLater(delay, self.wake)

    def _schedule_poll(self) -> None:
        self._wake_at(self._clock.seconds() + self.tunables.poll_interval)

    def _bytes_full(self) -> bool:
        """No room for more messages: claim nothing until some are delivered."""
        return (
            bool(self._claimed_jobs) or self._in_memory_bytes >= self.tunables.max_in_memory_bytes
        )

    async def _enqueue(self, claimed: Sequence[ClaimedRecipient], sizes: Mapping[str, int]) -> None:
        """Group claimed recipients into jobs; load and queue those the byte window admits
        (the others wait, claimed, for :meth:`_release` to make room). ``sizes``: their
        messages' sizes, read with the claim."""
        groups: dict[tuple[str, str], list[ClaimedRecipient]] = {}
        for recipient in claimed:
            groups.setdefault((recipient.queue_id, recipient.domain), []).append(recipient)
        self._in_memory += len(claimed)
        for (queue_id, domain), recipients in groups.items():
            size = sizes.get(queue_id, 0)
            self._claimed_jobs.append(ClaimedJob(queue_id, domain, tuple(recipients), size))
        await self._admit()

    def _release(self, job: Job) -> None:
        """``job`` is finished: its recipients and bytes leave the windows."""
        self._in_memory -= len(job.recipients)
        self._in_memory_bytes -= len(job.message.raw)
        if self._claimed_jobs:
            self._admit_soon()

    def _admit_soon(self) -> None:
        if self.running:
            Deferred.fromCoroutine(self._admit()).addErrback(
                lambda f: log.failure("loading claimed messages failed", f)
            )

    async def _admit(self) -> None:
        """Load and queue the claimed jobs that fit in the byte window, in order; the first
        always fits when nothing else is in memory. Jobs whose messages cannot be loaded
        (database unavailable) go back to the head of the line, out of the byte window, and
        are tried again after the database back-off: they stay claimed and counted once."""
        if self._admitting:
            self._admit_again = True
            return
        self._admitting = True
        try:
            while True:
                self._admit_again = False
                batch: list[ClaimedJob] = []
                while self._claimed_jobs and (
                    self._in_memory_bytes == 0
                    or self._in_memory_bytes + self._claimed_jobs[0].size
                    <= self.tunables.max_in_memory_bytes
                ):
                    job = self._claimed_jobs.popleft()
                    self._in_memory_bytes += job.size
                    batch.append(job)
                if batch:
                    try:
                        await self._load_and_queue(batch)
                    except DatabaseUnavailable as error:
                        self._in_memory_bytes -= sum(job.size for job in batch)
                        self._claimed_jobs.extendleft(reversed(batch))
                        self._load_failures += 1
                        if self._load_failures == 1:
                            log.warn(
                                "delivery: cannot load claimed messages ({error}); trying again",
                                error=error,
                            )
                        delay = self._database_delay(self._load_failures)
                        self._clock.callLater(delay, self._admit_soon)
                        return
                    self._load_failures = 0
                if not self._admit_again:
                    break
        finally:
            self._admitting = False

    async def _load_and_queue(self, claimed: Sequence[ClaimedJob]) -> None:
        assert self._store is not None
        loaded_at = self._clock.seconds()  # the suppressions are read after this
        loaded = await self._store.load_for_delivery(
            (c.queue_id for c in claimed), (r.address for c in claimed for r in c.recipients)
        )
        touched: list[Destination] = []
        for claimed_job in claimed:
            queue_id, domain = claimed_job.queue_id, claimed_job.domain
            job = Job(
                loaded.messages[queue_id],
                domain,
                claimed_job.recipients,
                loaded.suppressions,
                loaded_at,
            )
            # The window counts what was loaded (the size column is the same, normally).
            self._in_memory_bytes += len(job.message.raw) - claimed_job.size
            if job.message.sandbox:  # a sandbox credential's: a destination of its own
                key, route = self._sandbox.destination(domain)
                destination = self._destinations.get(key)
                if destination is None:
                    destination = self._destinations[key] = Destination(
                        key, route, key, SANDBOX_THROTTLE
                    )
                destination.jobs.append(job)
                touched.append(destination)
                continue
            route = self.router.route_for(domain)
            key = route_key = self.router.destination_key(route)
            pool = self._pools.pool_for(job.message)
            if pool is not None:
                # A pool's mail never shares a queue (so a connection) with other mail.
                key = f"{route_key} pool={pool.name}"
            destination = self._destinations.get(key)
            if destination is None:
                mx_host = await self._first_mx(route, domain)
                destination = self._destinations.get(key)  # another batch may have made it
            if destination is None:
                destination = self._destinations[key] = Destination(
                    key,
                    route,
                    self.throttles.key_for(domain, mx_host),
                    self.throttles.settings_for(domain, mx_host),
                    pool,
                    mx_host or route_key,
                )
            self.throttles.adaptive.note_domain(destination.throttle_key, domain)
            destination.jobs.append(job)
            touched.append(destination)
        for destination in touched:
            destination.wake_idle(True)
            self._start_workers(destination)
        self._hand_back_held({destination.throttle_key for destination in touched})

    async def _first_mx(self, route: ResolvedRoute, domain: str) -> str | None:
        """The preferred MX host of an ``mx`` route, so ``mx:`` throttles can match it (the
        lookup is cached and is needed for the connection anyway)."""
        if route.static_hop is not None:
            return None
        try:
            hops = await self._mx.lookup(domain)
        except (PermanentRoutingError, TemporaryRoutingError):
            return None  # the connection attempt will record the failure
        return hops[0].host if hops else None

    # -- handing back what a throttle holds -----------------------------------------------------
    def _hand_back_held(self, keys: Collection[str] | None = None) -> None:
        """Give the jobs queued under the throttles ``keys`` (None: every throttle with
        queued jobs, the window being full) that the throttle will not let start within
        ``throttle_hold`` back to the database, each due ``throttle_hold / 2`` before its
        estimated turn (at most ``hand_back_max`` after the back-off): they leave the claim
        window, so mail for other destinations is claimed meanwhile, and any node may take
        them later.

        The estimate: the key's back-off, then one job per ``1 / rate`` seconds, the rate
        being the throttle's, or what its connections do at the receiver's pace (measured)
        if that is slower. A job's recipients are handed back together."""
        by_key: dict[str, list[Destination]] = {}
        for destination in self._destinations.values():
            if destination.jobs and (keys is None or destination.throttle_key in keys):
                by_key.setdefault(destination.throttle_key, []).append(destination)
        for key, queued in by_key.items():
            self._hand_back_from(key, queued)

    def _hand_back_from(self, key: str, queued: Sequence[Destination]) -> None:
        if not self.running or not queued:
            return
        now = self._clock.seconds()
        until = self.throttles.backed_off_until(key)
        wait = 0.0 if until is None else until - now
        settings = queued[0].settings
        rate = self.throttles.adaptive.rate(key, settings)
        seconds = max((d.job_seconds or 0.0 for d in queued), default=0.0)
        if seconds > 0:
            rate = min(rate, self.throttles.max_connections_for(key, settings) / seconds)
        hold, most = self.tunables.throttle_hold, self.tunables.hand_back_max
        if wait + (sum(len(d.jobs) for d in queued) - 1) / rate <= hold:
            return  # all of them start soon enough (the usual case)
        back: list[tuple[Destination, Job, float]] = []
        position = 0
        for destination in queued:
            kept: deque[Job] = deque()
            for job in destination.jobs:
                start = wait + position / rate
                position += 1
                if start <= hold:
                    kept.append(job)
                    continue
                ahead = start - hold / 2
                if ahead > wait + most:  # spread, or they would all come back at once
                    ahead = wait + most * (0.5 + 0.5 * self._rng.random())
                back.append((destination, job, now + ahead))
            destination.jobs = kept
            if not kept and destination.workers == 0:
                if destination.wake_call is not None and destination.wake_call.active():
                    destination.wake_call.cancel()
                self._destinations.pop(destination.key, None)
        Deferred.fromCoroutine(self._hand_back(back)).addErrback(
            lambda f: log.failure("{key}: handing back held recipients failed", f, key=key)
        )

    async def _hand_back(self, back: Sequence[tuple[Destination, Job, float]]) -> None:
        """Commit the hand-back (tried again while the database is unavailable: it only
        touches rows still ours, so again is harmless), then free the jobs' room."""
        assert self._store is not None
        due = [(r.id, at) for _, job, at in back for r in job.recipients]
        failures = 0
        try:
            while self.running:
                try:
                    released = await self._store.hand_back(self.node_id, due)
                    now = self._clock.seconds()
                    log.info(
                        "delivery: {key}: {count} recipient(s) handed back to the queue, due"
                        " in {first:.0f} to {last:.0f} s (its throttle would hold them)",
                        key=back[0][0].throttle_key,
                        count=len(released),
                        first=min(at for _, at in due) - now,
                        last=max(at for _, at in due) - now,
                    )
                    break
                except DatabaseUnavailable:
                    # Not known to be committed: never deliver them from memory now (another
                    # node may have them). Stopping before it is: their lease brings them back.
                    failures += 1
                    await self._database_pause(failures)
        except Exception:
            if self.running:
                raise
            return  # stopping (the store too): the rows are left to their lease
        finally:
            for _, job, _ in back:
                self._release(job)
        if due:
            self._wake_at(min(at for _, at in due))  # not only the poll: it may be far
        self._refill_if_room()

    # -- workers ------------------------------------------------------------------------------
    def _start_workers(self, destination: Destination) -> None:
        if not destination.jobs or not self.running:
            return
        settings, key = destination.settings, destination.throttle_key
        until = self.throttles.backed_off_until(key)
        if until is not None and until > self._clock.seconds():
            self._wake_destination_at(destination, until)
            return
        while (
            destination.jobs
            and destination.workers < self.throttles.max_connections_for(key, settings)
            and self.throttles.acquire_connection(key, settings)
        ):
            destination.workers += 1
            worker = Deferred.fromCoroutine(self._work(destination))
            self._workers.add(worker)
            worker.addErrback(lambda f: log.failure("delivery worker failed", f))
            worker.addCallback(self._worker_done, worker)

    def _others_wait(self, destination: Destination) -> bool:
        """Another destination under the same throttle has jobs (and may need our slot)."""
        return any(
            other is not destination
            and other.jobs
            and other.throttle_key == destination.throttle_key
            for other in self._destinations.values()
        )

    def _worker_done(self, _: None, worker: Deferred[None]) -> None:
        self._workers.discard(worker)

    def _wake_destination_at(self, destination: Destination, when: float) -> None:
        if destination.wake_call is not None and destination.wake_call.active():
            return
        delay = max(0.0, when - self._clock.seconds())
        destination.wake_call = self._clock.callLater(delay, self._start_workers, destination)

    async def _work(self, destination: Destination) -> None:
        connection: OutboundSession | None = None
        settings, key = destination.settings, destination.throttle_key
        current: Job | None = None  # taken from the queue, its outcome not yet recorded
        unavailable = 0  # the database, in a row (see below)

        def put_down() -> None:
            """The job in hand is finished or given back (``_jobs_in_hand`` counts them)."""
            nonlocal current
            current = None
            self._jobs_in_hand -= 1

        try:
            while self.running:
                if not destination.jobs:
                    # Keep the connection a moment for mail that follows (Postfix's
                    # connection cache does the same for 2 s).
                    if (
                        connection is None
                        or not connection.usable
                        or self._others_wait(destination)
                    ):
                        break
                    idle = self.tunables.idle_connection
                    if not await destination.wait_for_job(self._clock, idle):
                        break
                    continue
                job = destination.jobs[0]
                wait = self.throttles.take_message(key, settings)
                if wait > 0:
                    await deferLater(self._clock, wait, lambda: None)
                    continue
                current = destination.jobs.popleft()
                self._jobs_in_hand += 1
                if connection is not None and (
                    not connection.usable
                    or connection.messages_sent >= settings.max_messages_per_connection
                ):
                    self._connections.discard(connection)
                    await connection.quit()
                    connection = None
                if connection is None:
                    connection, failure = await self._connect(destination, job)
                    if connection is not None:
                        self._connections.add(connection)
                    if connection is None:
                        assert failure is not None
                        # The destination is unreachable or refuses us: every job queued
                        # for it now shares this answer instead of each trying again.
                        # Their outcomes go in one transaction: recorded one job at a
                        # time, a refused destination held thousands of loaded messages in
                        # memory while each waited for its own commit (issue 19).
                        jobs = [job, *destination.jobs]
                        destination.jobs.clear()
                        put_down()
                        await self._finish_all(
                            [
                                (
                                    failed,
                                    [
                                        RecipientResult(r.address, failure)
                                        for r in failed.recipients
                                    ],
                                    (),
                                )
                                for failed in jobs
                            ],
                            None,
                            adaptive=settings.adaptive,
                        )
                        self._after_refusal(destination, job.domain, [failure], at_connect=True)
                        break
                began = self._clock.seconds()  # the receiver's pace (not the connection's set-up)
                try:
                    results, suppressed = await self._deliver_job(destination, connection, job)
                except DatabaseUnavailable as error:
                    # The chain's suppression lookup, before anything was sent: keep the job.
                    destination.jobs.appendleft(job)
                    put_down()
                    unavailable += 1
                    if unavailable == 1:
                        log.warn(
                            "{queue_id}: cannot prepare the copies ({error}); trying again",
                            queue_id=job.message.queue_id,
                            error=error,
                        )
                    await self._database_pause(unavailable)
                    continue
                unavailable = 0
                if not connection.usable:
                    self._connections.discard(connection)
                    connection.close()
                put_down()
                # The outcome is committed while this connection goes on to the next job:
                # waiting for it made every job's turn on the connection one commit longer
                # and kept each commit small (a worker has one job in hand at a time).
                self._finish_in_background(
                    job, results, connection, suppressed, adaptive=settings.adaptive
                )
                if destination.note_job_seconds(self._clock.seconds() - began):
                    self._hand_back_held({key})  # how long its queue will take is known now
                if not connection.usable:
                    connection = None
                if self._after_refusal(destination, job.domain, [r.reply for r in results]):
                    break
                if self.throttles.connections(key) > self.throttles.max_connections_for(
                    key, settings
                ):
                    break  # an adaptive throttle's connections were cut: this one goes
        except Exception:
            # A bug anywhere above: the job in hand still gets an outcome (a deferral) and
            # gives its place in memory back; the destination's other jobs go on below.
            log.failure("{key}: delivery worker failed", key=destination.key)
            if current is not None:
                failed = current
                put_down()
                failure = _local_reply("internal error in delivery", "4.3.0")
                await self._finish(
                    failed, [RecipientResult(r.address, failure) for r in failed.recipients], None
                )
        finally:
            if connection is not None:
                self._connections.discard(connection)
                await connection.quit()
            destination.workers -= 1
            self.throttles.release_connection(key)
            if destination.jobs:
                self._start_workers(destination)
            elif destination.workers == 0:
                self._destinations.pop(destination.key, None)
            # The slot freed may be what another destination under the same throttle (an
            # mx: entry shared by several domains) was waiting for.
            for other in list(self._destinations.values()):
                if other is not destination and other.jobs and other.throttle_key == key:
                    self._start_workers(other)

    def _after_refusal(
        self,
        destination: Destination,
        domain: str,
        replies: Sequence[ServerReply],
        *,
        at_connect: bool = False,
    ) -> bool:
        """A 421 backs the destination off (``backoff_on_421``); on an adaptive throttle a
        rate-limit reply cuts its limits and pauses it briefly instead (adaptive.py). True
        if the worker should stop."""
        key, settings = destination.throttle_key, destination.settings
        if settings.adaptive:
            for reply in replies:
                if is_rate_signal(reply.code, reply.text, at_connect=at_connect):
                    self.throttles.adaptive.signal(key, settings, reply.line, domain)
                    self.throttles.back_off(key, self.tunables.adaptive.pause)
                    self._hand_back_held({key})  # the rate was cut: fewer start soon
                    return True
        if any(reply.code == 421 for reply in replies):
            self.throttles.back_off(key, self.tunables.backoff_on_421)
            self._hand_back_held({key})
            return True
        return False

    async def _deliver_job(
        self, destination: Destination, connection: OutboundSession, job: Job
    ) -> tuple[list[RecipientResult], Sequence[tuple[ClaimedRecipient, Suppression]]]:
        """Send a job's copies on ``connection``; a reply (or local failure) per recipient.

        Through the re-wrap chain, every recipient gets a copy of their own (VERP, tokens),
        in its own transaction on the same connection. A smarthost route (forwarder mode)
        gets the message as accepted, all recipients in one transaction: the central relay
        re-wraps it.
        """
        hop = destination.route.static_hop
        results: list[RecipientResult] = []
        suppressed: Sequence[tuple[ClaimedRecipient, Suppression]] = ()
        try:
            assert self._chain is not None  # made at start-up, before any claim
            if hop is not None and hop.kind == "smarthost":
                # Forwarder mode: as accepted, but a lone CR/LF never splits a header.
                fields, rest = split_header_block(job.message.raw)
                data = b"".join(fields) + rest
                sends = [(job.message.sender, [r.address for r in job.recipients], data)]
            else:
                fresh = (
                    self._clock.seconds() - job.loaded_at <= self.tunables.suppressions_fresh_for
                )
                wrapped = await self._chain.run(
                    job.message, job.recipients, job.suppressions if fresh else None
                )
                sends = [(c.sender, [c.recipient.address], c.data) for c in wrapped.copies]
                suppressed = wrapped.suppressed
                results += [
                    RecipientResult(r.address, ServerReply(554, f"5.3.0 re-wrap failed: {why}"))
                    for r, why in wrapped.failed
                ]
        except DatabaseUnavailable:
            raise  # the suppression lookup: _work keeps the job until the database is back
        except Exception:
            # Not one copy's problem (the chain reads the suppression list, say): try again.
            log.failure("{queue_id}: re-wrapping failed", queue_id=job.message.queue_id)
            failure = _local_reply("re-wrapping the message failed", "4.3.0")
            return [RecipientResult(r.address, failure) for r in job.recipients], ()
        for sender, addresses, data in sends:
            if not connection.usable:
                failure = _local_reply("connection lost")
                results += [RecipientResult(a, failure) for a in addresses]
                continue
            try:
                results += await connection.send(sender, addresses, data)
            except (SmtpClientError, DeferredTimeout, CancelledError) as error:
                failure = _local_reply(str(error) or "timeout")
                results += [RecipientResult(a, failure) for a in addresses]
                connection.close()
            except Exception:  # a bug, not the network: this copy defers, the others go on
                log.failure("{queue_id}: sending failed", queue_id=job.message.queue_id)
                failure = _local_reply("internal error while sending", "4.3.0")
                results += [RecipientResult(a, failure) for a in addresses]
                connection.close()
        return results, suppressed

    async def _connect(
        self, destination: Destination, job: Job
    ) -> tuple[OutboundSession | None, ServerReply | None]:
        """A session with the first next hop that takes one, or the reply to record."""
        route = destination.route
        if self._sandbox.keeps(destination.key):
            return SandboxSession(), None
        if route.static_hop is not None:
            hops = [route.static_hop]
        else:
            try:
                hops = await self._mx.lookup(job.domain)
            except PermanentRoutingError as error:
                return None, ServerReply(550, f"5.1.2 {error}")
            except TemporaryRoutingError as error:
                return None, _local_reply(f"DNS: {error}")
            except Exception:
                log.failure("{key}: looking up the next hops failed", key=destination.key)
                return None, _local_reply("internal error looking up the next hops", "4.3.0")
        gate: StsGate | None = None
        if route.static_hop is None and self._sts is not None:
            gate = await self._sts.gate_for(job.domain, self._store)
        last: ServerReply = _local_reply("no next hop")
        connector = self._connector
        if destination.pool is not None:
            assert self._source_connector is not None  # checked in __init__
            sources = self._pools.sources_for(destination.pool, destination.pick)
            connector = first_that_reaches([self._source_connector(s) for s in sources])
        for hop in hops:
            try:
                if gate is not None:  # MTA-STS: StsRefused when its policy rules the hop out
                    connection, refusal = await gate.connect(connector, hop)
                else:
                    connection, refusal = await connector(hop)
            except (SmtpClientError, DeferredTimeout) as error:
                last = _local_reply(str(error) or "timeout")
                log.info("{key}: {host}: {error}", key=destination.key, host=hop.host, error=error)
                continue
            except Exception:
                log.failure("{key}: {host}: connecting failed", key=destination.key, host=hop.host)
                last = _local_reply("internal error while connecting", "4.3.0")
                continue
            if connection is not None:
                return connection, None
            assert refusal is not None
            last = refusal
            if refusal.code >= 500:
                break  # RFC 5321 5.1: a permanent refusal is final; a 4xx tries the next MX
        return None, last

    # -- the database unavailable (a restart) -------------------------------------------------
    def _database_delay(self, failures: int) -> float:
        first, most = self.tunables.database_retry_min, self.tunables.database_retry_max
        return min(first * 2.0 ** max(failures - 1, 0), most)

    async def _database_pause(self, failures: int) -> None:
        await deferLater(self._clock, self._database_delay(failures), lambda: None)

    # -- outcomes -----------------------------------------------------------------------------
    async def _finish(
        self,
        job: Job,
        results: Sequence[RecipientResult],
        connection: OutboundSession | None,
        suppressed: Sequence[tuple[ClaimedRecipient, Suppression]] = (),
        *,
        adaptive: bool = False,
    ) -> None:
        """Record ``job``'s outcomes (trying again while the database is unavailable) and
        give its place in memory back, whatever happens. ``adaptive``: the destination's
        throttle is, so rate-limited recipients are tried again soon."""
        await self._finish_all([(job, results, suppressed)], connection, adaptive=adaptive)

    def _finish_in_background(
        self,
        job: Job,
        results: Sequence[RecipientResult],
        connection: OutboundSession | None,
        suppressed: Sequence[tuple[ClaimedRecipient, Suppression]],
        *,
        adaptive: bool,
    ) -> None:
        """:meth:`_finish`, not waited for: :meth:`_stop` waits for it. Memory stays bounded
        without a wait: the job keeps its place in the claim and byte windows until its
        outcome is recorded, so claiming stops while outcomes pile up (database down)."""
        recording = Deferred.fromCoroutine(
            self._finish(job, results, connection, suppressed, adaptive=adaptive)
        )
        self._recording.add(recording)  # done() takes it out again (at once if it is done)

        def done(result: object) -> None:
            self._recording.discard(recording)
            if isinstance(result, Failure):  # _finish_all logs the store's errors itself
                log.failure("{queue_id}: finishing failed", result, queue_id=job.message.queue_id)

        recording.addBoth(done)

    async def _finish_all(
        self, finished: Sequence[Finished], connection: OutboundSession | None, *, adaptive: bool
    ) -> None:
        """:meth:`_finish` for several jobs at once: their outcomes in one transaction."""
        try:
            await self._record_durably(finished, connection, adaptive)
        except Exception:
            # A bug, or the relay stopping: the rows stay claimed and come back when the
            # lease runs out; the jobs' places in memory are given back all the same.
            log.failure("{queue_id}: recording outcomes failed", queue_id=_label(finished))
        finally:
            for job, _, _ in finished:
                self._release(job)
        self._refill_if_room()

    def _refill_if_room(self) -> None:
        # Half of the claim window finished: claim more at once (not ``claim_spacing`` later,
        # which paces wake-ups by NOTIFY), so a node alone is not slowed by its small window.
        half = self.claim_window // 2
        if self._held_back and self._in_memory <= half and not self._bytes_full():
            self._held_back = False
            self._refill()

    async def _record_durably(
        self,
        finished: Sequence[Finished],
        connection: OutboundSession | None,
        adaptive: bool = False,
    ) -> None:
        """:meth:`_record`, tried again while the database is unavailable.

        The outcome is known (the copy may well have been delivered), so the recipients must
        not wait for their lease to run out and then be sent again. Trying again is harmless
        even after a COMMIT whose outcome was unknown: only rows still leased to this node are
        updated, and the update ends the lease. At shutdown they are left to their lease.
        """
        failures = 0
        while True:
            try:
                await self._record(finished, connection, adaptive)
            except DatabaseUnavailable as error:
                if not self.running:
                    log.warn(
                        "{queue_id}: outcome not recorded ({error}); the recipients are"
                        " delivered again when their lease runs out",
                        queue_id=_label(finished),
                        error=error,
                    )
                    return
                if failures == 0:
                    log.warn(
                        "{queue_id}: cannot record the outcome yet ({error}); trying again",
                        queue_id=_label(finished),
                        error=error,
                    )
                failures += 1
                await self._database_pause(failures)
                continue
            if failures:
                log.info(
                    "{queue_id}: outcome recorded after {failures} retries",
                    queue_id=_label(finished),
                    failures=failures,
                )
            return

    async def _record(
        self,
        finished: Sequence[Finished],
        connection: OutboundSession | None,
        adaptive: bool = False,
    ) -> None:
        """Commit the outcomes of the ``finished`` jobs (recipient states and events) in one
        transaction, and log them."""
        assert self._store is not None
        now = self._clock.seconds()
        mx = connection.hop.host if connection is not None else ""
        tls = connection.tls if connection is not None else False
        per_job: list[tuple[Job, list[RecipientOutcome]]] = []
        for job, results, suppressed in finished:
            by_address = {r.address: r for r in results}
            outcomes = [
                RecipientOutcome(
                    recipient.id,
                    job.message.queue_id,
                    recipient.address,
                    "suppressed",
                    recipient.attempts,
                    None,
                    f"suppressed: {entry.reason}",
                    (SuppressedEvent(entry.reason),),
                )
                for recipient, entry in suppressed
            ]
            suppressed_ids = {recipient.id for recipient, _ in suppressed}
            for recipient in job.recipients:
                if recipient.id in suppressed_ids:
                    continue
                result = by_address.get(recipient.address)
                # Every recipient of the job gets an outcome: none left claimed with no reply.
                reply = result.reply if result is not None else _local_reply("no reply", "4.3.0")
                soon = adaptive and is_rate_signal(reply.code, reply.text, at_connect=not mx)
                outcomes.append(self._outcome(job, recipient, reply, mx, tls, now, soon))
            per_job.append((job, outcomes))
        every = [outcome for _, outcomes in per_job for outcome in outcomes]
        recorded = await self._store.record_outcomes_of(self.node_id, every)
        if self._metrics is not None:
            for job, outcomes in per_job:
                self._count(job, [o for o in outcomes if o.recipient_id in recorded], now)
        retries = [o.next_attempt_at for o in every if o.next_attempt_at is not None]
        if retries:
            self._wake_at(min(retries))
        for job, outcomes in per_job:
            for outcome in outcomes:
                log.info(
                    "{queue_id}: to=<{rcpt}> dest={dest} {state} reply={reply!r}",
                    queue_id=outcome.queue_id,
                    rcpt=outcome.address,
                    dest=mx or job.domain,
                    state=outcome.state,
                    reply=outcome.reply,
                )

    def _count(self, job: Job, recorded: Sequence[RecipientOutcome], now: float) -> None:
        """Count the outcomes committed (those of rows still ours): their events, and each
        delivery's latency from the message's acceptance."""
        metrics = self._metrics
        assert metrics is not None
        latency = max(0.0, now - job.message.received_at)
        for outcome in recorded:
            metrics.count_events(outcome.events)
            if outcome.state == "delivered" and not job.message.sandbox:
                metrics.delivery_latency.observe(latency)

    def _outcome(
        self,
        job: Job,
        recipient: ClaimedRecipient,
        reply: ServerReply,
        mx: str,
        tls: bool,
        now: float,
        soon: bool = False,
    ) -> RecipientOutcome:
        """``soon``: a rate-limit reply to an adaptive throttle, tried again after
        ``tunables.adaptive.retry_delay`` rather than on the retry schedule."""
        attempt = recipient.attempts + 1
        line = reply.line

        def outcome(state: str, next_at: float | None, *events: EventData) -> RecipientOutcome:
            return RecipientOutcome(
                recipient.id,
                job.message.queue_id,
                recipient.address,
                state,
                attempt,
                next_at,
                line,
                tuple(events),
            )

        if 200 <= reply.code < 300:
            return outcome(
                "delivered",
                None,
                DeliveredEvent(
                    mx=mx, reply=line, tls=tls, attempt=attempt, sandbox=job.message.sandbox
                ),
            )
        if reply.code >= 500:
            verdict = classify_reply(reply.code, reply.text)
            return outcome(
                "bounced",
                None,
                BouncedEvent(
                    category=verdict.category,
                    hard=verdict.hard,
                    status=verdict.status,
                    reply=line,
                    source="smtp",
                ),
            )
        if soon:
            next_at = retry_soon(
                now=now,
                first_attempt_at=job.message.received_at,
                max_age=self._config.max_age,
                delay=self.tunables.adaptive.retry_delay,
                rng=self._rng,
            )
        else:
            next_at = schedule_retry(
                now=now,
                first_attempt_at=job.message.received_at,
                attempt=attempt,
                schedule=self._config.retry_schedule,
                max_age=self._config.max_age,
                reply_text=reply.text,
                rng=self._rng,
            )
        if next_at is None:
            return outcome(
                "expired",
                None,
                ExpiredEvent(attempts=attempt),
                BouncedEvent(
                    category="expired", hard=False, status="4.4.7", reply=line, source="smtp"
                ),
            )
        return outcome(
            "deferred",
            next_at,
            DeferredEvent(mx=mx, reply=line, attempt=attempt, next_attempt=rfc3339(next_at)),
        )


#: A job whose outcome is known: its replies, and its recipients found on the suppression list.
Finished = tuple[Job, Sequence[RecipientResult], Sequence[tuple[ClaimedRecipient, Suppression]]]


def _label(finished: Sequence[Finished]) -> str:
    """The jobs' message in a log line: its queue id, or the first's and how many more."""
    first = finished[0][0].message.queue_id
    more = len({job.message.queue_id for job, _, _ in finished}) - 1
    return first if more <= 0 else f"{first} (and {more} more message(s))"


class StorageFailed(Exception):
    """The database never became ready (the storage service reports why)."""


def node_id_for(data_dir: str) -> str:
    """The same id for every run of the relay on this host with this data directory."""
    where = os.path.abspath(data_dir)
    return f"{socket.gethostname()}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def _local_reply(text: str, status: str = "4.4.1") -> ServerReply:
    """A temporary failure found on our side (connection, TLS, DNS), worded as a reply."""
    return ServerReply(451, f"{status} {' '.join(text.split())}")


__all__ = ["DEFAULT_TUNABLES", "DeliveryManager", "DeliveryTunables", "Job", "NextHop"]
