"""``smartrelay-ctl``: the admin CLI (SPEC section 6).

Every command loads the config, opens the database (bringing its schema up to date, as the
server does at start), does one job and exits; a few need no database (``dkim keygen``,
``secret rotate``) and ``classify`` not even a config file. Problems are one line on stderr
and exit 1. Run as root, a command that reads the config acts as the owner of ``data_dir``
(the ``smartrelay`` user of the Debian package; smartrelay/privileges.py).
Standard output closed early (``smartrelay-ctl events export | head -1``) is not a problem:
the command stops quietly with exit status 141 (128 + SIGPIPE), as ``cat`` or ``grep`` would
in a shell. The feedback classifier and the DKIM modules (~0.1 s of imports) are imported by
the commands that use them (``classify``, ``feedback reprocess``, ``dkim keygen``), so that
every other command starts that much sooner.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import getpass
import json
import os
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Literal, NoReturn, TextIO

import psycopg2
from twisted.internet.defer import succeed
from twisted.internet.task import deferLater, react

from smartrelay import __version__
from smartrelay.config import (
    Config,
    ConfigError,
    FeedbackRule,
    default_config_path,
    load_config,
    parse_config_file,
)
from smartrelay.config.checks import database_url_problem, redact_url
from smartrelay.events import ALL_TYPES, csv_row, csv_writer, write_jsonl
from smartrelay.export import EventFilters, event_pages, start_position
from smartrelay.passwords import generate_password, hash_password
from smartrelay.privileges import act_as_data_dir_owner
from smartrelay.reactor import IRelayReactor, as_relay_reactor
from smartrelay.retention.purge import Purger
from smartrelay.retention.rollup import ROLLUP_BATCH, ROLLUP_LAG
from smartrelay.smtp.session import printable
from smartrelay.smtp.volume_watch import POLL_INTERVAL
from smartrelay.storage.api_tokens import generate_api_token
from smartrelay.storage.copying import CopyError, ProgressLines, copy_data
from smartrelay.storage.engines import create_engine
from smartrelay.storage.engines.sqlite import create_data_dir_for
from smartrelay.storage.feedback import FEEDBACK_STATES
from smartrelay.storage.migrations import SchemaError, current_version, migrate
from smartrelay.storage.store import (
    SUPPRESSION_REASONS,
    DuplicateName,
    LoginTable,
    NewSuppression,
    Store,
    to_ms,
)
from smartrelay.suppression_csv import (
    SUPPRESSION_COLUMNS,
    SuppressionFileError,
    check_address,
    export_row,
    parse_suppression_csv,
)
from smartrelay.timefmt import parse_time_value, rfc3339
from smartrelay.tokens import SecretFileError, TokenCodec, add_key, load_keyring
from smartrelay.units import parse_duration

if TYPE_CHECKING:
    from smartrelay.feedback.model import Report

PROG = "smartrelay-ctl"
#: The exit status when standard output was closed by its reader: 128 + SIGPIPE, what a shell
#: reports for a command killed by SIGPIPE.
STDOUT_CLOSED = 141


class CliError(Exception):
    """A problem to report as one line, exit status 1."""


Command = Callable[[argparse.Namespace, Store], Awaitable[None]]


# -- commands -------------------------------------------------------------------------------
async def cmd_migrate(args: argparse.Namespace, store: Store) -> None:
    # The schema was brought up to date when the database was opened; report where it is.
    print(f"schema is at version {await current_version(store.engine)}")


async def cmd_credential_add(args: argparse.Namespace, store: Store) -> None:
    password = generate_password()
    check_name("SMTP credential", args.name)
    try:
        await store.smtp_credentials.add(args.name, hash_password(password), args.sandbox)
    except DuplicateName:
        raise CliError(f"SMTP credential {args.name!r} exists already") from None
    kind = "sandbox SMTP credential" if args.sandbox else "SMTP credential"
    print(f"{kind} {args.name!r} added; its password (shown only this once):")
    print(password)


async def cmd_credential_list(args: argparse.Namespace, store: Store) -> None:
    held = {h.credential: h for h in await store.held_credentials()}
    for login in await store.smtp_credentials.list():
        line = f"{login.name}\t{rfc3339(login.created_at)}"
        hold = held.get(login.name)
        if hold is not None:  # a third column, only for a held credential
            line += f"\theld since {rfc3339(hold.held_at)}: {printable(hold.reason)}"
        if login.sandbox:  # a fourth, only for a sandbox one (the third empty if not held)
            line += ("" if hold is not None else "\t") + "\tsandbox"
        print(line)


async def cmd_credential_release(args: argparse.Namespace, store: Store) -> None:
    result = await store.release_credential(args.name)
    if result == "unknown":
        raise CliError(f"no SMTP credential named {args.name!r}")
    if result == "not-held":
        raise CliError(f"SMTP credential {args.name!r} is not held")
    print(
        f"SMTP credential {args.name!r} released: the relay accepts its mail again within"
        f" {POLL_INTERVAL:g} seconds"
    )


async def cmd_credential_remove(args: argparse.Namespace, store: Store) -> None:
    await _remove_login(store.smtp_credentials, "SMTP credential", args.name)


async def cmd_web_user_add(args: argparse.Namespace, store: Store) -> None:
    await _add_login(store.web_users, "web user", args.name, read_new_password(args.name))
    print(f"web user {args.name!r} added")


async def cmd_web_user_remove(args: argparse.Namespace, store: Store) -> None:
    await _remove_login(store.web_users, "web user", args.name)


async def cmd_web_user_password(args: argparse.Namespace, store: Store) -> None:
    if await store.web_users.password_hash(args.name) is None:
        raise CliError(f"no web user named {args.name!r}")
    password = read_new_password(args.name)
    if not await store.web_users.set_password(args.name, hash_password(password)):
        raise CliError(f"no web user named {args.name!r}")
    ended = await store.end_web_sessions_of(args.name)
    print(f"password of web user {args.name!r} changed ({ended} session(s) logged out)")


async def _add_login(table: LoginTable, kind: str, name: str, password: str) -> None:
    check_name(kind, name)
    try:
        await table.add(name, hash_password(password))
    except DuplicateName:
        raise CliError(f"{kind} {name!r} exists already") from None


def check_name(kind: str, name: str) -> None:
    if not name.strip() or any(c.isspace() for c in name):
        raise CliError(f"{kind} name must be non-empty and without spaces: {name!r}")


async def cmd_api_token_add(args: argparse.Namespace, store: Store) -> None:
    check_name("API token", args.name)
    if len(args.name) > MAX_API_TOKEN_NAME or not args.name.isprintable():
        raise CliError(
            f"API token name must be printable, at most {MAX_API_TOKEN_NAME} characters:"
            f" {args.name[:MAX_API_TOKEN_NAME]!r}"
        )
    token = generate_api_token()
    try:
        await store.add_api_token(args.name, token)
    except DuplicateName:
        raise CliError(f"API token {args.name!r} exists already") from None
    print(f"API token {args.name!r} added; the token (shown only this once):")
    print(token)
    config: Config = args.loaded_config
    print(
        f"use it as: curl -H 'Authorization: Bearer {token}'"
        f" '{config.web.base_url.rstrip('/')}/api/events'"
    )


async def cmd_api_token_list(args: argparse.Namespace, store: Store) -> None:
    for token in await store.list_api_tokens():
        used = "never" if token.last_used_at is None else rfc3339(token.last_used_at)
        print(f"{token.name}\t{rfc3339(token.created_at)}\t{used}")


async def cmd_api_token_remove(args: argparse.Namespace, store: Store) -> None:
    if not await store.remove_api_token(args.name):
        raise CliError(f"no API token named {args.name!r}")
    print(f"API token {args.name!r} removed")


#: API token names are shown in logs and lists: one short line.
MAX_API_TOKEN_NAME = 100


async def _remove_login(table: LoginTable, kind: str, name: str) -> None:
    if not await table.remove(name):
        raise CliError(f"no {kind} named {name!r}")
    print(f"{kind} {name!r} removed")


def read_new_password(name: str) -> str:
    """Ask twice on a terminal; otherwise take the first line of standard input."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {name}: ")
        if first != getpass.getpass("again: "):
            raise CliError("the passwords do not match")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise CliError("the password must have at least 8 characters")
    return password


