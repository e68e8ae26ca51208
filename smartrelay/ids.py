"""Queue ids: short, unique across nodes, and sorting in time order."""

from __future__ import annotations

import secrets

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: no words in ids
_BASE = len(_ALPHABET)


def _encode(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, _BASE)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_queue_id(now: float) -> str:
    """9 characters of milliseconds (good until the year 2840) and 7 random ones (~34 bits)."""
    return _encode(int(now * 1000), 9) + _encode(secrets.randbelow(_BASE**7), 7)
