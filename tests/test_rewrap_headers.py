"""Header finalisation done on every delivery (the rest of the chain has its own issue)."""

from __future__ import annotations

from smartrelay.rewrap.headers import finalize_headers


def test_control_headers_removed_id_and_message_id_added_after_trace_headers() -> None:
    raw = (
        b"Received: from a\r\n\tby b; date\r\n"
        b"From: app@example.com\r\n"
        b"X-SmartRelay-Tag: welcome\r\n"
        b"x-smartrelay-meta-user: 42\r\n\tcontinued\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"X-SmartRelay-Tag: in the body stays\r\n"
    )
    out = finalize_headers(raw, "Q123", "relay.test")
    assert out == (
        b"Received: from a\r\n\tby b; date\r\n"
        b"X-SmartRelay-ID: Q123\r\n"
        b"Message-ID: <Q123@relay.test>\r\n"
        b"From: app@example.com\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"X-SmartRelay-Tag: in the body stays\r\n"
    )


def test_existing_message_id_is_kept_and_body_is_byte_identical() -> None:
    body = b"\r\n--b\r\nContent-Type: text/plain\r\n\r\n\xff\xfe binary-ish\r\n"
    raw = b"Message-ID: <mine@example.com>\r\nSubject: x\r\n" + body
    out = finalize_headers(raw, "Q1", "relay.test")
    assert out == b"X-SmartRelay-ID: Q1\r\nMessage-ID: <mine@example.com>\r\nSubject: x\r\n" + body
