"""``GET /metrics`` over real HTTP: the exposition parses, the access rule, the database
gauges' cache and their failure (smartrelay/web/metrics.py, docs/metrics.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from smartrelay.config import Config, parse_config
from smartrelay.listening import ListeningService
from smartrelay.metrics import RelayMetrics
from smartrelay.storage.api_tokens import generate_api_token
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.store import NewMessage, Store
from smartrelay.tokens import TokenCodec, load_keyring
from smartrelay.web.metrics import MetricsEndpoint
from smartrelay.web.service import web_service
from smartrelay.web.site import WebRoot
from smartrelay.web.tracking import Tracking
from tests.conftest import real_reactor

Serve = Callable[[Mapping[str, Any]], Deferred[str]]


class Served:
    """A web root with ``/metrics`` on a free loopback port, per config; stopped at the end."""

    def __init__(self, tmp_path: Path, store: Store) -> None:
        self.tmp_path = tmp_path
        self.store = store
        self.metrics = RelayMetrics()
        self.services: list[ListeningService] = []
        self.store_ready: Callable[[], Deferred[Store]] = lambda: succeed(store)

    def config(self, extra: Mapping[str, Any]) -> Config:
        return parse_config({"database": {"url": "sqlite::memory:"}, **extra})

    def start(self, extra: Mapping[str, Any] = {}) -> str:
        config = self.config(extra)
        codec = TokenCodec(load_keyring(str(self.tmp_path / "secret.key")))
        tracking = Tracking(lambda: succeed(self.store), codec, real_reactor(), config.suppression)
        endpoint = None
        if config.api.metrics:
            endpoint = MetricsEndpoint(
                self.metrics, lambda: self.store_ready(), real_reactor(), config
            )
        fatal: list[str] = []
        service = web_service(
            real_reactor(),
            "tcp:0:interface=127.0.0.1",
            WebRoot(tracking, None, endpoint).resource(),
            fatal.append,
        )
        service.startService()
        assert fatal == [] and service.port is not None
        self.services.append(service)
        return f"http://127.0.0.1:{service.port.getHost().port}/metrics"  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for service in self.services:
            stopped = service.stopService()
            if stopped is not None:
                await stopped


@pytest_twisted.async_yield_fixture
async def served(tmp_path: Path, store: Store) -> AsyncIterator[Served]:
    served = Served(tmp_path, store)
    yield served
    await served.stop()


async def get(
    url: str, headers: Mapping[bytes, list[bytes]] | None = None, method: str = "GET"
) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    reactor = real_reactor()
    pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
    agent = Agent(reactor, pool=pool)  # type: ignore[no-untyped-call]
    sent = Headers({name: list(values) for name, values in (headers or {}).items()})
    response = await treq.request(method, url, agent=agent, headers=sent)
    body: bytes = await response.content()
    return response.code, dict(response.headers.getAllRawHeaders()), body


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest_twisted.ensureDeferred
async def test_the_exposition_parses_with_counters_and_database_gauges(
    served: Served, store: Store
) -> None:
    metrics = served.metrics
    metrics.messages_received.labels(listener="smtp").inc(3)
    metrics.recipients_received.labels(listener="smtp").inc(5)
    metrics.delivery_latency.observe(0.3)
    await store.queue_message(NewMessage("s@x.test", ("a@a.test", "b@a.test"), b"x\r\n"))
    url = served.start()
    code, headers, body = await get(url)
    assert code == 200, body
    assert headers[b"Content-Type"] == [CONTENT_TYPE_LATEST.encode()]
    found = samples(body)
    assert found["smartrelay_messages_received_total", (("listener", "smtp"),)] == 3
    assert found["smartrelay_recipients_received_total", (("listener", "smtp"),)] == 5
    assert found["smartrelay_delivery_latency_seconds_count", ()] == 1
    assert found["smartrelay_delivery_latency_seconds_bucket", (("le", "0.5"),)] == 1
    assert found["smartrelay_delivery_latency_seconds_bucket", (("le", "0.25"),)] == 0
    assert found["smartrelay_queue_recipients", (("destination", "a.test"),)] == 2
    assert found["smartrelay_credentials_held", ()] == 0
    assert ("smartrelay_database_gauges_age_seconds", ()) in found
    # HEAD answers too; another method falls through to the root's 404 page.
    code, _headers, _body = await get(url, method="HEAD")
    assert code == 200
    code, _headers, body = await get(url, method="POST")
    assert code == 404 and b"smartrelay_" not in body


@pytest_twisted.ensureDeferred
async def test_the_database_gauges_are_cached_and_a_failure_serves_them_or_503(
    served: Served, store: Store
) -> None:
    reads: list[str] = []
    failing = False

    def store_ready() -> Deferred[Store]:
        reads.append("read")
        if failing:
            return Deferred.fromCoroutine(_unavailable())
        return succeed(store)

    served.store_ready = store_ready
    url = served.start()
    # Scrapes in a row within the cache's lifetime read the database once.
    for _ in range(3):
        code, _headers, body = await get(url)
        assert code == 200
    assert len(reads) == 1
    # Figures too old and the database gone: the last figures, and the failure counted.
    served.metrics.database.read_at -= 60
    failing = True
    code, _headers, body = await get(url)
    assert code == 200
    found = samples(body)
    assert found["smartrelay_database_gauges_failures_total", ()] == 1
    assert found["smartrelay_database_gauges_age_seconds", ()] >= 60
    # With no figures at all: 503, a short text.
    served.metrics.database.figures = None
    code, headers, body = await get(url)
    assert (code, body) == (503, b"Database unavailable.\n")
    assert headers[b"Content-Type"] == [b"text/plain; charset=utf-8"]


async def _unavailable() -> Store:
    raise DatabaseUnavailable("connection refused")


@pytest_twisted.ensureDeferred
async def test_loopback_may_read_by_default_and_a_forwarded_request_may_not(
    served: Served,
) -> None:
    url = served.start()
    assert (await get(url))[0] == 200
    # 127.0.0.1 is no trusted proxy: a forwarded request is someone else's.
    for header in (b"x-forwarded-for", b"forwarded"):
        code, _headers, body = await get(url, {header: [b"127.0.0.1"]})
        assert (code, body) == (403, b"Forbidden: not from [api] metrics_networks.\n")
    # Behind a trusted proxy, the client it names counts.
    url = served.start({"web": {"trusted_proxies": ["127.0.0.0/8"]}})
    assert (await get(url, {b"x-forwarded-for": [b"127.0.0.9"]}))[0] == 200
    assert (await get(url, {b"x-forwarded-for": [b"198.51.100.7"]}))[0] == 403
    assert (await get(url, {b"x-forwarded-for": [b"198.51.100.7, 127.0.0.9"]}))[0] == 403
    assert (await get(url, {b"forwarded": [b"for=127.0.0.9"]}))[0] == 403  # client unknown


@pytest_twisted.ensureDeferred
async def test_outside_metrics_networks_an_api_token_is_needed(
    served: Served, store: Store
) -> None:
    token = generate_api_token()
    await store.add_api_token("prometheus", token)
    url = served.start({"api": {"metrics_networks": ["10.0.0.0/8"]}})
    code, _headers, body = await get(url)
    assert (code, body) == (403, b"Forbidden: not from [api] metrics_networks.\n")
    code, headers, body = await get(url, {b"authorization": [f"Bearer {token}".encode()]})
    assert code == 200
    assert headers[b"Content-Type"] == [CONTENT_TYPE_LATEST.encode()]
    assert "smartrelay_recipients_delivered_total" in {
        s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples
    }
    # A token also opens a forwarded request.
    code, _headers, _body = await get(
        url,
        {b"authorization": [f"bearer {token}".encode()], b"x-forwarded-for": [b"203.0.113.1"]},
    )
    assert code == 200
    hostile: list[bytes] = [
        f"Bearer {token}x".encode(),
        b"Bearer srt_" + b"A" * 43,
        b"Basic " + token.encode(),
        b"Bearer " + b"\xff" * 40,
        b"Bearer " + b"a" * 5000,
        b"Bearer",
    ]
    for value in hostile:
        code, _headers, body = await get(url, {b"authorization": [value]})
        assert code == 403, value
        assert body.startswith(b"Forbidden: ") and b"Traceback" not in body


@pytest_twisted.ensureDeferred
async def test_metrics_false_is_a_404(served: Served) -> None:
    url = served.start({"api": {"metrics": False}})
    code, _headers, body = await get(url)
    assert code == 404 and b"<h1>Not found</h1>" in body
