"""Charts of the reports UI, rendered on the server as inline SVG (no JavaScript, no library).

Every chart is a pure function returning :class:`markupsafe.Markup` that a Jinja2 template
inserts as it is. Whatever the data holds (tags, domains, URLs come from mail), it comes out
as text: every label, legend entry and ``<title>`` is passed through :func:`markupsafe.escape`
(inside ``Markup.format``), and characters XML cannot hold at all (NUL, other C0 controls,
lone surrogates) become U+FFFD first, so the output is always well-formed XML.

How they look and scale:

* ``viewBox`` plus ``width="100%"`` and no height: the chart keeps its proportions in any
  column. Sizes are in viewBox units: at the default width (480) the text is 13-16 units,
  about 9-11 px on a phone held upright (a 343 px column) and 16-20 px in a 600 px column.
  A page should not stretch a chart beyond ~720 px (its stylesheet sets a ``max-width``).
* Presentation attributes only (``fill``, ``font-size``), no ``style`` attribute, so a strict
  ``Content-Security-Policy`` needs no ``'unsafe-inline'`` for styles.
* A white background of its own and colours that keep their meaning: :data:`OUTCOME_COLOURS`
  (each at least 3.9:1 against white, the text colours at least 7:1).
* Times are UTC and say so: a server-rendered SVG cannot know the viewer's time zone.
* One ``role="img"`` with an ``aria-label`` per chart; hovering a bar segment shows its
  ``<title>`` (``Dec 5 14:00 UTC - delivered: 1,234``).
* No data gives a chart-sized frame with a sentence saying so, never an empty ``<svg>``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal

from attrs import frozen
from markupsafe import Markup, escape

__all__ = [
    "MAX_TEXT",
    "OUTCOME_COLOURS",
    "TEXT_COLOUR",
    "TEXT_MUTED",
    "Bar",
    "RateRow",
    "Series",
    "clean_text",
    "contrast_ratio",
    "ellipsize",
    "format_count",
    "format_percent",
    "horizontal_bars",
    "nice_ticks",
    "rate_bars",
    "stacked_bars",
    "text_width",
]

#: One colour per event type, the same in every chart and legend. Chosen to stay apart for
#: the common colour-vision deficiencies (delivered is a bluish green, bounced a red with
#: more lightness contrast to it), each at least 3.9:1 against white (WCAG 1.4.11 asks 3:1).
OUTCOME_COLOURS: Mapping[str, str] = {
    "received": "#1f5fbf",
    "delivered": "#00805c",
    "deferred": "#b86e00",
    "bounced": "#c42b1c",
    "complained": "#9c3d9c",
    "expired": "#7a5c3e",
    "dropped": "#5f6b7a",
    "suppressed": "#3f4652",
    "opened": "#00798c",
    "clicked": "#4b4fc4",
    "unsubscribed": "#b0306a",
}
#: Colours for series that are not an outcome (bounce categories, ...), in order.
_FALLBACK_COLOURS = ("#1f5fbf", "#b86e00", "#00805c", "#9c3d9c", "#c42b1c", "#5f6b7a")
#: Titles, labels, legend text (15.8:1 against white).
TEXT_COLOUR = "#1f2328"
#: Axis tick labels and captions (7.6:1 against white).
TEXT_MUTED = "#4b5563"
_GRID = "#d0d7de"
_EMPTY_FILL = "#f6f8fa"
_REST = "#d0d7de"  # the remainder of a rate bar (neither delivered nor bounced)
_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"

_TITLE_SIZE = 16.0
_TEXT_SIZE = 14.0
_TICK_SIZE = 13.0
#: Least free space between two x labels, in viewBox units.
_LABEL_GAP = 8.0

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Characters XML 1.0 cannot carry, even as character references.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_SPACES = str.maketrans("\t\n\r", "   ")
#: The longest text a chart shows, hover texts included (a URL longer than this is cut).
MAX_TEXT = 2048

Step = Literal["hour", "day"]


@frozen
class Series:
    """One layer of a stacked bar chart: ``values[i]`` belongs to ``buckets[i]``.

    ``key`` picks the colour (an outcome of :data:`OUTCOME_COLOURS`, else a fallback colour
    by position); ``label`` is the legend text (``key`` when None)."""

    key: str
    values: tuple[int, ...]
    label: str | None = None
    colour: str | None = None


@frozen
class Bar:
    """One row of :func:`horizontal_bars`. ``title`` is the hover text (the full label
    and the value when None); ``key`` picks the colour like :attr:`Series.key`."""

    label: str
    value: int
    title: str | None = None
    key: str | None = None


@frozen
class RateRow:
    """One row of :func:`rate_bars`: ``total`` messages of which ``parts[outcome]`` had
    that outcome (e.g. a recipient domain with its delivered and bounced counts)."""

    label: str
    total: int
    parts: Mapping[str, int]


# --------------------------------------------------------------------------------------
# Text and numbers


def clean_text(text: str) -> str:
    """``text`` as a chart shows it: characters XML cannot carry become U+FFFD, line breaks
    and tabs (which an XML parser would turn into spaces anyway) become spaces, and beyond
    :data:`MAX_TEXT` characters it is cut (a chart's size stays bounded whatever the data)."""
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 1] + "\u2026"
    return _NOT_XML.sub("\ufffd", text).translate(_SPACES)


