"""Header work done on every outgoing message, byte-exact on everything else.

The rest of the re-wrap chain (suppression, VERP, List-Unsubscribe, tracking, DKIM) comes
with its own issue; these steps are what SPEC section 3 requires of every delivery.
"""

from __future__ import annotations

CONTROL_PREFIX = b"x-smartrelay-"


def split_header_block(raw: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its continuation lines and line end) and the rest."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        head, rest = raw, b""
    else:
        head, rest = raw[: end + 2], raw[end + 2 :]
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields, rest


def field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def finalize_headers(raw: bytes, queue_id: str, hostname: str) -> bytes:
    """Drop the ``X-SmartRelay-*`` control headers; add ``X-SmartRelay-ID`` and, when the
    message has none, a ``Message-ID``."""
    fields, rest = split_header_block(raw)
    kept = [f for f in fields if not field_name(f).startswith(CONTROL_PREFIX)]
    added = [f"X-SmartRelay-ID: {queue_id}\r\n".encode()]
    if not any(field_name(f) == b"message-id" for f in kept):
        added.append(f"Message-ID: <{queue_id}@{hostname}>\r\n".encode())
    # After the trace headers (Received: ...), which must stay on top (RFC 5321 4.4).
    position = 0
    while position < len(kept) and field_name(kept[position]) in (b"received", b"return-path"):
        position += 1
    return b"".join(kept[:position] + added + kept[position:]) + rest
