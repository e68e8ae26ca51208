"""``[smtp] processes = N``: accepting processes sharing the submission listener's sockets.

The relay runs as users run it (``twistd -n smartrelay``), delivering to Postfix's
``smtp-sink``: the main process binds the port and accepts nothing; the children accept, store
and (SQLite) tell the main process to wake its delivery; every accepted message is delivered
once; a child that dies is started again while the other keeps accepting; the children leave
with the main process. The pieces (limits shared, the children's lines, the held set an
accepting process reads) are tested on their own below.
"""

from __future__ import annotations

import json
import re
import smtplib
import time
from pathlib import Path
from typing import cast

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock

from smartrelay.config import ConfigError
from smartrelay.config.model import SmtpConfig
from smartrelay.events import AlertEvent
from smartrelay.passwords import hash_password
from smartrelay.reactor import IRelayReactor
from smartrelay.smtp.processes import (
    FIRST_FD,
    QUEUED,
    ListenerProcesses,
    share_of_connections,
    volume_line,
)
from smartrelay.smtp.volume_watch import HELD_REPLY, HeldCredentials
from smartrelay.storage.store import Store
from tests.conftest import real_reactor
from tests.support.postfix import PostfixSink
from tests.support.processes import (
    children_of,
    kill_and_see_the_children_leave,
    kill_one_child,
    see_it_started_again,
    stop_and_see_the_children_leave,
)
from tests.support.relay import HOST, free_ports
from tests.support.run import Twistd, write_config, write_relay_config
from tests.support.traffic import complete_dumps, states, submit_all, wait_until

MESSAGES = 60
SESSIONS = 6
ACCEPTED = re.compile(r"\] (smtp\[[01]\] )?(\w+): accepted from=")


def config_for(
    tmp_path: Path, database_url: str, sink: PostfixSink, port: int, delivery_processes: int
) -> Path:
    return write_relay_config(
        tmp_path,
        database_url,
        extra=(
            "[delivery]\n"
            f"processes = {delivery_processes}\n"
            'retry_schedule = ["1s"]\n'
            "[delivery.routes]\n"
            f'"*" = "smtp://{HOST}:{sink.port}"\n'
        ),
        smtp_listen=f"tcp:{port}:interface={HOST}",
    )


def with_smtp_processes(config: Path, count: int) -> Path:
    text = config.read_text().replace("[smtp]\n", f"[smtp]\nprocesses = {count}\n", 1)
    config.write_text(text)
    return config


