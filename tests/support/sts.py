"""MTA-STS test parts: a throwaway CA (``cryptography``), TLS options for servers it certifies,
and a real HTTPS server on 127.0.0.1 serving ``/.well-known/mta-sts.txt``."""

from __future__ import annotations

from typing import Any

from attrs import define, field
from cryptography import x509
from twisted.internet import ssl
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from smartrelay.reactor import IRelayReactor
from tests.support.certificates import Key, make_certificate, new_key


class TestCa:
    """A certificate authority made for one test: a root, and server certificates it signs."""

    __test__ = False  # not a test class

    def __init__(self, name: str = "SmartRelay test CA") -> None:
        self.key = new_key()
        self.certificate = make_certificate(self.key, name, ca=True)

    def issue(self, *names: str, days: tuple[int, int] = (-1, 30)) -> tuple[Key, x509.Certificate]:
        """A server key and certificate for ``names`` (DNS names), valid ``days`` from now."""
        key = new_key()
        issuer = (self.certificate, self.key)
        return key, make_certificate(key, names[0], issuer=issuer, dns=names, days=days)

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
