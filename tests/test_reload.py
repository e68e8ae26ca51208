"""SIGHUP (``systemctl reload smartrelay``): the relay re-reads its config and applies what can
be applied live (docs/configuration.md, "Reloading").

The relays run as users run them (``twistd -n smartrelay``, tests/support/run.py) and get a
real SIGHUP: the listeners' certificate replaced in place (as certbot renews it) is served to
new STARTTLS sessions while open ones keep theirs; a DKIM key file replaced in place signs the
next message, whether the main process or a delivery process signs; a broken config changes
nothing. The process stays the same throughout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import time
from pathlib import Path

import pytest
import pytest_twisted

from smartrelay.config import Config, DatabaseConfig, DkimKey, SmtpConfig, WebConfig, load_config
from smartrelay.config.changes import config_changes
from smartrelay.rewrap.dkim import DkimError, DkimSigner, generate_key, txt_record_name
from smartrelay.smtp.tls import ReloadableTls, TlsError, TlsMaterial, ensure_certificate
from smartrelay.web.ui.deliverability import Deliverability
from tests.conftest import PerlVerify, real_reactor
from tests.support.postfix import PostfixSink
from tests.support.relay import HOST, free_ports, start_in_process
from tests.support.run import Twistd, write_config
from tests.support.traffic import wait_until

QUEUED = "Ok: queued as "


def certificate_pair(directory: Path, hostname: str) -> tuple[bytes, bytes]:
    """A new self-signed certificate and its key (PEM), made by the relay's own generator."""
    material = ensure_certificate("", "", str(directory), hostname)
    return (
        Path(material.certificate_path).read_bytes(),
        Path(material.key_path).read_bytes(),
    )


def der_of(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def starttls(port: int) -> smtplib.SMTP:
    """An SMTP session on ``port`` after STARTTLS (the caller closes it)."""
    client = smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=30)
    client.ehlo()
    client.starttls(context=unverified())
    client.ehlo()
    return client


def peer_certificate(client: smtplib.SMTP) -> bytes:
    sock = client.sock
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def implicit_certificate(port: int) -> bytes:
    """The certificate a new connection to the implicit-TLS (``ssl:``) ``port`` gets (DER)."""
    with (
        socket.create_connection((HOST, port), timeout=30) as raw,
        unverified().wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert tls.recv(3) == b"220"
    assert der is not None
    return der


def served_certificate(port: int) -> bytes:
    """The certificate a new STARTTLS session on ``port`` gets (DER)."""
    client = starttls(port)
    try:
        return peer_certificate(client)
    finally:
        client.quit()


def wait_for_count(relay: Twistd, text: str, count: int, timeout: float = 60.0) -> None:
    """Wait until ``text`` occurs ``count`` times in the relay's output."""
    try:
        wait_until(lambda: True if relay.output.count(text) >= count else None, "", timeout)
    except AssertionError:
        status = relay.process.poll()
        raise AssertionError(
            f"not {count} x {text!r} after {timeout} s (the relay"
            f" {'runs' if status is None else f'exited with {status}'}); output:\n{relay.output}"
        ) from None


def reload(relay: Twistd, expected: str, count: int) -> None:
    """SIGHUP, and wait for the ``count``-th line containing ``expected``."""
    relay.process.send_signal(signal.SIGHUP)
    wait_for_count(relay, expected, count)
    assert relay.process.poll() is None, relay.output


def relay_config(
    directory: Path, smtp_port: int, inbound_port: int, extra: str = "", implicit_port: int = 0
) -> Path:
    """``implicit_port``: an inbound ``ssl:`` listener too, with files of its own
    (``implicit.crt``, ``implicit.key``)."""
    var = directory / "var"
    inbound = [f"tcp:{inbound_port}:interface={HOST}"]
    if implicit_port:
        inbound.append(
            f"ssl:{implicit_port}:interface={HOST}:privateKey={directory / 'implicit.key'}"
            f":certKey={directory / 'implicit.crt'}"
        )
    return write_config(
        directory,
        f"sqlite:{directory / 'smartrelay.db'}",
        f'[server]\nhostname = "relay.test"\ndata_dir = {json.dumps(str(var))}\n'
        f'[smtp]\nlisten = ["tcp:{smtp_port}:interface={HOST}"]\n'
        f"tls_certificate = {json.dumps(str(directory / 'smtp.crt'))}\n"
        f"tls_key = {json.dumps(str(directory / 'smtp.key'))}\n"
        f"[inbound]\nlisten = {json.dumps(inbound)}\n"
        f"[rewrap]\nsecret_file = {json.dumps(str(var / 'secret.key'))}\n"
        f'[web]\nlisten = "tcp:0:interface={HOST}"\n{extra}',
    )


def send(port: int, sender: str = "app@example.com", to: str = "fan@example.net") -> str:
    """One message over plain SMTP: its queue id."""
    message = (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: reload test\r\n"
        f"Message-ID: <{time.monotonic_ns()}@example.com>\r\n\r\nHello.\r\n"
    )
    with smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=30) as client:
        client.ehlo()
        client.mail(sender)
        code, text = client.rcpt(to)
        assert code == 250, text
        code, text = client.data(message.encode())
        assert code == 250, text
    reply = text.decode()
    assert QUEUED in reply, reply
    return reply.split(QUEUED, 1)[1].split()[0]


