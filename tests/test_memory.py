"""Memory bounded by bytes (issue 11, item 7): big bodies spooled to disk while received,
a byte budget for handing them to storage, a byte window in delivery, DATA streamed out.

No test here measures memory (bench/memory.py does, and docs/performance.md has the
figures); they prove the mechanisms: where a big body is while it is received, that its file
is gone in every outcome, what the byte window admits, and that what arrives is byte-identical.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from attrs import define, evolve
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.smtp.protocol import SmtpServerProtocol
from smartrelay.smtp.ratelimit import AuthFailureLimiter
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.session import (
    Admitted,
    Envelope,
    ISmtpBackend,
    ListenerSettings,
    Session,
)
from smartrelay.spool import SPOOL_THRESHOLD, ByteBudget, Spool, SpooledBody
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import NewMessage, Store
from tests.conftest import real_reactor
from tests.support.delivery_relay import (
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    eventually,
    smtp_route,
    submit,
    submit_many,
    wait_for_events,
)
from tests.support.postfix import PostfixSink
from tests.support.relay import HOSTNAME, Relays, RunningRelay

# A body comfortably past the spool threshold, with dot-leading lines to check transparency.
LINE = b"." + b"y" * 76 + b"\r\n"
BIG = 3 * SPOOL_THRESHOLD


def big_body(size: int = BIG, tag: bytes = b"") -> bytes:
    header = b"From: <app@sender.test>\r\nTo: <a@example.net>\r\nSubject: big " + tag + b"\r\n\r\n"
    lines = (size - len(header)) // len(LINE) + 1
    return header + LINE * lines


def stuffed(body: bytes) -> bytes:
    """``body`` as DATA content (RFC 5321 4.5.2), the final dot included."""
    return (b"." + body if body.startswith(b".") else body).replace(b"\r\n.", b"\r\n..") + b".\r\n"


def spool_files(directory: str | Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("body-"))


# -- the protocol over StringTransport, with a real spool directory ------------------------------
SETTINGS = ListenerSettings(
    hostname="relay.test", max_message_size=8 * SPOOL_THRESHOLD, max_recipients=3
)


@implementer(ISmtpBackend)
class SpoolingBackend:
    """Records what the listener hands over; answers from a script (or holds the answer)."""

    offers_auth = False

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.received: list[bytes | SpooledBody] = []
        self.contents: list[bytes] = []
        self.files_seen: list[bool] = []
        self.pending: Deferred[Reply] | None = None
        self.fail = False

    def check_sender(self, session: Session) -> Reply | None:
        return None

    def check_recipient(self, session: Session, address: str) -> Reply | None:
        return None

    def check_credentials(self, name: str, password: str) -> Deferred[bool | Admitted]:
        return succeed(False)

    def deliver(
        self, session: Session, envelope: Envelope, message: bytes | SpooledBody
    ) -> Deferred[Reply]:
        self.received.append(message)
        if isinstance(message, SpooledBody):
            self.files_seen.append(os.path.exists(message.path))
            self.contents.append(message.read())
        else:
            self.contents.append(message)
        if self.fail:
            return fail(OSError("disk full"))
        if self.pending is not None:
            return self.pending
        return succeed(Reply(250, "2.0.0", "Ok: queued as Q1"))


class Client:
    def __init__(self, tmp_path: Path, settings: ListenerSettings = SETTINGS) -> None:
        self.directory = tmp_path / "spool"
        self.spool = Spool(str(self.directory))
        self.spool.prepare()
        self.backend = SpoolingBackend(self.spool)
        self.clock = Clock()
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 4321))
        self.protocol = SmtpServerProtocol(
            settings, self.backend, self.clock, None, AuthFailureLimiter(self.clock)
        )
        self.protocol.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        self.transport.clear()

    def send(self, data: bytes) -> list[str]:
        self.transport.clear()
        self.protocol.dataReceived(data)
        written: bytes = self.transport.value()
        return written.decode().splitlines()

    def start_data(self) -> None:
        assert self.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.net>\r\n")
        assert self.send(b"DATA\r\n") == ["354 End data with <CR><LF>.<CR><LF>"]

    def send_in_pieces(self, data: bytes, piece: int = 65536) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(data), piece):
            replies += self.send(data[start : start + piece])
        return replies

    def files(self) -> list[str]:
        return spool_files(self.directory)


def test_small_body_stays_in_memory(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.start_data()
    body = big_body(SPOOL_THRESHOLD // 2)
    assert client.send_in_pieces(stuffed(body)) == ["250 2.0.0 Ok: queued as Q1"]
    assert client.backend.received == [body]  # bytes: the fast path
    assert client.files() == []


def test_big_body_is_spooled_while_received_and_removed_after_the_reply(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.start_data()
    body = big_body()
    data = stuffed(body)
    assert client.send_in_pieces(data[: len(data) // 2]) == []
    # Past the threshold: the body is in one file, and memory holds no more than a piece.
    [name] = client.files()
    assert client.protocol._body is not None and client.protocol._body.buffered == 0
    assert os.path.getsize(client.directory / name) > SPOOL_THRESHOLD
    client.backend.pending = Deferred()
    assert client.send_in_pieces(data[len(data) // 2 :]) == []
    [handed] = client.backend.received
    assert isinstance(handed, SpooledBody) and handed.size == len(body)
    assert client.backend.contents == [body]  # de-dot-stuffed, byte for byte
    assert client.files() == [name]  # the file stays while storage has it...
    client.backend.pending.callback(Reply(250, "2.0.0", "Ok: queued as Q1"))
    assert client.transport.value() == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert client.files() == []  # ...and is gone once storage has answered


def test_spool_file_removed_when_storage_fails(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.backend.fail = True
    client.start_data()
    replies = client.send_in_pieces(stuffed(big_body()))
    assert replies == ["451 4.3.0 Temporary storage failure, try again later"]
    assert client.backend.files_seen == [True]
    assert client.files() == []


def test_spool_file_removed_when_the_message_gets_too_big(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.start_data()
    data = stuffed(big_body(10 * SPOOL_THRESHOLD))
    cut = 5 * SPOOL_THRESHOLD
    assert client.send_in_pieces(data[:cut]) == []
    assert len(client.files()) == 1
    assert client.send_in_pieces(data[cut : 9 * SPOOL_THRESHOLD]) == []
    assert client.files() == []  # past max_message_size: dropped at once, not at the dot
    replies = client.send_in_pieces(data[9 * SPOOL_THRESHOLD :])
    assert replies == ["552 5.3.4 Message size exceeds the fixed maximum message size"]
    assert client.backend.received == []


def test_spool_file_removed_when_the_body_is_refused(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.start_data()
    body = big_body()
    assert client.send_in_pieces(stuffed(body)[:-3]) == []
    assert len(client.files()) == 1
    assert client.send(b"bad\0line\r\n.\r\n") == ["550 5.6.0 Message contains NUL bytes"]
    assert client.files() == []


def test_spool_file_removed_on_disconnect_during_data(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.start_data()
    client.send_in_pieces(stuffed(big_body())[: 2 * SPOOL_THRESHOLD])
    assert len(client.files()) == 1
    client.protocol.connectionLost()
    assert client.files() == []


def test_spool_file_removed_on_data_timeout(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.start_data()
    client.send_in_pieces(stuffed(big_body())[: 2 * SPOOL_THRESHOLD])
    assert len(client.files()) == 1
    client.transport.clear()
    client.clock.advance(SETTINGS.data_timeout + 1)
    assert client.transport.value().startswith(b"421 4.4.2")
    assert client.files() == []


def test_spool_left_by_a_dead_process_is_removed_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "body-abc123").write_bytes(b"x" * 10)
    (directory / "keep.txt").write_bytes(b"not ours")
    assert Spool(str(directory)).prepare() == 1
    assert sorted(os.listdir(directory)) == ["keep.txt"]


def test_spool_write_failure_answers_a_temporary_error(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.start_data()
    data = stuffed(big_body())
    client.send_in_pieces(data[: 2 * SPOOL_THRESHOLD])
    body = client.protocol._body
    assert body is not None and body._fd is not None
    os.close(body._fd)  # the next write fails, as on a full disk
    body._fd = os.open(os.devnull, os.O_RDONLY)
    replies = client.send_in_pieces(data[2 * SPOOL_THRESHOLD :])
    assert replies == ["451 4.3.0 Temporary storage failure, try again later"]
    assert client.files() == [] and client.backend.received == []


# -- the byte budget ---------------------------------------------------------------------------
def test_byte_budget_admits_within_the_limit_and_one_always() -> None:
    budget = ByteBudget(10)
    first, second = budget.acquire(6), budget.acquire(4)
    assert first.called and second.called and budget.in_use == 10
    third = budget.acquire(1)
    assert not third.called  # over the limit: waits
    huge = budget.acquire(100)
    small = budget.acquire(1)
    budget.release(6)
    assert third.called and not huge.called  # first come, first served
    assert not small.called  # behind the big one, not past it
    budget.release(4)
    budget.release(1)
    assert huge.called and budget.in_use == 100  # alone, bigger than the limit
    assert not small.called
    budget.release(100)
    assert small.called and budget.in_use == 1


# -- end to end: a real relay, real sockets, both engines ----------------------------------------
@pytest_twisted.async_yield_fixture
async def relays(tmp_path: Path, database_url: str) -> AsyncIterator[Relays]:
    runner = Relays(real_reactor(), tmp_path, database_url)
    try:
        yield runner
    finally:
        await runner.stop_all()


def spool_dir(relay: RunningRelay) -> Path:
    return Path(relay.config.server.data_dir) / "spool"


@pytest_twisted.ensureDeferred
async def test_big_message_spooled_then_stored_byte_identical(relays: Relays) -> None:
    from tests.test_smtp_e2e import QUEUED, RawClient, in_thread, raw_of

    relay = await relays.start()
    reactor = real_reactor()
    directory = spool_dir(relay)
    body = big_body(4 * SPOOL_THRESHOLD, b"e2e")
    data = stuffed(body)
    client = await in_thread(lambda: RawClient(relay.smtp_port))
    try:

        def begin() -> None:
            assert client.read().code == 220
            assert client.command("EHLO client.test").code == 250
            assert client.command("MAIL FROM:<app@sender.test>").code == 250
            assert client.command("RCPT TO:<a@example.net>").code == 250
            assert client.command("DATA").code == 354
            client.send(data[: 2 * SPOOL_THRESHOLD])

        await in_thread(begin)

        async def file_there() -> bool | None:
            return True if spool_files(directory) else None

        await eventually(reactor, file_there, "a spool file while DATA is under way")

        def finish() -> str:
            client.send(data[2 * SPOOL_THRESHOLD :])
            return client.read().text

        reply = await in_thread(finish)
    finally:
        client.close()
    match = QUEUED.fullmatch(reply)
    assert match is not None, reply
    assert spool_files(directory) == []
    raw = await raw_of(relay.store, match[1])
    assert raw.startswith(b"Received: from client.test ([127.0.0.1])\r\n")
    assert f"by {HOSTNAME} (SmartRelay)".encode() in raw
    assert raw.endswith(b"\r\n" + body)  # the trace header, then the body byte for byte
    from tests.test_smtp_e2e import select

    [(size,)] = await select(relay.store, "SELECT size FROM messages")
    assert int(size) == len(raw)


@pytest_twisted.ensureDeferred
async def test_spool_file_gone_after_a_client_disconnects_mid_data(relays: Relays) -> None:
    from tests.test_smtp_e2e import RawClient, count, in_thread

    relay = await relays.start()
    reactor = real_reactor()
    directory = spool_dir(relay)
    client = await in_thread(lambda: RawClient(relay.smtp_port))

    def begin() -> None:
        assert client.read().code == 220
        assert client.command("EHLO client.test").code == 250
        assert client.command("MAIL FROM:<app@sender.test>").code == 250
        assert client.command("RCPT TO:<a@example.net>").code == 250
        assert client.command("DATA").code == 354
        client.send(stuffed(big_body())[: 2 * SPOOL_THRESHOLD])

    await in_thread(begin)

    async def file_there() -> bool | None:
        return True if spool_files(directory) else None

    await eventually(reactor, file_there, "a spool file while DATA is under way")
    client.close()

    async def gone() -> bool | None:
        return True if not spool_files(directory) else None

    await eventually(reactor, gone, "the spool file to be removed after the disconnect")
    assert await count(relay.store, "messages") == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_big_feedback_report_spooled_and_stored(relays: Relays) -> None:
    from tests.support.relay import RETURN_PATH_DOMAIN
    from tests.test_smtp_e2e import RawClient, in_thread, select

    relay = await relays.start()
    body = big_body(2 * SPOOL_THRESHOLD, b"bounce")
    client = await in_thread(lambda: RawClient(relay.inbound_port))
    try:

        def talk() -> str:
            assert client.read().code == 220
            assert client.command("EHLO mx.example.net").code == 250
            assert client.command("MAIL FROM:<>").code == 250
            assert client.command(f"RCPT TO:<b+x@{RETURN_PATH_DOMAIN}>").code == 250
            assert client.command("DATA").code == 354
            client.send(stuffed(body))
            return client.read().text

        reply = await in_thread(talk)
    finally:
        client.close()
    assert reply.startswith("250 2.0.0 Ok: queued as R"), reply
    [(raw,)] = await select(relay.store, "SELECT raw FROM feedback_reports")
    assert bytes(raw) == body
    assert spool_files(spool_dir(relay)) == []


# -- delivery: DATA streamed with backpressure ---------------------------------------------------
class PausingTransport(StringTransport):
    """A transport whose buffer holds ``limit`` bytes: past that it pauses its producer, as a
    real socket's does when the peer reads slowly."""

    def __init__(self, limit: int) -> None:
        StringTransport.__init__(self)
        self.limit = limit
        self.aborted = False

    def write(self, data: bytes) -> None:
        StringTransport.write(self, data)
        if len(self.written()) > self.limit and self.producer is not None:
            self.producer.pauseProducing()

    def written(self) -> bytes:
        value: bytes = self.value()  # type: ignore[no-untyped-call]
        return value

    def take(self) -> bytes:
        """What was written so far, emptying the buffer (the peer read it)."""
        value = self.written()
        self.clear()  # type: ignore[no-untyped-call]
        return value

    def abortConnection(self) -> None:
        self.aborted = True


