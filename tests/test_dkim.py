"""DKIM signing: independent verification (Perl Mail::DKIM for RSA, dkimpy for both), byte
identity with dkimpy's own pure-Python signing, key lookup, key files and key generation."""

from __future__ import annotations

import base64
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal
from unittest import mock

import attrs
import dkim
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from smartrelay.config import DkimAlgorithm, DkimKey
from smartrelay.rewrap.dkim import (
    _BARE_LF,
    OVERSIGNED_HEADERS,
    SIGNED_HEADERS,
    DkimError,
    DkimSigner,
    LoadedKey,
    _parsed_from_fields,
    _signed_fields,
    author_domain,
    generate_key,
    relaxed_body,
    sign_parsed,
    signed_header_names,
    txt_record,
    txt_record_name,
    zone_file_entry,
)
from smartrelay.rewrap.headers import split_header_block
from tests.conftest import PerlVerify

DOMAIN = "example.com"
NOW = 1_700_000_000


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def _base64_lines(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii")


PDF_ATTACHMENT = _base64_lines(b"%PDF-1.4 " + bytes(range(256)) * 24)
PNG_ATTACHMENT = _base64_lines(b"\x89PNG\r\n\x1a\n" + bytes(range(255, -1, -1)) * 8)

PLAIN = crlf(
    """From: App <app@example.com>
To: user@example.net
Subject: Plain
Date: Tue, 14 Nov 2023 22:13:20 +0000
Message-ID: <plain@example.com>

Hello,
this is plain text.
"""
)

MULTIPART = crlf(
    f"""From: "Shop Example" <orders@example.com>
To: Customer <customer@example.net>
Subject: Your invoice
Date: Tue, 14 Nov 2023 22:13:20 +0000
Message-ID: <invoice-1@example.com>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

This is a multi-part message in MIME format.

--outer
Content-Type: multipart/alternative; boundary="inner"

--inner
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Your invoice is attached. Gr=C3=BC=C3=9Fe
--inner
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<p>Your invoice is attached.</p><img src=3D"cid:logo@example.com">
--inner--

--outer
Content-Type: application/pdf; name="invoice.pdf"
Content-Disposition: attachment; filename="invoice.pdf"
Content-Transfer-Encoding: base64

{PDF_ATTACHMENT}
--outer
Content-Type: image/png; name="logo.png"
Content-Disposition: inline; filename="logo.png"
Content-ID: <logo@example.com>
Content-Transfer-Encoding: base64

{PNG_ATTACHMENT}
--outer--
"""
)

ODD_WHITESPACE = crlf(
    "From:\tSender   Name <sender@example.com>   \n"
    "To: first@example.net,\n"
    "\tsecond@example.net,\n"
    "        third@example.net\n"
    "Subject:   A   subject\twith  odd   spacing   \n"
    " and a folded\tcontinuation\t\n"
    "Date: Tue, 14 Nov 2023 22:13:20 +0000\n"
    "X-Custom:value-without-space\n"
    "Message-ID:<odd@example.com>\n"
    "\n"
    "Line with trailing spaces   \n"
    "Line\twith\t\ttabs  and  spaces\n"
    "\n"
    "   indented line\t\n"
    "\n"
    "\n"
    "\n"
)

LIST_UNSUBSCRIBE = crlf(
    """Received: from app.example.com (app.example.com [192.0.2.1])
\tby relay.example.com with ESMTP id 1234; Tue, 14 Nov 2023 22:13:20 +0000
From: News <news@news.example.com>
To: reader@example.net
Subject: Weekly news
Date: Tue, 14 Nov 2023 22:13:20 +0000
Message-ID: <weekly-1@news.example.com>
List-Id: Weekly news <weekly.news.example.com>
List-Unsubscribe: <https://relay.example.com/u/AbCdEf0123>,
 <mailto:u+AbCdEf0123@bounces.example.com>
List-Unsubscribe-Post: List-Unsubscribe=One-Click
X-Mailer: app 1.0
Content-Type: text/plain; charset=us-ascii

Unsubscribe any time.
"""
)

UTF8_8BIT = crlf(
    """From: =?utf-8?q?J=C3=BCrgen?= <juergen@example.com>
To: Zoë <zoe@example.net>
Subject: Grüße aus Köln ✓
Date: Tue, 14 Nov 2023 22:13:20 +0000
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Grüße, ça va?  Это тест.\t
日本語のテキスト。 🎉
"""
)

NO_BODY = b"From: app@example.com\r\nTo: user@example.net\r\nSubject: empty\r\n\r\n"

MESSAGES: dict[str, bytes] = {
    "plain": PLAIN,
    "multipart": MULTIPART,
    "odd-whitespace": ODD_WHITESPACE,
    "list-unsubscribe": LIST_UNSUBSCRIBE,
    "utf8-8bit": UTF8_8BIT,
    "no-body": NO_BODY,
}
MESSAGE_IDS = list(MESSAGES)


# -- fixtures -------------------------------------------------------------------------------


@attrs.frozen
class KeyFiles:
    rsa: DkimKey
    ed25519: DkimKey
    #: TXT record name -> record
    records: dict[str, str]


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    directory = str(tmp_path_factory.mktemp("dkim-keys"))
    rsa_path, rsa_record = generate_key(DOMAIN, "rsa1", "rsa", directory)
    ed_path, ed_record = generate_key(DOMAIN, "ed1", "ed25519", directory)
    return KeyFiles(
        rsa=DkimKey(DOMAIN, "rsa1", rsa_path, "rsa-sha256"),
        ed25519=DkimKey(DOMAIN, "ed1", ed_path, "ed25519-sha256"),
        records={
            txt_record_name(DOMAIN, "rsa1"): rsa_record,
            txt_record_name(DOMAIN, "ed1"): ed_record,
        },
    )


@pytest.fixture(scope="module")
def both_keys_signer(key_files: KeyFiles) -> DkimSigner:
    """One signer for every example of a hypothesis test: loading an RSA key takes 50-200 ms
    (OpenSSL checks it), a signature 1 ms."""
    return DkimSigner([key_files.rsa, key_files.ed25519], now=lambda: NOW + 0.75)


def dnsfunc_for(records: Mapping[str, str]) -> Callable[..., bytes | None]:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        record = records.get(name.decode("ascii").rstrip(".").lower())
        return record.encode("ascii") if record is not None else None

    return dnsfunc


def dkimpy_verify(message: bytes, records: Mapping[str, str]) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of the message, topmost first."""
    count = len(re.findall(rb"(?im)^dkim-signature:", message.split(b"\r\n\r\n", 1)[0]))
    checker = dkim.DKIM(message)
    verdicts = []
    for i in range(count):
        try:
            verdicts.append(checker.verify(idx=i, dnsfunc=dnsfunc_for(records)))
        except dkim.NaClNotFoundError:
            raise  # PyNaCl (a test dependency) is missing: not a verdict
        except dkim.DKIMException:  # e.g. "body hash mismatch"
            verdicts.append(False)
    return verdicts


def signature_tags(signed: bytes, index: int = 0) -> dict[str, str]:
    fields = re.findall(rb"(?ims)^DKIM-Signature:(.*?)\r?\n(?=\S)", signed)
    text = re.sub(r"\s+", "", fields[index].decode("ascii"))
    return dict(tag.split("=", 1) for tag in text.split(";") if tag)


# -- independent verification ----------------------------------------------------------------


@pytest.mark.parametrize("name", MESSAGE_IDS)
def test_rsa_signature_verified_by_mail_dkim(
    name: str, key_files: KeyFiles, perl_verify: PerlVerify
) -> None:
    message = MESSAGES[name]
    signed = DkimSigner([key_files.rsa]).sign(message)
    assert signed.endswith(message) and signed.startswith(b"DKIM-Signature: ")
    lines = perl_verify(signed, key_files.records)
    assert lines[0] == "pass", lines
    assert lines[1] == "signature d=example.com s=rsa1 a=rsa-sha256 result=pass detail=pass"
    # And by dkimpy.
    assert dkimpy_verify(signed, key_files.records) == [True]


@pytest.mark.parametrize("name", MESSAGE_IDS)
def test_ed25519_signature_verified_by_dkimpy(name: str, key_files: KeyFiles) -> None:
    # Debian 12's Mail::DKIM (1.20230212) has no ed25519-sha256; dkimpy verifies these (with
    # PyNaCl, independently of the cryptography library that signed).
    message = MESSAGES[name]
    signed = DkimSigner([key_files.ed25519]).sign(message)
    assert signature_tags(signed)["a"] == "ed25519-sha256"
    assert dkimpy_verify(signed, key_files.records) == [True]
    # The wrong public key fails.
    other = ed25519.Ed25519PrivateKey.generate()
    wrong = {txt_record_name(DOMAIN, "ed1"): txt_record(other)}
    assert dkimpy_verify(signed, wrong) == [False]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name", MESSAGE_IDS)
async def test_signing_in_a_thread_pool_gives_the_same_fields(
    name: str, key_files: KeyFiles
) -> None:
    """The chain signs with the key operations in the reactor's thread pool (they release the
    GIL): the fields are byte-identical to signing on the calling thread."""
    message = MESSAGES[name]
    signer = DkimSigner([key_files.rsa, key_files.ed25519], now=lambda: NOW)
    threads: list[str] = []

    def in_thread(work: Callable[[], bytes]) -> Deferred[bytes]:
        def run() -> bytes:
            threads.append(threading.current_thread().name)
            return work()

        return deferToThread(run)

    fields = b"".join(await signer.signature_fields_off_thread(message, in_thread))
    assert fields + message == signer.sign(message)
    assert len(threads) == 2 and threading.main_thread().name not in threads
    # Given the message already split (as the chain has it), the result is the same.
    split = split_header_block(message)
    headers, body = dkim.rfc822_parse(message)
    assert _parsed_from_fields(*split) == (headers, body)  # the fast path, the same parse
    assert b"".join(await signer.signature_fields_off_thread(message, in_thread, split)) == fields
    # Bare LF line ends: not a plain split, dkimpy's parse normalises them (same fields).
    lf = message.replace(b"\r\n", b"\n")
    assert _parsed_from_fields(*split_header_block(lf)) is None
    assert b"".join(
        await signer.signature_fields_off_thread(lf, in_thread, split_header_block(lf))
    ) == signer.signature_fields(lf)
    unsigned = b"Subject: no From\r\n\r\nbody\r\n"
    assert await signer.signature_fields_off_thread(unsigned, in_thread) == []


@pytest.mark.parametrize("name", MESSAGE_IDS)
def test_signing_inline_with_the_split_gives_the_same_fields(
    name: str, key_files: KeyFiles
) -> None:
    """A delivery process signs in its reactor's thread, from the copy as the chain has it
    split: the same fields as the threaded way and as signing the whole message."""
    message = MESSAGES[name]
    signer = DkimSigner([key_files.rsa, key_files.ed25519], now=lambda: NOW)
    whole = signer.signature_fields(message)
    assert b"".join(signer.signature_field_list(message, split_header_block(message))) == whole
    assert b"".join(signer.signature_field_list(message)) == whole
    lf = message.replace(b"\r\n", b"\n")  # not a plain split: dkimpy's parse, same fields
    fields = signer.signature_field_list(lf, split_header_block(lf))
    assert b"".join(fields) == signer.signature_fields(lf)
    assert signer.signature_field_list(b"Subject: no From\r\n\r\nbody\r\n") == []


@pytest.mark.parametrize("name", MESSAGE_IDS)
def test_dual_signature(name: str, key_files: KeyFiles, perl_verify: PerlVerify) -> None:
    """A domain with an RSA and an Ed25519 key gets both signatures, the first configured on
    top. Mail::DKIM checks the RSA one (over the same h= and bh= as the Ed25519 one)."""
    message = MESSAGES[name]
    signed = DkimSigner([key_files.rsa, key_files.ed25519], now=lambda: NOW).sign(message)
    rsa_tags, ed_tags = signature_tags(signed, 0), signature_tags(signed, 1)
    assert (rsa_tags["s"], ed_tags["s"]) == ("rsa1", "ed1")
    assert rsa_tags["bh"] == ed_tags["bh"] and rsa_tags["h"] == ed_tags["h"]
    assert dkimpy_verify(signed, key_files.records) == [True, True]
    lines = perl_verify(signed, key_files.records)
    assert lines[0] == "pass"
    assert "s=rsa1 a=rsa-sha256 result=pass" in lines[1]
    # Never "fail": either verified or (this Mail::DKIM) not understood.
    assert re.search(
        r"s=ed1 a=ed25519-sha256 result=(pass|invalid detail=invalid \(unsupported)", lines[2]
    ), lines


def test_relaxed_canonicalisation_tolerates_whitespace_changes(
    key_files: KeyFiles, perl_verify: PerlVerify
) -> None:
    signed = DkimSigner([key_files.rsa]).sign(PLAIN)
    changed = (
        signed.replace(b"Subject: Plain", b"Subject:   Plain \t")
        .replace(b"To: user@example.net", b"To: user@example.net\r\n ")
        .replace(b"Hello,", b"Hello,   ")
        + b"\r\n\r\n"
    )
    assert perl_verify(changed, key_files.records)[0] == "pass"


@pytest.mark.parametrize(
    ("old", "new", "detail"),
    [
        (b"plain text.", b"plain text!", "body has been altered"),
        (b"Subject: Plain", b"Subject: Plan", "message has been altered"),
        (b"To: user@example.net", b"To: other@example.net", "message has been altered"),
    ],
)
def test_tampering_detected(
    old: bytes, new: bytes, detail: str, key_files: KeyFiles, perl_verify: PerlVerify
) -> None:
    signed = DkimSigner([key_files.rsa]).sign(PLAIN)
    assert perl_verify(signed, key_files.records)[0] == "pass"
    tampered = signed.replace(old, new)
    assert perl_verify(tampered, key_files.records)[0] == f"fail ({detail})"
    assert dkimpy_verify(tampered, key_files.records) == [False]


@pytest.mark.parametrize("where", ["top", "after-from", "end-of-header"])
def test_oversigned_from_defeats_an_added_from(
    where: str, key_files: KeyFiles, perl_verify: PerlVerify
) -> None:
    signed = DkimSigner([key_files.rsa]).sign(PLAIN)
    assert signature_tags(signed)["h"].split(":").count("from") == 2
    evil = b"From: Bank <security@attacker.example>\r\n"
    if where == "top":
        attacked = evil + signed
    elif where == "after-from":
        attacked = signed.replace(
            b"From: App <app@example.com>\r\n", b"From: App <app@example.com>\r\n" + evil
        )
    else:
        attacked = signed.replace(b"\r\n\r\n", b"\r\n" + evil + b"\r\n", 1)
    assert attacked != signed
    assert perl_verify(attacked, key_files.records)[0].startswith("fail")


def test_without_oversigning_an_added_from_would_pass(
    key_files: KeyFiles, perl_verify: PerlVerify
) -> None:
    """The control for the test above: a signature listing From only once survives a From
    added on top (verifiers take the bottom-most instance), which is the attack."""
    with open(key_files.rsa.private_key, "rb") as f:
        pem = f.read()
    header = dkim.sign(
        PLAIN,
        b"rsa1",
        DOMAIN.encode(),
        pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject"],
    )
    attacked = b"From: Bank <security@attacker.example>\r\n" + header + PLAIN
    assert perl_verify(attacked, key_files.records)[0] == "pass"


def test_lf_line_endings(key_files: KeyFiles, perl_verify: PerlVerify) -> None:
    message = PLAIN.replace(b"\r\n", b"\n")
    signed = DkimSigner([key_files.rsa]).sign(message)
    assert b"\r" not in signed
    assert perl_verify(signed, key_files.records)[0] == "pass"


# -- byte identity with dkimpy ---------------------------------------------------------------


def reference_header_names(headers: Sequence[Sequence[bytes]]) -> list[bytes]:
    """The h= list as the signer's documentation states it, written out independently."""
    names = [name.lower() for name, *_ in headers if name.lower() in SIGNED_HEADERS]
    return names + [name for name in OVERSIGNED_HEADERS if name in names]


