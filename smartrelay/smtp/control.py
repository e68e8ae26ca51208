"""The ``X-SmartRelay-*`` control headers of SPEC section 3, parsed when a message is accepted.

The SMTP listener calls :func:`parse_control_headers` on :func:`header_block` of the message
before it answers DATA; a :class:`ControlHeaderError` becomes a permanent rejection whose
reply text is ``str(error)``. Only the header block is looked at, never the body.

How the header block is split follows the stdlib ``email`` feed parser (which the re-wrap chain
uses), so both agree on which lines are header fields:

- lines end in CRLF, LF or a bare CR; the block ends at the first empty line;
- a header field is ``name:value`` where the name is printable ASCII without ``:`` and without
  white space; a line starting with a space or tab continues (folds) the previous field;
- a ``From `` (mbox envelope) line is skipped; any other line ends the header block (the feed
  parser treats it as the first body line), so nothing after it is a control header.

Values are unfolded (the line breaks of a folded field removed), stripped of surrounding white
space, checked to be UTF-8 (raw UTF-8 is allowed, as sent by SMTPUTF8 clients), RFC 2047
encoded words are decoded, and the result must contain no control character other than tab
(C0, DEL, C1) and no U+2028/U+2029 line or paragraph separator: this guards against header
injection when values are echoed into other headers, events or logs.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType

from attrs import field, frozen

__all__ = [
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "MAX_METADATA_BYTES",
    "MAX_TAGS",
    "MAX_TAG_LENGTH",
    "PREFIX",
    "ControlHeaderError",
    "ControlHeaders",
    "header_block",
    "parse_control_headers",
]

#: At most this many distinct ``X-SmartRelay-Tag`` values.
MAX_TAGS = 10
#: Characters in one tag.
MAX_TAG_LENGTH = 100
#: UTF-8 bytes of all metadata keys and values together.
MAX_METADATA_BYTES = 4096
#: Characters in ``X-SmartRelay-Idempotency-Key``.
MAX_IDEMPOTENCY_KEY_LENGTH = 200

PREFIX = "X-SmartRelay-"
_PREFIX_LOWER = PREFIX.lower()

# Canonical header names, used in error messages whatever case the client wrote.
_TRACK_OPENS = "X-SmartRelay-Track-Opens"
_TRACK_CLICKS = "X-SmartRelay-Track-Clicks"
_UNSUBSCRIBE = "X-SmartRelay-Unsubscribe"
_TAG = "X-SmartRelay-Tag"
_META = "X-SmartRelay-Meta-"
_IDEMPOTENCY_KEY = "X-SmartRelay-Idempotency-Key"

#: Lower-cased suffix after the prefix -> (option name, canonical header name).
_BOOLEAN_HEADERS: dict[str, tuple[str, str]] = {
    "track-opens": ("track_opens", _TRACK_OPENS),
    "track-clicks": ("track_clicks", _TRACK_CLICKS),
    "unsubscribe": ("unsubscribe", _UNSUBSCRIBE),
}
_BOOLEAN_VALUES: dict[str, bool] = {"yes": True, "true": True, "no": False, "false": False}

_META_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")

# The block ends at the first empty line: CRLF CRLF or LF LF (mixed forms included), or an
# empty first line.
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# As the stdlib feed parser's headerRE: printable ASCII except ":" (and no space), then ":".
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]*):")
# RFC 2047 encoded word; the charset may carry an RFC 2231 "*language" suffix.
_ENCODED_WORD = re.compile(
    r"=\?(?P<charset>[!-)+->@-~]+)(?:\*[!->@-~]*)?\?(?P<encoding>[QqBb])\?(?P<text>[!->@-~]*)\?=",
    re.ASCII,
)
# Control characters other than tab (C0, DEL, C1), and the Unicode line and paragraph
# separators, which some software treats as line breaks.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# Lone surrogates (an encoded word in a codec such as unicode_escape can produce them).
_SURROGATE = re.compile("[\ud800-\udfff]")


class ControlHeaderError(ValueError):
    """A control header is malformed or not allowed.

    ``str()`` is a short, printable-ASCII, one-line reason suitable as SMTP reply text, such as
    ``"X-SmartRelay-Track-Opens must be yes or no"``. It never contains the offending value.
    """


def _metadata_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    # A read-only copy: nobody can change a ControlHeaders' metadata afterwards.
    return MappingProxyType(dict(value))


def _empty_metadata() -> Mapping[str, str]:
    return MappingProxyType({})


@frozen
class ControlHeaders:
    """What the control headers of one message asked for.

    ``metadata`` is a read-only mapping (:class:`types.MappingProxyType` over a private dict
    copy) in the order the headers appeared; use ``dict(headers.metadata)`` where a plain dict
    is needed. A mapping is not hashable, so ``metadata`` takes part in equality but not in
    ``hash()``: instances stay hashable, and equal instances have equal hashes.
    """

    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(
        factory=_empty_metadata, converter=_metadata_mapping, hash=False
    )
    #: None: not given, the config default applies.
    track_opens: bool | None = None
    track_clicks: bool | None = None
    unsubscribe: bool | None = None
    idempotency_key: str | None = None

    def options(self) -> dict[str, bool]:
        """The per-message options that were given: keys track_opens, track_clicks, unsubscribe."""
        given = {
            "track_opens": self.track_opens,
            "track_clicks": self.track_clicks,
            "unsubscribe": self.unsubscribe,
        }
        return {name: value for name, value in given.items() if value is not None}


def header_block(raw: bytes) -> bytes:
    """The header block of ``raw``: up to and including the first empty line.

    The empty line is CRLF CRLF or LF LF (or a mix); a message starting with an empty line has
    the header block ``b"\\r\\n"`` (or ``b"\\n"``). Without an empty line, the whole message.
    """
    if raw.startswith(b"\r\n"):
        return raw[:2]
    if raw.startswith(b"\n"):
        return raw[:1]
    match = _END_OF_HEADERS.search(raw)
    return raw if match is None else raw[: match.end()]


def parse_control_headers(header_block: bytes) -> ControlHeaders:
    """Parse and check the ``X-SmartRelay-*`` fields of a message's header block.

    ``header_block`` is what :func:`header_block` returns (a whole message works too: parsing
    stops at the first empty line). Other fields are ignored; ``X-SmartRelay-ID`` (added by
    another SmartRelay) is allowed and ignored. Raises :class:`ControlHeaderError`.
    """
    booleans: dict[str, bool] = {}
    tags: dict[str, None] = {}  # an ordered set
    metadata: dict[str, str] = {}
    meta_keys: set[str] = set()
    meta_bytes = 0
    idempotency_key: str | None = None

    for name, raw_value in _fields(header_block):
        if not name.lower().startswith(_PREFIX_LOWER):
            continue
        suffix = name[len(PREFIX) :].lower()
        if suffix == "id":
            continue
        if suffix in _BOOLEAN_HEADERS:
            option, canonical = _BOOLEAN_HEADERS[suffix]
            flag = _BOOLEAN_VALUES.get(_value(canonical, raw_value).lower())
            if flag is None:
                raise ControlHeaderError(f"{canonical} must be yes or no")
            if booleans.setdefault(option, flag) != flag:
                raise ControlHeaderError(f"{canonical} given twice with different values")
        elif suffix == "tag":
            tag = _value(_TAG, raw_value)
            if not tag:
                raise ControlHeaderError(f"{_TAG} must not be empty")
            if len(tag) > MAX_TAG_LENGTH:
                raise ControlHeaderError(f"{_TAG} too long (at most {MAX_TAG_LENGTH} characters)")
            tags[tag] = None
            if len(tags) > MAX_TAGS:
                raise ControlHeaderError(f"too many {_TAG} headers (at most {MAX_TAGS})")
        elif suffix.startswith("meta-"):
            key = name[len(_META) :]
            if _META_KEY.fullmatch(key) is None:
                raise ControlHeaderError(
                    f"invalid {_META}<Key> header name: the key must be 1 to 64 letters,"
                    " digits, '-' or '_'"
                )
            if key.lower() in meta_keys:
                raise ControlHeaderError(f"{_META}{key} given twice")
            meta_keys.add(key.lower())
            value = _value(f"{_META}{key}", raw_value)
            meta_bytes += len(key) + len(value.encode("utf-8"))
            if meta_bytes > MAX_METADATA_BYTES:
                raise ControlHeaderError(
                    f"{_META}* headers too large (at most {MAX_METADATA_BYTES} bytes in all)"
                )
            metadata[key] = value
        elif suffix == "idempotency-key":
            if idempotency_key is not None:
                raise ControlHeaderError(f"{_IDEMPOTENCY_KEY} given twice")
            idempotency_key = _value(_IDEMPOTENCY_KEY, raw_value)
            if not idempotency_key:
                raise ControlHeaderError(f"{_IDEMPOTENCY_KEY} must not be empty")
            if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
                raise ControlHeaderError(
                    f"{_IDEMPOTENCY_KEY} too long (at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters)"
                )
        else:
            shown = name if len(name) <= 80 else name[:80] + "..."
            raise ControlHeaderError(f"unknown control header {shown}")

    return ControlHeaders(
        tags=tuple(tags),
        metadata=metadata,
        track_opens=booleans.get("track_opens"),
        track_clicks=booleans.get("track_clicks"),
        unsubscribe=booleans.get("unsubscribe"),
        idempotency_key=idempotency_key,
    )


def _fields(block: bytes) -> Iterator[tuple[str, bytes]]:
    """The header fields of ``block`` as (name, unfolded raw value without the leading blanks).

    The name is printable ASCII by construction; the value is raw bytes.
    """
    name: str | None = None
    value: list[bytes] = []
    for line in _LINE_BREAK.split(block):
        if not line:
            break  # the empty line ends the header block
        if line[0] in b" \t":
            if name is not None:
                value.append(line)  # unfolding: only the line break goes
            continue  # a continuation before the first field is ignored, as by the stdlib
        if line.startswith(b"From "):
            continue  # an mbox envelope line, skipped as by the stdlib
        match = _FIELD.match(line)
        if match is None:
            break  # not a header field: the stdlib parser takes it as the first body line
        if name is not None:
            yield name, b"".join(value)
            name = None
        field_name = match.group(1).decode("ascii")
        if field_name:  # ":value" (no name) is ignored, as by the stdlib
            name = field_name
            value = [line[match.end() :]]
    if name is not None:
        yield name, b"".join(value)


def _value(header: str, raw: bytes) -> str:
    """The checked, decoded value of the control header ``header``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlHeaderError(f"{header} is not valid UTF-8") from None
    text = _decode_encoded_words(header, text.strip(" \t"))
    if _CONTROL.search(text):
        raise ControlHeaderError(f"{header} contains a control character")
    if _SURROGATE.search(text):
        raise ControlHeaderError(f"{header} contains an invalid character")
    return text.strip(" \t")