def test_data_is_written_as_the_connection_takes_it() -> None:
    from smartrelay.delivery.client import DATA_PIECE, _DataWriter, dot_stuff, dot_stuffed_pieces

    message = big_body(4 * SPOOL_THRESHOLD)
    transport = PausingTransport(limit=256 * 1024)
    writer = _DataWriter(transport, dot_stuffed_pieces(message), Clock(), 180.0)
    done = writer.start()
    sent = b""
    rounds = 0
    while not done.called:
        # Never more than the buffer's limit and one piece waiting in memory.
        assert len(transport.written()) <= transport.limit + 2 * DATA_PIECE
        sent += transport.take()
        writer.resumeProducing()
        rounds += 1
    sent += transport.take()
    assert rounds >= 10
    assert sent == dot_stuff(message)
    assert transport.producer is None  # unregistered once done


def test_data_writer_gives_up_when_the_server_takes_nothing() -> None:
    from smartrelay.delivery.client import SmtpClientError, _DataWriter, dot_stuffed_pieces

    clock = Clock()
    transport = PausingTransport(limit=128 * 1024)
    writer = _DataWriter(transport, dot_stuffed_pieces(big_body()), clock, 180.0)
    done = writer.start()
    errors: list[BaseException] = []

    def failed(failure: Failure) -> None:
        assert failure.value is not None
        errors.append(failure.value)

    done.addErrback(failed)
    clock.advance(179)
    assert not done.called and not transport.aborted
    clock.advance(2)
    assert transport.aborted
    assert len(errors) == 1 and isinstance(errors[0], SmtpClientError)


