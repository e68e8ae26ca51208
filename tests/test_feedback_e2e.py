"""Issue "feedback loop" end to end: a message delivered through the relay to a sink, then what
comes back for it sent over SMTP to the relay's inbound listener, as a real MTA or mailbox
provider would send it:

- a DSN (Postfix's ``multipart/report``, with the delivered copy's headers, sent to the copy's
  VERP return path with ``MAIL FROM:<>``) -> one ``bounced`` event, the recipient suppressed;
- an ARF complaint (RFC 5965, with the delivered copy, to the feedback-loop address) -> one
  ``complained`` event, the recipient suppressed;
- a mail to the ``mailto:u+TOKEN@`` address of the copy's List-Unsubscribe -> one
  ``unsubscribed`` event (``mailto``), the recipient suppressed.

The relay processes each report right after its commit (FeedbackService), with the real
classifier (``smartrelay.feedback.classify``).
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
from collections.abc import Iterator, Sequence

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from smartrelay.storage.engines import create_engine
from smartrelay.storage.store import NewFeedback, Store
from tests.conftest import real_reactor, service_missing
from tests.support.delivery_relay import (
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    events,
    eventually,
    smtp_route,
    submit,
    wait_for_events,
)
from tests.support.dovecot import Dovecot, DovecotUnavailable, running_dovecot
from tests.support.relay import HOST, RETURN_PATH_DOMAIN, RunningRelay
from tests.support.sink import ReceivedMessage

MESSAGE = (
    b"From: Shop <news@example.com>\r\n"
    b"To: <customer@example.net>\r\n"
    b"Subject: Your order has shipped\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello, your order is on its way.\r\n"
)


async def deliver_one(
    relays: DeliveryRelays, sinks: Sinks, database_url: str, recipient: str
) -> tuple[RunningRelay, str, ReceivedMessage]:
    """A relay delivering to a sink; one message sent through it to ``recipient``: the relay,
    the queue id and the copy the sink received."""
    reactor = real_reactor()
    backend = TrackingSinkBackend(delay=0.0, clock=reactor)
    _, sink_port = await sinks.start(backend)
    relay = await relays.start(database_url, {"routes": smtp_route(sink_port)})
    queue_id = await submit(relay.smtp_port, [recipient], MESSAGE)
    await wait_for_events(reactor, relay.store, "delivered", 1)
    (copy,) = backend.messages
    assert re.fullmatch(rf"b\+[a-z2-7]+@{re.escape(RETURN_PATH_DOMAIN)}", copy.sender)
    return relay, queue_id, copy


def send_report(port: int, sender: str, recipients: Sequence[str], data: bytes) -> None:
    with smtplib.SMTP(HOST, port, local_hostname="mx.example.net", timeout=30) as client:
        refused = client.sendmail(sender, list(recipients), data)
        assert refused == {}


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def postfix_dsn(copy: ReceivedMessage, recipient: str) -> bytes:
    """What Postfix sends when the mailbox behind its MX does not exist (its bounce(8)
    template, RFC 3464), addressed to the copy's VERP return path."""
    boundary = "4F1A2C0E3B.1733400000/mx.example.net"
    returned = f"Return-Path: <{copy.sender}>\r\n".encode() + header_block(copy.data)
    text = (
        f"From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"To: {copy.sender}\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f'\tboundary="{boundary}"\r\n'
        f"Content-Transfer-Encoding: 8bit\r\n"
        f"Message-Id: <20241205120000.4F1A2C0E3B@mx.example.net>\r\n"
        f"Date: Thu,  5 Dec 2024 12:00:00 +0000 (UTC)\r\n"
        f"\r\n"
        f"This is a MIME-encapsulated message.\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Notification\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n"
        f"\r\n"
        f"This is the mail system at host mx.example.net.\r\n"
        f"\r\n"
        f"I'm sorry to have to inform you that your message could not\r\n"
        f"be delivered to one or more recipients. It's attached below.\r\n"
        f"\r\n"
        f"For further assistance, please send mail to postmaster.\r\n"
        f"\r\n"
        f"                   The mail system\r\n"
        f"\r\n"
        f"<{recipient}>: host mailstore.example.net[192.0.2.25] said: 550 5.1.1\r\n"
        f"    <{recipient}>: Recipient address rejected: User unknown in local\r\n"
        f"    recipient table (in reply to RCPT TO command)\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Delivery report\r\n"
        f"Content-Type: message/delivery-status\r\n"
        f"\r\n"
        f"Reporting-MTA: dns; mx.example.net\r\n"
        f"X-Postfix-Queue-ID: 4F1A2C0E3B\r\n"
        f"X-Postfix-Sender: rfc822; {copy.sender}\r\n"
        f"Arrival-Date: Thu,  5 Dec 2024 11:59:58 +0000 (UTC)\r\n"
        f"\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        f"Action: failed\r\n"
        f"Status: 5.1.1\r\n"
        f"Remote-MTA: dns; mailstore.example.net\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected:\r\n"
        f"    User unknown in local recipient table\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Undelivered Message Headers\r\n"
        f"Content-Type: text/rfc822-headers\r\n"
        f"\r\n"
    ).encode()
    return text + returned + f"\r\n--{boundary}--\r\n".encode()


