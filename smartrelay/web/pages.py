"""The public HTML pages of the web listener: unsubscribe confirmation, its result, errors.

They are Jinja2 templates (:mod:`smartrelay.web.templating`) in ``smartrelay/web/templates/``,
extending ``page.html``; :meth:`Pages.load` compiles them at start-up and checks that each uses
exactly the names it is given, so a typo in a template is a one-line error then.
"""

from __future__ import annotations

from importlib.resources.abc import Traversable
from pathlib import Path

from attrs import frozen

from smartrelay.web.templating import TEMPLATES, TemplateError, Templates

__all__ = ["TEMPLATES", "Pages", "TemplateError"]

#: Each public template and the names it uses.
PUBLIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "page.html": (),
    "unsubscribe_confirm.html": ("address",),
    "unsubscribe_done.html": ("address",),
    "not_found.html": (),
    "method_not_allowed.html": (),
    "server_error.html": (),
}

_ERRORS = {404: "not_found.html", 405: "method_not_allowed.html", 500: "server_error.html"}


@frozen
class Pages:
    """The rendered pages; each method returns a whole HTML document, UTF-8 encoded."""

    templates: Templates

    @classmethod
    def load(cls, folder: Traversable | Path | None = None) -> Pages:
        """Compile and check every template in ``folder`` (default :data:`TEMPLATES`).
        Raises :class:`TemplateError`."""
        return cls(Templates.load(TEMPLATES if folder is None else folder, PUBLIC_TEMPLATES))

    def unsubscribe_confirm(self, address: str) -> bytes:
        """The "Stop sending email to ADDRESS?" page with its form (``address`` escaped)."""
        return self.templates.render("unsubscribe_confirm.html", address=address)

    def unsubscribe_done(self, address: str) -> bytes:
        """The "You are unsubscribed" page (``address`` escaped)."""
        return self.templates.render("unsubscribe_done.html", address=address)

    def error(self, code: int) -> bytes:
        """The page for 404, 405 or 500 (any other code gets the 500 page)."""
        return self.templates.render(_ERRORS.get(code, "server_error.html"))
