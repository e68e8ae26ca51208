"""What the two listeners do with a message: submission queues it, inbound keeps it as feedback."""

from __future__ import annotations

import datetime
import email.utils
import functools
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from smartrelay.ids import new_queue_id
from smartrelay.passwords import hash_password, verify_password
from smartrelay.reactor import IRelayReactor
from smartrelay.smtp.control import ControlHeaderError, header_block, parse_control_headers
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.session import (
    Admitted,
    Envelope,
    ISmtpBackend,
    Session,
    address_domain,
    printable,
    received_header,
)
from smartrelay.smtp.volume_watch import VolumeGate
from smartrelay.spool import Spool, SpooledBody
from smartrelay.storage.store import NewFeedback, NewMessage, Store

log = Logger()
T = TypeVar("T")

StoreReady = Callable[[], Deferred[Store]]

# Checked when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = hash_password("smartrelay-no-such-user")


def rfc5322_date(seconds: float) -> str:
    """The Received header's date (UTC, to the second)."""
    return _rfc5322_date_of_second(math.floor(seconds))


@functools.lru_cache(maxsize=2)
def _rfc5322_date_of_second(second: int) -> str:
    # Formatted once a second, not once a message: a busy listener takes hundreds a second.
    moment = datetime.datetime.fromtimestamp(second, tz=datetime.UTC)
    return email.utils.format_datetime(moment)


@implementer(ISmtpBackend)
class SubmissionBackend:
    """Applications' mail: control headers parsed, message and recipients queued durably."""

    offers_auth = True

    def __init__(
        self,
        reactor: IRelayReactor,
        hostname: str,
        store_ready: StoreReady,
        spool: Spool | None = None,
        volume: VolumeGate | None = None,
    ) -> None:
        self._reactor = reactor
        self._hostname = hostname
        self._store_ready = store_ready
        #: Big bodies arrive in files here (None: every body in memory).
        self.spool = spool
        #: The per-credential volume watch (None: ``on_volume_alert = "off"``): the
        #: :class:`VolumeWatch` itself, or in an accepting process :class:`HeldCredentials`.
        self.volume = volume

    def check_sender(self, session: Session) -> Reply | None:
        if self.volume is None:
            return None
        return self.volume.check_sender(session.credential)

    def check_recipient(self, session: Session, address: str) -> Reply | None:
        return None

    def check_credentials(self, name: str, password: str) -> Deferred[bool | Admitted]:
        return Deferred.fromCoroutine(self._check_credentials(name, password))

    async def _check_credentials(self, name: str, password: str) -> bool | Admitted:
        store = await self._store_ready()
        # The sandbox flag comes with the hash: the session keeps it for its mail.
        stored = await store.smtp_credentials.check_record(name)
        # scrypt takes ~50 ms of CPU on purpose: keep it off the reactor thread.
        valid: bool = await deferToThreadPool(
            self._reactor,
            self._reactor.getThreadPool(),
            verify_password,
            password,
            _DUMMY_HASH if stored is None else stored.password_hash,
        )
        if not valid or stored is None:
            return False
        return Admitted(sandbox=stored.sandbox)

    def deliver(
        self, session: Session, envelope: Envelope, message: bytes | SpooledBody
    ) -> Deferred[Reply]:
        return Deferred.fromCoroutine(self._deliver(session, envelope, message))

    async def _deliver(
        self, session: Session, envelope: Envelope, message: bytes | SpooledBody
    ) -> Reply:
        if isinstance(message, SpooledBody):
            spooled, in_memory, head = message, b"", message.header_block()
        else:
            spooled, in_memory, head = None, message, header_block(message)
        try:
            control = parse_control_headers(head)
        except ControlHeaderError as error:
            # The error may quote what the client sent: escaped for the log and the reply.
            shown = printable(str(error))
            log.info("{ip}: message refused: {error}", ip=session.client_ip, error=shown)
            return Reply(550, "5.6.0", f"Bad control header: {shown}")
        store = await self._store_ready()
        now = self._reactor.seconds()
        queue_id = new_queue_id(now)
        trace = received_header(
            session, self._hostname, queue_id, envelope.recipients, rfc5322_date(now)
        )
        new = NewMessage(
            sender=envelope.sender,
            recipients=tuple(envelope.recipients),
            raw=trace + in_memory,
            client_ip=session.client_ip,
            credential=session.credential,
            sandbox=session.credential is not None and session.sandbox,
            tags=control.tags,
            metadata=dict(control.metadata),
            options=control.options(),
            idempotency_key=control.idempotency_key,
            queue_id=queue_id,
            spooled=spooled,
        )
        if spooled is None:
            queued = await store.queue_message(new)  # the fast path: no budget to take
        else:
            queued = await _handed_over(self.spool, new.size, lambda: store.queue_message(new))
        if self.volume is not None and session.credential is not None and not queued.duplicate:
            self.volume.message_accepted(session.credential)
        log.info(
            "{queue_id}: accepted from={sender} rcpts={count} size={size} ip={ip}{dup}",
            queue_id=queued.queue_id,
            sender=envelope.sender,
            count=len(envelope.recipients),
            size=new.size - len(trace),
            ip=session.client_ip,
            dup=" (duplicate idempotency key: dropped)" if queued.duplicate else "",
        )
        return Reply(250, "2.0.0", f"Ok: queued as {queued.queue_id}")


