"""The listeners' TLS cipher policy (issue 11 item 10), with real TLS clients (Python ssl).

Whatever the certificate (RSA or ECDSA), and on STARTTLS and ``ssl:`` listeners alike:
TLS 1.2 or later, ECDHE (or TLS 1.3) with AEAD ciphers only, in the server's order.
Each refused client is first shown to work against a lenient server with the same
certificate, so a refusal proves the policy, not a client that cannot speak at all.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort

from smartrelay.smtp.listener import implicit_tls
from smartrelay.smtp.tls import (
    TLS12_CIPHERS,
    TlsError,
    TlsMaterial,
    server_context_factory,
)
from tests.conftest import real_reactor
from tests.support.relay import HOST, Relays, free_ports
from tests.test_tls import (
    GREETING,
    Greeter,
    configured_pair,
    in_thread,
    tls11_client,
    tls11_works_against_a_lenient_server,
)

#: TLS 1.2 suites a client may offer that the policy refuses: no forward secrecy (plain RSA
#: key exchange), DHE, CBC.
REFUSED_WITH_RSA = ["AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-SHA", "ECDHE-RSA-AES128-SHA"]
REFUSED_WITH_EC = ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"]


def client(ciphers: str | None = None, tls12_only: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers is not None:
        context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    return context


def session(port: int, context: ssl.SSLContext) -> tuple[str, str]:
    """Handshake with 127.0.0.1:port, read the greeting; (TLS version, cipher name)."""
    with (
        socket.create_connection((HOST, port), timeout=10) as sock,
        context.wrap_socket(sock) as tls,
    ):
        assert tls.recv(100).startswith(b"220 ")
        cipher = tls.cipher()
        version = tls.version()
        assert cipher is not None and version is not None
        return version, cipher[0]


def works_against_a_lenient_server(material: TlsMaterial, context: ssl.SSLContext) -> bool:
    """The control: does ``context`` complete a handshake with anyone holding this key?"""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(material.certificate_path, material.key_path)
    server.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_server((HOST, 0)) as listener:
        listener.settimeout(10)

        def accept() -> None:
            try:
                connection, _ = listener.accept()
                with server.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(GREETING)
            except OSError:
                pass

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            session(listener.getsockname()[1], context)
        except OSError:
            return False
        finally:
            thread.join(10)
    return True


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Callable[[TlsMaterial], int]]:
    """A TLS server with the listeners' context factory; returns its port."""
    reactor = real_reactor()
    ports: list[IListeningPort] = []

    def start(material: TlsMaterial) -> int:
        factory: protocol.ServerFactory[Greeter] = protocol.ServerFactory()
        factory.protocol = Greeter
        port = reactor.listenSSL(0, factory, server_context_factory(material), interface=HOST)
        ports.append(port)
        return cast(IPv4Address, port.getHost()).port

    yield start
    for port in ports:
        await defer.maybeDeferred(port.stopListening)


def material_of(tmp_path: Path, kind: str) -> TlsMaterial:
    cert, key, _ = configured_pair(tmp_path, kind)
    return TlsMaterial(cert, key, generated=False)


def assert_policy(port: int, material: TlsMaterial, kind: str) -> None:
    """Runs in a thread: every check of the policy against ``port``."""
    for cipher in REFUSED_WITH_RSA if kind == "rsa" else REFUSED_WITH_EC:
        weak = client(cipher, tls12_only=True)
        assert works_against_a_lenient_server(material, weak), f"control failed: {cipher}"
        with pytest.raises(OSError):  # ssl.SSLError (handshake failure), or a reset
            session(port, weak)
    # A normal client: TLS 1.3; limited to TLS 1.2: ECDHE with AEAD.
    assert session(port, client())[0] == "TLSv1.3"
    version, cipher = session(port, client(tls12_only=True))
    assert version == "TLSv1.2" and cipher in TLS12_CIPHERS, cipher
    assert cipher.startswith(f"ECDHE-{'RSA' if kind == 'rsa' else 'ECDSA'}-")
    # The server's order wins over the client's (AES-256 first).
    offered = ":".join(c for c in reversed(TLS12_CIPHERS) if ("RSA" in c) == (kind == "rsa"))
    assert (
        session(port, client(offered, tls12_only=True))[1]
        == TLS12_CIPHERS[0 if kind == "ec" else 1]
    )
    old = tls11_client()
    if old is not None and tls11_works_against_a_lenient_server(material, old):
        with pytest.raises(OSError):
            session(port, old)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest_twisted.ensureDeferred
async def test_cipher_policy_whatever_the_certificate(
    serve: Callable[[TlsMaterial], int], tmp_path: Path, kind: str
) -> None:
    material = material_of(tmp_path, kind)
    port = serve(material)
    await in_thread(assert_policy, port, material, kind)


@pytest_twisted.async_yield_fixture
async def sqlite_relays(tmp_path: Path) -> AsyncIterator[Relays]:
    runner = Relays(real_reactor(), tmp_path, f"sqlite:{tmp_path / 'smartrelay.db'}")
    try:
        yield runner
    finally:
        await runner.stop_all()


@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest_twisted.ensureDeferred
async def test_implicit_tls_listener_has_the_same_policy(
    sqlite_relays: Relays, tmp_path: Path, kind: str
) -> None:
    """An ``ssl:`` endpoint with an operator's certificate: Twisted's own ``ssl:`` endpoint
    would accept suites without forward secrecy; ours gets the listeners' policy."""
    material = material_of(tmp_path, kind)
    (port,) = free_ports(1)
    listen = f"ssl:{port}:interface={HOST}:privateKey={material.key_path}"
    listen += f":certKey={material.certificate_path}"
    await sqlite_relays.start({"listen": [listen]})
    await in_thread(assert_policy, port, material, kind)


def test_implicit_tls_endpoint_strings(tmp_path: Path) -> None:
    material = material_of(tmp_path, "ec")
    files = f"privateKey={material.key_path}:certKey={material.certificate_path}"
    assert implicit_tls("tcp:25:interface=127.0.0.1") is None
    converted = implicit_tls(f"ssl:465:interface=\\:\\:1:{files}")
    assert converted is not None and converted[0] == "tcp:465:interface=\\:\\:1"
    converted = implicit_tls(f"SSL:465:{files}")
    assert converted is not None and converted[0] == "tcp:465"
    with pytest.raises(TlsError, match="extracertchain not supported"):
        implicit_tls(f"ssl:465:{files}:extraCertChain=chain.pem")
    with pytest.raises(TlsError, match="cannot read TLS certificate"):
        implicit_tls("ssl:465:privateKey=/nonexistent/key.pem")
