"""Real-browser tests of the reports UI: headless Chromium driven by selenium, and the relay
it looks at running as users run it, in another process.

Selenium blocks the test's thread, so the relay cannot share the test's reactor: it is a real
``twistd -n smartrelay`` (:class:`UiRelay`) with a web user made by ``smartrelay-ctl web-user
add``, delivering to a scripted next hop in threads (tests/support/smtp_peer.py). One relay
and one browser serve a whole test module (Chromium takes about 1.5 s to start).

:class:`Chromium` checks every page it shows: no JavaScript error and no Content Security
Policy violation in the console (``goog:loggingPrefs`` browser ALL), none reported to a
``securitypolicyviolation`` listener it installs before any page script runs, and no alert
dialog open. A CSP violation is the sign that markup from data reached the page as code: the
UI has no inline script or style of its own. Screenshots go to ``artifacts/screenshots/`` in
the checkout, named by test module, test and page.

Chromium and chromedriver are the system's (Debian ``chromium``, ``chromium-driver``);
selenium is pointed at /usr/bin/chromedriver so that selenium-manager never goes to the
network. Without them a test skips, or fails with ``SMARTRELAY_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    UnexpectedAlertPresentException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from twisted.internet.defer import Deferred

from tests.conftest import real_reactor, service_missing
from tests.support import old_traffic
from tests.support.relay import HOST, free_ports
from tests.support.run import Twistd, assert_ok, ctl, query, write_config

REPO = Path(__file__).resolve().parent.parent.parent
SCREENSHOTS = REPO / "artifacts" / "screenshots"
CHROMIUM = os.environ.get("SMARTRELAY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SMARTRELAY_CHROMEDRIVER", "/usr/bin/chromedriver")
USER = "ada"
PASSWORD = "correct horse battery staple"
DESKTOP = (1280, 800)
PHONE = (390, 844)
#: Seconds to wait for a page or a condition (the machine is shared and loaded).
WAIT = 20.0

T = TypeVar("T")

#: Runs before any script of every page (DevTools injects it; the page's CSP does not apply):
#: records each CSP violation the page causes.
_CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__cspViolations.push(
    e.violatedDirective + " blocked " + e.blockedURI + " sample " + JSON.stringify(e.sample));
});
"""
#: Console lines that are no fault of the page: Chromium asks every site for /favicon.ico.
_ALWAYS_ALLOWED = (re.compile(r"/favicon\.ico - Failed to load resource"),)


class PageProblem(AssertionError):
    pass


