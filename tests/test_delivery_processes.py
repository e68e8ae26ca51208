"""``[delivery] processes = 2``: the listener in the main process, delivery in two children.

The relay runs as users run it (``twistd -n smartrelay``), delivering to Postfix's
``smtp-sink``. Every accepted message must reach the sink exactly once (the children claim
from one database, never the same recipient), the children's log lines show up in the main
log, a child that dies is started again, and the children go when the main process goes:
on SIGTERM (waited for) and on SIGKILL (their wake-up pipe closes).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.support.postfix import PostfixSink
from tests.support.processes import (
    children_of,
    kill_and_see_the_children_leave,
    kill_one_child,
    see_it_started_again,
    stop_and_see_the_children_leave,
)
from tests.support.relay import HOST, free_ports
from tests.support.run import Twistd, query, write_relay_config
from tests.support.traffic import complete_dumps, states, submit_all, wait_until

MESSAGES = 120
SESSIONS = 4
#: twistd's line: a local timestamp, [system], the text.
CLASSIC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] ")
STARTED = re.compile(r"delivery\[(\d)\] .*delivery: node (\S+) started")


def config_for(tmp_path: Path, database_url: str, sink: PostfixSink, port: int) -> Path:
    return write_relay_config(
        tmp_path,
        database_url,
        extra=(
            "[delivery]\n"
            "processes = 2\n"
            'retry_schedule = ["1s"]\n'
            "[delivery.routes]\n"
            f'"*" = "smtp://{HOST}:{sink.port}"\n'
        ),
        smtp_listen=f"tcp:{port}:interface={HOST}",
    )


def test_two_delivery_processes_deliver_everything_once(
    tmp_path: Path, database_url: str, postfix_sink: PostfixSink
) -> None:
    [smtp_port] = free_ports(1)
    relay = Twistd(config_for(tmp_path, database_url, postfix_sink, smtp_port), tmp_path)
    try:
        relay.wait_for("smtp: listening on")
        relay.wait_for("2 delivery process(es) started")
        nodes = {}
        for index in (0, 1):
            line = relay.wait_for(f"delivery[{index}] delivery: node")
            match = STARTED.search(line)
            assert match is not None, line
            nodes[int(match[1])] = match[2]
        assert nodes[0].endswith("-d0") and nodes[1].endswith("-d1")
        children = children_of(relay.process.pid)
        assert len(children) == 2, children
        # They run at a lower priority than the listener ([delivery] nice, 10 by default),
        # every thread of them.
        listener_nice = os.getpriority(os.PRIO_PROCESS, relay.process.pid)
        for child in children:
            threads = [int(t) for t in os.listdir(f"/proc/{child}/task")]
            assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {
                min(19, listener_nice + 10)
            }, child

        accepted = submit_all(smtp_port, MESSAGES, SESSIONS)
        assert len(accepted) == MESSAGES
        wait_until(
            lambda: True if states(database_url)["delivered"] == MESSAGES else None,
            "every recipient delivered",
            timeout=60,
        )
        stop_and_see_the_children_leave(relay)
    finally:
        relay.kill()

    seen = complete_dumps(postfix_sink)
    assert set(seen) == set(accepted)
    assert set(seen.values()) == {1}, "a message reached the sink twice"
    rows = query(
        database_url,
        "SELECT queue_id, COUNT(*) FROM events WHERE type = 'delivered' GROUP BY queue_id",
    )
    assert sorted(str(q) for q, _ in rows) == sorted(accepted)
    assert {int(c) for _, c in rows} == {1}
    # The children did the delivering, and their lines are in the main log.
    output = relay.output
    delivered_lines = [line for line in output.splitlines() if "to=<r" in line]
    assert len(delivered_lines) == MESSAGES
    assert all(re.search(r"delivery\[[01]\] ", line) for line in delivered_lines)
    assert "Traceback" not in output
    for index in (0, 1):  # each child froze its start-up objects (gc_freeze.py)
        assert f"delivery[{index}] start-up objects frozen for the garbage collector" in output
    # One line per state change, as one process would write it: each message's acceptance
    # (main process) and its delivery (formatted by the child that delivered it, with its
    # own timestamp and logger, written by the main process as it came).
    for queue_id in accepted:
        mine = [line for line in output.splitlines() if f" {queue_id}: " in line]
        assert len(mine) == 2, mine
        assert CLASSIC.match(mine[0]), mine[0]
        assert f"[smartrelay.smtp.backends#info] {queue_id}: accepted from=" in mine[0]
        assert CLASSIC.match(mine[1]), mine[1]
        assert re.search(
            rf"\[smartrelay\.delivery\.manager#info\] delivery\[[01]\] {queue_id}: to=<r\S*>"
            rf" dest=\S+ delivered reply='250 ",
            mine[1],
        ), mine[1]
    assert all(CLASSIC.match(line) for line in output.splitlines() if line), [
        line for line in output.splitlines() if line and not CLASSIC.match(line)
    ]


def test_a_dead_child_is_restarted_and_children_leave_with_the_main_process(
    tmp_path: Path, database_url: str, postfix_sink: PostfixSink
) -> None:
    [smtp_port] = free_ports(1)
    relay = Twistd(config_for(tmp_path, database_url, postfix_sink, smtp_port), tmp_path)
    try:
        relay.wait_for("2 delivery process(es) started")
        relay.wait_for("delivery[1] delivery: node")
        victim = kill_one_child(relay, 2)
        see_it_started_again(relay, victim, 2, timeout=15)
        # The restarted child works: mail still gets delivered.
        accepted = submit_all(smtp_port, 10, 2)
        wait_until(
            lambda: True if states(database_url)["delivered"] == len(accepted) else None,
            "delivery after the restart",
            timeout=30,
        )
        kill_and_see_the_children_leave(relay)
    finally:
        relay.kill()  # any child left then stops by itself: its wake-up pipe closes
    assert set(complete_dumps(postfix_sink)) == set(accepted)
