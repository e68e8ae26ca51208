"""feedback/dsn.py: RFC 3464 delivery-status parts, read as leniently as real MTAs need."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartrelay.feedback.dsn import (
    MAX_DIAGNOSTIC,
    MAX_RECIPIENTS,
    parse_delivery_status,
    parse_dsn,
    reason_near,
    reply_code_of,
)
from smartrelay.feedback.mime import address_of, parse_message
from smartrelay.feedback.model import FailedRecipient

FIXTURES = Path(__file__).parent / "fixtures" / "feedback"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_rfc3464_multi_recipient_blocks_in_full() -> None:
    result = parse_dsn(parse_message(fixture("rfc3464-10.2-multi-recipient.eml")))
    assert result is not None
    assert result.reporting_mta == "cs.utk.edu"
    first, second, third = result.recipients
    assert first == FailedRecipient(
        address="arathib@vnet.ibm.com",
        action="failed",
        status="5.0.0",
        reply_code=550,
        # folded field unfolded, its "smtp;" type kept apart
        diagnostic="550 'arathib@vnet.IBM.COM' is not a registered gateway user",
        original_recipient="arathib@vnet.ibm.com",
        remote_mta="vnet.ibm.com",
        last_attempt=None,
        diagnostic_type="smtp",
    )
    assert (second.address, second.action, second.status) == (
        "johnh@hpnjld.njd.hp.com",
        "delayed",
        "4.0.0",  # "4.0.0 (hpnjld.njd.jp.com: host name lookup failure)"
    )
    assert (third.address, third.diagnostic, third.remote_mta) == (
        "wsnell@sdcc13.ucsd.edu",
        "550 user unknown",
        "sdcc13.ucsd.edu",
    )
    assert result.returned is not None  # "[original message goes here]": nothing of ours
    assert result.returned.smartrelay_id is None


def test_last_attempt_date_and_returned_headers() -> None:
    result = parse_dsn(parse_message(fixture("sendmail-user-unknown.eml")))
    assert result is not None
    (r,) = result.recipients
    assert r.last_attempt == "Mon, 12 Oct 2026 10:15:03 GMT"
    assert r.diagnostic_type == "smtp"  # "SMTP;" lower-cased
    returned = result.returned
    assert returned is not None
    assert returned.smartrelay_id == "0P4K9B3ZQ7M2XTRZ"
    assert returned.message_id == "0P4K9B3ZQ7M2XTRZ@relay.example.com"
    assert returned.return_path == "b+AQIDBAUGBwgJCgsMDQ4PEw@bounces.example.com"
    assert returned.to == ("nobody@example.net",)


def test_returned_message_rfc822_with_list_unsubscribe() -> None:
    result = parse_dsn(parse_message(fixture("postfix-user-unknown.eml")))
    assert result is not None
    returned = result.returned
    assert returned is not None
    assert returned.to == ("nosuchuser@example.net", "full@example.net")
    assert returned.list_unsubscribe is not None
    assert "u+AQIDBAUGBwgJCgsMDQ4PEA@bounces.example.com" in returned.list_unsubscribe


def test_postfix_order_final_before_original() -> None:
    recipients, _ = parse_delivery_status(
        "Final-Recipient: rfc822; a@example.net\n"
        "Original-Recipient: rfc822;A@Example.net\n"
        "Action: failed\nStatus: 5.1.1\n\n"
        "Final-Recipient: rfc822; b@example.net\n"
        "Original-Recipient: rfc822;b@example.net\n"
        "Action: failed\nStatus: 5.2.2\n"
    )
    assert [(r.address, r.original_recipient, r.status) for r in recipients] == [
        ("a@example.net", "A@Example.net", "5.1.1"),
        ("b@example.net", "b@example.net", "5.2.2"),
    ]


def test_blocks_without_blank_lines_and_action_first() -> None:
    # Exim writes Action first; a sloppy gateway drops the blank lines.
    recipients, mta = parse_delivery_status(
        "Reporting-MTA: dns; mx.example.org\n"
        "Action: failed\nFinal-Recipient: rfc822;a@example.net\nStatus: 5.0.0\n"
        "Action: delayed\nFinal-Recipient: rfc822;b@example.net\nStatus: 4.4.1\n"
        "Original-Recipient: rfc822;c@example.net\nFinal-Recipient: rfc822;c@example.net\n"
        "Action: failed\nStatus: 5.1.1\n"
        "Original-Recipient: rfc822;d@example.net\nFinal-Recipient: rfc822;d@example.net\n"
        "Action: failed\nStatus: 5.1.2\n"
    )
    assert mta == "mx.example.org"
    assert [(r.address, r.action, r.status) for r in recipients] == [
        ("a@example.net", "failed", "5.0.0"),
        ("b@example.net", "delayed", "4.4.1"),
        ("c@example.net", "failed", "5.1.1"),
        ("d@example.net", "failed", "5.1.2"),
    ]
    assert [r.original_recipient for r in recipients] == [
        None,
        None,
        "c@example.net",
        "d@example.net",
    ]


def test_case_folding_brackets_and_crlf() -> None:
    recipients, _ = parse_delivery_status(
        "FINAL-RECIPIENT:   RFC822 ;   <Mixed.Case@Example.NET>  \r\n"
        "ACTION: Failed (permanent)\r\n"
        "STATUS:5.1.1\r\n"
        "DIAGNOSTIC-CODE: X-Unix;\r\n"
        "\t  550 mailbox\r\n"
        "  unavailable\r\n"
    )
    (r,) = recipients
    assert r.address == "Mixed.Case@Example.NET"
    assert r.action == "failed"
    assert r.status == "5.1.1"
    assert r.diagnostic_type == "x-unix"
    assert r.diagnostic == "550 mailbox unavailable"
    assert r.reply_code == 550


@pytest.mark.parametrize(
    ("field", "address"),
    [
        ("rfc822;user@example.net", "user@example.net"),
        ("rfc822; <user@example.net>", "user@example.net"),
        ("<user@example.net>", "user@example.net"),
        ("user@example.net", "user@example.net"),
        ('RFC822; "User" <user@example.net>', "user@example.net"),
        ("utf-8; \\x{7528}\\x{6237}@example.net", "用户@example.net"),
        ("x400; /C=US/ADMD=A/PRMD=B/O=C/S=D/", "/C=US/ADMD=A/PRMD=B/O=C/S=D/"),
    ],
)
def test_address_forms(field: str, address: str) -> None:
    assert address_of(field) == address


def test_missing_action_defaults_by_status() -> None:
    recipients, _ = parse_delivery_status(
        "Final-Recipient: rfc822;a@example.net\nStatus: 5.1.1\n\n"
        "Final-Recipient: rfc822;b@example.net\nStatus: 2.0.0\n"
    )
    assert [r.action for r in recipients] == ["failed", "delivered"]


def test_blocks_without_an_address_are_dropped() -> None:
    recipients, _ = parse_delivery_status("Action: failed\nStatus: 5.1.1\n\nStatus: 4.0.0\n")
    assert recipients == []


def test_diagnostic_is_bounded_and_recipients_are_capped() -> None:
    long = "x" * 10_000
    block = (
        f"Final-Recipient: rfc822;a@example.net\nAction: failed\nDiagnostic-Code: smtp; {long}\n"
    )
    recipients, _ = parse_delivery_status(block)
    assert len(recipients[0].diagnostic) == MAX_DIAGNOSTIC
    many = "".join(
        f"Final-Recipient: rfc822;u{i}@example.net\nAction: failed\n\n"
        for i in range(MAX_RECIPIENTS + 50)
    )
    assert len(parse_delivery_status(many)[0]) == MAX_RECIPIENTS


def test_text_plain_status_part_inside_a_report() -> None:
    result = parse_dsn(parse_message(fixture("dsn-lenient-text-plain.eml")))
    assert result is not None
    assert [r.address for r in result.recipients] == [
        "dmarc-strict@example.net",
        "Relay.Denied@Example.NET",
    ]
    assert result.recipients[0].diagnostic.endswith("DMARC policy is reject.")


def test_forwarded_bounce_one_level_deeper() -> None:
    result = parse_dsn(parse_message(fixture("forwarded-dsn-blocklist.eml")))
    assert result is not None
    assert [r.address for r in result.recipients] == ["someone@example.net"]
    # the returned message is the bounce's own, not the forwarding wrapper
    assert result.returned is not None
    assert result.returned.smartrelay_id == "0P4K9B3ZQ7M2XTS3"


def test_rfc6533_global_delivery_status_8bit() -> None:
    result = parse_dsn(parse_message(fixture("dsn-global-utf8.eml")))
    assert result is not None
    (r,) = result.recipients
    assert r.address == "用户@例子.jp"
    assert r.original_recipient == "用户@例子.jp"  # from the \x{...} form
    assert "用户不存在" in r.diagnostic
    assert result.returned is not None
    assert result.returned.to == ("用户@例子.jp",)


def test_latin1_8bit_status_part() -> None:
    raw = (
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
        b"--b\nContent-Type: message/delivery-status\n\n"
        b"Reporting-MTA: dns; mx.example.de\n\n"
        b"Final-Recipient: rfc822;m\xfcller@example.de\nAction: failed\nStatus: 5.1.1\n"
        b"Diagnostic-Code: smtp; 550 Empf\xe4nger unbekannt\n--b--\n"
    )
    result = parse_dsn(parse_message(raw))
    assert result is not None
    (r,) = result.recipients
    assert r.status == "5.1.1"
    assert r.diagnostic.startswith("550 Empf")


def test_status_text_in_a_plain_message_body() -> None:
    # No multipart/report at all, but the body is made of DSN fields (some gateways).
    raw = (
        b"From: postmaster@example.net\nSubject: Delivery report\n\n"
        b"Final-Recipient: rfc822; gone@example.net\nAction: failed\nStatus: 5.1.1\n"
    )
    result = parse_dsn(parse_message(raw))
    assert result is not None
    assert [r.address for r in result.recipients] == ["gone@example.net"]


def test_not_a_dsn() -> None:
    assert parse_dsn(parse_message(b"From: a@example.net\nSubject: hi\n\nhello\n")) is None
    assert parse_dsn(parse_message(fixture("rfc5965-appendix-b.eml"))) is None


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("550 5.1.1 user unknown", 550),
        ("550-5.1.1 The email account", 550),
        ("host mx.example.net[203.0.113.5] said: 552 5.2.2 full", 552),
        ("Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound'", 550),
        ("<x@example.net>: 554 5.7.1 rejected", 554),
        ("connect to mx.example.net[203.0.113.5]:25: Connection timed out", None),
        ("retry timeout exceeded", None),
        ("", None),
    ],
)
def test_reply_code_of(text: str, code: int | None) -> None:
    assert reply_code_of(text) == code


def test_a_block_without_diagnostic_takes_the_reason_under_its_address() -> None:
    """Exim's DSN for local failures has no Diagnostic-Code; its text has the reason."""
    result = parse_dsn(parse_message(fixture("exim-dsn-local-failures.eml")))
    assert result is not None
    assert [(r.address, r.diagnostic) for r in result.recipients] == [
        ("nobody@nowhere.example", "Unrouteable address"),
        (
            "local.user@mx.example.org",
            "mailbox is full (MTA-imposed quota exceeded while writing to file"
            " /var/mail/local.user)",
        ),
    ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "   ----- The following addresses had permanent fatal errors -----\n"
            "<a@example.net>\n    (reason: 550 5.1.1 <a@example.net>... User unknown)\n\n",
            "550 5.1.1 <a@example.net>... User unknown",
        ),
        (
            "<a@example.net>: host mx.example.net[203.0.113.5] said: 550 5.1.1\n"
            "    <a@example.net>: Recipient address rejected (in reply to RCPT TO command)\n",
            "host mx.example.net[203.0.113.5] said: 550 5.1.1 <a@example.net>: Recipient"
            " address rejected (in reply to RCPT TO command)",
        ),
        ("  a@example.net\n  b@example.net\n    Unrouteable address\n", ""),
        ("nothing about it here\n", ""),
    ],
)
def test_reason_near(text: str, reason: str) -> None:
    assert reason_near(text, "a@example.net") == reason
