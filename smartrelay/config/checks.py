"""Value checks for the config reader: domains, URLs, database URLs, route targets and
Twisted endpoint strings.

Each check returns a problem (one line, for :class:`~smartrelay.config.ConfigError`) or None;
none of them raises or knows about TOML tables. Endpoint strings are checked with public Twisted
API only: :func:`~twisted.internet.endpoints.serverFromString` builds the endpoint (nothing is
bound) and the endpoint's ``listen`` is called on :class:`_RecordingReactor`, a stand-in of our
own that notes the port, interface or socket path the endpoint would ask a real reactor for.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from urllib.parse import SplitResult, urlsplit

from attrs import define
from twisted.internet import endpoints
from twisted.internet.protocol import Factory

__all__ = [
    "MAILBOX_DEFAULT_PORTS",
    "ROUTE_DEFAULT_PORTS",
    "database_url_problem",
    "endpoint_problem",
    "is_domain",
    "redact_url",
    "route_target_problem",
    "split_url",
]

#: Smarthost URL schemes of ``[delivery.routes]`` and their default ports.
ROUTE_DEFAULT_PORTS: dict[str, int] = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}
#: ``[[feedback.mailboxes]]`` URL schemes and their default ports.
MAILBOX_DEFAULT_PORTS: dict[str, int] = {"imap": 143, "imaps": 993, "pop3": 110, "pop3s": 995}


_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def is_domain(text: str) -> bool:
    """Letters, digits and hyphens in dot-separated labels (no leading/trailing dot)."""
    return len(text) <= 253 and _DOMAIN.fullmatch(text) is not None


def split_url(
    url: str, schemes: tuple[str, ...], what: str = "URL"
) -> tuple[SplitResult, str | None]:
    """Split ``url`` and check scheme, host and port. Returns (parts, problem or None)."""
    shown = redact_url(url)
    wanted = ", ".join(f"{s}://" for s in schemes)
    try:
        parts = urlsplit(url)
    except ValueError as e:
        return urlsplit(""), f"invalid {what} {shown!r}: {e}"
    if any(c.isspace() for c in url):
        return parts, f"invalid {what} {shown!r}: contains white space"
    if parts.scheme.lower() not in schemes:
        return parts, f"invalid {what} {shown!r}: scheme must be {wanted}"
    if not parts.hostname:
        return parts, f"invalid {what} {shown!r}: no host"
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return parts, f"invalid {what} {shown!r}: invalid port"
    if parts.netloc.endswith(":"):
        return parts, f"invalid {what} {shown!r}: empty port"
    return parts, None


def redact_url(url: str) -> str:
    """Replace the password of a URL's user info with ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc_end = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if i != -1:
            netloc_end = min(netloc_end, i)
    netloc, tail = rest[:netloc_end], rest[netloc_end:]
    userinfo, at, hostport = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hostport}{tail}"


def database_url_problem(url: str) -> str | None:
    hint = "use 'sqlite:PATH' or 'postgresql://user:pass@host:5432/dbname'"
    if url.startswith("sqlite:"):
        rest = url[len("sqlite:") :]
        if rest.startswith("//"):
            if not rest.startswith("///"):
                return (
                    f"invalid SQLite URL {url!r}: a host is not allowed"
                    " (use 'sqlite:relative/path' or 'sqlite:///absolute/path')"
                )
            rest = rest[2:]
        if not rest:
            return f"invalid SQLite URL {url!r}: no file path ({hint})"
        return None
    shown = redact_url(url)
    scheme = url.partition(":")[0].lower()
    if scheme not in ("postgresql", "postgres") or not url[len(scheme) :].startswith("://"):
        return f"invalid database URL {shown!r} ({hint})"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return f"invalid database URL {shown!r}: invalid port"
    if not parts.hostname:
        return f"invalid database URL {shown!r}: no host ({hint})"
    if not parts.path.strip("/"):
        return f"invalid database URL {shown!r}: no database name ({hint})"
    return None


