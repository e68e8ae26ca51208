"""``GET /metrics``: the relay's Prometheus metrics (docs/metrics.md), on ``[web] listen``.

Access (an addition): a client in ``[api] metrics_networks`` (its address after ``[web]
trusted_proxies``, as the reports UI reads it) whose request no untrusted proxy forwarded, or
any client with a valid API token (``Authorization: Bearer``). Else 403 with a short text.

The exposition is :class:`~smartrelay.metrics.RelayMetrics`'s registry: this process's
counters plus its delivery processes', then the database gauges, read here at most every
:data:`GAUGES_TTL` seconds, one read at a time (concurrent scrapes wait for it). A failed read
serves the last figures (their age is a gauge) or, with none yet, a 503.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from smartrelay.config import Config
from smartrelay.config.model import IPNetwork
from smartrelay.metrics import RelayMetrics
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.store import Store
from smartrelay.web.service import plain_text, set_header
from smartrelay.web.ui.context import client_address

__all__ = ["GAUGES_TTL", "MetricsEndpoint"]

log = Logger()

#: Seconds the database gauges are reused for (scrapes of several Prometheus servers, or a
#: scrape every second, cost one read).
GAUGES_TTL = 5.0
#: An ``Authorization`` header longer than this is refused without a look at the database.
MAX_AUTHORIZATION = 300


class MetricsEndpoint:
    """What ``/metrics`` answers; :meth:`serve` is the route's handler."""

    def __init__(
        self,
        metrics: RelayMetrics,
        store_ready: Callable[[], Deferred[Store]],
        clock: IReactorTime,
        config: Config,
    ) -> None:
        self._metrics = metrics
        self._store_ready = store_ready
        self._clock = clock
        self._networks = config.api.metrics_networks
        self._trusted = config.web.trusted_proxies
        self._webhooks = tuple((w.url, w.events) for w in config.webhooks)
        self._lock = DeferredLock()
        metrics.database.now = clock.seconds

    def serve(self, request: IRequest) -> Deferred[bytes]:
        """The response body; the handler runs to its end even if the client goes away
        (Klein cancels the Deferred it got: only that one fails)."""
        outer: Deferred[bytes] = Deferred(lambda d: None)

        def deliver(body: bytes) -> None:
            if not outer.called:
                outer.callback(body)

        Deferred.fromCoroutine(self._guarded(request)).addCallback(deliver)
        return outer

    async def _guarded(self, request: IRequest) -> bytes:
        try:
            return await self._serve(request)
        except Exception:
            log.failure("web: /metrics failed")
            return plain_text(request, 500, "Internal error.\n")

    async def _serve(self, request: IRequest) -> bytes:
        if not self._by_network(request):
            token = _bearer(request)
            if token is None:
                return plain_text(request, 403, "Forbidden: not from [api] metrics_networks.\n")
            try:
                store = await self._store_ready()
                name = await store.api_token_name(token)
            except DatabaseUnavailable:
                return plain_text(request, 503, "Database unavailable.\n")
            if name is None:
                return plain_text(request, 403, "Forbidden: unknown API token.\n")
        if not await self._gauges_read():
            return plain_text(request, 503, "Database unavailable.\n")
        body = generate_latest(self._metrics.registry)
        set_header(request, b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        set_header(request, b"Cache-Control", b"no-store")
        return body

    def _by_network(self, request: IRequest) -> bool:
        """Whether the client may read without a token: in ``metrics_networks``, and not
        forwarded by a proxy we do not trust (a header from an untrusted peer)."""
        peer = getattr(request.getClientAddress(), "host", "")  # type: ignore[no-untyped-call]
        headers = request.requestHeaders
        forwarded_for = headers.hasHeader(b"x-forwarded-for")
        forwarded = forwarded_for or headers.hasHeader(b"forwarded")
        if forwarded:
            if not (isinstance(peer, str) and _in(peer, self._trusted)):
                return False
            if not forwarded_for:  # a trusted proxy's RFC 7239 header alone: client unknown
                return False
        return _in(client_address(request, self._trusted), self._networks)

    async def _gauges_read(self) -> bool:
        """Make the database figures at most :data:`GAUGES_TTL` old; False if there are
        none to show (the first read failed)."""
        database = self._metrics.database
        async with self._lock:
            if database.figures is not None and database.now() - database.read_at < GAUGES_TTL:
                return True
            try:
                store = await self._store_ready()
                database.figures = await store.metrics_figures(self._webhooks)
                database.read_at = database.now()
            except DatabaseUnavailable as error:
                self._metrics.database_gauge_failures.inc()
                log.warn("web: /metrics: the database gauges were not read: {error}", error=error)
            except Exception:
                self._metrics.database_gauge_failures.inc()
                log.failure("web: /metrics: reading the database gauges failed")
            return database.figures is not None


def _bearer(request: IRequest) -> str | None:
    values = request.requestHeaders.getRawHeaders(b"authorization") or []
    if len(values) != 1 or len(values[0]) > MAX_AUTHORIZATION:
        return None
    raw: bytes = values[0]
    scheme, _, token = raw.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return str(token.strip())


def _in(address: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)
