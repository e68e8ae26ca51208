"""The Debian package's sources agree with the code: version, pins, shipped config, unit.

The package itself is built, installed and run by tests/deb/ (``make deb`` + ``make
deb-check``, in .ci/run); these checks catch a drift in a second, in the ordinary suite.
"""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

from packaging.requirements import Requirement

from smartrelay import __version__
from smartrelay.config import INSTALLED_CONFIG, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_the_changelog_version_is_the_code_version() -> None:
    first = (ROOT / "debian/changelog").read_text().splitlines()[0]
    match = re.fullmatch(r"smartrelay \(([^)]+)\) \S+; urgency=\w+", first)
    assert match is not None, first
    assert match.group(1) == __version__


def test_every_dependency_is_pinned() -> None:
    """dh-virtualenv installs requirements.txt, then SmartRelay: a dependency missing from the
    pins would be installed at whatever version PyPI has that day."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    wanted = [
        Requirement(line)
        for line in setup["options"]["install_requires"].splitlines()
        if line.strip()
    ]
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normal(name)] = version
    for requirement in wanted:
        name = _normal(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in requirements.txt"
        assert requirement.specifier.contains(pins[name]), (requirement, pins[name])


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_shipped_config_is_valid_and_production_minded() -> None:
    config = load_config(ROOT / "etc/production.toml")
    assert config.server.data_dir == "/var/lib/smartrelay"
    assert config.database.url == "sqlite:/var/lib/smartrelay/smartrelay.db"
    assert config.rewrap.secret_file.startswith("/var/lib/smartrelay/")
    assert config.smtp.listen == ("tcp:587",) and config.inbound.listen == ("tcp:25",)
    assert config.smtp.require_tls and config.smtp.require_auth
    assert config.web.listen == "tcp:8080:interface=127.0.0.1"
    assert [(r.domain, r.target) for r in config.delivery.routes] == [("*", "mx")]
    # Delivery processes on every core but the listener's, and a spare for that one.
    assert config.delivery.processes >= 1 and config.delivery.spare_processes == 1


def test_the_unit_runs_the_installed_config_from_the_packaged_venv() -> None:
    unit = (ROOT / "debian/smartrelay.service").read_text()
    [exec_start] = re.findall(r"^ExecStart=(.*)$", unit, re.MULTILINE)
    command = shlex.split(exec_start)
    rules = (ROOT / "debian/rules").read_text()
    [root] = re.findall(r"^export DH_VIRTUALENV_INSTALL_ROOT = (\S+)$", rules, re.MULTILINE)
    assert command[0] == f"{root}/smartrelay/bin/twistd"
    assert command[1:] == [
        "--nodaemon",
        "--pidfile=",
        "--uid",
        "smartrelay",
        "--gid",
        "smartrelay",
        "smartrelay",
        "--config",
        INSTALLED_CONFIG,
    ]
    assert f"install -D -m 0640 etc/production.toml debian/smartrelay{INSTALLED_CONFIG}" in rules