def test_sighup_serves_a_certificate_renewed_in_place_to_new_sessions(tmp_path: Path) -> None:
    first_cert, first_key = certificate_pair(tmp_path / "first", "relay.test")
    second_cert, second_key = certificate_pair(tmp_path / "second", "relay.test")
    own_cert, own_key = certificate_pair(tmp_path / "own", "relay.test")
    own_renewed_cert, own_renewed_key = certificate_pair(tmp_path / "own2", "relay.test")
    (tmp_path / "smtp.crt").write_bytes(first_cert)
    (tmp_path / "smtp.key").write_bytes(first_key)
    (tmp_path / "implicit.crt").write_bytes(own_cert)
    (tmp_path / "implicit.key").write_bytes(own_key)
    smtp_port, inbound_port, implicit_port = free_ports(3)
    config = relay_config(tmp_path, smtp_port, inbound_port, implicit_port=implicit_port)
    relay = Twistd(config, tmp_path)
    try:
        relay.wait_for("smtp: listening on", timeout=60)
        relay.wait_for(f"inbound: listening on ssl:{implicit_port}", timeout=60)
        pid = relay.process.pid
        assert served_certificate(smtp_port) == der_of(first_cert)
        assert implicit_certificate(implicit_port) == der_of(own_cert)
        kept = starttls(smtp_port)
        try:
            # Renewed in place (same paths), as certbot does; then systemctl reload.
            (tmp_path / "smtp.key").write_bytes(second_key)
            (tmp_path / "smtp.crt").write_bytes(second_cert)
            (tmp_path / "implicit.key").write_bytes(own_renewed_key)
            (tmp_path / "implicit.crt").write_bytes(own_renewed_cert)
            reload(relay, "reloaded ", 1)
            line = relay.wait_for("reloaded ", timeout=60)
            assert f"TLS certificate {tmp_path / 'smtp.crt'}" in line
            assert f"TLS certificate {tmp_path / 'implicit.crt'}" in line
            assert served_certificate(smtp_port) == der_of(second_cert)
            assert served_certificate(inbound_port) == der_of(second_cert)
            assert implicit_certificate(implicit_port) == der_of(own_renewed_cert)
            # The session opened before the reload goes on with its own certificate.
            assert kept.noop()[0] == 250
            assert peer_certificate(kept) == der_of(first_cert)
        finally:
            kept.quit()

        # A certificate that cannot be loaded: the error is logged, the current one stays.
        (tmp_path / "smtp.crt").write_bytes(b"not a certificate\n")
        reload(relay, "the TLS certificate is kept", 1)
        assert served_certificate(smtp_port) == der_of(second_cert)
        assert relay.process.pid == pid
        assert "Traceback" not in relay.output
    finally:
        relay.kill()


