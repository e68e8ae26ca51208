"""Failed recipients of bounces that are not RFC 3464 DSNs: the MTAs' own texts.

Many MTAs and providers send plain-text bounces (Exim, qmail, old Sendmail and Postfix texts,
Exchange NDRs, Gmail, Yahoo, Lotus Domino, GroupWise, localised ones in German, French,
Japanese...), and some DSNs arrive with their delivery-status part missing or broken. This
module reads them with one algorithm driven by the table in
:mod:`smartrelay.feedback.bounce_signatures`:

1. The report text: the text parts decoded (charset, ISO-2022-JP escapes, HTML when there is no
   plain text), cut where the returned message begins, bounded in size.
2. The first table row whose signature matches and that yields an address wins: its address
   patterns (or the generic address lines) mark *anchors*; the reason of an address is the
   text from its anchor to the next anchor of another address. ``X-Failed-Recipients`` (Exim)
   lists the addresses when present. ``flufl.bounce`` is the fallback address finder.
3. From each reason: the SMTP reply code, the enhanced status and the remote host.

Our own addresses never come out as failed recipients: the bounce's own header addresses (our
return path, the reporting MTA's postmaster), the returned message's sender, and daemon
mailboxes. Pure and bounded: a hostile message costs at most a few hundred kilobytes of regex
work, and nothing raises.
"""

from __future__ import annotations

import codecs
import contextlib
import email.header
import html
import logging
import re
from collections.abc import Iterator
from email.message import EmailMessage, Message
from email.parser import HeaderParser
from typing import Final

from attrs import frozen
from flufl.bounce import all_failures

from smartrelay.feedback.bounce_signatures import (
    ADDR,
    CUT_MARKERS,
    DELAY_MARKERS,
    SENTENCE_ADDRESSES,
    SIGNATURES,
    SUCCESS_MARKERS,
    Signature,
)
from smartrelay.feedback.model import FailedRecipient

__all__ = [
    "MAX_REPORT_CHARS",
    "failed_recipients_from_text",
    "find_reply",
]

#: The decoded bytes read from one text part.
MAX_PART_BYTES: Final = 256 * 1024
#: The report text (before the returned message) examined by the signatures.
MAX_REPORT_CHARS: Final = 64 * 1024
#: Parts looked at, and MIME nesting followed.
MAX_PARTS: Final = 200
MAX_DEPTH: Final = 20
#: flufl.bounce walks every line of every part: it is only asked about smaller messages (and
#: those of at most MAX_PARTS parts).
FLUFL_MAX_BYTES: Final = 512 * 1024
#: A reason's raw text, and the diagnostic kept from it.
MAX_REASON_CHARS: Final = 1500
MAX_DIAGNOSTIC_CHARS: Final = 500

_FLAGS = re.IGNORECASE | re.MULTILINE

# flufl.bounce logs every exception of its detectors (hostile mail makes them fail) through
# stdlib logging before re-raising; we treat a failure as "no answer", so its log is silenced.
logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())
logging.getLogger("flufl.bounce").propagate = False


@frozen
class _CompiledSignature:
    source: Signature
    body: tuple[re.Pattern[str], ...]
    headers: tuple[tuple[str, re.Pattern[str]], ...]
    start: re.Pattern[str] | None
    end: re.Pattern[str] | None
    addresses: tuple[re.Pattern[str], ...]
    reason: re.Pattern[str] | None


def _compile(sig: Signature) -> _CompiledSignature:
    def c(pattern: str | None) -> re.Pattern[str] | None:
        return None if pattern is None else re.compile(pattern, _FLAGS)

    return _CompiledSignature(
        source=sig,
        body=tuple(re.compile(p, _FLAGS) for p in sig.body),
        headers=tuple((name, re.compile(p, _FLAGS)) for name, p in sig.headers),
        start=c(sig.start),
        end=c(sig.end),
        addresses=tuple(re.compile(p, _FLAGS) for p in sig.addresses),
        reason=c(sig.reason),
    )


