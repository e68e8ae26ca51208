"""X-SmartRelay-* control headers (SPEC section 3): smartrelay.smtp.control."""

from __future__ import annotations

import email.parser
import email.policy

import pytest

from smartrelay.smtp.control import (
    ControlHeaderError,
    ControlHeaders,
    header_block,
    parse_control_headers,
)


def parse(*lines: str | bytes, eol: bytes = b"\r\n") -> ControlHeaders:
    """Parse a message made of header ``lines``, an empty line and a body."""
    raw = b"".join((line.encode() if isinstance(line, str) else line) + eol for line in lines)
    return parse_control_headers(header_block(raw + eol + b"body" + eol))


def rejected(*lines: str | bytes) -> str:
    with pytest.raises(ControlHeaderError) as info:
        parse(*lines)
    return str(info.value)


# --------------------------------------------------------------------------------------
# header_block


@pytest.mark.parametrize(
    ("raw", "block"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore", b"A: 1\r\nB: 2\r\n\r\n"),
        (b"A: 1\nB: 2\n\nbody\n\nmore", b"A: 1\nB: 2\n\n"),
        (b"A: 1\r\n\nbody", b"A: 1\r\n\n"),
        (b"A: 1\n\r\nbody", b"A: 1\n\r\n"),
        (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n"),  # no empty line: the whole message
        (b"A: 1", b"A: 1"),
        (b"", b""),
        (b"\r\nbody\r\n\r\n", b"\r\n"),  # no headers at all
        (b"\nbody\n\n", b"\n"),
    ],
)
def test_header_block(raw: bytes, block: bytes) -> None:
    assert header_block(raw) == block


def test_header_block_does_not_look_at_a_large_body() -> None:
    raw = b"X-SmartRelay-Tag: a\r\n\r\n" + b"X-SmartRelay-Bogus: 1\r\n" * 100_000
    assert header_block(raw) == b"X-SmartRelay-Tag: a\r\n\r\n"
    assert parse_control_headers(header_block(raw)).tags == ("a",)
    # Even given the whole message, parsing stops at the empty line.
    assert parse_control_headers(raw).tags == ("a",)


# --------------------------------------------------------------------------------------
# The result type


def test_no_control_headers() -> None:
    headers = parse("From: a@example.com", "To: b@example.net", "Subject: hi")
    assert headers == ControlHeaders()
    assert headers.tags == () and dict(headers.metadata) == {}
    assert headers.track_opens is None and headers.track_clicks is None
    assert headers.unsubscribe is None and headers.idempotency_key is None
    assert headers.options() == {}


def test_everything() -> None:
    headers = parse(
        "From: a@example.com",
        "X-SmartRelay-Track-Opens: no",
        "x-smartrelay-track-clicks: YES",
        "X-SMARTRELAY-UNSUBSCRIBE:\tTrue ",
        "X-SmartRelay-Tag: welcome",
        "X-SmartRelay-Tag: onboarding",
        "X-SmartRelay-Meta-User-Id: 42",
        "X-SmartRelay-Meta-plan: pro",
        "X-SmartRelay-Idempotency-Key: order-1234",
        "X-SmartRelay-ID: 0123456789abcdef",
        "Subject: hi",
    )
    assert headers.track_opens is False
    assert headers.track_clicks is True
    assert headers.unsubscribe is True
    assert headers.options() == {"track_opens": False, "track_clicks": True, "unsubscribe": True}
    assert headers.tags == ("welcome", "onboarding")
    assert dict(headers.metadata) == {"User-Id": "42", "plan": "pro"}
    assert list(headers.metadata) == ["User-Id", "plan"]
    assert headers.idempotency_key == "order-1234"


def test_options_only_lists_given_ones() -> None:
    assert parse("X-SmartRelay-Track-Clicks: no").options() == {"track_clicks": False}
    assert parse("X-SmartRelay-Unsubscribe: yes").options() == {"unsubscribe": True}


def test_metadata_is_read_only_and_a_copy() -> None:
    source = {"a": "1"}
    headers = ControlHeaders(metadata=source)
    source["b"] = "2"
    assert dict(headers.metadata) == {"a": "1"}
    with pytest.raises(TypeError):
        headers.metadata["c"] = "3"  # type: ignore[index]


def test_control_headers_are_comparable_and_hashable() -> None:
    one = ControlHeaders(tags=("t",), metadata={"k": "v"}, track_opens=True)
    two = ControlHeaders(tags=("t",), metadata={"k": "v"}, track_opens=True)
    other = ControlHeaders(tags=("t",), metadata={"k": "w"}, track_opens=True)
    assert one == two and hash(one) == hash(two)
    assert one != other
    assert len({one, two, other}) == 2


# --------------------------------------------------------------------------------------
# Booleans


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("yes", True),
        ("YES", True),
        ("Yes", True),
        ("true", True),
        ("TRUE", True),
        ("no", False),
        ("No", False),
        ("false", False),
        ("False", False),
        ("  yes  ", True),
        ("\tno\t", False),
    ],
)
@pytest.mark.parametrize(
    ("header", "attribute"),
    [
        ("X-SmartRelay-Track-Opens", "track_opens"),
        ("X-SmartRelay-Track-Clicks", "track_clicks"),
        ("X-SmartRelay-Unsubscribe", "unsubscribe"),
    ],
)
def test_boolean_values(header: str, attribute: str, value: str, expected: bool) -> None:
    assert getattr(parse(f"{header}:{value}"), attribute) is expected


