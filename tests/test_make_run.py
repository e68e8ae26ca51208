"""``make run`` on other ports without editing the shipped config (README, "Try it")."""

from __future__ import annotations

import subprocess
from pathlib import Path

from smartrelay.config import load_config

REPO = Path(__file__).parent.parent


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60
    )


def test_run_config_puts_the_ports_into_a_copy_of_the_config(tmp_path: Path) -> None:
    target = tmp_path / "run.toml"
    done = make(
        "run-config",
        f"RUN_CONFIG={target}",
        "SMTP_PORT=3525",
        "INBOUND_PORT=3526",
        "WEB_PORT=8181",
        "SINK_PORT=3600",
    )
    assert done.returncode == 0, done.stderr
    config = load_config(target)
    shipped = load_config(REPO / "etc/smartrelay.toml")
    assert config.smtp.listen == ("tcp:3525:interface=127.0.0.1",)
    assert config.inbound.listen == ("tcp:3526:interface=127.0.0.1",)
    assert config.web.listen == "tcp:8181:interface=127.0.0.1"
    assert config.web.base_url == "http://127.0.0.1:8181"
    assert [route.target for route in config.delivery.routes] == ["smtp://127.0.0.1:3600"]
    # Nothing else differs from the shipped config.
    assert config.server == shipped.server and config.database == shipped.database
    assert config.delivery.processes == shipped.delivery.processes
    lines = zip(
        target.read_text().splitlines(),
        (REPO / "etc/smartrelay.toml").read_text().splitlines(),
        strict=True,
    )
    assert sum(a != b for a, b in lines) == 5


def test_run_config_refuses_a_config_without_the_shipped_ports(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[smtp]\nlisten = ["tcp:2626:interface=127.0.0.1"]\n')
    target = tmp_path / "run.toml"
    done = make("run-config", f"CONFIG={other}", f"RUN_CONFIG={target}", "SMTP_PORT=3525")
    assert done.returncode != 0
    assert f"error: {other} has no tcp:2525: to replace" in done.stderr
    assert not target.exists()


def test_make_run_uses_the_config_itself_on_the_default_ports() -> None:
    done = make("-n", "run")
    assert done.returncode == 0, done.stderr
    assert "--config etc/smartrelay.toml" in done.stdout
    ports = make("-n", "run", "WEB_PORT=8181")
    assert "--config var/run.toml" in ports.stdout