_SIGNATURES: Final = tuple(_compile(sig) for sig in SIGNATURES)
_CUT = re.compile("|".join(f"(?:{p})" for p in CUT_MARKERS), _FLAGS)
_DELAY = re.compile("|".join(f"(?:{p})" for p in DELAY_MARKERS), _FLAGS)
_SUCCESS = re.compile("|".join(f"(?:{p})" for p in SUCCESS_MARKERS), _FLAGS)
_FAILURE_WORDS = re.compile(
    r"(?:could|can)(?:no|')t (?:be )?deliver|unable to deliver|undeliverable|not (?:be )?delivered"
    r"|(?:delivery|has) failed|permanent(?:ly)? (?:error|fail)|rejected|\b[45]\d\d[ -][45]\.\d",
    _FLAGS,
)
_ADDRESS = re.compile(ADDR, re.IGNORECASE)
_SENTENCES = tuple(re.compile(p, _FLAGS) for p in SENTENCE_ADDRESSES)

# The generic address lines: an address alone at the start of a line (bracketed, quoted or
# not), or after a label ("Recipient address:", "Final-Recipient: rfc822;", "RCPT TO:") that is
# not a header of a quoted message, or after a display name in angle brackets.
_QUOTED_HEADER_LABELS = (
    r"(?:to|cc|bcc|from|sender|reply-to|return-path|delivered-to|x-original-to|envelope-to"
    r"|subject|date|message-id|received|x-[\w-]{0,40}|resent-[\w-]{0,20}|errors-to)"
)
_GENERIC_LINES: Final = (
    re.compile(
        r"^[ \t>*•-]{0,20}[<'\"(\[]?" + ADDR + r"[>'\")\]]?(?=$|[\s:;,(]|\.\.\.|\.$)",
        _FLAGS,
    ),
    re.compile(
        r"^[ \t>*•-]{0,20}(?!" + _QUOTED_HEADER_LABELS + r"[ \t]*:)[A-Za-z][\w '.-]{0,40}:"
        r"[ \t]*(?:[\w-]{1,20};[ \t]*)?(?:\[smtp:)?[<'\"(]?" + ADDR,
        _FLAGS,
    ),
    re.compile(r"^[ \t]{0,20}[^<>@:\n]{1,80}<(?:mailto:)?" + ADDR + r">", _FLAGS),
)

# Reply codes and enhanced statuses inside a reason.
# Failures only: a transcript's "250 2.1.0 Sender ok" is never the reason.
_CODE_AND_STATUS = re.compile(
    r"(?<![\w.])([45]\d\d)[ \t-]{1,3}[#(]?([245])\.([0-7])\.(\d{1,3})(?!\d|\.\d)"
)
_STATUS = re.compile(r"(?<![\w.])#?([45])\.([0-7])\.(\d{1,3})(?![\w]|\.\d)")
_CODE = re.compile(
    r"(?:^|said:?|returned:?|replied:?|response:?|error:?|<<<|#|;|\(|:|reason:|was:)"
    r"[ \t'\"]{0,3}([45]\d\d)(?=[ \t:-]|$|['\"])",
    _FLAGS,
)
# Where the remote host shows.
_HOST = r"((?:[a-z0-9-]{1,63}\.){1,10}[a-z]{2,63}|\[?\d{1,3}(?:\.\d{1,3}){3}\]?)"
_REMOTE_HOST: Final = (
    re.compile(r"\bhost\s{1,20}" + _HOST + r"\.?[ \t]*\[[\d.:a-f]{3,45}\]", _FLAGS),
    re.compile(r"\bwhile talking to " + _HOST, _FLAGS),
    re.compile(
        r"remote[- ](?:host|system|server|mta)(?: name)?:?[ \t]*(?:dns;[ \t]*)?<?" + _HOST, _FLAGS
    ),
    re.compile(r"\bby " + _HOST + r"\.?[ \t]*\[[\d.:a-f]{3,45}\]", _FLAGS),
    re.compile(r"^[ \t]*" + _HOST + r" does not like recipient", _FLAGS),
    re.compile(r"giving up on " + _HOST, _FLAGS),
    re.compile(r"connected to " + _HOST + r" but", _FLAGS),
    re.compile(r"<" + _HOST + r" #[245]\.\d", _FLAGS),
    re.compile(r"(?:receiving server:|remote server at)[ \t]*" + _HOST, _FLAGS),
    re.compile(r"\bmx(?: host)?[ \t]+" + _HOST + r"\b", _FLAGS),
    re.compile(r"generating server:[ \t]*" + _HOST, _FLAGS),
)

