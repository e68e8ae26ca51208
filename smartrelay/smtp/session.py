"""What one SMTP connection knows, and the backend interface a listener delivers to."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Sequence

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from smartrelay.smtp.replies import Reply
from smartrelay.spool import SpooledBody

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@frozen
class ListenerSettings:
    """Limits and policy of one listener, derived once from the config."""

    hostname: str
    max_message_size: int
    max_recipients: int
    require_tls: bool = False
    require_auth: bool = False
    #: None admits everyone (the inbound MX); otherwise clients outside get 554 5.7.1.
    allowed_networks: tuple[IPNetwork, ...] | None = None
    max_connections: int = 200
    max_connections_per_client: int = 50
    idle_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: server timeout of 5 minutes
    #: STARTTLS or implicit TLS: the handshake must be done within this, else the connection
    #: is aborted (nothing can be said to a client stuck in the handshake).
    tls_handshake_timeout: float = 30.0
    #: The whole DATA phase of one message, however slowly it trickles.
    data_timeout: float = 600.0
    #: DATA: the longest wait for the next read (RFC 5321 4.5.3.2.6: 3 minutes).
    data_read_timeout: float = 180.0
    #: After a close was asked for (421, QUIT...), how long the peer may take to let it finish
    #: (flushing, TLS close_notify) before the connection is aborted.
    close_grace: float = 10.0
    max_command_line: int = 2048  # RFC 5321 says 512; extensions and long addresses need more
    max_bad_commands: int = 10


#: C0 controls and DEL: refused in commands' arguments, whatever the encoding.
_ASCII_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
#: Unicode categories a terminal or a header parser may act on: controls (C0, DEL, C1),
#: format characters (bidi overrides, zero-width), line and paragraph separators, surrogates.
_UNSAFE_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))


def has_control(raw: bytes) -> bool:
    """Whether ``raw`` (a command argument) holds a control or format character.

    Bytes that are not UTF-8 are judged by the ASCII rule only (they are refused elsewhere
    where it matters).
    """
    if _ASCII_CONTROL.search(raw):
        return True
    if raw.isascii():
        return False
    text = raw.decode("utf-8", "replace")
    return any(unicodedata.category(c) in _UNSAFE_CATEGORIES for c in text)


def printable(text: str) -> str:
    """``text`` safe for a log line: what is not printable escaped (``\\x1b``, ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


@define
class Envelope:
    """The transaction under way: MAIL FROM and the accepted RCPT TOs."""

    sender: str
    size_hint: int | None = None
    smtputf8: bool = False
    body: str = "7BIT"
    recipients: list[str] = field(factory=list)


@frozen
class Admitted:
    """A valid SMTP credential, with what AUTH read of it along with its password."""

    #: Its mail is recorded as delivered without leaving the relay (docs/smtp.md).
    sandbox: bool = False


@define
class Session:
    client_ip: str
    client_port: int
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    credential: str | None = None
    #: The credential is a sandbox credential (read with its password at AUTH).
    sandbox: bool = False
    envelope: Envelope | None = None

    def reset_transaction(self) -> None:
        self.envelope = None

    def reset_after_tls(self) -> None:
        """RFC 3207 4.2: after STARTTLS the client starts over, knowing nothing."""
        self.helo = None
        self.esmtp = False
        self.credential = None
        self.sandbox = False
        self.envelope = None


class ISmtpBackend(Interface):
    """What a listener does with what it is told: the submission and inbound listeners differ."""

    offers_auth = Attribute("True when AUTH may be offered (after STARTTLS).")

    def check_sender(session: Session) -> Reply | None:
        """None to go on with MAIL FROM (checked, and valid), else the rejection (a
        credential held by a volume alert)."""

    def check_recipient(session: Session, address: str) -> Reply | None:
        """None to accept RCPT TO:<address>, else the rejection."""

    def check_credentials(name: str, password: str) -> Deferred[bool | Admitted]:
        """Whether the SMTP AUTH name and password are valid: False, or True or an
        :class:`Admitted` (what a backend knows of the credential, e.g. sandbox)."""

    def deliver(
        session: Session, envelope: Envelope, message: bytes | SpooledBody
    ) -> Deferred[Reply]:
        """Store the message durably, then give the reply to the final dot (250 or an error).

        A big message comes as a :class:`SpooledBody` (only to a backend with a ``spool``
        attribute, a :class:`smartrelay.spool.Spool`): its file is there until the returned
        Deferred fires, then the listener removes it.
        """


def address_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def received_header(
    session: Session, hostname: str, queue_id: str, recipients: Sequence[str], date: str
) -> bytes:
    """The trace header RFC 5321 4.4 asks every relay to prepend."""
    protocol = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        protocol += "S"
    if session.credential is not None:
        protocol += "A"
    helo = (session.helo or "unknown").replace("(", "").replace(")", "")[:100]
    ip = session.client_ip
    literal = f"IPv6:{ip}" if ":" in ip else ip
    target = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    return (
        f"Received: from {helo} ([{literal}])\r\n\tby {hostname} (SmartRelay) with {protocol}"
        f" id {queue_id}{target};\r\n\t{date}\r\n"
    ).encode()
