"""Every runtime's readers survive an exception from handling one input (log, count, drop, go on).

Without the guard, one exception from the core ended the gevent and threaded UDP reader for
good (direct paths stopped), and a client's server connection hung. The core is made to raise
on purpose here, as a core bug or a rule broken by hostile input would.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from runtimes import ADAPTERS, HOST, adapter_fixture, free_port, icmp_packet, wait_until
from test_behaviour import client_config, ip_of, join, server_config

from candy_core import Connected


@pytest.fixture(params=sorted(ADAPTERS))
def adapter(request: pytest.FixtureRequest) -> Any:
    yield from adapter_fixture(request)


class FailOnce:
    """Stands in for a core method: raises on the first call, then delegates and counts."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            raise RuntimeError("boom: a bug in the core")
        return self.real(*args)


def shell_of(handle: Any) -> Any:
    return handle._client


def test_udp_reader_survives_an_exception(adapter: Any) -> None:
    server = adapter.start_server(server_config())
    handle = adapter.start_client(client_config(server, stun=(HOST, free_port())))
    join(server, handle)
    shell = shell_of(handle)
    patched = FailOnce(shell.core.receive_datagram)
    shell.core.receive_datagram = patched
    port = shell._udp.port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for i in range(3):
            sender.sendto(b"not a peer datagram %d" % i, (HOST, port))
            assert wait_until(lambda n=i: patched.calls > n, 5.0), "the UDP reader stopped"
    assert shell._pump.guard.errors == 1


def test_client_recovers_from_an_exception_on_server_bytes(adapter: Any) -> None:
    server = adapter.start_server(server_config())
    a = adapter.start_client(client_config(server))
    b = adapter.start_client(client_config(server))
    join(server, a, b)
    shell = shell_of(a)
    patched = FailOnce(shell.core.receive_data)
    shell.core.receive_data = patched
    joins = sum(isinstance(e, Connected) for e in a.events)
    b.send_packet(icmp_packet(ip_of(b), ip_of(a)))  # relayed to a: the first bytes a reads
    assert wait_until(lambda: patched.calls >= 1, 5.0), "nothing reached a"
    assert wait_until(lambda: sum(isinstance(e, Connected) for e in a.events) > joins, 10.0), (
        f"a did not reconnect: {a.events[-5:]}"
    )
    join(server, a, b)
    b.send_packet(icmp_packet(ip_of(b), ip_of(a), seq=2))
    assert a.recv_packet(5.0) == icmp_packet(ip_of(b), ip_of(a), seq=2)
    assert shell._pump.guard.errors == 1
