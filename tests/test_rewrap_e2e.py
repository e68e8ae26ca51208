"""Issue "re-wrap chain": a message sent through the listener, re-wrapped, delivered to a sink,
then its links, pixel and one-click unsubscribe used over real HTTP."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path

import pytest_twisted
import treq
from twisted.internet.task import deferLater

from smartrelay.rewrap.dkim import generate_key, txt_record_name
from tests.conftest import PerlVerify, real_reactor
from tests.support.delivery_relay import (
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    events,
    smtp_route,
    submit,
    wait_for_events,
)
from tests.support.relay import RETURN_PATH_DOMAIN, free_ports

ORIGINAL_URL = "https://shop.example.com/p?a=1&b=2&q=%20x&name=J%C3%B6rg#frag"
HTML = (
    b"From: Shop <news@example.com>\r\n"
    b"To: <fan@example.net>\r\n"
    b"Subject: offers\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"X-SmartRelay-Tag: promo\r\n"
    b"\r\n"
    b'<html><body><p><a href="https://shop.example.com/p?a=1&amp;b=2&amp;q=%20x'
    b'&amp;name=J%C3%B6rg#frag">buy</a></p></body></html>\r\n'
)


@pytest_twisted.ensureDeferred
async def test_listener_to_sink_signed_tracked_unsubscribable(
    relays: DeliveryRelays,
    sinks: Sinks,
    database_url: str,
    tmp_path: Path,
    perl_verify: PerlVerify,
) -> None:
    reactor = real_reactor()
    key_path, record = generate_key("example.com", "s1", "rsa", str(tmp_path / "dkim"))
    (web_port,) = free_ports(1)
    base_url = f"http://127.0.0.1:{web_port}"
    backend = TrackingSinkBackend(delay=0.0, clock=reactor)
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(
        database_url,
        {"routes": smtp_route(sink_port)},
        extra={
            "web": {"listen": f"tcp:{web_port}:interface=127.0.0.1", "base_url": base_url},
            "dkim": {
                "keys": [{"domain": "example.com", "selector": "s1", "private_key": key_path}]
            },
        },
    )

    queue_id = await submit(relay.smtp_port, ["fan@example.net"], HTML)
    await wait_for_events(reactor, relay.store, "delivered", 1)
    (received,) = backend.messages
    data = received.data

    # VERP return path, DKIM valid by an independent verifier, the right headers only.
    assert re.fullmatch(rf"b\+[a-z2-7]+@{re.escape(RETURN_PATH_DOMAIN)}", received.sender)
    assert perl_verify(data, {txt_record_name("example.com", "s1"): record})[0] == "pass"
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert [k for k in parsed if k.lower().startswith("x-smartrelay-")] == ["X-SmartRelay-ID"]
    assert parsed["X-SmartRelay-ID"] == queue_id
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    unsubscribe_url = re.search(r"<(http[^>]+/u/[^>]+)>", str(parsed["List-Unsubscribe"]))
    assert unsubscribe_url is not None
    html = parsed.get_content()
    click_url = re.search(r'href="([^"]+/c/[^"]+)"', html)
    pixel_url = re.search(r'src="([^"]+/o/[^"]+\.gif)"', html)
    assert click_url is not None and pixel_url is not None

    # A real HTTP client following the link: 302 to the byte-exact original URL.
    response = await treq.get(click_url[1], allow_redirects=False)
    assert response.code == 302
    assert response.headers.getRawHeaders("Location") == [ORIGINAL_URL]
    tampered = click_url[1][:-2] + ("A" if click_url[1][-2] != "A" else "B") + click_url[1][-1]
    assert (await treq.get(tampered, allow_redirects=False)).code == 404
    pixel = await treq.get(pixel_url[1])
    assert pixel.code == 200 and (await pixel.content()).startswith(b"GIF89a")

    # One-click unsubscribe (RFC 8058), then the next message to them is suppressed.
    post = await treq.post(
        unsubscribe_url[1],
        data={"List-Unsubscribe": "One-Click"},
    )
    assert post.code == 200
    await post.content()
    recorded = {e.type for e in await events(relay.store, queue_id=queue_id)}
    assert {"received", "delivered", "clicked", "opened", "unsubscribed"} <= recorded

    second = await submit(relay.smtp_port, ["fan@example.net"], HTML)
    await wait_for_events(reactor, relay.store, "suppressed", 1)
    (suppressed,) = [e for e in await events(relay.store, queue_id=second) if e.type != "received"]
    assert suppressed.type == "suppressed" and suppressed.data == {"reason": "unsubscribe"}
    await deferLater(reactor, 0.3, lambda: None)
    assert len(backend.messages) == 1  # nothing more reached the sink
