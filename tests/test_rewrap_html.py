"""Click rewriting and the open pixel on HTML (SPEC 3 and 4): only hrefs and the pixel change."""

from __future__ import annotations

import re
from _markupbase import ParserBase
from collections.abc import Callable
from html.parser import HTMLParser

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from smartrelay.rewrap.html import (
    _CHARREF,
    _PLACEHOLDER_CHARACTER,
    _PLACEHOLDER_MARKS,
    HtmlRewrite,
    _attribute_charref,
    _is_link_tag,
    _iter_attributes,
    _plain_href,
    _Scanner,
    pixel_tag,
    rewrite_html,
    unescape_attribute,
)
from tests.support.link_tracking import track, undo

PIXEL = "https://t.test/o/TOKEN.gif?m=1&r=2"
PIXEL_TAG = (
    '<img src="https://t.test/o/TOKEN.gif?m=1&amp;r=2" width="1" height="1" alt="" '
    'style="display:block;width:1px;height:1px;border:0" />'
)


# --- which URL rewrite_url receives, and what is written back ----------------------------------


def test_amp_entity_is_decoded_exactly_once() -> None:
    result, tracker = track('<a href="https://x.test/?a=1&amp;b=2">x</a>')
    assert tracker.seen == ["https://x.test/?a=1&b=2"]
    assert result.html == '<a href="https://t.test/c/0001">x</a>'
    result, tracker = track('<a href="https://x.test/?a=1&amp;amp;b=2">x</a>')
    assert tracker.seen == ["https://x.test/?a=1&amp;b=2"]


def test_numeric_and_legacy_references_decode_like_a_browser_in_attributes() -> None:
    _, tracker = track(
        '<a href="https://x.test/?a=1&#38;b=2&#x26;c=3">'
        '<a href="https://x.test/?a=1&region=eu&not=1&copy=2&amp">'
        '<a href="https://x.test/?q=&lt;tag&gt;&quot">'
    )
    assert tracker.seen == [
        "https://x.test/?a=1&b=2&c=3",
        "https://x.test/?a=1&region=eu&not=1&copy=2&",
        'https://x.test/?q=<tag>"',
    ]
    assert unescape_attribute("&amp;amp;") == "&amp;"


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(
        st.sampled_from(["&amp;", "&", "amp;", "&amp", "&ampx", "&AMP;", "&lt;", "&#38;", "=", "x"])
    ).map("".join)
)
def test_unescaping_query_strings_with_only_amp_is_the_general_rule(value: str) -> None:
    """Values whose only references are ``&amp;`` take a plain replace: the same result."""
    assert unescape_attribute(value) == _CHARREF.sub(_attribute_charref, value)


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(["a", "A", "area", "v:rect"]),
    st.lists(
        st.tuples(
            st.sampled_from([" ", " ", " ", "\t", "\r\n", "", "  ", "\u00a0", "/"]),
            st.sampled_from(["href", "HREF", "hRef", "hreflang", "title", "data-x", "x:y", "h"]),
            st.sampled_from(
                ['="x"', '="x"', "='y'", '="a>b"', '="href=1"', "", "=z", '=""', ' = "s"']
            ),
        ),
        max_size=4,
    ),
    st.sampled_from([">", "/>", " >", " / >", "\t/>"]),
)
def test_the_href_of_a_plain_tag_is_read_as_the_attribute_loop_reads_it(
    name: str, attributes: list[tuple[str, str, str]], ending: str
) -> None:
    tag = f"<{name}" + "".join("".join(a) for a in attributes) + ending
    fast = _plain_href(tag)
    event("plain, with an href" if fast is not None else "another tag, or no href")
    if fast is not None:
        assert fast == next(_iter_attributes(tag, frozenset({"href"})), None)


