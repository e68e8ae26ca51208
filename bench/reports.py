"""The reports' queries on a big database: 100,000 messages and 1,000,000 events.

    .venv/bin/python bench/reports.py [--engine sqlite|postgresql] [--messages 100000]
        [--events 1000000] [--seed 1] [--runs 20] [--keep PATH] [--accept-cost]

:func:`generate` fills a database (a fresh SQLite file, or a throwaway PostgreSQL server from
tests/support/postgres.py) with messages and events that are all different and look like a
transactional relay's month: 300 sender domains and 2,000 recipient domains, both with a long
tail (Zipf), one to five recipients a message, tags out of 60 and per-message metadata, every
event type (received, deferred, delivered, bounced by SMTP and by DSN, expired, suppressed,
opened and clicked by people and by machines, unsubscribed, complained, dropped) in plausible
proportions, over 30 days ending now; recipients still deferred or queued in the last days,
bodies (with a Subject) kept for a week, feedback reports for the DSN bounces and complaints.
It writes straight into the tables by bulk inserts (the search terms by the same function the
accept path uses), then runs the roll-up as the relay does. The lead's browser tests and the
dashboard bench call ``generate(store_or_url, messages, events, seed)``.

Then it times (median and max of ``--runs`` runs) the dashboard's queries and a message
search by each filter, and prints a table. ``--accept-cost`` instead measures what writing the
search terms costs the accept path (``queue_message`` with and without them). It prints
numbers; it is not a test.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from attrs import frozen  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.interfaces import IReactorTime  # noqa: E402

from smartrelay.events import (  # noqa: E402
    BouncedEvent,
    ClickedEvent,
    ComplainedEvent,
    DeferredEvent,
    DeliveredEvent,
    DroppedEvent,
    EventData,
    ExpiredEvent,
    OpenedEvent,
    ReceivedEvent,
    SuppressedEvent,
    UnsubscribedEvent,
    event_data,
)
from smartrelay.ids import new_queue_id  # noqa: E402
from smartrelay.reactor import as_relay_reactor  # noqa: E402
from smartrelay.storage import queue as queue_module  # noqa: E402
from smartrelay.storage.base import domain_of  # noqa: E402
from smartrelay.storage.engines import create_engine  # noqa: E402
from smartrelay.storage.interfaces import ICursor  # noqa: E402
from smartrelay.storage.migrations import migrate  # noqa: E402
from smartrelay.storage.reports import MessageFilters  # noqa: E402
from smartrelay.storage.search_terms import message_terms  # noqa: E402
from smartrelay.storage.store import NewMessage, Store  # noqa: E402

DAY_MS = 86_400_000
SPAN_MS = 30 * DAY_MS
BODY_KEPT_MS = 7 * DAY_MS
MESSAGES_PER_TXN = 2000
CATEGORIES = [
    ("invalid-recipient", True, "5.1.1", "550 5.1.1 user unknown"),
    ("mailbox-full", False, "4.2.2", "452 4.2.2 mailbox full"),
    ("reputation-block", False, "5.7.1", "554 5.7.1 blocked by policy, see https://x.example"),
    ("policy", True, "5.7.26", "550 5.7.26 unauthenticated email is not accepted"),
    ("technical", False, "4.4.1", "451 4.4.1 connection timed out"),
]
BIG_DOMAINS = [
    "gmail.com",
    "yahoo.com",
    "outlook.com",
    "hotmail.com",
    "icloud.com",
    "aol.com",
    "gmx.de",
    "web.de",
    "orange.fr",
    "free.fr",
    "mail.ru",
    "yandex.ru",
    "qq.com",
    "comcast.net",
    "t-online.de",
]
TAGS = [
    "welcome",
    "password-reset",
    "invoice",
    "receipt",
    "shipping",
    "digest",
    "alert",
    "verify",
    "reminder",
    "survey",
] + [f"campaign-2026-{n:02d}" for n in range(50)]
LOCAL = ["noreply", "news", "billing", "support", "alerts", "hello", "orders", "team"]
URL_PATHS = ["/", "/login", "/orders", "/invoice", "/unsubscribe-prefs", "/product", "/blog"]


@frozen
class Generated:
    messages: int
    recipients: int
    events: int
    feedback_reports: int
    #: Writing the rows, then rolling them up.
    seconds: float
    rollup_seconds: float
    end_ms: int


def zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return list(itertools.accumulate(1 / (rank**s) for rank in range(1, n + 1)))


def pick(rng: random.Random, items: list[str], cumulative: list[float]) -> str:
    return items[bisect.bisect(cumulative, rng.random() * cumulative[-1])]


@frozen
class Plan:
    """One message: (address, fate) per recipient, before its rows are made."""

    received_ms: int
    sender: str
    recipients: tuple[tuple[str, str], ...]
    tags: tuple[str, ...]
    metadata: dict[str, str]


def base_events(fate: str) -> int:
    return {
        "delivered": 2,
        "deferred-delivered": 3,
        "bounced": 2,
        "deferred-bounced": 3,
        "suppressed": 2,
        "expired": 4,
        "dropped": 3,
        "pending": 3,
        "queued": 1,
    }[fate]


def plan_messages(count: int, rng: random.Random, end_ms: int) -> list[Plan]:
    senders = [f"s{n}-{rng.randrange(10**6)}.example" for n in range(300)]
    sender_weights = zipf_weights(len(senders), 1.0)
    domains = BIG_DOMAINS + [f"r{n}.example" for n in range(2000 - len(BIG_DOMAINS))]
    domain_weights = zipf_weights(len(domains), 1.1)
    tag_weights = zipf_weights(len(TAGS), 0.8)
    start_ms = end_ms - SPAN_MS
    times = sorted(start_ms + rng.randrange(SPAN_MS - 60_000) for _ in range(count))
    plans = []
    user = 0
    for received_ms in times:
        age = end_ms - received_ms
        sender = f"{rng.choice(LOCAL)}@{pick(rng, senders, sender_weights)}"
        n = 1 if rng.random() < 0.85 else rng.randint(2, 5)
        recipients = []
        for _ in range(n):
            user += 1
            address = f"user{user}.{rng.randrange(10**4)}@{pick(rng, domains, domain_weights)}"
            f = rng.random()
            if age < 600_000 and f < 0.5:
                fate = "queued"
            elif age < 2 * DAY_MS and f < 0.03:
                fate = "pending"
            elif f < 0.84:
                fate = "delivered"
            elif f < 0.90:
                fate = "deferred-delivered"
            elif f < 0.94:
                fate = "bounced"
            elif f < 0.96:
                fate = "deferred-bounced"
            elif f < 0.985:
                fate = "suppressed"
            elif f < 0.995 and age > 5 * DAY_MS:
                fate = "expired"
            elif f < 0.997:
                fate = "dropped"
            else:
                fate = "delivered"
            recipients.append((address, fate))
        tags = tuple(
            dict.fromkeys(
                pick(rng, TAGS, tag_weights) for _ in range(rng.choice((0, 1, 1, 1, 2, 3)))
            )
        )
        metadata = {"user_id": str(rng.randrange(10**9))}
        if rng.random() < 0.3:
            metadata["order"] = f"O-{rng.randrange(10**7)}"
        plans.append(Plan(received_ms, sender, tuple(recipients), tags, metadata))
    return plans


def engagement(rng: random.Random, count: int, url_base: str, user: str) -> list[EventData]:
    events: list[EventData] = []
    for _ in range(count):
        r = rng.random()
        machine = rng.random() < 0.2
        if r < 0.62:
            events.append(
                OpenedEvent(
                    "Mozilla/5.0" if not machine else "GoogleImageProxy", "192.0.2.7", machine
                )
            )
        elif r < 0.975:
            url = f"{url_base}{rng.choice(URL_PATHS)}?u={user}&utm_source=mail"
            events.append(ClickedEvent("Mozilla/5.0", "192.0.2.7", machine and r < 0.7, url))
        elif r < 0.988:
            events.append(UnsubscribedEvent(rng.choice(("one-click", "page", "mailto"))))
        elif r < 0.994:
            events.append(ComplainedEvent("abuse", "fbl.example"))
        else:
            c = rng.choice(CATEGORIES)
            events.append(BouncedEvent(c[0], c[1], c[2], c[3], "dsn"))
    return events


async def generate(
    store_or_url: Store | str,
    messages: int = 100_000,
    events: int = 1_000_000,
    seed: int = 1,
    end: float | None = None,
    reactor: IReactorTime | None = None,
    roll_up: bool = True,
) -> Generated:
    """Fill a database with ``messages`` messages and exactly ``events`` events over the 30
    days before ``end`` (default: the store's clock, or the time now), then roll them up
    (unless ``roll_up`` is false: a bench that only reads events skips that).

    ``store_or_url``: a started, migrated :class:`Store`, or a database URL (the engine is
    started, the schema migrated, and closed at the end; pass the ``reactor``)."""
    if isinstance(store_or_url, str):
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor  # type: ignore[assignment]
        assert reactor is not None
        engine = create_engine(as_relay_reactor(reactor), store_or_url)  # type: ignore[arg-type]
        await engine.start()
        try:
            await migrate(engine, 0)
            return await generate(
                Store(engine, reactor), messages, events, seed, end, roll_up=roll_up
            )
        finally:
            await engine.close()
    store = store_or_url
    began = time.perf_counter()
    end_ms = round((store.clock.seconds() if end is None else end) * 1000)
    rng = random.Random(seed)
    plans = plan_messages(messages, rng, end_ms)
    base = sum(base_events(f) for p in plans for _, f in p.recipients)
    if base > events:
        raise ValueError(f"{events} events are too few for {messages} messages (at least {base})")
    # The rest are engagement events of delivered recipients, a few of them very active.
    slots = [
        (i, k)
        for i, p in enumerate(plans)
        for k, (_, f) in enumerate(p.recipients)
        if f in ("delivered", "deferred-delivered")
    ]
    activity = list(itertools.accumulate(rng.paretovariate(1.5) for _ in slots))
    picks = Counter(
        slots[bisect.bisect(activity, rng.random() * activity[-1])] for _ in range(events - base)
    )
    written = [0, 0, 0]  # recipients, events, feedback reports
    for start in range(0, len(plans), MESSAGES_PER_TXN):
        part = list(enumerate(plans[start : start + MESSAGES_PER_TXN], start))
        rows = _rows(part, picks, rng, end_ms)
        written[0] += len(rows["recipients"])
        written[1] += len(rows["events"])
        written[2] += len(rows["feedback"])

        async def txn(cursor: ICursor, rows: dict[str, list[Any]] = rows) -> None:
            await cursor.executemany(
                "INSERT INTO messages (queue_id, received_at, sender, size, client_ip, credential,"
                " tags, metadata, options, finished_at, body_purged_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, '{}', ?, ?)",
                rows["messages"],
            )
            await cursor.executemany(
                "INSERT INTO message_bodies (queue_id, raw) VALUES (?, ?)", rows["bodies"]
            )
            await cursor.executemany(
                "INSERT INTO message_terms (term, received_at, queue_id) VALUES (?, ?, ?)",
                rows["terms"],
            )
            await cursor.executemany(
                "INSERT INTO recipients (queue_id, address, domain, state, attempts,"
                " next_attempt_at, last_reply, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows["recipients"],
            )
            await cursor.executemany(
                "INSERT INTO events (time, type, queue_id, recipient, data) VALUES (?, ?, ?, ?, ?)",
                rows["events"],
            )
            await cursor.executemany(
                "INSERT INTO feedback_reports (report_id, received_at, sender, recipients,"
                " state, processed_at, raw, kind, reason, matched_by, queue_id, recipient)"
                " VALUES (?, ?, ?, ?, 'processed', ?, ?, ?, ?, 'verp', ?, ?)",
                rows["feedback"],
            )

        await store.engine.run_interaction("generate", txn)
    assert written[1] == events, (written[1], events)
    written_at = time.perf_counter()
    # Counted as the relay's roll-up service does, up to a minute before the end.
    while roll_up and await store.roll_up(end_ms / 1000 - 60, 20_000) == 20_000:
        pass
    return Generated(
        messages,
        written[0],
        written[1],
        written[2],
        written_at - began,
        time.perf_counter() - written_at,
        end_ms,
    )


def _rows(
    part: list[tuple[int, Plan]], picks: Counter[tuple[int, int]], rng: random.Random, end_ms: int
) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {
        k: [] for k in ("messages", "bodies", "terms", "recipients", "events", "feedback")
    }
    for i, p in part:
        queue_id = new_queue_id(p.received_ms / 1000)[:9] + f"{i:07d}"
        subject = f"Your {p.tags[0] if p.tags else 'message'} #{rng.randrange(10**6)}"
        raw = (
            f"From: {p.sender}\r\nTo: {p.recipients[0][0]}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{queue_id}@relay.example>\r\nMIME-Version: 1.0\r\n\r\n"
            + "Hello,\r\n"
            * rng.randrange(5, 60)
        ).encode()
        url_base = f"https://{domain_of(p.sender)}"
        finished = None
        for k, (address, fate) in enumerate(p.recipients):
            t = p.received_ms
            evs: list[tuple[int, EventData]] = [(t, ReceivedEvent(len(raw), "198.51.100.4", "app"))]
            state, attempts, next_at, reply = fate, 1, None, "250 2.0.0 ok"
            outcome_at: int | None = None
            mx = f"mx.{domain_of(address)}"
            if fate.startswith("deferred-") or fate in ("expired", "pending"):
                c = CATEGORIES[4]
                evs.append((t + 30_000, DeferredEvent(mx, c[3], 1, "")))
                t += rng.randrange(300_000, 3_600_000)
                attempts = 2
            if fate in ("delivered", "deferred-delivered"):
                state = "delivered"
                outcome_at = t + rng.randrange(200, 5000)
                evs.append((outcome_at, DeliveredEvent(mx, reply, True, attempts)))
            elif fate in ("bounced", "deferred-bounced"):
                state = "bounced"
                c = rng.choice(CATEGORIES)
                reply = c[3]
                outcome_at = t + 900
                evs.append((outcome_at, BouncedEvent(c[0], c[1], c[2], c[3], "smtp")))
            elif fate == "suppressed":
                reply = "suppressed: hard_bounce"
                outcome_at = t + 50
                evs.append((outcome_at, SuppressedEvent("hard_bounce")))
            elif fate == "expired":
                evs.append((t + DAY_MS, DeferredEvent(mx, "451 later", 3, "")))
                outcome_at = t + 4 * DAY_MS
                evs.append((outcome_at, ExpiredEvent(4)))
                attempts, reply = 4, "451 4.4.1 connection timed out"
            elif fate == "dropped":
                reply = "dropped by the operator"
                evs.append((t + 60_000, DeferredEvent(mx, "451 later", 1, "")))
                outcome_at = t + 120_000
                evs.append((outcome_at, DroppedEvent("queue drop")))
            elif fate == "pending":
                state = "deferred"
                evs.append((t + 60_000, DeferredEvent(mx, "421 4.7.0 try again later", 2, "")))
                next_at = max(end_ms + rng.randrange(60_000, 3_600_000), t + 120_000)
                reply = "421 4.7.0 try again later"
            elif fate == "queued":
                state, attempts, next_at, reply = "queued", 0, end_ms + 5_000, None
            count = picks.get((i, k), 0)
            if count:
                after = evs[-1][0]
                for n, event in enumerate(engagement(rng, count, url_base, f"{i}.{k}")):
                    when = min(after + rng.randrange(60_000, 3 * DAY_MS) + n, end_ms - 61_000)
                    evs.append((max(when, after), event))
                    if isinstance(event, BouncedEvent | ComplainedEvent):
                        kind = "bounce" if isinstance(event, BouncedEvent) else "complaint"
                        out["feedback"].append(
                            (
                                f"R{queue_id}{k}{n}",
                                max(when, after) - 1000,
                                "MAILER-DAEMON@" + domain_of(address),
                                json.dumps([f"b-{queue_id}@bounce.relay.example"]),
                                max(when, after),
                                b"(report)",
                                kind,
                                f"{kind}d: {getattr(event, 'category', 'abuse')}",
                                queue_id,
                                address,
                            )
                        )
            for when, event in evs:
                out["events"].append(
                    (
                        when,
                        event.type,
                        queue_id,
                        address,
                        json.dumps(event_data(event), sort_keys=True),
                    )
                )
            if outcome_at is None:
                finished = -1  # a recipient still to deliver: the message is not finished
            elif finished is None or finished >= 0:
                finished = max(finished or 0, outcome_at)
            out["recipients"].append(
                (
                    queue_id,
                    address,
                    domain_of(address),
                    state,
                    attempts if fate != "queued" else 0,
                    next_at,
                    reply,
                    outcome_at or evs[-1][0],
                )
            )
        done = None if finished is None or finished < 0 else finished
        purged = done is not None and end_ms - done > BODY_KEPT_MS
        out["messages"].append(
            (
                queue_id,
                p.received_ms,
                p.sender,
                len(raw),
                "198.51.100.4",
                "app",
                json.dumps(list(p.tags)),
                json.dumps(p.metadata, sort_keys=True),
                done,
                done + BODY_KEPT_MS if purged and done is not None else None,
            )
        )
        if not purged:
            out["bodies"].append((queue_id, raw))
        terms = message_terms(p.sender, [a for a, _ in p.recipients], p.tags, p.metadata)
        out["terms"].extend((term, p.received_ms, queue_id) for term in terms)
    out["events"].sort()
    return out


# -- timing ------------------------------------------------------------------------------


async def timed(runs: int, query: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(median, max) in milliseconds over ``runs`` runs (after one warm-up run)."""
    await query()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await query()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times)


