"""MTA-STS (RFC 8461) on ``mx`` routes, with real sockets on loopback: a DNS server for the
``_mta-sts`` TXT record and the MX, an HTTPS policy server and STARTTLS sinks whose
certificates come from a throwaway CA, and a delivery manager against a real store (both
engines)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import Store as X509Store
from twisted.internet.defer import succeed
from twisted.internet.interfaces import IResolver
from twisted.names import client

from smartrelay.config import parse_config
from smartrelay.delivery.client import SmtpConnector
from smartrelay.delivery.manager import DeliveryManager
from smartrelay.delivery.mta_sts import (
    POLICY_SIZE_LIMIT,
    MtaSts,
    PolicyFetcher,
    PolicyInvalid,
    StsError,
    check_certificate,
    name_matches,
    parse_policy,
    parse_sts_record,
)
from smartrelay.delivery.mx import MxResolver
from smartrelay.storage.interfaces import IDatabaseEngine
from smartrelay.storage.mta_sts import TlsResultRow
from smartrelay.storage.store import NewMessage, Store
from tests.conftest import real_reactor
from tests.support.delivery_relay import Event, Sinks, TrackingSinkBackend, events, eventually
from tests.support.dnsserver import MX, TXT, A, StartDns, dns_server
from tests.support.manager import chain_factory
from tests.support.sts import PolicyServer, TestCa, policy_text

__all__ = ["dns_server"]  # the fixture, used here

DOMAIN = "a.test"


# -- parsing and matching --------------------------------------------------------------------
def test_sts_txt_record() -> None:
    assert parse_sts_record(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_sts_record(["v=STSv1;id=abc"]) == "abc"
    assert parse_sts_record(["v=spf1 -all", "v=STSv1; id=1"]) == "1"  # others ignored
    assert parse_sts_record(["v=STSv1; id=1", "v=STSv1; id=2"]) is None  # two: none
    assert parse_sts_record(["v=STSv1; id=not-alnum"]) is None
    assert parse_sts_record(["v=STSv1; id=" + "a" * 33]) is None
    assert parse_sts_record(["v=STSv1"]) is None
    assert parse_sts_record(["v=STSv2; id=1"]) is None
    assert parse_sts_record([]) is None


def test_policy_body() -> None:
    assert parse_policy(policy_text("enforce", "mx1.a.test", "*.b.test").decode()) == (
        "enforce",
        ("mx1.a.test", "*.b.test"),
        86400,
    )
    # LF line ends, unknown keys ignored, max_age capped at a year, mx optional for none.
    assert parse_policy("version: STSv1\nmode: none\nfoo: bar\nmax_age: 9999999999\n") == (
        "none",
        (),
        31_557_600,
    )
    bad = {
        "mode: enforce\nmx: a.test\nmax_age: 1": "version",
        "version: STSv1\nmode: enforcing\nmx: a.test\nmax_age: 1": "mode",
        "version: STSv1\nmode: enforce\nmax_age: 1": "no mx",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1": "max_age",
        "version: STSv1\nmode: enforce\nmx: a b\nmax_age: 1": "mx pattern",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n<html>": "line without",
    }
    for text, why in bad.items():
        with pytest.raises(PolicyInvalid, match=why):
            parse_policy(text)


def test_mx_patterns() -> None:
    assert name_matches("mx.a.test", "MX.A.test.")
    assert name_matches("*.a.test", "mx1.a.test")
    assert not name_matches("*.a.test", "a.test")
    assert not name_matches("*.a.test", "x.mx1.a.test")  # one label only
    assert not name_matches("mx.a.test", "mx.a.test.evil")


def test_certificate_checks() -> None:
    ca, other = TestCa(), TestCa("another CA")
    now = time.time()

    def der(*names: str, issuer: TestCa = ca, days: tuple[int, int] = (-1, 30)) -> list[bytes]:
        _, certificate = issuer.issue(*names, days=days)
        return [certificate.public_bytes(Encoding.DER)]

    roots = [ca.certificate]
    assert check_certificate(der("mx.a.test"), "mx.a.test", roots, now) is None
    assert check_certificate(der("*.a.test"), "mx.a.test", roots, now) is None
    assert check_certificate(der("mx.a.test"), "mx.a.test", X509Store(roots), now) is None
    mismatch = check_certificate(der("other.test"), "mx.a.test", roots, now)
    assert mismatch == ("certificate-host-mismatch", "it names other.test")
    expired = check_certificate(der("mx.a.test", days=(-10, -1)), "mx.a.test", roots, now)
    assert expired is not None and expired[0] == "certificate-expired"
    untrusted = check_certificate(der("mx.a.test", issuer=other), "mx.a.test", roots, now)
    assert untrusted is not None and untrusted[0] == "certificate-not-trusted"
    assert check_certificate([], "mx.a.test", roots, now) == (
        "certificate-not-trusted",
        "no certificate",
    )


# -- the world of one test -------------------------------------------------------------------
class SwitchableResolver:
    """Forwards lookups to the resolver of the DNS server current now (to change a zone)."""

    def __init__(self, port: int) -> None:
        self.current: Any = None
        self.point_at(port)

    def point_at(self, port: int) -> None:
        make: Any = client.Resolver
        self.current = make(servers=[("127.0.0.1", port)], reactor=real_reactor())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current, name)


def zone(policy_id: str = "1", mx: str = "localhost") -> dict[str, dict[str, list[Any]]]:
    return {
        DOMAIN: {
            DOMAIN: [MX(mx)],
            f"_mta-sts.{DOMAIN}": [TXT(f"v=STSv1; id={policy_id};")],
            f"mta-sts.{DOMAIN}": [A("127.0.0.1")],
        },
        "plain.test": {"plain.test": [MX("localhost")]},
    }


class World:
    def __init__(self, store: Store, sinks: Sinks, dns: StartDns, directory: Path) -> None:
        self.reactor = real_reactor()
        self.store = store
        self.sinks = sinks
        self.dns = dns
        self.directory = directory
        self.ca = TestCa()
        self.switch = SwitchableResolver(dns(zone()))
        self.resolver = cast(IResolver, self.switch)
        self.policy = PolicyServer(self.reactor)
        self.https_port = self.policy.start(self.ca.server_options(f"mta-sts.{DOMAIN}"))
        self.backend = TrackingSinkBackend()
        self.mx = MxResolver(self.resolver, self.reactor, port=0)
        self._sink: Any = None
        self.manager: DeliveryManager | None = None
        self.sts: MtaSts | None = None

    async def sink(self, *names: str) -> Any:
        """A STARTTLS sink whose certificate names ``names``; the MX port points at it (and
        the connections to the sink before it are closed)."""
        await self.drop_connections()
        factory, port = await self.sinks.start(self.backend, self.ca.server_options(*names))
        self.mx.port = port
        self._sink = factory
        return factory

    async def drop_connections(self) -> None:
        """Close the sink's connections: the next message opens a new session."""
        sink = self._sink
        if sink is None:
            return
        for protocol in list(sink.connections):
            protocol.transport.loseConnection()

        async def closed() -> bool | None:
            return True if not sink.connections else None

        await eventually(self.reactor, closed, "the sink's connections closed", within=10)

    def start(self) -> MtaSts:
        fetcher = PolicyFetcher(
            self.reactor,
            self.resolver,
            [self.ca.certificate],
            port=self.https_port,
        )
        self.sts = MtaSts(
            self.reactor,
            self.resolver,
            fetcher.fetch,
            [self.ca.certificate],
            txt_recheck=0,
        )
        delivery = parse_config({"delivery": {"routes": {"*": "mx"}}}).delivery
        self.manager = DeliveryManager(
            self.reactor,
            delivery,
            lambda: succeed(self.store),
            self.mx,
            SmtpConnector(self.reactor, "relay.test", 10.0, "opportunistic"),
            chain_factory(self.directory),
            mta_sts=self.sts,
        )
        self.manager.startService()
        return self.sts

    async def stop(self) -> None:
        if self.manager is not None:
            manager, self.manager = self.manager, None
            await manager.stopService()
        await self.policy.stop()

    async def send(self, recipient: str) -> str:
        queued = await self.store.queue_message(
            NewMessage("app@example.com", (recipient,), b"Subject: hi\r\n\r\nhello\r\n")
        )
        return queued.queue_id

    async def outcome(self, queue_id: str) -> Event:
        async def check() -> Event | None:
            found = [
                e
                for e in await events(self.store, queue_id=queue_id)
                if e.type in ("delivered", "deferred", "bounced")
            ]
            return found[0] if found else None

        return await eventually(self.reactor, check, f"an outcome of {queue_id}", within=30)

    async def results(self, wanted: int) -> list[TlsResultRow]:
        async def check() -> list[TlsResultRow] | None:
            rows = await self.store.tls_results("0000-00-00", "9999-12-31")
            return rows if sum(r.sessions for r in rows) >= wanted else None

        return await eventually(self.reactor, check, f"{wanted} TLS result(s)", within=15)


