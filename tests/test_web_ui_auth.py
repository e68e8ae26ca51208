"""The reports UI's login, sessions, CSRF checks and login throttle, over real HTTP."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from smartrelay.config import Config, WebConfig
from smartrelay.config.model import IPNetwork
from smartrelay.storage.store import Store
from smartrelay.web.templating import Templates
from smartrelay.web.ui.app import _safe_next
from smartrelay.web.ui.auth import Authenticator, LoginThrottle, hash_token
from smartrelay.web.ui.context import UiContext, client_address
from tests.support.webui import PASSWORD, Site, hidden, ui_site


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path, store: Store, clock: Clock) -> AsyncIterator[Site]:
    async with ui_site(tmp_path, store, clock) as served:
        yield served


@pytest_twisted.ensureDeferred
async def test_every_page_without_a_session_redirects_to_login(site: Site) -> None:
    browser = site.browser()
    for path in ("/ui/", "/ui/messages?q=x", "/ui/queue", "/ui/suppressions", "/ui/feedback"):
        code, headers, _ = await browser.request("GET", path)
        assert code == 303, path
        assert headers["location"] == "/ui/login?" + urlencode({"next": path}), path
    code, _, _ = await browser.request("POST", "/ui/suppressions", {"address": "a@b.c"})
    assert code == 403
    code, headers, page = await browser.request("GET", "/ui/login")
    assert code == 200 and "<h1>Log in</h1>" in page
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "<script>" not in page and "unsafe-inline" not in headers["content-security-policy"]


@pytest_twisted.ensureDeferred
async def test_login_makes_a_session_and_logout_ends_it(site: Site) -> None:
    browser = site.browser()
    code, _, page = await browser.request("GET", "/ui/login?next=/ui/queue")
    token = hidden(page, "login_token")
    assert hidden(page, "next") == "/ui/queue"
    code, headers, _ = await browser.request(
        "POST",
        "/ui/login",
        {"username": "ada", "password": PASSWORD, "login_token": token, "next": "/ui/queue"},
    )
    assert code == 303 and headers["location"] == "/ui/queue"
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(headers["set-cookie"])
    session = cookie["smartrelay_session"]
    assert session["httponly"] and session["samesite"].lower() == "lax"
    assert session["path"] == "/ui/" and not session["secure"]
    stored = await site.store.web_session(hash_token(session.value), site.auth.times)
    assert stored is not None and stored.username == "ada"

    code, _, page = await browser.request("GET", "/ui/")
    assert code == 200 and "<h1>Dashboard</h1>" in page and ">ada<" in page
    csrf = hidden(page, "csrf")

    # Logging out without the token is refused; with it, the session is gone for good.
    code, _, _ = await browser.request("POST", "/ui/logout", {})
    assert code == 403
    old = dict(browser.cookies)
    code, headers, _ = await browser.request("POST", "/ui/logout", {"csrf": csrf})
    assert code == 303 and headers["location"] == "/ui/login"
    assert "smartrelay_session" not in browser.cookies
    browser.cookies = old  # a stolen copy of the cookie is worth nothing now
    code, _, _ = await browser.request("GET", "/ui/")
    assert code == 303


@pytest_twisted.ensureDeferred
async def test_state_changing_requests_need_the_csrf_token_and_our_origin(site: Site) -> None:
    browser = site.browser()
    assert await browser.login() == 303
    _, _, page = await browser.request("GET", "/ui/")
    csrf = hidden(page, "csrf")
    # No token, a wrong one, a token with another site's Origin: refused before the section.
    for form, headers in (
        ({}, {}),
        ({"csrf": "x" * len(csrf)}, {}),
        ({"csrf": csrf}, {"Origin": "https://evil.example"}),
    ):
        code, _, body = await browser.request("POST", "/ui/", form, **headers)
        assert code == 403, (form, headers)
        assert "out of date" in body
    # The right token reaches the section (whose page accepts GET only: 405).
    code, _, _ = await browser.request("POST", "/ui/", {"csrf": csrf}, Origin=site.url)
    assert code == 405


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_and_unknown_users_get_the_same_answer(site: Site) -> None:
    browser = site.browser()
    assert await browser.login(password="nope") == 403
    assert await browser.login(user="nobody") == 403
    assert await browser.login(user="x" * 300) == 400  # longer than any name: a clear 400
    code, _, page = await browser.request(
        "POST", "/ui/login", {"username": "ada", "password": PASSWORD}
    )
    assert code == 403 and "out of date" in page  # no login token: login CSRF refused
    assert "smartrelay_session" not in browser.cookies


@pytest_twisted.ensureDeferred
async def test_failed_logins_are_slowed_per_ip_and_per_user(site: Site) -> None:
    browser = site.browser()
    for _ in range(5):
        assert await browser.login(password="guess") == 403
    # The sixth attempt must wait, even with the right password, and is told how long.
    code, _, page = await browser.request("GET", "/ui/login")
    code, headers, page = await browser.request(
        "POST",
        "/ui/login",
        {"username": "ada", "password": PASSWORD, "login_token": hidden(page, "login_token")},
    )
    assert code == 429 and headers["retry-after"] == "2"
    assert "Too many failed logins" in page
    site.clock.advance(2)
    assert await browser.login(password="guess") == 403
    assert await browser.login() == 429  # now 4 s
    site.clock.advance(4)
    assert await browser.login() == 303  # the right password resets the count
    failures = await site.store.login_failures(("ip:127.0.0.1", "user:ada"), 3600)
    assert failures == []


def test_the_wait_doubles_up_to_the_maximum() -> None:
    throttle = LoginThrottle()
    assert [throttle.wait(n, 0.0, 0.0) for n in range(4, 9)] == [0.0, 2.0, 4.0, 8.0, 16.0]
    assert throttle.wait(40, 0.0, 0.0) == 900.0
    assert throttle.wait(6, 100.0, 103.0) == 1.0


@pytest_twisted.ensureDeferred
async def test_a_session_ends_when_idle_or_when_the_password_changes(site: Site) -> None:
    browser = site.browser()
    assert await browser.login() == 303
    assert (await browser.request("GET", "/ui/"))[0] == 200
    site.clock.advance(7 * 3600)
    assert (await browser.request("GET", "/ui/"))[0] == 200  # restarts the idle time
    site.clock.advance(7 * 3600)
    assert (await browser.request("GET", "/ui/"))[0] == 200
    site.clock.advance(8 * 3600 + 1)
    assert (await browser.request("GET", "/ui/"))[0] == 303
    assert await browser.login() == 303
    assert await site.store.end_web_sessions_of("ada") == 1
    assert (await browser.request("GET", "/ui/"))[0] == 303
    # Removing the user ends their sessions too (ON DELETE CASCADE).
    assert await browser.login() == 303
    assert await site.store.web_users.remove("ada")
    assert (await browser.request("GET", "/ui/"))[0] == 303


@pytest.mark.parametrize(
    ("wanted", "goes_to"),
    [
        ("/ui/messages?tag=a", "/ui/messages?tag=a"),
        ("//evil.example/ui/", "/ui/"),
        ("https://evil.example/", "/ui/"),
        ("/ui/../../etc", "/ui/"),
        ("/ui/\\evil", "/ui/"),
        ("/other", "/ui/"),
        ("", "/ui/"),
        ("/ui/x\r\nSet-Cookie: a=b", "/ui/"),
    ],
)
def test_login_only_goes_on_to_a_page_of_the_ui(wanted: str, goes_to: str) -> None:
    assert _safe_next(wanted, "/ui") == goes_to


def test_the_client_address_behind_a_trusted_proxy() -> None:
    proxies = (ipaddress.ip_network("10.0.0.0/8"),)

    def address(peer: str, forwarded: str | None, trusted: tuple[IPNetwork, ...] = proxies) -> str:
        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", peer, 1234)
        if forwarded is not None:
            request.requestHeaders.setRawHeaders(b"x-forwarded-for", [forwarded.encode()])
        return client_address(request, trusted)  # type: ignore[arg-type]

    assert address("192.0.2.1", "198.51.100.7") == "192.0.2.1"  # not a proxy: header ignored
    assert address("10.0.0.2", "198.51.100.7") == "198.51.100.7"
    assert address("10.0.0.2", "6.6.6.6, 198.51.100.7, 10.0.0.9") == "198.51.100.7"
    assert address("10.0.0.2", "not-an-ip") == "10.0.0.2"
    assert address("10.0.0.2", None) == "10.0.0.2"
    assert address("10.0.0.2", "198.51.100.7", ()) == "10.0.0.2"


def test_the_session_cookie_is_secure_under_https(store: Store, clock: Clock) -> None:
    ui = UiContext(lambda: succeed(store), Templates.load(), clock, "https://relay.example/r")
    assert (
        ui.secure
        and ui.root == "/r/ui"
        and ui.url("messages", tag="a b") == ("/r/ui/messages?tag=a+b")
    )
    auth = Authenticator(ui, lambda work: succeed(work()))
    request = Request(DummyChannel())  # type: ignore[no-untyped-call]
    auth.set_session_cookie(request, "t" * 43)
    (cookie,) = request.cookies
    assert b"Secure" in cookie and b"HttpOnly" in cookie and b"Path=/r/ui/" in cookie
    assert b"SameSite=lax" in cookie


def test_the_config_takes_trusted_proxies(tmp_path: Path) -> None:
    from smartrelay.config import load_config

    path = tmp_path / "c.toml"
    path.write_text('[web]\ntrusted_proxies = ["127.0.0.1/32", "::1"]\n')
    config: Config = load_config(str(path))
    assert [str(n) for n in config.web.trusted_proxies] == ["127.0.0.1/32", "::1/128"]
    assert WebConfig().trusted_proxies == ()
    path.write_text('[web]\ntrusted_proxies = ["nope"]\n')
    with pytest.raises(Exception, match=r"web\.trusted_proxies\[0\]"):
        load_config(str(path))