def route_target_problem(target: str) -> str | None:
    parts, problem = split_url(target, tuple(ROUTE_DEFAULT_PORTS), "route target")
    if problem is not None:
        return (
            f"{problem} (use 'mx' or e.g. 'smtp://host:25', 'smtp+starttls://user:pass@host:587')"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"invalid route target {redact_url(target)!r}: must not have a path or query"
    if parts.password is not None and not parts.username:
        return f"invalid route target {redact_url(target)!r}: password without a user name"
    return None


def endpoint_problem(description: str) -> str | None:
    """Check a Twisted server endpoint string by constructing (not listening on) it."""
    if not description.strip():
        return "invalid endpoint '': must not be empty (e.g. 'tcp:2525:interface=127.0.0.1')"
    reactor = _RecordingReactor()
    # serverFromString is untyped in Twisted; give it a type here.
    parse: Callable[[object, str], object] = endpoints.serverFromString
    try:
        endpoint = parse(reactor, description)
    except OSError as e:
        # ssl: endpoints read their certificate and key files while parsing.
        reason = f"{e.strerror or e}: {e.filename!r}" if e.filename else str(e)
        return f"invalid endpoint {description!r}: {reason}"
    except Exception as e:
        return f"invalid endpoint {description!r}: {_endpoint_reason(description, e)}"
    problem = _endpoint_address_problem(endpoint, reactor)
    if problem is not None:
        return f"invalid endpoint {description!r}: {problem}"
    return None


def _endpoint_reason(description: str, error: Exception) -> str:
    text = str(error)
    match = re.search(r"unexpected keyword argument '(\w+)'", text)
    if match:
        return f"unknown option {match.group(1)!r}"
    match = re.search(r"invalid literal for int\(\) with base 10: ('.*')", text)
    if match:
        return f"not a number: {match.group(1)}"
    if "got multiple values for argument" in text:
        return "too many ':'-separated fields (write a ':' inside a value as '\\:')"
    if isinstance(error, IndexError) and description.startswith("systemd:"):
        return "no such inherited socket (not started by systemd socket activation?)"
    if type(error).__module__.startswith("OpenSSL"):
        return f"cannot load TLS certificate or key: {text}"
    return text or type(error).__name__


#: The endpoint classes whose ``listen`` only calls the reactor (adopted systemd sockets are
#: left out: their ``listen`` closes the inherited descriptor).
_RECORDABLE = (
    endpoints.TCP4ServerEndpoint,
    endpoints.TCP6ServerEndpoint,
    endpoints.SSL4ServerEndpoint,
    endpoints.UNIXServerEndpoint,
)


@define
class _RecordingReactor:
    """Stands in for the reactor's ``listenTCP``/``listenSSL``/``listenUNIX`` (the signatures
    of ``IReactorTCP``, ``IReactorSSL`` and ``IReactorUNIX``): notes what an endpoint's
    ``listen`` asks for, binds nothing, and returns no port."""

    port: int | None = None
    interface: str | None = None
    unix_address: str | None = None

    def listenTCP(self, port: int, factory: object, backlog: int = 50, interface: str = "") -> None:
        self.port, self.interface = port, interface

    def listenSSL(
        self,
        port: int,
        factory: object,
        contextFactory: object,
        backlog: int = 50,
        interface: str = "",
    ) -> None:
        self.port, self.interface = port, interface

    def listenUNIX(
        self,
        address: str,
        factory: object,
        backlog: int = 50,
        mode: int = 0o666,
        wantPID: int = 0,
    ) -> None:
        self.unix_address = address


def _endpoint_address_problem(endpoint: object, reactor: _RecordingReactor) -> str | None:
    """Checks Twisted leaves to listen time: port range, interface address, socket path."""
    if not isinstance(endpoint, _RECORDABLE):
        return None
    # Any factory will do: the recording reactor never builds a protocol. (Some endpoints'
    # listen is untyped in Twisted; give it a type here.)
    listen: Callable[[Factory], object] = endpoint.listen
    listen(Factory())
    port = reactor.port
    if port is not None and not 0 <= port <= 65535:
        return f"port {port} out of range"
    interface = reactor.interface
    if interface:
        ipv6 = isinstance(endpoint, endpoints.TCP6ServerEndpoint)
        try:
            version = ipaddress.ip_address(interface).version
        except ValueError:
            return f"interface {interface!r} is not an IP address"
        if ipv6 and version != 6:
            return f"interface {interface!r} is not an IPv6 address"
        if not ipv6 and version != 4:
            return f"interface {interface!r} is not an IPv4 address (use tcp6: for IPv6)"
    if isinstance(endpoint, endpoints.UNIXServerEndpoint) and not reactor.unix_address:
        return "no socket path"
    return None
