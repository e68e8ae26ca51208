"""Header work done on every outgoing message, byte-exact on everything else.

The rest of the re-wrap chain (suppression, VERP, List-Unsubscribe, tracking, DKIM) comes
with its own issue; these steps are what SPEC section 3 requires of every delivery.
"""

from __future__ import annotations

import re

CONTROL_PREFIX = b"x-smartrelay-"


def header_block_end(raw: bytes) -> int:
    """Where the header section of ``raw`` ends: after the CRLF of its last field (the empty
    line and the body follow), or ``len(raw)`` when there is no empty line."""
    end = raw.find(b"\r\n\r\n")
    return len(raw) if end < 0 else end + 2


_LONE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def split_header_block(raw: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its continuation lines and line end) and the rest.

    Lines end at CRLF only. A lone CR or LF inside a line (a bare CR from an EHLO argument
    written into ``Received:``, say) becomes a space: downstream software may take it for a
    line end, and it must never start a header line of its own in a delivered copy.
    """
    end = header_block_end(raw)
    head, rest = raw[:end], raw[end:]
    without_crlf = head.replace(b"\r\n", b"")
    if b"\r" in without_crlf or b"\n" in without_crlf:
        head = _LONE_CR_OR_LF.sub(b" ", head)
    lines = [line + b"\r\n" for line in head.split(b"\r\n")]
    lines[-1] = lines[-1][:-2]  # what follows the last CRLF: nothing, or a line without one
    fields: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif line:
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
