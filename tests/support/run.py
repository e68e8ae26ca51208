"""Run SmartRelay's console scripts (``smartrelay-ctl``, ``twistd smartrelay``) as users do.

Black-box helpers: a config file written in a temp dir, the real scripts of the venv in a
subprocess, and a direct look at the database (sqlite3 or psycopg2) to check what they stored.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2

BIN = Path(sys.executable).parent
CTL = BIN / "smartrelay-ctl"
TWISTD = BIN / "twistd"
ERROR_PREFIX = "smartrelay-ctl: error:"


def write_config(directory: Path, database_url: str, extra: str = "") -> Path:
    """``smartrelay.toml`` in ``directory`` with ``[database] url`` and any ``extra`` TOML."""
    path = directory / "smartrelay.toml"
    # A JSON string is a valid TOML basic string for any URL.
    path.write_text(f"[database]\nurl = {json.dumps(database_url)}\n{extra}", encoding="utf-8")
    return path


ANY_PORT = "tcp:0:interface=127.0.0.1"


def write_relay_config(
    directory: Path, database_url: str, extra: str = "", smtp_listen: str = ANY_PORT
) -> Path:
    """A config for a whole relay that touches nothing outside ``directory``.

    Listeners on free loopback ports (port 0), keys and certificates under ``directory``.
    """
    var = directory / "var"
    any_port = ANY_PORT
    return write_config(
        directory,
        database_url,
        f'[server]\nhostname = "relay.test"\ndata_dir = {json.dumps(str(var))}\n'
        f"[smtp]\nlisten = [{json.dumps(smtp_listen)}]\n"
        f"[inbound]\nlisten = [{json.dumps(any_port)}]\n"
        f"[rewrap]\nsecret_file = {json.dumps(str(var / 'secret.key'))}\n"
        f"[web]\nlisten = {json.dumps(any_port)}\n{extra}",
    )


@dataclass(frozen=True)
class Result:
    args: Sequence[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def describe(self) -> str:
        return (
            f"{' '.join(self.args)} -> {self.returncode}\n"
            f"stdout: {self.stdout!r}\nstderr: {self.stderr!r}"
        )


def ctl(config: Path, *args: str, stdin: str = "", timeout: float = 60.0) -> Result:
    """Run ``smartrelay-ctl --config CONFIG ARGS...``; stdin is always a pipe (never a tty).

    A command still running after ``timeout`` seconds is killed and fails the test.
    """
    command = [str(CTL), "--config", str(config), *args]
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(
            f"{' '.join(command)} still running after {timeout} s (killed);"
            f" stdout: {expired.stdout!r}, stderr: {expired.stderr!r}"
        ) from None
    return Result(command, done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class Call:
    """One ``smartrelay-ctl`` command line (after ``--config``) and its standard input."""

    args: tuple[str, ...]
    stdin: str = ""


def call(*args: str, stdin: str = "") -> Call:
    return Call(args, stdin)


def ctl_all(config: Path, *calls: Call) -> list[Result]:
    """Run independent commands at the same time (each costs ~0.5 s of start-up); in order."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda c: ctl(config, *c.args, stdin=c.stdin), calls))


def assert_ok(result: Result) -> Result:
    assert result.returncode == 0, result.describe()
    assert result.stderr == "", result.describe()
    return result


def assert_cli_error(result: Result, *fragments: str) -> str:
    """A failed command: exit 1, nothing on stdout, one ``smartrelay-ctl: error:`` line."""
    assert result.returncode == 1, result.describe()
    assert result.stdout == "", result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.describe()
    line = lines[0]
    assert line.startswith(ERROR_PREFIX), result.describe()
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


# -- the database, looked at directly ---------------------------------------------------------
def query(url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement (``?`` placeholders) on the database at ``url``; commit; rows if any."""
    if url.startswith("sqlite:"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:"))) as db, db:
            return [tuple(row) for row in db.execute(sql, tuple(params)).fetchall()]
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute(sql.replace("?", "%s"), tuple(params))
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
    finally:
        conn.close()


def schema_versions(url: str) -> list[int]:
    """The schema deltas recorded as applied, in order."""
    return [int(v) for (v,) in query(url, "SELECT version FROM schema_version ORDER BY version")]


# -- twistd ------------------------------------------------------------------------------------
def twistd_command(config: Path) -> list[str]:
    return [str(TWISTD), "-n", "--pidfile=", "smartrelay", "--config", str(config)]


class Twistd:
    """``twistd -n smartrelay`` in the background; its output (stdout+stderr) read by a thread."""

    def __init__(
        self,
        config: Path,
        cwd: Path,
        preexec: Callable[[], None] | None = None,
        new_session: bool = False,
    ) -> None:
        """``preexec``: run in the child before twistd (e.g. to set resource limits);
        ``new_session``: its own process group, to signal it and its children together."""
        self.process = subprocess.Popen(
            twistd_command(config),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=preexec,
            start_new_session=new_session,
        )
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self._lines)

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        """The first output line containing ``text``; waits for it up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    why = "twistd ended" if self._ended else f"no line after {timeout} s"
                    raise AssertionError(f"{why} containing {text!r}; output:\n{self.output}")
                self._changed.wait(remaining)

    def stop(self, signum: signal.Signals, timeout: float = 10.0) -> int:
        """Send ``signum``; the exit status (it must exit within ``timeout`` seconds)."""
        self.process.send_signal(signum)
        return self.wait(timeout)

    def wait(self, timeout: float = 15.0) -> int:
        returncode = self.process.wait(timeout)
        self._reader.join(timeout)
        return returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextmanager
def running_twistd(
    config: Path,
    cwd: Path,
    preexec: Callable[[], None] | None = None,
    new_session: bool = False,
) -> Iterator[Twistd]:
    """A started twistd that is killed on the way out, whatever the test did."""
    server = Twistd(config, cwd, preexec, new_session)
    try:
        yield server
    finally:
        server.kill()


def run_twistd(config: Path, cwd: Path, timeout: float = 15.0) -> Result:
    """twistd to its end (for runs that must fail at start); stderr merged into stdout."""
    command = twistd_command(config)
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout
        raise AssertionError(
            f"{' '.join(command)} still running after {timeout} s (killed); output:\n{output}"
        ) from None
    return Result(command, done.returncode, done.stdout, "")
