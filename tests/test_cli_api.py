"""``smartrelay-ctl api-token add|list|remove`` and ``events export --tag`` (the real console
script), on both engines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from smartrelay.storage.api_tokens import token_hash
from smartrelay.storage.store import Store
from smartrelay.timefmt import parse_rfc3339
from tests.support.run import assert_cli_error, assert_ok, call, ctl, ctl_all, query, write_config
from tests.test_api_export import T0, fill


@pytest.fixture
def config(tmp_path: Path, database_url: str) -> Path:
    return write_config(
        tmp_path, database_url, '[web]\nbase_url = "https://relay.example.com/mail"\n'
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_api_tokens_add_list_remove(config: Path, database_url: str) -> None:
    added = assert_ok(ctl(config, "api-token", "add", "crm"))
    assert len(added.lines) == 3 and "'crm'" in added.lines[0]
    token = added.lines[1]
    assert re.fullmatch(r"srt_[A-Za-z0-9_-]{43}", token)
    assert added.lines[2] == (
        f"use it as: curl -H 'Authorization: Bearer {token}'"
        " 'https://relay.example.com/mail/api/events'"
    )
    stored = query(database_url, "SELECT name, token_hash, last_used_at FROM api_tokens")
    assert stored == [("crm", token_hash(token), None)]  # the hash only

    other, duplicate, missing, spaced, empty, long = ctl_all(
        config,
        call("api-token", "add", "billing"),
        call("api-token", "add", "crm"),
        call("api-token", "remove", "nobody"),
        call("api-token", "add", "two words"),
        call("api-token", "add", ""),
        call("api-token", "add", "n" * 101),
    )
    assert assert_ok(other).lines[1] != token
    assert_cli_error(duplicate, "'crm'", "exists already")
    assert_cli_error(missing, "no API token named 'nobody'")
    assert_cli_error(spaced, "without spaces")
    assert_cli_error(empty, "non-empty")
    assert_cli_error(long, "at most 100 characters")

    query(database_url, "UPDATE api_tokens SET last_used_at = ? WHERE name = ?", (T0 * 1000, "crm"))
    listed = assert_ok(ctl(config, "api-token", "list"))
    assert [line.split("\t")[0] for line in listed.lines] == ["billing", "crm"]
    billing, crm = (line.split("\t") for line in listed.lines)
    parse_rfc3339(billing[1])
    assert billing[2] == "never" and parse_rfc3339(crm[2]) == T0
    assert token not in listed.stdout and token_hash(token) not in listed.stdout

    removed = assert_ok(ctl(config, "api-token", "remove", "crm"))
    assert removed.stdout == "API token 'crm' removed\n"
    assert [r[0] for r in query(database_url, "SELECT name FROM api_tokens")] == ["billing"]


@pytest_twisted.ensureDeferred
async def test_events_export_by_tag_and_unix_time(config: Path, store: Store) -> None:
    await fill(store, 20, tags=(("welcome",), ("receipt", "eu"), ()))

    async def exported(*args: str) -> list[dict[str, object]]:
        result = assert_ok(await deferToThread(ctl, config, "events", "export", *args))
        return [json.loads(line) for line in result.lines]

    everything = await exported()
    assert len(everything) == 23
    welcome = await exported("--tag", "welcome")
    assert welcome and [e["id"] for e in welcome] == [
        e["id"]
        for e in everything
        if "welcome" in e["tags"]  # type: ignore[operator]
    ]
    either = await exported("--tag", "welcome", "--tag", "eu", "--type", "received")
    assert all(e["type"] == "received" for e in either)
    assert {e["queue_id"] for e in either} == {"Q0", "Q1"}
    window = await exported("--since", str(int(T0 + 5)), "--until", "2027-01-15T08:00:08Z")
    assert [parse_rfc3339(str(e["time"])) for e in window] == [T0 + 5, T0 + 6, T0 + 7]
    bad = await deferToThread(ctl, config, "events", "export", "--until", "soon")
    assert_cli_error(bad, "--until: 'soon' is neither an RFC 3339 time nor a duration")
