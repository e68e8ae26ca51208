"""Tracking applied to the HTML parts of real-world-shaped messages, byte-exact elsewhere.

The messages are in ``tests/fixtures/mime/NAME.eml``; what tracking makes of them (links
numbered ``https://t.test/c/0001`` ... in order, the pixel ``PIXEL``) is in
``NAME.expected.eml``. Each case is also checked without the golden file: outside the bodies of
the tracked HTML parts the output is the input, slice for slice, and undoing the href
replacements and the pixel in the decoded HTML gives back the decoded input.
``SMARTRELAY_REGENERATE_GOLDEN=1`` rewrites the expected files (review the diff).
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import os
import re
from collections.abc import Callable, Iterator
from email.message import EmailMessage, Message
from pathlib import Path

import pytest
from attrs import frozen
from hypothesis import event, given, settings
from hypothesis import strategies as st

from smartrelay.rewrap.html import pixel_tag, rewrite_html
from smartrelay.rewrap.mime import (
    MimePlan,
    _b2a_qp_agrees,
    _delimiter_lines,
    _encode_qp,
    _encode_qp_lines,
    _Fields,
    _plan,
    _read_fields,
    _read_fields_by_email,
    _read_plain_fields,
    _split_entity,
    plan_html_parts,
    transform_html_parts,
)
from tests.support.link_tracking import TOKEN, Tracker

FIXTURES = Path(__file__).parent / "fixtures" / "mime"
REGENERATE = os.environ.get("SMARTRELAY_REGENERATE_GOLDEN") == "1"
PIXEL = "https://t.test/o/P.gif?m=1&r=2"
PIXEL_TAG = pixel_tag(PIXEL)


def track(raw: bytes) -> tuple[bytes, Tracker]:
    tracker = Tracker()
    return transform_html_parts(raw, lambda html: rewrite_html(html, tracker, PIXEL).html), tracker


@frozen
class Case:
    name: str
    # the raw href values (in the decoded HTML) that are rewritten, in order
    hrefs: tuple[str, ...]
    # what rewrite_url receives for them
    links: tuple[str, ...]
    # which "Content-Type: text/html" header blocks of the file are tracked parts (the others
    # are attachments or inside attached messages and signed parts)
    tracked: tuple[int, ...] = (0,)
    # the 7bit part had to become quoted-printable
    cte_switched: bool = False
    # other edits in the HTML, as (output text, input text)
    restore: tuple[tuple[str, str], ...] = ()


CASES = [
    Case(
        "alternative",
        hrefs=(
            "https://shop.example/track?id=1&amp;lang=en",
            "http://shop.example/orders/42#items",
            "https://shop.example/help",
            "https://shop.example/from-area",  # an image map's area (issue 18)
        ),
        links=(
            "https://shop.example/track?id=1&lang=en",
            "http://shop.example/orders/42#items",
            "https://shop.example/help",
            "https://shop.example/from-area",
        ),
        restore=(('<a class="quiet" href=', '<a class="quiet" data-smartrelay-notrack href='),),
    ),
    Case(
        "mixed_related_attachment",
        hrefs=(
            "https://shop.example/s?q=caf%C3%A9&amp;sort=price%2Basc",
            "https://shop.example/kategorie/käse?größe=groß",
            "https://shop.example/faq#versand-kosten",
            "https://shop.example/r?next=%2Fa&amp;amp;b",
        ),
        links=(
            "https://shop.example/s?q=caf%C3%A9&sort=price%2Basc",
            "https://shop.example/kategorie/käse?größe=groß",
            "https://shop.example/faq#versand-kosten",
            "https://shop.example/r?next=%2Fa&amp;b",
        ),
        tracked=(0,),  # 1 is receipt.html, an attachment
    ),
    Case(
        "quoted_printable",
        hrefs=(
            "https://news.example/articles/2025/03/a-very-long-article-slug"
            "?utm_source=newsletter&amp;utm_medium=email&amp;utm_campaign=week-10",
            "https://news.example/p?id=1&amp;x=2",
            "https://news.example/unsubscribe?e=%7B%7Bemail%7D%7D",
        ),
        links=(
            "https://news.example/articles/2025/03/a-very-long-article-slug"
            "?utm_source=newsletter&utm_medium=email&utm_campaign=week-10",
            "https://news.example/p?id=1&x=2",
            "https://news.example/unsubscribe?e=%7B%7Bemail%7D%7D",
        ),
    ),
    Case(
        "base64_html",
        hrefs=("https://app.example/confirm?token=abc123&amp;next=%2Fdashboard",),
        links=("https://app.example/confirm?token=abc123&next=%2Fdashboard",),
    ),
    Case(
        "latin1",
        hrefs=(
            "https://boutique.example/été/sélection?réduc=10%25",
            "http://boutique.example/crème",
        ),
        links=(
            "https://boutique.example/été/sélection?réduc=10%25",
            "http://boutique.example/crème",
        ),
    ),
    Case(
        "shift_jis",
        hrefs=(
            "https://shop.example.jp/campaign?id=spring&amp;ref=mail",
            "https://shop.example.jp/ソフト/表",
        ),
        links=(
            "https://shop.example.jp/campaign?id=spring&ref=mail",
            "https://shop.example.jp/ソフト/表",
        ),
    ),
    Case(
        "long_lines",
        hrefs=("https://a.example/x", "https://a.example/second"),
        links=("https://a.example/x", "https://a.example/second"),
        cte_switched=True,
    ),
    Case(
        "broken_html",
        hrefs=(
            "http://legacy.example/page?a=1&b=2",
            "https://legacy.example/spaced",
            "https://legacy.example/self-closing/",
            "https://legacy.example/dup-first",
            "  HTTPS://Legacy.Example/Upper  ",
        ),
        links=(
            "http://legacy.example/page?a=1&b=2",
            "https://legacy.example/spaced",
            "https://legacy.example/self-closing/",
            "https://legacy.example/dup-first",
            "HTTPS://Legacy.Example/Upper",
        ),
    ),
    Case(
        "rfc822_attachment",
        hrefs=("https://corp.example/ticket/77",),
        links=("https://corp.example/ticket/77",),
        tracked=(0,),  # 1 is inside the attached message
    ),
    Case(
        "outlook",
        # the VML button and the <a> inside its conditional comment are links too (issue 18)
        hrefs=(
            "https://intranet.example/q1?view=deck&amp;lang=en",
            *["https://intranet.example/rsvp"] * 3,
        ),
        links=(
            "https://intranet.example/q1?view=deck&lang=en",
            *["https://intranet.example/rsvp"] * 3,
        ),
    ),
]
UNCHANGED = ["no_html", "signed", "smime_encrypted"]
ALL_FIXTURES = sorted(p.stem for p in FIXTURES.glob("*.eml") if not p.stem.endswith(".expected"))


def fixture(name: str) -> bytes:
    return (FIXTURES / f"{name}.eml").read_bytes()


def test_fixture_list_is_complete_and_files_use_crlf() -> None:
    assert sorted([c.name for c in CASES] + UNCHANGED) == ALL_FIXTURES
    for name in ALL_FIXTURES:
        raw = fixture(name)
        assert raw.count(b"\n") == raw.count(b"\r\n"), f"{name}.eml lost its CRLF line ends"


# --- golden files --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden(case: Case) -> None:
    out, tracker = track(fixture(case.name))
    expected_file = FIXTURES / f"{case.name}.expected.eml"
    if REGENERATE:
        expected_file.write_bytes(out)
    assert out == expected_file.read_bytes()
    assert tuple(tracker.seen) == case.links


@pytest.mark.parametrize("name", UNCHANGED)
def test_messages_without_trackable_html_come_back_byte_identical(name: str) -> None:
    raw = fixture(name)
    out, tracker = track(raw)
    assert out == raw
    assert tracker.seen == []


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_a_transformation_that_changes_nothing_leaves_every_byte(name: str) -> None:
    seen: list[str] = []

    def identity(html: str) -> str:
        seen.append(html)
        return html

    raw = fixture(name)
    assert transform_html_parts(raw, identity) == raw
    if name not in UNCHANGED:
        assert seen


# --- only the tracked HTML bodies change ---------------------------------------------------------


def html_bodies(raw: bytes) -> list[tuple[int, int]]:
    """(body start, body end) of every ``Content-Type: text/html`` entity, found without
    parsing MIME: the body ends at the next delimiter line of any boundary."""
    boundaries = {m.group(1) for m in re.finditer(rb'(?i)boundary="?([^"\s;]+)', raw)}
    found = []
    for match in re.finditer(rb"(?im)^content-type:[ \t]*text/html", raw):
        body_start = raw.index(b"\r\n\r\n", match.start()) + 4
        ends = [raw.find(b"\r\n--" + b, body_start) for b in boundaries]
        body_end = min([e for e in ends if e >= 0], default=len(raw))
        found.append((body_start, body_end))
    return found


def split_at_bodies(raw: bytes, tracked: tuple[int, ...]) -> tuple[list[bytes], list[bytes]]:
    """The message cut into what must stay (fixed) and the tracked HTML bodies."""
    fixed, bodies = [], []
    position = 0
    spans = html_bodies(raw)
    for index in tracked:
        start, end = spans[index]
        fixed.append(raw[position:start])
        bodies.append(raw[start:end])
        position = end
    fixed.append(raw[position:])
    return fixed, bodies


def tracked_parts(message: Message) -> Iterator[EmailMessage]:
    """The HTML parts tracking applies to, found with the stdlib's own MIME parser."""
    if message.get_content_type() in ("multipart/signed", "multipart/encrypted"):
        return
    if message.is_multipart() and message.get_content_maintype() == "multipart":
        for part in message.get_payload():
            assert isinstance(part, Message)
            yield from tracked_parts(part)
    elif (
        message.get_content_type() == "text/html"
        and message.get_content_disposition() != "attachment"
    ):
        assert isinstance(message, EmailMessage)
        yield message