def test_percent_escapes_fragments_and_non_ascii_urls_are_passed_as_written() -> None:
    html = (
        '<a href="https://x.test/s?q=caf%C3%A9&amp;sort=price%2Basc">'
        '<a href="https://x.test/faq#versand-kosten">'
        '<a href="https://x.test/käse?größe=groß#ü">'
        "<a href='https://例え.jp/パス'>"
    )
    raw_values = [
        "https://x.test/s?q=caf%C3%A9&amp;sort=price%2Basc",
        "https://x.test/faq#versand-kosten",
        "https://x.test/käse?größe=groß#ü",
        "https://例え.jp/パス",
    ]
    result, tracker = track(html)
    assert tracker.seen == [
        "https://x.test/s?q=caf%C3%A9&sort=price%2Basc",
        "https://x.test/faq#versand-kosten",
        "https://x.test/käse?größe=groß#ü",
        "https://例え.jp/パス",
    ]
    assert undo(result.html, raw_values) == html


def test_new_url_is_escaped_for_the_attribute_keeping_the_quote_character() -> None:
    def rewrite(url: str) -> str:
        return "https://t.test/c?x=1&y=\"2\"&z='3' <4>"

    html = "<a href=\"http://a.test/\"><a href='http://b.test/'><a href=http://c.test/>"
    assert rewrite_html(html, rewrite, None).html == (
        "<a href=\"https://t.test/c?x=1&amp;y=&quot;2&quot;&amp;z='3' <4>\">"
        "<a href='https://t.test/c?x=1&amp;y=\"2\"&amp;z=&#39;3&#39; <4>'>"
        "<a href=https://t.test/c?x&#61;1&amp;y&#61;&#34;2&#34;"
        "&amp;z&#61;&#39;3&#39;&#32;&#60;4&#62;>"
    )
    # what was written decodes back to what rewrite_url returned
    written = re.findall(
        r"href=(\"[^\"]*\"|'[^']*'|[^ >]*)", rewrite_html(html, rewrite, None).html
    )
    assert [unescape_attribute(value.strip("'\"")) for value in written] == [rewrite("")] * 3


def test_non_ascii_result_is_written_as_is() -> None:
    result = rewrite_html('<a href="https://x.test/">', lambda url: "https://t.test/ç/€", None)
    assert result.html == '<a href="https://t.test/ç/€">'


def test_uppercase_tags_and_attributes_and_whitespace_around_equals() -> None:
    html = (
        "<A HREF='http://a.test/1'>one</A>"
        '<a\n  class="x"\n  HREF = "https://b.test/2"\n  target=_blank>two</a>'
        "<a Href=\t'HTTPS://C.TEST/3'>three</a>"
    )
    result, tracker = track(html)
    assert tracker.seen == ["http://a.test/1", "https://b.test/2", "HTTPS://C.TEST/3"]
    assert result.html == (
        "<A HREF='https://t.test/c/0001'>one</A>"
        '<a\n  class="x"\n  HREF = "https://t.test/c/0002"\n  target=_blank>two</a>'
        "<a Href=\t'https://t.test/c/0003'>three</a>"
    )


def test_single_quoted_unquoted_and_self_closing_hrefs() -> None:
    html = (
        "<a href='https://x.test/a?b=\"c\"'>"
        "<a href=https://x.test/u?a=1&b=2>"
        "<a href=https://x.test/slash/>"
        '<a href="https://x.test/sc"/>'
    )
    result, tracker = track(html)
    assert tracker.seen == [
        'https://x.test/a?b="c"',
        "https://x.test/u?a=1&b=2",
        "https://x.test/slash/",
        "https://x.test/sc",
    ]
    assert result.html == (
        "<a href='https://t.test/c/0001'>"
        "<a href=https://t.test/c/0002>"
        "<a href=https://t.test/c/0003>"
        '<a href="https://t.test/c/0004"/>'
    )


def test_whitespace_around_the_url_is_ignored_and_replaced_with_the_value() -> None:
    result, tracker = track('<a href="\n  https://x.test/p \t">x</a>')
    assert tracker.seen == ["https://x.test/p"]
    assert result.html == '<a href="https://t.test/c/0001">x</a>'


