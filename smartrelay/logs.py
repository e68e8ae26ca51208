"""The relay's log lines: twistd's classic text format, written with less Python per line.

twistd's own observer (``textFileLogObserver``) formats every line's timestamp from scratch:
a local time zone from two ``datetime`` constructions, then ``strftime``. At a few thousand
lines a second that was a visible share of the main process (docs/performance.md, "Logging").
:class:`ClassicFormatter` writes the very same text (``TIMESTAMP [SYSTEM] TEXT``, the lines
of a multi-line text, e.g. a traceback, after a tab), formatting a timestamp once a second
and an event's text with ``str.format_map`` where that gives twisted's text
(:func:`_event_text`).

A delivery process formats its own lines the same way (with its level in front, for the main
process, and ``delivery[N]`` before the text); the main process writes them as they came
(:data:`PREFORMATTED`), without parsing or formatting them again.

twistd is given this observer by the plugin (:func:`twistd_log_observer`) unless told to log
to syslog or to use another observer (``--syslog``, ``--logger``).
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    eventAsText,
    formatTime,
)
from twisted.python import logfile

#: An event with this key (a ``str``: a whole line, timestamp and system included, no final
#: newline) is written as it is by :class:`ClassicFormatter` (a delivery process's line).
PREFORMATTED = "smartrelay_line"

#: A fraction of a second from which ``datetime`` rounds up to the next second (to the
#: microsecond): such a timestamp is formatted on its own, never from the cached second.
_ROUNDS_UP = 0.9999995


class ClassicFormatter:
    """``formatEventAsClassicLogText`` (twistd's format and time format), cheaper.

    ``level_prefix``: each event's first line starts with its level's name and a space (a
    delivery process's lines, for the main process); ``text_prefix`` comes before the
    event's text (``delivery[N] ``).
    """

    def __init__(
        self,
        text_prefix: str = "",
        level_prefix: bool = False,
        format_time: Callable[[float], str] = formatTime,
    ) -> None:
        self._text_prefix = text_prefix
        self._level_prefix = level_prefix
        self._format_time = format_time
        # (second, its text), one tuple: an observer may be called from several threads.
        self._cached: tuple[float, str] = (math.nan, "")

    def timestamp(self, when: float | None) -> str:
        """``formatTime(when)``, formatted once for all the events of a second."""
        if when is None:
            return "-"
        second = math.floor(when)
        if when - second >= _ROUNDS_UP:
            return self._format_time(when)
        cached_second, stamp = self._cached
        if second != cached_second:
            # The offset from UTC only changes on a whole second: the second's text holds
            # for every instant in it.
            stamp = self._format_time(float(second))
            self._cached = (second, stamp)
        return stamp

    def __call__(self, event: LogEvent) -> str | None:
        line = event.get(PREFORMATTED)
        if isinstance(line, str):
            return line + "\n"
        text = _event_text(event)
        if not text:
            return None
        level = event.get("log_level")
        system = event.get("log_system")
        if system is None:
            name = "-" if level is None else level.name
            system = f"{event.get('log_namespace', '-')}#{name}"
        else:
            try:
                system = str(system)
            except Exception:
                system = "UNFORMATTABLE"
        when = event.get("log_time")
        text = f"{self.timestamp(when)} [{system}] {self._text_prefix}{text}"
        text = text.replace("\n", "\n\t") + "\n"
        if self._level_prefix:
            return f"{getattr(level, 'name', 'info')} {text}"
        return text


def _event_text(event: LogEvent) -> str:
    """``eventAsText(event)`` without timestamp and system: for the usual event (a ``str``
    format of the event's keys, no failure, no ``{key()}`` call) ``str.format_map``, which
    gives the same text several times faster than twisted's formatter; else twisted's."""
    form = event.get("log_format")
    if (
        type(form) is str
        and "log_failure" not in event
        and "log_flattened" not in event
        and "()" not in form
    ):
        try:
            return form.format_map(event)
        except Exception:
            pass  # twisted says what could not be formatted
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


def relay_log_observer(out: IO[Any], text_prefix: str = "") -> ILogObserver:
    """The relay's observer: classic lines on ``out``, each written and flushed whole."""
    return FileLogObserver(out, ClassicFormatter(text_prefix))


def child_log_observer(out: IO[Any], index: int, kind: str = "delivery") -> ILogObserver:
    """A child process's observer: ``LEVEL TIMESTAMP [SYSTEM] KIND[N] TEXT`` lines on
    ``out`` (the pipe to the main process), each event in one write."""
    return FileLogObserver(out, ClassicFormatter(f"{kind}[{index}] ", level_prefix=True))


def twistd_log_observer(
    twistd: Any, call_from_thread: Callable[..., object]
) -> ILogObserver | None:
    """The observer for the file twistd would log to, from twistd's options (``--logfile``,
    ``--nodaemon``), as ``twistd``'s ``UnixAppLogger`` opens it (``twistd.log`` when
    daemonised, rotated on SIGUSR1); None where twistd's own is kept (``--syslog``,
    ``--logger``, ``--logfile=-`` without ``-n``, which twistd refuses)."""
    if twistd is None or twistd.get("syslog") or twistd.get("logger"):
        return None
    name = twistd.get("logfile")
    nodaemon = bool(twistd.get("nodaemon") or twistd.get("debug"))
    out: IO[Any]
    if name == "-" or (nodaemon and not name):
        if not nodaemon:
            return None
        out = sys.stdout
    else:
        log_file = logfile.LogFile.fromFullPath(name or "twistd.log")  # type: ignore[no-untyped-call]
        if not signal.getsignal(signal.SIGUSR1):

            def rotate(signum: int, frame: object) -> None:
                call_from_thread(log_file.rotate)

            signal.signal(signal.SIGUSR1, rotate)
        out = log_file
    return relay_log_observer(out)
