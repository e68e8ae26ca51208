"""Volume alerts in the reports UI over real HTTP, on both engines: the dashboard's card
(held credentials with a Release button, the last day's alerts), escaped; the release (CSRF
checked) clears the hold in the database and in this process's volume watch at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from smartrelay.events import AlertEvent
from smartrelay.passwords import hash_password
from smartrelay.smtp.volume import VolumeSettings
from smartrelay.smtp.volume_watch import HELD_REPLY, VolumeWatch
from smartrelay.storage.store import Store
from smartrelay.web.ui.alerts import Alerts
from smartrelay.web.ui.dashboard import Dashboard
from tests.support.webui import Site, hidden, ui_site

NAME = '<b>app</b>"'
REASON = "volume alert: <script>alert(1)</script>"


@pytest_twisted.async_yield_fixture
async def served(
    tmp_path: Path, store: Store, clock: Clock
) -> AsyncIterator[tuple[Site, VolumeWatch]]:
    settings = VolumeSettings(action="hold", factor=10.0, minimum=100, window=600.0)
    watch = VolumeWatch(clock, settings, lambda: succeed(store))
    async with ui_site(
        tmp_path, store, clock, lambda ui: {"": Dashboard(ui), "alerts": Alerts(ui, watch)}
    ) as site:
        watch.startService()
        try:
            yield site, watch
        finally:
            await watch.stopService()


@pytest_twisted.ensureDeferred
async def test_card_release_and_csrf(served: tuple[Site, VolumeWatch], store: Store) -> None:
    site, watch = served
    browser = site.browser()
    assert await browser.login() == 303
    code, _, page = await browser.request("GET", "/ui/")
    assert code == 200 and 'id="volume-alerts"' not in page  # nothing to show: no card
    csrf = hidden(page, "csrf")

    await store.smtp_credentials.add(NAME, hash_password("x" * 12))
    alert = AlertEvent("credential-volume", NAME, 1234, 12.5, "hold")
    assert await store.record_volume_alert(alert, REASON)
    await watch.refresh_held()
    assert watch.check_sender(NAME) == HELD_REPLY

    code, _, page = await browser.request("GET", "/ui/")
    assert code == 200 and 'id="volume-alerts"' in page
    assert 'id="table-held"' in page and 'id="table-volume-alerts"' in page
    assert NAME not in page and "<script>alert" not in page  # escaped
    assert "&lt;b&gt;app&lt;/b&gt;" in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "1,234" in page and "12.5" in page
    assert 'action="/ui/alerts/release"' in page

    # Without the session's token: refused, still held.
    for token in ("", "x" * len(csrf)):
        code, _, body = await browser.request(
            "POST", "/ui/alerts/release", {"csrf": token, "credential": NAME}
        )
        assert code == 403 and "Traceback" not in body
    assert [h.credential for h in await store.held_credentials()] == [NAME]

    code, headers, _ = await browser.request(
        "POST", "/ui/alerts/release", {"csrf": csrf, "credential": NAME}
    )
    assert code == 303 and headers["location"].startswith("/ui/?notice=")
    assert await store.held_credentials() == []
    assert watch.check_sender(NAME) is None  # this node at once, not at the next poll
    code, _, page = await browser.request("GET", headers["location"])
    assert code == 200 and 'id="notice"' in page and "released" in page
    assert 'id="table-held"' not in page and 'id="table-volume-alerts"' in page  # the alert stays

    code, headers, _ = await browser.request(
        "POST", "/ui/alerts/release", {"csrf": csrf, "credential": NAME}
    )
    code, _, page = await browser.request("GET", headers["location"])
    assert "is not held" in page and "problem-notice" in page
    code, headers, _ = await browser.request(
        "POST", "/ui/alerts/release", {"csrf": csrf, "credential": "nobody"}
    )
    code, _, page = await browser.request("GET", headers["location"])
    assert "There is no SMTP credential nobody" in page
    code, _, page = await browser.request(
        "POST", "/ui/alerts/release", {"csrf": csrf, "credential": "x" * 500}
    )
    assert code == 400 and "Traceback" not in page

    # A day later the alert has left the card, and with nothing held the card is gone.
    site.clock.advance(86400 + 1)
    assert await browser.login() == 303  # (the session has expired too)
    code, _, page = await browser.request("GET", "/ui/")
    assert code == 200 and 'id="volume-alerts"' not in page