def dkimpy_reference(
    message: bytes, key: LoadedKey, private_key_text: bytes, now: float = NOW + 0.75
) -> bytes:
    """dkimpy's own (pure-Python RSA / PyNaCl Ed25519) DKIM-Signature at time ``now``, signing
    the fields :func:`reference_header_names` lists."""
    headers, _ = dkim.rfc822_parse(message)
    with mock.patch.object(time, "time", return_value=now):
        return dkim.sign(
            message,
            key.selector.encode(),
            key.domain.encode(),
            private_key_text,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=key.algorithm.encode(),
            include_headers=reference_header_names(headers),
            linesep=b"\r\n" if b"\r\n" in message else b"\n",
        )


def dkimpy_key_text(key: LoadedKey) -> bytes:
    """The key as dkimpy takes it: PKCS#1 PEM for RSA, the base64 seed for Ed25519."""
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        return key.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    seed = key.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(seed)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
@pytest.mark.parametrize("name", [*MESSAGE_IDS, "lf"])
def test_byte_identical_to_dkimpy(name: str, algorithm: str, key_files: KeyFiles) -> None:
    message = MESSAGES[name] if name != "lf" else PLAIN.replace(b"\r\n", b"\n")
    spec = key_files.rsa if algorithm == "rsa" else key_files.ed25519
    signer = DkimSigner([spec], now=lambda: NOW + 0.75)
    key = signer.keys[0]
    ours = signer.sign(message)
    reference = dkimpy_reference(message, key, dkimpy_key_text(key))
    assert ours == reference + message
    tags = signature_tags(ours)
    assert tags["t"] == str(NOW) and "x" not in tags and "l" not in tags
    assert tags["c"] == "relaxed/relaxed"