class Chromium:
    """One headless Chromium for a test module, and the checks every page must pass."""

    def __init__(self, driver: webdriver.Chrome, profile: Path) -> None:
        self.driver = driver
        self.profile = profile
        self.size = DESKTOP
        self.shots: list[Path] = []

    @classmethod
    @contextmanager
    def started(cls) -> Iterator[Chromium]:
        for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                service_missing(f"{path} not found (Debian package {package})")
        profile = Path(tempfile.mkdtemp(prefix="smartrelay-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--lang=en-US",
            f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # A dialog stays open for check() to find (the default dismisses it, and only the
        # next command would fail, with another page's name on it).
        options.unhandled_prompt_behavior = "ignore"
        # An explicit driver path: selenium-manager is never asked (it would go online).
        service = Service(executable_path=CHROMEDRIVER)
        try:
            driver = webdriver.Chrome(options=options, service=service)
        except WebDriverException:
            shutil.rmtree(profile, ignore_errors=True)
            raise
        browser = cls(driver, profile)
        try:
            driver.set_page_load_timeout(WAIT)
            driver.execute_cdp_cmd(
                "Page.addScriptToEvaluateOnNewDocument", {"source": _CSP_LISTENER}
            )
            browser.resize(*DESKTOP)
            yield browser
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)

    # -- viewport and screenshots -------------------------------------------------------
    def resize(self, width: int, height: int) -> None:
        """An exact viewport (``--window-size`` sizes the outer window); a phone's below
        600 px wide (touch, the page's meta viewport honoured)."""
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )
        self.size = (width, height)

    def shot(self, request: pytest.FixtureRequest, page: str) -> Path:
        """A screenshot of the viewport: artifacts/screenshots/MODULE--TEST--PAGE[--390x844].png."""
        module = request.node.module.__name__.rsplit(".", 1)[-1]
        test = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        size = "" if self.size == DESKTOP else f"--{self.size[0]}x{self.size[1]}"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{module}--{test}--{page}{size}.png"
        assert self.driver.save_screenshot(str(path)), f"no screenshot {path}"
        self.shots.append(path)
        return path

    def phone_shot(self, request: pytest.FixtureRequest, page: str) -> Path:
        """The page again at phone size (390 x 844), then back to the desktop size."""
        self.resize(*PHONE)
        try:
            path = self.shot(request, page)
            sizes = self.driver.execute_script(
                "var e = document.documentElement;"
                " return [window.innerWidth, e.clientWidth, e.scrollWidth];"
            )
            if sizes[0] > PHONE[0] or sizes[2] > PHONE[0]:
                raise AssertionError(
                    f"{page} is wider than a phone ([innerWidth, clientWidth, scrollWidth]"
                    f" {sizes}); the outermost elements past its right edge: {self._too_wide()}"
                )
            return path
        finally:
            self.resize(*DESKTOP)

    def _too_wide(self) -> list[str]:
        found = self.driver.execute_script(
            """
            var limit = document.documentElement.clientWidth, out = [];
            document.querySelectorAll("body *").forEach(function (el) {
              var r = el.getBoundingClientRect();
              if (r.right > limit + 1 && !(el.parentElement
                  && el.parentElement.getBoundingClientRect().right > limit + 1)) {
                out.push(el.tagName.toLowerCase() + (el.id ? "#" + el.id : "")
                  + (el.className && el.className.baseVal === undefined && el.className
                     ? "." + el.className.split(" ").join(".") : "")
                  + " " + Math.round(r.width) + "px");
              }
            });
            return out.slice(0, 5);
            """
        )
        return [str(f) for f in found]

    # -- pages ------------------------------------------------------------------------------
    def go(self, url: str, allow: Sequence[str] = ()) -> None:
        """Open ``url`` and check the page (:meth:`check`)."""
        try:
            self.driver.get(url)
            self.loaded()
        except UnexpectedAlertPresentException as alert:
            self._dismiss_alerts()
            raise PageProblem(f"{url}: an alert dialog is open: {alert.alert_text!r}") from None
        self.check(allow)

    def submit(self, element: WebElement, allow: Sequence[str] = ()) -> None:
        """Click a submit button (or press it) and wait for the next page; check it."""
        old = self.driver.find_element(By.TAG_NAME, "html")
        element.click()
        self.wait(lambda d: _stale(old), "the next page after the click")
        self.loaded()
        self.check(allow)

    def loaded(self) -> None:
        self.wait(
            lambda d: d.execute_script("return document.readyState") == "complete",
            "the page to load",
        )

    def wait(self, condition: Callable[[webdriver.Chrome], T], what: str) -> T:
        """``condition(driver)`` once truthy; fails (with the page's URL) after :data:`WAIT`."""
        try:
            return WebDriverWait(self.driver, WAIT, poll_frequency=0.1).until(condition)
        except Exception as error:
            raise AssertionError(
                f"waited {WAIT} s for {what} on {self.driver.current_url}"
            ) from error

    def check(self, allow: Sequence[str] = ()) -> None:
        """The page shows no alert, caused no CSP violation and logged no error or warning
        (console lines matching a regex of ``allow`` excepted, e.g. an expected 403)."""
        problems = [f"an alert dialog is open: {text!r}" for text in self._dismiss_alerts()]
        violations = self.driver.execute_script("return window.__cspViolations || []")
        problems += [f"CSP violation: {v}" for v in violations]
        allowed = [*_ALWAYS_ALLOWED, *(re.compile(a) for a in allow)]
        for entry in self.console():
            message = str(entry.get("message", ""))
            if "Content Security Policy" in message or "Content-Security-Policy" in message:
                problems.append(f"CSP violation in the console: {message}")
            elif entry.get("level") in ("SEVERE", "WARNING") and not any(
                a.search(message) for a in allowed
            ):
                problems.append(f"console {entry.get('level')}: {message}")
        if problems:
            raise PageProblem(f"{self.driver.current_url}:\n" + "\n".join(problems))

    def _dismiss_alerts(self) -> list[str]:
        """The texts of the dialogs open (each dismissed, the next may follow)."""
        texts = []
        for _ in range(20):
            try:
                alert = self.driver.switch_to.alert
                texts.append(str(alert.text))
                alert.dismiss()
            except NoAlertPresentException:
                break
        return texts

    def console(self) -> list[dict[str, Any]]:
        """The browser's console lines since the last call."""
        return list(self.driver.get_log("browser"))  # type: ignore[no-untyped-call]

    # -- reading pages ------------------------------------------------------------------
    def by_id(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def css(self, selector: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[WebElement]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def scroll_to(self, selector: str) -> WebElement:
        """Scroll the first element matching ``selector`` to the top (for a screenshot)."""
        element = self.css(selector)
        self.driver.execute_script("arguments[0].scrollIntoView(true);", element)
        return element

    def text(self, selector: str = "main") -> str:
        """The rendered text (what a user reads) of the first element matching ``selector``."""
        return str(self.css(selector).text)

    @property
    def path(self) -> str:
        """The current URL without the scheme and host."""
        url = str(self.driver.current_url)
        return re.sub(r"^[a-z]+://[^/]+", "", url)

    def assert_inert(self) -> None:
        """Nothing from data became code or a live link: the only script is the UI's own,
        no element has an event handler attribute, no link or form goes to javascript:."""
        found = self.driver.execute_script(
            """
            var bad = [];
            document.querySelectorAll("script").forEach(function (s) {
              if (!/\\/ui\\/static\\/ui\\.js$/.test(s.src)) bad.push("script " + s.outerHTML);
            });
            document.querySelectorAll("*").forEach(function (el) {
              for (var i = 0; i < el.attributes.length; i++) {
                var a = el.attributes[i];
                if (/^on/i.test(a.name)) bad.push("handler " + el.outerHTML.slice(0, 200));
                if (/^(href|src|action|formaction|xlink:href)$/i.test(a.name)
                    && /^\\s*javascript:/i.test(a.value)) {
                  bad.push("js url " + el.outerHTML.slice(0, 200));
                }
              }
            });
            document.querySelectorAll("iframe, object, embed, base, meta[http-equiv]").forEach(
              function (el) { bad.push("element " + el.outerHTML.slice(0, 200)); });
            return bad;
            """
        )
        assert not found, f"{self.driver.current_url}: markup from data is live: {found}"

    # -- the UI -----------------------------------------------------------------------------
    def login(self, relay: UiRelay, user: str = USER, password: str = PASSWORD) -> None:
        """Fill in and send the login form (of the page shown, if it is the login page with
        its ``next``; else of /ui/login)."""
        if not self.path.startswith("/ui/login"):
            self.go(relay.url("/ui/login"))
        self.by_id("username").send_keys(user)
        self.by_id("password").send_keys(password)
        self.submit(self.css("main form button[type=submit]"))

    def logout(self) -> None:
        self.submit(self.css("form.logout button"))


def _stale(element: WebElement) -> bool:
    try:
        element.is_enabled()
    except WebDriverException:
        return True
    return False


# -- the relay under test ------------------------------------------------------------------
class UiRelay:
    """``twistd -n smartrelay`` on a database of the test's choice, SMTP and web on known
    loopback ports (the browser's Origin must be ``base_url``), every recipient routed to
    ``peer_port``, retries an hour apart (a deferred recipient waits for "retry now")."""

    def __init__(self, home: Path, database_url: str, peer_port: int) -> None:
        self.home = home
        self.database_url = database_url
        self.smtp_port, self.web_port, self.inbound_port = free_ports(3)
        self.base = f"http://{HOST}:{self.web_port}"
        var = home / "var"
        self.config = write_config(
            home,
            database_url,
            f'[server]\nhostname = "relay.test"\ndata_dir = {json.dumps(str(var))}\n'
            f'[smtp]\nlisten = ["tcp:{self.smtp_port}:interface={HOST}"]\n'
            f'[inbound]\nlisten = ["tcp:{self.inbound_port}:interface={HOST}"]\n'
            f"[rewrap]\nsecret_file = {json.dumps(str(var / 'secret.key'))}\n"
            f'[web]\nlisten = "tcp:{self.web_port}:interface={HOST}"\n'
            f'base_url = "{self.base}"\n'
            '[delivery]\nretry_schedule = ["1h"]\n'
            f'[delivery.routes]\n"*" = "smtp://{HOST}:{peer_port}"\n',
        )
        self.process: Twistd | None = None

    def url(self, path: str) -> str:
        return self.base + path

    def start(self, hostile_traffic: bool | None = None) -> Twistd:
        """Write old traffic first unless ``hostile_traffic`` is None (in this process:
        tests/support/old_traffic.py, which also creates the schema), then start the relay
        while ``smartrelay-ctl web-user add`` makes the web user (password on stdin): each
        costs seconds of Python start-up on a loaded machine. Without traffic the CLI
        creates the schema before the relay starts."""
        if hostile_traffic is not None:
            pytest_twisted.blockon(
                Deferred.fromCoroutine(
                    old_traffic.run(real_reactor(), self.database_url, hostile_traffic)
                )
            )
        else:
            self.ctl("web-user", "add", USER, stdin=PASSWORD + "\n")
        with ThreadPoolExecutor(max_workers=1) as pool:
            user = (
                pool.submit(ctl, self.config, "web-user", "add", USER, stdin=PASSWORD + "\n")
                if hostile_traffic is not None
                else None
            )
            self.process = Twistd(self.config, self.home)
            if user is not None:
                assert_ok(user.result())
        self.process.wait_for("smtp: listening on", timeout=60)
        self.process.wait_for("web: listening on", timeout=60)
        self.process.wait_for("inbound: listening on", timeout=60)
        return self.process

    def wait_for_rollup(self) -> None:
        """Until the roll-up has counted the old traffic."""
        wait_until(
            lambda: query(self.database_url, "SELECT COUNT(*) FROM rollups")[0][0] > 0,
            "the roll-up's first pass",
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None

    def ctl(self, *args: str, stdin: str = "") -> str:
        return assert_ok(ctl(self.config, *args, stdin=stdin)).stdout


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.1)
