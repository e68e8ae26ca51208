"""smartrelay.feedback.nonstandard: failed recipients of non-standard (plain-text) bounces.

The fixtures in tests/fixtures/feedback/text/ are written from the MTAs' own templates (Exim's
``bounce_message_text``, qmail-send's, Postfix's ``bounce`` templates, Sendmail's, Exchange's
NDR texts...) and from the providers' published examples, with realistic headers. Each is
classified the way the parsers classify a recipient: ``classify_status(status, diagnostic)``.
"""

from __future__ import annotations

import email
import email.policy
import logging
import time
from email.message import EmailMessage, Message
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartrelay.feedback import nonstandard
from smartrelay.feedback.bounce_signatures import SIGNATURES
from smartrelay.feedback.model import FailedRecipient
from smartrelay.feedback.nonstandard import failed_recipients_from_text, find_reply
from smartrelay.feedback.smtp_replies import BOUNCE_CATEGORIES, classify_status

FIXTURES = Path(__file__).parent / "fixtures" / "feedback" / "text"

# fixture → [(address, action, status after classification, category, hard)]
Expected = list[tuple[str, str, str, str, bool]]
EXPECTED: dict[str, Expected] = {
    # --- Exim ---
    "exim_user_unknown.eml": [
        ("alice.smith@example.org", "failed", "5.1.1", "invalid-recipient", True)
    ],
    "exim_two_failures.eml": [
        ("bob@nonexistent-domain.example", "failed", "5.0.0", "invalid-domain", True),
        ("carol@example.net", "failed", "5.2.2", "mailbox-full", False),
    ],
    "exim_delayed.eml": [("dave@slow.example.com", "delayed", "4.3.0", "technical", False)],
    "exim_retry_timeout.eml": [("erin@down.example.org", "failed", "5.0.0", "expired", False)],
    "exim_german.eml": [
        ("hans.mueller@example.de", "failed", "5.0.0", "mailbox-full", False),
        ("grete@example.de", "failed", "5.0.0", "invalid-recipient", True),
    ],
    # --- qmail ---
    "qmail_no_mailbox.eml": [("frank@example.com", "failed", "5.1.1", "invalid-recipient", True)],
    "qmail_remote_blocked.eml": [
        ("gina@example.net", "failed", "5.7.1", "reputation-block", False),
        ("hank@example.net", "failed", "5.0.0", "mailbox-full", False),
    ],
    "qmail_quota.eml": [("ida@example.it", "failed", "5.0.0", "mailbox-full", False)],
    # --- Postfix's own text ---
    "postfix_text_user_unknown.eml": [
        ("jack@example.org", "failed", "5.1.1", "invalid-recipient", True),
        ("kate@example.org", "failed", "5.2.2", "mailbox-full", False),
    ],
    "postfix_text_delayed.eml": [("liam@slow.example.net", "delayed", "4.0.0", "expired", False)],
    "postfix_host_not_found.eml": [
        ("mia@no-such-domain.example", "failed", "5.0.0", "invalid-domain", True)
    ],
    "broken_dsn.eml": [("walt@example.net", "failed", "5.7.1", "reputation-block", False)],
    "broken_dsn_status_only.eml": [("xena@example.net", "failed", "5.2.2", "mailbox-full", False)],
    # --- Sendmail ---
    "sendmail_user_unknown.eml": [
        ("noah@example.edu", "failed", "5.1.1", "invalid-recipient", True)
    ],
    "sendmail_warning.eml": [("olivia@slow.example.org", "delayed", "4.0.0", "expired", False)],
    "sendmail_unknown_host.eml": [
        ("paul@nowhere.example", "failed", "5.1.2", "invalid-domain", True)
    ],
    # --- Exchange / Office 365 / Outlook.com ---
    "exchange2003.eml": [
        ("quinn@corp.example.com", "failed", "5.1.1", "invalid-recipient", True),
        ("rose@corp.example.com", "failed", "5.2.2", "mailbox-full", False),
    ],
    "exchange2010.eml": [("sam@corp.example.net", "failed", "5.1.1", "invalid-recipient", True)],
    "exchange2007_mailto.eml": [
        ("sean.smith@eu.corp.example.co.uk", "failed", "5.0.0", "message-too-large", False)
    ],
    "office365.eml": [("tina@contoso.com", "failed", "5.1.10", "invalid-recipient", True)],
    "outlook_html_only.eml": [("uma@hotmail.com", "failed", "5.2.2", "mailbox-full", False)],
    # --- Gmail, Yahoo ---
    "gmail_address_not_found.eml": [
        ("victor@example.com", "failed", "5.1.1", "invalid-recipient", True)
    ],
    "gmail_old_permanent.eml": [("wendy@example.com", "failed", "5.2.2", "mailbox-full", False)],
    "gmail_delay.eml": [("xavier@example.org", "delayed", "4.7.0", "rate-limited", False)],
    "yahoo.eml": [("yara@yahoo.com", "failed", "5.0.0", "invalid-recipient", True)],
    # --- Domino, GroupWise, Mirapoint, MDaemon, IMail, Courier ---
    "domino.eml": [("zoe@notes.example.com", "failed", "5.0.0", "invalid-recipient", True)],
    "groupwise.eml": [
        ("adam@gw.example.gov", "failed", "5.0.0", "invalid-recipient", True),
        ("beth@gw.example.gov", "failed", "5.0.0", "mailbox-full", False),
    ],
    "domino_old_nab.eml": [
        ("max@notes.example.org", "failed", "5.0.0", "invalid-recipient", True),
        ("nina@notes.example.org", "failed", "5.0.0", "invalid-recipient", True),
    ],
    "groupwise_novell.eml": [("otto@gw.example.edu", "failed", "5.0.0", "mailbox-inactive", False)],
    "aol_sendmail.eml": [("peggy@aol.com", "failed", "5.1.1", "invalid-recipient", True)],
    "mirapoint.eml": [("carl@example.edu", "failed", "5.1.1", "invalid-recipient", True)],
    "mdaemon.eml": [("dora@example.net", "failed", "5.1.1", "invalid-recipient", True)],
    "imail.eml": [("eddie@imail.example.org", "failed", "5.0.0", "invalid-recipient", True)],
    "courier.eml": [("fay@example.org", "failed", "5.2.1", "mailbox-inactive", False)],
    # --- filtering services ---
    "messagelabs.eml": [("gary@client.example.co.uk", "failed", "5.7.1", "policy", False)],
    "barracuda.eml": [("hugo@example.com", "failed", "5.0.0", "spam-content", False)],
    "postini.eml": [
        ("iris@psmtp-customer.example.com", "failed", "5.1.1", "invalid-recipient", True)
    ],
    "opensmtpd.eml": [("hal@example.net", "failed", "5.1.1", "invalid-recipient", True)],
    "james.eml": [("ivy@james.example.org", "failed", "5.2.2", "mailbox-full", False)],
    "mailmarshal.eml": [
        ("jon@marshal.example.com", "failed", "5.1.1", "invalid-recipient", True),
        ("kim@marshal.example.com", "failed", "5.1.1", "invalid-recipient", True),
    ],
    "interscan_mss.eml": [("lou@example.co.jp", "failed", "5.1.1", "invalid-recipient", True)],
    # --- other languages ---
    "french.eml": [
        ("jules@orange.example.fr", "failed", "5.0.0", "invalid-recipient", True),
        ("lea@orange.example.fr", "failed", "5.0.0", "mailbox-full", False),
    ],
    "spanish.eml": [
        ("marta@correo.example.es", "failed", "5.0.0", "mailbox-full", False),
        ("nico@correo.example.es", "failed", "5.0.0", "invalid-recipient", True),
    ],
    "italian.eml": [
        ("olga@posta.example.it", "failed", "5.0.0", "invalid-recipient", True),
        ("pino@posta.example.it", "failed", "5.0.0", "mailbox-full", False),
    ],
    "portuguese.eml": [
        ("rui@mail.example.com.br", "failed", "5.0.0", "invalid-recipient", True),
        ("sara@mail.example.com.br", "failed", "5.0.0", "mailbox-full", False),
    ],
    "japanese_iso2022jp.eml": [
        ("taro@example.jp", "failed", "5.1.1", "invalid-recipient", True),
        ("hanako@example.jp", "failed", "5.0.0", "mailbox-full", False),
    ],
    "japanese_undeclared_charset.eml": [
        ("taro@example.jp", "failed", "5.1.1", "invalid-recipient", True),
        ("jiro@example.jp", "failed", "5.0.0", "mailbox-full", False),
    ],
    "japanese_reason_before_address.eml": [
        ("kenta@mobile.example.ne.jp", "failed", "5.0.0", "invalid-recipient", True)
    ],
    "chinese_gb2312.eml": [
        ("wang@example.cn", "failed", "5.0.0", "invalid-recipient", True),
        ("li@example.cn", "failed", "5.0.0", "mailbox-full", False),
    ],
    # --- warnings, wordings and layouts that moved the table on ---
    "sendmail_transient.eml": [("yves@greylist.example.org", "delayed", "4.2.0", "policy", False)],
    "courier_delay.eml": [("zack@slow.example.org", "delayed", "4.3.2", "technical", False)],
    "exchange_delay.eml": [("fred@partner.example.com", "delayed", "4.4.7", "expired", False)],
    "exim_long_failure.eml": [
        ("abe@dead.example.net", "failed", "5.0.0", "expired", False),
        ("bea@mx-gone.example.net", "failed", "5.0.0", "invalid-domain", True),
    ],
    "yahoo_colon_code.eml": [("cory@ymail.com", "failed", "5.0.0", "invalid-recipient", True)],
    "office365_parenthesised.eml": [
        ("dina@fabrikam.com", "failed", "5.2.2", "mailbox-full", False),
        ("eli@fabrikam.com", "failed", "5.7.1", "spam-content", False),
    ],
    "sentence_style.eml": [
        ("gus@smarter.example.com", "failed", "5.0.0", "invalid-recipient", True)
    ],
    # --- the fallback finder, our own addresses, and a person's mail ---
    "lsmtp_flufl_fallback.eml": [
        ("vera@lsmtp.example.com", "failed", "5.1.1", "invalid-recipient", True)
    ],
    "no_address_in_text.eml": [("quincy@example.biz", "failed", "5.0.0", "mailbox-full", False)],
    "original_attached_as_text.eml": [
        ("rosa@example.org", "failed", "5.1.1", "invalid-recipient", True)
    ],
    "own_addresses.eml": [("rita@example.org", "failed", "5.1.1", "invalid-recipient", True)],
    "not_a_bounce.eml": [],
}