@pytest_twisted.async_yield_fixture
async def world(
    engine: IDatabaseEngine, sinks: Sinks, dns_server: StartDns, tmp_path: Path
) -> AsyncIterator[World]:
    # The store on the reactor's clock, as the manager's: a message's age is real time.
    running = World(Store(engine, real_reactor()), sinks, dns_server, tmp_path)
    try:
        yield running
    finally:
        await running.stop()


def _summary(rows: list[TlsResultRow]) -> set[tuple[str, str, str, str, int]]:
    return {(r.policy_domain, r.mode, r.result, r.mx_host, r.sessions) for r in rows}


# -- delivery under a policy -----------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_enforce_matching_mx_valid_certificate_delivers(world: World) -> None:
    world.policy.resource.body = policy_text("enforce", "localhost")
    await world.sink("localhost")
    world.start()
    outcome = await world.outcome(await world.send(f"r@{DOMAIN}"))
    assert outcome.type == "delivered", outcome
    assert outcome.data["tls"] is True
    assert len(world.backend.messages) == 1
    await world.stop()  # writes the results counted so far
    rows = await world.store.tls_results("0000-00-00", "9999-12-31")
    assert _summary(rows) == {(DOMAIN, "enforce", "success", "localhost", 1)}
    stored = await world.store.load_sts_policy(DOMAIN)
    assert stored is not None and (stored.policy_id, stored.mode) == ("1", "enforce")
    assert stored.mx == ("localhost",) and stored.max_age == 86400


