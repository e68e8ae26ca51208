"""The web listener's HTML templates: Jinja2, autoescaped, read and compiled once at start-up.

Every page of the web listener (the unsubscribe and error pages of the tracking endpoints and
every page of the reports UI) is a Jinja2 template in ``smartrelay/web/templates/``, rendered
with autoescaping on: a value put into a page is HTML-escaped unless it is a
:class:`markupsafe.Markup` built by code that escaped its parts (the SVG charts, the
:func:`when` filter). A name a template uses but the page does not pass is an error
(``StrictUndefined``), not an empty string.

:meth:`Templates.load` compiles every template when the web app is built, so a missing or
broken template is a one-line :class:`TemplateError` at start-up, never a failure at request
time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    meta,
)
from jinja2 import (
    TemplateError as JinjaError,
)
from markupsafe import Markup

__all__ = ["TEMPLATES", "TemplateError", "Templates", "number", "percent", "size", "when"]

#: The folder holding the template files (shipped as package data).
TEMPLATES: Traversable = files("smartrelay.web").joinpath("templates")


class TemplateError(Exception):
    """A template is missing, does not compile or uses names it is not given; one line."""


def number(value: float | int | None) -> str:
    """``1234567`` -> ``1,234,567``; a float keeps one decimal; None -> an en dash."""
    if value is None:
        return "\u2013"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def percent(part: float | int, whole: float | int) -> str:
    """``part`` of ``whole`` as ``12.3%`` (``0.04%`` below 0.1); an en dash when ``whole`` is 0."""
    if not whole:
        return "\u2013"
    share = 100 * part / whole
    if 0 < share < 0.1:
        return f"{share:.2f}%"
    return f"{share:.1f}%"


def size(value: int | None) -> str:
    """Bytes as ``980 B``, ``12.3 KB``, ``4.5 MB``."""
    if value is None:
        return "\u2013"
    amount = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if amount < 1000 or unit == "GB":
            return f"{int(amount)} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    raise AssertionError("unreachable")


def when(seconds: float | None) -> Markup:
    """A ``<time>`` element: the UTC time as text and in ``title`` (hover), ISO 8601 in
    ``datetime``; the UI's script rewrites the text in the viewer's time zone and keeps the
    UTC time on hover."""
    if seconds is None or not math.isfinite(seconds):
        return Markup("\u2013")
    moment = datetime.fromtimestamp(seconds, UTC)
    iso = moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    shown = moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(iso, shown, shown)


def _environment(folder: Traversable | Path) -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(folder)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    env.filters.update(number=number, percent=percent, size=size, when=when)
    return env


class Templates:
    """The compiled templates of one folder; :meth:`render` returns UTF-8 bytes."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    @classmethod
    def load(
        cls,
        folder: Traversable | Path | None = None,
        names: Mapping[str, Iterable[str]] | None = None,
    ) -> Templates:
        """Compile every template in ``folder`` (default :data:`TEMPLATES`). ``names`` maps a
        template that must exist to the only names it may use from its page (each of them
        is also required); raises :class:`TemplateError`."""
        env = _environment(TEMPLATES if folder is None else folder)
        for name in env.list_templates(extensions=["html", "svg", "txt"]):
            try:
                env.get_template(name)
            except JinjaError as error:
                raise TemplateError(f"web template {name}: {_one_line(error)}") from error
        for name, allowed in (names or {}).items():
            try:
                assert env.loader is not None
                source = env.loader.get_source(env, name)[0]
                used = meta.find_undeclared_variables(env.parse(source))
            except JinjaError as error:
                problem = _one_line(error)
                raise TemplateError(f"cannot read the web template {name}: {problem}") from error
            allowed = set(allowed)
            if used != allowed:
                wanted = ", ".join(sorted(allowed)) or "none"
                raise TemplateError(
                    f"web template {name}: must use the names {wanted} (and only those)"
                )
        return cls(env)

    def render(self, name: str, **context: Any) -> bytes:
        return self.environment.get_template(name).render(**context).encode("utf-8")


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    line = getattr(error, "lineno", None)
    return f"line {line}: {text}" if line else text
