"""``/metrics`` of a real relay (``twistd -n smartrelay``) against its events table.

Mail goes in with smtplib; the next hop (a scripted peer) accepts some recipients, refuses
some with 550 and defers the rest with 451. The counters must then match what the events
table holds (received, delivered, bounced by category, deferred), the latency histogram's
count the delivered, the queue gauges the queue. With ``[delivery] processes = 1`` the child
counts and sends its figures to the main process: killed with SIGKILL and started again, it
takes nothing away from the totals.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import urllib.request
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import children_of
from tests.support.relay import HOST, free_ports
from tests.support.run import Twistd, query, write_config
from tests.support.smtp_peer import scripted_peer
from tests.support.traffic import wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def script(address: str, attempt: int) -> tuple[int, str] | None:
    if address.startswith("bad"):
        return (550, f"5.1.1 <{address}>: user unknown")
    if address.startswith("full"):
        return (552, "5.2.2 mailbox full")
    if address.startswith("later"):
        return (451, "4.3.0 try again later")
    return None


def config_for(
    tmp_path: Path, database_url: str, peer: int, processes: int
) -> tuple[Path, int, int]:
    smtp_port, web_port = free_ports(2)
    var = tmp_path / "var"
    path = write_config(
        tmp_path,
        database_url,
        f'[server]\nhostname = "relay.test"\ndata_dir = {json.dumps(str(var))}\n'
        f'[smtp]\nlisten = ["tcp:{smtp_port}:interface={HOST}"]\n'
        f'[inbound]\nlisten = ["tcp:0:interface={HOST}"]\n'
        f"[rewrap]\nsecret_file = {json.dumps(str(var / 'secret.key'))}\n"
        f'[web]\nlisten = "tcp:{web_port}:interface={HOST}"\n'
        f"[delivery]\nprocesses = {processes}\n"
        # One attempt each in the test's time: a deferred recipient waits an hour.
        'retry_schedule = ["1h"]\n'
        "[delivery.routes]\n"
        f'"*" = "smtp://{HOST}:{peer}"\n',
    )
    return path, smtp_port, web_port


def send(port: int, recipients: list[str]) -> None:
    message = EmailMessage()
    message["From"] = "app@sender.test"
    message["To"] = ", ".join(recipients)
    message["Subject"] = "metrics"
    message.set_content("Hello.\n")
    with smtplib.SMTP(HOST, port, timeout=30) as client:
        client.send_message(message, "app@sender.test", recipients)


def scrape(web_port: int) -> Samples:
    with urllib.request.urlopen(f"http://{HOST}:{web_port}/metrics", timeout=30) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def from_events(url: str) -> Samples:
    """What the counters should say, from the events table (and the queue, from recipients)."""
    expected: Samples = {}
    counts = dict(query(url, "SELECT type, COUNT(*) FROM events GROUP BY type"))
    expected["smartrelay_recipients_received_total", (("listener", "smtp"),)] = counts.get(
        "received", 0
    )
    for kind in ("delivered", "deferred"):
        expected[f"smartrelay_recipients_{kind}_total", ()] = counts.get(kind, 0)
    expected["smartrelay_delivery_latency_seconds_count", ()] = counts.get("delivered", 0)
    bounces: Counter[tuple[str, str]] = Counter()
    for (data,) in query(url, "SELECT data FROM events WHERE type = 'bounced'"):
        fields = json.loads(data)
        bounces[fields["category"], "true" if fields["hard"] else "false"] += 1
    for (category, hard), n in bounces.items():
        labels = (("category", category), ("hard", hard), ("source", "smtp"))
        expected["smartrelay_recipients_bounced_total", labels] = n
    rows = query(
        url,
        "SELECT domain, COUNT(*) FROM recipients WHERE next_attempt_at IS NOT NULL GROUP BY domain",
    )
    for domain, n in rows:
        expected["smartrelay_queue_recipients", (("destination", str(domain)),)] = n
    return expected


def matching(web_port: int, url: str) -> Samples | None:
    """The scrape, once every expected figure is in it (children report every 2 s)."""
    found = scrape(web_port)
    expected = from_events(url)
    if all(found.get(key) == value for key, value in expected.items()):
        return found
    return None


def wait_for_outcomes(url: str, delivered: int, bounced: int, deferred: int) -> None:
    def done() -> bool | None:
        counts = dict(query(url, "SELECT type, COUNT(*) FROM events GROUP BY type"))
        got = (counts.get("delivered", 0), counts.get("bounced", 0), counts.get("deferred", 0))
        return True if got == (delivered, bounced, deferred) else None

    wait_until(done, f"{delivered} delivered, {bounced} bounced, {deferred} deferred", 90)


BATCHES = [
    ["ok1@a.test", "bad1@b.test", "later1@c.test"],
    ["ok2@a.test", "ok3@a.test", "full1@b.test"],
    ["later2@c.test", "bad2@b.test"],
    ["ok4@d.test"],
]


@pytest.mark.parametrize(
    ("database_url", "processes"),
    [("sqlite", 0), ("sqlite", 1), ("postgresql", 1)],  # the engines' side is in test_metrics_store
    indirect=["database_url"],
)
def test_the_counters_match_the_events_table(
    tmp_path: Path, database_url: str, processes: int
) -> None:
    with scripted_peer(script) as (peer_port, _log):
        path, smtp_port, web_port = config_for(tmp_path, database_url, peer_port, processes)
        relay = Twistd(path, tmp_path)
        try:
            relay.wait_for("web: listening on", timeout=60)
            relay.wait_for("smtp: listening on", timeout=60)
            if processes:
                relay.wait_for("delivery[0] delivery: node", timeout=60)
            with smtplib.SMTP(HOST, smtp_port, timeout=30) as idle:
                idle.ehlo()
                open_now = scrape(web_port)
                assert open_now["smartrelay_smtp_sessions_open", (("listener", "smtp"),)] == 1
            for recipients in BATCHES:
                send(smtp_port, recipients)
            wait_for_outcomes(database_url, delivered=4, bounced=3, deferred=2)
            found = wait_until(
                lambda: matching(web_port, database_url), "the counters to match", 60
            )
            assert found["smartrelay_messages_received_total", (("listener", "smtp"),)] == 4
            assert found["smartrelay_recipients_received_total", (("listener", "smtp"),)] == 9
            assert found["smartrelay_recipients_delivered_total", ()] == 4
            assert found["smartrelay_recipients_deferred_total", ()] == 2
            assert found["smartrelay_queue_recipients", (("destination", "c.test"),)] == 2
            assert found["smartrelay_queue_oldest_age_seconds", (("destination", "c.test"),)] < 600
            assert found["smartrelay_delivery_latency_seconds_count", ()] == 4
            assert found["smartrelay_smtp_sessions_open", (("listener", "smtp"),)] == 0
            categories = {
                labels: value
                for (name, labels), value in found.items()
                if name == "smartrelay_recipients_bounced_total"
            }
            assert sum(categories.values()) == 3
            if processes:
                # The child did the delivering: the main process's figures are the child's.
                [child] = children_of(relay.process.pid)
                os.kill(child, signal.SIGKILL)
                relay.wait_for("starting it again", timeout=30)
                relay.wait_for("delivery: 1 delivery process(es) started", timeout=5)
                wait_until(
                    lambda: True if children_of(relay.process.pid) - {child} else None,
                    "the child started again",
                    30,
                )
                after = scrape(web_port)
                for key, value in found.items():
                    if key[0].endswith(("_total", "_count", "_bucket")):
                        assert after.get(key, 0) >= value, key
                # The new child's counts add to the dead one's.
                send(smtp_port, ["ok5@a.test", "bad3@b.test"])
                wait_for_outcomes(database_url, delivered=5, bounced=4, deferred=2)
                found = wait_until(
                    lambda: matching(web_port, database_url), "the counters after", 60
                )
                assert found["smartrelay_recipients_delivered_total", ()] == 5
                assert found["smartrelay_delivery_latency_seconds_count", ()] == 5
            assert relay.stop(signal.SIGTERM, timeout=60) in (0, -signal.SIGTERM)
            assert "Traceback" not in relay.output
            assert "malformed metrics line" not in relay.output
        finally:
            relay.kill()
