# mypy: disable-error-code="no-untyped-call"
# (Twisted's IMAP4 and POP3 clients are not annotated; mypy's untyped_calls_exclude does
# not reach the methods a subclass inherits.)
"""The POP3 reader (``pop3://`` with STLS when offered, ``pop3s://`` implicit TLS), on
``twisted.mail.pop3.AdvancedPOP3Client`` (``twisted.mail.pop3client``'s client).

A session: connect, STLS (``pop3://``, when CAPA lists it: the certificate is verified),
APOP when the greeting carries a challenge, else USER/PASS; ``UIDL`` and ``LIST``; each
message not done yet (``mailbox_messages``, by UIDL) is retrieved (``RETR``; only its header
with ``TOP n 0`` when ``LIST`` says it is too big), stored, processed, then marked with
``DELE`` (``delete_after_processing``); QUIT commits the deletions. POP3 has no flags: with
``delete_after_processing = false`` the messages stay and their UIDLs are remembered. The
session ends after one pass (a POP3 server locks the maildrop while a session is open); the
service polls again after ``interval``.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.mail.pop3 import AdvancedPOP3Client, ServerErrorResponse
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.config import FeedbackMailbox
from smartrelay.feedback.mailboxes.base import (
    MAX_KEPT_HEADER,
    MAX_MESSAGE_SIZE,
    IMailboxReader,
    Intake,
    MailboxError,
)
from smartrelay.feedback.mailboxes.session import (
    DEFAULT_TUNABLES,
    ReaderTunables,
    abort,
    answer,
    closed_before_the_command,
    endpoint_for,
    mailbox_tls,
)
from smartrelay.reactor import IRelayReactor

__all__ = ["Pop3Reader"]

log = Logger()


class _Pop3Client(AdvancedPOP3Client):
    """Twisted's client, plus Deferreds for the greeting and the end of the connection."""

    #: A message's lines may be long (a hostile or broken one): any line of a message we
    #: accept must fit; the whole answer is bounded by :class:`_Collector`.
    MAX_LENGTH = MAX_MESSAGE_SIZE + 1024

    def __init__(self) -> None:
        self.greeted: Deferred[bytes] = Deferred()
        self._lost = False

    def serverGreeting(self, greeting: bytes) -> None:
        if not self.greeted.called:
            self.greeted.callback(greeting)

    # Twisted's client sends a command on a closed connection and waits for its answer: the
    # session would wait out the answer timeout (after stop(), a QUIT; after a server
    # went away while a report was processed, a DELE).
    def sendShort(self, cmd: bytes, args: bytes | None) -> Deferred[bytes]:
        if self._lost:
            return fail(closed_before_the_command())
        d: Deferred[bytes] = super().sendShort(cmd, args)
        return d

    def sendLong(self, cmd: bytes, args: bytes | None, consumer: Any, xform: Any) -> Deferred[Any]:
        if self._lost:
            return fail(closed_before_the_command())
        d: Deferred[Any] = super().sendLong(cmd, args, consumer, xform)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        super().connectionLost(reason)
        if not self.greeted.called:
            error = getattr(self, "_greetingError", None)
            if error:
                self.greeted.errback(MailboxError(f"the server refused the connection: {error!r}"))
            else:
                self.greeted.errback(reason)


class _Collector:
    """Receives a RETR/TOP answer line by line; drops the connection past ``limit`` bytes."""

    def __init__(self, protocol: _Pop3Client, limit: int) -> None:
        self._protocol = protocol
        self._limit = limit
        self.lines: list[bytes] = []
        self.size = 0

    def __call__(self, line: bytes) -> None:
        self.size += len(line) + 2
        if self.size > self._limit:
            abort(self._protocol)
            return
        self.lines.append(line)

    def message(self) -> bytes:
        return b"".join(line + b"\r\n" for line in self.lines)


