"""Recovery after a PostgreSQL restart (``pg_ctl restart``: a fast shutdown, then a start).

Every test here restarts a throwaway server of this module's own (restarting the session-wide
one would break the other tests). The pool replaces the connections the restart broke, with
backoff; a transaction that failed before its COMMIT was sent runs again, one whose COMMIT was
lost is never run again; the LISTEN connection comes back and wakes its observers; a delivery
outcome that could not be recorded is recorded once the server is back, not after its lease.
"""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg2
import pytest
import pytest_twisted
from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from smartrelay.storage.engines.postgres import PostgresEngine
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.migrations import migrate
from smartrelay.storage.pool import CommitOutcomeUnknown, DatabaseUnavailable
from smartrelay.storage.store import NewMessage, Store
from tests.conftest import real_reactor, service_missing
from tests.support.delivery_relay import (
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    count_events,
    eventually,
    message_bytes,
    recipient_states,
    smtp_route,
    submit,
)
from tests.support.postfix import PostfixSink
from tests.support.postgres import PostgresServer, PostgresUnavailable, running_postgres
from tests.support.relay import HOST, free_ports
from tests.support.run import Twistd, query, write_relay_config
from tests.support.traffic import QUEUED, SENDER, complete_dumps, message, states, wait_until


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for this module alone: its tests restart it."""
    try:
        with running_postgres() as server:
            yield server
    except PostgresUnavailable as e:
        service_missing(str(e))


@pytest_twisted.async_yield_fixture
async def pg_engine(own_postgres: PostgresServer) -> AsyncIterator[PostgresEngine]:
    engine = PostgresEngine(real_reactor(), own_postgres.create_database(), pool_size=3)
    await engine.start()
    await migrate(engine, 0)
    yield engine
    await engine.close()


async def in_thread(function: object, *args: object) -> None:
    await deferToThread(function, *args)  # type: ignore[arg-type]


async def select_one(engine: PostgresEngine, readonly: bool = True) -> int:
    async def txn(cursor: ICursor) -> int:
        await cursor.execute("SELECT 1")
        row = cursor.fetchone()
        assert row is not None
        return int(row[0])

    return await engine.run_interaction("select_one", txn, readonly=readonly)


@pytest_twisted.ensureDeferred
async def test_the_pool_replaces_the_connections_a_restart_broke(
    pg_engine: PostgresEngine, own_postgres: PostgresServer
) -> None:
    assert await select_one(pg_engine) == 1
    await in_thread(own_postgres.restart)
    # Every pooled connection is dead now; each kind of transaction works at the first try.
    assert await select_one(pg_engine, readonly=True) == 1
    assert await select_one(pg_engine, readonly=False) == 1
    for _ in range(6):  # more than the pool holds: every connection was replaced
        assert await select_one(pg_engine, readonly=False) == 1


@pytest_twisted.ensureDeferred
async def test_while_the_server_is_down_transactions_fail_at_once_then_work_again(
    pg_engine: PostgresEngine, own_postgres: PostgresServer
) -> None:
    await in_thread(own_postgres.stop, "fast")
    try:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                await select_one(pg_engine, readonly=False)
            assert time.monotonic() - started < 5.0, "a transaction hung on a dead server"
    finally:
        await in_thread(own_postgres.start_again)
    # The backoff is short: the pool connects again within seconds of the server's return.
    back = await eventually(
        real_reactor(), lambda: _try(select_one(pg_engine)), "the pool to reconnect", within=10
    )
    assert back == 1


async def _try(pending: object) -> int | None:
    try:
        return await pending  # type: ignore[misc, no-any-return]
    except DatabaseUnavailable:
        return None


@pytest_twisted.ensureDeferred
async def test_the_listen_connection_comes_back_and_wakes_its_observers(
    pg_engine: PostgresEngine, own_postgres: PostgresServer
) -> None:
    woken: list[float] = []
    await pg_engine.listen("queue_test", lambda: woken.append(time.monotonic()))
    await in_thread(own_postgres.restart)
    # Re-established: observers are called once (a NOTIFY may have been missed meanwhile)...
    await eventually(
        real_reactor(), lambda: _value(True if woken else None), "the LISTEN reconnect", 10
    )
    woken.clear()

    # ...and a NOTIFY committed by another client wakes them again.
    def notify() -> None:
        connection = psycopg2.connect(pg_engine._dsn)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("NOTIFY queue_test")
        connection.close()

    await in_thread(notify)
    await eventually(real_reactor(), lambda: _value(True if woken else None), "a NOTIFY", 10)


async def _value(value: bool | None) -> bool | None:
    return value


KILL_AT_COMMIT = """
CREATE FUNCTION kill_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.sender = 'die@example.com' THEN
    PERFORM pg_terminate_backend(pg_backend_pid());
    PERFORM pg_sleep(5);
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER kill_at_commit AFTER INSERT ON messages
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION kill_at_commit();
"""


@pytest_twisted.ensureDeferred
async def test_a_commit_lost_on_the_way_is_never_run_again(pg_engine: PostgresEngine) -> None:
    """The server ends the session while it runs COMMIT (a deferred trigger terminates its
    own backend): to the client, the outcome is unknown. Running the transaction again could
    store an acknowledged message twice, so the caller gets CommitOutcomeUnknown instead, and
    a group commit does not store its messages one by one either."""

    async def setup(cursor: ICursor) -> None:
        await cursor.execute(KILL_AT_COMMIT)

    await pg_engine.run_interaction("setup", setup)

    runs = 0

    async def txn(cursor: ICursor) -> None:
        nonlocal runs
        runs += 1
        await cursor.execute(
            "INSERT INTO messages (queue_id, received_at, sender, size)"
            " VALUES ('Q1', 0, 'die@example.com', 1)",
        )

    with pytest.raises(CommitOutcomeUnknown):
        await pg_engine.run_interaction("dies_at_commit", txn)
    assert runs == 1

    # Group commit (N transactions in flight): the first N messages go one per transaction,
    # the next two share one that dies at COMMIT; neither of them is then stored on its own.
    store = Store(pg_engine, real_reactor())
    in_flight = store._queue_committer.max_in_flight
    assert in_flight >= 1

    def new(sender: str) -> NewMessage:
        return NewMessage(sender=sender, recipients=("r@example.net",), raw=b"Subject: x\r\n\r\n")

    firsts = [
        Deferred.fromCoroutine(store.queue_message(new(f"a{i}@example.com")))
        for i in range(in_flight)
    ]
    doomed = Deferred.fromCoroutine(store.queue_message(new("die@example.com")))
    innocent = Deferred.fromCoroutine(store.queue_message(new("b@example.com")))
    for first in firsts:
        await first
    for pending in (doomed, innocent):
        with pytest.raises(CommitOutcomeUnknown):
            await pending

    async def senders(cursor: ICursor) -> list[str]:
        await cursor.execute("SELECT sender FROM messages ORDER BY sender")
        return [str(row[0]) for row in cursor.fetchall()]

    stored = await pg_engine.run_interaction("senders", senders, readonly=True)
    assert stored == [f"a{i}@example.com" for i in range(in_flight)]


# -- delivery ---------------------------------------------------------------------------------
@pytest_twisted.async_yield_fixture
async def own_relays(tmp_path: Path, sinks: Sinks) -> AsyncIterator[DeliveryRelays]:
    runner = DeliveryRelays(real_reactor(), tmp_path)
    try:
        yield runner
    finally:
        await runner.stop_all()


@pytest_twisted.ensureDeferred
async def test_an_outcome_that_could_not_be_recorded_is_recorded_when_the_server_is_back(
    own_postgres: PostgresServer, own_relays: DeliveryRelays, sinks: Sinks
) -> None:
    """The next hop accepts the message while PostgreSQL is down: the outcome is recorded
    as soon as it is back (not 15 minutes later when the lease runs out), and the message is
    not sent a second time."""
    reactor = real_reactor()
    backend = TrackingSinkBackend(delay=4.0, clock=reactor)  # answers the dot 4 s late
    _, port = await sinks.start(backend)
    relay = await own_relays.start(own_postgres.create_database(), {"routes": smtp_route(port)})
    queue_id = await submit(relay.smtp_port, ["rcpt@example.net"], message_bytes("restart"))
    await eventually(reactor, lambda: _value(True if backend.messages else None), "the dot")
    await in_thread(own_postgres.stop, "fast")
    try:
        await deferLater(reactor, 5.0, lambda: None)  # the 250 came; recording it failed
    finally:
        await in_thread(own_postgres.start_again)
    restarted = time.monotonic()

    async def delivered() -> bool | None:
        try:
            states = await recipient_states(relay.store, queue_id)
        except DatabaseUnavailable:
            return None
        return True if states == {"rcpt@example.net": "delivered"} else None

    await eventually(reactor, delivered, "the outcome to be recorded", within=20)
    assert time.monotonic() - restarted < 20
    assert len(backend.messages) == 1
    assert await count_events(relay.store, "delivered") == 1


# -- the whole relay under load --------------------------------------------------------------
@define
class Load:
    """SMTP clients submitting numbered messages until told to stop; what each got."""

    port: int
    sessions: int
    #: Between two messages of a session (a steady load the delivery side keeps up with).
    pause: float
    stop: threading.Event = field(factory=threading.Event)
    lock: threading.Lock = field(factory=threading.Lock)
    #: (message number, reply code, queue id or "", sent at, answered at) (time.monotonic)
    replies: list[tuple[int, int, str, float, float]] = field(factory=list)
    errors: list[str] = field(factory=list)
    threads: list[threading.Thread] = field(factory=list)
    _next: int = 0

    def number(self) -> int:
        with self.lock:
            self._next += 1
            return self._next

    def start(self) -> None:
        for _ in range(self.sessions):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
            assert not thread.is_alive(), "an SMTP client is stuck"

    def _client(self) -> None:
        while not self.stop.is_set():
            try:
                with smtplib.SMTP(HOST, self.port, local_hostname="client.test", timeout=30) as c:
                    c.ehlo()
                    while not self.stop.is_set():
                        n = self.number()
                        sent = time.monotonic()
                        code, _ = c.mail(SENDER)
                        if code == 250:
                            code, _ = c.rcpt(f"r{n}@example.net")
                        queue_id = ""
                        if code == 250:
                            code, text = c.data(message(n))
                            match = QUEUED.search(text.decode())
                            queue_id = match[1] if code == 250 and match else ""
                        else:
                            c.rset()
                        with self.lock:
                            self.replies.append((n, code, queue_id, sent, time.monotonic()))
                        time.sleep(self.pause)
            except (OSError, smtplib.SMTPException) as error:
                with self.lock:
                    self.errors.append(f"{type(error).__name__}: {error}")
                time.sleep(0.05)


@pytest.mark.parametrize("processes", [0, 1])
def test_a_restart_under_load_loses_nothing_and_recovers_by_itself(
    tmp_path: Path, own_postgres: PostgresServer, postfix_sink: PostfixSink, processes: int
) -> None:
    """``twistd smartrelay`` (with a delivery process or without), four SMTP clients
    submitting without pause, and PostgreSQL restarted under them, down for 2 s."""
    url = own_postgres.create_database()
    [smtp_port] = free_ports(1)
    config = write_relay_config(
        tmp_path,
        url,
        extra=(
            f"[delivery]\nprocesses = {processes}\n"
            'retry_schedule = ["1s"]\n'
            "[delivery.routes]\n"
            f'"*" = "smtp://{HOST}:{postfix_sink.port}"\n'
            '[[delivery.throttle]]\nmatch = "*"\nmax_connections = 20\nmax_rate = "100000/s"\n'
        ),
        smtp_listen=f"tcp:{smtp_port}:interface={HOST}",
    )
    relay = Twistd(config, tmp_path)
    load = Load(smtp_port, sessions=4, pause=0.05)
    try:
        relay.wait_for("smtp: listening on")
        relay.wait_for("delivery: node", timeout=30)
        load.start()
        time.sleep(2.0)
        down = time.monotonic()
        own_postgres.restart(down_for=2.0)
        up = time.monotonic()
        time.sleep(8.0)
        load.finish()
        ended = time.monotonic()

        replies = sorted(load.replies, key=lambda r: r[4])
        accepted = {queue_id: n for n, code, queue_id, _, _ in replies if code == 250}
        refused = [r for r in replies if r[1] != 250]
        assert all(400 <= code < 500 for _, code, _, _, _ in refused), refused
        # The outage was hit: some messages were refused, each with a 4xx, none hung.
        assert any(down <= answered <= up + 1 for _, _, _, _, answered in refused)
        slowest = max(answered - sent for _, _, _, sent, answered in replies)
        assert slowest < 10.0, f"a command took {slowest:.1f} s"
        assert not load.errors, load.errors
        # Recovery by itself: accepted again within seconds of the server's return, and the
        # last 4 s of the run all accepted.
        after = [answered for _, code, _, _, answered in replies if answered > up and code == 250]
        recovered = min(after, default=float("inf"))
        assert recovered - up < 5.0, f"no 250 within 5 s of the restart ({len(refused)} 4xx)"
        late = [r for r in replies if r[4] > up + 4.0]
        assert late and all(code == 250 for _, code, _, _, _ in late)

        try:
            wait_until(
                lambda: True if states(url)["delivered"] >= len(accepted) else None,
                "every accepted message delivered",
                timeout=60,
            )
        except AssertionError as error:
            lines = [
                x for x in relay.output.splitlines() if "to=<" not in x and "accepted from" not in x
            ]
            raise AssertionError(
                f"{error}: {states(url)}; relay:\n" + "\n".join(lines[-80:])
            ) from None
        delivered_at = time.monotonic()
        seen = complete_dumps(postfix_sink)
        missing = set(accepted) - set(seen)
        assert not missing, f"{len(missing)} accepted message(s) never delivered"
        twice = {q: c for q, c in seen.items() if q in accepted and c > 1}
        assert not twice, f"delivered more than once: {twice}"
        rows = query(url, "SELECT COUNT(*) FROM recipients WHERE state <> 'delivered'")
        print(
            f"\nprocesses={processes}: {len(accepted)} accepted, {len(refused)} refused (4xx),"
            f" down {up - down:.1f} s, slowest reply {slowest:.2f} s,"
            f" first 250 {recovered - up:.2f} s after the restart,"
            f" all delivered {delivered_at - ended:.1f} s after the load ended;"
            f" not delivered: {rows[0][0]}"
        )
        assert "Unhandled Error" not in relay.output
    finally:
        load.stop.set()
        relay.kill()
