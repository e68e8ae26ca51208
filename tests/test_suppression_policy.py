"""The suppression policy as pure decisions (smartrelay.suppression), without a database."""

from __future__ import annotations

from smartrelay import suppression as policy
from smartrelay.config import SoftBouncePolicy, SuppressionConfig

DAY = 86400.0
CONFIG = SuppressionConfig(
    hard_bounce=None,
    soft_bounce=SoftBouncePolicy(count=3, within=7 * DAY, suppress_for=30 * DAY),
    complaint=None,
    unsubscribe=365 * DAY,
)


def test_a_delivery_clears_a_soft_bounce_entry() -> None:
    decision = policy.after_outcome(CONFIG, "A@Example.net", 1000.0, True, [])
    assert decision == policy.ClearSoftBounce("a@example.net")


def test_a_hard_bounce_suppresses_at_once_for_the_hard_bounce_duration() -> None:
    bounces = [(False, "452 full"), (True, "550 5.1.1 no such user")]
    decision = policy.after_outcome(CONFIG, "u@example.net", 1000.0, False, bounces)
    assert decision == policy.Suppress("u@example.net", "hard_bounce", None, "452 full")
    lasting = SuppressionConfig(hard_bounce=DAY)
    decision = policy.after_bounce(lasting, "u@example.net", 1000.0, True, "x" * 300)
    assert decision == policy.Suppress("u@example.net", "hard_bounce", 1000.0 + DAY, "x" * 200)


def test_soft_bounces_are_counted_within_the_window() -> None:
    decision = policy.after_outcome(CONFIG, "u@example.net", 10 * DAY, False, [(False, "452")])
    assert decision == policy.CountSoftBounces("u@example.net", 3 * DAY)
    assert policy.after_soft_bounces(CONFIG, "u@example.net", 10 * DAY, 2) is None
    assert policy.after_soft_bounces(CONFIG, "u@example.net", 10 * DAY, 3) == policy.Suppress(
        "u@example.net", "soft_bounce", 40 * DAY, "3 soft bounces"
    )


def test_an_outcome_without_a_bounce_changes_nothing() -> None:
    assert policy.after_outcome(CONFIG, "u@example.net", 0.0, False, []) is None


def test_opt_outs_last_as_configured_and_never_shorten_an_entry_in_force() -> None:
    unsub = policy.unsubscribe(CONFIG, "U@example.net", 100.0, "one-click", "Q1")
    assert unsub == policy.Suppress(
        "u@example.net", "unsubscribe", 100.0 + 365 * DAY, "one-click unsubscribe, message Q1"
    )
    complaint = policy.complaint(CONFIG, "u@example.net", 100.0, "abuse", "", "Q1")
    assert (
        complaint.expires_at is None and complaint.note == "abuse report from unknown, message Q1"
    )

    assert policy.merge_opt_out(unsub, None, None, 100.0) == unsub
    assert policy.merge_opt_out(unsub, "unsubscribe", 200.0, 100.0) is None  # already in force
    assert policy.merge_opt_out(unsub, "unsubscribe", 50.0, 100.0) == unsub  # expired: anew
    assert policy.merge_opt_out(unsub, "hard_bounce", None, 100.0) == policy.Suppress(
        "u@example.net", "unsubscribe", None, unsub.note
    )
    later = 100.0 + 400 * DAY
    assert policy.merge_opt_out(unsub, "manual", later, 100.0) == policy.Suppress(
        "u@example.net", "unsubscribe", later, unsub.note
    )
    assert policy.merge_opt_out(complaint, "unsubscribe", 200.0, 100.0) == complaint