def load(name: str, policy: email.policy.Policy = email.policy.default) -> EmailMessage:
    raw = (FIXTURES / name).read_bytes()
    return cast(EmailMessage, email.message_from_bytes(raw, policy=policy))


def summary(found: list[FailedRecipient]) -> Expected:
    out: Expected = []
    for r in found:
        c = classify_status(r.status or None, r.diagnostic)
        out.append((r.address, r.action, c.status, c.category, c.hard))
    return out


def test_every_fixture_has_an_expectation() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.eml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 40


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture(name: str) -> None:
    assert summary(failed_recipients_from_text(load(name))) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_under_the_compat32_policy(name: str) -> None:
    # email.message_from_bytes without a policy: headers are plain strings or Header objects.
    found = failed_recipients_from_text(load(name, email.policy.compat32))
    assert [r.address for r in found] == [e[0] for e in EXPECTED[name]]


def test_reply_code_remote_host_and_diagnostic() -> None:
    [r] = failed_recipients_from_text(load("exim_user_unknown.eml"))
    assert (r.reply_code, r.status, r.remote_mta) == (550, "5.1.1", "mx.example.org")
    assert "Recipient address rejected: User unknown in virtual mailbox table" in r.diagnostic
    jack, kate = failed_recipients_from_text(load("postfix_text_user_unknown.eml"))
    assert (jack.remote_mta, kate.remote_mta) == ("mx.example.org", "mx.example.org")
    assert jack.diagnostic.endswith("(in reply to RCPT TO command)")
    gina, hank = failed_recipients_from_text(load("qmail_remote_blocked.eml"))
    assert (gina.reply_code, gina.remote_mta) == (554, "203.0.113.44")
    assert (hank.reply_code, hank.status) == (552, "5.0.0")
    [noah] = failed_recipients_from_text(load("sendmail_user_unknown.eml"))
    assert noah.remote_mta == "mx.example.edu"
    [sam] = failed_recipients_from_text(load("exchange2010.eml"))
    assert (sam.reply_code, sam.remote_mta) == (550, "exch01.corp.example.net")
    quinn, _ = failed_recipients_from_text(load("exchange2003.eml"))
    assert (quinn.status, quinn.remote_mta) == ("5.1.1", "mail.corp.example.com")
    [cory] = failed_recipients_from_text(load("yahoo_colon_code.eml"))
    assert (cory.reply_code, cory.status) == (554, "5.0.0")
    [fred] = failed_recipients_from_text(load("exchange_delay.eml"))
    assert fred.remote_mta == "mx.partner.example.com"
    _, kim = failed_recipients_from_text(load("mailmarshal.eml"))
    assert kim.remote_mta == "192.0.2.71"
    [carl] = failed_recipients_from_text(load("mirapoint.eml"))
    assert carl.remote_mta == "mx.example.edu"
    [zoe] = failed_recipients_from_text(load("domino.eml"))
    assert zoe.diagnostic == "User zoe (zoe@notes.example.com) not listed in Domino Directory"


