"""Source-address pools (``[[delivery.pools]]``, docs/delivery.md "Source-address pools").

The end-to-end tests run the whole relay in-process with real sockets on loopback: Linux
routes all of 127.0.0.0/8 to ``lo``, so pools bind to 127.0.0.2, 127.0.0.3... and a sink on
127.0.0.1 sees which address each connection came from and the HELO name it said. Mail is
submitted over SMTP with the sender (and credential) each case needs, on both engines. The
start-up check runs the real ``twistd``. The matching rules and the address choice are unit
tests of :class:`PoolChooser`.
"""

from __future__ import annotations

import itertools
import smtplib
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest
import pytest_twisted
from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from smartrelay.config import Pool, SourceAddress
from smartrelay.delivery.pools import (
    PoolChooser,
    SourceAddressError,
    check_source_addresses,
    sender_domain,
)
from smartrelay.passwords import hash_password
from smartrelay.reactor import IRelayReactor
from smartrelay.smtp.listener import SmtpFactory
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.session import Envelope, ISmtpBackend, ListenerSettings, Session
from smartrelay.spool import SpooledBody
from smartrelay.storage.queue import StoredMessage
from tests.conftest import real_reactor
from tests.support.delivery_relay import (
    CLIENT_NAME,
    CLIENT_TIMEOUT,
    QUEUED,
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    events,
    eventually,
    smtp_route,
    wait_for_events,
)
from tests.support.relay import HOSTNAME
from tests.support.run import run_twistd, write_relay_config

CREDENTIAL = "billing-app"
PASSWORD = "a long billing password"


# -- a sink that records where each message came from ---------------------------------------------
@define
class Arrival:
    subject: str
    client_ip: str
    helo: str | None
    #: Which connection (session) it came on: an index into the backend's sessions.
    connection: int


@implementer(ISmtpBackend)
@define
class SourceRecordingBackend(TrackingSinkBackend):
    """Records, per message, the client address and HELO name of its connection."""

    arrivals: list[Arrival] = field(factory=list)

    def deliver(
        self, session: Session, envelope: Envelope, message: bytes | SpooledBody
    ) -> Deferred[Reply]:
        answer = super().deliver(session, envelope, message)
        data = message if isinstance(message, bytes) else message.read()
        subject = next(
            (
                line[len(b"Subject: ") :].decode()
                for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")
                if line.startswith(b"Subject: ")
            ),
            "",
        )
        index = next(i for i, s in enumerate(self.sessions) if s is session)
        self.arrivals.append(Arrival(subject, session.client_ip, session.helo, index))
        return answer


Mail = tuple[str, str, bytes]


def mail(sender: str, subject: str, tags: Sequence[str] = (), to: str = "rcpt@dest.test") -> Mail:
    """(sender, recipient, message)."""
    lines = [f"From: <{sender}>", f"To: <{to}>", f"Subject: {subject}"]
    lines += [f"X-SmartRelay-Tag: {tag}" for tag in tags]
    return sender, to, ("\r\n".join(lines) + "\r\n\r\nHello.\r\n").encode()


def _send(port: int, mails: Sequence[Mail], login: tuple[str, str] | None) -> list[str]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT) as c:
        c.ehlo()
        if login is not None:
            c.starttls()
            c.ehlo()
            c.login(*login)
        ids = []
        for sender, recipient, data in mails:
            assert c.mail(sender)[0] == 250
            assert c.rcpt(recipient)[0] == 250
            code, text = c.data(data)
            match = QUEUED.search(text.decode())
            assert code == 250 and match is not None, (code, text)
            ids.append(match[1])
        return ids


async def send(port: int, mails: Sequence[Mail], login: tuple[str, str] | None = None) -> list[str]:
    """Messages in one SMTP session (with the sender of each); their queue ids."""
    ids: list[str] = await deferToThread(_send, port, mails, login)
    return ids