def test_only_the_first_of_duplicate_hrefs_counts() -> None:
    result, tracker = track('<a href="https://x.test/1" HREF="https://x.test/2">')
    assert tracker.seen == ["https://x.test/1"]
    assert result.html == '<a href="https://t.test/c/0001" HREF="https://x.test/2">'


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        # the opt-out after the href (the usual case reads no attribute after the href)
        ('<a href="https://x.test/1" data-smartrelay-notrack>', '<a href="https://x.test/1">'),
        ('<a href="https://x.test/1" DATA-SmartRelay-NoTrack="">', '<a href="https://x.test/1">'),
        # its name in a value is no attribute: the link is tracked
        (
            '<a href="https://x.test/1" title="data-smartrelay-notrack">',
            '<a href="https://t.test/c/0001" title="data-smartrelay-notrack">',
        ),
        (
            '<a title="x" href="https://x.test/1" href="y">',
            '<a title="x" href="https://t.test/c/0001" href="y">',
        ),
    ],
)
def test_attributes_after_the_href(tag: str, expected: str) -> None:
    result, _ = track(tag)
    assert result.html == expected


def test_rewrite_url_returning_the_same_url_changes_nothing() -> None:
    html = '<a href="https://x.test/?a=1&#38;b=2">'
    result = rewrite_html(html, lambda url: url, None)
    assert result.html == html
    assert result.links == ()


# --- what is left alone -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag",
    [
        "<a>no href</a>",
        "<a href>",
        '<a href="">',
        "<a href=>",
        '<a name="x" id="y">',
        '<area shape="rect" coords="0,0,1,1" nohref alt="x">',
        '<link rel="stylesheet" href="https://x.test/s.css">',
        '<base href="https://x.test/">',
        '<img src="https://x.test/i.png">',
        '<abbr href="https://x.test/not-a">',
        '<a-b href="https://x.test/custom-element">',
        '<v:fill type="tile" src="https://x.test/bg.png" color="#fff" />',
        '<v: href="https://x.test/no-local-name">',
        '<w:anchorlock href="https://x.test/not-vml">',
        '<vml href="https://x.test/not-vml">',
        '<a href="mailto:someone@x.test?subject=Hi&amp;body=x">',
        '<a href="MAILTO:someone@x.test">',
        '<a href="tel:+15555550100">',
        '<a href="sms:+15555550100">',
        '<a href="#section">',
        '<a href="/relative/path">',
        '<a href="relative.html">',
        '<a href="//x.test/protocol-relative">',
        '<a href="javascript:alert(1)">',
        '<a href="ftp://x.test/file">',
        '<a href="httpx://x.test/">',
        '<a href="http:/x.test/one-slash">',
        '<a href="{{ unsubscribe_url }}">',
        '<a href="https://x.test/?u={{user.id}}">',
        "<a href=\"https://x.test/?u={% url 'x' %}\">",
        '<a href="*|UNSUB|*">',
        '<a href="https://x.test/?e=*|EMAIL|*">',
        '<a href="https://x.test/?e=[[email]]">',
        '<a href="https://x.test/?e=<%= email %>">',
        '<a href="https://x.test/?e={{email">',
        '<a href="https://x.test/?e=email}}">',
        '<a href="https://x.test/?e=%}">',
        '<a href="https://x.test/?e=&lbrace;&lbrace;email&rbrace;&rbrace;">',
        '<a href="https://x.test/?e=&#42;|EMAIL|&#42;">',
    ],
)
def test_left_alone(tag: str) -> None:
    html = f"<p>before</p>{tag}<p>after</p>"
    result, tracker = track(html)
    assert tracker.seen == []
    assert result.html == html


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ('<a data-smartrelay-notrack href="https://x.test/">', '<a href="https://x.test/">'),
        ('<a href="https://x.test/" data-smartrelay-notrack>', '<a href="https://x.test/">'),
        (
            '<a href="https://x.test/" data-smartrelay-notrack="yes" class="c">',
            '<a href="https://x.test/" class="c">',
        ),
        ("<a DATA-SMARTRELAY-NOTRACK='1'\nhref=https://x.test/>", "<a\nhref=https://x.test/>"),
        # exactly one whitespace goes with it, the one before when there is one
        (
            '<a\n  data-smartrelay-notrack\n  href="https://x.test/">',
            '<a\n \n  href="https://x.test/">',
        ),
        ('<a href="https://x.test/"data-smartrelay-notrack>', '<a href="https://x.test/">'),
        ('<a data-smartrelay-notrack = "" href="mailto:x@x.test">', '<a href="mailto:x@x.test">'),
        ("<a data-smartrelay-notrack>", "<a>"),
    ],
)
def test_notrack_attribute_is_removed_and_the_link_kept(tag: str, expected: str) -> None:
    result, tracker = track(f"x{tag}y</a>")
    assert tracker.seen == []
    assert result.html == f"x{expected}y</a>"


