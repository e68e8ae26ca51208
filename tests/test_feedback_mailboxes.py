"""[[feedback.mailboxes]]: the IMAP4 and POP3 readers against a real, private Dovecot.

Each test starts its own Dovecot (tests/support/dovecot.py) on free loopback ports: plain
ports with STARTTLS/STLS and implicit-TLS ports, a self-signed certificate that the reader
verifies through the mailbox's ``ca_file``. Messages are put in the Maildir as an MDA does.
``process`` is a recording function that marks the report processed, as the feedback
processor does; it also checks that the report was committed and that the message was still
on the server when it was called (deleted or flagged only after).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from smartrelay.config import FeedbackMailbox, parse_config
from smartrelay.feedback.mailboxes import (
    MAX_MESSAGE_SIZE,
    Intake,
    MailboxError,
    MailboxService,
    ReaderTunables,
    envelope_of,
    mailbox_identity,
    make_reader,
    malformed_reason,
    report_id_for,
)
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.migrations import migrate
from smartrelay.storage.store import FEEDBACK_CHANNEL, NewFeedback, Store
from tests.conftest import real_reactor, service_missing
from tests.support.dovecot import PASSWORD, Dovecot, DovecotUnavailable, running_dovecot
from tests.support.relay import InProcessRelay

FAST = ReaderTunables(timeout=8.0, first_retry=0.2, max_retry=1.0, max_idle=600.0)
#: Answers that would take ten minutes: a test that waits on one fails long before.
PATIENT = ReaderTunables(timeout=600.0, first_retry=0.2, max_retry=1.0, max_idle=600.0)
WAIT = 60.0  # seconds a test waits for something that takes well under one on an idle machine


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    try:
        with running_dovecot() as server:
            yield server
    except DovecotUnavailable as e:
        service_missing(str(e))


@asynccontextmanager
async def opened_sqlite(path: Path) -> AsyncIterator[Store]:
    engine = create_engine(real_reactor(), f"sqlite:{path}")
    await engine.start()
    try:
        await migrate(engine, 0)
        yield Store(engine, real_reactor())
    finally:
        await engine.close()


@pytest_twisted.async_yield_fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    async with opened_sqlite(tmp_path / "relay.db") as store:
        yield store


async def rows(store: Store, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute(sql, args)
        return cursor.fetchall()

    return await store.run("test_rows", txn, readonly=True)


async def sleep(seconds: float) -> None:
    await deferLater(real_reactor(), seconds, lambda: None)


async def wait_for(check: Callable[[], Any], what: str, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await sleep(0.05)


class LogLines:
    """The relay's log lines while :meth:`recording`; errors logged are never expected."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.errors: list[str] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            text = formatEvent(event)
            self.lines.append(text)
            if event.get("isError") or "log_failure" in event:
                self.errors.append(text)

        globalLogPublisher.addObserver(observe)
        try:
            yield
        finally:
            globalLogPublisher.removeObserver(observe)


@pytest.fixture(autouse=True)
def no_errors_logged() -> Iterator[None]:
    """No traceback, unhandled error or failure is logged during a test."""
    lines = LogLines()
    with lines.recording():
        yield
    assert lines.errors == []


class Processor:
    """A real recording ``process``: checks what it is given, and marks the report
    processed (as the feedback processor's commit does)."""

    def __init__(self, store: Store | Callable[[], Deferred[Store]], dovecot: Dovecot) -> None:
        self._store = store
        self.dovecot = dovecot
        self.calls: list[str] = []
        self.on_call: Callable[[int], object] | None = None
        self.problems: list[str] = []

    async def __call__(self, report_id: str) -> None:
        store = self._store if isinstance(self._store, Store) else await self._store()
        found = await rows(
            store, "SELECT state FROM feedback_reports WHERE report_id = ?", report_id
        )
        if found != [("new",)]:
            self.problems.append(f"{report_id}: state {found} when processed")
        if not self.dovecot.messages():
            self.problems.append(f"{report_id}: no message on the server when processed")
        self.calls.append(report_id)

        async def txn(cursor: ICursor) -> None:
            await cursor.execute(
                "UPDATE feedback_reports SET state = 'processed' WHERE report_id = ?",
                (report_id,),
            )

        await store.run("test_processed", txn)
        if self.on_call is not None:
            self.on_call(len(self.calls))


