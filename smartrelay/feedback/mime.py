"""Hostile-input-safe reading of a report's MIME structure, shared by the feedback parsers.

Reports are parsed with the stdlib ``email`` package under ``policy.compat32``: its headers
stay plain strings (no header-registry parsing that can raise on a forged value) and its
``get_payload(decode=True)`` never raises. Everything here reads header fields through
:func:`header` (raw value, RFC 2047 decoded when that works, unfolded, 8-bit bytes as UTF-8)
and walks parts through :func:`walk` (bounded depth and count), so no parser depends on the
parts of the ``email`` API that trust their input.
"""

from __future__ import annotations

import email
import email.header
import email.parser
import email.policy
import re
from collections.abc import Iterator
from email.message import Message
from email.utils import getaddresses
from typing import Final

from attrs import frozen

from smartrelay.feedback.model import ReturnedMessage

__all__ = [
    "MAX_DEPTH",
    "MAX_PARTS",
    "RETURNED_MESSAGE_TYPES",
    "Part",
    "address_of",
    "content_type",
    "content_type_param",
    "count_parts",
    "header",
    "headers_of",
    "parse_message",
    "part_text",
    "returned_message",
    "unfold",
    "walk",
]

#: Parts nested deeper than this are not looked at (a report is a few levels deep: a forwarded
#: bounce is multipart/mixed > message/rfc822 > multipart/report > message/rfc822 > ...).
MAX_DEPTH: Final = 12
#: At most this many parts are looked at in one report.
MAX_PARTS: Final = 400
#: At most this many characters of a part's text are read (a DSN's status part or a bounce's
#: human-readable text is a few kilobytes; the rest is the returned message).
MAX_TEXT: Final = 256 * 1024

#: Header values are cut to this many characters (a Subject or a To field of a report is a
#: few hundred at most; the tables' regexes must not run over megabytes).
MAX_HEADER: Final = 4096

#: Content types that carry the returned message, or only its header (RFC 3462, RFC 6533), as
#: well as spellings seen in the wild.
RETURNED_MESSAGE_TYPES: Final[frozenset[str]] = frozenset(
    {
        "message/rfc822",
        "message/global",
        "text/rfc822-headers",
        "message/rfc822-headers",
        "message/global-headers",
        "text/rfc822",
    }
)
_HEADERS_ONLY_TYPES: Final = frozenset(
    {"text/rfc822-headers", "message/rfc822-headers", "message/global-headers"}
)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+$")
_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


def parse_message(raw: bytes) -> Message:
    """The report as a compat32 :class:`~email.message.Message` (the parser itself does not
    raise on bad input; its recursion is bounded by the caller's nesting check)."""
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def _text_of(value: object) -> str:
    """A header value as text: 8-bit bytes (kept as surrogates by the parser) read as UTF-8."""
    if isinstance(value, email.header.Header):
        try:
            return str(value)
        except Exception:  # a Header built from broken bytes
            return ""
    text = str(value)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:  # lone surrogates not from the parser
        return text.encode("utf-8", "replace").decode("utf-8", "replace")


def unfold(text: str) -> str:
    """Whitespace (folding included) collapsed to single spaces, stripped."""
    return " ".join(text.split())


def _decode_words(text: str) -> str:
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except Exception:  # malformed encoded words: keep the raw text
        return text


def header(part: Message, name: str, *, decode: bool = True) -> str:
    """The first ``name`` field of ``part``, unfolded, at most :data:`MAX_HEADER` characters
    (``""`` when absent).

    ``decode``: RFC 2047 encoded words decoded (for display fields such as Subject; not for
    structured ones such as Content-Type).
    """
    wanted = name.lower()
    for key, value in part.raw_items():  # raw (name, value) pairs, never parsed
        if key.lower() == wanted:
            text = unfold(_text_of(value)[: MAX_HEADER * 2])
            return (_decode_words(text) if decode else text)[:MAX_HEADER]
    return ""


def headers_of(part: Message) -> list[tuple[str, str]]:
    """All header fields of ``part`` as (lower-cased name, unfolded value), in order."""
    return [
        (key.lower(), unfold(_text_of(value)[: MAX_HEADER * 2])[:MAX_HEADER])
        for key, value in part.raw_items()
    ]


def content_type(part: Message, default: str = "text/plain") -> str:
    """The lower-cased ``type/subtype`` of ``part`` (``default`` when absent or malformed)."""
    value = header(part, "content-type", decode=False)
    kind = value.split(";", 1)[0].strip().lower()
    return kind if _TOKEN.match(kind) else default


def content_type_param(part: Message, name: str) -> str:
    """A Content-Type parameter (lower-cased name match), unquoted; ``""`` when absent."""
    value = header(part, "content-type", decode=False)
    wanted = name.lower()
    for key, raw in _PARAM.findall(value):
        if key.lower() == wanted:
            if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
                return re.sub(r"\\(.)", r"\1", raw[1:-1])
            return str(raw)
    return ""


@frozen
class Part:
    """One part met by :func:`walk`."""

    part: Message
    #: Its lower-cased content type.
    type: str
    #: The closest enclosing multipart (None for the top).
    parent: Message | None
    depth: int


