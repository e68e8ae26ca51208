"""The ``credential_volume`` table (schema 014): each SMTP credential's volume baseline, its
last alert and its hold (docs/smtp.md, "Volume alerts").

The relay's :class:`smartrelay.smtp.volume.VolumeWatch` keeps the live counts in memory and
writes baselines here now and then; an alert writes its ``alert`` event and, with ``hold``,
the hold, in one transaction. A row exists only for a credential that exists (the insert
selects it from ``smtp_credentials``): a credential removed meanwhile is skipped, never an
error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

from attrs import frozen

from smartrelay.events import AlertEvent
from smartrelay.storage.base import StoreBase, from_ms, to_ms
from smartrelay.storage.events import insert_events
from smartrelay.storage.interfaces import ICursor

__all__ = [
    "CredentialBaseline",
    "CredentialVolumeStore",
    "HeldCredential",
    "ReleaseResult",
    "VolumeAlert",
]

#: What ``release_credential`` found: released, not held, or no such credential.
ReleaseResult = Literal["released", "not-held", "unknown"]


@frozen
class CredentialBaseline:
    credential: str
    baseline: float | None  # messages per window; None before the first completed window
    windows: int  # completed windows learned
    updated_at: float


@frozen
class HeldCredential:
    credential: str
    held_at: float
    reason: str


@frozen
class VolumeAlert:
    """An ``alert`` event of kind ``credential-volume``, as the dashboard shows it."""

    time: float
    credential: str
    rate: int
    baseline: float
    action: str


class CredentialVolumeStore(StoreBase):
    async def credential_baselines(self, limit: int) -> list[CredentialBaseline]:
        """The ``limit`` most recently updated baselines (read once at start-up)."""

        async def txn(cursor: ICursor) -> list[CredentialBaseline]:
            await cursor.execute(
                "SELECT credential, baseline, windows, updated_at FROM credential_volume"
                " ORDER BY updated_at DESC LIMIT ?",
                (limit,),
            )
            return [
                CredentialBaseline(
                    str(r[0]), None if r[1] is None else float(r[1]), int(r[2]), int(r[3]) / 1000
                )
                for r in cursor.fetchall()
            ]

        return await self.run("credential_baselines", txn, readonly=True)

    async def save_baselines(self, baselines: Sequence[CredentialBaseline]) -> None:
        """Write (insert or update) these credentials' baselines; a credential that no longer
        exists is skipped."""
        rows = [
            (b.credential, b.baseline, b.windows, to_ms(b.updated_at), b.credential)
            for b in baselines
        ]

        async def txn(cursor: ICursor) -> None:
            # INSERT ... SELECT skips a credential removed meanwhile (no foreign key error).
            await cursor.executemany(
                "INSERT INTO credential_volume (credential, baseline, windows, updated_at)"
                " SELECT ?, ?, ?, ? FROM smtp_credentials WHERE name = ?"
                " ON CONFLICT (credential) DO UPDATE SET baseline = excluded.baseline,"
                " windows = excluded.windows, updated_at = excluded.updated_at",
                rows,
            )

        if rows:
            await self.run("save_baselines", txn)

    async def record_volume_alert(
        self,
        alert: AlertEvent,
        hold_reason: str | None,
        at: float | None = None,
        windows: int = 0,
    ) -> bool:
        """The ``alert`` event and ``alerted_at`` (and, with a ``hold_reason``, the hold), in
        one transaction, with the baseline (``alert.baseline`` learned over ``windows``
        windows). False (nothing written) when the credential no longer exists."""
        now_ms = self.now_ms() if at is None else to_ms(at)
        held_ms = None if hold_reason is None else now_ms

        async def txn(cursor: ICursor) -> bool:
            await cursor.execute(
                "SELECT 1 FROM smtp_credentials WHERE name = ?", (alert.credential,)
            )
            if cursor.fetchone() is None:
                return False
            await cursor.execute(
                "INSERT INTO credential_volume (credential, baseline, windows, updated_at,"
                " alerted_at, held_at, hold_reason) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (credential) DO UPDATE SET alerted_at = excluded.alerted_at,"
                " baseline = excluded.baseline, windows = excluded.windows,"
                " updated_at = excluded.updated_at,"
                " held_at = COALESCE(excluded.held_at, credential_volume.held_at),"
                " hold_reason = COALESCE(excluded.hold_reason, credential_volume.hold_reason)",
                (alert.credential, alert.baseline, windows, now_ms, now_ms, held_ms, hold_reason),
            )
            await insert_events(cursor, now_ms, [(None, None, alert)])
            return True

        return await self.run("record_volume_alert", txn)

    async def held_credentials(self) -> list[HeldCredential]:
        async def txn(cursor: ICursor) -> list[HeldCredential]:
            await cursor.execute(
                "SELECT credential, held_at, hold_reason FROM credential_volume"
                " WHERE held_at IS NOT NULL ORDER BY held_at DESC, credential"
            )
            return [
                HeldCredential(str(r[0]), int(r[1]) / 1000, str(r[2] or ""))
                for r in cursor.fetchall()
            ]

        return await self.run("held_credentials", txn, readonly=True)

    async def release_credential(self, name: str) -> ReleaseResult:
        """Clear the credential's hold (its mail is accepted again once each node has read
        the held set, within seconds)."""

        async def txn(cursor: ICursor) -> ReleaseResult:
            await cursor.execute(
                "UPDATE credential_volume SET held_at = NULL, hold_reason = NULL"
                " WHERE credential = ? AND held_at IS NOT NULL",
                (name,),
            )
            if int(cursor.rowcount) > 0:
                return "released"
            await cursor.execute("SELECT 1 FROM smtp_credentials WHERE name = ?", (name,))
            return "unknown" if cursor.fetchone() is None else "not-held"

        return await self.run("release_credential", txn)

    async def recent_volume_alerts(self, since: float, limit: int) -> list[VolumeAlert]:
        """The latest ``credential-volume`` alerts at or after ``since``, newest first."""

        async def txn(cursor: ICursor) -> list[VolumeAlert]:
            await cursor.execute(
                "SELECT time, data FROM events WHERE type = ? AND time >= ?"
                " ORDER BY time DESC, id DESC LIMIT ?",
                (AlertEvent.type, to_ms(since), limit),
            )
            out = []
            for r in cursor.fetchall():
                alert = _volume_alert(int(r[0]), str(r[1]))
                if alert is not None:
                    out.append(alert)
            return out

        return await self.run("recent_volume_alerts", txn, readonly=True)


def _volume_alert(time_ms: int, data: str) -> VolumeAlert | None:
    try:
        d = json.loads(data)
        if d.get("kind") != "credential-volume":
            return None
        return VolumeAlert(
            time=from_ms(time_ms) or 0.0,
            credential=str(d["credential"]),
            rate=int(d["rate"]),
            baseline=float(d["baseline"]),
            action=str(d["action"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