def mailbox(dovecot: Dovecot, scheme: str, **options: Any) -> FeedbackMailbox:
    password = options.pop("password", PASSWORD)
    return FeedbackMailbox(url=dovecot.url(scheme, password), ca_file=dovecot.ca_file, **options)


def start(
    box: FeedbackMailbox, store: Store, process: Processor, tunables: ReaderTunables = FAST
) -> MailboxService:
    reactor = real_reactor()
    ready = store_ready(store)
    service = MailboxService(
        make_reader(box, reactor, ready, process, tunables), reactor, box.interval, tunables
    )
    service.startService()
    return service


def store_ready(store: Store) -> Callable[[], Any]:
    from twisted.internet.defer import succeed

    return lambda: succeed(store)


def bounce(n: int, to: str = "bounces@example.net") -> bytes:
    return (
        f"Return-Path: <>\r\n"
        f"Delivered-To: b+TOKEN{n}@bounces.example.net\r\n"
        f"X-Original-To: b+TOKEN{n}@bounces.example.net\r\n"
        f"To: {to}\r\n"
        f"From: MAILER-DAEMON@mx.example.org\r\n"
        f"Subject: Undelivered Mail Returned to Sender {n}\r\n"
        f"Message-ID: <bounce-{n}@mx.example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n"
        "--B\r\n\r\nThe mail system: user unknown\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.org\r\n\r\n"
        f"Final-Recipient: rfc822; user{n}@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "--B--\r\n"
    ).encode()


async def stop(service: MailboxService) -> None:
    await service.stopService()


