"""DKIM signing of outgoing messages (RFC 6376; ``ed25519-sha256`` per RFC 8463).

The keys of the ``[[dkim.keys]]`` config entries (SPEC section 2) are loaded at start-up, and
again on a reload (:meth:`DkimSigner.reload`), by :class:`DkimSigner`; :meth:`DkimSigner.sign`
then prepends a ``DKIM-Signature`` to a message whose From domain is a key's domain or one of
its subdomains (the closest configured parent domain wins). Canonicalisation is
relaxed/relaxed, ``t=`` is set, ``x=`` and ``l=`` are not.

The header field is built exactly as dkimpy's own ``DKIM.sign()`` builds it (with its parser
and folding), but the signing primitive is the ``cryptography`` library's: dkimpy's RSA is
pure-Python modular exponentiation (about 20 times slower for RSA-2048). Its relaxed
canonicalisation and header hashing are redone here with whole-bytes operations, on the signed
fields only (dkimpy's regexes cost more than the rest of a copy's signing, RSA aside). Both
signature schemes are deterministic, so the result is byte-identical to dkimpy's own output
for the same message, key and timestamp (tests/test_dkim.py proves it, also on generated
messages). This also lets the signer take its clock as a parameter and parse each key file once
rather than per message.

:func:`generate_key` makes a key pair for ``smartrelay-ctl dkim keygen`` (SPEC section 6).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import time
from collections.abc import Callable, Sequence
from email.utils import getaddresses
from functools import lru_cache, partial
from typing import Literal

import dkim
from attrs import field, frozen
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import correct_empty_body, strip_trailing_lines
from twisted.internet.defer import Deferred

from smartrelay.config import DkimKey

__all__ = [
    "RSA_KEY_BITS",
    "SIGNED_HEADERS",
    "DkimError",
    "DkimSigner",
    "LoadedKey",
    "generate_key",
    "load_key",
    "txt_record",
    "txt_record_name",
    "zone_file_entry",
]

SigningAlgorithm = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

#: Header fields signed when present: RFC 6376 section 5.4.1's list plus RFC 8058's
#: List-Unsubscribe-Post. From is listed once more than it occurs ("oversigned"), so that a
#: From field added later breaks the signature instead of being displayed unsigned.
SIGNED_HEADERS: tuple[bytes, ...] = (
    b"from",
    b"sender",
    b"reply-to",
    b"subject",
    b"date",
    b"message-id",
    b"to",
    b"cc",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"content-id",
    b"content-description",
    b"resent-date",
    b"resent-from",
    b"resent-sender",
    b"resent-to",
    b"resent-cc",
    b"resent-message-id",
    b"in-reply-to",
    b"references",
    b"list-id",
    b"list-help",
    b"list-unsubscribe",
    b"list-subscribe",
    b"list-post",
    b"list-owner",
    b"list-archive",
    b"list-unsubscribe-post",
)
_SIGNED = frozenset(SIGNED_HEADERS)
#: Header fields signed once more than they occur.
OVERSIGNED_HEADERS: tuple[bytes, ...] = (b"from",)

#: Size of generated RSA keys; RFC 8301 requires at least 1024 bits for signing.
RSA_KEY_BITS = 2048
MIN_RSA_KEY_BITS = 1024

_CANONICALIZATION = b"relaxed/relaxed"
_HEADER_NAME = b"DKIM-Signature"
# dkimpy folds the field with b= as 60 zeros so that b= starts its own line, and refolding
# after the real signature is put in does not move the tags hashed before it.
_B_PLACEHOLDER = b"0" * 60
# RFC 6376 3.1 (selector) and the usual host name syntax for the signing domain.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class DkimError(Exception):
    """A DKIM key that cannot be used or written; ``str()`` is one line naming the file."""


@frozen
class LoadedKey:
    """A ``[[dkim.keys]]`` entry with its private key parsed."""

    #: The signing domain (``d=``), lower-case.
    domain: str
    #: ``s=``
    selector: str
    algorithm: SigningAlgorithm
    private_key: PrivateKey = field(repr=False, eq=False)
    #: The file it came from, for messages.
    path: str = ""

    def sign_digest(self, digest: bytes) -> bytes:
        """The ``b=`` value (before base64) for the SHA-256 ``digest`` of the header data."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return self.private_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        # RFC 8463 3: PureEdDSA over the SHA-256 hash (not over the data itself).
        return self.private_key.sign(digest)

    @property
    def txt_record(self) -> str:
        """The TXT record to publish at :func:`txt_record_name` for this key."""
        return txt_record(self.private_key)


