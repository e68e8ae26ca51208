"""The relay's Prometheus metrics (docs/metrics.md): one :class:`RelayMetrics` per process,
on its own registry (never the ``prometheus_client`` global one), passed to whatever counts.

Counters and the latency histogram count what this process (and, in the main process, its
delivery processes) did since it started; Prometheus handles their reset at a restart. Gauges
of shared state (queue depth, webhook backlog, feedback reports, held credentials) are read from
the database when ``/metrics`` is scraped, so every node shows the same figures for them.

The delivery processes (``[delivery] processes = N``) count in their own ``RelayMetrics`` and
send :meth:`RelayMetrics.snapshot` to the main process (a ``metrics {json}`` line on their
standard output); the main process keeps them in :attr:`RelayMetrics.children` and
``registry`` exposes its own values plus the children's (a custom collector adds them at
scrape time). A child's figures are cumulative since that child started: when it ends, its
last figures are kept (retired) and its next run counts from zero on top of them, so the
totals never go down while the main process runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from attrs import frozen
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from smartrelay.events import (
    BouncedEvent,
    ClickedEvent,
    ComplainedEvent,
    DeferredEvent,
    DeliveredEvent,
    EventData,
    ExpiredEvent,
    OpenedEvent,
    SuppressedEvent,
    UnsubscribedEvent,
)

__all__ = [
    "LATENCY_BUCKETS",
    "AdaptiveGauges",
    "ChildCounts",
    "DatabaseFigures",
    "DestinationFigures",
    "LimitFigures",
    "RelayMetrics",
    "WebhookFigures",
]

#: One sample of a snapshot: (family, sample name, sorted label pairs).
SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]
#: At most this many samples are taken from one child's snapshot (bounded memory).
MAX_SNAPSHOT_SAMPLES = 20000

#: Seconds from acceptance to delivery: from a local sink's milliseconds to a day of retries.
LATENCY_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
    86400.0,
)  # fmt: skip


class RelayMetrics:
    """Every metric the relay's code updates. Names and labels are the contract of
    docs/metrics.md; ``registry`` is what ``/metrics`` exposes."""

    def __init__(self) -> None:
        #: What this process counts (the metric objects below are registered here).
        self.own_registry = registry = CollectorRegistry(auto_describe=True)
        #: The delivery processes' figures (main process; empty elsewhere).
        self.children = ChildCounts()
        #: The database gauges' last reading (set by the ``/metrics`` resource).
        self.database = DatabaseGauges()
        #: Adaptive throttles' current limits: this process's and its children's.
        self.adaptive = AdaptiveGauges()
        #: What ``/metrics`` exposes: this process's values plus its children's, then the
        #: database gauges.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Combined(self))
        # SMTP
        self.messages_received = Counter(
            "smartrelay_messages_received",
            "Messages accepted (250 after DATA), by listener.",
            ["listener"],
            registry=registry,
        )
        self.recipients_received = Counter(
            "smartrelay_recipients_received",
            "Recipients of accepted messages, by listener.",
            ["listener"],
            registry=registry,
        )
        self.smtp_sessions_open = Gauge(
            "smartrelay_smtp_sessions_open",
            "SMTP sessions open now, by listener.",
            ["listener"],
            registry=registry,
        )
        # Delivery (recipients)
        self.delivered = Counter(
            "smartrelay_recipients_delivered", "Recipients delivered.", registry=registry
        )
        self.sandbox_delivered = Counter(
            "smartrelay_recipients_sandbox_delivered",
            "Recipients of sandbox credentials' mail recorded as delivered (not in delivered).",
            registry=registry,
        )
        self.deferred = Counter(
            "smartrelay_recipients_deferred",
            "Delivery attempts deferred (a temporary failure).",
            registry=registry,
        )
        self.bounced = Counter(
            "smartrelay_recipients_bounced",
            "Recipients bounced, by category and hard/soft, from SMTP replies and DSNs.",
            ["category", "hard", "source"],
            registry=registry,
        )
        self.expired = Counter(
            "smartrelay_recipients_expired",
            "Recipients given up after [delivery] max_age.",
            registry=registry,
        )
        self.suppressed = Counter(
            "smartrelay_recipients_suppressed",
            "Recipients not sent to: on the suppression list, by reason.",
            ["reason"],
            registry=registry,
        )
        self.delivery_latency = Histogram(
            "smartrelay_delivery_latency_seconds",
            "Seconds from acceptance to delivery, per delivered recipient.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Feedback and engagement
        self.complained = Counter(
            "smartrelay_complaints", "Feedback-loop complaints recorded.", registry=registry
        )
        self.unsubscribed = Counter(
            "smartrelay_unsubscribes", "Unsubscribes, by method.", ["method"], registry=registry
        )
        self.opened = Counter(
            "smartrelay_opens",
            "Opens recorded, machine (proxy, prefetch, scanner) or not.",
            ["machine"],
            registry=registry,
        )
        self.clicked = Counter(
            "smartrelay_clicks",
            "Clicks recorded, machine or not.",
            ["machine"],
            registry=registry,
        )
        # Webhooks (this node's attempts; backlog and state are database gauges)
        self.webhook_posts = Counter(
            "smartrelay_webhook_posts",
            "Webhook POSTs by endpoint and result (ok, failed, gone).",
            ["endpoint", "result"],
            registry=registry,
        )
        self.webhook_events_sent = Counter(
            "smartrelay_webhook_events_sent",
            "Events acknowledged by webhook endpoints.",
            ["endpoint"],
            registry=registry,
        )
        # Alerts
        self.alerts = Counter(
            "smartrelay_alerts",
            "Alerts raised, by kind and action.",
            ["kind", "action"],
            registry=registry,
        )
        self.database_gauge_failures = Counter(
            "smartrelay_database_gauges_failures",
            "Reads of the database gauges that failed (the last figures were shown, or 503).",
            registry=registry,
        )

    # -- counting -----------------------------------------------------------------------
    def count_events(self, events: Iterable[EventData]) -> None:
        """Count recorded events (committed) of the types these counters follow: delivery
        outcomes, feedback, engagement. ``received`` is counted by the SMTP listener (per
        message), ``delivered``'s latency by the delivery manager."""
        for event in events:
            if isinstance(event, DeliveredEvent):
                # Sandbox mail never reached a receiver: kept out of the real deliveries.
                (self.sandbox_delivered if event.sandbox else self.delivered).inc()
            elif isinstance(event, DeferredEvent):
                self.deferred.inc()
            elif isinstance(event, BouncedEvent):
                self.bounced.labels(
                    category=event.category, hard=_flag(event.hard), source=event.source
                ).inc()
            elif isinstance(event, ExpiredEvent):
                self.expired.inc()
            elif isinstance(event, SuppressedEvent):
                self.suppressed.labels(reason=event.reason).inc()
            elif isinstance(event, ComplainedEvent):
                self.complained.inc()
            elif isinstance(event, UnsubscribedEvent):
                self.unsubscribed.labels(method=event.method).inc()
            elif isinstance(event, OpenedEvent):
                self.opened.labels(machine=_flag(event.machine)).inc()
            elif isinstance(event, ClickedEvent):
                self.clicked.labels(machine=_flag(event.machine)).inc()

    # -- delivery processes -------------------------------------------------------------
    def snapshot(self) -> list[list[Any]]:
        """This process's counter and histogram samples, cumulative since it started, as
        JSON-ready ``[family, sample, {labels}, value]`` rows (what a delivery process sends
        to the main process). Gauges and ``_created`` samples are left out."""
        rows: list[list[Any]] = []
        for family in self.own_registry.collect():
            if family.type not in ("counter", "histogram"):
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                rows.append([family.name, sample.name, dict(sample.labels), sample.value])
        return rows

    def families(self) -> dict[str, str]:
        """The counter and histogram families of this process, by name: their type."""
        return {
            f.name: f.type
            for f in self.own_registry.collect()
            if f.type in ("counter", "histogram")
        }