def arf_report(copy: ReceivedMessage, recipient: str) -> bytes:
    """An RFC 5965 abuse report (its appendix B example's shape) with the copy returned
    whole, as the recipient's mailbox provider stored it."""
    boundary = "part1_13d.2e68ed54_boundary"
    returned = f"Return-Path: <{copy.sender}>\r\n".encode() + copy.data
    text = (
        f"From: <abusedesk@mailbox.example.net>\r\n"
        f"Date: Thu, 5 Dec 2024 14:00:00 +0000\r\n"
        f"Subject: FW: Your order has shipped\r\n"
        f"To: <fbl@{RETURN_PATH_DOMAIN}>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: multipart/report; report-type=feedback-report;\r\n"
        f'\tboundary="{boundary}"\r\n'
        f"\r\n"
        f"--{boundary}\r\n"
        f'Content-Type: text/plain; charset="US-ASCII"\r\n'
        f"Content-Transfer-Encoding: 7bit\r\n"
        f"\r\n"
        f"This is an email abuse report for an email message received from IP\r\n"
        f"127.0.0.1 on Thu, 5 Dec 2024 13:59:00 +0000.\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: message/feedback-report\r\n"
        f"\r\n"
        f"Feedback-Type: abuse\r\n"
        f"User-Agent: SomeGenerator/1.0\r\n"
        f"Version: 1\r\n"
        f"Original-Mail-From: <{copy.sender}>\r\n"
        f"Original-Rcpt-To: <{recipient}>\r\n"
        f"Arrival-Date: Thu, 5 Dec 2024 13:59:00 +0000\r\n"
        f"Reporting-MTA: dns; mail.mailbox.example.net\r\n"
        f"Source-IP: 127.0.0.1\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: message/rfc822\r\n"
        f"Content-Disposition: inline\r\n"
        f"\r\n"
    ).encode()
    return text + returned + f"\r\n--{boundary}--\r\n".encode()


async def suppression_reason(store: Store, address: str) -> str | None:
    for entry in await store.list_suppressions():
        if entry.address == address:
            return entry.reason
    return None


async def report_states(store: Store) -> list[tuple[str, str | None]]:
    return [(r.state, r.matched_by) for r in await store.list_feedback()]


