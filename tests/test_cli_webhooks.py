"""`smartrelay-ctl webhooks ...` run as the real console script, on both engines, with a config
of two `[[webhooks]]`; the dispatcher's side is played by SQL on the same database (schema
012's contract): a replay's row deleted when sent, its request cleared when it failed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread

from smartrelay.events import DeliveredEvent, OpenedEvent
from smartrelay.storage.store import START, Store
from tests.conftest import real_reactor
from tests.support.webhook_rows import add_events, dead_letter, endpoint, execute

CTL = Path(sys.executable).parent / "smartrelay-ctl"
A = "https://a.example/hook"
B = "https://b.example/hook?key=1"
GONE = "https://gone.example/hook"


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CTL), "--config", str(config), *args], capture_output=True, text=True, timeout=120
    )


async def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = await deferToThread(ctl, config, *args)
    return result


def write_config(tmp_path: Path, database_url: str) -> Path:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[database]\nurl = "{database_url}"\n'
        f'[[webhooks]]\nurl = "{A}"\nsecret = "one"\nevents = ["delivered", "opened"]\n'
        f'[[webhooks]]\nurl = "{B}"\nsecret = "two"\nevents = ["delivered"]\n'
    )
    return config


def fields(line: str) -> dict[str, str]:
    """A list line's ``key=value`` fields, with ``url`` and ``state`` (the first two)."""
    parts = line.split("\t")
    found = {"url": parts[0], "state": parts[1]}
    for part in parts[2:]:
        key, _, value = part.partition("=")
        found[key] = value
    return found