#: Local parts that are never a failed recipient: the reporting MTA's and our daemons.
_DAEMONS: Final = frozenset(
    {
        "mailer-daemon",
        "mailer_daemon",
        "mailerdaemon",
        "maildaemon",
        "mail-daemon",
        "postmaster",
        "double-bounce",
        "noreply",
        "no-reply",
        "donotreply",
        "do-not-reply",
        "mdaemon",
        "root",
    }
)
_OWN_HEADERS: Final = (
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Delivered-To",
    "X-Original-To",
    "Envelope-To",
    "X-Envelope-To",
    "Return-Path",
    "Errors-To",
)
_RETURNED_SENDER_HEADERS: Final = ("From", "Sender", "Return-Path", "Reply-To", "Errors-To")
_RETURNED_HEADER_LINE = re.compile(
    r"^(?:from|sender|return-path|reply-to|errors-to|to|cc):[^\n]{0,500}",
    re.IGNORECASE | re.MULTILINE,
)


def failed_recipients_from_text(message: EmailMessage) -> list[FailedRecipient]:
    """The recipients a non-standard bounce reports as failed (or delayed), in report order.

    Empty when the message is not a recognisable bounce. Never raises.
    """
    try:
        return _failed_recipients(message)
    except Exception:  # hostile MIME reaches corners of the email package that raise
        return []


def find_reply(text: str) -> tuple[int | None, str]:
    """The SMTP reply code and enhanced status in a bounce's reason text.

    The status is the enhanced status written next to the code or alone (``#5.1.1`` as qmail
    and Exchange write it); without one, it is derived from the code (``550`` → ``5.0.0``);
    ``""`` when the text has neither. A status whose class contradicts the code follows the
    code, as in :mod:`smartrelay.feedback.smtp_replies`.
    """
    code: int | None = None
    status: tuple[str, str, str] | None = None
    m = _CODE_AND_STATUS.search(text)
    if m is not None:
        code = int(m.group(1))
        status = (m.group(2), m.group(3), m.group(4))
    else:
        s = _STATUS.search(text)
        if s is not None:
            status = (s.group(1), s.group(2), s.group(3))
        c = _CODE.search(text)
        if c is not None:
            code = int(c.group(1))
    if status is None:
        return code, "" if code is None else f"{code // 100}.0.0"
    cls = status[0] if code is None else str(code // 100)
    return code, f"{cls}.{int(status[1])}.{int(status[2])}"


# --- the message's text ---------------------------------------------------------------------


@frozen
class _Text:
    #: The report: the text before the returned message.
    report: str
    #: The sender addresses of the returned message, inline or attached (ours).
    returned_senders: frozenset[str]
    #: Its To and Cc addresses.
    returned_recipients: tuple[str, ...] = ()


def _failed_recipients(message: Message) -> list[FailedRecipient]:
    plain: list[str] = []
    html_parts: list[str] = []
    attached: list[str] = []
    returned: list[Message] = []
    _collect(message, 0, [0], plain, html_parts, attached, returned)
    if plain:
        full = "\n".join(plain)
    elif html_parts:
        full = "\n".join(_strip_html(h) for h in html_parts)
    else:
        full = "\n".join(attached)
    full = full.replace("\r\n", "\n").replace("\r", "\n")
    text = _split(full, returned)
    own = _own_addresses(message) | text.returned_senders
    report = text.report
    if _SUCCESS.search(report) is not None and _FAILURE_WORDS.search(report) is None:
        return []  # a delivery or relay receipt written as text: nothing failed
    delayed = _DELAY.search(report) is not None
    header_listed = [
        a for a in _header_addresses(message, "X-Failed-Recipients") if not _is_own(a, own)
    ]

    recognised = None
    for sig in _SIGNATURES:
        if not _matches(sig, message, report):
            continue
        recognised = recognised or sig
        found = _extract(sig, report, own, header_listed)
        if found:
            action = "delayed" if delayed or sig.source.action == "delayed" else "failed"
            return [_recipient(addr, reason, action) for addr, reason in found]

    addresses = header_listed or _flufl_addresses(message, own)
    action = "delayed" if delayed else "failed"
    if not addresses and recognised is not None:
        # A bounce that names no address in its text: the returned message's one recipient.
        to = [a for a in text.returned_recipients if not _is_own(a, own)]
        if len(to) == 1:
            region = _region(recognised, report)
            return [_recipient(to[0], region[:MAX_REASON_CHARS], action)]
    if not addresses:
        return []
    return [_recipient(addr, _reason_after(report, addr), action) for addr in addresses]


def _collect(
    part: Message,
    depth: int,
    count: list[int],
    plain: list[str],
    html_parts: list[str],
    attached: list[str],
    returned: list[Message],
) -> None:
    count[0] += 1
    if depth > MAX_DEPTH or count[0] > MAX_PARTS:
        return
    try:
        _collect_part(part, depth, count, plain, html_parts, attached, returned)
    except Exception:  # a part the email package cannot read (hostile headers) is skipped
        return


def _collect_part(
    part: Message,
    depth: int,
    count: list[int],
    plain: list[str],
    html_parts: list[str],
    attached: list[str],
    returned: list[Message],
) -> None:
    ctype = part.get_content_type()
    payload = part.get_payload()
    if ctype == "message/rfc822" or ctype == "message/global":
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            returned.append(payload[0])
        return
    if ctype == "message/delivery-status":
        plain.append(_delivery_status_text(part))
        return
    if part.is_multipart():
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, Message):
                    _collect(sub, depth + 1, count, plain, html_parts, attached, returned)
        return
    if ctype in ("text/rfc822-headers", "text/global-headers"):
        returned.append(HeaderParser().parsestr(_decoded(part)[:MAX_PART_BYTES]))
        return
    if ctype in ("text/plain", "text/html"):
        if depth > 0 and part.get_content_disposition() == "attachment":
            # An attached text (often the returned message as a file): read last, if at all.
            attached.append(_decoded(part))
        else:
            (html_parts if ctype == "text/html" else plain).append(_decoded(part))


