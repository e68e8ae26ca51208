"""Bearer tokens for ``GET /api/events`` and ``/metrics`` (schema 013, docs/api.md).

A token is ``srt_`` and 43 base64url characters (256 random bits), shown once by
``smartrelay-ctl api-token add NAME``. Only its SHA-256 is stored: a token that random cannot
be guessed from its hash, so a fast hash is enough, and a token is found by its hash, with no
comparison of secrets that could leak time.
"""

from __future__ import annotations

import hashlib
import secrets

from attrs import frozen

from smartrelay.storage.base import StoreBase, from_ms
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.logins import DuplicateName

__all__ = ["TOKEN_PREFIX", "ApiToken", "ApiTokenStore", "generate_api_token", "token_hash"]

TOKEN_PREFIX = "srt_"
#: ``last_used_at`` is written at most this often per token (seconds): a CRM polling every
#: second must not make every request a write.
LAST_USED_PRECISION = 60.0


def generate_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@frozen
class ApiToken:
    name: str
    created_at: float
    last_used_at: float | None


class ApiTokenStore(StoreBase):
    async def add_api_token(self, name: str, token: str) -> None:
        """Store ``token`` (its hash) under ``name``; :class:`DuplicateName` if taken."""
        now_ms = self.now_ms()

        async def txn(cursor: ICursor) -> None:
            await cursor.execute(
                "INSERT INTO api_tokens (name, token_hash, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (name, token_hash(token), now_ms),
            )
            if int(cursor.rowcount) == 0:
                raise DuplicateName(name)

        await self.run("add_api_token", txn)

    async def remove_api_token(self, name: str) -> bool:
        async def txn(cursor: ICursor) -> bool:
            await cursor.execute("DELETE FROM api_tokens WHERE name = ?", (name,))
            return int(cursor.rowcount) > 0

        return await self.run("remove_api_token", txn)

    async def list_api_tokens(self) -> list[ApiToken]:
        async def txn(cursor: ICursor) -> list[ApiToken]:
            await cursor.execute(
                "SELECT name, created_at, last_used_at FROM api_tokens ORDER BY name"
            )
            return [ApiToken(str(r[0]), int(r[1]) / 1000, from_ms(r[2])) for r in cursor.fetchall()]

        return await self.run("list_api_tokens", txn, readonly=True)

    async def api_token_name(self, token: str) -> str | None:
        """The name of the token ``token``, or None when there is none (it is noted as used
        now, at most once a minute)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = token_hash(token)
        now_ms = self.now_ms()
        stale_ms = now_ms - int(LAST_USED_PRECISION * 1000)

        async def txn(cursor: ICursor) -> str | None:
            await cursor.execute(
                "SELECT name, last_used_at FROM api_tokens WHERE token_hash = ?", (digest,)
            )
            row = cursor.fetchone()
            if row is None:
                return None
            if row[1] is None or int(row[1]) < stale_ms:
                await cursor.execute(
                    "UPDATE api_tokens SET last_used_at = ? WHERE token_hash = ?",
                    (now_ms, digest),
                )
            return str(row[0])

        return await self.run("api_token_name", txn)
