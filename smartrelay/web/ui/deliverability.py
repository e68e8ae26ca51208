"""The deliverability page (``/ui/deliverability``): docs/deliverability.md.

The sender domains of the last 30 days (from the roll-ups) with their DKIM and return-path
alignment, the content warnings counted in the same days, and for one domain
(``?domain=example.com``, linkable) the DNS records to publish, ready to copy, with whether
they are published. The DNS checks run only for that one domain, within their budget (about
2 s), and their answers are cached: the list never waits for DNS.
"""

from __future__ import annotations

import re

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from smartrelay.deliverability import (
    SEEN_DAYS,
    CheckedRecord,
    DeliverabilitySettings,
    DnsChecker,
    DomainPlan,
    domain_plan,
    sender_domains,
)
from smartrelay.rewrap.content_checks import WARNING_KINDS
from smartrelay.web.ui.context import UiContext, UiError, add_error_pages, arg

__all__ = ["WARNING_TEXTS", "Deliverability"]

DAY = 86400.0
#: Domains listed at most (the most active first).
MAX_LISTED = 200
#: What each content warning means, for the page.
WARNING_TEXTS = {
    "no-dkim-key": "From domain without a [[dkim.keys]] key: the mail goes unsigned",
    "double-escaped-link": "a link escaped twice (&amp;amp;): it opens with a broken query",
    "unfilled-placeholder": "a template placeholder left unfilled ({{ }}, *| |*, %% %%)",
    "no-text-alternative": "an HTML part without a text/plain alternative",
}
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_STATUS_TEXT = {
    "published": "published",
    "missing": "not published",
    "wrong": "published, but not as expected",
    "unknown": "could not check",
}


def domain_argument(text: str) -> str:
    """The ``domain`` query argument as a lower-case A-label domain, or a 400."""
    domain = text.strip().rstrip(".").lower()
    try:
        domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        raise UiError(400, "This is not a domain name.") from None
    if len(domain) > 253 or not _DOMAIN.fullmatch(domain):
        raise UiError(400, "This is not a domain name (e.g. example.com).")
    return domain


class Deliverability:
    app = Klein()
    add_error_pages(app)

    def __init__(
        self, ui: UiContext, settings: DeliverabilitySettings, checker: DnsChecker | None
    ) -> None:
        """``checker`` None: DNS is not queried (every record "could not check")."""
        self.ui = ui
        self.settings = settings
        self.checker = checker

    @app.route("/", methods=["GET"], strict_slashes=False)
    def show(self, request: IRequest) -> Deferred[bytes]:
        return self.ui.serve(request, "deliverability", lambda: self._show(request))

    async def _show(self, request: IRequest) -> bytes:
        wanted = arg(request, "domain", limit=300)
        domain = domain_argument(wanted) if wanted.strip() else ""
        now = self.ui.clock.seconds()
        since = now - now % 3600 - SEEN_DAYS * DAY
        store = await self.ui.store()
        seen = await sender_domains(store, now)
        rows = [(domain_plan(name, self.settings), count) for name, count in seen[:MAX_LISTED]]
        totals = await store.rollup_totals(since, now + 3600)
        warnings = [
            (kind, WARNING_TEXTS[kind], totals.get(("warning", kind), (0, 0))[0])
            for kind in WARNING_KINDS
        ]
        plan = checked = None
        domain_warnings: list[tuple[str, str, int]] = []
        if domain:
            plan = domain_plan(domain, self.settings)
            checked = await self._check(plan)
            by_domain = await store.rollup_totals(since, now + 3600, sender_domain=domain)
            domain_warnings = [
                (kind, WARNING_TEXTS[kind], by_domain.get(("warning", kind), (0, 0))[0])
                for kind in WARNING_KINDS
            ]
        return self.ui.page(
            request,
            "ui/deliverability.html",
            title=f"Deliverability: {domain}" if domain else "Deliverability",
            section="deliverability",
            settings=self.settings,
            days=SEEN_DAYS,
            rows=rows,
            more=max(0, len(seen) - MAX_LISTED),
            warnings=warnings,
            domain=domain,
            plan=plan,
            checked=checked,
            domain_warnings=domain_warnings,
            status_text=_STATUS_TEXT,
        )

    async def _check(self, plan: DomainPlan) -> tuple[CheckedRecord, ...]:
        if self.checker is None:
            return tuple(
                CheckedRecord(r, "unknown", "could not check: DNS is not queried here")
                for r in plan.records
            )
        return await self.checker.check(plan)