def undo(html: str, case: Case) -> str:
    assert html.count(PIXEL_TAG) == 1
    html = html.replace(PIXEL_TAG, "")
    for new, old in case.restore:
        assert new in html
        html = html.replace(new, old)
    return TOKEN.sub(lambda m: case.hrefs[int(m.group(1)) - 1], html)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_outside_the_html_bodies_every_byte_is_kept(case: Case) -> None:
    raw = fixture(case.name)
    out, _ = track(raw)
    fixed_in, _ = split_at_bodies(raw, case.tracked)
    fixed_out, _ = split_at_bodies(out, case.tracked)
    if case.cte_switched:
        # the one header value that may change
        cte = b"Content-Transfer-Encoding: 7bit\r\n"
        assert fixed_in[-2].count(cte) == 1
        fixed_in[-2] = fixed_in[-2].replace(cte, b"Content-Transfer-Encoding: quoted-printable\r\n")
    assert fixed_out == fixed_in


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_decoded_html_differs_only_in_hrefs_and_the_pixel(case: Case) -> None:
    raw = fixture(case.name)
    out, _ = track(raw)
    parts_in = list(tracked_parts(email.message_from_bytes(raw, policy=email.policy.default)))
    parts_out = list(tracked_parts(email.message_from_bytes(out, policy=email.policy.default)))
    assert len(parts_in) == len(parts_out) == len(case.tracked)
    for part_in, part_out in zip(parts_in, parts_out, strict=True):
        assert part_out.get_content_charset() == part_in.get_content_charset()
        html_in, html_out = part_in.get_content(), part_out.get_content()
        assert html_out != html_in
        assert undo(html_out, case) == html_in


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bodies_are_encoded_as_before(case: Case) -> None:
    raw = fixture(case.name)
    out, _ = track(raw)
    _, bodies_in = split_at_bodies(raw, case.tracked)
    _, bodies_out = split_at_bodies(out, case.tracked)
    parts_in = list(tracked_parts(email.message_from_bytes(raw, policy=email.policy.default)))
    for part, body_in, body_out in zip(parts_in, bodies_in, bodies_out, strict=True):
        encoding = part.get("content-transfer-encoding", "7bit").lower()
        lines = body_out.split(b"\r\n")
        assert b"\n" not in body_out.replace(b"\r\n", b"")
        charset = part.get_content_charset() or "us-ascii"
        if encoding == "quoted-printable" or case.cte_switched:
            assert max(len(line) for line in lines) <= 76
            assert not any(line.endswith((b" ", b"\t")) for line in lines)
            decoded_in, decoded_out = binascii.a2b_qp(body_in), binascii.a2b_qp(body_out)
            assert undo(decoded_out.decode(charset), case) == decoded_in.decode(charset)
        elif encoding == "base64":
            text = [line for line in lines if line]
            assert all(len(line) == 76 for line in text[:-1]) and len(text[-1]) <= 76
            decoded_in, decoded_out = base64.b64decode(body_in), base64.b64decode(body_out)
            assert undo(decoded_out.decode(charset), case) == decoded_in.decode(charset)
        else:
            # 7bit / 8bit: the same bytes, lines as they were, but for the edits
            undone = body_out.replace(PIXEL_TAG.encode(charset), b"")
            for new, old in case.restore:
                undone = undone.replace(new.encode(charset), old.encode(charset))
            undone = TOKEN.sub(
                lambda m: case.hrefs[int(m.group(1)) - 1],
                undone.decode(charset, "surrogateescape"),
            ).encode(charset, "surrogateescape")
            assert undone == body_in


