"""The ``suppressions`` table: entries read and written as the policy decides
(:mod:`smartrelay.suppression`); storage itself decides nothing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from smartrelay.config import SuppressionConfig
from smartrelay.storage.base import StoreBase, chunks, from_ms, marks, to_ms
from smartrelay.storage.batching import GroupCommitter
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from smartrelay.suppression import REASONS, Suppress

SUPPRESSION_REASONS = REASONS
#: At most this many entries per page of :meth:`SuppressionStore.search_suppressions`.
MAX_SEARCH_PAGE = 1000

_UPSERT = (
    "INSERT INTO suppressions (address, reason, created_at, expires_at, note)"
    " VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (address) DO UPDATE SET reason = excluded.reason,"
    " created_at = excluded.created_at, expires_at = excluded.expires_at,"
    " note = excluded.note"
)
_COLUMNS = "SELECT address, reason, created_at, expires_at, note FROM suppressions"


@frozen
class Suppression:
    address: str
    reason: str
    created_at: float
    expires_at: float | None
    note: str


@frozen
class SuppressionPage:
    """A page of :meth:`SuppressionStore.search_suppressions`; ``next_after``: the ``after``
    of the next page (None on the last)."""

    rows: tuple[Suppression, ...]
    next_after: str | None


@frozen
class ImportCounts:
    """What :meth:`SuppressionStore.import_suppressions` did."""

    added: int
    updated: int


@frozen
class NewSuppression:
    address: str
    reason: str = "manual"
    expires_at: float | None = None
    note: str = ""


async def write_suppressions(cursor: ICursor, now_ms: int, entries: Iterable[Suppress]) -> None:
    """Add or replace entries (addresses lower-cased already) inside the caller's transaction."""
    rows = [
        (
            e.address,
            e.reason,
            now_ms,
            None if e.expires_at is None else to_ms(e.expires_at),
            e.note,
        )
        for e in entries
    ]
    if rows:
        await cursor.executemany(_UPSERT, rows)


async def clear_soft_bounces(cursor: ICursor, addresses: Iterable[str]) -> None:
    """Remove the soft-bounce entries of ``addresses`` (lower-cased already)."""
    wanted = sorted(set(addresses))
    for chunk in chunks(wanted):
        await cursor.write_many(
            "DELETE FROM suppressions WHERE reason = 'soft_bounce'"
            f" AND address IN ({marks(len(chunk))})",
            [chunk],
        )


async def count_soft_bounces(cursor: ICursor, address: str, since_ms: int) -> int:
    """``bounced`` events of ``address`` (lower-cased) at or after ``since_ms`` and after its
    latest ``delivered`` event (a delivery starts the count again)."""
    await cursor.execute(
        "SELECT COUNT(*) FROM events WHERE lower(recipient) = ? AND time >= ? AND type = 'bounced'"
        " AND id > COALESCE((SELECT MAX(id) FROM events WHERE lower(recipient) = ?"
        "  AND time >= ? AND type = 'delivered'), 0)",
        (address, since_ms, address, since_ms),
    )
    row = cursor.fetchone()
    return 0 if row is None else int(row[0])


async def current_entry(cursor: ICursor, address: str) -> tuple[str, float | None] | None:
    """The reason and expiry of ``address``'s entry (in force or not), or None."""
    await cursor.execute(
        "SELECT reason, expires_at FROM suppressions WHERE address = ?", (address,)
    )
    row = cursor.fetchone()
    return None if row is None else (str(row[0]), from_ms(row[1]))