def test_an_invalid_config_at_sighup_changes_nothing(tmp_path: Path) -> None:
    cert, key = certificate_pair(tmp_path / "first", "relay.test")
    (tmp_path / "smtp.crt").write_bytes(cert)
    (tmp_path / "smtp.key").write_bytes(key)
    smtp_port, inbound_port = free_ports(2)
    config = relay_config(tmp_path, smtp_port, inbound_port)
    good = config.read_text()
    relay = Twistd(config, tmp_path)
    try:
        relay.wait_for("smtp: listening on", timeout=60)
        pid = relay.process.pid
        send(smtp_port)  # the reactor runs: its signal handlers are in place
        for broken in ("[smtp\n", good.replace("[smtp]\n", "[smtp]\nmax_connections = -3\n")):
            config.write_text(broken)
            before = relay.output.count("reload failed: ")
            reload(relay, "reload failed: ", before + 1)
        failures = [line for line in relay.output.splitlines() if "reload failed: " in line]
        assert len(failures) == 2 and all(str(config) in line for line in failures), failures
        config.unlink()
        reload(relay, "reload failed: ", 3)
        assert "reloaded " not in relay.output
        # Still serving, with the same process.
        send(smtp_port)
        assert served_certificate(smtp_port) == der_of(cert)

        # A valid config with changes that need a restart: named in one warning line.
        config.write_text(
            good.replace("[smtp]\n", "[smtp]\nmax_connections = 7\n").replace(
                '[web]\nlisten = "tcp:0', '[web]\nidle_timeout = "9s"\nlisten = "tcp:0'
            )
        )
        reload(relay, "reloaded ", 1)
        warning = relay.wait_for("takes effect after a restart", timeout=60)
        assert "[smtp] max_connections" in warning and "[web] idle_timeout" in warning
        assert relay.process.pid == pid
        send(smtp_port)
        assert "Traceback" not in relay.output
    finally:
        relay.kill()


@pytest.mark.parametrize("processes", [0, 1], ids=["in-process", "delivery-process"])
def test_a_dkim_key_replaced_in_place_signs_after_sighup(
    tmp_path: Path, postfix_sink: PostfixSink, perl_verify: PerlVerify, processes: int
) -> None:
    key_path = tmp_path / "example.com.s1.pem"
    first_path, first_record = generate_key("example.com", "s1", "rsa", str(tmp_path / "a"))
    second_path, second_record = generate_key("example.com", "s1", "rsa", str(tmp_path / "b"))
    shutil.copyfile(first_path, key_path)
    cert, key = certificate_pair(tmp_path / "tls", "relay.test")
    (tmp_path / "smtp.crt").write_bytes(cert)
    (tmp_path / "smtp.key").write_bytes(key)
    smtp_port, inbound_port = free_ports(2)
    config = relay_config(
        tmp_path,
        smtp_port,
        inbound_port,
        f'[delivery]\nprocesses = {processes}\nretry_schedule = ["1s"]\n'
        f'[delivery.routes]\n"*" = "smtp://{HOST}:{postfix_sink.port}"\n'
        "[[dkim.keys]]\n"
        f'domain = "example.com"\nselector = "s1"\nprivate_key = {json.dumps(str(key_path))}\n',
    )
    name = txt_record_name("example.com", "s1")
    relay = Twistd(config, tmp_path)
    try:
        relay.wait_for("smtp: listening on", timeout=60)
        if processes:
            relay.wait_for("delivery[0] delivery: node", timeout=60)
        pid = relay.process.pid
        send(smtp_port)  # the reactor runs: its signal handlers are in place

        def delivered(queue_id: str) -> bytes:
            def find() -> bytes | None:
                for dumped in postfix_sink.messages():
                    if dumped.header("X-SmartRelay-ID") == queue_id and "Hello." in dumped.text:
                        return dumped.text.replace("\n", "\r\n").encode()
                return None

            return wait_until(find, f"message {queue_id} at the sink", timeout=60)

        before = delivered(send(smtp_port))
        assert perl_verify(before, {name: first_record})[0] == "pass"

        shutil.copyfile(second_path, key_path)  # the key rotated in place
        reload(relay, "reloaded ", 1)
        assert "1 DKIM key(s)" in relay.wait_for("reloaded ", timeout=60)
        if processes:
            # The delivery process, which signs, was told too.
            assert "1 DKIM key(s)" in relay.wait_for("delivery[0] reloaded ", timeout=60)
        after = delivered(send(smtp_port))
        assert perl_verify(after, {name: second_record})[0] == "pass"
        assert perl_verify(after, {name: first_record})[0] != "pass"

        # A key file that cannot be read: the error is logged, the current key signs on.
        key_path.write_text("garbage\n")
        reload(relay, "the DKIM keys are kept", 1 + processes)
        again = delivered(send(smtp_port))
        assert perl_verify(again, {name: second_record})[0] == "pass"
        assert relay.process.pid == pid
        assert "Traceback" not in relay.output
    finally:
        relay.kill()


