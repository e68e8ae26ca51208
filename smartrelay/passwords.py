"""Password hashing for SMTP credentials and web users: scrypt from the standard library."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

# n=2**14, r=8, p=1: the parameters RFC 7914 suggests for interactive logins (~16 MiB, ~50 ms).
_N, _R, _P = 2**14, 8, 1
_PREFIX = "scrypt"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash``; the salt is random, so equal passwords hash differently."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"{_PREFIX}${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        prefix, n, r, p, salt, digest = stored.split("$")
        if prefix != _PREFIX:
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=128 * 1024 * 1024,
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def generate_password() -> str:
    """A random password for ``smtp-credential add`` (printed once, never stored), 24
    characters of the URL-safe base64 alphabet, never starting with ``-``: a command-line
    tool given it as an argument (``swaks --auth-password PASSWORD``) takes such a word for
    an option of its own (1 password in 32 did)."""
    while True:
        password = secrets.token_urlsafe(18)
        if not password.startswith("-"):
            return password