def _flag(value: bool) -> str:
    return "true" if value else "false"


class ChildCounts:
    """The child processes' figures (delivery processes by index, accepting processes as
    ``smtpN``), in the main process: the live children's last
    snapshots and what children that ended had counted (so totals survive a restart)."""

    def __init__(self) -> None:
        self._live: dict[int | str, dict[SampleKey, float]] = {}
        self._retired: dict[SampleKey, float] = {}

    def update(self, index: int | str, rows: object, families: Mapping[str, str]) -> bool:
        """Take child ``index``'s snapshot (parsed JSON of :meth:`RelayMetrics.snapshot`);
        rows of unknown families or malformed ones are skipped. False if it is no list."""
        if not isinstance(rows, list):
            return False
        figures: dict[SampleKey, float] = {}
        for row in rows[:MAX_SNAPSHOT_SAMPLES]:
            key_value = _parse_row(row, families)
            if key_value is not None:
                figures[key_value[0]] = key_value[1]
        previous = self._live.get(index, {})
        # A snapshot never goes back (a child's counters only grow): keep the larger.
        for key, value in previous.items():
            if figures.get(key, 0.0) < value:
                figures[key] = value
        self._live[index] = figures
        return True

    def retire(self, index: int | str) -> None:
        """Child ``index`` ended: its last figures stay counted; its next run starts at 0."""
        for key, value in self._live.pop(index, {}).items():
            self._retired[key] = self._retired.get(key, 0.0) + value

    def totals(self) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        """Every child's figures summed, by family, then (sample, labels)."""
        summed: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for figures in (self._retired, *self._live.values()):
            for (family, sample, labels), value in figures.items():
                by_sample = summed.setdefault(family, {})
                by_sample[sample, labels] = by_sample.get((sample, labels), 0.0) + value
        return summed


