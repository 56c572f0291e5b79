"""What a user of any runtime notices: joining, relaying, bad passwords, slow peers, restarts.

Every test runs once per runtime adapter (tests/runtimes.py); the shells run on 127.0.0.1
without TUN devices and exchange packets through the embedding API.
"""

from __future__ import annotations

import socket
import threading
import time
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import pytest
import websockets.sync.client as ws_sync
from runtimes import (
    ADAPTERS,
    HOST,
    AsyncioAdapter,
    ClientHandle,
    RuntimeAdapter,
    ServerHandle,
    adapter_fixture,
    free_port,
    icmp_packet,
    msg_auth,
    msg_vmac,
    open_fds,
    random_vmac,
    recv_matching,
    udp_packet,
    wait_until,
)

from candy_core import (
    AddressAssigned,
    AddressChanged,
    ClientConfig,
    ClientDisconnected,
    Connected,
    Disconnected,
    Limits,
    Reconnecting,
    ServerConfig,
)

PASSWORD = "behaviour"
NETWORK = IPv4Network("10.99.0.0/24")
DIRECTED = IPv4Address("10.99.0.255")
MDNS = IPv4Address("224.0.0.251")
#: A dynamic range for tests that add members by hand: its hosts never include HAND_MADE,
#: so no dynamic client can be handed (or take over) one of their addresses.
LOWER_HALF = IPv4Network("10.99.0.0/25")
HAND_MADE = (IPv4Address("10.99.0.250"), IPv4Address("10.99.0.251"))
assert not any(ip in LOWER_HALF for ip in HAND_MADE)


@pytest.fixture(params=sorted(ADAPTERS))
def adapter(request: pytest.FixtureRequest) -> Any:
    yield from adapter_fixture(request)


@pytest.fixture(params=sorted(ADAPTERS))
def adapter_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- helpers ----------------------------------------------------------------------------------
def server_config(dhcp: IPv4Network = NETWORK, **kw: Any) -> ServerConfig:
    return ServerConfig.from_strings(PASSWORD, str(dhcp), **kw)


def client_config(server: ServerHandle | int, **kw: Any) -> ClientConfig:
    port = server if isinstance(server, int) else server.port
    options: dict[str, Any] = {
        "password": PASSWORD,
        "host": HOST,
        "port": port,
        "backoff_min": 0.05,
        "backoff_max": 0.4,
    }
    options.update(kw)
    return ClientConfig(**options)


def join(server: ServerHandle, *clients: ClientHandle, timeout: float = 5.0) -> None:
    """Wait until every client has joined and the server holds its address."""
    for client in clients:
        assert client.wait_connected(timeout), f"not connected: {client.events}"
        assert client.address is not None
    wanted = {client.address.ip for client in clients}  # type: ignore[union-attr]
    assert wait_until(lambda: wanted <= server.authenticated(), timeout), (
        f"server holds {server.authenticated()}, expected {wanted}"
    )


def ip_of(client: ClientHandle) -> IPv4Address:
    assert client.address is not None
    return client.address.ip


def send_and_expect(sender: ClientHandle, receiver: ClientHandle, payload: bytes) -> None:
    """A packet from ``sender`` to ``receiver`` arrives unchanged."""
    packet = icmp_packet(ip_of(sender), ip_of(receiver), payload)
    sender.send_packet(packet)
    got = recv_matching(receiver, lambda p: p == packet, 5.0)
    assert got == packet, f"{payload!r} did not arrive"


def exchange(a: ClientHandle, b: ClientHandle, tag: str = "") -> None:
    """Packets go both ways between ``a`` and ``b``."""
    send_and_expect(a, b, f"a->b {tag}".encode())
    send_and_expect(b, a, f"b->a {tag}".encode())


def of_type(events: list[Any], kind: type) -> list[Any]:
    return [e for e in list(events) if isinstance(e, kind)]