@pytest.mark.parametrize("value", ["", "1", "0", "y", "n", "on", "off", "yes please", "nope", "ja"])
@pytest.mark.parametrize(
    "header", ["X-SmartRelay-Track-Opens", "X-SmartRelay-Track-Clicks", "X-SmartRelay-Unsubscribe"]
)
def test_bad_boolean_values(header: str, value: str) -> None:
    assert rejected(f"{header.lower()}: {value}") == f"{header} must be yes or no"


def test_boolean_given_twice() -> None:
    assert parse("X-SmartRelay-Track-Opens: yes", "X-SmartRelay-Track-Opens: true").track_opens
    assert (
        rejected("X-SmartRelay-Track-Opens: yes", "x-smartrelay-track-opens: no")
        == "X-SmartRelay-Track-Opens given twice with different values"
    )


# --------------------------------------------------------------------------------------
# Tags


def test_tags_are_stripped_and_collapsed_in_first_seen_order() -> None:
    headers = parse(
        "X-SmartRelay-Tag:  b ",
        "X-SmartRelay-Tag: a",
        "X-SmartRelay-Tag: b",
        "x-smartrelay-tag: c",
        "X-SmartRelay-Tag: a",
        "X-SmartRelay-Tag: A",
    )
    assert headers.tags == ("b", "a", "c", "A")


def test_ten_tags_allowed_eleventh_rejected() -> None:
    ten = [f"X-SmartRelay-Tag: t{i}" for i in range(10)]
    assert parse(*ten).tags == tuple(f"t{i}" for i in range(10))
    # Duplicates do not count twice.
    assert len(parse(*ten, "X-SmartRelay-Tag: t0", "X-SmartRelay-Tag: t9").tags) == 10
    assert (
        rejected(*ten, "X-SmartRelay-Tag: t10") == "too many X-SmartRelay-Tag headers (at most 10)"
    )


def test_tag_length() -> None:
    assert parse("X-SmartRelay-Tag: " + "x" * 100).tags == ("x" * 100,)
    assert parse("X-SmartRelay-Tag: " + "é" * 100).tags == ("é" * 100,)  # characters, not bytes
    assert rejected("X-SmartRelay-Tag: " + "x" * 101) == (
        "X-SmartRelay-Tag too long (at most 100 characters)"
    )


@pytest.mark.parametrize("value", ["", " ", "\t", "  \t  "])
def test_empty_tag(value: str) -> None:
    assert rejected(f"X-SmartRelay-Tag:{value}") == "X-SmartRelay-Tag must not be empty"


# --------------------------------------------------------------------------------------
# Metadata


def test_metadata_keys_keep_their_case() -> None:
    headers = parse("x-smartrelay-meta-CustomerID: c-1", "X-SMARTRELAY-META-order_no: 7")
    assert dict(headers.metadata) == {"CustomerID": "c-1", "order_no": "7"}


def test_metadata_value_may_be_empty() -> None:
    assert dict(parse("X-SmartRelay-Meta-k:").metadata) == {"k": ""}


@pytest.mark.parametrize(
    "key",
    [
        "",
        "a.b",
        "a+b",
        "a/b",
        "k" * 65,
        "a!b",
        "a=b",
        "a;b",
        "-" * 65,
    ],
)
def test_bad_metadata_keys(key: str) -> None:
    assert rejected(f"X-SmartRelay-Meta-{key}: v").startswith(
        "invalid X-SmartRelay-Meta-<Key> header name"
    )