def _parse_row(row: object, families: Mapping[str, str]) -> tuple[SampleKey, float] | None:
    if not isinstance(row, list) or len(row) != 4:
        return None
    family, sample, labels, value = row
    if not isinstance(family, str) or family not in families:
        return None
    if not isinstance(sample, str) or not sample.startswith(family) or len(sample) > 200:
        return None
    if not isinstance(labels, dict) or len(labels) > 10:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    if not math.isfinite(number) or number < 0:
        return None
    return (family, sample, tuple(sorted(labels.items()))), number


# -- the database gauges ----------------------------------------------------------------------
@frozen
class DestinationFigures:
    """Recipients waiting for one destination (recipient domain, or ``other``)."""

    destination: str
    recipients: int
    #: Seconds since the oldest waiting recipient's message was accepted.
    oldest_age: float


@frozen
class WebhookFigures:
    url: str
    disabled: bool
    failures: int
    sent_events: int
    dead_letters: int
    #: Events of its types after its position (at most the cap); None: not configured.
    backlog: int | None


@frozen
class DatabaseFigures:
    """The shared state ``/metrics`` shows, read from the database at ``read_at``."""

    read_at: float
    queue: tuple[DestinationFigures, ...]
    feedback_reports: tuple[tuple[str, int], ...]
    credentials_held: int
    webhooks: tuple[WebhookFigures, ...]