async def sample(store: Store, sql: str, args: tuple[Any, ...] = ()) -> Any:
    async def txn(cursor: ICursor) -> Any:
        await cursor.execute(sql, args)
        row = cursor.fetchone()
        return None if row is None else row[0]

    return await store.engine.run_interaction("sample", txn, readonly=True)


async def queries(
    store: Store, end: float
) -> Iterator[tuple[str, Callable[[], Awaitable[object]]]]:
    """The dashboard's and the search page's queries, with values taken from the data."""
    day, month = 86400.0, 30 * 86400.0
    big_tag = "welcome"
    rare_domain = await sample(
        store, "SELECT domain FROM recipients WHERE domain LIKE 'r19%' LIMIT 1"
    )
    some = await sample(
        store,
        "SELECT queue_id FROM messages WHERE received_at < ? ORDER BY received_at DESC LIMIT 1",
        (round((end - 9 * day) * 1000),),
    )
    address = await sample(store, "SELECT address FROM recipients WHERE queue_id = ?", (some,))
    sender = await sample(store, "SELECT sender FROM messages WHERE queue_id = ?", (some,))
    metadata = json.loads(
        await sample(store, "SELECT metadata FROM messages WHERE queue_id = ?", (some,))
    )
    sender_domain = "@" + domain_of(sender)
    page = await store.search_messages(MessageFilters(), limit=50)
    second = page.next_cursor
    late = await store.search_messages(MessageFilters(until=end - 20 * day), limit=50)

    def search(after: str | None = None, **filters: Any) -> Callable[[], Awaitable[object]]:
        return lambda: store.search_messages(MessageFilters(**filters), after)

    items: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("rollup_totals 24 h", lambda: store.rollup_totals(end - day, end)),
        ("rollup_totals 30 d", lambda: store.rollup_totals(end - month, end)),
        ("rollup_totals 30 d, tag", lambda: store.rollup_totals(end - month, end, tag=big_tag)),
        (
            "rollup_totals 30 d, recipient domain",
            lambda: store.rollup_totals(end - month, end, recipient_domain="gmail.com"),
        ),
        ("rollup_series 30 d", lambda: store.rollup_series(end - month, end)),
        (
            "rollup_series 7 d, sender domain",
            lambda: store.rollup_series(end - 7 * day, end, sender_domain=sender_domain[1:]),
        ),
        ("top_recipient_domains 30 d", lambda: store.top_recipient_domains(end - month, end)),
        (
            "top_recipient_domains 30 d, tag",
            lambda: store.top_recipient_domains(end - month, end, tag=big_tag),
        ),
        ("top_urls 30 d", lambda: store.top_urls(end - month, end)),
        ("top_urls 30 d, tag", lambda: store.top_urls(end - month, end, tag=big_tag)),
        ("search: no filter, page 1", search()),
        ("search: no filter, page 2", search(after=second)),
        ("search: page after 20 d", search(after=late.next_cursor)),
        ("search: queue id", search(queue_id=some)),
        ("search: recipient", search(recipient=address)),
        ("search: recipient @gmail.com", search(recipient="@gmail.com")),
        (f"search: recipient @{rare_domain}", search(recipient="@" + rare_domain)),
        ("search: sender", search(sender=sender)),
        ("search: sender @domain", search(sender=sender_domain)),
        ("search: tag", search(tag=big_tag)),
        ("search: rare tag", search(tag="campaign-2026-49")),
        ("search: metadata", search(metadata=("user_id", metadata["user_id"]))),
        ("search: time range (1 day, 9 d ago)", search(since=end - 10 * day, until=end - 9 * day)),
        ("search: outcome delivered", search(outcome="delivered")),
        ("search: outcome bounced", search(outcome="bounced")),
        ("search: outcome expired", search(outcome="expired")),
        ("search: outcome deferred", search(outcome="deferred")),
        ("search: outcome dropped", search(outcome="dropped")),
        (
            "search: @gmail.com + tag + bounced",
            search(recipient="@gmail.com", tag=big_tag, outcome="bounced"),
        ),
        ("search: nothing matches (@nowhere)", search(recipient="@nowhere.example")),
        (
            "search: tag + time range 9 d ago",
            search(tag=big_tag, since=end - 10 * day, until=end - 9 * day),
        ),
        ("message_detail", lambda: store.message_detail(some)),
        ("deferred_by_destination", lambda: store.deferred_by_destination(50)),
        ("deferred_messages gmail.com", lambda: store.deferred_messages("gmail.com")),
        ("recent_feedback", lambda: store.recent_feedback()),
        ("recent_feedback complaint", lambda: store.recent_feedback(kind="complaint")),
    ]
    return iter(items)


