"""What an action did, shown on the page it redirects to (post / redirect / get).

An action ends in a 303 to its list with a ``notice`` query argument: a code from the
section's fixed table of sentences and the values to fill in (counts, the address acted on,
the first bad lines of an import), signed with an HMAC keyed by the session's CSRF token. A
link made by anyone else (an attacker's "Imported 10,000 entries" or a crafted reason) fails
the signature and shows nothing; the session's own notices need no server-side state, so they
work whichever node serves the redirect. The values are plain text: the template escapes them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence

from attrs import frozen
from twisted.web.iweb import IRequest

from smartrelay.web.ui.context import UiSession, arg

__all__ = ["MAX_NOTICE", "Notice", "NoticeText", "notice_arg", "read_notice"]

#: The longest ``notice`` argument read (a URL stays well under browsers' limits).
MAX_NOTICE = 3000
#: The longest text value and the most list items kept in a notice.
MAX_VALUE = 200
MAX_ITEMS = 5

NoticeValue = str | int | Sequence[str]


@frozen
class NoticeText:
    """A sentence with ``{name}`` fields, and whether it reports a problem."""

    text: str
    problem: bool = False


@frozen
class Notice:
    text: str
    problem: bool
    #: Lines listed under the sentence (the ``lines`` value: bad lines of an import).
    lines: tuple[str, ...] = ()


def _sign(session: UiSession, payload: str) -> str:
    digest = hmac.new(session.csrf.encode(), b"notice:" + payload.encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


def _clip(value: NoticeValue) -> str | int | list[str]:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return value[:MAX_VALUE]
    return [str(item)[:MAX_VALUE] for item in list(value)[:MAX_ITEMS]]


def notice_arg(session: UiSession, code: str, **values: NoticeValue) -> str:
    """The ``notice`` argument for ``code`` with ``values`` (texts clipped, lists cut)."""
    data = json.dumps([code, {k: _clip(v) for k, v in values.items()}], separators=(",", ":"))
    payload = base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")
    return f"{payload}.{_sign(session, payload)}"


def read_notice(
    request: IRequest, session: UiSession, table: Mapping[str, NoticeText]
) -> Notice | None:
    """The notice of the request's ``notice`` argument, or None (none, forged, unknown code
    or fields)."""
    try:
        sent = arg(request, "notice", limit=MAX_NOTICE)
    except Exception:
        return None
    payload, _, signature = sent.partition(".")
    if not payload or not hmac.compare_digest(signature.encode(), _sign(session, payload).encode()):
        return None
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        code, values = json.loads(raw.decode())
        template = table[code]
        lines = tuple(str(line) for line in values.pop("lines", []))
        return Notice(template.text.format(**values), template.problem, lines)
    except (ValueError, TypeError, KeyError, IndexError, binascii.Error, AttributeError):
        return None
