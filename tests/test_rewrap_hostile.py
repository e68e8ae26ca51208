"""Issue 11: hostile input through the re-wrap chain (items 1, 5 (chain side), 12 and 14).

Every recipient handed to the chain must come out as a copy to send or as a failure to bounce,
whatever the message holds; a header line is never split at a lone CR or LF; the
application's ``X-SmartRelay-*`` headers never reach a recipient; ``data-smartrelay-notrack``
never does either. The store is a stand-in that only answers the suppression look-up (the
chain's one query), so that hypothesis can run the chain thousands of times.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from smartrelay.config import DkimKey
from smartrelay.rewrap import chain as chain_module
from smartrelay.rewrap.chain import RewrapChain, RewrapResult, RewrapSettings
from smartrelay.rewrap.dkim import DkimSigner, generate_key
from smartrelay.rewrap.headers import split_header_block
from smartrelay.storage.store import ClaimedRecipient, Store, StoredMessage, Suppression
from smartrelay.tokens import MAX_URL_BYTES, TokenCodec, load_keyring

BASE_URL = "https://t.example.com"


class NoSuppressions:
    """What the chain asks of the store: nobody is suppressed."""

    async def active_suppressions(self, addresses: Iterable[str]) -> dict[str, Suppression]:
        list(addresses)
        return {}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> RewrapChain:
    directory = tmp_path_factory.mktemp("chain")
    path, _ = generate_key("example.com", "s1", "ed25519", str(directory / "dkim"))
    key = DkimKey("example.com", "s1", path, "ed25519-sha256")
    codec = TokenCodec(load_keyring(str(directory / "secret.key")))
    settings = RewrapSettings("relay.test", BASE_URL, "bounces.example.com")
    return RewrapChain(settings, codec, DkimSigner([key]), cast(Store, NoSuppressions()))


RECIPIENTS = (
    ClaimedRecipient(1, "Q1", "one@example.net", "example.net", 0),
    ClaimedRecipient(2, "Q1", "two@example.net", "example.net", 0),
)


def run(chain: RewrapChain, raw: bytes, options: dict[str, bool] | None = None) -> RewrapResult:
    """The chain on ``raw`` for two recipients (no thread pool: it completes at once)."""
    message = StoredMessage("Q1", 0.0, "news@example.com", (), {}, options or {}, raw)
    outcome: list[Any] = []
    Deferred.fromCoroutine(chain.run(message, RECIPIENTS)).addBoth(outcome.append)
    (result,) = outcome
    assert isinstance(result, RewrapResult), result
    return result


def header_lines(data: bytes) -> list[bytes]:
    """The header section's lines as the most lenient reader would cut them: at CR, LF or
    CRLF, whichever comes."""
    head = data.split(b"\r\n\r\n", 1)[0]
    return re.split(rb"\r\n|\r|\n", head)


def html_message(html: bytes, charset: bytes | None = b"utf-8", extra: bytes = b"") -> bytes:
    content_type = b"text/html" + (b"; charset=" + charset if charset else b"")
    return (
        b"From: Shop <news@example.com>\r\nTo: fan@example.net\r\nSubject: offers\r\n"
        b"MIME-Version: 1.0\r\n" + extra + b"Content-Type: " + content_type + b"\r\n"
        b"\r\n" + html + b"\r\n"
    )


# -- item 1: a bad link URL ------------------------------------------------------------------------
@pytest.mark.parametrize("charset", [b"utf-8", None], ids=["utf-8", "no-charset"])
def test_a_link_with_a_byte_its_charset_lacks_is_left_untracked(
    chain: RewrapChain, charset: bytes | None
) -> None:
    """``café`` in latin-1 inside a part declared UTF-8 (or ASCII by default) made the chain
    raise, and the message stayed ``delivering`` for ever."""
    bad = b'<a href="https://shop.example.com/caf\xe9">bad</a>'
    good = b'<a href="https://shop.example.com/ok">good</a>'
    html = b"<html><body>" + bad + good + b"</body></html>"
    result = run(chain, html_message(html, charset, b"Content-Transfer-Encoding: 8bit\r\n"))
    assert result.failed == ()
    assert [c.recipient.id for c in result.copies] == [1, 2]
    for copy in result.copies:
        assert bad in copy.body  # byte for byte as the application wrote it
        assert b"shop.example.com/ok" not in copy.body  # the good one is tracked
        assert copy.body.count(f'href="{BASE_URL}/c/'.encode()) == 1


def test_a_link_longer_than_a_token_carries_is_left_untracked(chain: RewrapChain) -> None:
    long_url = b"https://shop.example.com/?q=" + b"x" * MAX_URL_BYTES
    html = b'<html><body><a href="' + long_url + b'">long</a></body></html>'
    result = run(chain, html_message(html))
    assert result.failed == () and len(result.copies) == 2
    for copy in result.copies:
        assert long_url in copy.body
        assert f"{BASE_URL}/c/".encode() not in copy.body
        assert f"{BASE_URL}/o/".encode() in copy.body  # the pixel is still there


def test_a_step_that_raises_sends_the_copy_untracked(
    chain: RewrapChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever else may raise in tracking: the copy goes without it, still signed."""

    def broken(self: object, copy: object) -> None:
        raise RuntimeError("a bug in tracking")

    monkeypatch.setattr(chain_module.TrackingStep, "apply", broken)
    html = b'<html><body><a href="https://shop.example.com/">x</a></body></html>'
    result = run(chain, html_message(html, extra=b"X-SmartRelay-Tag: t\r\n"))
    assert result.failed == () and len(result.copies) == 2
    for copy in result.copies:
        assert copy.data.startswith(b"DKIM-Signature:")
        assert b'href="https://shop.example.com/"' in copy.body
        assert b"X-SmartRelay-Tag" not in copy.data
        assert copy.sender.startswith("b+")