def test_dot_stuffing_in_pieces_is_the_same_as_whole() -> None:
    from smartrelay.delivery.client import dot_stuffed_pieces

    def whole(message: bytes) -> bytes:
        if message.startswith(b"."):
            message = b"." + message
        message = message.replace(b"\r\n.", b"\r\n..")
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        return message + b".\r\n"

    import random

    rng = random.Random(7)
    for _ in range(3000):
        message = bytes(rng.choice(b".\r\nab") for _ in range(rng.randint(0, 40)))
        for piece in (1, 2, 3, 5, 8, 1000):
            assert b"".join(dot_stuffed_pieces(message, piece)) == whole(message), (message, piece)


# -- delivery: the byte window ----------------------------------------------------------------
@pytest_twisted.async_yield_fixture
async def delivery_relays(tmp_path: Path) -> AsyncIterator[DeliveryRelays]:
    runner = DeliveryRelays(real_reactor(), tmp_path)
    try:
        yield runner
    finally:
        await runner.stop_all()


@pytest_twisted.async_yield_fixture
async def sinks() -> AsyncIterator[Sinks]:
    runner = Sinks(real_reactor())
    try:
        yield runner
    finally:
        await runner.stop_all()


@implementer(ISmtpBackend)
@define
class CountingSink(TrackingSinkBackend):
    """Answers each final dot ``delay`` seconds late and counts the messages under way."""

    under_way: int = 0
    most_under_way: int = 0

    def deliver(
        self, session: Session, envelope: Envelope, message: bytes | SpooledBody
    ) -> Deferred[Reply]:
        self.under_way += 1
        self.most_under_way = max(self.most_under_way, self.under_way)

        def done(reply: Reply) -> Reply:
            self.under_way -= 1
            return reply

        return super().deliver(session, envelope, message).addCallback(done)


