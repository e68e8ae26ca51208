"""Source-address pools (``[[delivery.pools]]``, docs/delivery.md "Source-address pools").

A message belongs to the first pool, in file order, that matches it: its envelope sender's
domain (or a parent domain) is in ``senders``, one of its tags is in ``tags``, or it was
submitted with an SMTP credential in ``credentials``. Mail of no pool leaves from the
system's default address and says ``[server] hostname`` in EHLO.

Connections of a pool's mail leave from one of its addresses (``bindAddress``) and say that
address's HELO name. Which address: ``hash`` (default) hashes the destination (its preferred
MX host, else the domain or the smarthost), so a provider keeps seeing the same address;
``round-robin`` takes them in turn, connection by connection. An IPv4 source address
connects only to IPv4 addresses of a next hop, an IPv6 one only to IPv6 addresses.

:func:`check_source_addresses` runs at start-up: an address that cannot be bound (not
configured on this host) is one line and exit status 1.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from zope.interface import implementer

from smartrelay.config import Pool, SourceAddress
from smartrelay.delivery.routing import NextHop, domain_key
from smartrelay.reactor import IRelayReactor
from smartrelay.storage.queue import StoredMessage

if TYPE_CHECKING:
    from smartrelay.delivery.client import Connector, OutboundSession, ServerReply

__all__ = [
    "PoolChooser",
    "SourceAddressError",
    "SourceBoundEndpoint",
    "check_source_addresses",
    "first_that_reaches",
    "sender_domain",
]

#: Addresses of one next hop tried, at most (one after the other, each with the connect
#: timeout), from a source address.
MAX_ADDRESSES_TRIED = 4


class SourceAddressError(Exception):
    """A pool's source address cannot be bound; ``str()`` is the one-line reason."""


def check_source_addresses(pools: Sequence[Pool]) -> None:
    """Raise :class:`SourceAddressError` if an address of ``pools`` cannot be bound here.

    Binds a TCP socket to the address with port 0 (any free port) and closes it: what the
    outbound connections will do. Fails when the address is not configured on this host.
    """
    for pool in pools:
        for source in pool.source_addresses:
            family = socket.AF_INET6 if source.version == 6 else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.bind((source.address, 0))
            except OSError as error:
                reason = error.strerror or str(error)
                raise SourceAddressError(
                    f"delivery pool {pool.name!r}: cannot bind source address"
                    f" {source.address}: {reason}"
                ) from None


def sender_domain(sender: str) -> str:
    """The domain of an envelope sender (lower case, A-labels), or ``""`` (null sender)."""
    _, at, domain = sender.rpartition("@")
    return domain_key(domain) if at and domain else ""


class PoolChooser:
    """Finds the pool of a message and the source address of a connection."""

    def __init__(self, pools: Sequence[Pool]) -> None:
        self.pools = tuple(pools)
        self._turns: dict[str, int] = {}

    def pool_for(self, message: StoredMessage) -> Pool | None:
        """The first pool that matches ``message``, or None (the default address)."""
        if not self.pools:
            return None
        domain = sender_domain(message.sender)
        parents = _domain_and_parents(domain) if domain else ()
        tags = set(message.tags)
        for pool in self.pools:
            if (
                any(p in pool.senders for p in parents)
                or (tags and not tags.isdisjoint(pool.tags))
                or (message.credential is not None and message.credential in pool.credentials)
            ):
                return pool
        return None

    def source_for(self, pool: Pool, destination: str) -> SourceAddress:
        """The address the next connection of ``pool``'s mail to ``destination`` leaves from."""
        sources = pool.source_addresses
        if len(sources) == 1:
            return sources[0]
        if pool.selection == "round-robin":
            turn = self._turns.get(pool.name, 0)
            self._turns[pool.name] = turn + 1
            return sources[turn % len(sources)]
        return _hashed(pool.name, destination, sources)

    def sources_for(self, pool: Pool, destination: str) -> list[SourceAddress]:
        """:meth:`source_for`, then, if the pool has addresses of the other family (IPv4 or
        IPv6), one of those (by hash): for a next hop with no address of the first one's."""
        first = self.source_for(pool, destination)
        others = [s for s in pool.source_addresses if s.version != first.version]
        return [first, _hashed(pool.name, destination, others)] if others else [first]


def _hashed(name: str, destination: str, sources: Sequence[SourceAddress]) -> SourceAddress:
    digest = hashlib.sha256(f"{name}\0{destination}".encode()).digest()
    return sources[int.from_bytes(digest[:8], "big") % len(sources)]


def first_that_reaches(connectors: Sequence[Connector]) -> Connector:
    """A connector trying ``connectors`` in order, going on to the next only when a next hop
    has no address of the previous one's source family (any other failure is the answer)."""

    async def connect(hop: NextHop) -> tuple[OutboundSession | None, ServerReply | None]:
        for connector in connectors[:-1]:
            try:
                return await connector(hop)
            except Exception as error:
                if not isinstance(error.__cause__, NoAddressOfFamily):
                    raise
        return await connectors[-1](hop)

    return connect


def _domain_and_parents(domain: str) -> list[str]:
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


class NoAddressOfFamily(Exception):
    """The next hop has no address of the source address's family (IPv4 or IPv6)."""


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects a host name's addresses (of the family asked for)."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self.addresses:
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


@implementer(IStreamClientEndpoint)
class SourceBoundEndpoint:
    """A TCP connection to ``host``:``port`` from ``source``'s address.

    Only addresses of the source's family are tried (an IPv4 source never reaches an IPv6
    address), one after the other, at most :data:`MAX_ADDRESSES_TRIED`, in the order the
    resolver gives them.
    """

    def __init__(
        self,
        reactor: IRelayReactor,
        host: str,
        port: int,
        source: SourceAddress,
        timeout: float,
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._source = source
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _addresses(self) -> list[str]:
        try:
            literal = ipaddress.ip_address(self._host)
        except ValueError:
            literal = None
        if literal is not None:
            return [str(literal)] if literal.version == self._source.version else []
        receiver = _Addresses()
        kind = IPv6Address if self._source.version == 6 else IPv4Address
        self._reactor.nameResolver.resolveHostName(
            receiver, self._host, portNumber=self._port, addressTypes=[kind]
        )
        return await receiver.done

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        addresses = await self._addresses()
        if not addresses:
            raise NoAddressOfFamily(
                f"no IPv{self._source.version} address for the source address"
                f" {self._source.address}"
            )
        bind = (self._source.address, 0)
        last: Exception | None = None
        for address in addresses[:MAX_ADDRESSES_TRIED]:
            endpoint: IStreamClientEndpoint
            if self._source.version == 6:
                endpoint = TCP6ClientEndpoint(
                    self._reactor, address, self._port, self._timeout, bind
                )
            else:
                endpoint = TCP4ClientEndpoint(
                    self._reactor, address, self._port, self._timeout, bind
                )
            try:
                protocol: IProtocol = await endpoint.connect(factory)
            except Exception as error:
                last = error
                continue
            return protocol
        assert last is not None
        raise last