@pytest.mark.parametrize("key", ["a", "A", "0", "_", "-", "a-b_C9", "-" * 64])
def test_good_metadata_keys(key: str) -> None:
    assert dict(parse(f"X-SmartRelay-Meta-{key}: v").metadata) == {key: "v"}


def test_non_ascii_header_name_ends_the_header_block() -> None:
    # As with the stdlib parser, the line is taken as the first body line.
    assert parse("X-SmartRelay-Meta-café: v", "X-SmartRelay-Tag: a").tags == ()


def test_metadata_key_of_64_characters() -> None:
    assert dict(parse("X-SmartRelay-Meta-" + "k" * 64 + ": v").metadata) == {"k" * 64: "v"}


@pytest.mark.parametrize("second", ["X-SmartRelay-Meta-user: 2", "x-smartrelay-meta-USER: 2"])
def test_metadata_key_twice(second: str) -> None:
    assert rejected("X-SmartRelay-Meta-User: 1", second).endswith(" given twice")


def test_metadata_total_size() -> None:
    # Key "k1" (2 bytes) + 4094 bytes of value: exactly 4096.
    assert parse("X-SmartRelay-Meta-k1: " + "v" * 4094).metadata["k1"] == "v" * 4094
    assert rejected("X-SmartRelay-Meta-k1: " + "v" * 4095) == (
        "X-SmartRelay-Meta-* headers too large (at most 4096 bytes in all)"
    )
    # Across several headers, counting UTF-8 bytes: "é" is two.
    ok = [f"X-SmartRelay-Meta-k{i}: " + "é" * 510 for i in range(4)]  # 4 * (2 + 1020) = 4088
    assert len(parse(*ok).metadata) == 4
    assert "too large" in rejected(*ok, "X-SmartRelay-Meta-k4: 1234567")  # 4088 + 9 = 4097
    assert len(parse(*ok, "X-SmartRelay-Meta-k4: 123456").metadata) == 5  # 4096


# --------------------------------------------------------------------------------------
# Idempotency key


def test_idempotency_key() -> None:
    assert parse("X-SmartRelay-Idempotency-Key:  abc-123 ").idempotency_key == "abc-123"
    assert parse("X-SmartRelay-Idempotency-Key: " + "k" * 200).idempotency_key == "k" * 200


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (["X-SmartRelay-Idempotency-Key:"], "must not be empty"),
        (["X-SmartRelay-Idempotency-Key:   "], "must not be empty"),
        (["X-SmartRelay-Idempotency-Key: " + "k" * 201], "too long (at most 200 characters)"),
        (["X-SmartRelay-Idempotency-Key: a", "X-SmartRelay-Idempotency-Key: a"], "given twice"),
        (["X-SmartRelay-Idempotency-Key: a", "x-smartrelay-idempotency-key: b"], "given twice"),
    ],
)
def test_bad_idempotency_key(lines: list[str], reason: str) -> None:
    assert rejected(*lines) == f"X-SmartRelay-Idempotency-Key {reason}"


# --------------------------------------------------------------------------------------
# Unknown and ignored headers


@pytest.mark.parametrize(
    "name",
    [
        "X-SmartRelay-Foo",
        "x-smartrelay-track-open",
        "X-SmartRelay-Tags",
        "X-SmartRelay-",
        "X-SmartRelay-Meta",
    ],
)
def test_unknown_control_header(name: str) -> None:
    assert rejected(f"{name}: 1") == f"unknown control header {name}"


def test_unknown_control_header_name_is_shortened() -> None:
    name = "X-SmartRelay-" + "x" * 200
    reason = rejected(f"{name}: 1")
    assert reason.endswith("...") and len(reason) < 120


def test_smartrelay_id_is_ignored() -> None:
    assert parse("X-SmartRelay-ID: abc", "x-smartrelay-id: def") == ControlHeaders()


@pytest.mark.parametrize(
    "line",
    [
        "X-SmartRelayTag: a",
        "X-Smart-Relay-Tag: a",
        "SmartRelay-Tag: a",
        "X-Mailer: SmartRelay-Tag",
        "Subject: X-SmartRelay-Tag: a",
    ],
)
def test_other_headers_are_ignored(line: str) -> None:
    assert parse(line) == ControlHeaders()


def test_control_headers_in_the_body_are_ignored() -> None:
    raw = b"Subject: hi\r\n\r\nX-SmartRelay-Tag: a\r\nX-SmartRelay-Bogus: 1\r\n"
    assert parse_control_headers(header_block(raw)) == ControlHeaders()