async def cmd_suppression_list(args: argparse.Namespace, store: Store) -> None:
    for entry in await store.list_suppressions(include_expired=args.all):
        expires = "forever" if entry.expires_at is None else rfc3339(entry.expires_at)
        print(f"{entry.address}\t{entry.reason}\t{expires}\t{entry.note}".rstrip("\t"))


async def cmd_suppression_add(args: argparse.Namespace, store: Store) -> None:
    address = check_address(args.address)
    expires_at = None
    if args.expires != "forever":
        try:
            expires_at = store.clock.seconds() + parse_duration(args.expires)
        except ValueError as error:
            raise CliError(f"--expires: {error}") from None
    await store.add_suppression(address, args.reason, expires_at, args.note)
    print(f"{address.lower()} suppressed ({args.reason})")


async def cmd_suppression_remove(args: argparse.Namespace, store: Store) -> None:
    address = args.address.strip()
    if not await store.remove_suppression(address):
        raise CliError(f"{address} is not suppressed")
    print(f"{address.lower()} removed from the suppression list")


async def cmd_suppression_import(args: argparse.Namespace, store: Store) -> None:
    entries = read_suppression_file(args.file)
    await store.add_suppressions(entries)
    print(f"imported {len(entries)} suppression(s)")


def read_suppression_file(path: str) -> list[NewSuppression]:
    if path == "-":
        return _parse_suppression_file(sys.stdin, "<stdin>")
    try:
        # utf-8-sig: spreadsheets save CSV with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return _parse_suppression_file(handle, path)
    except OSError as error:
        raise CliError(f"{path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"{path}: not UTF-8 text") from None


def _parse_suppression_file(handle: TextIO, name: str) -> list[NewSuppression]:
    """The file's entries; its first bad line refuses the whole file (all or nothing)."""
    try:
        parsed = parse_suppression_csv(handle)
    except SuppressionFileError as error:
        raise CliError(f"{name}: {error}") from None
    if parsed.bad_lines:
        bad = parsed.bad_lines[0]
        raise CliError(f"{name}: line {bad.line}: {bad.reason}")
    return list(parsed.entries)


async def cmd_suppression_export(args: argparse.Namespace, store: Store) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(SUPPRESSION_COLUMNS)
    for e in await store.list_suppressions(include_expired=args.all):
        writer.writerow(export_row(e))


async def cmd_queue_list(args: argparse.Namespace, store: Store) -> None:
    rows = await store.pending_recipients(args.queue_id, limit=args.limit)
    now = time.time()
    for r in rows:
        reply = f"\t{r.last_reply}" if r.last_reply else ""
        when = f"next={rfc3339(r.next_attempt_at)}"
        if r.state == "delivering":  # claimed: next_attempt_at is when the lease runs out
            expired = r.next_attempt_at <= now
            when = f"lease={'expired' if expired else 'until'}:{rfc3339(r.next_attempt_at)}"
        print(f"{r.queue_id}\t{r.address}\t{r.state}\tattempts={r.attempts}\t{when}{reply}")
    if not rows:
        print(
            "the queue is empty" if args.queue_id is None else f"nothing queued for {args.queue_id}"
        )


async def cmd_queue_retry(args: argparse.Namespace, store: Store) -> None:
    count = await store.retry_now(args.queue_id)
    if args.queue_id is not None and count == 0:
        held = [r for r in await store.pending_recipients(args.queue_id) if r.state == "delivering"]
        if held:
            until = rfc3339(max(r.next_attempt_at for r in held))
            raise CliError(
                f"{len(held)} recipient(s) of {args.queue_id} are being delivered right now"
                f" (lease until {until}); retry after that, or drop the message"
            )
        raise CliError(f"no waiting recipient for queue id {args.queue_id}")
    print(f"{count} recipient(s) due now")


async def cmd_queue_drop(args: argparse.Namespace, store: Store) -> None:
    dropped = await store.drop_message(args.queue_id, by="queue drop")
    if not dropped:
        raise CliError(f"no waiting recipient for queue id {args.queue_id}")
    print(f"dropped {len(dropped)} recipient(s) of {args.queue_id}")


async def cmd_events_export(args: argparse.Namespace, store: Store) -> None:
    now = store.clock.seconds()
    since = parse_time(args.since, now, "--since")
    filters = EventFilters(
        types=tuple(dict.fromkeys(args.type)),
        tags=tuple(dict.fromkeys(args.tag)),
        since=since,
        until=parse_time(args.until, now, "--until"),
    )
    writer = csv_writer(sys.stdout) if args.format == "csv" else None
    head = await store.event_head()
    async for page in event_pages(store, await start_position(store, None, since), head, filters):
        if writer is not None:
            writer.writerows(csv_row(event) for event in page.events)
        else:
            write_jsonl(page.events, sys.stdout)


async def cmd_tls_report(args: argparse.Namespace, store: Store) -> None:
    """The TLS results of one UTC day (MTA-STS sessions and policy fetches), for TLS-RPT."""
    day = args.day or time.strftime("%Y-%m-%d", time.gmtime())
    try:
        datetime.date.fromisoformat(day)
    except ValueError:
        raise CliError(f"--day {printable(day)!r} is not a date (use e.g. 2026-12-05)") from None
    if len(day) != 10:
        raise CliError(f"--day {printable(day)!r} is not a date (use e.g. 2026-12-05)")
    domain = args.domain.lower().rstrip(".") if args.domain else None
    rows = await store.tls_results(day, day, domain)
    for r in rows:
        detail = f"\t{printable(r.detail)}" if r.detail else ""
        print(
            f"{r.day}\t{printable(r.policy_domain)}\tpolicy={printable(r.policy_id) or '-'}"
            f"\tmode={r.mode or '-'}\t{r.result}\tmx={printable(r.mx_host) or '-'}"
            f"\tsessions={r.sessions}{detail}"
        )
    if not rows:
        print(f"no TLS results for {day}" + (f" and {printable(domain)}" if domain else ""))


async def cmd_feedback_list(args: argparse.Namespace, store: Store) -> None:
    reports = await store.list_feedback(args.state, limit=args.limit)
    for r in reports:
        fields = (r.kind, r.matched_by, r.queue_id, r.recipient, r.reason)
        shown = "\t".join(printable(value) if value else "-" for value in fields)
        print(f"{r.report_id}\t{rfc3339(r.received_at)}\t{r.state}\t{shown}")
    if not reports:
        print("no feedback report" if args.state is None else f"no feedback report {args.state}")


async def cmd_feedback_reprocess(args: argparse.Namespace, store: Store) -> None:
    from smartrelay.feedback.processor import (
        FeedbackProcessor,
        UnknownReport,
        configured_classifier,
    )

    config: Config = args.loaded_config
    processor = FeedbackProcessor(
        lambda: succeed(store),
        TokenCodec(load_keyring(config.rewrap.secret_file)),
        config,
        configured_classifier(config),
    )

    async def one(report_id: str) -> None:
        try:
            outcome = await processor.process(report_id, again=True)
        except UnknownReport as error:
            raise CliError(str(error)) from None
        print(f"{report_id}\t{outcome.state}\t{printable(outcome.reason) or '-'}")

    if not args.all_unmatched:
        await one(args.report_id)
        return
    count = 0
    after: tuple[float, str] | None = None
    while True:  # in arrival order; those still unmatched are behind ``after``
        page = await store.feedback_ids("unmatched", after, REPROCESS_PAGE)
        for position in page:
            await one(position[1])
            count += 1
        if len(page) < REPROCESS_PAGE:
            break
        after = page[-1]
    print(f"{count} unmatched report(s) reprocessed")


REPROCESS_PAGE = 100


# -- webhooks (docs/webhooks.md, "Operations") ------------------------------------------
#: ``webhooks dead replay --wait``: how often the dead letters are looked at, and the longest
#: wait (``--wait`` without a value waits this long).
REPLAY_POLL = 1.0
REPLAY_WAIT = 600.0
REPLAY_WAIT_MAX = 7 * 86400.0


def configured_webhooks(config: Config) -> dict[str, tuple[str, ...]]:
    """Each ``[[webhooks]]`` url and its event types."""
    return {webhook.url: webhook.events for webhook in config.webhooks}


async def known_webhook_urls(store: Store, config: Config) -> set[str]:
    """The urls of the config, of the dispatcher's rows and of the dead letters."""
    return set(configured_webhooks(config)) | await store.webhook_urls()


def _when(seconds: float | None, never: str = "never") -> str:
    return never if seconds is None else rfc3339(seconds)


async def cmd_webhooks_list(args: argparse.Namespace, store: Store) -> None:
    statuses = await store.webhook_endpoints_status(configured_webhooks(args.loaded_config))
    for s in statuses:
        state = "failing" if s.state == "active" and s.failing_since is not None else s.state
        fields = [
            printable(s.url),
            state,
            f"backlog={s.backlog_text}",
            f"last_success={_when(s.last_success_at)}",
            f"failures={s.failures}",
            f"dead_letters={s.dead_letters} ({s.dead_events} events)",
        ]
        if not s.in_config:
            fields.append("not in the config")
        if s.state == "disabled":
            fields.append(f"disabled={_when(s.disabled_at, '-')}")
            fields.append(f"reason={printable(s.disabled_reason or '-')}")
        if s.failing_since is not None:
            fields.append(f"failing_since={rfc3339(s.failing_since)}")
            fields.append(f"next_attempt={_when(s.next_attempt_at, 'now')}")
        if s.last_error:
            fields.append(f"last_error={printable(s.last_error)}")
        print("\t".join(fields))
    if not statuses:
        print("no webhook endpoint: none in the config, and none was ever sent to")


async def _set_webhook_state(
    args: argparse.Namespace, store: Store, state: Literal["active", "disabled"], reason: str
) -> bool:
    """The state set; whether the url is in the config. Unknown urls are a :class:`CliError`."""
    configured = configured_webhooks(args.loaded_config)
    in_config = args.url in configured
    if not await store.set_webhook_state(args.url, state, reason, create=in_config):
        raise CliError(f"no webhook endpoint {printable(args.url)!r} (in the config or sent to)")
    return in_config


async def cmd_webhooks_enable(args: argparse.Namespace, store: Store) -> None:
    in_config = await _set_webhook_state(args, store, "active", "")
    url = printable(args.url)
    print(f"webhook endpoint {url} enabled: the running relay sends to it again at once")
    if not in_config:
        print("(it is not in the config: nothing sends to it until it is added back)")


async def cmd_webhooks_disable(args: argparse.Namespace, store: Store) -> None:
    reason = args.reason.strip() or "disabled with smartrelay-ctl"
    await _set_webhook_state(args, store, "disabled", reason[:500])
    print(
        f"webhook endpoint {printable(args.url)} disabled: nothing is sent to it until"
        " `webhooks enable`; its events wait (its backlog grows)"
    )


async def _check_webhook_url(args: argparse.Namespace, store: Store) -> None:
    if args.url is not None and args.url not in await known_webhook_urls(store, args.loaded_config):
        raise CliError(f"no webhook endpoint {printable(args.url)!r} (in the config or sent to)")


async def cmd_webhooks_dead_list(args: argparse.Namespace, store: Store) -> None:
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    await _check_webhook_url(args, store)
    dead = await store.list_dead_letters(args.url, limit=args.limit)
    for d in dead:
        replay = "no"
        if d.replay_requested_at is not None:
            replay = f"requested {rfc3339(d.replay_requested_at)}"
            replay += " (under way)" if d.replay_started else ""
        fields = [
            str(d.id),
            printable(d.url),
            f"events={d.events}",
            f"first={_when(d.first_event_at, '-')}",
            f"last={_when(d.last_event_at, '-')}",
            f"dead_since={rfc3339(d.created_at)}",
            f"attempts={d.attempts}",
            f"replay={replay}",
            f"last_error={printable(d.last_error)}",
        ]
        print("\t".join(fields))
    if not dead:
        print("no dead letter" if args.url is None else f"no dead letter for {args.url}")


def replay_wait(text: str) -> float:
    """``--wait``'s value: seconds, or a duration (``10m``)."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parse_duration(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    if not 0 < seconds <= REPLAY_WAIT_MAX:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {REPLAY_WAIT_MAX:.0f}")
    return seconds


async def cmd_webhooks_dead_replay(args: argparse.Namespace, store: Store) -> None:
    if (args.dead_id is None) == (not args.all):
        raise CliError("say which dead letter to replay: its ID, or --all")
    dead_id = None
    if args.dead_id is not None:
        try:
            dead_id = int(args.dead_id)
        except ValueError:
            raise CliError(f"not a dead-letter id: {printable(args.dead_id)!r}") from None
        if not 0 < dead_id < 2**63:
            raise CliError(f"no dead letter {dead_id}")
    await _check_webhook_url(args, store)
    ids = await store.request_replay_ids(dead_id, args.url)
    if dead_id is not None and not ids:
        where = "" if args.url is None else f" for {args.url}"
        raise CliError(f"no dead letter {dead_id}{where}")
    if not ids:
        print("no dead letter to replay" + ("" if args.url is None else f" for {args.url}"))
        return
    print(
        f"{len(ids)} dead letter(s) queued for replay: the running relay sends them"
        " (`webhooks dead list` shows those still to go)"
    )
    if args.wait is not None:
        await _wait_for_replay(store, ids, args.wait)


async def _wait_for_replay(store: Store, ids: list[int], limit: float) -> None:
    """Until every dead letter of ``ids`` is sent (gone) or failed again, at most ``limit``
    seconds; a progress line at each change."""
    clock = store.clock
    deadline = clock.seconds() + limit
    shown = ""
    while True:
        states = await store.dead_letter_states(ids)
        sent = sum(s.state == "sent" for s in states)
        failed = [s for s in states if s.state == "failed"]
        waiting = len(states) - sent - len(failed)
        line = f"replay: {sent} sent, {len(failed)} failed again, {waiting} waiting"
        if line != shown:
            print(line, flush=True)
            shown = line
        if waiting == 0:
            break
        if clock.seconds() >= deadline:
            raise CliError(
                f"still waiting after {limit:g}s: {waiting} dead letter(s) not sent yet"
                " (is the relay running? the replay goes on without this command)"
            )
        await deferLater(clock, REPLAY_POLL, lambda: None)
    if failed:
        first = failed[0]
        raise CliError(
            f"{len(failed)} dead letter(s) failed again (they stay in the list); dead letter"
            f" {first.id}: {printable(first.last_error or '')}"
        )
    print(f"all {sent} dead letter(s) replayed")


def parse_time(text: str | None, now: float, option: str) -> float | None:
    """An RFC 3339 time or date, unix seconds, or a duration meaning that long ago (``24h``)."""
    if text is None:
        return None
    try:
        return parse_time_value(text, now)
    except ValueError as error:
        raise CliError(f"{option}: {error}") from None


async def cmd_purge(args: argparse.Namespace, store: Store) -> None:
    last_shown = 0.0

    def progress(kind: str, rows: int) -> None:
        nonlocal last_shown
        now = time.monotonic()
        if now - last_shown >= 1.0:
            last_shown = now
            print(f"{PROG}: purging {kind.replace('_', ' ')}: {rows}...", file=sys.stderr)

    purger = Purger(store, args.loaded_config.retention, progress=progress)
    # Events go only once the roll-ups have counted them: a purge by hand catches those up
    # first (below), so that with the relay stopped it removes everything due.
    horizon = store.clock.seconds() - ROLLUP_LAG
    if args.dry_run:
        position = await store.rollup_position()
        counts = await purger.count(to_ms(max(position or 0.0, horizon)))
        print(f"would remove {counts['message_bodies']} message bodies")
        print(f"would remove {counts['messages']} messages ({counts['recipients']} recipients)")
        print(f"would remove {counts['events']} events")
        print(f"would remove {counts['feedback_reports']} feedback reports")
        return
    counted = 0
    while True:
        batch = await store.roll_up(horizon, ROLLUP_BATCH)
        counted += batch
        if batch < ROLLUP_BATCH:
            break
        progress("roll-ups (events counted)", counted)
    report = await purger.run_pass()
    print(f"removed {report.message_bodies} message bodies")
    print(f"removed {report.messages} messages ({report.recipients} recipients)")
    print(f"removed {report.events} events")
    print(f"removed {report.feedback_reports} feedback reports")
    if store.engine.name == "sqlite":
        print(f"gave {report.pages_freed} database pages back to the file system")


async def cmd_copy_data(args: argparse.Namespace, store: Store) -> None:
    """``copy-data --to URL``: this database's data into another, fresh one (progress on
    stderr, the rows per table on stdout). The target's password is never shown."""
    url: str = args.to
    shown = redact_url(url)
    problem = database_url_problem(url)
    if problem is not None:
        raise CliError(f"--to: {problem}")
    if url.startswith("sqlite:") and url.endswith(":memory:"):
        raise CliError("--to: an in-memory SQLite database would be lost when the copy ends")
    # The CLI's store runs on the reactor itself (run_command).
    reactor = as_relay_reactor(store.clock)
    try:
        target = create_engine(reactor, url)
        await target.start()
    except (psycopg2.Error, sqlite3.Error, OSError) as error:
        raise CliError(f"cannot open target database {shown}: {_one_line(error)}") from None
    try:
        report = await copy_data(
            store.engine,
            target,
            reactor,
            with_queue=not args.without_queue,
            progress=ProgressLines(reactor, sys.stderr),
        )
    except CopyError as error:
        raise CliError(str(error)) from None
    except SchemaError as error:
        raise CliError(f"target database {shown}: {error}") from None
    except (psycopg2.Error, sqlite3.Error) as error:
        raise CliError(f"copy to {shown} failed: {_one_line(error)}") from None
    finally:
        await target.close()
    print(f"copied to {shown} (schema version {report.schema_version}):")
    width = max(len(t.name) for t in report.tables)
    for table in report.tables:
        print(f"  {table.name:<{width}}  {table.rows}")
    if args.without_queue:
        print("the queue (messages, recipients) was not copied (--without-queue)")


