"""The suppression list (``/ui/suppressions``): search, add, remove, CSV import and export.

The CSV format, its parser and the address check are the CLI's
(:mod:`smartrelay.suppression_csv`). An import takes the good rows of a file and reports the
bad ones (the CLI refuses a file with any bad row: its user can fix and rerun it, a browser
user wants to know which rows did not go in); the file is at most :data:`MAX_IMPORT` bytes
(the web listener refuses a larger body before parsing it, smartrelay.web.service). The
export is written page by page as the client reads it, with the list's filters applied.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable

from klein import Klein
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from smartrelay.storage.store import SUPPRESSION_REASONS, Store, Suppression
from smartrelay.suppression_csv import (
    SUPPRESSION_COLUMNS,
    ParsedSuppressions,
    SuppressionFileError,
    check_address,
    export_row,
    parse_suppression_csv,
)
from smartrelay.units import parse_duration
from smartrelay.web.ui.context import UiContext, UiError, add_error_pages, arg, ui_session
from smartrelay.web.ui.notices import NoticeText, notice_arg, read_notice

__all__ = ["MAX_IMPORT", "PAGE", "Filters", "Suppressions"]

log = Logger()

InThread = Callable[[Callable[[], ParsedSuppressions]], Deferred[ParsedSuppressions]]

#: The largest CSV file imported from the UI (the CLI has no limit).
MAX_IMPORT = 5 * 1024 * 1024
#: Entries per page of the list, and per query of the export.
PAGE = 50
EXPORT_PAGE = 1000
#: The longest expiry of an entry added from the UI (longer: leave it empty, forever).
MAX_EXPIRY = 100 * 365 * 86400.0

NOTICES: dict[str, NoticeText] = {
    "added": NoticeText("{address} is suppressed ({reason})."),
    "removed": NoticeText("{address} was removed from the suppression list."),
    "not_found": NoticeText("{address} was not on the suppression list.", problem=True),
    "bad_address": NoticeText("Not added: {problem}.", problem=True),
    "bad_expiry": NoticeText("Not added: {problem}.", problem=True),
    "bad_reason": NoticeText("Not added: unknown reason.", problem=True),
    "bad_note": NoticeText("Not added: the note holds a NUL character.", problem=True),
    "imported": NoticeText("Imported: {added} added, {updated} updated, {refused} refused."),
    "import_failed": NoticeText("Nothing imported: {problem}.", problem=True),
    "no_file": NoticeText("Choose a CSV file to import.", problem=True),
    "too_big": NoticeText(
        "Nothing imported: the file is larger than {limit} MiB; split it.", problem=True
    ),
}


class Filters:
    """The list's filters from the query: ``q`` (an address, or ``@domain``), ``reason``,
    ``all`` (expired entries too)."""

    def __init__(self, request: IRequest) -> None:
        self.q = arg(request, "q", limit=320)
        self.reason = arg(request, "reason", limit=20)
        self.all = arg(request, "all", limit=1) == "1"
        if self.reason and self.reason not in SUPPRESSION_REASONS:
            raise UiError(400, f"No such reason {self.reason!r}.")
        if "\x00" in self.q:
            raise UiError(400, "The search cannot hold a NUL character.")
        self.address: str | None = None
        self.domain: str | None = None
        if self.q.startswith("@"):
            self.domain = self.q[1:].strip().lower() or None
        elif self.q:
            self.address = self.q.lower()

    def query(self) -> dict[str, str | None]:
        """The filters as query arguments (for links: the pager, the export)."""
        return {"q": self.q, "reason": self.reason, "all": "1" if self.all else None}


class Suppressions:
    app = Klein()
    add_error_pages(app)

    def __init__(self, ui: UiContext) -> None:
        self.ui = ui
        #: Runs the CSV parsing off the reactor thread (``ui.extra["in_thread"]``, the
        #: relay's thread pool): a 5 MiB file is a few seconds of CPU. Without it, inline.
        self._in_thread: InThread = ui.extra.get("in_thread") or _inline

    @app.route("/", methods=["GET"])
    def show(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "suppression list", lambda: self._show(request))

    @app.route("/add", methods=["POST"])
    def add(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "suppression add", lambda: self._add(request))

    @app.route("/remove", methods=["POST"])
    def remove(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "suppression remove", lambda: self._remove(request))

    @app.route("/import", methods=["POST"])
    def import_(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "suppression import", lambda: self._import(request))

    @app.route("/export", methods=["GET"])
    def export(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "suppression export", lambda: self._export(request))

    # -- handlers -----------------------------------------------------------------------
    async def _show(self, request: IRequest) -> bytes:
        filters = Filters(request)
        after = arg(request, "after", limit=320) or None
        store = await self.ui.store()
        page = await store.search_suppressions(
            filters.address, filters.domain, filters.reason or None, filters.all, after, PAGE
        )
        return self.ui.page(
            request,
            "ui/suppressions.html",
            title="Suppressions",
            section="suppressions",
            filters=filters,
            rows=page.rows,
            next_after=page.next_after,
            first_page=after is None,
            reasons=SUPPRESSION_REASONS,
            notice=read_notice(request, ui_session(request), NOTICES),
            now=self.ui.clock.seconds(),
            max_import_mib=MAX_IMPORT // (1024 * 1024),
        )

    def _back(self, request: IRequest, code: str, **values: str | int | list[str]) -> bytes:
        notice = notice_arg(ui_session(request), code, **values)
        return self.ui.redirect(request, self.ui.url("suppressions", notice=notice))

    async def _add(self, request: IRequest) -> bytes:
        reason = arg(request, "reason", "manual", limit=20) or "manual"
        note = arg(request, "note", limit=500)
        expires = arg(request, "expires", limit=40)
        try:
            address = check_address(arg(request, "address", limit=320))
        except ValueError as error:
            return self._back(request, "bad_address", problem=str(error))
        if reason not in SUPPRESSION_REASONS:
            return self._back(request, "bad_reason")
        if "\x00" in note:
            return self._back(request, "bad_note")
        expires_at = None
        if expires not in ("", "forever"):
            try:
                lasts = parse_duration(expires)
            except ValueError as error:
                return self._back(request, "bad_expiry", problem=f"expiry: {error}")
            if lasts > MAX_EXPIRY:
                return self._back(request, "bad_expiry", problem="expiry: at most 100 years")
            expires_at = self.ui.clock.seconds() + lasts
        store = await self.ui.store()
        await store.add_suppression(address, reason, expires_at, note)
        log.info(
            "web ui: {user} suppressed {address} ({reason})",
            user=ui_session(request).username,
            address=address.lower(),
            reason=reason,
        )
        return self._back(request, "added", address=address.lower(), reason=reason)

    async def _remove(self, request: IRequest) -> bytes:
        address = arg(request, "address", limit=320)
        store = await self.ui.store()
        if not address or not await store.remove_suppression(address):
            return self._back(request, "not_found", address=address.lower())
        log.info(
            "web ui: {user} removed {address} from the suppression list",
            user=ui_session(request).username,
            address=address.lower(),
        )
        return self._back(request, "removed", address=address.lower())

    async def _import(self, request: IRequest) -> bytes:
        args: dict[bytes, list[bytes]] = request.args or {}
        files = args.get(b"file") or []
        raw = files[0] if files else b""
        if not raw:
            return self._back(request, "no_file")
        if len(raw) > MAX_IMPORT:
            return self._back(request, "too_big", limit=MAX_IMPORT // (1024 * 1024))
        try:
            parsed = await self._in_thread(lambda: _parse_upload(raw))
        except UnicodeDecodeError:
            return self._back(request, "import_failed", problem="not UTF-8 text")
        except SuppressionFileError as error:
            return self._back(request, "import_failed", problem=str(error))
        store = await self.ui.store()
        counts = await store.import_suppressions(parsed.entries)
        bad = parsed.bad_lines
        log.info(
            "web ui: {user} imported suppressions: {added} added, {updated} updated,"
            " {refused} refused",
            user=ui_session(request).username,
            added=counts.added,
            updated=counts.updated,
            refused=len(bad),
        )
        return self._back(
            request,
            "imported",
            added=counts.added,
            updated=counts.updated,
            refused=len(bad),
            lines=[f"line {b.line}: {b.reason}" for b in bad[:5]],
        )

    async def _export(self, request: IRequest) -> bytes:
        filters = Filters(request)
        store = await self.ui.store()
        headers = request.responseHeaders
        headers.setRawHeaders(b"Content-Type", [b"text/csv; charset=utf-8"])
        headers.setRawHeaders(b"Content-Disposition", [b'attachment; filename="suppressions.csv"'])
        headers.setRawHeaders(b"X-Content-Type-Options", [b"nosniff"])
        headers.setRawHeaders(b"Cache-Control", [b"no-store"])
        pacer = _Pacer()
        request.registerProducer(pacer, True)  # type: ignore[attr-defined]
        finished: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addBoth(lambda _: pacer.stopProducing())
        try:
            request.write(_csv_lines([list(SUPPRESSION_COLUMNS)]))  # type: ignore[no-untyped-call]
            async for page in _pages(store, filters):
                if pacer.stopped:
                    break
                request.write(_csv_lines(export_row(e) for e in page))  # type: ignore[no-untyped-call]
                await pacer.ready()
        except Exception:
            # The headers are sent: a cut connection (no last chunk) tells the client.
            log.failure("web ui: the suppression export failed")
            request.channel.loseConnection()  # type: ignore[attr-defined]
        finally:
            request.unregisterProducer()  # type: ignore[attr-defined]
        return b""


def _parse_upload(raw: bytes) -> ParsedSuppressions:
    # utf-8-sig: spreadsheets save CSV with a byte-order mark.
    return parse_suppression_csv(io.StringIO(raw.decode("utf-8-sig"), newline=""))


def _inline(work: Callable[[], ParsedSuppressions]) -> Deferred[ParsedSuppressions]:
    try:
        return succeed(work())
    except Exception:
        return fail()


async def _pages(store: Store, filters: Filters) -> AsyncIterator[tuple[Suppression, ...]]:
    after: str | None = None
    while True:
        page = await store.search_suppressions(
            filters.address, filters.domain, filters.reason or None, filters.all, after, EXPORT_PAGE
        )
        yield page.rows
        if page.next_after is None:
            return
        after = page.next_after


def _csv_lines(rows: object) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)  # type: ignore[arg-type]
    return buffer.getvalue().encode("utf-8")


@implementer(IPushProducer)
class _Pacer:
    """Paces the export to its client: the transport pauses it when its buffer is full."""

    def __init__(self) -> None:
        self.stopped = False
        self._waiting: Deferred[None] | None = None
        self._paused = False

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._wake()

    def stopProducing(self) -> None:
        self.stopped = True
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    async def ready(self) -> None:
        """Return once the client takes more (or went away)."""
        while self._paused and not self.stopped:
            self._waiting = Deferred()
            await self._waiting