@implementer(ISmtpBackend)
class InboundBackend:
    """The return-path domain's MX: bounces and FBL reports, from anyone, for us only."""

    offers_auth = False

    def __init__(
        self,
        reactor: IRelayReactor,
        return_path_domain: str,
        store_ready: StoreReady,
        spool: Spool | None = None,
    ) -> None:
        self._reactor = reactor
        self._domain = return_path_domain.lower()
        self._store_ready = store_ready
        self.spool = spool

    def check_sender(self, session: Session) -> Reply | None:
        return None

    def check_recipient(self, session: Session, address: str) -> Reply | None:
        if address_domain(address) != self._domain:
            # Never a relay: only the return-path domain is ours.
            return Reply(550, "5.1.1", f"No such recipient here: <{address}>")
        return None

    def check_credentials(self, name: str, password: str) -> Deferred[bool | Admitted]:
        return succeed(False)

    def deliver(
        self, session: Session, envelope: Envelope, message: bytes | SpooledBody
    ) -> Deferred[Reply]:
        return Deferred.fromCoroutine(self._deliver(session, envelope, message))

    async def _deliver(
        self, session: Session, envelope: Envelope, message: bytes | SpooledBody
    ) -> Reply:
        store = await self._store_ready()
        spooled = message if isinstance(message, SpooledBody) else None
        report = NewFeedback(
            sender=envelope.sender,
            recipients=tuple(envelope.recipients),
            raw=message if isinstance(message, bytes) else b"",
            client_ip=session.client_ip,
            spooled=spooled,
        )
        size = spooled.size if spooled is not None else 0
        report_id = await _handed_over(self.spool, size, lambda: store.store_feedback(report))
        log.info(
            "{report_id}: feedback received from={sender} rcpts={rcpts} ip={ip}",
            report_id=report_id,
            sender=envelope.sender or "<>",
            rcpts=",".join(envelope.recipients),
            ip=session.client_ip,
        )
        return Reply(250, "2.0.0", f"Ok: queued as {report_id}")


async def _handed_over(spool: Spool | None, size: int, storing: Callable[[], Awaitable[T]]) -> T:
    """``storing()`` (of a body of ``size`` bytes in a spool file, 0 for one in memory) started
    only within the spool's byte budget: big bodies are handed to storage a few at a time."""
    if spool is None or size == 0:
        return await storing()
    await spool.budget.acquire(size)
    try:
        return await storing()
    finally:
        spool.budget.release(size)