def test_notrack_only_affects_its_own_link() -> None:
    html = (
        '<a href="https://x.test/1" data-smartrelay-notrack>1</a><a href="https://x.test/2">2</a>'
    )
    result, tracker = track(html)
    assert tracker.seen == ["https://x.test/2"]
    assert result.html == '<a href="https://x.test/1">1</a><a href="https://t.test/c/0001">2</a>'


def test_links_in_comments_scripts_styles_and_cdata_are_not_rewritten() -> None:
    """Only conditional comments (Outlook's, issue 18) hold links; see test_rewrap_vml.py."""
    html = (
        '<!-- <a href="https://x.test/comment"> -->'
        '<!--[if mso]><a href="https://x.test/mso">mso</a><![endif]-->'
        "<script>var s = '<a href=\"https://x.test/script\">';</script>"
        '<style>/* <a href="https://x.test/style"> */</style>'
        '<![CDATA[ <a href="https://x.test/cdata"> ]]>'
        '<!--[if !mso]><!-- --><a href="https://x.test/live">live</a><!--<![endif]-->'
        '<![if !supportLists]>&middot;<![endif]><a href="https://x.test/after">after</a>'
    )
    result, tracker = track(html)
    seen = ["https://x.test/mso", "https://x.test/live", "https://x.test/after"]
    assert tracker.seen == seen
    assert undo(result.html, seen) == html


def test_everything_else_is_byte_identical() -> None:
    html = (
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN">\r\n'
        "<?xml version='1.0'?>\r\n<HTML><Body   bgcolor=#fff >\r\n"
        "&copy; 2025 &nbsp;&#8212;&#x2014; 1 < 2 && 3 > 2 <b>unclosed <i>tags\r\n"
        "<a  class = 'x'   href = 'https://x.test/?a=1&amp;b=2'   target=_blank  >x</a   >\r\n"
        "<p <a href=https://x.test/weird>></p></td></tr></table></a></a>\r\n"
        '<![weird]> <!bogus> </ bogus> <a href="https://x.test/unterminated'
    )
    result, tracker = track(html)
    assert tracker.seen == ["https://x.test/?a=1&b=2"]
    assert undo(result.html, ["https://x.test/?a=1&amp;b=2"]) == html


def test_none_means_no_tracking_at_all() -> None:
    html = '<a href="https://x.test/"></a><body></body>'
    assert rewrite_html(html, None, None) == HtmlRewrite(html=html, links=())


def test_the_notrack_attribute_goes_even_with_no_tracking() -> None:
    """SPEC section 3: the opt-out attribute is removed in every case (issue 11 item 14)."""
    html = '<a href="https://x.test/" data-smartrelay-notrack></a><body></body>'
    expected = '<a href="https://x.test/"></a><body></body>'
    assert rewrite_html(html, None, None) == HtmlRewrite(html=expected, links=())
    with_pixel = rewrite_html(html, None, "https://t.test/o/P.gif")
    assert with_pixel.html.startswith('<a href="https://x.test/"></a><body><img src=')


# --- the open pixel -----------------------------------------------------------------------------


def test_pixel_goes_right_before_the_last_body_end_tag() -> None:
    html = (
        "<html><body><p>x</p></body>"
        "<!-- </body> --><script>'</body>'</script>"
        "</BODY ></html>\n"
        "<!-- </body> -->"
    )
    result = rewrite_html(html, None, PIXEL)
    assert result.html == html.replace("</BODY >", PIXEL_TAG + "</BODY >")
    assert result.links == ()


def test_pixel_at_the_end_without_a_body_end_tag() -> None:
    html = "<p>no body end</p><!-- </body> -->\r\n"
    assert rewrite_html(html, None, PIXEL).html == html + PIXEL_TAG
    assert rewrite_html("", None, PIXEL).html == PIXEL_TAG


