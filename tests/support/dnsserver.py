"""A real DNS server for tests: twisted.names' DNSServerFactory over authoritative zones held
in memory, on UDP and TCP of one free port of 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_twisted
from twisted.names import authority, dns, server

from tests.conftest import real_reactor

#: Starts a server for zones given as origin -> {name: records}; returns its port.
StartDns = Callable[[dict[str, dict[str, list[Any]]]], int]


class MemoryAuthority(authority.FileAuthority):
    """An authoritative zone held in memory (names -> records)."""

    def __init__(self, origin: str, records: dict[str, list[Any]]) -> None:
        self._zone = (origin, records)
        super().__init__(origin)  # type: ignore[no-untyped-call]

    def loadFile(self, filename: str) -> None:
        origin, records = self._zone
        soa: Any = dns.Record_SOA
        start: Any = (
            origin.encode(),
            soa(mname=b"ns1." + origin.encode(), rname=b"root." + origin.encode(), minimum=60),
        )
        self.soa = start
        zone: Any = {name.lower().encode(): list(rs) for name, rs in records.items()}
        self.records = zone


def TXT(*strings: str) -> Any:
    make: Any = dns.Record_TXT
    return make(*(s.encode() for s in strings), ttl=60)


def MX(host: str) -> Any:
    make: Any = dns.Record_MX
    return make(10, host.encode(), ttl=60)


def A(address: str) -> Any:
    make: Any = dns.Record_A
    return make(address, ttl=60)


class CountingFactory(server.DNSServerFactory):
    queries = 0

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> None:
        CountingFactory.queries += 1
        super().handleQuery(message, protocol, address)  # type: ignore[no-untyped-call]


@pytest_twisted.async_yield_fixture
async def dns_server() -> AsyncIterator[StartDns]:
    """Starts DNS servers (UDP and TCP on one free port of 127.0.0.1) for zones given as
    origin -> {name: records}; returns the port."""
    reactor: Any = real_reactor()
    ports: list[Any] = []

    def start(zones: dict[str, dict[str, list[Any]]]) -> int:
        authorities = [MemoryAuthority(origin, names) for origin, names in zones.items()]
        factory = CountingFactory(authorities=authorities)  # type: ignore[no-untyped-call]
        for _ in range(20):
            tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
            port = tcp.getHost().port
            try:
                datagrams: Any = dns.DNSDatagramProtocol
                udp = reactor.listenUDP(port, datagrams(factory), interface="127.0.0.1")
            except Exception:
                tcp.stopListening()
                continue
            ports.extend([tcp, udp])
            return int(port)
        raise RuntimeError("no free port for the DNS server")

    yield start
    for port in ports:
        await port.stopListening()
