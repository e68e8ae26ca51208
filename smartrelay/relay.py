"""The relay's service tree: :class:`RelayService`, one ``MultiService`` built from a
:class:`~smartrelay.config.Config`, and the process helpers around it (signals, exit status,
the open files limit).

Building the tree reads files (the config's certificates and DKIM keys) but writes none: the
data directory, the spool, the secret key file and the self-signed certificate are created
in ``startService``, by the user the relay runs as (twistd drops ``--uid``/``--gid`` after
``privilegedStartService``, where the listeners bind).
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
from twisted.internet.interfaces import IFileDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.resource import Resource

from smartrelay import __version__
from smartrelay.config import Config, ConfigError, load_config
from smartrelay.config.changes import config_changes
from smartrelay.deliverability import DeliverabilitySettings
from smartrelay.delivery.client import SmtpConnector
from smartrelay.delivery.manager import (
    DEFAULT_TUNABLES,
    DeliveryManager,
    DeliveryTunables,
    node_id_for,
)
from smartrelay.delivery.mta_sts import MtaSts, PolicyFetcher
from smartrelay.delivery.mx import MxResolver, make_system_resolver
from smartrelay.delivery.pools import check_source_addresses
from smartrelay.delivery.processes import (
    DeliveryProcesses,
    is_spare,
    share_of_limits,
    worker_command,
)
from smartrelay.feedback.mailboxes import (
    DEFAULT_TUNABLES as MAILBOX_TUNABLES,
)
from smartrelay.feedback.mailboxes import (
    MailboxService,
    ProcessReport,
    ReaderTunables,
    mailbox_services,
)
from smartrelay.feedback.model import Report
from smartrelay.feedback.processor import (
    FeedbackProcessor,
    FeedbackService,
    configured_classifier,
)
from smartrelay.listening import ListeningService
from smartrelay.malloc_trim import MallocTrim, glibc_malloc_trim
from smartrelay.metrics import RelayMetrics
from smartrelay.reactor import IRelayReactor
from smartrelay.retention.purge import PurgeService
from smartrelay.retention.rollup import RollupService
from smartrelay.rewrap.chain import InThread, RewrapChain, RewrapSettings
from smartrelay.rewrap.dkim import DkimError, DkimSigner
from smartrelay.smtp.activity import ListenerActivity
from smartrelay.smtp.backends import InboundBackend, SubmissionBackend
from smartrelay.smtp.listener import SmtpFactory, listener_services
from smartrelay.smtp.processes import (
    FIRST_FD,
    ListenerProcesses,
    QueuedForwarder,
    listener_command,
    share_of_connections,
    volume_line,
)
from smartrelay.smtp.session import ListenerSettings
from smartrelay.smtp.tls import ReloadableTls, TlsError, ensure_certificate
from smartrelay.smtp.volume_watch import (
    HeldCredentials,
    VolumeGate,
    VolumeWatch,
    volume_settings,
)
from smartrelay.spool import Spool
from smartrelay.storage.engines.sqlite import create_data_dir_for
from smartrelay.storage.service import StorageService
from smartrelay.threads import WorkerThreads
from smartrelay.tokens import SecretFileError, TokenCodec, load_keyring
from smartrelay.web.api import EventApi
from smartrelay.web.metrics import MetricsEndpoint
from smartrelay.web.pages import TemplateError
from smartrelay.web.service import web_listener, web_site
from smartrelay.web.site import WebRoot
from smartrelay.web.tracking import Tracking
from smartrelay.web.ui import build_reports_ui
from smartrelay.web.ui.app import ReportsUI
from smartrelay.web.ui.deliverability import Deliverability
from smartrelay.webhooks.dispatcher import WebhookService

__all__ = [
    "RelayService",
    "handle_stop_signals",
    "raise_open_files_limit",
    "stop_reactor",
]

log = Logger()

SIGNING_THREADS = 4  # at most; no more than the machine's cores

#: A delivery process's database connections: its claims and loads on one while its
#: outcomes commit on the other. More only let its transactions run side by side on the
#: database server, where they take CPU from the accepting processes' group commits: on a
#: shared machine PostgreSQL's DATA->250 p99 was lower with 2 than with 4 in 15 of 20
#: alternating rounds (medians 41.0 -> 35.0 ms in ten of them), end to end unchanged
#: (docs/performance.md, twelfth session).
DELIVERY_PROCESS_CONNECTIONS = 2


def signs_in_threads(role: str) -> bool:
    """Whether DKIM's private-key operations run in signing threads (``cryptography``
    releases the GIL for them, so they use another core while the reactor goes on) rather
    than in the reactor's thread.

    Threads, where the reactor also serves clients (the main process, an accepting
    process): an RSA-2048 signature holds a reactor thread some 0.25 ms a copy. A delivery
    process serves none, and each signature in a thread cost it a queue hand-off, a wake-up
    of its reactor and GIL switches: signing inline measured end to end +12 % on SQLite
    (+5 % more once the inline path was given the chain's split, as the threaded one had)
    and +5 % on PostgreSQL, CPU -6 to -9 %, DATA->250 p99 no higher (docs/performance.md,
    thirteenth session)."""
    return role != "delivery"


class RelayService(MultiService):
    """The whole relay. Logs the start-up line; a fatal start-up error stops it with status 1.

    The listeners bind in ``privilegedStartService`` (twistd, as root) or else in
    ``startService``; the files the relay owns are created in ``startService``.
    """

    def __init__(
        self,
        config: Config,
        reactor: IRelayReactor,
        role: Literal["all", "delivery", "listener"] = "all",
        worker_index: int = 0,
        delivery_tunables: DeliveryTunables = DEFAULT_TUNABLES,
        mailbox_tunables: ReaderTunables = MAILBOX_TUNABLES,
        process_feedback: ProcessReport | None = None,
        to_parent: Callable[[str], object] | None = None,
    ) -> None:
        """``role="delivery"``: only the storage and a delivery manager, as the delivery
        process ``worker_index`` of a relay with ``[delivery] processes`` set.
        ``role="listener"``: only the storage and the submission listeners, on the sockets
        inherited from the main process, as accepting process ``worker_index`` of a relay
        with ``[smtp] processes`` set; ``to_parent`` writes a line to the main process
        (smartrelay.smtp.processes).
        ``delivery_tunables``: for an in-process delivery manager (tests shorten its poll).
        ``mailbox_tunables``: the ``[[feedback.mailboxes]]`` readers' timing (tests shorten
        their backoff). ``process_feedback``: what the readers call with each stored report's
        id (default :meth:`_process_feedback`)."""
        super().__init__()  # type: ignore[no-untyped-call]
        if role == "delivery":  # the node's limits are shared between its delivery processes
            config = evolve(config, delivery=share_of_limits(config.delivery, worker_index))
        if role == "listener":  # and its connection limit between its accepting processes
            config = evolve(config, smtp=share_of_connections(config.smtp, worker_index))
        self.config = config
        self.role = role
        self._worker_index = worker_index
        self._reactor = reactor
        self.failed_reason: str | None = None
        #: This process's metrics (docs/metrics.md), exposed at ``/metrics``.
        self.metrics = RelayMetrics()
        self.storage = StorageService(
            reactor,
            config.database.url,
            config.database.redacted_url,
            self.fatal,
            config.suppression,
            DELIVERY_PROCESS_CONNECTIONS if role == "delivery" else None,
        )
        self.storage.setServiceParent(self)  # type: ignore[no-untyped-call]
        #: Freed heap memory given back to the system every 30 s, in every process (the
        #: delivery processes too): RSS comes down after a peak (issue 19, malloc_trim.py).
        self.malloc_trim = MallocTrim(reactor, glibc_malloc_trim())
        self.malloc_trim.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.submission: SmtpFactory | None = None
        self.inbound: SmtpFactory | None = None
        #: The submission and inbound listeners' TLS (``[smtp] tls_certificate``, or the
        #: self-signed pair), and that of each ``ssl:`` endpoint with its own files: what a
        #: reload re-reads.
        self._smtp_tls: ReloadableTls | None = None
        self._implicit_tls: list[ReloadableTls] = []
        #: The config file re-read by :meth:`reload` (twistd may change directory later).
        self._config_path = os.path.abspath(config.path)
        #: Every listening service (SMTP, inbound, web), for :meth:`check_listeners`.
        self.listeners: list[ListeningService] = []
        #: The token codec, once :meth:`startService` has read (or created) the secret file.
        self.codec: TokenCodec | None = None
        self._spool: Spool | None = None
        #: The reports UI, once :meth:`startService` has built it (main process).
        self.reports: ReportsUI | None = None
        self._site = web_site(Resource(), reactor, config.web.idle_timeout)  # type: ignore[no-untyped-call]
        serving = role == "all"
        #: The per-credential volume watch (docs/smtp.md, "Volume alerts"): main process,
        #: with a submission listener, unless ``on_volume_alert = "off"``. Before the
        #: listeners: it stops after them, and saves the baselines before the database closes.
        self.volume: VolumeWatch | None = None
        #: What the submission listener asks about credentials' volume: the watch, or in an
        #: accepting process the held set it reads (and reports sent to the main process).
        self._volume_gate: VolumeGate | None = None
        watching = volume_settings(config.smtp)
        if serving and config.smtp.listen and watching is not None:
            self.volume = self._volume_gate = VolumeWatch(
                reactor, watching, self.storage.when_ready, self.metrics.alerts
            )
            self.volume.setServiceParent(self)  # type: ignore[no-untyped-call]
        accepting = role == "listener" and config.smtp.listen
        if role == "listener" and to_parent is not None:
            if watching is not None:
                held = HeldCredentials(
                    reactor, self.storage.when_ready, lambda name: to_parent(volume_line(name))
                )
                held.setServiceParent(self)  # type: ignore[no-untyped-call]
                self._volume_gate = held
            forwarder = QueuedForwarder(reactor, self.storage.when_ready, to_parent)
            forwarder.setServiceParent(self)  # type: ignore[no-untyped-call]
        #: The accepting processes (``[smtp] processes`` >= 1, main process).
        self.listener_processes: ListenerProcesses | None = None
        #: Whether the submission listener's clients are sending (main process, with spare
        #: delivery processes: they claim work only while they are not). None without spares,
        #: so that no read of a client's pays for it.
        self.listener_activity = (
            ListenerActivity(reactor) if role == "all" and config.delivery.spare_processes else None
        )
        if (serving and (config.smtp.listen or config.inbound.listen)) or accepting:
            self._add_smtp_listeners()
        signer = DkimSigner(config.dkim_keys, now=reactor.seconds)
        self._signer = signer
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
        #: Where DKIM signs: signing threads, or None for the reactor's thread.
        self.dkim_in_thread: InThread | None = self._in_thread if signs_in_threads(role) else None
        self.delivery: DeliveryManager | None = None
        #: The delivery processes (``[delivery] processes`` >= 1, main process).
        self.delivery_processes: DeliveryProcesses | None = None
        delivery_service: IService | None = None
        if role == "listener":
            pass  # the main process (or its delivery processes) delivers
        elif role == "delivery" or config.delivery.processes == 0:
            resolver = make_system_resolver(reactor)  # MX and MTA-STS lookups
            connector = SmtpConnector(
                reactor,
                config.server.hostname,
                config.delivery.connect_timeout,
                config.delivery.tls,
            )
            self.delivery = delivery_service = DeliveryManager(
                reactor,
                config.delivery,
                self.storage.when_ready,
                MxResolver(resolver, reactor),
                connector,
                lambda store: RewrapChain(
                    settings,
                    self._started_codec(),
                    signer,
                    store,
                    in_thread=self.dkim_in_thread,
                    record_warnings=store.record_warnings,
                ),
                tunables=delivery_tunables,
                node_id=f"{node_id}-d{worker_index}" if role == "delivery" else node_id,
                metrics=self.metrics,
                source_connector=connector.from_source,
                mta_sts=(
                    MtaSts(reactor, resolver, PolicyFetcher(reactor, resolver).fetch)
                    if config.delivery.mta_sts
                    else None
                ),
                spare=role == "delivery" and is_spare(config.delivery, worker_index),
            )
        else:
            config_path = self._config_path
            self.delivery_processes = delivery_service = DeliveryProcesses(
                reactor,
                config.delivery.processes,
                lambda index: worker_command(config_path, index),
                self.storage.when_ready,
                self.metrics,
                spare=config.delivery.spare_processes,
                activity=self.listener_activity,
            )
        self.web: ListeningService | None = None
        if serving:
            # The site serves the tracking app from startService on (it needs the codec).
            self.web = web_listener(
                reactor,
                config.web.listen,
                self._site,
                self.fatal,
                max_connections=config.web.max_connections,
            )
            self.web.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.listeners.append(self.web)
        #: The hourly roll-ups of the events (main process only: delivery processes record
        #: events, the relay they belong to counts them).
        self.rollup: RollupService | None = None
        if serving:
            self.rollup = RollupService(reactor, self.storage.when_ready)
            self.rollup.setServiceParent(self)  # type: ignore[no-untyped-call]
        if delivery_service is not None:
            delivery_service.setServiceParent(self)
        self.purge: PurgeService | None = None
        if serving:  # one purger per node (not one per delivery process)
            self.purge = PurgeService(self.storage.when_ready, reactor, config.retention)
            self.purge.setServiceParent(self)  # type: ignore[no-untyped-call]
        #: The ``[[webhooks]]`` senders (main process only; docs/webhooks.md).
        self.webhooks: WebhookService | None = None
        if serving and config.webhooks:
            self.webhooks = WebhookService(
                reactor, self.storage.when_ready, config.webhooks, node_id, self.metrics
            )
            self.webhooks.setServiceParent(self)  # type: ignore[no-untyped-call]
        #: The feedback processor's service: the inbound listener's reports, processed after
        #: their commit and at start-up (main process only, like the listener).
        self.feedback: FeedbackService | None = None
        if serving:
            self.feedback = FeedbackService(
                reactor, self.storage.when_ready, self._feedback_processor
            )
            self.feedback.setServiceParent(self)  # type: ignore[no-untyped-call]
        #: The ``[[feedback.mailboxes]]`` readers, one service each (main process only).
        #: After the feedback service they feed: started after it, stopped first (at once, so
        #: that a stop while a report is processed takes no other message).
        self.mailboxes: list[MailboxService] = []
        if serving:
            self.mailboxes = mailbox_services(
                config.feedback_mailboxes,
                reactor,
                self.storage.when_ready,
                process_feedback or self._process_feedback,
                mailbox_tunables,
            )
            for mailbox in self.mailboxes:
                mailbox.setServiceParent(self)  # type: ignore[no-untyped-call]

    def _feedback_processor(self) -> FeedbackProcessor:
        """Made as the service starts, once the token codec has been read."""
        reactor = self._reactor

        def in_thread(work: Callable[[], Report]) -> Deferred[Report]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), work)

        return FeedbackProcessor(
            self.storage.when_ready,
            self._started_codec(),
            self.config,
            configured_classifier(self.config),
            in_thread=in_thread,
            metrics=self.metrics,
        )

    async def _process_feedback(self, report_id: str) -> None:
        """Process a report a mailbox reader has stored (it deletes or flags the message once
        this returns). Before the feedback service has started, the report stays ``new``: the
        service's first pass takes it up."""
        if self.feedback is not None:
            await self.feedback.process(report_id)

    def _started_codec(self) -> TokenCodec:
        if self.codec is None:
            raise RuntimeError("the token codec is read when the relay starts")
        return self.codec

    def _in_thread(self, work: Callable[[], bytes]) -> Deferred[bytes]:
        """DKIM's private-key operations, off the reactor thread (they release the GIL)."""
        return self._signing_threads.run(work)

    def _add_smtp_listeners(self) -> None:
        config, reactor = self.config, self._reactor
        smtp = config.smtp
        tls = None
        if smtp.tls_certificate or smtp.tls_key:
            # The operator's files are read now (as root under twistd); a self-signed pair
            # is made (written) in startService instead.
            tls = self._smtp_tls = ReloadableTls(
                ensure_certificate(
                    smtp.tls_certificate,
                    smtp.tls_key,
                    config.server.data_dir,
                    config.server.hostname,
                )
            )
        # Bodies past SPOOL_THRESHOLD are received into files (docs/smtp.md); each accepting
        # process in a directory of its own (it removes what it left there when it starts).
        spool_dir = os.path.join(config.server.data_dir, "spool")
        if self.role == "listener":
            spool_dir = os.path.join(spool_dir, f"smtp{self._worker_index}")
        self._spool = spool = Spool(spool_dir)
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
            SubmissionBackend(
                reactor,
                config.server.hostname,
                self.storage.when_ready,
                spool,
                self._volume_gate,
            ),
            reactor,
            tls,
            name="smtp",
            metrics=self.metrics,
            activity=self.listener_activity,
        )
        # With accepting processes the main process listens (it may bind privileged ports)
        # and they accept, on the sockets they inherit.
        children = smtp.processes if self.role == "all" else 0
        submission_listeners = listener_services(
            reactor,
            smtp.listen,
            self.submission,
            self.fatal,
            self._implicit_tls,
            accepting=children == 0,
            adopt=(
                range(FIRST_FD, FIRST_FD + len(smtp.listen)) if self.role == "listener" else None
            ),
        )
        self._add_listeners(submission_listeners)
        if children and smtp.listen:

            def sockets() -> list[int] | None:
                ports = [listener.port for listener in submission_listeners]
                if any(port is None for port in ports):
                    return None
                # A stream port is a file descriptor (tcp.Port, unix.Port).
                return [cast(IFileDescriptor, port).fileno() for port in ports]

            config_path = self._config_path
            self.listener_processes = ListenerProcesses(
                reactor,
                children,
                lambda index: listener_command(config_path, index),
                self.storage.when_ready,
                sockets,
                self._queued_by_child,
                None if self.volume is None else self.volume.message_accepted,
                self.metrics,
            )
            self.listener_processes.setServiceParent(self)  # type: ignore[no-untyped-call]
        if self.role != "all":
            return
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
            metrics=self.metrics,
        )
        self._add_listeners(
            listener_services(
                reactor, config.inbound.listen, self.inbound, self.fatal, self._implicit_tls
            )
        )

    def _queued_by_child(self) -> None:
        """An accepting process committed messages (SQLite): wake the delivery."""
        if self.delivery_processes is not None:
            self.delivery_processes.wake()
        elif self.delivery is not None:
            self.delivery.wake()

    def _add_listeners(self, services: list[ListeningService]) -> None:
        for service in services:
            service.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.listeners.append(service)

    def check_listeners(self) -> None:
        """Raise :class:`ListenError` (one line) if a listener's port is taken, without
        listening, and ``SourceAddressError`` if a pool's source address cannot be bound.
        twistd's ``makeService`` calls this, before twistd daemonises and writes its pid
        file, so that a port in use is one line and exit status 1 in daemon mode too (the
        listeners bind later, in ``privilegedStartService``)."""
        for listener in self.listeners:
            listener.check()
        # The pools' source addresses too (docs/delivery.md, "Source-address pools").
        check_source_addresses(self.config.delivery.pools)

    def _create_files(self) -> None:
        """What the relay writes before it serves: the data directory (for an SQLite file in
        it), the spool, the secret key file, the self-signed certificate (when none is
        configured); then the web app, whose templates it reads. Raises OSError,
        SecretFileError, TlsError, TemplateError."""
        config = self.config
        create_data_dir_for(config.database.url, config.server.data_dir)
        if self._spool is not None:
            removed = self._spool.prepare()
            if removed:
                log.info("removed {n} spool file(s) left by an earlier run", n=removed)
        self.codec = TokenCodec(load_keyring(config.rewrap.secret_file))
        factories = [f for f in (self.submission, self.inbound) if f is not None]
        if factories and factories[0].tls is None:
            material = ensure_certificate("", "", config.server.data_dir, config.server.hostname)
            log.warn(
                "no TLS certificate configured: using a self-signed one, {path}",
                path=material.certificate_path,
            )
            tls = self._smtp_tls = ReloadableTls(material)
            for factory in factories:
                factory.tls = tls
        if self.web is not None:
            tracking = Tracking(
                self.storage.when_ready,
                self.codec,
                self._reactor,
                config.suppression,
                metrics=self.metrics,
            )
            reports = self.reports = build_reports_ui(
                self.storage.when_ready,
                self._reactor,
                config,
                feedback_processor=self._feedback_processor(),
                dkim_keys=self._signer.keys,
                volume=self.volume,
                throttle_limits=self.metrics.adaptive,
            )
            metrics = None
            if config.api.metrics:
                metrics = MetricsEndpoint(
                    self.metrics, self.storage.when_ready, self._reactor, config
                )
            api = EventApi(
                self.storage.when_ready, self._reactor, idle_timeout=config.web.idle_timeout
            )
            self._site.resource = WebRoot(tracking, reports, metrics, api).resource()

    def privilegedStartService(self) -> None:
        """twistd calls this, as root when started as root, before ``startService`` (an
        in-process relay in tests does not): the process's signals, and the listeners bind."""
        handle_stop_signals(self._reactor, on_reload=self.reload)
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def reload(self) -> None:
        """SIGHUP (``systemctl reload``): re-read the config file and apply what can be
        applied live: the listeners' TLS certificates and the DKIM keys, read again even when
        their paths did not change (docs/configuration.md, "Reloading"). An invalid config
        changes nothing; anything else that changed is logged as needing a restart. The
        delivery processes get the signal in turn."""
        try:
            new = load_config(self._config_path)
        except ConfigError as error:
            log.error("reload failed: {error}", error=error)
            return
        running = self.config
        reloaded: list[str] = []
        if self._smtp_tls is not None:
            smtp = new.smtp
            try:
                material = ensure_certificate(
                    smtp.tls_certificate,
                    smtp.tls_key,
                    running.server.data_dir,
                    running.server.hostname,
                )
                self._smtp_tls.reload(material)
            except TlsError as error:
                log.error("reload: the TLS certificate is kept: {error}", error=error)
            else:
                running = evolve(
                    running,
                    smtp=evolve(
                        running.smtp, tls_certificate=smtp.tls_certificate, tls_key=smtp.tls_key
                    ),
                )
                reloaded.append(f"TLS certificate {material.certificate_path}")
        for implicit in self._implicit_tls:
            try:
                implicit.reload(implicit.material)
            except TlsError as error:
                log.error("reload: the TLS certificate is kept: {error}", error=error)
            else:
                reloaded.append(f"TLS certificate {implicit.material.certificate_path}")
        try:
            self._signer.reload(new.dkim_keys)
        except DkimError as error:
            log.error("reload: the DKIM keys are kept: {error}", error=error)
        else:
            running = evolve(running, dkim_keys=new.dkim_keys)
            reloaded.append(f"{len(new.dkim_keys)} DKIM key(s)")
            page = None if self.reports is None else self.reports.sections.get("deliverability")
            if isinstance(page, Deliverability):  # the records it tells the admin to publish
                page.settings = DeliverabilitySettings.of(running, self._signer.keys)
        self.config = running
        if self.role == "all":
            changed = config_changes(running, new)
            if changed:
                log.warn(
                    "reload: {changed} changed: takes effect after a restart",
                    changed=", ".join(changed),
                )
        log.info(
            "reloaded {path}: {what}",
            path=self._config_path,
            what=", ".join(reloaded) or "nothing to re-read",
        )
        if self.delivery_processes is not None:
            self.delivery_processes.reload()
        if self.listener_processes is not None:
            self.listener_processes.reload()

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
        try:
            self._create_files()
        except (SecretFileError, TlsError, TemplateError) as error:
            self._cannot_start(str(error))
            return
        except OSError as error:
            self._cannot_start(f"{error.strerror or error}: {error.filename}")
            return
        if self.dkim_in_thread is not None:
            self._signing_threads.start()
        super().startService()  # type: ignore[no-untyped-call]

    def _cannot_start(self, reason: str) -> None:
        """Started, but none of the services: the relay stops (exit status 1)."""
        Service.startService(self)
        self.fatal(reason)

    def stopService(self) -> Deferred[None]:
        """Stop the services one after another, last started first: listeners and delivery
        finish their commits before the database closes."""
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            # A listener may be bound (privilegedStartService) without running.
            if service.running or isinstance(service, ListeningService):
                await maybeDeferred(service.stopService)
        self._signing_threads.stop()
        if self.listener_activity is not None:
            self.listener_activity.stop()

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


