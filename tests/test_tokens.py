"""Signed tokens for VERP and the tracking URLs, and the secret file holding their keys."""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import os
import random
import re
import stat
import string
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartrelay.tokens import (
    _DEFLATE_FROM,
    _DOMAIN,
    KEY_BYTES,
    MAX_ADDRESS_BYTES,
    MAX_URL_BYTES,
    Keyring,
    SecretFileError,
    TokenCodec,
    TokenError,
    _b64encode,
    _Mac,
    add_key,
    click_payload,
    load_keyring,
    unsubscribe_address_fits,
)

KEY_1 = bytes(range(32))
KEY_2 = bytes(range(100, 132))
IDS = [0, 1, 127, 128, 123456, 2**31, 2**53, 2**63, 2**64 - 1]
URLS = [
    "https://example.com/",
    "https://example.com/a?x=1&y=2&amp;z",
    "https://example.com/a%20b?q=%E4%c3%A4+c",
    "https://example.com/page#frag",
    "https://exämple.com/ü?q=ä&x=1#top",
    "http://例え.テスト/パス?キー=値#断片",
    "https://example.com/emoji/\U0001f600?\u200b=\x00\r\n\t ",
    "",
    "x" * MAX_URL_BYTES,
    "https://example.com/track?" + "&".join(f"utm_param{i}=value{i}" for i in range(300)),
]

BASE64URL = string.ascii_letters + string.digits + "-_"
BASE32_LOWER = "abcdefghijklmnopqrstuvwxyz234567"
FOREIGN = "=+/.~% \n\x00üK\u212a"  # U+212A KELVIN SIGN lowercases to "k"

#: The address the unsubscribe tokens of the generic tests carry.
ADDRESS = "john.doe@example.net"
URL_KINDS = ["open", "click", "unsubscribe"]
ADDRESS_KINDS = ["verp", "mailto"]


@pytest.fixture
def codec() -> TokenCodec:
    return TokenCodec(Keyring(keys={1: KEY_1}, current=1))


def make(codec: TokenCodec, kind: str, recipient_id: int) -> str:
    if kind == "open":
        return codec.open_token(recipient_id)
    if kind == "click":
        return codec.click_token(recipient_id, "https://example.com/x?a=1&b=2#c")
    if kind == "unsubscribe":
        return codec.unsubscribe_token(recipient_id, ADDRESS)
    if kind == "mailto":
        return codec.unsubscribe_mailto_token(recipient_id)
    assert kind == "verp"
    return codec.verp_token(recipient_id)


def parser(codec: TokenCodec, kind: str) -> Callable[[str], object]:
    parsers: dict[str, Callable[[str], object]] = {
        "open": codec.parse_open,
        "click": codec.parse_click,
        "unsubscribe": codec.parse_unsubscribe,
        "mailto": codec.parse_unsubscribe_mailto,
        "verp": codec.parse_verp,
    }
    return parsers[kind]


def all_parsers(codec: TokenCodec) -> list[Callable[[str], object]]:
    return [parser(codec, kind) for kind in URL_KINDS + ADDRESS_KINDS]


def raw_bytes(token: str) -> bytes:
    if re.fullmatch("[a-z2-7]+", token):
        return base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def single_edits(token: str, alphabet: str) -> Iterator[str]:
    """Every token differing from ``token`` by one replaced, removed or added character."""
    characters = alphabet + alphabet.upper() + FOREIGN
    for i in range(len(token)):
        yield token[:i] + token[i + 1 :]
        for c in characters:
            if c != token[i]:
                yield token[:i] + c + token[i + 1 :]
    for i in range(len(token) + 1):
        for c in characters:
            yield token[:i] + c + token[i:]


# --------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("recipient_id", IDS)
def test_round_trip_every_kind(codec: TokenCodec, recipient_id: int) -> None:
    assert codec.parse_open(codec.open_token(recipient_id)) == recipient_id
    unsubscribe = codec.unsubscribe_token(recipient_id, ADDRESS)
    assert codec.parse_unsubscribe(unsubscribe) == (recipient_id, ADDRESS)
    assert codec.parse_unsubscribe(codec.unsubscribe_token(recipient_id)) == (recipient_id, None)
    assert codec.parse_verp(codec.verp_token(recipient_id)) == recipient_id
    mailto = codec.unsubscribe_mailto_token(recipient_id)
    assert codec.parse_unsubscribe_mailto(mailto) == recipient_id
    url = "https://exämple.com/ü?q=ä&x=1#top"
    assert codec.parse_click(codec.click_token(recipient_id, url)) == (recipient_id, url)


@pytest.mark.parametrize("url", URLS, ids=range(len(URLS)))
def test_click_round_trip_is_byte_exact(codec: TokenCodec, url: str) -> None:
    token = codec.click_token(123456, url)
    assert re.fullmatch("[A-Za-z0-9_-]+", token)
    recipient_id, parsed = codec.parse_click(token)
    assert recipient_id == 123456
    assert parsed.encode("utf-8") == url.encode("utf-8")


