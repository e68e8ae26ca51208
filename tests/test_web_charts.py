"""The server-rendered SVG charts (smartrelay.web.charts): well-formed XML whatever the labels,
hostile text kept inert, round y ticks, x labels that never overlap, formatted numbers, empty
states, huge values and single buckets."""

from __future__ import annotations

import itertools
import math
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from markupsafe import Markup

from smartrelay.web.charts import (
    _LABEL_GAP,
    _TICK_SIZE,
    MAX_TEXT,
    OUTCOME_COLOURS,
    TEXT_COLOUR,
    TEXT_MUTED,
    Bar,
    RateRow,
    Series,
    clean_text,
    contrast_ratio,
    ellipsize,
    format_count,
    format_percent,
    horizontal_bars,
    nice_ticks,
    rate_bars,
    stacked_bars,
    text_width,
)
from tests.conftest import service_missing

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = [
    "\"'><script>alert(1)</script>",
    '"><img src=x onerror="alert(1)">',
    "</text></svg><script>alert(2)</script>",
    "]]><!-- & &amp; &#x3c; {{ x }}",
    "nul\x00bell\x07 esc\x1b line\r\nbreak",
]
START = datetime(2026, 12, 5, 14, tzinfo=UTC)
CHARTS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse(chart: Markup) -> ET.Element:
    """The chart as XML (raises on anything not well-formed), after the checks every chart
    must pass."""
    assert isinstance(chart, Markup)
    root = ET.fromstring(str(chart))
    assert root.tag == f"{SVG}svg"
    assert root.get("role") == "img"
    assert root.get("aria-label")
    assert root.get("width") == "100%"
    assert root.get("height") is None  # scales with its column
    viewbox = [float(v) for v in (root.get("viewBox") or "").split()]
    assert len(viewbox) == 4 and viewbox[2] > 0 and viewbox[3] > 0
    assert len(root) > 1  # never an empty <svg>
    for element in root.iter():
        assert element.tag.startswith(SVG), element.tag
        assert element.tag not in (f"{SVG}script", f"{SVG}foreignObject", f"{SVG}a")
        for name, value in element.attrib.items():
            assert not name.lower().startswith("on"), name
            assert not re.search(r"\b(nan|inf)\b", value.lower()) or name == "aria-label"
            assert name != "style"  # presentation attributes only (strict CSP)
    return root


def texts(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if (e.get("class") or "").split().count(cls)]


def titles(root: ET.Element) -> list[str]:
    return [e.text or "" for e in root.iter(f"{SVG}title")]


def all_text(root: ET.Element) -> str:
    return "\n".join(root.itertext())


def hours(count: int, start: datetime = START) -> list[datetime]:
    return [start + timedelta(hours=i) for i in range(count)]


def days(count: int, start: datetime = START) -> list[datetime]:
    first = start.replace(hour=0)
    return [first + timedelta(days=i) for i in range(count)]


def volume(count: int = 24) -> Markup:
    return stacked_bars(
        hours(count),
        [
            Series("delivered", tuple(1000 + 37 * i for i in range(count))),
            Series("deferred", tuple(i % 7 for i in range(count))),
            Series("bounced", tuple(3 * (i % 5) for i in range(count))),
        ],
        step="hour",
        title="Volume",
    )


# --------------------------------------------------------------------------------------
# Well-formed, escaped