# -- what is signed --------------------------------------------------------------------------


def test_signed_header_list(key_files: KeyFiles) -> None:
    signed = DkimSigner([key_files.rsa]).sign(LIST_UNSUBSCRIBE)
    assert signature_tags(signed)["h"].split(":") == [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "list-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "content-type",
        "from",
    ]
    tags = signature_tags(signed)
    assert (tags["d"], tags["s"], tags["a"], tags["i"]) == (
        "example.com",
        "rsa1",
        "rsa-sha256",
        "@example.com",
    )


def test_signed_headers_constant() -> None:
    assert len(set(SIGNED_HEADERS)) == len(SIGNED_HEADERS)
    assert set(dkim.DKIM.SHOULD) | {b"list-unsubscribe-post"} == set(SIGNED_HEADERS)
    assert signed_header_names([[b"Received", b" x\r\n"], [b"FROM", b" a@b.c\r\n"]]) == [
        b"from",
        b"from",
    ]


def test_timestamp_from_clock(key_files: KeyFiles) -> None:
    now = [1_800_000_000.9]
    signer = DkimSigner([key_files.ed25519], now=lambda: now[0])
    assert signature_tags(signer.sign(PLAIN))["t"] == "1800000000"
    now[0] += 60
    assert signature_tags(signer.sign(PLAIN))["t"] == "1800000060"
    # Default: the wall clock.
    before = int(time.time())
    t = int(signature_tags(DkimSigner([key_files.ed25519]).sign(PLAIN))["t"])
    assert before <= t <= time.time()


