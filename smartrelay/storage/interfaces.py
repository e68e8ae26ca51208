"""The seam between the storage layer and the two database engines.

Every transaction is written once, as ``async def txn(cursor: ICursor) -> T``, and runs
unchanged on SQLite and PostgreSQL: each engine supplies a cursor whose ``execute`` returns a
Deferred (txpostgres natively; SQLite through a dedicated thread per connection).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from smartrelay.spool import SpooledBody

T = TypeVar("T")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
Row = tuple[Any, ...]
Transaction = Callable[["ICursor"], Awaitable[T]]


class ICursor(Interface):
    """A cursor inside one open transaction. SQL uses ``?`` placeholders on every engine."""

    rowcount = Attribute("Rows affected by the last execute (-1 when unknown).")

    def execute(sql: str, args: Sequence[Any] = ()) -> Deferred[None]:
        """Run one statement; its result rows (if any) are then read with fetchone/fetchall."""

    def executemany(sql: str, rows: Sequence[Sequence[Any]]) -> Deferred[None]:
        """Run one statement once per parameter row."""

    def write_many(sql: str, rows: Sequence[Sequence[Any]]) -> Deferred[None]:
        """Like :meth:`executemany`, for writes nothing is read back from (no rows, no
        ``rowcount``): the engine may send them with the transaction's next statement or its
        COMMIT, so that on PostgreSQL a run of such writes costs no round trip of its own.
        An error of theirs then comes from that later statement (the transaction fails as
        it would have); statements still run in the order they were given."""

    def fetchone() -> Row | None:
        """The next result row of the last execute, or None."""

    def fetchall() -> list[Row]:
        """The remaining result rows of the last execute (bytes columns as ``bytes``)."""

    def notify(channel: str) -> Deferred[None]:
        """Wake the listeners of ``channel`` once (and only if) this transaction commits."""

    def read_blob(table: str, column: str, key_column: str, key: str) -> Deferred[bytes]:
        """``column`` of the row whose ``key_column`` is ``key``, read in pieces where the
        engine allows (a big value is then in memory once, not several times over)."""

    def write_blob(
        table: str, column: str, key_column: str, key: str, head: bytes, body: SpooledBody
    ) -> Deferred[None]:
        """Set ``column`` of the row whose ``key_column`` is ``key`` to ``head`` followed by
        the file's content, without a whole copy in memory where the engine allows."""


class IDatabaseEngine(Interface):
    """One database: a pool of connections, transactions, and change notifications."""

    name = Attribute("'sqlite' or 'postgresql'.")
    supports_skip_locked = Attribute("True when SELECT ... FOR UPDATE SKIP LOCKED works.")

    def start() -> Deferred[None]:
        """Open the connections."""

    def close() -> Deferred[None]:
        """Close every connection; waits for transactions under way."""

    def run_interaction(name: str, txn: Transaction[T], readonly: bool = False) -> Deferred[T]:
        """Run ``txn`` in one transaction: committed if it returns, rolled back if it raises."""

    def listen(channel: str, callback: Callable[[], object]) -> Deferred[None]:
        """Call ``callback`` whenever a committed transaction (on any node) notifies ``channel``."""

    def schema_sql(text: str) -> str:
        """Rewrite a portable schema file for this engine (column types, identity columns)."""

    def lock_statement() -> str | None:
        """SQL taking a transaction-scoped lock on a text key (one ``?``), or None when the
        engine serialises writers anyway (SQLite)."""

    def version() -> str:
        """The database server or library version, for the start-up line."""


def check_identifiers(*names: str) -> tuple[str, ...]:
    """``names`` unchanged if each is a plain lower-case SQL identifier (they are put in SQL
    text), else ValueError."""
    for name in names:
        if not _IDENTIFIER.match(name):
            raise ValueError(f"bad SQL identifier {name!r}")
    return names