@implementer(IMailboxReader)
class Pop3Reader:
    """Reads one POP3 maildrop (see the module docstring)."""

    def __init__(
        self,
        mailbox: FeedbackMailbox,
        intake: Intake,
        reactor: IRelayReactor,
        tunables: ReaderTunables = DEFAULT_TUNABLES,
    ) -> None:
        self._mailbox = mailbox
        self._intake = intake
        self._reactor = reactor
        self._tunables = tunables
        self.label = intake.identity
        self.passes = 0
        self._protocol: _Pop3Client | None = None
        self._stopping = False

    def session(self) -> Deferred[None]:
        self._stopping = False
        return Deferred.fromCoroutine(self._session())

    def stop(self) -> None:
        self._stopping = True
        protocol = self._protocol
        if protocol is not None:
            abort(protocol)  # now; DELEs not committed by QUIT are redone next time

    async def _answer(self, d: Deferred[Any], what: str) -> Any:
        return await answer(self._reactor, d, self._tunables.timeout, self._protocol, what)

    async def _session(self) -> None:
        mailbox, timeout = self._mailbox, self._tunables.timeout
        implicit = mailbox.scheme == "pop3s"
        tls = mailbox_tls(self._mailbox)
        endpoint = endpoint_for(
            self._reactor, mailbox.host, mailbox.port, timeout, tls if implicit else None
        )
        protocol = _Pop3Client()
        self._protocol = protocol
        try:
            await self._answer(connectProtocol(endpoint, protocol), "the connection")
            await self._answer(protocol.greeted, "the connection (greeting)")
            if not implicit:
                caps = await self._answer(protocol.capabilities(), "CAPA")
                if b"STLS" in caps:
                    await self._answer(protocol.startTLS(tls), "STLS")
                else:
                    log.warn(
                        "mailbox {mailbox}: the server offers no STLS: logging in without TLS",
                        mailbox=self.label,
                    )
            await self._login(protocol)
            await self._take_all(protocol)
            await self._answer(protocol.quit(), "QUIT")  # commits the DELEs
        except Exception:
            if self._stopping:
                return
            raise
        finally:
            self._protocol = None
            if protocol.transport is not None:
                protocol.transport.loseConnection()

    async def _login(self, protocol: _Pop3Client) -> None:
        user = (self._mailbox.username or "").encode()
        password = (self._mailbox.password or "").encode()
        try:
            challenge = protocol.serverChallenge
            if challenge is not None:
                digest = hashlib.md5(challenge + password).hexdigest().encode("ascii")
                await self._answer(protocol.apop(user, digest), "APOP")
            else:
                await self._answer(protocol.user(user), "USER")
                await self._answer(protocol.password(password), "PASS")
        except ServerErrorResponse as e:
            reason = e.args[0].decode("utf-8", "replace") if e.args else ""
            raise MailboxError(
                f"login refused for user {self._mailbox.username!r}: {reason}"
            ) from e

    async def _take_all(self, protocol: _Pop3Client) -> None:
        try:
            uidls = await self._answer(protocol.listUID(), "UIDL")
        except ServerErrorResponse as e:
            raise MailboxError(
                "the server does not answer UIDL, which the reader needs to tell messages apart"
            ) from e
        sizes = await self._answer(protocol.listSize(), "LIST")
        keys: dict[int, str] = {}
        for index, uidl in enumerate(uidls):
            if uidl is not None:
                keys[index] = uidl.decode("ascii", "replace")
        listed = list(keys.values())
        done = await self._intake.done(listed)
        await self._intake.forget_unlisted(listed)
        delete = self._mailbox.delete_after_processing
        for index, key in keys.items():
            if self._stopping:
                return
            if key in done:
                if delete:  # done, but the last session broke before QUIT
                    await self._answer(protocol.delete(index), "DELE")
                continue
            size = sizes[index] if index < len(sizes) and sizes[index] is not None else 0
            if size > MAX_MESSAGE_SIZE:
                collector = _Collector(protocol, MAX_KEPT_HEADER + 1024)
                with contextlib.suppress(ServerErrorResponse):  # TOP is optional
                    await self._answer(protocol.retrieve(index, collector, lines=0), "TOP")
                await self._intake.take_too_big(key, size, collector.message())
            elif await self._intake.stored(key):
                await self._intake.take(key, b"")  # stored before a break: process it
            else:
                collector = _Collector(protocol, MAX_MESSAGE_SIZE + 64 * 1024)
                await self._answer(protocol.retrieve(index, collector), "RETR")
                await self._intake.take(key, collector.message())
            if delete:
                await self._answer(protocol.delete(index), "DELE")
            await self._intake.finished(key)
        self.passes += 1