def _text(text: str) -> Markup:
    """``text`` as escaped XML character data (also fit for a double-quoted attribute)."""
    return escape(clean_text(text))


#: Advance widths in em, a little above DejaVu Sans (among the widest sans-serif fonts a
#: browser may pick for ``system-ui``), so that an estimate is never short of the real width.
_NARROW = frozenset(" !'(),-./:;I[]fijlrt|")
_WIDE = frozenset("%@MWmw")
_BOLD = 1.1


def _char_width(char: str) -> float:
    if char in _NARROW:
        return 0.42
    if char in _WIDE:
        return 1.05
    if char.isascii():
        return 0.8 if char.isupper() or char in "#&~=+<>_" else 0.66
    if unicodedata.combining(char):
        return 0.0
    if unicodedata.east_asian_width(char) in ("W", "F") or ord(char) >= 0x1F000:
        return 1.1
    return 0.9


def text_width(text: str, font_size: float, bold: bool = False) -> float:
    """A generous estimate of the rendered width of ``text`` (there are no font metrics on
    the server): per-character widths a little above a wide sans-serif font's."""
    width = sum(_char_width(char) for char in text) * font_size
    return width * _BOLD if bold else width


def ellipsize(text: str, max_width: float, font_size: float, bold: bool = False) -> str:
    """``text`` cut so that it fits in ``max_width`` (by :func:`text_width`), ending in
    an ellipsis when cut. Linear in the length of ``text`` (a label may be huge)."""
    scale = font_size * (_BOLD if bold else 1.0)
    room = max_width / scale
    total = 0.0
    for char in text:
        total += _char_width(char)
        if total > room:
            break
    else:
        return text
    room -= _char_width("\u2026")
    kept: list[str] = []
    total = 0.0
    for char in text:
        total += _char_width(char)
        if total > room:
            break
        kept.append(char)
    return "".join(kept).rstrip() + "\u2026"


def format_count(value: float, compact: bool = False) -> str:
    """A count as people read it: ``12,345``; with ``compact`` (or from a million on),
    ``1.2M``, ``345K``, ``12B``, ``1T`` (one decimal below 10, none above)."""
    if not compact and abs(value) < 1_000_000:
        return f"{round(value):,}"
    sign = "-" if value < 0 else ""
    value = abs(value)
    units = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))
    for index, (suffix, size) in enumerate(units):
        if value >= size or (index == len(units) - 1 and value >= 1000):
            scaled = value / size
            text = f"{scaled:.1f}" if scaled < 10 else f"{round(scaled):,}"
            if text.endswith(".0"):
                text = text[:-2]
            if text == "1,000" and index > 0:  # 999.96M rounds to 1B, not to 1,000M
                return f"{sign}1{units[index - 1][0]}"
            return f"{sign}{text}{suffix}"
    return f"{sign}{round(value):,}"


def format_percent(part: int, total: int) -> str:
    """``part`` of ``total`` as a percentage with one decimal; a non-zero part never
    shows as 0% nor a part below the total as 100%; an empty total is ``-``."""
    if total <= 0:
        return "-"
    if part <= 0:
        return "0%"
    if part >= total:
        return "100%"
    ratio = 100.0 * part / total
    if ratio < 0.1:
        return "<0.1%"
    if ratio > 99.9:
        return ">99.9%"
    text = f"{ratio:.1f}"
    return (text[:-2] if text.endswith(".0") else text) + "%"


