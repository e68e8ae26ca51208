"""Tying a report to our message and recipient (docs/feedback-processing.md, "Matching").

The routes, strongest first:

1. A token in an address of ours the report was sent to: the envelope recipients of a
   report the inbound listener received, else (a report fetched from a mailbox has no
   envelope) its ``Delivered-To``, ``X-Original-To`` and ``To`` headers; then the returned
   message's ``Return-Path``. ``u+TOKEN@return_path_domain`` is a mailto unsubscribe,
   whatever the mail says; ``b+TOKEN@`` is our VERP return path and names the recipient.
2. ``X-SmartRelay-ID`` or our own ``Message-ID`` (``<queue_id@hostname>``) in the returned
   message or headers: the message; its recipient by the address the report names.
3. The address the report names, among the copies sent in the last :data:`RECENT` seconds.

A token whose HMAC does not check (forged, or mangled on the way) is logged and the report
is ``unmatched``: no weaker route is tried, so that a forger gets nothing by the address
route that the token refused. A token that checks but whose recipient row is gone (the
message was purged, ``[retention] events``) makes the report ``unmatched`` too.

:func:`find_tokens` is pure; :func:`match_bounce` and :func:`match_complaint` run their
queries inside the caller's transaction (the one that records the effects).
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
from collections.abc import Iterable, Sequence

from attrs import frozen
from twisted.logger import Logger

from smartrelay.feedback.model import ClassifiedRecipient, Report
from smartrelay.smtp.session import printable
from smartrelay.storage.feedback import message_recipients, recent_copy, recipient_by_id
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.tracking import RecipientRef
from smartrelay.tokens import TokenCodec

log = Logger()

#: How far back the address route looks for the copy a report is about.
RECENT = 30 * 86400.0
#: The headers of a fetched report that name the address it was delivered to.
_DELIVERY_HEADERS = ("delivered-to", "x-original-to", "to")
#: Routes, as written in ``feedback_reports.matched_by``.
Route = str


@frozen
class Tokens:
    """The tokens found in the addresses a report was sent to."""

    #: Recipient ids of authentic ``b+TOKEN`` addresses.
    verp: tuple[int, ...] = ()
    #: Recipient ids of authentic ``u+TOKEN`` addresses.
    mailto: tuple[int, ...] = ()
    #: The addresses whose token did not check.
    forged: tuple[str, ...] = ()


@frozen
class Matched:
    """One recipient of ours a report is about; ``classified`` for a bounce."""

    ref: RecipientRef
    classified: ClassifiedRecipient | None = None


@frozen
class Match:
    """The recipients a report is about (none: unmatched, with ``reason``)."""

    route: Route | None
    matched: tuple[Matched, ...] = ()
    reason: str = ""


def find_tokens(
    codec: TokenCodec,
    domain: str,
    envelope_recipients: Sequence[str],
    raw: bytes | None,
    returned_return_path: str | None = None,
) -> Tokens:
    """The tokens of the addresses at ``domain`` the report was sent to (see the module
    docstring for where they are looked for)."""
    domain = domain.lower()
    addresses = [a for a in envelope_recipients if _token_of(a, domain) is not None]
    if not addresses and raw is not None:
        addresses = [a for a in delivery_headers(raw) if _token_of(a, domain) is not None]
    if returned_return_path and (_token_of(returned_return_path, domain) or ("",))[0] == "b":
        addresses.append(returned_return_path)  # our return path: a VERP, never a mailto
    verp: list[int] = []
    mailto: list[int] = []
    forged: list[str] = []
    for address in addresses:
        found = _token_of(address, domain)
        if found is None:
            continue
        kind, token = found
        try:
            if kind == "b":
                verp.append(codec.parse_verp(token))
            else:
                mailto.append(codec.parse_unsubscribe_mailto(token))
        except ValueError:  # TokenError, or not base32 at all
            forged.append(address)
    return Tokens(tuple(dict.fromkeys(verp)), tuple(dict.fromkeys(mailto)), tuple(forged))


def delivery_headers(raw: bytes) -> list[str]:
    """The addresses in the report's own ``Delivered-To``, ``X-Original-To`` and ``To``."""
    try:
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            raw[: 256 * 1024]
        )
        values = [str(v) for name in _DELIVERY_HEADERS for v in headers.get_all(name, [])]
        return [address for _, address in email.utils.getaddresses(values) if address]
    except Exception:  # hostile headers: no address from them
        return []


def _token_of(address: str, domain: str) -> tuple[str, str] | None:
    """("b" or "u", TOKEN) for ``b+TOKEN@domain`` / ``u+TOKEN@domain`` (any case), else None."""
    local, at, host = address.strip().strip("<>").rpartition("@")
    if not at or host.lower().rstrip(".") != domain:
        return None
    prefix, plus, token = local.partition("+")
    if not plus or prefix.lower() not in ("b", "u") or not token:
        return None
    return prefix.lower(), token


def our_queue_id(report: Report, hostname: str) -> tuple[Route, str] | None:
    """The queue id the returned message names: its ``X-SmartRelay-ID``, else its
    ``Message-ID`` when it is one we made (``queue_id@hostname``)."""
    returned = report.returned
    if returned is None:
        return None
    if returned.smartrelay_id and returned.smartrelay_id.strip():
        return "smartrelay-id", returned.smartrelay_id.strip()
    if returned.message_id:
        local, at, host = returned.message_id.strip().strip("<>").rpartition("@")
        if at and local and host.lower() == hostname.lower():
            return "message-id", local
    return None