@pytest.mark.parametrize(
    "message",
    [
        b"To: user@example.net\r\nSubject: no From\r\n\r\nbody\r\n",
        b"From: undisclosed:;\r\nTo: user@example.net\r\n\r\nbody\r\n",
        b"From: nobody\r\nTo: user@example.net\r\n\r\nbody\r\n",
        b"From: a@example.com\r\nFrom: b@example.com\r\n\r\ntwo From fields\r\n",
        b"From: a@other.example\r\n\r\nno key for this domain\r\n",
        b"From: a@badexample.com\r\n\r\nnot a subdomain of example.com\r\n",
        b" starts with a continuation\r\nFrom: a@example.com\r\n\r\nbody\r\n",
        b"From: a@example.com\r\nnot a header line\r\n\r\nbody\r\n",
        b"",
    ],
)
def test_unsigned_messages_unchanged(message: bytes, key_files: KeyFiles) -> None:
    assert DkimSigner([key_files.rsa]).sign(message) is message


def test_no_keys_signs_nothing() -> None:
    signer = DkimSigner([])
    assert signer.sign(PLAIN) is PLAIN
    assert signer.key_for("example.com") is None


def test_from_variants(key_files: KeyFiles) -> None:
    signer = DkimSigner([key_files.rsa])
    for from_field in (
        b"From: =?utf-8?q?J=C3=BCrgen?= <j@EXAMPLE.com>",
        b'From: "Doe, John" <john@mail.example.com> (comment)',
        b"From: first@example.com, second@other.example",
        b"From:\r\n Folded Name\r\n <folded@example.com>",
        b"from: lower@example.com.",
    ):
        message = from_field + b"\r\nSubject: x\r\n\r\nbody\r\n"
        assert signer.sign(message).startswith(b"DKIM-Signature: "), from_field


