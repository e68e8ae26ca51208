"""The search terms of a message (``message_terms``, schema 010): what the reports' message
search finds a message by, written in the transaction that accepts it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from smartrelay.storage.base import chunks, domain_of, marks
from smartrelay.storage.interfaces import ICursor

#: A search term longer than this (characters) is not stored, and cannot be searched: the
#: primary key must stay under PostgreSQL's B-tree entry limit (about 2,700 bytes).
MAX_TERM = 500


def recipient_term(address: str) -> str:
    return "r:" + address.lower()


def recipient_domain_term(domain: str) -> str:
    return "rd:" + domain.lower()


def sender_term(address: str) -> str:
    return "s:" + address.lower()


def sender_domain_term(domain: str) -> str:
    return "sd:" + domain.lower()


def tag_term(tag: str) -> str:
    return "t:" + tag


def metadata_term(key: str, value: str) -> str:
    return "m:" + json.dumps([key, value], ensure_ascii=False, separators=(",", ":"))


def message_terms(
    sender: str, recipients: Iterable[str], tags: Iterable[str], metadata: dict[str, str]
) -> list[str]:
    """The distinct search terms of a message (those up to :data:`MAX_TERM` characters)."""
    terms = [sender_term(sender)]
    sender_domain = domain_of(sender) if "@" in sender else ""
    if sender_domain:
        terms.append(sender_domain_term(sender_domain))
    for address in recipients:
        terms.append(recipient_term(address))
        terms.append(recipient_domain_term(domain_of(address)))
    terms.extend(tag_term(str(t)) for t in tags)
    terms.extend(metadata_term(str(k), str(v)) for k, v in metadata.items())
    return [t for t in dict.fromkeys(terms) if len(t) <= MAX_TERM]


async def insert_terms(cursor: ICursor, rows: Iterable[tuple[str, int, Iterable[str]]]) -> None:
    """Insert the terms of messages (queue_id, received_at ms, terms) in the caller's
    transaction."""
    values = [
        (term, received_at, queue_id) for queue_id, received_at, terms in rows for term in terms
    ]
    if values:
        await cursor.write_many(
            "INSERT INTO message_terms (term, received_at, queue_id) VALUES (?, ?, ?)", values
        )


async def stored_terms(cursor: ICursor, queue_ids: Sequence[str]) -> list[tuple[str, int, str]]:
    """(term, received_at, queue_id) of stored messages, computed again from their rows as
    the accept path computed them: what the purge deletes and the migration fills."""
    rows: list[tuple[str, int, str]] = []
    for chunk in chunks(queue_ids):
        where = f"queue_id IN ({marks(len(chunk))})"
        await cursor.execute(
            f"SELECT queue_id, address FROM recipients WHERE {where} ORDER BY id", chunk
        )
        addresses: dict[str, list[str]] = {}
        for queue_id, address in cursor.fetchall():
            addresses.setdefault(str(queue_id), []).append(str(address))
        await cursor.execute(
            f"SELECT queue_id, received_at, sender, tags, metadata FROM messages WHERE {where}",
            chunk,
        )
        for queue_id, received_at, sender, tags, metadata in cursor.fetchall():
            terms = message_terms(
                str(sender),
                addresses.get(str(queue_id), []),
                [str(t) for t in _loaded(tags, list)],
                {str(k): str(v) for k, v in _loaded(metadata, dict).items()},
            )
            rows.extend((term, int(received_at), str(queue_id)) for term in terms)
    return rows


async def delete_terms(cursor: ICursor, queue_ids: Sequence[str]) -> None:
    """Delete the terms of messages about to be deleted (by primary key: the table has no
    index by queue id, which would cost every accepted message a third B-tree insert)."""
    keys = await stored_terms(cursor, queue_ids)
    for chunk in chunks(keys, 300):
        await cursor.execute(
            "DELETE FROM message_terms WHERE (term, received_at, queue_id) IN"
            f" (VALUES {', '.join(['(?, ?, ?)'] * len(chunk))})",
            [value for key in chunk for value in key],
        )


def _loaded(value: object, kind: type[Any]) -> Any:
    try:
        loaded = json.loads(str(value)) if value is not None else kind()
    except ValueError:
        return kind()
    return loaded if isinstance(loaded, kind) else kind()
