"""Adaptive throttles (smartrelay/delivery/adaptive.py): the AIMD controller on a task.Clock,
the rate-limit signals, the provider grouping of keys, the config key, and the figures a
delivery process sends to the main process."""

from __future__ import annotations

import io
import json
import random
from typing import cast

import pytest
from prometheus_client import generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from smartrelay.config import ConfigError, Throttle, parse_config
from smartrelay.delivery.adaptive import (
    AdaptiveLimits,
    AimdSettings,
    is_rate_signal,
    provider_key,
    retry_soon,
)
from smartrelay.delivery.processes import DeliveryProcesses, _Child, adaptive_line
from smartrelay.delivery.throttle import Throttles
from smartrelay.delivery_process import MetricsReporter
from smartrelay.metrics import LimitFigures, RelayMetrics
from smartrelay.reactor import IRelayReactor

CEILING = Throttle("*", max_connections=20, max_rate_per_second=100.0, adaptive=True)
SETTINGS = AimdSettings(
    hold=60.0, max_hold=300.0, same_episode=2.0, step_interval=30.0, step_fraction=0.1
)


def limits(clock: Clock, settings: AimdSettings = SETTINGS) -> tuple[AdaptiveLimits, list[int]]:
    changes: list[int] = []
    controller = AdaptiveLimits(clock, settings, on_change=lambda f: changes.append(len(f)))
    return controller, changes


# -- the controller ---------------------------------------------------------------------------
def test_a_signal_cuts_rate_and_connections_by_half_and_holds_them() -> None:
    clock = Clock()
    controller, changes = limits(clock)
    assert controller.rate("mx:.big.test", CEILING) == 100.0
    assert controller.signal("mx:.big.test", CEILING, "421 4.7.0 Try again later", "a.test")
    assert controller.rate("mx:.big.test", CEILING) == 50.0
    assert controller.connections("mx:.big.test", CEILING) == 10
    assert changes == [1]
    [figures] = controller.figures()
    assert figures.cut and figures.destination == "mx:.big.test"
    assert figures.domains == ("a.test",) and figures.reason == "421 4.7.0 Try again later"
    assert figures.hold_until == 60.0
    # Held: nothing is raised before the hold is over.
    clock.advance(59.9)
    assert controller.rate("mx:.big.test", CEILING) == 50.0
    # Other keys keep their ceiling.
    assert controller.rate("other.test", CEILING) == 100.0
    controller.stop()


def test_signals_of_one_episode_cut_once() -> None:
    clock = Clock()
    controller, _ = limits(clock)
    assert controller.signal("k", CEILING, "421 too many connections")
    clock.advance(1.0)  # the other connections' answers to mail sent before the cut
    assert not controller.signal("k", CEILING, "421 too many connections")
    assert controller.rate("k", CEILING) == 50.0
    clock.advance(1.5)
    assert controller.signal("k", CEILING, "421 too many connections")
    assert controller.rate("k", CEILING) == 25.0
    controller.stop()


def test_cuts_stop_at_the_floor_and_a_cut_while_held_doubles_the_hold_up_to_the_cap() -> None:
    clock = Clock()
    controller, _ = limits(clock)
    holds = []
    for _ in range(12):
        controller.signal("k", CEILING, "421 4.7.0 slow down")
        [f] = controller.figures()
        holds.append(f.hold_until - clock.seconds())
        clock.advance(10.0)  # within the hold
    assert holds[:4] == [60.0, 120.0, 240.0, 300.0] and set(holds[3:]) == {300.0}
    assert controller.rate("k", CEILING) == SETTINGS.min_rate
    assert controller.connections("k", CEILING) == 1
    controller.stop()


def test_the_floor_is_never_above_the_ceiling() -> None:
    clock = Clock()
    controller, _ = limits(clock)
    slow = Throttle("*", max_connections=1, max_rate_per_second=0.05, adaptive=True)
    for _ in range(3):
        controller.signal("k", slow, "421 4.7.0 slow down")
        clock.advance(5)
    assert controller.rate("k", slow) == 0.05 and controller.connections("k", slow) == 1
    controller.stop()


