"""Compact, signed, rotatable tokens for the VERP return path and the tracking URLs.

A delivered message carries tokens naming one row of the ``recipients`` table (SPEC section 4):
``MAIL FROM:<b+TOKEN@return_path_domain>``, ``{base_url}/o/TOKEN.gif``, ``{base_url}/c/TOKEN``,
``{base_url}/u/TOKEN`` and, with ``unsubscribe_mailto``, ``mailto:u+TOKEN@return_path_domain``.
The recipient id inside a token is readable (it is not secret); everything is authenticated,
so nothing can be forged or altered without the key.

Token format (version 1)
------------------------
::

    token = key_id (1 byte) || varint(recipient_id) || payload || tag
    tag   = HMAC-SHA256(keys[key_id],
                        b"smartrelay-token-v1\\0" || kind || key_id || varint || payload)[:n]

* ``key_id`` names the key in the secret file that signed the token, so keys can be rotated:
  tokens signed with an old key keep working as long as its line stays in the file.
* ``varint`` is unsigned LEB128 (7 bits a byte, low group first, canonical: no overlong
  encodings), for recipient ids 0 <= id < 2**64: ids up to 127 take one byte, 123456 three.
* ``kind`` is not stored but bound into the MAC, so a token of one kind never passes as
  another: ``o`` open, ``c`` click, ``u`` unsubscribe (URL), ``m`` unsubscribe (mailto
  address), ``v`` VERP.
* ``payload`` is empty for opens, VERP and mailto unsubscribes.

  - Clicks: one flag byte, then the URL's UTF-8 as is (flag 0) or raw DEFLATE-compressed
    (flag 1, RFC 1951 without zlib header and checksum: the MAC already guards integrity),
    whichever is shorter. URLs are limited to :data:`MAX_URL_BYTES` of UTF-8.
  - Unsubscribe URLs: the recipient's address (UTF-8, 1 to :data:`MAX_ADDRESS_BYTES` octets),
    encrypted, so that the link still unsubscribes the address once the recipient's row has
    been purged (retention) while proxies and logs that see the URL cannot read it. The
    cipher is a keystream XORed over the address: block ``i`` (32 bytes) is
    ``HMAC-SHA256(address_key, varint(recipient_id) || i)`` (``i`` one byte, 0..7), with
    ``address_key = HMAC-SHA256(keys[key_id], b"smartrelay-unsubscribe-address-v1")``. The
    recipient id is the nonce: a recipient row has one address, so a (key, id) pair never
    encrypts two different plaintexts. No separate MAC: the token's tag covers the
    ciphertext. Only the address's length shows. Tokens made before the address was added
    have an empty payload; they still parse (address None) and work while the row exists.
    Deflate is not used: it makes typical addresses (20 to 40 octets) longer, not shorter.

Encodings
---------
* URL tokens (open, click, unsubscribe): base64url without padding (RFC 4648 section 5), with a
  16-byte (128-bit) tag. An open token for recipient 123456 is 27 characters; an unsubscribe
  token carrying a 20-octet address 54 (27 without the address: an old token).
* Address tokens (VERP ``b+TOKEN``, mailto unsubscribe ``u+TOKEN``): lowercase base32 without
  padding (RFC 4648 section 6 alphabet, lowercased: only ``[a-z2-7]``), because some MTAs change
  the case of local parts; parsing accepts any case. Their tag is 10 bytes (80 bits): such a
  token can only be checked by sending a message to our own MX, one guess per message, so even
  a billion guesses a second would take some 19 million years on average to forge one, and a
  forgery gains at most a bounce or an unsubscribe for one recipient. The longest address token (id
  near 2**64) is 34 characters, well inside the 64-octet local-part limit of RFC 5321; for
  recipient 123456 it is 23. URL tokens keep the full 16 bytes: a click token carries its
  redirect target, so a forgery would make an open redirect on our domain.

Parsing is strict: only the canonical encoding of a token is accepted (no padding, no unused
bits set in the last character, no foreign characters), so changing, adding or removing any
character of a token is detected. Every failure raises :class:`TokenError` (a
:class:`ValueError`), which the web layer turns into a 404.

The secret file
---------------
Text, one key a line as ``ID:HEX`` (ID 0..255, HEX 64 hex digits = 32 bytes); ``#`` starts a
comment, blank lines are ignored; the last key line is the current key (used for new tokens).
:func:`load_keyring` creates a missing file (and its folder) with one random key, mode 0600;
:func:`add_key` appends a new key and makes it current (rotation). To retire an old key, delete
its line once the tokens it signed may stop working (e.g. after the events' retention time).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from attrs import field, frozen

__all__ = [
    "KEY_BYTES",
    "MAX_ADDRESS_BYTES",
    "MAX_URL_BYTES",
    "Keyring",
    "SecretFileError",
    "TokenCodec",
    "TokenError",
    "add_key",
    "click_payload",
    "click_url_fits",
    "load_keyring",
    "unsubscribe_address_fits",
]

#: Length of one HMAC key in bytes.
KEY_BYTES = 32
#: Longest URL (in UTF-8 bytes) a click token may carry.
MAX_URL_BYTES = 8192
#: Longest address (in UTF-8 octets) an unsubscribe token carries: an SMTP path is at most
#: 256 octets (RFC 5321 section 4.5.3.1.3).
MAX_ADDRESS_BYTES = 256
#: Recipient ids are 0 <= id < MAX_RECIPIENT_ID.
MAX_RECIPIENT_ID = 2**64

_DOMAIN = b"smartrelay-token-v1\0"
_ADDRESS_KEY_LABEL = b"smartrelay-unsubscribe-address-v1"
_BLOCK = 32  # bytes of keystream per HMAC-SHA256
_URL_TAG = 16
_ADDRESS_TAG = 10

_OPEN = b"o"
_CLICK = b"c"
_UNSUBSCRIBE = b"u"
_UNSUBSCRIBE_MAILTO = b"m"
_VERP = b"v"

_FLAG_PLAIN = 0
_FLAG_DEFLATE = 1
#: URLs shorter than this (UTF-8 bytes) go in a click token as they are, not deflated. Raw
#: DEFLATE of a single URL only gains from repeats inside it, and each try costs 5-7 us on
#: the delivery process's reactor thread with two GIL hand-overs (zlib lets go of it): over
#: bench/load.py's URLs it saved 0% under 64 bytes, 4% from 64 to 95, 8-12% from 96 to 127
#: and 17-19% from 128 on (docs/performance.md). So a URL of 64 to 95 bytes (~45% of a
#: transactional message's links) is no longer tried, its token some 4 characters longer.
_DEFLATE_FROM = 96

_MAX_VARINT = 10  # bytes of a varint below 2**64
_MIN_RAW = 1 + 1  # key id and a one-byte varint, before the tag
_MAX_URL_TOKEN_RAW = 1 + _MAX_VARINT + 1 + MAX_URL_BYTES + _URL_TAG
_MAX_URL_TOKEN_CHARS = -(-_MAX_URL_TOKEN_RAW * 4 // 3)
_MAX_ADDRESS_TOKEN_CHARS = -(-(1 + _MAX_VARINT + _ADDRESS_TAG) * 8 // 5)

_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_BASE32 = re.compile(r"[A-Za-z2-7]+")  # explicit ranges: no Unicode case folding (e.g. U+212A)
_NOT_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f]")  # ASCII controls
_KEY_LINE = re.compile(r"([0-9]+)[ \t]*:[ \t]*([0-9A-Fa-f]*)")

_FILE_HEADER = (
    "# SmartRelay token keys ([rewrap] secret_file). Keep this file secret.\n"
    '# One key a line, "ID:HEX" (ID 0..255, 32-byte key in hex); the last line is the current\n'
    "# key, used for new tokens. Older keys still verify the tokens they signed: delete a line\n"
    "# only when those tokens may stop working.\n"
)


class TokenError(ValueError):
    """A token that is not valid: malformed, of another kind, signed with an unknown key, or
    with a wrong MAC."""


class SecretFileError(ValueError):
    """A secret file that cannot be read, written or parsed. ``str()`` is one line naming the
    file (and the line, for a malformed one)."""


# --------------------------------------------------------------------------------------
# Keys


def _frozen_keys(keys: Mapping[int, bytes]) -> Mapping[int, bytes]:
    return MappingProxyType(dict(keys))


def _key_ids(keys: Mapping[int, bytes]) -> str:
    return "{" + ", ".join(f"{key_id}: <secret>" for key_id in sorted(keys)) + "}"


@frozen
class Keyring:
    """The HMAC keys by id (0..255), and the id of the one that signs new tokens."""

    keys: Mapping[int, bytes] = field(converter=_frozen_keys, repr=_key_ids)
    current: int

    def __attrs_post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a keyring needs at least one key")
        for key_id, key in self.keys.items():
            if not 0 <= key_id <= 255:
                raise ValueError(f"key id {key_id} is out of range 0..255")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id} has {len(key)} bytes, not {KEY_BYTES}")
        if self.current not in self.keys:
            raise ValueError(f"the current key id {self.current} is not in the keyring")


def load_keyring(path: str) -> Keyring:
    """The keys in the secret file at ``path``; a missing file is created (with its folder)
    holding one new random key. Raises :class:`SecretFileError` on a malformed or unreadable
    file."""
    text = _read(path)
    if text is None:
        return _create(path)
    return _parse(path, text)


def add_key(path: str) -> Keyring:
    """Rotation: append a new random key to the secret file and make it current.

    The new id is the one after the current key's (255 wraps to 0), skipping ids in use; with
    all 256 ids in use this raises :class:`SecretFileError`. The file is rewritten atomically,
    comments kept (two rotations of the same file at the same moment are not serialised: run
    one at a time). A missing file is created with its one new key, as by :func:`load_keyring`.
    Processes that loaded the keyring before keep signing with the old key until they reload.
    """
    text = _read(path)
    if text is None:
        return _create(path)
    keyring = _parse(path, text)
    if len(keyring.keys) >= 256:
        raise SecretFileError(f"{path}: all 256 key ids are in use; delete old keys first")
    new_id = (keyring.current + 1) % 256
    while new_id in keyring.keys:
        new_id = (new_id + 1) % 256
    key = secrets.token_bytes(KEY_BYTES)
    if text and not text.endswith("\n"):
        text += "\n"
    text += f"{new_id}:{key.hex()}\n"
    try:
        _write_atomically(path, text.encode("utf-8"), replace=True)
    except OSError as e:
        raise SecretFileError(f"{path}: cannot write: {e.strerror or e}") from e
    return Keyring(keys={**keyring.keys, new_id: key}, current=new_id)


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SecretFileError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SecretFileError(f"{path}: not UTF-8 text (byte {e.start})") from e


def _parse(path: str, text: str) -> Keyring:
    keys: dict[int, bytes] = {}
    first_line: dict[int, int] = {}
    current: int | None = None
    for number, line in enumerate(text.split("\n"), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}: line {number}"
        match = _KEY_LINE.fullmatch(line)
        if match is None:
            raise SecretFileError(f'{where}: expected "ID:HEX" (key id 0..255, 64 hex digits)')
        key_id, hex_key = int(match[1]), match[2]
        if key_id > 255:
            raise SecretFileError(f"{where}: key id {key_id} is out of range 0..255")
        if len(hex_key) != 2 * KEY_BYTES:
            raise SecretFileError(
                f"{where}: the key must be {2 * KEY_BYTES} hex digits, not {len(hex_key)}"
            )
        if key_id in keys:
            raise SecretFileError(
                f"{where}: key id {key_id} is already used on line {first_line[key_id]}"
            )
        keys[key_id] = bytes.fromhex(hex_key)
        first_line[key_id] = number
        current = key_id
    if current is None:
        raise SecretFileError(f"{path}: no keys in the file")
    return Keyring(keys=keys, current=current)


def _create(path: str) -> Keyring:
    key_id = 1
    key = secrets.token_bytes(KEY_BYTES)
    text = f"{_FILE_HEADER}{key_id}:{key.hex()}\n"
    try:
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        created = _write_atomically(path, text.encode("utf-8"), replace=False)
    except OSError as e:
        raise SecretFileError(f"{path}: cannot create: {e.strerror or e}") from e
    if not created:
        # Another process created the file first: use its keys, not ours.
        existing = _read(path)
        if existing is None:
            raise SecretFileError(f"{path}: cannot create: it disappeared while being created")
        return _parse(path, existing)
    return Keyring(keys={key_id: key}, current=key_id)


def _write_atomically(path: str, data: bytes, *, replace: bool) -> bool:
    """Write ``path`` (mode 0600) through a temporary file in the same folder.

    With ``replace`` the file is replaced (rename); without, an existing file is left alone
    (hard link, then unlink) and False returned, so two processes creating the file at once
    end up with the same keys. Where hard links are not supported, this falls back to rename.
    """
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".key")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                return False
            except OSError:
                os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    _fsync_directory(directory)
    return True


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------
# Tokens


class TokenCodec:
    """Makes and checks the tokens of one keyring (new tokens use ``keyring.current``)."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._macs = {key_id: _Mac.for_key(key) for key_id, key in keyring.keys.items()}
        self._address_macs = {
            key_id: _Mac.for_key(hmac.digest(key, _ADDRESS_KEY_LABEL, "sha256"), b"")
            for key_id, key in keyring.keys.items()
        }

    # Open pixel: {base_url}/o/TOKEN.gif

    def open_token(self, recipient_id: int) -> str:
        return _b64encode(self._seal(_OPEN, _varint(recipient_id), _URL_TAG))

    def parse_open(self, token: str) -> int:
        return _only_id(self._open(_OPEN, _b64decode(token), _URL_TAG))

    # Click: {base_url}/c/TOKEN

    def click_token(self, recipient_id: int, url: str) -> str:
        """A token carrying ``url`` byte-exact (its UTF-8, at most :data:`MAX_URL_BYTES`)."""
        if not isinstance(url, str):
            raise TypeError(f"the URL must be a str, not {type(url).__name__}")
        payload = click_payload(url)
        return _b64encode(self._seal(_CLICK, _varint(recipient_id) + payload, _URL_TAG))

    def click_tokens(self, recipient_id: int, urls: Sequence[str]) -> list[str]:
        """``[click_token(recipient_id, url) for url in urls]``, the common part done once
        (a copy of a message gets one token per link)."""
        for url in urls:
            if not isinstance(url, str):
                raise TypeError(f"the URL must be a str, not {type(url).__name__}")
        return self.click_tokens_for_payloads(recipient_id, [click_payload(url) for url in urls])

    def click_tokens_for_payloads(self, recipient_id: int, payloads: Sequence[bytes]) -> list[str]:
        """:meth:`click_tokens` of the URLs whose :func:`click_payload` are ``payloads``: a
        message's recipients share its links' payloads, made once."""
        current = self.keyring.current
        signed_prefix = bytes([current]) + _varint(recipient_id)
        mac = self._macs[current].extended(_CLICK + signed_prefix)
        return [
            _b64encode(signed_prefix + payload + mac.digest(payload)[:_URL_TAG])
            for payload in payloads
        ]

    def parse_click(self, token: str) -> tuple[int, str]:
        """The recipient id and the URL exactly as given to :meth:`click_token`."""
        body = self._open(_CLICK, _b64decode(token), _URL_TAG)
        recipient_id, end = _read_varint(body)
        if end >= len(body):
            raise TokenError("malformed token")
        flag, data = body[end], body[end + 1 :]
        if flag == _FLAG_DEFLATE:
            data = _inflate(data)
        elif flag != _FLAG_PLAIN:
            raise TokenError("malformed token")
        if len(data) > MAX_URL_BYTES:
            raise TokenError("malformed token")
        try:
            return recipient_id, data.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenError("malformed token") from None

    # Unsubscribe: {base_url}/u/TOKEN

    def unsubscribe_token(self, recipient_id: int, address: str | None = None) -> str:
        """A token carrying the recipient's ``address`` encrypted (see the module docstring),
        so that it still unsubscribes the address once the recipient's row is gone.

        ValueError when a token cannot carry ``address`` (see :func:`unsubscribe_address_fits`).
        Without ``address``: a token of the old form, naming the row only."""
        body = _varint(recipient_id)
        if address is not None:
            current = self.keyring.current
            body += self._address_cipher(current, body, _address_bytes(address))
        return _b64encode(self._seal(_UNSUBSCRIBE, body, _URL_TAG))

    def parse_unsubscribe(self, token: str) -> tuple[int, str | None]:
        """The recipient id and the address the token carries (None for a token of the old
        form, made without it)."""
        raw = _b64decode(token)
        body = self._open(_UNSUBSCRIBE, raw, _URL_TAG)
        recipient_id, end = _read_varint(body)
        if end == len(body):
            return recipient_id, None
        if len(body) - end > MAX_ADDRESS_BYTES:
            raise TokenError("malformed token")
        data = self._address_cipher(raw[0], body[:end], body[end:])
        try:
            return recipient_id, _address_text(data)
        except ValueError:
            raise TokenError("malformed token") from None

    # Unsubscribe by mail: mailto:u+TOKEN@return_path_domain (a case-insensitive local part)

    def unsubscribe_mailto_token(self, recipient_id: int) -> str:
        """For the ``u+TOKEN`` local part: lowercase base32, like :meth:`verp_token`."""
        return _b32encode(self._seal(_UNSUBSCRIBE_MAILTO, _varint(recipient_id), _ADDRESS_TAG))

    def parse_unsubscribe_mailto(self, token: str) -> int:
        """Accepts any letter case."""
        return _only_id(self._open(_UNSUBSCRIBE_MAILTO, _b32decode(token), _ADDRESS_TAG))

    # VERP return path: b+TOKEN@return_path_domain

    def verp_token(self, recipient_id: int) -> str:
        """For the ``b+TOKEN`` local part: lowercase base32, only ``[a-z2-7]``."""
        return _b32encode(self._seal(_VERP, _varint(recipient_id), _ADDRESS_TAG))

    def parse_verp(self, token: str) -> int:
        """Accepts any letter case."""
        return _only_id(self._open(_VERP, _b32decode(token), _ADDRESS_TAG))

    # The MAC and the address cipher

    def _address_cipher(self, key_id: int, id_varint: bytes, data: bytes) -> bytes:
        """``data`` XOR the keystream of recipient ``id_varint`` under key ``key_id``: encrypts
        and decrypts (``data`` at most :data:`MAX_ADDRESS_BYTES`, so the counter fits a byte)."""
        stream = self._address_macs[key_id]
        length = len(data)
        if length <= _BLOCK:
            pad = stream.digest(id_varint + b"\0")
        else:
            per_id = stream.extended(id_varint)
            pad = b"".join(per_id.digest(bytes([i])) for i in range(-(-length // _BLOCK)))
        mask = int.from_bytes(pad[:length], "big")
        return (int.from_bytes(data, "big") ^ mask).to_bytes(length, "big")

    def _seal(self, kind: bytes, body: bytes, tag_length: int) -> bytes:
        signed = bytes([self.keyring.current]) + body
        return signed + self._macs[self.keyring.current].digest(kind + signed)[:tag_length]

    def _open(self, kind: bytes, raw: bytes, tag_length: int) -> bytes:
        """The body (after the key id) of a token whose MAC is right, else TokenError."""
        if len(raw) < _MIN_RAW + tag_length:
            raise TokenError("malformed token")
        signed, tag = raw[:-tag_length], raw[-tag_length:]
        mac = self._macs.get(signed[0])
        if mac is None:
            raise TokenError("token signed with an unknown key")
        if not hmac.compare_digest(mac.digest(kind + signed)[:tag_length], tag):
            raise TokenError("bad token signature")
        return signed[1:]


_IPAD = bytes(byte ^ 0x36 for byte in range(256))
_OPAD = bytes(byte ^ 0x5C for byte in range(256))


class _Mac:
    """HMAC-SHA256 (RFC 2104) of messages with a known start, kept as the two SHA-256 states
    of the padded key, the inner one having absorbed that start: a tag costs two state copies,
    half the time of copying an ``hmac.HMAC`` (``hmac.digest`` is slower still: it sets the key
    up anew every call)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, inner: hashlib._Hash, outer: hashlib._Hash) -> None:
        self._inner = inner
        self._outer = outer

    @classmethod
    def for_key(cls, key: bytes, start: bytes = _DOMAIN) -> _Mac:
        """Messages starting with ``start`` (:data:`_DOMAIN`: the tokens' tags); ``key`` has
        :data:`KEY_BYTES` bytes, which fit SHA-256's 64-byte block without hashing it first."""
        block = key.ljust(64, b"\0")
        return cls(
            hashlib.sha256(block.translate(_IPAD) + start),
            hashlib.sha256(block.translate(_OPAD)),
        )

    def extended(self, start: bytes) -> _Mac:
        """The MAC of the messages that go on with ``start`` after this one's start."""
        inner = self._inner.copy()
        inner.update(start)
        return _Mac(inner, self._outer)

    def digest(self, rest: bytes) -> bytes:
        """The tag of this MAC's start followed by ``rest``."""
        inner = self._inner.copy()
        inner.update(rest)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def click_url_fits(url: str) -> bool:
    """Whether a click token can carry ``url``: valid Unicode (a link written in bytes its
    part's charset does not have comes here with surrogates) of at most :data:`MAX_URL_BYTES`
    in UTF-8. Such a link is left untracked, never an error for the whole copy."""
    try:
        click_payload(url)
    except ValueError:
        return False
    return True


def click_payload(url: str) -> bytes:
    """A click token's URL part: a flag and the UTF-8, deflated when that is shorter (tried
    from :data:`_DEFLATE_FROM` bytes on); ValueError when a token cannot carry ``url`` (see
    :func:`click_url_fits`). Not cached here: the re-wrap chain keeps a message's payloads
    for its recipients, and personalized mail has few links in common between messages (a
    cache across messages measured no gain on such a load, docs/performance.md)."""
    try:
        data = url.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the URL is not valid Unicode (position {e.start})") from None
    if len(data) > MAX_URL_BYTES:
        raise ValueError(f"the URL is longer than {MAX_URL_BYTES} bytes ({len(data)})")
    if len(data) >= _DEFLATE_FROM:
        deflated = _deflate(data)
        if len(deflated) < len(data):
            return bytes([_FLAG_DEFLATE]) + deflated
    return bytes([_FLAG_PLAIN]) + data


def _deflate(data: bytes) -> bytes:
    """Raw DEFLATE of a URL, with a window just big enough for it (any window inflates with
    the decoder's 32 KB one): setting up zlib's default 32 KB window and 64 K-entry hash
    cost ~60 µs a link, ten times the compression itself (docs/performance.md). The
    output is as short as with the defaults for URLs up to ~1 KB, within 2 % beyond."""
    window_bits = max(9, min(15, len(data).bit_length()))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -window_bits, 4 if len(data) <= 1024 else 8)
    return compressor.compress(data) + compressor.flush()


def unsubscribe_address_fits(address: str) -> bool:
    """Whether an unsubscribe token can carry ``address``: valid Unicode, 1 to
    :data:`MAX_ADDRESS_BYTES` octets of UTF-8, with an ``@`` and no ASCII control character
    (what the SMTP listener accepts, except that it counts a non-ASCII path in characters)."""
    try:
        _address_bytes(address)
    except ValueError:
        return False
    return True


def _address_bytes(address: str) -> bytes:
    if not isinstance(address, str):
        raise TypeError(f"the address must be a str, not {type(address).__name__}")
    try:
        data = address.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the address is not valid Unicode (position {e.start})") from None
    _check_address(address, len(data))
    return data


def _address_text(data: bytes) -> str:
    """The address in ``data`` (UTF-8), ValueError for anything a recipient address is not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the address is not UTF-8") from None
    _check_address(text, len(data))
    return text


def _check_address(text: str, octets: int) -> None:
    if not 0 < octets <= MAX_ADDRESS_BYTES:
        raise ValueError(f"the address must have 1 to {MAX_ADDRESS_BYTES} octets, not {octets}")
    if "@" not in text or _NOT_IN_ADDRESS.search(text):
        raise ValueError("the address has no @ or has a control character")


def _varint(value: int) -> bytes:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"a recipient id must be an int, not {type(value).__name__}")
    if not 0 <= value < MAX_RECIPIENT_ID:
        raise ValueError(f"recipient id {value} is out of range 0..2**64-1")
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes) -> tuple[int, int]:
    """The value of the canonical varint at the start of ``data``, and where it ends."""
    value = 0
    for position, byte in enumerate(data[:_MAX_VARINT]):
        value |= (byte & 0x7F) << (7 * position)
        if not byte & 0x80:
            if (byte == 0 and position > 0) or value >= MAX_RECIPIENT_ID:
                raise TokenError("malformed token")
            return value, position + 1
    raise TokenError("malformed token")


def _only_id(body: bytes) -> int:
    recipient_id, end = _read_varint(body)
    if end != len(body):
        raise TokenError("malformed token")
    return recipient_id


def _inflate(data: bytes) -> bytes:
    decompressor = zlib.decompressobj(-15)
    try:
        out = decompressor.decompress(data, MAX_URL_BYTES + 1)
    except zlib.error:
        raise TokenError("malformed token") from None
    if not decompressor.eof or decompressor.unconsumed_tail or decompressor.unused_data:
        raise TokenError("malformed token")
    return out


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64encode(raw: bytes) -> str:
    # base64.urlsafe_b64encode, without its two Python-level calls
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")


def _b64decode(token: str) -> bytes:
    if (
        not isinstance(token, str)
        or len(token) > _MAX_URL_TOKEN_CHARS
        or len(token) % 4 == 1
        or _BASE64URL.fullmatch(token) is None
    ):
        raise TokenError("malformed token")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    if _b64encode(raw) != token:  # unused bits set in the last character
        raise TokenError("malformed token")
    return raw


def _b32encode(raw: bytes) -> str:
    return base64.b32encode(raw).rstrip(b"=").decode("ascii").lower()


def _b32decode(token: str) -> bytes:
    if (
        not isinstance(token, str)
        or len(token) > _MAX_ADDRESS_TOKEN_CHARS
        or len(token) % 8 in (1, 3, 6)
        or _BASE32.fullmatch(token) is None
    ):
        raise TokenError("malformed token")
    token = token.lower()
    raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    if _b32encode(raw) != token:  # unused bits set in the last character
        raise TokenError("malformed token")
    return raw
