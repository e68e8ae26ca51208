"""One small engine class per database behind one ``run_interaction``."""

from __future__ import annotations

from smartrelay.reactor import IRelayReactor
from smartrelay.storage.engines.postgres import PostgresEngine
from smartrelay.storage.engines.sqlite import SqliteEngine
from smartrelay.storage.interfaces import IDatabaseEngine


def create_engine(reactor: IRelayReactor, url: str) -> IDatabaseEngine:
    """An engine for a ``sqlite:PATH`` or ``postgresql://...`` URL (validated by the config)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresEngine(reactor, url)
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:")
        if path.startswith("//"):
            path = path[2:]
        return SqliteEngine(reactor, path)
    raise ValueError(f"unsupported database URL {url!r}")


__all__ = ["PostgresEngine", "SqliteEngine", "create_engine"]