def test_after_the_hold_limits_rise_step_by_step_then_faster_back_to_the_ceiling() -> None:
    clock = Clock()
    controller, changes = limits(clock)
    for _ in range(3):  # 100 -> 12.5/s, 20 -> 2 connections
        controller.signal("k", CEILING, "421 4.7.0 slow down")
        clock.advance(2.0)
    assert controller.rate("k", CEILING) == 12.5 and controller.connections("k", CEILING) == 2
    [held] = controller.figures()
    clock.advance(held.hold_until - clock.seconds() - 0.01)
    assert controller.rate("k", CEILING) == 12.5
    clock.advance(0.01)  # the hold is over: one step (10% of the ceiling: 10/s, 2 connections)
    assert controller.rate("k", CEILING) == 22.5 and controller.connections("k", CEILING) == 4
    rates = [controller.rate("k", CEILING)]
    connections = [controller.connections("k", CEILING)]
    for _ in range(10):
        clock.advance(30.0)
        rates.append(controller.rate("k", CEILING))
        connections.append(controller.connections("k", CEILING))
    # Additive up to 25/s, where the last cut started; then x1.5 a step (the ceiling caps).
    assert rates == [22.5, 32.5, 48.75, 73.125] + [100.0] * 7
    assert connections == [4, 6, 8, 10, 12, 14, 16, 18, 20, 20, 20]
    # Back at the ceiling: no timer left, the figures show it at the ceiling, not cut.
    assert clock.getDelayedCalls() == []
    [recovered] = controller.figures()
    assert not recovered.cut and recovered.rate == 100.0 and recovered.connections == 20
    assert len(changes) == 3 + 9  # every cut and every step was published


def test_a_new_signal_after_recovery_cuts_from_the_ceiling_with_the_first_hold() -> None:
    clock = Clock()
    controller, _ = limits(clock)
    controller.signal("k", CEILING, "421 4.7.0 slow down")
    clock.advance(60)
    for _ in range(10):  # (a Clock schedules calls made while advancing from its new time)
        clock.advance(30)
    assert controller.rate("k", CEILING) == 100.0
    controller.signal("k", CEILING, "421 4.7.0 slow down")
    [f] = controller.figures()
    assert f.cut and f.rate == 50.0 and f.hold_until == clock.seconds() + 60.0
    controller.stop()
    assert clock.getDelayedCalls() == []


def test_a_throttle_that_is_not_adaptive_is_never_cut() -> None:
    clock = Clock()
    controller, changes = limits(clock)
    fixed = Throttle("*", max_connections=20, max_rate_per_second=100.0)
    assert not controller.signal("k", fixed, "421 4.7.0 slow down")
    assert controller.rate("k", fixed) == 100.0 and changes == []


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="decrease"):
        AimdSettings(decrease=1.0)
    with pytest.raises(ValueError, match="max_hold"):
        AimdSettings(hold=100.0, max_hold=10.0)
    with pytest.raises(ValueError, match="probe"):
        AimdSettings(probe=0.5)
    with pytest.raises(ValueError, match="step_interval"):
        AimdSettings(step_interval=0.0)


def test_domains_listed_per_key_are_bounded() -> None:
    clock = Clock()
    controller, _ = limits(clock)
    controller.signal("k", CEILING, "421 slow down", "d0.test")
    for i in range(1, 100):
        controller.note_domain("k", f"d{i}.test")
    [f] = controller.figures()
    assert len(f.domains) == 20 and f.domains[-1] == "d99.test"
    controller.stop()


# -- signals ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "text", "at_connect", "expected"),
    [
        (421, "4.7.0 Try again later", False, True),
        (421, "4.7.0 Try again later, closing connection.", False, True),
        (451, "4.7.1 Throttled: too many messages", False, True),
        (421, "Too many connections from your IP", False, True),
        # A mailbox status limits one recipient, not the destination.
        (450, "4.2.1 The user is receiving mail too quickly", False, False),
        (450, "The user is receiving mail too quickly", False, True),
        (421, "4.3.2 Service shutting down", True, True),  # any 421 when connecting
        (421, "4.3.2 Service shutting down", False, False),
        (451, "4.4.1 Connection refused", True, False),  # ours: not a rate limit
        (550, "5.7.1 too many messages", False, False),  # permanent: never a signal
        (250, "2.0.0 Ok", False, False),
    ],
)
def test_rate_signals(code: int, text: str, at_connect: bool, expected: bool) -> None:
    assert is_rate_signal(code, text, at_connect=at_connect) is expected


