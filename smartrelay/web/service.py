"""Serving a web resource on a Twisted endpoint string (``[web] listen``).

The site never shows a traceback (``displayTracebacks = False``) and logs one line per
request through :mod:`twisted.logger` instead of the combined access log::

    web: 192.0.2.10 "GET /c/AQKbcd9Z…" 302 0

with the token part of ``/o/``, ``/c/``, ``/u/`` paths cut to its first 8 characters (a token
is a capability: an unsubscribe token in a log would let its reader unsubscribe someone) and
the query string dropped. Factory start/stop messages are off (``noisy = False``).

The listener shares the process's file descriptors with SMTP, so it is bounded: at most
``[web] max_connections`` connections are open at once (past it a new connection is closed as
soon as it is accepted), and a connection that sends nothing for ``[web] idle_timeout`` is
closed. No ``Server`` header is sent: the version of Twisted helps only an attacker.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.http import Request
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request as ServerRequest
from twisted.web.server import Site

from smartrelay.listening import ListeningService
from smartrelay.reactor import IRelayReactor

__all__ = [
    "ConnectionCap",
    "WebRequest",
    "WebSite",
    "web_listener",
    "web_service",
    "web_site",
]

log = Logger()

#: Default of ``[web] idle_timeout``: idle HTTP connections are closed after this many seconds.
IDLE_TIMEOUT = 60.0
#: Default of ``[web] max_connections``.
MAX_CONNECTIONS = 500
#: The largest request body taken, in bytes (the reports UI's CSV import is the biggest).
MAX_REQUEST_BODY = 10 * 1024 * 1024

_TOKEN_PATH = re.compile(rb"\A(/[ocu]/[A-Za-z0-9_-]{1,8})[A-Za-z0-9_-]*(?:\.gif)?\Z")
_MAX_LOGGED_PATH = 200


def loggable_path(path: bytes) -> str:
    """The request path for the log: tokens shortened, no query, at most 200 characters."""
    path = path.split(b"?", 1)[0]
    match = _TOKEN_PATH.match(path)
    if match is not None and len(match[1]) < len(path):
        path = match[1] + b"\xe2\x80\xa6"  # "…"
    text = path.decode("utf-8", "backslashreplace")
    return text if len(text) <= _MAX_LOGGED_PATH else text[:_MAX_LOGGED_PATH] + "…"


class WebRequest(ServerRequest):
    """A request whose responses carry no ``Server`` header (Twisted sets one with its version
    in ``process()``, before any resource runs), and whose body is at most
    :data:`MAX_REQUEST_BODY` bytes: Twisted itself takes a body of any size (into a temporary
    file past 100 KB), so a client could fill the disk. A bigger one (by its
    ``Content-Length`` or as it arrives, chunked) is answered ``413`` at once and the
    connection closed; the request never reaches a resource."""

    max_body = MAX_REQUEST_BODY
    _body_size = 0
    _too_big = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self._refuse_body()
            return
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_big:
            return
        self._body_size += len(data)
        if self._body_size > self.max_body:
            self._refuse_body()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._too_big:
            return
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def _refuse_body(self) -> None:
        if self._too_big:
            return
        self._too_big = True
        self.content = io.BytesIO()
        log.info("web: a request body over {limit} bytes refused (413)", limit=self.max_body)
        transport = self.channel.transport
        if transport is None:
            return
        text = b"The request is too big.\n"
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(text), text)
        )
        transport.loseConnection()

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        if (name.encode("latin-1") if isinstance(name, str) else name).lower() == b"server":
            return
        super().setHeader(name, value)  # type: ignore[no-untyped-call]


class WebSite(Site):
    """A :class:`Site` that never shows tracebacks and logs one short line per request."""

    displayTracebacks = False
    noisy = False
    requestFactory = WebRequest

    def log(self, request: Request) -> None:
        address = request.getClientAddress()  # type: ignore[no-untyped-call]
        host = getattr(address, "host", "-")
        method = request.method.decode("ascii", "backslashreplace")
        log.info(
            'web: {ip} "{method} {path}" {code} {size}',
            ip=host,
            method=method,
            path=loggable_path(request.uri),
            code=request.code,
            size=request.sentLength,
        )


class ConnectionCap(WrappingFactory):
    """Wraps the site: at most ``limit`` connections open at once; past it a connection is
    closed as soon as it is accepted (``buildProtocol`` returns None), so idle clients hold
    at most ``limit`` file descriptors."""

    noisy = False

    def __init__(self, site: Site, limit: int) -> None:
        super().__init__(site)  # type: ignore[no-untyped-call]
        self.limit = limit
        self.refused = 0
        self._refusing = False

    @property
    def open_connections(self) -> int:
        return len(self.protocols)

    def buildProtocol(self, addr: IAddress | None) -> ProtocolWrapper | None:  # type: ignore[override]
        if len(self.protocols) >= self.limit:
            self.refused += 1
            if not self._refusing:
                self._refusing = True
                log.warn(
                    "web: {limit} connections open ([web] max_connections): closing new ones",
                    limit=self.limit,
                )
            return None
        if self._refusing:
            self._refusing = False
            log.info(
                "web: accepting again ({refused} connections closed so far)", refused=self.refused
            )
        return super().buildProtocol(addr)


def web_listener(
    reactor: IRelayReactor,
    listen: str,
    site: Site,
    on_fatal: Callable[[str], object],
    *,
    max_connections: int = MAX_CONNECTIONS,
) -> ListeningService:
    """A service serving ``site`` on the endpoint string ``listen``, at most
    ``max_connections`` connections at once (its ``factory`` is the :class:`ConnectionCap`);
    ``on_fatal`` gets one line if it cannot listen."""
    return ListeningService(
        reactor, listen, ConnectionCap(site, max_connections), on_fatal, name="web"
    )


def web_site(
    resource: IResource, reactor: IRelayReactor, idle_timeout: float = IDLE_TIMEOUT
) -> WebSite:
    """The site serving ``resource``; a connection idle for ``idle_timeout`` is closed."""
    return WebSite(resource, reactor=reactor, timeout=idle_timeout)  # type: ignore[no-untyped-call]


def web_service(
    reactor: IRelayReactor,
    listen: str,
    resource: IResource,
    on_fatal: Callable[[str], object],
    *,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout: float = IDLE_TIMEOUT,
) -> ListeningService:
    """A service serving ``resource`` (e.g. ``Tracking(...).app.resource()``) on the endpoint
    string ``listen``; ``on_fatal`` gets one line if it cannot listen."""
    site = web_site(resource, reactor, idle_timeout)
    return web_listener(reactor, listen, site, on_fatal, max_connections=max_connections)


def set_header(request: IRequest, name: bytes, value: bytes) -> None:
    """Set (replace) one response header."""
    request.responseHeaders.setRawHeaders(name, [value])


def plain_text(request: IRequest, code: int, line: str) -> bytes:
    """A short plain-text answer of the machine endpoints (``/api/``, ``/metrics``): one line,
    never cached, never sniffed as anything else."""
    request.setResponseCode(code)  # type: ignore[no-untyped-call]
    set_header(request, b"Content-Type", b"text/plain; charset=utf-8")
    set_header(request, b"Cache-Control", b"no-store")
    set_header(request, b"X-Content-Type-Options", b"nosniff")
    return (line.rstrip("\n") + "\n").encode("utf-8")