# -- key_for ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_keys(tmp_path_factory: pytest.TempPathFactory) -> list[DkimKey]:
    directory = str(tmp_path_factory.mktemp("many"))
    keys = []
    for domain, selector in [
        ("example.com", "a"),
        ("example.com", "b"),
        ("mail.example.com", "m"),
        ("example.org", "o"),
    ]:
        path, _ = generate_key(domain, selector, "ed25519", directory)
        keys.append(DkimKey(domain, selector, path, "ed25519-sha256"))
    return keys


@pytest.mark.parametrize(
    ("from_domain", "expected"),
    [
        ("example.com", ("example.com", "a")),
        ("news.example.com", ("example.com", "a")),
        ("a.b.news.example.com", ("example.com", "a")),
        ("mail.example.com", ("mail.example.com", "m")),
        ("x.mail.example.com", ("mail.example.com", "m")),
        ("NEWS.Example.COM", ("example.com", "a")),
        ("Mail.Example.Com.", ("mail.example.com", "m")),
        ("example.org", ("example.org", "o")),
        ("badexample.com", None),
        ("com", None),
        ("example.net", None),
        ("", None),
        ("bücher.example", None),
    ],
)
def test_key_for(
    from_domain: str, expected: tuple[str, str] | None, many_keys: list[DkimKey]
) -> None:
    key = DkimSigner(many_keys).key_for(from_domain)
    assert (None if key is None else (key.domain, key.selector)) == expected


def test_keys_for_and_case(many_keys: list[DkimKey]) -> None:
    upper = [attrs.evolve(k, domain=k.domain.upper()) for k in many_keys]
    signer = DkimSigner(upper)
    assert [k.selector for k in signer.keys_for("www.EXAMPLE.com")] == ["a", "b"]
    assert [k.selector for k in signer.keys_for("nowhere.test")] == []
    signed = signer.sign(b"From: x@Sub.Example.COM\r\n\r\nbody\r\n")
    assert [signature_tags(signed, i)["s"] for i in (0, 1)] == ["a", "b"]
    assert signature_tags(signed)["d"] == "example.com"


def test_idn_from_domain(tmp_path: Path) -> None:
    path, _ = generate_key("xn--bcher-kva.example", "s", "ed25519", str(tmp_path))
    signer = DkimSigner([DkimKey("xn--bcher-kva.example", "s", path, "ed25519-sha256")])
    key = signer.key_for("news.bücher.example")
    assert key is not None and key.domain == "xn--bcher-kva.example"
    message = "From: a@Bücher.example\r\n\r\nbody\r\n".encode()
    assert signature_tags(signer.sign(message))["d"] == "xn--bcher-kva.example"


# -- key files -------------------------------------------------------------------------------


