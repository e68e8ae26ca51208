"""Header fields of a message as the re-wrap chain cuts them: lines end at CRLF only,
everything outside the header section stays byte-exact."""

from __future__ import annotations

import re

CONTROL_PREFIX = b"x-smartrelay-"


def header_block_end(raw: bytes) -> int:
    """Where the header section of ``raw`` ends: after the CRLF of its last field (the empty
    line and the body follow), 0 when ``raw`` begins with the empty line (no header field),
    or ``len(raw)`` when there is no empty line."""
    if raw.startswith(b"\r\n"):
        return 0
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
