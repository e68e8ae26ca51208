"""MTA-STS (RFC 8461) for ``mx`` routes, and the TLS results a TLS-RPT (RFC 8460) report needs.

For a recipient domain, :meth:`MtaSts.gate_for` looks up ``_mta-sts.DOMAIN`` TXT; when it
names a policy id, the policy is taken from memory or the database if it has that id and has
not expired, else fetched from ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``
(:class:`PolicyFetcher`: verified HTTPS, no redirects, a size cap and a time limit) and kept
for its ``max_age``. A fetch that fails while an unexpired policy is known keeps using that
one (RFC 8461 5.1); so does a missing TXT record.

The :class:`StsGate` it returns wraps the connector for each MX host:

* ``enforce``: an MX host that matches none of the policy's ``mx`` patterns is not used;
  STARTTLS is required; the server's certificate must chain to a trusted root and be valid
  for the MX host name (checked after the handshake, before any mail is sent). Otherwise
  :class:`StsRefused` (a temporary failure: the recipients are deferred with its text).
* ``testing``: delivery as usual; a failure is logged and recorded.
* ``none`` (or no policy): delivery as usual.

Every session under a policy, and every failed policy fetch, is counted per policy domain
per UTC day in ``tls_report_results`` (success, or its RFC 8460 result type).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl as stdlib_ssl
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, cast

import attrs
import treq
from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, VerificationError
from cryptography.x509.verification import Store as X509Store
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IResolver, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from smartrelay.delivery.client import (
    Connector,
    OutboundSession,
    ServerReply,
    SmtpClientError,
    TlsFailed,
    TlsUnavailable,
)
from smartrelay.delivery.mx import DEFAULT_DNS_TIMEOUT
from smartrelay.delivery.routing import NextHop, normalize_domain
from smartrelay.reactor import IRelayReactor
from smartrelay.storage.mta_sts import StoredStsPolicy, StsPolicyStore, TlsResult

__all__ = [
    "MtaSts",
    "PolicyFetcher",
    "StsError",
    "StsGate",
    "StsPolicy",
    "StsRefused",
    "check_certificate",
    "name_matches",
    "parse_policy",
    "parse_sts_record",
    "system_roots",
]

log = Logger()

StsMode = Literal["enforce", "testing", "none"]

#: RFC 8461 3.2: a policy body is small; more than this is refused.
POLICY_SIZE_LIMIT = 64 * 1024
#: RFC 8461 3.2: max_age is at most 31557600 seconds (about a year).
MAX_MAX_AGE = 31_557_600
#: How long a TXT answer (a policy id, or none) is used before asking again.
TXT_RECHECK = 300.0
#: Seconds after which the TXT query is re-sent, then given up (10 s in all): a domain
#: whose DNS does not answer is not held up for the MX lookups' full minute.
TXT_TIMEOUT: tuple[int, ...] = (1, 3, 6)
#: The whole policy fetch (address lookup, connect, TLS, response), at most.
FETCH_TIMEOUT = 30.0
#: Domains whose state is kept in memory, at most (the oldest go first).
MAX_DOMAINS = 10_000
#: TLS results are written in batches, this often at most.
RESULTS_FLUSH = 1.0

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class StsError(Exception):
    """A policy could not be had; ``result_type`` is its RFC 8460 name."""

    result_type = "sts-policy-fetch-error"


class PolicyInvalid(StsError):
    result_type = "sts-policy-invalid"


class PolicyTlsInvalid(StsError):
    result_type = "sts-webpki-invalid"


class StsRefused(SmtpClientError):
    """An ``enforce`` policy rules this MX host (or this session) out."""


@frozen
class StsPolicy:
    domain: str
    policy_id: str
    mode: StsMode
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float
    text: str

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.max_age

    def allows(self, host: str) -> bool:
        return any(name_matches(pattern, host) for pattern in self.mx)


# -- parsing ---------------------------------------------------------------------------------
def parse_sts_record(texts: Sequence[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records (each the join of its strings), or None.

    RFC 8461 3.1: records not starting with ``v=STSv1`` are ignored; several STSv1 records,
    or one without a valid ``id``, mean no policy.
    """
    found = [t for t in texts if t.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        key, equals, value = part.strip().partition("=")
        if not key:
            continue
        if not equals:
            return None
        fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def parse_policy(text: str) -> tuple[StsMode, tuple[str, ...], int]:
    """``(mode, mx patterns, max_age)`` of a policy body (RFC 8461 3.2); raises
    :class:`PolicyInvalid` with a short reason."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyInvalid(f"line without a key: {line[:60]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyInvalid(f"version is {fields.get('version', 'missing')!r}, not 'STSv1'")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyInvalid(f"mode {mode!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not (age.isascii() and age.isdigit() and len(age) <= 10):
        raise PolicyInvalid(f"max_age {age!r} is not a number of seconds")
    for pattern in mx:
        if not _valid_pattern(pattern):
            raise PolicyInvalid(f"mx pattern {pattern[:80]!r} is not a host name")
    if mode != "none" and not mx:
        raise PolicyInvalid("no mx patterns")
    return cast(StsMode, mode), tuple(mx), min(int(age), MAX_MAX_AGE)


def _valid_pattern(pattern: str) -> bool:
    name = pattern[2:] if pattern.startswith("*.") else pattern
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def name_matches(pattern: str, host: str) -> bool:
    """``mx.example.net`` matches itself; ``*.example.net`` matches one more label on the left
    (RFC 8461 4.1, and RFC 6125 6.4.3 for certificate names). Case and a final dot ignored."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label and dot) and rest == pattern[2:]
    return pattern == host


# -- certificates ----------------------------------------------------------------------------
_SYSTEM_ROOTS: tuple[x509.Certificate, ...] | None = None


def system_roots() -> tuple[x509.Certificate, ...]:
    """The system's trusted roots (OpenSSL's default file, e.g. ``SSL_CERT_FILE``, or its
    directory), read once; a certificate that cannot be read is left out."""
    global _SYSTEM_ROOTS
    if _SYSTEM_ROOTS is None:
        paths = stdlib_ssl.get_default_verify_paths()
        files: list[str] = []
        for name in (paths.cafile, paths.openssl_cafile):
            if name and os.path.isfile(name):
                files = [name]
                break
        else:
            directory = paths.capath or paths.openssl_capath
            if directory and os.path.isdir(directory):
                files = [os.path.join(directory, e) for e in sorted(os.listdir(directory))]
        roots: list[x509.Certificate] = []
        for name in files:
            with contextlib.suppress(OSError), open(name, "rb") as pem:
                roots.extend(_read_pem_certificates(pem.read()))
        _SYSTEM_ROOTS = tuple(roots)
    return _SYSTEM_ROOTS


_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _read_pem_certificates(data: bytes) -> list[x509.Certificate]:
    found: list[x509.Certificate] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old roots with a non-positive serial, say
        for block in _PEM_BLOCK.findall(data):
            with contextlib.suppress(ValueError):
                found.append(x509.load_pem_x509_certificate(block))
    return found


def check_certificate(
    chain: Sequence[bytes],
    host: str,
    roots: Sequence[x509.Certificate] | X509Store,
    now: float,
) -> tuple[str, str] | None:
    """None if the chain (DER, the server's first) is valid for ``host`` at ``now`` and leads
    to one of ``roots`` (certificates, or a store made of them once: cheaper per call); else
    ``(RFC 8460 result type, why)``."""
    if not chain:
        return "certificate-not-trusted", "no certificate"
    try:
        certificates = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        return "validation-failure", "unreadable certificate"
    leaf = certificates[0]
    when = datetime.fromtimestamp(now, UTC)
    if not leaf.not_valid_before_utc <= when <= leaf.not_valid_after_utc:
        return "certificate-expired", f"valid {leaf.not_valid_before_utc:%Y-%m-%d} to " + (
            f"{leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    try:
        names = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not any(name_matches(name, host) for name in names):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        return "certificate-host-mismatch", f"it names {shown or 'no host'}"
    if not isinstance(roots, X509Store):
        if not roots:
            return "certificate-not-trusted", "no trusted roots"
        roots = X509Store(list(roots))
    try:
        verifier = PolicyBuilder().store(roots).time(when).build_server_verifier(x509.DNSName(host))
        verifier.verify(leaf, certificates[1:])
    except (VerificationError, ValueError) as error:
        return "certificate-not-trusted", " ".join(str(error).split())[:200]
    return None


def _untyped(function: Any) -> Callable[..., Any]:
    """``function``, for calling from typed code (Twisted leaves it unannotated)."""
    return cast(Callable[..., Any], function)


def _peer_chain(session: OutboundSession) -> tuple[bytes, ...]:
    return tuple(getattr(session, "peer_certificates", ()))


# -- fetching --------------------------------------------------------------------------------
@implementer(IAgentEndpointFactory)
class _OneAddress:
    """Connects every request to one address already resolved, TLS checked for ``host``."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self._endpoint


class PolicyFetcher:
    """Fetches ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` (RFC 8461 3.3) with treq.

    The host's address comes from ``resolver`` (the one MX lookups use). The certificate is
    checked for the host name against the system's roots, or ``roots`` (a private CA, tests).
    No redirects; only ``200`` with ``text/plain``; at most :data:`POLICY_SIZE_LIMIT` bytes and
    ``timeout`` seconds in all. ``port`` is 443 but in tests.
    """

    def __init__(
        self,
        reactor: IRelayReactor,
        resolver: IResolver,
        roots: Sequence[x509.Certificate] | None = None,
        *,
        port: int = 443,
        timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._port = port
        self.timeout = timeout
        if roots is None:
            self._trust: Any = _untyped(ssl.platformTrust)()
        else:
            self._trust = _untyped(ssl.trustRootFromCertificates)(
                [ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in roots]
            )

    async def fetch(self, domain: str) -> str:
        """The policy's text; raises :class:`StsError` (or a subclass) saying why not."""
        running = Deferred.fromCoroutine(self._fetch(domain))
        try:
            return await running.addTimeout(self.timeout, self._reactor)
        except StsError:
            raise
        except Exception as error:
            if _is_tls_error(error):
                raise PolicyTlsInvalid(f"HTTPS certificate of mta-sts.{domain} refused") from error
            text = " ".join(str(error).split())[:160] or type(error).__name__
            raise StsError(f"fetching the policy of {domain} failed: {text}") from error

    async def _fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        address = await self._address(host)
        options = ssl.optionsForClientTLS(host, trustRoot=self._trust)
        tcp = HostnameEndpoint(self._reactor, address, self._port, timeout=self.timeout)
        pool = _untyped(HTTPConnectionPool)(self._reactor, persistent=False)
        agent = _untyped(Agent.usingEndpointFactory)(
            self._reactor, _OneAddress(wrapClientTLS(options, tcp)), pool=pool
        )
        client = HTTPClient(agent)
        url = f"https://{host}/.well-known/mta-sts.txt"
        response: IResponse = await client.get(
            url, allow_redirects=False, headers=Headers({b"User-Agent": [b"SmartRelay MTA-STS"]})
        )
        if response.code != 200:
            with contextlib.suppress(Exception):
                _untyped(response.deliverBody)(_Discard())
            raise StsError(f"{url} answered HTTP {response.code}, not 200")
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if not kind.split(b";")[0].strip().lower() == b"text/plain":
            raise PolicyInvalid(f"{url} is {kind[:40]!r}, not text/plain")
        length = response.length
        if isinstance(length, int) and length > POLICY_SIZE_LIMIT:
            raise PolicyInvalid(f"{url} is {length} bytes, over {POLICY_SIZE_LIMIT}")
        body = bytearray()

        def collect(data: bytes) -> None:
            body.extend(data)
            if len(body) > POLICY_SIZE_LIMIT:
                raise PolicyInvalid(f"{url} is over {POLICY_SIZE_LIMIT} bytes")

        await treq.collect(response, collect)
        try:
            return bytes(body).decode("utf-8")
        except UnicodeDecodeError as error:
            raise PolicyInvalid(f"{url} is not UTF-8") from error

    async def _address(self, host: str) -> str:
        lookups = (self._resolver.lookupAddress, self._resolver.lookupIPV6Address)
        for lookup in lookups:
            try:
                answers: Any = (await lookup(host, DEFAULT_DNS_TIMEOUT))[0]
            except Exception:  # NXDOMAIN, or no record of this type: try the next
                continue
            for record in answers:
                if record.type == dns.A:
                    return cast(str, record.payload.dottedQuad())
                if record.type == dns.AAAA:
                    return socket.inet_ntop(socket.AF_INET6, record.payload.address)
        raise StsError(f"{host} has no address")


class _Discard:
    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


def _is_tls_error(error: BaseException) -> bool:
    pending: list[Any] = [error]
    for _ in range(20):
        if not pending:
            break
        item = pending.pop()
        if isinstance(item, Failure):
            item = item.value
        if isinstance(item, SSL.Error):
            return True
        pending.extend(getattr(item, "reasons", None) or [])
    return False


# -- the policy cache and the gate -----------------------------------------------------------
@attrs.define
class _DomainState:
    #: The TXT answer is used until then.
    checked_until: float = float("-inf")
    #: The policy known (maybe expired, maybe of another id than the TXT names now).
    policy: StsPolicy | None = None
    loaded: bool = False  # the database was asked


Fetch = Callable[[str], Awaitable[str]]


class MtaSts:
    """The MTA-STS policies of recipient domains: looked up, fetched, cached (memory and the
    database), and the TLS results to count.

    ``resolver`` answers the TXT lookups; ``fetch`` is :meth:`PolicyFetcher.fetch`; ``roots``
    the trusted roots for SMTP certificates (None: the system's, read when first needed).
    """

    def __init__(
        self,
        clock: IReactorTime,
        resolver: IResolver,
        fetch: Fetch,
        roots: Sequence[x509.Certificate] | None = None,
        *,
        txt_recheck: float = TXT_RECHECK,
        max_domains: int = MAX_DOMAINS,
    ) -> None:
        self._clock = clock
        self._resolver = resolver
        self._fetch = fetch
        self._roots = tuple(roots) if roots is not None else None
        self._root_store: X509Store | None = None
        self.txt_recheck = txt_recheck
        self.max_domains = max_domains
        self._domains: dict[str, _DomainState] = {}
        self._pending: dict[str, Deferred[StsPolicy | None]] = {}
        self._results: list[TlsResult] = []
        self._flush_call: IDelayedCall | None = None
        self._store: StsPolicyStore | None = None
        #: Policy fetches made (not served from a cache).
        self.fetches = 0

    def now(self) -> float:
        return self._clock.seconds()

    @property
    def roots(self) -> X509Store | tuple[x509.Certificate, ...]:
        """The trusted roots for SMTP certificates, as a store built once (empty: none)."""
        if self._root_store is None:
            roots = self._roots if self._roots is not None else system_roots()
            if not roots:
                return ()
            self._root_store = X509Store(list(roots))
        return self._root_store

    async def gate_for(self, domain: str, store: StsPolicyStore | None) -> StsGate | None:
        """The gate for ``domain``'s policy, or None (no policy, mode ``none``). Never
        raises: whatever goes wrong leaves the domain without a policy, as no policy would."""
        self._store = store if store is not None else self._store
        try:
            name = normalize_domain(domain)
        except ValueError:
            return None
        try:
            policy = await self._policy(name)
        except Exception:
            log.failure("MTA-STS: looking up the policy of {domain} failed", domain=name)
            return None
        if policy is None or policy.mode == "none":
            return None
        return StsGate(self, policy)

    async def _policy(self, domain: str) -> StsPolicy | None:
        state = self._domains.get(domain)
        now = self._clock.seconds()
        if state is not None and now < state.checked_until:
            return _unexpired(state.policy, now)
        pending = self._pending.get(domain)
        if pending is None:
            pending = Deferred.fromCoroutine(self._refresh(domain))
            self._pending[domain] = pending
            pending.addBoth(self._done, domain)
        return await _share(pending)

    def _done(self, result: object, domain: str) -> object:
        self._pending.pop(domain, None)
        return result

    async def _refresh(self, domain: str) -> StsPolicy | None:
        try:
            return await self._refresh_once(domain)
        except Exception:
            log.failure("MTA-STS: looking up the policy of {domain} failed", domain=domain)
            return None

    async def _refresh_once(self, domain: str) -> StsPolicy | None:
        state = self._domains.pop(domain, None) or _DomainState()
        self._domains[domain] = state  # most recently used last
        while len(self._domains) > self.max_domains:
            del self._domains[next(iter(self._domains))]
        if not state.loaded:
            state.policy = await self._load(domain) or state.policy
            state.loaded = True
        policy_id = await self._txt(domain)
        now = self._clock.seconds()
        current = _unexpired(state.policy, now)
        if policy_id is not None and (current is None or current.policy_id != policy_id):
            stored = await self._load(domain)  # another node or process may have it already
            if stored is not None and stored.policy_id == policy_id and stored.expires_at > now:
                state.policy = stored
            else:
                fetched = await self._fetch_policy(domain, policy_id, current)
                if fetched is not None:
                    state.policy = fetched
        state.checked_until = self._clock.seconds() + self.txt_recheck
        return _unexpired(state.policy, self._clock.seconds())

    async def _fetch_policy(
        self, domain: str, policy_id: str, current: StsPolicy | None
    ) -> StsPolicy | None:
        self.fetches += 1
        try:
            text = await self._fetch(domain)
            mode, mx, max_age = parse_policy(text)
        except StsError as error:
            kept = f"; keeping policy {current.policy_id} ({current.mode})" if current else ""
            log.warn("MTA-STS: {domain}: {error}{kept}", domain=domain, error=error, kept=kept)
            self.record(domain, current, error.result_type, "", str(error), policy_id=policy_id)
            return None
        policy = StsPolicy(domain, policy_id, mode, mx, max_age, self._clock.seconds(), text)
        log.info(
            "MTA-STS: {domain}: policy {id} mode={mode} mx={mx} max_age={age}",
            domain=domain,
            id=policy_id,
            mode=mode,
            mx=",".join(mx),
            age=max_age,
        )
        if self._store is not None:
            try:
                await self._store.save_sts_policy(
                    StoredStsPolicy(
                        domain,
                        policy_id,
                        mode,
                        mx,
                        max_age,
                        policy.fetched_at,
                        policy.expires_at,
                        text,
                    )
                )
            except Exception as error:
                log.warn(
                    "MTA-STS: {domain}: policy not saved ({error})", domain=domain, error=error
                )
        return policy

    async def _load(self, domain: str) -> StsPolicy | None:
        if self._store is None:
            return None
        try:
            row = await self._store.load_sts_policy(domain)
        except Exception as error:
            log.warn("MTA-STS: {domain}: policy not read ({error})", domain=domain, error=error)
            return None
        if row is None or row.mode not in ("enforce", "testing", "none"):
            return None
        return StsPolicy(
            row.domain,
            row.policy_id,
            cast(StsMode, row.mode),
            row.mx,
            row.max_age,
            row.fetched_at,
            row.policy_text,
        )

    async def _txt(self, domain: str) -> str | None:
        """The policy id the TXT record names; None without one (or when DNS fails)."""
        try:
            found: Any = await self._resolver.lookupText(f"_mta-sts.{domain}", TXT_TIMEOUT)
            answers: Any = found[0]
        except (DNSNameError, AuthoritativeDomainError):
            return None
        except Exception as error:
            log.info("MTA-STS: {domain}: TXT lookup failed ({error})", domain=domain, error=error)
            return None
        texts = [
            b"".join(record.payload.data).decode("utf-8", "replace")
            for record in answers
            if record.type == dns.TXT
        ]
        return parse_sts_record(texts)

    # -- TLS results -------------------------------------------------------------------------
    def record(
        self,
        domain: str,
        policy: StsPolicy | None,
        result: str,
        mx_host: str,
        detail: str = "",
        *,
        policy_id: str | None = None,
    ) -> None:
        """Count one session (or policy fetch) for ``domain``'s TLS report of today."""
        day = time.strftime("%Y-%m-%d", time.gmtime(self._clock.seconds()))
        self._results.append(
            TlsResult(
                day=day,
                policy_domain=domain,
                policy_id=policy_id or (policy.policy_id if policy else ""),
                mode=policy.mode if policy else "",
                result=result,
                mx_host=mx_host,
                detail=detail[:300],
            )
        )
        if self._flush_call is None or not self._flush_call.active():
            self._flush_call = self._clock.callLater(RESULTS_FLUSH, self._flush)

    def _flush(self) -> None:
        Deferred.fromCoroutine(self.flush())

    async def flush(self) -> None:
        """Write the results counted so far (the delivery manager's stop waits for it)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        results, self._results = self._results, []
        if not results or self._store is None:
            return
        try:
            await self._store.add_tls_results(results)
        except Exception as error:
            log.warn(
                "MTA-STS: {n} TLS result(s) not recorded ({error})", n=len(results), error=error
            )


async def _share(pending: Deferred[StsPolicy | None]) -> StsPolicy | None:
    """Wait for ``pending`` without taking its result from the other waiters."""
    waiter: Deferred[StsPolicy | None] = Deferred()

    def passed(result: StsPolicy | None) -> StsPolicy | None:
        waiter.callback(result)
        return result

    def failed(failure: Failure) -> Failure:
        waiter.errback(failure)
        return failure

    pending.addCallbacks(passed, failed)
    return await waiter


def _unexpired(policy: StsPolicy | None, now: float) -> StsPolicy | None:
    return policy if policy is not None and policy.expires_at > now else None


class StsGate:
    """Opens sessions with a domain's MX hosts under its policy (``enforce`` or ``testing``)."""

    def __init__(self, sts: MtaSts, policy: StsPolicy) -> None:
        self._sts = sts
        self.policy = policy

    @property
    def enforce(self) -> bool:
        return self.policy.mode == "enforce"

    def _fail(self, host: str, result: str, why: str) -> None:
        """Count and log a failure; under ``enforce``, refuse the host."""
        policy = self.policy
        self._sts.record(policy.domain, policy, result, host, why)
        if self.enforce:
            raise StsRefused(f"MTA-STS: {why}")
        log.warn(
            "MTA-STS testing: {domain}: {why} (delivering all the same)",
            domain=policy.domain,
            why=why,
        )

    async def connect(
        self, connector: Connector, hop: NextHop
    ) -> tuple[OutboundSession | None, ServerReply | None]:
        policy, host = self.policy, hop.host
        if not policy.allows(host):
            self._fail(
                host,
                "validation-failure",
                f"{host} does not match the policy of {policy.domain} (mx {', '.join(policy.mx)})",
            )
            return await connector(hop)  # testing: as usual
        try:
            session, refusal = await connector(
                attrs.evolve(hop, require_tls=True) if self.enforce else hop
            )
        except TlsUnavailable as error:
            self._fail(host, "starttls-not-supported", f"{host}: {error}")
            raise
        except TlsFailed as error:
            self._fail(host, "validation-failure", f"TLS with {host} failed: {error}")
            raise
        if session is None:
            return None, refusal
        try:
            if not session.tls:
                self._fail(host, "starttls-not-supported", f"{host} does not offer STARTTLS")
                return session, None
            problem = check_certificate(
                _peer_chain(session), host, self._sts.roots, self._sts.now()
            )
            if problem is not None:
                result, why = problem
                self._fail(host, result, f"certificate not valid for {host} ({why})")
            else:
                self._sts.record(policy.domain, policy, "success", host)
        except StsRefused:
            await session.quit()
            raise
        return session, None
