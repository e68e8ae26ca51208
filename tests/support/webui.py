"""The reports UI over real HTTP in tests: a tiny cookie-keeping client and a served UI.

``ui_site(tmp_path, store, clock, sections)`` serves the whole web root (tracking + UI) on a
free loopback port with one web user, ``ada`` / :data:`PASSWORD`; ``site.browser()`` is a
client with its own cookie jar (``await browser.login()``; ``hidden(page, "csrf")`` reads a
form's token). Sections are built by ``sections(ui)`` (default: the dashboard only).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
import treq
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool

from smartrelay.config import SuppressionConfig
from smartrelay.listening import ListeningService
from smartrelay.passwords import hash_password
from smartrelay.storage.store import Store
from smartrelay.tokens import TokenCodec, load_keyring
from smartrelay.web.service import web_service
from smartrelay.web.site import WebRoot
from smartrelay.web.templating import Templates
from smartrelay.web.tracking import Tracking
from smartrelay.web.ui.app import ReportsUI, Section
from smartrelay.web.ui.auth import Authenticator, LoginThrottle
from smartrelay.web.ui.context import UiContext
from smartrelay.web.ui.dashboard import Dashboard
from tests.conftest import real_reactor

PASSWORD = "correct horse battery staple"


@attrs.define
class Browser:
    """A tiny browser: one cookie jar, no redirects followed."""

    base: str
    cookies: dict[str, str] = attrs.Factory(dict)
    ip: str = ""

    async def request(
        self, method: str, path: str, form: dict[str, str] | None = None, **headers: str
    ) -> tuple[int, dict[str, str], str]:
        reactor = real_reactor()
        pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
        agent = Agent(reactor, pool=pool)  # type: ignore[no-untyped-call]
        sent: dict[bytes | str, bytes | str] = {k.replace("_", "-"): v for k, v in headers.items()}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if form is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        response = await treq.request(
            method,
            self.base + path,
            agent=agent,
            allow_redirects=False,
            headers=sent,
            data=None if form is None else urlencode(form).encode(),
        )
        body = (await response.content()).decode("utf-8")
        found = {k.decode().lower(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()}
        for raw in response.headers.getRawHeaders(b"set-cookie") or []:
            cookie: SimpleCookie = SimpleCookie()
            cookie.load(raw.decode())
            for name, morsel in cookie.items():
                if morsel.value and morsel["max-age"] != "0":
                    self.cookies[name] = morsel.value
                else:
                    self.cookies.pop(name, None)
        return response.code, found, body

    async def login(self, user: str = "ada", password: str = PASSWORD) -> int:
        code, _, page = await self.request("GET", "/ui/login")
        assert code == 200
        token = hidden(page, "login_token")
        code, _headers, _ = await self.request(
            "POST",
            "/ui/login",
            {"username": user, "password": password, "login_token": token, "next": "/ui/"},
        )
        return code


def hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match is not None, f"no hidden field {name} in the page"
    return match[1]


@attrs.frozen
class Site:
    url: str
    store: Store
    clock: Clock
    auth: Authenticator
    ui: UiContext

    def browser(self) -> Browser:
        return Browser(self.url)


@asynccontextmanager
async def ui_site(
    tmp_path: Path,
    store: Store,
    clock: Clock,
    sections: Callable[[UiContext], Mapping[str, Section]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> AsyncIterator[Site]:
    clock.advance(1_800_000_000)
    await store.web_users.add("ada", hash_password(PASSWORD))
    codec = TokenCodec(load_keyring(str(tmp_path / "secret.key")))
    tracking = Tracking(lambda: succeed(store), codec, clock, SuppressionConfig())
    ui = UiContext(
        lambda: succeed(store), Templates.load(), clock, "http://127.0.0.1:8080", extra=extra
    )

    auth = Authenticator(
        ui, lambda work: succeed(work()), throttle=LoginThrottle(failure_delay=0.0)
    )
    chosen = {"": Dashboard(ui)} if sections is None else sections(ui)
    reports = ReportsUI(ui, auth, chosen)
    fatal: list[str] = []
    service: ListeningService = web_service(
        real_reactor(),
        "tcp:0:interface=127.0.0.1",
        WebRoot(tracking, reports).resource(),
        fatal.append,
    )
    service.startService()
    assert fatal == [] and service.port is not None
    url = f"http://127.0.0.1:{service.port.getHost().port}"  # type: ignore[attr-defined]
    ui.origin = url  # what a real browser sends as Origin (the port is known only now)
    yield Site(
        url,
        store,
        clock,
        auth,
        ui,
    )
    stopped = service.stopService()
    if stopped is not None:
        await stopped
