"""Volume alerts in the reports UI (docs/smtp.md, "Volume alerts"): the dashboard shows the
held credentials and the last day's alerts in a card on top (dashboard.py reads them); this
section takes the card's Release button (``POST /ui/alerts/release``), as
``smartrelay-ctl smtp-credential release NAME`` does, and redirects back to the dashboard
with a notice."""

from __future__ import annotations

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from smartrelay.smtp.volume_watch import VolumeWatch
from smartrelay.web.ui.context import UiContext, add_error_pages, arg, ui_session
from smartrelay.web.ui.notices import NoticeText, notice_arg

__all__ = ["NOTICES", "RECENT_ALERTS", "Alerts"]

log = Logger()

#: The dashboard's card lists at most this many alerts of the last 24 hours.
RECENT_ALERTS = 20

NOTICES: dict[str, NoticeText] = {
    "released": NoticeText(
        "SMTP credential {credential} released: its mail is accepted again"
        " (within seconds on every node)."
    ),
    "not_held": NoticeText("SMTP credential {credential} is not held.", problem=True),
    "unknown": NoticeText("There is no SMTP credential {credential}.", problem=True),
}


class Alerts:
    app = Klein()
    add_error_pages(app)

    def __init__(self, ui: UiContext, volume: VolumeWatch | None = None) -> None:
        self.ui = ui
        #: This process's volume watch: told at once of a release made here.
        self.volume = volume

    @app.route("/release", methods=["POST"])
    def release(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "release credential", lambda: self._release(request))

    async def _release(self, request: IRequest) -> bytes:
        name = arg(request, "credential", limit=200)
        store = await self.ui.store()
        result = await store.release_credential(name) if name else "unknown"
        if result == "released":
            log.info(
                "web ui: {user} released SMTP credential {credential!r}",
                user=ui_session(request).username,
                credential=name,
            )
            if self.volume is not None:
                await self.volume.refresh_held()
        code = {"released": "released", "not-held": "not_held"}.get(result, "unknown")
        notice = notice_arg(ui_session(request), code, credential=name)
        return self.ui.redirect(request, self.ui.url("", notice=notice))
