"""A throwaway PostgreSQL server for tests: initdb + pg_ctl in a temp dir, on a free port."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2


class PostgresUnavailable(Exception):
    pass


def find_bindir() -> str:
    """PostgreSQL's server binaries (Debian keeps them off PATH, one folder per version)."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if shutil.which("initdb"):
        candidates.append(os.path.dirname(shutil.which("initdb") or ""))
    for bindir in candidates:
        if os.path.exists(os.path.join(bindir, "initdb")) and os.path.exists(
            os.path.join(bindir, "pg_ctl")
        ):
            return bindir
    raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A throwaway server. ``durable``: PostgreSQL's default durability (fsync on, for the
    benchmark); the tests turn fsync off."""

    def __init__(
        self, bindir: str, directory: str, port: int, as_postgres: bool, durable: bool = False
    ) -> None:
        self.bindir = bindir
        self.directory = directory
        self.port = port
        self._as_postgres = as_postgres
        self._durable = durable
        self._counter = 0

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._as_postgres:  # initdb and pg_ctl refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(args)} failed: {result.stderr or result.stdout}")

    def start(self) -> None:
        data = os.path.join(self.directory, "data")
        self._run(
            os.path.join(self.bindir, "initdb"),
            "-D",
            data,
            "-A",
            "trust",
            "-U",
            "postgres",
            # UTF8 whatever the environment's locale, as a production database is (message
            # bodies go as text to a UTF8 database: tests/test_postgres_bytea.py)
            "-E",
            "UTF8",
            "--locale=C",
            *(() if self._durable else ("--no-sync",)),
        )
        for attempt in range(3):
            try:
                self.start_again()
                return
            except PostgresUnavailable:
                # The free port was taken in the meantime (another test worker, another
                # suite on the machine): another one.
                if attempt == 2 or not self._port_was_taken():
                    raise
                self.port = free_port()

    def _port_was_taken(self) -> bool:
        try:
            with open(os.path.join(self.directory, "log"), errors="replace") as log:
                return "Address already in use" in log.read()
        except FileNotFoundError:
            return False

    def start_again(self) -> None:
        """``pg_ctl start`` on the data directory made by :meth:`start` (after a stop)."""
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
            f"{'' if self._durable else ' -c fsync=off'} -c max_connections=200"
        )
        # -l: the server must not inherit our pipes (subprocess.run would wait for it).
        self._run(
            os.path.join(self.bindir, "pg_ctl"),
            "-D",
            os.path.join(self.directory, "data"),
            "-o",
            options,
            "-l",
            os.path.join(self.directory, "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "immediate") -> None:
        """``pg_ctl stop -m MODE`` (``fast`` is what ``pg_ctl restart`` does first)."""
        data = os.path.join(self.directory, "data")
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", data, "-m", mode, "-w", "stop")

    def restart(self, down_for: float = 0.0) -> None:
        """What ``pg_ctl restart`` does (a fast shutdown: sessions are terminated, then a
        start), with the server kept down ``down_for`` seconds in between."""
        self.stop("fast")
        time.sleep(down_for)
        self.start_again()

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        self._counter += 1
        name = f"test_{os.getpid()}_{self._counter}"
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        conn.close()
        return self.dsn(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url`` (made by :meth:`create_database`), closing what is
        still connected to it. Each is 7.5 MB: the data directory of a whole session's
        databases took 30 s to 2 min to remove at the end (on a loaded machine)."""
        name = url.rsplit("/", 1)[1]
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


@contextmanager
def running_postgres(durable: bool = False) -> Iterator[PostgresServer]:
    bindir = find_bindir()
    as_postgres = os.geteuid() == 0
    directory = tempfile.mkdtemp(prefix="smartrelay-pg-")
    try:
        if as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(directory, pw.pw_uid, pw.pw_gid)
        server = PostgresServer(bindir, directory, free_port(), as_postgres, durable)
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