def test_a_terminal_hangup_of_the_process_group_stops_nothing(
    tmp_path: Path, postfix_sink: PostfixSink
) -> None:
    """``make run`` in a terminal that closes: SIGHUP reaches the relay and its delivery
    processes at once; none of them dies (a child that died would be started again)."""
    cert, key = certificate_pair(tmp_path / "tls", "relay.test")
    (tmp_path / "smtp.crt").write_bytes(cert)
    (tmp_path / "smtp.key").write_bytes(key)
    smtp_port, inbound_port = free_ports(2)
    config = relay_config(
        tmp_path,
        smtp_port,
        inbound_port,
        f'[delivery]\nprocesses = 2\n[delivery.routes]\n"*" = "smtp://{HOST}:{postfix_sink.port}"\n',
    )
    relay = Twistd(config, tmp_path, new_session=True)
    try:
        relay.wait_for("delivery[0] delivery: node", timeout=60)
        relay.wait_for("delivery[1] delivery: node", timeout=60)
        send(smtp_port)  # the reactor runs: its signal handlers are in place
        os.killpg(relay.process.pid, signal.SIGHUP)
        # Each child gets the terminal's signal and its parent's (two signals so close
        # together may arrive as one: at least one reload each).
        wait_for_count(relay, "reloaded ", 3)
        relay.wait_for("delivery[0] reloaded ", timeout=60)
        relay.wait_for("delivery[1] reloaded ", timeout=60)
        queue_id = send(smtp_port)
        wait_until(
            lambda: (
                True
                if queue_id in {m.header("X-SmartRelay-ID") for m in postfix_sink.messages()}
                else None
            ),
            "the message at the sink",
            timeout=60,
        )
        assert relay.process.poll() is None
        assert "starting it again" not in relay.output
        assert "Traceback" not in relay.output
        assert relay.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM)
    finally:
        relay.kill()


# -- units --------------------------------------------------------------------------------------


def test_config_changes_names_keys_never_values() -> None:
    old = Config(database=DatabaseConfig(url="postgresql://u:old-secret@db/relay"))
    new = Config(
        path="elsewhere.toml",
        database=DatabaseConfig(url="postgresql://u:new-secret@db/relay"),
        smtp=SmtpConfig(max_connections=3, tls_key="/k.pem", tls_certificate="/c.pem"),
        web=WebConfig(idle_timeout=5.0),
        dkim_keys=(DkimKey("example.com", "s1", "/s1.pem", "rsa-sha256"),),
    )
    changed = config_changes(old, new)
    assert changed == [
        "[database] url",
        "[smtp] tls_certificate",
        "[smtp] tls_key",
        "[smtp] max_connections",
        "[web] idle_timeout",
        "[[dkim.keys]]",
    ]
    assert "secret" not in " ".join(changed)
    assert config_changes(old, old) == []


