"""``twistd smartrelay``: builds the relay's one MultiService from the config file.

This module is the composition root: ``makeService`` is the only place that takes the global
reactor, and it passes it (typed as IRelayReactor) to everything it builds.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import resource
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Literal, cast

import twisted
from attrs import evolve
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ReactorNotRunning
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
from smartrelay.delivery.client import SmtpConnector
from smartrelay.delivery.manager import (
    DEFAULT_TUNABLES,
    DeliveryManager,
    DeliveryTunables,
    node_id_for,
)
from smartrelay.delivery.mx import MxResolver, make_system_resolver
from smartrelay.delivery.processes import DeliveryProcesses, worker_command
from smartrelay.reactor import IRelayReactor, as_relay_reactor
from smartrelay.rewrap.chain import RewrapChain, RewrapSettings
from smartrelay.rewrap.dkim import DkimError, DkimSigner
from smartrelay.rewrap.tokens import SecretFileError, TokenCodec, load_keyring
from smartrelay.smtp.backends import InboundBackend, SubmissionBackend
from smartrelay.smtp.listener import ListenError, ListeningService, SmtpFactory, listener_service
from smartrelay.smtp.session import ListenerSettings
from smartrelay.smtp.tls import TlsError, ensure_certificate, server_context_factory
from smartrelay.spool import Spool
from smartrelay.storage.engines.sqlite import create_data_dir_for
from smartrelay.storage.service import StorageService
from smartrelay.threads import WorkerThreads
from smartrelay.web.service import WebListeningService, web_service
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
        delivery_tunables: DeliveryTunables = DEFAULT_TUNABLES,
    ) -> None:
        """``role="delivery"``: only the storage and a delivery manager, as the delivery
        process ``worker_index`` of a relay with ``[delivery] processes`` set.
        ``delivery_tunables``: for an in-process delivery manager (tests shorten its poll)."""
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
        #: Every listening service (SMTP, inbound, web), for :meth:`bind_listeners`.
        self.listeners: list[ListeningService | WebListeningService] = []
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
                self.storage.when_ready,
                MxResolver(make_system_resolver(reactor), reactor),
                SmtpConnector(
                    reactor,
                    config.server.hostname,
                    config.delivery.connect_timeout,
                    config.delivery.tls,
                ),
                lambda store: RewrapChain(
                    settings, self.codec, signer, store, in_thread=self._in_thread
                ),
                tunables=delivery_tunables,
                node_id=f"{node_id}-d{worker_index}" if role == "delivery" else node_id,
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
            self.web = web_service(
                reactor,
                config.web.listen,
                tracking.app.resource(),
                self.fatal,
                max_connections=config.web.max_connections,
                idle_timeout=config.web.idle_timeout,
            )
            self.web.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.listeners.append(self.web)
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
            idle_timeout=smtp.idle_timeout,
            tls_handshake_timeout=smtp.tls_handshake_timeout,
            data_timeout=smtp.data_timeout,
            # A client may pause between reads of DATA for at most 3 minutes (RFC 5321
            # 4.5.3.2.6), and never past the deadline of the whole DATA phase.
            data_read_timeout=min(180.0, smtp.data_timeout),
        )
        self.submission = SmtpFactory(
            submission,
            SubmissionBackend(reactor, config.server.hostname, self.storage.when_ready, spool),
            reactor,
            tls,
            name="smtp",
        )
        submission_service = listener_service(reactor, smtp.listen, self.submission, self.fatal)
        submission_service.setServiceParent(self)
        self.listeners.extend(cast(list[ListeningService], list(submission_service)))
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
        self.listeners.extend(cast(list[ListeningService], list(inbound_service)))

    def bind_listeners(self) -> None:
        """Listen on every endpoint now, before the services start. twistd's ``makeService``
        calls this, before twistd daemonises and writes its pid file, so a port in use is
        one line and exit status 1 in daemon mode too. Raises :class:`ListenError`."""
        for listener in self.listeners:
            listener.bind()

    def privilegedStartService(self) -> None:
        """twistd calls this (an in-process relay in tests does not): the process's signals."""
        handle_stop_signals(self._reactor)
        super().privilegedStartService()  # type: ignore[no-untyped-call]

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
            # A failure inside startService comes before the reactor runs: stop it then.
            self._reactor.callWhenRunning(stop_reactor, self._reactor)


def stop_reactor(reactor: IRelayReactor) -> None:
    """``reactor.stop()``, unless it is stopping already (which would raise)."""
    with contextlib.suppress(ReactorNotRunning):
        reactor.stop()


def _exit_failed() -> None:
    # twistd has no way to set its exit status. Exit 1 at the very end, after twistd has
    # removed its pid file, logged its last line and returned.
    atexit.register(_exit_status_1)


def _exit_status_1() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def handle_stop_signals(reactor: IRelayReactor) -> None:
    """SIGINT and SIGTERM stop the relay once, and a clean stop exits with status 0.

    Twisted's own handlers call ``reactor.stop()`` for every signal and make twistd kill
    itself with the signal at the end. A second signal while stopping then logs a critical
    ``ReactorNotRunning`` traceback: Ctrl-C on ``make run`` reaches the delivery processes
    from the terminal, and their parent sends them SIGTERM as it stops. These handlers
    replace Twisted's once the reactor runs (it installs its own as it starts).
    """
    stopping: list[str] = []

    def received(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stopping:
            log.info("Received {signal} while shutting down.", signal=name)
            return
        stopping.append(name)
        log.info("Received {signal}, shutting down.", signal=name)
        reactor.callFromThread(stop_reactor, reactor)

    def install() -> None:
        signal.signal(signal.SIGINT, received)
        signal.signal(signal.SIGTERM, received)

    reactor.callWhenRunning(install)


def raise_open_files_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd's default soft limit is 1,024;
    SMTP, web and the database share it), and log it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            log.warn(
                "open files limit stays at {soft}: cannot raise it to {target}: {error}",
                soft=soft,
                target=target,
                error=error,
            )
            return
        log.info("open files limit raised from {soft} to {target}", soft=soft, target=target)
    else:
        log.info("open files limit: {soft}", soft=soft)


def _nr_open() -> int:
    """Linux's ceiling for RLIMIT_NOFILE when the hard limit is unlimited."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024


def makeService(options: Options) -> IService:
    from twisted.internet import reactor  # the composition root takes the global reactor

    relay_reactor = as_relay_reactor(reactor)
    path = options["config"] or default_config_path()
    try:
        config = load_config(path)
        create_data_dir_for(config.database.url, config.server.data_dir)
        raise_open_files_limit()
        relay = RelayService(config, relay_reactor)
        relay.bind_listeners()
    except (ConfigError, TlsError, SecretFileError, DkimError, ListenError) as error:
        raise SystemExit(f"smartrelay: {error}") from None
    except OSError as error:
        raise SystemExit(f"smartrelay: {error.strerror or error}: {error.filename}") from None
    return cast(IService, relay)
