"""The reports UI's sessions and its login throttle (``web_sessions``, ``web_login_failures``).

Both live in the database so that every node behind a load balancer knows them: a session
made on one node is good on another, and failed logins counted on one slow down the next
attempt on any.
"""

from __future__ import annotations

from attrs import frozen

from smartrelay.storage.base import StoreBase, to_ms
from smartrelay.storage.interfaces import ICursor


@frozen
class WebSession:
    """A logged-in browser: who, and the token its forms must carry."""

    username: str
    csrf: str


@frozen
class SessionTimes:
    """How long a session lasts: ``idle`` seconds without a request, ``absolute`` in all."""

    idle: float
    absolute: float


class WebSessionStore(StoreBase):
    async def create_web_session(
        self, token_hash: str, username: str, csrf: str, times: SessionTimes
    ) -> bool:
        """Store a new session for ``username``; False if there is no such user (removed
        between the password check and now). Expired sessions are deleted on the way."""
        now = self.now_ms()

        async def txn(cursor: ICursor) -> bool:
            await cursor.execute("DELETE FROM web_sessions WHERE expires_at <= ?", (now,))
            await cursor.execute("SELECT 1 FROM web_users WHERE name = ?", (username,))
            if cursor.fetchone() is None:
                return False
            await cursor.execute(
                "INSERT INTO web_sessions"
                " (token_hash, username, csrf, created_at, idle_until, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    token_hash,
                    username,
                    csrf,
                    now,
                    now + to_ms(times.idle),
                    now + to_ms(times.absolute),
                ),
            )
            return True

        return await self.run("create_web_session", txn)

    async def web_session(self, token_hash: str, times: SessionTimes) -> WebSession | None:
        """The live session of this token, its idle time restarted; None if there is none or
        it has expired."""
        now = self.now_ms()

        async def txn(cursor: ICursor) -> WebSession | None:
            await cursor.execute(
                "SELECT username, csrf, idle_until, expires_at FROM web_sessions"
                " WHERE token_hash = ?",
                (token_hash,),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            if int(row[2]) <= now or int(row[3]) <= now:
                await cursor.execute("DELETE FROM web_sessions WHERE token_hash = ?", (token_hash,))
                return None
            idle_until = min(now + to_ms(times.idle), int(row[3]))
            # Written at most once a minute per session: a page that loads five images does
            # not write five times.
            if idle_until - int(row[2]) >= 60_000:
                await cursor.execute(
                    "UPDATE web_sessions SET idle_until = ? WHERE token_hash = ?",
                    (idle_until, token_hash),
                )
            return WebSession(str(row[0]), str(row[1]))

        return await self.run("web_session", txn)

    async def end_web_session(self, token_hash: str) -> None:
        async def txn(cursor: ICursor) -> None:
            await cursor.execute("DELETE FROM web_sessions WHERE token_hash = ?", (token_hash,))

        await self.run("end_web_session", txn)

    async def end_web_sessions_of(self, username: str) -> int:
        """End every session of ``username`` (after a password change); how many there were."""

        async def txn(cursor: ICursor) -> int:
            await cursor.execute("DELETE FROM web_sessions WHERE username = ?", (username,))
            return int(cursor.rowcount)

        return await self.run("end_web_sessions_of", txn)

    async def login_failures(self, keys: tuple[str, ...], window: float) -> list[tuple[int, float]]:
        """(failures, last failure time in seconds) of each key that failed within ``window``
        seconds."""
        since = self.now_ms() - to_ms(window)

        async def txn(cursor: ICursor) -> list[tuple[int, float]]:
            found = []
            for key in keys:
                await cursor.execute(
                    "SELECT failures, last_failure_at FROM web_login_failures"
                    " WHERE key = ? AND last_failure_at > ?",
                    (key, since),
                )
                row = cursor.fetchone()
                if row is not None:
                    found.append((int(row[0]), int(row[1]) / 1000))
            return found

        return await self.run("login_failures", txn, readonly=True)

    async def record_login_failure(self, keys: tuple[str, ...], window: float) -> None:
        """Count one failed login against each key; a key's count restarts after ``window``
        seconds without a failure. Rows older than the window are deleted."""
        now = self.now_ms()
        since = now - to_ms(window)

        async def txn(cursor: ICursor) -> None:
            await cursor.execute(
                "DELETE FROM web_login_failures WHERE last_failure_at <= ?", (since,)
            )
            for key in keys:
                await cursor.execute(
                    "INSERT INTO web_login_failures (key, failures, last_failure_at)"
                    " VALUES (?, 1, ?) ON CONFLICT (key) DO UPDATE"
                    " SET failures = web_login_failures.failures + 1,"
                    " last_failure_at = excluded.last_failure_at",
                    (key, now),
                )

        await self.run("record_login_failure", txn)

    async def clear_login_failures(self, keys: tuple[str, ...]) -> None:
        async def txn(cursor: ICursor) -> None:
            for key in keys:
                await cursor.execute("DELETE FROM web_login_failures WHERE key = ?", (key,))

        await self.run("clear_login_failures", txn)
