"""The classifier: one report's raw bytes → a :class:`~smartrelay.feedback.model.Report`.

:func:`classify_message` is pure and never raises. It decides the kind, first decision wins:

1. an RFC 5965 ARF report → ``complaint`` (:mod:`.arf`);
2. an RFC 3464 delivery-status report with a failed or delayed recipient → ``bounce``
   (:mod:`.dsn`); one with only ``delivered``/``relayed``/``expanded`` blocks is ``other``;
3. a provider's non-ARF complaint → ``complaint`` (:data:`.arf.NON_ARF_SIGNS`);
4. an auto-reply (RFC 3834 headers, out-of-office subjects) that does not look like a bounce
   by its sender or subject → ``autoreply`` (:mod:`.autoreply`);
5. a non-standard bounce whose text names failed recipients → ``bounce``
   (:mod:`.nonstandard`); a message that looks like a bounce without them is still a
   ``bounce``, with no recipients and a note;
6. anything else → ``other``.

Each recipient is then classified: the operator's ``[[feedback.rules]]`` first, then
:func:`~smartrelay.feedback.smtp_replies.classify_status` on its status and diagnostic, with
one DSN rule on top: ``Action: failed`` with a 4.X.X status means the reporting MTA gave up
after retries, so the category is ``expired`` (except ``mailbox-full``, which stays: a full
mailbox for days is still a full mailbox). A ``Status: X.0.0`` yields to the diagnostic's more
precise enhanced status of the same class. ``delayed`` recipients are kept with their
status; the processor tells them from failures by ``recipient.action``.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Sequence
from email.message import EmailMessage, Message
from typing import Final

import attrs

from smartrelay.config.model import FeedbackRule
from smartrelay.feedback.arf import ComplaintResult, parse_arf, parse_non_arf
from smartrelay.feedback.autoreply import autoreply_reason, bounce_look
from smartrelay.feedback.dsn import parse_dsn as _parse_dsn
from smartrelay.feedback.dsn import reply_code_of
from smartrelay.feedback.mime import (
    MAX_PARTS,
    RETURNED_MESSAGE_TYPES,
    count_parts,
    header,
    parse_message,
    part_text,
    returned_from_headers,
    returned_message,
    walk,
)
from smartrelay.feedback.model import (
    ClassifiedRecipient,
    FailedRecipient,
    Report,
    ReturnedMessage,
)
from smartrelay.feedback.nonstandard import failed_recipients_from_text
from smartrelay.feedback.rules import first_rule
from smartrelay.feedback.smtp_replies import classify_status, parse_enhanced_status

__all__ = [
    "MAX_CONTAINERS",
    "MAX_REPORT_SIZE",
    "classify_message",
    "classify_recipient",
]

#: A report larger than this is not parsed (``other``, with a note).
MAX_REPORT_SIZE: Final = 25 * 1024 * 1024
#: A report declaring more multipart/message containers than this is not parsed: real
#: reports have a handful; the stdlib parser recurses once per level.
MAX_CONTAINERS: Final = 200
#: Text bounces: at most this many failed recipients are kept.
MAX_TEXT_RECIPIENTS: Final = 1000

#: Categories a failed recipient with a transient (4.X.X) status keeps instead of ``expired``:
#: a mailbox over quota for days is still full (and soft either way).
KEPT_WHEN_EXPIRED: Final = frozenset({"mailbox-full"})
#: The enhanced status (subject.detail) a category stands for, when a report wrote none and
#: only its text says what happened ("550 user unknown" in a text bounce): the class (5 or 4)
#: stays the report's. RFC 3463 and RFC 7372 codes.
STATUS_OF_CATEGORY: Final = {
    "invalid-recipient": "1.1",
    "invalid-domain": "1.2",
    "mailbox-full": "2.2",
    "mailbox-inactive": "2.1",
    "message-too-large": "3.4",
    "spam-content": "7.1",
    "reputation-block": "7.1",
    "authentication": "7.26",
    "policy": "7.1",
    "expired": "4.7",
}

_STATUS_INSIDE = re.compile(r"(?<![\w.])#?([245]\.\d{1,3}\.\d{1,3})(?![\w.]*\d)")
_CONTAINER = re.compile(rb"content-type[ \t]*:[ \t\r\n]*\"?(?:multipart|message)/", re.I)
_SUCCESS_ACTIONS: Final = frozenset({"delivered", "relayed", "expanded"})


def classify_message(raw: bytes, rules: Sequence[FeedbackRule] = ()) -> Report:
    """Parse and classify one report (see the module's docstring). Never raises: a report
    that cannot be read is ``other`` with a note saying why."""
    try:
        return _classify(bytes(raw), rules)
    except RecursionError:
        return Report(kind="other", note="MIME structure too deeply nested")
    except Exception as error:  # hostile input must not stop the caller
        return Report(kind="other", note=f"unreadable report ({type(error).__name__})")


def _classify(raw: bytes, rules: Sequence[FeedbackRule]) -> Report:
    if len(raw) > MAX_REPORT_SIZE:
        return Report(
            kind="other",
            note=f"report too large ({len(raw)} bytes, limit {MAX_REPORT_SIZE})",
        )
    containers = len(_CONTAINER.findall(raw))
    if containers > MAX_CONTAINERS:
        return Report(
            kind="other",
            note=f"absurd MIME structure ({containers} containers, limit {MAX_CONTAINERS})",
        )
    message = parse_message(raw)
    report = _classify_parsed(message, raw, rules)
    if report.returned is None or report.returned.message_id is None:
        report = _with_reply_id(report, message)
    return report


def _classify_parsed(message: Message, raw: bytes, rules: Sequence[FeedbackRule]) -> Report:
    arf = parse_arf(message)
    if arf is not None:
        return _complaint(message, arf)

    dsn = _parse_dsn(message)
    if dsn is not None:
        recipients = tuple(classify_recipient(r, rules) for r in dsn.recipients)
        returned = dsn.returned or _inline_returned(message)
        if all(r.recipient.action in _SUCCESS_ACTIONS for r in recipients):
            return Report(
                kind="other",
                recipients=recipients,
                bounce_source="dsn",
                returned=returned,
                note="delivery-status report without a failure (success notification)",
            )
        return Report(kind="bounce", recipients=recipients, bounce_source="dsn", returned=returned)

    non_arf = parse_non_arf(message)
    if non_arf is not None:
        return _complaint(message, non_arf)

    auto = autoreply_reason(message)
    look = bounce_look(message)
    if auto is not None and look is None:
        return Report(kind="autoreply", returned=_returned(message), note=auto)

    found = _text_recipients(raw) if count_parts(message, MAX_PARTS) <= MAX_PARTS else []
    if found:
        return Report(
            kind="bounce",
            recipients=tuple(classify_recipient(r, rules, from_text=True) for r in found),
            bounce_source="text",
            returned=_returned(message),
        )
    if look is not None:
        return Report(
            kind="bounce",
            bounce_source="text",
            returned=_returned(message),
            note=f"looks like a bounce ({look}) but names no failed recipient",
        )
    return Report(kind="other", returned=_returned(message), note="not a recognised report")


_MESSAGE_ID = re.compile(r"<([^<>\s]{1,250})>")


def _with_reply_id(report: Report, message: Message) -> Report:
    """Without a returned Message-ID, the report's own ``In-Reply-To`` (else the last of its
    ``References``) names our message: auto-replies, and bounces that return nothing (Gmail
    and Exchange set them), can still be tied to it."""
    found = _MESSAGE_ID.search(header(message, "in-reply-to", decode=False))
    if found is None:
        found_all = _MESSAGE_ID.findall(header(message, "references", decode=False))
        if not found_all:
            return report
        message_id = found_all[-1]
    else:
        message_id = found.group(1)
    returned = report.returned or ReturnedMessage()
    return attrs.evolve(report, returned=attrs.evolve(returned, message_id=message_id))


def _complaint(message: Message, found: ComplaintResult) -> Report:
    returned = found.returned or _inline_returned(message)
    complaint = found.complaint
    if complaint.original_rcpt_to is None and returned is not None and returned.to:
        complaint = attrs.evolve(complaint, original_rcpt_to=returned.to[0])
    note = "" if found.format == "arf" else f"non-ARF complaint ({found.format})"
    return Report(kind="complaint", complaint=complaint, returned=returned, note=note)


def classify_recipient(
    recipient: FailedRecipient, rules: Sequence[FeedbackRule] = (), from_text: bool = False
) -> ClassifiedRecipient:
    """A failed recipient's category and hardness (rules, then the built-in tables), with its
    status normalised (derived from the diagnostic when the report had none) and its reply
    code filled in from the diagnostic when it was missing. ``from_text``: the recipient was
    read from a text bounce, whose X.0.0 status is only its reply code's class."""
    diagnostic = recipient.diagnostic
    status_in: str | None = recipient.status or None
    if status_in is None and parse_enhanced_status(diagnostic) is None:
        # Not at the start of a line, but written in the text: qmail's "(#5.1.1)", Exchange's
        # "Remote Server returned '550 5.1.10 ...'", "... said: 550 5.1.1 ...".
        inside = _STATUS_INSIDE.search(diagnostic)
        if inside is not None:
            status_in = inside.group(1)
            code = reply_code_of(diagnostic)
            if code is not None and str(code)[0] in "45" and str(code)[0] != status_in[0]:
                status_in = str(code)[0] + status_in[1:]  # the basic code's class decides
    if (
        status_in is None
        and recipient.action == "delayed"
        and parse_enhanced_status(diagnostic) is None
        and reply_code_of(diagnostic) is None
    ):
        status_in = "4.0.0"  # a delay is transient even when the report says nothing more
    if status_in is not None and status_in.endswith(".0.0"):
        # "Status: 5.0.0" with "550 5.2.2 mailbox full" in the diagnostic (Exim, gateways):
        # the diagnostic's detail, of the same class, is the one that says what happened.
        detailed = parse_enhanced_status(diagnostic)
        if detailed is not None and detailed[0] == status_in[0] and detailed[1:] != ".0.0":
            status_in = detailed
    found = classify_status(status_in, diagnostic)
    category, hard = found.category, found.hard
    derived = status_in is None or (from_text and status_in.endswith(".0.0"))
    if derived and found.status.endswith(".0.0") and category in STATUS_OF_CATEGORY:
        # The report wrote no enhanced status (a DSN's explicit X.0.0 is kept as written):
        # the one its wording stands for, in the report's class.
        found = attrs.evolve(found, status=f"{found.status[0]}.{STATUS_OF_CATEGORY[category]}")
    if (
        recipient.action == "failed"
        and found.status.startswith("4.")
        and category not in KEPT_WHEN_EXPIRED
    ):
        category, hard = "expired", False  # the reporting MTA gave up after retries
    elif recipient.action == "delayed" and category == "expired":
        # Still being retried: nothing has expired yet (a "connection timed out" wording).
        category, hard = "technical", False
    rule = first_rule(rules, recipient.address, found.status, diagnostic)
    if rule is not None:
        category, hard = rule.category, rule.hard
    reply_code = recipient.reply_code
    if reply_code is None:
        reply_code = reply_code_of(diagnostic)
    return ClassifiedRecipient(
        recipient=attrs.evolve(recipient, status=found.status, reply_code=reply_code),
        category=category,
        hard=hard,
    )


