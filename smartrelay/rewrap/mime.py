"""Apply a transformation to the HTML parts of a message, byte-exact everywhere else.

The MIME structure is walked on the raw bytes (header blocks, ``boundary`` delimiter lines,
nested multiparts), so what is not rewritten is copied from the input as it is: headers with
their folding, preambles, epilogues, delimiter lines, other parts and attachments. The stdlib
``email`` package only parses the header fields of each entity (Content-Type and its
parameters, Content-Disposition, Content-Transfer-Encoding); it never writes anything.

Left alone on purpose: attached messages (``message/*``), ``multipart/signed`` and
``multipart/encrypted`` (changing a byte would break the signature), HTML attachments, parts
with an unknown charset or transfer encoding, parts whose bytes would not survive decoding and
re-encoding in their charset, and whatever a malformed structure leaves uncertain (a multipart
without its closing delimiter keeps its last part as it is). Exceptions raised by ``transform``
propagate.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Callable
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

__all__ = ["transform_html_parts"]

# Deeper nesting than this is not mail anybody writes; past it everything is copied.
MAX_DEPTH = 32
QP_LINE = 76
BASE64_LINE = 76
SMTP_LINE = 998  # octets, without the line end (RFC 5322 2.1.1)

_UNTOUCHABLE_MULTIPARTS = frozenset({"multipart/signed", "multipart/encrypted"})
_ERRORS = "smartrelay-html-charset"
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")
_CTE_FIELD = re.compile(rb"(?P<name>content-transfer-encoding[ \t]*:)(?P<value>.*)", re.I | re.S)


def _html_charset_errors(error: UnicodeError) -> tuple[str | bytes, int]:
    """Encoding error handler: bytes smuggled in by ``surrogateescape`` go back as they came,
    characters the charset lacks become HTML numeric character references."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    out = bytearray()
    for char in error.object[error.start : error.end]:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(code - 0xDC00)
        else:
            out += f"&#{code};".encode("ascii")
    return bytes(out), error.end


codecs.register_error(_ERRORS, _html_charset_errors)


def transform_html_parts(raw: bytes, transform: Callable[[str], str]) -> bytes:
    """``raw`` with ``transform`` applied to the decoded text of every ``text/html`` part that is
    not an attachment, each part re-encoded as it was; everything else stays byte-identical."""
    return _entity(raw, transform, 0)


def _entity(entity: bytes, transform: Callable[[str], str], depth: int) -> bytes:
    split = _split_entity(entity)
    if split is None or depth > MAX_DEPTH:
        return entity
    head, blank, body = split
    headers = _parse_headers(head)
    if headers is None:
        return entity
    content_type = headers.get_content_type()
    if content_type.startswith("multipart/"):
        boundary = _boundary(headers)
        if content_type in _UNTOUCHABLE_MULTIPARTS or boundary is None:
            return entity
        return head + blank + _multipart_body(body, boundary, transform, depth)
    if content_type == "text/html" and headers.get_content_disposition() != "attachment":
        changed = _html_part(head, headers, body, transform, blank)
        if changed is not None:
            new_head, new_body = changed
            return new_head + blank + new_body
    return entity


