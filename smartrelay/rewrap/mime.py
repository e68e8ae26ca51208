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

from attrs import frozen

__all__ = ["HtmlPart", "MimePlan", "plan_html_parts", "transform_html_parts"]

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


@frozen
class HtmlPart:
    """One ``text/html`` part that tracking may change: its decoded text and how to put a new
    text back the way the part was encoded."""

    head: bytes  # the part's header block
    blank: bytes  # the empty line after it (its line end is the part's)
    body: bytes  # as it was, encoded
    text: str  # decoded
    codec: str
    encoding: str  # Content-Transfer-Encoding, lower case
    top: bool  # the message itself (its header block is the message's header section)

    def render(self, new_text: str) -> tuple[bytes, bytes]:
        """(header block, body) carrying ``new_text``, encoded as the part was; the header
        block changes only when a 7bit/8bit part has to become quoted-printable. A text that
        cannot be encoded in the part's charset leaves the part as it was."""
        if new_text == self.text:
            return self.head, self.body
        try:
            new_data = new_text.encode(self.codec, _ERRORS)
        except (LookupError, ValueError, UnicodeError):
            return self.head, self.body
        newline = self.blank
        if self.encoding == "quoted-printable":
            return self.head, _encode_qp(new_data, newline)
        if self.encoding == "base64":
            trailing = self.body[len(self.body.rstrip(b"\r\n\t ")) :]
            return self.head, _encode_base64(new_data, newline) + (newline if trailing else b"")
        if _needs_qp(self.encoding, self.body, new_data):
            new_head = _set_transfer_encoding(self.head, b"quoted-printable", newline)
            return new_head, _encode_qp(new_data, newline)
        return self.head, new_data


@frozen
class MimePlan:
    """A message cut, once, into what tracking may change (:class:`HtmlPart`) and the bytes
    between (copied as they are): rendering a copy for each recipient walks no MIME."""

    head: bytes  # the message's header block; ``segments`` are everything after it
    segments: tuple[bytes | HtmlPart, ...]

    @property
    def html_parts(self) -> tuple[HtmlPart, ...]:
        return tuple(s for s in self.segments if isinstance(s, HtmlPart))

    def render_body(self, transform: Callable[[str], str]) -> tuple[bytes, bool]:
        """Everything after the message's header block with ``transform`` applied to each HTML
        part's text, and whether the message's own Content-Transfer-Encoding must become
        quoted-printable (only ever for a top-level 7bit/8bit ``text/html`` message)."""
        out: list[bytes] = []
        top_to_qp = False
        for segment in self.segments:
            if isinstance(segment, bytes):
                out.append(segment)
                continue
            head, body = segment.render(transform(segment.text))
            if segment.top:
                top_to_qp = head != segment.head
                out.append(segment.blank + body)
            else:
                out.append(head + segment.blank + body)
        return b"".join(out), top_to_qp

    def render(self, transform: Callable[[str], str]) -> bytes:
        body, top_to_qp = self.render_body(transform)
        head = self.head
        if top_to_qp:
            newline = b"\r\n" if head.endswith(b"\r\n") else b"\n"
            head = _set_transfer_encoding(head, b"quoted-printable", newline)
        return head + body


def transform_html_parts(raw: bytes, transform: Callable[[str], str]) -> bytes:
    """``raw`` with ``transform`` applied to the decoded text of every ``text/html`` part that is
    not an attachment, each part re-encoded as it was; everything else stays byte-identical."""
    return plan_html_parts(raw).render(transform)


