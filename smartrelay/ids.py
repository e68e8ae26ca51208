"""Queue ids: short, unique across nodes, and sorting in time order."""

from __future__ import annotations

import secrets

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: no words in ids
ID_BASE = len(_ALPHABET)


def encode_digits(number: int, width: int) -> str:
    """``number`` as ``width`` digits of the id alphabet (most significant first)."""
    chars = []
    for _ in range(width):
        number, digit = divmod(number, ID_BASE)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_queue_id(now: float) -> str:
    """9 characters of milliseconds (good until the year 2840) and 7 random ones (~34 bits)."""
    return encode_digits(int(now * 1000), 9) + encode_digits(secrets.randbelow(ID_BASE**7), 7)
