"""The suppression policy (SPEC section 6): which entry a fact about a recipient writes or
clears. Pure values and functions: storage reads the facts and writes the rows; delivery (its
outcomes), the tracking app and the feedback processor (opt-outs) decide here.

- A hard bounce suppresses for ``hard_bounce`` (None: forever).
- Soft bounces (non-hard bounces, expiries) suppress for ``soft_bounce.suppress_for`` once
  ``soft_bounce.count`` of them fall within ``soft_bounce.within`` and after the recipient's
  latest delivery: a delivery starts the count again, and clears a soft-bounce entry.
- A complaint or an unsubscribe suppresses for ``complaint``/``unsubscribe``; it replaces an
  entry in force for another reason but never shortens its lifetime.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import frozen

from smartrelay.config import SuppressionConfig

REASONS = ("hard_bounce", "soft_bounce", "complaint", "unsubscribe", "manual")


@frozen
class Suppress:
    """Add or replace the entry of ``address`` (lower-cased)."""

    address: str
    reason: str
    expires_at: float | None  # seconds; None: forever
    note: str


@frozen
class ClearSoftBounce:
    """Remove the entry of ``address`` if it is a soft-bounce one."""

    address: str


@frozen
class CountSoftBounces:
    """Count the soft bounces of ``address`` recorded at or after ``since`` and after its latest
    delivery (this one included), then ask :func:`after_soft_bounces`."""

    address: str
    since: float


Decision = Suppress | ClearSoftBounce | CountSoftBounces | None


def after_delivery(address: str) -> ClearSoftBounce:
    return ClearSoftBounce(address.lower())


def after_bounce(
    policy: SuppressionConfig, address: str, now: float, hard: bool, reply: str
) -> Suppress | CountSoftBounces:
    """A bounce: a hard one suppresses at once; a soft one is counted."""
    if hard:
        return Suppress(
            address.lower(), "hard_bounce", _until(now, policy.hard_bounce), reply[:200]
        )
    return CountSoftBounces(address.lower(), now - policy.soft_bounce.within)


def after_soft_bounces(
    policy: SuppressionConfig, address: str, now: float, count: int
) -> Suppress | None:
    """``count`` soft bounces since the window's start and the latest delivery."""
    soft = policy.soft_bounce
    if count < soft.count:
        return None
    return Suppress(
        address.lower(), "soft_bounce", _until(now, soft.suppress_for), f"{count} soft bounces"
    )


def after_outcome(
    policy: SuppressionConfig,
    address: str,
    now: float,
    delivered: bool,
    bounces: Sequence[tuple[bool, str]],
) -> Decision:
    """A delivery attempt's outcome: delivered, or its bounces as (hard, reply), if any."""
    if delivered:
        return after_delivery(address)
    if not bounces:
        return None
    return after_bounce(policy, address, now, any(hard for hard, _ in bounces), bounces[0][1])


def unsubscribe(
    policy: SuppressionConfig, address: str, now: float, method: str, queue_id: str | None
) -> Suppress:
    """The recipient unsubscribed (``method``: ``one-click``, ``link``, ``mailto``);
    ``queue_id`` None: by a token whose recipient row is gone (purged)."""
    which = "a purged message" if queue_id is None else f"message {queue_id}"
    note = f"{method} unsubscribe, {which}"
    return Suppress(address.lower(), "unsubscribe", _until(now, policy.unsubscribe), note)


def complaint(
    policy: SuppressionConfig,
    address: str,
    now: float,
    feedback_type: str,
    source: str,
    queue_id: str,
) -> Suppress:
    """A feedback-loop complaint (ARF) about the recipient's copy."""
    note = f"{feedback_type} report from {source or 'unknown'}, message {queue_id}"
    return Suppress(address.lower(), "complaint", _until(now, policy.complaint), note)


def merge_opt_out(
    new: Suppress, old_reason: str | None, old_expires_at: float | None, now: float
) -> Suppress | None:
    """The opt-out entry to write over the one there (``old_reason`` None: no entry), or None
    when the address is already suppressed in force for the same reason (nothing to do).

    An entry in force for another reason is replaced, but expires at the later of the two
    expiries (None, forever, wins)."""
    if old_reason is None:
        return new
    in_force = old_expires_at is None or old_expires_at > now
    if not in_force:
        return new
    if old_reason == new.reason:
        return None
    if old_expires_at is None or new.expires_at is None:
        expires_at = None
    else:
        expires_at = max(old_expires_at, new.expires_at)
    return Suppress(new.address, new.reason, expires_at, new.note)


def _until(now: float, lasts: float | None) -> float | None:
    return None if lasts is None else now + lasts