@pytest.mark.parametrize(("window", "at_once"), [(7 / 3, 2), (1 / 2, 1)])
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_byte_window_admits_a_bounded_number_of_big_jobs(
    delivery_relays: DeliveryRelays,
    sinks: Sinks,
    database_url: str,
    window: float,
    at_once: int,
) -> None:
    """Six 1.5 MB messages; a window of 3.5 MB has at most two of them in memory (so on the
    wire) at once, although the throttle allows 20 connections; a window smaller than one
    message still lets them go, one at a time. All six arrive byte-identical."""
    size = SPOOL_THRESHOLD * 3 // 2
    window_bytes = int(size * window)
    delivery_relays.tunables = evolve(delivery_relays.tunables, max_in_memory_bytes=window_bytes)
    reactor = real_reactor()
    backend = CountingSink(delay=1.5, clock=reactor)
    _, sink_port = await sinks.start(backend)
    relay = await delivery_relays.start(database_url, {"routes": smtp_route(sink_port)})
    manager = relay.service.delivery
    assert manager is not None
    bodies = [big_body(size, str(i).encode()) for i in range(6)]
    mails = [(["rcpt@example.net"], body) for body in bodies]
    await submit_many(relay.smtp_port, mails, sessions=3)
    most_bytes = 0

    async def all_delivered() -> bool | None:
        nonlocal most_bytes
        most_bytes = max(most_bytes, manager._in_memory_bytes)
        return True if len(backend.messages) == 6 else None

    await eventually(reactor, all_delivered, "six messages at the sink", within=60)
    assert backend.most_under_way == at_once, backend.most_under_way
    assert manager.tunables.max_in_memory_bytes == window_bytes
    assert most_bytes <= max(window_bytes, size + 4096)
    for body in bodies:
        [arrived] = [m.data for m in backend.messages if body.split(b"\r\n")[2] in m.data]
        assert arrived.endswith(b"\r\n\r\n" + body.partition(b"\r\n\r\n")[2])
    await wait_for_events(reactor, relay.store, "delivered", 6)

    # The window is given back when the outcome's commit is reported to the manager, a
    # reactor turn (or a thread hop) after the events became visible in the database.
    async def window_empty() -> bool | None:
        return True if manager._in_memory_bytes == 0 and manager._in_memory == 0 else None

    await eventually(reactor, window_empty, "the byte window given back", within=10)


