"""DKIM signing benchmark: dkimpy's own signing vs SmartRelay's (dkimpy canonicalisation,
``cryptography`` signing), per signature, RSA-2048 and Ed25519. Checks that both produce the
same header first.

    .venv/bin/python bench/dkim_signing.py [--seconds 2] [--body-kb 5]
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import tempfile
import time
from collections.abc import Callable
from typing import Literal
from unittest import mock

import dkim
import dkim.crypto  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from smartrelay.config import DkimAlgorithm, DkimKey
from smartrelay.rewrap.dkim import DkimSigner, LoadedKey, generate_key, signed_header_names

NOW = 1_700_000_000
ALGORITHMS: tuple[tuple[Literal["rsa", "ed25519"], DkimAlgorithm], ...] = (
    ("rsa", "rsa-sha256"),
    ("ed25519", "ed25519-sha256"),
)


def message(body_kb: int) -> bytes:
    line = b'<p>Hello <a href="https://example.com/x?a=1&amp;b=2">link</a></p>\r\n'
    return (
        b"From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: benchmark\r\n"
        b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <bench@example.com>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        + line
        * max(1, body_kb * 1024 // len(line))
    )


def per_call_ms(fn: Callable[[], object], seconds: float) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return elapsed / calls * 1000


def dkimpy_key_text(key: LoadedKey) -> bytes:
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        return key.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    return base64.b64encode(
        key.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )


def primitives(msg: bytes, private: rsa.RSAPrivateKey, pem: bytes, seconds: float) -> None:
    """The RSA primitive alone: dkimpy's pure-Python pow vs cryptography (OpenSSL)."""
    digest = hashlib.sha256(msg)
    parsed = dkim.crypto.parse_pem_private_key(pem)
    pure = per_call_ms(lambda: dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, parsed), seconds)
    ossl = per_call_ms(
        lambda: private.sign(digest.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256())),
        seconds,
    )
    print(
        f"  RSA-{private.key_size} primitive only: pure-Python {pure:.3f}, cryptography {ossl:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--body-kb", type=int, default=5, help="message body size")
    args = parser.parse_args()
    msg = message(args.body_kb)
    headers, _ = dkim.rfc822_parse(msg)
    include = signed_header_names(headers)
    print(f"message: {len(msg)} bytes; {args.seconds:g} s per measurement; ms per signature")
    with tempfile.TemporaryDirectory() as directory:
        for algorithm, signing in ALGORITHMS:
            path, _ = generate_key("example.com", algorithm, algorithm, directory)
            signer = DkimSigner([DkimKey("example.com", algorithm, path, signing)], now=lambda: NOW)
            key = signer.keys[0]
            key_text = dkimpy_key_text(key)

            def reference(
                key_text: bytes = key_text, signing: str = signing, selector: str = algorithm
            ) -> bytes:
                return dkim.sign(
                    msg,
                    selector.encode(),
                    b"example.com",
                    key_text,
                    canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=signing.encode(),
                    include_headers=include,
                )

            with mock.patch("time.time", lambda: NOW):
                assert reference() + msg == signer.sign(msg), "not byte-identical"
            slow = per_call_ms(reference, args.seconds)
            fast = per_call_ms(functools.partial(signer.sign, msg), args.seconds)
            print(
                f"{signing:15} dkimpy {slow:7.3f}   smartrelay {fast:7.3f}"
                f"   ({slow / fast:.1f}x; identical output)"
            )
            if isinstance(key.private_key, rsa.RSAPrivateKey):
                primitives(msg, key.private_key, key_text, args.seconds)


if __name__ == "__main__":
    main()
