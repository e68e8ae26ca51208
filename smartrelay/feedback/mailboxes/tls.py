"""TLS for the mailbox readers: the server's certificate is always verified.

Trusted: the system's CA store (:func:`~twisted.internet.ssl.platformTrust`: OpenSSL's
default paths, which honour ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``), or, when the mailbox has
a ``ca_file``, only the certificates of that PEM file (a private CA, or a self-signed server
certificate). The host name (or IP address) of the URL must match the certificate.
"""

from __future__ import annotations

import re

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)

__all__ = ["CaFileError", "client_tls", "load_ca_file"]

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class CaFileError(Exception):
    """The ``ca_file`` cannot be read or holds no certificate (one line)."""


def load_ca_file(path: str) -> list[Certificate]:
    """The certificates of a PEM file. Raises :class:`CaFileError`."""
    try:
        with open(path, "rb") as f:
            pem = f.read(1 << 20)
    except OSError as e:
        raise CaFileError(f"cannot read {path}: {e.strerror or e}") from e
    certificates = []
    for block in _PEM_CERTIFICATE.findall(pem):
        try:
            certificates.append(Certificate.loadPEM(block))
        except Exception as e:
            raise CaFileError(f"{path}: not a valid PEM certificate: {e}") from e
    if not certificates:
        raise CaFileError(f"{path}: no PEM certificate in it")
    return certificates


def client_tls(
    host: str, ca_certificates: list[Certificate] | None = None
) -> IOpenSSLClientConnectionCreator:
    """Client TLS options that verify ``host``'s certificate (see the module docstring)."""
    trust = (
        trustRootFromCertificates(ca_certificates)  # type: ignore[no-untyped-call]
        if ca_certificates
        else platformTrust()  # type: ignore[no-untyped-call]
    )
    return optionsForClientTLS(host, trustRoot=trust)