SHORT_RSA_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEAvTKHGRkaafzJHonT
z89sZgcEcJSA62nlRePB7/GgQVR5ZZva2SLxX6RSQf7/HnHBjku3fLZhMKaST3bC
JXgS4QIDAQABAkA2CKE21MmLbYuO8jQRDJ9bwDNPZ8ot8a9uN27i9TIcleKlNzFW
Y/3Ovk1L4vCk7QCbIz70ve/9n8DANzZYc5s1AiEA6lKiKFym0NnUz5mbSyLVdm+k
zPiCVjxngYePLfN6wJ8CIQDOszVZucFRfc7Mcd47Txar7S7QQYcDeoHcYhcrKEr8
fwIgX+hChtKlVIZUHER6014GkNtRULPGZRWEJ/gcGmq1q3ECIEoS0uWqueq4SSnf
DKL4fslyIDqloPrQJkWSKXdf4y+FAiEAwopFVsspDKsYWcJvG0AUFxLvPthZiVfH
1wtZ8JbLy9k=
-----END PRIVATE KEY-----
"""


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("content", "algorithm", "problem"),
    [
        (b"", "rsa-sha256", "not a PEM private key"),
        (b"hello world\n", "ed25519-sha256", "not a PEM private key"),
        (base64.b64encode(b"x" * 31), "ed25519-sha256", "32-byte seed"),
        (
            b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
            "rsa-sha256",
            "not a usable PEM private key",
        ),
        (SHORT_RSA_PEM, "rsa-sha256", "RSA key of 512 bits is too short"),
        (SHORT_RSA_PEM, "ed25519-sha256", "needs an Ed25519 key, found RSA"),
        (base64.b64encode(b"s" * 32), "rsa-sha256", "needs an RSA key, found Ed25519"),
        (
            ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
            "ed25519-sha256",
            "encrypted private keys are not supported",
        ),
    ],
)
def test_bad_key_file(
    content: bytes, algorithm: Literal["rsa-sha256", "ed25519-sha256"], problem: str, tmp_path: Path
) -> None:
    path = write(tmp_path / "bad.pem", content)
    with pytest.raises(DkimError) as raised:
        DkimSigner([DkimKey(DOMAIN, "s1", path, algorithm)])
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and problem in message
    assert "\n" not in message


def test_missing_key_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.pem")
    with pytest.raises(DkimError, match=r"missing\.pem: cannot read DKIM private key: No such"):
        DkimSigner([DkimKey(DOMAIN, "s1", path)])


def test_key_formats_sign_alike(key_files: KeyFiles, tmp_path: Path) -> None:
    """PKCS#1 and PKCS#8 RSA; PKCS#8 PEM and dkimpy's base64 seed for Ed25519."""
    signer = DkimSigner([key_files.rsa, key_files.ed25519], now=lambda: NOW)
    rsa_key, ed_key = signer.keys
    assert isinstance(rsa_key.private_key, rsa.RSAPrivateKey)
    pkcs1 = write(tmp_path / "pkcs1.pem", dkimpy_key_text(rsa_key))
    seed = write(tmp_path / "seed.key", dkimpy_key_text(ed_key) + b"\n")
    assert b"BEGIN RSA PRIVATE KEY" in Path(pkcs1).read_bytes()
    other = DkimSigner(
        [
            attrs.evolve(key_files.rsa, private_key=pkcs1),
            attrs.evolve(key_files.ed25519, private_key=seed),
        ],
        now=lambda: NOW,
    )
    assert other.sign(MULTIPART) == signer.sign(MULTIPART)
    assert [k.txt_record for k in other.keys] == list(key_files.records.values())


# -- generate_key ----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_generate_key(algorithm: Literal["rsa", "ed25519"], tmp_path: Path) -> None:
    directory = tmp_path / "keys" / "dkim"
    path, record = generate_key("Example.COM", "s2024", algorithm, str(directory))
    assert path == str(directory / "example.com.s2024.pem")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    # The record is a DKIM key record matching the key (and dkimpy's parser takes it, below).
    tags = dict(tag.strip().split("=", 1) for tag in record.split(";"))
    assert tags.keys() == {"v", "k", "p"} and tags["v"] == "DKIM1" and tags["k"] == algorithm
    public = base64.b64decode(tags["p"], validate=True)
    signing: DkimAlgorithm = "rsa-sha256" if algorithm == "rsa" else "ed25519-sha256"
    spec = DkimKey("example.com", "s2024", path, signing)
    loaded = DkimSigner([spec]).keys[0]
    if algorithm == "rsa":
        assert isinstance(loaded.private_key, rsa.RSAPrivateKey)
        assert loaded.private_key.key_size == 2048
        assert serialization.load_der_public_key(public) == loaded.private_key.public_key()
    else:
        assert isinstance(loaded.private_key, ed25519.Ed25519PrivateKey)
        assert len(public) == 32
        assert ed25519.Ed25519PublicKey.from_public_bytes(public) == loaded.private_key.public_key()
    assert loaded.txt_record == record
    assert Path(path).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    # A message signed with it verifies against the printed record.
    signed = DkimSigner([spec]).sign(PLAIN)
    assert dkimpy_verify(signed, {txt_record_name("example.com", "s2024"): record}) == [True]


def test_generate_key_refuses_to_overwrite(tmp_path: Path) -> None:
    path, _ = generate_key("example.com", "s1", "ed25519", str(tmp_path))
    before = Path(path).read_bytes()
    for algorithm in ("ed25519", "rsa"):
        with pytest.raises(DkimError, match=r"example\.com\.s1\.pem: already exists"):
            generate_key("example.com", "s1", algorithm, str(tmp_path))
    assert Path(path).read_bytes() == before
    # Another selector is another file.
    assert generate_key("example.com", "s2", "ed25519", str(tmp_path))[0] != path


