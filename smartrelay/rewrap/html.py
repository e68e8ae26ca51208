"""Click tracking and the open pixel on an HTML document, changing nothing else (SPEC 3 and 4).

The document is tokenized with :class:`html.parser.HTMLParser`, which reports where each tag
starts and gives its raw text; the new href values and the pixel are spliced into the original
string at those offsets. Nothing is re-serialised, so comments (Outlook's ``<!--[if mso]>``
included), scripts, styles, entities, whitespace, attribute order and broken markup come out
exactly as they went in.

Links are the hrefs of ``<a>``, ``<area>`` (image maps) and VML elements (``<v:roundrect>``,
``<v:rect>``, any ``v:*``: Outlook's bulletproof buttons), in the document and inside
downlevel-hidden conditional comments (``<!--[if mso]> ... <![endif]-->``), which Outlook
renders as HTML while every other client sees a comment. The inside of such a comment is read
by :func:`_conditional_links`, a forward-only scanner (linear time on any input).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import suppress
from html import unescape
from html.entities import html5
from html.parser import (  # type: ignore[attr-defined]
    HTMLParser,
    attrfind_tolerant,
    locatestarttagend_tolerant,
)
from operator import itemgetter
from typing import NamedTuple

from attrs import frozen

__all__ = [
    "NOTRACK_ATTRIBUTE",
    "HtmlRewrite",
    "href_value",
    "pixel_tag",
    "rewrite_html",
    "unescape_attribute",
]

NOTRACK_ATTRIBUTE = "data-smartrelay-notrack"
#: The attributes of a link start tag that tracking reads or changes.
_ANCHOR_ATTRIBUTES = frozenset({"href", NOTRACK_ATTRIBUTE})
_HREF = frozenset({"href"})

# Attribute syntax of the HTML standard's tokenizer (what mail clients and browsers do); only
# used inside the raw text of a start tag that HTMLParser has already delimited.
_HTML_SPACE = "\t\n\f\r "
_TAG_NAME = re.compile(r"<[a-zA-Z][^\t\n\f\r />\x00]*(?:[\t\n\f\r ]|/(?!>))*")
_ATTRIBUTE = re.compile(
    r"""
    (?<=['"\t\n\f\r /])(?P<name>[^\t\n\f\r />][^\t\n\f\r /=>]*)
    (?P<assign>[\t\n\f\r ]*=[\t\n\f\r ]*
      (?P<value>'[^']*'|"[^"]*"|(?!['"])[^>\t\n\f\r ]*)
    )?
    (?:[\t\n\f\r ]|/(?!>))*
    """,
    re.VERBOSE,
)
# html.parser raises on ``<![name`` when name is not one of these (an AssertionError from
# _markupbase); the standard makes any such thing a bogus comment, and so do we.
_MARKED_SECTION = re.compile(r"<!\[([a-zA-Z][-_.a-zA-Z0-9]*)")
_MARKED_SECTION_NAMES = frozenset(
    {"temp", "cdata", "ignore", "include", "rcdata", "if", "else", "endif"}
)

# The opening of a downlevel-hidden conditional comment, as the comment's data starts.
_CONDITIONAL_OPENING = r"\[if(?=[\t\n\f\r (!])[^\]>]{0,200}\]>"
_CONDITIONAL = re.compile(_CONDITIONAL_OPENING, re.IGNORECASE)
# Inside one: a start tag's name, or a (nested) comment opening, conditional or not.
_INNER = re.compile(
    rf"<(?:(?P<name>[a-zA-Z][^\t\n\f\r />\x00]*)|!--(?P<conditional>{_CONDITIONAL_OPENING})?)",
    re.IGNORECASE,
)
_START_TAG_OPEN = re.compile(r"<[a-zA-Z]")
# A run of what the scanner only steps over, in one match: text, end tags other than
# "</body" (html.parser ends them at the first ">"), and start tags that are neither links nor
# script/style, delimited by html.parser's own pattern and ended by ">" or "/>" right after
# it (the atomic group keeps the pattern's first match, as html.parser's ``.match`` does).
# Anything else (another ending, "<!", "<?", "</body", a link) stops the run, and the loop
# hands it to html.parser's method for it.
# Most tags of real mail are plain (an ASCII name; ASCII whitespace, then a name alone or
# with a quoted value, for each attribute): the first branch takes those, ending where
# html.parser's pattern would, a quarter faster; any other form fails it and goes to the
# second (tests/test_rewrap_html.py compares the scanner with a full html.parser parse).
_UNREMARKABLE = re.compile(
    r"""(?:
      [^<]+
      | </(?![bB][oO][dD][yY])[a-zA-Z][^>]*>
      | (?!<(?:(?i:a|area|script|style)(?:[\t\n\r\f />\x00]|\Z)|[vV]:[^\t\n\r\f />\x00]))
        (?:
          <[a-zA-Z][a-zA-Z0-9]*+
          (?:[\t\n\r\f ]++[a-zA-Z_:][-a-zA-Z0-9_:.]*+(?:="[^"]*+"|='[^']*+')?+)*+
          [\t\n\r\f ]*+/?>
        | (?>"""
    + locatestarttagend_tolerant.pattern
    + r""")/?>
        )
    )*+""",
    re.VERBOSE,
)
# html.parser's tag name rule (its ``tagfind_tolerant``), for start tags it delimits.
_TAG_NAME_TOLERANT = re.compile(r"([a-zA-Z][^\t\n\r\f />\x00]*)(?:\s|/(?!>))*")
# A start tag of the plainest form: ASCII names, values in quotes right after "=", ASCII
# whitespace between attributes. html.parser delimits it at its ">" (its pattern and its
# attribute loop both take every attribute, what is left is ">" or "/>"), so a link tag of
# this form needs neither.
_PLAIN_ATTRIBUTE = r"""[\t\n\f\r ]+[a-zA-Z_:][-a-zA-Z0-9_:.]*(?:="[^"]*"|='[^']*')?"""
_PLAIN_START_TAG = re.compile(
    rf"""<[a-zA-Z][-a-zA-Z0-9:]*
    (?:{_PLAIN_ATTRIBUTE})*
    [\t\n\f\r ]*/?>""",
    re.VERBOSE,
)
# The same form, its first href attribute (in any case) and that one's quoted value in groups.
_PLAIN_HREF_ATTRIBUTES = rf"""
    (?:(?![\t\n\f\r ]+[hH][rR][eE][fF][=\t\n\f\r />]){_PLAIN_ATTRIBUTE})*
    [\t\n\f\r ]+(?P<href>[hH][rR][eE][fF](?:=(?P<value>"[^"]*"|'[^']*'))?)
    (?:{_PLAIN_ATTRIBUTE})*
    [\t\n\f\r ]*/?>"""
_PLAIN_HREF_TAG = re.compile(r"<[a-zA-Z][-a-zA-Z0-9:]*" + _PLAIN_HREF_ATTRIBUTES, re.VERBOSE)
# The same, only for the names of link tags (_is_link_tag's): a, area, v:* (any case).
_PLAIN_LINK_TAG = re.compile(
    r"<(?:[aA](?:[rR][eE][aA])?|[vV]:[-a-zA-Z0-9:]+)" + _PLAIN_HREF_ATTRIBUTES, re.VERBOSE
)
_TAG_STOP = re.compile(r"[>=]")
_VALUE_START = re.compile(r"[\t\n\f\r ]*(?:(?P<quote>['\"])|[^\t\n\f\r >]*)")
# Elements whose content is text, not markup, up to their end tag.
_RAW_TEXT_END = {
    name: re.compile(rf"</{name}(?=[\t\n\f\r />])", re.IGNORECASE)
    for name in (
        "script",
        "style",
        "title",
        "textarea",
        "xmp",
        "iframe",
        "noembed",
        "noframes",
    )
}

# Office's downlevel-revealed conditionals, "<![if !mso]>" ... "<![endif]>": read by html.parser
# as marked sections when closed by "]>" (the name and expression bounded).
_OFFICE_SECTION_NAMES = frozenset({"if", "else", "endif"})
_OFFICE_SECTION = re.compile(r"<!\[[a-zA-Z]+(?:[\t\n\f\r ][^\]>]{0,1000})?\][\t\n\f\r ]*>")

_TRACKED_SCHEMES = ("http://", "https://")
_PLACEHOLDER_MARKS = ("{{", "}}", "{%", "%}", "*|", "|*", "[[", "]]", "<%")
_PLACEHOLDER = re.compile("|".join(re.escape(mark) for mark in _PLACEHOLDER_MARKS))
# Every mark holds one of these (a charset is searched faster than the alternation).
_PLACEHOLDER_CHARACTER = re.compile(r"[{}*|\[\]<]")
# A character reference as html.unescape finds them.
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
# Characters that cannot stay literal in an unquoted attribute value.
_UNQUOTED_UNSAFE = re.compile(r"[&\t\n\f\r \"'=<>`]")


@frozen
class HtmlRewrite:
    html: str  # the new document
    links: tuple[str, ...]  # original URLs that were rewritten, in order


class _Attribute(NamedTuple):
    """One attribute of a start tag; offsets are into the tag's raw text. A tuple, made for
    every link (attrs' frozen classes cost ~1 us more to make; on the hot path it is made by
    ``tuple.__new__``, a third of what the named tuple's own ``__new__`` costs)."""

    name: str  # lower case
    start: int  # the name's first character
    end: int  # just after the value (after the name when there is no value)
    value_start: int  # the value's characters, quotes excluded
    value_end: int
    quote: str  # '"', "'" or "" (unquoted)
    has_value: bool


#: A replacement of ``text[start:end]``: (start, end, new text). A plain tuple, made for every
#: link (a named tuple costs ten times more to make).
_Edit = tuple[int, int, str]


def rewrite_html(
    html: str, rewrite_url: Callable[[str], str] | None, pixel_url: str | None
) -> HtmlRewrite:
    """Rewrite the http(s) links of ``<a href>``, ``<area href>`` and VML ``<v:* href>`` (also
    inside Outlook's conditional comments) with ``rewrite_url`` and add the open pixel
    ``pixel_url`` before the last ``</body>``; ``None`` turns either off. The
    ``data-smartrelay-notrack`` attribute is removed in every case (SPEC section 3).

    ``rewrite_url`` receives each URL as a mail client would open it (entities decoded once,
    surrounding whitespace dropped); what it returns is written back escaped for the attribute.
    """
    scanner = _Scanner()
    scanner.scan(html)
    edits: list[_Edit] = []
    links: list[str] = []
    hrefs = scanner.plain_hrefs
    # The anchors' offsets are into the scanner's text, a prefix of ``html``.
    if not scanner.conditionals:  # the usual case: the anchors, in document order
        for offset, tag_text in scanner.anchors:
            _rewrite_anchor(tag_text, offset, rewrite_url, False, hrefs.get(offset), edits, links)
    else:
        # offset, raw text, inside a comment, its href if the scanner read it
        tags: list[tuple[int, str, bool, _Attribute | None]] = [
            (offset, tag_text, False, hrefs.get(offset)) for offset, tag_text in scanner.anchors
        ]
        for offset, data in scanner.conditionals:
            if html.startswith("<!--", offset) and html.startswith(data, offset + 4):
                tags.extend(
                    (offset + 4 + start, text, True, None)
                    for start, text in _conditional_links(data)
                )
        tags.sort(key=lambda tag: tag[0])  # document order, for ``links``
        for offset, tag_text, in_comment, href in tags:
            _rewrite_anchor(tag_text, offset, rewrite_url, in_comment, href, edits, links)
    if pixel_url is not None:
        where = len(html)
        for offset in reversed(scanner.body_ends):
            if html.startswith("</", offset):
                where = offset
                break
        edits.append((where, where, pixel_tag(pixel_url)))
    return HtmlRewrite(html=_splice(html, edits), links=tuple(links))


def pixel_tag(pixel_url: str) -> str:
    """The ``<img>`` of the open pixel, as :func:`rewrite_html` inserts it."""
    src = _escape_attribute(pixel_url, '"')
    return (
        f'<img src="{src}" width="1" height="1" alt="" '
        'style="display:block;width:1px;height:1px;border:0" />'
    )


class _Scanner(HTMLParser):
    """Collects where link start tags (``<a>``, ``<area>``, ``<v:*>``, with their raw text),
    downlevel-hidden conditional comments (with their data) and ``</body>`` end tags are.

    The document is tokenized whole, by html.parser's loop less its text handling
    (:meth:`goahead`), so the offsets given to the ``parse_*`` methods are offsets into the
    document: they are recorded as the tags are met, with no line and column bookkeeping.
    Runs of text, of end tags other than ``</body>`` and of start tags that are neither links
    nor ``<script>``/``<style>`` are stepped over by one regex (:data:`_UNREMARKABLE`, built on
    html.parser's own start-tag pattern), their attributes never parsed; a link start tag is
    delimited as html.parser delimits it, its attributes read later.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[tuple[int, str]] = []
        #: The first href of the anchors of the plainest form (:data:`_PLAIN_HREF_TAG`), by
        #: the anchor's offset, offsets in the tag as :func:`_plain_href` gives them.
        self.plain_hrefs: dict[int, _Attribute] = {}
        self.conditionals: list[tuple[int, str]] = []
        self.body_ends: list[int] = []
        self._at = 0  # where the construct being parsed starts
        self._failed_text: str | None = None
        self._failed_from: dict[str, int] = {}

    def scan(self, html: str) -> None:
        # Only up to the last ">": whatever this scanner records ends with one, and past it
        # html.parser would search the rest for a ">" at every unterminated "<!--" or "<![",
        # quadratic time. goahead(1) is what feed() then close() do, in one pass.
        self.rawdata = html[: html.rfind(">") + 1]
        with suppress(Exception):  # what was found before still has exact offsets
            self.goahead(True)

    def goahead(self, end: bool) -> None:
        """html.parser's tokenizer loop, as it runs on a whole document
        (``convert_charrefs=True``, ``end`` true), less what only reports text: the text
        between tags is neither unescaped nor passed on (nothing here reads it). The
        constructs are found and delimited by the same ``parse_*`` methods, in the same order,
        but for a link tag of the plainest form (:data:`_PLAIN_LINK_TAG`), which the loop
        takes itself as :meth:`parse_starttag` would (one regex, no method calls: most links
        are such); tests/test_rewrap_html.py checks the result against a full html.parser
        parse."""
        rawdata = self.rawdata
        position = 0
        size = len(rawdata)
        anchors, plain_hrefs = self.anchors, self.plain_hrefs
        while position < size:
            if self.cdata_elem is None:
                skipped = _UNREMARKABLE.match(rawdata, position)
                assert skipped is not None  # it matches the empty string
                position = skipped.end()
                if position >= size:
                    break  # the rest is text and tags nothing here looks at
                link = _PLAIN_LINK_TAG.match(rawdata, position)
                if link is not None:  # the usual link: delimited where html.parser would
                    tag_end = link.end()
                    anchors.append((position, rawdata[position:tag_end]))
                    plain_hrefs[position] = _href_of(link, position)
                    position = tag_end
                    continue
            else:  # inside <script> or <style>: up to its end tag
                match = self.interesting.search(rawdata, position)
                if match is None:
                    break
                position = match.start()
            if _START_TAG_OPEN.match(rawdata, position):
                parsed = self.parse_starttag(position)
            elif rawdata.startswith("</", position):
                parsed = self.parse_endtag(position)
            elif rawdata.startswith("<!--", position):
                parsed = self.parse_comment(position)
            elif rawdata.startswith("<?", position):
                parsed = self.parse_pi(position)
            elif rawdata.startswith("<!", position):
                parsed = self.parse_html_declaration(position)
            elif position + 1 < size:
                parsed = position + 1  # a "<" that is text
            else:
                break
            if parsed < 0:  # not closed: as html.parser does at the end, text up to a ">"
                parsed = rawdata.find(">", position + 1)
                if parsed < 0:
                    parsed = rawdata.find("<", position + 1)
                    if parsed < 0:
                        parsed = position + 1
                else:
                    parsed += 1
            position = parsed

    def parse_starttag(self, i: int) -> int:
        name = _TAG_NAME_TOLERANT.match(self.rawdata, i + 1)
        if name is None or not _is_link_tag(name.group(1).lower()):
            # script/style (their content is text), and the tags the loop's regex could not
            # step over (not ended by ">" or "/>"): html.parser's own way, reporting nothing
            return super().parse_starttag(i)
        rawdata = self.rawdata
        # A link of the plainest form with an href never comes here: goahead takes it, one
        # regex (_PLAIN_LINK_TAG) both delimiting it (where _PLAIN_START_TAG would: the first
        # ">" outside a quoted value) and finding the href, kept for rewrite_html. Without
        # an href, it is delimited and read alike by html.parser.
        plain = _PLAIN_START_TAG.match(rawdata, i)
        if plain is not None:
            end = plain.end()
            self.anchors.append((i, rawdata[i:end]))
            return end
        end = self.check_for_whole_start_tag(i)
        if end < 0:
            return end
        # A tag, as html.parser decides: what follows its attributes is ">" or "/>" (else the
        # whole is text). The attributes are read later, by _iter_attributes.
        position = name.end()
        while position < end:
            attribute = attrfind_tolerant.match(rawdata, position)
            if attribute is None:
                break
            position = attribute.end()
        if rawdata[position:end].strip() in (">", "/>"):
            self.anchors.append((i, rawdata[i:end]))
        return end

    def parse_endtag(self, i: int) -> int:
        self._at = i  # for handle_endtag ("</body": the loop's regex steps over the others)
        return super().parse_endtag(i)

    def handle_comment(self, data: str) -> None:
        if _CONDITIONAL.match(data):
            self.conditionals.append((self._at, data))

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.body_ends.append(self._at)

    def parse_html_declaration(self, i: int) -> int:
        rawdata = self.rawdata
        if rawdata.startswith("<![", i) and len(rawdata) > i + 3:
            match = _MARKED_SECTION.match(rawdata, i)
            name = match.group(1).lower() if match is not None else ""
            if (
                match is None
                or (name not in _MARKED_SECTION_NAMES and match.end() < len(rawdata))
                or (name in _OFFICE_SECTION_NAMES and not _OFFICE_SECTION.match(rawdata, i))
            ):
                # also Office's "<![endif]" not closed by "]>": the "<![endif]-->" that ends a
                # nested conditional comment, which html.parser would run on to the next "]>"
                return self.parse_bogus_comment(i)
        return super().parse_html_declaration(i)

    # Searches to the end of the text that found nothing are remembered, so that a document
    # of many unterminated comments ("<!--" or nested "<!--[if mso]>" repeated) or marked
    # sections is read in linear time: html.parser, at close(), makes the unterminated one
    # text and tries again at the next "<", searching to the end each time.

    def parse_comment(self, i: int, report: bool = True) -> int:
        self._at = i
        return self._unless_known_to_fail(
            "-->", i + 4, lambda: super(_Scanner, self).parse_comment(i, report)
        )

    def parse_marked_section(self, i: int, report: bool = True) -> int:
        name = _MARKED_SECTION.match(self.rawdata, i)
        office = name is not None and name.group(1).lower() in _OFFICE_SECTION_NAMES
        return self._unless_known_to_fail(  # Office's end with "]>", the others with "]]>"
            "]>" if office else "]]>",
            i + 3,
            lambda: super(_Scanner, self).parse_marked_section(i, report),
        )

    def parse_bogus_comment(self, i: int, report: bool = True) -> int:
        self._at = i
        return self._unless_known_to_fail(
            ">", i + 2, lambda: super(_Scanner, self).parse_bogus_comment(i, report)
        )

    def _unless_known_to_fail(self, end: str, start: int, parse: Callable[[], int]) -> int:
        """``parse()``, or -1 when a search for ``end`` in the same text from ``start`` or
        before found nothing (the text is fed once: what is not there later never will be)."""
        if self._failed_text is not self.rawdata:
            self._failed_text = self.rawdata
            self._failed_from = {}
        if start >= self._failed_from.get(end, len(self.rawdata) + 1):
            return -1
        result = parse()
        if result < 0:
            self._failed_from[end] = min(start, self._failed_from.get(end, start))
        return result


def _is_link_tag(name: str) -> bool:
    """Whether an href on a start tag of this (lower-case) name is a link a reader clicks."""
    return name in ("a", "area") or (name.startswith("v:") and len(name) > 2)


def _conditional_links(data: str) -> Iterator[tuple[int, str]]:
    """The link start tags (offset in ``data``, raw text) inside the data of a downlevel-hidden
    conditional comment (what is between ``<!--`` and ``-->``).

    Read as Outlook reads it, as HTML: nested conditional openings (``<!--[if gte mso 9]>``)
    are skipped over, a plain nested comment, the content of ``<style>`` and the like, and a
    tag whose quoted value never closes hide the rest. Every step moves forward, so the time is
    linear in ``data`` whatever it holds.
    """
    opening = _CONDITIONAL.match(data)
    if opening is None:
        return
    position = opening.end()
    while True:
        found = _INNER.search(data, position)
        if found is None:
            return
        name = found.group("name")
        if name is None:  # "<!--"
            if found.group("conditional") is not None:
                position = found.end()
                continue
            close = data.find("-->", found.end())
            if close < 0:
                return
            position = close + 3
            continue
        end = _start_tag_end(data, found.end())
        if end < 0:
            return
        name = name.lower()
        if _is_link_tag(name):
            yield found.start(), data[found.start() : end]
        position = end
        raw_text_end = _RAW_TEXT_END.get(name)
        if raw_text_end is not None:
            close_tag = raw_text_end.search(data, position)
            if close_tag is None:
                return
            position = close_tag.start()


def _start_tag_end(text: str, position: int) -> int:
    """Just after the ``>`` that ends the start tag whose attributes begin at ``position``;
    -1 when it does not end (a quoted value left open runs to the end, as in HTML)."""
    while True:
        stop = _TAG_STOP.search(text, position)
        if stop is None:
            return -1
        if stop.group() == ">":
            return stop.end()
        value = _VALUE_START.match(text, stop.end())
        assert value is not None  # the pattern matches the empty string
        quote = value.group("quote")
        if quote is None:
            position = value.end()
            continue
        close = text.find(quote, value.end())
        if close < 0:
            return -1
        position = close + 1


def _attributes(tag_text: str, names: frozenset[str] | None = None) -> list[_Attribute]:
    """The start tag's attributes, in order; only those named in ``names`` when given."""
    return list(_iter_attributes(tag_text, names))


def _iter_attributes(tag_text: str, names: frozenset[str] | None = None) -> Iterator[_Attribute]:
    match = _TAG_NAME.match(tag_text)
    if match is None:
        return
    position = match.end()
    while position < len(tag_text):
        attribute = _ATTRIBUTE.match(tag_text, position)
        if attribute is None or attribute.end() == position:
            break
        position = attribute.end()
        name = attribute.group("name").lower()
        if names is not None and name not in names:
            continue
        name_start, name_end = attribute.span("name")
        if attribute.group("assign") is None:
            yield _Attribute(
                name=name,
                start=name_start,
                end=name_end,
                value_start=name_end,
                value_end=name_end,
                quote="",
                has_value=False,
            )
        else:
            value_start, value_end = attribute.span("value")
            quote = tag_text[value_start] if value_start < value_end else ""
            if quote not in ("'", '"'):
                quote = ""
            yield _Attribute(
                name=name,
                start=name_start,
                end=value_end,
                value_start=value_start + len(quote),
                value_end=value_end - len(quote),
                quote=quote,
                has_value=True,
            )


def href_value(tag_text: str) -> str | None:
    """The raw value (quotes removed, entities not decoded) of the first ``href`` of a start
    tag's text, read as :func:`rewrite_html` reads it; None without one."""
    for attribute in _iter_attributes(tag_text):  # up to the first href only
        if attribute.name == "href":
            if not attribute.has_value:
                return None
            return tag_text[attribute.value_start : attribute.value_end]
    return None


def _rewrite_anchor(
    tag_text: str,
    offset: int,
    rewrite_url: Callable[[str], str] | None,
    in_comment: bool,
    plain_href: _Attribute | None,
    edits: list[_Edit],
    links: list[str],
) -> None:
    """The edits for one link start tag at ``offset`` in the document, appended to ``edits``,
    and the link it tracks to ``links``. In a comment, a ``>`` of the new value is written
    ``&gt;`` (``-->`` would end it). ``plain_href``: :func:`_plain_href` of the tag, when the
    caller has it."""
    if NOTRACK_ATTRIBUTE in tag_text.lower():
        attributes = _attributes(tag_text, _ANCHOR_ATTRIBUTES)
        notrack = [a for a in attributes if a.name == NOTRACK_ATTRIBUTE]
        if notrack:
            for attribute in notrack:
                start, end, text = _remove_attribute(tag_text, attribute)
                edits.append((offset + start, offset + end, text))
            return
        if rewrite_url is None:
            return
        href = next((a for a in attributes if a.name == "href"), None)
    elif rewrite_url is None:
        return
    else:  # the usual case: the attributes after the (first) href are not read
        href = plain_href or _plain_href(tag_text) or next(_iter_attributes(tag_text, _HREF), None)
    if href is None or not href.has_value:
        return
    raw = tag_text[href.value_start : href.value_end]
    url = unescape_attribute(raw).strip(_HTML_SPACE)
    if not _trackable(raw, url):
        return
    new_url = rewrite_url(url)
    if new_url == url:
        return  # nothing to change: keep the source text exactly as written
    new_value = _escape_attribute(new_url, href.quote)
    if in_comment:
        new_value = new_value.replace(">", "&gt;")
    if not href.quote and not new_value:
        new_value = '""'
    edits.append((offset + href.value_start, offset + href.value_end, new_value))
    links.append(url)


def _plain_href(tag_text: str) -> _Attribute | None:
    """The first href of a start tag of :data:`_PLAIN_START_TAG`'s form, as
    :func:`_iter_attributes` reads it, by one regex; None for another tag, or one without."""
    match = _PLAIN_HREF_TAG.fullmatch(tag_text)
    return None if match is None else _href_of(match, 0)


def _href_of(match: re.Match[str], tag_start: int) -> _Attribute:
    """The href of a :data:`_PLAIN_HREF_TAG` match of a tag starting at ``tag_start``."""
    start, end = match.span("href")
    value_start, value_end = match.span("value")
    start, end = start - tag_start, end - tag_start
    if value_start < 0:
        return tuple.__new__(_Attribute, ("href", start, end, end, end, "", False))
    quote = match.string[value_start]
    value_start, value_end = value_start - tag_start, value_end - tag_start
    return tuple.__new__(
        _Attribute, ("href", start, value_end, value_start + 1, value_end - 1, quote, True)
    )


def unescape_attribute(value: str) -> str:
    """Decode the character references of an attribute value once, as a browser does.

    Like :func:`html.unescape`, except for the standard's rule for attributes: a named
    reference without its ``;`` followed by ``=`` or a letter or digit stays as written, so
    ``?a=1&region=eu`` keeps ``&region`` (``html.unescape`` would make it ``®ion``).
    """
    if "&" not in value:
        return value
    if value.count("&") == value.count("&amp;"):  # the usual query string: one kind only
        return value.replace("&amp;", "&")
    return _CHARREF.sub(_attribute_charref, value)


def _attribute_charref(match: re.Match[str]) -> str:
    name = match.group(1)
    if name[0] == "#":
        return unescape(match.group(0))
    if name in html5:  # what html.unescape gives for the whole name
        return html5[name]
    for length in range(min(len(name) - 1, 32), 1, -1):
        if name[:length] in html5:  # a legacy name, without its ";"
            after = name[length]
            if after == "=" or (after.isascii() and after.isalnum()):
                return match.group(0)
            return html5[name[:length]] + name[length:]
    return match.group(0)


def _trackable(raw: str, url: str) -> bool:
    """Whether a link (its raw value, its URL) is tracked: http(s), and no placeholder mark in
    either (a template's link left unfilled)."""
    if not url[:8].lower().startswith(_TRACKED_SCHEMES):  # not the whole URL lowered
        return False
    if _PLACEHOLDER_CHARACTER.search(raw) is None and (
        url is raw or _PLACEHOLDER_CHARACTER.search(url) is None
    ):
        return True  # the usual link: no character a placeholder mark holds
    return _PLACEHOLDER.search(raw) is None and _PLACEHOLDER.search(url) is None


def _remove_attribute(tag_text: str, attribute: _Attribute) -> _Edit:
    """Drop the attribute (and its value) with one whitespace next to it, before if any."""
    start, end = attribute.start, attribute.end
    if start > 0 and tag_text[start - 1] in _HTML_SPACE:
        start -= 1
    elif end < len(tag_text) and tag_text[end] in _HTML_SPACE:
        end += 1
    return start, end, ""


def _escape_attribute(value: str, quote: str) -> str:
    if quote == '"':
        return value.replace("&", "&amp;").replace('"', "&quot;")
    if quote == "'":
        return value.replace("&", "&amp;").replace("'", "&#39;")
    return _UNQUOTED_UNSAFE.sub(
        lambda m: "&amp;" if m.group() == "&" else f"&#{ord(m.group())};", value
    )


_POSITION = itemgetter(0, 1)


def _splice(text: str, edits: list[_Edit]) -> str:
    if not edits:
        return text
    pieces: list[str] = []
    position = 0
    for start, end, new_text in sorted(edits, key=_POSITION):
        if start < position:
            continue  # overlapping edits cannot come from distinct tags; be safe anyway
        pieces.append(text[position:start])
        pieces.append(new_text)
        position = end
    pieces.append(text[position:])
    return "".join(pieces)
