"""What every page of the reports UI shares: the store, the templates, the session of the
request, the response headers, links, redirects and error pages.

A section of the UI (dashboard, messages, queue, ...) is a class with ``app = Klein()`` that
takes the :class:`UiContext`; :class:`~smartrelay.web.ui.app.ReportsUI` mounts it under its
path and only hands it requests from a logged-in browser whose state-changing requests carry
the session's CSRF token. A section's handler looks like::

    @app.route("/", methods=["GET"])
    def search(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "message search", lambda: self._search(request))

    async def _search(self, request: IRequest) -> bytes:
        store = await self.ui.store()
        ...
        return self.ui.page(request, "ui/messages.html", title="Messages", rows=rows)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit

from attrs import frozen
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from zope.interface import Interface

from smartrelay.config.model import IPNetwork
from smartrelay.storage.store import Store
from smartrelay.web.templating import Templates

__all__ = [
    "NAVIGATION",
    "IUiSession",
    "UiContext",
    "UiError",
    "UiSession",
    "add_error_pages",
    "arg",
    "client_address",
    "ui_session",
]

log = Logger()

#: The sections in the navigation bar: (path below /ui/, label).
NAVIGATION: tuple[tuple[str, str], ...] = (
    ("", "Dashboard"),
    ("messages", "Messages"),
    ("queue", "Queue"),
    ("suppressions", "Suppressions"),
    ("feedback", "Feedback"),
    ("deliverability", "Deliverability"),
)

#: Every HTML response of the UI. No script but the UI's own file (so an escaping mistake
#: cannot run code), no style but its own stylesheet, no framing, forms only to itself.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"Content-Security-Policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        b" form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"same-origin"),
    (b"Cache-Control", b"no-store"),
)


class IUiSession(Interface):
    """Marker: the :class:`UiSession` of a request, set by ReportsUI before a section runs."""


@frozen
class UiSession:
    """The logged-in user of a request and the CSRF token its forms carry."""

    username: str
    csrf: str
    token_hash: str


def ui_session(request: IRequest) -> UiSession:
    """The session of a request that reached a section (ReportsUI checked it)."""
    session = request.getComponent(IUiSession)  # type: ignore[attr-defined]
    if not isinstance(session, UiSession):
        raise RuntimeError("a UI section ran without a session: mount it in ReportsUI")
    return session


class UiError(Exception):
    """A request the UI refuses with an error page: ``code`` and a sentence for the user."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def arg(request: IRequest, name: str, default: str = "", limit: int = 1000) -> str:
    """The first value of query or form argument ``name``, UTF-8, stripped; a longer value or
    bad UTF-8 is a 400 (:class:`UiError`)."""
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(name.encode("ascii"))
    if not values:
        return default
    try:
        text = values[0].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UiError(400, f"The field {name!r} is not valid UTF-8.") from None
    if len(text) > limit:
        raise UiError(400, f"The field {name!r} is longer than {limit} characters.")
    return text


def client_address(request: IRequest, trusted: Sequence[IPNetwork]) -> str:
    """The client's IP address: the TCP peer, or for a peer in ``trusted`` (reverse proxies)
    the last ``X-Forwarded-For`` address that is not itself a trusted proxy."""
    peer = getattr(request.getClientAddress(), "host", "")  # type: ignore[no-untyped-call]
    address = peer if isinstance(peer, str) else ""
    if not trusted or not _in(address, trusted):
        return address
    forwarded = b",".join(request.requestHeaders.getRawHeaders(b"x-forwarded-for") or [])
    for hop in reversed(forwarded.decode("latin-1").split(",")):
        hop = hop.strip()
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address  # a forged or broken header: the proxy is all we know
        if not _in(hop, trusted):
            return hop
        address = hop
    return address