def test_pixel_url_is_escaped() -> None:
    assert pixel_tag('https://t.test/o/"x".gif?a&b') == PIXEL_TAG.replace(
        "https://t.test/o/TOKEN.gif?m=1&amp;r=2", "https://t.test/o/&quot;x&quot;.gif?a&amp;b"
    )


def test_links_and_pixel_together_in_order() -> None:
    html = '<body><a href="https://x.test/1">1</a><a href="http://x.test/2">2</a></body>'
    result, _ = track(html, PIXEL)
    assert result.links == ("https://x.test/1", "http://x.test/2")
    assert result.html == (
        '<body><a href="https://t.test/c/0001">1</a><a href="https://t.test/c/0002">2</a>'
        + PIXEL_TAG
        + "</body>"
    )


# --- properties ---------------------------------------------------------------------------------

_URL_CHARS = st.sampled_from(
    [
        *"abcdefghijklmnopqrstuvwxyz0123456789-._~/?=:@!$()+,;",
        *["%20", "%C3%A9", "&amp;", "&#38;", "&#x26;", "&amp;amp;", "é", "ü", "日本", "#frag"],
    ]
)
_TEXT = st.lists(
    st.sampled_from([*"ab z\n\r\t>\"'=/&;#!-é", "&amp;", "&lt;", "&nbsp;"]), max_size=12
).map("".join)


@st.composite
def _tracked_href(draw: st.DrawFn) -> tuple[str, str]:
    """(the attribute as written, the raw value) for a link that must be rewritten."""
    scheme = draw(st.sampled_from(["http://", "https://", "HTTP://", "HttpS://"]))
    path = "".join(draw(st.lists(_URL_CHARS, max_size=8)))
    name = draw(st.sampled_from(["href", "HREF", "Href"]))
    equals = draw(st.sampled_from(["=", " = ", "\n=\t"]))
    quote = draw(st.sampled_from(['"', "'", ""]))
    raw = f"x.test/{path}"
    if quote:
        pad = draw(st.sampled_from(["", " ", "\n "]))
        raw = f"{pad}{scheme}{raw}{pad}"
    else:
        raw = f"{scheme}{raw}".replace("=", "%3D")
    return f"{name}{equals}{quote}{raw}{quote}", raw


_UNTRACKED_HREF = st.sampled_from(
    [
        'href="mailto:a@x.test"',
        "href='tel:+1'",
        "href=#top",
        'href="/rel"',
        'href="{{url}}"',
        'href="https://x.test/*|ID|*"',
        "href",
        'name="n"',
        'href=""',
    ]
)
_OTHER_ATTRIBUTE = st.sampled_from(['class="c"', "target=_blank", "style='color:red'", "id=x"])


@st.composite
def _document(draw: st.DrawFn) -> tuple[str, list[str]]:
    """An HTML-ish document and the raw href values that must be rewritten, in order."""
    pieces: list[str] = []
    tracked: list[str] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            attribute, raw = draw(_tracked_href())
            before = draw(st.lists(_OTHER_ATTRIBUTE, max_size=2))
            after = draw(st.lists(_OTHER_ATTRIBUTE, max_size=2))
            sep = draw(st.sampled_from([" ", "\n", "\t "]))
            tag = draw(st.sampled_from(["a", "A", "area", "AREA", "v:roundrect", "V:Rect"]))
            end = draw(st.sampled_from([">", " >", "/>"]))
            if end == "/>" and not attribute.endswith(("'", '"')):
                end = " />"
            markup = sep.join([f"<{tag}", *before, attribute, *after]) + end
            wrap = draw(
                st.sampled_from(
                    [
                        "{}",
                        "<!--[if mso]>{}<![endif]-->",
                        "<!--[if (gte mso 9)|(IE)]>\n{}\n<![endif]-->",
                    ]
                )
            )
            if "--" in markup:  # in a comment, its "-->" (an unquoted value's "--" and the
                wrap = "{}"  # tag's ">") would end the comment there: the link is left alone
            pieces.append(wrap.format(markup))
            tracked.append(raw)
        elif kind == 1:
            pieces.append(f"<a {draw(_UNTRACKED_HREF)}>")
        elif kind == 2:
            attribute, _ = draw(_tracked_href())
            template = draw(
                st.sampled_from(
                    [
                        "<!-- <a {}> -->",
                        "<!--[if mso]><!-- <a {}> --><![endif]-->",
                        "<script>'<a {}>'</script>",
                        "<style>/* <a {}> */</style>",
                        "<![CDATA[<a {}>]]>",
                        "<link {}>",
                        "<w:anchorlock {}/>",
                    ]
                )
            )
            pieces.append(template.format(attribute))
        elif kind == 3:
            pieces.append(draw(st.sampled_from(["</a>", "</A >", "</body>", "</BODY>", "<br/>"])))
        elif kind == 4:
            pieces.append(draw(st.sampled_from(["<p>", "<td class=x>", "<img src=y.gif>", "<b>"])))
        else:
            pieces.append(draw(_TEXT))
    return "".join(pieces), tracked