# -- delivery: a big message through Postfix's smtp-sink -------------------------------------------
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_big_message_arrives_byte_identical_at_smtp_sink(
    delivery_relays: DeliveryRelays, database_url: str, postfix_sink: PostfixSink
) -> None:
    reactor = real_reactor()
    relay = await delivery_relays.start(database_url, {"routes": smtp_route(postfix_sink.port)})
    body = big_body(12 * SPOOL_THRESHOLD, b"through smtp-sink")
    queue_id = await submit(relay.smtp_port, ["rcpt@example.net"], body)
    await wait_for_events(reactor, relay.store, "delivered", 1, within=60)
    [dump] = await deferToThread(postfix_sink.wait_for_messages, 1, 60.0)
    assert dump == queue_id
    [name] = os.listdir(postfix_sink.directory)
    dumped = (postfix_sink.directory / name).read_bytes()
    # smtp-sink writes lines with LF, and one empty line after the message.
    content = body.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"\n")
    assert dumped.endswith(b"\n\n" + content + b"\n")
    assert dumped.count(b"\n..y") == 0 and dumped.count(b"\n.y") == content.count(b"\n.y") + 1


# -- delivery: what the re-wrap chain keeps between messages -------------------------------------
def big_html_message(number: int) -> bytes:
    html = b'<html><body><a href="https://example.com/r">open</a></body></html>\r\n'
    return (
        b"From: <app@example.com>\r\nTo: <r@example.net>\r\nSubject: big "
        + str(number).encode()
        + b'\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        + html
        + b"--b1\r\nContent-Type: application/octet-stream\r\n\r\n"
        + LINE * (2 * SPOOL_THRESHOLD // len(LINE))
        + b"--b1--\r\n"
    )


@pytest_twisted.ensureDeferred
async def test_chain_keeps_no_big_message_after_its_copies_are_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tracking step caches MIME plans by message (16 of them): of big messages it keeps
    none once their copies are made, so memory holds what the byte window admitted only;
    small ones are still cached, and a big message's recipients still share one plan."""
    from typing import cast

    import smartrelay.rewrap.chain as chain_module
    from smartrelay.rewrap.chain import RewrapChain, RewrapSettings, TrackingStep
    from smartrelay.rewrap.dkim import DkimSigner
    from smartrelay.rewrap.mime import MimePlan, plan_html_parts
    from smartrelay.storage.store import ClaimedRecipient, Store, StoredMessage, Suppression
    from smartrelay.tokens import TokenCodec, load_keyring

    class NoSuppressions:
        async def active_suppressions(self, addresses: object) -> dict[str, Suppression]:
            return {}

    codec = TokenCodec(load_keyring(str(tmp_path / "secret.key")))
    settings = RewrapSettings("relay.test", "https://t.example.com", "bounces.example.com")
    chain = RewrapChain(settings, codec, DkimSigner([]), cast(Store, NoSuppressions()))
    [tracking] = [step for step in chain.steps if isinstance(step, TrackingStep)]
    plans: list[bytes] = []

    def counting_plan(raw: bytes) -> MimePlan:
        plans.append(raw)
        return plan_html_parts(raw)

    monkeypatch.setattr(chain_module, "plan_html_parts", counting_plan)
    for number in range(3):
        raw = big_html_message(number)
        message = StoredMessage(f"Q{number}", 0.0, "app@example.com", (), {}, {}, raw)
        recipients = [
            ClaimedRecipient(10 * number + i, message.queue_id, f"r{i}@example.net", "", 0)
            for i in range(3)
        ]
        result = await chain.run(message, recipients)
        assert len(result.copies) == 3
        assert all(b"https://t.example.com/c/" in c.body for c in result.copies)
    small = StoredMessage("S", 0.0, "app@example.com", (), {}, {}, big_html_message(9)[:400])
    await chain.run(small, [ClaimedRecipient(99, "S", "r@example.net", "", 0)])
    assert len(plans) == 4  # each message cut once, for all its recipients
    assert list(tracking._plans) == [small.raw]  # the small one is cached...
    assert tracking._big_plan is None  # ...no big one is kept


# -- storage: a spooled body in and out, piece by piece -----------------------------------------
@pytest_twisted.ensureDeferred
async def test_spooled_body_stored_and_loaded_byte_identical(store: Store, tmp_path: Path) -> None:
    """SQLite: incremental blob I/O both ways; PostgreSQL: in through a temporary large
    object (none left behind), out in 1 MB substrings. Small messages still load inline."""
    body = big_body(3 * SPOOL_THRESHOLD + 12345, b"store")
    path = tmp_path / "body-test"
    path.write_bytes(body)
    head = b"Received: from test\r\n"
    spooled = SpooledBody(str(path), len(body))
    big = await store.queue_message(
        NewMessage("a@b.test", ("r@example.net",), head, spooled=spooled)
    )
    small = await store.queue_message(
        NewMessage("a@b.test", ("s@example.net",), b"Subject: s\r\n\r\nhi\r\n")
    )
    loaded = await store.load_messages([big.queue_id, small.queue_id])
    assert loaded[big.queue_id].raw == head + body
    assert loaded[small.queue_id].raw == b"Subject: s\r\n\r\nhi\r\n"
    sizes = (await store.claim_due_with_sizes("node", limit=10, lease=60)).sizes
    assert sizes == {
        big.queue_id: len(head + body),
        small.queue_id: len(b"Subject: s\r\n\r\nhi\r\n"),
    }
    if store.engine.name == "postgresql":

        async def txn(cursor: ICursor) -> int:
            await cursor.execute("SELECT COUNT(*) FROM pg_largeobject_metadata")
            row = cursor.fetchone()
            assert row is not None
            return int(row[0])

        assert await store.engine.run_interaction("large_objects", txn, readonly=True) == 0
