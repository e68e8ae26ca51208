"""Content warnings, computed once per message at re-wrap (docs/deliverability.md).

Kinds (:data:`WARNING_KINDS`), at most one warning of each per message, with a short detail
(the first offender, how many more):

* ``no-dkim-key``: no ``[[dkim.keys]]`` key signs the From domain (its own or a parent's),
  or there is no single From address, so the copy goes unsigned.
* ``double-escaped-link``: an ``<a href>`` whose source holds ``&amp;amp;`` (escaped twice:
  the link opens with ``&amp;`` in its query).
* ``unfilled-placeholder``: a template placeholder left as it was in an href, the Subject,
  the visible text of an HTML part or a ``text/plain`` part. A placeholder is a whole one,
  opening and closing mark with at most 100 characters between, no markup and no line
  break: ``{{ x }}``, ``{% x %}`` (Jinja, Liquid, Handlebars, Mustache), ``*|X|*``
  (Mailchimp, no blank inside), ``%%X%%`` (Salesforce; ``%%`` followed by a letter, ``_``,
  ``[`` or ``=``). So CSS's ``}}`` (``@media{...{...}}``) and ``100%%`` do not count; nor
  does what is not visible: ``<style>``, ``<script>``, ``<title>``, comments, attributes
  other than href. An href is checked as written (entities decoded once) and
  percent-decoded (``%7B%7Bname%7D%7D``); a literal ``%`` in a URL is ``%25``, so a URL
  that is correctly encoded holds no ``%%``.
* ``no-text-alternative``: a ``text/html`` part with no ``text/plain`` alternative (no
  ``multipart/alternative`` above it holding a ``text/plain`` part).

The MIME structure comes from the tracking step's :class:`MimePlan` (cut once per message);
the HTML is scanned with regular expressions that never backtrack (each character is looked
at a bounded number of times), and only when a mark is in it at all: a 25 MB part with
100,000 links is checked in well under a second. Past :data:`MAX_TAGS` tags of interest
(anchors, comments, style/script/title) the rest of a part is not checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from email.header import decode_header, make_header
from urllib.parse import unquote

from attrs import frozen

from smartrelay.rewrap.dkim import from_field_domain
from smartrelay.rewrap.headers import field_name
from smartrelay.rewrap.html import href_value, unescape_attribute
from smartrelay.rewrap.mime import MimePlan

__all__ = [
    "MAX_TAGS",
    "WARNING_KINDS",
    "ContentWarning",
    "check_message",
    "find_placeholder",
    "scan_html",
]

NO_DKIM_KEY = "no-dkim-key"
DOUBLE_ESCAPED_LINK = "double-escaped-link"
UNFILLED_PLACEHOLDER = "unfilled-placeholder"
NO_TEXT_ALTERNATIVE = "no-text-alternative"
WARNING_KINDS = (NO_DKIM_KEY, DOUBLE_ESCAPED_LINK, UNFILLED_PLACEHOLDER, NO_TEXT_ALTERNATIVE)
#: A detail's length at most (characters).
DETAIL_LIMIT = 200
#: Anchors, comments and raw-text elements looked at per HTML part, at most.
MAX_TAGS = 200_000
#: Characters of an ``<a>`` tag read for its href (a longer tag is hostile or broken).
MAX_TAG_TEXT = 65_536

_PLACEHOLDER = re.compile(
    r"""
      \{\{[^{}<>\r\n]{0,100}?\}\}
    | \{%[^{}<>\r\n]{0,100}?%\}
    | \*\|[^|*<>\s]{1,100}?\|\*
    | %%[A-Za-z_\[=][^%<>\r\n]{0,100}?%%
    """,
    re.X,
)
_DOUBLE_ESCAPE = "&amp;amp;"
# The opening marks, as they are and percent-encoded (in a URL; either case of hex digits).
# Searched with ``in`` (a substring search is many times faster than a regex alternation):
# a placeholder's text may be cut by tags ("{{<b>name</b>}}"), so the HTML scan starts on
# any mark, and joins the visible text before it looks for whole placeholders.
_MARKS = ("{{", "{%", "*|", "%%")
_ENCODED_MARKS = tuple(
    variant
    for mark in ("%7B%7B", "%7B%25", "*%7C", "%2A%7C", "%25%25")
    for variant in dict.fromkeys((mark, mark.lower()))
)
# Any of them, or the double escape: whether the HTML needs a closer look at all. One regex
# over a part is a quarter faster than the eight or so substring searches it stands for.
_ANY_MARK = re.compile("|".join(map(re.escape, (_DOUBLE_ESCAPE, *_MARKS, *_ENCODED_MARKS))))
# What the scan stops at: a comment, an <a> start tag (its attributes, quoted values whole),
# or the start of an element whose content is not visible text.
_TOKEN = re.compile(
    r"""
      (?P<comment><!--)
    | (?P<anchor><a(?=[\t\n\f\r />])(?:[^>"']++|"[^"]*+"|'[^']*+')*+>?)
    | <(?P<raw>style|script|title|textarea|xmp)(?=[\t\n\f\r />])
    """,
    re.X | re.I,
)
_RAW_END = {
    name: re.compile(rf"</{name}(?=[\t\n\f\r />])", re.I)
    for name in ("style", "script", "title", "textarea", "xmp")
}
# Other tags, dropped from the visible text (so that "{{<b>name</b>}}" is seen whole).
_OTHER_TAG = re.compile(r"</?[a-zA-Z][^<>]*+>")


@frozen
class ContentWarning:
    kind: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "detail": self.detail}


@frozen
class HtmlFindings:
    """What :func:`scan_html` found in one HTML part (first offenders, counts)."""

    double_escaped: tuple[str, ...]  # hrefs (decoded once)
    placeholders: tuple[tuple[str, str], ...]  # (where, placeholder)


def find_placeholder(text: str) -> str | None:
    """The first placeholder left unfilled in ``text`` (module docstring's rule), or None."""
    if not any(mark in text for mark in _MARKS):
        return None
    match = _PLACEHOLDER.search(text)
    return None if match is None else match.group(0)


def scan_html(html: str) -> HtmlFindings:
    """Double-escaped hrefs and unfilled placeholders (in hrefs and in the visible text)."""
    if _ANY_MARK.search(html) is None:
        return HtmlFindings((), ())  # the usual case: one pass at C speed
    double = _DOUBLE_ESCAPE in html
    marks = any(mark in html for mark in _MARKS) or (
        ("%7" in html or "%2" in html) and any(mark in html for mark in _ENCODED_MARKS)
    )
    if not (double or marks):
        return HtmlFindings((), ())  # the usual case: two scans at C speed
    double_escaped: list[str] = []
    placeholders: list[tuple[str, str]] = []
    visible: list[str] = []
    position = 0
    tags = 0
    while tags < MAX_TAGS:
        token = _TOKEN.search(html, position)
        if token is None:
            break
        tags += 1
        visible.append(html[position : token.start()])
        if token.group("comment"):
            end = html.find("-->", token.end())
            position = len(html) if end < 0 else end + 3
            continue
        raw = token.group("raw")
        if raw is not None:
            end_tag = _RAW_END[raw.lower()].search(html, token.end())
            position = len(html) if end_tag is None else end_tag.end()
            continue
        position = token.end()
        value = href_value(token.group("anchor")[:MAX_TAG_TEXT])
        if value is None:
            continue
        url = unescape_attribute(value).strip("\t\n\f\r ")
        if double and _DOUBLE_ESCAPE in value:
            double_escaped.append(url)
        if marks:
            found = find_placeholder(url)
            if found is None and "%" in url:
                found = find_placeholder(unquote(url))
            if found is not None:
                placeholders.append(("link", f"{found} in {url}"))
    else:
        position = len(html)  # past MAX_TAGS: the rest is not checked
    if marks:
        visible.append(html[position:])
        text = _OTHER_TAG.sub("", "".join(visible))
        found = find_placeholder(text)
        if found is not None:
            placeholders.append(("text", found))
    return HtmlFindings(tuple(double_escaped), tuple(placeholders))


def check_message(
    fields: Sequence[bytes],
    plan: MimePlan | None,
    signs: Callable[[str | None], bool],
) -> tuple[ContentWarning, ...]:
    """The warnings of a message: its header fields (as the chain splits them), its MIME plan
    (None when the chain could not cut it: only the header checks then), and whether a key
    signs mail of a From domain (None: no single From address)."""
    warnings: list[ContentWarning] = []
    from_values = [f.partition(b":")[2] for f in fields if field_name(f) == b"from"]
    from_domain = author_domain_of(from_values)
    if not signs(from_domain):
        if from_domain is None:
            detail = "no single From address: the message is not signed"
        else:
            detail = f"no [[dkim.keys]] key signs mail from {from_domain}"
        warnings.append(ContentWarning(NO_DKIM_KEY, _bounded(detail)))

    double_escaped: list[str] = []
    placeholders: list[tuple[str, str]] = []
    subject = _subject(fields)
    if subject is not None:
        found = find_placeholder(subject)
        if found is not None:
            placeholders.append(("subject", found))
    if plan is not None:
        for part in plan.html_parts:
            findings = scan_html(part.text)
            double_escaped += findings.double_escaped
            placeholders += findings.placeholders
        for plain in plan.plain_parts:
            found = find_placeholder(plain.text())
            if found is not None:
                placeholders.append(("text", found))
    if double_escaped:
        warnings.append(
            ContentWarning(DOUBLE_ESCAPED_LINK, _first_of(double_escaped[0], len(double_escaped)))
        )
    if placeholders:
        where, what = placeholders[0]
        warnings.append(
            ContentWarning(UNFILLED_PLACEHOLDER, _first_of(f"{where}: {what}", len(placeholders)))
        )
    if plan is not None and plan.html_without_text:
        n = plan.html_without_text
        detail = "an HTML part" if n == 1 else f"{n} HTML parts"
        warnings.append(
            ContentWarning(NO_TEXT_ALTERNATIVE, f"{detail} without a text/plain alternative")
        )
    return tuple(warnings)


def author_domain_of(from_values: Sequence[bytes]) -> str | None:
    """The From domain as the DKIM signer reads it (one From field with an address)."""
    if len(from_values) != 1:
        return None
    return from_field_domain(from_values[0])


def _subject(fields: Sequence[bytes]) -> str | None:
    for field in fields:
        if field_name(field) == b"subject":
            raw = re.sub(rb"\r?\n", b"", field.partition(b":")[2]).strip()
            text = raw.decode("utf-8", "replace")
            if "=?" not in text:  # no encoded word: nothing to decode
                return text
            try:
                return str(make_header(decode_header(text)))
            except Exception:  # a malformed encoded word: the text as it is
                return text
    return None


def _first_of(first: str, count: int) -> str:
    more = f" (and {count - 1} more)" if count > 1 else ""
    return _bounded(first, DETAIL_LIMIT - len(more)) + more


def _bounded(text: str, limit: int = DETAIL_LIMIT) -> str:
    """One printable line of at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else " " for c in text[: limit * 2])
    return text if len(text) <= limit else text[: limit - 3] + "..."
