"""Freed heap memory given back to the system (issue 19): the service's schedule on a
``task.Clock``, glibc's call on this process's own heap, and the service in the relay's tree."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.service import IServiceCollection
from twisted.internet.task import Clock

from smartrelay.config import load_config
from smartrelay.malloc_trim import TRIM_INTERVAL, GlibcTrim, MallocTrim, glibc_malloc_trim
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


#: Three copies of a 400 KB message made and dropped, 200 times (as the delivery process
#: does with a newsletter's copy); prints the page faults of those 200 rounds.
_COPIES = """
import resource, sys
from smartrelay.malloc_trim import glibc_malloc_trim
if sys.argv[1] == "keep":
    assert glibc_malloc_trim().keep_freed_memory()
data = b"x" * 400_000
for _ in range(5):
    copies = [data + b"%d" % i for i in range(3)]
    del copies
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    copies = [data + b"%d" % i for i in range(3)]
    del copies
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_kept_freed_memory_spares_the_page_faults_of_big_copies() -> None:
    """glibc's defaults hand the memory of big buffers back as they are freed, and fault it
    in again for the next ones (some 160 faults a round here); with the thresholds set, the
    rounds reuse it. In a process of its own: the thresholds are the whole process's."""

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _COPIES, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout)

    assert faults("default") > 100 * 200
    assert faults("keep") < 200


def test_the_running_service_sets_the_thresholds_once() -> None:
    class Recording(GlibcTrim):
        def __init__(self) -> None:
            self.set = 0

        def __call__(self) -> int:
            return 0

        def keep_freed_memory(self) -> bool:
            self.set += 1
            return True

    clock = Clock()
    trim = Recording()
    service = MallocTrim(clock, trim)
    service.startService()
    clock.pump([TRIM_INTERVAL] * 3)
    assert trim.set == 1 and service.trims == 3
    service.stopService()