def cmd_dkim_keygen(args: argparse.Namespace, config: Config) -> None:
    """``dkim keygen DOMAIN SELECTOR``: write a new key, print its DNS TXT record (no database)."""
    from smartrelay.rewrap.dkim import DkimError, generate_key, txt_record_name, zone_file_entry

    directory: str = args.directory or os.path.join(config.server.data_dir, "dkim")
    try:
        path, record = generate_key(args.domain, args.selector, args.algorithm, directory)
    except DkimError as error:
        fail(str(error))
    domain = args.domain.rstrip(".").lower()
    kind = "RSA-2048" if args.algorithm == "rsa" else "Ed25519"
    print(f"Wrote {path} ({kind}, mode 0600). Publish this DNS TXT record:")
    print()
    print(f"  name:  {txt_record_name(domain, args.selector)}")
    print(f"  value: {record}")
    print()
    print("Zone file form (the value split into strings of at most 255 characters):")
    print()
    print(zone_file_entry(domain, args.selector, record))
    print()
    print("Then add to the config file and reload the relay (systemctl reload smartrelay):")
    print()
    print("[[dkim.keys]]")
    print(f'domain = "{domain}"')
    print(f'selector = "{args.selector}"')
    print(f"private_key = {_toml_string(path)}")
    print(f'algorithm = "{args.algorithm}-sha256"')