def test_the_original_recipient_of_an_expanded_address() -> None:
    jack, kate = failed_recipients_from_text(load("postfix_text_user_unknown.eml"))
    assert (jack.original_recipient, kate.original_recipient) == (None, "sales@example.org")


def test_the_returned_message_s_sender_is_a_failed_recipient_when_it_was_also_sent_to() -> None:
    raw = (FIXTURES / "exim_user_unknown.eml").read_bytes()
    raw = raw.replace(b"From: Shop <news@shop.example.com>", b"From: alice.smith@example.org")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert [r.address for r in failed_recipients_from_text(message)] == ["alice.smith@example.org"]


@pytest.mark.parametrize(
    "body",
    [
        "Your message has been delivered to the following recipients:\n\n  ann@example.com\n",
        "Delivery to these recipients or groups is complete, but no delivery notification was "
        "sent by the destination server:\n\nann@example.com (ann@example.com)\n",
    ],
)
def test_a_delivery_receipt_is_not_a_bounce(body: str) -> None:
    raw = (
        "From: Microsoft Outlook <postmaster@corp.example.net>\nTo: b+R1@bounces.example.com\n"
        "Subject: Relayed: Weekly news\nContent-Type: text/plain\n\n" + body
    )
    message = email.message_from_bytes(raw.encode(), policy=email.policy.default)
    assert failed_recipients_from_text(message) == []


