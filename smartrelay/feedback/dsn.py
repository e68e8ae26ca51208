"""RFC 3464 delivery status notifications: the per-recipient blocks and the returned message.

Lenient where real MTAs are sloppy (RFC 3464 section 6.2 asks for it): the delivery-status
part may be labelled ``text/plain`` or ``message/global-delivery-status`` (RFC 6533), sit one
level deeper (a bounce forwarded as ``message/rfc822``), lack the blank lines between its
blocks, fold its fields, mix cases, carry 8-bit text, or write addresses with or without the
``rfc822;`` type and angle brackets. When no part is labelled as delivery status, a text part
made of DSN fields (``Final-Recipient`` and ``Action``/``Status`` lines) is read the same way.
"""

from __future__ import annotations

import re
from email.message import Message
from typing import Final

import attrs

from smartrelay.feedback.mime import (
    RETURNED_MESSAGE_TYPES,
    Part,
    address_of,
    content_type_param,
    part_text,
    returned_message,
    unfold,
    walk,
)
from smartrelay.feedback.model import FailedRecipient, ReturnedMessage
from smartrelay.feedback.smtp_replies import parse_enhanced_status

__all__ = [
    "DELIVERY_STATUS_TYPES",
    "MAX_DIAGNOSTIC",
    "MAX_RECIPIENTS",
    "DsnResult",
    "parse_delivery_status",
    "parse_dsn",
    "reason_near",
    "reply_code_of",
]

DELIVERY_STATUS_TYPES: Final = frozenset(
    {"message/delivery-status", "message/global-delivery-status"}
)
#: A diagnostic is cut to this many characters (after unfolding).
MAX_DIAGNOSTIC: Final = 500
#: At most this many recipient blocks are read from one report.
MAX_RECIPIENTS: Final = 1000

_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)[ \t]*:[ \t]*(.*)$")
# A text part is read as a delivery-status part when it has these lines.
_LOOKS_RECIPIENT = re.compile(r"^[ \t]*(?:final|original)-recipient[ \t]*:", re.I | re.M)
_LOOKS_STATUS = re.compile(r"^[ \t]*(?:action|status)[ \t]*:", re.I | re.M)
# Fields that begin a new recipient block when the current one already has them (blocks
# run together when an MTA forgets the blank line).
_BLOCK_KEYS: Final = frozenset({"original-recipient", "final-recipient", "action", "status"})
_TYPED = re.compile(r"^\s*([A-Za-z][\w.+-]*)\s*;\s*(.*)$", re.S)
# The basic reply code of a diagnostic: at its start, after "said:", or before an enhanced
# status ("... 550 5.1.1 ...", "... 550-5.1.1 ...").
_REPLY_CODES = (
    re.compile(r"^\s*([245]\d\d)(?=[\s-]|$)"),
    re.compile(r"\bsaid:\s*([245]\d\d)(?=[\s-]|$)", re.I),
    re.compile(r"(?:^|[\s(\[:;'\"])([245]\d\d)[\s-]+[245]\.\d{1,3}\.\d{1,3}(?!\d)"),
    re.compile(r"\b(?:reply|response|code)(?: was)?:?\s+([245]\d\d)(?=[\s-]|$)", re.I),
)


@attrs.frozen
class DsnResult:
    recipients: tuple[FailedRecipient, ...]
    returned: ReturnedMessage | None
    #: ``Reporting-MTA`` without its type, if any.
    reporting_mta: str | None = None


def parse_dsn(message: Message) -> DsnResult | None:
    """The delivery status report in ``message`` (anywhere in its first levels), or None when
    it has no delivery-status part with at least one recipient block."""
    parts = list(walk(message))
    found: tuple[int, list[FailedRecipient], str | None] | None = None
    for index, p in enumerate(parts):
        if p.type in DELIVERY_STATUS_TYPES:
            recipients, mta = _status_part(p.part)
            if recipients:
                found = (index, recipients, mta)
                break
    if found is None:
        # A mislabelled delivery-status part: text whose lines are DSN fields.
        for index, p in enumerate(parts):
            if _maybe_status_text(p.type, p.parent):
                text = part_text(p.part)
                if _LOOKS_RECIPIENT.search(text) and _LOOKS_STATUS.search(text):
                    recipients, mta = parse_delivery_status(text)
                    if recipients:
                        found = (index, recipients, mta)
                        break
    if found is None:
        return None
    index, recipients, mta = found
    returned = None
    for p in parts[index + 1 :]:
        if p.type in RETURNED_MESSAGE_TYPES:
            returned = returned_message(p.part, p.type)
            break
    if any(not r.diagnostic for r in recipients):
        recipients = _diagnostics_from_text(recipients, parts[:index])
    return DsnResult(tuple(recipients), returned, mta)


def _diagnostics_from_text(
    recipients: list[FailedRecipient], before: list[Part]
) -> list[FailedRecipient]:
    """Recipients without a ``Diagnostic-Code`` get the reason the report's human-readable
    text gives next to their address (Exim's local failures, "Unrouteable address", have no
    Diagnostic-Code; its text says it under the address)."""
    texts = [
        part_text(p.part, 64 * 1024)
        for p in before
        if p.type in ("text/plain", "text/html") and p.type not in RETURNED_MESSAGE_TYPES
    ][:3]
    if not texts:
        return recipients
    text = _TAGS.sub(" ", "\n".join(texts)) if "<" in "".join(texts) else "\n".join(texts)
    out: list[FailedRecipient] = []
    for r in recipients:
        if r.diagnostic or not r.address:
            out.append(r)
            continue
        reason = reason_near(text, r.address)
        if reason:
            out.append(attrs.evolve(r, diagnostic=reason, reply_code=reply_code_of(reason)))
        else:
            out.append(r)
    return out


