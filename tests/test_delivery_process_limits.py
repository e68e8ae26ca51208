"""``[delivery] processes``: "auto" from the core count, and the node's limits shared between
the delivery processes (the config's figures hold for the node, whatever the number)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import pytest
from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.task import Clock
from zope.interface import implementer

from smartrelay.config import ConfigError, load_config
from smartrelay.config.model import DeliveryConfig, Throttle
from smartrelay.config.reader import auto_delivery_processes
from smartrelay.delivery.processes import (
    HOLD,
    RELEASE,
    WAKE,
    DeliveryProcesses,
    _Child,
    claims_held,
    is_spare,
    share_of_limits,
)
from smartrelay.reactor import IRelayReactor
from smartrelay.relay import DELIVERY_PROCESS_CONNECTIONS, RelayService, signs_in_threads
from smartrelay.smtp.activity import ListenerActivity
from tests.conftest import real_reactor
from tests.support.relay import relay_config


@pytest.mark.parametrize(
    "cpus, processes", [(1, 1), (2, 1), (3, 2), (4, 3), (8, 7), (16, 15), (200, 64)]
)
def test_auto_is_one_process_per_core_but_one(cpus: int, processes: int) -> None:
    assert auto_delivery_processes(cpus) == processes


def _write(tmp_path: Path, processes: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\ndata_dir = '{tmp_path}'\n[delivery]\nprocesses = {processes}\n")
    return path


def test_auto_in_the_config_file(tmp_path: Path) -> None:
    config = load_config(str(_write(tmp_path, '"auto"')))
    assert config.delivery.processes == auto_delivery_processes(len(os.sched_getaffinity(0)))
    assert config.delivery.processes >= 1


def test_another_string_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'delivery.processes.*integer or "auto".*fast'):
        load_config(str(_write(tmp_path, '"fast"')))


def _delivery(processes: int) -> DeliveryConfig:
    return DeliveryConfig(
        max_connections=200,
        processes=processes,
        throttles=(
            Throttle("gmail.com", max_connections=5, max_rate_per_second=10.0),
            Throttle("tiny.test", max_connections=2, max_rate_per_second=0.5),
            Throttle(),
        ),
    )


@pytest.mark.parametrize("processes", [2, 3, 7])
def test_limits_are_shared_between_the_processes(processes: int) -> None:
    delivery = _delivery(processes)
    shares = [share_of_limits(delivery, index) for index in range(processes)]
    assert sum(s.max_connections for s in shares) == 200
    for position, throttle in enumerate(delivery.throttles):
        mine = [s.throttles[position] for s in shares]
        assert all(t.match == throttle.match for t in mine)
        assert sum(t.max_rate_per_second for t in mine) == pytest.approx(
            throttle.max_rate_per_second
        )
        # every process may open one connection, even where the node's limit is smaller
        assert all(t.max_connections >= 1 for t in mine)
        assert sum(t.max_connections for t in mine) == max(throttle.max_connections, processes)
        assert all(
            t.max_messages_per_connection == throttle.max_messages_per_connection for t in mine
        )


@pytest.mark.parametrize("processes", [0, 1])
def test_one_delivering_process_keeps_the_whole_limits(processes: int) -> None:
    delivery = _delivery(processes)
    assert share_of_limits(delivery, 0) == delivery


def test_a_delivery_process_runs_with_its_share(tmp_path: Path) -> None:
    config = relay_config(tmp_path, f"sqlite:{tmp_path / 'db'}", 1, 2, 3)
    config = evolve(config, delivery=evolve(_delivery(2), routes=config.delivery.routes))
    main = RelayService(config, real_reactor())
    assert main.config.delivery == config.delivery  # the main process keeps the config's
    child = RelayService(config, real_reactor(), role="delivery", worker_index=1)
    assert child.config.delivery == share_of_limits(config.delivery, 1)
    assert child.config.delivery.max_connections == 100
    assert child.config.delivery.throttles[0].max_rate_per_second == 5.0


def test_a_delivery_process_has_two_database_connections(tmp_path: Path) -> None:
    """Its transactions would otherwise run side by side on the database server, taking CPU
    from the accepting processes' group commits (relay.DELIVERY_PROCESS_CONNECTIONS)."""
    config = relay_config(tmp_path, f"sqlite:{tmp_path / 'db'}", 1, 2, 3)
    assert RelayService(config, real_reactor()).storage.pool_size is None  # the engine's own
    assert RelayService(config, real_reactor(), role="listener").storage.pool_size is None
    child = RelayService(config, real_reactor(), role="delivery", worker_index=0)
    assert child.storage.pool_size == DELIVERY_PROCESS_CONNECTIONS == 2


def test_a_delivery_process_signs_in_its_reactor_thread(tmp_path: Path) -> None:
    """Signing threads where the reactor serves clients; a delivery process, on either
    engine, signs inline (relay.signs_in_threads)."""
    sqlite = relay_config(tmp_path, f"sqlite:{tmp_path / 'db'}", 1, 2, 3)
    assert RelayService(sqlite, real_reactor()).dkim_in_thread is not None
    assert RelayService(sqlite, real_reactor(), role="listener").dkim_in_thread is not None
    child = RelayService(sqlite, real_reactor(), role="delivery", worker_index=0)
    assert child.dkim_in_thread is None
    postgresql = relay_config(tmp_path, "postgresql://relay@127.0.0.1:1/relay", 1, 2, 3)
    child = RelayService(postgresql, real_reactor(), role="delivery", worker_index=0)
    assert child.dkim_in_thread is None
    assert signs_in_threads("all") and not signs_in_threads("delivery")