def test_a_rate_limited_recipient_is_retried_soon_but_never_after_max_age() -> None:
    rng = random.Random(5)
    for _ in range(50):
        at = retry_soon(now=1000.0, first_attempt_at=0.0, max_age=86400.0, delay=15.0, rng=rng)
        assert at is not None and 1015.0 <= at <= 1022.5
    assert retry_soon(now=1000.0, first_attempt_at=0.0, max_age=1005.0, delay=15, rng=rng) == 1005
    assert retry_soon(now=1000.0, first_attempt_at=0.0, max_age=1000.0, delay=15, rng=rng) is None


# -- grouping by provider -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("aspmx.l.google.com", "mx:.google.com"),
        ("ALT1.ASPMX.L.GOOGLE.COM.", "mx:.google.com"),
        ("mx1.example.co.uk", "mx:.example.co.uk"),
        ("mx.b.example.com.br", "mx:.example.com.br"),
        ("mx01.mail.example.k12.ca.us", "mx:.example.k12.ca.us"),
        ("example-com.mail.protection.outlook.com", "mx:.outlook.com"),
        ("localhost", "mx:localhost"),
        ("mail.test", "mx:mail.test"),
    ],
)
def test_provider_keys(host: str, key: str) -> None:
    assert provider_key(host) == key


def test_an_adaptive_entry_shares_one_budget_per_provider() -> None:
    clock = Clock()
    adaptive = Throttle("*", max_connections=4, max_rate_per_second=10.0, adaptive=True)
    fixed = Throttle("fixed.test", max_connections=4, max_rate_per_second=10.0)
    google = Throttle("mx:.l.google.com", max_connections=2, adaptive=True)
    throttles = Throttles(clock, [google, fixed, adaptive], 100, adaptive=SETTINGS)
    a = throttles.key_for("a.test", "mx1.provider.test")
    b = throttles.key_for("b.test", "mx2.provider.test")
    assert a == b == "mx:.provider.test"
    # Without a known MX, and for entries that are not adaptive, the domain is the key.
    assert throttles.key_for("a.test") == "a.test"
    assert throttles.key_for("fixed.test", "mx1.provider.test") == "fixed.test"
    # An explicit mx: entry keeps its own key.
    assert throttles.key_for("gmail.com", "aspmx.l.google.com") == "mx:.l.google.com"

    # A cut of the shared key limits both domains' connections and rate.
    assert throttles.adaptive.signal(a, adaptive, "421 4.7.0 slow down", "a.test")
    assert throttles.max_connections_for(b, adaptive) == 2
    assert throttles.acquire_connection(a, adaptive)
    assert throttles.acquire_connection(b, adaptive)
    assert not throttles.acquire_connection(a, adaptive)
    sent = 0
    while throttles.take_message(b, adaptive) == 0.0:
        sent += 1
    assert sent == 5  # the bucket holds one second's worth of the cut rate
    assert throttles.take_message(a, adaptive) == pytest.approx(1 / 5)
    throttles.adaptive.stop()


# -- configuration --------------------------------------------------------------------------------
def test_adaptive_is_false_unless_set() -> None:
    config = parse_config(
        {
            "delivery": {
                "throttle": [
                    {"match": "mx:.google.com", "max_rate": "600/min", "adaptive": True},
                    {"match": "*"},
                ]
            }
        }
    )
    google, star = config.delivery.throttles
    assert google.adaptive and google.max_rate_per_second == 10.0
    assert not star.adaptive
    assert not parse_config({}).delivery.throttles[0].adaptive


def test_adaptive_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"delivery\.throttle\[0\]\.adaptive"):
        parse_config({"delivery": {"throttle": [{"match": "*", "adaptive": "yes"}]}})


