"""Tables of names with password hashes: SMTP credentials and web users."""

from __future__ import annotations

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from smartrelay.config import SuppressionConfig
from smartrelay.storage.base import StoreBase
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine, check_identifiers


@frozen
class Login:
    name: str
    created_at: float


class DuplicateName(Exception):
    """A credential or web user of that name exists already."""


class LoginTable:
    """One table of names with password hashes (``store.smtp_credentials``, ``store.web_users``)."""

    def __init__(self, store: StoreBase, table: str) -> None:
        self._store = store
        (self._table,) = check_identifiers(table)

    async def add(self, name: str, password_hash: str) -> None:
        now_ms = self._store.now_ms()

        async def txn(cursor: ICursor) -> None:
            await cursor.execute(
                f"INSERT INTO {self._table} (name, password_hash, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (name, password_hash, now_ms),
            )
            if int(cursor.rowcount) == 0:
                raise DuplicateName(name)

        await self._store.run(f"add_{self._table}", txn)

    async def set_password(self, name: str, password_hash: str) -> bool:
        async def txn(cursor: ICursor) -> bool:
            await cursor.execute(
                f"UPDATE {self._table} SET password_hash = ? WHERE name = ?",
                (password_hash, name),
            )
            return int(cursor.rowcount) > 0

        return await self._store.run(f"password_{self._table}", txn)

    async def remove(self, name: str) -> bool:
        async def txn(cursor: ICursor) -> bool:
            await cursor.execute(f"DELETE FROM {self._table} WHERE name = ?", (name,))
            return int(cursor.rowcount) > 0

        return await self._store.run(f"remove_{self._table}", txn)

    async def list(self) -> list[Login]:
        async def txn(cursor: ICursor) -> list[Login]:
            await cursor.execute(f"SELECT name, created_at FROM {self._table} ORDER BY name")
            return [Login(str(r[0]), int(r[1]) / 1000) for r in cursor.fetchall()]

        return await self._store.run(f"list_{self._table}", txn, readonly=True)

    async def password_hash(self, name: str) -> str | None:
        async def txn(cursor: ICursor) -> str | None:
            await cursor.execute(f"SELECT password_hash FROM {self._table} WHERE name = ?", (name,))
            row = cursor.fetchone()
            return None if row is None else str(row[0])

        return await self._store.run(f"hash_{self._table}", txn, readonly=True)


class LoginStore(StoreBase):
    def __init__(
        self,
        engine: IDatabaseEngine,
        clock: IReactorTime,
        suppression: SuppressionConfig | None = None,
    ) -> None:
        super().__init__(engine, clock, suppression)
        self.smtp_credentials = LoginTable(self, "smtp_credentials")
        self.web_users = LoginTable(self, "web_users")