def cmd_secret_rotate(args: argparse.Namespace, config: Config) -> None:
    """``secret rotate``: a new current key in ``[rewrap] secret_file`` (no database)."""
    path = config.rewrap.secret_file
    try:
        keyring = add_key(path)
    except SecretFileError as error:
        fail(str(error))
    others = sorted(k for k in keyring.keys if k != keyring.current)
    print(f"{path}: key {keyring.current} is now current.")
    if others:
        print(f"Tokens signed with key(s) {', '.join(map(str, others))} stay valid.")
    print("Restart the relay to sign new tokens with it. To retire an old key later, delete its")
    print("line from the file: links and bounce addresses signed with it then stop working.")


def cmd_classify(args: argparse.Namespace) -> None:
    """``classify FILE...``: one JSON line per file (SPEC section 6). No database is opened;
    the config is read only for its ``[[feedback.rules]]``, and is not needed at all."""
    from smartrelay.feedback.classify import classify_message

    rules = _classify_rules(args.config)
    failed = False
    for name in args.files:
        try:
            raw = _read_report(name)
        except OSError as error:
            print(f"{PROG}: error: cannot read {name}: {error.strerror or error}", file=sys.stderr)
            failed = True
            continue
        report = classify_message(raw, rules)
        sys.stdout.write(json.dumps(classify_json(name, report), ensure_ascii=False) + "\n")
    sys.stdout.flush()
    if failed:
        raise SystemExit(1)