def test_long_repetitive_urls_are_compressed(codec: TokenCodec) -> None:
    url = URLS[-1]
    assert len(url) > 6000
    assert len(codec.click_token(1, url)) < len(url) // 3
    assert len(codec.click_token(1, "x" * MAX_URL_BYTES)) < 100


@pytest.mark.parametrize("length", [20, 100, 511, 512, 513, 1024, 1025, 3000, MAX_URL_BYTES])
def test_url_payloads_of_every_window_size_round_trip_and_stay_short(
    codec: TokenCodec, length: int
) -> None:
    """The payload's DEFLATE window and hash are sized to the URL (much cheaper to set up than
    zlib's defaults): any size still inflates, and the result is as short as with the
    defaults up to 1 KB, within 2 % beyond."""
    rng = random.Random(length)
    alphabet = "abcdefghij/=&?-_0123456789"
    url = ("https://shop.example.com/r?u=" + "".join(rng.choice(alphabet) for _ in range(length)))[
        :length
    ]
    token = codec.click_token(9, url)
    assert codec.parse_click(token) == (9, url)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    with_defaults = len(compressor.compress(url.encode()) + compressor.flush())
    payload = click_payload(url)
    if payload[0] == 1:  # deflated
        limit = with_defaults if length <= 1024 else with_defaults * 1.02
        assert len(payload) - 1 <= limit
    else:
        assert with_defaults >= length


@pytest.mark.parametrize("length", [12, 40, 63, 64, 95, 96, 97, 200])
def test_short_urls_go_as_they_are_longer_ones_deflate_when_shorter(
    codec: TokenCodec, length: int
) -> None:
    """Under _DEFLATE_FROM bytes a URL is not deflated even when it would be shorter (a run
    of one character); from it on it is; each kind of token parses back."""
    url = ("https://e.test/" + "a" * length)[:length]
    payload = click_payload(url)
    assert payload[0] == (0 if length < _DEFLATE_FROM else 1)
    if length < _DEFLATE_FROM:
        assert payload[1:] == url.encode()
    else:
        assert len(payload) < length
    assert codec.parse_click(codec.click_token(3, url)) == (3, url)


def test_incompressible_url_of_the_maximum_length(codec: TokenCodec) -> None:
    rng = random.Random(7)
    url = "https://e.test/" + "".join(rng.choice(BASE64URL) for _ in range(MAX_URL_BYTES - 15))
    token = codec.click_token(5, url)
    assert codec.parse_click(token) == (5, url)
    assert len(token) <= (1 + 1 + 1 + MAX_URL_BYTES + 16) * 4 // 3 + 1


def test_url_limit_counts_utf8_bytes(codec: TokenCodec) -> None:
    with pytest.raises(ValueError, match="8192"):
        codec.click_token(1, "x" * (MAX_URL_BYTES + 1))
    with pytest.raises(ValueError, match="8192"):
        codec.click_token(1, "ü" * (MAX_URL_BYTES // 2 + 1))  # fewer characters than bytes


def test_url_that_is_not_unicode_text_is_refused(codec: TokenCodec) -> None:
    with pytest.raises(ValueError, match="Unicode"):
        codec.click_token(1, "https://e.test/\ud800")
    with pytest.raises(TypeError):
        codec.click_token(1, b"https://e.test/")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 2**64, -(2**70)])
def test_recipient_id_out_of_range(codec: TokenCodec, bad: int) -> None:
    for make_token in (codec.open_token, codec.unsubscribe_token, codec.verp_token):
        with pytest.raises(ValueError, match="out of range"):
            make_token(bad)
    with pytest.raises(ValueError, match="out of range"):
        codec.click_token(bad, "https://e.test/")


def test_recipient_id_must_be_an_int(codec: TokenCodec) -> None:
    with pytest.raises(TypeError):
        codec.open_token(True)
    with pytest.raises(TypeError):
        codec.verp_token(1.0)  # type: ignore[arg-type]


def test_tokens_are_deterministic_and_distinct_per_kind(codec: TokenCodec) -> None:
    made = [make(codec, kind, 42) for kind in URL_KINDS + ADDRESS_KINDS]
    assert made == [make(codec, kind, 42) for kind in URL_KINDS + ADDRESS_KINDS]
    assert len(set(made)) == len(made)


