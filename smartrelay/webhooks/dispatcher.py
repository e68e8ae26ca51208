"""The webhook sender (docs/webhooks.md, "How delivery works"): one loop per ``[[webhooks]]``
endpoint, each with its own HTTP connection pool, so that a slow or dead receiver delays no
other.

A loop holds the endpoint's lease (``webhook_endpoints.lease_owner``) while it sends, so that
nodes sharing one PostgreSQL send each endpoint's events once and in order; it reads the events
after the endpoint's acknowledged position (``store.events_after``, gap-free), POSTs them as one
signed JSON array, and moves the position on a 2xx. A 410 disables the endpoint; anything else
is retried with backoff, and after ``retry_for`` the range goes to ``webhook_dead_letters``.
Dead letters an operator asked to replay are sent by the same loop.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from attrs import frozen
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.iweb import IResponse

from smartrelay import __version__
from smartrelay.config.model import Webhook
from smartrelay.events import ExportedEvent, event_object
from smartrelay.metrics import RelayMetrics
from smartrelay.reactor import IRelayReactor
from smartrelay.storage.event_positions import EventPosition
from smartrelay.storage.pool import DatabaseUnavailable
from smartrelay.storage.store import Store
from smartrelay.storage.webhooks import ReplayRange, WebhookEndpoint
from smartrelay.webhooks.signing import signature_header

__all__ = ["DEFAULT_TUNABLES", "EndpointSender", "WebhookService", "WebhookTunables"]

log = Logger()

USER_AGENT = f"SmartRelay/{__version__}"
#: Bytes of a receiver's reply body kept for the error line (the rest is not read).
REPLY_HEAD = 4096
#: Characters of an error line stored and logged.
ERROR_LINE = 300
#: Pages of a filtered read one step looks at before it sends what it has.
MAX_PAGES = 20

Outcome = Literal["ok", "gone", "failed"]


@frozen
class WebhookTunables:
    """Timing of every endpoint's loop (tests shorten it)."""

    #: Seconds between two looks for new events (and at the endpoint's row) when idle.
    poll: float = 1.0
    #: The lease a sending node holds on an endpoint (renewed with each batch).
    lease: float = 60.0
    #: The first retry's delay after a failed POST; doubled at each attempt, up to the cap.
    backoff_first: float = 2.0
    backoff_max: float = 300.0
    #: Each delay is multiplied by a random factor within 1 +/- this.
    jitter: float = 0.25
    #: After a database error, the loop waits this long.
    database_pause: float = 5.0


DEFAULT_TUNABLES = WebhookTunables()


class _Stopped(Exception):
    """The service is stopping (an in-flight POST was cancelled)."""


def display_url(url: str) -> str:
    """The url for logs: without user info or query (either may hold a secret)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "<bad url>"


def one_line(text: str, limit: int = ERROR_LINE) -> str:
    """``text`` on one line of printable characters, at most ``limit`` long."""
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


class _ReplyHead(Protocol):
    """Reads the first ``limit`` bytes of a reply body, then drops the connection."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._data = bytearray()
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        room = self._limit - len(self._data)
        if room > 0:
            self._data += data[:room]
        if len(self._data) >= self._limit and not self.done.called:
            self.done.callback(bytes(self._data))
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if not self.done.called:
            self.done.callback(bytes(self._data))