def ws_connect(port: int, **kw: Any) -> ws_sync.ClientConnection:
    """A client made with the independent ``websockets`` library (no keep-alive pings)."""
    kw.setdefault("ping_interval", None)
    kw.setdefault("close_timeout", 1)
    return ws_sync.connect(f"ws://{HOST}:{port}/", proxy=None, open_timeout=5, **kw)


_last_stamp = 0


def handshake_stamp() -> int:
    """A timestamp for a hand-made handshake: now, but never one handed out before.

    The relay refuses byte-identical handshakes as replays, so two hand-made ones for the
    same address within one second must not share their timestamp.
    """
    global _last_stamp
    _last_stamp = max(int(time.time()), _last_stamp + 1)
    return _last_stamp


def ws_join(ws: ws_sync.ClientConnection, ip: IPv4Address) -> None:
    """Authenticate by hand as ``ip``; the PONG proves the server has processed AUTH."""
    ts = handshake_stamp()
    ws.send(msg_vmac(PASSWORD, random_vmac(), ts))
    ws.send(msg_auth(PASSWORD, ip, ts))
    assert ws.ping(b"joined").wait(5), "no PONG after AUTH"


# --- tests ------------------------------------------------------------------------------------
def test_two_dynamic_clients_get_addresses_and_exchange_packets(adapter: RuntimeAdapter) -> None:
    server = adapter.start_server(server_config())
    a = adapter.start_client(client_config(server))
    b = adapter.start_client(client_config(server))
    join(server, a, b)

    assert a.address is not None and b.address is not None
    assert a.address.network == NETWORK and b.address.network == NETWORK
    assert a.address.ip != b.address.ip
    for address in (a.address, b.address):
        assert address.ip not in (NETWORK.network_address, NETWORK.broadcast_address)
    for client in (a, b):
        assert of_type(client.events, AddressChanged)[-1].address == client.address
        assert of_type(client.events, Connected)[-1].address == client.address
    assert {e.address for e in of_type(server.events, AddressAssigned)} == {
        a.address,
        b.address,
    }
    for i in range(3):
        exchange(a, b, str(i))


def test_static_client_is_reachable_from_a_dynamic_one(adapter: RuntimeAdapter) -> None:
    server = adapter.start_server(server_config())
    static = adapter.start_client(client_config(server, tun=IPv4Interface("10.99.0.77/24")))
    join(server, static)  # first, so that no dynamic client is handed .77
    dynamic = adapter.start_client(client_config(server))
    join(server, dynamic)

    assert static.address == IPv4Interface("10.99.0.77/24")
    assert of_type(server.events, AddressAssigned)[0].address.ip != static.address.ip
    exchange(dynamic, static)


def test_broadcast_and_multicast_reach_everybody_but_the_sender(adapter: RuntimeAdapter) -> None:
    server = adapter.start_server(server_config())
    a, b, c = (adapter.start_client(client_config(server)) for _ in range(3))
    join(server, a, b, c)

    for dst in (DIRECTED, MDNS):
        packet = udp_packet(ip_of(a), dst, 5353, 5353, f"to {dst}".encode())
        a.send_packet(packet)
        for receiver in (b, c):
            assert receiver.recv_packet(5.0) == packet
        assert a.recv_packet(0.3) is None, "the sender got its own broadcast back"
    exchange(b, c)


def test_wrong_password_is_refused_and_retried_while_others_work(
    adapter: RuntimeAdapter,
) -> None:
    server = adapter.start_server(server_config())
    a = adapter.start_client(client_config(server))
    b = adapter.start_client(client_config(server))
    join(server, a, b)
    wrong = adapter.start_client(client_config(server, password="not the password"))

    assert wait_until(lambda: len(of_type(wrong.events, Reconnecting)) >= 4, 5.0), wrong.events
    exchange(a, b, "during retries")

    disconnects = of_type(wrong.events, Disconnected)
    assert disconnects and all("password" in e.reason for e in disconnects), disconnects
    retries = of_type(wrong.events, Reconnecting)
    assert [e.attempt for e in retries[:4]] == [1, 2, 3, 4]
    delays = [e.delay for e in retries[:4]]
    assert delays == sorted(delays) and delays[0] < delays[3], delays
    assert all(0.05 <= e.delay <= 0.4 for e in retries), retries
    assert not of_type(wrong.events, Connected)
    assert not wrong.wait_connected(0.2)
    refused = [e for e in of_type(server.events, ClientDisconnected) if e.ip is None]
    assert any("password" in e.reason for e in refused), server.events
    assert server.authenticated() == {ip_of(a), ip_of(b)}
    exchange(a, b, "after retries")


