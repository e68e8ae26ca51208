"""The event vocabulary (SPEC section 5): every event type, its fields, and the two forms users
see, one JSON object or one CSV row per event.

Each type is a frozen class holding the type's own fields. What storage writes in the
``events.data`` column is :func:`event_data` of it (JSON, sorted keys); an exported event is
the common fields (id, type, time, queue id, sender, recipient, tags, metadata) followed by
the type's fields (:func:`event_object`, :func:`csv_row`). The CLI's ``events export`` and the
coming webhooks and API use these forms; nothing else spells an event type or its fields.

Added to SPEC's list: ``warning`` (content warnings, docs/deliverability.md). ``dropped`` rows
written before ``by`` existed have no ``by`` (exported without it). ``delivered.sandbox``
(sandbox credentials, docs/smtp.md) came later than the other fields: a row without it (written
before it, or of mail not sandboxed: it is stored only when true) is exported with
``sandbox: false``, and in CSV its column comes after all the others, so the
columns before it keep their places (:data:`ADDED_LATER`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import IO, Any, ClassVar

from attrs import fields, frozen

from smartrelay.timefmt import rfc3339


@frozen
class ReceivedEvent:
    """The message was accepted (one per recipient)."""

    type: ClassVar[str] = "received"
    size: int
    client_ip: str | None
    credential: str | None


@frozen
class SuppressedEvent:
    """Not sent: the address is on the suppression list."""

    type: ClassVar[str] = "suppressed"
    reason: str  # hard_bounce, soft_bounce, complaint, unsubscribe, manual


#: The ``mx`` of a ``delivered`` event of sandbox mail kept in the relay (docs/smtp.md).
SANDBOX_MX = "sandbox"


@frozen
class DeliveredEvent:
    type: ClassVar[str] = "delivered"
    mx: str  # "sandbox" when a sandbox credential's mail was kept in the relay
    reply: str  # the remote server's reply line
    tls: bool
    attempt: int
    sandbox: bool = False  # submitted with a sandbox credential (docs/smtp.md)


@frozen
class DeferredEvent:
    type: ClassVar[str] = "deferred"
    mx: str
    reply: str
    attempt: int
    next_attempt: str  # RFC 3339 UTC


@frozen
class BouncedEvent:
    type: ClassVar[str] = "bounced"
    category: str  # SPEC section 5's bounce categories
    hard: bool
    status: str  # enhanced status code, e.g. 5.1.1
    reply: str
    source: str  # smtp or dsn


@frozen
class ExpiredEvent:
    type: ClassVar[str] = "expired"
    attempts: int


@frozen
class ComplainedEvent:
    type: ClassVar[str] = "complained"
    feedback_type: str
    source: str  # the ARF reporter


@frozen
class OpenedEvent:
    type: ClassVar[str] = "opened"
    user_agent: str | None
    ip: str | None
    machine: bool  # a proxy, prefetcher or scanner


@frozen
class ClickedEvent:
    type: ClassVar[str] = "clicked"
    user_agent: str | None
    ip: str | None
    machine: bool
    url: str


@frozen
class UnsubscribedEvent:
    type: ClassVar[str] = "unsubscribed"
    method: str  # one-click, page, mailto


@frozen
class DroppedEvent:
    """The operator dropped the message (``queue drop``) before it was delivered."""

    type: ClassVar[str] = "dropped"
    by: str  # who: "queue drop" (the CLI), "ui:USERNAME" (the reports UI)


@frozen
class WarningEvent:
    """Content warnings of a message, computed at re-wrap (docs/deliverability.md): one event
    per message (its recipient empty), recorded once. An addition to SPEC section 5."""

    type: ClassVar[str] = "warning"
    warnings: tuple[dict[str, str], ...]  # {"kind", "detail"}, at most one per kind


@frozen
class AlertEvent:
    """Something the operator should look at, about no one message (its queue id and
    recipient empty). ``credential-volume``: an SMTP credential sent far more than its
    baseline (docs/smtp.md, "Volume alerts"); ``action`` is what the relay did."""

    type: ClassVar[str] = "alert"
    kind: str  # credential-volume
    credential: str
    rate: int  # messages in the last window
    baseline: float  # messages per window, exponentially weighted
    action: str  # warn, hold


EventData = (
    ReceivedEvent
    | SuppressedEvent
    | DeliveredEvent
    | DeferredEvent
    | BouncedEvent
    | ExpiredEvent
    | ComplainedEvent
    | OpenedEvent
    | ClickedEvent
    | UnsubscribedEvent
    | DroppedEvent
    | WarningEvent
    | AlertEvent
)

#: Every event class, in lifecycle order.
EVENT_CLASSES: tuple[type[EventData], ...] = (
    ReceivedEvent,
    SuppressedEvent,
    DeliveredEvent,
    DeferredEvent,
    BouncedEvent,
    ExpiredEvent,
    ComplainedEvent,
    OpenedEvent,
    ClickedEvent,
    UnsubscribedEvent,
    DroppedEvent,
    WarningEvent,
    AlertEvent,
)
#: The type's own fields, by type name.
FIELDS: dict[str, tuple[str, ...]] = {
    cls.type: tuple(f.name for f in fields(cls)) for cls in EVENT_CLASSES
}
#: Every type, in lifecycle order (``events export --type``).
ALL_TYPES: tuple[str, ...] = tuple(FIELDS)
#: The types webhooks may subscribe to: a message's and a recipient's lifecycle and the
#: relay's ``alert`` (all but the operator's ``dropped`` and the content ``warning``).
EVENT_TYPES: tuple[str, ...] = tuple(
    t for t in ALL_TYPES if t not in (DroppedEvent.type, WarningEvent.type)
)
#: The fields every exported event has, before its type's own.
COMMON_FIELDS = ("id", "type", "time", "queue_id", "sender", "recipient", "tags", "metadata")
#: Fields added to a type after its first release, with the value a row written before them
#: is exported with (by type). Their CSV columns come last, in this order.
ADDED_LATER: dict[str, dict[str, Any]] = {DeliveredEvent.type: {"sandbox": False}}
_LATE_COLUMNS = tuple(name for added in ADDED_LATER.values() for name in added)
#: The CSV header: the common fields, then every type's fields (each once, in type order),
#: then the fields of :data:`ADDED_LATER`.
CSV_COLUMNS: tuple[str, ...] = tuple(
    dict.fromkeys(
        (
            *COMMON_FIELDS,
            *(name for names in FIELDS.values() for name in names if name not in _LATE_COLUMNS),
            *_LATE_COLUMNS,
        )
    )
)


def event_data(event: EventData) -> dict[str, Any]:
    """The type's fields as the ``data`` JSON object stored with the event row. A field of
    :data:`ADDED_LATER` is left out when it holds its default: such rows keep the shape rows
    had before it (``delivered`` without ``sandbox``), and export the same."""
    defaults = ADDED_LATER.get(event.type, {})
    data = {}
    for name in FIELDS[event.type]:
        value = getattr(event, name)
        if name in defaults and value is defaults[name]:
            continue
        data[name] = value
    return data


@frozen
class ExportedEvent:
    """An event row as read back, with its message's sender, tags and metadata."""

    id: int
    type: str
    time: float
    queue_id: str | None
    recipient: str | None
    data: dict[str, Any]
    sender: str | None
    tags: tuple[str, ...]
    metadata: dict[str, str]