@pytest.mark.parametrize(
    ("engine", "delivery_processes"),
    [("sqlite", 0), ("postgresql", 1)],
    ids=["sqlite-in-process-delivery", "postgresql-delivery-process"],
)
def test_two_accepting_processes_take_the_mail_and_everything_is_delivered_once(
    tmp_path: Path,
    postfix_sink: PostfixSink,
    request: pytest.FixtureRequest,
    engine: str,
    delivery_processes: int,
) -> None:
    """On SQLite with the delivery in the main process, the children's ``queued`` lines are
    what wakes it: each burst must be delivered well before its 5 s poll would. A client
    that connects as soon as the main process listens (the children may not be up yet)
    waits in the backlog and is served by a child: the main process accepts nothing."""
    database_url = f"sqlite:{tmp_path / 'relay.db'}"
    if engine == "postgresql":
        server = request.getfixturevalue("postgres_server")
        database_url = server.create_database()
        request.addfinalizer(lambda: server.drop_database(database_url))
    [smtp_port] = free_ports(1)
    config = with_smtp_processes(
        config_for(tmp_path, database_url, postfix_sink, smtp_port, delivery_processes), 2
    )
    relay = Twistd(config, tmp_path)
    try:
        relay.wait_for("(accepted by the accepting processes)")
        with smtplib.SMTP(HOST, smtp_port, local_hostname="client.test", timeout=30) as client:
            client.sendmail("app@example.com", ["early@example.net"], b"Subject: x\r\n\r\nx\r\n")
        relay.wait_for("smtp: 2 accepting process(es) started")
        relay.wait_for("smtp[0] smtp: listening on")
        relay.wait_for("smtp[1] smtp: listening on")
        children = children_of(relay.process.pid)
        assert len(children) == 2 + delivery_processes, children

        accepted: dict[str, int] = {}
        for _ in range(2):  # in bursts: each waits for its delivery, well within the poll
            started = time.monotonic()
            burst = submit_all(smtp_port, MESSAGES // 2, SESSIONS)
            accepted.update(burst)
            wait_until(
                lambda: True if states(database_url)["delivered"] == len(accepted) + 1 else None,
                "every recipient delivered",
                timeout=60,
            )
            if engine == "sqlite":
                assert time.monotonic() - started < 4.5, "the delivery waited for its poll"
        assert len(accepted) == MESSAGES
        stop_and_see_the_children_leave(relay)
    finally:
        relay.kill()

    seen = complete_dumps(postfix_sink)
    assert set(seen) == set(accepted)  # (the early message has no numbered trailer)
    assert set(seen.values()) == {1}, "a message reached the sink twice"
    output = relay.output
    takers = {}
    for line in output.splitlines():
        match = ACCEPTED.search(line)
        if match:
            takers[match[2]] = match[1]
    assert set(accepted) < set(takers) and len(takers) == MESSAGES + 1
    # The main process accepted nothing: every message was taken by a child.
    assert None not in takers.values(), [q for q, who in takers.items() if who is None]
    assert "Traceback" not in output
    assert "starting it again" not in output  # a clean stop restarts nothing


def test_a_dead_accepting_process_is_restarted_while_the_other_accepts(
    tmp_path: Path, postfix_sink: PostfixSink
) -> None:
    [smtp_port] = free_ports(1)
    url = f"sqlite:{tmp_path / 'relay.db'}"
    config = with_smtp_processes(config_for(tmp_path, url, postfix_sink, smtp_port, 0), 2)
    relay = Twistd(config, tmp_path)
    try:
        relay.wait_for("smtp[0] smtp: listening on")
        relay.wait_for("smtp[1] smtp: listening on")
        victim = kill_one_child(relay, 2)
        # While it is down (1 s before its restart), the other one takes every connection.
        accepted = submit_all(smtp_port, 10, 2)
        assert len(accepted) == 10
        see_it_started_again(relay, victim, 2, timeout=20)
        accepted.update(submit_all(smtp_port, 10, 2))
        wait_until(
            lambda: True if states(url)["delivered"] == len(accepted) else None,
            "delivery of what both took",
            timeout=30,
        )
        kill_and_see_the_children_leave(relay)
    finally:
        relay.kill()
    assert set(complete_dumps(postfix_sink)) == set(accepted)


# -- the pieces ------------------------------------------------------------------------------
def test_the_connection_limit_is_shared_and_the_per_client_one_is_each_processs() -> None:
    smtp = SmtpConfig(max_connections=200, max_connections_per_client=50, processes=3)
    shares = [share_of_connections(smtp, i) for i in range(3)]
    assert [s.max_connections for s in shares] == [67, 67, 66]
    assert {s.max_connections_per_client for s in shares} == {50}
    tiny = SmtpConfig(max_connections=1, processes=2)
    assert [share_of_connections(tiny, i).max_connections for i in (0, 1)] == [1, 1]
    one = SmtpConfig(max_connections=7, processes=1)
    assert share_of_connections(one, 0) is one


def test_smtp_processes_in_the_config(tmp_path: Path) -> None:
    from smartrelay.config import load_config

    def smtp_with(value: str) -> SmtpConfig:
        path = write_config(tmp_path, "sqlite::memory:", f"[smtp]\nprocesses = {value}\n")
        return load_config(str(path)).smtp

    assert SmtpConfig().processes == 0
    assert smtp_with("3").processes == 3
    for bad, said in (("65", "from 0 to 64"), ("-1", "from 0 to 64"), ('"auto"', "integer")):
        with pytest.raises(ConfigError, match=said):
            smtp_with(bad)


def _owner(
    queued: list[int], volumes: list[str], sockets: list[int] | None = None
) -> ListenerProcesses:
    return ListenerProcesses(
        cast(IRelayReactor, MemoryReactorClock()),
        2,
        lambda i: ["true"],
        lambda: Deferred(),
        lambda: sockets,
        lambda: queued.append(1),
        volumes.append,
    )


def test_a_childs_queued_and_volume_lines_reach_the_main_process() -> None:
    queued: list[int] = []
    volumes: list[str] = []
    owner = _owner(queued, volumes)
    assert owner._child_line(0, QUEUED)
    assert owner._child_line(1, volume_line('app "one"\n').rstrip("\n"))
    assert queued == [1] and volumes == ['app "one"\n']
    # Malformed ones are taken (not logged as text) and do nothing.
    for bad in ("volume {not json", "volume 12", "volume " + json.dumps("x" * 5000)):
        assert owner._child_line(0, bad)
    assert volumes == ['app "one"\n']
    assert not owner._child_line(0, "info 2026-12-06T00:00:00+0000 [x#info] smtp[0] hello")


@pytest_twisted.ensureDeferred
async def test_the_children_inherit_the_sockets_in_the_configs_order() -> None:
    owner = _owner([], [], sockets=[11, 12])
    assert await owner._prepare(cast(Store, None)) is True
    fds = owner._child_fds(1)
    assert fds == {0: "w", 1: "r", 2: "r", FIRST_FD: 11, FIRST_FD + 1: 12}
    unready = _owner([], [], sockets=None)
    assert await unready._prepare(cast(Store, None)) is False


@pytest_twisted.ensureDeferred
async def test_an_accepting_process_reads_the_held_set_and_reports_what_it_accepted(
    store: Store, clock: Clock
) -> None:
    await store.smtp_credentials.add("app", hash_password("not used"))
    reported: list[str] = []
    held = HeldCredentials(clock, lambda: succeed(store), reported.append, poll_interval=5.0)
    held.startService()
    try:
        await _poll_done(held)  # the first read, at start
        assert held.check_sender("app") is None
        alert = AlertEvent("credential-volume", "app", 400, 20.0, "hold")
        assert await store.record_volume_alert(alert, "volume alert") is True
        assert held.check_sender("app") is None  # until the next read
        clock.advance(5.0)
        await _poll_done(held)
        assert held.check_sender("app") == HELD_REPLY
        assert held.check_sender(None) is None and held.check_sender("other") is None
        assert await store.release_credential("app") == "released"
        clock.advance(5.0)
        await _poll_done(held)
        assert held.check_sender("app") is None
        held.message_accepted("app")
        assert reported == ["app"]
    finally:
        held.stopService()


async def _poll_done(held: HeldCredentials) -> None:
    """Wait (real time: the read runs on the engine's thread) until the read the clock
    started has ended: the loop has then scheduled its next call. Advancing the clock while
    a read is still running would not start another, and the test would wait on nothing."""
    loop = held._loop
    assert loop is not None
    for _ in range(1000):
        if loop.call is not None:
            return
        await deferLater(real_reactor(), 0.01, lambda: None)
    raise AssertionError("the held set's read did not end in 10 s")
