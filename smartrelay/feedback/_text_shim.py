"""TEMPORARY shim, for the lead to delete at merge.

``smartrelay.feedback.nonstandard.failed_recipients_from_text`` (the non-standard, text
bounce reader) is written on another branch (fb-text). Until it is merged, this stand-in
imports it when it exists and otherwise finds nothing (``[]``). At merge: delete this file and
import ``failed_recipients_from_text`` from ``smartrelay.feedback.nonstandard`` in
``classify.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from email.message import EmailMessage
from typing import cast

from smartrelay.feedback.model import FailedRecipient

__all__ = ["failed_recipients_from_text"]

_Reader = Callable[[EmailMessage], list[FailedRecipient]]


def _load() -> _Reader | None:
    try:
        module = importlib.import_module("smartrelay.feedback.nonstandard")
    except ImportError:
        return None
    return cast(_Reader | None, getattr(module, "failed_recipients_from_text", None))


_READER = _load()


def failed_recipients_from_text(message: EmailMessage) -> list[FailedRecipient]:
    """The failed recipients of a non-standard bounce; [] until fb-text is merged."""
    if _READER is None:
        return []
    return _READER(message)