#: Tokens made by earlier versions (with keys 1: KEY_1 and 200: KEY_2, current 200): mail
#: already sent carries them, so they must keep parsing, and the same tokens must be made.
KNOWN_URL = "https://example.com/track?" + "&".join(f"u{i}=v{i}" for i in range(20))
KNOWN_TOKENS = {
    0: {
        "open": "yABeODiCKY14Al9w6CxwLtVv",
        "unsubscribe": "yAAYnAnt5iABBXS6C7gcKF4a",
        "verp": "zaapvk2xjcw6zaxbqk5a",
        "mailto": "zaac2ujopz3khbqsf4gq",
        "https://example.com/": "yAAAaHR0cHM6Ly9leGFtcGxlLmNvbS-VxxLEltJdXS_lT5phHdgg",
        "": "yAAAzcUY9rGUx3wdd5AwLwBGYA",
    },
    123456: {
        "open": "yMDEBwO-4io0U3teFlqDiPNlIH0",
        "unsubscribe": "yMDEB2JBM41_c2-unIAT5ZQT6FQ",
        "verp": "zdamiby7xystyxsjjce3zxq",
        "mailto": "zdamibynluioe35njbdgtki",
        "https://example.com/": "yMDEBwBodHRwczovL2V4YW1wbGUuY29tL_jg7MHcLMRMUG1SAqVkzSc",
        KNOWN_URL: (
            "yMDEBwEVzFsKg0AQBMDbzGfW9r1C41lEBCGRSLIzeHzbA1TtpZz_KaXtWo7zs73W75HKb1nfs1eMyhwMm"
            "NeM2rxhNOYtozXvGJ15z-jNB8ZgPjJG88zIUsJ49MPloQAaoAI6oARaoAZ6oAiaoAq6oAzaoA75BuU-vdP"
            "q5t1Q4moevgSQEQ4"
        ),
    },
    2**64 - 1: {
        "open": "yP___________wFf8NJGPGqvCHGPIMOfPfb0",
        "verp": "zd77777777777777af53zaoi6fk2ltjoxi",
        "": "yP___________wEA2qXqHLlXYMBz40nKq5PngA",
    },
}


@pytest.mark.parametrize("recipient_id", [0, 123456, 2**64 - 1])
def test_known_tokens(recipient_id: int) -> None:
    codec = TokenCodec(Keyring(keys={1: KEY_1, 200: KEY_2}, current=200))
    known = KNOWN_TOKENS[recipient_id]
    urls = [kind for kind in known if kind not in URL_KINDS + ADDRESS_KINDS]
    for kind in URL_KINDS + ADDRESS_KINDS:
        if kind == "unsubscribe" and kind in known:  # made before tokens carried the address
            assert codec.unsubscribe_token(recipient_id) == known[kind]
            assert codec.parse_unsubscribe(known[kind]) == (recipient_id, None)
        elif kind in known:
            assert make(codec, kind, recipient_id) == known[kind]
            assert parser(codec, kind)(known[kind]) == recipient_id
    assert codec.click_tokens(recipient_id, urls) == [known[url] for url in urls]
    for url in urls:
        assert codec.click_token(recipient_id, url) == known[url]
        assert codec.parse_click(known[url]) == (recipient_id, url)


#: Unsubscribe tokens carrying the address (keys as for KNOWN_TOKENS), pinned the same way.
KNOWN_UNSUBSCRIBE_TOKENS = [
    (0, "a@b.c", "yACTsur9_V74ChTTGjlLU_dzKYg-Kh8"),
    (123456, "john.doe@example.net", "yMDEB2szcmk9_2Hjpv6qsJlRZKYhwy7e5GeDO3q1Rhh47VTkcanpxQ"),
    (
        123456,
        "\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a",
        "yMDEB-bIsuGbLE5iWBA3fGQP7XqwSNog5qWM41puo2i1m3E7rLUEpw",
    ),
    (
        2**64 - 1,
        "x" * 60 + "@example.com",
        "yP___________wFm-NyOdna8WTwve2jmG7TMXRxOgit_2UBggZmgfOikvNTkHG42BmKTh1KRJbqgMYHh5sP1Lr"
        "XJa3k0MOm9I9a5eMu3mmu_I74mAmAuykElOia2xOrkHG4b",
    ),
]


@pytest.mark.parametrize("recipient_id, address, token", KNOWN_UNSUBSCRIBE_TOKENS)
def test_known_unsubscribe_tokens(recipient_id: int, address: str, token: str) -> None:
    codec = TokenCodec(Keyring(keys={1: KEY_1, 200: KEY_2}, current=200))
    assert codec.unsubscribe_token(recipient_id, address) == token
    assert codec.parse_unsubscribe(token) == (recipient_id, address)


def test_typical_lengths(codec: TokenCodec) -> None:
    url = "https://www.example.com/products/spring-sale?utm_source=mail"
    assert len(url) == 60
    assert len(codec.open_token(123456)) == 27
    assert len(codec.unsubscribe_token(123456)) == 27  # an old token, without the address
    assert len(ADDRESS) == 20 and len(codec.unsubscribe_token(123456, ADDRESS)) == 54
    assert len(codec.click_token(123456, url)) == 108
    assert len(codec.verp_token(123456)) == 23
    assert len(codec.unsubscribe_mailto_token(123456)) == 23
    # The largest id still leaves "b+" + token well inside a 64-octet local part.
    assert len(codec.verp_token(2**64 - 1)) == 34


# --------------------------------------------------------------------------------------
# Address tokens: case-insensitive


