"""The HTTP event export, ``GET /api/events`` (SPEC section 4, docs/api.md): a Klein app
mounted at ``/api/`` by :class:`~smartrelay.web.site.WebRoot`.

A request names a start (``since``: a cursor or a time), filters (``until``, ``type``,
``tag``) and a ``format`` (``jsonl`` or ``csv``). The response covers every matching event
after the start up to the events' head taken when the request begins, and sends that head as
``X-SmartRelay-Cursor``: the next request's ``since``. Nothing is held in memory beyond one
page (:data:`smartrelay.export.PAGE_SIZE` events):

* each page is written as soon as it is read, and the next one is read only while the
  connection can take more (the export is the request's streaming producer: a client that
  reads slowly holds the reading back, not the memory);
* a client that goes away stops the reading after the page in hand (its transaction is never
  cut in the middle); one that reads nothing for ``[web] idle_timeout`` is disconnected
  (Twisted turns the site's idle timeout off while a response is being written);
* at most :data:`MAX_EXPORTS_PER_TOKEN` exports run at once per token (429 past it).

Authentication is ``Authorization: Bearer TOKEN`` (``smartrelay-ctl api-token add``). A
wrong token is answered 401 after :data:`FAILURE_DELAY` seconds, and a client address (an
IPv6 one by its /64) with :data:`MAX_FAILURES` wrong tokens within a minute gets 429 until
the minute has passed, without a database look-up. Every error is a short ``text/plain``
line, never a traceback.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Literal

from attrs import frozen
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from zope.interface import implementer

from smartrelay.events import ALL_TYPES
from smartrelay.export import (
    EventFilters,
    csv_bytes,
    csv_header,
    event_pages,
    jsonl_bytes,
    start_position,
)
from smartrelay.storage.event_positions import EventPosition, decode_cursor, encode_cursor
from smartrelay.storage.store import Store
from smartrelay.timefmt import parse_time_value
from smartrelay.web.service import plain_text, set_header

__all__ = [
    "FAILURE_DELAY",
    "MAX_EXPORTS_PER_TOKEN",
    "MAX_FAILURES",
    "BadQuery",
    "EventApi",
    "ExportQuery",
    "FailureLimiter",
    "parse_query",
]

log = Logger()

#: Seconds before a wrong token is answered 401.
FAILURE_DELAY = 1.0
#: Wrong tokens from one client address within :data:`FAILURE_WINDOW` before it gets 429.
MAX_FAILURES = 10
FAILURE_WINDOW = 60.0
#: Client addresses whose failures are remembered at once (memory stays bounded).
MAX_FAILING_CLIENTS = 10_000
#: Exports running at once with one token.
MAX_EXPORTS_PER_TOKEN = 2
#: ``tag`` values per request, and the length of one.
MAX_TAGS = 50
MAX_TAG_LENGTH = 200

_PARAMETERS = frozenset({b"since", b"until", b"type", b"tag", b"format"})
_CONTENT_TYPES = {
    "jsonl": b"application/x-ndjson; charset=utf-8",
    "csv": b"text/csv; charset=utf-8",
}


_INVALID_TOKEN = b'Bearer realm="smartrelay", error="invalid_token"'


class BadQuery(ValueError):
    """A query string :func:`parse_query` refuses (its text is the 400's one line)."""


@frozen
class ExportQuery:
    """A parsed ``GET /api/events`` query: the start is ``cursor`` or ``filters.since``."""

    cursor: EventPosition | None
    filters: EventFilters
    format: Literal["jsonl", "csv"]


def parse_query(args: Mapping[bytes, list[bytes]], now: float) -> ExportQuery:
    """The query of ``request.args``; :class:`BadQuery` for an unknown parameter, a repeated
    single one, or a bad value."""
    unknown = sorted(set(args) - _PARAMETERS)
    if unknown:
        raise BadQuery(f"unknown parameter {_shown(unknown[0])}")

    def texts(name: bytes) -> list[str]:
        values = args.get(name, [])
        out: list[str] = []
        for value in values:
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadQuery(f"{name.decode()}: not UTF-8") from None
            if not text.isprintable():
                raise BadQuery(f"{name.decode()}: control characters")
            out.append(text)
        return out

    def single(name: bytes) -> str | None:
        values = texts(name)
        if len(values) > 1:
            raise BadQuery(f"{name.decode()} given more than once")
        return values[0] if values else None

    cursor: EventPosition | None = None
    since: float | None = None
    since_text = single(b"since")
    if since_text is not None:
        if since_text.startswith("c1"):
            try:
                cursor = decode_cursor(since_text)
            except ValueError:
                raise BadQuery("since: bad cursor") from None
        else:
            since = _time("since", since_text, now)
    until_text = single(b"until")
    until = None if until_text is None else _time("until", until_text, now)
    types: list[str] = []
    for value in texts(b"type"):
        for name in value.split(","):
            name = name.strip()
            if name not in ALL_TYPES:
                raise BadQuery(f"type: unknown event type {_shown(name)}")
            types.append(name)
    tags = texts(b"tag")
    if len(tags) > MAX_TAGS:
        raise BadQuery(f"tag: at most {MAX_TAGS} values")
    for tag in tags:
        if not tag or len(tag) > MAX_TAG_LENGTH:
            raise BadQuery(f"tag: empty or longer than {MAX_TAG_LENGTH} characters")
    fmt = single(b"format") or "jsonl"
    if fmt not in ("jsonl", "csv"):
        raise BadQuery(f"format: {_shown(fmt)} is not jsonl or csv")
    filters = EventFilters(tuple(dict.fromkeys(types)), tuple(dict.fromkeys(tags)), since, until)
    return ExportQuery(cursor, filters, "csv" if fmt == "csv" else "jsonl")


def _time(name: str, text: str, now: float) -> float:
    try:
        return parse_time_value(text, now)
    except ValueError as error:
        raise BadQuery(f"{name}: {error}") from None


def _shown(value: str | bytes, limit: int = 40) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return repr(text if len(text) < limit else text + "...")


class FailureLimiter:
    """Wrong tokens per client address in the last ``window`` seconds, for at most
    ``max_clients`` addresses (the oldest forgotten first)."""

    def __init__(
        self,
        clock: IReactorTime,
        limit: int = MAX_FAILURES,
        window: float = FAILURE_WINDOW,
        max_clients: int = MAX_FAILING_CLIENTS,
    ) -> None:
        self._clock = clock
        self.limit = limit
        self.window = window
        self._max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked(self, client: str) -> bool:
        times = self._recent(client)
        return times is not None and len(times) >= self.limit

    def failed(self, client: str) -> None:
        times = self._recent(client)
        if times is None:
            while len(self._failures) >= self._max_clients:
                self._failures.popitem(last=False)
            times = self._failures[client] = deque(maxlen=self.limit)
        times.append(self._clock.seconds())
        self._failures.move_to_end(client)

    def _recent(self, client: str) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        horizon = self._clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times


def _client_key(request: IRequest) -> str:
    address = request.getClientAddress()  # type: ignore[no-untyped-call]
    host = str(getattr(address, "host", ""))
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return host


def _bearer(request: IRequest) -> str | None:
    """The token of ``Authorization: Bearer TOKEN``; None without one."""
    values = request.requestHeaders.getRawHeaders(b"authorization")
    if not values:
        return None
    raw: bytes = values[-1]
    scheme, _, token = raw.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    try:
        return token.strip().decode("ascii")
    except UnicodeDecodeError:
        return ""


@implementer(IPushProducer)
class _Flow:
    """The export as the request's producer: paused while the connection's buffer is full,
    stopped when the connection is gone."""

    def __init__(self, clock: IReactorTime, idle_timeout: float, on_idle: Callable[[], None]):
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._on_idle = on_idle
        self.paused = False
        self.stopped = False
        self._waiting: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None

    def pauseProducing(self) -> None:
        self.paused = True
        if self._timer is None and not self.stopped:
            self._timer = self._clock.callLater(self._idle_timeout, self._idle)

    def resumeProducing(self) -> None:
        self.paused = False
        self._cancel_timer()
        self._wake()

    def stopProducing(self) -> None:
        self.stopped = True
        self._cancel_timer()
        self._wake()

    async def writable(self) -> None:
        """Return once the connection takes more data (or is gone: check ``stopped``)."""
        while self.paused and not self.stopped:
            self._waiting = Deferred()
            await self._waiting

    def _idle(self) -> None:
        self._timer = None
        if self.paused and not self.stopped:
            self._on_idle()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)


