"""GroupCommitter's batches on a ``task.Clock``: at once by default, or gathered for a while
(``gather``: from the oldest item or the last batch's end), never past ``max_batch``, and
not at all while no other item may come."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from smartrelay.storage.batching import GroupCommitter


class Batches:
    """A ``run_batch`` that records each batch and its start time, and finishes it when the
    test says so (``finish``)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.started: list[tuple[float, list[int]]] = []
        self._open: list[Deferred[list[int]]] = []

    def run(self, items: Sequence[int]) -> Deferred[list[int]]:
        self.started.append((self.clock.seconds(), list(items)))
        done: Deferred[list[int]] = Deferred()
        self._open.append(done)
        return done

    def finish(self) -> None:
        """The oldest open batch commits: each item's result is the item times ten."""
        done = self._open.pop(0)
        _, items = self.started[len(self.started) - len(self._open) - 1]
        done.callback([i * 10 for i in items])


def committer(
    gather: float | None = None,
    max_batch: int = 200,
    others_may_join: Callable[[int], bool] | None = None,
) -> tuple[Clock, Batches, GroupCommitter[int, int]]:
    """A committer over :class:`Batches` on a fresh clock, gathering for ``gather`` s."""
    clock = Clock()
    batches = Batches(clock)
    made: GroupCommitter[int, int] = GroupCommitter(batches.run, max_batch=max_batch)
    if gather is not None:
        made.gather(gather, clock, others_may_join)
    return clock, batches, made


def results(waiters: Sequence[Deferred[int]]) -> list[int | None]:
    got: list[int | None] = []
    for waiter in waiters:
        waiter.addCallback(got.append)
    return got


def test_without_gather_a_batch_starts_at_once() -> None:
    clock, batches, commits = committer()
    first = commits.submit(1)
    assert batches.started == [(0.0, [1])]
    second, third = commits.submit(2), commits.submit(3)  # while the first is in flight
    batches.finish()
    assert batches.started == [(0.0, [1]), (0.0, [2, 3])]
    batches.finish()
    assert results([first, second, third]) == [10, 20, 30]
    assert clock.getDelayedCalls() == []


def test_gathered_items_share_a_batch_started_after_the_oldest_waited() -> None:
    clock, batches, commits = committer(0.002)
    first = commits.submit(1)
    clock.advance(0.001)
    second = commits.submit(2)
    clock.advance(0.0009)
    assert batches.started == []  # the oldest has waited 1.9 ms
    clock.advance(0.0001)
    assert batches.started == [(0.002, [1, 2])]
    batches.finish()
    assert results([first, second]) == [10, 20]
    assert batches.clock.getDelayedCalls() == []
    assert commits.batches == 1


def test_a_full_batch_does_not_wait() -> None:
    clock, batches, commits = committer(0.002, max_batch=3)
    waiters = [commits.submit(i) for i in range(4)]
    assert batches.started == [(0.0, [0, 1, 2])]
    batches.finish()
    # The fourth came with the others: it has not waited its 2 ms yet.
    assert len(batches.started) == 1
    clock.advance(0.002)
    assert batches.started[1] == (0.002, [3])
    batches.finish()
    assert results(waiters) == [0, 10, 20, 30]


def test_a_busy_committer_runs_a_batch_per_gather_time_at_most() -> None:
    """Items that came while a batch was in flight start ``gather`` after it ended: under
    load, one transaction per 2 ms and a commit's time at most."""
    clock, batches, commits = committer(0.002)
    commits.submit(1)
    clock.advance(0.002)
    assert batches.started == [(0.002, [1])]
    commits.submit(2)  # at 2 ms, while the first batch is in flight
    clock.advance(0.003)
    batches.finish()  # at 5 ms
    commits.submit(3)
    clock.advance(0.0019)
    assert len(batches.started) == 1  # 2 and 3 wait 2 ms from the first batch's end
    clock.advance(0.0001)
    assert len(batches.started) == 2
    assert batches.started[1][0] == pytest.approx(0.007)
    assert batches.started[1][1] == [2, 3]
    batches.finish()
    clock.advance(0.01)  # idle a while: the next item waits 2 ms from its arrival
    commits.submit(4)
    clock.advance(0.002)
    assert batches.started[2][0] == pytest.approx(0.019)
    assert batches.started[2][1] == [4]
    batches.finish()
    assert clock.getDelayedCalls() == []


def test_gather_zero_is_at_once_again() -> None:
    clock, batches, commits = committer(0.0)
    commits.submit(1)
    assert batches.started == [(0.0, [1])]
    assert clock.getDelayedCalls() == []


def test_no_wait_while_no_other_item_may_come() -> None:
    """``others_may_join`` (given the items pending) says whether waiting can pay: a lone
    delivery connection's lookup and outcome start at once."""
    in_hand = [2]  # two jobs that may each submit one item
    clock, batches, commits = committer(0.002, others_may_join=lambda n: in_hand[0] > n)
    first = commits.submit(1)
    assert batches.started == []  # the other job may come: wait
    clock.advance(0.001)
    second = commits.submit(2)  # the other job came: nobody else may
    assert batches.started == [(0.001, [1, 2])]
    batches.finish()
    in_hand[0] = 1
    third = commits.submit(3)
    assert batches.started[1] == (0.001, [3])
    batches.finish()
    assert results([first, second, third]) == [10, 20, 30]
    assert clock.getDelayedCalls() == []  # the first wait's timer went with its batch
