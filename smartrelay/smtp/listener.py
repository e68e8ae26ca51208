"""Listening for SMTP: the factory that admits or refuses connections, and the listening
services of one listener (:class:`smartrelay.listening.ListeningService`, one per endpoint)."""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from zope.interface import implementer

from smartrelay.listening import ListenError, ListeningService, split_fields, unescape
from smartrelay.metrics import RelayMetrics
from smartrelay.reactor import IRelayReactor
from smartrelay.smtp import replies as R
from smartrelay.smtp.activity import ListenerActivity
from smartrelay.smtp.protocol import SmtpServerProtocol
from smartrelay.smtp.ratelimit import AuthFailureLimiter
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.session import ISmtpBackend, ListenerSettings
from smartrelay.smtp.tls import ReloadableTls, TlsError, TlsMaterial

__all__ = ["ListenError", "SmtpFactory", "implicit_tls", "listener_services"]

log = Logger()


class SmtpFactory(ServerFactory):
    """Makes one protocol per connection; counts connections, in all and per client IP."""

    noisy = False  # the listening services log what matters

    def __init__(
        self,
        settings: ListenerSettings,
        backend: ISmtpBackend,
        clock: IReactorTime,
        tls: IOpenSSLServerConnectionCreator | None,
        name: str = "smtp",
        metrics: RelayMetrics | None = None,
        activity: ListenerActivity | None = None,
    ) -> None:
        """``metrics``: where accepted messages and open sessions are counted, by ``name``;
        ``activity``: told of every admitted session and every read from its client."""
        self.settings = settings
        self.activity = activity
        self.backend = backend
        self.clock = clock
        self.tls = tls
        self.name = name
        self.auth_limiter = AuthFailureLimiter(clock)
        self.connections: set[SmtpServerProtocol] = set()
        self.per_client: Counter[str] = Counter()
        self.metrics = metrics
        # This listener's counters, looked up once rather than by label for every message.
        self._counted = (
            None
            if metrics is None
            else (
                metrics.messages_received.labels(listener=name),
                metrics.recipients_received.labels(listener=name),
            )
        )
        if metrics is not None:
            metrics.smtp_sessions_open.labels(listener=name).set_function(
                lambda: len(self.connections)
            )

    def buildProtocol(self, addr: IAddress | None) -> SmtpServerProtocol:
        protocol = SmtpServerProtocol(
            self.settings,
            self.backend,
            self.clock,
            self.tls,
            self.auth_limiter,
            self._closed,
            self._accepted,
            None if self.activity is None else self.activity.heard,
        )
        protocol.factory = self
        host = str(getattr(addr, "host", ""))
        protocol.refusal = self.refusal(host)
        if protocol.refusal is not None:
            log.info(
                "{name}: refused {ip}: {text}", name=self.name, ip=host, text=protocol.refusal.text
            )
        else:
            self.connections.add(protocol)
            self.per_client[host] += 1
            if self.activity is not None:
                self.activity.heard()
        return protocol

    def refusal(self, host: str) -> Reply | None:
        networks = self.settings.allowed_networks
        if networks is not None and not self.settings.require_auth:
            try:
                address = ipaddress.ip_address(host.split("%")[0])
            except ValueError:
                return R.NOT_ALLOWED
            if address.version == 6 and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            if not any(address in network for network in networks):
                return R.NOT_ALLOWED
        if len(self.connections) >= self.settings.max_connections:
            return R.TOO_MANY_CONNECTIONS
        if self.per_client[host] >= self.settings.max_connections_per_client:
            return R.TOO_MANY_FROM_CLIENT
        return None

    def shutdown(self) -> None:
        """Tell every open session that we are going away (421 4.3.0)."""
        for protocol in list(self.connections):
            protocol.shutdown()

    def _accepted(self, recipients: int) -> None:
        if self._counted is not None:
            messages, recipients_counter = self._counted
            messages.inc()
            recipients_counter.inc(recipients)

    def _closed(self, protocol: SmtpServerProtocol) -> None:
        if protocol in self.connections:
            self.connections.discard(protocol)
            host = protocol.session.client_ip
            self.per_client[host] -= 1
            if self.per_client[host] <= 0:
                del self.per_client[host]


@implementer(ISSLTransport)
class _ImplicitTlsTransport(BufferingTLSTransport):
    """The TLS layer of an implicit-TLS connection (tells the protocol it is TLS)."""


class _ImplicitTlsFactory(TLSMemoryBIOFactory):
    protocol = _ImplicitTlsTransport


#: ``ssl:`` endpoint options about TLS: we build the TLS layer ourselves from these.
_TLS_OPTIONS = ("privatekey", "certkey", "extracertchain", "sslmethod", "dhparameters")


def implicit_tls(description: str) -> tuple[str, ReloadableTls] | None:
    """For an ``ssl:`` endpoint: the ``tcp:`` endpoint under it and the TLS options to wrap
    it in; None for any other endpoint.

    Twisted's ``ssl:`` endpoint would apply Twisted's default cipher list (which keeps suites
    without forward secrecy); here its ``privateKey`` / ``certKey`` files (defaults as in
    Twisted: ``server.pem``, and ``certKey`` = ``privateKey``) get the listeners' policy of
    :func:`smartrelay.smtp.tls.server_context_factory`. Raises :class:`TlsError` (one line)
    for what cannot be used.
    """
    fields = split_fields(description)
    if fields[0].lower() != "ssl":
        return None
    kept = ["tcp"]
    options: dict[str, str] = {}
    for field in fields[1:]:
        name, equals, value = field.partition("=")
        if equals and name.lower() in _TLS_OPTIONS:
            options[name.lower()] = unescape(value)
        else:
            kept.append(field)
    unsupported = sorted(set(options) - {"privatekey", "certkey"})
    if unsupported:
        raise TlsError(
            f"{', '.join(unsupported)} not supported (put the chain after the certificate in"
            " the certKey file; the TLS policy is fixed, see docs/smtp.md)"
        )
    key = options.get("privatekey", "server.pem")
    material = TlsMaterial(options.get("certkey", key), key, generated=False)
    return ":".join(kept), ReloadableTls(material)


def listener_services(
    reactor: IRelayReactor,
    endpoints: tuple[str, ...],
    factory: SmtpFactory,
    on_fatal: Callable[[str], object],
    implicit: list[ReloadableTls] | None = None,
    *,
    accepting: bool = True,
    adopt: Sequence[int] | None = None,
) -> list[ListeningService]:
    """One listening service per endpoint string, all serving ``factory``; an ``ssl:``
    endpoint is listened on as ``tcp:`` wrapped in our TLS layer (:func:`implicit_tls`),
    whose TLS options are appended to ``implicit`` (to re-read them on a reload).
    ``accepting`` and ``adopt`` (one inherited socket per endpoint, in order): see
    :class:`ListeningService`. Raises :class:`ListenError` for TLS options that cannot be
    used."""
    services = []
    for number, shown in enumerate(endpoints):
        description, wrapped = shown, cast(Factory[Any], factory)
        try:
            implicit_options = implicit_tls(shown)
        except TlsError as e:
            raise ListenError(f"{factory.name}: cannot listen on {shown}: {e}") from e
        if implicit_options is not None:
            description, creator = implicit_options
            wrapped = _ImplicitTlsFactory(creator, False, factory)
            if implicit is not None:
                implicit.append(creator)
        services.append(
            ListeningService(
                reactor,
                description,
                wrapped,
                on_fatal,
                name=factory.name,
                shown=shown,
                on_stop=factory.shutdown,
                accepting=accepting,
                adopt=None if adopt is None else adopt[number],
            )
        )
    return services
