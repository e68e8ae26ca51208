"""The ``X-SmartRelay-Signature`` header (SPEC section 5, docs/webhooks.md "Signature").

``t=UNIX,v1=HEX``: ``HEX`` is HMAC-SHA256 with the endpoint's secret over ``"UNIX."`` followed
by the exact bytes of the body. :func:`verify_signature` is what a receiver does: the header
parsed strictly, each ``v1`` compared in constant time (several during a secret rotation: any
one may match), and a ``t`` outside the tolerance refused (a replayed request).
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["MAX_HEADER", "signature_header", "signature_hex", "verify_signature"]

#: A longer header is refused unread (a handful of ``v1`` entries fit many times over).
MAX_HEADER = 4096
_HEX = frozenset("0123456789abcdef")


def signature_hex(secret: str, body: bytes, timestamp: int) -> str:
    """HMAC-SHA256(secret, ``"{timestamp}."`` + body), lower-case hex."""
    message = f"{timestamp}.".encode("ascii") + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, now: float) -> str:
    """The header's value for ``body`` sent at ``now`` (seconds; truncated to an integer)."""
    timestamp = int(now)
    return f"t={timestamp},v1={signature_hex(secret, body, timestamp)}"


def verify_signature(
    header: str, body: bytes, secret: str, now: float, tolerance: float = 300.0
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and its ``t`` is within
    ``tolerance`` seconds of ``now``. Anything malformed is False, never an exception."""
    if not isinstance(header, str) or len(header) > MAX_HEADER:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            if timestamp is not None or not value.isascii() or not value.isdigit():
                return False
            if len(value) > 12:
                return False
            timestamp = int(value)
        elif key == "v1" and len(value) == 64 and set(value) <= _HEX:
            candidates.append(value)
        # Other schemes (a later version's) are ignored, as receivers should.
    if timestamp is None or not candidates:
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature_hex(secret, body, timestamp)
    matched = False
    for candidate in candidates:  # every one compared: the time does not tell which matched
        matched |= hmac.compare_digest(candidate, expected)
    return matched
