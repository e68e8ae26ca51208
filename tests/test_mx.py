"""MX lookup (RFC 5321 section 5.1): smartrelay.delivery.mx.MxResolver over fixture DNS data.

There is no network here: the resolvers are real twisted.names resolvers answering from
fixtures, a ResolverBase subclass over a dict of records and a BindAuthority over a zone file,
so the answers are made of the real record classes (dns.RRHeader, dns.Record_MX, ...).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IResolver
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import authority, common, dns
from twisted.names.error import (
    DNSNameError,
    DNSQueryRefusedError,
    DNSQueryTimeoutError,
    DNSServerError,
)
from twisted.python.failure import Failure

from smartrelay.delivery.mx import (
    MxResolver,
    PermanentRoutingError,
    TemporaryRoutingError,
    make_system_resolver,
)
from smartrelay.delivery.routing import NextHop

T = TypeVar("T")

# twisted.names.dns record classes are not annotated; typed constructors for the tests.
_make_mx: Callable[..., dns.Record_MX] = dns.Record_MX
_make_a: Callable[..., dns.Record_A] = dns.Record_A
_make_aaaa: Callable[..., dns.Record_AAAA] = dns.Record_AAAA
_make_cname: Callable[..., dns.Record_CNAME] = dns.Record_CNAME
_make_txt: Callable[..., dns.Record_TXT] = dns.Record_TXT
_make_timeout: Callable[[int], DNSQueryTimeoutError] = DNSQueryTimeoutError


def MX(preference: int, host: str, ttl: int = 300) -> dns.Record_MX:
    return _make_mx(preference, host.encode("ascii"), ttl=ttl)


def A(address: str, ttl: int = 300) -> dns.Record_A:
    return _make_a(address, ttl=ttl)


def AAAA(address: str, ttl: int = 300) -> dns.Record_AAAA:
    return _make_aaaa(address, ttl=ttl)


def CNAME(target: str, ttl: int = 300) -> dns.Record_CNAME:
    return _make_cname(target.encode("ascii"), ttl=ttl)


def TXT(text: str, ttl: int = 300) -> dns.Record_TXT:
    return _make_txt(text.encode("ascii"), ttl=ttl)


Zone = dict[str, list[Any]]


class FixtureResolver(common.ResolverBase):
    """A twisted.names resolver answering from a dict: name -> records of any type.

    A name that is not in ``zone`` is NXDOMAIN; a name without records of the asked type is
    an empty (NODATA) answer. ``errors`` fails queries: (name, type) -> exception, or
    (name, 0) for every type. ``hold`` makes queries of a name wait for the test to fire them.
    """

    def __init__(self, zone: Zone, errors: dict[tuple[str, int], Exception] | None = None) -> None:
        init: Callable[[common.ResolverBase], None] = common.ResolverBase.__init__
        init(self)
        self.zone = zone
        self.errors = errors or {}
        self.queries: list[tuple[str, str]] = []
        self.hold: dict[str, list[Deferred[Any]]] = {}

    def _lookup(self, name: bytes, cls: int, qtype: int, timeout: object) -> Deferred[Any]:
        qname = name.decode("ascii").lower()
        self.queries.append((qname, dns.QUERY_TYPES.get(qtype, str(qtype))))
        if qname in self.hold:
            waiting: Deferred[Any] = Deferred()
            waiting.addCallback(lambda _: self._answer(qname, name, qtype))
            self.hold[qname].append(waiting)
            return waiting
        return self._answer(qname, name, qtype)

    def _answer(self, qname: str, name: bytes, qtype: int) -> Deferred[Any]:
        error = self.errors.get((qname, qtype)) or self.errors.get((qname, 0))
        if error is not None:
            return fail(error)
        if qname not in self.zone:
            return fail(DNSNameError(qname))
        answers = [
            dns.RRHeader(name, record.TYPE, dns.IN, record.ttl, record, auth=True)
            for record in self.zone[qname]
            if qtype == record.TYPE
        ]
        return succeed((answers, [], []))

    def count(self, qname: str) -> int:
        return sum(1 for name, _ in self.queries if name == qname)


def result_of(d: Deferred[T]) -> T:
    """The result of an already fired Deferred (raising its failure)."""
    results: list[T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "the Deferred has not fired"
    return results[0]


def hosts(d: Deferred[list[NextHop]]) -> list[str]:
    hops = result_of(d)
    assert all(h.port == 25 and h.kind == "mx" for h in hops)
    return [h.host for h in hops]


ZONE: Zone = {
    "example.test": [MX(20, "mx2.example.test"), MX(10, "mx1.example.test"), MX(30, "backup.test")],
    "mx1.example.test": [A("192.0.2.1")],
    "equal.test": [MX(10, f"mx{i}.equal.test") for i in range(1, 5)] + [MX(20, "last.equal.test")],
    "implicit.test": [A("192.0.2.2", ttl=120), TXT("v=spf1 -all")],
    "v6only.test": [AAAA("2001:db8::2")],
    "nothing.test": [TXT("no mail here")],
    "nullmx.test": [MX(0, ".")],
    "mixednull.test": [MX(0, "."), MX(10, "real.mixednull.test")],
    "dupes.test": [MX(20, "mx.dupes.test"), MX(10, "MX.Dupes.Test."), MX(30, "other.dupes.test")],
    "xn--bcher-kva.de": [MX(10, "mx.xn--bcher-kva.de")],
    "alias.test": [CNAME("target.test")],
}


@pytest.fixture
def dns_fixture() -> FixtureResolver:
    return FixtureResolver(dict(ZONE))


@pytest.fixture
def mx(dns_fixture: FixtureResolver, clock: Clock) -> MxResolver:
    return MxResolver(dns_fixture, clock, rng=random.Random(1))


def test_fixture_resolver_is_an_iresolver(dns_fixture: FixtureResolver) -> None:
    assert IResolver.providedBy(dns_fixture)


# -- ordering -------------------------------------------------------------------------------------


def test_mx_hosts_in_preference_order(mx: MxResolver) -> None:
    hops = result_of(mx.lookup("example.test"))
    assert hops == [
        NextHop("mx1.example.test", 25, "mx"),
        NextHop("mx2.example.test", 25, "mx"),
        NextHop("backup.test", 25, "mx"),
    ]


def test_equal_preference_hosts_are_shuffled_with_the_rng_given(
    dns_fixture: FixtureResolver, clock: Clock
) -> None:
    group = [f"mx{i}.equal.test" for i in range(1, 5)]
    expected = list(group)
    random.Random(42).shuffle(expected)
    resolver = MxResolver(dns_fixture, clock, rng=random.Random(42))
    assert hosts(resolver.lookup("equal.test")) == [*expected, "last.equal.test"]


def test_equal_preference_order_varies_but_groups_stay_in_order(
    dns_fixture: FixtureResolver, clock: Clock
) -> None:
    resolver = MxResolver(dns_fixture, clock, rng=random.Random(7))
    firsts: set[str] = set()
    for _ in range(200):  # from the cache after the first: shuffled on each lookup
        order = hosts(resolver.lookup("equal.test"))
        assert sorted(order[:4]) == [f"mx{i}.equal.test" for i in range(1, 5)]
        assert order[4] == "last.equal.test"
        firsts.add(order[0])
    assert len(firsts) == 4
    assert dns_fixture.count("equal.test") == 1


def test_a_host_listed_twice_is_kept_once_at_its_best_preference(mx: MxResolver) -> None:
    assert hosts(mx.lookup("dupes.test")) == ["mx.dupes.test", "other.dupes.test"]


def test_mx_answer_via_cname_is_followed(clock: Clock) -> None:
    # A recursive server answers an MX query at an alias with the CNAME and the MX records
    # of the target; only the MX records count.
    resolver = FixtureResolver({})
    cname = dns.RRHeader(b"alias.test", dns.CNAME, dns.IN, 300, CNAME("target.test"))
    mx_rr = dns.RRHeader(b"target.test", dns.MX, dns.IN, 300, MX(5, "mx.target.test"))
    resolver.lookupMailExchange = lambda name, timeout=None: succeed(([cname, mx_rr], [], []))  # type: ignore[method-assign]
    assert hosts(MxResolver(resolver, clock).lookup("alias.test")) == ["mx.target.test"]


# -- no MX: implicit MX ---------------------------------------------------------------------------


def test_no_mx_falls_back_to_the_domain_with_an_a_record(
    mx: MxResolver, dns_fixture: FixtureResolver
) -> None:
    assert result_of(mx.lookup("implicit.test")) == [NextHop("implicit.test", 25, "mx")]
    assert ("implicit.test", "A") in dns_fixture.queries


def test_no_mx_falls_back_to_the_domain_with_only_an_aaaa_record(mx: MxResolver) -> None:
    assert hosts(mx.lookup("v6only.test")) == ["v6only.test"]


def test_no_mx_and_no_address_is_permanent(mx: MxResolver) -> None:
    with pytest.raises(PermanentRoutingError, match="no MX and no A/AAAA"):
        result_of(mx.lookup("nothing.test"))


def test_implicit_mx_with_one_address_lookup_failing_uses_the_other(clock: Clock) -> None:
    resolver = FixtureResolver(dict(ZONE), {("v6only.test", dns.A): DNSServerError()})
    assert hosts(MxResolver(resolver, clock).lookup("v6only.test")) == ["v6only.test"]


def test_implicit_mx_with_an_address_lookup_failing_and_no_answer_is_temporary(
    clock: Clock,
) -> None:
    resolver = FixtureResolver(dict(ZONE), {("nothing.test", dns.AAAA): _make_timeout(1)})
    with pytest.raises(TemporaryRoutingError, match="A/AAAA lookup failed: timeout"):
        result_of(MxResolver(resolver, clock).lookup("nothing.test"))


# -- null MX, NXDOMAIN, invalid -------------------------------------------------------------------


def test_null_mx_is_permanent(mx: MxResolver, dns_fixture: FixtureResolver) -> None:
    with pytest.raises(PermanentRoutingError, match="null MX"):
        result_of(mx.lookup("nullmx.test"))
    # No fallback to A/AAAA for a null MX.
    assert dns_fixture.queries == [("nullmx.test", "MX")]


def test_a_null_mx_next_to_real_ones_is_ignored(mx: MxResolver) -> None:
    assert hosts(mx.lookup("mixednull.test")) == ["real.mixednull.test"]


def test_nxdomain_is_permanent(mx: MxResolver, dns_fixture: FixtureResolver) -> None:
    with pytest.raises(PermanentRoutingError, match="NXDOMAIN"):
        result_of(mx.lookup("no-such-domain.test"))
    assert dns_fixture.queries == [("no-such-domain.test", "MX")]


@pytest.mark.parametrize("domain", ["", "bad..domain", "a b.test", "-x.test", "[not-an-ip]"])
def test_an_invalid_domain_is_permanent_without_a_query(
    mx: MxResolver, dns_fixture: FixtureResolver, domain: str
) -> None:
    with pytest.raises(PermanentRoutingError, match="invalid domain"):
        result_of(mx.lookup(domain))
    assert dns_fixture.queries == []


@pytest.mark.parametrize(
    ("literal", "host"),
    [("[192.0.2.7]", "192.0.2.7"), ("[IPv6:2001:DB8::7]", "2001:db8::7")],
)
def test_an_address_literal_is_its_own_hop(
    mx: MxResolver, dns_fixture: FixtureResolver, literal: str, host: str
) -> None:
    assert result_of(mx.lookup(literal)) == [NextHop(host, 25, "mx")]
    assert dns_fixture.queries == []


# -- temporary failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (DNSServerError(), "SERVFAIL"),
        (_make_timeout(1), "timeout"),
        (TimeoutError(), "timeout"),
        (DNSQueryRefusedError(), "query refused"),
        (ConnectionRefusedError("no server"), "ConnectionRefusedError: no server"),
    ],
)
def test_servfail_and_timeouts_are_temporary_and_not_cached(
    clock: Clock, error: Exception, reason: str
) -> None:
    resolver = FixtureResolver(dict(ZONE), {("example.test", dns.MX): error})
    mx = MxResolver(resolver, clock)
    with pytest.raises(TemporaryRoutingError, match=f"MX lookup failed: {reason}"):
        result_of(mx.lookup("example.test"))
    del resolver.errors[("example.test", dns.MX)]
    assert len(result_of(mx.lookup("example.test"))) == 3
    assert resolver.count("example.test") == 2


def test_a_resolver_that_raises_gives_a_temporary_error(clock: Clock) -> None:
    resolver = FixtureResolver(dict(ZONE))

    def broken(name: str, timeout: object = None) -> Deferred[Any]:
        raise RuntimeError("bug")

    resolver.lookupMailExchange = broken  # type: ignore[method-assign]
    with pytest.raises(TemporaryRoutingError, match="RuntimeError: bug"):
        result_of(MxResolver(resolver, clock).lookup("example.test"))


# -- caching --------------------------------------------------------------------------------------


def test_answers_are_cached_for_their_ttl(
    mx: MxResolver, dns_fixture: FixtureResolver, clock: Clock
) -> None:
    first = result_of(mx.lookup("example.test"))
    clock.advance(299)
    assert result_of(mx.lookup("example.test")) == first
    assert dns_fixture.count("example.test") == 1
    clock.advance(1)  # TTL 300 has run out
    assert result_of(mx.lookup("example.test")) == first
    assert dns_fixture.count("example.test") == 2


def test_the_smallest_ttl_counts(clock: Clock) -> None:
    zone: Zone = {"t.test": [MX(10, "a.t.test", ttl=900), MX(20, "b.t.test", ttl=30)]}
    resolver = FixtureResolver(zone)
    mx = MxResolver(resolver, clock)
    result_of(mx.lookup("t.test"))
    clock.advance(29)
    result_of(mx.lookup("t.test"))
    assert resolver.count("t.test") == 1
    clock.advance(1)
    result_of(mx.lookup("t.test"))
    assert resolver.count("t.test") == 2


def test_the_cache_time_is_capped(clock: Clock) -> None:
    resolver = FixtureResolver({"long.test": [MX(10, "mx.long.test", ttl=86400)]})
    mx = MxResolver(resolver, clock, cache_ttl_cap=600)
    result_of(mx.lookup("long.test"))
    clock.advance(599)
    result_of(mx.lookup("long.test"))
    assert resolver.count("long.test") == 1
    clock.advance(1)
    result_of(mx.lookup("long.test"))
    assert resolver.count("long.test") == 2


def test_ttl_zero_is_not_cached(clock: Clock) -> None:
    resolver = FixtureResolver({"zero.test": [MX(10, "mx.zero.test", ttl=0)]})
    mx = MxResolver(resolver, clock)
    result_of(mx.lookup("zero.test"))
    result_of(mx.lookup("zero.test"))
    assert resolver.count("zero.test") == 2
    assert mx.cache_size() == 0


def test_implicit_mx_is_cached_for_the_address_ttl(
    mx: MxResolver, dns_fixture: FixtureResolver, clock: Clock
) -> None:
    result_of(mx.lookup("implicit.test"))
    clock.advance(119)
    result_of(mx.lookup("implicit.test"))
    assert dns_fixture.count("implicit.test") == 3  # MX, A, AAAA once
    clock.advance(1)  # the A record's TTL is 120
    result_of(mx.lookup("implicit.test"))
    assert dns_fixture.count("implicit.test") == 6


@pytest.mark.parametrize("domain", ["no-such-domain.test", "nullmx.test", "nothing.test"])
def test_permanent_answers_are_cached_for_60_seconds(
    mx: MxResolver, dns_fixture: FixtureResolver, clock: Clock, domain: str
) -> None:
    with pytest.raises(PermanentRoutingError):
        result_of(mx.lookup(domain))
    queries = len(dns_fixture.queries)
    clock.advance(59)
    with pytest.raises(PermanentRoutingError):
        result_of(mx.lookup(domain))
    assert len(dns_fixture.queries) == queries
    # The domain is fixed meanwhile; after 60 s the lookup is made again.
    dns_fixture.zone[domain] = [MX(10, f"mx.{domain}")]
    clock.advance(1)
    assert hosts(mx.lookup(domain)) == [f"mx.{domain}"]


def test_forget_drops_a_cached_answer(mx: MxResolver, dns_fixture: FixtureResolver) -> None:
    result_of(mx.lookup("example.test"))
    mx.forget("Example.Test.")
    result_of(mx.lookup("example.test"))
    assert dns_fixture.count("example.test") == 2


def test_the_cache_is_bounded(dns_fixture: FixtureResolver, clock: Clock) -> None:
    for i in range(10):
        dns_fixture.zone[f"d{i}.test"] = [MX(10, f"mx.d{i}.test")]
    mx = MxResolver(dns_fixture, clock, max_cache_entries=4)
    for i in range(10):
        result_of(mx.lookup(f"d{i}.test"))
    assert mx.cache_size() == 4
    result_of(mx.lookup("d9.test"))  # the newest are kept
    assert dns_fixture.count("d9.test") == 1
    result_of(mx.lookup("d0.test"))  # the oldest were dropped
    assert dns_fixture.count("d0.test") == 2


def test_concurrent_lookups_share_one_query(dns_fixture: FixtureResolver, clock: Clock) -> None:
    dns_fixture.hold["example.test"] = []
    mx = MxResolver(dns_fixture, clock)
    first, second = mx.lookup("example.test"), mx.lookup("EXAMPLE.test.")
    third = mx.lookup("example.test")
    assert not first.called and not second.called
    third.cancel()  # one caller giving up does not disturb the others
    assert dns_fixture.count("example.test") == 1
    (held,) = dns_fixture.hold.pop("example.test")
    held.callback(None)
    assert hosts(first) == hosts(second) == ["mx1.example.test", "mx2.example.test", "backup.test"]
    with pytest.raises(CancelledError):
        result_of(third)


def test_concurrent_lookups_all_get_the_failure(clock: Clock) -> None:
    resolver = FixtureResolver(dict(ZONE), {("example.test", dns.MX): DNSServerError()})
    resolver.hold["example.test"] = []
    mx = MxResolver(resolver, clock)
    waiting = [mx.lookup("example.test") for _ in range(3)]
    resolver.hold.pop("example.test")[0].callback(None)
    for d in waiting:
        with pytest.raises(TemporaryRoutingError, match="SERVFAIL"):
            result_of(d)


# -- IDN ------------------------------------------------------------------------------------------


def test_idn_domain_is_looked_up_by_its_a_label(
    mx: MxResolver, dns_fixture: FixtureResolver
) -> None:
    assert hosts(mx.lookup("bücher.de")) == ["mx.xn--bcher-kva.de"]
    assert dns_fixture.queries == [("xn--bcher-kva.de", "MX")]
    # Both spellings share the cache entry.
    assert hosts(mx.lookup("BÜCHER.de.")) == hosts(mx.lookup("xn--bcher-kva.de"))
    assert len(dns_fixture.queries) == 1


# -- a real twisted.names authority over a zone file ----------------------------------------------

ZONE_FILE = """\
$ORIGIN example.test.
$TTL 300
@ IN SOA ns1.example.test. hostmaster.example.test. 1 3600 600 86400 60
@ IN MX 20 mx2.example.test.
@ IN MX 10 mx1.example.test.
mx1 IN A 192.0.2.1
mx2 IN A 192.0.2.2
implicit 120 IN A 192.0.2.3
v6 IN AAAA 2001:db8::3
nullmx IN MX 0 .
txt IN TXT "no mail"
"""


@pytest.fixture
def zone_authority(tmp_path: Path) -> IResolver:
    path = tmp_path / "example.test.zone"
    path.write_text(ZONE_FILE)
    make: Callable[[str], IResolver] = authority.BindAuthority
    return make(str(path))


def test_with_a_zone_file_authority(zone_authority: IResolver, clock: Clock) -> None:
    mx = MxResolver(zone_authority, clock)
    assert hosts(mx.lookup("example.test")) == ["mx1.example.test", "mx2.example.test"]
    assert hosts(mx.lookup("implicit.example.test")) == ["implicit.example.test"]
    assert hosts(mx.lookup("v6.example.test")) == ["v6.example.test"]
    with pytest.raises(PermanentRoutingError, match="null MX"):
        result_of(mx.lookup("nullmx.example.test"))
    with pytest.raises(PermanentRoutingError, match="no MX and no A/AAAA"):
        result_of(mx.lookup("txt.example.test"))
    # The authority answers AuthoritativeDomainError for a name in its zone that is not there.
    with pytest.raises(PermanentRoutingError, match="NXDOMAIN"):
        result_of(mx.lookup("missing.example.test"))
    # A name outside its zone is "not mine" (DomainError), not proof the domain is missing.
    with pytest.raises(TemporaryRoutingError):
        result_of(mx.lookup("elsewhere.test"))


# -- the production resolver ----------------------------------------------------------------------


def test_make_system_resolver_uses_the_reactor_given(tmp_path: Path) -> None:
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 192.0.2.53\n")
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("192.0.2.25 mx.local.test\n")
    reactor = MemoryReactorClock()
    resolver = make_system_resolver(
        reactor, resolv_conf=str(resolv_conf), hosts_file=str(hosts_file)
    )
    assert IResolver.providedBy(resolver)
    # Answered from the hosts file: no network, no global reactor.
    answer = cast(
        tuple[list[dns.RRHeader], object, object],
        result_of(resolver.lookupAddress("mx.local.test", (1,))),
    )
    packed = [cast(dns.Record_A, r.payload).address for r in answer[0] if r.type == dns.A]
    assert [socket.inet_ntoa(cast(bytes, a)) for a in packed] == ["192.0.2.25"]
    assert reactor.getDelayedCalls()  # resolv.conf re-reading is scheduled on this reactor
