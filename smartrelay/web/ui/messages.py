"""The Messages section (``/ui/messages``): search, a message's page with its timeline, and
the per-message actions "Retry now" and "Drop".

The search form's fields are GET arguments (a search is a link); results come from
:meth:`~smartrelay.storage.reports.ReportsStore.search_messages` by keyset (the "Older"
link carries the store's opaque cursor with the same filters). Every filter a user typed
wrong - an unknown outcome, a bad date, ``@`` alone, a tampered cursor - is a 400 page that
shows the form again with a sentence saying what to fix, never a 500.

Times typed in the form are UTC (a server-rendered page cannot know the viewer's zone; the
labels say so). ``until`` includes the whole day, minute or second it names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from attrs import frozen
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from smartrelay.config import Config
from smartrelay.events import SANDBOX_MX
from smartrelay.storage.reports import (
    RECIPIENT_STATES,
    MessageDetail,
    MessageFilters,
    TimelineEvent,
    decode_cursor,
)
from smartrelay.web.ui.context import UiContext, UiError, add_error_pages, arg, ui_session

__all__ = ["Messages", "SearchForm", "describe_event", "parse_time"]

log = Logger()

DEFAULT_PAGE = 50
MAX_PAGE = 200
#: Recipient states a message can still be retried or dropped in.
WAITING = ("queued", "deferred", "delivering")
#: A queue id typed in the form: longer is not a queue id.
MAX_QUEUE_ID = 100

#: The search fields and the longest value each may have.
_FIELD_LIMITS = {
    "queue_id": MAX_QUEUE_ID,
    "recipient": 400,
    "sender": 400,
    "tag": 400,
    "meta": 5000,
    "since": 40,
    "until": 40,
    "outcome": 40,
}

_TIME_FORMATS: tuple[tuple[str, float], ...] = (
    # (strptime format, the span ``until`` covers at that precision)
    ("%Y-%m-%d", 86400.0),
    ("%Y-%m-%d %H:%M", 60.0),
    ("%Y-%m-%d %H:%M:%S", 1.0),
)

#: Notices after an action (``?done=...`` on the redirect): fixed texts, so a link cannot
#: make the page say anything else.
NOTICES = {
    "retried": "Retry requested: its waiting recipients are due now.",
    "retry-none": "Nothing to retry: no recipient of this message is waiting for an attempt"
    " (a delivery in progress is left to finish).",
    "dropped": "Dropped: its waiting recipients will not be sent.",
    "drop-none": "Nothing to drop: no recipient of this message is waiting.",
}

#: What each content warning kind means (docs/deliverability.md); other kinds are shown as is.
WARNING_KINDS = {
    "no-dkim-key": "No DKIM key signs the From domain",
    "double-escaped-link": "A link holds a double-escaped &amp;amp;",
    "unfilled-placeholder": "A template placeholder was left unfilled",
    "no-text-alternative": "An HTML part has no text alternative",
}

_BOUNCE_SOURCES = {
    "smtp": "the receiving server's reply",
    "dsn": "a bounce message (DSN)",
}


def parse_time(text: str, field: str, end: bool = False) -> float:
    """``YYYY-MM-DD``, ``YYYY-MM-DD HH:MM[:SS]`` (or with ``T``; a trailing ``Z`` allowed), UTC,
    as seconds. With ``end``, the end of the day, minute or second named (exclusive). A bad
    value is a :class:`UiError` (400) that says how to write it."""
    cleaned = text.strip()
    for suffix in (" UTC", "Z"):
        cleaned = cleaned.removesuffix(suffix)
    cleaned = cleaned.replace("T", " ", 1).strip()
    for form, span in _TIME_FORMATS:
        try:
            moment = datetime.strptime(cleaned, form).replace(tzinfo=UTC)
        except ValueError:
            continue
        return moment.timestamp() + (span if end else 0.0)
    raise UiError(
        400,
        f"{field}: write a UTC date as 2026-12-05 or a date and time as 2026-12-05 14:30,"
        f" not {text!r}.",
    )


@frozen
class SearchForm:
    """The search as typed (shown back in the form and carried by the pager's links)."""

    queue_id: str = ""
    recipient: str = ""
    sender: str = ""
    tag: str = ""
    meta: str = ""
    since: str = ""
    until: str = ""
    outcome: str = ""
    limit: int = DEFAULT_PAGE

    @classmethod
    def of(cls, request: IRequest) -> tuple[SearchForm, str]:
        """The form as sent, and the first problem with it ("" when none): a field that is
        too long or not UTF-8 is left empty, so the page can show the others back."""
        problems: list[str] = []

        def field(name: str, limit: int) -> str:
            try:
                return arg(request, name, limit=limit)
            except UiError as error:
                problems.append(error.message)
                return ""

        values = {name: field(name, limit) for name, limit in _FIELD_LIMITS.items()}
        limit_text = field("limit", 10)
        try:
            limit = int(limit_text) if limit_text else DEFAULT_PAGE
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_PAGE:
            problems.append(f"limit: a number of rows from 1 to {MAX_PAGE}.")
            limit = DEFAULT_PAGE
        return cls(**values, limit=limit), (problems[0] if problems else "")

    @property
    def any(self) -> bool:
        """Whether any filter is set."""
        return any(value for name, value in self.query().items() if name != "limit")

    def query(self) -> dict[str, str | int | None]:
        """The form's GET arguments (empty ones left out by ``UiContext.url``)."""
        return {
            "queue_id": self.queue_id,
            "recipient": self.recipient,
            "sender": self.sender,
            "tag": self.tag,
            "meta": self.meta,
            "since": self.since,
            "until": self.until,
            "outcome": self.outcome,
            "limit": None if self.limit == DEFAULT_PAGE else self.limit,
        }

    def filters(self) -> MessageFilters:
        """The store's filters; a bad value is a :class:`UiError` (400)."""
        if any("\x00" in str(value) for value in self.query().values()):
            raise UiError(400, "A search value cannot hold a NUL character.")
        metadata = None
        if self.meta:
            key, equals, value = self.meta.partition("=")
            if not equals or not key.strip():
                raise UiError(400, "Metadata: write key=value, e.g. user=42.")
            metadata = (key.strip(), value.strip())
        if self.outcome and self.outcome not in RECIPIENT_STATES:
            raise UiError(400, f"Outcome: choose one of {', '.join(RECIPIENT_STATES)}.")
        since = parse_time(self.since, "From") if self.since else None
        until = parse_time(self.until, "To", end=True) if self.until else None
        if since is not None and until is not None and until <= since:
            raise UiError(400, "The time range ends before it starts.")
        return MessageFilters(
            queue_id=self.queue_id or None,
            recipient=self.recipient or None,
            sender=self.sender or None,
            tag=self.tag or None,
            metadata=metadata,
            since=since,
            until=until,
            outcome=self.outcome or None,
        )


@frozen
class Fact:
    """One labelled value of a timeline entry; ``kind``: how to show it."""

    label: str
    value: Any
    kind: str = "text"  # text, code (monospace, wraps), time, size, url


@frozen
class Entry:
    """A timeline event in words: a headline, its facts and, for ``warning``, its warnings."""

    event: TimelineEvent
    headline: str
    tone: str  # CSS class: the event type, or "other"
    facts: tuple[Fact, ...]
    warnings: tuple[tuple[str, str, str], ...] = ()  # (kind, meaning, detail)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    return json.dumps(value, ensure_ascii=False, default=str)


def _time_of(value: Any) -> float | None:
    """An RFC 3339 time (``next_attempt``) as seconds, None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = moment.timestamp()
    return seconds if math.isfinite(seconds) else None


def _who(machine: Any) -> str:
    return "a machine (proxy, prefetcher or scanner)" if machine is True else "a person"


def describe_event(event: TimelineEvent) -> Entry:
    """The meaning of ``event`` in words, with its data as labelled facts (a key this
    version does not know is shown too, under its own name)."""
    data: Mapping[str, Any] = event.data
    shown: set[str] = set()
    facts: list[Fact] = []

    def fact(key: str, label: str, kind: str = "text", value: Any = None) -> None:
        shown.add(key)
        if value is None:
            value = data.get(key)
        if value is None or value == "":
            return
        facts.append(Fact(label, value if kind in ("time", "size") else _text(value), kind))

    kind = event.type
    warnings: list[tuple[str, str, str]] = []
    if kind == "received":
        headline = "Received from the application"
        size = data.get("size")
        fact("size", "Size", "size" if type(size) is int else "text")
        fact("client_ip", "Client", "code")
        fact("credential", "Credential", "code")
    elif kind == "delivered":
        sandbox = data.get("sandbox") is True
        if not sandbox:
            headline = "Delivered: the receiving server accepted it"
        elif data.get("mx") == SANDBOX_MX:
            headline = "Sandbox: recorded as delivered, never sent (sandbox credential)"
        else:
            headline = "Sandbox: sent to the sandbox route, not to the recipient"
        fact("mx", "Server (MX)", "code")
        fact("reply", "Remote reply", "code")
        fact("tls", "TLS", value="yes" if data.get("tls") is True else "no, in clear text")
        fact("attempt", "Attempt")
        if sandbox:
            fact("sandbox", "Sandbox", value="yes: submitted with a sandbox credential")
        shown.add("sandbox")
    elif kind == "deferred":
        headline = "Deferred: the receiving server said try later"
        fact("mx", "Server (MX)", "code")
        fact("reply", "Remote reply", "code")
        fact("attempt", "Attempt")
        next_at = _time_of(data.get("next_attempt"))
        if next_at is not None:
            fact("next_attempt", "Next attempt", "time", next_at)
        else:
            fact("next_attempt", "Next attempt")
    elif kind == "bounced":
        hard = data.get("hard")
        headline = "Bounced" + (
            " (hard: will not be retried)" if hard is True else " (soft)" if hard is False else ""
        )
        fact("category", "Category", "code")
        fact("hard", "Hard or soft", value="hard" if hard is True else "soft")
        fact("status", "Status", "code")
        fact("reply", "Reply", "code")
        source = data.get("source")
        fact("source", "Reported by", value=_BOUNCE_SOURCES.get(str(source), source))
    elif kind == "expired":
        headline = "Expired: given up after retrying too long"
        fact("attempts", "Attempts")
    elif kind == "suppressed":
        headline = "Not sent: the address is on the suppression list"
        fact("reason", "Reason", "code")
    elif kind == "complained":
        headline = "Complaint: the recipient reported it as spam"
        fact("feedback_type", "Feedback type", "code")
        fact("source", "Reported by", "code")
    elif kind in ("opened", "clicked"):
        machine = data.get("machine")
        headline = ("Opened" if kind == "opened" else "Clicked a link") + f" by {_who(machine)}"
        if kind == "clicked":
            fact("url", "URL", "url")
        fact("machine", "Machine", value="yes" if machine is True else "no")
        fact("user_agent", "User agent", "code")
        fact("ip", "IP address", "code")
    elif kind == "unsubscribed":
        headline = "Unsubscribed"
        fact("method", "Method", "code")
    elif kind == "dropped":
        headline = "Dropped: it will not be sent"
        fact("by", "By", value=data.get("by") or "the operator")
    elif kind == "warning":
        headline = "Content warnings found at re-wrap"
        shown.add("warnings")
        listed = data.get("warnings")
        for item in listed if isinstance(listed, list) else [listed]:
            if isinstance(item, dict):
                name = _text(item.get("kind", ""))
                warnings.append(
                    (name, WARNING_KINDS.get(name, name), _text(item.get("detail", "")))
                )
            elif item is not None:
                warnings.append(("", "", _text(item)))
    else:
        headline = f"Event {kind}"
    for key in sorted(data):
        if key not in shown:
            fact(key, key, "code")
    tone = kind if kind in _TONES else "other"
    return Entry(event, headline, tone, tuple(facts), tuple(warnings))


_TONES = (
    "received",
    "delivered",
    "deferred",
    "bounced",
    "expired",
    "suppressed",
    "complained",
    "opened",
    "clicked",
    "unsubscribed",
    "dropped",
    "warning",
)


def listen_addresses(extra: Mapping[str, Any]) -> Sequence[str]:
    """The ``[smtp] listen`` endpoints of the config in ``ui.extra``, if there is one."""
    config = extra.get("config")
    if isinstance(config, Config):
        return tuple(config.smtp.listen)
    return ()


class Messages:
    app = Klein()
    add_error_pages(app)

    def __init__(self, ui: UiContext) -> None:
        self.ui = ui

    def link(self, queue_id: str, action: str = "", **query: str) -> str:
        """The page of message ``queue_id`` (or its ``action``: retry, drop)."""
        path = f"messages/{_path(queue_id)}" + (f"/{action}" if action else "")
        return self.ui.url(path, **query)

    # -- search -------------------------------------------------------------------------
    # strict_slashes=False: ``/ui/messages`` (no slash, as ``ui.url`` spells it) reaches this
    # route; werkzeug would otherwise answer it with a redirect (a 404 by add_error_pages).
    @app.route("/", methods=["GET"], strict_slashes=False)
    def search(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "message search", lambda: self._search(request))

    async def _search(self, request: IRequest) -> bytes:
        form, problem = SearchForm.of(request)
        if problem:
            return self._results(request, form, problem, code=400)
        try:
            filters = form.filters()
            # The store's own checks (a lone "@", a value too long, a NUL ...), before the
            # query, so that a ValueError from the query itself stays a logged 500.
            filters.terms()
            filters.checked_outcome()
        except UiError as error:
            return self._results(request, form, error.message, code=error.code)
        except ValueError as error:
            return self._results(request, form, _sentence(str(error)), code=400)
        try:
            after = arg(request, "after", limit=400) or None
            if after is not None:
                decode_cursor(after, (int, str))
        except (UiError, ValueError):
            return self._results(
                request,
                form,
                "This page link is damaged or out of date.",
                code=400,
                start_again=True,
            )
        store = await self.ui.store()
        page = await store.search_messages(filters, after, form.limit)
        return self._results(
            request,
            form,
            "",
            rows=page.rows,
            older=None
            if page.next_cursor is None
            else self.ui.url("messages", **form.query(), after=page.next_cursor),
            paged=after is not None,
        )

    def _results(
        self,
        request: IRequest,
        form: SearchForm,
        problem: str,
        code: int = 200,
        rows: Sequence[Any] = (),
        older: str | None = None,
        paged: bool = False,
        start_again: bool = False,
    ) -> bytes:
        return self.ui.page(
            request,
            "ui/messages.html",
            code=code,
            title="Messages",
            section="messages",
            form=form,
            outcomes=RECIPIENT_STATES,
            problem=problem,
            rows=rows,
            searched=not problem,
            older=older,
            newest=self.ui.url("messages", **form.query()) if paged or start_again else None,
            start_again=start_again,
            listen=listen_addresses(self.ui.extra),
            link=self.link,
        )

    # -- one message --------------------------------------------------------------------
    @app.route("/<string:queue_id>", methods=["GET"])
    def show(self, request: IRequest, queue_id: str) -> Deferred[bytes]:
        return self.ui.serve(request, "message page", lambda: self._show(request, queue_id))

    @app.route("/<string:queue_id>/retry", methods=["POST"])
    def retry(self, request: IRequest, queue_id: str) -> Deferred[bytes]:
        return self.ui.serve(request, "message retry", lambda: self._retry(request, queue_id))

    @app.route("/<string:queue_id>/drop", methods=["POST"])
    def drop(self, request: IRequest, queue_id: str) -> Deferred[bytes]:
        return self.ui.serve(request, "message drop", lambda: self._drop(request, queue_id))

    async def _detail(self, queue_id: str) -> MessageDetail:
        if len(queue_id) > MAX_QUEUE_ID or "\x00" in queue_id:
            raise UiError(404, "There is no message with this queue id.")
        store = await self.ui.store()
        detail = await store.message_detail(queue_id)
        if detail is None:
            raise UiError(
                404,
                f"There is no message with the queue id {queue_id!r}: it was never"
                " received here, or retention has deleted it.",
            )
        return detail

    async def _show(self, request: IRequest, queue_id: str) -> bytes:
        detail = await self._detail(queue_id)
        done = arg(request, "done", limit=40)
        entries = [describe_event(e) for e in detail.timeline]
        return self.ui.page(
            request,
            "ui/message.html",
            title=f"Message {queue_id}",
            section="messages",
            m=detail,
            entries=entries,
            waiting=any(r.state in WAITING for r in detail.recipients),
            notice=NOTICES.get(done, ""),
            warnings=[w for entry in entries for w in entry.warnings],
            link=self.link,
        )

    async def _retry(self, request: IRequest, queue_id: str) -> bytes:
        await self._detail(queue_id)
        store = await self.ui.store()
        changed = await store.retry_now(queue_id)
        user = ui_session(request).username
        log.info("web ui: {user} retried {queue_id} ({n} recipients)", user=user,
                 queue_id=queue_id, n=changed)  # fmt: skip
        done = "retried" if changed else "retry-none"
        return self.ui.redirect(request, self.link(queue_id, done=done))

    async def _drop(self, request: IRequest, queue_id: str) -> bytes:
        await self._detail(queue_id)
        store = await self.ui.store()
        user = ui_session(request).username
        dropped = await store.drop_message(queue_id, by=f"ui:{user}")
        log.info("web ui: {user} dropped {queue_id} ({n} recipients)", user=user,
                 queue_id=queue_id, n=len(dropped))  # fmt: skip
        done = "dropped" if dropped else "drop-none"
        return self.ui.redirect(request, self.link(queue_id, done=done))


def _path(queue_id: str) -> str:
    """A queue id as one URL path segment."""
    return quote(queue_id, safe="")


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."