# -- the figures, in a process and from delivery processes ---------------------------------------
def test_the_limits_are_gauges_and_a_child_sends_them_on_its_adaptive_line() -> None:
    clock = Clock()
    child = RelayMetrics()
    controller = AdaptiveLimits(clock, SETTINGS, on_change=lambda f: child.adaptive.set("main", f))
    controller.signal("mx:.provider.test", CEILING, "421 4.7.0 slow down", "a.test")
    line = adaptive_line(child)
    assert line.startswith("adaptive [") and line.endswith("\n")

    main = RelayMetrics()
    assert main.adaptive.update_child(1, json.loads(line[len("adaptive ") :]))
    text = generate_latest(main.registry).decode()
    assert (
        'smartrelay_throttle_rate_limit{destination="mx:.provider.test",process="d1"} 50.0' in text
    )
    assert (
        'smartrelay_throttle_connection_limit{destination="mx:.provider.test",process="d1"} 10.0'
        in text
    )
    [(process, figures)] = main.adaptive.cut_for_domain("a.test")
    assert process == "d1" and figures.rate == 50.0
    main.adaptive.retire(1)
    assert main.adaptive.all() == []
    controller.stop()


@pytest.mark.parametrize(
    "row",
    [
        "x",
        {},
        {"destination": "k", "rate": "1"},
        {
            "destination": "k",
            "rate": float("inf"),
            "connections": 1,
            "ceiling_rate": 1.0,
            "ceiling_connections": 1,
            "cut": True,
            "hold_until": 0.0,
            "reason": "",
            "domains": [],
        },
        {
            "destination": "k" * 301,
            "rate": 1.0,
            "connections": 1,
            "ceiling_rate": 1.0,
            "ceiling_connections": 1,
            "cut": True,
            "hold_until": 0.0,
            "reason": "",
            "domains": [],
        },
        {
            "destination": "k",
            "rate": 1.0,
            "connections": True,
            "ceiling_rate": 1.0,
            "ceiling_connections": 1,
            "cut": True,
            "hold_until": 0.0,
            "reason": "",
            "domains": [],
        },
        {
            "destination": "k",
            "rate": 1.0,
            "connections": 1,
            "ceiling_rate": 1.0,
            "ceiling_connections": 1,
            "cut": True,
            "hold_until": 0.0,
            "reason": "",
            "domains": ["d"] * 21,
        },
    ],
)
def test_a_malformed_figure_from_a_child_is_skipped(row: object) -> None:
    metrics = RelayMetrics()
    good = LimitFigures("ok", 1.0, 1, 2.0, 2, True, 0.0, "421", ("a.test",))
    assert metrics.adaptive.update_child(0, [row, good.as_json()])
    assert [f for _, f in metrics.adaptive.all()] == [good]
    assert not metrics.adaptive.update_child(0, {"not": "a list"})


def test_the_main_process_reads_adaptive_lines_and_drops_them_when_a_child_ends() -> None:
    main = RelayMetrics()
    owner = DeliveryProcesses(
        cast(IRelayReactor, MemoryReactorClock()), 1, lambda i: ["true"], lambda: Deferred(), main
    )
    child = _Child(owner, 2)
    sent = RelayMetrics()
    figures = LimitFigures("mx:.provider.test", 5.0, 2, 10.0, 4, True, 60.0, "421", ("a.test",))
    sent.adaptive.set("main", [figures])
    # What the child's reporter writes: its adaptive line, only when it changed.
    out = io.StringIO()
    reporter = MetricsReporter(sent, out)
    reporter.send()
    reporter.send()
    lines = out.getvalue().splitlines(keepends=True)
    [line] = [x for x in lines if x.startswith("adaptive ")]
    # Taken in pieces, beside log lines, which are still logged.
    with capturedLogs() as logged:
        child.childDataReceived(1, line.encode()[:7])
        child.childDataReceived(1, line.encode()[7:] + b"info a log line\n")
        child.childDataReceived(1, b"adaptive {not json\n")
    assert main.adaptive.all() == [("d2", figures)]
    assert [e for e in logged if "malformed adaptive line" in str(e.get("log_format"))]
    assert [e for e in logged if e.get("line") == "a log line"]
    child.processEnded(Failure(ProcessTerminated(signal=9)))  # type: ignore[no-untyped-call]
    assert main.adaptive.all() == []
