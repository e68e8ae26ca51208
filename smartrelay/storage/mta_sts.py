"""The MTA-STS tables (schema 016): policies fetched (``mta_sts_policies``) and TLS results per
policy domain per day (``tls_report_results``), docs/delivery.md "MTA-STS".

The delivery side (:mod:`smartrelay.delivery.mta_sts`) keeps policies in memory too; the
table lets a restarted relay, a delivery process or another node use a policy until its
``max_age`` runs out instead of fetching it again. The results table is what a TLS-RPT
(RFC 8460) report for a day is made of: successful and failed sessions per policy domain,
failures by result type and receiving MX.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import frozen

from smartrelay.storage.base import StoreBase, from_ms, to_ms
from smartrelay.storage.interfaces import ICursor

__all__ = ["StoredStsPolicy", "StsPolicyStore", "TlsResult", "TlsResultRow"]


@frozen
class StoredStsPolicy:
    domain: str
    policy_id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int  # seconds
    fetched_at: float
    expires_at: float
    policy_text: str


@frozen
class TlsResult:
    """One session's (or policy fetch's) outcome, to be counted."""

    day: str  # YYYY-MM-DD, UTC
    policy_domain: str
    policy_id: str
    mode: str
    result: str  # "success" or an RFC 8460 result type
    mx_host: str
    detail: str = ""


@frozen
class TlsResultRow:
    day: str
    policy_domain: str
    policy_id: str
    mode: str
    result: str
    mx_host: str
    sessions: int
    detail: str


class StsPolicyStore(StoreBase):
    async def load_sts_policy(self, domain: str) -> StoredStsPolicy | None:
        async def txn(cursor: ICursor) -> StoredStsPolicy | None:
            await cursor.execute(
                "SELECT domain, policy_id, mode, mx, max_age, fetched_at, expires_at,"
                " policy_text FROM mta_sts_policies WHERE domain = ?",
                (domain,),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            return StoredStsPolicy(
                domain=str(row[0]),
                policy_id=str(row[1]),
                mode=str(row[2]),
                mx=tuple(m for m in str(row[3]).split("\n") if m),
                max_age=int(row[4]),
                fetched_at=from_ms(int(row[5])) or 0.0,
                expires_at=from_ms(int(row[6])) or 0.0,
                policy_text=str(row[7]),
            )

        return await self.run("load_sts_policy", txn, readonly=True)

    async def save_sts_policy(self, policy: StoredStsPolicy) -> None:
        async def txn(cursor: ICursor) -> None:
            await cursor.execute(
                "INSERT INTO mta_sts_policies (domain, policy_id, mode, mx, max_age,"
                " fetched_at, expires_at, policy_text) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (domain) DO UPDATE SET policy_id = excluded.policy_id,"
                " mode = excluded.mode, mx = excluded.mx, max_age = excluded.max_age,"
                " fetched_at = excluded.fetched_at, expires_at = excluded.expires_at,"
                " policy_text = excluded.policy_text",
                (
                    policy.domain,
                    policy.policy_id,
                    policy.mode,
                    "\n".join(policy.mx),
                    policy.max_age,
                    to_ms(policy.fetched_at),
                    to_ms(policy.expires_at),
                    policy.policy_text,
                ),
            )

        await self.run("save_sts_policy", txn)

    async def add_tls_results(self, results: Sequence[TlsResult]) -> None:
        """Count each result once (one session each), in one transaction."""
        if not results:
            return

        async def txn(cursor: ICursor) -> None:
            await cursor.executemany(
                "INSERT INTO tls_report_results (day, policy_domain, policy_id, mode, result,"
                " mx_host, sessions, detail) VALUES (?, ?, ?, ?, ?, ?, 1, ?)"
                " ON CONFLICT (day, policy_domain, policy_id, result, mx_host) DO UPDATE SET"
                " sessions = tls_report_results.sessions + 1, mode = excluded.mode,"
                " detail = excluded.detail",
                [
                    (r.day, r.policy_domain, r.policy_id, r.mode, r.result, r.mx_host, r.detail)
                    for r in results
                ],
            )

        await self.run("add_tls_results", txn)

    async def tls_results(
        self, since_day: str, until_day: str, domain: str | None = None
    ) -> list[TlsResultRow]:
        """Rows of the days ``since_day`` to ``until_day`` (inclusive, YYYY-MM-DD)."""

        async def txn(cursor: ICursor) -> list[TlsResultRow]:
            where = "day >= ? AND day <= ?"
            args: tuple[str, ...] = (since_day, until_day)
            if domain is not None:
                where += " AND policy_domain = ?"
                args += (domain,)
            await cursor.execute(
                "SELECT day, policy_domain, policy_id, mode, result, mx_host, sessions, detail"
                f" FROM tls_report_results WHERE {where}"
                " ORDER BY day, policy_domain, result, mx_host",
                args,
            )
            return [
                TlsResultRow(
                    str(r[0]),
                    str(r[1]),
                    str(r[2]),
                    str(r[3]),
                    str(r[4]),
                    str(r[5]),
                    int(r[6]),
                    str(r[7]),
                )
                for r in cursor.fetchall()
            ]

        return await self.run("tls_results", txn, readonly=True)