@pytest.mark.parametrize("recipient_id", IDS)
def test_address_tokens_use_lowercase_base32_and_parse_in_any_case(
    codec: TokenCodec, recipient_id: int
) -> None:
    for kind in ADDRESS_KINDS:
        token = make(codec, kind, recipient_id)
        assert re.fullmatch("[a-z2-7]+", token), token
        parse = parser(codec, kind)
        assert parse(token.upper()) == recipient_id
        mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(token))
        assert parse(mixed) == recipient_id


# --------------------------------------------------------------------------------------
# Unsubscribe tokens carry the address, encrypted

#: Addresses of 1 to MAX_ADDRESS_BYTES octets of UTF-8 (SMTPUTF8 ones included).
ADDRESSES = [
    "a@b",
    ADDRESS,
    "John.Doe+news@Example.NET",
    '"john doe"@example.net',  # a quoted local part may hold a space
    "j\u00fcrgen.m\u00fcller@b\u00fccher.example",  # SMTPUTF8
    "\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a",  # SMTPUTF8, CJK
    "\U0001f600@example.com",  # four octets a character
    "x" * 31 + "@",  # one keystream block exactly
    "x" * 32 + "@",  # a second block starts
    "a" * 64 + "@" + "d" * 191,  # 256 octets: the longest SMTP path
    "\u00fc" * 127 + "@x",  # 256 octets of UTF-8 in 129 characters
]


def unsubscribe_keystream(key: bytes, recipient_id: int, length: int) -> bytes:
    """The keystream as the module docstring defines it, computed with ``hmac`` alone."""
    address_key = hmac.new(key, b"smartrelay-unsubscribe-address-v1", hashlib.sha256).digest()
    varint = bytearray()
    value = recipient_id
    while value > 0x7F:
        varint.append(value & 0x7F | 0x80)
        value >>= 7
    varint.append(value)
    stream = b"".join(
        hmac.new(address_key, bytes(varint) + bytes([i]), hashlib.sha256).digest() for i in range(8)
    )
    return stream[:length]


@pytest.mark.parametrize("address", ADDRESSES, ids=range(len(ADDRESSES)))
@pytest.mark.parametrize("recipient_id", [0, 123456, 2**64 - 1])
def test_unsubscribe_round_trip_carries_the_address(
    codec: TokenCodec, recipient_id: int, address: str
) -> None:
    token = codec.unsubscribe_token(recipient_id, address)
    assert re.fullmatch("[A-Za-z0-9_-]+", token)
    assert codec.parse_unsubscribe(token) == (recipient_id, address)
    assert unsubscribe_address_fits(address)


@pytest.mark.parametrize("address", ADDRESSES, ids=range(len(ADDRESSES)))
def test_the_address_is_encrypted_as_documented(codec: TokenCodec, address: str) -> None:
    """key id, varint, address XOR keystream, then the 16-byte tag over all of it: the address
    is not readable in the token (nor in its bytes), only its length shows."""
    data = address.encode("utf-8")
    raw = raw_bytes(codec.unsubscribe_token(123456, address))
    assert raw[:4] == b"\x01\xc0\xc4\x07"  # key 1, varint(123456)
    ciphertext, tag = raw[4:-16], raw[-16:]
    assert len(ciphertext) == len(data)
    plain = bytes(
        a ^ b
        for a, b in zip(ciphertext, unsubscribe_keystream(KEY_1, 123456, len(data)), strict=True)
    )
    assert plain == data
    assert tag == hmac.new(KEY_1, _DOMAIN + b"u" + raw[:-16], hashlib.sha256).digest()[:16]
    local = address.split("@")[0].encode("utf-8")
    assert local not in raw and base64.b64encode(local)[:6] not in raw
    # The same address for another recipient, or under another key, looks unrelated.
    other = raw_bytes(codec.unsubscribe_token(123457, address))[4:-16]
    assert other != ciphertext
    rotated = TokenCodec(Keyring(keys={1: KEY_2}, current=1))
    assert raw_bytes(rotated.unsubscribe_token(123456, address))[4:-16] != ciphertext


def test_an_old_unsubscribe_token_without_the_address_still_parses(codec: TokenCodec) -> None:
    old = codec.unsubscribe_token(123456)
    assert len(raw_bytes(old)) == 1 + 3 + 16  # no payload at all
    assert codec.parse_unsubscribe(old) == (123456, None)


