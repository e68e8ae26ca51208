"""One small engine class per database behind one ``run_interaction``."""

from __future__ import annotations

from smartrelay.reactor import IRelayReactor
from smartrelay.storage.engines.postgres import PostgresEngine
from smartrelay.storage.engines.sqlite import SqliteEngine
from smartrelay.storage.interfaces import IDatabaseEngine


def create_engine(
    reactor: IRelayReactor, url: str, pool_size: int | None = None
) -> IDatabaseEngine:
    """An engine for a ``sqlite:PATH`` or ``postgresql://...`` URL (validated by the config),
    with ``pool_size`` connections (None: the engine's own default)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresEngine(reactor, url, pool_size)
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:")
        if path.startswith("//"):
            path = path[2:]
        return SqliteEngine(reactor, path, pool_size)
    raise ValueError(f"unsupported database URL {url!r}")


__all__ = ["PostgresEngine", "SqliteEngine", "create_engine"]
