"""The search terms of a message (``message_terms``, schema 010): what the reports' message
search finds a message by, written in the transaction that accepts it."""

from __future__ import annotations

import json
from collections.abc import Iterable

from smartrelay.storage.base import domain_of
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
        await cursor.executemany(
            "INSERT INTO message_terms (term, received_at, queue_id) VALUES (?, ?, ?)", values
        )