class DatabaseGauges:
    """The last :class:`DatabaseFigures` read (none yet: no samples)."""

    def __init__(self) -> None:
        self.figures: DatabaseFigures | None = None
        #: When they were read, by :attr:`now` (the ``/metrics`` resource's clock).
        self.read_at = 0.0
        self.now: Callable[[], float] = lambda: self.read_at

    def collect(self) -> Iterator[Metric]:
        figures = self.figures
        if figures is None:
            return
        age = GaugeMetricFamily(
            "smartrelay_database_gauges_age_seconds",
            "How old the database figures below are (cached a few seconds).",
            value=max(0.0, self.now() - self.read_at),
        )
        yield age
        depth = GaugeMetricFamily(
            "smartrelay_queue_recipients",
            "Recipients waiting for delivery, by destination (the 50 deepest, then other).",
            labels=["destination"],
        )
        oldest = GaugeMetricFamily(
            "smartrelay_queue_oldest_age_seconds",
            "Age of the oldest waiting recipient's message, by destination.",
            labels=["destination"],
        )
        for d in figures.queue:
            depth.add_metric([d.destination], d.recipients)
            oldest.add_metric([d.destination], d.oldest_age)
        yield depth
        yield oldest
        reports = GaugeMetricFamily(
            "smartrelay_feedback_reports",
            "Stored feedback reports, by state.",
            labels=["state"],
        )
        for state, count in figures.feedback_reports:
            reports.add_metric([state], count)
        yield reports
        yield GaugeMetricFamily(
            "smartrelay_credentials_held",
            "SMTP credentials whose mail is held by a volume alert.",
            value=figures.credentials_held,
        )
        disabled = GaugeMetricFamily(
            "smartrelay_webhook_disabled",
            "1 if the webhook endpoint is disabled, else 0.",
            labels=["endpoint"],
        )
        failures = CounterMetricFamily(
            "smartrelay_webhook_endpoint_failures",
            "Failed webhook POSTs to the endpoint, every node's.",
            labels=["endpoint"],
        )
        sent = CounterMetricFamily(
            "smartrelay_webhook_endpoint_sent_events",
            "Events the endpoint acknowledged, every node's.",
            labels=["endpoint"],
        )
        dead = GaugeMetricFamily(
            "smartrelay_webhook_dead_letters",
            "Dead-letter ranges of the endpoint.",
            labels=["endpoint"],
        )
        backlog = GaugeMetricFamily(
            "smartrelay_webhook_backlog_events",
            "Events of the endpoint's types not yet sent (counted up to 100,000).",
            labels=["endpoint"],
        )
        for w in figures.webhooks:
            disabled.add_metric([w.url], 1 if w.disabled else 0)
            failures.add_metric([w.url], w.failures)
            sent.add_metric([w.url], w.sent_events)
            dead.add_metric([w.url], w.dead_letters)
            if w.backlog is not None:
                backlog.add_metric([w.url], w.backlog)
        yield from (disabled, failures, sent, dead, backlog)


class _Combined(Collector):
    """``RelayMetrics.registry``'s one collector: own samples plus the children's."""

    def __init__(self, metrics: RelayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        extra = self._metrics.children.totals()
        for family in self._metrics.own_registry.collect():
            added = extra.get(family.name)
            yield family if not added else _merged(family, added)
        yield from self._metrics.adaptive.collect()
        yield from self._metrics.database.collect()


def _merged(
    family: Metric, added: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]
) -> Metric:
    left = dict(added)
    merged = Metric(family.name, family.documentation, family.type, family.unit)
    for sample in family.samples:
        key = (sample.name, tuple(sorted(sample.labels.items())))
        value = sample.value
        if not sample.name.endswith("_created"):
            value += left.pop(key, 0.0)
        merged.add_sample(sample.name, dict(sample.labels), value)
    for (name, labels), value in left.items():
        merged.add_sample(name, dict(labels), value)
    return merged


# -- adaptive throttles -----------------------------------------------------------------------
#: Adaptive destinations kept per process (the cut ones first), and domains listed per one.
MAX_LIMIT_FIGURES = 1000
MAX_LIMIT_DOMAINS = 20


