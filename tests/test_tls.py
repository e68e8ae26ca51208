"""The SMTP listeners' TLS: smartrelay.smtp.tls (certificates, and real handshakes)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar, cast

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, protocol, threads
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import CertificateOptions

from smartrelay.smtp.tls import (
    SELF_SIGNED_CERTIFICATE,
    SELF_SIGNED_KEY,
    TlsError,
    TlsMaterial,
    ensure_certificate,
    server_context_factory,
)
from tests.conftest import real_reactor
from tests.support.certificates import Key, make_certificate, new_key

HOSTNAME = "relay.example.test"
GREETING = b"220 ready\r\n"
UTC = datetime.UTC
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------
# Helpers: keys and certificates made with cryptography


def pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def key_pem(key: Key, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def configured_pair(tmp_path: Path, kind: str = "ec") -> tuple[str, str, Key]:
    key = new_key(kind)
    cert = make_certificate(key, HOSTNAME, dns=(HOSTNAME,))
    return write(tmp_path / "cert.pem", pem(cert)), write(tmp_path / "key.pem", key_pem(key)), key


def load_certificate(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


# --------------------------------------------------------------------------------------
# The generated self-signed certificate


@pytest.fixture
def generated(tmp_path: Path) -> TlsMaterial:
    return ensure_certificate("", "", str(tmp_path / "data"), HOSTNAME)


def test_generates_a_self_signed_certificate(tmp_path: Path, generated: TlsMaterial) -> None:
    directory = tmp_path / "data" / "tls"
    assert generated == TlsMaterial(
        str(directory / SELF_SIGNED_CERTIFICATE), str(directory / SELF_SIGNED_KEY), generated=True
    )
    assert generated.certificate_path.endswith("data/tls/selfsigned.crt")
    assert generated.key_path.endswith("data/tls/selfsigned.key")
    assert stat.S_IMODE(os.stat(generated.key_path).st_mode) == 0o600
    assert sorted(os.listdir(directory)) == ["selfsigned.crt", "selfsigned.key"]  # no temp files

    cert = load_certificate(generated.certificate_path)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == HOSTNAME
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [HOSTNAME]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.IPv4Address("127.0.0.1"),
        ipaddress.IPv6Address("::1"),
    ]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3649) < lifetime < datetime.timedelta(days=3652)
    assert cert.not_valid_before_utc <= datetime.datetime.now(UTC)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    # The certificate's signature is its own.
    cert.verify_directly_issued_by(cert)


def test_second_call_reuses_the_files(tmp_path: Path, generated: TlsMaterial) -> None:
    cert_bytes = Path(generated.certificate_path).read_bytes()
    key_bytes = Path(generated.key_path).read_bytes()
    mtime = os.stat(generated.key_path).st_mtime_ns
    again = ensure_certificate("", "", str(tmp_path / "data"), HOSTNAME)
    assert again == generated
    assert Path(again.certificate_path).read_bytes() == cert_bytes
    assert Path(again.key_path).read_bytes() == key_bytes
    assert os.stat(again.key_path).st_mtime_ns == mtime


def test_hostname_is_matched_case_insensitively_on_reuse(
    tmp_path: Path, generated: TlsMaterial
) -> None:
    cert_bytes = Path(generated.certificate_path).read_bytes()
    ensure_certificate("", "", str(tmp_path / "data"), HOSTNAME.upper())
    assert Path(generated.certificate_path).read_bytes() == cert_bytes


def test_regenerated_for_another_hostname(tmp_path: Path, generated: TlsMaterial) -> None:
    again = ensure_certificate("", "", str(tmp_path / "data"), "other.example.test")
    names = load_certificate(again.certificate_path).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert names.value.get_values_for_type(x509.DNSName) == ["other.example.test"]


def test_regenerated_shortly_before_expiry(tmp_path: Path, generated: TlsMaterial) -> None:
    old = load_certificate(generated.certificate_path)
    data_dir = str(tmp_path / "data")
    expiry = old.not_valid_after_utc
    ensure_certificate("", "", data_dir, HOSTNAME, now=expiry - datetime.timedelta(days=31))
    assert load_certificate(generated.certificate_path) == old  # 31 days left: kept
    later = expiry - datetime.timedelta(days=29)
    ensure_certificate("", "", data_dir, HOSTNAME, now=later)  # 29 days left: replaced
    new = load_certificate(generated.certificate_path)
    assert new != old and new.not_valid_after_utc > later + datetime.timedelta(days=3600)


@pytest.mark.parametrize(
    "damage",
    [
        "delete key",
        "delete certificate",
        "garbage key",
        "garbage certificate",
        "other key",
    ],
)
def test_regenerated_when_broken(tmp_path: Path, generated: TlsMaterial, damage: str) -> None:
    old = Path(generated.certificate_path).read_bytes()
    action, which = damage.split(" ", 1)
    path = Path(generated.key_path if which.endswith("key") else generated.certificate_path)
    if action == "delete":
        path.unlink()
    elif action == "garbage":
        path.write_bytes(b"-----BEGIN nonsense\n")
    else:
        path.write_bytes(key_pem(new_key()))
    again = ensure_certificate("", "", str(tmp_path / "data"), HOSTNAME)
    assert Path(again.certificate_path).read_bytes() != old
    assert stat.S_IMODE(os.stat(again.key_path).st_mode) == 0o600
    server_context_factory(again)  # loads and matches


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TlsError, match="cannot write the self-signed TLS certificate"):
        ensure_certificate("", "", str(tmp_path / "file"), HOSTNAME)


# --------------------------------------------------------------------------------------
# A configured certificate and key


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_configured_pair_is_used(tmp_path: Path, kind: str) -> None:
    cert, key, _ = configured_pair(tmp_path, kind)
    data_dir = tmp_path / "data"
    material = ensure_certificate(cert, key, str(data_dir), HOSTNAME)
    assert material == TlsMaterial(cert, key, generated=False)
    assert not data_dir.exists()  # nothing generated
    assert isinstance(server_context_factory(material), CertificateOptions)


def broken_pair(tmp_path: Path, case: str) -> tuple[str, str]:
    """A certificate and key path pair that must be refused."""
    cert, key, private_key = configured_pair(tmp_path)
    if case == "missing certificate":
        return str(tmp_path / "nope.pem"), key
    if case == "missing key":
        return cert, str(tmp_path / "nope.key")
    if case == "certificate is a folder":
        return str(tmp_path), key
    if case == "empty certificate":
        return write(tmp_path / "empty.pem", b""), key
    if case == "empty key":
        return cert, write(tmp_path / "empty.key", b"")
    if case == "certificate not PEM":
        der = load_certificate(cert).public_bytes(serialization.Encoding.DER)
        return write(tmp_path / "cert.der", der), key
    if case == "certificate is garbage PEM":
        junk = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
        return write(tmp_path / "junk.pem", junk), key
    if case == "certificate file holds the key":
        return key, key
    if case == "key file holds the certificate":
        return cert, cert
    if case == "mismatched":
        return cert, write(tmp_path / "other.key", key_pem(new_key()))
    if case == "mismatched rsa":
        return cert, write(tmp_path / "other.key", key_pem(new_key("rsa")))
    if case == "encrypted key":
        return cert, write(tmp_path / "enc.key", key_pem(private_key, b"secret"))
    if case == "x25519 key":
        x_key = x25519.X25519PrivateKey.generate()
        data = x_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert, write(tmp_path / "x25519.key", data)
    raise AssertionError(case)


BROKEN = [
    "missing certificate",
    "missing key",
    "certificate is a folder",
    "empty certificate",
    "empty key",
    "certificate not PEM",
    "certificate is garbage PEM",
    "certificate file holds the key",
    "key file holds the certificate",
    "mismatched",
    "mismatched rsa",
    "encrypted key",
    "x25519 key",
]


@pytest.mark.parametrize("case", BROKEN)
def test_broken_configured_pair(tmp_path: Path, case: str) -> None:
    cert, key = broken_pair(tmp_path, case)
    with pytest.raises(TlsError) as info:
        ensure_certificate(cert, key, str(tmp_path / "data"), HOSTNAME)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    assert repr(cert) in message or repr(key) in message
    if case.startswith("mismatched"):
        assert "does not match" in message
    if case.startswith("missing"):
        assert "No such file or directory" in message
    if case == "encrypted key":
        assert "passphrase" in message


@pytest.mark.parametrize("case", BROKEN)
def test_context_factory_refuses_broken_material(tmp_path: Path, case: str) -> None:
    cert, key = broken_pair(tmp_path, case)
    with pytest.raises(TlsError):
        server_context_factory(TlsMaterial(cert, key, generated=False))


@pytest.mark.parametrize(("cert", "key"), [("cert.pem", ""), ("", "key.pem")])
def test_only_one_of_certificate_and_key(tmp_path: Path, cert: str, key: str) -> None:
    with pytest.raises(TlsError, match="must both be set or both be empty"):
        ensure_certificate(cert, key, str(tmp_path), HOSTNAME)


# --------------------------------------------------------------------------------------
# The context factory


def test_context_refuses_tls_before_1_2(generated: TlsMaterial) -> None:
    options = server_context_factory(generated)
    context = options.getContext()
    flags = context.set_options(0)  # returns the options in effect
    for refused in (SSL.OP_NO_SSLv2, SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
        assert flags & refused == refused
    assert flags & SSL.OP_NO_TLSv1_2 == 0 and flags & SSL.OP_NO_TLSv1_3 == 0


def test_context_is_built_once(generated: TlsMaterial) -> None:
    options = server_context_factory(generated)
    assert options.getContext() is options.getContext()
    # The files are not needed any more once the factory exists.
    os.unlink(generated.key_path)
    assert options.getContext() is not None


# --------------------------------------------------------------------------------------
# Real handshakes


class Greeter(protocol.Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(GREETING)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Callable[[TlsMaterial], int]]:
    """Start a TLS server (the real reactor) for some material; returns its port."""
    reactor = real_reactor()
    ports: list[IListeningPort] = []

    def start(material: TlsMaterial) -> int:
        factory: protocol.ServerFactory[Greeter] = protocol.ServerFactory()
        factory.protocol = Greeter
        port = reactor.listenSSL(
            0, factory, server_context_factory(material), interface="127.0.0.1"
        )
        ports.append(port)
        return cast(IPv4Address, port.getHost()).port

    yield start
    for port in ports:
        await defer.maybeDeferred(port.stopListening)


def in_thread(f: Callable[..., _T], *args: object) -> defer.Deferred[_T]:
    return cast("defer.Deferred[_T]", threads.deferToThread(f, *args))


def handshake(port: int, context: ssl.SSLContext, server_hostname: str | None = None) -> str:
    """Connect to 127.0.0.1:port with ``context``; the negotiated TLS version."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=server_hostname) as tls,
    ):
        received = b""
        while len(received) < len(GREETING):
            chunk = tls.recv(100)
            if not chunk:
                break
            received += chunk
        assert received == GREETING
        tls.sendall(b"QUIT\r\n")
        version = tls.version()
        assert version is not None
        return version