async def refs_by_id(cursor: ICursor, ids: Iterable[int]) -> tuple[list[RecipientRef], list[int]]:
    """The recipient rows of ``ids``, and the ids whose row is gone."""
    found: list[RecipientRef] = []
    gone: list[int] = []
    for recipient_id in ids:
        row = await recipient_by_id(cursor, recipient_id)
        if row is None:
            gone.append(recipient_id)
        else:
            found.append(RecipientRef(*row))
    return found, gone


async def match_bounce(
    cursor: ICursor,
    tokens: Tokens,
    report: Report,
    failed: Sequence[ClassifiedRecipient],
    hostname: str,
    now_ms: int,
) -> Match:
    """The recipients of ours the ``failed`` recipients of a bounce are."""
    if tokens.verp:
        refs, gone = await refs_by_id(cursor, tokens.verp)
        if not refs:
            return Match(None, reason=_gone_reason(gone))
        # Our VERP names the recipient: the report may name another address (a forward).
        return Match("verp", tuple(Matched(ref, _pick(failed, ref.address)) for ref in refs))
    if tokens.forged:
        return _forged(tokens)
    named = our_queue_id(report, hostname)
    if named is not None:
        route, queue_id = named
        rows = [RecipientRef(*row) for row in await message_recipients(cursor, queue_id)]
        if not rows:
            return Match(None, reason=f"message {queue_id} is unknown (or purged)")
        matched = _pair(rows, failed)
        if not matched:
            names = ", ".join(c.recipient.address for c in failed) or "no address"
            return Match(None, reason=f"message {queue_id} has no recipient {names}")
        return Match(route, tuple(matched))
    matched = []
    for classified in failed:
        ref = await _recent_ref(cursor, classified.recipient.address, now_ms)
        if ref is not None:
            matched.append(Matched(ref, classified))
    if not matched:
        names = ", ".join(c.recipient.address for c in failed) or "no address"
        return Match(None, reason=f"no message sent to {names} in the last 30 days")
    return Match("address", tuple(matched))


async def match_complaint(
    cursor: ICursor, tokens: Tokens, report: Report, hostname: str, now_ms: int
) -> Match:
    """The recipient of ours a complaint is about (``Original-Rcpt-To``, else the returned
    message's ``To``)."""
    if tokens.verp:
        refs, gone = await refs_by_id(cursor, tokens.verp)
        if not refs:
            return Match(None, reason=_gone_reason(gone))
        return Match("verp", tuple(Matched(ref) for ref in refs))
    if tokens.forged:
        return _forged(tokens)
    addresses = _complainants(report)
    named = our_queue_id(report, hostname)
    if named is not None:
        route, queue_id = named
        rows = [RecipientRef(*row) for row in await message_recipients(cursor, queue_id)]
        if not rows:
            return Match(None, reason=f"message {queue_id} is unknown (or purged)")
        wanted = {a.lower() for a in addresses}
        chosen = [r for r in rows if r.address.lower() in wanted]
        if not chosen and len(rows) == 1:
            chosen = rows  # the address is redacted, but the message had one recipient
        if not chosen:
            return Match(None, reason=f"message {queue_id}: cannot tell which recipient")
        return Match(route, tuple(Matched(ref) for ref in chosen[:1]))
    for address in addresses:
        ref = await _recent_ref(cursor, address, now_ms)
        if ref is not None:
            return Match("address", (Matched(ref),))
    if not addresses:
        return Match(None, reason="the complaint names no recipient and no message of ours")
    return Match(None, reason=f"no message sent to {addresses[0]} in the last 30 days")


def _complainants(report: Report) -> list[str]:
    found: list[str] = []
    if report.complaint is not None and report.complaint.original_rcpt_to:
        found.append(report.complaint.original_rcpt_to)
    if report.returned is not None:
        found.extend(report.returned.to)
    return [a for a in dict.fromkeys(a.strip() for a in found) if "@" in a]


def _pick(failed: Sequence[ClassifiedRecipient], address: str) -> ClassifiedRecipient | None:
    """The failed recipient naming ``address``, else the first one (None: none at all)."""
    for classified in failed:
        if classified.recipient.address.lower() == address.lower():
            return classified
    return failed[0] if failed else None


def _pair(rows: Sequence[RecipientRef], failed: Sequence[ClassifiedRecipient]) -> list[Matched]:
    """Each failed recipient with the message's recipient of the same address; with one
    recipient on each side, those two (the report names a forwarded address)."""
    by_address = {r.address.lower(): r for r in rows}
    matched = [
        Matched(by_address[c.recipient.address.lower()], c)
        for c in failed
        if c.recipient.address.lower() in by_address
    ]
    if not matched and len(rows) == 1 and len(failed) == 1:
        matched = [Matched(rows[0], failed[0])]
    return matched


async def _recent_ref(cursor: ICursor, address: str, now_ms: int) -> RecipientRef | None:
    if "@" not in address:
        return None
    copy = await recent_copy(cursor, address, now_ms - round(RECENT * 1000))
    if copy is None:
        return None
    queue_id, sent_to = copy
    for row in await message_recipients(cursor, queue_id):
        ref = RecipientRef(*row)
        if ref.address == sent_to:
            return ref
    return None  # its rows are being purged


def _gone_reason(gone: Sequence[int]) -> str:
    return f"recipient {gone[0]} of the token is gone (its message was purged)"


def _forged(tokens: Tokens) -> Match:
    return Match(None, reason=forged_reason(tokens.forged))


def forged_reason(addresses: Sequence[str]) -> str:
    """The reason of a report whose token does not check; logs it (one warning line)."""
    shown = printable(", ".join(addresses[:3]))
    log.warn("feedback: token of {addresses} does not check: ignored", addresses=shown)
    return f"forged or mangled token: {shown}"[:300]
