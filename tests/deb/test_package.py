"""The Debian package, installed for real: files, user, unit, the service's exact command line
relaying mail to smtp-sink as the ``smartrelay`` user, an upgrade, and a purge.

Run as root with ``SMARTRELAY_DEB=dist/smartrelay_VERSION_ARCH.deb`` (``make deb-check``). The
tests run in file order and build on each other (install, configure, run, reinstall, purge),
as an operator would; a failure part-way still purges the package at the end.
"""

from __future__ import annotations

import grp
import gzip
import os
import pwd
import re
import shlex
import signal
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartrelay import __version__
from tests.support.postfix import PostfixSink, find_postfix_tool, running_postfix_sink
from tests.support.relay import free_ports

DEB = Path(os.environ.get("SMARTRELAY_DEB", "")).resolve()
VENV = Path("/opt/venvs/smartrelay")
CONFIG = Path("/etc/smartrelay/smartrelay.toml")
DATA = Path("/var/lib/smartrelay")
UNIT = Path("/lib/systemd/system/smartrelay.service")
CTL = Path("/usr/bin/smartrelay-ctl")
DOC = Path("/usr/share/doc/smartrelay")
#: What systemd gives a service (no login environment).
SERVICE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def run(
    *command: str, check: bool = True, cwd: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=cwd, env=env, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{shlex.join(command)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
    return done


def installed() -> bool:
    done = run("dpkg-query", "-W", "-f=${Status}", "smartrelay", check=False)
    return done.stdout.strip() == "install ok installed"


@pytest.fixture(scope="module", autouse=True)
def package() -> Iterator[None]:
    assert os.geteuid() == 0, "tests/deb installs a package: run them as root"
    assert DEB.is_file(), f"no package at {DEB} (SMARTRELAY_DEB)"
    assert not installed(), "smartrelay is installed already: purge it first"
    started = time.monotonic()
    run("apt-get", "install", "-y", "-q", str(DEB), env=APT_ENV)
    print(f"apt-get install took {time.monotonic() - started:.1f} s")
    try:
        yield
    finally:
        if installed():
            run("apt-get", "purge", "-y", "-q", "smartrelay", env=APT_ENV, check=False)


def mode_owner(path: Path) -> tuple[int, str, str]:
    info = path.stat()
    return (
        stat.S_IMODE(info.st_mode),
        pwd.getpwuid(info.st_uid).pw_name,
        grp.getgrgid(info.st_gid).gr_name,
    )


def test_files_user_and_permissions() -> None:
    user = pwd.getpwnam("smartrelay")
    assert user.pw_uid < 1000 and user.pw_shell == "/usr/sbin/nologin"
    assert user.pw_dir == str(DATA)
    assert grp.getgrgid(user.pw_gid).gr_name == "smartrelay"
    # The config may hold passwords: the service's group reads it, nobody else.
    assert mode_owner(CONFIG) == (0o640, "root", "smartrelay")
    assert str(CONFIG) in run("dpkg-query", "-W", "-f=${Conffiles}", "smartrelay").stdout
    assert mode_owner(DATA) == (0o750, "smartrelay", "smartrelay")
    assert os.readlink(CTL) == str(VENV / "bin/smartrelay-ctl")
    assert run(str(CTL), "--version").stdout.strip() == f"SmartRelay {__version__}"
    # The venv runs Debian's Python 3.11, with the pinned versions of requirements.txt.
    assert os.path.realpath(VENV / "bin/python3").startswith("/usr/bin/python3")
    frozen = run(str(VENV / "bin/pip"), "freeze", "--exclude", "smartrelay").stdout.split()
    pins = Path("requirements.txt").read_text().split("\n")
    assert sorted(frozen) == sorted(p for p in pins if p and not p.startswith("#"))
    # Twisted's plugin cache, written by postinst (the service cannot write /opt).
    plugins = VENV / "lib/python3.11/site-packages/twisted/plugins"
    assert (plugins / "dropin.cache").stat().st_mtime >= (
        plugins / "smartrelay_plugin.py"
    ).stat().st_mtime
    assert (DOC / "docs/install.md").is_file() and (DOC / "copyright").is_file()
    manual = gzip.decompress(Path("/usr/share/man/man1/smartrelay-ctl.1.gz").read_bytes())
    assert b".SH NAME\nsmartrelay-ctl \\- administer a SmartRelay installation" in manual
    # Every file the package installed belongs to root and none is world-writable.
    for line in run("dpkg", "-L", "smartrelay").stdout.splitlines():
        path = Path(line)
        if path.is_symlink() or not path.exists():
            continue
        info = path.lstat()
        assert info.st_uid == 0, line
        assert not info.st_mode & stat.S_IWOTH, line


def test_unit_file_verifies_and_is_not_enabled() -> None:
    done = run("systemd-analyze", "verify", str(UNIT), check=False)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
    # Not enabled or started by the install: the config holds placeholders until edited.
    assert not Path("/etc/systemd/system/multi-user.target.wants/smartrelay.service").exists()
    unit = unit_settings()
    assert unit["Restart"] == "on-failure"
    assert unit["ProtectSystem"] == "strict" and unit["ReadWritePaths"] == str(DATA)
    assert unit["NoNewPrivileges"] == "yes" and unit["PrivateTmp"] == "yes"
    assert "User" not in unit  # twistd --uid: see the unit's comment and docs/install.md
    assert exec_start()[-2:] == ["--config", str(CONFIG)]


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings


def exec_start() -> list[str]:
    return shlex.split(unit_settings()["ExecStart"])


def test_ctl_as_root_acts_as_the_service_user() -> None:
    done = run(str(CTL), "smtp-credential", "add", "app", cwd="/")
    password = done.stdout.strip().splitlines()[-1]
    Path("/run/smartrelay-deb-test.password").write_text(password)
    # The SQLite file (and its journal) are the service's, not root's.
    for path in DATA.iterdir():
        assert mode_owner(path)[1:] == ("smartrelay", "smartrelay"), path
    assert "app\t" in run(str(CTL), "smtp-credential", "list", cwd="/").stdout


@pytest.fixture(scope="module")
def sink() -> Iterator[PostfixSink]:
    path = find_postfix_tool("smtp-sink")
    assert path is not None, "postfix's smtp-sink is needed"
    with running_postfix_sink(path) as started:
        yield started


def configure_for_loopback(sink_port: int, web_port: int) -> None:
    """The shipped config with loopback listeners (same ports 25 and 587), the web on a free
    port, and every domain routed to smtp-sink instead of MX."""
    text = CONFIG.read_text()
    for old, new in [
        ('listen = ["tcp:587"]', 'listen = ["tcp:587:interface=127.0.0.1"]'),
        ('listen = ["tcp:25"]', 'listen = ["tcp:25:interface=127.0.0.1"]'),
        (
            'listen = "tcp:8080:interface=127.0.0.1"',
            f'listen = "tcp:{web_port}:interface=127.0.0.1"',
        ),
        ('base_url = "https://relay.example.com"', f'base_url = "http://127.0.0.1:{web_port}"'),
    ]:
        assert old in text, f"the shipped config has no {old}"
        text = text.replace(old, new)
    text += f'\n[delivery.routes]\n"*" = "smtp://127.0.0.1:{sink_port}"\n'
    CONFIG.write_text(text)


def start_service(journal: Path) -> subprocess.Popen[str]:
    """The unit's ExecStart as systemd would run it: as root, in /, with its umask, its
    capability bounding set and no-new-privileges (setpriv), and systemd's bare environment;
    its standard output and error go to ``journal``."""
    unit = unit_settings()
    caps = ",".join(
        "+" + c.removeprefix("CAP_").lower() for c in unit["CapabilityBoundingSet"].split()
    )
    wrapper = ["setpriv", f"--bounding-set=-all,{caps}", "--no-new-privs"]
    umask = int(unit["UMask"], 8)
    with journal.open("w") as out:  # the child keeps its own copy
        return subprocess.Popen(
            [*wrapper, *exec_start()],
            cwd="/",
            env=SERVICE_ENV,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda: os.umask(umask),
        )


def banner(port: int, process: subprocess.Popen[str], timeout: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "the service exited (its output is printed below)"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                return client.recv(1024)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def process_tree(pid: int) -> list[int]:
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if status_fields(int(entry.name)).get("PPid") == str(pid):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return run(
        "swaks",
        "--server",
        "127.0.0.1:587",
        "--from",
        "app@example.com",
        "--to",
        "user@example.net",
        *args,
        check=False,
    )


def test_the_service_command_line_relays_mail_as_smartrelay(
    sink: PostfixSink, tmp_path: Path
) -> None:
    [web_port] = free_ports(1)
    configure_for_loopback(sink.port, web_port)
    password = Path("/run/smartrelay-deb-test.password").read_text()
    for port in (25, 587):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as error:
                raise AssertionError(f"port {port} is taken on this machine: {error}") from None
    journal = tmp_path / "journal.log"
    process = start_service(journal)
    try:
        assert banner(587, process).startswith(b"220 relay.example.com ESMTP")
        assert banner(25, process).startswith(b"220 ")
        user = pwd.getpwnam("smartrelay")
        # The main process and its delivery process: the smartrelay user, no capability.
        # ([delivery] processes = 1 in the shipped config: started once the database is open.)
        deadline = time.monotonic() + 60
        while len(tree := process_tree(process.pid)) < 2:
            assert time.monotonic() < deadline, f"no delivery process: {tree}"
            time.sleep(0.2)
        for pid in tree:
            fields = status_fields(pid)
            assert fields["Uid"].split() == [str(user.pw_uid)] * 4, (pid, fields["Uid"])
            assert fields["Gid"].split() == [str(user.pw_gid)] * 4, (pid, fields["Gid"])
            assert fields["Groups"].split() in ([], [str(user.pw_gid)]), fields["Groups"]
            for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                assert int(fields[caps], 16) == 0, (pid, caps, fields[caps])
            assert fields["NoNewPrivs"] == "1"
        # The shipped policy: TLS, then AUTH, before MAIL.
        refused = swaks("--tls")
        assert refused.returncode != 0 and "5.7.0" in refused.stdout, refused.stdout
        sent = swaks(
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "app",
            "--auth-password",
            password,
            "--header",
            "Subject: packaged relay",
            "--body",
            "Hello from the .deb",
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        sink.wait_for_messages(1, timeout=60)
        [message] = sink.messages()
        assert message.header("Subject") == "packaged relay"
        assert message.recipients == ("user@example.net",)
        # The web (templates and static files are in the package) and metrics.
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/ui/login", timeout=30) as page:
            assert page.status == 200 and b"<form" in page.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=30) as page:
            assert b"smartrelay_" in page.read()
        # Everything the service created is its own, and none but the (public) generated
        # certificate is open to other users (UMask=0027).
        for path in DATA.rglob("*"):
            mode, owner, group = mode_owner(path)
            assert (owner, group) == ("smartrelay", "smartrelay"), path
            if path.name != "selfsigned.crt":
                assert not mode & 0o007, (path, oct(mode))
        # systemctl reload: the unit's ExecReload, with $MAINPID (re-reads the TLS certificate
        # and DKIM keys, as the smartrelay user; docs/configuration.md "Reloading").
        reload = unit_settings()["ExecReload"].replace("$MAINPID", str(process.pid))
        run(*shlex.split(reload))
        deadline = time.monotonic() + 30
        while f"reloaded {CONFIG}: TLS certificate" not in journal.read_text():
            assert process.poll() is None, "the service died on a reload"
            assert time.monotonic() < deadline, "no reload within 30 s"
            time.sleep(0.2)
        assert banner(587, process).startswith(b"220 ")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError("the service did not stop within 90 s of SIGTERM") from None
        finally:
            print(journal.read_text())
    output = journal.read_text()
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert re.search(r"set uid/gid \d+/\d+", output), output


def test_reinstall_keeps_config_and_data() -> None:
    edited = CONFIG.read_text()
    run("apt-get", "install", "-y", "-q", "--reinstall", str(DEB), env=APT_ENV)
    assert CONFIG.read_text() == edited
    assert mode_owner(CONFIG) == (0o640, "root", "smartrelay")
    assert "app\t" in run(str(CTL), "smtp-credential", "list", cwd="/").stdout


def test_purge_leaves_nothing_behind() -> None:
    run("apt-get", "purge", "-y", "-q", "smartrelay", env=APT_ENV)
    assert not installed()
    for path in (VENV, CONFIG.parent, DATA, CTL, UNIT, DOC, Path("/opt/venvs")):
        assert not os.path.lexists(path), f"{path} is left after purge"
    assert not list(Path("/var/lib/dpkg/info").glob("smartrelay.*"))
    assert not list(Path("/var/lib/systemd/deb-systemd-helper-enabled").rglob("smartrelay*"))
    # Debian keeps system users on purge (files elsewhere may still be theirs): it owns
    # nothing left in the places the package touched.
    owner = pwd.getpwnam("smartrelay").pw_uid
    for root in ("/etc", "/opt", "/var/lib", "/usr", "/run"):
        leftovers = run("find", root, "-xdev", "-uid", str(owner), check=False).stdout.split()
        assert leftovers == [], leftovers
    Path("/run/smartrelay-deb-test.password").unlink(missing_ok=True)
