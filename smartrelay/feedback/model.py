"""What the feedback parsers find in a report: the values every part of ``feedback/`` shares.

A report is any message that comes back to us: to the return-path domain's MX (the inbound
listener) or fetched from a POP3/IMAP mailbox (``[[feedback.mailboxes]]``). The parsers turn
its raw bytes into one :class:`Report` (pure functions, never raising on bad input); the
processor ties it to our message and recipient and records its effects (SPEC sections 5, 6).
"""

from __future__ import annotations

from typing import Literal

from attrs import frozen

#: What a report is (SPEC section 6, ``classify``).
ReportKind = Literal["bounce", "complaint", "autoreply", "other"]
#: Where a bounce's per-recipient facts came from: an RFC 3464 delivery-status part, or the
#: text of a non-standard bounce (an MTA's own wording, read by the signature table).
BounceSource = Literal["dsn", "text"]


@frozen
class FailedRecipient:
    """One recipient a bounce reports on, as the report states it (not yet classified)."""

    #: The address the report names: Final-Recipient (or Original-Recipient when that is all
    #: there is) without its address type, or the address found in the text.
    address: str
    #: RFC 3464 ``Action`` (lower-case: failed, delayed, delivered, relayed, expanded);
    #: "failed" for a non-standard bounce.
    action: str = "failed"
    #: The enhanced status code (``5.1.1``) as reported, "" when none.
    status: str = ""
    #: The SMTP reply code found in the diagnostic (``550``), or None.
    reply_code: int | None = None
    #: ``Diagnostic-Code`` without its type, or the reason text of a non-standard bounce;
    #: unfolded, at most a few hundred characters.
    diagnostic: str = ""
    original_recipient: str | None = None
    remote_mta: str | None = None
    #: ``Last-Attempt-Date`` as written, or None.
    last_attempt: str | None = None
    #: The type of ``Diagnostic-Code`` (``smtp``, ``x-unix``, ``x-postfix``...), lower-case;
    #: "" when none (or for a non-standard bounce).
    diagnostic_type: str = ""


@frozen
class ClassifiedRecipient:
    """A failed recipient with its bounce category (SPEC section 5) and hardness."""

    recipient: FailedRecipient
    category: str
    hard: bool


@frozen
class Complaint:
    """What an RFC 5965 ARF report (or a provider's non-ARF complaint) says."""

    feedback_type: str  # abuse, fraud, virus, other, not-spam, ... (lower-case)
    #: The reporter: the ARF ``User-Agent`` or, failing that, the report's From domain.
    source: str
    #: ``Original-Rcpt-To``, else the To of the returned message (the complaining recipient).
    original_rcpt_to: str | None = None
    source_ip: str | None = None
    arrival_date: str | None = None


@frozen
class ReturnedMessage:
    """What identifies our message inside a report: the returned message or its headers."""

    #: ``X-SmartRelay-ID`` (our queue id, SPEC section 3).
    smartrelay_id: str | None = None
    #: ``Message-ID`` without the angle brackets.
    message_id: str | None = None
    #: The returned message's envelope sender if shown (``Return-Path``), e.g. our VERP
    #: address ``b+TOKEN@return_path_domain``.
    return_path: str | None = None
    #: Its ``To`` addresses.
    to: tuple[str, ...] = ()
    #: Its ``List-Unsubscribe`` header, which carries our unsubscribe tokens.
    list_unsubscribe: str | None = None


@frozen
class Report:
    """Everything the parsers found in one report."""

    kind: ReportKind
    #: For a bounce: the recipients reported on (also ``delayed``/``delivered`` DSN blocks,
    #: which the processor does not count as bounces), each classified.
    recipients: tuple[ClassifiedRecipient, ...] = ()
    bounce_source: BounceSource | None = None
    complaint: Complaint | None = None
    returned: ReturnedMessage | None = None
    #: Why the report is ``other``, or what was odd about it, for logs and ``feedback list``.
    note: str = ""
