"""``twistd smartrelay``: builds the relay's one MultiService from the config file.

This module is the composition root: ``makeService`` is the only place that takes the global
reactor, and it passes it (typed as IRelayReactor) to everything it builds.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from typing import Literal, cast

import twisted
from attrs import evolve
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python import usage

from smartrelay import __version__
from smartrelay.config import (
    CHECKOUT_CONFIG,
    INSTALLED_CONFIG,
    Config,
    ConfigError,
    default_config_path,
    load_config,
)
from smartrelay.delivery.manager import DeliveryManager, node_id_for
from smartrelay.delivery.mx import MxResolver, make_system_resolver
from smartrelay.delivery.processes import DeliveryProcesses, worker_command
from smartrelay.reactor import IRelayReactor, as_relay_reactor
from smartrelay.rewrap.chain import RewrapChain, RewrapSettings
from smartrelay.rewrap.dkim import DkimError, DkimSigner
from smartrelay.rewrap.tokens import SecretFileError, TokenCodec, load_keyring
from smartrelay.smtp.backends import InboundBackend, SubmissionBackend
from smartrelay.smtp.listener import SmtpFactory, listener_service
from smartrelay.smtp.session import ListenerSettings
from smartrelay.smtp.tls import TlsError, ensure_certificate, server_context_factory
from smartrelay.spool import Spool
from smartrelay.storage.service import StorageService
from smartrelay.threads import WorkerThreads
from smartrelay.web.service import web_service
from smartrelay.web.tracking import Tracking

log = Logger()

SIGNING_THREADS = 4  # at most; no more than the machine's cores


class Options(usage.Options):
    optParameters = [
        [
            "config",
            "c",
            None,
            f"config file (default: {CHECKOUT_CONFIG} in a checkout, else {INSTALLED_CONFIG})",
        ],
    ]


class RelayService(MultiService):
    """The whole relay. Logs the start-up line; a fatal start-up error stops it with status 1."""

    def __init__(
        self,
        config: Config,
        reactor: IRelayReactor,
        role: Literal["all", "delivery"] = "all",
        worker_index: int = 0,
    ) -> None:
        """``role="delivery"``: only the storage and a delivery manager, as the delivery
        process ``worker_index`` of a relay with ``[delivery] processes`` set."""
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.role = role
        self._reactor = reactor
        self.failed_reason: str | None = None
        self.storage = StorageService(
            reactor,
            config.database.url,
            config.database.redacted_url,
            self.fatal,
            config.suppression,
        )
        self.storage.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.submission: SmtpFactory | None = None
        self.inbound: SmtpFactory | None = None
        serving = role == "all"
        if serving and (config.smtp.listen or config.inbound.listen):
            self._add_smtp_listeners()
        self.codec = TokenCodec(load_keyring(config.rewrap.secret_file))
        signer = DkimSigner(config.dkim_keys, now=reactor.seconds)
        settings = RewrapSettings(
            hostname=config.server.hostname,
            base_url=config.web.base_url.rstrip("/"),
            return_path_domain=config.inbound.return_path_domain,
            track_opens=config.rewrap.track_opens,
            track_clicks=config.rewrap.track_clicks,
            list_unsubscribe=config.rewrap.list_unsubscribe,
            unsubscribe_mailto=config.rewrap.unsubscribe_mailto,
        )
        node_id = node_id_for(config.server.data_dir)
        self._signing_threads = WorkerThreads(
            reactor, min(SIGNING_THREADS, os.cpu_count() or 1), name="dkim-sign"
        )
        self.delivery: DeliveryManager | None = None
        delivery_service: IService
        if role == "delivery" or config.delivery.processes == 0:
            self.delivery = delivery_service = DeliveryManager(
                reactor,
                config.delivery,
                config.server.hostname,
                self.storage.when_ready,
                MxResolver(make_system_resolver(reactor), reactor),
                node_id=f"{node_id}-d{worker_index}" if role == "delivery" else node_id,
                chain_factory=lambda store: RewrapChain(
                    settings, self.codec, signer, store, in_thread=self._in_thread
                ),
            )
        else:
            config_path = os.path.abspath(config.path)
            delivery_service = DeliveryProcesses(
                reactor,
                config.delivery.processes,
                lambda index: worker_command(config_path, index),
                self.storage.when_ready,
            )
        if serving:
            tracking = Tracking(self.storage.when_ready, self.codec, reactor, config.suppression)
            self.web = web_service(reactor, config.web.listen, tracking.app.resource(), self.fatal)
            self.web.setServiceParent(self)  # type: ignore[no-untyped-call]
        delivery_service.setServiceParent(self)  # type: ignore[no-untyped-call]

    def _in_thread(self, work: Callable[[], bytes]) -> Deferred[bytes]:
        """DKIM's private-key operations, off the reactor thread (they release the GIL)."""
        return self._signing_threads.run(work)

    def _add_smtp_listeners(self) -> None:
        config, reactor = self.config, self._reactor
        material = ensure_certificate(
            config.smtp.tls_certificate,
            config.smtp.tls_key,
            config.server.data_dir,
            config.server.hostname,
        )
        if material.generated:
            log.warn(
                "no TLS certificate configured: using a self-signed one, {path}",
                path=material.certificate_path,
            )
        tls = server_context_factory(material)
        smtp = config.smtp
        # Bodies past SPOOL_THRESHOLD are received into files (docs/smtp.md).
        spool = Spool(os.path.join(config.server.data_dir, "spool"))
        removed = spool.prepare()
        if removed:
            log.info("removed {n} spool file(s) left by an earlier run", n=removed)
        submission = ListenerSettings(
            hostname=config.server.hostname,
            max_message_size=smtp.max_message_size,
            max_recipients=smtp.max_recipients,
            require_tls=smtp.require_tls,
            require_auth=smtp.require_auth,
            allowed_networks=smtp.allowed_networks,
            max_connections=smtp.max_connections,
            max_connections_per_client=smtp.max_connections_per_client,
        )
        self.submission = SmtpFactory(
            submission,
            SubmissionBackend(reactor, config.server.hostname, self.storage.when_ready, spool),
            reactor,
            tls,
            name="smtp",
        )
        listener_service(reactor, smtp.listen, self.submission, self.fatal).setServiceParent(self)
        inbound = evolve(
            submission,
            require_tls=False,
            require_auth=False,
            allowed_networks=None,
            max_recipients=max(smtp.max_recipients, 100),
        )
        self.inbound = SmtpFactory(
            inbound,
            InboundBackend(
                reactor, config.inbound.return_path_domain, self.storage.when_ready, spool
            ),
            reactor,
            tls,
            name="inbound",
        )
        inbound_service = listener_service(reactor, config.inbound.listen, self.inbound, self.fatal)
        inbound_service.setServiceParent(self)

    def startService(self) -> None:
        log.info(
            "SmartRelay {version} starting: config={config} database={database}"
            " (Twisted {twisted}, Python {python})",
            version=__version__,
            config=self.config.path,
            database=self.config.database.redacted_url,
            twisted=twisted.__version__,
            python=platform.python_version(),
        )
        self._signing_threads.start()
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        """Stop the services one after another, last started first: listeners and delivery
        finish their commits before the database closes."""
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            await maybeDeferred(service.stopService)
        self._signing_threads.stop()

    def fatal(self, reason: str) -> None:
        """Log ``reason`` as one line and stop the reactor; the process exits with status 1."""
        log.critical("fatal: {reason}", reason=reason)
        if self.failed_reason is None:
            self.failed_reason = reason
            self._reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
            # Listening fails inside startService, before the reactor runs: stop it then.
            self._reactor.callWhenRunning(self._reactor.stop)


def _exit_failed() -> None:
    # twistd has no way to set its exit status, and leaving now skips nothing that matters:
    # the services are stopped and the pid file is gone only after this, which is harmless.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor  # the composition root takes the global reactor

    path = options["config"] or default_config_path()
    try:
        config = load_config(path)
        return cast(IService, RelayService(config, as_relay_reactor(reactor)))
    except (ConfigError, TlsError, SecretFileError, DkimError) as error:
        raise SystemExit(f"smartrelay: {error}") from None
