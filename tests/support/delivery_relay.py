"""Delivery end to end, in-process: relays with a ``[delivery]`` section, sinks, and the database.

``tests/support/relay.py`` builds relays whose every route points at a closed port; the relays
here deliver where the test says (``delivery`` is the ``[delivery]`` table as a dict). The
helpers submit mail over real SMTP (smtplib, in threads, so the reactor keeps serving), wait
for outcomes by polling the database with a deadline, and record at the sink what arrived.
"""

from __future__ import annotations

import json
import re
import smtplib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from smartrelay.config import Config, parse_config
from smartrelay.delivery.manager import DeliveryTunables
from smartrelay.reactor import IRelayReactor
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.session import Envelope, ISmtpBackend, Session
from smartrelay.smtp.tls import ensure_certificate, server_context_factory
from smartrelay.spool import SpooledBody
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.migrations import migrate
from smartrelay.storage.store import NewMessage, Store
from tests.support.relay import (
    HOST,
    HOSTNAME,
    RETURN_PATH_DOMAIN,
    RunningRelay,
    start_in_process,
    stop_relays,
)
from tests.support.sink import SinkBackend, SinkFactory, start_sink

T = TypeVar("T")

SENDER = "app@sender.test"
CLIENT_NAME = "client.test"
CLIENT_TIMEOUT = 30.0
QUEUED = re.compile(r"Ok: queued as (\S+)")
#: A throttle that never slows a test down (the default max_rate, 1000/min, would).
FAST_THROTTLE: dict[str, Any] = {"match": "*", "max_connections": 20, "max_rate": "100000/s"}