def test_every_chart_is_well_formed_svg_with_role_and_label() -> None:
    root = parse(volume())
    assert root.get("aria-label", "").startswith("Volume: ")
    assert len(texts(root, "segment")) > 24
    parse(horizontal_bars([Bar("a", 3), Bar("b", 1)], title="Bounces by category"))
    parse(rate_bars([RateRow("example.com", 10, {"delivered": 9})], title="Domains"))


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_labels_come_out_as_text(hostile: str) -> None:
    cleaned = clean_text(hostile)
    charts = [
        stacked_bars(
            hours(3),
            [Series(hostile, (1, 2, 3)), Series("delivered", (4, 5, 6), label=hostile)],
            step="hour",
            title=hostile,
        ),
        stacked_bars([], [], step="day", title=hostile, empty_message=hostile),
        horizontal_bars([Bar(hostile, 5), Bar("x", 2, title=hostile, key=hostile)], title=hostile),
        horizontal_bars([], title=hostile, empty_message=hostile),
        rate_bars([RateRow(hostile, 4, {"delivered": 3, hostile: 1})], title=hostile),
    ]
    for chart in charts:
        assert "<script" not in chart and "<img" not in chart
        root = parse(chart)
        # The hostile text is there, whole, as character data (or an attribute value).
        visible = all_text(root)
        assert cleaned in visible or cleaned in (root.get("aria-label") or "")
        assert hostile not in chart or hostile == str(Markup.escape(hostile))


@CHARTS
@given(label=st.text(max_size=80), title=st.text(max_size=40))
@example(label="\ud800\x00\ufffe", title="\x0c")
def test_any_text_gives_well_formed_xml(label: str, title: str) -> None:
    cleaned = clean_text(label)
    root = parse(
        stacked_bars(hours(2), [Series("delivered", (1, 0), label=label)], step="hour", title=title)
    )
    assert any(t.endswith(f" - {cleaned}: 1") for t in titles(root))
    root = parse(horizontal_bars([Bar(label, 7)], title=title))
    assert f"{cleaned}: 7" in titles(root)
    root = parse(rate_bars([RateRow(label, 7, {"bounced": 7})], title=title))
    assert any(t.startswith(f"{cleaned}: 7 messages") for t in titles(root))


# --------------------------------------------------------------------------------------
# Y ticks


def is_round(step: int) -> bool:
    digits = str(step).rstrip("0")
    return digits in ("1", "2", "5")


@given(st.integers(min_value=0, max_value=10**15))
@example(0)
@example(1)
@example(7)
@example(8)
@example(10**12)
@example(10**12 + 1)
def test_ticks_cover_the_maximum_with_4_to_8_round_steps(maximum: int) -> None:
    ticks = nice_ticks(maximum)
    assert 4 <= len(ticks) <= 8
    assert ticks[0] == 0 and ticks[-1] >= maximum
    step = ticks[1]
    assert is_round(step), ticks
    assert ticks == [step * i for i in range(len(ticks))]
    # No wasted tick above the maximum, but for the headroom of a very small maximum.
    assert ticks[-2] < maximum or (len(ticks) == 4 and step == 1), ticks


def test_ticks_refuse_what_is_not_a_count() -> None:
    for bad in (-1, math.nan, math.inf):
        with pytest.raises(ValueError):
            nice_ticks(bad)


def y_labels(root: ET.Element) -> list[str]:
    return [e.text or "" for e in texts(root, "y-label")]


