"""Complaints: RFC 5965 ARF reports, and the non-ARF complaint mails some providers send.

An ARF report is ``multipart/report; report-type=feedback-report`` with a
``message/feedback-report`` part (Feedback-Type, User-Agent, Original-Rcpt-To, Source-IP,
Arrival-Date...) and the reported message (``message/rfc822`` or ``text/rfc822-headers``).
Leniency: the report part is found by its type anywhere in the first levels (forwarded
reports), or, inside a ``feedback-report`` report, by its fields whatever its label.

Non-ARF complaints are recognised by what they are, from :data:`NON_ARF_SIGNS`: a message
that returns an original (attached, or its header inline) and comes from a feedback-loop
sender or has a complaint subject, or carries a provider's complaint header (Microsoft JMRP's
``X-HmXmrOriginalRecipient``).
"""

from __future__ import annotations

import re
from email.message import Message
from typing import Final

from attrs import frozen

from smartrelay.feedback.mime import (
    RETURNED_MESSAGE_TYPES,
    Part,
    address_of,
    content_type,
    content_type_param,
    header,
    headers_of,
    part_text,
    returned_message,
    unfold,
    walk,
)
from smartrelay.feedback.model import Complaint, ReturnedMessage

__all__ = [
    "FEEDBACK_REPORT_TYPES",
    "NON_ARF_SIGNS",
    "ComplaintResult",
    "NonArfSign",
    "parse_arf",
    "parse_feedback_fields",
    "parse_non_arf",
]

FEEDBACK_REPORT_TYPES: Final = frozenset({"message/feedback-report"})
_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)[ \t]*:[ \t]*(.*)$")
_LOOKS_ARF = re.compile(r"^[ \t]*feedback-type[ \t]*:", re.I | re.M)
_FEEDBACK_TYPE = re.compile(r"[a-z][a-z0-9_-]*")


@frozen
class ComplaintResult:
    complaint: Complaint
    returned: ReturnedMessage | None
    #: "arf" or the name of the :data:`NON_ARF_SIGNS` row that recognised it.
    format: str = "arf"


def parse_feedback_fields(text: str) -> dict[str, str]:
    """The fields of a ``message/feedback-report`` body (lower-cased names, first of each
    kept, folded lines joined)."""
    fields: dict[str, str] = {}
    name: str | None = None
    for line in text.splitlines()[:500]:
        if line[:1] in (" ", "\t") and line.strip():
            if name is not None:
                fields[name] += " " + line.strip()
            continue
        m = _FIELD.match(line)
        if m is None:
            name = None
            continue
        key = m.group(1).lower()
        if key in fields:
            name = None
            continue
        fields[key] = m.group(2)
        name = key
    return {k: unfold(v) for k, v in fields.items()}


def _reporter(message: Message) -> str:
    """The report's From domain (the reporter when there is no User-Agent)."""
    address = address_of(header(message, "from"))
    return address.rpartition("@")[2].lower() if "@" in address else address.lower()


def parse_arf(message: Message) -> ComplaintResult | None:
    """The RFC 5965 report in ``message``, or None when there is none."""
    parts = list(walk(message))
    index: int | None = None
    for i, p in enumerate(parts):
        if p.type in FEEDBACK_REPORT_TYPES:
            index = i
            break
    if index is None:
        for i, p in enumerate(parts):
            if (
                p.parent is not None
                and content_type_param(p.parent, "report-type").lower() == "feedback-report"
                and not p.type.startswith("multipart/")
                and p.type not in RETURNED_MESSAGE_TYPES
                and _LOOKS_ARF.search(part_text(p.part, 64 * 1024))
            ):
                index = i
                break
    if index is None:
        return None
    fields = parse_feedback_fields(part_text(parts[index].part, 64 * 1024))
    returned = None
    for p in parts[index + 1 :]:
        if p.type in RETURNED_MESSAGE_TYPES:
            returned = returned_message(p.part, p.type)
            break
    if returned is None:  # some reporters put the original before the report
        for p in parts[1:index]:
            if p.type in RETURNED_MESSAGE_TYPES:
                returned = returned_message(p.part, p.type)
                break
    kind_match = _FEEDBACK_TYPE.match(fields.get("feedback-type", "").strip().lower())
    rcpt = address_of(fields.get("original-rcpt-to", "")) or None
    if rcpt is None and returned is not None and returned.to:
        rcpt = returned.to[0]
    complaint = Complaint(
        feedback_type=kind_match.group(0) if kind_match else "abuse",
        source=fields.get("user-agent", "") or _reporter(message),
        original_rcpt_to=rcpt,
        source_ip=fields.get("source-ip") or None,
        arrival_date=fields.get("arrival-date") or fields.get("received-date") or None,
    )
    return ComplaintResult(complaint, returned)