async def wait_until(check: Callable[[], Awaitable[bool]], within: float = 60.0) -> None:
    reactor = real_reactor()
    deadline = reactor.seconds() + within
    while not await check():
        assert reactor.seconds() < deadline, "timed out"
        await deferLater(reactor, 0.1, lambda: None)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_list_enable_disable(
    store: Store, clock: Clock, database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, database_url)
    listed = await run(config, "webhooks", "list")
    assert listed.returncode == 0, listed.stderr
    assert [fields(line) for line in listed.stdout.splitlines()] == [
        {
            "url": url,
            "state": "new",
            "backlog": "-",
            "last_success": "never",
            "failures": "0",
            "dead_letters": "0 (0 events)",
        }
        for url in (A, B)
    ]

    await add_events(store, 3, DeliveredEvent("mx", "250 ok", True, 1), clock.seconds())
    await add_events(store, 2, OpenedEvent(None, None, False), clock.seconds())
    await endpoint(store, A, START, last_success_at=1_700_000_000_000, sent_events=9)
    await endpoint(
        store,
        B,
        START,
        failing_since=1_700_000_000_000,
        attempts=3,
        next_attempt_at=1_700_000_060_000,
        last_error="HTTP 503: \x1b[31mbusy\u202e",
        failures=3,
    )
    await endpoint(store, GONE, START, state="disabled", disabled_reason="HTTP 410 Gone")
    await dead_letter(store, B, 40)
    await dead_letter(store, GONE, 2)
    listed = await run(config, "webhooks", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    a, b, gone = (fields(line) for line in lines)
    assert a["url"] == A and a["state"] == "active" and a["backlog"] == "5"
    assert a["last_success"] == "2023-11-14T22:13:20.000Z"
    assert (a["failures"], a["dead_letters"]) == ("0", "0 (0 events)")
    assert "last_error" not in a and "not in the config" not in lines[0]
    assert b["url"] == B and b["state"] == "failing" and b["backlog"] == "3"
    assert b["failing_since"] == "2023-11-14T22:13:20.000Z"
    assert b["next_attempt"] == "2023-11-14T22:14:20.000Z"
    assert (b["failures"], b["dead_letters"]) == ("3", "1 (40 events)")
    assert b["last_error"] == "HTTP 503: \\x1b[31mbusy\\u202e"  # a receiver's text, escaped
    assert gone["url"] == GONE and gone["state"] == "disabled" and gone["backlog"] == "-"
    assert "not in the config" in lines[2].split("\t")
    assert gone["reason"] == "HTTP 410 Gone" and gone["dead_letters"] == "1 (2 events)"

    disabled = await run(config, "webhooks", "disable", A, "--reason", "receiver migrating")
    assert disabled.returncode == 0, disabled.stderr
    assert f"webhook endpoint {A} disabled" in disabled.stdout
    [row] = await execute(
        store, "SELECT state, disabled_reason FROM webhook_endpoints WHERE url = ?", (A,)
    )
    assert row == ("disabled", "receiver migrating")
    a = fields((await run(config, "webhooks", "list")).stdout.splitlines()[0])
    assert a["state"] == "disabled" and a["reason"] == "receiver migrating"

    enabled = await run(config, "webhooks", "enable", B)
    assert enabled.returncode == 0, enabled.stderr
    assert enabled.stdout.splitlines() == [
        f"webhook endpoint {B} enabled: the running relay sends to it again at once"
    ]
    [row] = await execute(
        store,
        "SELECT state, failing_since, attempts, next_attempt_at, last_error"
        " FROM webhook_endpoints WHERE url = ?",
        (B,),
    )
    assert row == ("active", None, 0, None, None)
    enabled = await run(config, "webhooks", "enable", GONE)
    assert enabled.returncode == 0
    assert "it is not in the config" in enabled.stdout

    both = await gatherResults(
        [
            Deferred.fromCoroutine(run(config, "webhooks", action, "https://unknown.example/"))
            for action in ("enable", "disable")
        ]
    )
    for unknown in both:
        assert unknown.returncode == 1 and unknown.stdout == ""
        assert unknown.stderr.splitlines() == [
            "smartrelay-ctl: error: no webhook endpoint 'https://unknown.example/'"
            " (in the config or sent to)"
        ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_dead_letters_list_and_replay(
    store: Store, clock: Clock, database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, database_url)
    empty = await run(config, "webhooks", "dead", "list")
    assert empty.returncode == 0 and empty.stdout == "no dead letter\n"
    first = await dead_letter(store, A, 100, "HTTP 500\r\nInjected: yes")
    second = await dead_letter(store, B, 7, "timeout after 10s")
    third = await dead_letter(store, B, 3)

    listed = await run(config, "webhooks", "dead", "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (str(first), A, "events=100"),
        (str(second), B, "events=7"),
        (str(third), B, "events=3"),
    ]
    assert rows[0][5:] == [
        "dead_since=2023-11-14T22:13:20.000Z",
        "attempts=12",
        "replay=no",
        "last_error=HTTP 500\\r\\nInjected: yes",
    ]
    assert rows[0][3] == "first=2023-11-14T22:13:15.000Z"
    only_b = await run(config, "webhooks", "dead", "list", "--url", B)
    assert [line.split("\t")[0] for line in only_b.stdout.splitlines()] == [
        str(second),
        str(third),
    ]

    clock_ms = 1_700_000_000_000  # the rows' time; the CLI's is the real one
    replayed = await run(config, "webhooks", "dead", "replay", str(second))
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith("1 dead letter(s) queued for replay: the running relay")
    requested = await execute(
        store, "SELECT id, replay_requested_at FROM webhook_dead_letters ORDER BY id"
    )
    assert requested[0] == (first, None) and requested[2] == (third, None)
    assert requested[1][1] > clock_ms
    listed = await run(config, "webhooks", "dead", "list", "--url", B)
    assert "\treplay=requested 20" in listed.stdout.splitlines()[0]

    replayed = await run(config, "webhooks", "dead", "replay", "--all", "--url", B)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith("2 dead letter(s) queued for replay")
    [(untouched,)] = await execute(
        store, "SELECT replay_requested_at FROM webhook_dead_letters WHERE url = ?", (A,)
    )
    assert untouched is None

    errors = {
        (): "say which dead letter to replay: its ID, or --all",
        (str(first), "--all"): "say which dead letter to replay: its ID, or --all",
        ("abc",): "not a dead-letter id: 'abc'",
        ("99999",): "no dead letter 99999",
        ("-5",): "no dead letter -5",
        (str(first), "--url", B): f"no dead letter {first} for {B}",
        ("--all", "--url", "https://x.example/"): (
            "no webhook endpoint 'https://x.example/' (in the config or sent to)"
        ),
    }
    # Each refused, changing nothing: run at once (each costs a CLI start-up).
    results = await gatherResults(
        [
            Deferred.fromCoroutine(run(config, "webhooks", "dead", "replay", *args))
            for args in errors
        ]
    )
    for (args, message), failed in zip(errors.items(), results, strict=True):
        assert failed.returncode == 1, args
        assert failed.stderr.splitlines() == [f"smartrelay-ctl: error: {message}"], args
    bad_url = await run(config, "webhooks", "dead", "list", "--url", "https://x.example/")
    assert bad_url.returncode == 1 and bad_url.stderr.count("\n") == 1
    assert (await run(config, "webhooks", "dead", "replay", "--all")).stdout.startswith(
        "3 dead letter(s) queued"
    )


@pytest_twisted.ensureDeferred
async def test_replay_wait_follows_the_dispatcher(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, database_url)
    first = await dead_letter(store, A, 10)
    second = await dead_letter(store, B, 5)

    async def requested(dead_id: int) -> bool:
        rows = await execute(
            store, "SELECT replay_requested_at FROM webhook_dead_letters WHERE id = ?", (dead_id,)
        )
        return bool(rows) and rows[0][0] is not None

    # The dispatcher sends both: the rows go, one after the other, each once the command has
    # shown the state before (it prints a line when what it reads changes).
    command: subprocess.Popen[str] = await deferToThread(
        subprocess.Popen,
        [str(CTL), "--config", str(config), "webhooks", "dead", "replay", "--all", "--wait", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert command.stdout is not None
        lines = [await deferToThread(command.stdout.readline) for _ in range(2)]
        assert lines[0].startswith("2 dead letter(s) queued for replay")
        assert lines[1] == "replay: 0 sent, 0 failed again, 2 waiting\n"
        assert await requested(first) and await requested(second)
        await execute(store, "DELETE FROM webhook_dead_letters WHERE id = ?", (first,))
        line = await deferToThread(command.stdout.readline)
        assert line == "replay: 1 sent, 0 failed again, 1 waiting\n"
        await execute(store, "DELETE FROM webhook_dead_letters WHERE id = ?", (second,))
        rest, errors = await deferToThread(command.communicate, timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
    assert command.returncode == 0, errors
    assert rest.splitlines() == [
        "replay: 2 sent, 0 failed again, 0 waiting",
        "all 2 dead letter(s) replayed",
    ]

    # The receiver is still down: the dispatcher clears the request and notes the error.
    third = await dead_letter(store, A, 4)
    waiting = deferToThread(ctl, config, "webhooks", "dead", "replay", str(third), "--wait")
    await wait_until(lambda: requested(third))
    await execute(
        store,
        "UPDATE webhook_dead_letters SET replay_requested_at = NULL, attempts = attempts + 1,"
        " last_error = 'HTTP 502 Bad Gateway' WHERE id = ?",
        (third,),
    )
    done = await waiting
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == "replay: 0 sent, 1 failed again, 0 waiting"
    assert done.stderr.splitlines() == [
        "smartrelay-ctl: error: 1 dead letter(s) failed again (they stay in the list);"
        f" dead letter {third}: HTTP 502 Bad Gateway"
    ]

    # No relay running: the wait ends, the request stays for when one runs.
    timed_out = await run(config, "webhooks", "dead", "replay", str(third), "--wait", "2")
    assert timed_out.returncode == 1
    assert timed_out.stderr.splitlines() == [
        "smartrelay-ctl: error: still waiting after 2s: 1 dead letter(s) not sent yet"
        " (is the relay running? the replay goes on without this command)"
    ]
    assert await requested(third)
    bad = await run(config, "webhooks", "dead", "replay", "--all", "--wait", "0")
    assert bad.returncode == 2 and "--wait: must be more than 0" in bad.stderr