def handle_stop_signals(
    reactor: IRelayReactor, on_reload: Callable[[], object] | None = None
) -> None:
    """SIGINT and SIGTERM stop the relay once, and a clean stop exits with status 0; SIGHUP
    calls ``on_reload`` (in the reactor thread) and never stops the process.

    Twisted's own handlers call ``reactor.stop()`` for every signal and make twistd kill
    itself with the signal at the end. A second signal while stopping then logs a critical
    ``ReactorNotRunning`` traceback: Ctrl-C on ``make run`` reaches the delivery processes
    from the terminal, and their parent sends them SIGTERM as it stops. These handlers
    replace Twisted's once the reactor runs (it installs its own as it starts).

    Without a handler SIGHUP would kill the process (``systemctl reload``, or a terminal's
    hangup reaching the whole process group): its handler is installed at once. One found
    there (a log rotation's) is still called first.
    """
    stopping: list[str] = []

    def stop(name: str) -> None:
        log.info("Received {signal}, shutting down.", signal=name)
        stop_reactor(reactor)

    def received(signum: int, frame: FrameType | None) -> None:
        # The handlers only wake the reactor up: a log line written from a handler could
        # interrupt one being written (a reentrant write on standard output, after which
        # Twisted drops the observer: the process would log nothing more).
        name = signal.Signals(signum).name
        if stopping:
            reactor.callFromThread(log.info, "Received {signal} while shutting down.", signal=name)
            return
        stopping.append(name)
        reactor.callFromThread(stop, name)

    def reload() -> None:
        if stopping:
            return
        log.info("Received SIGHUP, reloading.")
        if on_reload is not None:
            on_reload()

    def hangup(signum: int, frame: FrameType | None) -> None:
        if callable(previous):
            previous(signum, frame)
        reactor.callFromThread(reload)

    def install() -> None:
        signal.signal(signal.SIGINT, received)
        signal.signal(signal.SIGTERM, received)

    # At once (Twisted leaves SIGHUP alone): a reload while the relay starts is done once the
    # reactor runs, rather than killing it.
    previous = signal.signal(signal.SIGHUP, hangup)
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
