"""The queue (``/ui/queue``): mail still to deliver, grouped by destination, with "Retry
now" and "Drop" per destination and per message.

A retry is what ``smartrelay-ctl queue retry`` does (waiting recipients due now; one being
delivered right now keeps its lease). A drop is ``queue drop``'s: the recipients become
``dropped`` with a ``dropped`` event each, and their ``last_reply`` names the operator
(``dropped by ui:USERNAME``). Dropping is final, so its buttons look dangerous and say how
much they drop; there is no confirmation dialog (no script), the form itself is the second
step.

The destinations table's "Throttle" column shows the limits of adaptive throttles
(docs/delivery.md, "Adaptive throttles") that rate-limit replies have cut, as this node's
delivery processes report them; the "Adaptive throttles" card lists every cut throttle key.

The page's "Webhooks" card (docs/webhooks.md, "Operations") shows each webhook endpoint's status
and dead letters, with Enable / Disable per endpoint and Replay per dead letter, per endpoint
and for all: what ``smartrelay-ctl webhooks ...`` does. The relay's dispatcher acts on them
(it sends an enabled endpoint at once, and every dead letter whose replay was asked for).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import quote

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from smartrelay.config import Config
from smartrelay.metrics import AdaptiveGauges, LimitFigures
from smartrelay.storage.webhook_admin import DeadLetter
from smartrelay.web.ui.context import UiContext, UiError, add_error_pages, arg, ui_session
from smartrelay.web.ui.notices import NoticeText, notice_arg, read_notice

__all__ = ["DEAD_LETTERS", "DESTINATIONS", "PAGE", "Queue"]

log = Logger()

#: Destinations shown (the biggest first), and recipients per page of a destination.
DESTINATIONS = 200
PAGE = 50
#: Dead letters listed on the page at most (oldest first); ``webhooks dead list`` has all.
DEAD_LETTERS = 200

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
    "webhook_enabled": NoticeText(
        "Webhook endpoint {url} enabled: the relay sends to it again at once."
    ),
    "webhook_disabled": NoticeText(
        "Webhook endpoint {url} disabled: its events wait until it is enabled again."
    ),
    "webhook_unknown": NoticeText(
        "There is no webhook endpoint {url}: it is not in the config and was never sent to.",
        problem=True,
    ),
    "replay_one": NoticeText("Dead letter {id} is queued for replay: the relay sends it shortly."),
    "replay_many": NoticeText(
        "{count} dead letter(s) are queued for replay: the relay sends them shortly."
    ),
    "replay_gone": NoticeText(
        "There is no dead letter {id}: it was replayed or removed meanwhile.", problem=True
    ),
    "replay_nothing": NoticeText("There was no dead letter to replay.", problem=True),
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

    @app.route("/webhooks/enable", methods=["POST"])
    def enable_webhook(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "webhook enable", lambda: self._webhook_state(request, True))

    @app.route("/webhooks/disable", methods=["POST"])
    def disable_webhook(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(
            request, "webhook disable", lambda: self._webhook_state(request, False)
        )

    @app.route("/webhooks/replay", methods=["POST"])
    def replay(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "dead letter replay", lambda: self._replay(request))

    def throttle_limits(self) -> list[tuple[str, LimitFigures]]:
        """Every adaptive throttle key with its limits, by process (the cut ones first)."""
        limits = self.ui.extra.get("throttle_limits")
        return limits.all() if isinstance(limits, AdaptiveGauges) else []

    def configured_webhooks(self) -> dict[str, tuple[str, ...]]:
        """Each ``[[webhooks]]`` url of the relay's config and its event types."""
        config = self.ui.extra.get("config")
        if not isinstance(config, Config):
            return {}
        return {webhook.url: webhook.events for webhook in config.webhooks}

    # -- pages --------------------------------------------------------------------------
    async def _show(self, request: IRequest) -> bytes:
        store = await self.ui.store()
        groups = await store.deferred_by_destination(limit=DESTINATIONS)
        webhooks = await store.webhook_endpoints_status(self.configured_webhooks())
        dead_letters = await store.list_dead_letters(limit=DEAD_LETTERS)
        cut = [(process, f) for process, f in self.throttle_limits() if f.cut]
        return self.ui.page(
            request,
            "ui/queue.html",
            title="Queue",
            section="queue",
            groups=groups,
            shown=DESTINATIONS,
            destination_url=self.destination_url,
            webhooks=webhooks,
            dead_letters=_by_url(dead_letters),
            dead_shown=DEAD_LETTERS,
            dead_total=sum(w.dead_letters for w in webhooks),
            notice=read_notice(request, ui_session(request), NOTICES),
            cut_limits=cut,
            limits_of=_limits_by_domain(cut),
            limit_text=limit_text,
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

    async def _webhook_state(self, request: IRequest, enable: bool) -> bytes:
        url = _webhook_url(arg(request, "url", limit=MAX_URL))
        user = ui_session(request).username
        note = arg(request, "reason", limit=200)
        reason = f"by ui:{user}" + (f": {note}" if note else "")
        store = await self.ui.store()
        changed = await store.set_webhook_state(
            url,
            "active" if enable else "disabled",
            "" if enable else reason,
            create=url in self.configured_webhooks(),
        )
        if not changed:
            return self._back(request, "", "webhook_unknown", url=url)
        log.info(
            "web ui: {user} {what} webhook endpoint {url}",
            user=user,
            what="enabled" if enable else "disabled",
            url=url,
        )
        return self._back(request, "", "webhook_enabled" if enable else "webhook_disabled", url=url)

    async def _replay(self, request: IRequest) -> bytes:
        raw_id = arg(request, "id", limit=20)
        url = arg(request, "url", limit=MAX_URL) or None
        if url is not None:
            url = _webhook_url(url)
        dead_id = None
        if raw_id:
            if not raw_id.isdigit() or not 0 < int(raw_id) < 2**63:
                raise UiError(400, "Which dead letter? The form did not say.")
            dead_id = int(raw_id)
        elif arg(request, "all", limit=10) != "1":
            raise UiError(400, "Which dead letter? The form did not say.")
        store = await self.ui.store()
        ids = await store.request_replay_ids(dead_id, url)
        user = ui_session(request).username
        log.info(
            "web ui: {user} asked to replay {count} dead letter(s) {ids}",
            user=user,
            count=len(ids),
            ids=ids[:20],
        )
        if dead_id is not None:
            if not ids:
                return self._back(request, "", "replay_gone", id=dead_id)
            return self._back(request, "", "replay_one", id=dead_id)
        if not ids:
            return self._back(request, "", "replay_nothing")
        return self._back(request, "", "replay_many", count=len(ids))


#: The longest webhook url a form may name.
MAX_URL = 2000


def _by_url(dead: Sequence[DeadLetter]) -> Mapping[str, list[DeadLetter]]:
    grouped: dict[str, list[DeadLetter]] = {}
    for d in dead:
        grouped.setdefault(d.url, []).append(d)
    return grouped


def _webhook_url(text: str) -> str:
    if not text or "\x00" in text:
        raise UiError(400, "Which webhook endpoint? The form did not say.")
    return text


def _domain(text: str) -> str:
    domain = text.strip().lower()
    if not domain or len(domain) > 255 or "\x00" in domain:
        raise UiError(400, "Which destination? The form did not say.")
    return domain


def _queue_id(text: str) -> str:
    if not text or "\x00" in text:
        raise UiError(400, "Which message? The form did not say.")
    return text


def limit_text(figures: LimitFigures) -> str:
    """``2.5/s, 1 connection (of 100/s, 20)``."""
    return (
        f"{_rate(figures.rate)}, {figures.connections} connection"
        f"{'' if figures.connections == 1 else 's'}"
        f" (of {_rate(figures.ceiling_rate)}, {figures.ceiling_connections})"
    )


def _rate(per_second: float) -> str:
    if per_second >= 1:
        return f"{per_second:.3g}/s"
    return f"{per_second * 60:.3g}/min"


def _limits_by_domain(
    cut: Sequence[tuple[str, LimitFigures]],
) -> Mapping[str, list[tuple[str, LimitFigures]]]:
    by_domain: dict[str, list[tuple[str, LimitFigures]]] = {}
    for process, figures in cut:
        for domain in figures.domains:
            by_domain.setdefault(domain, []).append((process, figures))
    return by_domain
