"""The public tracking and unsubscribe endpoints (SPEC section 4): a Klein app.

============================  ======================================================
``GET /o/TOKEN.gif``          always a 1x1 transparent GIF, never cached; a valid token
                              records ``opened`` ``{user_agent, ip, machine}``
``GET /c/TOKEN``              302 to the URL inside the token (``Cache-Control: no-store``),
                              records ``clicked`` ``{user_agent, ip, machine, url}``;
                              a bad token (or a non-http(s) target) is a 404, never a redirect
``GET /u/TOKEN``              a small confirmation page with an "Unsubscribe" button
``POST /u/TOKEN``             ``List-Unsubscribe=One-Click`` (RFC 8058; urlencoded or
                              multipart): 200 ``Unsubscribed``, method ``one-click``; the
                              page's own form (``confirm=yes``): 200 page, method ``page``
============================  ======================================================

Behaviour worth knowing:

* ``HEAD`` on any of them (link scanners) answers the same status and headers without a body
  and records nothing.
* A bad token on the pixel still gets the GIF (the answer never tells whether a token is
  valid) and records nothing. A valid open or click token whose recipient row no longer exists
  (purged by retention) still gets the GIF or the redirect, but records nothing.
* An unsubscribe token carries the recipient's address (encrypted, :mod:`smartrelay.tokens`),
  so once the row is purged ``/u`` answers as before and the POST still suppresses the
  address; its ``unsubscribed`` event then names no message (``queue_id`` null). Only an
  old token without the address, whose row is gone, is a 404.
* Recording is best-effort for the pixel and clicks: if the database fails, the GIF or the
  redirect is still served (the recipient's link must work) and the error is logged. The
  unsubscribe endpoints need the database: a failure there is a generic 500 page.
* Any unexpected exception becomes a plain 404 or 500 page without details (never a
  traceback), logged with :mod:`twisted.logger`. A request whose client goes away is still
  carried to its end (the database work is never interrupted mid-transaction).
* The ``Location`` of a click is the token's URL byte for byte, except characters that cannot
  be sent in an HTTP header as they are: non-ASCII characters are percent-encoded as UTF-8
  (``ü`` -> ``%C3%BC``; a non-ASCII host too, which browsers accept and IDNA-encode), and so
  are ASCII controls and the space (``%20``), as browsers would do. Nothing else changes:
  existing ``%``-escapes, ``&``, ``#fragment``, ``+`` stay as written.
* The client IP is the TCP peer. ``X-Forwarded-For`` is ignored: trusting a reverse proxy's
  header is a later configuration option (behind a proxy, ``ip`` is the proxy's address).
* Every response has ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``
  (so the destination of a click does not see the tracking URL); HTML pages are
  self-contained (inline style only) with a restrictive ``Content-Security-Policy``.
* ``machine`` flags opens and clicks from proxies, prefetchers and scanners: see
  :data:`MACHINE_RULES` and :func:`is_machine_click`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from attrs import frozen
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from smartrelay.config import SuppressionConfig
from smartrelay.events import ClickedEvent, OpenedEvent
from smartrelay.metrics import RelayMetrics
from smartrelay.storage.store import Store
from smartrelay.tokens import TokenCodec, TokenError
from smartrelay.web.pages import Pages

__all__ = [
    "CLICK_DELAY",
    "MACHINE_RULES",
    "PIXEL_GIF",
    "MachineRule",
    "Tracking",
    "is_machine_click",
    "location_header",
    "machine_reason",
    "mask_address",
]

log = Logger()

#: A 1x1 GIF89a whose one pixel is transparent (43 bytes).
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b"!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)

#: A click less than this many seconds after the recipient's ``delivered`` event is a machine.
CLICK_DELAY = 10.0

#: User agents are stored up to this many characters.
MAX_USER_AGENT = 1000


# --------------------------------------------------------------------------------------
# Machine opens and clicks


@frozen
class MachineRule:
    """One rule of :data:`MACHINE_RULES`: ``pattern`` is searched (case-insensitively) in the
    ``User-Agent`` header with surrounding whitespace removed; a match makes the open or
    click ``machine: true``. ``name`` is what the log shows."""

    name: str
    pattern: re.Pattern[str]
    why: str


def _rule(name: str, pattern: str, why: str) -> MachineRule:
    return MachineRule(name, re.compile(pattern, re.IGNORECASE), why)


#: How opens and clicks from proxies, prefetchers and scanners are told apart, by user agent.
#:
#: The first matching rule names the reason. What cannot be known offline is not attempted:
#: Apple Mail Privacy Protection fetches through Apple's proxies, whose IP ranges change and
#: are not shipped with SmartRelay, so only its user agent (exactly ``Mozilla/5.0``, which no
#: real browser sends) is used; Microsoft Defender for Office 365 Safe Links and similar
#: services scan from their own networks with ordinary browser user agents, which only the
#: timing rule (:func:`is_machine_click`) catches. ``Microsoft Office`` alone is deliberately
#: not a rule: Outlook for Windows sends it when a person opens a message or clicks a link.
MACHINE_RULES: tuple[MachineRule, ...] = (
    _rule("no-user-agent", r"\A\Z", "browsers and mail clients always send a User-Agent"),
    _rule(
        "apple-mail-privacy-protection",
        r"\AMozilla/5\.0\Z",
        "Apple's MPP proxy prefetches images with the bare user agent Mozilla/5.0",
    ),
    _rule(
        "google-image-proxy",
        r"GoogleImageProxy|via ggpht\.com",
        "Gmail fetches images through its proxy (once per message, often at delivery)",
    ),
    _rule("yahoo-mail-proxy", r"YahooMailProxy", "Yahoo and AOL Mail image proxy"),
    _rule(
        "microsoft-office-discovery",
        r"Microsoft Office (?:Existence|Protocol) Discovery",
        "Office apps probe a link before handing it to the browser",
    ),
    _rule(
        "security-scanner",
        r"BingPreview|Barracuda|Proofpoint|Mimecast|Symantec",
        "mail security gateways and link scanners",
    ),
    _rule("headless-browser", r"HeadlessChrome|PhantomJS", "automated browsers"),
    _rule(
        "http-library",
        r"python-requests|python-urllib|\bcurl/|\bWget/|Go-http-client|\bJava/"
        r"|libwww-perl|Apache-HttpClient",
        "HTTP libraries and command-line tools, not mail clients",
    ),
    _rule(
        "link-preview-bot",
        r"Googlebot|bingbot|Slackbot|facebookexternalhit|Twitterbot|LinkedInBot|Discordbot"
        r"|TelegramBot|WhatsApp/",
        "crawlers and chat link previews (someone shared the link)",
    ),
)


def machine_reason(user_agent: str | None) -> str | None:
    """The name of the first :data:`MACHINE_RULES` rule matching ``user_agent``, or None for
    what looks like a person's mail client or browser. A missing header counts as empty."""
    text = (user_agent or "").strip()
    for rule in MACHINE_RULES:
        if rule.pattern.search(text):
            return rule.name
    return None


