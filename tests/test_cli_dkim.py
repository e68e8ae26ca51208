"""`smartrelay-ctl dkim keygen` writes a key that signs and prints its DNS record;
`smartrelay-ctl secret rotate` adds a token key without invalidating the old ones."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from smartrelay.config import DkimKey
from smartrelay.rewrap.dkim import DkimSigner
from smartrelay.tokens import TokenCodec, load_keyring

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


def test_secret_rotate_adds_a_current_key_and_old_tokens_stay_valid(tmp_path: Path) -> None:
    secret = tmp_path / "secret.key"
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[rewrap]\nsecret_file = "{secret}"\n')
    old = TokenCodec(load_keyring(str(secret)))
    old_token = old.click_token(42, "https://example.com/a?b=1&c=2")
    command = [str(CTL), "--config", str(config), "secret", "rotate"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    new = TokenCodec(load_keyring(str(secret)))
    assert new.keyring.current != old.keyring.current
    assert f"key {new.keyring.current} is now current" in done.stdout
    assert f"key(s) {old.keyring.current} stay valid" in done.stdout
    assert new.parse_click(old_token) == (42, "https://example.com/a?b=1&c=2")
    assert new.click_token(42, "https://example.com/") != old.click_token(
        42, "https://example.com/"
    )
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600

    secret.write_text("garbage\n")
    broken = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1
    assert broken.stderr.startswith("smartrelay-ctl: error: ") and str(secret) in broken.stderr
    assert len(broken.stderr.splitlines()) == 1