def test_diagnostics_are_bounded_and_unfolded() -> None:
    for name in EXPECTED:
        for r in failed_recipients_from_text(load(name)):
            assert len(r.diagnostic) <= 500
            assert "\n" not in r.diagnostic


def test_our_own_addresses_are_never_failed_recipients() -> None:
    found = failed_recipients_from_text(load("own_addresses.eml"))
    assert [r.address for r in found] == ["rita@example.org"]
    for name in EXPECTED:
        for r in failed_recipients_from_text(load(name)):
            assert not r.address.startswith(("b+", "postmaster@", "mailer-daemon@"))
            assert r.address != "news@shop.example.com"


def test_a_person_s_mail_with_bounce_words_is_not_a_bounce() -> None:
    assert failed_recipients_from_text(load("not_a_bounce.eml")) == []


def test_every_category_of_the_fixtures_is_known() -> None:
    for expected in EXPECTED.values():
        for _, _, _, category, _ in expected:
            assert category in BOUNCE_CATEGORIES


def test_signature_names_are_unique() -> None:
    names = [sig.name for sig in SIGNATURES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("550 5.1.1 <a@example.com>: Recipient address rejected", (550, "5.1.1")),
        ("host mx[1.2.3.4] said: 552-5.2.2 Mailbox full", (552, "5.2.2")),
        ("Sorry, no mailbox here by that name. (#5.1.1)", (None, "5.1.1")),
        ("#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##", (550, "5.1.1")),
        ("Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound'", (550, "5.1.10")),
        ("Remote host said: 554 delivery error: dd This user doesn't", (554, "5.0.0")),
        ("<mx.example.com #5.2.2 smtp;552 5.2.2 Mailbox full>", (552, "5.2.2")),
        ("550 4.1.1 contradicting class", (550, "5.1.1")),
        ("Unrouteable address", (None, "")),
        ("connect to 192.0.2.1:25: Connection timed out", (None, "")),
        ("Exim 4.96 at 10.5.1.1 said nothing", (None, "")),
        ("Diagnostic-Code: smtp; 451 4.7.1 greylisted", (451, "4.7.1")),
        ("<<< 250 2.1.0 Sender ok\n>>> RCPT To:<a@b>\n<<< 550 5.1.1 User unknown", (550, "5.1.1")),
        ("<<< 250 2.1.5 Ok\n>>> DATA\n<<< 554 Transaction failed", (554, "5.0.0")),
    ],
)
def test_find_reply(text: str, expected: tuple[int | None, str]) -> None:
    assert find_reply(text) == expected


