"""The operator's side of the webhooks (docs/webhooks.md, "Operations"): each endpoint's status,
enable / disable, the dead-letter list and replays, for ``smartrelay-ctl webhooks`` and the
reports UI's queue page.

It meets the dispatcher (smartrelay/webhooks/) only through the tables of schema 012, whose
comments are the contract: the dispatcher sends ``active`` endpoints from their position and
every dead-letter row whose ``replay_requested_at`` is set (deleting the row once sent, or
clearing ``replay_requested_at`` and bumping ``attempts`` when the replay failed). This module
only reads those tables, flips an endpoint's state, and sets ``replay_requested_at``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from attrs import frozen

from smartrelay.storage.base import chunks, from_ms, marks
from smartrelay.storage.event_positions import EventPosition, EventPositionStore
from smartrelay.storage.interfaces import ICursor

__all__ = [
    "BACKLOG_CAP",
    "DeadLetter",
    "DeadLetterState",
    "WebhookAdminStore",
    "WebhookEndpointStatus",
]

#: Backlogs are counted up to this many events (then shown as "100,000+"): the count stays
#: cheap for an endpoint that has been down for days.
BACKLOG_CAP = 100_000
#: Dead letters listed at most (the CLI and the UI): the list stays bounded however long an
#: endpoint was down.
DEAD_LETTERS_SHOWN = 1000

EndpointState = Literal["active", "disabled", "new"]


@frozen
class WebhookEndpointStatus:
    """One endpoint as the operator sees it: the dispatcher's row, and the config's view."""

    url: str
    #: In the config now (an endpoint removed from the config keeps its row and dead letters).
    in_config: bool
    #: The configured event types (empty when not in the config).
    events: tuple[str, ...]
    #: ``new``: configured, but no relay has started sending to it yet.
    state: EndpointState
    disabled_at: float | None
    disabled_reason: str | None
    #: Every event up to here was acknowledged or dead-lettered (None while ``new``).
    position: EventPosition | None
    #: Events of its types after ``position`` up to the events' head, at most
    #: :data:`BACKLOG_CAP`; None when not counted (``new``, or not in the config).
    backlog: int | None
    failing_since: float | None
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    last_success_at: float | None
    sent_events: int
    failures: int
    #: Dead-letter rows, and the events in them.
    dead_letters: int
    dead_events: int

    @property
    def backlog_capped(self) -> bool:
        return self.backlog is not None and self.backlog >= BACKLOG_CAP

    @property
    def backlog_text(self) -> str:
        """``"1,234"``, ``"100,000+"`` when the count stopped at the cap, ``"-"`` when none."""
        if self.backlog is None:
            return "-"
        return f"{self.backlog:,}" + ("+" if self.backlog_capped else "")


@frozen
class DeadLetter:
    """A range of events an endpoint did not take within its ``retry_for``."""

    id: int
    url: str
    events: int
    first_event_at: float | None
    last_event_at: float | None
    created_at: float
    attempts: int
    last_error: str
    #: When a replay was asked for (None: none asked, or the last one failed).
    replay_requested_at: float | None
    #: A replay got part of the range through (it goes on from there).
    replay_started: bool


@frozen
class DeadLetterState:
    """Where the replay of one dead letter is (``smartrelay-ctl webhooks dead replay --wait``)."""

    id: int
    #: ``sent`` (the row is gone), ``failed`` (the replay failed again) or ``waiting``.
    state: Literal["sent", "failed", "waiting"]
    last_error: str | None


_ENDPOINT_COLUMNS = (
    "url, position_txid, position_id, state, disabled_at, disabled_reason, failing_since,"
    " attempts, next_attempt_at, last_error, last_success_at, sent_events, failures"
)
_DEAD_COLUMNS = (
    "id, url, events, first_event_at, last_event_at, created_at, attempts, last_error,"
    " replay_requested_at, replay_txid"
)


def _dead_letter(row: Sequence[Any]) -> DeadLetter:
    return DeadLetter(
        id=int(row[0]),
        url=str(row[1]),
        events=int(row[2]),
        first_event_at=from_ms(row[3]),
        last_event_at=from_ms(row[4]),
        created_at=int(row[5]) / 1000,
        attempts=int(row[6]),
        last_error=str(row[7]),
        replay_requested_at=from_ms(row[8]),
        replay_started=row[9] is not None,
    )


class WebhookAdminStore(EventPositionStore):
    """(An EventPositionStore: it counts backlogs from the endpoints' positions.)"""

    async def webhook_endpoints_status(
        self, configured: Mapping[str, Sequence[str]]
    ) -> list[WebhookEndpointStatus]:
        """Every endpoint the dispatcher has a row for, and every configured url it has not
        seen yet (``new``), in url order; ``configured`` maps each ``[[webhooks]]`` url to its
        event types."""

        async def txn(cursor: ICursor) -> tuple[list[tuple[Any, ...]], dict[str, tuple[int, int]]]:
            await cursor.execute(f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints")
            rows = [tuple(r) for r in cursor.fetchall()]
            await cursor.execute(
                "SELECT url, COUNT(*), SUM(events) FROM webhook_dead_letters GROUP BY url"
            )
            dead = {str(r[0]): (int(r[1]), int(r[2] or 0)) for r in cursor.fetchall()}
            return rows, dead

        rows, dead = await self.run("webhook_endpoints_status", txn, readonly=True)
        head = await self.event_head()
        found: dict[str, WebhookEndpointStatus] = {}
        for r in rows:
            url = str(r[0])
            position = EventPosition(int(r[1]), int(r[2]))
            types = tuple(configured.get(url, ()))
            backlog = None
            if url in configured:
                backlog = await self.count_events_between(position, head, types, cap=BACKLOG_CAP)
            rows_dead, events_dead = dead.get(url, (0, 0))
            found[url] = WebhookEndpointStatus(
                url=url,
                in_config=url in configured,
                events=types,
                state="disabled" if r[3] == "disabled" else "active",
                disabled_at=from_ms(r[4]),
                disabled_reason=None if r[5] is None else str(r[5]),
                position=position,
                backlog=backlog,
                failing_since=from_ms(r[6]),
                attempts=int(r[7]),
                next_attempt_at=from_ms(r[8]),
                last_error=None if r[9] is None else str(r[9]),
                last_success_at=from_ms(r[10]),
                sent_events=int(r[11]),
                failures=int(r[12]),
                dead_letters=rows_dead,
                dead_events=events_dead,
            )
        for url, wanted in configured.items():
            if url not in found:
                rows_dead, events_dead = dead.get(url, (0, 0))
                found[url] = WebhookEndpointStatus(
                    url=url,
                    in_config=True,
                    events=tuple(wanted),
                    state="new",
                    disabled_at=None,
                    disabled_reason=None,
                    position=None,
                    backlog=None,
                    failing_since=None,
                    attempts=0,
                    next_attempt_at=None,
                    last_error=None,
                    last_success_at=None,
                    sent_events=0,
                    failures=0,
                    dead_letters=rows_dead,
                    dead_events=events_dead,
                )
        return [found[url] for url in sorted(found)]

    async def webhook_urls(self) -> set[str]:
        """Every url the dispatcher has a row or a dead letter for."""

        async def txn(cursor: ICursor) -> set[str]:
            await cursor.execute(
                "SELECT url FROM webhook_endpoints UNION SELECT url FROM webhook_dead_letters"
            )
            return {str(r[0]) for r in cursor.fetchall()}

        return await self.run("webhook_urls", txn, readonly=True)

    async def set_webhook_state(
        self,
        url: str,
        state: Literal["active", "disabled"],
        reason: str = "",
        create: bool = False,
    ) -> bool:
        """Enable (``active``: the disabled time and reason and the current run of failures
        are cleared, so the endpoint is tried at once) or disable (the operator's ``reason``
        is kept) the endpoint ``url``. False when it has no row; with ``create``, a missing
        row is made first, at the events' head, as the dispatcher makes it (for a configured
        endpoint no relay has sent to yet)."""
        if state not in ("active", "disabled"):
            raise ValueError(f"unknown webhook state {state!r}")
        head = await self.event_head() if create else None
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> bool:
            if head is not None:
                await cursor.execute(
                    "INSERT INTO webhook_endpoints (url, position_txid, position_id, created_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (url) DO NOTHING",
                    (url, head.txid, head.id, now_ms),
                )
            if state == "active":
                await cursor.execute(
                    "UPDATE webhook_endpoints SET state = 'active', disabled_at = NULL,"
                    " disabled_reason = NULL, failing_since = NULL, attempts = 0,"
                    " next_attempt_at = NULL, last_error = NULL WHERE url = ?",
                    (url,),
                )
            else:
                await cursor.execute(
                    "UPDATE webhook_endpoints SET state = 'disabled', disabled_at = ?,"
                    " disabled_reason = ? WHERE url = ?",
                    (now_ms, reason, url),
                )
            return int(cursor.rowcount) > 0

        return await self.run("set_webhook_state", txn)

    async def list_dead_letters(
        self, url: str | None = None, limit: int = DEAD_LETTERS_SHOWN
    ) -> list[DeadLetter]:
        """The dead letters (of ``url`` only, when given), oldest first, at most ``limit``."""

        async def txn(cursor: ICursor) -> list[DeadLetter]:
            where, args = ("WHERE url = ?", [url]) if url is not None else ("", [])
            await cursor.execute(
                f"SELECT {_DEAD_COLUMNS} FROM webhook_dead_letters {where} ORDER BY id LIMIT ?",
                (*args, limit),
            )
            return [_dead_letter(r) for r in cursor.fetchall()]

        return await self.run("list_dead_letters", txn, readonly=True)

    async def request_replay(self, dead_id: int | None, url: str | None = None) -> int:
        """Ask the dispatcher to send dead letter ``dead_id`` again (None: every dead letter,
        of ``url`` when given); how many rows were asked for. A replay under way keeps its
        progress (``replay_txid/replay_id``): it goes on from there."""
        return len(await self.request_replay_ids(dead_id, url))

    async def request_replay_ids(self, dead_id: int | None, url: str | None = None) -> list[int]:
        """:meth:`request_replay`, returning the ids of the rows asked for."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> list[int]:
            where: list[str] = []
            args: list[Any] = []
            if dead_id is not None:
                where.append("id = ?")
                args.append(dead_id)
            if url is not None:
                where.append("url = ?")
                args.append(url)
            condition = f"WHERE {' AND '.join(where)}" if where else ""
            await cursor.execute(f"SELECT id FROM webhook_dead_letters {condition}", args)
            ids = sorted(int(r[0]) for r in cursor.fetchall())
            for part in chunks(ids):
                await cursor.execute(
                    "UPDATE webhook_dead_letters SET replay_requested_at = ?"
                    f" WHERE id IN ({marks(len(part))})",
                    (now_ms, *part),
                )
            return ids

        return await self.run("request_replay", txn)

    async def dead_letter_states(self, ids: Sequence[int]) -> list[DeadLetterState]:
        """Where the replays of dead letters ``ids`` are (in ``ids``' order)."""

        async def txn(cursor: ICursor) -> dict[int, tuple[Any, ...]]:
            found: dict[int, tuple[Any, ...]] = {}
            for part in chunks(ids):
                await cursor.execute(
                    "SELECT id, replay_requested_at, last_error FROM webhook_dead_letters"
                    f" WHERE id IN ({marks(len(part))})",
                    tuple(part),
                )
                found.update({int(r[0]): tuple(r) for r in cursor.fetchall()})
            return found

        found = await self.run("dead_letter_states", txn, readonly=True)
        states: list[DeadLetterState] = []
        for dead_id in ids:
            row = found.get(dead_id)
            if row is None:
                states.append(DeadLetterState(dead_id, "sent", None))
            elif row[1] is None:
                states.append(DeadLetterState(dead_id, "failed", str(row[2])))
            else:
                states.append(DeadLetterState(dead_id, "waiting", None))
        return states