def is_machine_click(
    clicked_at: float, delivered_at: float | None, delay: float = CLICK_DELAY
) -> bool:
    """The timing rule for clicks: one less than ``delay`` seconds after the recipient's
    ``delivered`` event (or before it: a scanner can click before the outcome is recorded)
    comes from the receiving side's link scanner, not from a person who had to open the
    message first. Without a ``delivered`` event (not recorded yet) the rule does not apply."""
    return delivered_at is not None and clicked_at - delivered_at < delay


# --------------------------------------------------------------------------------------
# Helpers


_NOT_HEADER_SAFE = re.compile(r"[^\x21-\x7e]+")


def location_header(url: str) -> bytes:
    """``url`` as a ``Location`` value: non-ASCII characters, ASCII controls and spaces
    percent-encoded (as UTF-8), everything else byte for byte."""
    return _NOT_HEADER_SAFE.sub(
        lambda m: "".join(f"%{byte:02X}" for byte in m[0].encode("utf-8")), url
    ).encode("ascii")


def _is_http_url(url: str) -> bool:
    lowered = url[:8].lower()
    for prefix in ("http://", "https://"):
        if lowered.startswith(prefix):
            return len(url) > len(prefix)
    return False


def mask_address(address: str) -> str:
    """``john.doe@example.com`` -> ``j***@example.com`` (the domain is kept)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return f"{address[:1]}***"
    return f"{local[:1]}***@{domain}"


def _client_ip(request: IRequest) -> str | None:
    """The TCP peer's address (``X-Forwarded-For`` is not trusted)."""
    address = request.getClientAddress()  # type: ignore[no-untyped-call]
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else None


def _user_agent(request: IRequest) -> str | None:
    values = request.requestHeaders.getRawHeaders(b"user-agent")
    if not values:
        return None
    raw: bytes = values[-1]
    return raw.decode("utf-8", "replace")[:MAX_USER_AGENT]


def _set_header(request: IRequest, name: bytes, value: bytes) -> None:
    request.responseHeaders.setRawHeaders(name, [value])