SCHEMES = ["imap", "imaps", "pop3", "pop3s"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest_twisted.ensureDeferred
async def test_messages_are_stored_processed_then_deleted(
    dovecot: Dovecot, sqlite_store: Store, scheme: str
) -> None:
    for n in range(3):
        dovecot.deliver(bounce(n))
    process = Processor(sqlite_store, dovecot)
    box = mailbox(dovecot, scheme, interval=0.5)
    service = start(box, sqlite_store, process)
    try:
        await wait_for(lambda: len(process.calls) == 3, "3 reports processed")
        await wait_for(lambda: not dovecot.messages(), "the messages deleted")
        passes = service.reader.passes
        await wait_for(lambda: service.reader.passes >= passes + 2, "more passes")
    finally:
        await stop(service)
    assert process.problems == []
    assert service.failures == 0
    assert len(process.calls) == 3
    # Logged in over TLS, also on the plain ports (STARTTLS, STLS).
    log = (dovecot.directory / "dovecot.log").read_text()
    login = re.search(rf"{scheme[:4]}-login: Info: Login: user=<alice>, method=(\w+), .*", log)
    assert login is not None and "TLS" in login[0], log
    assert scheme.startswith("pop3") or login[1] == "PLAIN"
    identity = mailbox_identity(box)
    assert PASSWORD not in identity
    stored = await rows(
        sqlite_store,
        "SELECT report_id, sender, recipients, state, raw FROM feedback_reports"
        " ORDER BY received_at, report_id",
    )
    assert len(stored) == 3
    assert sorted(process.calls) == sorted(r[0] for r in stored)
    assert len(set(process.calls)) == 3
    raws = {bytes(r[4]) for r in stored}
    assert raws == {bounce(n) for n in range(3)}
    for report_id, sender, recipients, state, raw in stored:
        assert re.fullmatch(r"M[0-9a-f]{31}", report_id)
        assert sender == ""  # Return-Path: <>
        n = int(re.search(rb"Returned to Sender (\d)", bytes(raw))[1])  # type: ignore[index]
        assert recipients == (f'["b+TOKEN{n}@bounces.example.net", "bounces@example.net"]')
        assert state == "processed"


@pytest.mark.parametrize("scheme", ["imap", "pop3s"])
@pytest_twisted.ensureDeferred
async def test_kept_messages_are_flagged_and_never_taken_twice(
    dovecot: Dovecot, sqlite_store: Store, scheme: str
) -> None:
    for n in range(2):
        dovecot.deliver(bounce(n))
    process = Processor(sqlite_store, dovecot)
    box = mailbox(dovecot, scheme, interval=0.2, delete_after_processing=False)
    service = start(box, sqlite_store, process)
    try:
        await wait_for(lambda: len(process.calls) == 2, "2 reports processed")
        passes = service.reader.passes
        await wait_for(lambda: service.reader.passes >= passes + 3, "more passes")
        dovecot.deliver(bounce(2))
        await wait_for(lambda: len(process.calls) == 3, "the third report processed")
        passes = service.reader.passes
        await wait_for(lambda: service.reader.passes >= passes + 3, "more passes")
    finally:
        await stop(service)
    assert process.problems == []
    assert len(set(process.calls)) == 3  # once each, whatever the number of sessions
    files = dovecot.messages()
    assert len(files) == 3
    if scheme.startswith("imap"):
        # Maildir keeps the flags in the file name: ':2,S' is \Seen.
        assert all(re.search(r":2,[A-Z]*S", f.name) for f in files), files
    done = await rows(sqlite_store, "SELECT uid, report_id FROM mailbox_messages")
    assert len(done) == 3
    assert {r[1] for r in done} == set(process.calls)


@pytest.mark.parametrize("scheme", ["imaps", "pop3"])
@pytest_twisted.ensureDeferred
async def test_a_reader_stopped_mid_way_stores_and_processes_nothing_twice(
    dovecot: Dovecot, sqlite_store: Store, scheme: str
) -> None:
    for n in range(5):
        dovecot.deliver(bounce(n))
    process = Processor(sqlite_store, dovecot)
    box = mailbox(dovecot, scheme, interval=0.2)
    service = start(box, sqlite_store, process)
    stopping: list[Any] = []
    # Stop the relay's reader while the second report is being processed: it is stored and
    # processed, but its message is neither deleted nor remembered as done.
    process.on_call = lambda n: stopping.append(service.stopService()) if n == 2 else None
    await wait_for(lambda: stopping, "the reader told to stop")
    await stopping[0]
    assert len(process.calls) == 2
    assert len(dovecot.messages()) >= 3
    process.on_call = None
    again = start(box, sqlite_store, process)  # a restart: a new reader, the same database
    try:
        await wait_for(lambda: len(set(process.calls)) == 5, "every report processed")
        await wait_for(lambda: not dovecot.messages(), "every message deleted")
        passes = again.reader.passes
        await wait_for(lambda: again.reader.passes >= passes + 2, "more passes")
    finally:
        await stop(again)
    assert process.problems == []
    assert sorted(Counter(process.calls).values()) == [1] * 5
    stored = await rows(sqlite_store, "SELECT report_id FROM feedback_reports")
    assert len(stored) == 5


@pytest.mark.parametrize("scheme", ["imap", "pop3s"])
@pytest_twisted.ensureDeferred
async def test_a_dovecot_restart_is_survived(
    dovecot: Dovecot, sqlite_store: Store, scheme: str
) -> None:
    dovecot.deliver(bounce(0))
    process = Processor(sqlite_store, dovecot)
    box = mailbox(dovecot, scheme, interval=0.3)
    service = start(box, sqlite_store, process)
    try:
        await wait_for(lambda: len(process.calls) == 1, "the first report processed")
        dovecot.stop()  # while the reader is connected (IMAP IDLE) or between polls (POP3)
        await wait_for(lambda: service.failures >= 2, "failed sessions while it is down")
        dovecot.deliver(bounce(1))
        dovecot.start()
        await wait_for(lambda: len(process.calls) == 2, "the report sent while it was down")
        await wait_for(lambda: not dovecot.messages(), "the messages deleted")
        assert service.running
    finally:
        await stop(service)
    assert process.problems == []
    assert len(set(process.calls)) == 2


@pytest.mark.parametrize("scheme", ["imaps", "pop3"])
@pytest_twisted.ensureDeferred
async def test_a_bad_password_is_logged_and_retried_without_the_password(
    dovecot: Dovecot, sqlite_store: Store, scheme: str
) -> None:
    dovecot.deliver(bounce(0))
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        lines.append(formatEvent(event))

    process = Processor(sqlite_store, dovecot)
    wrong = "wrong-Pa55word"
    box = mailbox(dovecot, scheme, interval=0.2, password=wrong)
    globalLogPublisher.addObserver(observe)
    try:
        service = start(box, sqlite_store, process)
        try:
            await wait_for(lambda: service.failures >= 3, "three failed logins")
            assert service.running
        finally:
            await stop(service)
    finally:
        globalLogPublisher.removeObserver(observe)
    failures = [line for line in lines if "trying again" in line]
    assert len(failures) >= 3
    label = mailbox_identity(box)
    for line in failures:
        assert line.startswith(f"mailbox {label}: login refused for user 'alice': "), line
        assert "Authentication failed" in line and "b'" not in line, line
        assert "\n" not in line
    assert not [line for line in lines if wrong in line or PASSWORD in line]
    # Backoff: the wait doubles after each failure in a row (0.2, 0.4, 0.8, then 1 s at most).
    waits = [re.search(r"trying again in ([0-9.]+) s", line)[1] for line in failures]  # type: ignore[index]
    assert waits[:3] == ["0.2", "0.4", "0.8"]
    assert process.calls == []
    assert len(dovecot.messages()) == 1


@pytest_twisted.ensureDeferred
async def test_idle_notices_a_new_message_without_waiting_for_the_interval(
    dovecot: Dovecot, sqlite_store: Store
) -> None:
    dovecot.deliver(bounce(0))
    process = Processor(sqlite_store, dovecot)
    box = mailbox(dovecot, "imaps", interval=600.0)
    service = start(box, sqlite_store, process)
    try:
        await wait_for(lambda: len(process.calls) == 1, "the first report processed")
        await sleep(1.0)  # the reader is in IDLE by now
        delivered = time.monotonic()
        dovecot.deliver(bounce(1))
        await wait_for(lambda: len(process.calls) == 2, "the new message", within=60.0)
        took = time.monotonic() - delivered
        await wait_for(lambda: service.reader.passes >= 2, "the pass to end")
        assert service.sessions == 0  # still the first session: no poll happened
        assert service.reader.passes == 2  # the first look, and the one IDLE woke
    finally:
        await stop(service)
    assert took < 60.0 < box.interval
    assert process.problems == []


@pytest.mark.parametrize("scheme", ["imap", "pop3"])
@pytest_twisted.ensureDeferred
async def test_a_huge_message_is_ignored_without_being_downloaded(
    dovecot: Dovecot, sqlite_store: Store, scheme: str
) -> None:
    header = bounce(7).split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    line = b"x" * 998 + b"\r\n"
    body = line * (MAX_MESSAGE_SIZE // len(line) + 1000)
    dovecot.deliver(header + body)
    dovecot.deliver(bounce(1))
    process = Processor(sqlite_store, dovecot)
    box = mailbox(dovecot, scheme, interval=0.3)
    service = start(box, sqlite_store, process)
    try:
        await wait_for(lambda: not dovecot.messages(), "both messages taken and deleted")
    finally:
        await stop(service)
    assert process.problems == []
    assert len(process.calls) == 1  # the small one; the huge one is not processed
    ignored = await rows(
        sqlite_store,
        "SELECT report_id, state, reason, raw, recipients FROM feedback_reports"
        " WHERE state = 'ignored'",
    )
    assert len(ignored) == 1
    report_id, _state, reason, raw, recipients = ignored[0]
    assert report_id not in process.calls
    assert reason.startswith(f"message too big: {len(header) + len(body)} bytes")
    assert bytes(raw) == header  # only the header was fetched
    assert "b+TOKEN7@bounces.example.net" in recipients
    # Dovecot's own count of what it sent (its logout line): far less than the huge message.
    log_file = dovecot.directory / "dovecot.log"
    pattern = r" out=(\d+)" if scheme == "imap" else r"retr=\d+/(\d+)"
    await wait_for(lambda: re.search(pattern, log_file.read_text()), "Dovecot's logout line")
    sent = [int(m) for m in re.findall(pattern, log_file.read_text())]
    assert sent and max(sent) < 1_000_000, sent


@pytest_twisted.ensureDeferred
async def test_a_malformed_message_is_kept_as_ignored(
    dovecot: Dovecot, sqlite_store: Store
) -> None:
    dovecot.deliver(b"this is no header at all\r\njust text\r\n")
    process = Processor(sqlite_store, dovecot)
    service = start(mailbox(dovecot, "pop3s", interval=0.3), sqlite_store, process)
    try:
        await wait_for(lambda: not dovecot.messages(), "the message taken and deleted")
    finally:
        await stop(service)
    assert process.calls == []
    ignored = await rows(sqlite_store, "SELECT state, reason FROM feedback_reports")
    assert ignored == [("ignored", "malformed message: does not begin with a header field")]


@pytest.mark.parametrize("scheme", ["imaps", "pop3"])
@pytest_twisted.ensureDeferred
async def test_an_untrusted_certificate_is_refused(
    dovecot: Dovecot, sqlite_store: Store, scheme: str
) -> None:
    """Without the test CA (``ca_file``), the self-signed certificate fails verification:
    the reader never logs in (and never sends the password)."""
    dovecot.deliver(bounce(0))
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        lines.append(formatEvent(event))

    process = Processor(sqlite_store, dovecot)
    box = FeedbackMailbox(url=dovecot.url(scheme), interval=0.2)
    globalLogPublisher.addObserver(observe)
    try:
        service = start(box, sqlite_store, process)
        try:
            await wait_for(lambda: service.failures >= 2, "failed sessions")
        finally:
            await stop(service)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert process.calls == []
    label = mailbox_identity(box)
    assert f"mailbox {label}: TLS error: certificate verify failed; trying again in 0.2 s" in lines
    assert "Logged in" not in (dovecot.directory / "dovecot.log").read_text()


def test_report_ids_depend_on_the_mailbox_and_uid_only() -> None:
    a = FeedbackMailbox(url="imaps://u:one@Mail.Example.com/INBOX")
    b = FeedbackMailbox(url="imaps://u:two@mail.example.com:993/INBOX")
    c = FeedbackMailbox(url="imaps://u:one@mail.example.com/Bounces")
    assert mailbox_identity(a) == mailbox_identity(b) == "imaps://u@mail.example.com:993/INBOX"
    assert mailbox_identity(c) != mailbox_identity(a)
    assert report_id_for(mailbox_identity(a), "7:1") == report_id_for(mailbox_identity(b), "7:1")
    assert report_id_for(mailbox_identity(a), "7:1") != report_id_for(mailbox_identity(a), "8:1")
    pop = FeedbackMailbox(url="pop3://u:x@mail.example.com/ignored")
    assert mailbox_identity(pop) == "pop3://u@mail.example.com:110"


def relay_with_mailboxes(
    tmp_path: Path,
    boxes: list[dict[str, Any]],
    process: Processor | None,
    tunables: ReaderTunables = FAST,
) -> InProcessRelay:
    config = parse_config(
        {
            "server": {"hostname": "relay.test", "data_dir": str(tmp_path / "var")},
            "database": {"url": f"sqlite:{tmp_path / 'relay.db'}"},
            "smtp": {"listen": []},
            "inbound": {"listen": [], "return_path_domain": "bounces.relay.test"},
            "rewrap": {"secret_file": str(tmp_path / "secret.key")},
            "web": {"listen": "tcp:0:interface=127.0.0.1"},
            "delivery": {"routes": {"*": "smtp://127.0.0.1:9"}},
            "feedback": {"mailboxes": boxes},
        },
        str(tmp_path / "smartrelay.toml"),
    )
    return InProcessRelay(
        config, real_reactor(), mailbox_tunables=tunables, process_feedback=process
    )


@pytest.mark.parametrize("scheme", ["imaps", "pop3"])
@pytest_twisted.ensureDeferred
async def test_the_relay_reads_its_mailbox_and_a_restart_reprocesses_nothing(
    dovecot: Dovecot, tmp_path: Path, scheme: str
) -> None:
    for n in range(3):
        dovecot.deliver(bounce(n))
    boxes: list[dict[str, Any]] = [
        {"url": dovecot.url(scheme), "interval": "1s", "ca_file": dovecot.ca_file}
    ]
    relays: list[InProcessRelay] = []
    process = Processor(lambda: relays[-1].storage.when_ready(), dovecot)
    try:
        # Answers awaited ten minutes: a stop must not wait for one (a QUIT sent on the
        # connection the stop dropped did, for the whole timeout).
        relays.append(relay_with_mailboxes(tmp_path, boxes, process, PATIENT))
        relays[-1].startService()
        assert len(relays[-1].mailboxes) == 1
        # Stopped (as by SIGTERM) while the second report is processed.
        stopped: list[None] = []
        readers_running: list[bool] = []

        def stop_on_the_second(n: int) -> None:
            if n == 2:
                relays[-1].stopService().addCallback(stopped.append)
                # Stopped first, at once: no other message is taken meanwhile.
                readers_running.extend(bool(box.running) for box in relays[-1].mailboxes)

        process.on_call = stop_on_the_second
        await wait_for(lambda: stopped, "the relay stopped", within=30)  # the database closed
        assert readers_running == [False]
        assert len(process.calls) == 2
        process.on_call = None
        dovecot.deliver(bounce(3))
        relays.append(relay_with_mailboxes(tmp_path, boxes, process))
        relays[-1].startService()
        await wait_for(lambda: not dovecot.messages(), "every message deleted")
        await wait_for(lambda: len(process.calls) >= 4, "every report processed")
        passes = relays[-1].mailboxes[0].reader.passes
        await wait_for(lambda: relays[-1].mailboxes[0].reader.passes > passes, "another pass")
    finally:
        for relay in relays:
            if relay.running:
                await relay.stopService()
    assert [relay.failed_reason for relay in relays] == [None, None]
    assert process.problems == []
    assert sorted(Counter(process.calls).values()) == [1] * 4
    async with opened_sqlite(tmp_path / "relay.db") as store:
        reports = await rows(store, "SELECT report_id, state FROM feedback_reports")
    assert sorted(reports) == sorted((report_id, "processed") for report_id in process.calls)


def test_a_delivery_process_reads_no_mailbox(tmp_path: Path) -> None:
    config = parse_config(
        {
            "database": {"url": f"sqlite:{tmp_path / 'relay.db'}"},
            "feedback": {"mailboxes": [{"url": "imaps://u:p@imap.example.com"}]},
        }
    )
    assert len(InProcessRelay(config, real_reactor()).mailboxes) == 1
    assert InProcessRelay(config, real_reactor(), role="delivery").mailboxes == []


@pytest_twisted.ensureDeferred
async def test_mailbox_store_on_both_engines(store: Store) -> None:
    imap, pop = "imaps://u@h:993/INBOX", "pop3://u@h:110"
    assert await store.mailbox_done(imap, ["1:1", "1:2"]) == set()
    await store.mark_mailbox_done(imap, "1:1", "Ma")
    await store.mark_mailbox_done(imap, "1:1", "Ma")  # a second time: no error
    await store.mark_mailbox_done(imap, "1:2", "Mb")
    await store.mark_mailbox_done(pop, "1:1", "Mc")
    many = [f"1:{n}" for n in range(1, 1300)]  # more than one statement's worth
    assert await store.mailbox_done(imap, many) == {"1:1", "1:2"}
    assert await store.forget_mailbox_messages(imap, ["1:2", "1:3"]) == 1
    assert await store.mailbox_done(imap, many) == {"1:2"}
    assert await store.mailbox_done(pop, many) == {"1:1"}  # another mailbox's rows stay
    assert await store.forget_mailbox_messages(imap, []) == 1
    assert await store.mailbox_done(imap, many) == set()

    assert await store.feedback_report_state("Mx") is None
    report_id = await store.store_ignored_feedback(
        NewFeedback("", ("b+T@bounces.example.net",), b"Subject: x\r\n\r\n", report_id="Mx"),
        "message too big: 30000000 bytes",
    )
    assert report_id == "Mx"
    assert await store.feedback_report_state("Mx") == "ignored"
    found = await rows(
        store,
        "SELECT state, reason, processed_at IS NOT NULL, recipients, raw FROM feedback_reports",
    )
    assert [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in found] == [
        ("ignored", "message too big: 30000000 bytes", True, '["b+T@bounces.example.net"]',
         b"Subject: x\r\n\r\n")
    ]  # fmt: skip
    with pytest.raises(Exception):  # noqa: B017 - the engine's own duplicate key error
        await store.store_ignored_feedback(NewFeedback("", (), b"", report_id="Mx"), "again")


def test_envelope_of_a_fetched_message() -> None:
    raw = (
        b"Return-Path: <MAILER-DAEMON@mx.example.org>\r\n"
        b"Delivered-To: b+TOKEN@bounces.example.net\r\n"
        b"X-Original-To: b+TOKEN@bounces.example.net\r\n"
        b"To: Bounces <bounces@example.net>, other@example.net\r\n"
        b"\r\nTo: not-a-header@example.net\r\n"
    )
    assert envelope_of(raw) == (
        "MAILER-DAEMON@mx.example.org",
        ("b+TOKEN@bounces.example.net", "bounces@example.net", "other@example.net"),
    )
    assert envelope_of(b"Subject: no addresses\n\nbody") == ("", ())
    assert envelope_of(b"") == ("", ())
    assert envelope_of(b"\xff\xfe: \x00\r\nTo: =?bad?=\r\n\r\n") == ("", ())


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"Subject: x\r\n\r\nbody", None),
        (b"Subject: no body", None),
        (b"From nobody Mon Jan 1\nSubject: mbox\n\n", "does not begin with a header field"),
        (b"", "empty"),
        (b"\r\n \r\n", "empty"),
        (b"Subject: x\r\n\r\n\x00", "contains NUL bytes"),
        (b"\r\nSubject: after an empty line\r\n", "does not begin with a header field"),
    ],
)
def test_malformed_messages(raw: bytes, reason: str | None) -> None:
    expected = None if reason is None else f"malformed message: {reason}"
    assert malformed_reason(raw) == expected


