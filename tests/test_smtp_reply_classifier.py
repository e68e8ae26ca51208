"""smartrelay.feedback.smtp_replies: remote SMTP replies and DSN statuses → bounce categories.

The replies are written the way providers send them (Gmail, Outlook/Office 365, Yahoo/AOL,
Postfix, Exim, Sendmail, filtering services), including multi-line replies that repeat the
enhanced status on every line.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartrelay.feedback.smtp_replies import (
    BOUNCE_CATEGORIES,
    HARD_CATEGORIES,
    TEXT_RULES,
    Classification,
    classify_reply,
    classify_status,
    parse_enhanced_status,
)


def split_reply(raw: str) -> tuple[int, str]:
    """A raw reply ("550-a\\n550 b") as the SMTP client hands it over: code, texts joined."""
    lines = raw.split("\n")
    return int(lines[0][:3]), "\n".join(line[4:] for line in lines)


def classify_raw(raw: str) -> Classification:
    return classify_reply(*split_reply(raw))


GMAIL_NO_SUCH_USER = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\n"
    "550-5.1.1 double-checking the recipient's email address for typos or\n"
    "550-5.1.1 unnecessary spaces. Learn more at\n"
    "550 5.1.1  https://support.google.com/mail/?p=NoSuchUser a1si123456qkb.12 - gsmtp"
)

# (raw reply, category, status)
REAL_REPLIES: list[tuple[str, str, str]] = [
    # --- Gmail / Google Workspace ---
    (GMAIL_NO_SUCH_USER, "invalid-recipient", "5.1.1"),
    (
        "552-5.2.2 The email account that you tried to reach is over quota. Please direct\n"
        "552-5.2.2 the recipient to\n"
        "552 5.2.2  https://support.google.com/mail/?p=OverQuotaPerm x1si - gsmtp",
        "mailbox-full",
        "5.2.2",
    ),
    (
        "452-4.2.2 The email account that you tried to reach is over quota. Please direct\n"
        "452 4.2.2 the recipient to https://support.google.com/mail/?p=OverQuotaTemp - gsmtp",
        "mailbox-full",
        "4.2.2",
    ),
    (
        "550-5.2.1 The email account that you tried to reach is disabled. Learn more at\n"
        "550 5.2.1  https://support.google.com/mail/?p=DisabledUser z1si - gsmtp",
        "mailbox-inactive",
        "5.2.1",
    ),
    (
        "450-4.2.1 The user you are trying to contact is receiving mail too quickly. Please\n"
        "450-4.2.1 resend your message at a later time. If the user is able to receive\n"
        "450 4.2.1 mail at that time, your message will be delivered. - gsmtp",
        "rate-limited",
        "4.2.1",
    ),
    (
        "550-5.2.1 The user you are trying to contact is receiving mail at a rate that\n"
        "550 5.2.1 prevents additional messages from being delivered. - gsmtp",
        "rate-limited",
        "5.2.1",
    ),
    (
        "421-4.7.0 [1.2.3.4      15] Our system has detected an unusual rate of\n"
        "421-4.7.0 unsolicited mail originating from your IP address. To protect our\n"
        "421-4.7.0 users from spam, mail sent from your IP address has been temporarily\n"
        "421 4.7.0 rate limited. - gsmtp",
        "rate-limited",
        "4.7.0",
    ),
    (
        "421-4.7.28 [1.2.3.4      15] Our system has detected an unusual rate of\n"
        "421 4.7.28 unsolicited mail originating from your IP address. - gsmtp",
        "rate-limited",
        "4.7.28",
    ),
    (
        "550-5.7.1 [1.2.3.4      12] Our system has detected an unusual rate of\n"
        "550-5.7.1 unsolicited mail originating from your IP address. To protect our\n"
        "550-5.7.1 users from spam, mail sent from your IP address has been blocked.\n"
        "550 5.7.1 Please visit https://support.google.com/mail/?p=UnsolicitedIPError - gsmtp",
        "reputation-block",
        "5.7.1",
    ),
    (
        "550-5.7.1 [1.2.3.4      12] Our system has detected that this message is\n"
        "550-5.7.1 likely unsolicited mail. To reduce the amount of spam sent to Gmail,\n"
        "550 5.7.1 this message has been blocked. - gsmtp",
        "spam-content",
        "5.7.1",
    ),
    (
        "550-5.7.26 This mail is unauthenticated, which poses a security risk to the\n"
        "550-5.7.26 sender and Gmail users, and has been blocked. The sender must\n"
        "550 5.7.26 authenticate with at least one of SPF or DKIM. - gsmtp",
        "authentication",
        "5.7.26",
    ),
    (
        "550-5.7.26 Unauthenticated email from example.com is not accepted due to domain's\n"
        "550 5.7.26 DMARC policy. https://support.google.com/mail/?p=DmarcRejection - gsmtp",
        "authentication",
        "5.7.26",
    ),
    (
        "550-5.7.25 [2001:db8::1] The IP address sending this message does not have a\n"
        "550 5.7.25 PTR record setup, or the corresponding forward DNS entry does not - gsmtp",
        "authentication",
        "5.7.25",
    ),
    (
        "552-5.7.0 This message was blocked because its content presents a potential\n"
        "552 5.7.0 security issue. Please visit https://support.google.com/mail/?p=BlockedMessage",
        "spam-content",
        "5.7.0",
    ),
    (
        "552-5.2.3 Your message exceeded Google's message size limits. Please visit\n"
        "552 5.2.3 https://support.google.com/mail/?p=MaxSizeError - gsmtp",
        "message-too-large",
        "5.2.3",
    ),
    (
        "553-5.1.2 We weren't able to find the recipient domain. Please check for any\n"
        "553 5.1.2 spelling errors, and make sure you didn't enter any spaces - gsmtp",
        "invalid-domain",
        "5.1.2",
    ),
    (
        "550-5.7.1 [1.2.3.4] Messages missing a valid messageId header are not\n"
        "550 5.7.1 accepted. - gsmtp",
        "policy",
        "5.7.1",
    ),
    ("421-4.7.0 Try again later, closing connection. (EHLO) - gsmtp", "rate-limited", "4.7.0"),
    ("421 4.3.0 Temporary System Problem.  Try again later (10). - gsmtp", "technical", "4.3.0"),
    (
        "550 5.4.5 Daily user sending quota exceeded. https://support.google.com/a/answer/166852",
        "rate-limited",
        "5.4.5",
    ),
    # --- Outlook.com / Office 365 ---
    (
        "550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302). "
        "[AM1EUR02FT123.eop-EUR02.prod.protection.outlook.com]",
        "invalid-recipient",
        "5.5.0",
    ),
    (
        "550 5.4.1 Recipient address rejected: Access denied. AS(201806281) "
        "[DM6NAM12FT034.eop-nam12.prod.protection.outlook.com]",
        "invalid-recipient",
        "5.4.1",
    ),
    (
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        "invalid-recipient",
        "5.1.10",
    ),
    (
        "550 5.7.1 Unfortunately, messages from [1.2.3.4] weren't sent. Please contact your "
        "Internet service provider since part of their network is on our block list (S3150). "
        "You can also refer your provider to http://mail.live.com/mail/troubleshooting.aspx#errors.",
        "reputation-block",
        "5.7.1",
    ),
    (
        "451 4.7.650 The mail server [1.2.3.4] has been temporarily rate limited due to IP "
        "reputation. For e-mail delivery information, see https://postmaster.live.com (S775)",
        "rate-limited",
        "4.7.650",
    ),
    (
        "451 4.7.500 Server busy. Please try again later from [1.2.3.4]. (S77714) "
        "[Name=Protocol Filter Agent][AGT=PFA]",
        "rate-limited",
        "4.7.500",
    ),
    (
        "550 5.7.606 Access denied, banned sending IP [1.2.3.4]. To request removal from this "
        "list please visit https://sender.office.com/ and follow the directions.",
        "reputation-block",
        "5.7.606",
    ),
    (
        "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP. "
        "For more information please go to http://go.microsoft.com/fwlink/?LinkId=526653",
        "reputation-block",
        "5.7.708",
    ),
    (
        "550 5.7.515 Access denied, sending domain example.com doesn't meet the required "
        "authentication level.",
        "authentication",
        "5.7.515",
    ),
    (
        "550 5.7.520 Message blocked because it contains content identified as spam. AS(4810)",
        "spam-content",
        "5.7.520",
    ),
    (
        "550 5.4.310 DNS domain example.invalid does not exist [Message=InfoDomainNonexistent]",
        "invalid-domain",
        "5.4.310",
    ),
    ("554 5.4.6 Hop count exceeded - possible mail loop", "technical", "5.4.6"),
    (
        "554 5.6.211 Invalid MIME Content: Single text value size (32784) exceeded allowed "
        "maximum (32768) for the 'CharsetName' property.",
        "technical",
        "5.6.211",
    ),
    # --- Yahoo / AOL ---
    (
        "554 delivery error: dd This user doesn't have a yahoo.com account "
        "(someone@yahoo.com) [0] - mta1234.mail.bf1.yahoo.com",
        "invalid-recipient",
        "5.0.0",
    ),
    ("552 1 Requested mail action aborted, mailbox not found", "invalid-recipient", "5.0.0"),
    (
        "554 30 Sorry, your message to someone@aol.com cannot be delivered. This mailbox is "
        "disabled (554.30).",
        "mailbox-inactive",
        "5.0.0",
    ),
    (
        "421 4.7.0 [TSS04] Messages from 1.2.3.4 temporarily deferred due to unexpected volume "
        "or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
        "rate-limited",
        "4.7.0",
    ),
    (
        "553 5.7.2 [TSS09] All messages from 1.2.3.4 will be permanently deferred; Retrying "
        "will NOT succeed. See https://postmaster.yahooinc.com/error-codes",
        "reputation-block",
        "5.7.2",
    ),
    (
        "554 5.7.9 Message not accepted for policy reasons.  See "
        "https://postmaster.yahooinc.com/error-codes",
        "policy",
        "5.7.9",
    ),
    (
        "550 5.7.9 This mail has been blocked because the sender is unauthenticated. Yahoo "
        "requires all senders to authenticate with either SPF or DKIM.",
        "authentication",
        "5.7.9",
    ),
    ("451 Message temporarily deferred - [160]", "technical", "4.0.0"),
    # --- iCloud, Comcast, GMX ---
    ("550 5.1.1 <someone@icloud.com>: user does not exist", "invalid-recipient", "5.1.1"),
    (
        "554 5.7.1 [CS01] Message rejected due to local policy. Please visit "
        "https://support.apple.com/en-us/HT204137",
        "policy",
        "5.7.1",
    ),
    ("550 5.1.1 Not our Customer", "invalid-recipient", "5.1.1"),
    (
        "554-gmx.net (mxgmx017) Nemesis ESMTP Service not available\n"
        "554 Reject due to policy restrictions.",
        "policy",
        "5.0.0",
    ),
    # --- Postfix, Exim, Sendmail and friends ---
    (
        "550 5.1.1 <someone@example.com>: Recipient address rejected: User unknown in virtual "
        "mailbox table",
        "invalid-recipient",
        "5.1.1",
    ),
    ("554 5.7.1 <someone@example.com>: Relay access denied", "policy", "5.7.1"),
    (
        "554 5.7.1 Service unavailable; Client host [1.2.3.4] blocked using zen.spamhaus.org; "
        "https://www.spamhaus.org/query/ip/1.2.3.4",
        "reputation-block",
        "5.7.1",
    ),
    (
        "550 5.7.1 Service unavailable, Client host [1.2.3.4] blocked using Spamhaus",
        "reputation-block",
        "5.7.1",
    ),
    (
        "554 Service unavailable; Client host [1.2.3.4] blocked using Barracuda Reputation, "
        "https://www.barracudanetworks.com/reputation/?pr=1&ip=1.2.3.4",
        "reputation-block",
        "5.0.0",
    ),
    (
        "550 5.7.1 Your IP address 1.2.3.4 is listed in the Spamhaus SBL",
        "reputation-block",
        "5.7.1",
    ),
    (
        "450 4.2.0 <someone@example.com>: Recipient address rejected: Greylisted, see "
        "http://postgrey.schweikert.ch/help/example.com.html",
        "policy",
        "4.2.0",
    ),
    ("451 4.7.1 Greylisting in action, please come back in 00:05:00", "policy", "4.7.1"),
    # A PTR (reverse DNS) demand: the sending host's reputation (issue 14), not a policy.
    (
        "450 4.7.1 Client host rejected: cannot find your hostname, [1.2.3.4]",
        "reputation-block",
        "4.7.1",
    ),
    (
        "550 5.7.1 Client host rejected: cannot find your reverse hostname, [1.2.3.4]",
        "reputation-block",
        "5.7.1",
    ),
    ("550 Unrouteable address", "invalid-domain", "5.0.0"),
    ("550 5.0.0 Host not found", "invalid-domain", "5.0.0"),
    ("550 5.0.0 <someone@example.com>... User unknown", "invalid-recipient", "5.0.0"),
    ("553 5.1.3 Invalid address", "invalid-recipient", "5.1.3"),
    ("550 Requested action not taken: mailbox unavailable", "invalid-recipient", "5.0.0"),
    ("550 5.2.1 Mailbox disabled, not accepting messages", "mailbox-inactive", "5.2.1"),
    ("550 This account has been deactivated", "mailbox-inactive", "5.0.0"),
    ("550 5.1.6 Recipient has moved and left no forwarding address", "mailbox-inactive", "5.1.6"),
    ("552 5.2.2 Mailbox full", "mailbox-full", "5.2.2"),
    ("552 Requested mail action aborted: exceeded storage allocation", "mailbox-full", "5.0.0"),
    ("452 Insufficient system storage", "mailbox-full", "4.0.0"),
    ("452 4.3.1 Insufficient system storage", "technical", "4.3.1"),
    ("552 5.3.4 Message size exceeds fixed limit", "message-too-large", "5.3.4"),
    ("552 Message size exceeds maximum permitted", "message-too-large", "5.0.0"),
    ("554 5.7.1 Message rejected as spam", "spam-content", "5.7.1"),
    (
        "554 5.7.1 The message was rejected because it contains prohibited virus or spam content",
        "spam-content",
        "5.7.1",
    ),
    ("550 5.7.1 Message rejected due to content restrictions", "spam-content", "5.7.1"),
    ("554 5.7.5 Permanent error evaluating DMARC policy", "authentication", "5.7.5"),
    ("550 5.7.26 This mail is unauthenticated", "authentication", "5.7.26"),
    (
        "550 5.7.23 The message was rejected because of Sender Policy Framework violation",
        "authentication",
        "5.7.23",
    ),
    ("421 4.7.0 Too many connections from your IP, slow down", "rate-limited", "4.7.0"),
    ("452 4.5.3 Your message has too many recipients", "rate-limited", "4.5.3"),
    ("421 Service not available, closing transmission channel", "technical", "4.0.0"),
    ("451 4.3.0 Mail server temporarily rejected message.", "technical", "4.3.0"),
    ("554 5.0.0 Service unavailable", "undetermined", "5.0.0"),
    ("451 4.4.7 Delivery time expired", "expired", "4.4.7"),
    # --- filtering services ---
    (
        "550 Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550 "
        "[AbCdEf12345.us123]",
        "invalid-recipient",
        "5.0.0",
    ),
    (
        "554 Email rejected due to security policies - "
        "https://community.mimecast.com/docs/DOC-1369#554",
        "policy",
        "5.0.0",
    ),
    (
        "554 5.7.1 Blocked - see https://ipcheck.proofpoint.com/?ip=1.2.3.4",
        "reputation-block",
        "5.7.1",
    ),
    ("550 5.1.1 User Unknown", "invalid-recipient", "5.1.1"),
    (
        "550 someone@example.com... No such user (not listed in public Name & Address Book)",
        "invalid-recipient",
        "5.0.0",
    ),
]


def test_there_are_at_least_forty_real_world_replies() -> None:
    assert len(REAL_REPLIES) >= 40


@pytest.mark.parametrize(("raw", "category", "status"), REAL_REPLIES)
def test_real_world_replies(raw: str, category: str, status: str) -> None:
    result = classify_raw(raw)
    assert (result.category, result.status) == (category, status)
    assert result.hard == (category in HARD_CATEGORIES)
    assert result.permanent == raw.startswith("5")


def test_categories_are_those_of_the_spec_in_order() -> None:
    assert BOUNCE_CATEGORIES == (
        "invalid-recipient",
        "invalid-domain",
        "mailbox-full",
        "mailbox-inactive",
        "message-too-large",
        "spam-content",
        "reputation-block",
        "authentication",
        "policy",
        "rate-limited",
        "expired",
        "technical",
        "undetermined",
    )
    assert frozenset({"invalid-recipient", "invalid-domain"}) == HARD_CATEGORIES
    assert {category for _, category in TEXT_RULES} <= set(BOUNCE_CATEGORIES)


def test_every_category_is_reachable_from_the_real_replies() -> None:
    assert {category for _, category, _ in REAL_REPLIES} == set(BOUNCE_CATEGORIES)


# --- enhanced status parsing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("5.1.1 User unknown", "5.1.1"),
        ("4.7.650 rate limited", "4.7.650"),
        ("2.0.0 Ok: queued as ABC", "2.0.0"),
        ("5.01.001 leading zeros", "5.1.1"),
        ("first line\n5.2.2 second line", "5.2.2"),
        ("  5.7.1 indented", "5.7.1"),
        ("550-5.1.1 with its basic code", "5.1.1"),
        ("550 5.1.1 with its basic code", "5.1.1"),
        ("smtp; 550 5.1.1 <a@example.com>: Recipient address rejected", "5.1.1"),
        ("smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound", "5.1.10"),
        ("5.999.999 upper bounds", "5.999.999"),
        ("5.1.1", "5.1.1"),
        ("5.1.1: colon after", "5.1.1"),
        ("User unknown", None),
        ("", None),
        ("User unknown 5.1.1", None),  # not at the start of a line
        ("3.1.1 no such class", None),
        ("6.1.1 no such class", None),
        ("5.1000.1 subject too long", None),
        ("5.1.1000 detail too long", None),
        ("5.1 incomplete", None),
        ("4.2.2.1 is an IP address", None),
        ("Try 8.8.8.8", None),
    ],
)
def test_parse_enhanced_status(text: str, status: str | None) -> None:
    assert parse_enhanced_status(text) == status


@given(
    st.sampled_from("245"),
    st.integers(0, 999),
    st.integers(0, 999),
    st.text(alphabet=st.characters(exclude_categories=["Nd"]), max_size=20),
)
def test_parse_enhanced_status_property(cls: str, subject: int, detail: int, tail: str) -> None:
    tail = tail if not tail.startswith(".") else " " + tail
    assert parse_enhanced_status(f"{cls}.{subject}.{detail}{tail}") == f"{cls}.{subject}.{detail}"


# --- status rules and precedence -------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "category"),
    [
        (550, "5.1.1 Bad destination mailbox", "invalid-recipient"),
        (550, "5.1.2 Bad destination system", "invalid-domain"),
        (550, "5.1.3 Bad destination mailbox address syntax", "invalid-recipient"),
        (550, "5.1.6 Mailbox moved", "mailbox-inactive"),
        (550, "5.1.10 Recipient address has null MX", "invalid-domain"),
        (550, "5.1.10 Not found", "invalid-recipient"),
        (550, "5.2.1 Mailbox disabled", "mailbox-inactive"),
        (552, "5.2.2 Mailbox full", "mailbox-full"),
        (552, "5.2.3 Message length exceeds administrative limit", "message-too-large"),
        (552, "5.3.4 Message too big for system", "message-too-large"),
        (554, "5.4.4 Unable to route", "invalid-domain"),
        (554, "5.4.7 Delivery time expired", "expired"),
        (535, "5.7.8 Authentication credentials invalid", "authentication"),
        (550, "5.7.20 No passing DKIM signature found", "authentication"),
        (550, "5.7.27 Sender address has null MX", "authentication"),
        (550, "5.7.17 Mailbox owner has changed", "mailbox-inactive"),
        (550, "5.7.1 Delivery not authorized, message refused", "policy"),
        (550, "5.7.1 Nope", "policy"),
        (550, "5.7.3 Security conversion required but not possible", "policy"),
        (554, "5.3.0 Other mail system problem", "technical"),
        (554, "5.4.0 Other network problem", "technical"),
        (554, "5.5.2 Syntax error", "technical"),
        (554, "5.6.0 Other media error", "technical"),
        (550, "5.2.0 Mailbox quota exceeded", "mailbox-full"),
        (550, "5.2.0 Other mailbox status", "undetermined"),
        (550, "5.0.0 Something went wrong", "undetermined"),
        (450, "4.0.0 Something went wrong", "technical"),
        (550, "Something went wrong", "undetermined"),
        (450, "Something went wrong", "technical"),
    ],
)
def test_status_rules(code: int, text: str, category: str) -> None:
    assert classify_reply(code, text).category == category


def test_a_firm_status_is_not_overridden_by_the_text() -> None:
    # The status is specific; words elsewhere in the text do not change it.
    assert classify_reply(550, "5.1.1 User unknown (reputation listed spam)").category == (
        "invalid-recipient"
    )
    assert classify_reply(552, "5.2.2 Mailbox full, policy denied").category == "mailbox-full"


def test_sender_side_problems_never_bounce_the_recipient_hard() -> None:
    for code, text in [
        (553, "5.1.8 <b+x@bounces.example.com>: Sender address rejected: Domain not found"),
        (550, "5.1.7 Bad sender's mailbox address syntax"),
        (550, "Sender address rejected: Domain not found"),
        (550, "Domain of sender address b+x@bounces.example.com does not exist"),
        (550, "Sender verify failed"),
        (550, "5.7.1 Sender address rejected: Access denied"),
    ]:
        result = classify_reply(code, text)
        assert not result.hard, (text, result)


def test_rate_limit_wording_wins_over_the_status_only_for_transient_replies() -> None:
    assert classify_reply(452, "4.2.2 Too many messages, slow down").category == "rate-limited"
    assert classify_reply(552, "5.2.2 Too many messages, slow down").category == "mailbox-full"


def test_weak_rate_wording_only_for_transient_replies_without_a_specific_status() -> None:
    assert classify_reply(451, "Please try again later").category == "rate-limited"
    assert classify_reply(451, "4.7.1 Please try again later").category == "rate-limited"
    assert classify_reply(451, "4.3.0 Please try again later").category == "technical"
    assert classify_reply(551, "Please try again later").category == "undetermined"
    # More specific wording comes first.
    assert classify_reply(452, "Mailbox quota exceeded, try again later").category == (
        "mailbox-full"
    )


def test_spamhaus_is_a_reputation_block_not_spam_content() -> None:
    assert classify_reply(550, "blocked using zen.spamhaus.org").category == "reputation-block"


def test_text_matching_is_case_insensitive_and_spans_lines() -> None:
    text = "5.2.2 The email account that you tried to reach is over\n5.2.2 QUOTA"
    assert classify_reply(550, text.replace("5.2.2", "5.0.0")).category == "mailbox-full"
    assert classify_reply(550, "USER UNKNOWN").category == "invalid-recipient"


def test_a_class_that_contradicts_the_basic_code_follows_the_basic_code() -> None:
    assert classify_reply(550, "4.1.1 User unknown") == Classification(
        "invalid-recipient", True, "5.1.1", True
    )
    assert classify_reply(450, "5.2.2 Mailbox full") == Classification(
        "mailbox-full", False, "4.2.2", False
    )


def test_codes_outside_4xx_and_5xx_do_not_crash() -> None:
    assert classify_reply(600, "weird").permanent
    assert classify_reply(600, "weird").status == "5.0.0"
    assert not classify_reply(399, "weird").permanent


@given(st.integers(400, 599), st.text(max_size=300))
def test_any_reply_gets_a_valid_classification(code: int, text: str) -> None:
    result = classify_reply(code, text)
    assert result.category in BOUNCE_CATEGORIES
    assert result.hard == (result.category in HARD_CATEGORIES)
    assert result.permanent == (code >= 500)
    assert re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", result.status)
    assert result.status[0] == str(code)[0]


# --- DSN fields ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "diagnostic", "expected"),
    [
        (
            "5.1.1",
            "smtp; 550-5.1.1 The email account that you tried to reach does not exist.",
            Classification("invalid-recipient", True, "5.1.1", True),
        ),
        (
            "5.0.0",
            "smtp; 550 <someone@example.com>: Recipient address rejected: User unknown",
            Classification("invalid-recipient", True, "5.0.0", True),
        ),
        (
            None,
            "smtp; 552 5.2.2 Mailbox full",
            Classification("mailbox-full", False, "5.2.2", True),
        ),
        (
            None,
            "smtp; 550 Requested action not taken: mailbox unavailable",
            Classification("invalid-recipient", True, "5.0.0", True),
        ),
        (
            None,
            "X-Postfix; host mx.example.com[192.0.2.1] said: 450 greylisted",
            Classification("policy", False, "4.0.0", False),
        ),
        (
            "4.4.7",
            "X-Postfix; delivery temporarily suspended: connect to mx.example.com: timed out",
            Classification("expired", False, "4.4.7", False),
        ),
        (
            "5.7.1",
            "smtp; 554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using "
            "zen.spamhaus.org",
            Classification("reputation-block", False, "5.7.1", True),
        ),
        (
            "5.7.26 (unauthenticated)",
            "",
            Classification("authentication", False, "5.7.26", True),
        ),
        ("garbage", "", Classification("undetermined", False, "5.0.0", True)),
        (None, "", Classification("undetermined", False, "5.0.0", True)),
        ("", "smtp; User unknown", Classification("invalid-recipient", True, "5.0.0", True)),
        ("2.0.0", "smtp; 250 ok", Classification("undetermined", False, "2.0.0", False)),
    ],
)
def test_classify_status(status: str | None, diagnostic: str, expected: Classification) -> None:
    assert classify_status(status, diagnostic) == expected


def test_classify_status_and_reply_agree_on_real_replies() -> None:
    for raw, category, status in REAL_REPLIES:
        if raw.startswith("4"):
            continue  # a DSN reports a failure with the final, permanent status
        code, text = split_reply(raw)
        result = classify_status(parse_enhanced_status(text), f"smtp; {code} {text}")
        assert (result.category, result.status) == (category, status), raw


# --- the wordings of real bounce texts (issue 14): many languages, RBLs, PTR demands ----------

# (diagnostic text without status, category): classified as a DSN recipient with no status.
BOUNCE_TEXT_WORDINGS: list[tuple[str, str]] = [
    # unknown users
    ("Benutzer unbekannt", "invalid-recipient"),
    ("Der Empfänger existiert nicht", "invalid-recipient"),
    ("Empfängeradresse nicht gefunden", "invalid-recipient"),
    ("Utilisateur inconnu", "invalid-recipient"),
    ("Adresse destinataire inexistante", "invalid-recipient"),
    ("Cette adresse n'existe pas", "invalid-recipient"),
    ("El usuario no existe", "invalid-recipient"),
    ("Destinatario desconocido", "invalid-recipient"),
    ("Utente inesistente", "invalid-recipient"),
    ("Indirizzo sconosciuto", "invalid-recipient"),
    ("O usuário não existe", "invalid-recipient"),
    ("Endereço desconhecido", "invalid-recipient"),
    ("Gebruiker onbekend", "invalid-recipient"),
    ("Dit adres bestaat niet", "invalid-recipient"),
    ("Adres nie istnieje", "invalid-recipient"),
    ("Такого адреса не существует", "invalid-recipient"),
    ("宛先不明", "invalid-recipient"),
    ("このユーザーは存在しません", "invalid-recipient"),
    ("用户不存在", "invalid-recipient"),
    ("收件人地址无效", "invalid-recipient"),
    ("The e-mail address you entered couldn't be found", "invalid-recipient"),
    ("tina wasn't found at contoso.com", "invalid-recipient"),
    ("Sorry, no mailbox here by that name", "invalid-recipient"),
    ("mailbox unavailable", "invalid-recipient"),
    ("Recipient not found", "invalid-recipient"),
    # unknown domains
    ("Domain existiert nicht", "invalid-domain"),
    ("Domaine inconnu", "invalid-domain"),
    ("El dominio no existe", "invalid-domain"),
    ("We weren't able to find the recipient domain", "invalid-domain"),
    ("No such domain", "invalid-domain"),
    ("ドメインが存在しません", "invalid-domain"),
    ("域名不存在", "invalid-domain"),
    ("Host or domain name not found", "invalid-domain"),
    # full mailboxes
    ("Postfach voll", "mailbox-full"),
    ("Das Postfach des Empfängers ist überfüllt", "mailbox-full"),
    ("Boîte aux lettres pleine", "mailbox-full"),
    ("La boite du destinataire est pleine", "mailbox-full"),
    ("Buzón lleno", "mailbox-full"),
    ("La casilla está llena", "mailbox-full"),
    ("Casella piena", "mailbox-full"),
    ("Caixa postal cheia", "mailbox-full"),
    ("Mailbox is vol", "mailbox-full"),
    ("Skrzynka odbiorcy jest pełna", "mailbox-full"),
    ("Почтовый ящик переполнен", "mailbox-full"),
    ("容量超過", "mailbox-full"),
    ("メールボックスがいっぱいです", "mailbox-full"),
    ("对方邮箱已满", "mailbox-full"),
    ("user is over quota", "mailbox-full"),
    ("The users mailfolder is over the allowed quota", "mailbox-full"),
    # inactive accounts
    ("Konto deaktiviert", "mailbox-inactive"),
    ("Compte désactivé", "mailbox-inactive"),
    ("Cuenta suspendida", "mailbox-inactive"),
    ("Account disattivato", "mailbox-inactive"),
    ("Conta desativada", "mailbox-inactive"),
    ("This account has been terminated", "mailbox-inactive"),
    ("アカウントが停止されています", "mailbox-inactive"),
    ("该账户已停用", "mailbox-inactive"),
    # too large
    ("Nachricht zu groß", "message-too-large"),
    ("Message trop volumineux", "message-too-large"),
    ("Mensaje demasiado grande", "message-too-large"),
    ("Messaggio troppo grande", "message-too-large"),
    ("Exceeds size limit", "message-too-large"),
    # spam and viruses
    ("Spamverdacht: Nachricht abgelehnt", "spam-content"),
    ("Message refusé: pourriel", "spam-content"),
    ("Mensaje rechazado: correo no deseado", "spam-content"),
    ("ウイルスが検出されました", "spam-content"),
    ("检测到垃圾邮件", "spam-content"),
    # blocklists and reverse DNS demands
    ("Rejected: 192.0.2.1 listed at dnsbl-1.uceprotect.net", "reputation-block"),
    ("blocked by bl.spamcop.net", "reputation-block"),
    ("Client host 192.0.2.1 found in psbl.surriel.com", "reputation-block"),
    ("Your IP is in the CBL", "reputation-block"),
    ("rejected by cloudmark", "reputation-block"),
    ("No PTR record for 192.0.2.1", "reputation-block"),
    ("Reverse DNS lookup failed for 192.0.2.1", "reputation-block"),
    ("Sending host has no rDNS", "reputation-block"),
    ("Dynamic IP addresses are not accepted", "reputation-block"),
    # authentication
    ("SPF check failed", "authentication"),
    ("Message failed DMARC evaluation", "authentication"),
    ("Sender ID check failed", "authentication"),
]


@pytest.mark.parametrize(("text", "category"), BOUNCE_TEXT_WORDINGS)
def test_bounce_text_wordings(text: str, category: str) -> None:
    result = classify_status(None, text)
    assert (result.category, result.status) == (category, "5.0.0")
    assert result.hard == (category in HARD_CATEGORIES)


# Wordings seen in real bounces (many collected by bounce-parser projects such as Sisimai).
REAL_BOUNCE_WORDINGS: list[tuple[str, str]] = [
    ("#5.1.1 bad address", "invalid-recipient"),
    ("address not present in directory", "invalid-recipient"),
    ("is not a known user", "invalid-recipient"),
    ("is not an active address at this host", "invalid-recipient"),
    ("no account by that name here", "invalid-recipient"),
    ("no valid recipients, bye", "invalid-recipient"),
    ("sorry, your envelope recipient is in my badrcptto list", "invalid-recipient"),
    ("this recipient is not in my validrcptto list", "invalid-recipient"),
    ("vdeliver: invalid or unknown virtual user", "invalid-recipient"),
    ("<someone@example.com> not found", "invalid-recipient"),
    ("No someone in name directory", "invalid-recipient"),
    ("nonexistent user", "invalid-recipient"),
    ("user someone@example.com was not found", "invalid-recipient"),
    ("nessun utente simile in questo indirizzo", "invalid-recipient"),
    ("does not have enough space", "mailbox-full"),
    ("mailfolder is full", "mailbox-full"),
    ("the user's space has been used up", "mailbox-full"),
    ("user has too many messages on the server", "mailbox-full"),
    ("recipient domain must exist", "invalid-domain"),
    ("mail domain mentioned in email address is unknown", "invalid-domain"),
    ("Name or service not known", "invalid-domain"),
    ("mailbox is temporary locked", "mailbox-inactive"),
    ("recipient suspend the service", "mailbox-inactive"),
    ("boite du destinataire archivee", "mailbox-inactive"),
    ("Connection timed out", "expired"),
    ("it has not been collected after 30 days", "expired"),
    ("access denied. IP name lookup failed", "reputation-block"),
    ("Rejecting open proxy", "reputation-block"),
    ("Please get a custom reverse DNS name from your ISP", "reputation-block"),
    ("rejecting banned content", "spam-content"),
    ("message filtered. please see the faqs section on spam", "spam-content"),
    ("spambouncer identified spam", "spam-content"),
    ("max message size exceeded", "message-too-large"),
]


@pytest.mark.parametrize(("text", "category"), REAL_BOUNCE_WORDINGS)
def test_real_bounce_wordings(text: str, category: str) -> None:
    assert classify_status(None, text).category == category


def test_a_sender_domain_that_must_exist_is_not_the_recipient_s() -> None:
    assert classify_status(None, "Sender domain must exist").category == "technical"


def test_unknown_words_that_are_not_about_the_recipient_stay_soft() -> None:
    # "inconnu"/"unbekannt"/"desconocido" qualify an error, not a user: never a hard bounce.
    for text in (
        "Erreur inconnue",
        "Unbekannter Fehler",
        "Error desconocido",
        "Errore sconosciuto",
        "Erro desconhecido",
    ):
        assert not classify_status(None, text).hard, text


def test_rfc_7372_reverse_dns_status_stays_authentication() -> None:
    # X.7.25 is "reverse DNS validation failed": its own category wins over the PTR wording.
    assert classify_reply(550, "5.7.25 No PTR record").category == "authentication"
    assert classify_reply(550, "5.7.1 No PTR record").category == "reputation-block"


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("User not known", "invalid-recipient"),
        ("The recipient name is not recognized", "invalid-recipient"),
        ("Delivery has been postponed due to a full mailbox", "mailbox-full"),
    ],
)
def test_more_bounce_text_wordings(text: str, category: str) -> None:
    assert classify_status(None, text).category == category
