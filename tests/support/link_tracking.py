"""A ``rewrite_url`` for the HTML rewriting tests, which numbers the links it sees, and the
means to undo what it wrote."""

from __future__ import annotations

import re

from smartrelay.rewrap.html import HtmlRewrite, rewrite_html

TOKEN = re.compile(r"https://t\.test/c/(\d{4})")


class Tracker:
    """A ``rewrite_url`` numbering the links it sees: ``https://t.test/c/0001`` ..."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, url: str) -> str:
        self.seen.append(url)
        return f"https://t.test/c/{len(self.seen):04d}"


def track(html: str, pixel_url: str | None = None) -> tuple[HtmlRewrite, Tracker]:
    tracker = Tracker()
    result = rewrite_html(html, tracker, pixel_url)
    assert result.links == tuple(tracker.seen)
    return result, tracker


def undo(html: str, raw_values: list[str]) -> str:
    """Put the original source text of each rewritten href value back."""
    return TOKEN.sub(lambda m: raw_values[int(m.group(1)) - 1], html)