class EndpointSender:
    """One endpoint's loop: :meth:`start`, then :meth:`stop` (which cancels a POST in flight:
    its range is sent again later, by this node or another)."""

    def __init__(
        self,
        reactor: IRelayReactor,
        store_ready: Callable[[], Awaitable[Store]],
        webhook: Webhook,
        node_id: str,
        metrics: RelayMetrics,
        tunables: WebhookTunables = DEFAULT_TUNABLES,
        rng: random.Random | None = None,
    ) -> None:
        self._reactor = reactor
        self._store_ready = store_ready
        self.webhook = webhook
        self._node = node_id
        self._metrics = metrics
        self._tunables = tunables
        self._random = rng or random.Random()
        self._shown = display_url(webhook.url)
        self._pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self._pool.maxPersistentPerHost = 1
        self._pool.cachedConnectionTimeout = 30
        self._pool.retryAutomatically = False
        agent = Agent(reactor, pool=self._pool, connectTimeout=webhook.timeout)  # type: ignore[no-untyped-call]
        self._client = HTTPClient(agent)
        self._stopping = False
        self._waiting: Deferred[None] | None = None
        self._posting: Deferred[tuple[Outcome, str]] | None = None
        self._done: Deferred[None] | None = None
        self._held = False
        self._has_store = False
        #: The first event of the partial batch waiting for more, and since when.
        self._pending: tuple[int, float] | None = None
        self._db_failing = False
        # The lease outlasts a POST and its timeout with room to spare.
        self._lease = max(tunables.lease, 2 * webhook.timeout + 10.0)

    # -- life ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._done = Deferred.fromCoroutine(self._run())
        self._done.addErrback(self._crashed)

    def _crashed(self, failure: Failure) -> None:
        log.failure("webhook {url}: sender stopped", failure, url=self._shown)

    async def stop(self) -> None:
        self._stopping = True
        for pending in (self._waiting, self._posting):
            if pending is not None and not pending.called:
                pending.cancel()
        # Before the store is open, nothing needs waiting for (and the storage, stopped
        # after this service, is what would end that wait): the loop ends when it opens.
        if self._done is not None and self._has_store:
            await self._done
        await self._pool.closeCachedConnections()  # type: ignore[no-untyped-call]

    async def _run(self) -> None:
        try:
            store = await self._store_ready()
        except Exception as error:  # the storage reports its own failure
            log.debug("webhook {url}: no store: {error}", url=self._shown, error=str(error))
            return
        self._has_store = True
        created = False
        while not self._stopping:
            delay = self._tunables.poll
            try:
                if not created:
                    await store.ensure_webhook_endpoint(self.webhook.url)
                    created = True
                delay = await self._step(store)
                if self._db_failing:
                    log.info("webhook {url}: database available again", url=self._shown)
                    self._db_failing = False
            except _Stopped:
                break
            except DatabaseUnavailable as error:
                if not self._db_failing:
                    log.warn(
                        "webhook {url}: database unavailable ({error})",
                        url=self._shown,
                        error=str(error),
                    )
                self._db_failing = True
                delay = self._tunables.database_pause
            except Exception:
                log.failure("webhook {url}: sending failed", url=self._shown)
                delay = self._tunables.database_pause
            if self._stopping:
                break
            if delay > 0:
                self._waiting = deferLater(self._reactor, delay)
                try:
                    await self._waiting
                except CancelledError:
                    break
                finally:
                    self._waiting = None
        if self._held:
            try:
                await store.release_webhook_lease(self.webhook.url, self._node)
            except Exception as error:
                log.debug(
                    "webhook {url}: lease not released: {error}", url=self._shown, error=error
                )

    # -- one step -------------------------------------------------------------------------------
    async def _step(self, store: Store) -> float:
        """Look at the endpoint once, send one batch if one is due; the seconds to wait."""
        poll = self._tunables.poll
        row = await store.webhook_lease(self.webhook.url, self._node, self._lease, self._lease / 2)
        if row is None:  # the row was removed: made again (at the head) next time
            await store.ensure_webhook_endpoint(self.webhook.url)
            return poll
        self._held = row.held
        if not row.held or row.state != "active":
            self._pending = None
            return poll
        now = self._reactor.seconds()
        if row.next_attempt_at is not None and now < row.next_attempt_at:
            return min(poll, row.next_attempt_at - now)
        dead = await store.webhook_replay_next(self.webhook.url)
        if dead is not None:
            await self._replay(store, dead)
            return 0.0
        return await self._live(store, row)

    async def _gather(
        self, store: Store, after: EventPosition, upto: EventPosition
    ) -> tuple[list[ExportedEvent], EventPosition, bool]:
        """Up to ``batch_size`` events of the endpoint's types in ``(after, upto]``, the
        position read up to, and whether that is ``upto``."""
        size = self.webhook.batch_size
        events: list[ExportedEvent] = []
        end = after
        for _ in range(MAX_PAGES):
            page = await store.events_after(end, upto, size - len(events), self.webhook.events)
            events.extend(page.events)
            end = page.end
            if page.exhausted or len(events) >= size:
                return events, end, page.exhausted
        return events, end, False

    async def _live(self, store: Store, row: WebhookEndpoint) -> float:
        poll = self._tunables.poll
        url, node = self.webhook.url, self._node
        head = await store.event_head()
        events, end, exhausted = await self._gather(store, row.position, head)
        if not events:
            self._pending = None
            if end > row.position:  # a stretch of other types: not read again
                await store.webhook_advance(url, node, row.position, end, 0)
            return poll if exhausted else 0.0
        now = self._reactor.seconds()
        if exhausted and len(events) < self.webhook.batch_size:
            if self._pending is None or self._pending[0] != events[0].id:
                self._pending = (events[0].id, now)
            waited = now - self._pending[1]
            if waited < self.webhook.batch_wait:
                return min(poll, self.webhook.batch_wait - waited)
        outcome, error = await self._send(events)
        if outcome == "ok":
            self._pending = None
            await store.webhook_advance(url, node, row.position, end, len(events))
            if row.failing_since is not None:
                log.info(
                    "webhook {url}: delivering again after {attempts} failed attempt(s)",
                    url=self._shown,
                    attempts=row.attempts,
                )
            return 0.0
        if outcome == "gone":
            await self._disable(store)
            return poll
        backoff = self._backoff(row.attempts + 1)
        retry_at = self._reactor.seconds() + backoff  # after the POST (up to `timeout` long)
        failed = await store.webhook_failed(url, node, error, retry_at)
        if failed is None:  # the lease was lost meanwhile
            return poll
        if row.failing_since is None:
            log.info(
                "webhook {url}: failing ({error}); retrying with backoff for {retry_for} s",
                url=self._shown,
                error=error,
                retry_for=self.webhook.retry_for,
            )
        assert failed.failing_since is not None
        if self._reactor.seconds() - failed.failing_since >= self.webhook.retry_for:
            dead_id = await store.webhook_dead_letter(
                url, node, row.position, head, self.webhook.events, failed.attempts, error
            )
            if dead_id:
                log.warn(
                    "webhook {url}: failing for more than {retry_for} s: events up to the head"
                    " moved to the dead letters (id {id})",
                    url=self._shown,
                    retry_for=self.webhook.retry_for,
                    id=dead_id,
                )
            self._pending = None
        return min(poll, backoff)

    async def _replay(self, store: Store, dead: ReplayRange) -> None:
        node = self._node
        events, end, exhausted = await self._gather(store, dead.resume, dead.upto)
        if not events:
            # Nothing of the endpoint's types left (or purged by retention meanwhile).
            await store.webhook_replay_progress(dead, node, dead.upto if exhausted else end, 0)
            return
        outcome, error = await self._send(events)
        if outcome == "ok":
            await store.webhook_replay_progress(dead, node, end, len(events))
            if exhausted:
                log.info("webhook {url}: dead letter {id} replayed", url=self._shown, id=dead.id)
            return
        if outcome == "gone":
            await self._disable(store)
            error = "410 Gone from the receiver"
        await store.webhook_replay_failed(dead, node, error)
        log.info(
            "webhook {url}: replay of dead letter {id} failed: {error}",
            url=self._shown,
            id=dead.id,
            error=error,
        )

    async def _disable(self, store: Store) -> None:
        reason = "410 Gone from the receiver"
        await store.webhook_disable(self.webhook.url, self._node, reason)
        self._pending = None
        log.warn(
            "webhook {url}: disabled: {reason}; nothing more is sent until it is enabled",
            url=self._shown,
            reason=reason,
        )

    def _backoff(self, attempt: int) -> float:
        t = self._tunables
        delay: float = min(t.backoff_max, t.backoff_first * 2.0 ** min(max(attempt - 1, 0), 30))
        return delay * self._random.uniform(1 - t.jitter, 1 + t.jitter)

    # -- HTTP -------------------------------------------------------------------------------------
    async def _send(self, events: Sequence[ExportedEvent]) -> tuple[Outcome, str]:
        """POST ``events``; the outcome, and an error line unless ``ok``. Raises
        :class:`_Stopped` when the service stopped meanwhile."""
        body = json.dumps(
            [event_object(e) for e in events], ensure_ascii=False, separators=(",", ":")
        ).encode("utf-8")
        self._posting = posting = Deferred.fromCoroutine(self._exchange(body, events))
        posting.addTimeout(self.webhook.timeout, self._reactor)
        try:
            outcome, error = await posting
        except CancelledError:
            raise _Stopped() from None
        except TimeoutError:
            outcome, error = "failed", f"no answer within {self.webhook.timeout:g} s"
        finally:
            self._posting = None
        if self._stopping:
            raise _Stopped()
        endpoint = self.webhook.url
        self._metrics.webhook_posts.labels(endpoint=endpoint, result=outcome).inc()
        if outcome == "ok":
            self._metrics.webhook_events_sent.labels(endpoint=endpoint).inc(len(events))
            log.debug("webhook {url}: {n} event(s) acknowledged", url=self._shown, n=len(events))
        return outcome, error

    async def _exchange(self, body: bytes, events: Sequence[ExportedEvent]) -> tuple[Outcome, str]:
        headers: dict[bytes | str, list[bytes | str]] = {
            "Content-Type": ["application/json"],
            "User-Agent": [USER_AGENT],
            "X-SmartRelay-Signature": [
                signature_header(self.webhook.secret, body, self._reactor.seconds())
            ],
            "X-SmartRelay-Batch": [f"{events[0].id}-{events[-1].id}"],
        }
        try:
            response: IResponse = await self._client.post(
                self.webhook.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                unbuffered=True,
                reactor=self._reactor,  # type: ignore[arg-type]
            )
        except (CancelledError, ConnectingCancelledError):
            raise CancelledError() from None
        except (ConnectError, DNSLookupError) as error:
            return "failed", one_line(f"cannot connect: {error}")
        except ResponseFailed as error:
            if any(r.check(CancelledError) for r in error.reasons):
                raise CancelledError() from None  # the timeout, or the service stopping
            reasons = "; ".join(r.getErrorMessage() for r in error.reasons)
            return "failed", one_line(f"no valid reply: {reasons or error}")
        except Exception as error:
            return "failed", one_line(f"{type(error).__name__}: {error}")
        reader = _ReplyHead(REPLY_HEAD)
        response.deliverBody(reader)  # type: ignore[no-untyped-call]
        head = await reader.done
        code = int(response.code)
        if 200 <= code < 300:
            return "ok", ""
        if code == 410:
            return "gone", "410 Gone from the receiver"
        phrase = response.phrase.decode("latin-1") if response.phrase else ""
        text = head.decode("utf-8", "replace")
        return "failed", one_line(
            f"{code} {phrase}: {text}" if text.strip() else f"{code} {phrase}"
        )


class WebhookService(Service):
    """Every ``[[webhooks]]`` endpoint's sender (main process only)."""

    name = "webhooks"

    def __init__(
        self,
        reactor: IRelayReactor,
        store_ready: Callable[[], Awaitable[Store]],
        webhooks: Sequence[Webhook],
        node_id: str,
        metrics: RelayMetrics,
        tunables: WebhookTunables = DEFAULT_TUNABLES,
    ) -> None:
        self.senders = [
            EndpointSender(reactor, store_ready, webhook, node_id, metrics, tunables)
            for webhook in webhooks
        ]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for sender in self.senders:
            sender.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        stopped = gatherResults(
            [Deferred.fromCoroutine(sender.stop()) for sender in self.senders],
            consumeErrors=True,
        )
        return stopped.addCallback(lambda _: None)