@CHARTS
@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=60))
def test_bars_stay_inside_the_plot_and_stack_to_their_totals(values: list[int]) -> None:
    series = [
        Series("delivered", tuple(values)),
        Series("bounced", tuple(v // 3 for v in values)),
    ]
    root = parse(stacked_bars(hours(len(values)), series, step="hour", title="Volume"))
    if max(values) == 0:
        assert texts(root, "chart-empty-text")
        return
    lines = [e for e in root.iter(f"{SVG}line")]
    ys = sorted(float(e.get("y1", "nan")) for e in lines)
    top, axis = ys[0], ys[-1]
    segments = texts(root, "segment")
    for segment in segments:
        y, h = float(segment.get("y", "nan")), float(segment.get("height", "nan"))
        assert h >= 1  # a non-zero count is never invisible
        assert y >= top - 0.02 and y + h <= axis + 0.02
    assert len(segments) == sum(v > 0 for v in values) + sum(v // 3 > 0 for v in values)
    # Each bar is as tall as its total on the axis' scale (a tiny segment adds at most 1).
    top_tick = nice_ticks(max(v + v // 3 for v in values))[-1]
    scale = (axis - top) / top_tick
    for bar, value in zip(texts(root, "bar"), values, strict=True):
        stack = texts(bar, "segment")
        height = sum(float(e.get("height", "nan")) for e in stack)
        assert abs(height - (value + value // 3) * scale) <= 0.02 * len(stack) + len(
            [e for e in stack if float(e.get("height", "nan")) == 1]
        )
        if stack:  # bottom up, touching: delivered at the axis, bounced on top of it
            assert [e.get("data-series") for e in stack] == ["delivered", "bounced"][: len(stack)]
            assert (
                abs(float(stack[0].get("y", "nan")) + float(stack[0].get("height", "nan")) - axis)
                < 0.02
            )
    labels = y_labels(root)
    assert len(labels) == len(set(labels))  # formatting never merges two ticks
    assert 4 <= len(labels) <= 8


# --------------------------------------------------------------------------------------
# X labels


def assert_labels_apart(root: ET.Element) -> list[str]:
    width = float((root.get("viewBox") or "").split()[2])
    labels = texts(root, "x-label")
    assert labels, "a chart with data has at least one x label"
    spans = []
    for label in labels:
        centre = float(label.get("x", "nan"))
        half = text_width(label.text or "", _TICK_SIZE) / 2
        assert label.get("text-anchor") == "middle"
        assert centre - half >= 0 and centre + half <= width
        spans.append((centre - half, centre + half))
    for (_, right), (left, _) in itertools.pairwise(spans):
        assert left - right >= _LABEL_GAP - 0.02, (right, left)
    return [label.text or "" for label in labels]


@CHARTS
@given(
    count=st.integers(min_value=1, max_value=800),
    step=st.sampled_from(["hour", "day"]),
    offset=st.integers(min_value=0, max_value=24 * 400),
    width=st.sampled_from([320.0, 640.0, 1200.0]),
)
def test_x_labels_never_overlap(count: int, step: str, offset: int, width: float) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=offset)
    if step == "day":
        start = start.replace(hour=0)
    moments = hours(count, start) if step == "hour" else days(count, start)
    chart = stacked_bars(
        moments,
        [Series("delivered", tuple(range(1, count + 1)))],
        step="hour" if step == "hour" else "day",
        title="Volume",
        width=width,
    )
    labels = assert_labels_apart(parse(chart))
    if step == "hour":
        assert all(re.fullmatch(r"\d\d:00|[A-Z][a-z]{2} \d{1,2}", t) for t in labels)
    else:
        assert all(re.fullmatch(r"[A-Z][a-z]{2} \d{1,2}", t) for t in labels)


def test_x_labels_hourly_and_daily_in_utc() -> None:
    root = parse(volume(24))
    labels = assert_labels_apart(root)
    assert "15:00" in labels and "Dec 6" in labels  # 00:00 shows the date
    assert [e.text for e in texts(root, "x-caption")] == ["Hourly, times in UTC"]
    # A bucket given in another zone is shown in UTC.
    paris = timezone(timedelta(hours=1))
    root = parse(
        stacked_bars(
            [datetime(2026, 12, 5, 15, tzinfo=paris)],
            [Series("delivered", (1234,))],
            step="hour",
            title="Volume",
        )
    )
    assert "Dec 5 14:00 UTC - delivered: 1,234" in titles(root)
    root = parse(
        stacked_bars(days(30), [Series("delivered", (5,) * 30)], step="day", title="Volume")
    )
    labels = assert_labels_apart(root)
    assert labels == ["Dec 7", "Dec 14", "Dec 21", "Dec 28"]  # Mondays
    assert [e.text for e in texts(root, "x-caption")] == ["Daily, dates in UTC"]
    assert "Dec 5 UTC - delivered: 5" in titles(root)


# --------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize(
    ("value", "compact", "text"),
    [
        (0, False, "0"),
        (999, False, "999"),
        (12_345, False, "12,345"),
        (999_999, False, "999,999"),
        (1_000_000, False, "1M"),
        (1_234_567, False, "1.2M"),
        (12_345_678, False, "12M"),
        (999_960_000, False, "1B"),
        (10**12, False, "1T"),
        (1_500_000_000_000, False, "1.5T"),
        (10**15, False, "1,000T"),
        (999, True, "999"),
        (1_500, True, "1.5K"),
        (500_000, True, "500K"),
        (999_999, True, "1M"),
    ],
)
def test_counts_are_formatted(value: int, compact: bool, text: str) -> None:
    assert format_count(value, compact) == text


@pytest.mark.parametrize(
    ("part", "total", "text"),
    [
        (0, 0, "-"),
        (0, 10, "0%"),
        (10, 10, "100%"),
        (1, 3, "33.3%"),
        (1, 2, "50%"),
        (1, 10**6, "<0.1%"),
        (10**6 - 1, 10**6, ">99.9%"),
    ],
)
def test_percentages_are_formatted(part: int, total: int, text: str) -> None:
    assert format_percent(part, total) == text


def test_numbers_in_charts_are_formatted() -> None:
    root = parse(
        stacked_bars(
            hours(2),
            [Series("delivered", (12_345, 1_234)), Series("bounced", (0, 7))],
            step="hour",
            title="Volume",
        )
    )
    assert y_labels(root) == [f"{n:,}" for n in range(0, 14_001, 2_000)]
    assert "Dec 5 14:00 UTC - delivered: 12,345" in titles(root)
    assert "Dec 5 15:00 UTC - total: 1,241 (delivered: 1,234, bounced: 7)" in titles(root)
    root = parse(horizontal_bars([Bar("mailbox-full", 1_234_567)], title="Bounces"))
    assert [e.text for e in texts(root, "row-value")] == ["1.2M"]


# --------------------------------------------------------------------------------------
# Empty, huge, single


def empty_charts() -> Iterator[Markup]:
    yield stacked_bars([], [], step="hour", title="Volume")
    yield stacked_bars(hours(24), [], step="hour", title="Volume")
    yield stacked_bars(hours(24), [Series("delivered", (0,) * 24)], step="hour", title="Volume")
    yield horizontal_bars([], title="Bounces by category")
    yield horizontal_bars([Bar("a", 0), Bar("b", 0)], title="Bounces by category")
    yield rate_bars([], title="Domains")
    yield rate_bars([RateRow("example.com", 0, {"delivered": 0})], title="Domains")


def test_empty_states_say_so() -> None:
    for chart in empty_charts():
        root = parse(chart)
        (message,) = texts(root, "chart-empty-text")
        assert message.text in ("No mail in this period.", "Nothing in this period.")
        assert message.text in (root.get("aria-label") or "")
        assert not texts(root, "segment") and not texts(root, "row-bar")
    root = parse(horizontal_bars([], title="Clicks", empty_message="No clicks yet."))
    assert [e.text for e in texts(root, "chart-empty-text")] == ["No clicks yet."]


def test_a_row_without_mail_shows_no_rate() -> None:
    root = parse(
        rate_bars(
            [RateRow("busy.example", 10, {"delivered": 9}), RateRow("idle.example", 0, {})],
            title="Domains",
        )
    )
    rates = [e.text for e in texts(root, "row-rates")]
    assert rates == ["90% delivered, 0% deferred, 0% bounced", "no mail"]


def test_huge_values() -> None:
    huge = 10**12
    root = parse(
        stacked_bars(
            hours(3),
            [Series("delivered", (huge, huge // 2, 1)), Series("bounced", (huge, 0, 0))],
            step="hour",
            title="Volume",
        )
    )
    assert y_labels(root) == ["0", "500B", "1T", "1.5T", "2T"]
    assert "Dec 5 14:00 UTC - delivered: 1,000,000,000,000" in titles(root)
    root = parse(horizontal_bars([Bar("x", huge), Bar("y", 1)], title="Clicks"))
    assert [e.text for e in texts(root, "row-value")] == ["1T", "1"]
    bars = texts(root, "row-bar")
    assert float(bars[1].get("width", "nan")) >= 1  # a non-zero value stays visible
    root = parse(rate_bars([RateRow("x", huge, {"delivered": huge - 1, "bounced": 1})], title="D"))
    assert [e.text for e in texts(root, "row-rates")] == [
        ">99.9% delivered, 0% deferred, <0.1% bounced"
    ]


def test_single_bucket() -> None:
    for step in ("hour", "day"):
        root = parse(
            stacked_bars(
                [START],
                [Series("delivered", (1,))],
                step="hour" if step == "hour" else "day",
                title="Volume",
            )
        )
        assert len(texts(root, "segment")) == 1
        assert len(assert_labels_apart(root)) == 1
        assert y_labels(root) == ["0", "1", "2", "3"]


def test_long_labels_are_ellipsized_with_the_full_text_on_hover() -> None:
    url = "https://example.com/" + "segment/" * 30 + "?utm_source=newsletter"
    root = parse(horizontal_bars([Bar(url, 42)], title="Top clicked URLs", width=640))
    (label,) = texts(root, "row-label")
    assert label.text and label.text.endswith("\u2026") and len(label.text) < len(url)
    assert text_width(label.text, 14) <= 640 * 0.4
    assert f"{url}: 42" in titles(root)
    assert ellipsize("short", 100, 14) == "short"


def test_huge_labels_stay_bounded() -> None:
    huge = "W" * 5_000_000
    started = time.monotonic()
    charts = [
        horizontal_bars([Bar(huge, 1)] * 10, title=huge),
        stacked_bars(hours(24), [Series(huge, (1,) * 24, label=huge)], step="hour", title=huge),
        rate_bars([RateRow(huge, 1, {"delivered": 1})] * 10, title=huge),
    ]
    assert time.monotonic() - started < 10  # linear, not quadratic, in a label's length
    for chart in charts:
        root = parse(chart)
        assert len(chart) < 200 * MAX_TEXT
        assert all(len(t) <= 2 * MAX_TEXT for t in titles(root))
    assert ellipsize(huge, 100, 14) == "W" * 5 + "\u2026"
    assert text_width(ellipsize(huge, 100, 14), 14) <= 100


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="values"):
        stacked_bars(hours(3), [Series("delivered", (1, 2))], step="hour", title="V")
    with pytest.raises(ValueError, match="negative"):
        stacked_bars(hours(1), [Series("delivered", (-1,))], step="hour", title="V")
    with pytest.raises(ValueError, match="timezone"):
        stacked_bars([datetime(2026, 12, 5)], [Series("delivered", (1,))], step="hour", title="V")
    with pytest.raises(ValueError, match="negative"):
        horizontal_bars([Bar("a", -1)], title="B")
    with pytest.raises(ValueError, match="colour"):
        stacked_bars(hours(1), [Series("x", (1,), colour='red"/><script>')], step="hour", title="V")


# --------------------------------------------------------------------------------------
# Colours


def test_colours_are_readable_and_distinct() -> None:
    assert contrast_ratio(TEXT_COLOUR) >= 7
    assert contrast_ratio(TEXT_MUTED) >= 4.5
    for outcome, colour in OUTCOME_COLOURS.items():
        assert contrast_ratio(colour) >= 3, outcome  # WCAG 1.4.11, graphical objects
    assert len(set(OUTCOME_COLOURS.values())) == len(OUTCOME_COLOURS)
    # The text of every chart is in one of the two text colours (the root's fill or muted).
    root = parse(volume())
    assert root.get("fill") == TEXT_COLOUR
    for element in root.iter(f"{SVG}text"):
        assert element.get("fill") in (None, TEXT_MUTED)
    # Each outcome keeps its colour in every chart.
    colours = {s.get("data-series"): s.get("fill") for s in texts(root, "segment")}
    assert colours == {k: OUTCOME_COLOURS[k] for k in ("delivered", "deferred", "bounced")}


# --------------------------------------------------------------------------------------
# In a real browser: the width estimates hold with real fonts, nothing runs


def browser_page() -> str:
    url = "https://example.com/" + "very-long-path/" * 8 + "?utm_source=x&id=1"
    charts = [
        volume(24),
        stacked_bars(
            hours(168),
            [Series("delivered", tuple(range(168))), Series("bounced", (3,) * 168)],
            step="hour",
            title="Volume, 7 days",
        ),
        stacked_bars(
            days(31),
            [Series("delivered", (10**12,) * 31), Series("complained", (1,) * 31)],
            step="day",
            title="Volume, 30 days " + "W" * 60,
        ),
        horizontal_bars(
            [Bar(url, 12_345), Bar(HOSTILE[0], 99), Bar("WWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWW", 1)],
            title="Top clicked URLs",
        ),
        rate_bars(
            [RateRow("W" * 80, 10**9, {"delivered": 10**9 - 2, "bounced": 1, "deferred": 1})],
            title="Top recipient domains",
        ),
        stacked_bars([], [], step="hour", title="Volume"),
    ]
    cells = "".join(f'<div class="cell">{chart}</div>' for chart in charts)
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        f"<title>charts</title></head><body>{cells}</body></html>"
    )


# Runs in the browser: for every text of every chart, its rendered width (real fonts), the
# width the server estimated, and its box in viewBox units.
MEASURE = """
const out = [];
for (const svg of document.querySelectorAll('svg.chart')) {
  const vb = svg.viewBox.baseVal;
  const scale = svg.getBoundingClientRect().width / vb.width;
  for (const t of svg.querySelectorAll('text')) {
    const box = t.getBBox();
    out.push({cls: t.getAttribute('class'), text: t.textContent,
              size: parseFloat(t.getAttribute('font-size') || svg.getAttribute('font-size')),
              length: t.getComputedTextLength(), x: box.x, right: box.x + box.width,
              width: vb.width, px: scale});
  }
}
return out;
"""


def test_charts_in_chromium(tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        service_missing("chromium and chromedriver are not installed")
        return
    page = tmp_path / "charts.html"
    page.write_text(browser_page(), encoding="utf-8")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        for name, (width, height) in {"desktop": (1280, 1000), "phone": (375, 800)}.items():
            driver.set_window_size(width, height)
            driver.get(page.as_uri())
            with pytest.raises(NoAlertPresentException):
                driver.switch_to.alert  # noqa: B018 - the property raises when no dialog opened
            assert driver.execute_script("return document.scripts.length") == 0
            texts = driver.execute_script(MEASURE)
            assert len(texts) > 50
            for t in texts:
                # The server's estimate is never short of the real width, so thinned labels
                # and ellipsized ones do not overlap nor leave the chart.
                bold = t["cls"] == "chart-title"
                assert t["length"] <= text_width(t["text"], t["size"], bold) + 0.5, t
                assert t["x"] >= -0.5 and t["right"] <= t["width"] + 0.5, t
                if name == "phone":
                    assert t["size"] * t["px"] >= 8.5, t  # legible on a phone
            x_labels = [t for t in texts if t["cls"] == "x-label"]
            assert x_labels
            runs: list[list[dict[str, float]]] = [[]]
            for t in x_labels:  # one run of increasing x per chart
                if runs[-1] and t["x"] < runs[-1][-1]["x"]:
                    runs.append([])
                runs[-1].append(t)
            assert len(runs) == 3
            for run in runs:
                for left, right in itertools.pairwise(run):
                    assert right["x"] - left["right"] >= _LABEL_GAP / 2, (left, right)
            assert any("<script>" in t["text"] for t in texts)  # shown as text, not run
            driver.save_screenshot(str(tmp_path / f"charts-{name}.png"))
    finally:
        driver.quit()
