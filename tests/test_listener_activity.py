"""The listener's activity, which the spare delivery processes go by: busy from a session's
admission or a client's bytes, quiet once neither has come for ``QUIET_AFTER`` seconds."""

from __future__ import annotations

from attrs import evolve
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smartrelay.smtp.activity import QUIET_AFTER, ListenerActivity
from smartrelay.smtp.listener import SmtpFactory
from tests.test_smtp_protocol import SETTINGS, RecordingBackend


def watched(clock: Clock) -> tuple[ListenerActivity, list[bool]]:
    activity = ListenerActivity(clock)
    changes: list[bool] = []
    activity.observe(changes.append)
    return activity, changes


def test_busy_at_once_and_quiet_after_the_pause() -> None:
    clock = Clock()
    activity, changes = watched(clock)
    assert not activity.busy
    activity.heard()
    assert activity.busy and changes == [True]
    clock.advance(QUIET_AFTER * 0.9)
    activity.heard()
    clock.advance(QUIET_AFTER * 0.9)
    assert activity.busy and changes == [True], "heard 0.9 pauses ago"
    clock.advance(QUIET_AFTER * 0.2)
    assert not activity.busy and changes == [True, False]
    assert not clock.getDelayedCalls()


def test_clients_sending_a_few_messages_a_second_keep_it_busy() -> None:
    """Not switched back and forth between their messages; one timer at a time, however
    many reads."""
    clock = Clock()
    activity, changes = watched(clock)
    for _ in range(20):
        for _ in range(50):  # the reads of one message
            activity.heard()
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(QUIET_AFTER / 2)
    assert changes == [True]
    clock.advance(QUIET_AFTER)
    assert changes == [True, False]
    assert not clock.getDelayedCalls()
    activity.heard()
    assert changes == [True, False, True]


def test_stop_leaves_no_timer() -> None:
    clock = Clock()
    activity, _ = watched(clock)
    activity.heard()
    activity.stop()
    assert not clock.getDelayedCalls()


def test_the_factory_reports_admitted_sessions_and_their_input() -> None:
    """A refused connection (here: over ``max_connections``) is not a client being served,
    and a connection left open and silent is not a client sending."""
    clock = Clock()
    activity, changes = watched(clock)
    settings = evolve(SETTINGS, max_connections=1)
    factory = SmtpFactory(settings, RecordingBackend(), clock, None, activity=activity)
    first = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1000))
    first.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    assert changes == [True]
    clock.advance(QUIET_AFTER * 2)
    assert changes == [True, False], "open, but silent"
    refused = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1001))
    assert refused.refusal is not None
    refused.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    assert changes == [True, False]
    first.dataReceived(b"NOOP\r\n")
    assert changes == [True, False, True]
    clock.advance(QUIET_AFTER * 2)
    assert changes == [True, False, True, False]
