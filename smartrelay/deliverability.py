"""Deliverability checks per sender domain (docs/deliverability.md).

For a sender domain: whether a ``[[dkim.keys]]`` key signs its mail (DMARC alignment of the
signature: the key's domain is the From domain, strict, or a parent of it, relaxed), whether
the return-path domain of VERP (``[inbound] return_path_domain``) aligns with it in relaxed
mode (the same organizational domain, by the Public Suffix List shipped in the
``publicsuffixlist`` package: nothing is fetched at run time), and the DNS records the
operator must publish, ready to copy (:func:`domain_plan`, pure).

:class:`DnsChecker` then looks up whether they are published, through an ``IResolver``
passed in: each lookup bounded by a timeout, every check of a domain by an overall budget
(a page load waits about 2 s at most, then shows "could not check"), answers (and failures)
cached for a few minutes, lookups in flight shared.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any, Literal

from attrs import frozen
from publicsuffixlist import PublicSuffixList
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.names import dns, error
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

from smartrelay.config import Config
from smartrelay.rewrap.dkim import LoadedKey, txt_record_name, zone_file_entry

__all__ = [
    "DEFAULT_BUDGET",
    "CheckedRecord",
    "DeliverabilitySettings",
    "DnsChecker",
    "DnsRecord",
    "DomainPlan",
    "domain_plan",
    "organizational_domain",
    "sender_domains",
]

#: Seconds one DNS lookup may take; all the checks of a domain together, at most.
DEFAULT_LOOKUP_TIMEOUT = 1.5
DEFAULT_BUDGET = 2.0
#: Seconds an answer (published or not) is kept; a failure (timeout, server error) less.
DEFAULT_CACHE_TTL = 300.0
DEFAULT_FAILURE_TTL = 30.0
#: Sender domains of the last this many days (the roll-ups' ``received`` counts).
SEEN_DAYS = 30
#: DNS lookups one SPF evaluation may cause (RFC 7208 4.6.4).
SPF_LOOKUP_LIMIT = 10

Status = Literal["published", "missing", "wrong", "unknown"]


@frozen
class DnsRecord:
    """A record the operator must publish."""

    purpose: str  # spf-return-path, spf-from, dkim, dmarc, mx-return-path
    name: str  # owner name, no trailing dot
    type: str  # TXT or MX
    value: str  # TXT: the whole text; MX: "PREFERENCE HOST."
    zone_line: str  # as a BIND zone file line, ready to copy (TXT in 255-character strings)
    why: str


@frozen
class DomainPlan:
    domain: str
    #: The organizational domain (Public Suffix List); None for a public suffix itself.
    organizational_domain: str | None
    #: (key domain, selector) of each key that signs the domain's mail.
    dkim_keys: tuple[tuple[str, str], ...]
    #: "strict" (a key of the domain itself), "relaxed" (of a parent), "none" (unsigned).
    dkim_alignment: Literal["strict", "relaxed", "none"]
    return_path_domain: str
    #: SPF alignment of the return path with the domain, relaxed mode.
    return_path_aligned: bool
    records: tuple[DnsRecord, ...]


@frozen
class CheckedRecord:
    record: DnsRecord
    status: Status
    #: What was found (the published value, or why it could not be checked).
    found: str = ""


@frozen
class DeliverabilitySettings:
    hostname: str  # [server] hostname: the inbound MX host, and the relay's SPF "a:" name
    return_path_domain: str
    keys: tuple[LoadedKey, ...]  # DkimSigner.keys

    @classmethod
    def of(cls, config: Config, keys: Sequence[LoadedKey]) -> DeliverabilitySettings:
        """From the relay's config and its signer's loaded keys (``DkimSigner.keys``)."""
        return cls(config.server.hostname, config.inbound.return_path_domain, tuple(keys))


@cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # the list shipped in the package; built once


def organizational_domain(domain: str) -> str | None:
    """The registrable domain of ``domain`` (``mail.example.co.uk`` → ``example.co.uk``);
    None for a public suffix or not a domain."""
    domain = domain.strip().rstrip(".").lower()
    if not domain or "." not in domain:
        return None
    found = _psl().privatesuffix(domain)
    return str(found) if found else None


def keys_signing(domain: str, keys: Sequence[LoadedKey]) -> tuple[LoadedKey, ...]:
    """The keys the signer uses for mail from ``domain``: its own, else its closest parent's
    (rewrap/dkim.py's ``DkimSigner.keys_for``)."""
    by_domain: dict[str, list[LoadedKey]] = {}
    for key in keys:
        by_domain.setdefault(key.domain, []).append(key)
    current = domain.strip().rstrip(".").lower()
    while current:
        if current in by_domain:
            return tuple(by_domain[current])
        current = current.partition(".")[2]
    return ()


def domain_plan(domain: str, settings: DeliverabilitySettings) -> DomainPlan:
    """Alignment and the records to publish for mail from ``domain``."""
    domain = domain.strip().rstrip(".").lower()
    org = organizational_domain(domain)
    return_path = settings.return_path_domain.rstrip(".").lower()
    hostname = settings.hostname.rstrip(".").lower()
    keys = keys_signing(domain, settings.keys)
    alignment: Literal["strict", "relaxed", "none"] = "none"
    if keys:
        alignment = "strict" if keys[0].domain == domain else "relaxed"
        if organizational_domain(keys[0].domain) != org:
            alignment = "none"  # a key of a public suffix: not aligned with anything
    aligned = org is not None and organizational_domain(return_path) == org

    spf = f"v=spf1 a:{hostname} ~all"
    records = [
        _txt(
            "spf-return-path",
            return_path,
            spf,
            f"Receivers check SPF on the envelope sender, b+TOKEN@{return_path} (VERP): this "
            f"authorizes the addresses of {hostname} to send for it. ~all (soft fail) while "
            "you check nothing else sends for it; -all then.",
        ),
        _txt(
            "spf-from",
            domain,
            spf,
            f"For receivers that check the From domain too. If {domain} has an SPF record "
            f"already, add a:{hostname} to it instead: a name may have one SPF record only.",
        ),
    ]
    for key in keys:
        record = key.txt_record
        records.append(
            DnsRecord(
                "dkim",
                txt_record_name(key.domain, key.selector),
                "TXT",
                record,
                zone_file_entry(key.domain, key.selector, record),
                f"The public key of [[dkim.keys]] {key.domain} selector {key.selector} "
                f"({key.path}): receivers verify the signature with it.",
            )
        )
    dmarc_domain = org or domain
    records.append(
        _txt(
            "dmarc",
            f"_dmarc.{dmarc_domain}",
            f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{dmarc_domain}",
            "A starting point: p=none asks receivers to report (to the rua address, a mailbox "
            "you read) without rejecting anything, so that you see which mail passes before "
            "you move to p=quarantine, then p=reject. At the organizational domain it covers "
            "its subdomains too.",
        )
    )
    records.append(
        DnsRecord(
            "mx-return-path",
            return_path,
            "MX",
            f"10 {hostname}.",
            f"{return_path}. IN MX 10 {hostname}.",
            f"Bounces and feedback reports to b+TOKEN@{return_path} must reach the relay's "
            f"inbound listener ([inbound] listen) on {hostname}.",
        )
    )
    return DomainPlan(
        domain=domain,
        organizational_domain=org,
        dkim_keys=tuple((k.domain, k.selector) for k in keys),
        dkim_alignment=alignment,
        return_path_domain=return_path,
        return_path_aligned=aligned,
        records=tuple(records),
    )


def _txt(purpose: str, name: str, value: str, why: str) -> DnsRecord:
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    strings = " ".join(f'"{chunk}"' for chunk in chunks)
    return DnsRecord(purpose, name, "TXT", value, f"{name}. IN TXT ( {strings} )", why)


async def sender_domains(store: Any, now: float, days: int = SEEN_DAYS) -> list[tuple[str, int]]:
    """The sender domains seen in the last ``days`` days, from the roll-ups (``store`` is a
    :class:`smartrelay.storage.store.Store`), with their received counts, most first."""
    result: list[tuple[str, int]] = await store.sender_domains_seen(now - days * 86400.0, now + 1)
    return result


# -- is it published? --------------------------------------------------------------------------


class _Unknown(Exception):
    """A lookup that gave no answer (timeout, server failure, refused): could not check."""


class DnsChecker:
    """Compares what is published with what :func:`domain_plan` expects.

    ``resolver`` is an ``IResolver`` (``delivery.mx.make_system_resolver`` in the relay, a
    ``client.Resolver`` on a test server in the tests); ``clock`` bounds each lookup and
    keeps the cache.
    """

    def __init__(
        self,
        resolver: Any | Callable[[], Any],
        clock: IReactorTime,
        lookup_timeout: float = DEFAULT_LOOKUP_TIMEOUT,
        budget: float = DEFAULT_BUDGET,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        failure_ttl: float = DEFAULT_FAILURE_TTL,
    ) -> None:
        #: An IResolver, or a function making one at the first lookup (the relay's page:
        #: nothing of twisted.names is loaded, nor resolv.conf read, before it is used).
        self._resolver = resolver
        self._clock = clock
        self._lookup_timeout = lookup_timeout
        self._budget = budget
        self._cache_ttl = cache_ttl
        self._failure_ttl = failure_ttl
        # (type, name) -> (expires at, records or the failure)
        self._cache: dict[tuple[str, str], tuple[float, list[Any] | Exception]] = {}
        self._in_flight: dict[tuple[str, str], list[Deferred[list[Any]]]] = {}
        #: Lookups sent to the resolver (for tests and metrics).
        self.lookups = 0

    async def check(self, plan: DomainPlan) -> tuple[CheckedRecord, ...]:
        """Each of ``plan``'s records with its status, within the budget: what is not known
        by then is ``unknown`` ("could not check")."""
        checks: list[Deferred[CheckedRecord]] = []
        for record in plan.records:
            coroutine = self._check_record(record, plan.domain)
            deferred: Deferred[CheckedRecord] = Deferred.fromCoroutine(coroutine)
            deferred.addTimeout(self._budget, self._clock)
            deferred.addErrback(_could_not_check, record)
            checks.append(deferred)
        results: list[CheckedRecord] = await gatherResults(checks)
        return tuple(results)

    async def _check_record(self, record: DnsRecord, domain: str) -> CheckedRecord:
        try:
            if record.purpose.startswith("spf-"):
                return await self._check_spf(record)
            if record.purpose == "dkim":
                return await self._check_dkim(record)
            if record.purpose == "dmarc":
                return await self._check_dmarc(record, domain)
            if record.purpose == "mx-return-path":
                return await self._check_mx(record)
        except _Unknown as why:
            return CheckedRecord(record, "unknown", f"could not check: {why}")
        return CheckedRecord(record, "unknown", "could not check: no check for this record")

    # -- the records --

    async def _check_spf(self, record: DnsRecord) -> CheckedRecord:
        spf = _spf_records(await self._txt(record.name))
        if not spf:
            return CheckedRecord(record, "missing")
        if len(spf) > 1:
            return CheckedRecord(record, "wrong", f"{len(spf)} SPF records (one at most)")
        hostname = record.value.split("a:", 1)[1].split()[0]
        ours = await self._addresses(hostname)
        if not ours:
            return CheckedRecord(
                record, "unknown", f"{hostname} has no A/AAAA record: our addresses are unknown"
            )
        budget = [SPF_LOOKUP_LIMIT]
        verdict = await self._spf_passes(record.name, ours, budget, spf[0])
        if verdict is None:
            return CheckedRecord(record, "unknown", f"could not evaluate: {spf[0]}")
        return CheckedRecord(record, "published" if verdict else "wrong", spf[0])

    async def _check_dkim(self, record: DnsRecord) -> CheckedRecord:
        texts = [t for t in await self._txt(record.name) if _tags(t).get("v", "DKIM1") == "DKIM1"]
        if not texts:
            return CheckedRecord(record, "missing")
        wanted = _key_bytes(_tags(record.value).get("p", ""))
        for text in texts:
            if _key_bytes(_tags(text).get("p", "")) == wanted:
                return CheckedRecord(record, "published", text)
        return CheckedRecord(record, "wrong", texts[0])

    async def _check_dmarc(self, record: DnsRecord, domain: str) -> CheckedRecord:
        """The From domain's own record, else the organizational domain's (RFC 7489 6.6.3)."""
        texts: list[str] = []
        own = f"_dmarc.{domain}"
        if own != record.name:
            texts = [t for t in await self._txt(own) if t.startswith("v=DMARC1")]
        if not texts:
            texts = [t for t in await self._txt(record.name) if t.startswith("v=DMARC1")]
        if not texts:
            return CheckedRecord(record, "missing")
        if len(texts) > 1:
            return CheckedRecord(record, "wrong", f"{len(texts)} DMARC records (one at most)")
        if "p" not in _tags(texts[0]):
            return CheckedRecord(record, "wrong", texts[0])
        return CheckedRecord(record, "published", texts[0])

    async def _check_mx(self, record: DnsRecord) -> CheckedRecord:
        wanted = record.value.split()[1].rstrip(".").lower()
        hosts = [str(r.name).rstrip(".").lower() for r in await self._lookup("MX", record.name)]
        if not hosts:
            return CheckedRecord(record, "missing")
        found = ", ".join(hosts)
        return CheckedRecord(record, "published" if wanted in hosts else "wrong", found)

    # -- SPF (RFC 7208, without macros: a record with one is "could not evaluate") --

    async def _spf_passes(
        self, domain: str, ours: set[Any], budget: list[int], text: str | None = None
    ) -> bool | None:
        """Whether ``domain``'s SPF record passes one of ``ours``: True (pass), False
        (another result), None (cannot tell: macros, the lookup limit, no answer)."""
        if text is None:
            found = _spf_records(await self._txt(domain))
            if len(found) != 1:
                return None if len(found) > 1 else False
            text = found[0]
        if "%" in text:
            return None
        redirect = None
        for term in text.split()[1:]:
            qualifier = "+"
            if term[:1] in "+-~?":
                qualifier, term = term[0], term[1:]
            name, _, argument = term.partition(":")
            name = name.lower()
            if "=" in name:  # a modifier
                key, _, value = term.partition("=")
                if key.lower() == "redirect":
                    redirect = value
                continue
            matched: bool | None
            if name == "all":
                matched = True
            elif name in ("ip4", "ip6"):
                matched = _in_network(argument, ours)
            elif name.split("/")[0] in ("a", "mx"):
                if budget[0] <= 0:
                    return None
                budget[0] -= 1
                matched = await self._spf_host_match(name, argument, domain, ours)
            elif name == "include":
                if budget[0] <= 0:
                    return None
                budget[0] -= 1
                matched = await self._spf_passes(argument, ours, budget)
            elif name in ("exists", "ptr"):
                return None
            else:
                return None  # unknown mechanism: a permerror for receivers
            if matched is None:
                return None
            if matched:
                return qualifier == "+"
        if redirect is not None:
            if budget[0] <= 0:
                return None
            budget[0] -= 1
            return await self._spf_passes(redirect, ours, budget)
        return False

    async def _spf_host_match(
        self, name: str, argument: str, domain: str, ours: set[Any]
    ) -> bool | None:
        kind, _, mechanism_cidr = name.partition("/")
        target, _, cidr = argument.partition("/")
        cidr = cidr or mechanism_cidr
        target = target or domain
        hosts = [target]
        if kind == "mx":
            hosts = [str(r.name) for r in await self._lookup("MX", target)][:10]
        for host in hosts:
            for address in await self._addresses(host):
                prefix = int(cidr) if cidr.isdigit() else address.max_prefixlen
                network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
                if any(ip.version == network.version and ip in network for ip in ours):
                    return True
        return False

    # -- lookups, bounded and cached --

    async def _addresses(self, host: str) -> set[Any]:
        found: set[Any] = set()
        for record in await self._lookup("A", host):
            found.add(ipaddress.ip_address(record.dottedQuad()))
        for record in await self._lookup("AAAA", host):
            found.add(ipaddress.IPv6Address(record.address))
        return found

    async def _txt(self, name: str) -> list[str]:
        records = await self._lookup("TXT", name)
        return [b"".join(r.data).decode("utf-8", "replace") for r in records]

    async def _lookup(self, kind: str, name: str) -> list[Any]:
        """The payloads of ``name``'s records of ``kind`` (empty: none, or NXDOMAIN);
        raises _Unknown when the DNS gave no answer."""
        key = (kind, name.lower())
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock.seconds():
            if isinstance(cached[1], Exception):
                raise _Unknown(str(cached[1]))
            return cached[1]
        waiters = self._in_flight.get(key)
        if waiters is None:  # the first to ask sends the query; the others wait for it
            waiters = self._in_flight[key] = []
            Deferred.fromCoroutine(self._query(kind, name)).addBoth(self._deliver, key)
        waiter: Deferred[list[Any]] = Deferred()
        waiters.append(waiter)
        return await waiter

    def _deliver(self, result: list[Any] | Failure, key: tuple[str, str]) -> None:
        for waiter in self._in_flight.pop(key, []):
            if waiter.called:  # cancelled: its check ran out of time
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _query(self, kind: str, name: str) -> list[Any]:
        method = {
            "A": "lookupAddress",
            "AAAA": "lookupIPV6Address",
            "MX": "lookupMailExchange",
            "TXT": "lookupText",
        }[kind]
        wanted = getattr(dns, kind)
        self.lookups += 1
        key = (kind, name.lower())
        if callable(self._resolver) and not hasattr(self._resolver, method):
            self._resolver = self._resolver()
        lookup: Deferred[Any] = getattr(self._resolver, method)(
            name, timeout=(max(1, int(self._lookup_timeout + 0.999)),)
        )
        lookup.addTimeout(self._lookup_timeout, self._clock)
        try:
            answers, _, _ = await lookup
        except (DNSNameError, error.AuthoritativeDomainError):
            records: list[Any] = []  # NXDOMAIN: nothing published
        except (CancelledError, error.DNSQueryTimeoutError, TimeoutError):
            failure = _Unknown(f"no answer from DNS within {self._lookup_timeout:g} s")
            self._cache[key] = (self._clock.seconds() + self._failure_ttl, failure)
            raise failure from None
        except Exception as problem:
            failure = _Unknown(f"DNS error: {type(problem).__name__}")
            self._cache[key] = (self._clock.seconds() + self._failure_ttl, failure)
            raise failure from None
        else:
            records = [
                a.payload for a in answers if a.type == wanted and str(a.name).lower() == key[1]
            ] or [a.payload for a in answers if a.type == wanted]
        self._cache[key] = (self._clock.seconds() + self._cache_ttl, records)
        return records


def _could_not_check(failure: Failure, record: DnsRecord) -> CheckedRecord:
    if failure.check(CancelledError, TimeoutError):
        return CheckedRecord(record, "unknown", "could not check: DNS too slow")
    kind = failure.type.__name__ if failure.type is not None else "error"
    return CheckedRecord(record, "unknown", f"could not check: {kind}: {failure.getErrorMessage()}")


def _spf_records(texts: Iterable[str]) -> list[str]:
    return [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


def _tags(text: str) -> dict[str, str]:
    """A tag=value list (DKIM key records, DMARC): tag names as written, values stripped."""
    tags: dict[str, str] = {}
    for item in text.split(";"):
        name, equals, value = item.partition("=")
        if equals:
            tags.setdefault(name.strip(), value.strip())
    return tags


def _key_bytes(p: str) -> bytes | None:
    try:
        return base64.b64decode("".join(p.split()), validate=True) or None
    except ValueError:
        return None


def _in_network(argument: str, ours: set[Any]) -> bool:
    try:
        network = ipaddress.ip_network(argument, strict=False)
    except ValueError:
        return False
    return any(ip.version == network.version and ip in network for ip in ours)
