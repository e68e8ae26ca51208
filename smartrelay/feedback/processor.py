"""Processing a stored report: classify it, tie it to our message and recipient, record its
effects, all of them with the report's new state in one transaction
(docs/feedback-processing.md).

:class:`FeedbackProcessor` processes one report by id (the inbound listener's reports and,
through the same entry point, the mailbox readers'); :class:`FeedbackService` runs it in the
relay's main process on every report committed (``FEEDBACK_CHANNEL``), on those left ``new``
at start-up, and on a slow sweep that retries any a failure left ``new``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay import suppression as policy
from smartrelay.config import Config
from smartrelay.events import BouncedEvent, ComplainedEvent, EventData, UnsubscribedEvent
from smartrelay.feedback.classify import MAX_REPORT_SIZE, classify_message
from smartrelay.feedback.matching import (
    Match,
    Tokens,
    find_tokens,
    forged_reason,
    match_bounce,
    match_complaint,
    refs_by_id,
)
from smartrelay.feedback.model import ClassifiedRecipient, FailedRecipient, Report
from smartrelay.metrics import RelayMetrics
from smartrelay.smtp.session import printable
from smartrelay.storage.events import insert_events
from smartrelay.storage.feedback import (
    FEEDBACK_CHANNEL,
    FeedbackVerdict,
    StoredFeedback,
    copy_has_event,
    finish_report,
)
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.store import Store, to_ms
from smartrelay.storage.suppressions import count_soft_bounces, write_suppressions
from smartrelay.storage.tracking import RecipientRef, write_opt_out
from smartrelay.tokens import TokenCodec

log = Logger()

#: At most this many failed recipients of one report are matched and recorded (a DSN names
#: the recipients of one message, which the relay caps at ``[smtp] max_recipients``).
MAX_RECIPIENTS = 1000
#: The classifier: raw bytes to a typed report (``classify_message`` with the config's rules).
Classifier = Callable[[bytes], Report]
StoreReady = Callable[[], Awaitable[Store]]


class UnknownReport(LookupError):
    """No stored report has this id."""


def configured_classifier(config: Config) -> Classifier:
    """The parsers' :func:`~smartrelay.feedback.classify.classify_message` with the config's
    ``[[feedback.rules]]``."""
    rules = config.feedback_rules
    return lambda raw: classify_message(raw, rules)


@frozen
class FeedbackOutcome:
    """What processing a report did: its state afterwards and the events it recorded."""

    report_id: str
    state: str  # processed, ignored, unmatched; new when it was not processed (see reason)
    reason: str = ""
    kind: str | None = None
    matched_by: str | None = None
    queue_id: str | None = None
    recipient: str | None = None
    #: Events recorded by this processing (0 for a duplicate of what was recorded before).
    events: int = 0


class _Raced(Exception):
    """Another processor recorded the report first: this transaction's effects roll back."""


#: What to record for a report, run inside the transaction that records it: the verdict, and
#: the events it wrote.
_Plan = Callable[
    [ICursor, int, IDatabaseEngine], Awaitable[tuple[FeedbackVerdict, list[EventData]]]
]