# --- hostile input ---------------------------------------------------------------------------

BOUNCE_HEAD = (
    "From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\n"
    "To: b+Hx1@bounces.shop.example.com\n"
    "Subject: Undelivered Mail Returned to Sender\n"
    "Content-Type: {ctype}; charset=utf-8\n\n"
    "This message was created automatically by mail delivery software.\n"
    "This is the mail system at host mx.example.org.\n"
)

HOSTILE_UNITS = {
    "letters": "a",
    "at signs": "@",
    "half addresses": "a@",
    "address lines": "<u1@example.com>: 550 5.1.1 user unknown\n",
    "long local parts": "x" * 60 + "@" + "b." * 10 + "\n",
    "angle brackets": "<",
    "style tags": "<style",
    "codes": "550 5.1.1 ",
    "dots": "a.",
    "labels": "Recipient address: " + "a" * 64 + "@" + "b-" * 40 + "\n",
    "many addresses": "<u@example.com>\n<v@example.com> 550 5.1.1\n<w@example.org>: x\n",
}


def five_megabytes_of(unit: str) -> str:
    return unit * (5_000_000 // len(unit) + 1)


@pytest.mark.parametrize("ctype", ["text/plain", "text/html"])
@pytest.mark.parametrize("name", sorted(HOSTILE_UNITS))
def test_a_5_mb_hostile_body_is_read_in_bounded_time(name: str, ctype: str) -> None:
    raw = (BOUNCE_HEAD.format(ctype=ctype) + five_megabytes_of(HOSTILE_UNITS[name])).encode()
    assert len(raw) >= 5_000_000
    message = email.message_from_bytes(raw, policy=email.policy.default)
    started = time.process_time()
    found = failed_recipients_from_text(message)
    # About 0.2 s of CPU here; a backtracking pattern would take minutes.
    assert time.process_time() - started < 5.0
    assert len(found) <= 3


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    # The inner function: the outer one's last-resort ``except`` must not be what holds.
    for policy in (email.policy.default, email.policy.compat32):
        message = email.message_from_bytes(raw, policy=policy)
        assert isinstance(nonstandard._failed_recipients(message), list)


_FRAGMENTS = st.sampled_from(
    [
        "This message was created automatically by mail delivery software.\n",
        "Hi. This is the qmail-send program at x.\n",
        "This is the mail system at host x.\n",
        "Delivery has failed to these recipients or groups:\n",
        "   ----- The following addresses had permanent fatal errors -----\n",
        "Your message to a@b.example couldn't be delivered.\n",
        "was not delivered to:\n",
        "because:\n",
        "<a@b.example>: ",
        "  c@d.example\n",
        "Recipient address: e@f.example\n",
        "550 5.1.1 ",
        "(#5.2.2)",
        "host mx.example.org[192.0.2.1] said: ",
        "------ This is a copy of the message, including all the headers. ------\n",
        "\n",
        "@",
        "<",
        ">",
        ":",
        "\x1b$B",
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(_FRAGMENTS, st.text(max_size=40)), max_size=60),
    st.sampled_from(["text/plain", "text/html", "message/delivery-status", "multipart/mixed"]),
    st.sampled_from(["utf-8", "iso-2022-jp", "x-unknown", "gb2312", ""]),
)
def test_bounce_like_text_never_raises(pieces: list[str], ctype: str, charset: str) -> None:
    body = "".join(pieces)
    head = BOUNCE_HEAD.format(ctype=ctype).replace("; charset=utf-8", f"; charset={charset}")
    message = email.message_from_bytes(
        (head + body).encode("utf-8", "surrogatepass"), policy=email.policy.default
    )
    found = nonstandard._failed_recipients(message)
    for r in found:
        assert "@" in r.address
        assert r.address == r.address.lower()
        assert r.action in ("failed", "delayed")
        assert r.status == "" or r.status[0] in "245"
        assert not r.address.startswith(("b+hx1@", "mailer-daemon@"))


def test_a_message_that_is_not_a_message_object_part_does_not_raise() -> None:
    message = Message()
    message.set_payload("This is the mail system at host x.\n<a@b.example>: 550 5.1.1 unknown")
    message["From"] = "MAILER-DAEMON@x.example"
    found = failed_recipients_from_text(cast(EmailMessage, message))
    assert [(r.address, r.status) for r in found] == [("a@b.example", "5.1.1")]


def test_deep_nesting_and_many_parts_are_bounded() -> None:
    head = BOUNCE_HEAD.format(ctype="text/plain").split("Content-Type")[0]
    deep = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(300)
    )
    deep += "Content-Type: text/plain\n\nThis is the mail system at host x.\n"
    deep += "<a@b.example>: 550 5.1.1 x\n"
    many = 'Content-Type: multipart/mixed; boundary="m"\n\n' + "".join(
        "--m\nContent-Type: text/plain\n\n<u@example.com>: 550 5.1.1 unknown\n" for _ in range(5000)
    )
    for body in (deep, many):
        message = email.message_from_bytes((head + body).encode(), policy=email.policy.default)
        started = time.process_time()
        found = nonstandard._failed_recipients(message)
        assert time.process_time() - started < 2.0  # about 0.05 s here
        assert len(found) <= 1