def plan_html_parts(raw: bytes) -> MimePlan:
    """The message's :class:`MimePlan` (no HTML part: one segment, the body as it is)."""
    split = _split_entity(raw)
    head = b"" if split is None else split[0]
    segments: list[bytes | HtmlPart] = []
    _entity(raw, segments, 0)
    # The top-level entity's header block leads the first segment (or is the top HtmlPart's).
    first = segments[0]
    if isinstance(first, bytes):
        segments[0] = first[len(head) :]
    merged: list[bytes | HtmlPart] = []
    for segment in segments:
        if isinstance(segment, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += segment
        elif segment != b"":
            merged.append(segment)
    return MimePlan(head, tuple(merged))


def _entity(entity: bytes, out: list[bytes | HtmlPart], depth: int) -> None:
    split = _split_entity(entity)
    if split is None or depth > MAX_DEPTH:
        out.append(entity)
        return
    head, blank, body = split
    headers = _parse_headers(head)
    if headers is None:
        out.append(entity)
        return
    content_type = headers.get_content_type()
    if content_type.startswith("multipart/"):
        boundary = _boundary(headers)
        if content_type in _UNTOUCHABLE_MULTIPARTS or boundary is None:
            out.append(entity)
            return
        out.append(head + blank)
        _multipart_body(body, boundary, out, depth)
        return
    if content_type == "text/html" and headers.get_content_disposition() != "attachment":
        part = _html_part(head, headers, body, blank, depth == 0)
        if part is not None:
            out.append(part)
            return
    out.append(entity)


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


def _multipart_body(body: bytes, boundary: bytes, out: list[bytes | HtmlPart], depth: int) -> None:
    """The body with each part that two delimiter lines enclose processed on its own."""
    delimiter = re.compile(rb"^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$", re.M)
    copied = 0  # everything before this offset of ``body`` is in ``out``
    part_start: int | None = None  # where the current part's content begins
    for match in delimiter.finditer(body):
        if part_start is not None:
            # The line end before the delimiter belongs to the delimiter (RFC 2046 5.1.1).
            part_end = match.start()
            part_end -= 2 if body[part_end - 2 : part_end] == b"\r\n" else 1
            if part_end >= part_start:
                out.append(body[copied:part_start])
                _entity(body[part_start:part_end], out, depth + 1)
                copied = part_end
        if match.group(1) is not None:
            break  # the close delimiter; the epilogue follows
        line_end = match.end() + 1 if body[match.end() : match.end() + 1] == b"\n" else None
        part_start = line_end
        if line_end is None:
            break  # a delimiter at the very end: no part follows
    out.append(body[copied:])


def _html_part(
    head: bytes, headers: Message, body: bytes, blank: bytes, top: bool
) -> HtmlPart | None:
    """The part decoded, or None to leave it as it is. ``blank`` is the entity's empty line
    (its line end is the part's)."""
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
    return HtmlPart(head, blank, body, text, codec, encoding, top)


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
_QP_UNSAFE = re.compile(rb"[^!-<>-~ \t]")  # all but printable ASCII other than "=", SP, TAB


def _qp_escape(match: re.Match[bytes]) -> bytes:
    return b"=%02X" % match[0][0]


def _encode_qp(data: bytes, newline: bytes) -> bytes:
    """Hard line breaks are ``newline`` in ``data``; any other CR or LF is encoded. Soft line
    breaks go as late as they can without splitting an ``=XX`` escape."""
    width = QP_LINE - 1  # characters before a soft break's "="
    out: list[bytes] = []
    for line in data.split(newline):
        quoted = _QP_UNSAFE.sub(_qp_escape, line)
        if quoted[-1:] in (b" ", b"\t"):
            quoted = quoted[:-1] + b"=%02X" % quoted[-1]
        position = 0
        while len(quoted) - position > width:
            cut = position + width
            # Never inside an escape: "=" one or two characters before the cut moves it back.
            if quoted[cut - 1 : cut] == b"=":
                cut -= 1
            elif quoted[cut - 2 : cut - 1] == b"=":
                cut -= 2
            out.append(quoted[position:cut] + b"=")
            position = cut
        out.append(quoted[position:])
    return newline.join(out)


def _encode_base64(data: bytes, newline: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return newline.join(encoded[i : i + BASE64_LINE] for i in range(0, len(encoded), BASE64_LINE))