_TAGS = re.compile(r"<(?!\S+@)[^>]{0,200}>")


def reason_near(text: str, address: str) -> str:
    """The text that follows ``address`` in a bounce's human-readable part: the rest of its
    line and the next non-blank lines (at most 4), up to a blank line or another address;
    "" when the address is not there or nothing follows it."""
    lines = text.splitlines()
    wanted = address.lower()
    for i, line in enumerate(lines[:2000]):
        at = line.lower().find(wanted)
        if at < 0:
            continue
        rest = line[at + len(wanted) :].lstrip(">:;,.) \t")
        pieces = [rest] if rest.strip() else []
        for following in lines[i + 1 : i + 5]:
            if not following.strip() or _ADDRESS_LINE.match(following):
                break
            pieces.append(following.strip())
        reason = unfold(" ".join(pieces))
        if reason.startswith("(reason:"):  # Sendmail
            reason = reason.removeprefix("(reason:").removesuffix(")").strip()
        return reason[:MAX_DIAGNOSTIC]
    return ""


_ADDRESS_LINE = re.compile(r"^\s*<?[^\s<>@]+@[^\s<>@]+>?:?\s*$")


def _maybe_status_text(kind: str, parent: Message | None) -> bool:
    if kind.startswith("text/") and kind not in RETURNED_MESSAGE_TYPES:
        return True
    # Inside a report, anything that is not a container or the returned message.
    return (
        parent is not None
        and content_type_param(parent, "report-type").lower() == "delivery-status"
        and not kind.startswith(("multipart/", "image/", "audio/", "video/"))
        and kind not in RETURNED_MESSAGE_TYPES
    )


def _status_part(part: Message) -> tuple[list[FailedRecipient], str | None]:
    return parse_delivery_status(part_text(part))


def parse_delivery_status(text: str) -> tuple[list[FailedRecipient], str | None]:
    """The recipient blocks of a delivery-status body, and its ``Reporting-MTA``."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    reporting_mta: str | None = None
    name: str | None = None

    def flush() -> None:
        nonlocal current, name
        if current.keys() & _BLOCK_KEYS:
            blocks.append(current)
        current = {}
        name = None

    for line in text.splitlines():
        if len(blocks) >= MAX_RECIPIENTS:
            break
        if not line.strip():
            flush()
            continue
        if line[:1] in (" ", "\t"):
            if name is not None:  # a folded field's continuation
                current[name] = current[name] + " " + line.strip()
            continue
        m = _FIELD.match(line)
        if m is None:
            name = None
            continue
        key, value = m.group(1).lower(), m.group(2)
        if key == "reporting-mta" and reporting_mta is None:
            reporting_mta = _untyped(value) or None
        if key in _BLOCK_KEYS and (
            key in current
            or (
                key == "original-recipient"
                and "final-recipient" in current
                and current.keys() & {"action", "status"}
            )
        ):
            flush()
        if key in current:  # a repeated non-block field: keep the first
            name = None
            continue
        current[key] = value
        name = key
    flush()
    recipients = [r for r in map(_recipient, blocks) if r is not None]
    return recipients, reporting_mta


def _untyped(value: str) -> str:
    m = _TYPED.match(value)
    return unfold(m.group(2) if m else value)


def _recipient(block: dict[str, str]) -> FailedRecipient | None:
    final = address_of(unfold(block.get("final-recipient", "")))
    original = address_of(unfold(block.get("original-recipient", ""))) or None
    address = final or original or address_of(unfold(block.get("x-actual-recipient", "")))
    if not address:
        return None
    status = parse_enhanced_status(unfold(block.get("status", ""))) or ""
    diagnostic_type = ""
    diagnostic = unfold(block.get("diagnostic-code", ""))
    m = _TYPED.match(diagnostic)
    if m is not None and not m.group(1).isdigit():
        diagnostic_type, diagnostic = m.group(1).lower(), m.group(2).strip()
    diagnostic = diagnostic[:MAX_DIAGNOSTIC]
    action_words = unfold(block.get("action", "")).lower().split()
    if action_words:
        action = action_words[0].strip(";,.")
    else:
        action = "delivered" if status.startswith("2.") else "failed"
    return FailedRecipient(
        address=address,
        action=action,
        status=status,
        reply_code=reply_code_of(diagnostic),
        diagnostic=diagnostic,
        original_recipient=original,
        remote_mta=_untyped(block.get("remote-mta", "")) or None,
        last_attempt=unfold(block.get("last-attempt-date", "")) or None,
        diagnostic_type=diagnostic_type,
    )


def reply_code_of(diagnostic: str) -> int | None:
    """The SMTP basic reply code in a diagnostic text, or None."""
    for pattern in _REPLY_CODES:
        m = pattern.search(diagnostic)
        if m is not None:
            return int(m.group(1))
    return None