def count_parts(top: Message, limit: int) -> int:
    """The number of parts of ``top`` (all levels), counting stops past ``limit``."""
    count = 0
    stack = [top]
    while stack and count <= limit:
        part = stack.pop()
        count += 1
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend(c for c in payload if isinstance(c, Message))
    return count


def walk(top: Message) -> Iterator[Part]:
    """The parts of ``top``, depth first, in order, entering ``message/*`` parts; at most
    :data:`MAX_PARTS` parts and :data:`MAX_DEPTH` levels."""
    count = 0
    stack: list[tuple[Message, Message | None, int]] = [(top, None, 0)]
    while stack and count < MAX_PARTS:
        part, parent, depth = stack.pop()
        count += 1
        kind = content_type(part, _default_type(parent))
        yield Part(part, kind, parent, depth)
        if depth >= MAX_DEPTH:
            continue
        payload = part.get_payload()
        if isinstance(payload, list):
            children = [c for c in payload if isinstance(c, Message)]
            child_parent = part if kind.startswith("multipart/") else parent
            stack.extend((c, child_parent, depth + 1) for c in reversed(children))


def _default_type(parent: Message | None) -> str:
    if parent is not None and content_type(parent) == "multipart/digest":
        return "message/rfc822"
    return "text/plain"


def part_text(part: Message, limit: int = MAX_TEXT) -> str:
    """The text of a leaf part, transfer-decoded, read as its charset (else UTF-8, else
    Latin-1), at most ``limit`` characters; for an already parsed ``message/*`` part (the
    parser splits ``message/delivery-status`` into blocks), its fields and bodies again."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return _blocks_text([b for b in payload if isinstance(b, Message)], limit)
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    return decode_bytes(data[: limit * 4], content_type_param(part, "charset"))[:limit]


def _blocks_text(blocks: list[Message], limit: int) -> str:
    out: list[str] = []
    size = 0
    for block in blocks:
        lines = [f"{key}: {value}" for key, value in headers_of(block)]
        # The raw body: get_payload() would turn 8-bit bytes into U+FFFD (read as ASCII).
        body = getattr(block, "_payload", None)
        if isinstance(body, str) and body.strip():
            lines.append(_text_of(body))
        text = "\n".join(lines)
        out.append(text)
        size += len(text)
        if size > limit:
            break
    return "\n\n".join(out)[:limit]


def decode_bytes(data: bytes, charset: str = "") -> str:
    """``data`` as text: in ``charset`` if it is known and fits, else UTF-8, else Latin-1."""
    if charset:
        try:
            return data.decode(charset.strip().lower())
        except (LookupError, UnicodeError, ValueError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


_ADDRESS = re.compile(r"[^\s<>\"(),;:]+@[^\s<>\"(),;:]+")
_XTEXT = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def address_of(value: str) -> str:
    """An address out of a DSN address field or a header: the address type (``rfc822;``,
    ``utf-8;``) dropped, RFC 6533 ``\\x{..}`` escapes decoded, ``<>`` and quotes removed.

    Returns the ``local@domain`` found, else the stripped text (``""`` when none).
    """
    text = value.strip()
    if ";" in text:
        kind, rest = text.split(";", 1)
        if re.fullmatch(r"\s*[A-Za-z][\w.+-]*\s*", kind):
            text = rest.strip()
    text = _XTEXT.sub(_xtext_char, text)
    found = _ADDRESS.search(text)
    if found is not None:
        return found.group(0).strip(".")
    return text.strip("<> \t\"'")


def _xtext_char(m: re.Match[str]) -> str:
    code = int(m.group(1), 16)
    return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"


def returned_message(part: Message, kind: str) -> ReturnedMessage:
    """What identifies our message in a returned-message part (:data:`RETURNED_MESSAGE_TYPES`):
    an already parsed ``message/rfc822``, or a text holding a message or its header."""
    payload = part.get_payload()
    inner: Message
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        inner = payload[0]
    else:
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            data = b""
        inner = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
            data[:MAX_TEXT].lstrip(b"\r\n"), headersonly=True
        )
    return returned_from_headers(inner)


def returned_from_headers(inner: Message) -> ReturnedMessage:
    """A :class:`ReturnedMessage` out of a message's header fields."""

    def field(name: str) -> str | None:
        value = header(inner, name, decode=False)
        return value or None

    message_id = field("message-id")
    if message_id is not None:
        message_id = message_id.strip().strip("<>").strip() or None
    return_path = field("return-path")
    if return_path is not None:
        return_path = address_of(return_path) or None
    to: list[str] = []
    for key, value in headers_of(inner):
        if key == "to":
            try:
                pairs = getaddresses([value])
            except Exception:  # getaddresses on hostile text
                pairs = []
            to.extend(addr for _name, addr in pairs if "@" in addr)
    return ReturnedMessage(
        smartrelay_id=field("x-smartrelay-id"),
        message_id=message_id,
        return_path=return_path,
        to=tuple(to[:50]),
        list_unsubscribe=field("list-unsubscribe"),
    )


def is_headers_only(kind: str) -> bool:
    return kind in _HEADERS_ONLY_TYPES
