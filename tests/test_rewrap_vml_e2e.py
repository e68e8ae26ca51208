"""Issue 18 point 5 end to end: a message with an Outlook VML button (and its ``<a>`` twin)
and an image map goes through a real relay to a sink; the tracked VML link, followed over
real HTTP, redirects to the exact original URL and records a ``clicked`` event."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path

import pytest_twisted
import treq
from twisted.web.http_headers import Headers

from tests.conftest import real_reactor
from tests.support.delivery_relay import (
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    events,
    smtp_route,
    submit,
    wait_for_events,
)
from tests.support.relay import free_ports

FIXTURES = Path(__file__).parent / "fixtures" / "vml"
# As a mail client opens it: percent escapes, a non-ASCII name, a fragment, kept exactly.
ORIGINAL_URL = "https://shop.example.com/confirm?id=42&lang=fr&q=%20x&name=J%C3%B6rg#top"
AREA_URL = "https://shop.example.com/map?shop=lyon&ref=banner"
OUTLOOK = Headers(
    {"User-Agent": ["Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0)"]}
)


def message(extra_header: str = "") -> bytes:
    button = (FIXTURES / "buttons_cm_background.html").read_text(encoding="utf-8")
    button = button.replace(
        "http://www.example.org/account/confirm?id=42&amp;lang=fr",
        ORIGINAL_URL.replace("&", "&amp;"),
    )
    assert button.count(ORIGINAL_URL.replace("&", "&amp;")) == 2  # the VML and the <a>
    image_map = (
        '<img src="https://cdn.example.com/b.png" usemap="#m" width="600" height="200">'
        '<map name="m"><area shape="rect" coords="0,0,600,200" '
        f'href="{AREA_URL.replace("&", "&amp;")}" alt="Lyon"></map>'
    )
    html = button.replace("</body>", image_map + "\n</body>")
    head = (
        "From: Shop <news@example.com>\r\n"
        "To: <fan@example.net>\r\n"
        "Subject: please confirm\r\n"
        "MIME-Version: 1.0\r\n"
        f"{extra_header}"
        'Content-Type: multipart/alternative; boundary="b1"\r\n'
        "\r\n"
        "--b1\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"Confirm: {ORIGINAL_URL}\r\n"
        "--b1\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n"
        "\r\n"
    )
    # quoted-printable by hand: only "=" needs escaping in this ASCII, short-lined HTML
    body = html.replace("=", "=3D").replace("\n", "\r\n")
    return (head + body + "\r\n--b1--\r\n").encode("ascii")


def delivered_html(data: bytes) -> str:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    part = parsed.get_body(("html",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


@pytest_twisted.ensureDeferred
async def test_outlook_button_and_image_map_clicks_are_tracked_through_a_real_relay(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    reactor = real_reactor()
    (web_port,) = free_ports(1)
    base_url = f"http://127.0.0.1:{web_port}"
    backend = TrackingSinkBackend(delay=0.0, clock=reactor)
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(
        database_url,
        {"routes": smtp_route(sink_port)},
        extra={"web": {"listen": f"tcp:{web_port}:interface=127.0.0.1", "base_url": base_url}},
    )

    queue_id = await submit(relay.smtp_port, ["fan@example.net"], message())
    await submit(relay.smtp_port, ["fan@example.net"], message("X-SmartRelay-Track-Clicks: no\r\n"))
    await wait_for_events(reactor, relay.store, "delivered", 2)
    tracked, untracked = sorted(
        (delivered_html(m.data) for m in backend.messages), key=lambda h: f"{base_url}/c/" not in h
    )

    # The VML button inside <!--[if mso]> and its <a> twin both carry a tracking link: the
    # same one (a click token is a function of the recipient and the URL).
    click = re.escape(base_url) + r"/c/[A-Za-z0-9_-]+"
    comment = tracked[tracked.index("<!--[if mso]>") : tracked.index("<![endif]-->")]
    (vml_link,) = re.findall(rf'<v:roundrect [^>]*href="({click})"', comment)
    (a_link,) = re.findall(rf'<a href="({click})"\r?\nstyle=', tracked)
    (area_link,) = re.findall(rf'<area [^>]*href="({click})"', tracked)
    assert vml_link == a_link != area_link
    assert ORIGINAL_URL.replace("&", "&amp;") not in tracked
    # the rest of the conditional comment is as it was written
    assert '<v:fill type="tile" src="https://i.example.org/button-bg.gif" color="#556270" />' in (
        comment
    )
    assert "<![endif]--><a href=" in tracked

    # Outlook's click: 302 to the byte-exact original URL, and a clicked event with it.
    response = await treq.get(vml_link, allow_redirects=False, headers=OUTLOOK)
    assert response.code == 302
    assert response.headers.getRawHeaders("Location") == [ORIGINAL_URL]
    await response.content()
    response = await treq.get(area_link, allow_redirects=False)
    assert response.code == 302
    assert response.headers.getRawHeaders("Location") == [AREA_URL]
    await response.content()
    clicked = await wait_for_events(reactor, relay.store, "clicked", 2)
    assert [(e.queue_id, e.recipient, e.data["url"]) for e in clicked] == [
        (queue_id, "fan@example.net", ORIGINAL_URL),
        (queue_id, "fan@example.net", AREA_URL),
    ]

    # X-SmartRelay-Track-Clicks: no leaves the VML button, the <a> and the area as written.
    assert untracked.count(ORIGINAL_URL.replace("&", "&amp;")) == 2
    assert AREA_URL.replace("&", "&amp;") in untracked
    assert f"{base_url}/c/" not in untracked
    assert {e.type for e in await events(relay.store, queue_id=queue_id)} >= {
        "received",
        "delivered",
        "clicked",
    }