@frozen
class NonArfSign:
    """One way to recognise a provider's non-ARF complaint (a row of :data:`NON_ARF_SIGNS`).

    A message matches when every pattern that is set matches (case-insensitive searches):
    ``sender`` on the report's From address, ``subject`` on its Subject, ``header`` names a
    field of the returned message (or of the report) that only complaints carry; and, unless
    ``header`` is set, the report returns an original message.
    """

    name: str
    sender: re.Pattern[str] | None = None
    subject: re.Pattern[str] | None = None
    #: Lower-cased name of a header field whose value is the complaining recipient.
    header: str | None = None
    feedback_type: str = "abuse"


def _i(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.I)


_FBL_SENDER = _i(
    r"^(?:fbl|feedback[-_.]?loops?|fbl[-_.]?reports?|complaints?|spam[-_.]?(?:reports?|complaints?)"
    r"|abuse[-_.]?reports?|junk[-_.]?reports?|scomp|arf|jmrp|staff|reports?)(?:[-_.+][^@]*)?@"
)
_COMPLAINT_SUBJECT = _i(
    r"\bcomplaint\b|\babuse report\b|\bspam report\b|\bfeedback[- ]loop\b|\bfbl\b"
    r"|reported as (?:spam|junk)|\bjunk (?:mail )?report\b|\bspamcop\b|\bemail abuse\b"
    r"|\bspam (?:complaint|notification)\b|\bbeschwerde\b|\bplainte\b|\bqueja\b|\breclamo\b"
)

NON_ARF_SIGNS: Final[tuple[NonArfSign, ...]] = (
    # Microsoft JMRP (Outlook.com, Hotmail): the original with the complainer named.
    NonArfSign("microsoft-jmrp", header="x-hmxmroriginalrecipient"),
    # SpamCop reports: "[SpamCop (http://...) id:123]..." from spamcop.net.
    NonArfSign("spamcop", sender=_i(r"@(?:[\w-]+\.)*spamcop\.net$")),
    # Feedback-loop mailboxes (fbl@, feedbackloop@, scomp@, staff@hotmail.com...) returning
    # the original without an ARF wrapper.
    NonArfSign("fbl-sender", sender=_FBL_SENDER, subject=_i(r".")),
    # Anyone returning an original under a complaint subject.
    NonArfSign("complaint-subject", subject=_COMPLAINT_SUBJECT),
)
"""The non-ARF complaint formats, tried in order."""

_INLINE_HEADERS = re.compile(
    r"^(x-smartrelay-id|message-id|return-path|received)[ \t]*:", re.I | re.M
)


def parse_non_arf(message: Message) -> ComplaintResult | None:
    """A provider's non-ARF complaint in ``message`` (:data:`NON_ARF_SIGNS`), or None."""
    sender = address_of(header(message, "from"))
    subject = header(message, "subject")
    parts = list(walk(message))
    returned: ReturnedMessage | None = None
    returned_part: Message | None = None
    for p in parts[1:]:
        if p.type in RETURNED_MESSAGE_TYPES:
            returned = returned_message(p.part, p.type)
            returned_part = p.part
            break
    for sign in NON_ARF_SIGNS:
        if sign.sender is not None and not sign.sender.search(sender):
            continue
        if sign.subject is not None and not sign.subject.search(subject):
            continue
        rcpt: str | None = None
        if sign.header is not None:
            rcpt = _find_header(message, returned_part, sign.header)
            if rcpt is None:
                continue
        elif returned is None and not _inline_original(parts):
            continue
        if rcpt is None and returned is not None and returned.to:
            rcpt = returned.to[0]
        complaint = Complaint(
            feedback_type=sign.feedback_type,
            source=_reporter(message),
            original_rcpt_to=rcpt,
        )
        return ComplaintResult(complaint, returned, sign.name)
    return None


def _find_header(message: Message, returned: Message | None, name: str) -> str | None:
    for holder in (returned, message):
        if holder is None:
            continue
        inner = holder.get_payload() if content_type(holder) == "message/rfc822" else None
        candidates = [holder]
        if isinstance(inner, list):
            candidates = [m for m in inner if isinstance(m, Message)] + candidates
        for candidate in candidates:
            for key, value in headers_of(candidate):
                if key == name and value:
                    return address_of(value) or None
    return None


def _inline_original(parts: list[Part]) -> bool:
    """Whether a text part quotes an original's header (a complaint forwarded inline)."""
    for p in parts[:10]:
        if p.type.startswith("text/") and p.type not in RETURNED_MESSAGE_TYPES:
            found = _INLINE_HEADERS.findall(part_text(p.part, 64 * 1024))
            if len({name.lower() for name in found}) >= 2:
                return True
    return False
