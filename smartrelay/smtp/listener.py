"""Listening: the factory that admits or refuses connections, and the listener services."""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.reactor import IRelayReactor
from smartrelay.smtp import replies as R
from smartrelay.smtp.protocol import SmtpServerProtocol
from smartrelay.smtp.ratelimit import AuthFailureLimiter
from smartrelay.smtp.replies import Reply
from smartrelay.smtp.session import ISmtpBackend, ListenerSettings
from smartrelay.smtp.tls import TlsError, TlsMaterial, server_context_factory

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
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.clock = clock
        self.tls = tls
        self.name = name
        self.auth_limiter = AuthFailureLimiter(clock)
        self.connections: set[SmtpServerProtocol] = set()
        self.per_client: Counter[str] = Counter()

    def buildProtocol(self, addr: IAddress | None) -> SmtpServerProtocol:
        protocol = SmtpServerProtocol(
            self.settings, self.backend, self.clock, self.tls, self.auth_limiter, self._closed
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

    def _closed(self, protocol: SmtpServerProtocol) -> None:
        if protocol in self.connections:
            self.connections.discard(protocol)
            host = protocol.session.client_ip
            self.per_client[host] -= 1
            if self.per_client[host] <= 0:
                del self.per_client[host]


class ListenError(Exception):
    """A listener cannot listen; ``str()`` is the one-line reason."""


@implementer(ISSLTransport)
class _ImplicitTlsTransport(BufferingTLSTransport):
    """The TLS layer of an implicit-TLS connection (tells the protocol it is TLS)."""


class _ImplicitTlsFactory(TLSMemoryBIOFactory):
    protocol = _ImplicitTlsTransport


#: ``ssl:`` endpoint options about TLS: we build the TLS layer ourselves from these.
_TLS_OPTIONS = ("privatekey", "certkey", "extracertchain", "sslmethod", "dhparameters")


def _split_fields(description: str) -> list[str]:
    """Fields of an endpoint string, split at unescaped ``:``, escapes kept."""
    fields, current, escaped = [], [], False
    for c in description:
        if escaped:
            current.append(c)
            escaped = False
        elif c == "\\":
            current.append(c)
            escaped = True
        elif c == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(c)
    fields.append("".join(current))
    return fields


def _unescape(text: str) -> str:
    out, escaped = [], False
    for c in text:
        if c == "\\" and not escaped:
            escaped = True
            continue
        out.append(c)
        escaped = False
    return "".join(out)


def implicit_tls(description: str) -> tuple[str, IOpenSSLServerConnectionCreator] | None:
    """For an ``ssl:`` endpoint: the ``tcp:`` endpoint under it and the TLS options to wrap
    it in; None for any other endpoint.

    Twisted's ``ssl:`` endpoint would apply Twisted's default cipher list (which keeps suites
    without forward secrecy); here its ``privateKey`` / ``certKey`` files (defaults as in
    Twisted: ``server.pem``, and ``certKey`` = ``privateKey``) get the listeners' policy of
    :func:`smartrelay.smtp.tls.server_context_factory`. Raises :class:`TlsError` (one line)
    for what cannot be used.
    """
    fields = _split_fields(description)
    if fields[0].lower() != "ssl":
        return None
    kept = ["tcp"]
    options: dict[str, str] = {}
    for field in fields[1:]:
        name, equals, value = field.partition("=")
        if equals and name.lower() in _TLS_OPTIONS:
            options[name.lower()] = _unescape(value)
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
    return ":".join(kept), server_context_factory(material)


class ListeningService(Service):
    """Listens on one endpoint string; failing to listen is fatal (one line, exit 1)."""

    def __init__(
        self,
        reactor: IRelayReactor,
        description: str,
        factory: SmtpFactory,
        on_fatal: Callable[[str], object],
    ) -> None:
        self._reactor = reactor
        self.description = description
        self._factory = factory
        self._on_fatal = on_fatal
        self._port: IListeningPort | None = None
        self._bound = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if not self._bound:
            self._bound = True
            try:
                d = self._listen()
            except ListenError as e:
                self._on_fatal(str(e))
                return
            d.addCallbacks(self._listening, self._failed)

    def _listen(self) -> Deferred[IListeningPort]:
        """Start listening; an ``ssl:`` endpoint as ``tcp:`` wrapped in our TLS layer.
        Raises :class:`ListenError` for TLS options that cannot be used."""
        factory: Factory[Any] = self._factory
        description = self.description
        try:
            wrapped = implicit_tls(description)
        except TlsError as e:
            raise ListenError(f"{self._factory.name}: cannot listen on {description}: {e}") from e
        if wrapped is not None:
            description, creator = wrapped
            factory = _ImplicitTlsFactory(creator, False, self._factory)
        endpoint = serverFromString(self._reactor, description)
        listening: Deferred[IListeningPort] = endpoint.listen(factory)
        return listening

    def bind(self) -> None:
        """Listen now, before the service starts: twistd's ``makeService`` binds every
        listener before it daemonises, so a port in use is a one-line error and exit 1 there.
        Raises :class:`ListenError`; an endpoint that listens asynchronously is left to run."""
        if self._bound:
            return
        self._bound = True
        outcome: list[object] = []
        d = self._listen()
        d.addBoth(outcome.append)
        if not outcome:
            d.addCallbacks(self._listening, self._failed)
        elif isinstance(outcome[0], Failure):
            raise ListenError(self._reason(outcome[0]))
        else:
            self._listening(cast(IListeningPort, outcome[0]))

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        log.info("{name}: listening on {where}", name=self._factory.name, where=self.description)

    def _failed(self, failure: Failure) -> None:
        self._on_fatal(self._reason(failure))

    def _reason(self, failure: Failure) -> str:
        return (
            f"{self._factory.name}: cannot listen on {self.description}:"
            f" {' '.join(failure.getErrorMessage().split())}"
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        self._factory.shutdown()
        if self._port is None:
            return None
        port, self._port = self._port, None
        stopped: Deferred[None] | None = port.stopListening()
        return stopped


def listener_service(
    reactor: IRelayReactor,
    endpoints: tuple[str, ...],
    factory: SmtpFactory,
    on_fatal: Callable[[str], object],
) -> MultiService:
    """One listening service per endpoint string, all serving ``factory``."""
    service = MultiService()
    for description in endpoints:
        ListeningService(reactor, description, factory, on_fatal).setServiceParent(service)  # type: ignore[no-untyped-call]
    return service