def _delivery_status_text(part: Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):
        blocks = []
        for block in payload[:MAX_PARTS]:
            if isinstance(block, Message):
                # raw_items: the fields as written (items() parses them, and can raise).
                blocks.append("\n".join(f"{k}: {v}" for k, v in block.raw_items()))
        return "\n\n".join(blocks)
    return _decoded(part)


def _decoded(part: Message) -> str:
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        payload = part.get_payload()
        return payload[:MAX_PART_BYTES] if isinstance(payload, str) else ""
    raw = raw[:MAX_PART_BYTES]
    charset = (part.get_content_charset() or "").strip()
    if b"\x1b$B" in raw or b"\x1b$@" in raw or b"\x1b(J" in raw:
        charset = "iso-2022-jp"  # often sent as us-ascii or with no charset at all
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        try:
            codecs.lookup(candidate)
            return raw.decode(candidate, errors="strict" if candidate == "utf-8" else "replace")
        except (LookupError, UnicodeDecodeError, ValueError):
            continue
    return raw.decode("cp1252", errors="replace")


_HTML_BREAK = re.compile(r"<(?:br|p|div|tr|li|h\d|table)\b[^<>]{0,500}>", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^<>]{0,2000}>")


def _strip_html(text: str) -> str:
    """The text of an HTML part: style and script dropped, tags gone, entities decoded."""
    lowered = text.lower()
    out: list[str] = []
    pos = 0
    next_at = {tag: lowered.find(tag) for tag in ("<style", "<script")}
    while True:
        for tag, at in next_at.items():
            if 0 <= at < pos:
                next_at[tag] = lowered.find(tag, pos)
        found = [(at, tag) for tag, at in next_at.items() if at >= 0]
        if not found:
            break
        start, tag = min(found)
        out.append(text[pos:start])
        closing = "</" + tag[1:]
        end = lowered.find(closing, start)
        if end < 0:
            pos = len(text)
            break
        pos = end + len(closing)
    out.append(text[pos:])
    stripped = _HTML_TAG.sub(" ", _HTML_BREAK.sub("\n", "".join(out)))
    return html.unescape(stripped)


def _split(full: str, returned: list[Message]) -> _Text:
    head = full[: MAX_REPORT_CHARS * 2]
    cut = _CUT.search(head)
    if cut is None:
        report, tail = head[:MAX_REPORT_CHARS], ""
    else:
        report = head[: cut.start()][:MAX_REPORT_CHARS]
        tail = head[cut.start() : cut.start() + 8192]
    senders: set[str] = set()
    recipients: set[str] = set()
    for line in _RETURNED_HEADER_LINE.findall(tail):
        if line[:3].lower() in ("to:", "cc:"):
            recipients.update(_addresses_in(line))
        else:
            senders.update(_addresses_in(line))
    for msg in returned[:10]:
        for name in _RETURNED_SENDER_HEADERS:
            senders.update(_header_addresses(msg, name))
        for name in ("To", "Cc"):
            recipients.update(_header_addresses(msg, name))
    # A message sent to its own sender (a test, a list) can bounce for that address.
    return _Text(
        report=report,
        returned_senders=frozenset(senders - recipients),
        returned_recipients=tuple(sorted(recipients)),
    )


