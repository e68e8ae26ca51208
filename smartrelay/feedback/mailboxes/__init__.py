"""``[[feedback.mailboxes]]``: IMAP4 and POP3 readers that take the bounces, FBL reports and
replies out of mailboxes and hand them to the feedback processor (docs/feedback-mailboxes.md)."""

from smartrelay.feedback.mailboxes.base import (
    MAX_MESSAGE_SIZE,
    IMailboxReader,
    Intake,
    MailboxError,
    ProcessReport,
    envelope_of,
    mailbox_identity,
    malformed_reason,
    report_id_for,
)
from smartrelay.feedback.mailboxes.imap import ImapReader
from smartrelay.feedback.mailboxes.pop3 import Pop3Reader
from smartrelay.feedback.mailboxes.service import MailboxService, mailbox_services, make_reader
from smartrelay.feedback.mailboxes.session import DEFAULT_TUNABLES, ReaderTunables

__all__ = [
    "DEFAULT_TUNABLES",
    "MAX_MESSAGE_SIZE",
    "IMailboxReader",
    "ImapReader",
    "Intake",
    "MailboxError",
    "MailboxService",
    "Pop3Reader",
    "ProcessReport",
    "ReaderTunables",
    "envelope_of",
    "mailbox_identity",
    "mailbox_services",
    "make_reader",
    "malformed_reason",
    "report_id_for",
]
