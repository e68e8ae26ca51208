"""The relay's Prometheus metrics (docs/metrics.md): one :class:`RelayMetrics` per process,
on its own registry (never the ``prometheus_client`` global one), passed to whatever counts.

Counters and the latency histogram count what this process (and, in the main process, its
delivery processes) did since it started; Prometheus handles their reset at a restart. Gauges
of shared state (queue depth, webhook backlog, feedback reports, held credentials) are read from
the database when ``/metrics`` is scraped, so every node shows the same figures for them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["LATENCY_BUCKETS", "RelayMetrics"]

#: Seconds from acceptance to delivery: from a local sink's milliseconds to a day of retries.
LATENCY_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
    86400.0,
)  # fmt: skip


class RelayMetrics:
    """Every metric the relay's code updates. Names and labels are the contract of
    docs/metrics.md; ``registry`` is what ``/metrics`` exposes."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # SMTP
        self.messages_received = Counter(
            "smartrelay_messages_received",
            "Messages accepted (250 after DATA), by listener.",
            ["listener"],
            registry=registry,
        )
        self.recipients_received = Counter(
            "smartrelay_recipients_received",
            "Recipients of accepted messages.",
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