def _split_entity(entity: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(header block with the last field's line end, the empty line, body); None without one."""
    position = 0
    while position < len(entity):
        end = entity.find(b"\n", position)
        if end < 0:
            return None
        line = entity[position : end + 1]
        if line in (b"\r\n", b"\n"):
            return entity[:position], line, entity[end + 1 :]
        position = end + 1
    return None


def _parse_headers(head: bytes) -> Message | None:
    """The header fields, or None when a line is not a field nor a continuation of one."""
    first = True
    for line in head.splitlines():
        if line[:1] in (b" ", b"\t") and not first:
            continue
        if not _HEADER_LINE.match(line):
            return None
        first = False
    try:
        return BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n")
    except Exception:  # unparseable header fields: leave the entity as it is
        return None


def _boundary(headers: Message) -> bytes | None:
    try:
        boundary = headers.get_boundary()
    except Exception:
        return None
    if not boundary:
        return None
    try:
        encoded = boundary.encode("ascii")
    except UnicodeEncodeError:
        return None
    return encoded if 0 < len(encoded) <= 200 else None


def _multipart_body(
    body: bytes, boundary: bytes, transform: Callable[[str], str], depth: int
) -> bytes:
    """The body with each part that two delimiter lines enclose processed on its own."""
    delimiter = re.compile(rb"^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$", re.M)
    out: list[bytes] = []
    copied = 0  # everything before this offset of ``body`` is in ``out``
    part_start: int | None = None  # where the current part's content begins
    for match in delimiter.finditer(body):
        if part_start is not None:
            # The line end before the delimiter belongs to the delimiter (RFC 2046 5.1.1).
            part_end = match.start()
            part_end -= 2 if body[part_end - 2 : part_end] == b"\r\n" else 1
            if part_end >= part_start:
                out.append(body[copied:part_start])
                out.append(_entity(body[part_start:part_end], transform, depth + 1))
                copied = part_end
        if match.group(1) is not None:
            break  # the close delimiter; the epilogue follows
        line_end = match.end() + 1 if body[match.end() : match.end() + 1] == b"\n" else None
        part_start = line_end
        if line_end is None:
            break  # a delimiter at the very end: no part follows
    out.append(body[copied:])
    return b"".join(out)


def _html_part(
    head: bytes,
    headers: Message,
    body: bytes,
    transform: Callable[[str], str],
    newline: bytes,
) -> tuple[bytes, bytes] | None:
    """The part's new header block and body, or None to leave it as it is. ``newline`` is the
    entity's line end (that of its empty line)."""
    encoding = str(headers.get("content-transfer-encoding", "7bit")).strip().lower()
    charset = headers.get_content_charset("us-ascii") or "us-ascii"
    try:
        codec = codecs.lookup(charset).name
    except (LookupError, ValueError):
        return None
    try:
        if encoding in ("7bit", "8bit", "binary"):
            data = body
        elif encoding == "quoted-printable":
            data = binascii.a2b_qp(body)
        elif encoding == "base64":
            data = binascii.a2b_base64(body)
        else:
            return None
        text = data.decode(codec, "surrogateescape")
        # Bytes that do not come back as they were (a charset with two codes for one
        # character, such as cp932) would change outside the edits: leave such a part alone.
        if text.encode(codec, _ERRORS) != data:
            return None
    except (LookupError, ValueError, UnicodeError):  # LookupError: not a text codec
        return None
    new_text = transform(text)
    if new_text == text:
        return None
    try:
        new_data = new_text.encode(codec, _ERRORS)
    except (LookupError, ValueError, UnicodeError):
        return None
    if encoding == "quoted-printable":
        return head, _encode_qp(new_data, newline)
    if encoding == "base64":
        trailing = body[len(body.rstrip(b"\r\n\t ")) :]
        return head, _encode_base64(new_data, newline) + (newline if trailing else b"")
    if _needs_qp(encoding, body, new_data):
        new_head = _set_transfer_encoding(head, b"quoted-printable", newline)
        return new_head, _encode_qp(new_data, newline)
    return head, new_data


def _needs_qp(encoding: str, old: bytes, new: bytes) -> bool:
    """Whether a 7bit/8bit body no longer fits its encoding after the change."""
    if encoding == "binary":
        return False
    if encoding == "7bit" and not new.isascii():
        return True
    return _longest_line(new) > SMTP_LINE >= _longest_line(old)


def _longest_line(data: bytes) -> int:
    return max((len(line) for line in data.splitlines()), default=0)


def _set_transfer_encoding(head: bytes, value: bytes, newline: bytes) -> bytes:
    """The header block with Content-Transfer-Encoding's value replaced, or the field added."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    for index, field in enumerate(fields):
        match = _CTE_FIELD.match(field)
        if match is None:
            continue
        old_value = match.group("value")
        content = old_value.rstrip(b"\r\n")
        leading = content[: len(content) - len(content.lstrip(b" \t\r\n"))]
        ending = old_value[len(content) :] or newline
        fields[index] = match.group("name") + leading + value + ending
        return b"".join(fields)
    return head + b"Content-Transfer-Encoding: " + value + newline


# Quoted-printable (RFC 2045 6.7): every byte encoded as it must be, lines of at most 76.
_QP_TOKENS = [
    chr(byte) if (33 <= byte <= 126 and byte != 61) or byte in (9, 32) else f"={byte:02X}"
    for byte in range(256)
]


def _encode_qp(data: bytes, newline: bytes) -> bytes:
    """Hard line breaks are ``newline`` in ``data``; any other CR or LF is encoded."""
    lines: list[str] = []
    for line in data.split(newline):
        tokens = [_QP_TOKENS[byte] for byte in line]
        if tokens and tokens[-1] in (" ", "\t"):
            tokens[-1] = f"={ord(tokens[-1]):02X}"
        current: list[str] = []
        length = 0
        for token in tokens:
            if length + len(token) > QP_LINE - 1:
                lines.append("".join(current) + "=")
                current, length = [], 0
            current.append(token)
            length += len(token)
        lines.append("".join(current))
    return newline.join(line.encode("ascii") for line in lines)


def _encode_base64(data: bytes, newline: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return newline.join(encoded[i : i + BASE64_LINE] for i in range(0, len(encoded), BASE64_LINE))