def _decode_encoded_words(header: str, text: str) -> str:
    """Decode the RFC 2047 encoded words of ``text``; other text is kept as written.

    An encoded word counts only when white space or the ends of the value delimit it (RFC 2047
    section 5); white space between two adjacent encoded words is dropped (section 6.2).
    """
    if "=?" not in text:
        return text
    out: list[str] = []
    space = ""  # the white space run before the current token
    after_word = False
    for token in re.split(r"([ \t]+)", text):
        if not token:
            continue
        if token[0] in " \t":
            space = token
            continue
        match = _ENCODED_WORD.fullmatch(token)
        if match is None or not after_word:
            out.append(space)  # kept unless it separates two encoded words
        out.append(token if match is None else _decode_word(header, match))
        space = ""
        after_word = match is not None
    out.append(space)
    return "".join(out)


def _decode_word(header: str, match: re.Match[str]) -> str:
    charset = match.group("charset")
    encoded = match.group("text").encode("ascii")
    try:
        if match.group("encoding") in "Bb":
            data = base64.b64decode(encoded, validate=True)
        else:
            data = binascii.a2b_qp(encoded, header=True)
        return data.decode(charset)
    except (binascii.Error, ValueError, LookupError):
        # binascii.Error: bad base64; LookupError: unknown charset or not a text encoding;
        # UnicodeDecodeError (a ValueError): bytes not valid in the charset.
        raise ControlHeaderError(f"{header} has an invalid RFC 2047 encoded word") from None