@pytest.mark.parametrize(
    "address, error",
    [
        ("", ValueError),
        ("no-at-sign.example", ValueError),
        ("a" * 65 + "@" + "d" * 191, ValueError),  # 257 octets
        ("\u00fc" * 128 + "@", ValueError),  # 257 octets in 129 characters
        ("john\r\n@example.net", ValueError),
        ("john\x00@example.net", ValueError),
        ("john\x7f@example.net", ValueError),
        ("john\ud800@example.net", ValueError),  # a lone surrogate: not Unicode text
        (b"john@example.net", TypeError),
    ],
)
def test_an_address_a_token_cannot_carry_is_refused(
    codec: TokenCodec, address: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        codec.unsubscribe_token(1, address)  # type: ignore[arg-type]
    if isinstance(address, str):
        assert not unsubscribe_address_fits(address)


def forged_unsubscribe_token(recipient_id: int, plain: bytes) -> str:
    """A token signed with the right key (KEY_1) whose address is ``plain``, whatever it is:
    only a bug or a stolen key makes one, and the parser must still refuse odd contents."""
    stream = unsubscribe_keystream(KEY_1, recipient_id, min(len(plain), 256))
    stream += bytes(max(0, len(plain) - 256))
    signed = (
        b"\x01" + bytes([recipient_id]) + bytes(a ^ b for a, b in zip(plain, stream, strict=True))
    )
    tag = hmac.new(KEY_1, _DOMAIN + b"u" + signed, hashlib.sha256).digest()[:16]
    return _b64encode(signed + tag)


def test_forged_but_authentic_odd_addresses_are_refused(codec: TokenCodec) -> None:
    assert MAX_ADDRESS_BYTES == 256  # an SMTP path (RFC 5321 section 4.5.3.1.3)
    assert codec.parse_unsubscribe(forged_unsubscribe_token(5, b"a@b")) == (5, "a@b")
    for plain in (
        b"a" * 255 + b"@",  # 256: still fine
        "\u00fc@x".encode(),
    ):
        assert codec.parse_unsubscribe(forged_unsubscribe_token(5, plain))[1] is not None
    for plain in (
        b"a" * 256 + b"@",  # 257 octets
        b"\xff\xfe@example.net",  # not UTF-8
        b"\xed\xa0\x80@example.net",  # an encoded surrogate: not UTF-8 either
        b"no-at-sign",
        b"john\n@example.net",
        b"john\x00@example.net",
    ):
        with pytest.raises(TokenError, match="malformed"):
            codec.parse_unsubscribe(forged_unsubscribe_token(5, plain))


def test_a_changed_address_byte_breaks_the_signature(codec: TokenCodec) -> None:
    raw = bytearray(raw_bytes(codec.unsubscribe_token(123456, ADDRESS)))
    for position in range(4, len(raw) - 16):
        for bit in (0x01, 0x80):
            edited = bytearray(raw)
            edited[position] ^= bit
            with pytest.raises(TokenError, match="signature"):
                codec.parse_unsubscribe(_b64encode(bytes(edited)))


def test_the_mailto_token_does_not_carry_the_address(codec: TokenCodec) -> None:
    """``u+TOKEN@`` must fit a 64-octet local part: it names the row only (a mailto
    unsubscribe for a purged recipient is kept unmatched by the feedback processor)."""
    token = codec.unsubscribe_mailto_token(2**64 - 1)
    assert len("u+" + token) <= 64
    assert codec.parse_unsubscribe_mailto(token) == 2**64 - 1


# --------------------------------------------------------------------------------------
# Tampering


@pytest.mark.parametrize("kind", URL_KINDS)
def test_every_single_character_edit_of_a_url_token_is_rejected(
    codec: TokenCodec, kind: str
) -> None:
    token = make(codec, kind, 123456)
    parse = parser(codec, kind)
    count = 0
    for edited in single_edits(token, BASE64URL):
        with pytest.raises(TokenError):
            parse(edited)
        count += 1
    assert count > 100 * len(token)


@pytest.mark.parametrize("kind", ADDRESS_KINDS)
def test_every_single_character_edit_of_an_address_token_is_rejected(
    codec: TokenCodec, kind: str
) -> None:
    token = make(codec, kind, 123456)
    parse = parser(codec, kind)
    for edited in single_edits(token, BASE32_LOWER):
        if edited.isascii() and edited.lower() == token:  # only the case changed
            assert parse(edited) == 123456
            continue
        with pytest.raises(TokenError):
            parse(edited)


def test_unused_bits_in_the_last_character_are_rejected(codec: TokenCodec) -> None:
    # 20 bytes in base64url: the last character carries 4 bits and 2 unused ones, so the
    # next character decodes to the same bytes and must still be refused.
    token = codec.open_token(123456)
    assert len(raw_bytes(token)) % 3 == 2
    sibling = token[:-1] + BASE64URL[BASE64URL.index(token[-1]) ^ 1]
    assert raw_bytes(sibling) == raw_bytes(token)
    with pytest.raises(TokenError):
        codec.parse_open(sibling)
    # The same for base32 (14 bytes: 2 unused bits in the 23rd character).
    verp = codec.verp_token(123456)
    verp_sibling = verp[:-1] + BASE32_LOWER[BASE32_LOWER.index(verp[-1]) ^ 1]
    assert raw_bytes(verp_sibling) == raw_bytes(verp)
    with pytest.raises(TokenError):
        codec.parse_verp(verp_sibling)


def test_a_token_of_one_kind_fails_as_every_other_kind(codec: TokenCodec) -> None:
    for made_as in URL_KINDS + ADDRESS_KINDS:
        token = make(codec, made_as, 123456)
        for parsed_as in URL_KINDS + ADDRESS_KINDS:
            if parsed_as == made_as:
                continue
            with pytest.raises(TokenError):
                parser(codec, parsed_as)(token)
            if parsed_as in ADDRESS_KINDS:
                with pytest.raises(TokenError):
                    parser(codec, parsed_as)(token.lower())


@pytest.mark.parametrize("kind", URL_KINDS + ADDRESS_KINDS)
def test_truncated_tokens_are_rejected(codec: TokenCodec, kind: str) -> None:
    token = make(codec, kind, 2**53)
    parse = parser(codec, kind)
    for end in range(len(token)):
        with pytest.raises(TokenError):
            parse(token[:end])
        with pytest.raises(TokenError):
            parse(token[end + 1 :])


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "a",
        "AAAA",
        "A" * 27,
        "a" * 23,
        "!!!",
        "ü" * 27,
        "\x00" * 27,
        "../../etc/passwd",
        "x" * 100_000,
        "2" * 100_000,
    ],
)
def test_garbage_is_rejected_by_every_parser(codec: TokenCodec, garbage: str) -> None:
    for parse in all_parsers(codec):
        with pytest.raises(TokenError):
            parse(garbage)