@pytest.fixture
def dovecot_without_tls() -> Iterator[Dovecot]:
    try:
        with running_dovecot(tls=False) as server:
            yield server
    except DovecotUnavailable as e:
        service_missing(str(e))


@pytest.mark.parametrize("scheme", ["imap", "pop3"])
@pytest_twisted.ensureDeferred
async def test_a_server_without_tls_is_read_with_a_warning(
    dovecot_without_tls: Dovecot, sqlite_store: Store, scheme: str
) -> None:
    dovecot = dovecot_without_tls
    dovecot.deliver(bounce(0))
    lines = LogLines()
    process = Processor(sqlite_store, dovecot)
    box = FeedbackMailbox(url=dovecot.url(scheme), interval=0.3)
    with lines.recording():
        service = start(box, sqlite_store, process)
        try:
            await wait_for(lambda: not dovecot.messages(), "the message taken and deleted")
        finally:
            await stop(service)
    assert len(process.calls) == 1
    starttls = "STARTTLS" if scheme == "imap" else "STLS"
    warning = (
        f"mailbox {mailbox_identity(box)}: the server offers no {starttls}: logging in without TLS"
    )
    assert warning in lines.lines


@pytest_twisted.ensureDeferred
async def test_a_silent_server_is_given_up_on_and_retried(sqlite_store: Store) -> None:
    """A server that accepts the connection and never answers: the session fails after the
    timeout (one line), and is tried again."""
    from twisted.internet.protocol import Protocol, ServerFactory

    accepted: list[Protocol] = []

    class Silent(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)

    factory: ServerFactory = ServerFactory()
    factory.protocol = Silent
    port = real_reactor().listenTCP(0, factory, interface="127.0.0.1")
    lines = LogLines()
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    box = FeedbackMailbox(url=f"imap://u:p@127.0.0.1:{address.port}", interval=0.2)
    tunables = ReaderTunables(timeout=0.5, first_retry=0.2, max_retry=1.0)
    reactor = real_reactor()
    intake_ready = store_ready(sqlite_store)

    async def never(report_id: str) -> None:
        raise AssertionError("nothing to process")

    service = MailboxService(
        make_reader(box, reactor, intake_ready, never, tunables), reactor, 0.2, tunables
    )
    try:
        with lines.recording():
            service.startService()
            try:
                await wait_for(lambda: service.failures >= 2, "two sessions given up on")
            finally:
                await stop(service)
    finally:
        await maybeDeferred(port.stopListening)
        for protocol in accepted:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
    assert len(accepted) >= 2
    expected = (
        f"mailbox {mailbox_identity(box)}: no answer from the server to the connection"
        " (greeting) in 0.5 s; trying again in 0.2 s"
    )
    assert expected in lines.lines