# --- encodings, charsets and headers -------------------------------------------------------------

HEAD = b"From: a@x.test\r\nTo: b@x.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n"


def add(text: str) -> Callable[[str], str]:
    return lambda html: html.replace("</body>", text + "</body>")


def test_7bit_part_that_gets_non_ascii_becomes_quoted_printable() -> None:
    raw = (
        HEAD + b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding:  7bit\r\n\r\n<body>x</body>\r\n"
    )
    out = transform_html_parts(raw, add("é"))
    assert out == (
        HEAD + b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding:  quoted-printable\r\n\r\n<body>x=C3=A9</body>\r\n"
    )


def test_missing_transfer_encoding_header_is_added_when_needed() -> None:
    raw = HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n<body>x</body>\r\n"
    assert transform_html_parts(raw, add("!")) == raw.replace(b"x</body>", b"x!</body>")
    assert transform_html_parts(raw, add("é")) == (
        HEAD + b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n<body>x=C3=A9</body>\r\n"
    )


def test_folded_transfer_encoding_keeps_its_folding() -> None:
    raw = (
        HEAD + b"Content-Transfer-Encoding:\r\n 7bit\r\nContent-Type: text/html;\r\n"
        b" charset=utf-8\r\n\r\n<body>x</body>"
    )
    assert transform_html_parts(raw, add("é")) == (
        HEAD + b"Content-Transfer-Encoding:\r\n quoted-printable\r\nContent-Type: text/html;\r\n"
        b" charset=utf-8\r\n\r\n<body>x=C3=A9</body>"
    )


def test_8bit_stays_8bit_and_the_charset_is_kept() -> None:
    raw = (
        HEAD + b"Content-Type: text/html; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n<body>\xe9t\xe9</body>"
    )
    assert transform_html_parts(raw, add("ç")) == raw.replace(b"</body>", b"\xe7</body>")


def test_characters_the_charset_lacks_become_numeric_references() -> None:
    raw = (
        HEAD + b"Content-Type: text/html; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n<body>caf=E9</body>"
    )
    out = transform_html_parts(raw, add("€ 日 é"))
    assert out.endswith(b"\r\n\r\n<body>caf=E9&#8364; &#26085; =E9</body>")
    raw = raw.replace(b"iso-8859-1", b"us-ascii").replace(b"caf=E9", b"cafe")
    assert transform_html_parts(raw, add("é")).endswith(b"<body>cafe&#233;</body>")


def test_bytes_the_charset_cannot_decode_pass_through_unchanged() -> None:
    # labelled us-ascii, written in latin-1: the stray bytes survive, the part becomes qp
    raw = HEAD + b"Content-Type: text/html\r\n\r\n<body>caf\xe9 na\xefve</body>"
    out = transform_html_parts(raw, add("!"))
    assert out == HEAD + (
        b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"<body>caf=E9 na=EFve!</body>"
    )
    # same in 8bit: stays 8bit
    raw = raw.replace(b"text/html\r\n", b"text/html\r\nContent-Transfer-Encoding: 8bit\r\n")
    assert transform_html_parts(raw, add("!")) == raw.replace(b"</body>", b"!</body>")


def test_base64_keeps_76_character_lines_and_the_trailing_line_end() -> None:
    html = "<body>" + "é" * 200 + "</body>"
    encoded = base64.encodebytes(html.encode()).replace(b"\n", b"\r\n")
    raw = (
        HEAD
        + b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + encoded
    )
    out = transform_html_parts(raw, add("ü"))
    body = out.split(b"\r\n\r\n", 1)[1]
    assert body.endswith(b"\r\n") and not body.endswith(b"\r\n\r\n")
    lines = body.split(b"\r\n")
    assert len(lines) == 9 and lines[-1] == b""  # 415 bytes: 7 full lines and 24 characters
    assert all(len(line) == 76 for line in lines[:-2]) and 0 < len(lines[-2]) <= 76
    assert base64.b64decode(body).decode() == html.replace("</body>", "ü</body>")