def test_decorated_tokens_are_rejected(codec: TokenCodec) -> None:
    for kind in URL_KINDS + ADDRESS_KINDS:
        token = make(codec, kind, 99)
        parse = parser(codec, kind)
        for decorated in (
            " " + token,
            token + " ",
            token + "\n",
            token + "=" * (-len(token) % 4 or 4),
            token + "=" * (-len(token) % 8 or 8),
            token.replace("-", "+").replace("_", "/"),
            token + ".gif",
        ):
            if decorated == token:
                continue
            with pytest.raises(TokenError):
                parse(decorated)


def test_non_str_tokens_are_rejected(codec: TokenCodec) -> None:
    token = codec.open_token(1)
    with pytest.raises(TokenError):
        codec.parse_open(token.encode())  # type: ignore[arg-type]
    with pytest.raises(TokenError):
        codec.parse_verp(None)  # type: ignore[arg-type]


def test_token_errors_are_value_errors() -> None:
    assert issubclass(TokenError, ValueError)
    assert issubclass(SecretFileError, ValueError)


def test_tokens_from_another_key_are_rejected(codec: TokenCodec) -> None:
    other = TokenCodec(Keyring(keys={1: KEY_2}, current=1))  # same id, different key
    for kind in URL_KINDS + ADDRESS_KINDS:
        with pytest.raises(TokenError, match="signature"):
            parser(codec, kind)(make(other, kind, 7))


# --------------------------------------------------------------------------------------
# Rotation


def write_keys(path: Path, *lines: str) -> None:
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)


