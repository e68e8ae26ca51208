# mypy: disable-error-code="no-untyped-call"
# (Twisted's IMAP4 and POP3 clients are not annotated; mypy's untyped_calls_exclude does
# not reach the methods a subclass inherits.)
"""The IMAP4 reader (``imap://`` with STARTTLS when offered, ``imaps://`` implicit TLS).

A session: connect, STARTTLS (``imap://``, when the server offers it: the certificate is
verified), AUTHENTICATE (PLAIN or LOGIN when offered, else LOGIN), SELECT the folder, then
take every message: ``UID SEARCH ALL``, the ones not done yet (``mailbox_messages``) are
sized (``RFC822.SIZE``) and fetched with ``BODY.PEEK[]`` (or only their header when too big),
stored, processed, then ``\\Deleted`` + ``UID EXPUNGE`` (``EXPUNGE`` without UIDPLUS) or
``\\Seen``. With IDLE (RFC 2177), the session then waits in IDLE for ``* N EXISTS`` and takes
the new messages, renewing the IDLE every ``interval`` (at most 25 minutes); without it the
session ends and the service polls again after ``interval``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.mail import imap4
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

__all__ = ["ImapReader"]

log = Logger()


class _ImapClient(imap4.IMAP4Client):
    """Twisted's client, plus IDLE (RFC 2177), a bound on literals and lines, and Deferreds
    for the greeting and the end of the connection."""

    #: Longest line outside literals: a ``UID SEARCH`` answer lists every UID.
    MAX_LENGTH = 4 << 20

    def __init__(self, tls: IOpenSSLClientConnectionCreator | None) -> None:
        super().__init__(contextFactory=tls)
        self.greeted: Deferred[Any] = Deferred()
        self.lost: Deferred[None] = Deferred()
        #: How many ``* N EXISTS`` the server has sent (new messages, or expunges).
        self.exists_seen = 0
        self._idle_wake: Deferred[None] | None = None
        self._idling = False
        self._done_sent = False

    def serverGreeting(self, caps: Any) -> None:
        if not self.greeted.called:
            self.greeted.callback(caps)

    def sendCommand(self, cmd: imap4.Command) -> Deferred[Any]:
        # Twisted's client has no queue left after connectionLost (a TypeError).
        if self.lost.called:
            return fail(closed_before_the_command())
        d: Deferred[Any] = super().sendCommand(cmd)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if not self.greeted.called:
            self.greeted.errback(reason)
        if not self.lost.called:
            self.lost.callback(None)

    def lineLengthExceeded(self, line: bytes) -> None:
        abort(self)

    def _setupForLiteral(self, rest: bytes, octets: int) -> None:
        if octets > MAX_MESSAGE_SIZE + (1 << 20):
            # More than any message we ask for: a broken or hostile server.
            abort(self)
            return
        super()._setupForLiteral(rest, octets)

    def _defaultHandler(self, tag: bytes, rest: bytes) -> None:
        if tag == b"*" and rest.rstrip().upper().endswith(b" EXISTS"):
            self.exists_seen += 1
            if self._idling:
                self.end_idle()
        super()._defaultHandler(tag, rest)

    def idle(self) -> Deferred[Any]:
        """``IDLE``: fires when the server ends it, after :meth:`end_idle` (called on the
        first ``EXISTS``, or by the reader)."""
        self._idling = True
        self._done_sent = False
        command = imap4.Command(b"IDLE", None, (), self._idle_started)
        d: Deferred[Any] = self.sendCommand(command)

        def over(result: object) -> object:
            self._idling = False
            return result

        d.addBoth(over)
        return d

    def _idle_started(self, rest: bytes) -> None:
        if self._done_sent:
            self._send_done()

    def end_idle(self) -> None:
        """Leave IDLE (``DONE``), once."""
        if self._idling and not self._done_sent:
            self._done_sent = True
            self._send_done()

    def _send_done(self) -> None:
        if self.transport is not None:
            self.sendLine(b"DONE")

    def uid_expunge(self, uid: int) -> Deferred[Any]:
        """``UID EXPUNGE`` (RFC 4315): only this message, not others' ``\\Deleted`` ones."""
        d: Deferred[Any] = self.sendCommand(imap4.Command(b"UID EXPUNGE", str(uid).encode()))
        return d


