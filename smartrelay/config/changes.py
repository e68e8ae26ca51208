"""What differs between two parsed configs, named as in the TOML file (for a reload's log
line: names only, never values, which may be secrets)."""

from __future__ import annotations

import attrs

from smartrelay.config.model import Config

__all__ = ["config_changes"]

#: Top-level Config fields that are arrays of tables in the file.
_ARRAYS = {
    "dkim_keys": "[[dkim.keys]]",
    "feedback_mailboxes": "[[feedback.mailboxes]]",
    "feedback_rules": "[[feedback.rules]]",
    "webhooks": "[[webhooks]]",
}


def config_changes(old: Config, new: Config) -> list[str]:
    """The keys (``[smtp] max_connections``) and arrays of tables (``[[webhooks]]``) whose
    parsed values differ, in the order of the Config class. The file's path is not compared."""
    changed = []
    for field in attrs.fields(Config):
        if field.name == "path":
            continue
        before, after = getattr(old, field.name), getattr(new, field.name)
        if before == after:
            continue
        if field.name in _ARRAYS or not attrs.has(type(before)):
            changed.append(_ARRAYS.get(field.name, field.name))
            continue
        for key in attrs.fields(type(before)):
            if getattr(before, key.name) != getattr(after, key.name):
                changed.append(f"[{field.name}] {key.name}")
    return changed