def pool(
    name: str,
    addresses: Sequence[tuple[str, str]],
    selection: str = "hash",
    **matching: list[str],
) -> dict[str, object]:
    return {
        "name": name,
        "source_addresses": [{"address": a, "helo": h} for a, h in addresses],
        "selection": selection,
        **matching,
    }


def listen_v6(
    reactor: IRelayReactor, backend: SourceRecordingBackend
) -> tuple[SmtpFactory, IListeningPort]:
    """A sink on ``[::1]`` (tests/support/sink.py's listen on 127.0.0.1 only)."""
    settings = ListenerSettings(
        hostname="sink6.test",
        max_message_size=1_000_000,
        max_recipients=100,
        max_connections=100,
        max_connections_per_client=100,
    )
    factory = SmtpFactory(settings, backend, reactor, None, name="sink6")
    return factory, reactor.listenTCP(0, factory, interface="::1")


async def stop_v6(factory: SmtpFactory, port: IListeningPort) -> None:
    for protocol in list(factory.connections):
        if protocol.transport is not None:
            protocol.transport.loseConnection()
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


async def arrivals(backend: SourceRecordingBackend, count: int) -> list[Arrival]:
    async def check() -> list[Arrival] | None:
        return list(backend.arrivals) if len(backend.arrivals) >= count else None

    return await eventually(real_reactor(), check, f"{count} messages at the sink", within=30)