@pytest.mark.parametrize(
    ("domain", "selector", "problem"),
    [
        ("example", "s1", "invalid domain"),
        ("../etc", "s1", "invalid domain"),
        ("exa mple.com", "s1", "invalid domain"),
        ("example.com", "../s1", "invalid selector"),
        ("example.com", "", "invalid selector"),
        ("example.com", "s1/x", "invalid selector"),
    ],
)
def test_generate_key_checks_names(
    domain: str, selector: str, problem: str, tmp_path: Path
) -> None:
    with pytest.raises(DkimError, match=problem):
        generate_key(domain, selector, "ed25519", str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_record_names() -> None:
    assert txt_record_name("Example.COM.", "s1") == "s1._domainkey.example.com"
    record = "v=DKIM1; k=rsa; p=" + "A" * 392
    entry = zone_file_entry("example.com", "s1", record)
    assert entry.startswith('s1._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=AAA')
    strings = re.findall(r'"([^"]*)"', entry)
    assert "".join(strings) == record and all(len(s) <= 255 for s in strings)
    assert len(strings) == 2


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=60).map(lambda b: bytes(b"ab \t\r\n"[x % 6] for x in b)))
def test_relaxed_body_is_dkimpys(body: bytes) -> None:
    """Our relaxed body canonicalisation equals dkimpy's regex one."""
    assert relaxed_body(body) == dkim.canonicalization.Relaxed.canonicalize_body(body)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=40).map(lambda b: bytes(b"a\r\n"[x % 3] for x in b)))
def test_bare_lf_search_is_the_count_comparison(data: bytes) -> None:
    """An LF not after a CR is found exactly when LFs outnumber CRLFs."""
    assert (_BARE_LF.search(data) is not None) == (data.count(b"\n") != data.count(b"\r\n"))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [b"a", b" ", b"\t", b"\r", b"\r\n", b" \r\n", b"\r\n\r\n", b"QUJD" * 19 + b"\r\n"]
        ),
        max_size=40,
    ).map(b"".join),
    st.sampled_from([1, 2, 3]),
)
def test_relaxed_body_in_pieces_is_dkimpys(body: bytes, repeat: int) -> None:
    """Bodies longer than a piece (16 KiB): cut into pieces, whitespace runs and trailing
    blanks at the cuts, pieces without whitespace kept as they are; the same as dkimpy's."""
    body = body * (17_000 * repeat // (len(body) + 1) + 1)
    assert relaxed_body(body) == dkim.canonicalization.Relaxed.canonicalize_body(body)


# -- the fast paths against dkimpy, on generated messages ----------------------------------------

#: Field names: signed ones in any case, unsigned ones, and the From oversigned.
FIELD_NAMES = st.sampled_from(
    [
        b"From",
        b"FROM",
        b"To",
        b"cc",
        b"Subject",
        b"subject",
        b"Date",
        b"Message-ID",
        b"Reply-To",
        b"List-Unsubscribe",
        b"Content-Type",
        b"Received",
        b"X-Custom",
        b"DKIM-Signature",
        b"b",
    ]
)
#: Pieces of field values: odd spacing, tabs, folding (CRLF then whitespace), a lone CR,
#: 8-bit bytes and what the signature field's own syntax uses.
VALUE_PIECES = st.sampled_from(
    [
        b"a",
        b"x@example.com",
        b" ",
        b"  ",
        b"\t",
        b" \t ",
        b"\x0b",
        b";",
        b" b=",
        b"\r\n ",
        b"\r\n\t",
        b"\r\n \t  ",
        b"\r",
        b"\xc3\xa9",
    ]
)
field_values = st.lists(VALUE_PIECES, max_size=10).map(lambda pieces: b"".join(pieces) + b"\r\n")
#: Bodies with trailing whitespace, empty lines (also at the end), no final CRLF, or empty.
bodies = st.lists(
    st.sampled_from([b"a", b"b c", b" ", b"  ", b"\t", b" \t", b"\r\n", b"\r\n\r\n", b"\r"]),
    max_size=25,
).map(b"".join)


@st.composite
def messages(draw: st.DrawFn, from_value: bytes | None = None) -> bytes:
    """A CRLF message with a From field (``from_value``, else a generated one) among others,
    duplicates included."""
    fields = draw(st.lists(st.tuples(FIELD_NAMES, field_values), max_size=8))
    position = draw(st.integers(0, len(fields)))
    fields.insert(position, (b"From", from_value or draw(field_values)))
    header = b"".join(name + b":" + value for name, value in fields)
    return header + b"\r\n" + draw(bodies)


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(FIELD_NAMES, FIELD_NAMES.map(lambda name: name + b" \t")),
            st.one_of(field_values, st.binary(max_size=20)),
        ),
        max_size=10,
    )
)
def test_signed_fields_are_dkimpys(headers: list[tuple[bytes, bytes]]) -> None:
    """The h= list and the canonical header data hashed for it equal what dkimpy's
    canonicalisation of all fields, then its field selection, give (field names with trailing
    whitespace too, which dkimpy's canonical names drop)."""
    include, data = _signed_fields(headers)
    assert include == reference_header_names(headers) == signed_header_names(headers)
    canonical = dkim.canonicalization.Relaxed.canonicalize_headers(headers)
    selected = dkim.select_headers(canonical, include)
    assert data == b"".join(name + b":" + value for name, value in selected)