@pytest.mark.parametrize(
    "subject",
    [
        "Undeliverable: Weekly news",
        "Returned mail: see transcript for details",
        "Mail delivery failed",
        "Nicht zustellbar: Weekly news",
        "Fehler bei der Zustellung",
        "Message non remis",
        "No se puede entregar el mensaje",
        "Messaggio non recapitabile",
        "Mensagem não entregue",
        "Onbestelbaar: Weekly news",
        "=?iso-2022-jp?b?GyRCR1s/LiUoJWkhPBsoQg==?=",
        "=?UTF-8?B?57O757uf6YCA5L+h?=",
    ],
)
def test_a_bounce_subject_in_many_languages_marks_a_generic_bounce(subject: str) -> None:
    raw = (
        f"From: Mail Server <mail@example.org>\nTo: b+S1@bounces.example.com\nSubject: {subject}\n"
        "Content-Type: text/plain\n\nYour message could not be delivered to:\n\n"
        "  xena@example.org\n    550 5.1.1 User unknown\n"
    )
    message = email.message_from_bytes(raw.encode(), policy=email.policy.default)
    assert [r.address for r in failed_recipients_from_text(message)] == ["xena@example.org"]
    person = raw.replace(f"Subject: {subject}", "Subject: Re: lunch")
    message = email.message_from_bytes(person.encode(), policy=email.policy.default)
    assert failed_recipients_from_text(message) == []