# -- end to end ---------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_mail_leaves_from_its_pools_address_with_its_helo(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    """Sender-domain mail leaves from 127.0.0.2, tagged mail from 127.0.0.3, mail of the
    credential from 127.0.0.4, each saying its address's HELO name; other mail from the
    default address (127.0.0.1) as ``[server] hostname``. The first matching pool wins.
    Every message goes to the one sink, all submitted together, yet no connection carries
    mail of two pools (or of a pool and of none)."""
    backend = SourceRecordingBackend()
    _, sink_port = await sinks.start(backend)
    pools = [
        pool("alpha", [("127.0.0.2", "mta2.pools.test")], senders=["a.test"]),
        pool("receipts", [("127.0.0.3", "mta3.pools.test")], tags=["receipt"]),
        pool("billing", [("127.0.0.4", "mta4.pools.test")], credentials=[CREDENTIAL]),
    ]
    # One throttle slot: the destination's mail would all share one connection if the pools
    # did not keep theirs apart.
    throttle = [{"match": "*", "max_connections": 4, "max_rate": "100000/s"}]
    relay = await relays.start(
        database_url,
        {"routes": smtp_route(sink_port), "pools": pools, "throttle": throttle},
    )
    await relay.store.smtp_credentials.add(CREDENTIAL, hash_password(PASSWORD))
    expected = {
        "a-1": ("127.0.0.2", "mta2.pools.test"),
        "a-sub": ("127.0.0.2", "mta2.pools.test"),  # news.a.test: a parent domain matches
        "a-and-tag": ("127.0.0.2", "mta2.pools.test"),  # alpha comes first in the file
        "tag": ("127.0.0.3", "mta3.pools.test"),
        "other-1": ("127.0.0.1", HOSTNAME),
        "other-2": ("127.0.0.1", HOSTNAME),
        "not-a": ("127.0.0.1", HOSTNAME),  # a.test.example is not a.test
        "cred": ("127.0.0.4", "mta4.pools.test"),
        "cred-and-tag": ("127.0.0.3", "mta3.pools.test"),  # receipts before billing
    }
    await send(
        relay.smtp_port,
        [
            mail("app@other.test", "other-1"),
            mail("app@a.test", "a-1"),
            mail("app@news.a.test", "a-sub"),
            mail("app@other.test", "tag", tags=["receipt"]),
            mail("app@a.test", "a-and-tag", tags=["receipt"]),
            mail("app@other.test", "other-2", tags=["newsletter"]),
            mail("app@a.test.example", "not-a"),
        ],
    )
    await send(
        relay.smtp_port,
        [
            mail("app@other.test", "cred"),
            mail("app@other.test", "cred-and-tag", tags=["receipt"]),
        ],
        login=(CREDENTIAL, PASSWORD),
    )
    got = await arrivals(backend, len(expected))
    assert {a.subject: (a.client_ip, a.helo) for a in got} == expected
    # Connection reuse never mixes pools: one source (address and HELO) per connection.
    per_connection: dict[int, set[tuple[str, str | None]]] = {}
    for arrival in got:
        per_connection.setdefault(arrival.connection, set()).add((arrival.client_ip, arrival.helo))
    assert all(len(sources) == 1 for sources in per_connection.values()), per_connection
    delivered = await wait_for_events(real_reactor(), relay.store, "delivered", len(expected))
    assert len(delivered) == len(expected)


@pytest_twisted.ensureDeferred
async def test_round_robin_takes_the_addresses_in_turn_and_hash_keeps_one(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    """One message per connection: a ``round-robin`` pool's connections alternate between
    its addresses, a ``hash`` pool's connections to one destination all use the same one."""
    backend = SourceRecordingBackend()
    _, sink_port = await sinks.start(backend)
    pools = [
        pool(
            "turns",
            [("127.0.0.5", "mta5.pools.test"), ("127.0.0.6", "mta6.pools.test")],
            selection="round-robin",
            senders=["turns.test"],
        ),
        pool(
            "hashed",
            [("127.0.0.7", "mta7.pools.test"), ("127.0.0.8", "mta8.pools.test")],
            senders=["hashed.test"],
        ),
    ]
    throttle = [
        {
            "match": "*",
            "max_connections": 1,
            "max_messages_per_connection": 1,
            "max_rate": "100000/s",
        }
    ]
    relay = await relays.start(
        database_url,
        {"routes": smtp_route(sink_port), "pools": pools, "throttle": throttle},
    )
    count = 4
    await send(relay.smtp_port, [mail("app@turns.test", f"turns-{i}") for i in range(count)])
    await send(relay.smtp_port, [mail("app@hashed.test", f"hashed-{i}") for i in range(count)])
    got = await arrivals(backend, 2 * count)
    turns = [a for a in got if a.subject.startswith("turns-")]
    hashed = [a for a in got if a.subject.startswith("hashed-")]
    assert len({a.connection for a in turns}) == count  # one message per connection
    used = [a.client_ip for a in sorted(turns, key=lambda a: a.connection)]
    assert set(used) == {"127.0.0.5", "127.0.0.6"}
    assert all(x != y for x, y in itertools.pairwise(used)), used  # alternating
    assert {(a.client_ip, a.helo) for a in turns} == {
        ("127.0.0.5", "mta5.pools.test"),
        ("127.0.0.6", "mta6.pools.test"),
    }
    assert len({a.connection for a in hashed}) == count
    assert len({a.client_ip for a in hashed}) == 1
    (ip,) = {a.client_ip for a in hashed}
    assert {a.helo for a in hashed} == {{"127.0.0.7": "mta7.pools.test"}.get(ip, "mta8.pools.test")}


