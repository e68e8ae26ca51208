"""Issue 18 point 5: Outlook's VML buttons and links inside conditional comments, and image
maps' ``<area href>``, are tracked like ``<a href>``; nothing else in the document changes."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from smartrelay.rewrap.html import HtmlRewrite, rewrite_html
from tests.support.link_tracking import track, undo

FIXTURES = Path(__file__).parent / "fixtures" / "vml"


# Each fixture: the URLs a reader can click (as opened: entities decoded once), in document
# order, and the raw values as written in the source.
CASES = {
    "buttons_cm_roundrect.html": [
        "https://shop.example.com/sale?utm_source=newsletter&amp;utm_medium=email"
        "&amp;utm_campaign=spring",
    ]
    * 2,
    "buttons_cm_background.html": ["http://www.example.org/account/confirm?id=42&amp;lang=fr"] * 2,
    "litmus_buttons.html": [
        "https://litmus.example.com/webinar?ref=email",
        "https://litmus.example.com/outlook-only?x=1&amp;y=2",
        "https://litmus.example.com/badge",
    ],
    "stripo_mjml.html": ["https://news.example.net/event/register?campaign=autumn&amp;src=stripo"]
    * 3,
    "image_map.html": [
        "https://shops.example.com/paris?from=map&amp;pos=1",
        "https://shops.example.com/lyon",
        "https://shops.example.com/nice?x=&quot;y&quot;",
        "https://shops.example.com/all",
    ],
}
OPENED = {
    "buttons_cm_roundrect.html": [
        "https://shop.example.com/sale?utm_source=newsletter&utm_medium=email&utm_campaign=spring"
    ]
    * 2,
    "buttons_cm_background.html": ["http://www.example.org/account/confirm?id=42&lang=fr"] * 2,
    "litmus_buttons.html": [
        "https://litmus.example.com/webinar?ref=email",
        "https://litmus.example.com/outlook-only?x=1&y=2",
        "https://litmus.example.com/badge",
    ],
    "stripo_mjml.html": ["https://news.example.net/event/register?campaign=autumn&src=stripo"] * 3,
    "image_map.html": [
        "https://shops.example.com/paris?from=map&pos=1",
        "https://shops.example.com/lyon",
        'https://shops.example.com/nice?x="y"',
        "https://shops.example.com/all",
    ],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_world_buttons_and_maps_are_tracked_and_the_rest_is_byte_identical(
    name: str,
) -> None:
    html = (FIXTURES / name).read_text(encoding="utf-8")
    result, tracker = track(html)
    seen = tracker.seen
    assert seen == OPENED[name]
    # only the href values changed (and the opt-out attribute went, SPEC section 3)
    assert undo(result.html, CASES[name]) == html.replace(" data-smartrelay-notrack", "")


def test_the_vml_twin_and_the_a_of_one_button_are_both_rewritten() -> None:
    html = (FIXTURES / "buttons_cm_background.html").read_text(encoding="utf-8")
    result, _ = track(html)
    comment = result.html[result.html.index("<!--[if mso]>") : result.html.index("<![endif]-->")]
    assert 'href="https://t.test/c/0001"' in comment  # the v:roundrect's
    assert '<a href="https://t.test/c/0002"\nstyle=' in result.html
    assert '<v:fill type="tile" src="https://i.example.org/button-bg.gif"' in comment


def test_skip_rules_and_the_opt_out_apply_inside_conditional_comments() -> None:
    html = (FIXTURES / "litmus_buttons.html").read_text(encoding="utf-8")
    result, tracker = track(html)
    seen = tracker.seen
    assert "https://litmus.example.com/keep" not in seen
    for untouched in (
        'href="mailto:help@litmus.example.com?subject=Hi&amp;body=x"',
        'href="tel:+15555550100"',
        'href="#agenda"',
        'href="{{ unsubscribe_url }}"',
    ):
        assert untouched in result.html
    # the opt-out attribute goes (SPEC section 3), the link stays as written
    assert '<v:roundrect href="https://litmus.example.com/keep" style=' in result.html
    assert "data-smartrelay-notrack" not in result.html


def test_with_click_tracking_off_only_the_opt_out_attribute_goes() -> None:
    html = (FIXTURES / "litmus_buttons.html").read_text(encoding="utf-8")
    expected = html.replace(" data-smartrelay-notrack", "")
    assert expected != html
    assert rewrite_html(html, None, None) == HtmlRewrite(html=expected, links=())


@pytest.mark.parametrize(
    ("markup", "expected"),
    [
        # quoting variants, case, whitespace
        ('<!--[if mso]><v:roundrect href="https://x.test/1"><![endif]-->', ["https://x.test/1"]),
        ("<!--[if mso]><v:rect href='https://x.test/2'/><![endif]-->", ["https://x.test/2"]),
        ("<!--[IF MSO]><V:OVAL HREF=https://x.test/3 /><![ENDIF]-->", ["https://x.test/3"]),
        (
            '<!--[if gte mso 9]>\n<v:roundrect\n\tarcsize="5%"\n\thref = " https://x.test/4 "\n>'
            "<![endif]-->",
            ["https://x.test/4"],
        ),
        (
            "<!--[if (mso)|(IE)]><a class=b href=https://x.test/5>x</a><![endif]-->",
            ["https://x.test/5"],
        ),
        ("<!--[if mso | IE]><v:shape href='https://x.test/6'><![endif]-->", ["https://x.test/6"]),
        ("<!--[if !mso]><area href=https://x.test/7><![endif]-->", ["https://x.test/7"]),
        # an attribute value holding ">" does not end the tag
        (
            '<!--[if mso]><v:rect alt="a > b" href="https://x.test/8"><![endif]-->',
            ["https://x.test/8"],
        ),
        # nested conditional openings: their content is read too
        (
            "<!--[if mso]><!--[if gte mso 12]><v:rect href=https://x.test/9><![endif]-->",
            ["https://x.test/9"],
        ),
        # not conditional: a plain comment, a plain nested comment, a style sheet, text
        ('<!-- <v:rect href="https://x.test/no"> -->', []),
        ("<!--[if mso]><!-- <v:rect href=https://x.test/no> --><![endif]-->", []),
        (
            "<!--[if mso]><style>v\\:* {behavior:url(#default#VML);} <a href=https://x.test/no></style><![endif]-->",
            [],
        ),
        ("<!--[if mso]>&lt;v:rect href=https://x.test/no><![endif]-->", []),
        ("<!--[ifmso]><v:rect href=https://x.test/no><![endif]-->", []),
        # an href on a v: element outside any comment (Outlook renders it there too)
        ('<v:roundrect href="https://x.test/10">', ["https://x.test/10"]),
    ],
)
def test_markup_variants(markup: str, expected: list[str]) -> None:
    html = f"<p>a</p>{markup}<p>b</p>"
    result, tracker = track(html)
    seen = tracker.seen
    assert seen == expected
    href = re.compile(
        r"href\s*=\s*(?:[\"']( ?https://x\.test/\d+ ?)[\"']|(https://x\.test/\d+))", re.I
    )
    raws = [m.group(1) or m.group(2) for m in href.finditer(html)]
    assert undo(result.html, raws) == html


def test_the_token_is_written_escaped_for_the_quote_in_use() -> None:
    result = rewrite_html(
        "<!--[if mso]><v:rect href='https://x.test/'><v:rect href=https://x.test/><![endif]-->",
        lambda url: "https://t.test/c/a'b&c d",
        None,
    )
    assert result.html == (
        "<!--[if mso]><v:rect href='https://t.test/c/a&#39;b&amp;c d'>"
        "<v:rect href=https://t.test/c/a&#39;b&amp;c&#32;d><![endif]-->"
    )


def test_the_endif_closing_a_nested_conditional_comment_hides_nothing_after_it() -> None:
    """``<![endif]-->`` left over by a nested conditional comment is a bogus comment up to its
    ``>`` (as in browsers): the links after it are found, up to the next ``<![if]>`` and past."""
    html = (
        "<!--[if mso]><!--[if gte mso 12]><v:rect href=https://x.test/1><![endif]--><![endif]-->"
        '<a href="https://x.test/2">x</a>'
        "<![if !mso]><a href=https://x.test/3>y</a><![endif]><a href=https://x.test/4>"
    )
    result, tracker = track(html)
    seen = tracker.seen
    assert seen == [f"https://x.test/{n}" for n in (1, 2, 3, 4)]
    assert undo(result.html, [f"https://x.test/{n}" for n in (1, 2, 3, 4)]) == html


def test_an_unterminated_cdata_section_does_not_hide_office_sections_after_it() -> None:
    html = (
        "<![CDATA[ x > <![if !mso]><a href=https://x.test/1><![endif]>"
        "<!-- <a href=https://x.test/no> --><a href=https://x.test/2>"
    )
    seen = track(html)[1].seen
    assert seen == ["https://x.test/1", "https://x.test/2"]


def test_a_new_value_cannot_end_the_conditional_comment() -> None:
    html = '<!--[if mso]><v:rect href="https://x.test/"><![endif]--><a href="https://x.test/">'
    result = rewrite_html(html, lambda url: "https://t.test/c/a-->b-- >c", None)
    assert result.html == (
        '<!--[if mso]><v:rect href="https://t.test/c/a--&gt;b-- &gt;c"><![endif]-->'
        '<a href="https://t.test/c/a-->b-- >c">'
    )
    assert result.links == ("https://x.test/", "https://x.test/")


# --- hostile input: linear time, no exceptions ----------------------------------------------

SIZE = 1_000_000


@pytest.mark.parametrize(
    "html",
    [
        # a conditional comment that never ends
        "<!--[if mso]>" + '<v:rect href="https://x.test/">' * (SIZE // 32),
        # many quoted values that never close, and many tags that never end
        "<!--[if mso]>" + '<v:rect a="' * (SIZE // 12) + "<![endif]-->",
        "<!--[if mso]>" + "<v:rect a=b " * (SIZE // 12) + "<![endif]-->",
        "<!--[if mso]>" + "<a href='x' " * (SIZE // 12) + "<![endif]-->",
        # deep nesting of conditional openings, and of plain comment openings
        "<!--[if mso]>" * (SIZE // 13) + "<v:rect href=https://x.test/deep><![endif]-->",
        "<!--[if mso]>" + "<!--" * (SIZE // 4) + "<![endif]-->",
        "<!--[if mso]>" + "<style>" * (SIZE // 7) + "<![endif]-->",
        "<!--[if mso]>" + "<!--[if " * (SIZE // 8) + "<![endif]-->",
        # one huge attribute, and huge conditional expressions
        "<!--[if mso]><v:rect title='" + "x" * SIZE + "' href=https://x.test/big><![endif]-->",
        "<!--[if " + "m" * SIZE + "]><v:rect href=https://x.test/expr><![endif]-->",
        # the same outside any comment: unterminated comments and marked sections
        "<!--" * (SIZE // 4),
        "<!--[if mso]>" * (SIZE // 13),
        "<![endif]-->" * (SIZE // 12),
        "<![CDATA[" * (SIZE // 9),
        "<![if " * (SIZE // 6),
        "<!x " * (SIZE // 4),
        "<a href='x' " * (SIZE // 12),
        "<a href='x' " * (SIZE // 12) + ">",
        # many small buttons
        "<!--[if mso]><v:roundrect href='https://x.test/?a=1&amp;b=2'></v:roundrect><![endif]-->"
        * (SIZE // 84),
        "<area href=https://x.test/ alt=x>" * (SIZE // 33),
    ],
    ids=[
        "unterminated-comment",
        "open-quotes",
        "unended-tags",
        "unended-anchors",
        "nested-conditionals",
        "nested-comments",
        "unclosed-styles",
        "broken-openings",
        "huge-attribute",
        "huge-expression",
        "document-open-comments",
        "document-open-conditionals",
        "document-endifs",
        "document-open-cdata",
        "document-open-office-sections",
        "document-bogus-comments",
        "document-unended-anchors",
        "document-unended-anchors-then-gt",
        "many-buttons",
        "many-areas",
    ],
)
def test_hostile_documents_take_linear_time(html: str) -> None:
    started = time.process_time()
    result = rewrite_html(html, lambda url: "https://t.test/c/T", None)
    elapsed = time.process_time() - started
    # A quadratic scan of 1 MB would take hours; linear ones take about a second here.
    assert elapsed < 30, elapsed
    assert len(result.html) <= len(html) + len(result.links) * len("https://t.test/c/T")
    if "x.test/big" in html:
        assert result.links == ("https://x.test/big",)
    if html.startswith("<!--[if mso]><v:roundrect"):
        assert len(result.links) == SIZE // 84