def _in(address: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


class UiContext:
    """The reports UI's shared state; one per web app."""

    def __init__(
        self,
        store_ready: Callable[[], Deferred[Store]],
        templates: Templates,
        clock: IReactorTime,
        base_url: str,
        trusted_proxies: Sequence[IPNetwork] = (),
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self._store_ready = store_ready
        self.templates = templates
        self.clock = clock
        parts = urlsplit(base_url)
        #: ``/ui`` below base_url's path: the prefix of every UI link and of the cookie path.
        self.root = parts.path.rstrip("/") + "/ui"
        self.origin = f"{parts.scheme}://{parts.netloc}".lower()
        self.secure = parts.scheme == "https"
        self.trusted_proxies = tuple(trusted_proxies)
        #: Whatever a section needs beyond this (the config, a resolver...), by name.
        self.extra: Mapping[str, Any] = dict(extra or {})

    async def store(self) -> Store:
        return await self._store_ready()

    def url(self, path: str = "", **query: str | int | None) -> str:
        """The link to UI page ``path`` (``"messages/Q123"``) with the non-empty ``query``
        arguments, e.g. ``/ui/messages?tag=welcome``."""
        link = f"{self.root}/{path.lstrip('/')}"
        args = {k: str(v) for k, v in query.items() if v is not None and v != ""}
        return f"{link}?{urlencode(args)}" if args else link

    def page(self, request: IRequest, template: str, code: int = 200, **context: Any) -> bytes:
        """Render ``template`` (which extends ``ui/base.html``) with the shared context
        (``ui``, ``user``, ``csrf``, ``nav``, ``section``) and set the response's headers."""
        session = request.getComponent(IUiSession)  # type: ignore[attr-defined]
        body = self.templates.render(
            template,
            ui=self,
            user=session.username if isinstance(session, UiSession) else None,
            csrf=session.csrf if isinstance(session, UiSession) else "",
            nav=NAVIGATION,
            section=context.pop("section", ""),
            **context,
        )
        return self.respond(request, code, b"text/html; charset=utf-8", body)

    def respond(self, request: IRequest, code: int, content_type: bytes, body: bytes) -> bytes:
        request.setResponseCode(code)  # type: ignore[no-untyped-call]
        headers = request.responseHeaders
        headers.setRawHeaders(b"Content-Type", [content_type])
        headers.setRawHeaders(b"Content-Length", [str(len(body)).encode("ascii")])
        for name, value in SECURITY_HEADERS:
            headers.setRawHeaders(name, [value])
        return body

    def redirect(self, request: IRequest, location: str) -> bytes:
        """303 to ``location`` (a path from :meth:`url`)."""
        request.setResponseCode(303)  # type: ignore[no-untyped-call]
        request.responseHeaders.setRawHeaders(b"Location", [location.encode("utf-8")])
        return self.respond(request, 303, b"text/plain; charset=utf-8", b"")

    def error(self, request: IRequest, code: int, message: str) -> bytes:
        titles = {400: "Bad request", 403: "Forbidden", 404: "Not found", 429: "Slow down"}
        return self.page(
            request,
            "ui/error.html",
            code=code,
            title=titles.get(code, "Something went wrong"),
            message=message,
        )

    def serve(
        self, request: IRequest, what: str, handler: Callable[[], Awaitable[bytes]]
    ) -> Deferred[bytes]:
        """Run ``handler`` to its end: a :class:`UiError` becomes its error page, any other
        exception a logged, generic 500 page (never a traceback). Klein cancels a handler's
        Deferred when the client disconnects; the one returned here then fails alone while
        the handler (and its transaction) finishes undisturbed."""

        async def guarded() -> bytes:
            try:
                return await handler()
            except UiError as error:
                return self.error(request, error.code, error.message)
            except Exception:
                log.failure("web ui: {what} failed", what=what)
                return self.error(request, 500, "Something went wrong; it is in the log.")

        outer: Deferred[bytes] = Deferred(lambda d: None)

        def deliver(body: bytes) -> None:
            if not outer.called:
                outer.callback(body)

        Deferred.fromCoroutine(guarded()).addCallback(deliver)
        return outer


def add_error_pages(app: Klein) -> None:
    """Register the UI's 404 / 405 / 500 pages on a section's Klein ``app`` (the section
    instance must have ``self.ui``)."""

    @app.handle_errors(Exception)
    def errors(self: Any, request: IRequest, failure: Failure) -> bytes:
        ui: UiContext = self.ui
        if isinstance(failure.value, MethodNotAllowed):
            allowed = ", ".join(sorted(failure.value.valid_methods or ()))
            request.responseHeaders.setRawHeaders(b"Allow", [allowed.encode("ascii", "replace")])
            return ui.error(request, 405, "This page does not accept that request.")
        if isinstance(failure.value, HTTPException):
            return ui.error(request, 404, "There is no such page.")
        if isinstance(failure.value, UiError):
            return ui.error(request, failure.value.code, failure.value.message)
        log.failure("web ui: unexpected error", failure)
        return ui.error(request, 500, "Something went wrong; it is in the log.")
