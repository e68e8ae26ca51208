"""The webhook signature (SPEC section 5): what the sender writes and what a receiver checks."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from smartrelay.webhooks.signing import signature_header, verify_signature

SECRET = "s3cret-\u00e9"
BODY = '[{"id":1,"type":"delivered","recipient":"\u00fc@example.net"}]'.encode()
NOW = 1_765_000_000.75


def independent(secret: str, body: bytes, t: int) -> str:
    return hmac.new(secret.encode(), str(t).encode() + b"." + body, hashlib.sha256).hexdigest()


def test_header_is_spec_hmac_over_unix_dot_body() -> None:
    header = signature_header(SECRET, BODY, NOW)
    assert header == f"t=1765000000,v1={independent(SECRET, BODY, 1765000000)}"
    assert verify_signature(header, BODY, SECRET, NOW)


def test_tampering_is_refused() -> None:
    header = signature_header(SECRET, BODY, NOW)
    assert not verify_signature(header, BODY + b" ", SECRET, NOW)
    assert not verify_signature(header, BODY, SECRET + "x", NOW)
    # Another t with the same v1: the t is signed.
    v1 = header.partition(",v1=")[2]
    assert not verify_signature(f"t=1765000001,v1={v1}", BODY, SECRET, NOW)
    flipped = v1[:-1] + ("0" if v1[-1] != "0" else "1")
    assert not verify_signature(f"t=1765000000,v1={flipped}", BODY, SECRET, NOW)


def test_window_rejects_replays_and_future_stamps() -> None:
    header = signature_header(SECRET, BODY, NOW)
    assert verify_signature(header, BODY, SECRET, NOW + 299)
    assert not verify_signature(header, BODY, SECRET, NOW + 301)
    assert not verify_signature(header, BODY, SECRET, NOW - 301)
    assert verify_signature(header, BODY, SECRET, NOW + 30, tolerance=60)
    assert not verify_signature(header, BODY, SECRET, NOW + 61, tolerance=60)


def test_any_v1_may_match_during_a_rotation() -> None:
    t = 1765000000
    old, new = independent("old", BODY, t), independent("new", BODY, t)
    header = f"t={t},v1={old},v1={new}"
    assert verify_signature(header, BODY, "old", NOW)
    assert verify_signature(header, BODY, "new", NOW)
    assert not verify_signature(header, BODY, "other", NOW)
    # Unknown schemes are ignored.
    assert verify_signature(f"t={t},v0=abc,v1={new}", BODY, "new", NOW)


def test_malformed_headers_are_false() -> None:
    good = signature_header(SECRET, BODY, NOW)
    v1 = good.partition(",v1=")[2]
    for bad in ("", "t=1765000000", f"v1={v1}", f"t=x,v1={v1}", f"t=-1765000000,v1={v1}",
                f"t=1765000000,t=1765000000,v1={v1}", f"t=1765000000,v1={v1.upper()}",
                f"t=1765000000;v1={v1}", f"t=1765000000,v1={v1}0", "garbage",
                f"t=\u0661765000000,v1={v1}", "t=1," + "v1=" * 3000):  # fmt: skip
        assert not verify_signature(bad, BODY, SECRET, NOW), bad


@given(st.text(max_size=200), st.binary(max_size=50))
def test_any_header_is_a_bool(header: str, body: bytes) -> None:
    assert verify_signature(header, body, SECRET, NOW) in (True, False)
