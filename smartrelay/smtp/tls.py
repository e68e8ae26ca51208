"""TLS for the SMTP listeners: the certificate, and the server context built from it once (and
again on a reload: :class:`ReloadableTls`).

``[smtp] tls_certificate`` / ``tls_key`` name PEM files. When both are empty a self-signed
certificate is used: ``{data_dir}/tls/selfsigned.crt`` and ``selfsigned.key``, generated on
first start (ECDSA P-256, valid 10 years, for ``[server] hostname``, 127.0.0.1 and ::1) and
reused afterwards. It is generated again when it is missing, unreadable, does not match its
key, does not name the current hostname, or expires within 30 days.

Every problem raises :class:`TlsError`, whose ``str()`` is one line naming the file.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import tempfile
from typing import cast

from attrs import frozen
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

__all__ = [
    "SELF_SIGNED_CERTIFICATE",
    "SELF_SIGNED_KEY",
    "SELF_SIGNED_VALIDITY",
    "TLS12_CIPHERS",
    "ReloadableTls",
    "TlsError",
    "TlsMaterial",
    "ensure_certificate",
    "server_context_factory",
]

_log = Logger()

#: File names of the generated certificate and key under ``{data_dir}/tls/``.
SELF_SIGNED_CERTIFICATE = "selfsigned.crt"
SELF_SIGNED_KEY = "selfsigned.key"
SELF_SIGNED_VALIDITY = datetime.timedelta(days=3650)
#: A generated certificate expiring sooner than this is replaced at start-up.
_RENEW_BEFORE = datetime.timedelta(days=30)

#: Private key types a TLS server certificate may have.
ServerKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


#: The TLS 1.2 cipher suites the listeners accept, in the server's order of preference:
#: ECDHE key exchange (forward secrecy) with an AEAD cipher only, for ECDSA and RSA
#: certificates alike. No plain-RSA key exchange, no DHE, no CBC, no SHA-1. TLS 1.3 suites
#: (all ECDHE/AEAD) are OpenSSL's defaults. Printed in docs/smtp.md.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
)
_TLS13_CIPHERS = "TLS13-AES-256-GCM-SHA384:TLS13-CHACHA20-POLY1305-SHA256:TLS13-AES-128-GCM-SHA256"


class TlsError(Exception):
    """The TLS certificate or key cannot be used. ``str()`` is one line."""


@frozen
class TlsMaterial:
    """Where the listener's certificate (PEM, leaf first, then any chain) and key are."""

    certificate_path: str
    key_path: str
    #: True when this is the self-signed certificate generated in data_dir.
    generated: bool


def ensure_certificate(
    certificate: str,
    key: str,
    data_dir: str,
    hostname: str,
    *,
    now: datetime.datetime | None = None,
) -> TlsMaterial:
    """The certificate and key to use, checked; the self-signed pair created if needed.

    ``certificate`` and ``key`` are the config values: both set (the files must load and
    match), or both empty (the self-signed pair in ``{data_dir}/tls/``). ``now`` (UTC, for
    tests) decides whether a generated certificate is about to expire.
    """
    if certificate and key:
        _load_pair(certificate, key)
        return TlsMaterial(certificate, key, generated=False)
    if certificate or key:
        raise TlsError("tls_certificate and tls_key must both be set or both be empty")

    now = now or datetime.datetime.now(datetime.UTC)
    directory = os.path.join(data_dir, "tls")
    cert_path = os.path.join(directory, SELF_SIGNED_CERTIFICATE)
    key_path = os.path.join(directory, SELF_SIGNED_KEY)
    problem = _reuse_problem(cert_path, key_path, hostname, now)
    if problem is not None:
        _log.info(
            "Generating a self-signed TLS certificate for {hostname} in {path} ({reason})",
            hostname=hostname,
            path=cert_path,
            reason=problem,
        )
        _generate(directory, cert_path, key_path, hostname, now)
    return TlsMaterial(cert_path, key_path, generated=True)


