"""gc_freeze: start-up's objects leave the full collections' way; later ones are collected."""

from __future__ import annotations

import gc

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import provider

from smartrelay.gc_freeze import freeze_startup_objects


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_startup_objects_are_frozen_and_later_garbage_is_still_collected() -> None:
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        kept = Cycle()
        frozen = freeze_startup_objects()
        # (Frozen objects may still be freed by their reference count: the count can drop.)
        assert 0 < gc.get_freeze_count() <= frozen
        # What was alive is out of the generations a full collection walks.
        assert not any(o is kept for o in gc.get_objects())
        # A cycle made afterwards is garbage the collector still finds.
        Cycle()
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        globalLogPublisher.removeObserver(observe)
    assert any(o is kept for o in gc.get_objects())
    assert [e["count"] for e in events if "frozen" in e.get("log_format", "")] == [frozen]
