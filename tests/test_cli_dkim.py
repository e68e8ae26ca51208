"""`smartrelay-ctl dkim keygen` writes a key that signs and prints its DNS record."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from smartrelay.config import DkimKey
from smartrelay.rewrap.dkim import DkimSigner

CTL = Path(sys.executable).parent / "smartrelay-ctl"


def test_keygen_writes_a_key_prints_the_record_and_refuses_to_overwrite(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n')
    command = [str(CTL), "--config", str(config), "dkim", "keygen", "Example.COM", "s1"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    key = tmp_path / "dkim" / "example.com.s1.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "name:  s1._domainkey.example.com" in first.stdout
    assert "value: v=DKIM1; k=rsa; p=" in first.stdout
    assert 'algorithm = "rsa-sha256"' in first.stdout
    signer = DkimSigner([DkimKey("example.com", "s1", str(key), "rsa-sha256")])
    signed = signer.sign(b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n")
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")

    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    assert again.stderr.startswith("smartrelay-ctl: error: ") and "already exists" in again.stderr
    assert len(again.stderr.splitlines()) == 1

    ed = subprocess.run(
        [*command[:-2], "example.org", "e1", "--algorithm", "ed25519"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ed.returncode == 0, ed.stderr
    assert "k=ed25519" in ed.stdout