class ExplainingCursor:
    """A cursor that EXPLAINs the first statement of a transaction before running it."""

    def __init__(self, cursor: ICursor, engine: str, plans: list[str]) -> None:
        self._cursor = cursor
        self._prefix = "EXPLAIN QUERY PLAN " if engine == "sqlite" else "EXPLAIN "
        self._plans = plans

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    async def execute(self, sql: str, args: Any = ()) -> None:
        if not self._plans:
            await self._cursor.execute(self._prefix + sql, args)
            self._plans.extend(" | ".join(str(c) for c in r) for r in self._cursor.fetchall())
        await self._cursor.execute(sql, args)


async def explain(store: Store, call: Callable[[], Awaitable[object]]) -> list[str]:
    """The plan of the first statement ``call`` runs."""
    plans: list[str] = []
    run = store.run

    async def explaining(name: str, txn: Any, readonly: bool = False) -> Any:
        async def wrapped(cursor: ICursor) -> Any:
            return await txn(ExplainingCursor(cursor, store.engine.name, plans))

        return await run(name, wrapped, readonly)

    store.run = explaining  # type: ignore[method-assign]
    try:
        await call()
    finally:
        store.run = run  # type: ignore[method-assign]
    return plans


async def bench(reactor: Any, url: str, args: argparse.Namespace) -> None:
    engine = create_engine(as_relay_reactor(reactor), url)
    await engine.start()
    try:
        await migrate(engine, 0)
        store = Store(engine, reactor)
        have = await sample(store, "SELECT COUNT(*) FROM events")
        if have:
            print(f"{engine.name}: reusing {have:,} events")
            end_ms = int(await sample(store, "SELECT MAX(time) FROM events"))
        else:
            made = await generate(store, args.messages, args.events, args.seed)
            end_ms = made.end_ms
            print(
                f"{engine.name}: generated {made.messages:,} messages,"
                f" {made.recipients:,} recipients, {made.events:,} events,"
                f" {made.feedback_reports:,} feedback reports in {made.seconds:.1f} s,"
                f" rolled them up in {made.rollup_seconds:.1f} s"
            )
        for table in ("rollups", "rollup_urls", "message_terms"):
            print(f"  {table}: {await sample(store, f'SELECT COUNT(*) FROM {table}'):,} rows")
        if engine.name == "postgresql":
            await sample(store, "ANALYZE")
        end = end_ms / 1000
        print(f"| query | {engine.name} median ms | max ms |")
        print("| --- | ---: | ---: |")
        for name, query in await queries(store, end):
            median, worst = await timed(args.runs, query)
            flag = "" if worst < 300 else "  **over 300 ms**"
            print(f"| {name} | {median:.1f} | {worst:.1f}{flag} |")
        if args.explain:
            for name, query in await queries(store, end):
                if name.startswith("search") or name.startswith("top_"):
                    print(f"\n{name}:")
                    for line in await explain(store, query):
                        print(f"    {line}")
    finally:
        await engine.close()