# --- addresses ------------------------------------------------------------------------------


def _addresses_in(text: str) -> Iterator[str]:
    for m in _ADDRESS.finditer(text[:4096]):
        yield m.group("addr").lower()


def _header_values(message: Message, name: str) -> list[str]:
    try:
        values = message.get_all(name) or []
    except Exception:  # a malformed header the policy cannot parse
        return []
    out: list[str] = []
    for value in values[:20]:
        text = str(value)
        if "=?" in text:
            with contextlib.suppress(Exception):  # a broken encoded word: keep it as written
                text = str(email.header.make_header(email.header.decode_header(text)))
        out.append(text[:4096])
    return out


def _header_addresses(message: Message, name: str) -> list[str]:
    found: list[str] = []
    for value in _header_values(message, name):
        for addr in _addresses_in(value):
            if addr not in found:
                found.append(addr)
    return found


def _own_addresses(message: Message) -> frozenset[str]:
    own: set[str] = set()
    for name in _OWN_HEADERS:
        own.update(_header_addresses(message, name))
    return frozenset(own)


def _is_own(addr: str, own: frozenset[str]) -> bool:
    return addr in own or addr.split("@", 1)[0] in _DAEMONS


def _flufl_addresses(message: Message, own: frozenset[str]) -> list[str]:
    size = 0
    try:
        for count, part in enumerate(message.walk()):
            payload = part.get_payload()
            if isinstance(payload, str):
                size += len(payload)
            if size > FLUFL_MAX_BYTES or count > MAX_PARTS:
                return []
    except Exception:  # a part the email package cannot read: flufl.bounce could not either
        return []
    try:
        temporary, permanent = all_failures(message)
    except Exception:  # flufl.bounce's detectors are not hardened against hostile input
        return []
    found: list[str] = []
    for raw in sorted(permanent | temporary):
        m = _ADDRESS.fullmatch(raw.decode("ascii", "replace").strip().strip("<>"))
        if m is None:
            continue
        addr = m.group("addr").lower()
        if not _is_own(addr, own) and addr not in found:
            found.append(addr)
    return found


# --- signatures -----------------------------------------------------------------------------


def _matches(sig: _CompiledSignature, message: Message, report: str) -> bool:
    if sig.body and not any(p.search(report) for p in sig.body):
        return False
    if sig.headers:
        return any(
            p.search(value) for name, p in sig.headers for value in _header_values(message, name)
        )
    return bool(sig.body)


def _region(sig: _CompiledSignature, report: str) -> str:
    start = 0
    if sig.start is not None:
        m = sig.start.search(report)
        if m is not None:
            start = m.end()
    else:
        first = min((m.start() for p in sig.body if (m := p.search(report)) is not None), default=0)
        start = report.rfind("\n", 0, first) + 1
    end = len(report)
    if sig.end is not None:
        m = sig.end.search(report, start)
        if m is not None:
            end = m.start()
    return report[start:end]


def _anchors(sig: _CompiledSignature, region: str) -> list[tuple[int, int, str]]:
    """(start, end, address) of every address the signature's patterns find, in order."""
    found: list[tuple[int, int, str]] = []
    if sig.addresses:
        for pattern in sig.addresses:
            for m in pattern.finditer(region):
                found.append((m.start("addr"), m.end(), m.group("addr").lower()))
    else:
        offset = 0
        for line in region.split("\n"):
            if "@" in line:
                for pattern in _GENERIC_LINES:
                    lm = pattern.search(line)
                    if lm is not None:
                        addr = lm.group("addr").lower()
                        found.append((offset + lm.start("addr"), offset + lm.end(), addr))
                        break
            offset += len(line) + 1
        if not found:
            for pattern in _SENTENCES:
                for m in pattern.finditer(region):
                    found.append((m.start("addr"), m.end(), m.group("addr").lower()))
    found.sort()
    # One anchor per position: overlapping matches of several patterns keep the first.
    unique: list[tuple[int, int, str]] = []
    for anchor in found:
        if not unique or anchor[0] >= unique[-1][1]:
            unique.append(anchor)
    return unique


