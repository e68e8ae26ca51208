"""Shared fixtures: a throwaway PostgreSQL for the session, and the storage engine matrix."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from smartrelay.reactor import IRelayReactor, as_relay_reactor
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import IDatabaseEngine
from smartrelay.storage.migrations import migrate
from smartrelay.storage.store import Store
from tests.support.delivery_relay import DeliveryRelays, Sinks
from tests.support.postfix import PostfixSink, find_postfix_tool, running_postfix_sink
from tests.support.postgres import PostgresServer, PostgresUnavailable, running_postgres

REQUIRE_SERVICES = os.environ.get("SMARTRELAY_REQUIRE_SERVICES") == "1"


def real_reactor() -> IRelayReactor:
    """The reactor pytest-twisted runs (tests, unlike the package, may take the global one)."""
    from twisted.internet import reactor

    return as_relay_reactor(reactor)


def service_missing(reason: str) -> None:
    """Skip a test whose real service is missing, or fail it when services are required."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (SMARTRELAY_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@contextmanager
def started_postfix_sink(options: Sequence[str] = ()) -> Iterator[PostfixSink]:
    """Postfix's ``smtp-sink`` (with ``options``) on a free port, dumping what it gets."""
    path = find_postfix_tool("smtp-sink")
    if path is None:
        service_missing("postfix smtp-sink not installed")
        raise AssertionError("unreachable")
    with running_postfix_sink(path, options) as sink:
        yield sink


@pytest.fixture
def postfix_sink() -> Iterator[PostfixSink]:
    with started_postfix_sink() as sink:
        yield sink


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        with running_postgres() as server:
            yield server
    except PostgresUnavailable as e:
        service_missing(str(e))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database, once per engine (a PostgreSQL one is dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'smartrelay.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)


@pytest_twisted.async_yield_fixture
async def engine(database_url: str) -> AsyncIterator[IDatabaseEngine]:
    """A started engine on a fresh, migrated database (both engines)."""
    engine = create_engine(real_reactor(), database_url)
    await engine.start()
    await migrate(engine, 0)
    yield engine
    await engine.close()


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock


@pytest.fixture
def store(engine: IDatabaseEngine, clock: Clock) -> Store:
    return Store(engine, clock)


DKIM_VERIFIER = Path(__file__).parent / "support" / "dkim_verify.pl"
PerlVerify = Callable[[bytes, Mapping[str, str]], list[str]]


@pytest.fixture(scope="module")
def perl_verify_available() -> bool:
    if shutil.which("perl") is None:
        return False
    probe = subprocess.run(
        ["perl", "-MMail::DKIM::Verifier", "-MNet::DNS", "-e", "1"],
        capture_output=True,
        timeout=60,
    )
    return probe.returncode == 0


@pytest.fixture
def perl_verify(perl_verify_available: bool) -> PerlVerify:
    """Runs tests/support/dkim_verify.pl: its output lines (first: the overall result)."""
    if not perl_verify_available:
        service_missing("libmail-dkim-perl not installed")

    def run(message: bytes, records: Mapping[str, str]) -> list[str]:
        keys = "".join(f"{name} {record}\n" for name, record in records.items())
        done = subprocess.run(
            ["perl", str(DKIM_VERIFIER)],
            input=message,
            capture_output=True,
            timeout=60,
            env={**os.environ, "DKIM_TEST_KEYS": keys},
        )
        assert done.returncode in (0, 1), done.stderr.decode(errors="replace")
        lines = done.stdout.decode().splitlines()
        assert lines, done.stderr.decode(errors="replace")
        assert (done.returncode == 0) == (lines[0] == "pass")
        return lines

    return run


@pytest_twisted.async_yield_fixture
async def sinks() -> AsyncIterator[Sinks]:
    """In-process SMTP sinks (tests/support/sink.py), stopped after the test."""
    running = Sinks(real_reactor())
    try:
        yield running
    finally:
        await running.stop_all()


@pytest_twisted.async_yield_fixture
async def relays(tmp_path: Path, sinks: Sinks) -> AsyncIterator[DeliveryRelays]:
    """Relays of one test; stopped before the sinks (they depend on them) so they QUIT."""
    runner = DeliveryRelays(real_reactor(), tmp_path)
    try:
        yield runner
    finally:
        await runner.stop_all()