@pytest.fixture
def dovecot_with_apop() -> Iterator[Dovecot]:
    try:
        with running_dovecot(apop=True) as server:
            yield server
    except DovecotUnavailable as e:
        service_missing(str(e))


@pytest.mark.parametrize("scheme", ["pop3", "pop3s"])
@pytest_twisted.ensureDeferred
async def test_pop3_logs_in_with_apop_when_the_greeting_offers_it(
    dovecot_with_apop: Dovecot, sqlite_store: Store, scheme: str
) -> None:
    dovecot = dovecot_with_apop
    dovecot.deliver(bounce(0))
    process = Processor(sqlite_store, dovecot)
    service = start(mailbox(dovecot, scheme, interval=0.3), sqlite_store, process)
    try:
        await wait_for(lambda: not dovecot.messages(), "the message taken and deleted")
    finally:
        await stop(service)
    assert len(process.calls) == 1
    log = (dovecot.directory / "dovecot.log").read_text()
    assert re.search(r"pop3-login: Info: Login: user=<alice>, method=APOP, .*TLS", log), log


def test_an_imap_literal_bigger_than_any_message_drops_the_connection() -> None:
    """A broken or hostile server announcing a literal larger than any message we ask for
    (25 MB plus a margin) is cut off before it sends it, not buffered."""
    from twisted.internet.testing import StringTransport

    from smartrelay.feedback.mailboxes.imap import _ImapClient

    for octets, aborted in ((MAX_MESSAGE_SIZE, False), (MAX_MESSAGE_SIZE + (2 << 20), True)):
        client = _ImapClient(None)
        transport = StringTransport()
        client.makeConnection(transport)  # type: ignore[no-untyped-call]
        client.dataReceived(b"* OK ready\r\n")  # type: ignore[no-untyped-call]
        client.dataReceived(b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % octets)  # type: ignore[no-untyped-call]
        assert transport.disconnecting is aborted