@pytest_twisted.ensureDeferred
async def test_ipv6_source_reaches_only_ipv6_next_hops(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    """An IPv6 pool address connects to an IPv6 next hop (the sink sees ``::1`` and its HELO
    name); to a next hop with only an IPv4 address its mail is deferred, saying why, and
    never leaves from an IPv4 address."""
    reactor = real_reactor()
    backend = SourceRecordingBackend()
    factory, port = listen_v6(reactor, backend)
    v4_backend = SourceRecordingBackend()
    _, v4_port = await sinks.start(v4_backend)
    v6_port = port.getHost().port  # type: ignore[attr-defined]
    try:
        pools = [pool("six", [("::1", "mta6.pools.test")], senders=["six.test"])]
        routes = {"v6.test": f"smtp://[::1]:{v6_port}", "*": f"smtp://127.0.0.1:{v4_port}"}
        relay = await relays.start(database_url, {"routes": routes, "pools": pools})
        _, v4_id = await send(
            relay.smtp_port,
            [
                mail("app@six.test", "over-v6", to="rcpt@v6.test"),
                mail("app@six.test", "to-v4-only", to="rcpt@dest.test"),
            ],
        )
        got = await arrivals(backend, 1)
        assert [(a.subject, a.client_ip, a.helo) for a in got] == [
            ("over-v6", "::1", "mta6.pools.test")
        ]
        deferred = await wait_for_events(reactor, relay.store, "deferred", 1, within=30)
        assert [e.queue_id for e in deferred] == [v4_id]
        assert "no IPv6 address" in deferred[0].data["reply"], deferred[0].data
        assert v4_backend.arrivals == []
    finally:
        await stop_v6(factory, port)


@pytest_twisted.ensureDeferred
async def test_a_pool_of_both_families_reaches_each_next_hop_from_its_family(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    """A pool with an IPv6 and an IPv4 address: whichever the hash picks first for a
    destination, mail to an IPv6-only next hop leaves from ``::1`` and mail to an IPv4-only
    one from 127.0.0.2. Three next hops of each family: the hash picks the wrong family
    first for some of them (all six right by chance: 1 in 64)."""
    reactor = real_reactor()
    v6 = [listen_v6(reactor, SourceRecordingBackend()) for _ in range(3)]
    v4 = [SourceRecordingBackend() for _ in range(3)]
    routes: dict[str, str] = {}
    for i, backend in enumerate(v4):
        _, v4_port = await sinks.start(backend)
        routes[f"v4-{i}.test"] = f"smtp://127.0.0.1:{v4_port}"
    for i, (_, port) in enumerate(v6):
        routes[f"v6-{i}.test"] = f"smtp://[::1]:{port.getHost().port}"  # type: ignore[attr-defined]
    try:
        addresses = [("::1", "mta6.pools.test"), ("127.0.0.2", "mta2.pools.test")]
        pools = [pool("both", addresses, senders=["both.test"])]
        relay = await relays.start(database_url, {"routes": routes, "pools": pools})
        await send(relay.smtp_port, [mail("app@both.test", d, to=f"r@{d}") for d in routes])
        for factory, _ in v6:
            got = await arrivals(cast(SourceRecordingBackend, factory.backend), 1)
            assert [(a.client_ip, a.helo) for a in got] == [("::1", "mta6.pools.test")]
        for backend in v4:
            got = await arrivals(backend, 1)
            assert [(a.client_ip, a.helo) for a in got] == [("127.0.0.2", "mta2.pools.test")]
        assert await events(relay.store, "deferred") == []
    finally:
        for factory, port in v6:
            await stop_v6(factory, port)


# -- start-up ------------------------------------------------------------------------------------
def test_twistd_refuses_to_start_with_an_address_it_cannot_bind(tmp_path: Path) -> None:
    """192.0.2.10 (TEST-NET-1) is on no interface here: one line naming the pool and the
    address, exit status 1, before anything starts."""
    extra = (
        "[[delivery.pools]]\n"
        'name = "transactional"\n'
        "source_addresses = ["
        '{ address = "127.0.0.2", helo = "mta2.pools.test" },'
        ' { address = "192.0.2.10", helo = "mta1.example.com" }]\n'
        'senders = ["example.com"]\n'
    )
    config = write_relay_config(tmp_path, f"sqlite:{tmp_path / 'relay.db'}", extra)
    result = run_twistd(config, tmp_path)
    assert result.returncode == 1, result.describe()
    assert result.lines == [
        "smartrelay: delivery pool 'transactional': cannot bind source address 192.0.2.10:"
        " Cannot assign requested address"
    ], result.describe()
    assert "Traceback" not in result.stdout + result.stderr


def test_bindable_addresses_pass_the_start_up_check() -> None:
    check_source_addresses(
        [
            Pool(
                "p",
                (SourceAddress("127.0.0.2", "a.pools.test"), SourceAddress("::1", "b.pools.test")),
                tags=("t",),
            )
        ]
    )
    with pytest.raises(SourceAddressError, match="'q': cannot bind source address 2001:db8::1"):
        check_source_addresses([Pool("q", (SourceAddress("2001:db8::1", "c.pools.test"),))])


# -- which pool, which address --------------------------------------------------------------------
def stored(sender: str, tags: Sequence[str] = (), credential: str | None = None) -> StoredMessage:
    return StoredMessage("Q", 0.0, sender, tuple(tags), {}, {}, b"", credential=credential)


ONE = (SourceAddress("127.0.0.2", "one.pools.test"),)
POOLS = [
    Pool("domains", ONE, senders=("example.com", "xn--bcher-kva.de")),
    Pool("tags", ONE, tags=("receipt", "Alert")),
    Pool("creds", ONE, credentials=("billing",)),
    Pool("late", ONE, senders=("late.test",), tags=("receipt",)),
]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (stored("a@example.com"), "domains"),
        (stored("a@EXAMPLE.com."), "domains"),
        (stored("a@mail.example.com"), "domains"),
        (stored("a@bücher.de"), "domains"),
        (stored("a@example.com.evil.test"), None),
        (stored("a@notexample.com"), None),
        (stored("", tags=["receipt"]), "tags"),  # the null sender
        (stored("a@x.test", tags=["alert"]), None),  # tags are compared as written
        (stored("a@x.test", tags=["Alert"]), "tags"),
        (stored("a@x.test", credential="billing"), "creds"),
        (stored("a@x.test", credential="Billing"), None),
        (stored("a@x.test"), None),
        (stored("a@late.test", tags=["receipt"]), "tags"),  # the first in file order wins
        (stored("a@late.test"), "late"),
    ],
)
def test_the_first_matching_pool_in_file_order(
    message: StoredMessage, expected: str | None
) -> None:
    chosen = PoolChooser(POOLS).pool_for(message)
    assert (chosen.name if chosen is not None else None) == expected


