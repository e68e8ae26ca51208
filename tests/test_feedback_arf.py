"""feedback/arf.py: RFC 5965 ARF reports and the non-ARF complaints of some providers."""

from __future__ import annotations

from email.message import Message
from pathlib import Path

from smartrelay.feedback.arf import parse_arf, parse_feedback_fields, parse_non_arf
from smartrelay.feedback.mime import parse_message
from smartrelay.feedback.model import Complaint

FIXTURES = Path(__file__).parent / "fixtures" / "feedback"


def message(name: str) -> Message:
    return parse_message((FIXTURES / name).read_bytes())


def test_rfc5965_appendix_b() -> None:
    found = parse_arf(message("rfc5965-appendix-b.eml"))
    assert found is not None
    assert found.format == "arf"
    assert found.complaint == Complaint(
        feedback_type="abuse",
        source="SomeGenerator/1.0",
        original_rcpt_to="user@example.com",
        source_ip="192.0.2.1",
        arrival_date="Thu, 8 Mar 2005 14:00:00 EDT",
    )
    assert found.returned is not None
    # RFC 5965's example Message-ID has no angle brackets; it is kept as written.
    assert found.returned.message_id == "8787KJKJ3K4J3K4J3K4J3.mail@example.net"


def test_feedback_fields_folded_and_repeated() -> None:
    fields = parse_feedback_fields(
        "Feedback-Type: abuse\n"
        "Authentication-Results: mail.example.com;\n"
        "        spf=fail smtp.mail=x@example.com\n"
        "Reported-Uri: http://example.net/1\n"
        "Reported-Uri: http://example.net/2\n"
    )
    assert fields["authentication-results"] == "mail.example.com; spf=fail smtp.mail=x@example.com"
    assert fields["reported-uri"] == "http://example.net/1"


def test_yahoo_report_without_original_rcpt_to_uses_the_returned_to() -> None:
    found = parse_arf(message("yahoo-arf.eml"))
    assert found is not None
    assert found.complaint.source == "Yahoo!-Mail-Feedback/2.0"
    assert found.complaint.original_rcpt_to == "redacted@yahoo.com"
    assert found.returned is not None
    assert found.returned.smartrelay_id == "0P4K9B3ZQ7M2XTS6"
    assert found.returned.return_path == "b+AQIDBAUGBwgJCgsMDQ4PGw@bounces.example.com"


def test_headers_only_report_and_received_date() -> None:
    found = parse_arf(message("aol-scomp-arf-headers.eml"))
    assert found is not None
    assert found.complaint.arrival_date == "Mon, 12 Oct 2026 12:04:00 -0400"
    assert found.returned is not None
    assert found.returned.smartrelay_id == "0P4K9B3ZQ7M2XTS7"


def test_mislabelled_report_part_and_other_feedback_types() -> None:
    found = parse_arf(message("arf-mislabelled-not-spam.eml"))
    assert found is not None
    assert found.complaint.feedback_type == "not-spam"
    assert found.complaint.original_rcpt_to == "Happy@isp.example"


def test_no_user_agent_means_the_from_domain() -> None:
    raw = (
        b"From: FBL <fbl@Isp.Example>\n"
        b"Content-Type: multipart/report; report-type=feedback-report; boundary=b\n\n"
        b"--b\nContent-Type: message/feedback-report\n\nFeedback-Type: Fraud\n--b--\n"
    )
    found = parse_arf(parse_message(raw))
    assert found is not None
    assert (found.complaint.feedback_type, found.complaint.source) == ("fraud", "isp.example")
    assert found.returned is None


def test_a_dsn_is_not_an_arf_report() -> None:
    assert parse_arf(message("postfix-user-unknown.eml")) is None
    assert parse_non_arf(message("postfix-user-unknown.eml")) is None


def test_microsoft_jmrp_without_arf() -> None:
    found = parse_non_arf(message("microsoft-jmrp-non-arf.eml"))
    assert found is not None
    assert found.format == "microsoft-jmrp"
    assert found.complaint.original_rcpt_to == "complainer@outlook.com"
    assert found.complaint.source == "hotmail.com"
    assert found.returned is not None
    assert found.returned.smartrelay_id == "0P4K9B3ZQ7M2XTS8"


def test_spamcop_report_quoting_the_original_inline() -> None:
    found = parse_non_arf(message("spamcop-inline.eml"))
    assert found is not None
    assert found.format == "spamcop"


def test_fbl_sender_returning_an_attached_original() -> None:
    raw = (
        b"From: feedbackloop@isp.example\nSubject: Spam report\n"
        b"Content-Type: multipart/mixed; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nA user reported this.\n"
        b"--b\nContent-Type: message/rfc822\n\n"
        b"To: someone@isp.example\nX-SmartRelay-ID: 0P4K9B3ZQ7M2XTSH\n\nhi\n--b--\n"
    )
    found = parse_non_arf(parse_message(raw))
    assert found is not None
    assert found.format == "fbl-sender"
    assert found.complaint.original_rcpt_to == "someone@isp.example"


def test_complaint_words_without_an_original_are_no_complaint() -> None:
    # A person writing about a complaint, or an FBL sender's newsletter: nothing returned.
    for raw in (
        b"From: alice@example.net\nSubject: Re: complaint about my order\n\nWhere is it?\n",
        b"From: fbl@isp.example\nSubject: FBL programme changes\n\nNews.\n",
    ):
        assert parse_non_arf(parse_message(raw)) is None


def test_an_attached_message_alone_is_no_complaint() -> None:
    raw = (
        b"From: alice@example.net\nSubject: Fwd: your newsletter\n"
        b"Content-Type: multipart/mixed; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nlook\n"
        b"--b\nContent-Type: message/rfc822\n\nTo: alice@example.net\n\nhi\n--b--\n"
    )
    assert parse_non_arf(parse_message(raw)) is None