def test_a_connection_over_the_limits_is_closed_at_once_and_others_still_join(
    adapter: RuntimeAdapter,
) -> None:
    # One connection may wait to authenticate; the next is refused when it is accepted,
    # before anything of it is read (the blocking shells refuse it in the accept loop).
    server = adapter.start_server(server_config(limits=Limits(max_pending=1)))
    silent = socket.create_connection((HOST, server.port), timeout=5)
    try:
        assert wait_until(lambda: server.stats().connections == 1, 5.0)
        with socket.create_connection((HOST, server.port), timeout=5) as refused:
            refused.sendall(b"GET / HTTP/1.1\r\n\r\n")
            try:
                got = refused.recv(100)
            except ConnectionResetError:
                got = b""
            assert got == b"", got
        assert server.stats().refused == 1
    finally:
        silent.close()
    assert wait_until(lambda: server.stats().connections == 2, 5.0)
    a = adapter.start_client(client_config(server))
    join(server, a)
    b = adapter.start_client(client_config(server))  # one at a time: one may be pending
    join(server, a, b)
    exchange(a, b)
    assert server.stats().refused == 1


def test_a_slow_reader_does_not_stop_the_relay(adapter: RuntimeAdapter) -> None:
    server = adapter.start_server(server_config(dhcp=LOWER_HALF))
    a = adapter.start_client(client_config(server))
    b = adapter.start_client(client_config(server))
    join(server, a, b)

    # A third member that joins and then never reads: small receive buffer, and the
    # websockets library stops reading from the socket once a few frames are queued.
    sock = socket.create_connection((HOST, server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with ws_connect(server.port, sock=sock, max_queue=4) as slow:
        slow_ip = HAND_MADE[0]
        ws_join(slow, slow_ip)
        assert slow_ip in server.authenticated()

        flood = udp_packet(ip_of(a), LOWER_HALF.broadcast_address, 9, 9, b"x" * 1200)
        deadline = time.monotonic() + 20.0
        sent = 0
        while server.stats().backlog_dropped == 0 and time.monotonic() < deadline:
            a.send_packets([flood] * 200)
            sent += 200
            # A and B keep talking while the flood goes on.
            if sent % 2000 == 0:
                send_and_expect(a, b, f"during flood {sent}".encode())
        stats = server.stats()
        assert stats.backlog_dropped > 0, f"no backlog drops after {sent} broadcasts: {stats}"
        exchange(a, b, "after flood")
        assert server.authenticated() == {ip_of(a), ip_of(b), slow_ip}
        assert not of_type(a.events, Disconnected) and not of_type(b.events, Disconnected)
        # Leave without the closing handshake: this reader never reads the server's answer.
        slow.close_socket()


def test_idle_connections_time_out_but_pinging_clients_stay(adapter: RuntimeAdapter) -> None:
    server = adapter.start_server(server_config(dhcp=LOWER_HALF, idle_timeout=1.5))
    keepalive = {"ping_interval": 0.3, "dead_after": 1.0}
    a = adapter.start_client(client_config(server, **keepalive))
    b = adapter.start_client(client_config(server, **keepalive))
    join(server, a, b)

    # A member that went quiet for good: joins, then neither sends nor answers pings.
    with socket.create_connection((HOST, server.port), timeout=8) as silent:
        silent.sendall(
            b"GET / HTTP/1.1\r\nHost: h:1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        auth = msg_auth(PASSWORD, HAND_MADE[1], handshake_stamp())
        silent.sendall(bytes((0x82, 0x80 | len(auth))) + b"\0\0\0\0" + auth)  # zero mask
        start = time.monotonic()
        received = b""
        while chunk := silent.recv(4096):
            received += chunk
        elapsed = time.monotonic() - start
        assert 1.0 <= elapsed <= 5.0, elapsed
        assert b"\x89" in received, "the server did not ping the silent member first"
        assert b"idle timeout" in received, received

    time.sleep(max(0.0, 3.0 - (time.monotonic() - start)))
    for client in (a, b):
        assert not of_type(client.events, Disconnected), client.events
    assert server.authenticated() == {ip_of(a), ip_of(b)}
    gone = [e.ip for e in of_type(server.events, ClientDisconnected)]
    assert gone == [HAND_MADE[1]], server.events
    exchange(a, b, "after idling")


def test_clients_reconnect_to_a_restarted_server_with_the_same_addresses(
    adapter: RuntimeAdapter, tmp_path: Any
) -> None:
    port = free_port()
    first = adapter.start_server(server_config(), port=port)
    a = adapter.start_client(client_config(port), state_dir=str(tmp_path))
    b = adapter.start_client(client_config(port))
    join(first, a, b)
    before = (a.address, b.address)
    exchange(a, b, "before restart")

    first.stop()
    assert wait_until(lambda: of_type(a.events, Disconnected), 5.0)
    assert wait_until(lambda: of_type(b.events, Disconnected), 5.0)
    time.sleep(0.3)  # a few refused attempts while nobody listens

    second = adapter.start_server(server_config(), port=port)
    join(second, a, b)
    assert (a.address, b.address) == before
    requested = {e.address for e in of_type(second.events, AddressAssigned)}
    assert requested == set(before)
    exchange(a, b, "after restart")
    assert (tmp_path / "address" / "__noname__").read_text().strip() == str(before[0])


def test_close_leaves_no_threads_sockets_or_tasks(adapter_name: str) -> None:
    baseline_fds = open_fds()
    baseline_threads = set(threading.enumerate())

    adapter = ADAPTERS[adapter_name]()
    try:
        server = adapter.start_server(server_config())
        a = adapter.start_client(client_config(server))
        b = adapter.start_client(client_config(server))
        join(server, a, b)
        exchange(a, b)
        b.stop()  # one stopped by hand, the rest by close()
        assert wait_until(lambda: ip_of(b) not in server.authenticated(), 5.0)
    finally:
        adapter.close()

    assert wait_until(lambda: open_fds() <= baseline_fds + 2, 2.0), (
        f"{open_fds() - baseline_fds} file descriptors leaked"
    )
    assert wait_until(lambda: set(threading.enumerate()) <= baseline_threads, 2.0), (
        f"threads left: {set(threading.enumerate()) - baseline_threads}"
    )
    leftover = [
        t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()
    ]
    assert not leftover, leftover
    if isinstance(adapter, AsyncioAdapter):
        assert adapter.loop.is_closed()
        assert adapter.leftover_tasks == []


def test_mixed_runtimes_share_one_network() -> None:
    """An asyncio server with a gevent and a threaded client: one network, as usual."""
    adapters = [ADAPTERS[name]() for name in ("asyncio", "gevent", "threaded")]
    try:
        server = adapters[0].start_server(server_config())
        a = adapters[1].start_client(client_config(server))
        b = adapters[2].start_client(client_config(server))
        join(server, a, b)
        exchange(a, b, "mixed")
        multicast = udp_packet(ip_of(b), IPv4Address("224.0.0.251"), 5353, 5353, b"mdns")
        b.send_packet(multicast)
        assert recv_matching(a, lambda p: p == multicast, 2.0) is not None
    finally:
        for adapter in reversed(adapters):
            adapter.close()
