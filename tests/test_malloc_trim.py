"""Freed heap memory given back to the system (issue 19): the service's schedule on a
``task.Clock``, glibc's call on this process's own heap, and the service in the relay's tree."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
from twisted.application.service import IServiceCollection
from twisted.internet.task import Clock

from smartrelay.config import load_config
from smartrelay.malloc_trim import TRIM_INTERVAL, MallocTrim, glibc_malloc_trim
from smartrelay.relay import RelayService
from tests.conftest import real_reactor
from tests.support.run import write_relay_config


def rss_anon_kib() -> int:
    """The process's anonymous resident memory (its heaps), from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


def test_the_service_trims_once_an_interval_while_running() -> None:
    clock = Clock()
    calls: list[float] = []
    service = MallocTrim(clock, lambda: calls.append(clock.seconds()))
    service.startService()
    clock.advance(TRIM_INTERVAL - 1)
    assert calls == []  # not at start-up: nothing has been freed yet
    clock.pump([1.0] + [TRIM_INTERVAL] * 3)
    assert calls == [TRIM_INTERVAL * n for n in (1, 2, 3, 4)]
    assert service.trims == 4
    service.stopService()
    clock.advance(TRIM_INTERVAL * 5)
    assert len(calls) == 4 and clock.getDelayedCalls() == []


def test_without_glibc_the_service_does_nothing() -> None:
    clock = Clock()
    service = MallocTrim(clock, None)
    service.startService()
    assert clock.getDelayedCalls() == []
    service.trim_now()
    assert service.trims == 0
    service.stopService()


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_glibcs_trim_gives_freed_heap_pages_back() -> None:
    """40 MB in 20 KB blocks (below glibc's mmap threshold: on the heap), one in fifty kept,
    the last among them, so the heap's top cannot shrink on its own when the rest is freed:
    the freed pages stay resident until the trim hands them back."""
    trim = glibc_malloc_trim()
    assert trim is not None
    blocks = [bytearray(b"x" * 20_000) for _ in range(2_000)]
    kept = [*blocks[::50], blocks[-1]]
    before_free = rss_anon_kib()
    del blocks
    freed_but_resident = rss_anon_kib()
    assert before_free - freed_but_resident < 20_000  # glibc kept most of it
    trim()
    after = rss_anon_kib()
    assert freed_but_resident - after > 20_000, (before_free, freed_but_resident, after)
    assert all(len(block) == 20_000 for block in kept)  # still there, still readable


@pytest.mark.parametrize("role", ["all", "delivery"])
def test_every_relay_process_has_the_service(tmp_path: Path, role: str) -> None:
    """The main process and each delivery process (``role="delivery"``) trim."""
    config = load_config(str(write_relay_config(tmp_path, f"sqlite:{tmp_path / 'relay.db'}")))
    relay = RelayService(config, real_reactor(), role="all" if role == "all" else "delivery")
    service = IServiceCollection(relay).getServiceNamed("malloc-trim")
    assert isinstance(service, MallocTrim) and service is relay.malloc_trim
