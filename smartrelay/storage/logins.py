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
    #: An SMTP credential whose mail never leaves the relay (schema 015; web users: False).
    sandbox: bool = False


@frozen
class CredentialCheck:
    """What AUTH needs of an SMTP credential, read in one query: its password hash, and
    whether it is a sandbox credential."""

    password_hash: str
    sandbox: bool


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


class CredentialTable(LoginTable):
    """``smtp_credentials``: a login table whose rows also say whether they are sandbox
    credentials (docs/smtp.md, "Sandbox credentials")."""

    def __init__(self, store: StoreBase) -> None:
        super().__init__(store, "smtp_credentials")

    async def add(self, name: str, password_hash: str, sandbox: bool = False) -> None:
        now_ms = self._store.now_ms()

        async def txn(cursor: ICursor) -> None:
            await cursor.execute(
                "INSERT INTO smtp_credentials (name, password_hash, created_at, sandbox)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (name, password_hash, now_ms, int(sandbox)),
            )
            if int(cursor.rowcount) == 0:
                raise DuplicateName(name)

        await self._store.run("add_smtp_credentials", txn)

    async def list(self) -> list[Login]:
        async def txn(cursor: ICursor) -> list[Login]:
            await cursor.execute(
                "SELECT name, created_at, sandbox FROM smtp_credentials ORDER BY name"
            )
            return [Login(str(r[0]), int(r[1]) / 1000, bool(r[2])) for r in cursor.fetchall()]

        return await self._store.run("list_smtp_credentials", txn, readonly=True)

    async def check_record(self, name: str) -> CredentialCheck | None:
        """The credential's password hash and sandbox flag (None: no such credential)."""

        async def txn(cursor: ICursor) -> CredentialCheck | None:
            await cursor.execute(
                "SELECT password_hash, sandbox FROM smtp_credentials WHERE name = ?", (name,)
            )
            row = cursor.fetchone()
            return None if row is None else CredentialCheck(str(row[0]), bool(row[1]))

        return await self._store.run("check_smtp_credentials", txn, readonly=True)


class LoginStore(StoreBase):
    def __init__(
        self,
        engine: IDatabaseEngine,
        clock: IReactorTime,
        suppression: SuppressionConfig | None = None,
    ) -> None:
        super().__init__(engine, clock, suppression)
        self.smtp_credentials = CredentialTable(self)
        self.web_users = LoginTable(self, "web_users")
