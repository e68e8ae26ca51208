"""The queue (``/ui/queue``): mail still to deliver, grouped by destination, with "Retry
now" and "Drop" per destination and per message.

A retry is what ``smartrelay-ctl queue retry`` does (waiting recipients due now; one being
delivered right now keeps its lease). A drop is ``queue drop``'s: the recipients become
``dropped`` with a ``dropped`` event each, and their ``last_reply`` names the operator
(``dropped by ui:USERNAME``). Dropping is final, so its buttons look dangerous and say how
much they drop; there is no confirmation dialog (no script), the form itself is the second
step.
"""

from __future__ import annotations

from urllib.parse import quote

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from smartrelay.web.ui.context import UiContext, UiError, add_error_pages, arg, ui_session
from smartrelay.web.ui.notices import NoticeText, notice_arg, read_notice

__all__ = ["DESTINATIONS", "PAGE", "Queue"]

log = Logger()

#: Destinations shown (the biggest first), and recipients per page of a destination.
DESTINATIONS = 200
PAGE = 50

NOTICES: dict[str, NoticeText] = {
    "retried": NoticeText("{count} recipient(s) to {domain} are due now."),
    "dropped": NoticeText("Dropped {count} recipient(s) to {domain}."),
    "nothing_waiting": NoticeText(
        "Nothing was waiting for {domain}: it was delivered or finished meanwhile, or is"
        " being delivered right now.",
        problem=True,
    ),
    "message_retried": NoticeText("{count} recipient(s) of message {queue_id} are due now."),
    "message_dropped": NoticeText("Dropped message {queue_id}: {count} recipient(s)."),
    "message_nothing": NoticeText(
        "Nothing of message {queue_id} was waiting: it was delivered or finished meanwhile,"
        " or is being delivered right now.",
        problem=True,
    ),
}


class Queue:
    app = Klein()
    add_error_pages(app)

    def __init__(self, ui: UiContext) -> None:
        self.ui = ui

    def destination_url(self, domain: str, **query: str | None) -> str:
        """The page of one destination (the domain quoted: it comes from a recipient)."""
        return self.ui.url(f"queue/{quote(domain, safe='')}", **query)

    @app.route("/", methods=["GET"])
    def show(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "queue", lambda: self._show(request))

    @app.route("/<path:domain>", methods=["GET"])
    def destination(self, request: IRequest, domain: str) -> Deferred[bytes]:
        return self.ui.serve(
            request, "queue destination", lambda: self._destination(request, domain)
        )

    @app.route("/retry", methods=["POST"])
    def retry(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "queue retry", lambda: self._retry(request))

    @app.route("/drop", methods=["POST"])
    def drop(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "queue drop", lambda: self._drop(request))

    @app.route("/message/retry", methods=["POST"])
    def retry_message(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "message retry", lambda: self._retry_message(request))

    @app.route("/message/drop", methods=["POST"])
    def drop_message(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "message drop", lambda: self._drop_message(request))

    # -- pages --------------------------------------------------------------------------
    async def _show(self, request: IRequest) -> bytes:
        store = await self.ui.store()
        groups = await store.deferred_by_destination(limit=DESTINATIONS)
        return self.ui.page(
            request,
            "ui/queue.html",
            title="Queue",
            section="queue",
            groups=groups,
            shown=DESTINATIONS,
            destination_url=self.destination_url,
            notice=read_notice(request, ui_session(request), NOTICES),
        )

    async def _destination(self, request: IRequest, domain: str) -> bytes:
        domain = _domain(domain)
        after = arg(request, "after", limit=300) or None
        store = await self.ui.store()
        try:
            page = await store.deferred_messages(domain, after, PAGE)
        except ValueError:
            raise UiError(
                400, "This page link is broken: start again from the first page."
            ) from None
        return self.ui.page(
            request,
            "ui/queue_destination.html",
            title=f"Queue to {domain}",
            section="queue",
            domain=domain,
            rows=page.rows,
            next_cursor=page.next_cursor,
            first_page=after is None,
            destination_url=self.destination_url,
            notice=read_notice(request, ui_session(request), NOTICES),
        )

    # -- actions ------------------------------------------------------------------------
    def _back(self, request: IRequest, to: str, code: str, **values: str | int) -> bytes:
        notice = notice_arg(ui_session(request), code, **values)
        if to:
            return self.ui.redirect(request, self.destination_url(to, notice=notice))
        return self.ui.redirect(request, self.ui.url("queue", notice=notice))

    async def _retry(self, request: IRequest) -> bytes:
        domain = _domain(arg(request, "domain", limit=255))
        store = await self.ui.store()
        count = await store.retry_destination(domain)
        user = ui_session(request).username
        log.info(
            "web ui: {user} retried {count} recipient(s) to {domain}",
            user=user,
            count=count,
            domain=domain,
        )
        if count == 0:
            return self._back(request, "", "nothing_waiting", domain=domain)
        return self._back(request, "", "retried", domain=domain, count=count)

    async def _drop(self, request: IRequest) -> bytes:
        domain = _domain(arg(request, "domain", limit=255))
        user = ui_session(request).username
        store = await self.ui.store()
        count = await store.drop_destination(domain, by=f"ui:{user}")
        log.info(
            "web ui: {user} dropped {count} recipient(s) to {domain}",
            user=user,
            count=count,
            domain=domain,
        )
        if count == 0:
            return self._back(request, "", "nothing_waiting", domain=domain)
        return self._back(request, "", "dropped", domain=domain, count=count)

    async def _retry_message(self, request: IRequest) -> bytes:
        queue_id = _queue_id(arg(request, "queue_id", limit=100))
        back = arg(request, "domain", limit=255)
        store = await self.ui.store()
        count = await store.retry_now(queue_id)
        user = ui_session(request).username
        log.info(
            "web ui: {user} retried {queue_id} ({count} recipient(s))",
            user=user,
            queue_id=queue_id,
            count=count,
        )
        if count == 0:
            return self._back(request, back, "message_nothing", queue_id=queue_id)
        return self._back(request, back, "message_retried", queue_id=queue_id, count=count)

    async def _drop_message(self, request: IRequest) -> bytes:
        queue_id = _queue_id(arg(request, "queue_id", limit=100))
        back = arg(request, "domain", limit=255)
        user = ui_session(request).username
        store = await self.ui.store()
        dropped = await store.drop_message(queue_id, by=f"ui:{user}")
        log.info(
            "web ui: {user} dropped {queue_id} ({count} recipient(s))",
            user=user,
            queue_id=queue_id,
            count=len(dropped),
        )
        if not dropped:
            return self._back(request, back, "message_nothing", queue_id=queue_id)
        return self._back(request, back, "message_dropped", queue_id=queue_id, count=len(dropped))


def _domain(text: str) -> str:
    domain = text.strip().lower()
    if not domain or len(domain) > 255 or "\x00" in domain:
        raise UiError(400, "Which destination? The form did not say.")
    return domain


def _queue_id(text: str) -> str:
    if not text or "\x00" in text:
        raise UiError(400, "Which message? The form did not say.")
    return text