class FeedbackProcessor:
    """Processes stored reports one at a time (see the module docstring).

    ``classify`` is injected (the relay passes ``classify_message`` with the config's
    ``[[feedback.rules]]``; tests pass their own). ``in_thread``, when given, runs the
    classifier off the reactor thread (a report may be megabytes of MIME).
    """

    def __init__(
        self,
        store_ready: StoreReady,
        codec: TokenCodec,
        config: Config,
        classify: Classifier,
        in_thread: Callable[[Callable[[], Report]], Deferred[Report]] | None = None,
        max_size: int = MAX_REPORT_SIZE,
        metrics: RelayMetrics | None = None,
    ) -> None:
        """``metrics``: where the events recorded are counted (the relay's; None in the
        CLI)."""
        self._max_size = max_size
        self._metrics = metrics
        self._store_ready = store_ready
        self._codec = codec
        self._config = config
        self._classify = classify
        self._in_thread = in_thread
        self._domain = config.inbound.return_path_domain.lower()

    async def process(self, report_id: str, again: bool = False) -> FeedbackOutcome:
        """Process report ``report_id`` if it is ``new`` (``again``: whatever its state, for
        ``feedback reprocess``); a report in another state comes back as it is. Raises
        :class:`UnknownReport`, and the database's errors (the report then stays as it was,
        for the next try)."""
        store = await self._store_ready()
        stored = await store.load_feedback(report_id, self._max_size)
        if stored is None:
            raise UnknownReport(f"no feedback report {report_id}")
        if stored.state != "new" and not again:
            return await self._current(store, report_id, "already processed")
        plan = await self._plan(stored)
        now_ms = store.now_ms()

        async def txn(cursor: ICursor) -> tuple[FeedbackOutcome, list[EventData]]:
            verdict, events = await plan(cursor, now_ms, store.engine)
            if not await finish_report(cursor, report_id, stored.state, verdict, now_ms):
                raise _Raced()
            return FeedbackOutcome(
                report_id,
                verdict.state,
                verdict.reason,
                verdict.kind,
                verdict.matched_by,
                verdict.queue_id,
                verdict.recipient,
                len(events),
            ), events

        try:
            outcome, recorded = await store.run("process_feedback", txn)
        except _Raced:
            return await self._current(store, report_id, "processed meanwhile elsewhere")
        if self._metrics is not None:
            self._metrics.count_events(recorded)
        log.info(
            "{report_id}: feedback {state}: {kind} {reason}{match}",
            report_id=report_id,
            state=outcome.state,
            kind=outcome.kind or "-",
            reason=printable(outcome.reason),
            match=f" (by {outcome.matched_by}: {outcome.queue_id} {outcome.recipient})"
            if outcome.matched_by
            else "",
        )
        return outcome

    async def _current(self, store: Store, report_id: str, why: str) -> FeedbackOutcome:
        summary = await store.feedback_summary(report_id)
        if summary is None:
            raise UnknownReport(f"no feedback report {report_id}")
        return FeedbackOutcome(
            report_id,
            summary.state,
            summary.reason or why,
            summary.kind,
            summary.matched_by,
            summary.queue_id,
            summary.recipient,
        )

    async def _plan(self, stored: StoredFeedback) -> _Plan:
        """What to record, decided from the report alone (its queries and effects run later,
        in the transaction that records them)."""
        raw = stored.raw
        if raw is None:
            return _fixed(
                FeedbackVerdict(
                    "ignored", f"too big: {stored.size} bytes (at most {self._max_size})"
                )
            )
        tokens = find_tokens(self._codec, self._domain, stored.recipients, raw)
        if tokens.mailto:
            return self._unsubscribe(tokens)
        forged_mailto = [a for a in tokens.forged if a.strip().strip("<>").lower().startswith("u+")]
        if forged_mailto:  # a mail to u+ is an unsubscribe whatever it says: but this token lies
            return _fixed(FeedbackVerdict("unmatched", forged_reason(forged_mailto), "unsubscribe"))
        try:
            report = await self._run_classifier(raw)
        except Exception as error:
            log.failure("{report_id}: the classifier failed", report_id=stored.report_id)
            return _fixed(FeedbackVerdict("ignored", f"malformed: {error}"[:200]))
        if report.returned is not None and report.returned.return_path:
            tokens = find_tokens(
                self._codec, self._domain, stored.recipients, raw, report.returned.return_path
            )
        if report.kind == "autoreply":
            return _fixed(FeedbackVerdict("ignored", "autoreply", "autoreply"))
        if report.kind == "other":
            return _fixed(FeedbackVerdict("ignored", _other_reason(report), "other"))
        if report.kind == "complaint":
            return self._complaint(tokens, report)
        return self._bounce(tokens, report)

    async def _run_classifier(self, raw: bytes) -> Report:
        if self._in_thread is None:
            return self._classify(raw)
        return await self._in_thread(lambda: self._classify(raw))

    def _unsubscribe(self, tokens: Tokens) -> _Plan:
        config = self._config.suppression

        async def plan(
            cursor: ICursor, now_ms: int, engine: IDatabaseEngine
        ) -> tuple[FeedbackVerdict, list[EventData]]:
            refs, gone = await refs_by_id(cursor, tokens.mailto)
            if not refs:
                reason = f"recipient {gone[0]} of the mailto token is gone (purged)"
                return FeedbackVerdict("unmatched", reason, "unsubscribe"), []
            events: list[EventData] = []
            for ref in refs:
                entry = policy.unsubscribe(
                    config, ref.address, now_ms / 1000, "mailto", ref.queue_id
                )
                event = UnsubscribedEvent("mailto")
                if await write_opt_out(
                    cursor, engine, now_ms, ref.address, ref.queue_id, entry, event
                ):
                    events.append(event)
            reason = "mailto unsubscribe" if events else "duplicate: already unsubscribed"
            return _processed(reason, "unsubscribe", Match("mailto", ()), refs[0]), events

        return plan

    def _complaint(self, tokens: Tokens, report: Report) -> _Plan:
        config = self._config.suppression
        hostname = self._config.server.hostname
        complaint = report.complaint
        feedback_type = complaint.feedback_type if complaint else "abuse"
        source = complaint.source if complaint else ""

        async def plan(
            cursor: ICursor, now_ms: int, engine: IDatabaseEngine
        ) -> tuple[FeedbackVerdict, list[EventData]]:
            match = await match_complaint(cursor, tokens, report, hostname, now_ms)
            if not match.matched:
                return FeedbackVerdict("unmatched", match.reason, "complaint"), []
            events: list[EventData] = []
            for matched in match.matched:
                ref = matched.ref
                entry = policy.complaint(
                    config, ref.address, now_ms / 1000, feedback_type, source, ref.queue_id
                )
                event = ComplainedEvent(feedback_type, source)
                if await write_opt_out(
                    cursor, engine, now_ms, ref.address, ref.queue_id, entry, event
                ):
                    events.append(event)
            reason = f"{feedback_type} complaint" if events else "duplicate: already complained"
            return _processed(reason, "complaint", match, match.matched[0].ref), events

        return plan

    def _bounce(self, tokens: Tokens, report: Report) -> _Plan:
        config = self._config.suppression
        hostname = self._config.server.hostname
        # Bounded work per report, however many blocks a hostile DSN holds.
        failed = [c for c in report.recipients if c.recipient.action.lower() == "failed"]
        failed = failed[:MAX_RECIPIENTS]
        if report.recipients and not failed:
            actions = {c.recipient.action.lower() for c in report.recipients}
            reason = "delayed-only" if actions <= {"delayed"} else "no failed recipient"
            return _fixed(
                FeedbackVerdict("ignored", f"{reason} ({', '.join(sorted(actions))})", "bounce")
            )

        async def plan(
            cursor: ICursor, now_ms: int, engine: IDatabaseEngine
        ) -> tuple[FeedbackVerdict, list[EventData]]:
            match = await match_bounce(cursor, tokens, report, failed, hostname, now_ms)
            if not match.matched:
                return FeedbackVerdict("unmatched", match.reason, "bounce"), []
            now = now_ms / 1000
            events: list[EventData] = []
            described: list[str] = []
            # In address order: two reports locking the same addresses never deadlock.
            for matched in sorted(match.matched, key=lambda m: m.ref.address.lower()):
                ref = matched.ref
                classified = matched.classified or _undetermined(ref, report)
                # One bounce per copy: a resent DSN, one processed before, or one processed
                # at this moment elsewhere. The lock (SQLite serialises writers anyway) makes
                # the bounces of one address take turns: the check below and the soft-bounce
                # count of the policy see those committed before.
                lock = engine.lock_statement()
                if lock is not None:
                    await cursor.execute(lock, (f"bounce:{ref.address.lower()}",))
                if await copy_has_event(cursor, ref.queue_id, ref.address, "bounced"):
                    continue
                recipient = classified.recipient
                event = BouncedEvent(
                    category=classified.category,
                    hard=classified.hard,
                    status=recipient.status,
                    reply=recipient.diagnostic[:1000],
                    source="dsn",
                )
                await insert_events(cursor, now_ms, [(ref.queue_id, ref.address, event)])
                events.append(event)
                hardness = "hard" if classified.hard else "soft"
                described.append(f"{classified.category} ({hardness}) for {ref.address}")
                decision: policy.Suppress | policy.CountSoftBounces | None = policy.after_bounce(
                    config,
                    ref.address,
                    now,
                    classified.hard,
                    recipient.diagnostic or recipient.status,
                )
                if isinstance(decision, policy.CountSoftBounces):
                    count = await count_soft_bounces(
                        cursor, decision.address, to_ms(decision.since)
                    )
                    decision = policy.after_soft_bounces(config, decision.address, now, count)
                if decision is not None:
                    await write_suppressions(cursor, now_ms, [decision])
            reason = "bounced: " + "; ".join(described) if events else "duplicate: already bounced"
            return _processed(reason, "bounce", match, match.matched[0].ref), events

        return plan


