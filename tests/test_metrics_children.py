"""The delivery processes' figures in the main process (smartrelay/metrics.py ChildCounts):
added to its own at scrape time, kept when a child ends, malformed input ignored."""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from smartrelay.delivery.processes import METRICS_PREFIX, metrics_line
from smartrelay.metrics import RelayMetrics


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
