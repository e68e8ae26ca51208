"""``smartrelay-ctl smtp-credential release NAME`` and the holds in ``smtp-credential list``
(volume alerts, docs/smtp.md), the real console script on both engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartrelay.storage.interfaces import IDatabaseEngine
from smartrelay.timefmt import parse_rfc3339
from tests.support.run import assert_cli_error, assert_ok, call, ctl, ctl_all, query, write_config

HELD_MS = 1_790_000_000_000


@pytest.fixture
def migrated(tmp_path: Path, database_url: str, engine: IDatabaseEngine) -> Path:
    return write_config(tmp_path, database_url)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_release_and_list(migrated: Path, database_url: str) -> None:
    for name in ("app-one", "app-two"):
        assert_ok(ctl(migrated, "smtp-credential", "add", name))
    query(
        database_url,
        "INSERT INTO credential_volume (credential, baseline, windows, updated_at, alerted_at,"
        " held_at, hold_reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ("app-one", 4.0, 12, HELD_MS, HELD_MS, HELD_MS, "volume alert: 80 messages in 10m"),
    )
    listed = assert_ok(ctl(migrated, "smtp-credential", "list"))
    one, two = (line.split("\t") for line in listed.lines)
    assert one[0] == "app-one" and len(one) == 3
    assert one[2].startswith("held since ") and one[2].endswith(
        ": volume alert: 80 messages in 10m"
    )
    assert parse_rfc3339(one[2].removeprefix("held since ").split(": ")[0]) == HELD_MS / 1000
    assert two[0] == "app-two" and len(two) == 2  # not held: no third column

    released, again, other, nobody = ctl_all(
        migrated,
        call("smtp-credential", "release", "app-one"),
        call("smtp-credential", "release", "app-one"),
        call("smtp-credential", "release", "app-two"),
        call("smtp-credential", "release", "app-nine"),
    )
    # The four ran at once: exactly one of the first two released it.
    first, second = sorted((released, again), key=lambda r: r.returncode)
    assert "'app-one' released" in assert_ok(first).stdout
    assert_cli_error(second, "'app-one'", "not held")
    assert_cli_error(other, "'app-two'", "not held")
    assert_cli_error(nobody, "no SMTP credential named 'app-nine'")
    assert query(
        database_url, "SELECT credential, held_at, hold_reason, alerted_at FROM credential_volume"
    ) == [("app-one", None, None, HELD_MS)]  # the last alert is kept
    assert all(
        len(line.split("\t")) == 2
        for line in assert_ok(ctl(migrated, "smtp-credential", "list")).lines
    )