async def accept_cost(reactor: Any, url: str, args: argparse.Namespace) -> None:
    """queue_message throughput, 100 concurrent clients, with and without the terms."""
    engine = create_engine(as_relay_reactor(reactor), url)
    await engine.start()
    try:
        await migrate(engine, 0)
        store = Store(engine, reactor)
        raw = b"Subject: x\r\n\r\n" + b"body\r\n" * 300
        original = queue_module.insert_terms

        async def nothing(cursor: ICursor, rows: Any) -> None:
            list(rows)

        async def client(n: int) -> None:
            for k in range(args.accept_messages // 100):
                await store.queue_message(
                    NewMessage(
                        f"app@s{n}.example",
                        (f"u{n}.{k}@r{k % 50}.example", f"v{n}.{k}@gmail.com"),
                        raw,
                        tags=("welcome", "t2"),
                        metadata={"user_id": str(n * 1000 + k), "order": "O-1"},
                    )
                )

        rounds = [("with terms", original), ("without terms", nothing)]
        for label, insert in rounds + rounds[::-1] + rounds:
            queue_module.insert_terms = insert  # type: ignore[assignment]
            t0 = time.perf_counter()
            await gatherResults([Deferred.fromCoroutine(client(n)) for n in range(100)])
            elapsed = time.perf_counter() - t0
            print(f"{engine.name} accept {label}: {args.accept_messages / elapsed:,.0f} messages/s")
        queue_module.insert_terms = original
    finally:
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--keep", help="SQLite: the database file, kept and reused")
    parser.add_argument("--url", help="an existing database (e.g. PostgreSQL), reused if filled")
    parser.add_argument("--accept-cost", action="store_true")
    parser.add_argument("--explain", action="store_true", help="print the search plans")
    parser.add_argument("--accept-messages", type=int, default=10_000)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url
        elif args.engine == "postgresql":
            from tests.support.postgres import running_postgres

            url = stack.enter_context(running_postgres()).create_database()
        elif args.keep:
            url = f"sqlite:{args.keep}"
        else:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="reports-bench-"))
            url = f"sqlite:{os.path.join(directory, 'bench.db')}"
        run = accept_cost if args.accept_cost else bench
        task.react(lambda reactor: Deferred.fromCoroutine(run(reactor, url, args)))


if __name__ == "__main__":
    main()