# --------------------------------------------------------------------------------------
# Header syntax: folding, line endings, odd lines


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_line_endings(eol: bytes) -> None:
    headers = parse("X-SmartRelay-Tag: a", "X-SmartRelay-Track-Opens: no", eol=eol)
    assert headers.tags == ("a",) and headers.track_opens is False


def test_folded_values_are_unfolded() -> None:
    headers = parse(
        "X-SmartRelay-Tag: spring",
        " sale",
        "X-SmartRelay-Meta-note: one",
        "\ttwo",
        "   three",
        "X-SmartRelay-Track-Opens:",
        "  yes",
    )
    assert headers.tags == ("spring sale",)
    assert headers.metadata["note"] == "one\ttwo   three"
    assert headers.track_opens is True


def test_folded_unknown_header_name_still_rejected() -> None:
    assert rejected("X-SmartRelay-Nope:", " 1") == "unknown control header X-SmartRelay-Nope"


def test_continuation_of_another_header_is_not_a_control_header() -> None:
    assert parse("Subject: hi", " X-SmartRelay-Bogus: 1") == ControlHeaders()


def test_header_without_space_after_colon() -> None:
    assert parse("X-SmartRelay-Tag:a").tags == ("a",)


def test_line_that_is_not_a_header_ends_the_block() -> None:
    # As the stdlib parser does (MissingHeaderBodySeparatorDefect): the rest is body.
    headers = parse("X-SmartRelay-Tag: a", "this is not a header", "X-SmartRelay-Bogus: 1")
    assert headers.tags == ("a",)
    # A name with a space before the colon is not a header name either.
    assert parse("X-SmartRelay-Tag : a", "X-SmartRelay-Bogus: 1") == ControlHeaders()


def test_leading_continuation_and_envelope_lines_are_skipped() -> None:
    assert parse(" stray", "X-SmartRelay-Tag: a").tags == ("a",)
    assert parse("From someone@example.com Mon Jan 1", "X-SmartRelay-Tag: a").tags == ("a",)
    assert parse(": no name", "X-SmartRelay-Tag: a").tags == ("a",)


def test_agrees_with_the_stdlib_parser_on_which_fields_are_headers() -> None:
    raw = (
        b"From: a@example.com\r\n"
        b"X-SmartRelay-Tag: one\r\n"
        b" two\r\n"
        b"X-SmartRelay-Meta-K:\tv\r\n"
        b"Subject: x\r\n"
        b"not a header line\r\n"
        b"X-SmartRelay-Tag: three\r\n"
        b"\r\n"
        b"body\r\n"
    )
    message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
    stdlib = [
        (k, " ".join(str(v).split())) for k, v in message.items() if k.startswith("X-SmartRelay")
    ]
    assert stdlib == [("X-SmartRelay-Tag", "one two"), ("X-SmartRelay-Meta-K", "v")]
    headers = parse_control_headers(header_block(raw))
    assert headers.tags == ("one two",) and dict(headers.metadata) == {"K": "v"}


def test_bare_cr_is_a_line_break_like_in_the_stdlib_parser() -> None:
    raw = b"Subject: hi\rX-SmartRelay-Tag: a\r\n\r\n"
    assert parse_control_headers(raw).tags == ("a",)


# --------------------------------------------------------------------------------------
# Value encoding: UTF-8, RFC 2047, control characters


def test_raw_utf8_value() -> None:
    headers = parse("X-SmartRelay-Tag: café ☕", "X-SmartRelay-Meta-name: Jürgen")
    assert headers.tags == ("café ☕",)
    assert headers.metadata["name"] == "Jürgen"


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("=?utf-8?q?caf=C3=A9?=", "café"),
        ("=?UTF-8?Q?caf=C3=A9_au_lait?=", "café au lait"),
        ("=?utf-8?b?Y2Fmw6k=?=", "café"),
        ("=?iso-8859-1?q?caf=E9?=", "café"),
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # space between encoded words goes
        ("=?utf-8?q?a?=\t  =?utf-8?q?b?=", "ab"),
        ("x =?utf-8?q?caf=C3=A9?= y", "x café y"),
        ("héllo =?utf-8?q?caf=C3=A9?=", "héllo café"),  # raw UTF-8 next to an encoded word
        ("=?utf-8*en?q?hi?=", "hi"),  # RFC 2231 language
        ("a=?utf-8?q?b?=c", "a=?utf-8?q?b?=c"),  # not delimited by white space: literal text
        ("=?utf-8?q?=20padded=20?=", "padded"),  # the decoded value is stripped too
    ],
)
def test_rfc2047_encoded_words(value: str, decoded: str) -> None:
    assert parse(f"X-SmartRelay-Tag: {value}").tags == (decoded,)