# -- loading --------------------------------------------------------------------------------


def load_key(spec: DkimKey) -> LoadedKey:
    """Read and check the private key of one ``[[dkim.keys]]`` entry; DkimError if unusable.

    Accepted: PEM, PKCS#1 (``BEGIN RSA PRIVATE KEY``) or PKCS#8 (``BEGIN PRIVATE KEY``), RSA of
    at least 1024 bits or Ed25519; and for Ed25519 also dkimpy's format, the base64 of the
    32-byte seed. Encrypted keys are not supported.
    """
    path = spec.private_key
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DkimError(f"{path}: cannot read DKIM private key: {e.strerror or e}") from e
    key = _parse_private_key(path, data)
    where = f"{path}: DKIM key {spec.selector!r} of {spec.domain!r}"
    if spec.algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimError(f"{where}: algorithm rsa-sha256 needs an RSA key, found Ed25519")
        if key.key_size < MIN_RSA_KEY_BITS:
            raise DkimError(
                f"{where}: RSA key of {key.key_size} bits is too short"
                f" (at least {MIN_RSA_KEY_BITS}, RFC 8301; {RSA_KEY_BITS} recommended)"
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DkimError(f"{where}: algorithm ed25519-sha256 needs an Ed25519 key, found RSA")
    return LoadedKey(
        domain=_normalize_domain(spec.domain) or spec.domain.lower(),
        selector=spec.selector,
        algorithm=spec.algorithm,
        private_key=key,
        path=path,
    )


def _parse_private_key(path: str, data: bytes) -> PrivateKey:
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as e:  # encrypted, and no password given
            raise DkimError(f"{path}: encrypted private keys are not supported") from e
        except (ValueError, UnsupportedAlgorithm) as e:
            raise DkimError(f"{path}: not a usable PEM private key ({_one_line(e)})") from e
        if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise DkimError(f"{path}: not an RSA or Ed25519 private key")
        return key
    # dkimpy's (and dknewkey's) Ed25519 format: base64 of the 32-byte seed, one line.
    try:
        seed = base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    raise DkimError(
        f"{path}: not a PEM private key, nor an Ed25519 key as the base64 of its 32-byte seed"
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# -- signing --------------------------------------------------------------------------------


class DkimSigner:
    """Signs messages with the configured key of their From domain (or its closest parent).

    ``now`` is the clock for ``t=`` (seconds since the epoch), e.g. ``reactor.seconds``.
    A domain with several keys (say an RSA and an Ed25519 one, or two during a rotation) gets
    one signature per key, the first configured on top.
    """

    def __init__(self, keys: Sequence[DkimKey], now: Callable[[], float] = time.time) -> None:
        self._now = now
        self.keys: tuple[LoadedKey, ...] = ()
        self._by_domain: dict[str, tuple[LoadedKey, ...]] = {}
        self.reload(keys)

    def reload(self, keys: Sequence[DkimKey]) -> None:
        """Read ``keys`` (their files again, even when the entries did not change) and sign
        with them from now on. Raises :class:`DkimError` and keeps the current keys when one
        cannot be used. A signature being made keeps the keys it started with."""
        loaded = tuple(load_key(spec) for spec in keys)
        by_domain: dict[str, list[LoadedKey]] = {}
        for key in loaded:
            by_domain.setdefault(key.domain, []).append(key)
        self.keys, self._by_domain = loaded, {d: tuple(k) for d, k in by_domain.items()}

    def keys_for(self, from_domain: str) -> tuple[LoadedKey, ...]:
        """The keys of ``from_domain``, else of its closest parent domain that has any."""
        domain = _normalize_domain(from_domain)
        while domain:
            found = self._by_domain.get(domain)
            if found:
                return found
            domain = domain.partition(".")[2]
        return ()

    def key_for(self, from_domain: str) -> LoadedKey | None:
        """The (first) key for ``from_domain``: its own, else its closest parent domain's."""
        keys = self.keys_for(from_domain)
        return keys[0] if keys else None

    def sign(self, message: bytes) -> bytes:
        """``message`` with a DKIM-Signature header field (one per key) prepended.

        Unchanged when no key matches the From domain, or when the message has no single From
        field with an address, or a header section dkimpy cannot parse.
        """
        return self.signature_fields(message) + message

    def signature_fields(self, message: bytes) -> bytes:
        """The DKIM-Signature field(s) :meth:`sign` would prepend (empty when none)."""
        return b"".join(self.signature_field_list(message))

    def signature_field_list(
        self, message: bytes, split: tuple[Sequence[bytes], bytes] | None = None
    ) -> list[bytes]:
        """:meth:`signature_fields`, a field each, as :meth:`signature_fields_off_thread`
        gives them, signed in the caller's thread (a delivery process, which serves no
        client: relay.signs_in_threads). ``split`` as for that method."""
        prepared = self._prepare(message, split)
        if prepared is None:
            return []
        pending, linesep = prepared
        return _assembled_fields(pending, [p.key.sign_digest(p.digest) for p in pending], linesep)

    async def signature_fields_off_thread(
        self,
        message: bytes,
        in_thread: Callable[[Callable[[], bytes]], Deferred[bytes]],
        split: tuple[Sequence[bytes], bytes] | None = None,
    ) -> list[bytes]:
        """:meth:`signature_fields`, a field each (with its line end, as the re-wrap chain
        keeps a copy's header fields: joined, they are what :meth:`signature_fields` gives),
        the private-key operations run by ``in_thread`` (e.g. in the reactor's thread pool):
        the ``cryptography`` library releases the GIL for them, so they use another core
        while the reactor goes on. ``split``: ``message`` as (header fields, the rest from the
        empty line on), if the caller has it."""
        prepared = self._prepare(message, split)
        if prepared is None:
            return []
        pending, linesep = prepared
        signatures = [await in_thread(partial(p.key.sign_digest, p.digest)) for p in pending]
        return _assembled_fields(pending, signatures, linesep)

    def _prepare(
        self, message: bytes, split: tuple[Sequence[bytes], bytes] | None = None
    ) -> tuple[list[_PendingSignature], bytes] | None:
        """What to sign; ``split`` is the message as (header fields, the rest), when the
        caller has it: then dkimpy's parse of the whole message is skipped if it would only
        have split what is already split (CRLF line ends throughout)."""
        if not self._by_domain:
            return None
        parsed = None
        if split is not None and _is_split_of(message, *split):
            parsed = _parsed_from_fields(*split)
        if parsed is None:
            try:
                parsed = dkim.rfc822_parse(message)
            except (dkim.DKIMException, IndexError):
                return None
        headers, body = parsed
        from_domain = author_domain(headers)
        if from_domain is None:
            return None
        keys = self.keys_for(from_domain)
        if not keys:
            return None
        linesep = b"\r\n" if b"\r\n" in message else b"\n"
        return _prepare(headers, body, keys, int(self._now())), linesep


_SPACE_RUN = re.compile(rb"  +")


def _compress_whitespace(data: bytes) -> bytes:
    """dkimpy's ``compress_whitespace``: each run of tabs and spaces becomes one space. Its
    regex matches (and replaces) every single space, which is slow on text; here tabs become
    spaces, then only runs of two or more are replaced."""
    data = data.replace(b"\t", b" ")
    if data.find(b"  ") >= 0:  # find() is faster than "in" here
        data = _SPACE_RUN.sub(b" ", data)
    return data


#: Bodies are canonicalised in pieces of about this size, cut after a CRLF.
_BODY_PIECE = 16384


def relaxed_body(body: bytes) -> bytes:
    """The relaxed body canonicalisation (RFC 6376 3.4.4) of a CRLF body, as dkimpy's
    ``Relaxed.canonicalize_body``. Whitespace is compressed first, so what precedes a CRLF is
    at most one space, the trailing whitespace dkimpy removes.

    The body goes in pieces cut after a CRLF (no run of whitespace, nor one before a CRLF,
    spans two), and a piece without a space or tab (base64, say) is left as it is: looking
    for one (memchr) is some 20 times faster than the regex and replace passes."""
    if len(body) <= _BODY_PIECE:
        body = _relaxed_piece(body)
    else:
        pieces = []
        start = 0
        while start < len(body):
            end = body.find(b"\r\n", start + _BODY_PIECE)
            end = len(body) if end < 0 else end + 2
            pieces.append(_relaxed_piece(body[start:end]))
            start = end
        body = b"".join(pieces)
    return correct_empty_body(strip_trailing_lines(body))


def _relaxed_piece(piece: bytes) -> bytes:
    if piece.find(b" ") < 0 and piece.find(b"\t") < 0:
        return piece
    return _compress_whitespace(piece).replace(b" \r\n", b"\r\n")


def _relaxed_value(value: bytes) -> bytes:
    """A header field value as dkimpy's ``Relaxed.canonicalize_headers`` makes it, without the
    CRLF it appends: unfolded (CR LF and lone LF removed), whitespace compressed, stripped."""
    return _compress_whitespace(value.replace(b"\r\n", b"").replace(b"\n", b"")).strip()


_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
# An LF not after a CR. Starting with the literal, the regex skips to each LF at C speed:
# three times faster than counting LFs and CRLFs (a 355 KB body: 0.2 against 0.58 ms).
_BARE_LF = re.compile(rb"\n(?<!\r\n)")


def _is_split_of(message: bytes, fields: Sequence[bytes], rest: bytes) -> bool:
    """Whether the split (header fields, the rest) of ``message`` joins back into it: a split
    may have changed header bytes (a lone CR or LF in a header line becomes a space), and then
    only dkimpy's own parse of ``message`` says what is signed. The rest (the body) is taken
    from the message unchanged by every split, so the header part and the length decide."""
    head_length = len(message) - len(rest)
    return head_length >= 0 and message[:head_length] == b"".join(fields)


def _parsed_from_fields(
    fields: Sequence[bytes], rest: bytes
) -> tuple[list[list[bytes]], bytes] | None:
    """``dkim.rfc822_parse`` of ``b"".join(fields) + rest`` from its parts, or None when that
    would not be a plain split (a line end other than CRLF, no empty line, a nameless line)."""
    if not rest.startswith(b"\r\n"):
        return None
    # Over all fields at once: each must end with CRLF (checked below), so an LF that is not
    # after a CR in the joined block is one in a field.
    if _BARE_LF.search(b"".join(fields)) or _BARE_LF.search(rest):
        return None
    headers: list[list[bytes]] = []
    for line in fields:
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name) or not value.endswith(b"\r\n"):
            return None
        headers.append([name, value])
    return headers, rest[2:]


@frozen
class _PendingSignature:
    """A signature whose header hash is computed; only the key operation is left."""

    key: LoadedKey
    tags: list[tuple[bytes, bytes]]
    digest: bytes


def sign_parsed(
    headers: Sequence[Sequence[bytes]],
    body: bytes,
    keys: Sequence[LoadedKey],
    timestamp: int,
    linesep: bytes = b"\r\n",
) -> bytes:
    """The DKIM-Signature fields, one per key, for a message split by ``dkim.rfc822_parse``.

    This is dkimpy's ``DKIM.sign()`` with ``canonicalize=(relaxed, relaxed)``,
    ``include_headers=signed_header_names(headers)`` and default identity, but for the
    signing call itself, and with ``t=`` from ``timestamp``.
    """
    pending = _prepare(headers, body, keys, timestamp)
    return _assemble(pending, [p.key.sign_digest(p.digest) for p in pending], linesep)


def _prepare(
    headers: Sequence[Sequence[bytes]],
    body: bytes,
    keys: Sequence[LoadedKey],
    timestamp: int,
) -> list[_PendingSignature]:
    include, header_data = _signed_fields(headers)
    h_value = b" : ".join(include)
    body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
    pending: list[_PendingSignature] = []
    for key in keys:
        domain = key.domain.encode("ascii")
        selector = key.selector.encode("ascii")
        tags: list[tuple[bytes, bytes]] = [
            (b"v", b"1"),
            (b"a", key.algorithm.encode("ascii")),
            (b"c", _CANONICALIZATION),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", selector),
            (b"t", str(timestamp).encode("ascii")),
            (b"h", h_value),
            (b"bh", body_hash),
            (b"b", _B_PLACEHOLDER),
        ]
        folded = dkim.fold(
            b"; ".join(b"=".join(tag) for tag in tags), namelen=len(_HEADER_NAME), linesep=b"\r\n"
        )
        hasher = hashlib.sha256(header_data)
        # dkimpy's hash_headers: the signature field last, canonicalised, without its CRLF.
        hasher.update(
            b"dkim-signature:" + _relaxed_value(_without_b_value(folded, domain, selector))
        )
        pending.append(_PendingSignature(key, tags, hasher.digest()))
    return pending


_PLAIN_TAG_VALUE = re.compile(rb"[^\s;=]*")


def _without_b_value(folded: bytes, domain: bytes, selector: bytes) -> bytes:
    """The signature field value (``folded``, with the placeholder b=) as dkimpy hashes it:
    ``" " + folded`` with its ``RE_BTAG.sub`` applied twice (in ``gen_header``, then in
    ``hash_headers``). That regex is slow (some 20 µs a field); when d= and s= hold no
    whitespace, ';' or '=' it can match only the b= tag, which is last, so cutting the
    placeholder off is the same."""
    if (
        folded.endswith(b" b=" + _B_PLACEHOLDER)
        and _PLAIN_TAG_VALUE.fullmatch(domain)
        and _PLAIN_TAG_VALUE.fullmatch(selector)
    ):
        return b" " + folded[: -len(_B_PLACEHOLDER)]
    return dkim.RE_BTAG.sub(b"\\1", b" " + dkim.RE_BTAG.sub(b"\\1", folded))


def _assemble(
    pending: Sequence[_PendingSignature], signatures: Sequence[bytes], linesep: bytes
) -> bytes:
    return b"".join(_assembled_fields(pending, signatures, linesep))


def _assembled_fields(
    pending: Sequence[_PendingSignature], signatures: Sequence[bytes], linesep: bytes
) -> list[bytes]:
    """The DKIM-Signature fields, one per signature, each ending with ``linesep``."""
    fields_out: list[bytes] = []
    for item, signature in zip(pending, signatures, strict=True):
        tags = [*item.tags[:-1], (b"b", base64.b64encode(signature))]
        value = b"; ".join(b"=".join(tag) for tag in tags) + linesep
        fields_out.append(
            _HEADER_NAME + b": " + dkim.fold(value, namelen=len(_HEADER_NAME), linesep=linesep)
        )
    return fields_out


def signed_header_names(headers: Sequence[Sequence[bytes]]) -> list[bytes]:
    """The ``h=`` list: the :data:`SIGNED_HEADERS` present, in message order (lower-case),
    then each of :data:`OVERSIGNED_HEADERS` once more."""
    return _signed_fields(headers)[0]


def _signed_fields(headers: Sequence[Sequence[bytes]]) -> tuple[list[bytes], bytes]:
    """:func:`signed_header_names`, and the header data hashed for them: what dkimpy's
    ``Relaxed.canonicalize_headers`` of all fields, then ``select_headers`` (each name listed
    takes the bottom-most field of that name not taken yet), then ``hash_headers`` make of
    them, canonicalising only the fields signed."""
    include: list[bytes] = []
    values: dict[bytes, list[bytes]] = {}
    for header in headers:
        name = header[0].lower()
        if name in _SIGNED:
            include.append(name)
        else:
            name = name.rstrip()  # dkimpy's canonical name, which select_headers compares
            if name not in _SIGNED:
                continue
        values.setdefault(name, []).append(header[1])
    include += [name for name in OVERSIGNED_HEADERS if name in include]
    data: list[bytes] = []
    for name in include:
        unused = values.get(name)
        if unused:
            data.append(name + b":" + _relaxed_value(unused.pop()) + b"\r\n")
    return include, b"".join(data)


def author_domain(headers: Sequence[Sequence[bytes]]) -> str | None:
    """The domain of the (first) address of the message's From field, normalised.

    None unless there is exactly one From field (RFC 5322 3.6) holding an address.
    """
    values = [header[1] for header in headers if header[0].lower() == b"from"]
    if len(values) != 1:
        return None
    return _from_domain(values[0])


def from_field_domain(value: bytes) -> str | None:
    """The normalised domain of the first address of a From field's value (None if none)."""
    return _from_domain(value)


@lru_cache(maxsize=256)
def _from_domain(value: bytes) -> str | None:
    """:func:`author_domain` of a From field value; cached, as every copy of a message (and
    often every message of an application) has the same From."""
    text = re.sub(r"\r?\n", "", value.decode("utf-8", "replace"))
    for _name, address in getaddresses([text]):
        local, at, domain = address.rpartition("@")
        if at and local:
            return _normalize_domain(domain)
    return None


def _normalize_domain(domain: str) -> str | None:
    """Lower-case ASCII (A-label) form without a trailing dot; None if not a domain."""
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        return None
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return domain if _NAME_RE.fullmatch(domain) else None


# -- key generation -------------------------------------------------------------------------


def txt_record_name(domain: str, selector: str) -> str:
    """Where the public key is published: ``SELECTOR._domainkey.DOMAIN``."""
    return f"{selector}._domainkey.{domain.rstrip('.').lower()}"


def txt_record(key: PrivateKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey) -> str:
    """The DKIM key record (RFC 6376 3.6.1) of a key: ``v=DKIM1; k=rsa; p=BASE64``.

    RSA: ``p`` is the DER SubjectPublicKeyInfo; Ed25519 (RFC 8463 4.2): the raw 32 bytes.
    """
    public = (
        key.public_key() if isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) else key
    )
    if isinstance(public, rsa.RSAPublicKey):
        kind = "rsa"
        data = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        kind = "ed25519"
        data = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k={kind}; p={base64.b64encode(data).decode('ascii')}"


