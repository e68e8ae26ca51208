"""One listening service for every listener (SMTP submission, inbound SMTP, web).

:class:`ListeningService` has the semantics of Twisted's
:class:`twisted.application.internet.StreamServerEndpointService`: it listens in
``privilegedStartService``, which twistd calls while the process still runs as root (before it
drops to ``--uid``/``--gid``), so ports 25, 587 and 443 can be bound by a relay that then runs
unprivileged; ``startService`` listens only when ``privilegedStartService`` was not called (a
relay run in-process by the tests, a delivery process). What it adds: failing to listen is one
line given to ``on_fatal`` (never a traceback), the port is kept for the tests, a hook runs when
it stops (SMTP's ``421``), and one log line says where it listens.

An exception raised in ``privilegedStartService`` would reach an operator as a traceback
(``twistd -n``) or as twistd's own two-line message (daemon mode), so a port in use is found
earlier as well, by :meth:`ListeningService.check` from ``makeService``: see
:func:`check_can_listen`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.internet.protocol import Factory, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.reactor import IRelayReactor

__all__ = [
    "ListenError",
    "ListeningService",
    "adopt_listening_socket",
    "check_can_listen",
    "split_fields",
    "unescape",
]

log = Logger()


class ListenError(Exception):
    """A listener cannot listen; ``str()`` is the one-line reason."""


class ListeningService(Service):
    """Listens on one endpoint string with ``factory``; see the module docstring.

    ``description`` is what is listened on; ``shown`` (default: ``description``) is what the
    log and the errors name (an ``ssl:`` endpoint is listened on as ``tcp:`` under our own TLS
    layer, and is shown as configured).
    """

    def __init__(
        self,
        reactor: IRelayReactor,
        description: str,
        factory: Factory[Any],
        on_fatal: Callable[[str], object],
        *,
        name: str,
        shown: str | None = None,
        on_stop: Callable[[], object] | None = None,
        accepting: bool = True,
        adopt: int | None = None,
    ) -> None:
        """``accepting=False``: listen, but accept no connection (the accepting processes
        of ``[smtp] processes`` share the socket and accept on it); ``adopt``: listen on this
        file descriptor, a listening socket inherited from the main process, rather than
        binding ``description``."""
        self._reactor = reactor
        self.accepting = accepting
        self.adopt = adopt
        self.description = description
        self.shown = shown if shown is not None else description
        self.factory = factory
        #: What the log lines and errors call it ("smtp"); the service's name (unique in
        #: the relay's MultiService) adds the endpoint: a listener may have several.
        self.label = name
        self.name = f"{name} {self.shown}"
        self._on_fatal = on_fatal
        self._on_stop = on_stop
        self._waiting: Deferred[IListeningPort] | None = None
        self._port: IListeningPort | None = None
        self._stopped = False

    @property
    def port(self) -> IListeningPort | None:
        """The listening port once listening (tests read the port number from it)."""
        return self._port

    def check(self) -> None:
        """Raise :class:`ListenError` if the port is taken (or may not be bound by this user),
        without listening; see :func:`check_can_listen`."""
        try:
            check_can_listen(self.description)
        except OSError as error:
            raise ListenError(self._reason(str(error))) from None

    def privilegedStartService(self) -> None:
        """Listen (as root under twistd, before it drops privileges)."""
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        if self._waiting is None:
            self._listen()

    def startService(self) -> None:
        """Listen, unless :meth:`privilegedStartService` did already."""
        super().startService()  # type: ignore[no-untyped-call]
        if self._waiting is None:
            self._listen()

    def _listen(self) -> None:
        try:
            if self.adopt is not None:
                self._waiting = succeed(
                    adopt_listening_socket(self._reactor, self.adopt, self.factory)
                )
            else:
                endpoint = serverFromString(self._reactor, self.description)
                self._waiting = endpoint.listen(self.factory)
        except Exception as error:
            self._waiting = Deferred()
            self._on_fatal(self._reason(str(error)))
            return
        self._waiting.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        if self._stopped:  # stopped while the endpoint was still starting
            port.stopListening()
            return
        self._port = port
        if not self.accepting:
            # The socket stays open (the accepting processes inherit it); this process
            # leaves its connections to them.
            self._reactor.removeReader(cast(IReadDescriptor, port))
            log.info(
                "{name}: listening on {where} (accepted by the accepting processes)",
                name=self.label,
                where=self.shown,
            )
            return
        log.info("{name}: listening on {where}", name=self.label, where=self.shown)

    def _failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self._on_fatal(self._reason(failure.getErrorMessage()))

    def _reason(self, error: str) -> str:
        return f"{self.label}: cannot listen on {self.shown}: {' '.join(error.split())}"

    def stopService(self) -> Deferred[None] | None:
        """Stop listening (or cancel an endpoint still starting); None if nothing listened."""
        if self.running:
            super().stopService()  # type: ignore[no-untyped-call]
        self._stopped = True
        if self._on_stop is not None:
            self._on_stop()
        if self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()
        if self._port is None:
            return None
        port, self._port = self._port, None
        stopped: Deferred[None] | None = port.stopListening()
        return stopped


def adopt_listening_socket(
    reactor: IRelayReactor, fd: int, factory: Factory[Any]
) -> IListeningPort:
    """Accept connections for ``factory`` on the listening socket ``fd`` (inherited from the
    main process). Raises OSError if ``fd`` is not a listening stream socket."""
    with socket.socket(fileno=fd) as inherited:
        try:
            if inherited.type != socket.SOCK_STREAM or not inherited.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                raise OSError(f"file descriptor {fd} is not a listening stream socket")
            family = inherited.family
        finally:
            inherited.detach()  # the fd stays open: the reactor adopts a copy of it
    port = reactor.adoptStreamPort(fd, family, cast(ServerFactory[Any], factory))
    os.close(fd)
    return port


def check_can_listen(description: str) -> None:
    """Raise OSError (``str()`` as Twisted's own error would read) if the ``tcp:``, ``tcp6:``
    or ``ssl:`` endpoint ``description`` cannot be listened on now: the port is taken, or is
    below 1024 and this user may not bind it. Other endpoints, and port 0, pass unchecked.

    It binds a socket with ``SO_REUSEADDR`` (as Twisted does) and closes it without listening.
    It runs in twistd's ``makeService``, before twistd daemonises, so that a port in use is one
    line and exit status 1 even in daemon mode; the real bind comes in
    ``privilegedStartService``. A port taken between the two is reported by the relay as a
    fatal error (one log line, exit status 1).
    """
    fields = split_fields(description)
    kind = fields[0].lower()
    if kind not in ("tcp", "tcp6", "ssl"):
        return
    args = [unescape(field) for field in fields[1:] if "=" not in field]
    kwargs = dict(unescape(field).partition("=")[::2] for field in fields[1:] if "=" in field)
    try:
        port = int(kwargs.get("port", args[0] if args else "0"))
    except ValueError:
        return  # serverFromString reports it
    interface = kwargs.get("interface", args[1] if len(args) > 1 else "")
    if port == 0:
        return
    family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
    host = interface or ("::" if family == socket.AF_INET6 else "")
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            cannot = CannotListenError(interface, port, error)  # type: ignore[no-untyped-call]
            raise OSError(str(cannot)) from None


def split_fields(description: str) -> list[str]:
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


def unescape(text: str) -> str:
    """An endpoint field with its backslash escapes resolved."""
    out, escaped = [], False
    for c in text:
        if c == "\\" and not escaped:
            escaped = True
            continue
        out.append(c)
        escaped = False
    return "".join(out)
