"""Feedback (``/ui/feedback``): recent bounces, complaints and other reports with their
diagnostics, filtered by kind and state, newest first (keyset pages).

"Reprocess" on an unmatched report is ``smartrelay-ctl feedback reprocess ID``: the same
:class:`~smartrelay.feedback.processor.FeedbackProcessor` call (``process(id, again=True)``),
with the relay's processor handed in as ``ui.extra["feedback_processor"]``
(:func:`~smartrelay.web.ui.build_reports_ui`). Without one the button is not shown.
"""

from __future__ import annotations

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from smartrelay.feedback.processor import FeedbackProcessor, UnknownReport
from smartrelay.storage.feedback import FEEDBACK_STATES
from smartrelay.web.ui.context import UiContext, UiError, add_error_pages, arg, ui_session
from smartrelay.web.ui.notices import NoticeText, notice_arg, read_notice

__all__ = ["KINDS", "PAGE", "Feedback"]

log = Logger()

#: What a report can be (feedback_reports.kind).
KINDS = ("bounce", "complaint", "unsubscribe", "autoreply", "other")
PAGE = 50

NOTICES: dict[str, NoticeText] = {
    "reprocessed": NoticeText("Report {report_id} reprocessed: {state}{reason}."),
    "unknown": NoticeText("There is no feedback report {report_id}.", problem=True),
    "unavailable": NoticeText(
        "Reprocessing needs the relay's feedback processor: use smartrelay-ctl feedback"
        " reprocess {report_id}.",
        problem=True,
    ),
}


class Feedback:
    app = Klein()
    add_error_pages(app)

    def __init__(self, ui: UiContext) -> None:
        self.ui = ui
        processor = ui.extra.get("feedback_processor")
        self.processor = processor if isinstance(processor, FeedbackProcessor) else None

    @app.route("/", methods=["GET"])
    def show(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "feedback list", lambda: self._show(request))

    @app.route("/reprocess", methods=["POST"])
    def reprocess(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "feedback reprocess", lambda: self._reprocess(request))

    async def _show(self, request: IRequest) -> bytes:
        kind = arg(request, "kind", limit=20)
        state = arg(request, "state", limit=20)
        after = arg(request, "after", limit=300) or None
        if kind and kind not in KINDS:
            raise UiError(400, f"No such kind {kind!r}: choose {', '.join(KINDS)}.")
        if state and state not in FEEDBACK_STATES:
            raise UiError(400, f"No such state {state!r}: choose {', '.join(FEEDBACK_STATES)}.")
        store = await self.ui.store()
        try:
            page = await store.recent_feedback(kind or None, state or None, after, PAGE)
        except ValueError:
            raise UiError(
                400, "This page link is broken: start again from the first page."
            ) from None
        return self.ui.page(
            request,
            "ui/feedback.html",
            title="Feedback",
            section="feedback",
            rows=page.rows,
            kind=kind,
            state=state,
            kinds=KINDS,
            states=FEEDBACK_STATES,
            next_cursor=page.next_cursor,
            first_page=after is None,
            can_reprocess=self.processor is not None,
            notice=read_notice(request, ui_session(request), NOTICES),
        )

    async def _reprocess(self, request: IRequest) -> bytes:
        report_id = arg(request, "report_id", limit=100)
        if not report_id:
            raise UiError(400, "Which report? The form did not say.")
        back = {"kind": arg(request, "kind", limit=20), "state": arg(request, "state", limit=20)}
        session = ui_session(request)
        if self.processor is None:
            code, values = "unavailable", {"report_id": report_id}
        else:
            try:
                outcome = await self.processor.process(report_id, again=True)
            except UnknownReport:
                code, values = "unknown", {"report_id": report_id}
            else:
                log.info(
                    "web ui: {user} reprocessed feedback {report_id}: {state}",
                    user=session.username,
                    report_id=report_id,
                    state=outcome.state,
                )
                reason = f" ({outcome.reason})" if outcome.reason else ""
                code = "reprocessed"
                values = {"report_id": report_id, "state": outcome.state, "reason": reason}
        notice = notice_arg(session, code, **values)
        return self.ui.redirect(
            request,
            self.ui.url(
                "feedback",
                kind=back["kind"] if back["kind"] in KINDS else None,
                state=back["state"] if back["state"] in FEEDBACK_STATES else None,
                notice=notice,
            ),
        )