def test_a_delivery_status_field_the_email_package_cannot_parse_does_not_lose_the_rest() -> None:
    # A "From:" field inside the delivery-status part whose address the header registry
    # cannot model raised AttributeError from Message.items().
    raw = (
        b"From: MAILER-DAEMON@x.example\nSubject: Undelivered Mail\n"
        b"Content-Type: multipart/report; boundary=r\n\n--r\nContent-Type: text/plain\n\n"
        b"This is the mail system at host x.\n\n--r\nContent-Type: message/delivery-status\n\n"
        b"Reporting-MTA: dns; x\n\n"
        b"From: Mail Delivery Systeminal-Recipient: rfc822; xxx@example.fi\n"
        b"Final-Recipient: rfc822; a@b.example\nAction: failed\nStatus: 5.1.1\n--r--\n"
    )
    message = email.message_from_bytes(raw, policy=email.policy.default)
    found = nonstandard._failed_recipients(message)
    assert [(r.address, r.status) for r in found] == [("a@b.example", "5.1.1")]


def test_a_broken_dsn_s_action_delayed_is_kept() -> None:
    raw = (
        b"From: MAILER-DAEMON@x.example\nSubject: Delivery Status Notification (Delay)\n"
        b"Content-Type: multipart/report; boundary=r\n\n--r\nContent-Type: text/plain\n\n"
        b"Delivery report.\n\n--r\nContent-Type: text/plain\n\n"
        b"Final-Recipient: rfc822; a@b.example\nAction: delayed\nStatus: 4.4.1\n--r--\n"
    )
    message = email.message_from_bytes(raw, policy=email.policy.default)
    [r] = failed_recipients_from_text(message)
    assert (r.address, r.action, r.status) == ("a@b.example", "delayed", "4.4.1")


def test_flufl_bounce_failures_do_not_reach_the_root_logger() -> None:
    # Its Yale detector raises IndexError on a message without a usable From, and logs it
    # through stdlib logging (which the relay's log would show for every hostile mail).
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    root = logging.getLogger()
    handler, level = Keep(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        raw = b"From:\nSubject: x\nContent-Type: text/plain\n\nnothing here\n"
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        assert failed_recipients_from_text(cast(EmailMessage, message)) == []
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert not [r for r in seen if r.name.startswith("flufl")]


def test_a_charset_with_a_null_character_and_8bit_text_does_not_raise() -> None:
    # Message.get_payload() looks the charset up to undo the parser's surrogate escapes, and
    # a NUL in its name raised ValueError (found by mutating the fixtures).
    raw = (
        b"From: MAILER-DAEMON@x.example\nSubject: Undelivered Mail\n"
        b'Content-Type: text/plain; charset="x\x00"\n\nnothing \xff to see\n'
    )
    for policy in (email.policy.default, email.policy.compat32):
        message = email.message_from_bytes(raw, policy=policy)
        assert nonstandard._failed_recipients(message) == []
