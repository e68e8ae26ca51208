"""The operator's ``[[feedback.rules]]``: tried in file order before the built-in tables.

A rule (:class:`~smartrelay.config.model.FeedbackRule`, parsed and validated at start-up)
reclassifies a provider's odd wording without a release: its regex is searched in the
recipient's diagnostic text, its optional status prefix and recipient domain must also fit,
and the first rule that applies gives the category and hardness.
"""

from __future__ import annotations

from collections.abc import Sequence

from smartrelay.config.model import FeedbackRule

__all__ = ["MAX_MATCHED_TEXT", "first_rule", "rule_applies", "status_has_prefix"]

#: Rules see at most this many characters of a diagnostic (bounds the regex's work).
MAX_MATCHED_TEXT = 2000


def status_has_prefix(status: str, prefix: str) -> bool:
    """Whether the enhanced status ``status`` starts with ``prefix`` component-wise."""
    if not prefix:
        return True
    want = prefix.split(".")
    have = status.split(".")
    return len(have) >= len(want) and have[: len(want)] == want


def rule_applies(rule: FeedbackRule, address: str, status: str, diagnostic: str) -> bool:
    if rule.status and not status_has_prefix(status, rule.status):
        return False
    if rule.domain:
        domain = address.rpartition("@")[2].lower().rstrip(".")
        if domain != rule.domain:
            return False
    return rule.match.search(diagnostic[:MAX_MATCHED_TEXT]) is not None


def first_rule(
    rules: Sequence[FeedbackRule], address: str, status: str, diagnostic: str
) -> FeedbackRule | None:
    """The first rule that applies to this recipient, or None."""
    for rule in rules:
        if rule_applies(rule, address, status, diagnostic):
            return rule
    return None