@pytest.mark.parametrize(
    ("header", "body"),
    [
        (b"Content-Type: text/html; charset=x-unknown-charset\r\n", b"<body>x</body>"),
        (b"Content-Type: text/html; charset=base64\r\n", b"<body>x</body>"),
        (b"Content-Type: text/html; charset=rot13\r\n", b"<body>x</body>"),
        (b'Content-Type: text/html; charset="utf-8\x00"\r\n', b"<body>x</body>"),
        # cp932 has two codes for some characters: 0x8790 (≒) would come back as 0x81E0
        (b"Content-Type: text/html; charset=cp932\r\n", b"<body>\x87\x90</body>"),
        (b"Content-Type: text/html\r\nContent-Transfer-Encoding: x-uuencode\r\n", b"<body>"),
        (b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n", b"PGJvZHk+*"),
        (b"Content-Type: text/html\r\nContent-Disposition: attachment\r\n", b"<body>x</body>"),
        (b"Content-Type: text/plain\r\n", b"<body>x</body>"),
        (b"Content-Type: application/xhtml+xml\r\n", b"<body>x</body>"),
        (b"Content-Type: message/rfc822\r\n", b"Content-Type: text/html\r\n\r\n<body>x</body>"),
        (b"Content-Type: multipart/mixed\r\n", b"--b\r\nContent-Type: text/html\r\n\r\n<body>\r\n"),
        (b"Content-Type: multipart/mixed; boundary=b\r\n", b"no delimiters at all"),
        (b"", b"<body>x</body>"),
    ],
)
def test_parts_left_alone(header: bytes, body: bytes) -> None:
    raw = HEAD + header + b"\r\n" + body
    assert transform_html_parts(raw, add("!")) == raw


def test_pkcs7_and_multipart_encrypted_are_left_alone() -> None:
    raw = (
        HEAD + b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n'
        b"--m\r\nContent-Type: text/html\r\n\r\n<body>1</body>\r\n"
        b'--m\r\nContent-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
        b' boundary="e"\r\n\r\n'
        b"--e\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
        b"--e\r\nContent-Type: text/html\r\n\r\n<body>2</body>\r\n--e--\r\n"
        b"--m\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHA6CAMIACAQA=\r\n"
        b"--m--\r\n"
    )
    assert transform_html_parts(raw, add("!")) == raw.replace(b"1</body>", b"1!</body>", 1)


# --- malformed structure -------------------------------------------------------------------------


def test_missing_closing_delimiter_keeps_the_unterminated_part() -> None:
    raw = (
        HEAD + b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/html\r\n\r\n<body>1</body>\r\n"
        b"--b\r\nContent-Type: text/html\r\n\r\n<body>2</body>\r\n"
    )
    assert transform_html_parts(raw, add("!")) == raw.replace(b"1</body>", b"1!</body>")


def test_nested_multipart_without_its_closing_delimiter() -> None:
    raw = (
        HEAD + b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
        b'--outer\r\nContent-Type: multipart/alternative; boundary="inner"\r\n\r\n'
        b"--inner\r\nContent-Type: text/html\r\n\r\n<body>1</body>\r\n"
        b"--inner\r\nContent-Type: text/html\r\n\r\n<body>2</body>\r\n"
        b"--outer\r\nContent-Type: text/html\r\n\r\n<body>3</body>\r\n"
        b"--outer--\r\n"
    )
    out = transform_html_parts(raw, add("!"))
    assert out == raw.replace(b"1</body>", b"1!</body>").replace(b"3</body>", b"3!</body>")


def test_delimiter_lines_need_the_exact_boundary() -> None:
    raw = (
        HEAD + b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        b"--b \t\r\nContent-Type: text/html\r\n\r\n<body>1</body>\r\n"
        b"--bb\r\n--b-\r\n --b\r\n"
        b"--b--  \r\nepilogue\r\n--b\r\nContent-Type: text/html\r\n\r\n<body>2</body>\r\n"
    )
    out = transform_html_parts(raw, add("!"))
    assert out == raw.replace(b"1</body>", b"1!</body>")


def test_part_headers_that_are_not_headers_leave_the_part_alone() -> None:
    raw = (
        HEAD + b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/html\r\n<body>no empty line</body>\r\n\r\nmore\r\n"
        b"--b--\r\n"
    )
    assert transform_html_parts(raw, add("!")) == raw


def test_lf_only_messages_work_too() -> None:
    raw = (
        b"Subject: lf\nContent-Type: multipart/alternative; boundary=b\n\n"
        b"--b\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 7bit\n\n"
        b"<body>x</body>\n--b--\n"
    )
    assert transform_html_parts(raw, add("é")) == raw.replace(b"7bit", b"quoted-printable").replace(
        b"x</body>", b"x=C3=A9</body>"
    )


def test_deep_nesting_does_not_raise() -> None:
    depth = 2000
    raw = HEAD + b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(depth)
    )
    raw += b"Content-Type: text/html\r\n\r\n<body>x</body>\r\n"
    raw += b"".join(b"\r\n--b%d--" % i for i in reversed(range(depth)))
    assert transform_html_parts(raw, add("!")) == raw


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(ALL_FIXTURES),
    st.lists(st.tuples(st.floats(0, 1), st.binary(max_size=4)), max_size=4),
    st.floats(0.05, 1),
)
def test_damaged_messages_never_raise(
    name: str, damage: list[tuple[float, bytes]], cut: float
) -> None:
    data = bytearray(fixture(name))
    for where, junk in damage:
        position = int(where * len(data))
        data[position : position + len(junk)] = junk
    raw = bytes(data[: int(cut * len(data))])
    assert transform_html_parts(raw, lambda html: html) == raw
    track(raw)


