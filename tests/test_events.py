"""The event vocabulary (SPEC section 5): one source of types and fields, one JSON and one
CSV form; the ``data`` stored per type keeps the shape existing rows have."""

from __future__ import annotations

import io
import json

from smartrelay import config, events
from smartrelay.events import (
    AlertEvent,
    BouncedEvent,
    ClickedEvent,
    ComplainedEvent,
    DeferredEvent,
    DeliveredEvent,
    DroppedEvent,
    EventData,
    ExpiredEvent,
    ExportedEvent,
    OpenedEvent,
    ReceivedEvent,
    SuppressedEvent,
    UnsubscribedEvent,
    WarningEvent,
)

#: The ``data`` each type was written with before the vocabulary had classes (the rows of
#: existing databases): the same keys, the same JSON.
STORED: list[tuple[EventData, str]] = [
    (
        ReceivedEvent(120, "127.0.0.1", None),
        '{"client_ip": "127.0.0.1", "credential": null, "size": 120}',
    ),
    (SuppressedEvent("manual"), '{"reason": "manual"}'),
    (
        DeliveredEvent("mx.example.net", "250 ok", True, 1),
        '{"attempt": 1, "mx": "mx.example.net", "reply": "250 ok", "tls": true}',
    ),
    (
        DeferredEvent("mx.example.net", "451 later", 2, "2026-01-01T00:00:00Z"),
        '{"attempt": 2, "mx": "mx.example.net", "next_attempt": "2026-01-01T00:00:00Z",'
        ' "reply": "451 later"}',
    ),
    (
        BouncedEvent("mailbox-full", False, "5.2.2", "552 full", "smtp"),
        '{"category": "mailbox-full", "hard": false, "reply": "552 full", "source": "smtp",'
        ' "status": "5.2.2"}',
    ),
    (ExpiredEvent(7), '{"attempts": 7}'),
    (
        ComplainedEvent("abuse", "fbl.example.net"),
        '{"feedback_type": "abuse", "source": "fbl.example.net"}',
    ),
    (
        OpenedEvent("Mozilla", "192.0.2.1", False),
        '{"ip": "192.0.2.1", "machine": false, "user_agent": "Mozilla"}',
    ),
    (
        ClickedEvent(None, "192.0.2.1", True, "https://example.com/"),
        '{"ip": "192.0.2.1", "machine": true, "url": "https://example.com/", "user_agent": null}',
    ),
    (UnsubscribedEvent("one-click"), '{"method": "one-click"}'),
    (DroppedEvent("queue drop"), '{"by": "queue drop"}'),
    (
        WarningEvent(({"kind": "no-dkim-key", "detail": "no key"},)),
        '{"warnings": [{"detail": "no key", "kind": "no-dkim-key"}]}',
    ),
    (
        AlertEvent("credential-volume", "app", 2400, 120.5, "hold"),
        '{"action": "hold", "baseline": 120.5, "credential": "app", "kind": "credential-volume",'
        ' "rate": 2400}',
    ),
]


def test_stored_data_keeps_the_shape_of_existing_rows() -> None:
    assert [type(e) for e, _ in STORED] == list(events.EVENT_CLASSES)
    for event, stored in STORED:
        assert json.dumps(events.event_data(event), sort_keys=True) == stored


def test_one_source_of_types() -> None:
    assert (
        tuple(t for t in events.ALL_TYPES if t not in ("dropped", "warning")) == events.EVENT_TYPES
    )
    assert events.EVENT_TYPES[-1] == "alert"
    assert config.EVENT_TYPES is events.EVENT_TYPES  # what [webhook] events accepts
    assert events.EVENT_TYPES[:3] == ("received", "suppressed", "delivered")
    assert {cls.type for cls in events.EVENT_CLASSES} == set(events.ALL_TYPES)


def test_csv_header_is_the_common_fields_then_each_types_own() -> None:
    columns = events.CSV_COLUMNS
    assert columns == (
        *events.COMMON_FIELDS,
        "size", "client_ip", "credential", "reason", "mx", "reply", "tls", "attempt",
        "next_attempt", "category", "hard", "status", "source", "attempts", "feedback_type",
        "user_agent", "ip", "machine", "url", "method", "by", "warnings", "kind", "rate",
        "baseline", "action", "sandbox",
    )  # fmt: skip


def _exported(event: EventData) -> ExportedEvent:
    return ExportedEvent(
        id=7,
        type=event.type,
        time=1_700_000_000.5,
        queue_id="Q1",
        recipient="ü@example.net",
        data=events.event_data(event),
        sender="app@example.com",
        tags=("welcome",),
        metadata={"user": "42"},
    )


def test_json_and_csv_forms() -> None:
    event = _exported(DeliveredEvent("mx.example.net", "250 ok", True, 1))
    assert events.event_json(event) == (
        '{"id":7,"type":"delivered","time":"2023-11-14T22:13:20.500Z","queue_id":"Q1",'
        '"sender":"app@example.com","recipient":"ü@example.net","tags":["welcome"],'
        '"metadata":{"user":"42"},"mx":"mx.example.net","reply":"250 ok","tls":true,"attempt":1,'
        '"sandbox":false}'
    )
    out = io.StringIO()
    writer = events.csv_writer(out)
    writer.writerow(events.csv_row(event))
    writer.writerow(events.csv_row(_exported(ReceivedEvent(5, None, None))))
    header, delivered, received = out.getvalue().splitlines()
    assert header == ",".join(events.CSV_COLUMNS)
    row = dict(zip(events.CSV_COLUMNS, delivered.split(","), strict=False))
    assert row["tls"] == "true" and row["attempt"] == "1" and row["size"] == ""
    assert row["tags"] == '"[""welcome""]"'
    assert received.split(",")[events.CSV_COLUMNS.index("client_ip")] == ""