class SuppressionStore(StoreBase):
    def __init__(
        self,
        engine: IDatabaseEngine,
        clock: IReactorTime,
        suppression: SuppressionConfig | None = None,
    ) -> None:
        super().__init__(engine, clock, suppression)
        self._suppression_reader: GroupCommitter[frozenset[str], dict[str, Suppression]] = (
            GroupCommitter(self._active_suppressions_batch, max_batch=200)
        )

    async def add_suppression(
        self,
        address: str,
        reason: str,
        expires_at: float | None = None,
        note: str = "",
    ) -> None:
        """Suppress ``address`` (case-insensitive); replaces an existing entry."""
        await self.add_suppressions([NewSuppression(address, reason, expires_at, note)])

    async def add_suppressions(self, entries: Sequence[NewSuppression]) -> None:
        """Add or replace several entries in one transaction (all or nothing)."""
        for entry in entries:
            if entry.reason not in SUPPRESSION_REASONS:
                raise ValueError(f"unknown suppression reason {entry.reason!r}")
        now_ms = self.now_ms()
        rows = [Suppress(e.address.lower(), e.reason, e.expires_at, e.note) for e in entries]

        async def txn(cursor: ICursor) -> None:
            await write_suppressions(cursor, now_ms, rows)

        await self.run("add_suppressions", txn)

    async def remove_suppression(self, address: str) -> bool:
        async def txn(cursor: ICursor) -> bool:
            await cursor.execute("DELETE FROM suppressions WHERE address = ?", (address.lower(),))
            return int(cursor.rowcount) > 0

        return await self.run("remove_suppression", txn)

    async def import_suppressions(self, entries: Sequence[NewSuppression]) -> ImportCounts:
        """Add or replace ``entries`` in one transaction (all or nothing) and count the new
        addresses and the replaced entries (an address listed twice: its last entry wins)."""
        for entry in entries:
            if entry.reason not in SUPPRESSION_REASONS:
                raise ValueError(f"unknown suppression reason {entry.reason!r}")
        now_ms = self.now_ms()
        latest = {
            e.address.lower(): Suppress(e.address.lower(), e.reason, e.expires_at, e.note)
            for e in entries
        }
        addresses = sorted(latest)

        async def txn(cursor: ICursor) -> ImportCounts:
            existing = 0
            for chunk in chunks(addresses):
                await cursor.execute(
                    f"SELECT COUNT(*) FROM suppressions WHERE address IN ({marks(len(chunk))})",
                    chunk,
                )
                row = cursor.fetchone()
                existing += 0 if row is None else int(row[0])
            for chunk in chunks(addresses):
                await write_suppressions(cursor, now_ms, [latest[a] for a in chunk])
            return ImportCounts(len(addresses) - existing, existing)

        return await self.run("import_suppressions", txn)

    async def search_suppressions(
        self,
        address: str | None = None,
        domain: str | None = None,
        reason: str | None = None,
        include_expired: bool = False,
        after: str | None = None,
        limit: int = 50,
    ) -> SuppressionPage:
        """Entries by address order from just after ``after`` (keyset): one ``address``
        (exact, any case), or those of a ``domain`` (``@domain``, exact), of a ``reason``; in
        force now unless ``include_expired``."""
        if not 1 <= limit <= MAX_SEARCH_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_SEARCH_PAGE}, not {limit}")
        now_ms = self.now_ms()
        sql = _COLUMNS + " WHERE 1 = 1"
        args: list[Any] = []
        if address is not None:
            sql += " AND address = ?"
            args.append(address.strip().lower())
        if domain is not None:
            # LIKE with its wildcards escaped: the domain's characters are literal.
            escaped = domain.strip().lstrip("@").lower()
            for char in "!%_":
                escaped = escaped.replace(char, "!" + char)
            sql += " AND address LIKE ? ESCAPE '!'"
            args.append("%@" + escaped)
        if reason is not None:
            sql += " AND reason = ?"
            args.append(reason)
        if not include_expired:
            sql += " AND (expires_at IS NULL OR expires_at > ?)"
            args.append(now_ms)
        if after is not None:
            sql += " AND address > ?"
            args.append(after)
        sql += " ORDER BY address LIMIT ?"
        args.append(limit + 1)

        async def txn(cursor: ICursor) -> SuppressionPage:
            await cursor.execute(sql, args)
            found = [_suppression(row) for row in cursor.fetchall()]
            rows = tuple(found[:limit])
            return SuppressionPage(rows, rows[-1].address if len(found) > limit else None)

        return await self.run("search_suppressions", txn, readonly=True)

    async def list_suppressions(self, include_expired: bool = False) -> list[Suppression]:
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> list[Suppression]:
            sql = _COLUMNS
            args: tuple[Any, ...] = ()
            if not include_expired:
                sql += " WHERE expires_at IS NULL OR expires_at > ?"
                args = (now_ms,)
            await cursor.execute(sql + " ORDER BY address", args)
            return [_suppression(row) for row in cursor.fetchall()]

        return await self.run("list_suppressions", txn, readonly=True)

    async def active_suppressions(self, addresses: Iterable[str]) -> dict[str, Suppression]:
        """The entries in force now for any of ``addresses``, keyed by lower-cased address.

        Lookups made while another is under way share the next query (a delivery job asks
        just before it sends when the entries read with its message are over
        ``DeliveryTunables.suppressions_fresh_for`` old); each still sees every entry
        committed before it asked.
        """
        wanted = frozenset(a.lower() for a in addresses)
        if not wanted:
            return {}
        return await self._suppression_reader.submit(wanted)

    async def _active_suppressions_batch(
        self, batch: Sequence[frozenset[str]]
    ) -> list[dict[str, Suppression]]:
        wanted = frozenset().union(*batch)
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> dict[str, Suppression]:
            return await active_suppressions_in(cursor, wanted, now_ms)

        found = await self.run("active_suppressions", txn, readonly=True)
        return [{a: found[a] for a in addresses if a in found} for addresses in batch]


async def active_suppressions_in(
    cursor: ICursor, addresses: Iterable[str], now_ms: int
) -> dict[str, Suppression]:
    """The entries in force at ``now_ms`` for any of ``addresses`` (lower-cased already),
    keyed by address: a part of another topic's transaction (loading jobs' messages)."""
    found: dict[str, Suppression] = {}
    for chunk in chunks(sorted(set(addresses))):
        await cursor.execute(
            f"{_COLUMNS} WHERE address IN ({marks(len(chunk))})"
            " AND (expires_at IS NULL OR expires_at > ?)",
            (*chunk, now_ms),
        )
        found.update((str(row[0]), _suppression(row)) for row in cursor.fetchall())
    return found


def _suppression(row: Sequence[Any]) -> Suppression:
    return Suppression(
        address=str(row[0]),
        reason=str(row[1]),
        created_at=int(row[2]) / 1000,
        expires_at=from_ms(row[3]),
        note=str(row[4]),
    )
