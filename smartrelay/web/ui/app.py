"""The reports UI at ``{base_url}/ui/``: login, logout, its static files, and the sections.

Every path but ``/ui/login`` and ``/ui/static/...`` belongs to a section and passes through
:meth:`ReportsUI._guard` first: no session -> 303 to the login page (with ``next``); a
request other than GET/HEAD without the session's CSRF token, or with an ``Origin`` that is
not ``base_url``'s -> 403. Only then is the section's own Klein app given the request, so a
section cannot forget either check.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Protocol

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from smartrelay.web.ui.auth import Authenticator
from smartrelay.web.ui.context import IUiSession, UiContext, UiError, add_error_pages, arg

__all__ = ["STATIC", "ReportsUI", "Section"]

log = Logger()

#: The UI's stylesheet and script (package data).
STATIC: Traversable = files("smartrelay.web").joinpath("static")
_STATIC_TYPES = {
    "ui.css": b"text/css; charset=utf-8",
    "ui.js": b"text/javascript; charset=utf-8",
}
_SAFE_METHODS = (b"GET", b"HEAD")


class Section(Protocol):
    """A part of the UI: a class with ``app = Klein()`` and ``ui``."""

    app: Klein
    ui: UiContext


class ReportsUI:
    """``ReportsUI(...).app.resource()`` is mounted at ``/ui/`` by WebRoot."""

    app = Klein()
    add_error_pages(app)

    def __init__(self, ui: UiContext, auth: Authenticator, sections: Mapping[str, Section]) -> None:
        self.ui = ui
        self.auth = auth
        #: The sections by name (the relay updates the deliverability one's keys on a reload).
        self.sections = dict(sections)
        self._sections = {name: section.app.resource() for name, section in sections.items()}
        self._static = {name: STATIC.joinpath(name).read_bytes() for name in _STATIC_TYPES}

    # -- login / logout -----------------------------------------------------------------
    @app.route("/login", methods=["GET"])
    def login_page(self, request: IRequest) -> bytes:
        return self._login_form(request, 200, "")

    @app.route("/login", methods=["POST"])
    def login(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "login", lambda: self._login(request))

    @app.route("/logout", methods=["POST"])
    def logout(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "logout", lambda: self._logout(request))

    @app.route("/static/<name>", methods=["GET"])
    def static(self, request: IRequest, name: str) -> bytes:
        if name not in self._static:
            raise UiError(404, "There is no such file.")
        body = self.ui.respond(request, 200, _STATIC_TYPES[name], self._static[name])
        request.responseHeaders.setRawHeaders(b"Cache-Control", [b"max-age=3600"])
        return body

    # -- the sections -------------------------------------------------------------------
    @app.route("/", branch=False)
    def dashboard(self, request: IRequest) -> Deferred[IResource | bytes]:
        return self._guard(request, "")

    @app.route("/messages", branch=True)
    def messages(self, request: IRequest) -> Deferred[IResource | bytes]:
        return self._guard(request, "messages")

    @app.route("/queue", branch=True)
    def queue(self, request: IRequest) -> Deferred[IResource | bytes]:
        return self._guard(request, "queue")

    @app.route("/suppressions", branch=True)
    def suppressions(self, request: IRequest) -> Deferred[IResource | bytes]:
        return self._guard(request, "suppressions")

    @app.route("/feedback", branch=True)
    def feedback(self, request: IRequest) -> Deferred[IResource | bytes]:
        return self._guard(request, "feedback")

    @app.route("/deliverability", branch=True)
    def deliverability(self, request: IRequest) -> Deferred[IResource | bytes]:
        return self._guard(request, "deliverability")

    @app.route("/alerts", branch=True)
    def alerts(self, request: IRequest) -> Deferred[IResource | bytes]:
        return self._guard(request, "alerts")

    def _guard(self, request: IRequest, name: str) -> Deferred[IResource | bytes]:
        async def check() -> IResource | bytes:
            try:
                session = await self.auth.session_of(request)
            except Exception:
                log.failure("web ui: session lookup failed")
                return self.ui.error(request, 503, "The database is not reachable; try again.")
            if session is None:
                self.auth.clear_session_cookie(request)
                if request.method in _SAFE_METHODS:
                    wanted = request.uri.decode("utf-8", "replace")
                    return self.ui.redirect(request, self.ui.url("login", next=wanted))
                return self.ui.error(request, 403, "Your session has ended: log in again.")
            if request.method not in _SAFE_METHODS and not self._same_site(request, session.csrf):
                return self.ui.error(
                    request, 403, "This form is out of date or was not sent from this site."
                )
            request.setComponent(IUiSession, session)  # type: ignore[attr-defined]
            section = self._sections.get(name)
            if section is None:
                return self.ui.error(request, 404, "This part of the UI is not there yet.")
            if not request.postpath:  # /ui/queue is the section's "/" (not a redirect to it)
                request.postpath = [b""]
            return section

        return self._deferred(check())

    def _same_site(self, request: IRequest, csrf: str) -> bool:
        """The CSRF token matches (form field ``csrf`` or header ``X-CSRF-Token``), and the
        ``Origin`` header, when sent, is base_url's."""
        origin = _header(request, b"origin")
        if origin is not None and origin.lower() != self.ui.origin.encode("utf-8"):
            return False
        sent = arg(request, "csrf", limit=200) or (_header(request, b"x-csrf-token") or b"").decode(
            "latin-1"
        )
        return bool(sent) and hmac.compare_digest(sent.encode("utf-8"), csrf.encode("utf-8"))

    # -- handlers -----------------------------------------------------------------------
    def _login_form(self, request: IRequest, code: int, problem: str, name: str = "") -> bytes:
        nxt = _safe_next(arg(request, "next", limit=2000), self.ui.root)
        return self.ui.page(
            request,
            "ui/login.html",
            code=code,
            title="Log in",
            login_token=self.auth.login_form_token(request),
            problem=problem,
            username=name,
            next=nxt,
        )

    async def _login(self, request: IRequest) -> bytes:
        username = arg(request, "username", limit=200)
        password = arg(request, "password", limit=1000)
        origin = _header(request, b"origin")
        if (
            origin is not None and origin.lower() != self.ui.origin.encode("utf-8")
        ) or not self.auth.login_form_token_matches(request, arg(request, "login_token")):
            return self._login_form(
                request, 403, "The login form was out of date; please try again.", username
            )
        outcome = await self.auth.login(request, username, password)
        if outcome.result == "throttled":
            wait = max(1, round(outcome.wait))
            request.responseHeaders.setRawHeaders(b"Retry-After", [str(wait).encode("ascii")])
            return self._login_form(
                request, 429, f"Too many failed logins. Try again in {wait} s.", username
            )
        if outcome.result == "wrong":
            return self._login_form(request, 403, "Wrong user name or password.", username)
        self.auth.set_session_cookie(request, outcome.token)
        log.info("web ui: {user} logged in", user=username)
        return self.ui.redirect(request, _safe_next(arg(request, "next"), self.ui.root))

    async def _logout(self, request: IRequest) -> bytes:
        session = await self.auth.session_of(request)
        if session is not None:
            if not self._same_site(request, session.csrf):
                return self.ui.error(request, 403, "This form is out of date; try again.")
            await self.auth.logout(session)
            log.info("web ui: {user} logged out", user=session.username)
        self.auth.clear_session_cookie(request)
        return self.ui.redirect(request, self.ui.url("login"))

    @staticmethod
    def _deferred(coroutine: object) -> Deferred[IResource | bytes]:
        outer: Deferred[IResource | bytes] = Deferred(lambda d: None)

        def deliver(result: IResource | bytes) -> None:
            if not outer.called:
                outer.callback(result)

        Deferred.fromCoroutine(coroutine).addCallback(deliver)  # type: ignore[arg-type]
        return outer


def _safe_next(wanted: str, root: str) -> str:
    """Where to go after login: a path inside the UI only (never another site: ``//evil``,
    ``/ui/../x``, a scheme), else the dashboard."""
    if (
        wanted.startswith(root + "/")
        and not wanted.startswith("//")
        and "\\" not in wanted
        and "/../" not in wanted
        and not any(ord(c) < 32 for c in wanted)
    ):
        return wanted
    return root + "/"


def _header(request: IRequest, name: bytes) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(name)
    return values[-1] if values else None