class EventApi:
    """``/api/`` (``EventApi(...).app.resource()``). ``store_ready`` gives the store once
    the database is up; ``idle_timeout`` is ``[web] idle_timeout``."""

    app = Klein()

    def __init__(
        self,
        store_ready: Callable[[], Deferred[Store]],
        clock: IReactorTime,
        *,
        idle_timeout: float = 60.0,
        failure_delay: float = FAILURE_DELAY,
        max_exports_per_token: int = MAX_EXPORTS_PER_TOKEN,
        failures: FailureLimiter | None = None,
        page_size: int | None = None,
    ) -> None:
        self._store_ready = store_ready
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._failure_delay = failure_delay
        self._max_exports = max_exports_per_token
        self._failures = FailureLimiter(clock) if failures is None else failures
        self._page_size = page_size
        #: Exports running now, by token name.
        self.running: dict[str, int] = {}
        #: Pages read since start (every export's): how far an export went is visible.
        self.pages_read = 0

    @app.route("/events")
    def events(self, request: IRequest) -> bytes | Deferred[bytes]:
        if request.method != b"GET":
            set_header(request, b"Allow", b"GET")
            return plain_text(request, 405, "Only GET is allowed here.")
        return self._guarded(request)

    @app.route("/", branch=True)
    def other(self, request: IRequest) -> bytes:
        return plain_text(request, 404, "No such API path.")

    @app.handle_errors(Exception)
    def errors(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("web: api: unexpected error", failure)
        return plain_text(request, 500, "Internal error.")

    def _guarded(self, request: IRequest) -> Deferred[bytes]:
        """Run the export to its end, whatever happens to the client.

        Klein cancels the handler's Deferred when the connection is lost: only the Deferred
        returned here fails then, while the export sees its producer stopped and ends after
        the page in hand (a transaction is never cut in the middle)."""

        async def guarded() -> bytes | None:
            try:
                return await self._export(request)
            except Exception:
                log.failure("web: api: an export failed")
                if _gone(request):
                    return None
                if request.startedWriting:  # type: ignore[attr-defined]
                    # Too late for an error status: cut the response short, so the client
                    # sees an incomplete one (no last chunk), never a complete-looking one.
                    _abort(request)
                    return None
                return plain_text(request, 500, "Internal error.")

        outer: Deferred[bytes] = Deferred(lambda d: None)

        def deliver(body: bytes | None) -> None:
            if body is not None and not outer.called:
                outer.callback(body)

        Deferred.fromCoroutine(guarded()).addCallback(deliver)
        return outer

    async def _export(self, request: IRequest) -> bytes | None:
        """The response's body: an error's text, or nothing more once the export is written;
        None when the client has gone."""
        token = _bearer(request)
        if token is None:
            set_header(request, b"WWW-Authenticate", b'Bearer realm="smartrelay"')
            return plain_text(request, 401, "A token is required: Authorization: Bearer TOKEN.")
        client = _client_key(request)
        if self._failures.blocked(client):
            set_header(request, b"Retry-After", b"%d" % int(self._failures.window))
            return plain_text(
                request, 429, "Too many wrong tokens from this address: wait a minute."
            )
        store = await self._store_ready()
        name = await store.api_token_name(token) if token else None
        if name is None:
            self._failures.failed(client)
            log.info("web: api: a wrong token from {client}", client=client)
            if self._failure_delay > 0:
                await deferLater(self._clock, self._failure_delay, lambda: None)
            set_header(request, b"WWW-Authenticate", _INVALID_TOKEN)
            return plain_text(request, 401, "The token is not valid.")
        try:
            query = parse_query(request.args, self._clock.seconds())
        except BadQuery as error:
            return plain_text(request, 400, str(error))
        if self.running.get(name, 0) >= self._max_exports:
            set_header(request, b"Retry-After", b"10")
            return plain_text(
                request, 429, f"{self._max_exports} exports with this token are running already."
            )
        self.running[name] = self.running.get(name, 0) + 1
        try:
            done = await self._stream(request, store, query, name)
        finally:
            self.running[name] -= 1
            if not self.running[name]:
                del self.running[name]
        return b"" if done else None

    async def _stream(self, request: IRequest, store: Store, query: ExportQuery, name: str) -> bool:
        """Write the export; False when the client has gone before its end."""
        head = await store.event_head()
        after = await start_position(store, query.cursor, query.filters.since)
        if _gone(request):
            return False
        resume = head if query.cursor is None else max(head, query.cursor)
        request.setResponseCode(200)  # type: ignore[no-untyped-call]
        for header, value in (
            (b"Content-Type", _CONTENT_TYPES[query.format]),
            (b"Cache-Control", b"no-store"),
            (b"X-Content-Type-Options", b"nosniff"),
            (b"X-SmartRelay-Cursor", encode_cursor(resume).encode("ascii")),
        ):
            set_header(request, header, value)
        flow = _Flow(self._clock, self._idle_timeout, lambda: self._cut(request, name))
        request.notifyFinish().addBoth(lambda _: flow.stopProducing())  # type: ignore[attr-defined]
        request.registerProducer(flow, True)  # type: ignore[attr-defined]
        encode = jsonl_bytes if query.format == "jsonl" else csv_bytes
        events = pages = 0
        if query.format == "csv":
            request.write(csv_header())  # type: ignore[no-untyped-call]
        async for page in event_pages(store, after, head, query.filters, self._page_size):
            self.pages_read += 1
            pages += 1
            if page.events:
                events += len(page.events)
                request.write(encode(page.events))  # type: ignore[no-untyped-call]
            await flow.writable()
            if flow.stopped:
                break
        if flow.stopped:
            log.info(
                "web: api: {name}'s client left after {events} event(s)", name=name, events=events
            )
            return False
        request.unregisterProducer()  # type: ignore[attr-defined]
        log.debug("web: api: {name} got {events} event(s)", name=name, events=events)
        return True

    def _cut(self, request: IRequest, name: str) -> None:
        log.info(
            "web: api: {name}'s client read nothing for {timeout} s: disconnected",
            name=name,
            timeout=self._idle_timeout,
        )
        _abort(request)


def _gone(request: IRequest) -> bool:
    """Whether the request's connection is lost (Twisted drops its channel then)."""
    return getattr(request, "channel", None) is None


def _abort(request: IRequest) -> None:
    channel = getattr(request, "channel", None)
    transport: ITCPTransport | None = getattr(channel, "transport", None)
    if transport is not None:
        transport.abortConnection()