def nice_ticks(maximum: float, min_ticks: int = 4, max_ticks: int = 8) -> list[int]:
    """Y-axis ticks for counts up to ``maximum``: 0 and multiples of the smallest step of
    the form 1, 2 or 5 x 10^n (n >= 0) that needs at most ``max_ticks`` ticks to reach
    ``maximum``; at least ``min_ticks`` (small maxima get a little headroom)."""
    if not math.isfinite(maximum) or maximum < 0:
        raise ValueError(f"nice_ticks: maximum must be a finite count, not {maximum!r}")
    top = max(1, math.ceil(maximum))
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            step = mantissa * 10**exponent
            count = -(-top // step) + 1  # ceil(top / step) + 1, exact for huge integers
            if count <= max_ticks:
                return [step * i for i in range(max(count, min_ticks))]
        exponent += 1


def contrast_ratio(foreground: str, background: str = "#ffffff") -> float:
    """The WCAG 2 contrast ratio of two ``#rrggbb`` colours."""

    def luminance(colour: str) -> float:
        channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    high, low = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def _n(value: float) -> str:
    """A coordinate: at most two decimals, never ``nan`` or ``inf``."""
    if not math.isfinite(value):
        raise ValueError(f"chart coordinate is not finite: {value!r}")
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _colour(key: str | None, position: int, override: str | None = None) -> str:
    if override is not None:
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", override):
            raise ValueError(f"chart colour must be #rrggbb, not {override!r}")
        return override
    if key is not None and key in OUTCOME_COLOURS:
        return OUTCOME_COLOURS[key]
    return _FALLBACK_COLOURS[position % len(_FALLBACK_COLOURS)]


def _hour_label(moment: datetime) -> str:
    return f"{moment.hour:02d}:00"


def _day_label(moment: datetime) -> str:
    return f"{_MONTHS[moment.month - 1]} {moment.day}"


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("chart buckets must be timezone-aware datetimes")
    return moment.astimezone(UTC)


# --------------------------------------------------------------------------------------
# SVG pieces


def _svg(width: float, height: float, label: str, body: Sequence[Markup]) -> Markup:
    return Markup(
        '<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="{label}"'
        ' viewBox="0 0 {w} {h}" width="100%" preserveAspectRatio="xMidYMid meet"'
        ' font-family="{font}" font-size="{size}" fill="{fill}">'
        '<rect class="chart-background" x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>'
        "{body}</svg>"
    ).format(
        label=_text(label),
        w=_n(width),
        h=_n(height),
        font=_FONT,
        size=_n(_TEXT_SIZE),
        fill=TEXT_COLOUR,
        body=Markup("").join(body),
    )


def _heading(title: str, width: float) -> Markup:
    return Markup(
        '<text class="chart-title" x="0" y="{y}" font-size="{size}" font-weight="600">{text}</text>'
    ).format(
        y=_n(_TITLE_SIZE + 2),
        size=_n(_TITLE_SIZE),
        text=_text(ellipsize(title, width, _TITLE_SIZE, bold=True)),
    )


def _empty(title: str, message: str, width: float, height: float) -> Markup:
    """A chart-sized frame with ``message`` in its middle."""
    top = _TITLE_SIZE + 12 if title else 0.0
    box_height = max(height - top, 3 * _TEXT_SIZE)
    body = [_heading(title, width)] if title else []
    body.append(
        Markup(
            '<rect class="chart-empty" x="0" y="{y}" width="{w}" height="{h}" rx="6"'
            ' fill="{fill}" stroke="{grid}"/>'
            '<text class="chart-empty-text" x="{cx}" y="{cy}" text-anchor="middle"'
            ' dominant-baseline="middle" fill="{muted}">{text}</text>'
        ).format(
            y=_n(top),
            w=_n(width),
            h=_n(box_height),
            fill=_EMPTY_FILL,
            grid=_GRID,
            cx=_n(width / 2),
            cy=_n(top + box_height / 2),
            muted=TEXT_MUTED,
            text=_text(ellipsize(message, width - 16, _TEXT_SIZE)),
        )
    )
    return _svg(width, top + box_height, f"{title}: {message}" if title else message, body)


def _legend(entries: Sequence[tuple[str, str]], width: float, top: float) -> tuple[Markup, float]:
    """Swatches and labels in rows that wrap at ``width``; returns them and their height."""
    parts: list[Markup] = []
    x, y = 0.0, top
    row_height = _TEXT_SIZE + 8
    for label, colour in entries:
        text = ellipsize(label, width - 22, _TEXT_SIZE)
        item_width = 18 + text_width(text, _TEXT_SIZE) + 16
        if x > 0 and x + item_width > width:
            x, y = 0.0, y + row_height
        parts.append(
            Markup(
                '<g class="legend-item"><rect x="{x}" y="{ry}" width="12" height="12" rx="2"'
                ' fill="{colour}"/><text x="{tx}" y="{ty}">{text}</text></g>'
            ).format(
                x=_n(x),
                ry=_n(y + (row_height - 12) / 2 - 2),
                colour=colour,
                tx=_n(x + 18),
                ty=_n(y + _TEXT_SIZE),
                text=_text(text),
            )
        )
        x += item_width
    height = (y - top + row_height) if entries else 0.0
    return Markup('<g class="legend">{}</g>').format(Markup("").join(parts)), height


# --------------------------------------------------------------------------------------
# Stacked bars: volume over time


def _thin_labels(
    moments: Sequence[datetime], step: Step, slot: float, plot_left: float, width: float
) -> list[tuple[int, str]]:
    """The x labels to draw, as (bucket index, text): every ``stride`` buckets, aligned on
    round times (00:00, 06:00, ... or Mondays), and never closer to the previous one
    than half their widths plus a gap, nor sticking out of the chart."""
    strides: tuple[int, ...]
    if step == "hour":
        texts = [_day_label(m) if m.hour == 0 else _hour_label(m) for m in moments]
        strides = (1, 2, 3, 4, 6, 12, 24, 48, 72, 168, 336, 720)
    else:
        texts = [_day_label(m) for m in moments]
        strides = (1, 2, 7, 14, 28, 56, 91, 182, 364)
    longest = max(text_width(text, _TICK_SIZE) for text in texts)
    stride = next((s for s in strides if s * slot >= longest + _LABEL_GAP), None)
    if stride is None:
        stride = math.ceil((longest + _LABEL_GAP) / slot)

    def aligned(moment: datetime) -> bool:
        if step == "hour":
            if stride <= 24:
                return moment.hour % stride == 0
            return moment.hour == 0 and moment.toordinal() % (stride // 24) == 0
        if stride % 7 == 0:  # weeks start on Mondays
            return moment.weekday() == 0 and (moment.toordinal() // 7) % (stride // 7) == 0
        return moment.toordinal() % stride == 0

    chosen: list[tuple[int, str]] = []
    last_right = -math.inf
    for index, moment in enumerate(moments):
        if not aligned(moment) and len(moments) > 1:
            continue
        centre = plot_left + (index + 0.5) * slot
        half = text_width(texts[index], _TICK_SIZE) / 2
        if centre - half < 0 or centre + half > width:
            continue
        if centre - half < last_right + _LABEL_GAP:
            continue
        chosen.append((index, texts[index]))
        last_right = centre + half
    if not chosen:  # no round time in the period: the first bucket's label, if it fits
        centre = plot_left + 0.5 * slot
        half = text_width(texts[0], _TICK_SIZE) / 2
        if centre - half >= 0 and centre + half <= width:
            chosen.append((0, texts[0]))
    return chosen


def stacked_bars(
    buckets: Sequence[datetime],
    series: Sequence[Series],
    *,
    step: Step,
    title: str,
    empty_message: str = "No mail in this period.",
    width: float = 480.0,
    height: float = 280.0,
) -> Markup:
    """Volume over time: one bar per bucket (an hour or a day starting at ``buckets[i]``),
    stacked by series in the given order, bottom up.

    The caller gives every bucket of the period, zeros included (a missing hour would
    otherwise look like a bar of its neighbour). All-zero data gives the empty state."""
    if step not in ("hour", "day"):
        raise ValueError(f"stacked_bars: step must be 'hour' or 'day', not {step!r}")
    moments = [_utc(moment) for moment in buckets]
    for layer in series:
        if len(layer.values) != len(moments):
            raise ValueError(
                f"stacked_bars: series {layer.key!r} has {len(layer.values)} values"
                f" for {len(moments)} buckets"
            )
        if any(value < 0 for value in layer.values):
            raise ValueError(f"stacked_bars: series {layer.key!r} has a negative count")
    totals = [sum(layer.values[i] for layer in series) for i in range(len(moments))]
    if not moments or not series or max(totals) == 0:
        return _empty(title, empty_message, width, height)

    entries = [
        (layer.label if layer.label is not None else layer.key, _colour(layer.key, i, layer.colour))
        for i, layer in enumerate(series)
    ]
    legend, legend_height = _legend(entries, width, _TITLE_SIZE + 10)
    ticks = nice_ticks(max(totals))
    compact = ticks[-1] >= 1_000_000
    tick_texts = [format_count(tick, compact) for tick in ticks]
    plot_left = max(text_width(text, _TICK_SIZE) for text in tick_texts) + 10
    plot_right = width - 8
    plot_top = _TITLE_SIZE + 10 + legend_height + 10
    caption_y = height - 4
    axis_y = height - 4 - _TICK_SIZE - 6 - _TICK_SIZE - 8
    if axis_y - plot_top < 60:  # a legend of many rows: grow rather than squash the bars
        axis_y = plot_top + 60
        caption_y = axis_y + 8 + _TICK_SIZE + 6 + _TICK_SIZE
        height = caption_y + 4
    plot_height = axis_y - plot_top
    slot = (plot_right - plot_left) / len(moments)
    bar_width = slot * 0.8 if slot >= 4 else slot
    scale = plot_height / ticks[-1]

    body: list[Markup] = [_heading(title, width), legend]
    grid: list[Markup] = []
    for tick, text in zip(ticks, tick_texts, strict=True):
        y = axis_y - tick * scale
        grid.append(
            Markup(
                '<line x1="{x1}" y1="{y}" x2="{x2}" y2="{y}" stroke="{grid}" stroke-width="1"/>'
                '<text class="y-label" x="{tx}" y="{ty}" text-anchor="end" font-size="{size}"'
                ' fill="{muted}">{text}</text>'
            ).format(
                x1=_n(plot_left),
                x2=_n(plot_right),
                y=_n(y),
                grid=_GRID,
                tx=_n(plot_left - 6),
                ty=_n(y + _TICK_SIZE * 0.35),
                size=_n(_TICK_SIZE),
                muted=TEXT_MUTED,
                text=text,
            )
        )
    body.append(Markup('<g class="y-axis">{}</g>').format(Markup("").join(grid)))

    when_texts = [
        f"{_day_label(m)} {_hour_label(m)} UTC" if step == "hour" else f"{_day_label(m)} UTC"
        for m in moments
    ]
    # The hot loop (720 hourly buckets x several series) builds its strings directly: every
    # text in it is escaped once up front (keys, labels, times), the rest are numbers.
    keys = [str(_text(layer.key)) for layer in series]
    names = [str(_text(label)) for label, _ in entries]
    bar_w = _n(bar_width)
    bars: list[str] = []
    for index, when in enumerate(when_texts):
        safe_when = str(_text(when))
        x = _n(plot_left + index * slot + (slot - bar_width) / 2)
        # Hover texts give exact numbers.
        summary = f"{safe_when} - total: {totals[index]:,}"
        details = [
            f"{names[i]}: {layer.values[index]:,}"
            for i, layer in enumerate(series)
            if layer.values[index]
        ]
        if details:
            summary += " (" + ", ".join(details) + ")"
        # A full-height column behind the segments: hovering (or tapping) anywhere above
        # a bucket tells its numbers, even where a segment is too thin to point at.
        parts = [
            f'<g class="bar"><rect class="bucket" x="{_n(plot_left + index * slot)}"'
            f' y="{_n(plot_top)}" width="{_n(slot)}" height="{_n(plot_height)}"'
            f' fill="#ffffff" fill-opacity="0" stroke="none"><title>{summary}</title></rect>'
        ]
        cursor = axis_y  # the top of the stack so far
        for i, layer in enumerate(series):
            value = layer.values[index]
            if value == 0:
                continue
            # A non-zero count stays visible (1 unit at least: one complaint among a
            # million deliveries matters), never above the plot.
            segment_height = min(max(value * scale, 1.0), cursor - plot_top)
            if segment_height <= 0:
                continue
            cursor -= segment_height
            parts.append(
                f'<rect class="segment" data-series="{keys[i]}" x="{x}" y="{_n(cursor)}"'
                f' width="{bar_w}" height="{_n(segment_height)}" fill="{entries[i][1]}">'
                f"<title>{safe_when} - {names[i]}: {value:,}</title></rect>"
            )
        parts.append("</g>")
        bars.append("".join(parts))
    body.append(
        Markup('<g class="bars" stroke="#ffffff" stroke-width="{sw}">{bars}</g>').format(
            sw="0.5" if bar_width >= 4 else "0", bars=Markup("".join(bars))
        )
    )
    body.append(
        Markup(
            '<line x1="{x1}" y1="{y}" x2="{x2}" y2="{y}" stroke="{muted}" stroke-width="1"/>'
        ).format(x1=_n(plot_left), x2=_n(plot_right), y=_n(axis_y), muted=TEXT_MUTED)
    )

    labels = [
        Markup(
            '<text class="x-label" x="{x}" y="{y}" text-anchor="middle" font-size="{size}"'
            ' fill="{muted}">{text}</text>'
        ).format(
            x=_n(plot_left + (index + 0.5) * slot),
            y=_n(axis_y + 8 + _TICK_SIZE),
            size=_n(_TICK_SIZE),
            muted=TEXT_MUTED,
            text=_text(text),
        )
        for index, text in _thin_labels(moments, step, slot, plot_left, width)
    ]
    body.append(Markup('<g class="x-axis">{}</g>').format(Markup("").join(labels)))
    body.append(
        Markup(
            '<text class="x-caption" x="{x}" y="{y}" text-anchor="end" font-size="{size}"'
            ' fill="{muted}">{text}</text>'
        ).format(
            x=_n(plot_right),
            y=_n(caption_y),
            size=_n(_TICK_SIZE),
            muted=TEXT_MUTED,
            text="Hourly, times in UTC" if step == "hour" else "Daily, dates in UTC",
        )
    )
    first, last = when_texts[0], when_texts[-1]
    label = f"{title}: {format_count(sum(totals))} in total, {first} to {last}"
    return _svg(width, height, label, body)


# --------------------------------------------------------------------------------------
# Horizontal bars: bounces by category, top clicked URLs


def horizontal_bars(
    rows: Sequence[Bar],
    *,
    title: str,
    empty_message: str = "Nothing in this period.",
    width: float = 480.0,
    label_width: float | None = None,
    formatter: Callable[[int], str] = format_count,
) -> Markup:
    """Labelled bars, one per row in the given order, longest = largest value, the value at
    the bar's end. A label longer than its column (``label_width``, 40% of the width by
    default) is ellipsized; the full text is in the row's ``<title>``."""
    if any(row.value < 0 for row in rows):
        raise ValueError("horizontal_bars: a value is negative")
    if not rows or max(row.value for row in rows) == 0:
        return _empty(title, empty_message, width, 140.0)
    column = width * 0.4 if label_width is None else label_width
    values = [formatter(row.value) for row in rows]
    value_room = max(text_width(text, _TEXT_SIZE) for text in values) + 12
    bar_left = column + 8
    bar_room = max(width - bar_left - value_room, 10.0)
    top = _TITLE_SIZE + 14
    row_height = _TEXT_SIZE + 14
    maximum = max(row.value for row in rows)

    body: list[Markup] = [_heading(title, width)]
    for position, (row, value_text) in enumerate(zip(rows, values, strict=True)):
        y = top + position * row_height
        length = bar_room * row.value / maximum
        hover = row.title if row.title is not None else f"{row.label}: {value_text}"
        body.append(
            Markup(
                '<g class="row"><title>{hover}</title>'
                '<text class="row-label" x="{lx}" y="{ty}" text-anchor="end">{label}</text>'
                '<rect class="row-bar" x="{bx}" y="{by}" width="{bw}" height="{bh}" rx="2"'
                ' fill="{colour}"/>'
                '<text class="row-value" x="{vx}" y="{ty}">{value}</text></g>'
            ).format(
                hover=_text(hover),
                lx=_n(column),
                ty=_n(y + row_height / 2 + _TEXT_SIZE * 0.35),
                label=_text(ellipsize(row.label, column, _TEXT_SIZE)),
                bx=_n(bar_left),
                by=_n(y + 4),
                bw=_n(max(length, 1.0) if row.value else 0.0),
                bh=_n(row_height - 8),
                colour=_colour(row.key, 0 if row.key is None else position),
                vx=_n(bar_left + length + 6),
                value=_text(value_text),
            )
        )
    height = top + len(rows) * row_height + 6
    return _svg(width, height, f"{title}: {len(rows)} rows", body)


# --------------------------------------------------------------------------------------
# Rate bars: top recipient domains with their delivery and bounce rates


def rate_bars(
    rows: Sequence[RateRow],
    *,
    title: str,
    outcomes: Sequence[str] = ("delivered", "deferred", "bounced"),
    empty_message: str = "No mail in this period.",
    width: float = 480.0,
) -> Markup:
    """One 100% bar per row, split by ``outcomes`` (the rest in grey). Each row takes the
    whole width (narrow screens): its label and total above the bar, the share of each
    outcome written out below it (``98.2% delivered, 0.4% deferred, 1.1% bounced``)."""
    for row in rows:
        if row.total < 0 or any(row.parts.get(outcome, 0) < 0 for outcome in outcomes):
            raise ValueError(f"rate_bars: a negative count in row {row.label!r}")
    if not rows or max(row.total for row in rows) == 0:
        return _empty(title, empty_message, width, 140.0)
    entries = [(outcome, _colour(outcome, i)) for i, outcome in enumerate(outcomes)]
    legend, legend_height = _legend([*entries, ("other", _REST)], width, _TITLE_SIZE + 10)
    top = _TITLE_SIZE + 10 + legend_height + 8
    bar_height = 12.0
    row_height = _TEXT_SIZE + 6 + bar_height + 6 + _TICK_SIZE + 14

    body: list[Markup] = [_heading(title, width), legend]
    for position, row in enumerate(rows):
        y = top + position * row_height
        shares = [
            f"{format_percent(row.parts.get(outcome, 0), row.total)} {outcome}"
            for outcome in outcomes
        ]
        summary = ", ".join(shares) if row.total else "no mail"
        total = f"{format_count(row.total)} messages"
        label_room = width - text_width(total, _TICK_SIZE) - 12
        bar_y = y + _TEXT_SIZE + 6
        parts = [
            Markup(
                "<title>{hover}</title>"
                '<text class="row-label" x="0" y="{ty}">{label}</text>'
                '<text class="row-total" x="{w}" y="{ty}" text-anchor="end" font-size="{small}"'
                ' fill="{muted}">{total}</text>'
                '<rect class="rate-track" x="0" y="{by}" width="{w}" height="{bh}" fill="{rest}"/>'
            ).format(
                hover=_text(f"{row.label}: {row.total:,} messages, {summary}"),
                ty=_n(y + _TEXT_SIZE),
                label=_text(ellipsize(row.label, label_room, _TEXT_SIZE)),
                w=_n(width),
                small=_n(_TICK_SIZE),
                muted=TEXT_MUTED,
                total=_text(total),
                by=_n(bar_y),
                bh=_n(bar_height),
                rest=_REST,
            )
        ]
        x = 0.0
        for outcome, colour in entries:
            part = min(row.parts.get(outcome, 0), row.total)
            if part <= 0 or row.total <= 0:
                continue
            # At least a sliver for a non-zero share, never past the track's end.
            length = min(max(width * part / row.total, 1.0), width - x)
            if length <= 0:
                continue
            parts.append(
                Markup(
                    '<rect class="rate-part" data-series="{key}" x="{x}" y="{y}" width="{w}"'
                    ' height="{h}" fill="{colour}"/>'
                ).format(
                    key=_text(outcome),
                    x=_n(x),
                    y=_n(bar_y),
                    w=_n(length),
                    h=_n(bar_height),
                    colour=colour,
                )
            )
            x += length
        parts.append(
            Markup(
                '<text class="row-rates" x="0" y="{y}" font-size="{size}" fill="{muted}">'
                "{text}</text>"
            ).format(
                y=_n(bar_y + bar_height + 6 + _TICK_SIZE),
                size=_n(_TICK_SIZE),
                muted=TEXT_MUTED,
                text=_text(ellipsize(summary, width, _TICK_SIZE)),
            )
        )
        body.append(Markup('<g class="row">{}</g>').format(Markup("").join(parts)))
    height = top + len(rows) * row_height
    return _svg(width, height, f"{title}: {len(rows)} rows", body)
