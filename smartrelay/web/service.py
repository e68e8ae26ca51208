"""Serving a web resource on a Twisted endpoint string (``[web] listen``).

The site never shows a traceback (``displayTracebacks = False``) and logs one line per
request through :mod:`twisted.logger` instead of the combined access log::

    web: 192.0.2.10 "GET /c/AQKbcd9Z…" 302 0

with the token part of ``/o/``, ``/c/``, ``/u/`` paths cut to its first 8 characters (a token
is a capability: an unsubscribe token in a log would let its reader unsubscribe someone) and
the query string dropped. Factory start/stop messages are off (``noisy = False``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.resource import IResource
from twisted.web.server import Site

from smartrelay.reactor import IRelayReactor

__all__ = ["WebListeningService", "WebSite", "web_service"]

log = Logger()

#: Idle HTTP connections are closed after this many seconds.
IDLE_TIMEOUT = 60

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


class WebSite(Site):
    """A :class:`Site` that never shows tracebacks and logs one short line per request."""

    displayTracebacks = False
    noisy = False

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


class WebListeningService(Service):
    """Listens on one endpoint string; failing to listen is fatal (one line via ``on_fatal``)."""

    def __init__(
        self,
        reactor: IRelayReactor,
        description: str,
        site: Site,
        on_fatal: Callable[[str], object],
    ) -> None:
        self._reactor = reactor
        self.description = description
        self.site = site
        self._on_fatal = on_fatal
        self._port: IListeningPort | None = None

    @property
    def port(self) -> IListeningPort | None:
        """The listening port once listening (tests read the port number from it)."""
        return self._port

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        try:
            endpoint = serverFromString(self._reactor, self.description)
        except Exception as e:
            self._on_fatal(f"web: cannot listen on {self.description}: {_one_line(str(e))}")
            return
        d = endpoint.listen(self.site)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        if not self.running:  # stopped while the endpoint was still starting
            port.stopListening()
            return
        self._port = port
        log.info("web: listening on {where}", where=self.description)

    def _failed(self, failure: Failure) -> None:
        self._on_fatal(
            f"web: cannot listen on {self.description}: {_one_line(failure.getErrorMessage())}"
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._port is None:
            return None
        port, self._port = self._port, None
        stopped: Deferred[None] | None = port.stopListening()
        return stopped


def _one_line(text: str) -> str:
    return " ".join(text.split())


def web_service(
    reactor: IRelayReactor,
    listen: str,
    resource: IResource,
    on_fatal: Callable[[str], object],
) -> WebListeningService:
    """A service serving ``resource`` (e.g. ``Tracking(...).app.resource()``) on the endpoint
    string ``listen``; ``on_fatal`` gets one line if it cannot listen."""
    site = WebSite(resource, reactor=reactor, timeout=IDLE_TIMEOUT)  # type: ignore[no-untyped-call]
    return WebListeningService(reactor, listen, site, on_fatal)