# --- the quoted-printable encoder ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b" ", b"\t", b"=", b"\r\n", b"\r", b"\n", b"\xe9", b"x" * 40]))
)
def test_quoted_printable_round_trips_with_short_lines(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    encoded = _encode_qp(data, b"\r\n")
    assert binascii.a2b_qp(encoded) == data
    for line in encoded.split(b"\r\n"):
        assert len(line) <= 76
        assert not line.endswith((b" ", b"\t"))
        assert b"\r" not in line and b"\n" not in line


# The encoder's fast path (binascii.b2a_qp) against the line-by-line encoder it stands in for:
# the same bytes for any input, the line lengths around 75 (where b2a_qp's own rules differ)
# reached often.
QP_PIECES = [
    b"a",
    b".",
    b" ",
    b"\t",
    b"=",
    b"\x00",
    b"\xe9",
    b"\r\n",
    b"\r",
    b"\n",
    b".\r\n",
    b" \r\n",
    *(b"x" * n for n in (8, 70, 71, 72, 73, 74, 75, 76)),
]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(QP_PIECES)), st.sampled_from([b"\r\n", b"\n"]))
def test_quoted_printable_fast_path_is_byte_identical(pieces: list[bytes], newline: bytes) -> None:
    data = b"".join(pieces)
    lines = data.split(b"\r\n")
    fast = b"\r" not in b"".join(lines).replace(b"\n", b"\r") and b"\x00" not in data
    event(f"newline {newline!r}, {'CRLF only' if fast else 'lone CR or LF, or NUL'}")
    if newline == b"\r\n" and fast:
        encoded = binascii.b2a_qp(data + b"\r\n", istext=True)[:-2]
        agrees = _b2a_qp_agrees(data, lines, encoded)
        event(f"b2a_qp {'taken' if agrees else 'set aside'}")
        if agrees:
            assert encoded == _encode_qp_lines(data, newline)
    assert _encode_qp(data, newline) == _encode_qp_lines(data, newline)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_quoted_printable_fast_path_on_any_bytes(data: bytes) -> None:
    assert _encode_qp(data, b"\r\n") == _encode_qp_lines(data, b"\r\n")


@pytest.mark.parametrize(
    "data",
    [
        b"x" * 74 + b" \r\nnext",  # b2a_qp: a 77-character line ending in =20
        b"x" * 73 + b"\t",  # 76, at the end
        b".\r\nabc",  # b2a_qp escapes a lone dot at a line start
        b"abc\r\n.",  # and at the end
    ],
)
def test_quoted_printable_fast_path_steps_aside_where_b2a_qp_differs(data: bytes) -> None:
    encoded = binascii.b2a_qp(data + b"\r\n", istext=True)[:-2]
    assert encoded != _encode_qp_lines(data, b"\r\n")
    assert not _b2a_qp_agrees(data, data.split(b"\r\n"), encoded)
    assert _encode_qp(data, b"\r\n") == _encode_qp_lines(data, b"\r\n")


def test_quoted_printable_fast_path_takes_real_html() -> None:
    """The HTML parts of the fixtures (as CRLF text) go the fast way, and agree."""
    taken = 0
    for name in ALL_FIXTURES:
        for part in plan_html_parts(fixture(name)).html_parts:
            data = part.text.encode(part.codec, "surrogateescape")
            data = b"\r\n".join(data.splitlines())
            encoded = binascii.b2a_qp(data + b"\r\n", istext=True)[:-2]
            if _b2a_qp_agrees(data, data.split(b"\r\n"), encoded):
                taken += 1
                assert encoded == _encode_qp_lines(data, b"\r\n")
    assert taken >= 5


# --- the fast header reading agrees with the email package ---------------------------------------
#
# ``plan_html_parts`` reads header fields without ``email`` when a header block is plain and
# falls back to ``email`` (compat32) otherwise. The reference plan is the same walk with every
# block read by ``email``; whatever the input, both must give the same plan (or raise alike).


def outcome(function: Callable[[bytes], object], data: bytes) -> object:
    """What ``function`` returns for ``data``, or the type of what it raises."""
    try:
        return function(data)
    except Exception as error:
        return type(error)


def reference_plan(raw: bytes) -> MimePlan:
    return _plan(raw, _read_fields_by_email)