def verifying_client(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def tls11_client() -> ssl.SSLContext | None:
    """A client that speaks at most TLS 1.1, or None where this OpenSSL cannot build one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        return None
    return context


def tls11_works_against_a_lenient_server(material: TlsMaterial, client: ssl.SSLContext) -> bool:
    """The control: can ``client`` really complete a TLS 1.1 handshake with someone?"""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        server.load_cert_chain(material.certificate_path, material.key_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server.minimum_version = ssl.TLSVersion.TLSv1
        server.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        return False
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def accept() -> None:
            try:
                connection, _ = listener.accept()
                with server.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(GREETING)
                    tls.recv(100)
            except OSError:
                pass

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            version = handshake(listener.getsockname()[1], client)
        except OSError:
            return False
        finally:
            thread.join(10)
    return version == "TLSv1.1"


@pytest_twisted.ensureDeferred
async def test_handshake_with_the_generated_certificate(
    serve: Callable[[TlsMaterial], int], generated: TlsMaterial
) -> None:
    port = serve(generated)
    # Clients that trust the generated certificate can verify it for the hostname and for
    # 127.0.0.1 (subjectAltName IP).
    client = verifying_client(generated.certificate_path)
    for name in (HOSTNAME, "127.0.0.1"):
        version = await in_thread(handshake, port, client, name)
        assert version in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLCertVerificationError):
        await in_thread(handshake, port, client, "wrong.example.test")


@pytest_twisted.ensureDeferred
async def test_tls_1_2_is_accepted(
    serve: Callable[[TlsMaterial], int], generated: TlsMaterial
) -> None:
    port = serve(generated)
    client = verifying_client(generated.certificate_path)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await in_thread(handshake, port, client, HOSTNAME) == "TLSv1.2"


@pytest_twisted.ensureDeferred
async def test_tls_1_1_is_refused(
    serve: Callable[[TlsMaterial], int], generated: TlsMaterial
) -> None:
    port = serve(generated)
    client = tls11_client()
    if client is None or not await in_thread(
        tls11_works_against_a_lenient_server, generated, client
    ):
        # This OpenSSL cannot speak TLS 1.1 at all, so a refused handshake would prove
        # nothing: check the server context's settings instead.
        flags = server_context_factory(generated).getContext().set_options(0)
        assert flags & SSL.OP_NO_TLSv1_1 and flags & SSL.OP_NO_TLSv1
        return
    with pytest.raises(OSError):  # ssl.SSLError, or a reset connection
        await in_thread(handshake, port, client)
    # The same server still talks to a modern client.
    modern = verifying_client(generated.certificate_path)
    assert await in_thread(handshake, port, modern, HOSTNAME) in ("TLSv1.2", "TLSv1.3")


@pytest_twisted.ensureDeferred
async def test_certificate_chain_is_sent(
    serve: Callable[[TlsMaterial], int], tmp_path: Path
) -> None:
    root_key, intermediate_key, leaf_key = new_key(), new_key(), new_key("rsa")
    root = make_certificate(root_key, "Test Root", ca=True)
    intermediate = make_certificate(
        intermediate_key, "Test Intermediate", issuer=(root, root_key), ca=True
    )
    leaf = make_certificate(
        leaf_key, HOSTNAME, issuer=(intermediate, intermediate_key), dns=(HOSTNAME,)
    )
    cert = write(tmp_path / "chain.pem", pem(leaf, intermediate))
    key = write(tmp_path / "leaf.key", key_pem(leaf_key))
    material = ensure_certificate(cert, key, str(tmp_path / "data"), HOSTNAME)
    port = serve(material)
    # The client trusts only the root: it needs the intermediate from the server.
    client = verifying_client(write(tmp_path / "root.pem", pem(root)))
    assert await in_thread(handshake, port, client, HOSTNAME) in ("TLSv1.2", "TLSv1.3")

    # Control: without the intermediate in the file, verification fails.
    leaf_only = TlsMaterial(write(tmp_path / "leaf.pem", pem(leaf)), key, generated=False)
    port = serve(leaf_only)
    with pytest.raises(ssl.SSLCertVerificationError):
        await in_thread(handshake, port, client, HOSTNAME)
