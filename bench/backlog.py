"""An old backlog for the retention benchmarks: what a relay's database holds after months.

    fill(database_url, events=1_000_000, kept_bodies=20_000, seed=1, now=time.time())

The database must already have the relay's schema (``smartrelay-ctl migrate`` with the
relay's config: bench/relay.py does that first, so the tables, indexes and, on SQLite, the
``auto_vacuum`` mode are exactly the relay's). Then, in big transactions (SQLite executemany,
PostgreSQL COPY):

* ``events`` events of about events / 4 finished messages, received over days 130 to 100 ago
  (evenly, one recipient each, recipients at gmail.com, yahoo.com, ...), in the mix a relay
  with open and click tracking writes: a ``received``, then ``delivered`` (96 %), ``bounced``
  (3 %, hard and soft, SMTP replies) or ``deferred`` then ``delivered`` (1 %), then for a
  delivered message 0-4 ``opened`` (mean 1.28) and 0-3 ``clicked`` (mean 0.78), hours later;
  about 4 events a message. ``data`` is the JSON the relay writes (sorted keys, the same
  fields). Every row differs (queue ids, addresses, sizes, IPs, user agents, URLs with ids).
  Their bodies are gone already (``raw`` empty, ``body_purged_at`` 7 days after finishing).
* ``kept_bodies`` messages finished 20 to 10 days ago that still hold their raw body (a
  personalized message of bench/load.py, 3-24 KB, behind a Received field, every one
  different), with their ``received`` and ``delivered`` events: due for the body purge
  (``message_bodies`` = 7 d) but not for the others.
* ``rollup_progress`` set to now: the roll-ups "have counted" every event of the backlog, so
  all of the old ones are due for the purge with the default ``events = "90d"``, and a roll-up
  service in the relay has nothing of the backlog to count while the benchmark runs.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import os
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import psycopg2
from load import SENDER, load

from smartrelay.ids import ID_BASE, encode_digits

DAY = 86400.0
OLD_FROM_DAYS = 130.0
OLD_TO_DAYS = 100.0
KEPT_FROM_DAYS = 20.0
KEPT_TO_DAYS = 10.0
#: The load messages holding the kept bodies start here (no phase of bench/relay.py uses them).
BODY_LOAD_START = 3_000_000
#: Messages per transaction.
CHUNK = 25_000

_SPREAD = 2654435761  # a prime: i -> i * _SPREAD mod 31**7 is one-to-one

DOMAINS = [
    ("gmail.com", 30, "gmail-smtp-in.l.google.com"),
    ("yahoo.com", 12, "mta5.am0.yahoodns.net"),
    ("outlook.com", 10, "outlook-com.olc.protection.outlook.com"),
    ("hotmail.com", 8, "hotmail-com.olc.protection.outlook.com"),
    ("icloud.com", 8, "mx01.mail.icloud.com"),
    ("gmx.de", 5, "mx00.emig.gmx.net"),
    ("web.de", 4, "mx-ha03.web.de"),
    ("orange.fr", 4, "smtp-in.orange.fr"),
    ("example.net", 19, "mx.example.net"),
]
_DOMAIN_WEIGHTS = [weight for _, weight, _ in DOMAINS]
FIRST = ["ana", "ben", "chen", "dara", "eli", "fatima", "gus", "hana", "ivan", "jun", "kofi"]
LAST = ["garcia", "schafer", "wei", "larsen", "okafor", "novak", "silva", "tanaka", "moreau"]
USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like"
    " Gecko) Mobile/15E148",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko)"
    " Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0"
    " Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
]
PATHS = ["orders", "account/reset", "track", "digest", "products", "help/returns", "unsubscribe"]
BOUNCES = [
    (
        "invalid-recipient",
        True,
        "5.1.1",
        "550 5.1.1 <{a}>: Recipient address rejected: User unknown",
    ),
    ("invalid-domain", True, "5.1.2", "550 5.1.2 <{a}>: Domain not found"),
    ("mailbox-full", False, "5.2.2", "552 5.2.2 <{a}>: Mailbox full, quota exceeded"),
    ("reputation-block", False, "5.7.1", "554 5.7.1 Service unavailable; client host blocked"),
    ("policy", False, "5.7.1", "550 5.7.1 Message rejected by policy"),
]
OPENS = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4]  # weights 35/30/15/10/10 %
CLICKS = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 3, 3]  # 50/30/10/10 %


@dataclass(frozen=True)
class Filled:
    """What :func:`fill` wrote."""

    events: int  # old events, all due
    messages: int  # old messages (bodies purged), due
    kept_bodies: int  # recent messages still holding their body (bodies due, rows not)
    kept_body_bytes: int
    recent_events: int  # the kept-body messages' events (not due)
    database_bytes: int
    seconds: float

    def line(self) -> str:
        if not self.messages:
            return (
                f"backlog: {self.events:,} events {OLD_TO_DAYS:.0f}-{OLD_FROM_DAYS:.0f} days old"
                " whose messages and recipients are gone already; database"
                f" {self.database_bytes / 2**20:,.0f} MiB; filled in {self.seconds:.0f} s"
            )
        return (
            f"backlog: {self.events:,} events of {self.messages:,} messages (and recipients)"
            f" finished {OLD_TO_DAYS:.0f}-{OLD_FROM_DAYS:.0f} days ago, bodies purged; plus"
            f" {self.kept_bodies:,} messages finished {KEPT_TO_DAYS:.0f}-{KEPT_FROM_DAYS:.0f}"
            f" days ago still holding their bodies ({self.kept_body_bytes / 2**20:,.0f} MiB)"
            f" with {self.recent_events:,} events; database {self.database_bytes / 2**20:,.0f}"
            f" MiB; filled in {self.seconds:.0f} s"
        )


def queue_id(ms: int, serial: int) -> str:
    """A queue id as smartrelay/ids.py makes them, unique by ``serial``."""
    return encode_digits(ms, 9) + encode_digits(serial * _SPREAD % ID_BASE**7, 7)


def _json(value: dict[str, object]) -> str:
    return json.dumps(value, sort_keys=True)


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


MessageRow = tuple[object, ...]
RecipientRow = tuple[object, ...]
EventRow = tuple[str, int, str, str, str]


@dataclass
class Chunk:
    messages: list[MessageRow]
    recipients: list[RecipientRow]
    events: list[EventRow]


class _Maker:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed * 7_919 + 13)
        self.serial = 0
        self._cumulative = []
        total = 0
        for weight in _DOMAIN_WEIGHTS:
            total += weight
            self._cumulative.append(total)
        self._total_weight = total

    def _domain(self) -> tuple[str, str]:
        pick = self.rng.random() * self._total_weight
        name, _, mx = DOMAINS[bisect.bisect_right(self._cumulative, pick)]
        return name, mx

    def _ip(self) -> str:
        r = self.rng
        first = r.choice((66, 74, 81, 92, 109, 151, 176, 203))
        return f"{first}.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}"

    def message(
        self, received: float, raw: bytes | None, size: int, old: bool
    ) -> tuple[MessageRow, RecipientRow, list[EventRow]]:
        """One finished message, its recipient and events. ``raw`` None: body purged."""
        r = self.rng
        self.serial += 1
        received_ms = int(received * 1000)
        qid = queue_id(received_ms, self.serial)
        domain, mx = self._domain()
        address = f"{r.choice(FIRST)}.{r.choice(LAST)}.{self.serial}@{domain}"
        client_ip = f"10.{r.randrange(4)}.{r.randrange(256)}.{r.randrange(1, 255)}"
        credential = r.choice(("app", "app", "billing", None))
        tag = r.choice(("receipt", "reset", "shipping", "digest"))
        events: list[EventRow] = [
            (
                "received",
                received_ms,
                qid,
                address,
                _json({"client_ip": client_ip, "credential": credential, "size": size}),
            )
        ]
        attempt_at = received + r.uniform(0.05, 2.0)
        attempts = 1
        fate = r.random() if old else 1.0
        queued_as = encode_digits(r.randrange(ID_BASE**10), 10)
        if 0.96 <= fate < 0.97:  # deferred once, delivered on the retry
            events.append(
                (
                    "deferred",
                    int(attempt_at * 1000),
                    qid,
                    address,
                    _json(
                        {
                            "attempt": 1,
                            "mx": mx,
                            "next_attempt": _rfc3339(attempt_at + 60),
                            "reply": "451 4.7.1 Greylisted, please try again later",
                        }
                    ),
                )
            )
            attempt_at += 60 + r.uniform(0, 2)
            attempts = 2
        if fate >= 0.97:
            category, hard, status, reply = r.choice(BOUNCES)
            reply = reply.format(a=address)
            state = "bounced"
            events.append(
                (
                    "bounced",
                    int(attempt_at * 1000),
                    qid,
                    address,
                    _json(
                        {
                            "category": category,
                            "hard": hard,
                            "reply": reply,
                            "source": "smtp",
                            "status": status,
                        }
                    ),
                )
            )
        else:
            state = "delivered"
            reply = f"250 2.0.0 OK {queued_as} - gsmtp"
            events.append(
                (
                    "delivered",
                    int(attempt_at * 1000),
                    qid,
                    address,
                    _json({"attempt": attempts, "mx": mx, "reply": reply, "tls": True}),
                )
            )
        finished_ms = int(attempt_at * 1000)
        if state == "delivered" and old:
            ip, agent = self._ip(), r.choice(USER_AGENTS)
            machine = "GoogleImageProxy" in agent
            for _ in range(r.choice(OPENS)):
                at = attempt_at + min(r.expovariate(1 / 21600), 7 * DAY)
                events.append(
                    (
                        "opened",
                        int(at * 1000),
                        qid,
                        address,
                        _json({"ip": ip, "machine": machine, "user_agent": agent}),
                    )
                )
            for _ in range(r.choice(CLICKS)):
                at = attempt_at + min(r.expovariate(1 / 21600), 7 * DAY)
                user = encode_digits(r.randrange(ID_BASE**8), 8)
                url = (
                    f"https://shop.example.com/{r.choice(PATHS)}/{r.randrange(10**7)}"
                    f"?utm_source=email&utm_campaign={tag}&u={user}"
                )
                events.append(
                    (
                        "clicked",
                        int(at * 1000),
                        qid,
                        address,
                        _json({"ip": ip, "machine": False, "url": url, "user_agent": agent}),
                    )
                )
        purged_ms = (
            finished_ms + int(7 * DAY * 1000) + r.randrange(300_000) if raw is None else None
        )
        message: MessageRow = (
            qid,
            received_ms,
            SENDER,
            size,
            client_ip,
            credential,
            json.dumps([tag]),
            _json({"customer": str(r.randrange(10**6))}) if r.random() < 0.5 else "{}",
            "{}",
            None,
            raw if raw is not None else b"",
            finished_ms,
            purged_ms,
        )
        recipient: RecipientRow = (
            qid,
            address,
            domain,
            state,
            attempts,
            None,
            None,
            reply,
            finished_ms,
        )
        return message, recipient, events


def _old_chunks(events: int, seed: int, now: float) -> Iterator[Chunk]:
    maker = _Maker(seed)
    expected_messages = max(1, events // 4)
    start = now - OLD_FROM_DAYS * DAY
    step = (OLD_FROM_DAYS - OLD_TO_DAYS) * DAY / expected_messages
    written = 0
    index = 0
    while written < events:
        chunk = Chunk([], [], [])
        while len(chunk.messages) < CHUNK and written < events:
            received = start + index * step + maker.rng.uniform(0, step)
            index += 1
            size = maker.rng.randrange(2_900, 24_000)
            message, recipient, rows = maker.message(received, None, size, old=True)
            rows = rows[: events - written]
            written += len(rows)
            chunk.messages.append(message)
            chunk.recipients.append(recipient)
            chunk.events += rows
        chunk.events.sort(key=lambda row: row[1])  # ids in time order, as the relay writes
        yield chunk


def _kept_chunks(count: int, seed: int, now: float) -> Iterator[Chunk]:
    maker = _Maker(seed + 1)
    maker.serial = 10**9  # queue ids unlike the old messages'
    start = now - KEPT_FROM_DAYS * DAY
    step = (KEPT_FROM_DAYS - KEPT_TO_DAYS) * DAY / max(1, count)
    done = 0
    while done < count:
        size = min(CHUNK // 5, count - done)
        chunk = Chunk([], [], [])
        for offset, body in enumerate(load(BODY_LOAD_START + done, size, seed)):
            received = start + (done + offset) * step
            raw = (
                f"Received: from bench.test (unknown [10.0.{offset % 256}.7])\r\n\tby"
                f" relay.bench.test with ESMTP id {queue_id(int(received * 1000), done + offset)}"
                f"\r\n\tfor <{body.recipient}>; {_rfc3339(received)}\r\n"
            ).encode() + body.data
            message, recipient, rows = maker.message(received, raw, len(raw), old=False)
            chunk.messages.append(message)
            chunk.recipients.append(recipient)
            chunk.events += rows
        done += size
        yield chunk


MESSAGE_COLUMNS = (
    "queue_id, received_at, sender, size, client_ip, credential, tags, metadata, options,"
    " idempotency_key, finished_at, body_purged_at"
)
BODY_COLUMNS = "queue_id, raw"


def split_messages(
    rows: Sequence[tuple[object, ...]],
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The chunk's message tuples (with ``raw`` at index 10) as rows of ``messages`` and of
    ``message_bodies`` (the bodies still kept: ``body_purged_at`` NULL)."""
    messages = [(*row[:10], *row[11:]) for row in rows]
    bodies = [(row[0], row[10]) for row in rows if row[12] is None]
    return messages, bodies