# -- relays --------------------------------------------------------------------------------------
def delivery_relay_config(
    data_dir: Path,
    database_url: str,
    smtp_port: int,
    inbound_port: int,
    delivery: Mapping[str, Any],
    smtp: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Config:
    """A whole relay on 127.0.0.1 whose ``[delivery]`` table is ``delivery``.

    A ``throttle`` list is taken as it is; without one, :data:`FAST_THROTTLE` applies.
    ``extra`` adds or replaces top-level tables (``dkim``, ``web``, ``rewrap``...).
    """
    table = dict(delivery)
    table.setdefault("throttle", [FAST_THROTTLE])
    return parse_config(
        {
            "server": {"hostname": HOSTNAME, "data_dir": str(data_dir)},
            "database": {"url": database_url},
            "smtp": {"listen": [f"tcp:{smtp_port}:interface={HOST}"], **(smtp or {})},
            "inbound": {
                "listen": [f"tcp:{inbound_port}:interface={HOST}"],
                "return_path_domain": RETURN_PATH_DOMAIN,
            },
            "rewrap": {"secret_file": str(data_dir / "secret.key")},
            "web": {"listen": f"tcp:0:interface={HOST}"},
            "delivery": table,
            **(extra or {}),
        },
        str(data_dir / "smartrelay.toml"),
    )


def smtp_route(port: int, scheme: str = "smtp", userinfo: str = "") -> dict[str, str]:
    """``[delivery.routes]`` sending every domain to 127.0.0.1:``port``."""
    at = f"{userinfo}@" if userinfo else ""
    return {"*": f"{scheme}://{at}{HOST}:{port}"}


class DeliveryRelays:
    """Starts relays for one test, each on a database and data_dir of its own choosing;
    ``stop_all`` (from a fixture's teardown) stops every one still running."""

    def __init__(self, reactor: IRelayReactor, directory: Path) -> None:
        self.reactor = reactor
        self.directory = directory
        self.started: list[RunningRelay] = []
        #: The in-process delivery managers' tunables (a test may shorten the poll, say).
        self.tunables = DeliveryTunables()

    async def start(
        self,
        database_url: str,
        delivery: Mapping[str, Any],
        smtp: Mapping[str, Any] | None = None,
        data_dir: str = "var",
        attempts: int = 3,
        wait_for_delivery: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> RunningRelay:
        """A running relay; with ``wait_for_delivery``, once its delivery manager has finished
        starting (see :func:`delivery_started`)."""

        def make_config(smtp_port: int, inbound_port: int) -> Config:
            return delivery_relay_config(
                self.directory / data_dir,
                database_url,
                smtp_port,
                inbound_port,
                delivery,
                smtp,
                extra,
            )

        relay = await start_in_process(self.reactor, make_config, attempts, self.tunables)
        self.started.append(relay)
        if wait_for_delivery:
            await delivery_started(self.reactor, relay)
        return relay

    async def stop_all(self) -> None:
        relays, self.started = self.started, []
        await stop_relays(relays)


async def delivery_started(reactor: IRelayReactor, relay: RunningRelay) -> None:
    """Wait until the delivery manager has taken back its old claims and looked for work.

    Mail submitted earlier can race its start-up (see test_delivery_e2e's
    test_mail_arriving_while_delivery_starts_is_delivered_once). With nothing submitted yet,
    the first claim round is the one at the end of start-up, which schedules the next poll.
    """
    manager = relay.service.delivery
    assert manager is not None

    async def started() -> bool | None:
        return True if manager._poll_call is not None else None

    await eventually(reactor, started, "the delivery manager to start", within=10)


# -- sinks ---------------------------------------------------------------------------------------
@implementer(ISmtpBackend)
@define
class TrackingSinkBackend(SinkBackend):
    """:class:`SinkBackend` that keeps every session alive (``SinkBackend`` tells connections
    apart by ``id(session)``, which a new session may reuse once an old one is freed) and may
    answer the final dot ``delay`` seconds late, so that a backlog builds up at the relay."""

    delay: float = 0.0
    clock: IRelayReactor | None = None
    sessions: list[Session] = field(factory=list)

    def deliver(
        self, session: Session, envelope: Envelope, message: bytes | SpooledBody
    ) -> Deferred[Reply]:
        if all(s is not session for s in self.sessions):
            self.sessions.append(session)
        answer = super().deliver(session, envelope, message)
        clock, delay = self.clock, self.delay
        if delay <= 0 or clock is None:
            return answer
        return answer.addCallback(lambda reply: deferLater(clock, delay, lambda: reply))

    def messages_per_connection(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for received in self.messages:
            counts[received.connection] = counts.get(received.connection, 0) + 1
        return counts


def sink_tls(directory: Path) -> IOpenSSLServerConnectionCreator:
    """Server TLS options for a sink: a self-signed certificate generated in ``directory``."""
    material = ensure_certificate("", "", str(directory), "sink.test")
    options: IOpenSSLServerConnectionCreator = server_context_factory(material)
    return options


class Sinks:
    """In-process sinks for one test; ``stop_all`` stops listening and drops their sessions."""

    def __init__(self, reactor: IRelayReactor) -> None:
        self.reactor = reactor
        self._running: list[tuple[SinkFactory, IListeningPort]] = []

    async def start(
        self, backend: SinkBackend, tls: IOpenSSLServerConnectionCreator | None = None
    ) -> tuple[SinkFactory, int]:
        factory, port, number = await start_sink(self.reactor, backend, tls)
        self._running.append((factory, port))
        return factory, number

    async def stop_all(self) -> None:
        running, self._running = self._running, []
        for factory, port in running:
            for protocol in list(factory.connections):
                if protocol.transport is not None:
                    protocol.transport.loseConnection()
            stopped = port.stopListening()
            if stopped is not None:
                await stopped


# -- submitting over SMTP (blocking: run in a thread) ---------------------------------------------
def message_bytes(
    subject: str,
    to: str = "rcpt@example.net",
    headers: Sequence[str] = (),
    body: str = "Hello.\r\n",
) -> bytes:
    lines = [f"From: <{SENDER}>", f"To: <{to}>", f"Subject: {subject}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


async def queue_before_start(
    reactor: IRelayReactor, url: str, count: int, address: str, subject: str
) -> list[str]:
    """``count`` one-recipient messages due now, queued into the database at ``url`` before
    any relay runs (a burst, or nodes restarting): recipient ``address.format(i)``, subject
    ``subject.format(i)``. Returns the recipients."""
    engine = create_engine(reactor, url)
    await engine.start()
    recipients = [address.format(i) for i in range(count)]
    try:
        await migrate(engine, 0)
        store = Store(engine, reactor)
        for i, recipient in enumerate(recipients):
            await store.queue_message(
                NewMessage(SENDER, (recipient,), message_bytes(subject.format(i)))
            )
    finally:
        await engine.close()
    return recipients


def _queue_id(reply: tuple[int, bytes]) -> str:
    code, text = reply
    match = QUEUED.search(text.decode())
    assert code == 250 and match is not None, f"{code} {text!r}"
    return match[1]


def send_session(
    port: int,
    mails: Sequence[tuple[Sequence[str], bytes]],
    login: tuple[str, str] | None = None,
) -> list[str]:
    """Several messages in one SMTP session; their queue ids in order."""
    with smtplib.SMTP(HOST, port, local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo()
        if login is not None:
            client.starttls()
            client.ehlo()
            client.login(*login)
        ids = []
        for recipients, data in mails:
            code, text = client.mail(SENDER)
            assert code == 250, f"MAIL: {code} {text!r}"
            for recipient in recipients:
                code, text = client.rcpt(recipient)
                assert code == 250, f"RCPT {recipient}: {code} {text!r}"
            ids.append(_queue_id(client.data(data)))
        return ids


async def submit(
    port: int, recipients: Sequence[str], data: bytes, login: tuple[str, str] | None = None
) -> str:
    """One message over SMTP; its queue id."""
    ids: list[str] = await deferToThread(send_session, port, [(recipients, data)], login)
    return ids[0]


async def submit_many(
    port: int, mails: Sequence[tuple[Sequence[str], bytes]], sessions: int = 4
) -> list[str]:
    """Messages over ``sessions`` concurrent SMTP sessions; queue ids in the order of ``mails``.

    Keep ``sessions`` small: the threads come from the reactor's pool, which the relay also
    uses (password checks).
    """
    shares = [list(mails[i::sessions]) for i in range(sessions)]
    results: list[list[str]] = await gatherResults(
        [deferToThread(send_session, port, share) for share in shares if share]
    )
    ids: list[str] = [""] * len(mails)
    for i, share_ids in enumerate(results):
        ids[i::sessions] = share_ids
    return ids


# -- the database ---------------------------------------------------------------------------------
async def select(store: Store, sql: str, *args: object) -> list[tuple[Any, ...]]:
    async def txn(cursor: ICursor) -> list[tuple[Any, ...]]:
        await cursor.execute(sql, args)
        return [tuple(row) for row in cursor.fetchall()]

    return await store.engine.run_interaction("test_select", txn, readonly=True)


@define
class Event:
    type: str
    queue_id: str | None
    recipient: str | None
    data: dict[str, Any]


async def events(
    store: Store, event_type: str | None = None, queue_id: str | None = None
) -> list[Event]:
    """Event rows in id order, optionally of one type and/or one message."""
    sql = "SELECT type, queue_id, recipient, data FROM events WHERE 1 = 1"
    args: list[object] = []
    if event_type is not None:
        sql += " AND type = ?"
        args.append(event_type)
    if queue_id is not None:
        sql += " AND queue_id = ?"
        args.append(queue_id)
    rows = await select(store, sql + " ORDER BY id", *args)
    return [Event(str(r[0]), r[1], r[2], json.loads(r[3])) for r in rows]


async def recipient_states(store: Store, queue_id: str | None = None) -> dict[str, str]:
    """{address: state} (of one message, or of all when the addresses are unique)."""
    if queue_id is None:
        rows = await select(store, "SELECT address, state FROM recipients ORDER BY id")
    else:
        sql = "SELECT address, state FROM recipients WHERE queue_id = ? ORDER BY id"
        rows = await select(store, sql, queue_id)
    return {str(a): str(s) for a, s in rows}


async def count_events(store: Store, event_type: str) -> int:
    rows = await select(store, "SELECT COUNT(*) FROM events WHERE type = ?", event_type)
    return int(rows[0][0])


async def eventually(
    reactor: IRelayReactor,
    check: Callable[[], Awaitable[T | None]],
    what: str,
    within: float = 20.0,
    interval: float = 0.05,
) -> T:
    """Poll ``check`` until it returns something other than None; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await deferLater(reactor, interval, lambda: None)


async def wait_for_events(
    reactor: IRelayReactor, store: Store, event_type: str, count: int, within: float = 20.0
) -> list[Event]:
    """Wait until there are at least ``count`` events of ``event_type``; all of them."""

    async def check() -> list[Event] | None:
        found = await events(store, event_type)
        return found if len(found) >= count else None

    return await eventually(reactor, check, f"{count} {event_type!r} event(s)", within)