def spellings(*words: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([s for w in words for s in (w, w.lower(), w.upper(), w.swapcase())])


def chosen(values: list[bytes], alphabet: str = "") -> st.SearchStrategy[bytes]:
    """One of ``values``, or now and then a few random characters of ``alphabet``."""
    if not alphabet:
        return st.sampled_from(values)
    return st.one_of(
        st.sampled_from(values), st.text(alphabet, max_size=6).map(lambda s: s.encode())
    )


ANY_ASCII = "".join(map(chr, range(0x20, 0x7F))) + "\t\r\n\x0c"
PARAMETER_CHARACTERS = "aZ09-=;:\"'\\()<>*/?@ \t"
LINE_END = st.sampled_from([b"\r\n", b"\n"])
# blanks, folded or not, where a field value may have them
BLANKS = st.sampled_from([b"", b"", b" ", b"\t", b"  ", b"\r\n ", b"\n\t", b" \r\n\t"])
CONTENT_TYPES = spellings(b"text/html", b"Multipart/Alternative", b"multipart/mixed") | chosen(
    [
        b"multipart/signed",
        b"multipart/encrypted",
        b"text/plain",
        b"message/rfc822",
        b"text/html/x",
        b"text",
        b"",
        b"text /html",
        b"text/html(c)",
        b"multipart/mixed=x",
        b"text/h\xc3\xa9ml",
    ]
)
PARAMETER_NAMES = spellings(b"charset", b"boundary") | chosen(
    [b"format", b"name", b"charset*", b"boundary*", b"charset*0", b"boundary*1", b"", b"a b"],
    PARAMETER_CHARACTERS,
)
TOKEN_VALUES = [b"utf-8", b"ISO-8859-1", b"x-unknown", b"----=_Part_1.2", b"b", b"a'b", b"a/b"]
QUOTED_VALUES = [
    b'"utf-8"',
    b'"simple boundary "',
    b'"a;b"',
    b'""',
    b'"<b>"',
    b'"a\\"b"',
    b'"a\\\\b"',
    b'"=?utf-8?q?x?="',
    b'"(c)"',
    b'"caf\xc3\xa9"',
    b'"a\r\n b"',
    b'"tab\there"',
    b'"unterminated',
]
PARAMETER_VALUES = chosen(
    TOKEN_VALUES + QUOTED_VALUES + [b"", b"<b>", b"a b"], PARAMETER_CHARACTERS
)
DISPOSITIONS = spellings(b"attachment", b"inline") | chosen(
    [b"attachment; filename=a.html", b'attachment ; filename="x;y"', b"attachment (c)", b""],
    "ahimnt;() =?\xe9",
)
TRANSFER_ENCODINGS = spellings(b"7bit", b"8bit", b"binary", b"quoted-printable", b"base64") | (
    chosen([b"x-uuencode", b"", b"quoted-\r\n printable", b"base64 (c)", b"\xc3\xa9"])
)
OTHER_NAMES = st.sampled_from([b"Subject", b"X-Mailer", b"Content-ID", b"MIME-Version"])
OTHER_VALUES = [b"hello", b"caf\xc3\xa9", b"x\r\n\tcontent-type: text/html", b"=?utf-8?q?x?="]
BROKEN_LINES = st.sampled_from(
    [b"junk", b" continued", b"Content-Type : text/plain", b"From x", b"X-A: a\rb", b"X-\xe9: 1"]
)


@st.composite
def parameters(
    draw: st.DrawFn, forced: tuple[bytes, bytes] | None = None, noisy: bool = True
) -> bytes:
    """A Content-Type parameter list: ``;``, blanks and ``forced`` as ``name=value``; with
    ``noisy``, other pairs too, each now and then bare, empty or commented."""
    pairs = (
        draw(st.lists(st.tuples(PARAMETER_NAMES, PARAMETER_VALUES), max_size=3)) if noisy else []
    )
    if forced is not None:
        pairs.insert(draw(st.integers(0, len(pairs))), forced)
    out = b""
    for name, value in pairs:
        shape = draw(st.sampled_from(["pair"] * 6 + ["bare", "empty", "comment"])) if noisy else ""
        out += draw(BLANKS) + b";" + draw(BLANKS)
        if shape == "bare":
            out += name
        elif shape == "comment":
            out += name + b"=" + value + b" (comment)"
        elif shape != "empty":
            out += name + draw(BLANKS) + b"=" + draw(BLANKS) + value + draw(BLANKS)
    return out + draw(st.sampled_from([b"", b"", b";", b" ; "]))


@st.composite
def header_block(
    draw: st.DrawFn,
    content_type: bytes | None = None,
    forced: tuple[bytes, bytes] | None = None,
    noisy: bool = True,
    transfer_encodings: st.SearchStrategy[bytes] = TRANSFER_ENCODINGS,
) -> bytes:
    """A header block: Content-Type (``content_type`` with ``forced`` among its parameters when
    given), Content-Disposition, Content-Transfer-Encoding (one of ``transfer_encodings``) and
    other fields in any order, names in any case, values folded or not; with ``noisy``, odd
    values, any field missing or repeated and sometimes a line that is no field."""
    if content_type is None:
        content_type = draw(CONTENT_TYPES)
    type_value = draw(BLANKS) + content_type + draw(parameters(forced, noisy))
    fields = [(draw(spellings(b"Content-Type")), type_value)]
    dispositions = DISPOSITIONS if noisy else st.sampled_from([b"inline", b"INLINE", b"attachment"])
    fields += draw(st.lists(st.tuples(spellings(b"Content-Disposition"), dispositions), max_size=1))
    fields += draw(
        st.lists(st.tuples(spellings(b"Content-Transfer-Encoding"), transfer_encodings), max_size=1)
    )
    other_values = chosen(OTHER_VALUES, ANY_ASCII if noisy else "")
    fields += draw(st.lists(st.tuples(OTHER_NAMES, other_values), max_size=3))
    if noisy and draw(st.integers(0, 9)) == 0:  # a repeated field
        fields.append(draw(st.sampled_from(fields)))
    fields = draw(st.permutations(fields))
    if noisy and draw(st.integers(0, 5)) == 0:
        fields = fields[1:]  # no Content-Type
    lines = [name + b":" + draw(BLANKS) + value for name, value in fields]
    if noisy and draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(BROKEN_LINES))
    return b"".join(line + draw(LINE_END) for line in lines)


HTML_BODIES = {
    "7bit": b"<body><a href='https://x.test/1'>x</a></body>",
    "8bit": b"<body>caf\xc3\xa9</body>",
    "quoted-printable": b"<body>caf=C3=A9 =\r\n<a href=3D'https://x.test/2'>2</a></body>",
    "base64": base64.b64encode(b"<body>caf\xc3\xa9</body>"),
}
CHARSETS = chosen([b"utf-8", b'"utf-8"', b"UTF-8", b"iso-8859-1", b'"us-ascii"'])