def _classify_rules(path: str | None) -> tuple[FeedbackRule, ...]:
    """The config's rules if it loads; none (with a warning) if it does not; none (silently)
    when no config file was named and the default one does not exist."""
    name = path or default_config_path()
    if path is None and not os.path.exists(name):
        return ()
    try:
        return parse_config_file(name).feedback_rules
    except ConfigError as error:
        print(f"{PROG}: warning: {error}; classifying without [[feedback.rules]]", file=sys.stderr)
        return ()


def _read_report(name: str) -> bytes:
    """The file's bytes (``-``: standard input), at most one byte over the size limit: a larger
    report is not read whole to be refused."""
    from smartrelay.feedback.classify import MAX_REPORT_SIZE

    if name == "-":
        return sys.stdin.buffer.read(MAX_REPORT_SIZE + 1)
    with open(name, "rb") as f:
        return f.read(MAX_REPORT_SIZE + 1)


def classify_json(name: str, report: Report) -> dict[str, object]:
    """The ``classify`` output object of SPEC section 6 for one file."""
    return {
        "file": name,
        "kind": report.kind,
        "queue_id": report.returned.smartrelay_id if report.returned is not None else None,
        "recipients": [
            {
                "address": r.recipient.address,
                "status": r.recipient.status,
                "reply_code": r.recipient.reply_code,
                "category": r.category,
                "hard": r.hard,
                "diagnostic": r.recipient.diagnostic,
            }
            for r in report.recipients
        ],
    }


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- plumbing -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="SmartRelay administration")
    parser.add_argument(
        "--config", "-c", help=f"config file (default: {default_config_path()})", default=None
    )
    parser.add_argument("--version", action="version", version=f"SmartRelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("migrate", help="create or upgrade the database schema").set_defaults(
        run=cmd_migrate
    )

    credential = commands.add_parser("smtp-credential", help="SMTP AUTH credentials")
    credential_cmds = credential.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = credential_cmds.add_parser("add", help="add one; prints its generated password once")
    p.add_argument("name")
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="its mail is recorded as delivered but never leaves the relay (staging)",
    )
    p.set_defaults(run=cmd_credential_add)
    credential_cmds.add_parser(
        "list", help="names, creation times, holds (volume alerts), and sandbox marks"
    ).set_defaults(run=cmd_credential_list)
    p = credential_cmds.add_parser("remove", help="remove one")
    p.add_argument("name")
    p.set_defaults(run=cmd_credential_remove)
    p = credential_cmds.add_parser(
        "release", help="accept the mail of one held by a volume alert again"
    )
    p.add_argument("name")
    p.set_defaults(run=cmd_credential_release)

    api_token = commands.add_parser("api-token", help="tokens for GET /api/events")
    token_cmds = api_token.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = token_cmds.add_parser("add", help="add one; prints the token once")
    p.add_argument("name")
    p.set_defaults(run=cmd_api_token_add)
    token_cmds.add_parser("list", help="name, created, last used (tab-separated)").set_defaults(
        run=cmd_api_token_list
    )
    p = token_cmds.add_parser("remove", help="remove one (its token stops working at once)")
    p.add_argument("name")
    p.set_defaults(run=cmd_api_token_remove)

    user = commands.add_parser("web-user", help="logins for the reports UI")
    user_cmds = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, run, text in (
        ("add", cmd_web_user_add, "add one (password asked, or read from stdin)"),
        ("remove", cmd_web_user_remove, "remove one"),
        ("password", cmd_web_user_password, "set a new password (asked, or read from stdin)"),
    ):
        p = user_cmds.add_parser(action, help=text)
        p.add_argument("name")
        p.set_defaults(run=run)

    suppression = commands.add_parser("suppression", help="the suppression list")
    sup_cmds = suppression.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sup_cmds.add_parser("list", help="address, reason, expiry, note (tab-separated)")
    p.add_argument("--all", action="store_true", help="include expired entries")
    p.set_defaults(run=cmd_suppression_list)
    p = sup_cmds.add_parser("add", help="suppress an address")
    p.add_argument("address")
    p.add_argument("--reason", default="manual", choices=SUPPRESSION_REASONS)
    p.add_argument("--expires", default="forever", help='"forever" (default) or e.g. "30d"')
    p.add_argument("--note", default="")
    p.set_defaults(run=cmd_suppression_add)
    p = sup_cmds.add_parser("remove", help="remove an address")
    p.add_argument("address")
    p.set_defaults(run=cmd_suppression_remove)
    p = sup_cmds.add_parser("import", help="add entries from a CSV file ('-' for stdin)")
    p.add_argument("file")
    p.set_defaults(run=cmd_suppression_import)
    p = sup_cmds.add_parser("export", help="CSV of the list to stdout")
    p.add_argument("--all", action="store_true", help="include expired entries")
    p.set_defaults(run=cmd_suppression_export)

    dkim = commands.add_parser("dkim", help="DKIM signing keys")
    dkim_cmds = dkim.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = dkim_cmds.add_parser("keygen", help="write a new key; prints the DNS TXT record")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("selector", metavar="SELECTOR")
    p.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    p.add_argument("--directory", metavar="DIR", help="where to write it (default: DATA_DIR/dkim)")
    p.set_defaults(run_offline=cmd_dkim_keygen)

    secret = commands.add_parser("secret", help="the key of VERP and tracking tokens")
    secret_cmds = secret.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = secret_cmds.add_parser("rotate", help="add a new key and make it current")
    p.set_defaults(run_offline=cmd_secret_rotate)

    queue = commands.add_parser("queue", help="the outbound queue")
    queue_cmds = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = queue_cmds.add_parser("list", help="recipients still to deliver, soonest first")
    p.add_argument("queue_id", nargs="?", default=None)
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(run=cmd_queue_list)
    p = queue_cmds.add_parser("retry", help="make waiting recipients due now")
    p.add_argument("queue_id", nargs="?", default=None)
    p.set_defaults(run=cmd_queue_retry)
    p = queue_cmds.add_parser("drop", help="stop delivering a message")
    p.add_argument("queue_id")
    p.set_defaults(run=cmd_queue_drop)

    p = commands.add_parser("purge", help="one retention pass now; prints what it removed")
    p.add_argument("--dry-run", action="store_true", help="only count what would be removed")
    p.set_defaults(run=cmd_purge)

    p = commands.add_parser(
        "copy-data", help="copy this database's data into another, fresh one (e.g. PostgreSQL)"
    )
    p.add_argument("--to", required=True, metavar="URL", help="the target's [database] url")
    p.add_argument(
        "--without-queue",
        action="store_true",
        help="copy the history only, not messages and recipients (the relay may run)",
    )
    p.set_defaults(run=cmd_copy_data)

    feedback = commands.add_parser("feedback", help="bounces, FBL reports, replies received")
    feedback_cmds = feedback.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = feedback_cmds.add_parser(
        "list",
        help="reports, oldest first: id, received, state, kind, matched by, queue id,"
        " recipient, reason (tab-separated)",
    )
    p.add_argument("--state", choices=FEEDBACK_STATES, help="only reports in this state")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(run=cmd_feedback_list)
    p = feedback_cmds.add_parser(
        "reprocess", help="process a report again (after a fix, a new rule, a late message)"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("report_id", nargs="?", default=None, metavar="ID")
    which.add_argument("--all-unmatched", action="store_true", help="every unmatched report")
    p.set_defaults(run=cmd_feedback_reprocess)

    webhooks = commands.add_parser("webhooks", help="webhook endpoints and their dead letters")
    webhook_cmds = webhooks.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = webhook_cmds.add_parser(
        "list", help="each endpoint: state, backlog, last success, failures, dead letters"
    )
    p.set_defaults(run=cmd_webhooks_list)
    p = webhook_cmds.add_parser("enable", help="send to an endpoint again (tried at once)")
    p.add_argument("url", metavar="URL")
    p.set_defaults(run=cmd_webhooks_enable)
    p = webhook_cmds.add_parser("disable", help="stop sending to an endpoint (its events wait)")
    p.add_argument("url", metavar="URL")
    p.add_argument("--reason", default="", help="why (shown by `webhooks list` and the UI)")
    p.set_defaults(run=cmd_webhooks_disable)
    dead = webhook_cmds.add_parser("dead", help="batches that exhausted their retries")
    dead_cmds = dead.add_subparsers(dest="dead_action", required=True, metavar="ACTION")
    p = dead_cmds.add_parser("list", help="the dead letters, oldest first (tab-separated)")
    p.add_argument("--url", metavar="URL", help="only this endpoint's")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(run=cmd_webhooks_dead_list)
    p = dead_cmds.add_parser("replay", help="send dead letters again (the running relay does)")
    p.add_argument("dead_id", nargs="?", default=None, metavar="ID")
    p.add_argument("--all", action="store_true", help="every dead letter (of --url)")
    p.add_argument("--url", metavar="URL", help="only this endpoint's")
    p.add_argument(
        "--wait",
        nargs="?",
        const=REPLAY_WAIT,
        default=None,
        type=replay_wait,
        metavar="SECONDS",
        help=f"wait until they are sent or failed again (at most SECONDS, {REPLAY_WAIT:.0f})",
    )
    p.set_defaults(run=cmd_webhooks_dead_replay)

    p = commands.add_parser(
        "classify",
        help="classify bounce/FBL/reply messages: one JSON line per file (no database)",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="a message file ('-' for stdin)")
    p.set_defaults(run_configless=cmd_classify)

    events = commands.add_parser("events", help="the event log")
    event_cmds = events.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = event_cmds.add_parser("export", help="events to stdout, oldest first")
    p.add_argument("--since", help="RFC 3339 time or date, unix seconds, or a duration ago (24h)")
    p.add_argument("--until", help="RFC 3339 time or date, unix seconds, or a duration ago")
    p.add_argument(
        "--type",
        action="append",
        default=[],
        choices=ALL_TYPES,
        help="only this type (repeatable)",
    )
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        help="only events of messages with this tag (repeatable: any of them)",
    )
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.set_defaults(run=cmd_events_export)

    p = commands.add_parser(
        "tls-report", help="TLS results of a day per MTA-STS policy domain (for TLS-RPT)"
    )
    p.add_argument("--day", help="UTC date, YYYY-MM-DD (default: today)")
    p.add_argument("--domain", help="only this policy domain")
    p.set_defaults(run=cmd_tls_report)
    return parser


def fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(1)


async def run_command(reactor: IRelayReactor, args: argparse.Namespace, config: Config) -> None:
    try:
        engine = create_engine(reactor, config.database.url)
        await engine.start()
    except (psycopg2.Error, sqlite3.Error, OSError) as error:
        fail(f"cannot open database {config.database.redacted_url}: {_one_line(error)}")
    try:
        store = Store(engine, reactor)
        await migrate(engine, to_ms(reactor.seconds()))
        command: Command = args.run
        args.loaded_config = config
        await command(args, store)
        sys.stdout.flush()
    except (CliError, SchemaError, ValueError) as error:
        fail(str(error))
    except (psycopg2.Error, sqlite3.Error) as error:
        fail(f"database error: {_one_line(error)}")
    except BrokenPipeError:
        stdout_closed()
    finally:
        await engine.close()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def stdout_closed() -> NoReturn:
    """Standard output's reader has gone: stop quietly with :data:`STDOUT_CLOSED`."""
    # Python flushes stdout again as it exits; point it at /dev/null so that cannot fail too.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    raise SystemExit(STDOUT_CLOSED)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        try:
            _main(argv)  # exits through SystemExit after a database command (react)
        finally:
            sys.stdout.flush()  # here, not at exit, where a closed pipe is a traceback
    except BrokenPipeError:
        stdout_closed()


def _main(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    configless = getattr(args, "run_configless", None)
    if configless is not None:  # commands that need neither a config file nor a database
        configless(args)
        return
    try:
        config = load_config(args.config or default_config_path())
    except ConfigError as error:
        fail(str(error))
    try:
        act_as_data_dir_owner(config.server.data_dir)
    except OSError as error:
        fail(f"cannot switch to the owner of {config.server.data_dir}: {error.strerror or error}")
    offline = getattr(args, "run_offline", None)
    if offline is not None:  # commands that need no database
        offline(args, config)
        return
    try:
        create_data_dir_for(config.database.url, config.server.data_dir)
    except OSError as error:
        fail(f"cannot create {config.server.data_dir}: {error.strerror or error}")
    react(lambda reactor: run_command(as_relay_reactor(reactor), args, config))