@settings(max_examples=300, deadline=None)
@given(_document())
@example(('<a href="https://x.test/?a=1&amp;b=2">', ["https://x.test/?a=1&amp;b=2"]))
@example(("<a href=http://x.test/-->", ["http://x.test/--"]))
def test_undoing_the_href_replacements_gives_back_the_input(doc: tuple[str, list[str]]) -> None:
    html, raw_values = doc
    result, tracker = track(html)
    assert tracker.seen == [unescape_attribute(raw).strip("\t\n\f\r ") for raw in raw_values]
    assert undo(result.html, raw_values) == html
    with_pixel, _ = track(html, PIXEL)
    assert with_pixel.html.count(PIXEL_TAG) == 1
    assert undo(with_pixel.html.replace(PIXEL_TAG, ""), raw_values) == html


@settings(max_examples=300, deadline=None)
@given(_document())
def test_identity_rewrite_and_no_pixel_give_the_input(doc: tuple[str, list[str]]) -> None:
    html, _ = doc
    assert rewrite_html(html, lambda url: url, None).html == html
    assert rewrite_html(html, None, None).html == html


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [*"<>/!?[]-=\"' \n\rahrefbodyscript:&;#x", "<a ", "href=", "http://", "<![", "-->"]
        ),
        max_size=60,
    ).map("".join)
)
def test_arbitrary_markup_never_raises_and_changes_only_hrefs(html: str) -> None:
    rewrite: Callable[[str], str] = lambda url: url  # noqa: E731
    assert rewrite_html(html, rewrite, None).html == html
    result, _ = track(html, PIXEL)
    assert result.html.count("https://t.test/c/") == len(result.links)
    assert PIXEL_TAG in result.html


class _FullParse(_Scanner):
    """The scanner without its shortcuts: html.parser's own loop (text unescaped and
    reported), every start and end tag parsed in full, lines and columns counted, offsets
    from ``getpos()``: what the scanner did before it took offsets from its own loop."""

    def scan(self, html: str) -> None:
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", html)]
        try:
            HTMLParser.feed(self, html[: html.rfind(">") + 1])
            HTMLParser.close(self)
        except Exception:
            pass

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def goahead(self, end: bool) -> None:
        HTMLParser.goahead(self, end)

    def updatepos(self, i: int, j: int) -> int:
        return ParserBase.updatepos(self, i, j)

    def parse_starttag(self, i: int) -> int:
        self._at = self._offset()
        return HTMLParser.parse_starttag(self, i)

    def parse_endtag(self, i: int) -> int:
        self._at = self._offset()
        return HTMLParser.parse_endtag(self, i)

    def handle_comment(self, data: str) -> None:
        self._at = self._offset()
        super().handle_comment(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if _is_link_tag(tag):
            text = self.get_starttag_text()
            assert text is not None
            self.anchors.append((self._at, text))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)


