"""Events as users see them (SPEC section 5): one JSON object, or one CSV row, per event."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import IO, Any

from smartrelay.storage.store import ExportedEvent
from smartrelay.timefmt import rfc3339

#: The common fields, then every type's extra fields (SPEC section 5), as CSV columns.
CSV_COLUMNS = (
    "id",
    "type",
    "time",
    "queue_id",
    "sender",
    "recipient",
    "tags",
    "metadata",
    "size",
    "client_ip",
    "credential",
    "reason",
    "mx",
    "reply",
    "tls",
    "attempt",
    "next_attempt",
    "category",
    "hard",
    "status",
    "source",
    "attempts",
    "feedback_type",
    "user_agent",
    "ip",
    "machine",
    "url",
    "method",
)


def event_object(event: ExportedEvent) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": event.id,
        "type": event.type,
        "time": rfc3339(event.time),
        "queue_id": event.queue_id,
        "sender": event.sender,
        "recipient": event.recipient,
        "tags": list(event.tags),
        "metadata": event.metadata,
    }
    for key, value in event.data.items():
        out.setdefault(key, value)
    return out


def write_jsonl(events: Iterable[ExportedEvent], out: IO[str]) -> None:
    for event in events:
        out.write(json.dumps(event_object(event), ensure_ascii=False, separators=(",", ":")))
        out.write("\n")


def csv_writer(out: IO[str]) -> Any:
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    return writer


def csv_row(event: ExportedEvent) -> dict[str, str]:
    row = {}
    for key, value in event_object(event).items():
        if value is None:
            row[key] = ""
        elif isinstance(value, bool):
            row[key] = "true" if value else "false"
        elif isinstance(value, list | dict):
            row[key] = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        else:
            row[key] = str(value)
    return row
