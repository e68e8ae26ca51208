"""Logins of the reports UI: password check, database-backed sessions, the login throttle.

* A session is 32 random bytes in a cookie (``HttpOnly``, ``SameSite=Lax``, ``Secure`` when
  ``base_url`` is https, path ``/ui/``); the database keeps its SHA-256 only.
* Every form of a session carries its CSRF token; the login form carries the value of a
  pre-login cookie (double submit), so that another site cannot log a browser in as its own
  user either.
* Failed logins are counted per client address and per user name, in the database (every
  node sees them). After :attr:`LoginThrottle.free_failures` failures within the window, the
  next attempt must wait 2 s, then 4 s, 8 s... up to :attr:`LoginThrottle.max_wait`; until then
  it gets 429 without its password being checked. A failed attempt is answered only after
  :attr:`LoginThrottle.failure_delay`, and one attempt per address and per user name is
  checked at a time on a node, so parallel guesses do not slip past the count.
* Unknown user names cost the same scrypt as known ones: the answer time does not say which
  names exist.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Callable
from typing import Literal

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.iweb import IRequest

from smartrelay.passwords import hash_password, verify_password
from smartrelay.storage.store import SessionTimes, Store
from smartrelay.web.ui.context import UiContext, UiSession, client_address

__all__ = [
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "Authenticator",
    "LoginOutcome",
    "LoginThrottle",
    "hash_token",
]

SESSION_COOKIE = b"smartrelay_session"
LOGIN_COOKIE = b"smartrelay_login"
#: Default session lifetimes: 8 hours without a request, 7 days in all.
SESSION_TIMES = SessionTimes(idle=8 * 3600.0, absolute=7 * 86400.0)
_MAX_NAME = 200
_MAX_PASSWORD = 1000

#: Runs a blocking function (the scrypt check) off the reactor thread.
InThread = Callable[[Callable[[], bool]], Deferred[bool]]


@frozen
class LoginThrottle:
    free_failures: int = 5
    window: float = 3600.0
    max_wait: float = 900.0
    failure_delay: float = 1.0

    def wait(self, failures: int, last_failure: float, now: float) -> float:
        """Seconds still to wait before the next attempt of a key with this record."""
        if failures < self.free_failures:
            return 0.0
        needed = min(self.max_wait, 2.0 ** (failures - self.free_failures + 1))
        return max(0.0, last_failure + needed - now)


@frozen
class LoginOutcome:
    result: Literal["ok", "wrong", "throttled"]
    #: The new session's cookie value (``ok``), or the seconds to wait (``throttled``).
    token: str = ""
    wait: float = 0.0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def _cookie(request: IRequest, name: bytes) -> str:
    value = request.getCookie(name)  # type: ignore[no-untyped-call]
    if not isinstance(value, bytes) or not 16 <= len(value) <= 100:
        return ""
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return ""


def _throttle_keys(address: str, username: str) -> tuple[str, ...]:
    """``ip:`` the client address (an IPv6 client by its /64: one host has them all), and
    ``user:`` the name tried (lower-cased, at most 200 characters)."""
    try:
        ip = ipaddress.ip_address(address)
        if ip.version == 6:
            address = str(ipaddress.ip_network(f"{ip}/64", strict=False))
    except ValueError:
        pass
    return (f"ip:{address}", f"user:{username.lower()[:_MAX_NAME]}")


class Authenticator:
    """Checks passwords, makes and ends sessions, and finds the session of a request."""

    def __init__(
        self,
        ui: UiContext,
        in_thread: InThread,
        times: SessionTimes = SESSION_TIMES,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self._ui = ui
        self._in_thread = in_thread
        self.times = times
        self.throttle = LoginThrottle() if throttle is None else throttle
        self._in_flight: set[str] = set()
        # Checked against when the user does not exist: the same scrypt cost as a real check.
        self._decoy = hash_password(secrets.token_urlsafe(16))

    # -- sessions ---------------------------------------------------------------------
    async def session_of(self, request: IRequest) -> UiSession | None:
        token = _cookie(request, SESSION_COOKIE)
        if not token:
            return None
        token_hash = hash_token(token)
        store = await self._ui.store()
        found = await store.web_session(token_hash, self.times)
        if found is None:
            return None
        return UiSession(found.username, found.csrf, token_hash)

    def set_session_cookie(self, request: IRequest, token: str) -> None:
        self._set_cookie(request, SESSION_COOKIE, token, int(self.times.absolute))

    def clear_session_cookie(self, request: IRequest) -> None:
        self._set_cookie(request, SESSION_COOKIE, "", 0)

    async def logout(self, session: UiSession) -> None:
        store = await self._ui.store()
        await store.end_web_session(session.token_hash)

    # -- login ------------------------------------------------------------------------
    def login_form_token(self, request: IRequest) -> str:
        """The value the login form must send back: the pre-login cookie's, set if missing."""
        token = _cookie(request, LOGIN_COOKIE)
        if not token:
            token = secrets.token_urlsafe(24)
            self._set_cookie(request, LOGIN_COOKIE, token, 86400)
        return token

    def login_form_token_matches(self, request: IRequest, sent: str) -> bool:
        token = _cookie(request, LOGIN_COOKIE)
        return bool(token) and hmac.compare_digest(token.encode(), sent.encode("utf-8"))

    async def login(self, request: IRequest, username: str, password: str) -> LoginOutcome:
        """Check ``password`` for ``username`` within the throttle; on success a new session
        (the caller sets its cookie)."""
        address = client_address(request, self._ui.trusted_proxies)
        keys = _throttle_keys(address, username)
        store = await self._ui.store()
        now = self._ui.clock.seconds()
        waits = [
            self.throttle.wait(failures, last, now)
            for failures, last in await store.login_failures(keys, self.throttle.window)
        ]
        if any(key in self._in_flight for key in keys):
            waits.append(self.throttle.failure_delay)
        if max(waits, default=0.0) > 0:
            return LoginOutcome("throttled", wait=max(waits))
        self._in_flight.update(keys)
        try:
            ok = await self._check(store, username, password)
            if not ok:
                await store.record_login_failure(keys, self.throttle.window)
                if self.throttle.failure_delay > 0:
                    await deferLater(self._ui.clock, self.throttle.failure_delay, lambda: None)
                return LoginOutcome("wrong")
            token = secrets.token_urlsafe(32)
            if not await store.create_web_session(
                hash_token(token), username, secrets.token_urlsafe(32), self.times
            ):
                return LoginOutcome("wrong")
            await store.clear_login_failures(keys)
            return LoginOutcome("ok", token=token)
        finally:
            self._in_flight.difference_update(keys)

    async def _check(self, store: Store, username: str, password: str) -> bool:
        valid_input = 0 < len(username) <= _MAX_NAME and 0 < len(password) <= _MAX_PASSWORD
        stored = await store.web_users.password_hash(username) if valid_input else None
        against = self._decoy if stored is None else stored
        matches = await self._in_thread(lambda: verify_password(password[:_MAX_PASSWORD], against))
        return bool(matches) and stored is not None

    def _set_cookie(self, request: IRequest, name: bytes, value: str, max_age: int) -> None:
        request.addCookie(  # type: ignore[no-untyped-call,call-arg]
            name,
            value.encode("ascii"),
            path=(self._ui.root + "/").encode("utf-8"),
            max_age=str(max_age).encode("ascii"),
            secure=self._ui.secure,
            httpOnly=True,
            sameSite="lax",
        )
