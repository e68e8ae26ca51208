"""The one listening service (SMTP, inbound, web): when it binds, how it fails, how it stops.

Real sockets on 127.0.0.1: a port taken by another socket is the case that matters.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol

from smartrelay.listening import ListenError, ListeningService, check_can_listen
from tests.conftest import real_reactor, service_missing

HOST = "127.0.0.1"


@pytest.fixture
def taken() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket listens on."""
    with socket.socket() as other:
        other.bind((HOST, 0))
        other.listen()
        yield int(other.getsockname()[1])


def service(description: str, fatal: list[str], stops: list[str] | None = None) -> ListeningService:
    factory = Factory.forProtocol(Protocol)
    factory.noisy = False
    return ListeningService(
        real_reactor(),
        description,
        factory,
        fatal.append,
        name="smtp",
        shown=f"shown:{description}",
        on_stop=None if stops is None else lambda: stops.append("stopped"),
    )


def port_number(listener: ListeningService) -> int:
    assert listener.port is not None
    return int(listener.port.getHost().port)  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_binds_in_privileged_start_and_not_again_in_start() -> None:
    """twistd calls privilegedStartService (as root), then startService (as the user it
    dropped to): the port is bound by the first, and the second keeps it."""
    fatal: list[str] = []
    stops: list[str] = []
    listener = service(f"tcp:0:interface={HOST}", fatal, stops)
    assert listener.port is None
    listener.privilegedStartService()
    assert listener.port is not None and not listener.running
    bound = port_number(listener)
    with socket.create_connection((HOST, bound), timeout=10):
        pass
    listener.startService()
    assert listener.running and port_number(listener) == bound and fatal == []
    stopped = listener.stopService()
    assert stopped is not None
    await stopped
    assert listener.port is None and not listener.running and stops == ["stopped"]
    with pytest.raises(ConnectionRefusedError), socket.create_connection((HOST, bound), 10):
        pass


@pytest_twisted.ensureDeferred
async def test_start_alone_binds() -> None:
    """Without twistd (a relay in-process, a delivery process) startService listens."""
    fatal: list[str] = []
    listener = service(f"tcp:0:interface={HOST}", fatal)
    listener.startService()
    try:
        assert listener.port is not None and fatal == []
    finally:
        stopped = listener.stopService()
        assert stopped is not None
        await stopped


def test_a_port_in_use_is_one_fatal_line(taken: int) -> None:
    fatal: list[str] = []
    listener = service(f"tcp:{taken}:interface={HOST}", fatal)
    listener.privilegedStartService()
    assert listener.port is None
    assert len(fatal) == 1 and "\n" not in fatal[0]
    assert fatal[0].startswith(f"smtp: cannot listen on shown:tcp:{taken}:interface={HOST}: ")
    assert "Address already in use" in fatal[0]
    listener.startService()  # no second attempt, no second line
    assert len(fatal) == 1
    assert listener.stopService() is None  # nothing to stop


def test_an_endpoint_string_that_does_not_parse_is_one_fatal_line() -> None:
    fatal: list[str] = []
    listener = service("nonsense:1", fatal)
    listener.startService()
    assert len(fatal) == 1 and fatal[0].startswith("smtp: cannot listen on shown:nonsense:1: ")
    assert listener.stopService() is None


def test_check_finds_a_port_in_use_without_listening(taken: int) -> None:
    fatal: list[str] = []
    listener = service(f"tcp:{taken}:interface={HOST}", fatal)
    with pytest.raises(ListenError) as raised:
        listener.check()
    message = str(raised.value)
    assert message.startswith(f"smtp: cannot listen on shown:tcp:{taken}:interface={HOST}: ")
    assert "Address already in use" in message and "\n" not in message
    assert listener.port is None and fatal == []


@pytest.mark.parametrize(
    "template",
    [
        "tcp:{port}:interface=127.0.0.1",
        "tcp:port={port}:interface=127.0.0.1",
        "tcp:interface=127.0.0.1:port={port}",
        "tcp:{port}",  # all interfaces: 127.0.0.1 is among them
        "ssl:{port}:privateKey=/nonexistent.pem:interface=127.0.0.1",  # e.g. [web] listen
    ],
)
def test_check_reads_the_port_and_interface_of_tcp_endpoints(taken: int, template: str) -> None:
    with pytest.raises(OSError, match="Address already in use"):
        check_can_listen(template.format(port=taken))


def test_check_passes_free_ports_and_other_endpoints(tmp_path: object) -> None:
    with socket.socket() as free:
        free.bind((HOST, 0))
        port = free.getsockname()[1]
    check_can_listen(f"tcp:{port}:interface={HOST}")
    check_can_listen(f"tcp:0:interface={HOST}")
    check_can_listen(f"unix:{tmp_path}/relay.sock")  # not checked: nothing is created
    check_can_listen("tcp:not-a-port")  # serverFromString reports it when listening


def test_check_of_a_tcp6_endpoint() -> None:
    if not socket.has_ipv6:
        service_missing("no IPv6 on this machine")
    with socket.socket(socket.AF_INET6) as other:
        try:
            other.bind(("::1", 0))
        except OSError:
            service_missing("no ::1 on this machine")
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(OSError, match="Address already in use"):
            check_can_listen(f"tcp6:{port}:interface=\\:\\:1")
