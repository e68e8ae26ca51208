"""Where mail for a recipient domain goes: ``[delivery.routes]`` (SPEC section 2).

:class:`Router` picks the route for a recipient domain the way Postfix ``transport_maps``
does: the exact domain, else the closest parent domain (a route for ``example.com`` also
covers ``mail.example.com``), else ``*``. An ``mx`` route leaves the next hops to
:class:`smartrelay.delivery.mx.MxResolver`; an ``smtp://``, ``smtp+starttls://`` or
``smtps://`` route has exactly one next hop, known here.

Domains are compared in a canonical form (:func:`normalize_domain`): lower case, without a
trailing dot, internationalized labels as A-labels (``bücher.de`` is ``xn--bcher-kva.de``), so
both spellings of a domain share a route, a queue and a throttle.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from attrs import field, frozen

from smartrelay.config import Route

__all__ = ["NextHop", "ResolvedRoute", "Router", "domain_key", "normalize_domain"]

HopKind = Literal["mx", "static", "smarthost"]

# A DNS label as it may appear in a mail domain after IDNA encoding. Underscores are not
# valid in host names but do occur in DNS; they are tolerated rather than bounced here.
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def normalize_domain(domain: str) -> str:
    """The canonical form of a domain: lower case, no trailing dot, A-labels.

    Encodes internationalized labels with Python's ``idna`` codec (IDNA 2003). Raises
    ValueError for something that is not a domain name (empty, empty label, a label over 63
    octets, a name over 253 octets, characters other than letters, digits, ``-`` and ``_``).
    """
    name = domain.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError(f"invalid domain {domain!r}: empty")
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError as e:
        raise ValueError(f"invalid domain {domain!r}: {e}") from e
    if len(ascii_name) > 253 or _DOMAIN.fullmatch(ascii_name) is None:
        raise ValueError(f"invalid domain {domain!r}")
    return ascii_name


def domain_key(domain: str) -> str:
    """:func:`normalize_domain`, or just lower case without a trailing dot if that fails.

    For matching only: a malformed domain still gets a route (``*``) and a queue key; the
    MX resolver is the one that bounces it.
    """
    try:
        return normalize_domain(domain)
    except ValueError:
        name = domain.strip().lower()
        return name[:-1] if name.endswith(".") else name


def _redacted(value: str | None) -> str:
    return "None" if value is None else "'***'"


@frozen
class NextHop:
    """One server to try: a host name (or IP address) and port, and how to talk to it."""

    host: str
    port: int
    #: ``mx``: the host came from an MX lookup (or is the domain itself: implicit MX);
    #: ``static``: an ``smtp://`` route; ``smarthost``: ``smtp+starttls://`` or ``smtps://``.
    kind: HopKind
    #: ``smtps://``: TLS from the first byte.
    implicit_tls: bool = False
    #: ``smtp+starttls://``: STARTTLS is required; without it, do not send (and never send
    #: AUTH in clear).
    require_tls: bool = False
    username: str | None = None
    #: Shown as ``'***'`` in the repr, to keep it out of logs and tracebacks.
    password: str | None = field(default=None, repr=_redacted)


@frozen
class ResolvedRoute:
    """What the router says for one recipient domain."""

    #: The ``[delivery.routes]`` entry that matched.
    route: Route
    #: The recipient domain, normalized (:func:`normalize_domain`; lower case without a
    #: trailing dot if it is not a valid domain name).
    domain: str
    #: For ``mx`` routes None (the hops come from the MX resolver); else the one hop.
    static_hop: NextHop | None


class Router:
    """Matches recipient domains to ``[delivery.routes]`` entries."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes: dict[str, Route] = {}
        self._hops: dict[str, NextHop | None] = {}
        for route in routes:
            key = "*" if route.domain == "*" else domain_key(route.domain)
            if key in self._routes:
                continue  # the first entry for a domain wins (config forbids duplicates)
            self._routes[key] = route
            self._hops[key] = _static_hop(route)

    def route_for(self, domain: str) -> ResolvedRoute:
        """The most specific route for ``domain``: exact, then the closest parent, then ``*``.

        Case-insensitive; a trailing dot is ignored. Raises LookupError if nothing matches
        (only possible when the routes given have no ``*`` entry; a config always has one).
        """
        name = domain_key(domain)
        candidate = name
        while candidate:
            if candidate in self._routes:
                return self._resolved(candidate, name)
            _, dot, parent = candidate.partition(".")
            candidate = parent if dot else ""
        if "*" in self._routes:
            return self._resolved("*", name)
        raise LookupError(f"no route for {domain!r} (and no '*' route)")

    def destination_key(self, resolved: ResolvedRoute) -> str:
        """The queue/throttle key of a resolved route.

        ``smtp://host:port`` for a route with a fixed hop, whatever its scheme (all domains
        routed to one smarthost share one queue); the recipient domain for ``mx`` routes.
        """
        hop = resolved.static_hop
        if hop is None:
            return resolved.domain
        host = f"[{hop.host}]" if ":" in hop.host else hop.host
        return f"smtp://{host}:{hop.port}"

    def _resolved(self, key: str, domain: str) -> ResolvedRoute:
        return ResolvedRoute(route=self._routes[key], domain=domain, static_hop=self._hops[key])


def _static_hop(route: Route) -> NextHop | None:
    scheme = route.scheme
    if scheme == "mx":
        return None
    host = route.host.lower().rstrip(".")
    if scheme == "smtp":
        return NextHop(
            host=host,
            port=route.port,
            kind="static",
            username=route.username,
            password=route.password,
        )
    if scheme in ("smtp+starttls", "smtps"):
        return NextHop(
            host=host,
            port=route.port,
            kind="smarthost",
            implicit_tls=scheme == "smtps",
            require_tls=scheme == "smtp+starttls",
            username=route.username,
            password=route.password,
        )
    raise ValueError(f"route for {route.domain!r}: unsupported target {route.redacted_target!r}")
