"""``smartrelay-ctl`` as a black box: the real console script in a subprocess, on both engines.

Each call costs about half a second (a fresh Python with Twisted), so each test groups the
checks of one command family; what the commands stored is read from the database directly.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from smartrelay.cli import STDOUT_CLOSED
from smartrelay.passwords import verify_password
from smartrelay.storage.interfaces import IDatabaseEngine
from smartrelay.storage.migrations import latest_version
from smartrelay.storage.store import NewMessage, NewSuppression, Store
from smartrelay.timefmt import parse_rfc3339, rfc3339
from tests.support.run import (
    CTL,
    assert_cli_error,
    assert_ok,
    call,
    ctl,
    ctl_all,
    query,
    schema_versions,
    write_config,
)

DAY_MS = 86400 * 1000
EXPORT_HEADER = ["address", "reason", "created_at", "expires_at", "note"]


@pytest.fixture
def config(tmp_path: Path, database_url: str) -> Path:
    """A config file for a fresh, empty database."""
    return write_config(tmp_path, database_url)


@pytest.fixture
def migrated(config: Path, engine: IDatabaseEngine) -> Path:
    """The same, with the schema in place (done in-process: a CLI call costs 0.5 s)."""
    return config


def tables(url: str) -> set[str]:
    if url.startswith("sqlite:"):
        sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    else:
        sql = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    return {str(name) for (name,) in query(url, sql)}


def login_hashes(url: str, table: str) -> dict[str, str]:
    return {
        str(name): str(password_hash)
        for name, password_hash in query(url, f"SELECT name, password_hash FROM {table}")
    }


def suppressions(url: str) -> dict[str, tuple[str, int | None, str]]:
    """address: (reason, expires_at ms, note)."""
    rows = query(url, "SELECT address, reason, expires_at, note FROM suppressions")
    return {str(a): (str(r), None if e is None else int(e), str(n)) for a, r, e, n in rows}


def seed_suppression(
    url: str, address: str, reason: str, created_ms: int, expires_ms: int | None, note: str = ""
) -> None:
    query(
        url,
        "INSERT INTO suppressions (address, reason, created_at, expires_at, note)"
        " VALUES (?, ?, ?, ?, ?)",
        (address, reason, created_ms, expires_ms, note),
    )


# -- migrate ----------------------------------------------------------------------------------
def test_migrate_creates_the_schema_and_is_idempotent(config: Path, database_url: str) -> None:
    assert tables(database_url) == set()
    expected = f"schema is at version {latest_version()}\n"
    first = assert_ok(ctl(config, "migrate"))
    assert first.stdout == expected
    assert schema_versions(database_url) == list(range(1, latest_version() + 1))
    second = assert_ok(ctl(config, "migrate"))
    assert second.stdout == expected
    assert schema_versions(database_url) == list(range(1, latest_version() + 1))
    assert tables(database_url) >= {"schema_version", "messages", "suppressions", "web_users"}
    assert query(database_url, "SELECT COUNT(*) FROM smtp_credentials") == [(0,)]


# -- smtp-credential --------------------------------------------------------------------------
def test_smtp_credentials_add_list_remove(config: Path, database_url: str) -> None:
    # The first command on an empty database: the CLI brings the schema up itself.
    added = assert_ok(ctl(config, "smtp-credential", "add", "app-one"))
    assert len(added.lines) == 2 and "app-one" in added.lines[0]
    password = added.lines[1]
    assert len(password) >= 16 and " " not in password
    assert added.stdout.count(password) == 1  # shown once

    stored = login_hashes(database_url, "smtp_credentials")
    assert list(stored) == ["app-one"]
    assert stored["app-one"] != password and password not in stored["app-one"]
    assert verify_password(password, stored["app-one"])
    assert not verify_password(password + "x", stored["app-one"])

    other, duplicate, missing = ctl_all(
        config,
        call("smtp-credential", "add", "app-two"),
        call("smtp-credential", "add", "app-one"),
        call("smtp-credential", "remove", "app-nine"),
    )
    assert assert_ok(other).lines[1] != password  # generated, not a constant
    assert_cli_error(duplicate, "'app-one'", "exists")
    assert_cli_error(missing, "'app-nine'")
    # The duplicate changed nothing: the first password still works.
    assert verify_password(password, login_hashes(database_url, "smtp_credentials")["app-one"])

    listed = assert_ok(ctl(config, "smtp-credential", "list"))
    assert [line.split("\t")[0] for line in listed.lines] == ["app-one", "app-two"]
    for line in listed.lines:
        parse_rfc3339(line.split("\t")[1])  # the creation time, RFC 3339
    assert password not in listed.stdout and "scrypt" not in listed.stdout

    removed = assert_ok(ctl(config, "smtp-credential", "remove", "app-one"))
    assert "app-one" in removed.stdout
    assert list(login_hashes(database_url, "smtp_credentials")) == ["app-two"]


# -- web-user ---------------------------------------------------------------------------------
def test_web_users_add_password_remove(migrated: Path, database_url: str) -> None:
    short, nobody, missing = ctl_all(
        migrated,
        call("web-user", "add", "alice", stdin="short\n"),
        call("web-user", "password", "bob", stdin="long enough\n"),
        call("web-user", "remove", "bob"),
    )
    assert_cli_error(short, "at least 8 characters")
    assert_cli_error(nobody, "'bob'")
    assert_cli_error(missing, "'bob'")
    assert login_hashes(database_url, "web_users") == {}

    assert_ok(ctl(migrated, "web-user", "add", "alice", stdin="correct horse\n"))
    first_hash = login_hashes(database_url, "web_users")["alice"]
    assert "correct horse" not in first_hash
    assert verify_password("correct horse", first_hash)

    changed = assert_ok(ctl(migrated, "web-user", "password", "alice", stdin="battery staple\n"))
    assert "alice" in changed.stdout
    second_hash = login_hashes(database_url, "web_users")["alice"]
    assert second_hash != first_hash
    assert verify_password("battery staple", second_hash)
    assert not verify_password("correct horse", second_hash)

    removed = assert_ok(ctl(migrated, "web-user", "remove", "alice"))
    assert "alice" in removed.stdout
    assert login_hashes(database_url, "web_users") == {}


# -- suppression add / list / remove ----------------------------------------------------------
def test_suppression_add_list_remove(migrated: Path, database_url: str) -> None:
    added, forever, bad_address, bad_expiry, missing = ctl_all(
        migrated,
        call(
            "suppression",
            "add",
            "Bounce@Example.COM",
            "--reason",
            "hard_bounce",
            "--expires",
            "30d",
            "--note",
            "ticket 42, by hand",
        ),
        call("suppression", "add", "manual@example.org"),
        call("suppression", "add", "not-an-address"),
        call("suppression", "add", "later@example.org", "--expires", "soon"),
        call("suppression", "remove", "never@example.org"),
    )
    assert assert_ok(added).stdout == "bounce@example.com suppressed (hard_bounce)\n"
    assert assert_ok(forever).stdout == "manual@example.org suppressed (manual)\n"
    assert_cli_error(bad_address, "not-an-address")
    assert_cli_error(bad_expiry, "--expires", "soon")
    assert_cli_error(missing, "never@example.org", "not suppressed")

    stored = suppressions(database_url)
    assert set(stored) == {"bounce@example.com", "manual@example.org"}
    assert stored["manual@example.org"] == ("manual", None, "")
    reason, expires_ms, note = stored["bounce@example.com"]
    assert (reason, note) == ("hard_bounce", "ticket 42, by hand")
    [(created_ms,)] = query(
        database_url, "SELECT created_at FROM suppressions WHERE address = 'bounce@example.com'"
    )
    assert expires_ms is not None
    assert abs(expires_ms - created_ms - 30 * DAY_MS) < 60_000

    # An entry that expired long ago: shown only with --all.
    seed_suppression(database_url, "old@example.net", "soft_bounce", 1_000_000, 2_000_000)
    listed, everything = ctl_all(
        migrated, call("suppression", "list"), call("suppression", "list", "--all")
    )
    assert assert_ok(listed).lines == [
        f"bounce@example.com\thard_bounce\t{rfc3339(expires_ms / 1000)}\tticket 42, by hand",
        "manual@example.org\tmanual\tforever",
    ]
    assert assert_ok(everything).lines == [
        *listed.lines,
        f"old@example.net\tsoft_bounce\t{rfc3339(2_000)}",
    ]

    removed = assert_ok(ctl(migrated, "suppression", "remove", "Manual@Example.org"))
    assert "manual@example.org" in removed.stdout
    assert set(suppressions(database_url)) == {"bounce@example.com", "old@example.net"}


# -- suppression export / import --------------------------------------------------------------
def test_suppression_export_then_import_round_trips(
    migrated: Path, database_url: str, tmp_path: Path
) -> None:
    created = 1_700_000_000_123
    seed_suppression(database_url, "a@example.com", "complaint", created, None, 'say "hi", ok')
    seed_suppression(database_url, "b@example.org", "soft_bounce", created, 4_102_444_800_456)
    seed_suppression(database_url, "gone@example.net", "manual", created, 1_000)  # expired
    before = suppressions(database_url)

    exported = assert_ok(ctl(migrated, "suppression", "export"))
    rows = list(csv.reader(io.StringIO(exported.stdout)))
    assert rows == [
        EXPORT_HEADER,
        ["a@example.com", "complaint", rfc3339(created / 1000), "", 'say "hi", ok'],
        ["b@example.org", "soft_bounce", rfc3339(created / 1000), rfc3339(4_102_444_800.456), ""],
    ]

    exported_file = tmp_path / "export.csv"
    exported_file.write_text(exported.stdout, encoding="utf-8")
    query(database_url, "DELETE FROM suppressions")
    imported = assert_ok(ctl(migrated, "suppression", "import", str(exported_file)))
    assert imported.stdout == "imported 2 suppression(s)\n"
    del before["gone@example.net"]  # export leaves expired entries out
    assert suppressions(database_url) == before  # reason, expiry (to the ms) and note survive


def test_suppression_import_bare_list_and_stdin(
    migrated: Path, database_url: str, tmp_path: Path
) -> None:
    bare = tmp_path / "addresses.txt"
    bare.write_text("one@example.com\nTwo@Example.com\n\n  three@example.net  \n", encoding="utf-8")
    from_file, from_stdin = ctl_all(
        migrated,
        call("suppression", "import", str(bare)),
        call(
            "suppression",
            "import",
            "-",
            stdin="address,reason,note\nfour@example.com,unsubscribe,via stdin\n",
        ),
    )
    assert assert_ok(from_file).stdout == "imported 3 suppression(s)\n"
    assert assert_ok(from_stdin).stdout == "imported 1 suppression(s)\n"
    assert suppressions(database_url) == {
        "one@example.com": ("manual", None, ""),
        "two@example.com": ("manual", None, ""),
        "three@example.net": ("manual", None, ""),
        "four@example.com": ("unsubscribe", None, "via stdin"),
    }


def test_suppression_import_is_all_or_nothing(
    migrated: Path, database_url: str, tmp_path: Path
) -> None:
    seed_suppression(database_url, "kept@example.com", "manual", 1_700_000_000_000, None, "orig")
    before = suppressions(database_url)

    bad_file = tmp_path / "bad.csv"
    bad_file.write_text(
        "address,reason,expires_at,note\n"
        "new@example.com,complaint,,\n"
        "kept@example.com,hard_bounce,,replaced?\n"
        "worse@example.com,no_such_reason,,\n"
        "last@example.com,manual,,\n",
        encoding="utf-8",
    )
    from_file, from_stdin = ctl_all(
        migrated,
        call("suppression", "import", str(bad_file)),
        call(
            "suppression",
            "import",
            "-",
            stdin="first@example.com\nsecond@example.com\nnot an address\nlast@example.com\n",
        ),
    )
    assert_cli_error(from_file, str(bad_file), "line 4", "no_such_reason")
    assert_cli_error(from_stdin, "<stdin>", "line 3", "not an address")
    assert suppressions(database_url) == before


# -- errors before any command runs -----------------------------------------------------------
def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    line = assert_cli_error(ctl(missing, "migrate"), str(missing), "cannot read")
    assert "No such file" in line


def test_unknown_config_key(tmp_path: Path) -> None:
    database = tmp_path / "never.db"
    config = write_config(tmp_path, f"sqlite:{database}", "[smtp]\nmax_conections = 5\n")
    result = ctl(config, "suppression", "list")
    assert_cli_error(result, str(config), "smtp.max_conections", "unknown key")
    assert not database.exists()  # nothing was opened


def test_unreachable_database(tmp_path: Path) -> None:
    config = write_config(tmp_path, "postgresql://x:y@127.0.0.1:1/nodb")
    line = assert_cli_error(ctl(config, "migrate"), "cannot open database", "127.0.0.1:1/nodb")
    assert "postgresql://x:***@127.0.0.1:1/nodb" in line
    assert "x:y@" not in line


def test_unopenable_sqlite_database(tmp_path: Path) -> None:
    not_a_database = tmp_path / "garbage.db"
    not_a_database.write_bytes(b"this is not an SQLite database, just some text\n" * 100)
    config = write_config(tmp_path, f"sqlite:{not_a_database}")
    result = ctl(config, "suppression", "list", timeout=10)
    assert_cli_error(result, "cannot open database", str(not_a_database))


# -- standard output closed by its reader (issue 11, item 15) ---------------------------------
def shell_pipeline(config: Path, args: str, reader: str) -> tuple[str, str, int]:
    """``smartrelay-ctl ARGS | READER`` in bash: (reader's output, stderr, ctl's status)."""
    with tempfile.TemporaryDirectory() as scratch:
        status = Path(scratch) / "status"
        script = (
            f'"{CTL}" --config "{config}" {args} | {reader}; echo "${{PIPESTATUS[0]}}" >"{status}"'
        )
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        return done.stdout, done.stderr, int(status.read_text())


@pytest_twisted.ensureDeferred
async def test_closed_stdout_is_quiet_exit_141(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    """``events export | head -1`` printed a BrokenPipeError traceback and exited 1."""
    config = write_config(tmp_path, database_url)
    recipients = tuple(f"user{i}@example.net" for i in range(100))
    for _ in range(30):  # 3,000 events (about 1 MB of JSON lines): more than a pipe holds
        await store.queue_message(NewMessage("app@example.com", recipients, b"x"))
    await store.add_suppressions(
        [NewSuppression(f"s{i}@example.org", "manual", None, "") for i in range(3000)]
    )
    for args, reader in [
        ("events export", "head -1"),
        ("events export --format csv", "head -1"),
        ("suppression list", "head -1"),
        ("suppression export", "head -1"),
        ("suppression list", "true"),  # closed before anything was written: at exit
        ("smtp-credential list", "true"),  # nothing to write: a plain exit 0
    ]:
        out, err, status = await deferToThread(shell_pipeline, config, args, reader)
        assert err == "", (args, reader, err)
        if args == "smtp-credential list":
            assert status == 0
            continue
        assert status == STDOUT_CLOSED, (args, reader, status)
        assert out.count("\n") == (1 if reader == "head -1" else 0), (args, out)


def test_commands_start_without_the_classifier_and_dkim_modules() -> None:
    """Only `classify`, `feedback reprocess` and `dkim keygen` need the feedback classifier and
    the DKIM modules (~0.1 s of imports): the CLI imports them in those commands only."""
    probe = (
        "import sys, smartrelay.cli; print(sorted(m for m in sys.modules if m in"
        " {'smartrelay.feedback.classify', 'smartrelay.feedback.processor',"
        " 'smartrelay.rewrap.dkim', 'dkim', 'flufl.bounce'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"