ED25519_KEY = ed25519.Ed25519PrivateKey.generate()
#: Signing domains and selectors: usual names, long ones (folded inside the d= tag), and
#: values with whitespace, ';' or '=' (where the b= tag's removal takes dkimpy's regex).
TAG_NAMES = st.one_of(
    st.from_regex(r"[a-z0-9]{1,12}(\.[a-z0-9-]{1,12}){0,3}", fullmatch=True),
    st.from_regex(r"[a-z]{60,90}\.example", fullmatch=True),
    st.text("ab=; \t.", min_size=1, max_size=20),
)


@settings(max_examples=400, deadline=None)
@given(messages(), TAG_NAMES, TAG_NAMES, st.integers(0, 2**33))
def test_sign_parsed_is_dkimpys(message: bytes, domain: str, selector: str, now: int) -> None:
    """The signature field, byte for byte, is dkimpy's for the same key and time."""
    key = LoadedKey(domain, selector, "ed25519-sha256", ED25519_KEY)
    headers, body = dkim.rfc822_parse(message)
    reference = dkimpy_reference(message, key, dkimpy_key_text(key), now + 0.5)
    assert sign_parsed(headers, body, [key], now) == reference


@settings(max_examples=300, deadline=None)
@given(
    message=messages(from_value=b" Sender\r\n  Name\t <sender@example.com>  \r\n"),
    line_end=st.sampled_from([b"\r\n", b"\n"]),
)
# LF line ends and a CRLF CRLF later: the chain's split (CRLF only) is not dkimpy's; given it
# with the unjoined message, the signer must still sign what dkimpy parses (found by this test).
@example(
    message=b"To:\r\nFrom: Sender\r\n  Name\t <sender@example.com>  \r\n\r\n\r\r\n\r\r\n",
    line_end=b"\n",
)
def test_signer_is_dkimpys(message: bytes, line_end: bytes, both_keys_signer: DkimSigner) -> None:
    """DkimSigner: the same fields whether given the message split into fields (when that
    split is dkimpy's) or not, and the same as dkimpy's."""
    message = message.replace(b"\r\n", line_end)
    if line_end == b"\r\n":
        # The chain signs its own split joined back, in which a lone CR or LF in a header
        # field has become a space (it never starts a line): sign that, as the chain does.
        header_fields, rest = split_header_block(message)
        message = b"".join(header_fields) + rest
    signer = both_keys_signer
    fields = signer.signature_fields(message)
    if author_domain(dkim.rfc822_parse(message)[0]) is None:  # another From field drawn
        assert fields == b""
        return
    split = split_header_block(message)
    from_split = signer._prepare(message, split)
    assert from_split is not None
    assert from_split == signer._prepare(message)
    ed_key = signer.keys[1]
    reference = dkimpy_reference(message, ed_key, dkimpy_key_text(ed_key))
    assert fields.endswith(reference)
    assert fields.startswith(b"DKIM-Signature: ") and fields.count(b"DKIM-Signature: ") == 2


#: Lines dkimpy's parse does not take as a field of their own.
NOT_FIELDS = st.sampled_from([b" folded\r\n", b"no colon\r\n", b":no name\r\n", b"From x\r\n"])
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.one_of(st.tuples(FIELD_NAMES, field_values).map(b":".join), NOT_FIELDS), max_size=6
    ),
    st.lists(st.sampled_from([b"\r\n ", b"\n ", b"\r ", b"x", b" "]), max_size=4),
    st.sampled_from(["body", "in field", "field end"]),
    bodies,
)
def test_parsed_from_fields_is_dkimpys_parse(
    lines: list[bytes], noise: list[bytes], where: str, body: bytes
) -> None:
    """The message split into fields is used as dkimpy's parse only when it is that parse: a
    bare LF or CR, a nameless line, a field not ending with CRLF make it None."""
    rest = b"\r\n" + body
    if where == "body" or not lines:
        rest += b"".join(noise)
    else:  # in the last field, before its CRLF or instead of it
        lines[-1] = lines[-1][:-2] + b"".join(noise) + (b"\r\n" if where == "in field" else b"")
    parsed = _parsed_from_fields(lines, rest)
    plain = all(
        _FIELD_START.match(line)
        and line.endswith(b"\r\n")
        and line.count(b"\n") == line.count(b"\r\n")
        for line in lines
    ) and rest.count(b"\n") == rest.count(b"\r\n")
    assert (parsed is not None) == plain
    if parsed is not None:
        assert parsed == dkim.rfc822_parse(b"".join(lines) + rest)
