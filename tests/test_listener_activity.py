"""The listener's activity, which the spare delivery processes go by: busy from a session's
admission, quiet once no session has been open for ``QUIET_AFTER`` seconds."""

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
    activity.opened()
    assert activity.busy and changes == [True]
    activity.opened()
    activity.closed()
    clock.advance(QUIET_AFTER * 4)
    assert activity.busy and changes == [True], "one session is still open"
    activity.closed()
    clock.advance(QUIET_AFTER * 0.9)
    assert activity.busy and changes == [True]
    clock.advance(QUIET_AFTER * 0.2)
    assert not activity.busy and changes == [True, False]


def test_a_session_within_the_pause_keeps_it_busy() -> None:
    """Clients that connect once per message, a few a second, do not switch it back and
    forth between their sessions."""
    clock = Clock()
    activity, changes = watched(clock)
    for _ in range(20):
        activity.opened()
        clock.advance(0.01)
        activity.closed()
        clock.advance(QUIET_AFTER / 2)
    assert changes == [True]
    clock.advance(QUIET_AFTER)
    assert changes == [True, False]
    assert not clock.getDelayedCalls()
    activity.opened()
    assert changes == [True, False, True]


def test_more_closes_than_opens_do_not_go_below_zero() -> None:
    clock = Clock()
    activity, changes = watched(clock)
    activity.closed()
    assert changes == [] and not clock.getDelayedCalls()
    activity.opened()
    assert changes == [True]


def test_the_factory_reports_admitted_sessions_only() -> None:
    """A refused connection (here: over ``max_connections``) is not a client being served."""
    clock = Clock()
    activity, changes = watched(clock)
    settings = evolve(SETTINGS, max_connections=1)
    factory = SmtpFactory(settings, RecordingBackend(), clock, None, activity=activity)
    first = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1000))
    first.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    assert changes == [True]
    refused = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1001))
    assert refused.refusal is not None
    refused.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    refused.connectionLost()
    clock.advance(QUIET_AFTER * 2)
    assert changes == [True], "the refused connection's end is not the first one's"
    first.connectionLost()
    clock.advance(QUIET_AFTER * 2)
    assert changes == [True, False]
