"""The storage service: opens the database, brings the schema up to date, hands out the Store."""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.config import SuppressionConfig
from smartrelay.reactor import IRelayReactor
from smartrelay.storage.engines import create_engine
from smartrelay.storage.interfaces import IDatabaseEngine
from smartrelay.storage.migrations import current_version, migrate
from smartrelay.storage.store import Store, to_ms

log = Logger()


class StorageStopped(Exception):
    """The relay is shutting down; nothing more can be stored."""


class StorageService(Service):
    """Starts the engine and migrations when the application starts; closes the pool at stop.

    Other services call ``when_ready()`` for the Store. A database that cannot be opened or
    migrated is fatal: ``on_fatal`` gets a one-line reason (the plugin logs it and exits 1).
    """

    name = "storage"

    def __init__(
        self,
        reactor: IRelayReactor,
        url: str,
        redacted_url: str,
        on_fatal: Callable[[str], object],
        suppression: SuppressionConfig | None = None,
        pool_size: int | None = None,
    ) -> None:
        self._reactor = reactor
        self._suppression = suppression
        self._url = url
        #: The engine's connections (None: the engine's default).
        self.pool_size = pool_size
        self._redacted_url = redacted_url
        self._on_fatal = on_fatal
        self._engine: IDatabaseEngine | None = None
        self._store: Store | None = None
        self._waiters: list[Deferred[Store]] = []
        self._starting: Deferred[None] | None = None
        self._stopped = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._failed)

    async def _start(self) -> None:
        engine = create_engine(self._reactor, self._url, self.pool_size)
        self._engine = engine
        await engine.start()
        applied = await migrate(engine, to_ms(self._reactor.seconds()))
        version = await current_version(engine)
        log.info(
            "database ready: {url} ({engine_version}), schema version {version}{applied}",
            url=self._redacted_url,
            engine_version=engine.version(),
            version=version,
            applied=f" (applied {', '.join(map(str, applied))})" if applied else "",
        )
        self._store = Store(engine, self._reactor, self._suppression)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._store)

    def _failed(self, failure: Failure) -> None:
        reason = f"cannot open database {self._redacted_url}: {failure.getErrorMessage()}"
        reason = " ".join(reason.split())
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)
        self._on_fatal(reason)

    def when_ready(self) -> Deferred[Store]:
        if self._store is not None:
            return succeed(self._store)
        if self._stopped:
            return fail(StorageStopped("storage is shut down"))
        waiter: Deferred[Store] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopped = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(StorageStopped("storage is shut down"))
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None:
            await self._starting
        if self._engine is not None:
            engine, self._engine, opened = self._engine, None, self._store is not None
            self._store = None
            await engine.close()
            if opened:
                log.info("database closed")
