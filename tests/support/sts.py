"""MTA-STS test parts: a throwaway CA (``cryptography``), TLS options for servers it certifies,
and a real HTTPS server on 127.0.0.1 serving ``/.well-known/mta-sts.txt``."""

from __future__ import annotations

import datetime
from typing import Any

from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from smartrelay.reactor import IRelayReactor


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class TestCa:
    """A certificate authority made for one test: a root, and server certificates it signs."""

    __test__ = False  # not a test class

    def __init__(self, name: str = "SmartRelay test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        public = self.key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, *names: str, days: tuple[int, int] = (-1, 30)
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A server key and certificate for ``names`` (DNS names), valid ``days`` from now."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=days[0]))
            .not_valid_after(now + datetime.timedelta(days=days[1]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return key, certificate

    def server_options(self, *names: str, days: tuple[int, int] = (-1, 30)) -> Any:
        """Server TLS options presenting a certificate for ``names`` (and this CA's root)."""
        key, certificate = self.issue(*names, days=days)
        make: Any = ssl.CertificateOptions
        return make(privateKey=key, certificate=certificate, extraCertChain=[self.certificate])


class PolicyResource(Resource):
    """Serves the policy as told: its body, status, content type, or a redirect."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.body = b""
        self.status = 200
        self.content_type = b"text/plain"
        self.location: bytes | None = None
        self.paths: list[bytes] = []

    def render_GET(self, request: Request) -> bytes:
        self.paths.append(request.path)
        if request.path != b"/.well-known/mta-sts.txt":
            request.setResponseCode(404)
            return b"not found"
        request.setResponseCode(self.status)
        if self.location is not None:
            request.setHeader(b"location", self.location)  # type: ignore[no-untyped-call]
        request.setHeader(b"content-type", self.content_type)  # type: ignore[no-untyped-call]
        return self.body


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "\r\n".join(lines).encode() + b"\r\n"


@define
class PolicyServer:
    """A real HTTPS server on 127.0.0.1 (any host name: the client connects by address)."""

    reactor: IRelayReactor
    resource: PolicyResource = field(factory=PolicyResource)
    listening: IListeningPort | None = None

    def start(self, options: Any) -> int:
        site = Site(self.resource)  # type: ignore[no-untyped-call]
        self.listening = self.reactor.listenSSL(0, site, options, interface="127.0.0.1")
        return int(self.listening.getHost().port)  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self.listening is not None:
            listening, self.listening = self.listening, None
            stopped = listening.stopListening()
            if stopped is not None:
                await stopped

    @property
    def requests(self) -> int:
        return len(self.resource.paths)