def test_folded_encoded_words() -> None:
    headers = parse("X-SmartRelay-Meta-city: =?utf-8?q?M=C3=BC?=", " =?utf-8?q?nchen?=")
    assert headers.metadata["city"] == "München"


def test_encoded_tag_length_counts_decoded_characters() -> None:
    encoded = " ".join(["=?utf-8?b?w6k=?="] * 100)  # 100 times "é", 1700 characters encoded
    assert parse(f"X-SmartRelay-Tag: {encoded}").tags == ("é" * 100,)
    assert "too long" in rejected(f"X-SmartRelay-Tag: {encoded} =?utf-8?b?w6k=?=")


@pytest.mark.parametrize(
    "value",
    [
        "=?no-such-charset?q?x?=",
        "=?rot13?q?x?=",  # not a text encoding
        "=?utf-8?b?!!!!?=",  # not base64
        "=?utf-8?b?Y2Fmw6k?=",  # bad base64 padding
        "=?utf-8?q?=FF?=",  # not UTF-8
        "=?us-ascii?q?caf=E9?=",
    ],
)
def test_bad_encoded_words(value: str) -> None:
    assert rejected(f"X-SmartRelay-Tag: {value}") == (
        "X-SmartRelay-Tag has an invalid RFC 2047 encoded word"
    )


@pytest.mark.parametrize(
    "raw",
    [b"caf\xe9", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80"],  # Latin-1, junk, truncated, surrogate
)
def test_value_not_utf8(raw: bytes) -> None:
    with pytest.raises(ControlHeaderError, match=r"^X-SmartRelay-Tag is not valid UTF-8$"):
        parse(b"X-SmartRelay-Tag: " + raw)


def test_bad_bytes_in_other_headers_are_ignored() -> None:
    assert parse(b"Subject: caf\xe9", b"X-Other: \x00\x01").tags == ()


@pytest.mark.parametrize(
    "value",
    [
        b"a\x00b",
        b"a\x01b",
        b"a\x08b",
        b"a\x0bb",
        b"a\x0cb",
        b"a\x1bb",
        b"a\x1fb",
        b"a\x7fb",
        "a\u0085b".encode(),  # NEL
        "a\u009bb".encode(),  # C1 CSI
        "a\u2028b".encode(),  # line separator
        b"=?utf-8?q?a=0Ab?=",  # LF from an encoded word
        b"=?utf-8?q?a=0D=0ABcc:_x@example.com?=",
        b"=?utf-8?b?YQ1i?=",  # CR, base64
        b"=?utf-8?q?a=00?=",
    ],
)
def test_control_characters_rejected(value: bytes) -> None:
    with pytest.raises(
        ControlHeaderError, match=r"^X-SmartRelay-Tag contains a control character$"
    ):
        parse(b"X-SmartRelay-Tag: " + value)


def test_control_characters_in_metadata_and_key() -> None:
    assert "control character" in rejected(b"X-SmartRelay-Meta-x: a\x1bb")
    assert "control character" in rejected(b"X-SmartRelay-Idempotency-Key: a\x00")
    assert "control character" in rejected(b"X-SmartRelay-Track-Opens: yes\x00")


def test_lone_surrogate_from_an_encoded_word_rejected() -> None:
    value = "=?unicode_escape?q?=5Cud800?="  # "\ud800"
    assert rejected(f"X-SmartRelay-Meta-k: {value}") == (
        "X-SmartRelay-Meta-k contains an invalid character"
    )


def test_tab_inside_a_value_is_allowed() -> None:
    assert parse(b"X-SmartRelay-Tag: a\tb").tags == ("a\tb",)


# --------------------------------------------------------------------------------------
# Error messages are usable as SMTP reply text


@pytest.mark.parametrize(
    "lines",
    [
        ["X-SmartRelay-Track-Opens: maybe"],
        ["X-SmartRelay-Tag: " + "x" * 101],
        ["X-SmartRelay-Meta-a.b: 1"],
        ["X-SmartRelay-Foo: 1"],
        [b"X-SmartRelay-Tag: \xff"],
        [b"X-SmartRelay-Tag: a\x00\r\nBcc: x"],
        ["X-SmartRelay-Tag: =?bogus?q?x?="],
    ],
)
def test_error_messages_are_short_printable_ascii(lines: list[str | bytes]) -> None:
    reason = rejected(*lines)
    assert reason.isascii() and reason.isprintable() and 0 < len(reason) < 200