def test_rotation_keeps_old_tokens_working(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    write_keys(path, f"1:{KEY_1.hex()}")
    old_codec = TokenCodec(load_keyring(str(path)))
    old = {kind: make(old_codec, kind, 123456) for kind in URL_KINDS + ADDRESS_KINDS}
    assert {raw_bytes(token)[0] for token in old.values()} == {1}

    rotated = add_key(str(path))
    assert rotated.current == 2
    assert set(rotated.keys) == {1, 2}
    assert rotated.keys[1] == KEY_1
    assert load_keyring(str(path)) == rotated

    codec = TokenCodec(rotated)
    for kind, token in old.items():
        assert parser(codec, kind)(token) in (
            123456,
            (123456, "https://example.com/x?a=1&b=2#c"),
            (123456, ADDRESS),
        )
        new = make(codec, kind, 123456)
        assert raw_bytes(new)[0] == 2
        with pytest.raises(TokenError, match="unknown key"):
            parser(old_codec, kind)(new)  # a process that has not reloaded the keys

    retired = TokenCodec(Keyring(keys={2: rotated.keys[2]}, current=2))
    for kind, token in old.items():
        with pytest.raises(TokenError, match="unknown key"):
            parser(retired, kind)(token)


# --------------------------------------------------------------------------------------
# The secret file


def test_missing_secret_file_is_created_private_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "var" / "keys" / "secret.key"
    keyring = load_keyring(str(path))
    assert len(keyring.keys) == 1
    assert len(keyring.keys[keyring.current]) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["secret.key"]  # no temporary file left behind
    assert load_keyring(str(path)) == keyring
    assert load_keyring(str(path)) != load_keyring(str(tmp_path / "other.key"))
    token = TokenCodec(keyring).verp_token(3)
    assert TokenCodec(load_keyring(str(path))).parse_verp(token) == 3


def test_a_relative_path_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    keyring = load_keyring("secret.key")
    assert load_keyring(str(tmp_path / "secret.key")) == keyring


def test_concurrent_creation_keeps_the_file_created_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret.key"
    real_link = os.link

    def link_after_another_process(source: str, destination: str) -> None:
        write_keys(Path(destination), f"9:{KEY_2.hex()}")  # the other process wins the race
        real_link(source, destination)

    monkeypatch.setattr(os, "link", link_after_another_process)
    keyring = load_keyring(str(path))
    assert keyring == Keyring(keys={9: KEY_2}, current=9)
    assert os.listdir(tmp_path) == ["secret.key"]


def test_creation_without_hard_links_falls_back_to_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(source: str, destination: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "secret.key"
    keyring = load_keyring(str(path))
    assert load_keyring(str(path)) == keyring
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["secret.key"]


def test_file_format_comments_blank_lines_and_last_line_current(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(
        b"# rotated 2024-05-01\r\n"
        b"\r\n"
        + f"  7 : {KEY_2.hex().upper()}   # old\r\n".encode()
        + f"3:{KEY_1.hex()}\r\n".encode()
        + b"# trailing comment"
    )
    assert load_keyring(str(path)) == Keyring(keys={7: KEY_2, 3: KEY_1}, current=3)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("garbage", "expected"),
        (KEY_1.hex(), "expected"),
        (f"-1:{KEY_1.hex()}", "expected"),
        (f"x:{KEY_1.hex()}", "expected"),
        (f"1={KEY_1.hex()}", "expected"),
        (f"1:{KEY_1.hex()[:-1]}g", "expected"),
        (f"256:{KEY_1.hex()}", "out of range"),
        (f"1000:{KEY_1.hex()}", "out of range"),
        (f"1:{KEY_1.hex()[:-2]}", "62"),
        (f"1:{KEY_1.hex()}00", "66"),
        ("1:", "not 0"),
        (f"5:{KEY_2.hex()}", "already used on line 2"),
    ],
)
def test_malformed_secret_file_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "secret.key"
    write_keys(path, "# keys", f"5:{KEY_1.hex()}", line)
    with pytest.raises(SecretFileError) as info:
        load_keyring(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: line 3: ")
    assert problem in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="line 3"):
        add_key(str(path))


@pytest.mark.parametrize("content", [b"", b"\n\n", b"# only a comment\n"])
def test_secret_file_without_keys_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(content)
    with pytest.raises(SecretFileError, match=re.escape(f"{path}: no keys")):
        load_keyring(str(path))
    assert path.read_bytes() == content  # not replaced by a new key


def test_unreadable_secret_files(tmp_path: Path) -> None:
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"1:\xff\xfe\n")
    with pytest.raises(SecretFileError, match=re.escape(f"{binary}: not UTF-8")):
        load_keyring(str(binary))
    with pytest.raises(SecretFileError, match=re.escape(f"{tmp_path}: cannot read")):
        load_keyring(str(tmp_path))  # a directory
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(SecretFileError, match="Not a directory"):
        load_keyring(str(blocked / "secret.key"))  # its folder would be a file


def test_secret_file_that_cannot_be_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "makedirs", refuse)
    path = tmp_path / "var" / "secret.key"
    with pytest.raises(SecretFileError, match=re.escape(f"{path}: cannot create: Permission")):
        load_keyring(str(path))


# --------------------------------------------------------------------------------------
# add_key


def test_add_key_appends_keeping_the_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    path.write_text(f"# mine\n4:{KEY_1.hex()}  # first")  # no final newline
    path.chmod(0o644)
    keyring = add_key(str(path))
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# mine", f"4:{KEY_1.hex()}  # first"]
    assert re.fullmatch("5:[0-9a-f]{64}", lines[2])
    assert len(lines) == 3
    assert keyring.current == 5
    assert keyring.keys[5].hex() == lines[2][2:]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["secret.key"]


