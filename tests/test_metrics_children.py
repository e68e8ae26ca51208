"""The delivery processes' figures in the main process (smartrelay/metrics.py ChildCounts):
added to its own at scrape time, kept when a child ends, malformed input ignored."""

from __future__ import annotations

import json
from typing import cast

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from smartrelay.delivery.processes import (
    METRICS_PREFIX,
    DeliveryProcesses,
    _Child,
    metrics_line,
)
from smartrelay.metrics import RelayMetrics
from smartrelay.reactor import IRelayReactor


def child_rows(delivered: int, latencies: list[float], bounced: int = 0) -> object:
    """What a child with these counts sends (through the real line format)."""
    child = RelayMetrics()
    child.delivered.inc(delivered)
    for seconds in latencies:
        child.delivery_latency.observe(seconds)
    if bounced:
        child.bounced.labels(category="invalid-recipient", hard="true", source="smtp").inc(bounced)
    line = metrics_line(child)
    assert line.startswith(METRICS_PREFIX) and line.endswith("\n") and line.count("\n") == 1
    return json.loads(line[len(METRICS_PREFIX) :])


def test_children_add_to_the_main_process_and_survive_a_restart() -> None:
    main = RelayMetrics()
    families = main.families()
    main.delivered.inc(1)
    value = main.registry.get_sample_value
    assert main.children.update(0, child_rows(3, [0.1, 2.0, 2.0]), families)
    assert main.children.update(1, child_rows(2, [0.1, 0.1], bounced=4), families)
    assert value("smartrelay_recipients_delivered_total") == 6
    assert value("smartrelay_delivery_latency_seconds_count") == 5
    assert value("smartrelay_delivery_latency_seconds_bucket", {"le": "0.1"}) == 3
    assert value("smartrelay_delivery_latency_seconds_sum") == 4.3
    labels = {"category": "invalid-recipient", "hard": "true", "source": "smtp"}
    assert value("smartrelay_recipients_bounced_total", labels) == 4
    # Child 0 dies (its last figures stay); its next run counts from 0 on top of them.
    main.children.retire(0)
    assert value("smartrelay_recipients_delivered_total") == 6
    assert main.children.update(0, child_rows(1, [1.0]), families)
    assert value("smartrelay_recipients_delivered_total") == 7
    assert value("smartrelay_delivery_latency_seconds_count") == 6
    # A snapshot that goes back (it cannot: counters only grow) takes nothing away.
    assert main.children.update(1, child_rows(0, []), families)
    assert value("smartrelay_recipients_delivered_total") == 7
    # The whole exposition parses, each family once.
    text = generate_latest(main.registry).decode()
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert "smartrelay_recipients_delivered" in names


def test_malformed_snapshots_change_nothing() -> None:
    main = RelayMetrics()
    families = main.families()
    value = main.registry.get_sample_value
    assert not main.children.update(0, {"not": "a list"}, families)
    assert main.children.update(
        0,
        [
            ["smartrelay_recipients_delivered", "smartrelay_recipients_delivered_total", {}, -5],
            ["smartrelay_recipients_delivered", "smartrelay_other_total", {}, 5],
            ["unknown_family", "unknown_family_total", {}, 5],
            ["smartrelay_smtp_sessions_open", "smartrelay_smtp_sessions_open", {}, 5],
            ["smartrelay_recipients_expired", "smartrelay_recipients_expired_total", {}, True],
            ["smartrelay_recipients_expired", "smartrelay_recipients_expired_total", [], 1],
            ["smartrelay_recipients_expired", "smartrelay_recipients_expired_total", {"a": 1}, 1],
            ["smartrelay_recipients_deferred", "smartrelay_recipients_deferred_total", {}, 1e400],
            "text",
            [1, 2, 3],
        ],
        families,
    )
    assert value("smartrelay_recipients_delivered_total") == 0
    assert value("smartrelay_recipients_expired_total") == 0
    assert value("smartrelay_recipients_deferred_total") == 0
    assert value("unknown_family_total") is None


def test_the_main_process_reads_metrics_lines_and_keeps_them_when_a_child_ends() -> None:
    main = RelayMetrics()
    owner = DeliveryProcesses(
        cast(IRelayReactor, MemoryReactorClock()), 1, lambda i: ["true"], lambda: Deferred(), main
    )
    child = _Child(owner, 0)
    first = metrics_line(_child_with(delivered=2)).encode()
    # A line may come in pieces; a log line between is logged, not taken as metrics.
    child.childDataReceived(1, first[:10])
    child.childDataReceived(1, first[10:] + b"info a log line\n")
    assert main.registry.get_sample_value("smartrelay_recipients_delivered_total") == 2
    # Killed while writing its next line: that fragment is dropped, what it sent stays.
    with capturedLogs() as logged:
        child.childDataReceived(1, metrics_line(_child_with(delivered=5)).encode()[:-20])
        child.processEnded(Failure(ProcessTerminated(signal=9)))  # type: ignore[no-untyped-call]
    assert main.registry.get_sample_value("smartrelay_recipients_delivered_total") == 2
    assert not [e for e in logged if "malformed" in str(e.get("log_format"))]
    # The next run counts on top.
    again = _Child(owner, 0)
    again.childDataReceived(1, metrics_line(_child_with(delivered=1)).encode())
    assert main.registry.get_sample_value("smartrelay_recipients_delivered_total") == 3


def _child_with(delivered: int) -> RelayMetrics:
    child = RelayMetrics()
    child.delivered.inc(delivered)
    return child
