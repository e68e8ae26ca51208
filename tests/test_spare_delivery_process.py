"""``[delivery] spare_processes``: a delivery process that claims work only while the listener
hears no client, run as users run the relay (``twistd -n smartrelay``, one delivery process and
one spare, Postfix's ``smtp-sink`` as the next hop, answering each DATA after a second so that
a backlog lasts).

While an SMTP client is sending, the spare delivers nothing; once the clients have gone,
it takes a share of the backlog; every message arrives once either way.
"""

from __future__ import annotations

import re
import smtplib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import started_postfix_sink
from tests.support.postfix import PostfixSink
from tests.support.relay import HOST, free_ports
from tests.support.run import Twistd, write_relay_config
from tests.support.traffic import complete_dumps, states, submit_all, wait_until

#: Well over the first process's claim window (100, refilled by 50 a second here: 50
#: connections, a second a message): what it has not claimed when the clients have gone is
#: left for the spare, even if they took two seconds to send.
MESSAGES = 250
SESSIONS = 5
DELIVERED = re.compile(r"delivery\[(\d)\] (\S+): to=<r\S*> dest=\S+ delivered reply='250 ")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite: what is tested is the processes' coordination, the same on both engines."""
    return f"sqlite:{tmp_path / 'smartrelay.db'}"


@pytest.fixture
def slow_sink() -> Iterator[PostfixSink]:
    with started_postfix_sink(["-w", "1"]) as sink:
        yield sink


def delivered_by(output: str) -> list[tuple[int, str, int]]:
    """(process index, queue id, line number) of every delivered line."""
    return [
        (int(match[1]), match[2], number)
        for number, line in enumerate(output.splitlines())
        if (match := DELIVERED.search(line))
    ]


def test_the_spare_delivers_only_while_no_client_is_sending(
    tmp_path: Path, database_url: str, slow_sink: PostfixSink
) -> None:
    [smtp_port] = free_ports(1)
    config = write_relay_config(
        tmp_path,
        database_url,
        extra=(
            "[delivery]\nprocesses = 1\nspare_processes = 1\n"
            '[delivery.routes]\n"*" = "smtp://' + f'{HOST}:{slow_sink.port}"\n'
            '[[delivery.throttle]]\nmatch = "*"\nmax_connections = 100\nmax_rate = "10000/s"\n'
        ),
        smtp_listen=f"tcp:{smtp_port}:interface={HOST}",
    )
    relay = Twistd(config, tmp_path)
    try:
        relay.wait_for("smtp: listening on")
        relay.wait_for("2 delivery process(es) started")
        relay.wait_for("1 of the delivery processes spare (delivery[1] on)")
        relay.wait_for("delivery[0] delivery: node")
        spare_line = relay.wait_for("delivery[1] delivery: node")
        assert "a spare: it claims work while no SMTP client is sending" in spare_line

        # A client keeps sending (a NOOP every 50 ms) the whole time: the spare claims
        # nothing.
        done = threading.Event()

        def keep_sending() -> None:
            with smtplib.SMTP(HOST, smtp_port, local_hostname="busy.test", timeout=60) as busy:
                while not done.wait(0.05):
                    busy.noop()

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            first = submit_all(smtp_port, MESSAGES, SESSIONS)
            assert len(first) == MESSAGES
            wait_until(
                lambda: True if states(database_url)["delivered"] == MESSAGES else None,
                "the first batch delivered",
                timeout=60,
            )
        finally:
            done.set()
            sender.join()
        # A child's lines reach the main log a moment after its commits.
        lines = wait_until(
            lambda: found if len(found := delivered_by(relay.output)) == MESSAGES else None,
            "the first batch's lines in the log",
            timeout=30,
        )
        assert {index for index, _, _ in lines} == {0}

        # The clients go: the spare takes its share of what is left.
        second = submit_all(smtp_port, MESSAGES, SESSIONS)
        assert len(second) == MESSAGES
        wait_until(
            lambda: True if states(database_url)["delivered"] == 2 * MESSAGES else None,
            "the second batch delivered",
            timeout=60,
        )
        output = wait_until(
            lambda: text if len(delivered_by(text := relay.output)) == 2 * MESSAGES else None,
            "the second batch's lines in the log",
            timeout=30,
        )
    finally:
        relay.kill()

    last_accepted = max(
        number for number, line in enumerate(output.splitlines()) if ": accepted from=" in line
    )
    by_spare = [(queue_id, number) for index, queue_id, number in delivered_by(output) if index]
    assert by_spare, "the spare delivered nothing once the listener was quiet"
    assert all(queue_id in second for queue_id, _ in by_spare)
    assert all(number > last_accepted for _, number in by_spare)
    seen = complete_dumps(slow_sink)
    assert set(seen) == set(first) | set(second)
    assert set(seen.values()) == {1}, "a message reached the sink twice"
    assert "Traceback" not in output
