"""A throwaway Dovecot (IMAP4 + POP3, plain with STARTTLS/STLS and implicit TLS) for tests.

Started in a temp dir with its own config on free loopback ports, never as a system service;
messages are put in the user's Maildir the way an MDA does (``tmp/`` then a rename into
``new/``). As root, Dovecot's processes run as ``nobody``/``nogroup`` (its login processes
refuse root); otherwise as the current user.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Dovecot", "DovecotUnavailable", "find_dovecot", "running_dovecot"]

USER = "alice"
PASSWORD = "s3cret@p/ss%w#rd"  # needs quoting in a URL; no colon (passwd-file)


class DovecotUnavailable(Exception):
    pass


def find_dovecot() -> str | None:
    for candidate in (shutil.which("dovecot"), "/usr/sbin/dovecot"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Dovecot:
    """One private Dovecot: ``imap``, ``imaps``, ``pop3``, ``pop3s`` ports on 127.0.0.1,
    user ``USER`` with ``PASSWORD``; ``ca_file`` is its self-signed certificate."""

    def __init__(self, binary: str, directory: Path, tls: bool = True, apop: bool = False) -> None:
        self.binary = binary
        self.directory = directory
        #: False: no TLS at all (no STARTTLS/STLS offered, no imaps/pop3s listeners).
        self.tls = tls
        #: True: POP3 greets with an APOP challenge (RFC 1939) and accepts APOP.
        self.apop = apop
        self.imap, self.imaps, self.pop3, self.pop3s = _free_ports(4)
        if not tls:
            self.imaps = self.pop3s = 0
        self.ca_file = str(directory / "cert.pem")
        self.maildir = directory / "mail" / USER / "Maildir"
        self._process: subprocess.Popen[bytes] | None = None
        self._counter = 0
        if os.geteuid() == 0:
            self._uid = pwd.getpwnam("nobody").pw_uid
            self._gid = grp.getgrnam("nogroup").gr_gid
            self._user, self._group = "nobody", "nogroup"
        else:
            self._uid, self._gid = os.geteuid(), os.getegid()
            self._user = pwd.getpwuid(self._uid).pw_name
            self._group = grp.getgrgid(self._gid).gr_name

    def url(self, scheme: str, password: str = PASSWORD, folder: str = "") -> str:
        from urllib.parse import quote

        port = {"imap": self.imap, "imaps": self.imaps, "pop3": self.pop3, "pop3s": self.pop3s}
        tail = f"/{folder}" if folder else ""
        return f"{scheme}://{USER}:{quote(password, safe='')}@127.0.0.1:{port[scheme]}{tail}"

    def configure(self) -> None:
        d = self.directory
        os.chmod(d, 0o755)
        (d / "run").mkdir()
        for sub in ("new", "cur", "tmp"):
            (self.maildir / sub).mkdir(parents=True)
        done = subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-keyout", str(d / "key.pem"), "-out", self.ca_file, "-subj", "/CN=127.0.0.1",
                "-addext", "subjectAltName=IP:127.0.0.1",
            ],
            capture_output=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise DovecotUnavailable(f"openssl req failed: {done.stderr.decode(errors='replace')}")
        (d / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        ssl = (
            f"ssl = yes\nssl_cert = <{d}/cert.pem\nssl_key = <{d}/key.pem"
            if self.tls
            else "ssl = no"
        )
        (d / "dovecot.conf").write_text(
            f"""base_dir = {d}/run
state_dir = {d}/run
instance_name = dovecot-test-{self.imap}
log_path = {d}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login{" apop" if self.apop else ""}
auth_failure_delay = 0
default_internal_user = {self._user}
default_login_user = {self._user}
default_internal_group = {self._group}
mail_location = maildir:{d}/mail/%u/Maildir
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d}/passwd
  default_fields = uid={self._uid} gid={self._gid} home={d}/mail/%u
}}
service anvil {{
  chroot =
  # No auth penalty (anvil's delay of 2, 4, 8 then 15 s after each failed login from an
  # address, on top of auth_failure_delay): the auth process cannot open this socket.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    port = {self.imap}
  }}
  inet_listener imaps {{
    port = {self.imaps}
  }}
}}
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    port = {self.pop3}
  }}
  inet_listener pop3s {{
    port = {self.pop3s}
  }}
}}
"""
        )
        self._chown(d / "mail")

    def _chown(self, path: Path) -> None:
        if os.geteuid() != 0:
            return
        for root, dirs, files in os.walk(path):
            os.chown(root, self._uid, self._gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), self._uid, self._gid)

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("dovecot is running")
        self._process = subprocess.Popen(
            [self.binary, "-F", "-c", str(self.directory / "dovecot.conf")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "stderr.log", "ab"),  # noqa: SIM115
            # Its own process group, so that stop() reaches every Dovecot process.
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise DovecotUnavailable(f"dovecot exited: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.pop3), timeout=1):
                    pass
                with socket.create_connection(("127.0.0.1", self.imap), timeout=1) as s:
                    s.settimeout(5)
                    if s.recv(100).startswith(b"* OK"):
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise DovecotUnavailable(f"dovecot did not answer in 30 s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop Dovecot the way ``systemctl stop`` does: SIGTERM to every one of its
        processes, not only the master. A post-login ``imap`` process left alone outlives
        its master by up to 30 s while its client keeps talking (an IMAP IDLE renewed every
        few seconds): Dovecot lets busy clients finish."""
        process, self._process = self._process, None
        if process is None:
            return
        group = process.pid  # start_new_session: the master leads its own group
        _signal_group(group, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _signal_group(group, 0) and time.monotonic() < deadline:
            time.sleep(0.05)  # the children, no longer ours to wait for, are ending
        _signal_group(group, signal.SIGKILL)

    def log_tail(self) -> str:
        parts = []
        for name in ("dovecot.log", "stderr.log"):
            path = self.directory / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-2000:])
        return " | ".join(parts)

    def deliver(self, message: bytes) -> str:
        """Put ``message`` in the INBOX (as an MDA does); returns its Maildir file name."""
        self._counter += 1
        name = f"{int(time.time())}.M{self._counter}P{os.getpid()}.test"
        tmp = self.maildir / "tmp" / name
        tmp.write_bytes(message)
        self._chown(tmp)
        os.rename(tmp, self.maildir / "new" / name)
        return name

    def messages(self) -> list[Path]:
        """The files in the INBOX (new and cur)."""
        return sorted(
            [*(self.maildir / "new").iterdir(), *(self.maildir / "cur").iterdir()],
            key=lambda p: p.name,
        )


def _signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to process group ``group``; whether any process was in it."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def running_dovecot(tls: bool = True, apop: bool = False) -> Iterator[Dovecot]:
    binary = find_dovecot()
    if binary is None:
        raise DovecotUnavailable(
            "dovecot not installed (apt-get install dovecot-imapd dovecot-pop3d)"
        )
    for attempt in range(3):
        directory = Path(tempfile.mkdtemp(prefix="smartrelay-dovecot-"))
        server = Dovecot(binary, directory, tls, apop)
        try:
            server.configure()
            try:
                server.start()
            except DovecotUnavailable:
                # A free port taken in the meantime (another test worker, another suite on
                # the machine): new ports.
                if attempt < 2 and "Address already in use" in server.log_tail():
                    continue
                raise
            yield server
            return
        finally:
            server.stop()
            shutil.rmtree(directory, ignore_errors=True)
