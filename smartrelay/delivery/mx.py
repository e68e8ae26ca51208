"""MX lookup for ``mx`` routes, per RFC 5321 section 5.1, with :mod:`twisted.names`.

:meth:`MxResolver.lookup` turns a recipient domain into the hosts to try, in order:

- MX records sorted by preference, hosts of equal preference shuffled (each lookup, also
  from the cache, so load spreads over them); a host listed twice is kept once, at its best
  preference. Host names are returned in lower case without the trailing dot (port 25,
  kind ``mx``); the connector
  resolves each to its addresses.
- No MX records (NODATA): the domain itself (implicit MX, RFC 5321 section 5.1) if it has an
  A or AAAA record, else :class:`PermanentRoutingError`.
- A null MX (RFC 7505: the only MX record is ``0 .``): :class:`PermanentRoutingError`. A
  ``.`` MX next to real ones (a misconfiguration) is ignored.
- NXDOMAIN: :class:`PermanentRoutingError`. Anything else that goes wrong (SERVFAIL, a
  timeout, a refused query, a network error): :class:`TemporaryRoutingError`.
- An address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) is its own single hop; no DNS.

Answers are cached per domain for ``min(TTL, cache_ttl_cap)`` seconds (the smallest TTL of
the records used), permanent failures for ``negative_ttl`` (60) seconds (also at most the
cap), temporary failures not at all. Concurrent lookups of one domain share one DNS query.

Internationalized domains are looked up by their A-label (``domain.encode("idna")``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
from collections.abc import Callable, Sequence
from typing import Any, cast

from attrs import frozen
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.names import dns
from twisted.names.error import (
    AuthoritativeDomainError,
    DNSNameError,
    DNSQueryRefusedError,
    DNSServerError,
)

from smartrelay.delivery.routing import NextHop, normalize_domain

__all__ = [
    "DEFAULT_DNS_TIMEOUT",
    "MxResolver",
    "PermanentRoutingError",
    "RoutingError",
    "TemporaryRoutingError",
    "make_system_resolver",
]

#: Seconds after which each DNS query is re-sent; after the last one it has failed
#: (the :class:`twisted.names.client.Resolver` default: 60 s in all).
DEFAULT_DNS_TIMEOUT: tuple[int, ...] = (1, 3, 11, 45)

SMTP_PORT = 25

_Answer = tuple[Sequence[dns.RRHeader], Sequence[dns.RRHeader], Sequence[dns.RRHeader]]


class RoutingError(Exception):
    """The next hops of a domain could not be found. ``str()`` says why."""


class PermanentRoutingError(RoutingError):
    """The domain cannot receive mail: NXDOMAIN, a null MX, no MX and no A/AAAA, or not a
    domain. Bounce (category ``invalid-domain``)."""


class TemporaryRoutingError(RoutingError):
    """The lookup failed for now (SERVFAIL, timeout, ...). Defer and retry."""


@frozen
class _Hosts:
    """A positive cache entry: (preference, host) in preference order."""

    exchanges: tuple[tuple[int, str], ...]
    expires: float


@frozen
class _Negative:
    """A negative cache entry: the message of the PermanentRoutingError."""

    reason: str
    expires: float


_Entry = _Hosts | _Negative


class _Permanent(Exception):
    """Internal: a permanent answer, cached before it becomes a PermanentRoutingError."""


class MxResolver:
    """Finds the next hops of ``mx`` routes. Takes the resolver and clock; no globals."""

    def __init__(
        self,
        resolver: IResolver,
        clock: IReactorTime,
        cache_ttl_cap: float = 3600.0,
        *,
        negative_ttl: float = 60.0,
        timeout: Sequence[int] = DEFAULT_DNS_TIMEOUT,
        rng: random.Random | None = None,
        max_cache_entries: int = 10_000,
        port: int = SMTP_PORT,
    ) -> None:
        if cache_ttl_cap < 0 or negative_ttl < 0:
            raise ValueError("cache_ttl_cap and negative_ttl must not be negative")
        if max_cache_entries < 1:
            raise ValueError(f"max_cache_entries must be at least 1, got {max_cache_entries!r}")
        self._resolver = resolver
        self._clock = clock
        self.port = port  # 25; another only for tests, where nothing may listen on 25
        self.cache_ttl_cap = cache_ttl_cap
        self.negative_ttl = negative_ttl
        self.timeout = tuple(timeout)
        self._rng = rng if rng is not None else random.Random()
        self.max_cache_entries = max_cache_entries
        # A-label domain -> entry; insertion order is the eviction order.
        self._cache: dict[str, _Entry] = {}
        # A-label domain -> callers waiting for the query in flight.
        self._pending: dict[str, list[Deferred[list[NextHop]]]] = {}

    # -- the API

    def lookup(self, domain: str) -> Deferred[list[NextHop]]:
        """The hosts to try for ``domain``, best first (see the module docstring).

        Fails with :class:`PermanentRoutingError` or :class:`TemporaryRoutingError`.
        """
        literal = _address_literal(domain)
        if literal is not None:
            return succeed([NextHop(host=literal, port=self.port, kind="mx")])
        try:
            name = normalize_domain(domain)
        except ValueError as e:
            return fail(PermanentRoutingError(str(e)))
        entry = self._cached(name)
        if entry is not None:
            return self._answer(entry)
        waiter: Deferred[list[NextHop]] = Deferred()
        waiters = self._pending.get(name)
        if waiters is not None:
            waiters.append(waiter)
        else:
            self._pending[name] = [waiter]
            Deferred.fromCoroutine(self._run(name))
        return waiter

    def forget(self, domain: str) -> None:
        """Drop the cached answer for ``domain`` (if any)."""
        with contextlib.suppress(ValueError):
            self._cache.pop(normalize_domain(domain), None)

    def cache_size(self) -> int:
        return len(self._cache)

    # -- internals

    def _answer(self, entry: _Entry) -> Deferred[list[NextHop]]:
        if isinstance(entry, _Negative):
            return fail(PermanentRoutingError(entry.reason))
        return succeed(self._hops(entry))

    def _hops(self, entry: _Hosts) -> list[NextHop]:
        """The hosts in preference order, each run of equal preference freshly shuffled."""
        hops: list[NextHop] = []
        group: list[str] = []
        for i, (preference, host) in enumerate(entry.exchanges):
            group.append(host)
            last = i + 1 == len(entry.exchanges)
            if last or entry.exchanges[i + 1][0] != preference:
                self._rng.shuffle(group)
                hops.extend(NextHop(host=h, port=self.port, kind="mx") for h in group)
                group = []
        return hops

    def _cached(self, name: str) -> _Entry | None:
        entry = self._cache.get(name)
        if entry is None:
            return None
        if self._clock.seconds() >= entry.expires:
            del self._cache[name]
            return None
        return entry

    def _store(self, name: str, entry: _Entry) -> None:
        if entry.expires <= self._clock.seconds():
            return  # TTL 0: do not cache
        self._cache.pop(name, None)
        self._cache[name] = entry
        if len(self._cache) > self.max_cache_entries:
            now = self._clock.seconds()
            for key in [k for k, e in self._cache.items() if e.expires <= now]:
                del self._cache[key]
            while len(self._cache) > self.max_cache_entries:
                del self._cache[next(iter(self._cache))]

    async def _run(self, name: str) -> None:
        """Resolve ``name`` once and answer everybody waiting for it."""
        outcome: _Hosts | RoutingError
        try:
            outcome = await self._resolve(name)
        except _Permanent as e:
            negative_ttl = min(self.negative_ttl, self.cache_ttl_cap)
            self._store(name, _Negative(str(e), self._clock.seconds() + negative_ttl))
            outcome = PermanentRoutingError(str(e))
        except TemporaryRoutingError as e:
            outcome = e
        except Exception as e:  # a bug here must not leave the callers waiting forever
            outcome = TemporaryRoutingError(f"{name}: MX lookup failed: {_describe(e)}")
        else:
            self._store(name, outcome)
        for waiter in self._pending.pop(name, []):
            if waiter.called:  # cancelled by its caller
                continue
            if isinstance(outcome, RoutingError):
                # A fresh exception each: callers may add to or chain their own.
                waiter.errback(type(outcome)(str(outcome)))
            else:
                waiter.callback(self._hops(outcome))

    async def _resolve(self, name: str) -> _Hosts:
        """The MX hosts of ``name`` (or the implicit MX). Raises _Permanent or Temporary."""
        try:
            answer = await self._query(self._resolver.lookupMailExchange, name)
        except Exception as e:
            if _is_nxdomain(e):
                raise _Permanent(f"{name}: no such domain (NXDOMAIN)") from e
            raise TemporaryRoutingError(f"{name}: MX lookup failed: {_describe(e)}") from e
        records = [
            rr for rr in answer[0] if rr.type == dns.MX and isinstance(rr.payload, dns.Record_MX)
        ]
        if not records:
            return await self._implicit_mx(name)
        exchanges: list[tuple[int, str]] = []
        for rr in records:
            payload = cast(dns.Record_MX, rr.payload)
            host = _host_name(payload.name.name)
            if host:  # "" is the root: a null MX
                exchanges.append((payload.preference, host))
        if not exchanges:
            raise _Permanent(f"{name}: null MX (the domain accepts no mail, RFC 7505)")
        exchanges.sort(key=lambda e: e[0])  # stable: equal preferences keep the DNS order
        seen: set[str] = set()
        unique: list[tuple[int, str]] = []
        for preference, host in exchanges:
            if host not in seen:
                seen.add(host)
                unique.append((preference, host))
        ttl = min(rr.ttl for rr in records)
        return _Hosts(tuple(unique), self._expiry(ttl))

    async def _implicit_mx(self, name: str) -> _Hosts:
        """No MX records: the domain itself, if it has an A or AAAA record."""
        queries = [
            (dns.A, Deferred.fromCoroutine(self._query(self._resolver.lookupAddress, name))),
            (
                dns.AAAA,
                Deferred.fromCoroutine(self._query(self._resolver.lookupIPV6Address, name)),
            ),
        ]
        ttls: list[int] = []
        problem: Exception | None = None
        for rtype, query in queries:
            try:
                answer = await query
            except Exception as e:
                if not _is_nxdomain(e) and problem is None:
                    problem = e
                continue
            ttls.extend(rr.ttl for rr in answer[0] if rr.type == rtype)
        if ttls:
            return _Hosts(((0, name),), self._expiry(min(ttls)))
        if problem is not None:
            raise TemporaryRoutingError(
                f"{name}: no MX records, and the A/AAAA lookup failed: {_describe(problem)}"
            ) from problem
        raise _Permanent(f"{name}: no MX and no A/AAAA records")

    async def _query(
        self, method: Callable[[str, Sequence[int]], Deferred[Any]], name: str
    ) -> _Answer:
        # IResolver's stubs type the answer as a tuple of RRHeaders; it is a tuple of lists.
        return cast(_Answer, await method(name, self.timeout))

    def _expiry(self, ttl: int) -> float:
        return self._clock.seconds() + min(float(max(ttl, 0)), self.cache_ttl_cap)


def make_system_resolver(
    reactor: IReactorTime,
    *,
    resolv_conf: str = "/etc/resolv.conf",
    hosts_file: str = "/etc/hosts",
    timeout: Sequence[int] = DEFAULT_DNS_TIMEOUT,
) -> IResolver:
    """The production resolver: ``/etc/hosts``, then the name servers of ``resolv.conf``.

    What :func:`twisted.names.client.createResolver` builds on POSIX, but on the given
    reactor, which must also provide IReactorUDP and IReactorTCP (any real reactor does):
    ``createResolver`` takes no reactor and would use the global one. ``resolv.conf`` is
    re-read when it changes; without name servers in it, 127.0.0.1:53 is used.
    """
    from twisted.names import cache, client, hosts, resolve

    # twisted.names is not annotated; give its constructors types here.
    make_hosts = cast(Callable[[bytes], IResolver], hosts.Resolver)
    make_cache = cast(Callable[..., IResolver], cache.CacheResolver)
    make_client = cast(Callable[..., IResolver], client.Resolver)
    make_chain = cast(Callable[[list[IResolver]], IResolver], resolve.ResolverChain)
    return make_chain(
        [
            make_hosts(hosts_file.encode()),
            make_cache(reactor=reactor),
            make_client(resolv=resolv_conf, timeout=tuple(timeout), reactor=reactor),
        ]
    )


# --------------------------------------------------------------------------------------
# Helpers


def _is_nxdomain(error: BaseException) -> bool:
    # DNSNameError: rcode NXDOMAIN from a server. AuthoritativeDomainError: a local
    # authority (twisted.names.authority) has no such name. A bare DomainError only means
    # "not here, ask the next resolver" inside a ResolverChain: not proof of anything.
    return isinstance(error, DNSNameError | AuthoritativeDomainError)


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, DNSServerError):
        return "SERVFAIL"
    if isinstance(error, DNSQueryRefusedError):
        return "query refused"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _host_name(raw: bytes) -> str:
    """An MX exchange as a host name: lower case, no trailing dot; "" for the root."""
    return raw.decode("ascii", "replace").lower().rstrip(".")


def _address_literal(domain: str) -> str | None:
    """The IP address of an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``)."""
    text = domain.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None