@frozen
class LimitFigures:
    """The current limits of one adaptive throttle key (smartrelay/delivery/adaptive.py)."""

    #: The throttle key: ``mx:.google.com``, or a recipient domain.
    destination: str
    rate: float
    connections: int
    ceiling_rate: float
    ceiling_connections: int
    #: Below the ceiling now.
    cut: bool
    #: Clock seconds: the limits are not raised before this.
    hold_until: float
    #: The reply of the last cut.
    reason: str
    #: Recipient domains seen rate-limited under this key (a few).
    domains: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "rate": self.rate,
            "connections": self.connections,
            "ceiling_rate": self.ceiling_rate,
            "ceiling_connections": self.ceiling_connections,
            "cut": self.cut,
            "hold_until": self.hold_until,
            "reason": self.reason,
            "domains": list(self.domains),
        }

    @classmethod
    def from_json(cls, value: object) -> LimitFigures | None:
        """One figure from a delivery process's ``adaptive`` line; None if malformed."""
        if not isinstance(value, dict):
            return None
        numbers = [value.get(k) for k in ("rate", "ceiling_rate", "hold_until")]
        counts = [value.get(k) for k in ("connections", "ceiling_connections")]
        texts = [value.get(k) for k in ("destination", "reason")]
        domains = value.get("domains")
        if not all(_finite(n) for n in numbers) or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**31 for c in counts
        ):
            return None
        if not all(isinstance(t, str) and len(t) <= 300 for t in texts) or not texts[0]:
            return None
        if not isinstance(domains, list) or len(domains) > MAX_LIMIT_DOMAINS:
            return None
        if not all(isinstance(d, str) and len(d) <= 255 for d in domains):
            return None
        cut = value.get("cut")
        if not isinstance(cut, bool):
            return None
        return cls(
            str(texts[0]),
            float(numbers[0]),  # type: ignore[arg-type]
            int(counts[0]),  # type: ignore[arg-type]
            float(numbers[1]),  # type: ignore[arg-type]
            int(counts[1]),  # type: ignore[arg-type]
            cut,
            float(numbers[2]),  # type: ignore[arg-type]
            str(texts[1]),
            tuple(domains),
        )


def _finite(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


class AdaptiveGauges:
    """Adaptive throttles' limits by process: ``main`` (this process's delivery manager) and
    ``d0``, ``d1``... (delivery processes, from their ``adaptive [json]`` lines). Limits are
    per process, as every throttle's are (docs/delivery.md)."""

    def __init__(self) -> None:
        self._by_process: dict[str, tuple[LimitFigures, ...]] = {}

    def set(self, process: str, figures: Iterable[LimitFigures]) -> None:
        self._by_process[process] = tuple(figures)[:MAX_LIMIT_FIGURES]

    def update_child(self, index: int, rows: object) -> bool:
        """Child ``index``'s figures (parsed JSON); malformed rows are skipped. False if the
        line is no list."""
        if not isinstance(rows, list):
            return False
        figures = [LimitFigures.from_json(row) for row in rows[:MAX_LIMIT_FIGURES]]
        self.set(f"d{index}", (f for f in figures if f is not None))
        return True

    def own(self) -> list[dict[str, Any]]:
        """This process's figures as JSON-ready dicts (what a delivery process sends)."""
        return [f.as_json() for f in self._by_process.get("main", ())]

    def retire(self, index: int) -> None:
        """Child ``index`` ended: its limits went with it (a new run starts at the ceiling)."""
        self._by_process.pop(f"d{index}", None)

    def all(self) -> list[tuple[str, LimitFigures]]:
        """(process, figures) of every adaptive key, the cut ones first."""
        rows = [(p, f) for p, figures in sorted(self._by_process.items()) for f in figures]
        rows.sort(key=lambda row: (not row[1].cut, row[1].destination, row[0]))
        return rows

    def cut_for_domain(self, domain: str) -> list[tuple[str, LimitFigures]]:
        """The cut limits that recipient domain ``domain`` was seen under."""
        return [(p, f) for p, f in self.all() if f.cut and domain in f.domains]

    def collect(self) -> Iterator[Metric]:
        rate = GaugeMetricFamily(
            "smartrelay_throttle_rate_limit",
            "Adaptive throttles: the messages per second allowed now, by destination and process.",
            labels=["destination", "process"],
        )
        connections = GaugeMetricFamily(
            "smartrelay_throttle_connection_limit",
            "Adaptive throttles: the connections allowed now, by destination and process.",
            labels=["destination", "process"],
        )
        for process, figures in self.all():
            rate.add_metric([figures.destination, process], figures.rate)
            connections.add_metric([figures.destination, process], figures.connections)
        yield rate
        yield connections