def test_reloadable_tls_keeps_its_certificate_when_the_new_one_fails(tmp_path: Path) -> None:
    material = ensure_certificate("", "", str(tmp_path / "a"), "relay.test")
    tls = ReloadableTls(material)
    broken = tmp_path / "broken.crt"
    broken.write_text("nothing\n")
    with pytest.raises(TlsError, match=r"broken\.crt"):
        tls.reload(TlsMaterial(str(broken), material.key_path, generated=False))
    assert tls.material == material
    other = ensure_certificate("", "", str(tmp_path / "b"), "relay.test")
    tls.reload(other)
    assert tls.material == other


def test_dkim_signer_reload_all_or_nothing(tmp_path: Path) -> None:
    one, _ = generate_key("example.com", "one", "ed25519", str(tmp_path))
    two, _ = generate_key("example.org", "two", "ed25519", str(tmp_path))
    signer = DkimSigner([DkimKey("example.com", "one", one, "ed25519-sha256")])
    assert [k.selector for k in signer.keys_for("example.com")] == ["one"]
    missing = DkimKey("example.net", "gone", str(tmp_path / "gone.pem"), "ed25519-sha256")
    with pytest.raises(DkimError, match=r"gone\.pem"):
        signer.reload([DkimKey("example.org", "two", two, "ed25519-sha256"), missing])
    assert [k.selector for k in signer.keys_for("example.com")] == ["one"]
    assert signer.keys_for("example.org") == ()
    signer.reload([DkimKey("example.org", "two", two, "ed25519-sha256")])
    assert signer.keys_for("example.com") == ()
    assert [k.selector for k in signer.keys_for("example.org")] == ["two"]


@pytest_twisted.ensureDeferred
async def test_reload_updates_the_deliverability_page_keys(tmp_path: Path) -> None:
    """A new selector after a reload is what the deliverability page tells the admin to
    publish (and signs); the relay runs in-process, reloaded as SIGHUP would."""
    first, _ = generate_key("example.com", "s1", "ed25519", str(tmp_path / "keys"))
    second, _ = generate_key("example.com", "s2", "ed25519", str(tmp_path / "keys"))
    path = tmp_path / "smartrelay.toml"

    def dkim(selector: str, key: str) -> str:
        return (
            "[[dkim.keys]]\n"
            f'domain = "example.com"\nselector = "{selector}"\nprivate_key = {json.dumps(key)}\n'
            'algorithm = "ed25519-sha256"\n'
        )

    def make_config(smtp_port: int, inbound_port: int) -> Config:
        relay_config(tmp_path, smtp_port, inbound_port, dkim("s1", first))
        return load_config(path)

    cert, key = certificate_pair(tmp_path / "tls", "relay.test")
    (tmp_path / "smtp.crt").write_bytes(cert)
    (tmp_path / "smtp.key").write_bytes(key)
    relay = await start_in_process(real_reactor(), make_config)
    try:
        reports = relay.service.reports
        assert reports is not None
        page = reports.sections["deliverability"]
        assert isinstance(page, Deliverability)
        assert [k.selector for k in page.settings.keys] == ["s1"]
        text = path.read_text()
        path.write_text(text.replace(dkim("s1", first), dkim("s2", second)))
        relay.service.reload()
        assert [k.selector for k in page.settings.keys] == ["s2"]
        assert relay.service.config.dkim_keys == load_config(path).dkim_keys
    finally:
        await relay.stop()