@implementer(IMailboxReader)
class ImapReader:
    """Reads one IMAP folder (see the module docstring)."""

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
        self._protocol: _ImapClient | None = None
        self._stopping = False

    def session(self) -> Deferred[None]:
        self._stopping = False
        return Deferred.fromCoroutine(self._session())

    def stop(self) -> None:
        self._stopping = True
        protocol = self._protocol
        if protocol is not None:
            protocol.end_idle()
            abort(protocol)  # now, even in a TLS handshake or with unsent data

    async def _answer(self, d: Deferred[Any], what: str) -> Any:
        return await answer(self._reactor, d, self._tunables.timeout, self._protocol, what)

    async def _session(self) -> None:
        mailbox, timeout = self._mailbox, self._tunables.timeout
        implicit = mailbox.scheme == "imaps"
        tls = mailbox_tls(self._mailbox)
        endpoint = endpoint_for(
            self._reactor, mailbox.host, mailbox.port, timeout, tls if implicit else None
        )
        protocol = _ImapClient(tls)
        self._protocol = protocol
        try:
            await self._answer(connectProtocol(endpoint, protocol), "the connection")
            caps = await self._answer(protocol.greeted, "the connection (greeting)")
            caps = await self._answer(protocol.getCapabilities(), "CAPABILITY")
            if not implicit:
                if b"STARTTLS" in caps:
                    caps = await self._answer(protocol.startTLS(tls), "STARTTLS")
                else:
                    log.warn(
                        "mailbox {mailbox}: the server offers no STARTTLS: logging in without TLS",
                        mailbox=self.label,
                    )
            await self._login(protocol, caps)
            caps = await self._answer(protocol.getCapabilities(useCache=0), "CAPABILITY")
            selected = await self._answer(protocol.select(mailbox.mailbox), "SELECT")
            uidvalidity = int(selected.get("UIDVALIDITY") or 0)
            while not self._stopping:
                before = protocol.exists_seen
                await self._take_all(protocol, uidvalidity, b"UIDPLUS" in caps)
                if self._stopping or b"IDLE" not in caps:
                    break
                if protocol.exists_seen != before:
                    continue  # something arrived while we were taking: look again
                await self._idle(protocol)
            if not self._stopping:
                await self._answer(protocol.logout(), "LOGOUT")
        except Exception:
            if self._stopping:
                return
            raise
        finally:
            self._protocol = None
            if protocol.transport is not None:
                protocol.transport.loseConnection()

    async def _login(self, protocol: _ImapClient, caps: dict[bytes, Any]) -> None:
        user = (self._mailbox.username or "").encode()
        password = (self._mailbox.password or "").encode()
        offered = {m.upper() for m in caps.get(b"AUTH") or ()}
        try:
            if b"PLAIN" in offered or b"LOGIN" in offered:
                for authenticator in (imap4.PLAINAuthenticator, imap4.LOGINAuthenticator):
                    protocol.registerAuthenticator(authenticator(user))
                await self._answer(protocol.authenticate(password), "AUTHENTICATE")
            elif b"LOGINDISABLED" in caps:
                raise MailboxError("the server refuses LOGIN and offers no AUTH=PLAIN or LOGIN")
            else:
                await self._answer(protocol.login(user, password), "LOGIN")
        except imap4.IMAP4Exception as e:
            reason = e.args[0] if e.args else ""
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            raise MailboxError(
                f"login refused for user {self._mailbox.username!r}: {reason}"
            ) from e

    async def _take_all(self, protocol: _ImapClient, uidvalidity: int, uidplus: bool) -> None:
        uids = sorted(
            await self._answer(protocol.search(imap4.Query(all=True), uid=True), "UID SEARCH")
        )
        keys = {uid: f"{uidvalidity}:{uid}" for uid in uids}
        done = await self._intake.done(list(keys.values()))
        await self._intake.forget_unlisted(list(keys.values()))
        delete = self._mailbox.delete_after_processing
        todo = [uid for uid in uids if keys[uid] not in done]
        sizes: dict[int, int] = {}
        for start in range(0, len(todo), 500):
            part = todo[start : start + 500]
            fetched = await self._answer(
                protocol.fetchSize(_message_set(part), uid=True), "UID FETCH (RFC822.SIZE)"
            )
            for values in fetched.values():
                if "UID" in values and "RFC822.SIZE" in values:
                    sizes[int(values["UID"])] = int(values["RFC822.SIZE"])
        for uid in uids:
            if self._stopping:
                return
            key = keys[uid]
            if key in done:
                if delete:  # done, but the session broke before the expunge
                    await self._delete(protocol, uid, uidplus)
                continue
            if uid not in sizes:
                continue  # expunged by another client meanwhile
            size = sizes[uid]
            if size > MAX_MESSAGE_SIZE:
                header = await self._fetch(protocol, uid, header_only=True)
                await self._intake.take_too_big(key, size, header[:MAX_KEPT_HEADER])
            elif await self._intake.stored(key):
                await self._intake.take(key, b"")  # stored before a break: process it
            else:
                raw = await self._fetch(protocol, uid, header_only=False)
                await self._intake.take(key, raw)
            if delete:
                await self._delete(protocol, uid, uidplus)
            else:
                await self._answer(
                    protocol.addFlags(_message_set([uid]), [r"\Seen"], uid=True),
                    r"UID STORE +FLAGS (\Seen)",
                )
            await self._intake.finished(key)
        self.passes += 1

    async def _fetch(self, protocol: _ImapClient, uid: int, header_only: bool) -> bytes:
        what = "UID FETCH (BODY.PEEK[HEADER])" if header_only else "UID FETCH (BODY.PEEK[])"
        fetched = await self._answer(
            protocol.fetchSpecific(
                _message_set([uid]),
                uid=True,
                headerType="HEADER" if header_only else None,
                peek=True,
            ),
            what,
        )
        for items in fetched.values():
            for item in items:
                # ['UID', '7', 'BODY', [...], 'text'] (the text decoded as Latin-1)
                if isinstance(item, list) and "BODY" in item:
                    at = item.index("BODY")
                    if len(item) > at + 2 and isinstance(item[at + 2], str):
                        text: str = item[at + 2]
                        return text.encode("latin-1")
        raise MailboxError(f"{what} of UID {uid}: no body in the answer")

    async def _delete(self, protocol: _ImapClient, uid: int, uidplus: bool) -> None:
        await self._answer(
            protocol.addFlags(_message_set([uid]), [r"\Deleted"], uid=True),
            r"UID STORE +FLAGS (\Deleted)",
        )
        if uidplus:
            await self._answer(protocol.uid_expunge(uid), "UID EXPUNGE")
        else:
            await self._answer(protocol.expunge(), "EXPUNGE")

    async def _idle(self, protocol: _ImapClient) -> None:
        """IDLE until the server tells of a change, the renewal time, or :meth:`stop`."""
        wait = min(self._mailbox.interval, self._tunables.max_idle)
        timer = self._reactor.callLater(wait, protocol.end_idle)
        try:
            done = protocol.idle()
            # The answer comes after DONE: allow the renewal time plus the usual timeout.
            await answer(self._reactor, done, wait + self._tunables.timeout, protocol, "IDLE")
        finally:
            if timer.active():
                timer.cancel()


def _message_set(uids: list[int]) -> imap4.MessageSet:
    messages = imap4.MessageSet()
    for uid in uids:
        messages.add(uid)
    return messages
