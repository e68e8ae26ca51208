"""GroupCommitter's batches on a ``task.Clock``: at once by default, or gathered for a while
(``gather``), never later than that, and never past ``max_batch``."""

from __future__ import annotations

from collections.abc import Sequence

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


def results(waiters: Sequence[Deferred[int]]) -> list[int | None]:
    got: list[int | None] = []
    for waiter in waiters:
        waiter.addCallback(got.append)
    return got


def test_without_gather_a_batch_starts_at_once() -> None:
    clock = Clock()
    batches = Batches(clock)
    committer = GroupCommitter(batches.run)
    first = committer.submit(1)
    assert batches.started == [(0.0, [1])]
    second, third = committer.submit(2), committer.submit(3)  # while the first is in flight
    batches.finish()
    assert batches.started == [(0.0, [1]), (0.0, [2, 3])]
    batches.finish()
    assert results([first, second, third]) == [10, 20, 30]
    assert clock.getDelayedCalls() == []


def test_gathered_items_share_a_batch_started_after_the_oldest_waited() -> None:
    clock = Clock()
    batches = Batches(clock)
    committer = GroupCommitter(batches.run)
    committer.gather(0.002, clock)
    first = committer.submit(1)
    clock.advance(0.001)
    second = committer.submit(2)
    clock.advance(0.0009)
    assert batches.started == []  # the oldest has waited 1.9 ms
    clock.advance(0.0001)
    assert batches.started == [(0.002, [1, 2])]
    batches.finish()
    assert results([first, second]) == [10, 20]
    assert batches.clock.getDelayedCalls() == []
    assert committer.batches == 1


def test_a_full_batch_does_not_wait() -> None:
    clock = Clock()
    batches = Batches(clock)
    committer = GroupCommitter(batches.run, max_batch=3)
    committer.gather(0.002, clock)
    waiters = [committer.submit(i) for i in range(4)]
    assert batches.started == [(0.0, [0, 1, 2])]
    batches.finish()
    # The fourth came with the others: it has not waited its 2 ms yet.
    assert len(batches.started) == 1
    clock.advance(0.002)
    assert batches.started[1] == (0.002, [3])
    batches.finish()
    assert results(waiters) == [0, 10, 20, 30]


def test_items_that_waited_for_a_batch_in_flight_go_when_it_ends() -> None:
    clock = Clock()
    batches = Batches(clock)
    committer = GroupCommitter(batches.run)
    committer.gather(0.002, clock)
    committer.submit(1)
    clock.advance(0.002)
    assert batches.started == [(0.002, [1])]
    committer.submit(2)  # at 2 ms, while the first batch is in flight
    clock.advance(0.003)  # a slow commit: 2 has waited 3 ms when it ends
    batches.finish()
    assert batches.started[1] == (0.005, [2])  # at once, not 2 ms more
    committer.submit(3)  # at 5 ms, the second batch in flight
    clock.advance(0.001)
    batches.finish()  # 3 has waited 1 ms: 1 ms more
    assert len(batches.started) == 2
    clock.advance(0.001)
    assert batches.started[2] == (0.007, [3])
    batches.finish()
    assert clock.getDelayedCalls() == []


def test_gather_zero_is_at_once_again() -> None:
    clock = Clock()
    batches = Batches(clock)
    committer = GroupCommitter(batches.run)
    committer.gather(0.0, clock)
    committer.submit(1)
    assert batches.started == [(0.0, [1])]
    assert clock.getDelayedCalls() == []


def test_no_wait_while_no_other_item_may_come() -> None:
    """``others_may_join`` (given the items pending) says whether waiting can pay: a lone
    delivery connection's lookup and outcome start at once."""
    clock = Clock()
    batches = Batches(clock)
    committer = GroupCommitter(batches.run)
    in_hand = [2]  # two jobs that may each submit one item
    committer.gather(0.002, clock, lambda pending: in_hand[0] > pending)
    first = committer.submit(1)
    assert batches.started == []  # the other job may come: wait
    clock.advance(0.001)
    second = committer.submit(2)  # the other job came: nobody else may
    assert batches.started == [(0.001, [1, 2])]
    batches.finish()
    in_hand[0] = 1
    third = committer.submit(3)
    assert batches.started[1] == (0.001, [3])
    batches.finish()
    assert results([first, second, third]) == [10, 20, 30]
    clock.advance(0.002)  # the first wait's timer, now idle, starts nothing
    assert len(batches.started) == 2
    assert clock.getDelayedCalls() == []
