"""Shared fixtures: a throwaway PostgreSQL for the session, and the storage engine matrix."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from smartrelay.reactor import IRelayReactor, as_relay_reactor
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import IDatabaseEngine
from smartrelay.storage.migrations import migrate
from smartrelay.storage.store import Store
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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        with running_postgres() as server:
            yield server
    except PostgresUnavailable as e:
        service_missing(str(e))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database, once per engine."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'smartrelay.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


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