@pytest_twisted.ensureDeferred
async def test_enforce_certificate_for_another_name_defers(world: World) -> None:
    world.policy.resource.body = policy_text("enforce", "localhost")
    factory = await world.sink("mx.elsewhere.test")
    world.start()
    outcome = await world.outcome(await world.send(f"r@{DOMAIN}"))
    assert outcome.type == "deferred", outcome
    assert outcome.data["reply"] == (
        "451 4.4.1 MTA-STS: certificate not valid for localhost (it names mx.elsewhere.test)"
    )
    assert world.backend.messages == [] and factory.total_connections >= 1
    rows = await world.results(1)
    assert (DOMAIN, "enforce", "certificate-host-mismatch", "localhost") in {
        s[:4] for s in _summary(rows)
    }


@pytest_twisted.ensureDeferred
async def test_enforce_mx_not_in_policy_defers_without_connecting(world: World) -> None:
    world.policy.resource.body = policy_text("enforce", "mx.a.test", "*.mail.a.test")
    factory = await world.sink("localhost")
    world.start()
    outcome = await world.outcome(await world.send(f"r@{DOMAIN}"))
    assert outcome.type == "deferred", outcome
    assert outcome.data["reply"] == (
        "451 4.4.1 MTA-STS: localhost does not match the policy of a.test"
        " (mx mx.a.test, *.mail.a.test)"
    )
    assert factory.total_connections == 0
    rows = await world.results(1)
    assert _summary(rows) == {(DOMAIN, "enforce", "validation-failure", "localhost", 1)}


@pytest_twisted.ensureDeferred
async def test_testing_mode_delivers_and_records_the_failure(world: World) -> None:
    world.policy.resource.body = policy_text("testing", "localhost")
    await world.sink("mx.elsewhere.test")
    world.start()
    outcome = await world.outcome(await world.send(f"r@{DOMAIN}"))
    assert outcome.type == "delivered", outcome
    assert len(world.backend.messages) == 1
    rows = await world.results(1)
    assert _summary(rows) == {(DOMAIN, "testing", "certificate-host-mismatch", "localhost", 1)}


@pytest_twisted.ensureDeferred
async def test_domain_without_policy_delivers_as_before(world: World) -> None:
    world.policy.resource.body = policy_text("enforce", "mx.nowhere.test")
    await world.sink("mx.elsewhere.test")
    sts = world.start()
    outcome = await world.outcome(await world.send("r@plain.test"))
    assert outcome.type == "delivered", outcome
    assert world.policy.requests == 0 and sts.fetches == 0


@pytest_twisted.ensureDeferred
async def test_cached_policy_is_enforced_while_the_policy_server_is_down(
    world: World,
) -> None:
    """A cached, unexpired policy outlives its server: in memory, and (a new MtaSts, as after
    a restart or on another node) from the database."""
    world.policy.resource.body = policy_text("enforce", "localhost")
    await world.sink("localhost")
    sts = world.start()
    first = await world.outcome(await world.send(f"r1@{DOMAIN}"))
    assert first.type == "delivered", first
    await world.policy.stop()
    await world.sink("mx.elsewhere.test")  # the MX now shows a certificate for another name
    second = await world.outcome(await world.send(f"r2@{DOMAIN}"))
    assert second.type == "deferred", second
    assert "MTA-STS: certificate not valid for localhost" in second.data["reply"]
    assert sts.fetches == 1
    # A fresh cache (restart) reads the policy from the database: still enforced, no fetch.
    assert world.manager is not None
    await world.manager.stopService()
    world.manager = None
    restarted = world.start()
    third = await world.outcome(await world.send(f"r3@{DOMAIN}"))
    assert third.type == "deferred", third
    assert "MTA-STS: certificate not valid for localhost" in third.data["reply"]
    assert restarted.fetches == 0
    assert len(world.backend.messages) == 1