def _fixed(verdict: FeedbackVerdict) -> _Plan:
    """A verdict that needs no query (ignored reports)."""

    async def plan(
        cursor: ICursor, now_ms: int, engine: IDatabaseEngine
    ) -> tuple[FeedbackVerdict, list[EventData]]:
        return verdict, []

    return plan


def _processed(reason: str, kind: str, match: Match, first: RecipientRef) -> FeedbackVerdict:
    return FeedbackVerdict(
        "processed",
        reason,
        kind,
        match.route,
        first.queue_id,
        first.address,
        first.recipient_id,
    )


def _undetermined(ref: RecipientRef, report: Report) -> ClassifiedRecipient:
    """A bounce our VERP ties to ``ref`` whose text names no recipient the parsers could
    read: a bounce all the same, of no known category."""
    return ClassifiedRecipient(
        FailedRecipient(ref.address, diagnostic=report.note[:200]), "undetermined", False
    )


def _other_reason(report: Report) -> str:
    return f"other: {report.note}" if report.note else "other"


class FeedbackService(Service):
    """Processes the reports left ``new``: at start, whenever a report is committed
    (``FEEDBACK_CHANNEL``, which every node's inbound listener notifies), and every
    ``sweep_interval`` seconds (what a failure left ``new``: the database was unavailable).

    One pass at a time; a notification during a pass starts another after it. Each report is
    tried once per pass, so one that fails (logged) never holds the others back. Runs in the
    relay's main process only (never in the delivery processes).
    """

    name = "feedback"

    def __init__(
        self,
        clock: IReactorTime,
        store_ready: StoreReady,
        make_processor: Callable[[], FeedbackProcessor],
        sweep_interval: float = 300.0,
        page: int = 100,
    ) -> None:
        self._clock = clock
        self._store_ready = store_ready
        self._make_processor = make_processor
        self._sweep_interval = sweep_interval
        self._page = page
        self._processor: FeedbackProcessor | None = None
        self._store: Store | None = None
        self._running: Deferred[None] | None = None
        self._again = False
        self._timer: IDelayedCall | None = None
        self._listening = False
        #: Passes completed and reports processed, for tests and logs.
        self.passes = 0
        self.processed = 0

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._processor = self._make_processor()
        # Not a pass: stopService does not wait for the storage to open.
        Deferred.fromCoroutine(self._wait_for_store()).addErrback(self._no_store)

    async def _wait_for_store(self) -> None:
        self._store = await self._store_ready()
        self.wake()

    def _no_store(self, failure: Failure) -> None:
        """The storage did not open (it reports that itself, as fatal) or stopped first."""
        log.debug("feedback: no store: {error}", error=failure.getErrorMessage())

    async def process(self, report_id: str) -> None:
        """Process one report now (a mailbox reader's, just stored); before the service has
        started, nothing: the report stays ``new`` for its first pass."""
        if self._processor is not None:
            await self._processor.process(report_id)

    def wake(self) -> None:
        """Start a pass now, or right after the one under way."""
        if not self.running or self._store is None:
            return
        if self._running is not None:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._running = Deferred.fromCoroutine(self._pass())

    async def _pass(self) -> None:
        store = self._store
        assert store is not None
        try:
            if not self._listening:
                await store.engine.listen(FEEDBACK_CHANNEL, self.wake)
                self._listening = True
            while True:
                self._again = False
                await self._process_new(store)
                self.passes += 1
                if not (self._again and self.running):
                    break
        except DatabaseUnavailable as error:
            log.warn("feedback: database unavailable ({error}); trying again later", error=error)
        except Exception:
            log.failure("feedback: a pass failed; trying again later")
        finally:
            self._running = None
        if self.running:
            self._timer = self._clock.callLater(self._sweep_interval, self.wake)

    async def _process_new(self, store: Store) -> None:
        processor = self._processor
        assert processor is not None
        after: tuple[float, str] | None = None
        while self.running:
            page = await store.feedback_ids("new", after, self._page)
            for position in page:
                if not self.running:
                    return
                try:
                    await processor.process(position[1])
                    self.processed += 1
                except DatabaseUnavailable:
                    raise  # the next sweep tries again
                except Exception:
                    log.failure("{report_id}: processing failed; left new", report_id=position[1])
            if len(page) < self._page:
                return
            after = page[-1]

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        running = self._running
        if running is None:
            return None
        done: Deferred[None] = Deferred()
        running.addBoth(lambda _: done.callback(None))
        return done
