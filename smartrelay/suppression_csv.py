"""The suppression list's CSV format, shared by ``smartrelay-ctl suppression import/export``
and the reports UI's import and export (one parser, one writer, one address check).

A file is either ``export``'s format (a header row naming some of :data:`SUPPRESSION_COLUMNS`,
``address`` among them) or a bare list of addresses, one per line. ``reason`` defaults to
``manual``, ``expires_at`` (RFC 3339) to forever; ``created_at`` is ignored on import (an
entry's creation is its import).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator

from attrs import frozen

from smartrelay.storage.suppressions import SUPPRESSION_REASONS, NewSuppression, Suppression
from smartrelay.timefmt import parse_rfc3339, rfc3339

__all__ = [
    "SUPPRESSION_COLUMNS",
    "BadLine",
    "ParsedSuppressions",
    "SuppressionFileError",
    "check_address",
    "export_row",
    "parse_suppression_csv",
]

SUPPRESSION_COLUMNS = ("address", "reason", "created_at", "expires_at", "note")
#: White space and control characters: never in an address.
_NOT_IN_ADDRESS = re.compile(r"[\s\x00-\x1f\x7f]")


class SuppressionFileError(ValueError):
    """The file as a whole cannot be read (its header, its CSV syntax); ``line`` is where."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@frozen
class BadLine:
    """A row that is not an entry, and why."""

    line: int
    reason: str


@frozen
class ParsedSuppressions:
    """The entries of a file, in its order, and the rows refused (``bad_lines``)."""

    entries: tuple[NewSuppression, ...]
    bad_lines: tuple[BadLine, ...]


def check_address(address: str) -> str:
    """``address`` stripped; ValueError unless it looks like ``local@domain.tld``."""
    local, at, domain = address.strip().rpartition("@")
    if not at or not local or "." not in domain or _NOT_IN_ADDRESS.search(address.strip()):
        raise ValueError(f"not an email address: {address!r}")
    return address.strip()


def parse_suppression_csv(lines: Iterable[str]) -> ParsedSuppressions:
    """Rows of ``export``'s format, or a bare list of addresses (one per line, no header).

    A bad row is kept in ``bad_lines`` (the caller decides: the CLI refuses the whole file, the
    UI imports the others); a broken header or CSV syntax raises :class:`SuppressionFileError`.
    """
    reader = csv.reader(lines)
    rows = _rows(reader)
    first = next(rows, None)
    if first is None:
        return ParsedSuppressions((), ())
    header = [c.strip().lower() for c in first]
    pending: list[tuple[int, list[str]]] = []
    if "address" in header:
        unknown = [c for c in header if c not in SUPPRESSION_COLUMNS]
        if unknown:
            raise SuppressionFileError(1, f"unknown column(s) {', '.join(unknown)}")
    else:
        header = ["address"]
        pending.append((reader.line_num, first))
    entries: list[NewSuppression] = []
    bad: list[BadLine] = []
    for number, row in _numbered(pending, reader, rows):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            bad.append(BadLine(number, f"{len(row)} fields, expected {len(header)}"))
            continue
        fields = dict(zip(header, (cell.strip() for cell in row), strict=False))
        try:
            entries.append(_entry(fields))
        except ValueError as error:
            bad.append(BadLine(number, str(error)))
    return ParsedSuppressions(tuple(entries), tuple(bad))


def export_row(entry: Suppression) -> list[str]:
    """The CSV row of an entry, in :data:`SUPPRESSION_COLUMNS` order."""
    expires = "" if entry.expires_at is None else rfc3339(entry.expires_at)
    return [entry.address, entry.reason, rfc3339(entry.created_at), expires, entry.note]


def _rows(reader: Iterator[list[str]]) -> Iterator[list[str]]:
    try:
        yield from reader
    except csv.Error as error:
        line = getattr(reader, "line_num", 0)
        raise SuppressionFileError(line, f"not CSV ({error})") from None


def _numbered(
    pending: list[tuple[int, list[str]]], reader: Iterator[list[str]], rows: Iterator[list[str]]
) -> Iterator[tuple[int, list[str]]]:
    yield from pending
    for row in rows:
        yield getattr(reader, "line_num", 0), row


def _entry(fields: dict[str, str]) -> NewSuppression:
    if any("\x00" in value for value in fields.values()):
        raise ValueError("a field holds a NUL character")
    reason = fields.get("reason") or "manual"
    if reason not in SUPPRESSION_REASONS:
        raise ValueError(f"unknown reason {reason!r} (one of {', '.join(SUPPRESSION_REASONS)})")
    expires = fields.get("expires_at") or ""
    try:
        expires_at = None if expires in ("", "forever") else parse_rfc3339(expires)
    except (ValueError, OverflowError):
        raise ValueError(f"expires_at: not an RFC 3339 time: {expires!r}") from None
    return NewSuppression(
        check_address(fields.get("address", "")), reason, expires_at, fields.get("note", "")
    )