def test_a_copy_that_cannot_be_made_at_all_is_a_failure_with_its_reason(
    chain: RewrapChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object, copy: object) -> None:
        raise ValueError("the signer \x1b[31mbroke")

    monkeypatch.setattr(chain_module.DkimStep, "apply", broken)
    result = run(chain, html_message(b"<p>hi</p>"))
    assert result.copies == ()
    assert [(r.id, why) for r, why in result.failed] == [
        (1, "ValueError: the signer ?[31mbroke"),
        (2, "ValueError: the signer ?[31mbroke"),
    ]


# -- item 5 (the chain's side): no header line from a lone CR or LF --------------------------------
@pytest.mark.parametrize("separator", [b"\r", b"\n", b"\r\r", b"\n\r"])
def test_a_lone_cr_or_lf_in_a_header_never_starts_a_header_line(
    chain: RewrapChain, separator: bytes
) -> None:
    raw = (
        b"Received: from evil.example" + separator + b"Authentication-Results: x; dkim=pass\r\n"
        b"\tby relay.test; Sat, 5 Dec 2026 12:00:00 +0000\r\n"
        b"From: news@example.com\r\nSubject: hi" + separator + b"Bcc: victim@example.org\r\n"
        b"\r\nbody\r\n"
    )
    result = run(chain, raw)
    assert len(result.copies) == 2
    for copy in result.copies:
        lines = header_lines(copy.data)
        assert not [line for line in lines if line.lower().startswith(b"authentication-results")]
        assert not [line for line in lines if line.lower().startswith(b"bcc")]
        spaces = b" " * len(separator)  # each lone CR or LF became a space
        assert b"evil.example" + spaces + b"Authentication-Results: x; dkim=pass\r\n" in copy.data
        assert copy.data.endswith(b"\r\n\r\nbody\r\n")


# -- item 12: the application's X-SmartRelay-ID ----------------------------------------------------
def test_an_x_smartrelay_id_from_the_application_is_removed(chain: RewrapChain) -> None:
    raw = html_message(
        b"<p>hi</p>", extra=b"X-SmartRelay-ID: FORGED\r\nx-smartrelay-id :\r\n also forged\r\n"
    )
    for copy in run(chain, raw).copies:
        ids = [line for line in header_lines(copy.data) if b"smartrelay-id" in line.lower()]
        assert ids == [b"X-SmartRelay-ID: Q1"]
        assert b"forged" not in copy.data.lower()


# -- item 14: data-smartrelay-notrack --------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"track_clicks": False},
        {"track_clicks": False, "track_opens": False},
        {},
    ],
    ids=["clicks-off", "tracking-off", "tracking-on"],
)
def test_the_notrack_attribute_is_removed_in_every_case(
    chain: RewrapChain, options: dict[str, bool]
) -> None:
    html = (
        b'<html><body><a href="https://shop.example.com/a" data-smartrelay-notrack>a</a>'
        b'<a DATA-SMARTRELAY-NOTRACK="1" href="https://shop.example.com/b">b</a></body></html>'
    )
    for copy in run(chain, html_message(html), options).copies:
        assert b"notrack" not in copy.body.lower()
        assert b'<a href="https://shop.example.com/a">a</a>' in copy.body
        assert b'<a href="https://shop.example.com/b">b</a>' in copy.body


# -- item 1: fuzzing -------------------------------------------------------------------------------
_CHARSETS = st.sampled_from(
    [b"utf-8", b"us-ascii", b"iso-8859-1", b"shift_jis", b"utf-16", b"x-unknown", b"", b'"utf-8']
)
_CTES = st.sampled_from([b"7bit", b"8bit", b"binary", b"quoted-printable", b"base64", b"x-uu", b""])
_JUNK = st.binary(max_size=40)
_URL = st.one_of(
    st.binary(max_size=60).map(lambda b: b"https://x.example/" + b),
    st.sampled_from(
        [b"https://x.example/caf\xe9", b"http://x.example/" + b"y" * 9000, b"mailto:a"]
    ),
    _JUNK,
)