def test_sender_domain() -> None:
    assert sender_domain("") == ""
    assert sender_domain("a@B.Example.COM") == "b.example.com"
    assert sender_domain('"a@b"@c.test') == "c.test"
    assert sender_domain("no-at-sign") == ""


def test_hash_keeps_a_destination_on_one_address_and_spreads_destinations() -> None:
    addresses = tuple(SourceAddress(f"127.0.0.{i}", f"m{i}.pools.test") for i in range(2, 6))
    hashed = Pool("h", addresses, senders=("h.test",))
    chooser = PoolChooser([hashed])
    for destination in ("mx.google.com", "mx1.outlook.test", "smtp://127.0.0.1:25"):
        first = chooser.source_for(hashed, destination)
        assert all(chooser.source_for(hashed, destination) == first for _ in range(20))
    spread = {chooser.source_for(hashed, f"mx{i}.dest.test") for i in range(200)}
    assert spread == set(addresses)


def test_round_robin_takes_each_address_in_turn() -> None:
    addresses = tuple(SourceAddress(f"127.0.0.{i}", f"m{i}.pools.test") for i in range(2, 5))
    turns = Pool("r", addresses, senders=("r.test",), selection="round-robin")
    chooser = PoolChooser([turns])
    picked = [chooser.source_for(turns, "mx.dest.test") for _ in range(6)]
    assert picked == [*addresses, *addresses]


def test_a_pool_of_both_families_offers_one_address_of_each() -> None:
    v4 = tuple(SourceAddress(f"127.0.0.{i}", f"m{i}.pools.test") for i in range(2, 4))
    v6 = (SourceAddress("::1", "m6.pools.test"),)
    both = Pool("b", (*v6, *v4), senders=("b.test",))
    chooser = PoolChooser([both])
    for destination in (f"mx{i}.dest.test" for i in range(20)):
        first, other = chooser.sources_for(both, destination)
        assert first == chooser.source_for(both, destination)
        assert {first.version, other.version} == {4, 6}
    only_v4 = Pool("4", v4, senders=("b.test",))
    assert len(chooser.sources_for(only_v4, "mx.dest.test")) == 1
