"""Issue 11 item 11: UTF-8 envelope addresses and next hops with or without SMTPUTF8 (RFC 6531).

Postfix's ``smtp-sink`` does not offer SMTPUTF8: a non-ASCII recipient must bounce there with
5.6.7 (category ``technical``) instead of being relayed. SmartRelay's own listener as the sink
offers it, and refuses a non-ASCII RCPT unless MAIL FROM carried the SMTPUTF8 parameter.
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from smartrelay.delivery.client import NO_SMTPUTF8, RecipientResult, SmtpConnection, _ReplyReader
from smartrelay.delivery.routing import NextHop
from tests.conftest import real_reactor
from tests.support.delivery_relay import (
    CLIENT_NAME,
    CLIENT_TIMEOUT,
    QUEUED,
    SENDER,
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    events,
    recipient_states,
    smtp_route,
    wait_for_events,
)
from tests.support.postfix import PostfixSink
from tests.support.relay import HOST

UTF8_RCPT = "jörg@example.net"


def submit_utf8(port: int, recipients: Sequence[str], subject: str) -> str:
    """One message whose envelope needs SMTPUTF8, submitted with it."""
    data = f"From: <{SENDER}>\r\nTo: <ascii@example.net>\r\nSubject: {subject}\r\n\r\nHi.\r\n"
    with smtplib.SMTP(HOST, port, local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo()
        code, text = client.mail(SENDER, ["SMTPUTF8"])
        assert code == 250, text
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            assert code == 250, (recipient, code, text)
        code, text = client.data(data.encode())
        match = QUEUED.search(text.decode())
        assert code == 250 and match is not None, text
        return match[1]


@pytest_twisted.ensureDeferred
async def test_a_utf8_recipient_bounces_5_6_7_at_a_hop_without_smtputf8(
    relays: DeliveryRelays, postfix_sink: PostfixSink, database_url: str
) -> None:
    reactor = real_reactor()
    relay = await relays.start(database_url, {"routes": smtp_route(postfix_sink.port)})
    queue_id = await deferToThread(
        submit_utf8, relay.smtp_port, [UTF8_RCPT, "plain@example.net"], "mixed"
    )
    await wait_for_events(reactor, relay.store, "bounced", 1)
    await wait_for_events(reactor, relay.store, "delivered", 1)

    assert await recipient_states(relay.store, queue_id) == {
        UTF8_RCPT: "bounced",
        "plain@example.net": "delivered",
    }
    (bounce,) = await events(relay.store, "bounced")
    assert bounce.recipient == UTF8_RCPT
    assert bounce.data == {
        "category": "technical",
        "hard": False,
        "status": "5.6.7",
        "reply": NO_SMTPUTF8.line,
        "source": "smtp",
    }
    postfix_sink.wait_for_messages(1)
    (dumped,) = postfix_sink.messages()
    assert dumped.recipients == ("plain@example.net",)  # the UTF-8 one was never sent


@pytest_twisted.ensureDeferred
async def test_mail_from_carries_smtputf8_when_the_hop_offers_it(
    relays: DeliveryRelays, sinks: Sinks, database_url: str
) -> None:
    reactor = real_reactor()
    backend = TrackingSinkBackend()
    _, sink_port = await sinks.start(backend)  # SmartRelay's listener: 553 5.6.7 without it
    relay = await relays.start(database_url, {"routes": smtp_route(sink_port)})
    queue_id = await deferToThread(submit_utf8, relay.smtp_port, [UTF8_RCPT], "utf8")
    await wait_for_events(reactor, relay.store, "delivered", 1)
    assert await recipient_states(relay.store, queue_id) == {UTF8_RCPT: "delivered"}
    assert [m.recipients for m in backend.messages] == [[UTF8_RCPT]]


def session(extensions: str) -> tuple[SmtpConnection, StringTransport, _ReplyReader]:
    reader = _ReplyReader()
    transport = StringTransport()
    reader.makeConnection(transport)  # type: ignore[no-untyped-call]
    connection = SmtpConnection(reader, NextHop("mx.test", 25, "mx"), Clock(), "relay.test")
    connection.extensions = {name: "" for name in extensions.split()}
    return connection, transport, reader


def test_one_transaction_sends_only_the_ascii_recipients_without_smtputf8() -> None:
    """Forwarder mode sends all of a message's recipients in one transaction: the UTF-8 ones
    are answered 5.6.7 locally, the others are sent, and MAIL FROM has no SMTPUTF8."""
    connection, transport, reader = session("8BITMIME")
    results: list[Sequence[RecipientResult]] = []
    sending = connection.send("app@example.com", ["a@example.net", UTF8_RCPT], b"x\r\n")
    Deferred.fromCoroutine(sending).addCallback(results.append)
    assert transport.value() == b"MAIL FROM:<app@example.com> BODY=8BITMIME\r\n"
    for line in (b"250 ok", b"250 ok", b"354 go", b"250 queued"):
        reader.dataReceived(line + b"\r\n")  # type: ignore[no-untyped-call]
    assert b"RCPT TO:<a@example.net>\r\n" in transport.value()
    assert "jörg".encode() not in transport.value()
    (replies,) = results
    assert [(r.address, r.reply.code) for r in replies] == [
        ("a@example.net", 250),
        (UTF8_RCPT, 553),
    ]


def test_a_utf8_sender_without_smtputf8_sends_nothing() -> None:
    connection, transport, _ = session("PIPELINING")
    results: list[Sequence[RecipientResult]] = []
    sending = connection.send("jörg@example.com", ["a@example.net"], b"x\r\n")
    Deferred.fromCoroutine(sending).addCallback(results.append)
    assert transport.value() == b""
    assert [r.reply for r in results[0]] == [NO_SMTPUTF8]


def test_smtputf8_on_mail_from_when_offered() -> None:
    connection, transport, _ = session("SMTPUTF8")
    Deferred.fromCoroutine(connection.send("app@example.com", [UTF8_RCPT], b"x\r\n"))
    assert transport.value() == b"MAIL FROM:<app@example.com> SMTPUTF8\r\n"