_COMMON_HEADERS = (
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
)
_HTML_HEADERS = (
    (
        b"Content-Security-Policy",
        b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self';"
        b" base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"X-Frame-Options", b"DENY"),
)
_NO_CACHE = b"no-store, no-cache, must-revalidate, max-age=0"


def _respond(
    request: IRequest,
    code: int,
    content_type: bytes | None,
    body: bytes,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """Set the whole response at once (status, headers) and return its body."""
    request.setResponseCode(code)  # type: ignore[no-untyped-call]
    request.responseHeaders.removeHeader(b"Location")
    if content_type is not None:
        _set_header(request, b"Content-Type", content_type)
    _set_header(request, b"Content-Length", str(len(body)).encode("ascii"))
    _set_header(request, b"Cache-Control", b"no-store")
    for name, value in (*_COMMON_HEADERS, *headers):
        _set_header(request, name, value)
    return body


def _is_one_click(request: IRequest) -> bool:
    args: dict[bytes, list[bytes]] = request.args or {}
    return any(v.strip().lower() == b"one-click" for v in args.get(b"List-Unsubscribe", []))


def _is_page_confirm(request: IRequest) -> bool:
    args: dict[bytes, list[bytes]] = request.args or {}
    return b"confirm" in args


@frozen
class _Unsubscriber:
    """The address an unsubscribe token names, and its message (None once purged)."""

    address: str
    queue_id: str | None


# --------------------------------------------------------------------------------------
# The app


class Tracking:
    """The endpoints; ``Tracking(...).app.resource()`` is the ``IResource`` to serve.

    ``store_ready`` gives the store once the database is up (called on every request that needs
    it). ``clock`` times clicks against deliveries; ``suppression.unsubscribe`` is how long an
    unsubscribe suppresses the address (None: forever). A click less than ``click_delay``
    seconds after delivery is ``machine: true``. ``pages`` renders the HTML pages (read from
    the template files here unless given).
    """

    app = Klein()

    def __init__(
        self,
        store_ready: Callable[[], Deferred[Store]],
        codec: TokenCodec,
        clock: IReactorTime,
        suppression: SuppressionConfig,
        *,
        click_delay: float = CLICK_DELAY,
        pages: Pages | None = None,
        metrics: RelayMetrics | None = None,
    ) -> None:
        """``metrics``: where opens, clicks and unsubscribes are counted."""
        self._pages = Pages.load() if pages is None else pages
        self._metrics = metrics
        self._store_ready = store_ready
        self._codec = codec
        self._clock = clock
        self._suppression = suppression
        self._click_delay = click_delay

    # -- routes -------------------------------------------------------------------------
    @app.route("/o/<token>.gif", methods=["GET"])
    def pixel(self, request: IRequest, token: str) -> Deferred[bytes]:
        return self._serve(request, "open pixel", lambda: self._pixel(request, token))

    @app.route("/c/<token>", methods=["GET"])
    def click(self, request: IRequest, token: str) -> Deferred[bytes]:
        return self._serve(request, "click", lambda: self._click(request, token))

    @app.route("/u/<token>", methods=["GET"])
    def unsubscribe_page(self, request: IRequest, token: str) -> Deferred[bytes]:
        return self._serve(request, "unsubscribe page", lambda: self._page(request, token))

    @app.route("/u/<token>", methods=["POST"])
    def unsubscribe_post(self, request: IRequest, token: str) -> Deferred[bytes]:
        return self._serve(request, "unsubscribe", lambda: self._unsubscribe(request, token))

    @app.handle_errors(Exception)
    def errors(self, request: IRequest, failure: Failure) -> bytes:
        """Routing errors (no such path, wrong method) and anything else that escaped."""
        if isinstance(failure.value, MethodNotAllowed):
            body = self._error_page(request, 405)
            allowed = failure.value.valid_methods or ()
            _set_header(request, b"Allow", ", ".join(sorted(allowed)).encode("ascii", "replace"))
            return body
        if isinstance(failure.value, HTTPException):
            return self._error_page(request, 404)
        log.failure("web: unexpected error", failure)
        return self._error_page(request, 500)

    # -- handlers -----------------------------------------------------------------------
    async def _pixel(self, request: IRequest, token: str) -> bytes:
        try:
            recipient_id: int | None = self._codec.parse_open(token)
        except TokenError:
            recipient_id = None
        if recipient_id is not None and request.method != b"HEAD":
            try:
                await self._record(request, recipient_id)
            except Exception:
                log.failure("web: recording an open failed")
        return _respond(
            request,
            200,
            b"image/gif",
            PIXEL_GIF,
            ((b"Cache-Control", _NO_CACHE), (b"Pragma", b"no-cache"), (b"Expires", b"0")),
        )

    async def _click(self, request: IRequest, token: str) -> bytes:
        try:
            recipient_id, url = self._codec.parse_click(token)
        except TokenError:
            return self._error_page(request, 404)
        if not _is_http_url(url):
            log.warn("web: refused a click token whose target is not http(s)")
            return self._error_page(request, 404)
        location = location_header(url)
        if request.method != b"HEAD":
            try:
                await self._record(request, recipient_id, url)
            except Exception:
                log.failure("web: recording a click failed")
        return _respond(request, 302, None, b"", ((b"Location", location),))

    async def _page(self, request: IRequest, token: str) -> bytes:
        target = await self._unsubscriber(token)
        if target is None:
            return self._error_page(request, 404)
        masked = mask_address(target.address)
        return self._html(request, 200, self._pages.unsubscribe_confirm(masked))

    async def _unsubscribe(self, request: IRequest, token: str) -> bytes:
        target = await self._unsubscriber(token)
        if target is None:
            return self._error_page(request, 404)
        if _is_one_click(request):
            method = "one-click"
        elif _is_page_confirm(request):
            method = "page"
        else:  # neither RFC 8058 nor our form: ask again
            return self._html(
                request, 400, self._pages.unsubscribe_confirm(mask_address(target.address))
            )
        store = await self._store_ready()
        if await store.unsubscribe_address(
            target.address, target.queue_id, method, self._suppression
        ):
            if self._metrics is not None:
                self._metrics.unsubscribed.labels(method=method).inc()
            log.info(
                "web: a recipient of {queue_id} unsubscribed ({method})",
                queue_id=target.queue_id or "a purged message",
                method=method,
            )
        if method == "one-click":
            return _respond(request, 200, b"text/plain; charset=utf-8", b"Unsubscribed\n")
        return self._html(request, 200, self._pages.unsubscribe_done(mask_address(target.address)))

    # -- helpers ------------------------------------------------------------------------
    def _html(self, request: IRequest, code: int, page: bytes) -> bytes:
        return _respond(request, code, b"text/html; charset=utf-8", page, _HTML_HEADERS)

    def _error_page(self, request: IRequest, code: int) -> bytes:
        return self._html(request, code if code in (404, 405) else 500, self._pages.error(code))

    async def _unsubscriber(self, token: str) -> _Unsubscriber | None:
        """Who the unsubscribe ``token`` names: its recipient row while it exists, else the
        address the token carries; None (a 404) for a bad token, or an old one (without the
        address) whose row is gone.

        A row whose address is not the token's is not the token's recipient (its id was
        given again, e.g. in another database): the token's address counts."""
        try:
            recipient_id, address = self._codec.parse_unsubscribe(token)
        except TokenError:
            return None
        store = await self._store_ready()
        ref = await store.recipient_ref(recipient_id)
        if ref is not None and (address is None or ref.address == address):
            return _Unsubscriber(ref.address, ref.queue_id)
        if address is None:
            return None
        return _Unsubscriber(address, None)

    async def _record(self, request: IRequest, recipient_id: int, url: str | None = None) -> None:
        """An ``opened`` event, or a ``clicked`` one when ``url`` is given."""
        store = await self._store_ready()
        ref = await store.recipient_ref(recipient_id)
        if ref is None:
            return
        user_agent = _user_agent(request)
        reason = machine_reason(user_agent)
        if reason is None and url is not None:
            delivered = await store.delivered_at(recipient_id)
            if is_machine_click(self._clock.seconds(), delivered, self._click_delay):
                reason = "click-soon-after-delivery"
        ip, machine = _client_ip(request), reason is not None
        event: OpenedEvent | ClickedEvent = (
            OpenedEvent(user_agent, ip, machine)
            if url is None
            else ClickedEvent(user_agent, ip, machine, url)
        )
        await store.record_engagement(ref, event)
        if self._metrics is not None:
            self._metrics.count_events((event,))

    def _serve(
        self, request: IRequest, what: str, handler: Callable[[], Awaitable[bytes]]
    ) -> Deferred[bytes]:
        """Run ``handler`` to its end, turning any exception into a logged, generic 500.

        Klein cancels a handler's Deferred when the client disconnects; the Deferred returned
        here then fails alone while the handler (and its transaction) finishes undisturbed.
        """

        async def guarded() -> bytes:
            try:
                return await handler()
            except Exception:
                log.failure("web: {what} failed", what=what)
                return self._error_page(request, 500)

        outer: Deferred[bytes] = Deferred(lambda d: None)

        def deliver(body: bytes) -> None:
            if not outer.called:
                outer.callback(body)

        Deferred.fromCoroutine(guarded()).addCallback(deliver)
        return outer