def server_context_factory(material: TlsMaterial) -> CertificateOptions:
    """The TLS server options of a listener: TLS 1.2 or later, ECDHE with AEAD ciphers only
    (:data:`TLS12_CIPHERS`, or TLS 1.3), in the server's order of preference.

    The files are read and the OpenSSL context is built here, once: a problem raises
    :class:`TlsError` at start-up rather than at the first handshake. Certificates after the
    first one in the certificate file are sent as the chain.
    """
    chain, private_key = _load_pair(material.certificate_path, material.key_path)
    # CertificateOptions is annotated with pyOpenSSL's X509 and PKey, but only hands them to
    # pyOpenSSL's Context.use_certificate / use_privatekey / add_extra_chain_cert, which take
    # cryptography objects too, and deprecate (warn about) the pyOpenSSL ones.
    try:
        options = CertificateOptions(
            privateKey=cast(crypto.PKey, private_key),
            certificate=cast(crypto.X509, chain[0]),
            extraCertChain=cast(list[crypto.X509], chain[1:]),
            raiseMinimumTo=TLSVersion.TLSv1_2,
            # Twisted's default list ends in plain-RSA suites (no forward secrecy), which an
            # RSA certificate would let a client pick. CertificateOptions always sets
            # OP_CIPHER_SERVER_PREFERENCE.
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(  # type: ignore[no-untyped-call]
                ":".join((_TLS13_CIPHERS, *TLS12_CIPHERS))
            ),
        )
        options.getContext()  # build (and cache) the context now
    except (SSL.Error, crypto.Error, TypeError, ValueError) as e:
        raise TlsError(
            f"cannot use TLS certificate {material.certificate_path!r}"
            f" with key {material.key_path!r}: {_reason(e)}"
        ) from e
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTls:
    """A listener's TLS server options whose certificate can be re-read while it runs
    (``systemctl reload``, docs/configuration.md): each new TLS connection (STARTTLS or
    implicit TLS) takes the options current when it starts; open sessions keep theirs."""

    def __init__(self, material: TlsMaterial) -> None:
        """Reads the files now (:func:`server_context_factory`; :class:`TlsError`)."""
        self.material = material
        self._options = server_context_factory(material)

    def reload(self, material: TlsMaterial) -> None:
        """Read ``material`` (the same paths or others) and use it for new connections.
        Raises :class:`TlsError` and keeps the current certificate when it cannot be used."""
        options = server_context_factory(material)
        self.material, self._options = material, options

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self._options.serverConnectionForTLS(tlsProtocol)


# --------------------------------------------------------------------------------------
# Loading and checking


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TlsError(f"cannot read TLS {what} {path!r}: {e.strerror or e}") from e


def _load_certificates(path: str) -> list[x509.Certificate]:
    data = _read(path, "certificate")
    if b"-----BEGIN" not in data:
        raise TlsError(f"TLS certificate {path!r} is not a PEM file (no -----BEGIN line)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TlsError(
            f"TLS certificate {path!r} has no valid PEM certificate: {_reason(e)}"
        ) from e


def _load_key(path: str) -> ServerKey:
    data = _read(path, "key")
    if b"-----BEGIN" not in data:
        raise TlsError(f"TLS key {path!r} is not a PEM file (no -----BEGIN line)")
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise TlsError(
            f"TLS key {path!r} is protected by a passphrase (not supported: store it decrypted,"
            " readable only by the server's user)"
        ) from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TlsError(f"TLS key {path!r} has no valid PEM private key: {_reason(e)}") from e
    if not isinstance(
        private_key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise TlsError(
            f"TLS key {path!r} is a {type(private_key).__name__.removeprefix('_')},"
            " not usable for a TLS server (use RSA or ECDSA)"
        )
    return private_key


def _load_pair(certificate_path: str, key_path: str) -> tuple[list[x509.Certificate], ServerKey]:
    """The certificate chain (leaf first) and the key, checked to belong together."""
    chain = _load_certificates(certificate_path)
    private_key = _load_key(key_path)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private_key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise TlsError(f"TLS key {key_path!r} does not match the certificate {certificate_path!r}")
    return chain, private_key


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# --------------------------------------------------------------------------------------
# The self-signed certificate


def _reuse_problem(
    cert_path: str, key_path: str, hostname: str, now: datetime.datetime
) -> str | None:
    """Why the generated pair cannot be reused, or None when it can."""
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        return "none yet"
    try:
        chain, _ = _load_pair(cert_path, key_path)
    except TlsError as e:
        return str(e)
    leaf = chain[0]
    if leaf.not_valid_after_utc - _RENEW_BEFORE < now:
        return "the old one expires soon"
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "the old one has no subjectAltName"
    if hostname.lower() not in (n.lower() for n in names.get_values_for_type(x509.DNSName)):
        return f"the old one is not for {hostname}"
    return None


def _generate(
    directory: str, cert_path: str, key_path: str, hostname: str, now: datetime.datetime
) -> None:
    private_key = ec.generate_private_key(ec.SECP256R1())
    certificate = _self_signed(private_key, hostname, now)
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # The key first: a crash in between leaves a mismatched pair, which is regenerated.
        _write_atomically(key_path, key_pem, 0o600)
        _write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as e:
        raise TlsError(
            f"cannot write the self-signed TLS certificate in {directory!r}: {e.strerror or e}"
        ) from e


def _self_signed(
    private_key: ec.EllipticCurvePrivateKey, hostname: str, now: datetime.datetime
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    alt_names: list[x509.GeneralName] = [
        x509.DNSName(hostname),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ]
    public_key = private_key.public_key()
    try:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(secrets.randbits(127) | 1)
            # A little in the past, for clients whose clock is behind.
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + SELF_SIGNED_VALIDITY)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        return builder.sign(private_key, hashes.SHA256())
    except ValueError as e:
        raise TlsError(
            f"cannot generate a self-signed TLS certificate for {hostname!r}: {_reason(e)}"
        ) from e


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    """Write ``path`` through a temporary file in the same folder, created with ``mode``."""
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pem")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