# -- spare delivery processes ([delivery] spare_processes) --------------------------------------
def _spare_config(tmp_path: Path, delivery: str, smtp: str = "") -> DeliveryConfig:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\ndata_dir = '{tmp_path}'\n[smtp]\n{smtp}\n[delivery]\n{delivery}\n")
    return load_config(str(path)).delivery


def test_spare_processes_default_to_none(tmp_path: Path) -> None:
    assert _spare_config(tmp_path, "processes = 1").spare_processes == 0


@pytest.mark.parametrize(
    "delivery, smtp, spare",
    [
        ('processes = 1\nspare_processes = "auto"', "", 1),
        ('processes = "auto"\nspare_processes = "auto"', "", 1),
        ("processes = 3\nspare_processes = 2", "", 2),
        # "auto" gives none where a spare could not work: nothing delivers in children, or
        # accepting processes hold the clients (the main process cannot see them).
        ('processes = 0\nspare_processes = "auto"', "", 0),
        ('processes = 1\nspare_processes = "auto"', "processes = 2", 0),
    ],
)
def test_spare_processes(tmp_path: Path, delivery: str, smtp: str, spare: int) -> None:
    assert _spare_config(tmp_path, delivery, smtp).spare_processes == spare


@pytest.mark.parametrize(
    "delivery, smtp, message",
    [
        ("processes = 0\nspare_processes = 1", "", r"spare_processes.*needs processes of 1"),
        ("processes = 1\nspare_processes = 1", "processes = 1", r"needs \[smtp\] processes = 0"),
        ('processes = 1\nspare_processes = "some"', "", r'integer or "auto", got string'),
        ("processes = 1\nspare_processes = -1", "", r"from 0 to 64, got -1"),
    ],
)
def test_spare_processes_refused(tmp_path: Path, delivery: str, smtp: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _spare_config(tmp_path, delivery, smtp)


def test_spares_get_their_share_of_the_limits_too() -> None:
    """The node's limits hold with the spares working beside the others."""
    delivery = evolve(_delivery(1), spare_processes=1)
    shares = [share_of_limits(delivery, index) for index in range(2)]
    assert [s.max_connections for s in shares] == [100, 100]
    assert [s.throttles[0].max_connections for s in shares] == [3, 2]
    assert [s.throttles[1].max_connections for s in shares] == [1, 1]
    assert [is_spare(delivery, index) for index in range(2)] == [False, True]


@pytest.mark.parametrize(
    "data, held",
    [(b"w", None), (b"", None), (b"h", True), (b"r", False), (b"wwhw", True), (b"hwr", False)],
)
def test_what_the_main_process_says_to_a_spare(data: bytes, held: bool | None) -> None:
    """A read may hold several bytes (the pipe keeps what a busy child has not read): the
    last hold or release one counts; wake-ups say nothing of it."""
    assert claims_held(data) is held


@implementer(IProcessTransport)
class _Pipe:  # type: ignore[misc]  # only write() is used
    """A child's standard input, as written by the main process."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


def test_the_main_process_holds_releases_and_wakes_the_spare() -> None:
    """Hold at the listener's first client, release once it is quiet; wake-ups go to every
    process but a held spare (it would claim nothing)."""
    clock = Clock()
    activity = ListenerActivity(clock)
    processes = DeliveryProcesses(
        cast(IRelayReactor, clock),
        1,
        lambda index: ["true"],
        lambda: Deferred(),
        spare=1,
        activity=activity,
    )
    pipes = {}
    for index in (0, 1):
        child = _Child(processes, index)
        child.transport = pipes[index] = _Pipe()
        processes.children[index] = child
    processes.wake()
    assert (pipes[0].written, pipes[1].written) == (WAKE, WAKE)
    activity.heard()
    processes.wake()
    assert (pipes[0].written, pipes[1].written) == (WAKE * 2, WAKE + HOLD)
    clock.advance(1.0)
    processes.wake()
    assert (pipes[0].written, pipes[1].written) == (WAKE * 3, WAKE + HOLD + RELEASE + WAKE)


@pytest.mark.parametrize("spare", [0, 1])
def test_the_listener_hears_its_clients_only_for_spares(tmp_path: Path, spare: int) -> None:
    """Each read of a client's notes the time only where a spare goes by it."""
    config = relay_config(tmp_path, f"sqlite:{tmp_path / 'db'}", 1, 2, 3)
    config = evolve(config, delivery=evolve(config.delivery, processes=1, spare_processes=spare))
    relay = RelayService(config, real_reactor())
    assert relay.submission is not None
    if spare:
        assert relay.listener_activity is not None
        assert relay.submission.activity is relay.listener_activity
    else:
        assert relay.listener_activity is None and relay.submission.activity is None