def _text_recipients(raw: bytes) -> list[FailedRecipient]:
    """The non-standard bounce reader's findings (it gets an ``EmailMessage`` of the default
    policy, its documented interface); its failure is no failure of ours. Not called for a
    report of more than :data:`~.mime.MAX_PARTS` parts: the default policy's parser costs
    ~0.3 ms per part, and no text bounce has hundreds."""
    try:
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        if not isinstance(parsed, EmailMessage):  # pragma: no cover - default policy's class
            return []
        found = failed_recipients_from_text(parsed)
    except RecursionError:
        raise
    except Exception:
        return []
    return [r for r in found if isinstance(r, FailedRecipient)][:MAX_TEXT_RECIPIENTS]


def _returned(message: Message) -> ReturnedMessage | None:
    """The returned message of a non-DSN report: an attached one, else headers quoted inline."""
    for p in walk(message):
        if p.depth > 0 and p.type in RETURNED_MESSAGE_TYPES:
            return returned_message(p.part, p.type)
    return _inline_returned(message)


_QUOTED_FIELD = re.compile(
    r"^[ \t>]*(x-smartrelay-id|message-id|return-path|to|list-unsubscribe)[ \t]*:[ \t]*(.*)$",
    re.I | re.M,
)


def _inline_returned(message: Message) -> ReturnedMessage | None:
    """Our message's header as quoted in a bounce's text ("--- Below this line is a copy of
    the message."), or None when its text quotes no X-SmartRelay-ID or Message-ID."""
    for p in list(walk(message))[:20]:
        if not p.type.startswith("text/") or p.type in RETURNED_MESSAGE_TYPES:
            continue
        text = part_text(p.part)
        fields: dict[str, str] = {}
        for m in _QUOTED_FIELD.finditer(text):
            fields.setdefault(m.group(1).lower(), m.group(2).strip())
        if "x-smartrelay-id" not in fields and "message-id" not in fields:
            continue
        header_text = "".join(f"{k}: {v}\n" for k, v in fields.items())
        inner = email.message_from_string(header_text, policy=email.policy.compat32)
        return returned_from_headers(inner)
    return None