def test_add_key_wraps_and_skips_ids_in_use(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    write_keys(path, f"254:{KEY_1.hex()}", f"255:{KEY_2.hex()}")
    assert add_key(str(path)).current == 0
    write_keys(path, f"0:{KEY_1.hex()}", f"255:{KEY_2.hex()}")
    assert add_key(str(path)).current == 1
    write_keys(path, f"3:{KEY_1.hex()}", f"4:{KEY_1.hex()}", f"2:{KEY_2.hex()}")
    assert add_key(str(path)).current == 5


def test_add_key_with_all_ids_in_use(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    write_keys(path, *(f"{i}:{KEY_1.hex()}" for i in range(256)))
    before = path.read_bytes()
    with pytest.raises(SecretFileError, match="256"):
        add_key(str(path))
    assert path.read_bytes() == before


def test_add_key_to_a_missing_file_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "new" / "secret.key"
    keyring = add_key(str(path))
    assert len(keyring.keys) == 1
    assert load_keyring(str(path)) == keyring


# --------------------------------------------------------------------------------------
# Keyring


@pytest.mark.parametrize(
    ("keys", "current", "problem"),
    [
        ({}, 0, "at least one"),
        ({1: KEY_1}, 2, "current"),
        ({256: KEY_1}, 256, "range"),
        ({-1: KEY_1}, -1, "range"),
        ({1: KEY_1[:16]}, 1, "16 bytes"),
    ],
)
def test_keyring_validation(keys: dict[int, bytes], current: int, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Keyring(keys=keys, current=current)


def test_keyring_is_immutable_and_does_not_show_keys() -> None:
    keys = {1: KEY_1}
    keyring = Keyring(keys=keys, current=1)
    keys[2] = KEY_2  # the caller's dict is copied
    assert set(keyring.keys) == {1}
    with pytest.raises(TypeError):
        keyring.keys[2] = KEY_2  # type: ignore[index]
    assert KEY_1.hex() not in repr(keyring)
    assert repr(keyring) == "Keyring(keys={1: <secret>}, current=1)"


# --------------------------------------------------------------------------------------
# Properties

property_codec = TokenCodec(Keyring(keys={1: KEY_1, 200: KEY_2}, current=200))
recipient_ids = st.integers(min_value=0, max_value=2**64 - 1)


@settings(deadline=None)
@given(recipient_ids, st.text())
def test_click_round_trip_property(recipient_id: int, url: str) -> None:
    token = property_codec.click_token(recipient_id, url)
    assert property_codec.parse_click(token) == (recipient_id, url)


@settings(deadline=None)
@given(recipient_ids, st.text(max_size=100), st.data())
def test_any_single_edit_of_a_click_token_is_rejected(
    recipient_id: int, url: str, data: st.DataObject
) -> None:
    token = property_codec.click_token(recipient_id, url)
    position = data.draw(st.integers(0, len(token) - 1))
    character = data.draw(st.characters().filter(lambda c: c != token[position]))
    edit = data.draw(st.sampled_from(["replace", "insert", "delete"]))
    if edit == "replace":
        edited = token[:position] + character + token[position + 1 :]
    elif edit == "insert":
        edited = token[:position] + character + token[position:]
    else:
        edited = token[:position] + token[position + 1 :]
    with pytest.raises(TokenError):
        property_codec.parse_click(edited)


@settings(deadline=None)
@given(recipient_ids, st.data())
def test_any_single_edit_of_a_verp_token_is_rejected(
    recipient_id: int, data: st.DataObject
) -> None:
    token = property_codec.verp_token(recipient_id)
    assert property_codec.parse_verp(token.upper()) == recipient_id
    position = data.draw(st.integers(0, len(token) - 1))
    character = data.draw(
        st.characters().filter(lambda c: c not in (token[position], token[position].upper()))
    )
    edited = token[:position] + character + token[position + 1 :]
    with pytest.raises(TokenError):
        property_codec.parse_verp(edited)


@settings(deadline=None)
@given(recipient_ids, st.binary(min_size=0, max_size=60))
def test_arbitrary_bytes_never_parse(recipient_id: int, raw: bytes) -> None:
    token = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    for parse in all_parsers(property_codec):
        with pytest.raises(TokenError):
            parse(token)


@settings(deadline=None)
@given(recipient_ids, st.lists(st.text(max_size=100), max_size=20))
def test_click_tokens_for_a_copy_are_the_single_tokens(recipient_id: int, urls: list[str]) -> None:
    """The batch a re-wrapped copy uses (from the URLs, or from their payloads made once per
    message) gives exactly the tokens one call per URL gives."""
    try:
        single = [property_codec.click_token(recipient_id, url) for url in urls]
    except ValueError:  # a lone surrogate: not encodable, and the batch says so too
        with pytest.raises(ValueError):
            property_codec.click_tokens(recipient_id, urls)
        return
    assert property_codec.click_tokens(recipient_id, urls) == single
    payloads = [click_payload(url) for url in urls]  # what a message's template keeps
    assert property_codec.click_tokens_for_payloads(recipient_id, payloads) == single
    with pytest.raises(TypeError):
        property_codec.click_tokens(recipient_id, [b"https://example.com/"])  # type: ignore[list-item]


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES), st.binary(max_size=200), st.binary())
def test_mac_is_hmac_sha256(key: bytes, start: bytes, rest: bytes) -> None:
    """The token MAC (kept as the padded-key SHA-256 states) is the HMAC-SHA256 of the domain
    prefix and the message, as computed by ``hmac`` (which made the tokens already sent)."""
    mac = _Mac.for_key(key)
    expected = hmac.new(key, _DOMAIN, hashlib.sha256)
    expected.update(start + rest)
    assert mac.digest(start + rest) == expected.digest()
    assert mac.extended(start).digest(rest) == expected.digest()
    assert mac.digest(start + rest) == expected.digest()  # extending left it as it was


@settings(deadline=None)
@given(recipient_ids, st.text(min_size=1, max_size=300))
def test_unsubscribe_round_trip_property(recipient_id: int, local: str) -> None:
    address = local + "@example.net"
    if not unsubscribe_address_fits(address):
        with pytest.raises(ValueError):
            property_codec.unsubscribe_token(recipient_id, address)
        return
    token = property_codec.unsubscribe_token(recipient_id, address)
    assert property_codec.parse_unsubscribe(token) == (recipient_id, address)


@given(st.binary(max_size=100))
def test_b64encode_is_unpadded_urlsafe_base64(raw: bytes) -> None:
    assert _b64encode(raw) == base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