@st.composite
def html_bodies(draw: st.DrawFn) -> bytes:
    pieces = draw(
        st.lists(
            st.one_of(
                _URL.map(lambda url: b'<a href="' + url + b'">x</a>'),
                _URL.map(lambda url: b"<a data-smartrelay-notrack href=" + url + b">x</a>"),
                st.sampled_from([b"<html><body>", b"</body></html>", b"<!--[if mso]>", b"<![x"]),
                _JUNK,
            ),
            max_size=8,
        )
    )
    return b"".join(pieces)


@st.composite
def entities(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A MIME entity: arbitrary extra header bytes, a content type, charset and transfer
    encoding from lists that include broken ones, and a body (HTML with links, multiparts
    nested a few deep, or junk)."""
    head = draw(st.sampled_from([b"", b"X-Junk: ", b"Subject: \r", b"\n", b"A:\rB: c\r\n"]))
    head += draw(_JUNK) + b"\r\n"
    kind = draw(st.sampled_from(["html", "multipart", "junk"] if depth < 3 else ["html", "junk"]))
    if kind == "multipart":
        boundary = draw(st.sampled_from([b"b1", b"b2", b"", b"\xff", b"a b"]))
        parts = draw(st.lists(entities(depth + 1), max_size=3))
        body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
        body += draw(st.sampled_from([b"--" + boundary + b"--\r\n", b"", b"--" + boundary]))
        head += b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n'
        return head + b"\r\n" + body
    charset = draw(_CHARSETS)
    cte = draw(_CTES)
    head += b"Content-Type: text/html; charset=" + charset + b"\r\n"
    head += b"Content-Transfer-Encoding: " + cte + b"\r\n"
    body = draw(html_bodies()) if kind == "html" else draw(st.binary(max_size=200))
    if cte == b"base64" and draw(st.booleans()):
        import base64

        body = base64.b64encode(body)
    return head + draw(st.sampled_from([b"\r\n", b"\n", b""])) + body


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    entity=entities(),
    options=st.fixed_dictionaries(
        {}, optional={"track_opens": st.booleans(), "track_clicks": st.booleans()}
    ),
)
def test_fuzz_every_recipient_ends_with_a_copy_or_a_failure(
    chain: RewrapChain, entity: bytes, options: dict[str, bool]
) -> None:
    raw = b"From: news@example.com\r\nX-SmartRelay-ID: forged\r\n" + entity
    result = run(chain, raw, options)
    ids = sorted([c.recipient.id for c in result.copies] + [r.id for r, _ in result.failed])
    assert ids == [1, 2]
    for copy in result.copies:
        data = copy.data
        head = data.split(b"\r\n\r\n", 1)[0]
        # CRLF line ends only in the header section, and ours the only X-SmartRelay-*.
        assert b"\r" not in head.replace(b"\r\n", b"") and b"\n" not in head.replace(b"\r\n", b"")
        ours = [line for line in header_lines(data) if line.lower().startswith(b"x-smartrelay")]
        assert ours == [b"X-SmartRelay-ID: Q1"]


@pytest_twisted.ensureDeferred
async def test_fuzz_corpus_from_the_mime_fixtures(chain: RewrapChain) -> None:
    """The MIME fixtures with bytes flipped: still a copy (or failure) for everyone."""
    fixtures = sorted((Path(__file__).parent / "fixtures" / "mime").glob("*.eml"))
    assert fixtures
    for path in fixtures:
        raw = path.read_bytes()
        for position in range(0, len(raw), max(1, len(raw) // 23)):
            for byte in (b"\xe9", b"\r", b"\n", b"\x00"):
                mutated = raw[:position] + byte + raw[position + 1 :]
                result = run(chain, mutated)
                assert len(result.copies) + len(result.failed) == 2, path.name


@given(
    lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
    rest=st.binary(max_size=30),
    blank=st.booleans(),
)
# No header field at all, then a lone CR in the body: the empty first line ends the (empty)
# header section, so the body's CR is not a header's to be replaced (found by this test).
@example(lines=[], rest=b"\r", blank=True)
def test_splitting_a_well_formed_header_section_changes_no_byte(
    lines: list[bytes], rest: bytes, blank: bool
) -> None:
    """Lines that end in CRLF and hold no lone CR or LF come back byte for byte (forwarder
    mode joins the split back and sends that)."""
    raw = b"".join(line + b"\r\n" for line in lines) + (b"\r\n" + rest if blank else b"")
    fields, after = split_header_block(raw)
    assert b"".join(fields) + after == raw
