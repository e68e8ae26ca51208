"""Apply a transformation to the HTML parts of a message, byte-exact everywhere else.

The MIME structure is walked on the raw bytes (header blocks, ``boundary`` delimiter lines,
nested multiparts), so what is not rewritten is copied from the input as it is: headers with
their folding, preambles, epilogues, delimiter lines, other parts and attachments. Of each
entity's header fields only Content-Type (type, ``boundary``, ``charset``),
Content-Disposition and Content-Transfer-Encoding are read: by a fast reader when the header
block is plain (the usual case), otherwise by the stdlib ``email`` package (``compat32``),
which is the reference the fast reader agrees with; nothing is ever written by ``email``.

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
from collections.abc import Callable, Iterator
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import NamedTuple

from attrs import frozen

__all__ = ["HtmlPart", "MimePlan", "PlainPart", "plan_html_parts", "transform_html_parts"]

# Deeper nesting than this is not mail anybody writes; past it everything is copied.
MAX_DEPTH = 32
QP_LINE = 76
BASE64_LINE = 76
SMTP_LINE = 998  # octets, without the line end (RFC 5322 2.1.1)

_UNTOUCHABLE_MULTIPARTS = frozenset({"multipart/signed", "multipart/encrypted"})
_ERRORS = "smartrelay-html-charset"
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")
# A header block the fast reader takes: every line a field ("name:", no space before the
# colon) or a continuation, CRLF or LF line ends, no control characters, no bare CR.
_PLAIN_HEAD = re.compile(rb"(?:[!-9;-~]+:[\t -~\x80-\xff]*\r?\n(?:[ \t][\t -~\x80-\xff]*\r?\n)*)*")
# The fields read, at line starts (the block lower-cased, after an LF), value without its LF.
_READ_FIELD = re.compile(
    rb"\ncontent-(type|disposition|transfer-encoding):([^\n]*(?:\n[ \t][^\n]*)*)"
)
# Content-Type as the fast reader takes it: nothing compat32 could read another way (RFC 2231
# names, escapes, comments, angle brackets), blanks folded or not.
_PLAIN_TYPE = re.compile(
    rb"""
    [ \t\r\n]*
    [!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+ / [!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+  # RFC 2045 tokens
    [ \t\r\n]*
    """,
    re.X,
)
_PLAIN_PARAMETER = re.compile(
    rb"""
    ; [ \t\r\n]*
    (?:  # or an empty parameter
        ([!#$%&'+\-.0-9A-Z^_`a-z{|}~]+)  # the name: a token without "*" (RFC 2231)
        [ \t\r\n]* = [ \t\r\n]*
        (
            [!#-'*-:=?-\[\]-~]+  # printable ASCII but for quotes, backslashes, ();<>
        |
            "[\t !#-'*-;=?-\[\]-~]*"  # quoted: no backslash, (), <> or line break
        )
        [ \t\r\n]*
    )?
    """,
    re.X,
)
#: The types whose encoding and charset are read: HTML (tracking) and plain text (checks).
_TEXT_TYPES = ("text/html", "text/plain")
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
class PlainPart:
    """A ``text/plain`` part (not an attachment), still encoded: the content checks
    (:mod:`smartrelay.rewrap.content_checks`) read it; nothing rewrites it."""

    body: bytes
    encoding: str  # Content-Transfer-Encoding, lower case
    charset: str

    def text(self) -> str:
        """The decoded text; undecodable bytes become U+FFFD (it is only read)."""
        try:
            if self.encoding == "quoted-printable":
                data = binascii.a2b_qp(self.body)
            elif self.encoding == "base64":
                data = binascii.a2b_base64(self.body)
            else:
                data = self.body
        except (ValueError, binascii.Error):
            data = self.body
        try:
            return data.decode(codecs.lookup(self.charset).name, "replace")
        except (LookupError, ValueError, UnicodeError):
            return data.decode("latin-1")


@frozen
class MimePlan:
    """A message cut, once, into what tracking may change (:class:`HtmlPart`) and the bytes
    between (copied as they are): rendering a copy for each recipient walks no MIME.

    What the walk saw on the way, for the content checks: the ``text/plain`` parts, and how
    many ``text/html`` parts (decodable or not, attachments aside) have no ``text/plain``
    alternative (a ``multipart/alternative`` above them with a ``text/plain`` part in it).
    Inside ``multipart/signed``/``encrypted`` and attached messages nothing is seen.
    """

    head: bytes  # the message's header block; ``segments`` are everything after it
    segments: tuple[bytes | HtmlPart, ...]
    plain_parts: tuple[PlainPart, ...] = ()
    html_without_text: int = 0

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
    return _plan(raw, _read_fields)


class _Fields(NamedTuple):
    """What the planner reads from an entity's header fields: ``boundary`` only for a
    multipart, the rest only for ``text/html`` and ``text/plain`` (for which ``encoding`` and
    ``charset`` only when it is not an attachment); unread values keep their defaults."""

    content_type: str
    boundary: bytes | None = None
    attachment: bool = False
    encoding: str = "7bit"
    charset: str = "us-ascii"


_FieldReader = Callable[[bytes], _Fields | None]


#: What :func:`_entity` tells of an entity: (it holds a text/plain part, its HTML parts
#: without a text/plain alternative).
_Seen = tuple[bool, int]


def _plan(raw: bytes, read_fields: _FieldReader) -> MimePlan:
    split = _split_entity(raw)
    head = b"" if split is None else split[0]
    segments: list[bytes | HtmlPart] = []
    plain: list[PlainPart] = []
    _, html_without_text = _entity(raw, split, segments, 0, read_fields, plain)
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
    return MimePlan(head, tuple(merged), tuple(plain), html_without_text)


def _entity(
    entity: bytes,
    split: tuple[bytes, bytes, bytes] | None,
    out: list[bytes | HtmlPart],
    depth: int,
    read_fields: _FieldReader,
    plain: list[PlainPart],
) -> _Seen:
    """``entity`` (cut by :func:`_split_entity` as ``split``) appended to ``out``, its
    ``text/plain`` parts to ``plain``."""
    if split is None or depth > MAX_DEPTH:
        out.append(entity)
        return False, 0
    head, blank, body = split
    fields = read_fields(head)
    if fields is None:
        out.append(entity)
        return False, 0
    content_type = fields.content_type
    if content_type.startswith("multipart/"):
        boundary = fields.boundary
        if content_type in _UNTOUCHABLE_MULTIPARTS or boundary is None:
            out.append(entity)
            return False, 0
        out.append(head + blank)
        seen = _multipart_body(body, boundary, out, depth, read_fields, plain)
        has_text = any(text for text, _ in seen)
        without_text = sum(n for _, n in seen)
        if content_type == "multipart/alternative" and has_text:
            without_text = 0
        return has_text, without_text
    if fields.attachment:
        out.append(entity)
        return False, 0
    if content_type == "text/html":
        part = _html_part(head, fields, body, blank, depth == 0)
        out.append(entity if part is None else part)
        return False, 1
    out.append(entity)
    if content_type == "text/plain":
        plain.append(PlainPart(body, fields.encoding, fields.charset))
        return True, 0
    return False, 0


def _split_entity(entity: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(header block with the last field's line end, the empty line, body); None without one."""
    if entity.startswith(b"\r\n"):
        return b"", b"\r\n", entity[2:]
    if entity.startswith(b"\n"):
        return b"", b"\n", entity[1:]
    crlf = entity.find(b"\n\r\n")
    # An LF-only empty line counts only before the first CRLF one.
    lf = entity.find(b"\n\n", 0, len(entity) if crlf < 0 else crlf + 1)
    if lf >= 0:
        return entity[: lf + 1], b"\n", entity[lf + 2 :]
    if crlf >= 0:
        return entity[: crlf + 1], b"\r\n", entity[crlf + 3 :]
    return None


def _read_fields(head: bytes) -> _Fields | None:
    """The fields of the header block ``head``, or None when it is not one."""
    fields = _read_plain_fields(head)
    return _read_fields_by_email(head) if fields is None else fields


def _read_fields_by_email(head: bytes) -> _Fields | None:
    """The reference reading, with ``email`` (``compat32``): reads what the planner needs and
    no more, in the order it needs it. None (leave the entity as it is) when a parameter
    cannot be read: a malformed RFC 2231 ``charset`` makes compat32 raise TypeError."""
    headers = _parse_headers(head)
    if headers is None:
        return None
    content_type = headers.get_content_type()
    if content_type.startswith("multipart/"):
        return _Fields(content_type, boundary=_boundary(headers))
    if content_type not in _TEXT_TYPES:
        return _Fields(content_type)
    if headers.get_content_disposition() == "attachment":
        return _Fields(content_type, attachment=True)
    encoding = str(headers.get("content-transfer-encoding", "7bit")).strip().lower()
    try:
        charset = headers.get_content_charset("us-ascii") or "us-ascii"
    except Exception:  # compat32 on odd RFC 2231 parameters
        return None
    return _Fields(content_type, encoding=encoding, charset=charset)


def _read_plain_fields(head: bytes) -> _Fields | None:
    """:func:`_read_fields_by_email`'s result for a plain header block without ``email``, or
    None for anything else: a block ``_PLAIN_HEAD`` does not take, a field read here that is
    repeated or not ASCII, and for multiparts and text types a Content-Type that
    ``_PLAIN_TYPE`` and ``_PLAIN_PARAMETER`` do not take or that holds ``=?``."""
    if _PLAIN_HEAD.fullmatch(head) is None:
        return None
    values: dict[bytes, bytes] = {}
    for field in _READ_FIELD.finditer(b"\n" + head.lower()):
        name = field[1]
        if name in values:
            return None
        # compat32's value: from after the colon through the continuation lines, without the
        # first line's leading blanks and the last line end (offsets in ``head`` are one less).
        value = head[field.start(2) - 1 : field.end(2) - 1].lstrip(b" \t").rstrip(b"\r\n")
        if not value.isascii():
            return None
        values[name] = value
    content_type_value = values.get(b"type")
    parameters: dict[bytes, bytes] | None = {}
    if content_type_value is None:
        content_type = "text/plain"
    else:
        # Message.get_content_type(), which reads no parameter.
        content_type = content_type_value.partition(b";")[0].strip().lower().decode("ascii")
        if content_type.count("/") != 1:
            return None  # text/plain, with parameters compat32 reads its own way
    multipart = content_type.startswith("multipart/")
    if not multipart and content_type not in _TEXT_TYPES:
        return _Fields(content_type)
    if content_type_value is not None:
        parameters = _plain_parameters(content_type_value)
    if parameters is None:
        return None
    if multipart:
        boundary = parameters.get(b"boundary", b"").rstrip()
        return _Fields(content_type, boundary=boundary if 0 < len(boundary) <= 200 else None)
    disposition = values.get(b"disposition", b"")
    if disposition.partition(b";")[0].strip().lower() == b"attachment":
        return _Fields(content_type, attachment=True)
    return _Fields(
        content_type,
        encoding=values.get(b"transfer-encoding", b"7bit").strip().lower().decode("ascii"),
        charset=parameters.get(b"charset", b"").lower().decode("ascii") or "us-ascii",
    )


def _plain_parameters(value: bytes) -> dict[bytes, bytes] | None:
    """Content-Type's parameters by lower-case name (the first of a name wins, as in
    ``Message.get_param``), unquoted; None unless the whole value is plain."""
    if b"=?" in value:
        return None
    match = _PLAIN_TYPE.match(value)
    if match is None:
        return None
    position = match.end()
    parameters: dict[bytes, bytes] = {}
    while position < len(value):
        match = _PLAIN_PARAMETER.match(value, position)
        if match is None:
            return None
        position = match.end()
        name, parameter = match.groups()
        if name is None:  # an empty parameter (";;" or a trailing ";")
            continue
        if parameter.startswith(b'"'):
            parameter = parameter[1:-1]
        parameters.setdefault(name.lower(), parameter)
    return parameters


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


def _delimiter_lines(body: bytes, boundary: bytes) -> Iterator[tuple[int, int, bool]]:
    """(start, end, closing) of each delimiter line of ``boundary`` in ``body``: ``--boundary``
    at a line start, ``--`` if it is the closing one, then only blanks and a CR; ``end`` is
    the offset of its LF (or of the body's end). No regex: each message has its own boundary,
    and compiling a pattern costs more than the whole walk."""
    marker = b"--" + boundary
    position = 0
    while (start := body.find(marker, position)) >= 0:
        end = body.find(b"\n", start + len(marker))
        if end < 0:
            end = len(body)
        rest = body[start + len(marker) : end]
        closing = rest.startswith(b"--")
        if closing:
            rest = rest[2:]
        if (start > 0 and body[start - 1] != 0x0A) or rest.removesuffix(b"\r").lstrip(b" \t"):
            position = start + 1
            continue
        yield start, end, closing
        position = end


def _multipart_body(
    body: bytes,
    boundary: bytes,
    out: list[bytes | HtmlPart],
    depth: int,
    read_fields: _FieldReader,
    plain: list[PlainPart],
) -> list[_Seen]:
    """The body with each part that two delimiter lines enclose processed on its own; what
    :func:`_entity` saw of each part."""
    seen: list[_Seen] = []
    copied = 0  # everything before this offset of ``body`` is in ``out``
    part_start: int | None = None  # where the current part's content begins
    for start, end, closing in _delimiter_lines(body, boundary):
        if part_start is not None:
            # The line end before the delimiter belongs to the delimiter (RFC 2046 5.1.1).
            part_end = start - (2 if body[start - 2 : start] == b"\r\n" else 1)
            if part_end >= part_start:
                out.append(body[copied:part_start])
                part = body[part_start:part_end]
                seen.append(_entity(part, _split_entity(part), out, depth + 1, read_fields, plain))
                copied = part_end
        if closing:
            break  # the epilogue follows
        if end == len(body):
            break  # a delimiter at the very end: no part follows
        part_start = end + 1
    out.append(body[copied:])
    return seen


def _html_part(
    head: bytes, fields: _Fields, body: bytes, blank: bytes, top: bool
) -> HtmlPart | None:
    """The part decoded, or None to leave it as it is. ``blank`` is the entity's empty line
    (its line end is the part's)."""
    encoding = fields.encoding
    try:
        codec = codecs.lookup(fields.charset).name
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
    breaks go as late as they can without splitting an ``=XX`` escape.

    The usual case (CRLF line ends, no lone CR or LF, no NUL) is encoded by
    ``binascii.b2a_qp`` in C, a few times faster than :func:`_encode_qp_lines`. Its output is
    the same but for two rules of its own, which :func:`_b2a_qp_agrees` looks for (then the
    Python encoder runs)."""
    if newline == b"\r\n" and b"\x00" not in data:
        lines = data.split(b"\r\n")
        lines_only = b"".join(lines)
        if b"\r" not in lines_only and b"\n" not in lines_only:
            # With a line end after the data, b2a_qp uses CRLF for its soft breaks too (it
            # takes the first line end's kind) and never reaches its end-of-data rules.
            encoded = binascii.b2a_qp(data + b"\r\n", istext=True)[:-2]
            if _b2a_qp_agrees(data, lines, encoded):
                return encoded
    return _encode_qp_lines(data, newline)


def _b2a_qp_agrees(data: bytes, lines: list[bytes], encoded: bytes) -> bool:
    """Whether ``b2a_qp``'s ``encoded`` (of ``data``, CRLF line ends cut into ``lines``, no
    NUL, with a CRLF appended) is what :func:`_encode_qp_lines` makes of ``data``. Both
    escape the same bytes and break lines at the same places (as late as possible, at most
    75 characters before a soft break's "="), except: b2a_qp escapes a line that is only
    ".", and it escapes a line's trailing blank after placing it, so that line can reach 77
    characters, where ours would have broken it first."""
    if b"." in lines:
        return False
    trailing = [b"=20\r\n"] if b" \r\n" in data or data.endswith(b" ") else []
    if b"\t" in data and (b"\t\r\n" in data or data.endswith(b"\t")):
        trailing.append(b"=09\r\n")
    if not trailing:
        return True
    encoded += b"\r\n"
    for blank in trailing:
        position = encoded.find(blank)
        while position >= 0:
            if position + 3 - (encoded.rfind(b"\n", 0, position) + 1) > QP_LINE - 1:
                return False
            position = encoded.find(blank, position + 3)
    return True


def _encode_qp_lines(data: bytes, newline: bytes) -> bytes:
    """:func:`_encode_qp` line by line in Python, for any line end and lone CR or LF."""
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