@pytest_twisted.ensureDeferred
async def test_new_policy_id_fetches_the_policy_again(world: World) -> None:
    world.policy.resource.body = policy_text("enforce", "localhost")
    await world.sink("localhost")
    sts = world.start()
    first = await world.outcome(await world.send(f"r1@{DOMAIN}"))
    assert first.type == "delivered", first
    assert world.policy.requests == 1
    # The same id: the cached policy, no fetch (on a new connection).
    await world.drop_connections()
    again = await world.outcome(await world.send(f"r2@{DOMAIN}"))
    assert again.type == "delivered", again
    assert world.policy.requests == 1
    # A new id in DNS and a new policy that names other MX hosts: fetched and applied.
    world.policy.resource.body = policy_text("enforce", "mx.a.test")
    world.switch.point_at(world.dns(zone(policy_id="2")))
    await world.drop_connections()
    changed = await world.outcome(await world.send(f"r3@{DOMAIN}"))
    assert changed.type == "deferred", changed
    assert "MTA-STS: localhost does not match the policy of a.test" in changed.data["reply"]
    assert world.policy.requests == 2 and sts.fetches == 2
    stored = await world.store.load_sts_policy(DOMAIN)
    assert stored is not None and (stored.policy_id, stored.mx) == ("2", ("mx.a.test",))


@pytest_twisted.ensureDeferred
async def test_failed_fetch_of_a_new_id_keeps_the_cached_policy(world: World) -> None:
    world.policy.resource.body = policy_text("enforce", "localhost")
    await world.sink("localhost")
    sts = world.start()
    first = await world.outcome(await world.send(f"r1@{DOMAIN}"))
    assert first.type == "delivered", first
    world.policy.resource.status = 500
    world.switch.point_at(world.dns(zone(policy_id="2")))
    await world.sink("mx.elsewhere.test")
    second = await world.outcome(await world.send(f"r2@{DOMAIN}"))
    assert second.type == "deferred", second  # policy 1 still enforced (RFC 8461 5.1)
    assert "MTA-STS: certificate not valid for localhost" in second.data["reply"]
    assert sts.fetches == 2
    rows = await world.results(3)
    assert {(r.policy_id, r.result) for r in rows} == {
        ("1", "success"),
        ("2", "sts-policy-fetch-error"),
        ("1", "certificate-host-mismatch"),
    }


@pytest_twisted.ensureDeferred
async def test_policy_fetch_failure_without_cache_delivers_and_records(world: World) -> None:
    world.policy.resource.status = 301
    world.policy.resource.location = b"https://evil.test/.well-known/mta-sts.txt"
    world.policy.resource.body = policy_text("enforce", "nothing.test")
    await world.sink("mx.elsewhere.test")
    world.start()
    outcome = await world.outcome(await world.send(f"r@{DOMAIN}"))
    assert outcome.type == "delivered", outcome  # as without a policy (RFC 8461 5)
    rows = await world.results(1)
    assert _summary(rows) == {(DOMAIN, "", "sts-policy-fetch-error", "", 1)}
    assert "HTTP 301" in rows[0].detail
    assert world.policy.requests == 1  # the redirect was not followed


# -- the fetcher on its own ------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_fetcher_refuses_what_is_not_a_policy(world: World) -> None:
    fetcher = PolicyFetcher(
        world.reactor,
        world.resolver,
        [world.ca.certificate],
        port=world.https_port,
    )
    resource = world.policy.resource
    resource.body = policy_text("enforce", "mx.a.test")
    assert await fetcher.fetch(DOMAIN) == resource.body.decode()
    resource.content_type = b"text/html"
    with pytest.raises(PolicyInvalid, match="not text/plain"):
        await fetcher.fetch(DOMAIN)
    resource.content_type = b"text/plain; charset=utf-8"
    resource.body = b"x" * (POLICY_SIZE_LIMIT + 1)
    with pytest.raises(PolicyInvalid, match="bytes"):
        await fetcher.fetch(DOMAIN)
    resource.body = b"ok"
    resource.status = 404
    with pytest.raises(StsError, match="HTTP 404"):
        await fetcher.fetch(DOMAIN)
    # A certificate from a CA we do not trust: the webpki failure of RFC 8460.
    untrusting = PolicyFetcher(
        world.reactor,
        world.resolver,
        [TestCa().certificate],
        port=world.https_port,
    )
    with pytest.raises(StsError) as refused:
        await untrusting.fetch(DOMAIN)
    assert refused.value.result_type == "sts-webpki-invalid"
    with pytest.raises(StsError, match="has no address"):
        await fetcher.fetch("plain.test")