RECIPIENT_COLUMNS = (
    "queue_id, address, domain, state, attempts, next_attempt_at, lease_owner, last_reply,"
    " updated_at"
)
EVENT_COLUMNS = "type, time, queue_id, recipient, data"


class _Writer(Protocol):
    """Where a fill writes: one of the two engines, with its own bulk path."""

    def write(self, chunk: Chunk) -> None: ...

    def progress(self, now_ms: int) -> None: ...

    def close(self) -> None: ...


class _SqliteWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA synchronous=OFF")  # this connection only: a benchmark's fill

    def write(self, chunk: Chunk) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        messages, bodies = split_messages(chunk.messages)
        db.executemany(
            f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES ({', '.join('?' * 12)})", messages
        )
        db.executemany(f"INSERT INTO message_bodies ({BODY_COLUMNS}) VALUES (?, ?)", bodies)
        db.executemany(
            f"INSERT INTO recipients ({RECIPIENT_COLUMNS}) VALUES ({', '.join('?' * 9)})",
            chunk.recipients,
        )
        db.executemany(f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?)", chunk.events)
        db.execute("COMMIT")

    def progress(self, now_ms: int) -> None:
        self.db.execute(
            "INSERT INTO rollup_progress (name, time_ms, last_id) VALUES ('rollups', ?, 0)"
            " ON CONFLICT (name) DO UPDATE SET time_ms = excluded.time_ms, last_id = 0",
            (now_ms,),
        )

    def close(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()


def _copy_text(value: object) -> str:
    """One field in COPY's text format."""
    if value is None:
        return "\\N"
    if isinstance(value, bytes):
        return "\\\\x" + value.hex()
    if isinstance(value, bool):
        return "t" if value else "f"
    text = str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _copy(
    cursor: psycopg2.extensions.cursor, table: str, columns: str, rows: Sequence[tuple[object, ...]]
) -> None:
    buffer = io.StringIO()
    for row in rows:
        buffer.write("\t".join(_copy_text(value) for value in row))
        buffer.write("\n")
    buffer.seek(0)
    cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN", buffer)


class _PostgresWriter:
    def __init__(self, dsn: str) -> None:
        self.connection = psycopg2.connect(dsn)

    def write(self, chunk: Chunk) -> None:
        with self.connection, self.connection.cursor() as cursor:
            messages, bodies = split_messages(chunk.messages)
            _copy(cursor, "messages", MESSAGE_COLUMNS, messages)
            _copy(cursor, "message_bodies", BODY_COLUMNS, bodies)
            _copy(cursor, "recipients", RECIPIENT_COLUMNS, chunk.recipients)
            _copy(cursor, "events", EVENT_COLUMNS, chunk.events)

    def progress(self, now_ms: int) -> None:
        with self.connection, self.connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO rollup_progress (name, time_ms, last_id) VALUES ('rollups', %s, 0)"
                " ON CONFLICT (name) DO UPDATE SET time_ms = excluded.time_ms, last_id = 0",
                (now_ms,),
            )

    def close(self) -> None:
        # What months of autovacuum would have done, and the fill's WAL out of the way.
        self.connection.autocommit = True
        with self.connection.cursor() as cursor:
            cursor.execute("VACUUM (ANALYZE)")
            cursor.execute("CHECKPOINT")
        self.connection.close()


