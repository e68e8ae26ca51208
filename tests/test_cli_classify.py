"""``smartrelay-ctl classify FILE...`` end to end: the real console script in a subprocess.

SPEC section 6: one JSON object per file, ``{"file", "kind", "queue_id", "recipients": [...]}``;
works without a database (and without a config file at all); uses ``[[feedback.rules]]``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from smartrelay.config import INSTALLED_CONFIG
from tests.support.run import CTL, Result, write_config

FIXTURES = Path(__file__).parent / "fixtures" / "feedback"
RECIPIENT_KEYS = ["address", "status", "reply_code", "category", "hard", "diagnostic"]


def run(cwd: Path, *args: str, stdin: bytes = b"") -> Result:
    command = [str(CTL), *args]
    done = subprocess.run(command, cwd=cwd, input=stdin, capture_output=True, timeout=60)
    return Result(
        command, done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8")
    )


def objects(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.lines]


def copy(tmp_path: Path, *names: str) -> list[str]:
    for name in names:
        shutil.copy(FIXTURES / name, tmp_path / name)
    return list(names)


def test_without_any_config_file(tmp_path: Path) -> None:
    assert not Path(INSTALLED_CONFIG).exists()  # nor etc/smartrelay.toml in tmp_path
    names = copy(
        tmp_path,
        "postfix-user-unknown.eml",
        "yahoo-arf.eml",
        "exchange-oof-en.eml",
        "mailto-unsubscribe.eml",
        "dsn-global-utf8.eml",
    )
    result = run(tmp_path, "classify", *names)
    assert result.returncode == 0, result.describe()
    assert result.stderr == "", result.describe()
    out = objects(result)
    assert [o["file"] for o in out] == names  # one line per file, in order
    assert all(list(o) == ["file", "kind", "queue_id", "recipients"] for o in out)
    bounce, complaint, autoreply, other, utf8 = out
    assert bounce["kind"] == "bounce"
    assert bounce["queue_id"] == "0P4K9B3ZQ7M2XTRW"
    assert [list(r) for r in bounce["recipients"]] == [RECIPIENT_KEYS, RECIPIENT_KEYS]
    assert bounce["recipients"][0] == {
        "address": "nosuchuser@example.net",
        "status": "5.1.1",
        "reply_code": 550,
        "category": "invalid-recipient",
        "hard": True,
        "diagnostic": "550 5.1.1 <nosuchuser@example.net>: Recipient address rejected:"
        " User unknown in virtual mailbox table",
    }
    assert bounce["recipients"][1]["category"] == "mailbox-full"
    assert bounce["recipients"][1]["hard"] is False
    assert (complaint["kind"], complaint["queue_id"], complaint["recipients"]) == (
        "complaint",
        "0P4K9B3ZQ7M2XTS6",
        [],
    )
    assert (autoreply["kind"], autoreply["queue_id"]) == ("autoreply", None)
    assert other["kind"] == "other"
    assert utf8["recipients"][0]["address"] == "用户@例子.jp"
    assert set(tmp_path.iterdir()) == {tmp_path / n for n in names}  # no data dir, no database


def test_standard_input_and_an_unreadable_file(tmp_path: Path) -> None:
    raw = (FIXTURES / "gmail-no-such-user.eml").read_bytes()
    result = run(tmp_path, "classify", "-", "missing.eml", stdin=raw)
    assert result.returncode == 1, result.describe()
    (out,) = objects(result)  # the readable one is still classified
    assert (out["file"], out["kind"], out["queue_id"]) == ("-", "bounce", "0P4K9B3ZQ7M2XTS1")
    assert result.stderr.splitlines() == [
        "smartrelay-ctl: error: cannot read missing.eml: No such file or directory"
    ]


def test_uses_the_config_rules_and_opens_no_database(tmp_path: Path) -> None:
    # A database that cannot be opened, and an SQLite file whose directory does not exist:
    # classify must touch neither. [[feedback.mailboxes]] (refused by the relay for now)
    # does not stop it either: it reads the config for its rules only.
    data = tmp_path / "var"
    config = write_config(
        tmp_path,
        "postgresql://nobody:secret@127.0.0.1:1/nodb",
        f'[server]\ndata_dir = "{data}"\n'
        '[[feedback.rules]]\nmatch = "(?i)not a\\\\s+registered gateway user"\n'
        'status = "5"\ncategory = "invalid-recipient"\n'
        '[[feedback.mailboxes]]\nurl = "imap://u:p@127.0.0.1:1/INBOX"\n',
    )
    (name,) = copy(tmp_path, "rfc3464-10.2-multi-recipient.eml")
    plain = run(tmp_path, "classify", name)
    ruled = run(tmp_path, "--config", str(config), "classify", name)
    assert ruled.returncode == 0 and ruled.stderr == "", ruled.describe()
    before = objects(plain)[0]["recipients"][0]
    after = objects(ruled)[0]["recipients"][0]
    assert (before["category"], before["hard"]) == ("undetermined", False)
    assert (after["category"], after["hard"]) == ("invalid-recipient", True)
    assert not data.exists()


def test_a_config_that_does_not_load_is_a_warning(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f"sqlite:{tmp_path / 'x.db'}",
        '[[feedback.rules]]\nmatch = "(unclosed"\ncategory = "policy"\n',
    )
    (name,) = copy(tmp_path, "postfix-user-unknown.eml")
    result = run(tmp_path, "--config", str(config), "classify", name)
    assert result.returncode == 0, result.describe()
    assert objects(result)[0]["kind"] == "bounce"
    (warning,) = result.stderr.splitlines()
    assert warning.startswith(
        f"smartrelay-ctl: warning: {config}: feedback.rules[0].match: invalid regex"
    )
    assert warning.endswith("; classifying without [[feedback.rules]]")


def test_needs_a_file(tmp_path: Path) -> None:
    result = run(tmp_path, "classify")
    assert result.returncode == 2
    assert "FILE" in result.stderr