def _extract(
    sig: _CompiledSignature, report: str, own: frozenset[str], header_listed: list[str]
) -> list[tuple[str, str]]:
    region = _region(sig, report)
    anchors = [a for a in _anchors(sig, region) if not _is_own(a[2], own)]
    if not anchors and not header_listed:
        return []
    common = ""
    if sig.reason is not None:
        m = sig.reason.search(report)
        if m is not None:
            common = m.group("reason")
    reasons: dict[str, list[str]] = {}
    i = 0
    while i < len(anchors):
        addr = anchors[i][2]
        j = i + 1
        while j < len(anchors) and anchors[j][2] == addr:
            j += 1  # the same address again (RCPT TO:<a>, "<a>: Recipient address rejected")
        end = len(region)
        if j < len(anchors):  # the next address' line begins the next reason
            end = anchors[j][0]
            next_line = region.rfind("\n", 0, end) + 1
            if next_line >= anchors[i][1]:
                end = next_line
        line_start = region.rfind("\n", 0, anchors[i][0]) + 1
        label = region[line_start : anchors[i][0]].strip(" \t<'\"([")
        segment = region[anchors[i][1] : end][:MAX_REASON_CHARS]
        if label.endswith(":") and not label.lower().endswith("mailto:"):
            # "Unknown user: a@b", "Recipient address: a@b"
            segment = f"{label} {segment}"
        elif not _WORDS.search(segment):
            # Nothing after the address: some MTAs write the reason before it (ezweb).
            previous = anchors[i - 1][1] if i > 0 else 0
            segment = region[max(previous, line_start - MAX_REASON_CHARS // 2) : line_start]
        reasons.setdefault(addr, []).append(segment)
        i = j
    # X-Failed-Recipients, when present, says which of the addresses failed.
    addresses = header_listed or list(reasons)
    out: list[tuple[str, str]] = []
    for addr in addresses:
        reason = "\n".join(reasons[addr]) if addr in reasons else _reason_after(report, addr)
        out.append((addr, f"{common}\n{reason}" if common else reason))
    return out


def _reason_after(report: str, addr: str) -> str:
    """The text after the address' first mention in the report (for addresses found elsewhere)."""
    pos = report.lower().find(addr)
    if pos < 0:
        return ""
    return report[pos + len(addr) : pos + len(addr) + MAX_REASON_CHARS // 2]


# --- the reason -----------------------------------------------------------------------------

_ORIGINAL = re.compile(
    r"(?:expanded from|generated from|original (?:address|recipient)|alias)[:;]?[ \t]{0,5}"
    r"(?:rfc822;[ \t]*)?<?" + ADDR,
    re.IGNORECASE,
)
_ACTION_DELAYED = re.compile(r"^[ \t]*action:[ \t]*delayed\b", re.IGNORECASE | re.MULTILINE)
_WORDS = re.compile(r"[^\W\d_]{3}")
_LEADING_JUNK = re.compile(r"^[\s:;,.>)\]'\"-]+")


def _recipient(addr: str, reason: str, action: str) -> FailedRecipient:
    if _ACTION_DELAYED.search(reason[:MAX_REASON_CHARS]):
        action = "delayed"  # a broken DSN's own Action field
    code, status = find_reply(reason)
    if not status and action == "delayed":
        status = "4.0.0"
    original = _ORIGINAL.search(reason[:300])
    return FailedRecipient(
        address=addr,
        action=action,
        status=status,
        reply_code=code,
        diagnostic=_diagnostic(reason),
        original_recipient=None if original is None else original.group("addr").lower(),
        remote_mta=_remote_host(reason),
    )


def _diagnostic(reason: str) -> str:
    text = _LEADING_JUNK.sub("", " ".join(reason.split()))
    if len(text) <= MAX_DIAGNOSTIC_CHARS:
        return text
    m = _CODE.search(text) or _STATUS.search(text)
    start = 0 if m is None else max(0, m.start() - 100)
    return text[start : start + MAX_DIAGNOSTIC_CHARS]


def _remote_host(reason: str) -> str | None:
    for pattern in _REMOTE_HOST:
        m = pattern.search(reason)
        if m is not None:
            return m.group(1).strip("[]").rstrip(".").lower()
    return None