def test_a_pop3_answer_past_its_limit_drops_the_connection() -> None:
    from twisted.internet.testing import StringTransport

    from smartrelay.feedback.mailboxes.pop3 import _Collector, _Pop3Client

    client = _Pop3Client()
    transport = StringTransport()
    client.makeConnection(transport)  # type: ignore[no-untyped-call]
    collector = _Collector(client, limit=1000)
    for _ in range(9):
        collector(b"x" * 98)  # 100 bytes with CRLF
    assert not transport.disconnecting
    assert collector.message() == (b"x" * 98 + b"\r\n") * 9
    collector(b"x" * 98)
    collector(b"y" * 98)
    assert transport.disconnecting
    assert b"y" not in collector.message()


def test_a_command_after_the_connection_is_lost_fails_at_once() -> None:
    """Neither client sends a command on a closed connection to wait out the answer timeout
    (120 s by default): stop() drops the connection between two commands (a QUIT followed),
    so does a server going away while a report is processed (a DELE or UID STORE follows)."""
    from twisted.internet.error import ConnectionLost
    from twisted.internet.testing import StringTransport

    from smartrelay.feedback.mailboxes.imap import _ImapClient
    from smartrelay.feedback.mailboxes.pop3 import _Pop3Client
    from smartrelay.feedback.mailboxes.session import describe

    pop3 = _Pop3Client()
    pop3.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    pop3.dataReceived(b"+OK ready\r\n")  # type: ignore[no-untyped-call]
    pop3.connectionLost(Failure(ConnectionLost()))
    imap = _ImapClient(None)
    imap.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    imap.dataReceived(b"* OK ready\r\n")  # type: ignore[no-untyped-call]
    imap.connectionLost(Failure(ConnectionLost()))
    for command in (
        lambda: pop3.quit(),  # type: ignore[no-untyped-call]
        lambda: pop3.delete(0),  # type: ignore[no-untyped-call]
        lambda: pop3.retrieve(0, lambda line: None),  # type: ignore[no-untyped-call]
        lambda: imap.logout(),  # type: ignore[no-untyped-call]
        lambda: imap.uid_expunge(1),
    ):
        failures: list[Failure] = []
        command().addErrback(failures.append)
        assert len(failures) == 1
        assert isinstance(failures[0].value, MailboxError), failures[0]
        assert describe(failures[0]) == "the connection was closed before the command was sent"


@pytest_twisted.ensureDeferred
async def test_a_reader_stores_without_waking_the_feedback_service(store: Store) -> None:
    """A mailbox reader processes what it stores itself: its store notifies nobody (the
    feedback service's pass would take the report up as well); the inbound listener's does.
    PostgreSQL delivers notifications in commit order: once the second store's has come, the
    first's would have."""
    woken: list[None] = []
    await store.engine.listen(FEEDBACK_CHANNEL, lambda: woken.append(None))
    processed: list[str] = []

    async def process(report_id: str) -> None:
        processed.append(report_id)

    intake = Intake("imaps://u@imap.example.com/INBOX", store_ready(store), process)
    await intake.take("1:1", bounce(0))
    assert processed == [intake.report_id("1:1")]
    await store.store_feedback(NewFeedback("", ("b@example.net",), b"received"))
    await wait_for(lambda: woken, "the listener's notification")
    await sleep(0.2)
    assert len(woken) == 1
