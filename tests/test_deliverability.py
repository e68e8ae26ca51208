"""Deliverability checks (smartrelay/deliverability.py): alignment, the records to publish,
and whether they are published, against a real DNS server (twisted.names on 127.0.0.1)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.task import deferLater
from twisted.names import client

from smartrelay.config import DkimKey, parse_config
from smartrelay.deliverability import (
    CheckedRecord,
    DeliverabilitySettings,
    DnsChecker,
    DomainPlan,
    domain_plan,
    organizational_domain,
    sender_domains,
)
from smartrelay.reactor import IRelayReactor
from smartrelay.rewrap.dkim import generate_key, load_key, zone_file_entry
from smartrelay.storage.store import NewMessage, Store
from tests.conftest import real_reactor
from tests.support.dnsserver import MX, TXT, A, CountingFactory, StartDns, dns_server

__all__ = ["dns_server"]  # the fixture, used here

HOSTNAME = "relay.example.net"
RETURN_PATH = "bounces.example.com"
RELAY_IP = "192.0.2.25"


@pytest.fixture
def settings(tmp_path: Path) -> DeliverabilitySettings:
    keys = []
    for domain, selector, algorithm in (
        ("example.com", "s1", "rsa"),
        ("example.com", "s2", "ed25519"),
        ("shop.example.org", "m1", "rsa"),
    ):
        path, _ = generate_key(domain, selector, algorithm, str(tmp_path / "dkim"))  # type: ignore[arg-type]
        spec = DkimKey(domain, selector, path, f"{algorithm}-sha256")  # type: ignore[arg-type]
        keys.append(load_key(spec))
    return DeliverabilitySettings(HOSTNAME, RETURN_PATH, tuple(keys))


def by_purpose(plan: DomainPlan) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for record in plan.records:
        found.setdefault(record.purpose, []).append(record)
    return found


def test_organizational_domains_come_from_the_public_suffix_list() -> None:
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("b.example.com.") == "example.com"
    assert organizational_domain("co.uk") is None
    assert organizational_domain("localhost") is None


def test_alignment_and_the_records_to_publish(settings: DeliverabilitySettings) -> None:
    plan = domain_plan("Example.COM", settings)
    assert plan.domain == "example.com" and plan.organizational_domain == "example.com"
    assert plan.dkim_keys == (("example.com", "s1"), ("example.com", "s2"))
    assert plan.dkim_alignment == "strict"
    assert plan.return_path_aligned  # bounces.example.com: same organizational domain
    records = by_purpose(plan)
    [spf] = records["spf-return-path"]
    assert (spf.name, spf.type, spf.value) == (RETURN_PATH, "TXT", f"v=spf1 a:{HOSTNAME} ~all")
    assert records["spf-from"][0].name == "example.com"
    s1, s2 = records["dkim"]
    assert s1.name == "s1._domainkey.example.com"
    assert s1.value.startswith("v=DKIM1; k=rsa; p=") and s2.value.startswith("v=DKIM1; k=ed25519")
    # What `smartrelay-ctl dkim keygen` prints: the value in strings of 255 characters at most.
    assert s1.zone_line == zone_file_entry("example.com", "s1", s1.value)
    assert s1.zone_line.count('"') == 2 * ((len(s1.value) + 254) // 255) >= 4
    [dmarc] = records["dmarc"]
    assert (dmarc.name, dmarc.value) == (
        "_dmarc.example.com",
        "v=DMARC1; p=none; rua=mailto:dmarc-reports@example.com",
    )
    [mx] = records["mx-return-path"]
    assert (mx.name, mx.type, mx.value) == (RETURN_PATH, "MX", f"10 {HOSTNAME}.")
    assert mx.zone_line == f"{RETURN_PATH}. IN MX 10 {HOSTNAME}."

    sub = domain_plan("news.shop.example.org", settings)
    assert sub.dkim_alignment == "relaxed" and sub.dkim_keys == (("shop.example.org", "m1"),)
    assert not sub.return_path_aligned  # example.com's return path, example.org's mail
    assert by_purpose(sub)["dmarc"][0].name == "_dmarc.example.org"

    unsigned = domain_plan("other.example", settings)
    assert unsigned.dkim_alignment == "none" and "dkim" not in by_purpose(unsigned)


def test_settings_from_the_config(settings: DeliverabilitySettings) -> None:
    config = parse_config(
        {
            "server": {"hostname": "mta.example.net"},
            "inbound": {"return_path_domain": "B.example.com"},
        }
    )
    made = DeliverabilitySettings.of(config, settings.keys)
    assert made == DeliverabilitySettings("mta.example.net", "b.example.com", settings.keys)


@pytest_twisted.ensureDeferred
async def test_sender_domains_of_the_last_30_days_from_the_roll_ups(store: Store) -> None:
    clock: Any = store.clock
    old = await store.queue_message(NewMessage("a@old.example", ("x@y.example",), b"\r\nx"))
    clock.advance(31 * 86400)
    for sender, rcpts in (("a@Example.com", 2), ("b@shop.example.org", 1), ("c@example.com", 1)):
        await store.queue_message(
            NewMessage(sender, tuple(f"r{n}@y.example" for n in range(rcpts)), b"\r\nx")
        )
    clock.advance(60)
    await store.roll_up(clock.seconds(), 1000)
    assert old.queue_id
    assert await sender_domains(store, clock.seconds()) == [
        ("example.com", 3),
        ("shop.example.org", 1),
    ]


# -- a real DNS server ----------------------------------------------------------------------------


def checker_for(port: int, **options: Any) -> DnsChecker:
    """A checker whose resolver is made at its first lookup (as the relay's page does)."""
    reactor: IRelayReactor = real_reactor()
    make: Any = client.Resolver
    made: list[Any] = []

    def resolver() -> Any:
        made.append(make(servers=[("127.0.0.1", port)], reactor=reactor))
        assert len(made) == 1, "the resolver is made once"
        return made[0]

    return DnsChecker(resolver, reactor, **options)


def statuses(checked: tuple[CheckedRecord, ...]) -> dict[tuple[str, str], tuple[str, str]]:
    return {(c.record.purpose, c.record.name): (c.status, c.found) for c in checked}


def published_zone(plan: DomainPlan) -> dict[str, list[Any]]:
    dkim = {
        r.name: [TXT(*(r.value[i : i + 255] for i in range(0, len(r.value), 255)))]
        for r in plan.records
        if r.purpose == "dkim"
    }
    return {
        "example.com": [
            TXT("v=spf1 include:_spf.example.com -all"),
            TXT("google-site-verification=x"),
        ],
        "_spf.example.com": [TXT("v=spf1 ip4:198.51.100.0/24 a:relay.example.net ~all")],
        RETURN_PATH: [TXT("v=spf1 ip4:192.0.2.0/27 -all"), MX(HOSTNAME)],
        "_dmarc.example.com": [TXT("v=DMARC1; p=none; rua=mailto:d@example.com")],
        "_dmarc.news.example.com": [TXT("v=DMARC1; p=reject")],
        **dkim,
    }


@pytest_twisted.ensureDeferred
async def test_every_record_published(
    dns_server: StartDns, settings: DeliverabilitySettings
) -> None:
    plan = domain_plan("example.com", settings)
    port = dns_server(
        {"example.com": published_zone(plan), "example.net": {HOSTNAME: [A(RELAY_IP)]}}
    )
    found = statuses(await checker_for(port).check(plan))
    assert {key: status for key, (status, _) in found.items()} == {
        ("spf-return-path", RETURN_PATH): "published",  # ip4:192.0.2.0/27 holds our address
        ("spf-from", "example.com"): "published",  # through include: and a:
        ("dkim", "s1._domainkey.example.com"): "published",  # 2 strings joined
        ("dkim", "s2._domainkey.example.com"): "published",
        ("dmarc", "_dmarc.example.com"): "published",
        ("mx-return-path", RETURN_PATH): "published",
    }
    assert found[("dmarc", "_dmarc.example.com")][1].startswith("v=DMARC1; p=none")
    # A subdomain: its own DMARC record counts; without one, the organizational domain's.
    for sub, policy in (("news.example.com", "p=reject"), ("shop.example.com", "p=none")):
        checked = statuses(await checker_for(port).check(domain_plan(sub, settings)))
        status, text = checked[("dmarc", "_dmarc.example.com")]
        assert status == "published" and policy in text


@pytest_twisted.ensureDeferred
async def test_missing_and_wrong_records(
    dns_server: StartDns, settings: DeliverabilitySettings
) -> None:
    plan = domain_plan("example.com", settings)
    other_key = next(
        r for r in domain_plan("shop.example.org", settings).records if r.purpose == "dkim"
    )
    zone = {
        # SPF that does not pass our address, then a second SPF record for the other name
        RETURN_PATH: [TXT("v=spf1 ip4:203.0.113.0/24 ~all"), MX("mx.elsewhere.example")],
        "example.com": [TXT("v=spf1 -all"), TXT("v=spf1 a ~all")],
        # s1 holds another key; s2 is absent; no DMARC
        "s1._domainkey.example.com": [TXT(other_key.value[:255], other_key.value[255:])],
    }
    port = dns_server({"example.com": zone, "example.net": {HOSTNAME: [A(RELAY_IP)]}})
    found = statuses(await checker_for(port).check(plan))
    assert found[("spf-return-path", RETURN_PATH)] == ("wrong", "v=spf1 ip4:203.0.113.0/24 ~all")
    assert found[("spf-from", "example.com")] == ("wrong", "2 SPF records (one at most)")
    assert found[("dkim", "s1._domainkey.example.com")][0] == "wrong"
    assert found[("dkim", "s2._domainkey.example.com")] == ("missing", "")
    assert found[("dmarc", "_dmarc.example.com")] == ("missing", "")
    assert found[("mx-return-path", RETURN_PATH)] == ("wrong", "mx.elsewhere.example")


@pytest_twisted.ensureDeferred
async def test_our_hostname_without_an_address_cannot_be_checked_for_spf(
    dns_server: StartDns, settings: DeliverabilitySettings
) -> None:
    plan = domain_plan("example.com", settings)
    port = dns_server({"example.com": {RETURN_PATH: [TXT("v=spf1 a:relay.example.net -all")]}})
    found = statuses(await checker_for(port).check(plan))
    status, why = found[("spf-return-path", RETURN_PATH)]
    assert status == "unknown" and "no A/AAAA record" in why


class Silent(protocol.DatagramProtocol):
    """A DNS server that never answers."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_a_dns_server_that_does_not_answer_costs_a_page_2_s_at_most(
    settings: DeliverabilitySettings,
) -> None:
    reactor: Any = real_reactor()
    udp = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
    try:
        checker = checker_for(udp.getHost().port)
        plan = domain_plan("example.com", settings)
        started = time.monotonic()
        checked = await checker.check(plan)
        elapsed = time.monotonic() - started
        assert {c.status for c in checked} == {"unknown"}
        assert all(c.found.startswith("could not check") for c in checked)
        assert elapsed < 2.0 + 1.5, elapsed  # the 2 s budget; margin for a loaded machine
        # The failures are cached (a while): the next page load does not wait again.
        started = time.monotonic()
        again = await checker.check(plan)
        assert time.monotonic() - started < 0.5
        assert {c.status for c in again} == {"unknown"}
    finally:
        await udp.stopListening()


@pytest_twisted.ensureDeferred
async def test_answers_are_cached_for_a_while(
    dns_server: StartDns, settings: DeliverabilitySettings
) -> None:
    plan = domain_plan("example.com", settings)
    port = dns_server(
        {"example.com": published_zone(plan), "example.net": {HOSTNAME: [A(RELAY_IP)]}}
    )
    checker = checker_for(port, cache_ttl=1.0)
    before = CountingFactory.queries
    first = await checker.check(plan)
    sent = CountingFactory.queries - before
    # Both SPF checks need our hostname's A and AAAA, and example.com's TXT is read once
    # though two checks use it: lookups in flight are shared.
    assert sent == checker.lookups and 0 < sent <= 12
    assert await checker.check(plan) == first
    assert CountingFactory.queries - before == sent  # from the cache
    await deferLater(real_reactor(), 1.2, lambda: None)
    await checker.check(plan)
    assert CountingFactory.queries - before == 2 * sent
