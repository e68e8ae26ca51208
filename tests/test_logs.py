"""The relay's log observer (smartrelay.logs): twistd's text, timestamps formatted once a second."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.scripts._twistd_unix import ServerOptions, UnixApplicationRunner

from smartrelay.delivery.processes import DeliveryProcesses, _Child
from smartrelay.logs import (
    PREFORMATTED,
    ClassicFormatter,
    child_log_observer,
    relay_log_observer,
    twistd_log_observer,
)
from smartrelay.reactor import IRelayReactor
from tests.support.run import write_relay_config


@pytest.fixture
def zone() -> Iterator[Any]:
    """Set the process's local time zone (TZ) for a test; restored after it."""
    before = os.environ.get("TZ")

    def set_zone(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()

    yield set_zone
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _event(when: float | None, **more: Any) -> LogEvent:
    event: dict[str, Any] = {
        "log_format": "{queue_id}: to=<{rcpt}> dest={dest} {state} reply={reply!r}",
        "log_level": LogLevel.info,
        "log_namespace": "smartrelay.delivery.manager",
        "queue_id": "0A1B2C3D4E5F",
        "rcpt": "user@example.test",
        "dest": "mx.example.test",
        "state": "delivered",
        "reply": "250 2.0.0 Ok: queued as 1234",
    }
    if when is not None:
        event["log_time"] = when
    event.update(more)
    return event


# Instants around second boundaries, both DST changes of 2026 in Europe and the US, a
# fraction that datetime rounds up to the next second, and times before 1970.
_INSTANTS = [
    _at("2026-12-06T04:59:59") + f
    for f in (0.0, 0.25, 0.5, 0.999, 0.9999994, 0.9999996, 0.99999999, 1.0, 1.000001, 1.5, 2.0)
] + [
    _at("2026-03-29T00:59:59"),
    _at("2026-03-29T00:59:59.7"),
    _at("2026-03-29T01:00:00"),
    _at("2026-03-29T01:00:00.3"),
    _at("2026-10-25T00:59:59.9"),
    _at("2026-10-25T01:00:00"),
    _at("2026-03-08T06:59:59.5"),
    _at("2026-03-08T07:00:00"),
    _at("2026-11-01T05:59:59.5"),
    _at("2026-11-01T06:00:00.5"),
    -0.5,
    -1.0,
    -1.25,
]


@pytest.mark.parametrize(
    "name", ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
)
def test_timestamps_are_the_old_observers_in_every_zone_and_across_seconds(
    zone: Any, name: str
) -> None:
    zone(name)
    formatter = ClassicFormatter()
    # In order (the cache sees each new second), then backwards and shuffled (it still does).
    for instants in (_INSTANTS, list(reversed(_INSTANTS)), _INSTANTS[::3] + _INSTANTS[1::3]):
        for when in instants:
            event = _event(when)
            assert formatter(event) == formatEventAsClassicLogText(event), (name, when)


def test_a_dst_change_shows_in_consecutive_seconds(zone: Any) -> None:
    zone("Europe/Berlin")
    formatter = ClassicFormatter()
    before = _at("2026-03-29T00:59:59.9")
    assert formatter.timestamp(before) == "2026-03-29T01:59:59+0100"
    assert formatter.timestamp(before + 0.1) == "2026-03-29T03:00:00+0200"
    assert formatter.timestamp(before + 0.05) == "2026-03-29T01:59:59+0100"


def test_the_text_is_the_old_observers_for_every_kind_of_event(zone: Any) -> None:
    zone("Europe/Berlin")
    when = _at("2026-12-06T05:00:00.123")
    events: list[LogEvent] = [
        _event(when),
        _event(None),
        _event(when, log_system="SMTP,0,127.0.0.1"),
        _event(when, log_level=None),
        _event(when, log_namespace=None),
        {"log_time": when, "log_format": "no level, no namespace"},
        _event(when, log_format="two\nlines and a\n\ttab"),
        _event(when, log_format="{missing} key"),  # unformattable: the old text says so
        _event(when, log_format=None),  # nothing to say: no line
        {"log_time": when, "message": ("legacy",), "log_system": "-", "log_format": None},
        _event(when, log_level=LogLevel.critical, reply="550 5.1.1 \u00fcnknown"),
        # What format strings can do, formatted by str.format_map or else by twisted.
        _event(
            when,
            log_format="{n:>6d}|{f:.2f}|{reply!r}|{rcpt!a}|{rcpt!s}|{{braces}}|{n:x}",
            n=1234,
            f=2.0 / 3,
            rcpt="j\u00fcrgen@example.test",
        ),
        _event(
            when,
            log_format="{thing.real} {table[key]} {items[1]} {thing.imag}",
            thing=3 + 4j,
            table={"key": "value"},
            items=["a", "b"],
        ),
        _event(when, log_format="{method()} {thing.conjugate()}", method=lambda: "called"),
        _event(when, log_format="{method()} then {missing}", method=lambda: "called"),
        _event(when, log_format="{items[9]}", items=[]),
        _event(when, log_format=b"bytes {queue_id}"),
        _event(when, log_format=42),
        _event(when, log_format="{bad}", bad=_Unformattable()),
        _event(when, log_format="{bad:>3}", bad=_Unformattable()),
    ]
    formatter = ClassicFormatter()
    for event in events:
        assert formatter(event) == formatEventAsClassicLogText(event), event


class _Unformattable:
    def __format__(self, spec: str) -> str:
        raise RuntimeError("no text for this")

    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


def _failure() -> Failure:
    try:
        raise ValueError("the database said no")
    except ValueError:
        return Failure()


def test_a_failure_is_logged_with_its_whole_traceback(zone: Any) -> None:
    zone("UTC")
    event = _event(
        _at("2026-12-06T05:00:01"),
        log_format="{queue_id}: recording outcomes failed",
        log_level=LogLevel.critical,
        log_failure=_failure(),
    )
    text = ClassicFormatter()(event)
    assert text == formatEventAsClassicLogText(event)
    assert text is not None
    lines = text.splitlines()
    assert lines[0] == (
        "2026-12-06T05:00:01+0000 [smartrelay.delivery.manager#critical]"
        " 0A1B2C3D4E5F: recording outcomes failed"
    )
    assert lines[1] == "\tTraceback (most recent call last):"
    assert lines[-2:] == ["\tbuiltins.ValueError: the database said no", "\t"]
    assert any("in _failure" in line for line in lines)


def test_the_observer_writes_each_event_whole_in_one_write(zone: Any) -> None:
    zone("UTC")

    class Writes(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return super().write(text)

    out = Writes()
    publisher = LogPublisher(relay_log_observer(out))
    log = Logger(namespace="smartrelay.smtp.backends", observer=publisher)
    log.info("{queue_id}: accepted from={sender}", queue_id="Q1", sender="a@b.test")
    log.failure("storing a message failed", _failure())
    assert len(out.writes) == 2
    first, second = out.writes
    assert first.endswith(" [smartrelay.smtp.backends#info] Q1: accepted from=a@b.test\n")
    assert second.count("\n") > 3 and "\n\tbuiltins.ValueError: the database said no\n" in second


def _owner() -> DeliveryProcesses:
    return DeliveryProcesses(
        cast(IRelayReactor, MemoryReactorClock()), 1, lambda i: ["true"], lambda: Deferred()
    )


def test_a_childs_lines_are_written_by_the_main_process_as_they_came(zone: Any) -> None:
    """The child formats (with its level and index); the main process writes those lines,
    tracebacks included, exactly as a single process would have, with no second format."""
    zone("America/New_York")
    when = _at("2026-12-06T05:00:02.5")
    child_out = io.StringIO()
    child = LogPublisher(child_log_observer(child_out, 3))
    delivered = _event(when)
    failed = _event(
        when + 1,
        log_format="{queue_id}: sending failed",
        log_level=LogLevel.critical,
        log_failure=_failure(),
    )
    child(dict(delivered))
    child(dict(failed))
    sent = child_out.getvalue()
    assert sent.startswith("info 2026-12-06T00:00:02-0500 [smartrelay.delivery.manager#info]")
    assert "\ncritical 2026-12-06T00:00:03-0500 [smartrelay.delivery.manager#critical]" in sent

    main_out = io.StringIO()
    seen: list[LogEvent] = []
    main = LogPublisher(relay_log_observer(main_out), cast(ILogObserver, seen.append))
    from smartrelay.delivery import processes

    before = processes.log.observer
    processes.log.observer = main
    try:
        receiver = _Child(_owner(), 3)
        data = sent.encode()
        # In pieces, cut inside a line and inside the traceback.
        for start in range(0, len(data), 97):
            receiver.childDataReceived(1, data[start : start + 97])
        receiver.childDataReceived(2, b"Fatal Python error: something\n")
    finally:
        processes.log.observer = before
    one_process = "".join(
        cast(str, formatEventAsClassicLogText(e))
        .replace("#info] ", "#info] delivery[3] ")
        .replace("#critical] ", "#critical] delivery[3] ")
        for e in (delivered, failed)
    )
    written = main_out.getvalue()
    assert written.startswith(one_process)
    # Levels kept for other observers; the whole lines are the events' text.
    assert [e["log_level"] for e in seen][:2] == [LogLevel.info, LogLevel.critical]
    assert all(PREFORMATTED in e for e in seen[:-1])
    # What the child wrote on its standard error is not formatted by it: logged here.
    assert written.splitlines()[-1].endswith(
        "[smartrelay.delivery.processes#error] delivery[3] Fatal Python error: something"
    )


def test_twistd_gets_the_observer_for_where_it_would_log(tmp_path: Path) -> None:
    calls: list[object] = []
    assert twistd_log_observer(None, calls.append) is None
    assert twistd_log_observer({"syslog": True, "nodaemon": True}, calls.append) is None
    assert twistd_log_observer({"logger": "x.y", "nodaemon": True}, calls.append) is None
    # twistd itself refuses a daemon logging to standard output.
    assert twistd_log_observer({"logfile": "-", "nodaemon": False}, calls.append) is None
    assert twistd_log_observer({"logfile": "-", "nodaemon": True}, calls.append) is not None
    assert twistd_log_observer({"logfile": None, "nodaemon": True}, calls.append) is not None
    path = tmp_path / "relay.log"
    handler = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        observer = twistd_log_observer({"logfile": str(path), "nodaemon": False}, calls.append)
        rotate = signal.getsignal(signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, handler)
    assert observer is not None
    Logger(namespace="test", observer=observer).info("hello {who}", who="log file")
    assert path.read_text().endswith(" [test#info] hello log file\n")
    # SIGUSR1 rotates the file, as with twistd's own observer.
    assert callable(rotate)
    rotate(signal.SIGUSR1, None)
    [log_file] = [c.__self__ for c in calls]  # type: ignore[attr-defined]
    assert isinstance(log_file, LogFile) and log_file.path == str(path)


def _twistd_application(*args: str) -> Any:
    """What twistd builds from its command line: its options, then the application (the
    plugin's service in it), as ``twistd ARGS`` does before it starts logging."""
    config = ServerOptions()  # type: ignore[no-untyped-call]
    config.parseOptions(list(args))  # type: ignore[no-untyped-call]
    return UnixApplicationRunner(config).createOrGetApplication()  # type: ignore[no-untyped-call]


def test_twistd_logs_through_the_relays_observer(tmp_path: Path) -> None:
    config = str(write_relay_config(tmp_path, f"sqlite:{tmp_path / 'var' / 'relay.db'}"))
    handler = signal.getsignal(signal.SIGUSR1)
    try:
        application = _twistd_application("-n", "--pidfile=", "smartrelay", "--config", config)
        observer = application.getComponent(ILogObserver)
        assert isinstance(observer, FileLogObserver)
        assert isinstance(observer.formatEvent, ClassicFormatter)
        assert observer._outFile is sys.stdout
        log_path = tmp_path / "twistd.log"
        application = _twistd_application(
            "--logfile", str(log_path), "--pidfile=", "smartrelay", "--config", config
        )
        observer = application.getComponent(ILogObserver)
        assert isinstance(observer, FileLogObserver)
        assert isinstance(observer._outFile, LogFile)
        assert observer._outFile.path == str(log_path)
        # twistd's own where it is told to: syslog.
        application = _twistd_application(
            "-n", "--syslog", "--pidfile=", "smartrelay", "--config", config
        )
        assert application.getComponent(ILogObserver) is None
    finally:
        signal.signal(signal.SIGUSR1, handler)
