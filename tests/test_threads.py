"""smartrelay.threads.WorkerThreads, on the real reactor."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from smartrelay.threads import WorkerThreads
from tests.conftest import real_reactor


@pytest_twisted.ensureDeferred
async def test_results_come_back_on_the_reactor_thread() -> None:
    threads = WorkerThreads(real_reactor(), 2, name="test")
    threads.start()
    try:
        reactor_thread = threading.get_ident()
        ran_on: list[int] = []

        def work(number: int) -> int:
            ran_on.append(threading.get_ident())
            return number * 2

        seen_on: list[int] = []

        def note(value: int) -> int:
            seen_on.append(threading.get_ident())
            return value

        results = await gatherResults([threads.run(work, n).addCallback(note) for n in range(20)])
        assert results == [n * 2 for n in range(20)]
        assert reactor_thread not in ran_on
        assert set(seen_on) == {reactor_thread}
    finally:
        threads.stop()


@pytest_twisted.ensureDeferred
async def test_an_exception_becomes_the_deferreds_failure() -> None:
    threads = WorkerThreads(real_reactor(), 1, name="test")
    threads.start()
    try:

        def broken() -> None:
            raise ValueError("in the thread")

        with pytest.raises(ValueError, match="in the thread"):
            await threads.run(broken)
        assert await threads.run(lambda: "still working") == "still working"
    finally:
        threads.stop()


@pytest_twisted.ensureDeferred
async def test_one_thread_runs_work_in_order_and_stop_finishes_it() -> None:
    threads = WorkerThreads(real_reactor(), 1, name="test")
    threads.start()
    order: list[int] = []
    release = threading.Event()
    first = threads.run(release.wait, 5)
    rest = [threads.run(order.append, n) for n in range(5)]
    release.set()
    threads.stop()  # waits for everything queued before it
    assert order == [0, 1, 2, 3, 4]
    assert not threads.started
    assert await first is True
    await gatherResults(rest)


def test_run_needs_started_threads_and_at_least_one() -> None:
    threads = WorkerThreads(real_reactor(), 1, name="idle")
    with pytest.raises(RuntimeError, match="not running"):
        threads.run(lambda: None)
    with pytest.raises(ValueError, match="at least one thread"):
        WorkerThreads(real_reactor(), 0, name="none")