@st.composite
def mime_entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    """An entity: an HTML part, a multipart of entities (delimited by its boundary, another
    one, or none; closed or not) or something else, headers as :func:`header_block` writes."""
    kind = draw(
        st.sampled_from(["html", "html", "other"] + (["multipart"] * 2 if depth < 3 else []))
    )
    newline = draw(LINE_END)
    noisy = draw(st.integers(0, 2)) == 0
    if kind == "html":
        encoding = draw(st.sampled_from(sorted(HTML_BODIES)))
        charset = (draw(spellings(b"charset")), draw(CHARSETS))
        encodings = TRANSFER_ENCODINGS if noisy else spellings(encoding.encode())
        head = draw(header_block(draw(spellings(b"text/html")), charset, noisy, encodings))
        if b"transfer-encoding" not in head.lower():
            head += b"Content-Transfer-Encoding: " + encoding.encode() + newline
        return head + newline + HTML_BODIES[encoding] + draw(st.sampled_from([b"", newline]))
    if kind == "other":
        return draw(header_block(noisy=noisy)) + newline + b"plain text" + newline
    boundary = draw(chosen([b"b", b"=_x 1", b"----=_Part.1", b"b-", b"a\\b"]))
    if not noisy:
        boundary += b"%d" % depth  # not the same as the enclosing multipart's
    quoted = b'"' + boundary + b'"'
    spelled = (
        quoted
        if b" " in boundary or b"\\" in boundary
        else draw(st.sampled_from([boundary, quoted]))
    )
    name = draw(spellings(b"boundary"))
    forced = draw(
        st.sampled_from(
            [(name, spelled)] * 4 + [(name + b"*0", spelled), (name, b'"other"'), (b"x", b"y")]
        )
    )
    content_type = draw(spellings(b"multipart/mixed", b"multipart/alternative"))
    head = draw(header_block(content_type, forced, noisy))
    body = draw(st.sampled_from([b"", b"preamble" + newline]))
    for part in draw(st.lists(mime_entity(depth + 1), max_size=3)):
        body += b"--" + boundary + draw(st.sampled_from([b"", b" \t"])) + newline + part + newline
    body += draw(
        st.sampled_from(
            [b"--" + boundary + b"--" + newline + b"epilogue", b"--" + boundary + b"--", b""]
        )
    )
    return head + newline + body


@settings(max_examples=500, deadline=None)
@given(header_block())
def test_fast_header_reading_agrees_with_email(head: bytes) -> None:
    fields = _read_plain_fields(head)
    event("read without email" if fields is not None else "read by email")
    if fields is not None:
        assert outcome(_read_fields_by_email, head) == fields
    assert outcome(_read_fields, head) == outcome(_read_fields_by_email, head)


@settings(max_examples=300, deadline=None)
@given(mime_entity())
def test_fast_plan_equals_the_plan_read_by_email(raw: bytes) -> None:
    plan = outcome(plan_html_parts, raw)
    assert plan == outcome(reference_plan, raw)
    if isinstance(plan, MimePlan):
        event(f"{len(plan.html_parts)} HTML parts")
        assert plan.render(lambda html: html) == raw


DAMAGE = st.sampled_from([b" ", b"\t", b";", b'"', b"\\", b"(", b"\r\n ", b"\n", b"*", b"\xe9"])


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(ALL_FIXTURES),
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 80), DAMAGE), min_size=1, max_size=4),
)
def test_fast_plan_of_damaged_fixtures_equals_the_plan_read_by_email(
    name: str, damage: list[tuple[int, int, bytes]]
) -> None:
    """Real-world header fields, each damage inserted in or near a Content-* field."""
    raw = fixture(name)
    for field, offset, junk in damage:
        fields = [m.start() + 1 for m in re.finditer(rb"(?i)\ncontent-", raw)] or [0]
        position = fields[field % len(fields)] + offset
        raw = raw[:position] + junk + raw[position:]
    assert outcome(plan_html_parts, raw) == outcome(reference_plan, raw)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_fixtures_are_read_without_email_and_as_email_reads_them(name: str) -> None:
    raw = fixture(name)
    heads: list[bytes] = []

    def record(head: bytes) -> _Fields | None:
        heads.append(head)
        return _read_fields(head)

    assert _plan(raw, record) == plan_html_parts(raw) == reference_plan(raw)
    for head in heads:
        assert _read_plain_fields(head) == _read_fields_by_email(head)


@pytest.mark.parametrize(
    ("head", "fields"),
    [
        (b"", _Fields("text/plain")),
        (
            b"Received: from a\r\n\tby b; Mon, 23 Nov 2026\r\nSubject: caf\xc3\xa9\r\n"
            b'Content-Type: multipart/alternative;\r\n\tboundary="----=_Part_0_1.2"\r\n',
            _Fields("multipart/alternative", boundary=b"----=_Part_0_1.2"),
        ),
        (
            b'content-type: TEXT/HTML; CHARSET="UTF-8"; format=flowed;\n'
            b"content-transfer-encoding:\n  Quoted-Printable\n",
            _Fields("text/html", encoding="quoted-printable", charset="utf-8"),
        ),
        (
            b'Content-Disposition: inline; filename="a b.html"\r\n'
            b"Content-Type: text/html ;\r\n charset = iso-8859-1 ;\r\n",
            _Fields("text/html", charset="iso-8859-1"),
        ),
        (
            b"Content-Type: text/html; charset=utf-8\r\nContent-Disposition: ATTACHMENT;"
            b" filename=x.html\r\nContent-Transfer-Encoding: base64\r\n",
            _Fields("text/html", attachment=True),
        ),
        (
            b'Content-Type: multipart/mixed; boundary="simple boundary "\r\n',
            _Fields("multipart/mixed", boundary=b"simple boundary"),
        ),
        (b'Content-Type: multipart/mixed; boundary=""\r\n', _Fields("multipart/mixed")),
        (
            b"Content-Type: multipart/mixed; Boundary=b; boundary=c\r\n",
            _Fields("multipart/mixed", boundary=b"b"),
        ),
        (
            b"Content-Type: multipart/mixed; boundary=----=_NextPart_000_0012\r\n",
            _Fields("multipart/mixed", boundary=b"----=_NextPart_000_0012"),
        ),
        # text/plain is read like text/html (the content checks decode it)
        (
            b"Content-Type: text/plain; charset=UTF-8; format=flowed\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n",
            _Fields("text/plain", encoding="quoted-printable", charset="utf-8"),
        ),
        (b"Content-Transfer-Encoding: base64\r\n", _Fields("text/plain", encoding="base64")),
    ],
)
def test_plain_header_blocks_are_read_without_email(head: bytes, fields: _Fields) -> None:
    assert _read_plain_fields(head) == fields
    assert _read_fields_by_email(head) == fields