@pytest_twisted.ensureDeferred
async def test_dsn_to_the_verp_return_path_bounces_and_suppresses(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    reactor = real_reactor()
    relay, queue_id, copy = await deliver_one(relays, sinks, database_url, "bob@example.net")
    dsn = postfix_dsn(copy, "bob@example.net")
    await deferToThread(send_report, relay.inbound_port, "", [copy.sender], dsn)

    (bounced,) = await wait_for_events(reactor, relay.store, "bounced", 1)
    assert (bounced.queue_id, bounced.recipient) == (queue_id, "bob@example.net")
    assert bounced.data["category"] == "invalid-recipient"
    assert (bounced.data["hard"], bounced.data["status"], bounced.data["source"]) == (
        True,
        "5.1.1",
        "dsn",
    )
    assert "User unknown" in bounced.data["reply"]
    assert await suppression_reason(relay.store, "bob@example.net") == "hard_bounce"
    assert await report_states(relay.store) == [("processed", "verp")]

    # The same DSN again (a resend): nothing more.
    await deferToThread(send_report, relay.inbound_port, "", [copy.sender], dsn)
    await eventually(reactor, lambda: _all_done(relay.store, 2), "the second report")
    assert len(await events(relay.store, "bounced")) == 1


@pytest_twisted.ensureDeferred
async def test_arf_complaint_records_and_suppresses(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    reactor = real_reactor()
    relay, queue_id, copy = await deliver_one(relays, sinks, database_url, "carol@example.net")
    report = arf_report(copy, "carol@example.net")
    fbl = f"fbl@{RETURN_PATH_DOMAIN}"
    await deferToThread(
        send_report, relay.inbound_port, "abusedesk@mailbox.example.net", [fbl], report
    )

    (complained,) = await wait_for_events(reactor, relay.store, "complained", 1)
    assert (complained.queue_id, complained.recipient) == (queue_id, "carol@example.net")
    assert complained.data == {"feedback_type": "abuse", "source": "SomeGenerator/1.0"}
    assert await suppression_reason(relay.store, "carol@example.net") == "complaint"
    assert [state for state, _ in await report_states(relay.store)] == ["processed"]


@pytest_twisted.ensureDeferred
async def test_mail_to_the_mailto_unsubscribe_address_unsubscribes(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    reactor = real_reactor()
    relay, queue_id, copy = await deliver_one(relays, sinks, database_url, "dave@example.net")
    parsed = email.message_from_bytes(copy.data, policy=email.policy.default)
    found = re.search(r"<mailto:([^>?]+)", str(parsed["List-Unsubscribe"]))
    assert found is not None
    mailto = found[1]
    assert mailto.startswith("u+") and mailto.endswith(f"@{RETURN_PATH_DOMAIN}")
    # What a mail client sends for the List-Unsubscribe mailto (RFC 2369).
    request = (
        f"From: Dave <dave@example.net>\r\nTo: <{mailto}>\r\nSubject: unsubscribe\r\n"
        f"\r\nunsubscribe\r\n"
    ).encode()
    await deferToThread(send_report, relay.inbound_port, "dave@example.net", [mailto], request)

    (unsubscribed,) = await wait_for_events(reactor, relay.store, "unsubscribed", 1)
    assert (unsubscribed.queue_id, unsubscribed.recipient, unsubscribed.data) == (
        queue_id,
        "dave@example.net",
        {"method": "mailto"},
    )
    assert await suppression_reason(relay.store, "dave@example.net") == "unsubscribe"
    assert await report_states(relay.store) == [("processed", "mailto")]


@pytest_twisted.ensureDeferred
async def test_reports_left_new_are_processed_when_the_relay_starts(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    """A report stored while no relay processes it (the relay stopped right after its
    commit, say) is processed by the next relay at start-up."""
    reactor = real_reactor()
    relay, queue_id, copy = await deliver_one(relays, sinks, database_url, "erin@example.net")
    found = re.search(r"<mailto:([^>?]+)", copy.data.decode())
    assert found is not None
    await relay.stop()
    engine = create_engine(reactor, database_url)
    await engine.start()
    try:
        report = NewFeedback("erin@example.net", (found[1],), b"Subject: unsubscribe\r\n\r\n")
        await Store(engine, reactor).store_feedback(report)
    finally:
        await engine.close()

    again = await relays.start(database_url, {"routes": smtp_route(1)})  # same data_dir, key
    (unsubscribed,) = await wait_for_events(reactor, again.store, "unsubscribed", 1)
    assert (unsubscribed.queue_id, unsubscribed.recipient) == (queue_id, "erin@example.net")
    assert await report_states(again.store) == [("processed", "mailto")]


async def _all_done(store: Store, count: int) -> bool | None:
    reports = await store.list_feedback()
    return True if len(reports) == count and all(r.state != "new" for r in reports) else None


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    try:
        with running_dovecot() as server:
            yield server
    except DovecotUnavailable as e:
        service_missing(str(e))


@pytest.mark.parametrize("scheme", ["imaps", "pop3s"])
@pytest_twisted.ensureDeferred
async def test_a_dsn_in_a_feedback_mailbox_bounces_and_suppresses(
    relays: DeliveryRelays, sinks: Sinks, dovecot: Dovecot, scheme: str
) -> None:
    """The DSN reaches us through a mailbox the relay reads (``[[feedback.mailboxes]]``), not
    the inbound MX: no envelope, the VERP address in its ``To``; the relay's reader hands it
    to the same processor, then deletes it."""
    reactor = real_reactor()
    backend = TrackingSinkBackend(delay=0.0, clock=reactor)
    _, sink_port = await sinks.start(backend)
    mailbox = {"url": dovecot.url(scheme), "interval": "1s", "ca_file": dovecot.ca_file}
    relay = await relays.start(
        f"sqlite:{relays.directory / 'mailbox.db'}",
        {"routes": smtp_route(sink_port)},
        extra={"feedback": {"mailboxes": [mailbox]}},
    )
    queue_id = await submit(relay.smtp_port, ["dave@example.net"], MESSAGE)
    await wait_for_events(reactor, relay.store, "delivered", 1)
    (copy,) = backend.messages
    dovecot.deliver(postfix_dsn(copy, "dave@example.net"))

    (bounced,) = await wait_for_events(reactor, relay.store, "bounced", 1, within=60)
    assert (bounced.queue_id, bounced.recipient) == (queue_id, "dave@example.net")
    assert (bounced.data["category"], bounced.data["status"]) == ("invalid-recipient", "5.1.1")
    assert await suppression_reason(relay.store, "dave@example.net") == "hard_bounce"

    async def deleted() -> bool | None:
        return True if not dovecot.messages() else None

    await eventually(reactor, deleted, "the DSN deleted from the mailbox", within=60)
    assert await report_states(relay.store) == [("processed", "verp")]
