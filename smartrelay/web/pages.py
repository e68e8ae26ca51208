"""The HTML pages of the web listener, from the template files in ``smartrelay/web/templates/``.

The templates are read once, when the web app is built at start-up (:meth:`Pages.load`), and
checked then: a missing or broken template is a :class:`TemplateError` (one line), never a
failure at request time. They are :class:`string.Template` texts: ``page.html`` is the shell
(``$title``, ``$content``), the others are the ``<main>`` contents of one page each (one final
newline of a file is not part of its text). Every value put into a template is escaped here
with :func:`html.escape` (quotes included); the template text itself is used as written.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from importlib.resources import files
from importlib.resources.abc import Traversable
from string import Template

from attrs import frozen

__all__ = ["TEMPLATES", "Pages", "TemplateError"]

#: The folder holding the template files (shipped as package data).
TEMPLATES: Traversable = files("smartrelay.web").joinpath("templates")

#: Each template file and the placeholders it must use.
_FIELDS: dict[str, tuple[str, ...]] = {
    "page.html": ("title", "content"),
    "unsubscribe_confirm.html": ("address",),
    "unsubscribe_done.html": ("address",),
    "not_found.html": (),
    "method_not_allowed.html": (),
    "server_error.html": (),
}


class TemplateError(Exception):
    """A template file is missing or does not fit its placeholders; ``str()`` is one line."""


def _read(folder: Traversable, name: str) -> Template:
    try:
        text = folder.joinpath(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TemplateError(f"cannot read the web template {name}: {error}") from error
    if name != "page.html":
        text = text.removesuffix("\n")
    template = Template(text)
    wanted = set(_FIELDS[name])
    try:
        used = set(template.get_identifiers())
        template.substitute(dict.fromkeys(wanted, ""))
    except (KeyError, ValueError) as error:
        raise TemplateError(f"web template {name}: bad placeholder ({error})") from error
    if used != wanted:
        missing = ", ".join(sorted(wanted - used)) or "none"
        raise TemplateError(f"web template {name}: must use ${{{missing}}} (and only those)")
    return template


@frozen
class Pages:
    """The rendered pages; each method returns a whole HTML document, UTF-8 encoded."""

    page: Template
    confirm: Template
    done: Template
    errors: Mapping[int, tuple[str, str]]

    @classmethod
    def load(cls, folder: Traversable | None = None) -> Pages:
        """Read and check every template in ``folder`` (default :data:`TEMPLATES`).
        Raises :class:`TemplateError`."""
        where = TEMPLATES if folder is None else folder
        read = {name: _read(where, name) for name in _FIELDS}

        def text(name: str) -> str:
            return read[name].substitute()

        return cls(
            page=read["page.html"],
            confirm=read["unsubscribe_confirm.html"],
            done=read["unsubscribe_done.html"],
            errors={
                404: ("Not found", text("not_found.html")),
                405: ("Method not allowed", text("method_not_allowed.html")),
                500: ("Something went wrong", text("server_error.html")),
            },
        )

    def render(self, title: str, content: str) -> bytes:
        """The shell around ``content`` (HTML, used as is) titled ``title`` (escaped)."""
        return self.page.substitute(title=html.escape(title), content=content).encode("utf-8")

    def unsubscribe_confirm(self, address: str) -> bytes:
        """The "Stop sending email to ADDRESS?" page with its form (``address`` escaped)."""
        content = self.confirm.substitute(address=html.escape(address))
        return self.render("Unsubscribe", content)

    def unsubscribe_done(self, address: str) -> bytes:
        """The "You are unsubscribed" page (``address`` escaped)."""
        return self.render("Unsubscribed", self.done.substitute(address=html.escape(address)))

    def error(self, code: int) -> bytes:
        """The page for 404, 405 or 500 (any other code gets the 500 page)."""
        title, content = self.errors.get(code, self.errors[500])
        return self.render(title, content)