@pytest.mark.parametrize(
    ("head", "fields"),
    [
        # RFC 2231 parameters
        (b"Content-Type: text/plain; name*=utf-8''%C3%A9\r\n", _Fields("text/plain")),
        # not a type/subtype: text/plain, its parameters as compat32 reads them
        (b"Content-Type: text\r\n", _Fields("text/plain")),
        (
            b"Content-Type: text/html; charset*=utf-8''utf-8\r\n",
            _Fields("text/html", charset="utf-8"),
        ),
        (
            b"Content-Type: multipart/mixed; boundary*0=a; boundary*1=b\r\n",
            _Fields("multipart/mixed", boundary=b"ab"),
        ),
        # a comment, a backslash escape, an encoded word, angle brackets
        (
            b"Content-Type: text/html; charset=latin1 (Western)\r\n",
            _Fields("text/html", charset="latin1 (western)"),
        ),
        (
            b'Content-Type: multipart/mixed; boundary="a\\"b"\r\n',
            _Fields("multipart/mixed", boundary=b'a"b'),
        ),
        (
            b"Content-Type: text/html; charset==?utf-8?q?utf-8?=\r\n",
            _Fields("text/html", charset="=?utf-8?q?utf-8?="),
        ),
        (
            b'Content-Type: multipart/mixed; boundary="<b>"\r\n',
            _Fields("multipart/mixed", boundary=b"b"),
        ),
        # a line break inside a quoted string, a blank inside a token, a bare attribute
        (
            b'Content-Type: multipart/mixed; boundary="a\r\n b"\r\n',
            _Fields("multipart/mixed", boundary=b"a\r\n b"),
        ),
        (
            b"Content-Type: multipart/mixed; boundary=a b\r\n",
            _Fields("multipart/mixed", boundary=b"a b"),
        ),
        (b"Content-Type: text/html; charset\r\n", _Fields("text/html")),
        # repeated fields: the first counts
        (b"Content-Type: text/html\r\nContent-Type: text/plain\r\n", _Fields("text/html")),
        (
            b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Transfer-Encoding: 7bit\r\n",
            _Fields("text/html", encoding="base64"),
        ),
        # not ASCII
        (b"Content-Type: text/html; charset=\xe9\r\n", _Fields("text/html")),
        # a blank before the colon ends the header fields for email
        (b"Content-Type : text/html\r\n", _Fields("text/plain")),
        # control characters, a bare CR, lines that are no fields
        (b"X-Note: a\x0cb\r\nContent-Type: text/html\r\n", _Fields("text/html")),
        (b"X-Note: a\rb\r\nContent-Type: text/html\r\n", None),
        (b" Content-Type: text/html\r\n", None),
        (b"From x\r\nContent-Type: text/html\r\n", None),
    ],
)
def test_unusual_header_blocks_are_read_by_email(head: bytes, fields: _Fields | None) -> None:
    assert _read_plain_fields(head) is None
    assert _read_fields(head) == _read_fields_by_email(head) == fields


def test_a_multipart_with_an_rfc2231_boundary_is_walked() -> None:
    raw = (
        HEAD + b'Content-Type: multipart/alternative; boundary*0="a"; boundary*1="b"\r\n\r\n'
        b"--ab\r\nContent-Type: text/html\r\n\r\n<body>1</body>\r\n--ab--\r\n"
    )
    assert transform_html_parts(raw, add("!")) == raw.replace(b"1</body>", b"1!</body>")


# --- the empty line and the delimiter lines, found with bytes.find -------------------------------


def split_entity_line_by_line(entity: bytes) -> tuple[bytes, bytes, bytes] | None:
    """What ``_split_entity`` must find: the first line that is only a line end."""
    position = 0
    while (end := entity.find(b"\n", position)) >= 0:
        line = entity[position : end + 1]
        if line in (b"\r\n", b"\n"):
            return entity[:position], line, entity[end + 1 :]
        position = end + 1
    return None


def delimiter_lines_by_regex(body: bytes, boundary: bytes) -> list[tuple[int, int, bool]]:
    """What ``_delimiter_lines`` must find (RFC 2046 5.1.1, transport padding allowed)."""
    pattern = re.compile(rb"^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$", re.M)
    return [(m.start(), m.end(), m.group(1) is not None) for m in pattern.finditer(body)]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"a", b":", b" ", b"\r", b"\n", b"\r\n", b"\n\n"])))
def test_split_entity_finds_the_first_empty_line(pieces: list[bytes]) -> None:
    entity = b"".join(pieces)
    assert _split_entity(entity) == split_entity_line_by_line(entity)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"b", b"b-", b"-", b"b\n--b", b"b\r\n b", b"a.b"]),
    st.lists(st.sampled_from([b"--", b"b", b"-", b" ", b"\t", b"\r", b"\n", b"x", b"a.b"])),
)
def test_delimiter_lines_are_those_of_rfc_2046(boundary: bytes, pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    assert list(_delimiter_lines(body, boundary)) == delimiter_lines_by_regex(body, boundary)


def test_an_unreadable_rfc2231_charset_leaves_the_part_as_it_is() -> None:
    """compat32 raises TypeError on ``charset*`` next to ``charset*0``; the part is then not
    rewritten (and the message not failed) instead."""
    raw = (
        b"Content-Type: multipart/alternative; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/html; charset*=x; charset*0=y\r\n\r\n"
        b'<a href="https://example.com/">x</a>\r\n--b--\r\n'
    )
    plan = plan_html_parts(raw)
    assert plan.html_parts == ()
    assert plan.render_body(lambda html: html.upper())[0] == raw[raw.index(b"\r\n\r\n") + 2 :]