def zone_file_entry(domain: str, selector: str, record: str) -> str:
    """A BIND zone file line for the record, split into strings of at most 255 characters
    (one TXT string's limit; resolvers join them, RFC 6376 3.6.2.2)."""
    chunks = [record[i : i + 255] for i in range(0, len(record), 255)] or [""]
    strings = " ".join(f'"{chunk}"' for chunk in chunks)
    return f"{txt_record_name(domain, selector)}. IN TXT ( {strings} )"


def generate_key(
    domain: str, selector: str, algorithm: Literal["rsa", "ed25519"], directory: str
) -> tuple[str, str]:
    """Write a new private key to ``DIRECTORY/DOMAIN.SELECTOR.pem`` (PKCS#8 PEM, mode 0600;
    RSA keys have 2048 bits) and return ``(path, txt_record)``, the record to publish at
    :func:`txt_record_name`. An existing file is never overwritten (DkimError).
    """
    domain = domain.rstrip(".").lower()
    if not _NAME_RE.fullmatch(domain) or "." not in domain:
        raise DkimError(f"invalid domain {domain!r}")
    if not _NAME_RE.fullmatch(selector):
        raise DkimError(f"invalid selector {selector!r} (letters, digits, '-', '.')")
    key: PrivateKey
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise DkimError(f"unknown key algorithm {algorithm!r} (rsa or ed25519)")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = os.path.join(directory, f"{domain}.{selector}.pem")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise DkimError(f"{path}: already exists; not overwriting a DKIM key") from e
    except OSError as e:
        raise DkimError(f"{path}: cannot create: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        os.unlink(path)
        raise DkimError(f"{path}: cannot write: {e.strerror or e}") from e
    return path, txt_record(key)
