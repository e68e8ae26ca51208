"""kill -9 while delivering: no accepted message is lost.

The relay runs as users run it, ``twistd -n smartrelay --config CFG``, and delivers to Postfix's
``smtp-sink``, which holds its answer to the final dot for a second (``-W .:1``) so that many
deliveries are on the wire at any moment. 200 messages are submitted, the relay is killed with
SIGKILL while it delivers them, and started again on the same config. Every accepted message
must then reach the sink at least once. Duplicates are allowed (a message the sink took whose
``250`` never reached the relay is sent again) and counted.

The restarted relay has the same node id (host name plus a hash of data_dir), so it takes back
its own claims at start-up instead of waiting for their 15-minute lease to run out. Nothing in
the database is changed by hand.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import started_postfix_sink
from tests.support.postfix import PostfixSink
from tests.support.relay import HOST, free_ports
from tests.support.run import Twistd, query, write_relay_config
from tests.support.traffic import complete_dumps, states, submit_all, wait_until

MESSAGES = 200
SESSIONS = 4
CONNECTIONS = 40
TAKING_BACK = re.compile(r"taking back (\d+) recipient")


@pytest.fixture
def slow_sink() -> Iterator[PostfixSink]:
    """smtp-sink answering every final dot one second late."""
    with started_postfix_sink(["-W", ".:1"]) as sink:
        yield sink


def test_kill_9_while_delivering_loses_nothing(
    tmp_path: Path, database_url: str, slow_sink: PostfixSink
) -> None:
    [smtp_port] = free_ports(1)
    config = write_relay_config(
        tmp_path,
        database_url,
        extra=(
            "[delivery]\n"
            'retry_schedule = ["1s"]\n'
            "[delivery.routes]\n"
            f'"*" = "smtp://{HOST}:{slow_sink.port}"\n'
            "[[delivery.throttle]]\n"
            'match = "*"\n'
            f"max_connections = {CONNECTIONS}\n"
            'max_rate = "100000/s"\n'
        ),
        smtp_listen=f"tcp:{smtp_port}:interface={HOST}",
    )

    first = Twistd(config, tmp_path)
    try:
        first.wait_for("smtp: listening on")
        first.wait_for("delivery: node")
        accepted = submit_all(smtp_port, MESSAGES, SESSIONS)
        assert len(accepted) == MESSAGES
        # Mid-delivery: some messages delivered (outcome committed), more on the wire, the
        # rest claimed and waiting for a connection.
        wait_until(
            lambda: True if states(database_url)["delivered"] >= CONNECTIONS else None,
            f"{CONNECTIONS} messages delivered",
            timeout=30,
        )
        first.process.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        first.kill()

    after_kill = states(database_url)
    delivered_before = after_kill["delivered"]
    in_flight = after_kill["delivering"]
    assert CONNECTIONS <= delivered_before < MESSAGES, after_kill
    assert in_flight > 0, f"nothing was being delivered at the kill: {after_kill}"
    assert sum(after_kill.values()) == MESSAGES, after_kill
    at_sink_before_restart = sum(complete_dumps(slow_sink).values())

    second = Twistd(config, tmp_path)
    try:
        started = second.wait_for("delivery: node")
        taken_back = TAKING_BACK.search(started)
        assert taken_back is not None, started
        assert int(taken_back[1]) == in_flight, started
        restart = time.monotonic()
        wait_until(
            lambda: True if states(database_url)["delivered"] == MESSAGES else None,
            "every recipient delivered after the restart",
            timeout=60,
        )
        took = time.monotonic() - restart
    finally:
        second.kill()

    # At least once: every accepted message reached the sink whole.
    seen = complete_dumps(slow_sink)
    missing = sorted(set(accepted) - set(seen))
    assert not missing, f"{len(missing)} accepted message(s) never reached the sink: {missing}"
    assert set(seen) == set(accepted), "the sink got messages nobody sent"
    duplicates = sum(seen.values()) - len(seen)
    # Exactly one delivered event per recipient, whatever reached the sink twice.
    rows = query(
        database_url,
        "SELECT queue_id, COUNT(*) FROM events WHERE type = 'delivered' GROUP BY queue_id",
    )
    assert sorted(str(q) for q, _ in rows) == sorted(accepted)
    assert {int(c) for _, c in rows} == {1}
    # Only messages on the wire at the kill (one per connection at most) may come twice.
    assert duplicates <= CONNECTIONS
    print(
        f"\n[{database_url.partition(':')[0]}] {MESSAGES} accepted; at the kill: "
        f"{delivered_before} delivered, {in_flight} delivering, {at_sink_before_restart} at the"
        f" sink (written out); after the restart everything delivered in {took:.1f} s;"
        f" {duplicates} duplicate(s) at the sink"
    )