def fill(
    database_url: str,
    events: int,
    kept_bodies: int,
    seed: int,
    now: float | None = None,
    messages: bool = True,
) -> Filled:
    """Write the backlog (see the module docstring) into a migrated, empty database.
    ``messages`` False: the old events only, their messages and recipients gone already (a
    relay whose roll-ups lagged: messages go by ``finished_at``, events wait for the roll-ups);
    the purge then has only events to delete."""
    now = time.time() if now is None else now
    started = time.perf_counter()
    writer: _Writer
    if database_url.startswith("sqlite:"):
        writer = _SqliteWriter(database_url.removeprefix("sqlite:"))
    else:
        writer = _PostgresWriter(database_url)
    counts = {"events": 0, "messages": 0, "kept": 0, "kept_bytes": 0, "recent_events": 0}
    try:
        for chunk in _old_chunks(events, seed, now):
            if not messages:
                chunk = Chunk([], [], chunk.events)
            writer.write(chunk)
            counts["events"] += len(chunk.events)
            counts["messages"] += len(chunk.messages)
        for chunk in _kept_chunks(kept_bodies, seed, now):
            writer.write(chunk)
            counts["kept"] += len(chunk.messages)
            counts["kept_bytes"] += sum(len(m[10]) for m in chunk.messages)  # type: ignore[arg-type]
            counts["recent_events"] += len(chunk.events)
        writer.progress(int(now * 1000))
    finally:
        with contextlib.suppress(Exception):
            writer.close()
    return Filled(
        events=counts["events"],
        messages=counts["messages"],
        kept_bodies=counts["kept"],
        kept_body_bytes=counts["kept_bytes"],
        recent_events=counts["recent_events"],
        database_bytes=database_size(database_url),
        seconds=time.perf_counter() - started,
    )


def database_size(database_url: str) -> int:
    """Bytes on disk: the SQLite file and its WAL, or ``pg_database_size``."""
    if database_url.startswith("sqlite:"):
        path = database_url.removeprefix("sqlite:")
        return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    with contextlib.closing(psycopg2.connect(database_url)) as connection:
        cursor = connection.cursor()
        cursor.execute("SELECT pg_database_size(current_database())")
        row = cursor.fetchone()
    return int(row[0]) if row else 0