_MARKUP = st.sampled_from(
    [
        '<a href="http://x.test/1">',
        "<A HREF=http://y.test/2>",
        "</a>",
        '<!--[if mso]><v:roundrect href="https://v.test/3"><![endif]-->',
        "<!-- c -->",
        "<script>var a=\"<a href='http://no/4'>\";</script>",
        "<style>a{}</style>",
        "<body>",
        "</body>",
        "</BODY >",
        "<body/>",
        "<br/>",
        "<img src=x>",
        '<p class="a>b">',
        "&amp;",
        "&nbsp;",
        "text\n",
        *"<>\"'=!?/-x\n",
        "<![if !mso]>",
        "<![endif]>",
        "<?x?>",
        "</",
        "<!",
        "<!--",
        "-->",
        '<a href="http://z.test/5" data-smartrelay-notrack>',
        '<area href="https://ar.test/6"/>',
        '<a\nhref\n=\n"http://nl.test/7"\n>',
        '<title><a href="http://t/8"></title>',
        "<textarea>",
        '<a href="http://u.test/9"',
        "<v:rect href=http://r.test/10 />",
        "<abbr>",
        "<ab x=1>",
        "<Area/>",
        "<a\x00 href=http://n.test/14>",
        "<v:>",
        "<script/>",
        "</bodyx>",
        "</ body>",
        "</>",
        "<p/ x>",
        '<p x=">"',
        "<p\u2003 href=http://w.test/15>",
        "<img src=a/>",
        '<a href="http://s.test/16"/>',
        "<p x='",
        "< p>",
        # link tags of the plainest form (taken without html.parser's attribute loop), and
        # near misses that go html.parser's way
        "<a title='x>y' href=\"https://q.test/17\" target=_blank>",
        '<a\thref="https://q.test/18"\r\nstyle="color:red" data-x>',
        "<A HREF='https://q.test/19' / >",
        '<a href="https://q.test/20"title="y">',
        '<a href="https://q.test/21" alt="<b>" >',
        '<v:roundrect xmlns:v="urn:x" href="https://q.test/22" arcsize="10%"/>',
        '<a href="https://q.test/23"\u00a0class="x">',
        '<a href="https://q.test/24" class=""/>',
        "<area shape=rect href='https://q.test/25'>",
        # other start tags of the plain form (the scanner's first branch steps over them),
        # and near misses that go html.parser's pattern's way
        '<td style="a" nowrap>',
        "<td nowrap class='x'>",
        '<table width="600" border=0>',
        '<td nowrap ="x">',
        '<h1 class="t">',
        "<o:p>",
        '<td style="a"class="b">',
        '<img src="x" />',
        '<td\u00a0style="x">',
        '<td\x0bstyle="x">',
        '<td style="a>b">',
        "<p title='a\"b'>",
        '<td data-x="1"/>',
        '<td x="1" / >',
        "<td =x>",
        '<scripts x="1">',
        # link tags the scanner's loop takes itself, and near misses it leaves to parse_starttag
        '<area href="http://z.test/5">',
        '<AREA alt="x" HREF="http://z.test/6" />',
        '<v:rect href="http://v.test/7">',
        "<V:Oval  fill=\"x\"\nhref='http://v.test/8'>",
        '<a title="t">',
        "<a href>",
        '<a data-smartrelay-notrack href="http://x.test/9">',
        '<abbr href="http://no.test/1">',
        '<are href="http://no.test/2">',
        '<a:b href="http://no.test/3">',
        '<a-x href="http://no.test/4">',
        '<v: href="http://no.test/5">',
        '<a href="http://x.test/10" x=1>',
        '<a\thref="http://x.test/11"\t>',
    ]
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_MARKUP, max_size=40).map("".join))
def test_the_scanner_finds_what_a_full_html_parser_parse_finds(html: str) -> None:
    fast, full = _Scanner(), _FullParse()
    fast.scan(html)
    full.scan(html)
    assert fast.anchors == full.anchors
    # The href the scanner read with the tag is the one _plain_href reads in its text.
    assert fast.plain_hrefs == {
        offset: href for offset, text in fast.anchors if (href := _plain_href(text))
    }
    assert fast.conditionals == full.conditionals
    assert fast.body_ends == [at for at in full.body_ends if html.startswith("</", at)]


def test_every_placeholder_mark_holds_a_character_of_the_quick_check() -> None:
    """_trackable skips the marks' regex for a link without any of these characters."""
    assert all(_PLACEHOLDER_CHARACTER.search(mark) for mark in _PLACEHOLDER_MARKS)