def event_object(event: ExportedEvent) -> dict[str, Any]:
    """The JSON form: the common fields, then the type's in :data:`FIELDS` order (then any
    other key the row holds)."""
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
    data = event.data
    defaults = ADDED_LATER.get(event.type, {})
    for key in FIELDS.get(event.type, ()):
        if key in data:
            out[key] = data[key]
        elif key in defaults:
            out[key] = defaults[key]
    for key, value in data.items():  # a key this version does not know: kept, after
        out.setdefault(key, value)
    return out


def event_json(event: ExportedEvent) -> str:
    """:func:`event_object` as compact JSON text (UTF-8 kept as is)."""
    return json.dumps(event_object(event), ensure_ascii=False, separators=(",", ":"))


def write_jsonl(events: Iterable[ExportedEvent], out: IO[str]) -> None:
    for event in events:
        out.write(event_json(event))
        out.write("\n")


def csv_writer(out: IO[str]) -> Any:
    """A writer of :func:`csv_row` rows under the :data:`CSV_COLUMNS` header (written now)."""
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    return writer


def csv_row(event: ExportedEvent) -> dict[str, str]:
    """The CSV form: empty for null, ``true``/``false``, lists and objects as JSON."""
    return {key: _csv_value(value) for key, value in event_object(event).items()}


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)
