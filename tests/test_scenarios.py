"""Whole scenarios: this project's RelayServer core and several Client cores, wired in memory.

A small pump moves bytes between the cores, opens and closes the in-memory connections the
cores ask for, and runs a virtual clock from deadline to deadline. Everything is
deterministic (seeded randomness), and a scenario of minutes runs in milliseconds.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from candy_core import (
    AddressChanged,
    Client,
    ClientAuthenticated,
    ClientConfig,
    ClientDisconnected,
    ClientState,
    Connected,
    Disconnected,
    Reconnecting,
    RelayServer,
    ServerConfig,
    new_vmac,
)

PASSWORD = "scenario-pw"
WALL = 1_764_000_000
NET = "10.99.0.0/24"


def packet(src: IPv4Address | str, dst: IPv4Address | str, body: bytes = b"payload") -> bytes:
    """A minimal IPv4 packet: a 20-byte header with the addresses, then ``body``."""
    head = bytearray(20)
    head[0] = 0x45
    head[2:4] = (20 + len(body)).to_bytes(2, "big")
    head[12:16] = IPv4Address(src).packed
    head[16:20] = IPv4Address(dst).packed
    return bytes(head) + body


@dataclass(eq=False)
class Node:
    """One client core plus what the shell would have seen of it."""

    name: str
    client: Client
    cid: Hashable | None = None
    received: list[bytes] = field(default_factory=list)
    events: list[object] = field(default_factory=list)

    @property
    def state(self) -> ClientState:
        return self.client.state

    @property
    def ip(self) -> IPv4Address:
        assert self.client.address is not None, f"{self.name} has no address"
        return self.client.address.ip

    def of_type(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def take_received(self) -> list[bytes]:
        received, self.received = self.received, []
        return received


class Net:
    """A relay server and its clients, connected by in-memory pipes, on a virtual clock."""

    def __init__(self, seed: int = 0, dhcp: str | None = NET) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.server_config = ServerConfig.from_strings(PASSWORD, dhcp)
        self.server = RelayServer(self.server_config, random.Random(seed))
        self.server_up = True
        self.server_events: list[object] = []
        self.nodes: list[Node] = []
        self.links: dict[Hashable, Node] = {}
        #: Connections that carry nothing any more, in either direction (a dead path).
        self.silenced: set[Hashable] = set()
        self._cids = itertools.count(1)

    @property
    def wall(self) -> float:
        return WALL + self.now

    # --- building -----------------------------------------------------------------------
    def client(
        self,
        name: str,
        *,
        password: str = PASSWORD,
        tun: str | None = None,
        state: ClientState | None = None,
    ) -> Node:
        """Start a client core (it asks to connect at once)."""
        cfg = ClientConfig(
            password=password,
            name=name,
            tun=IPv4Interface(tun) if tun else None,
            host="relay.test",
            port=80,
            confusion=True,
        )
        rng = random.Random(f"{self.seed}-{name}-{len(self.nodes)}")
        node = Node(name, Client(cfg, rng, state or ClientState(new_vmac(rng))))
        self.nodes.append(node)
        node.client.start(self.now)
        self.pump()
        return node

    def replace(self, old: Node) -> Node:
        """A restarted client: a new core with the same remembered state; the old one is gone."""
        self.nodes.remove(old)
        if old.cid is not None:
            self.links.pop(old.cid, None)
            self.silenced.add(old.cid)  # the crashed process's socket says nothing more
        cfg = old.client.config
        rng = random.Random(f"{self.seed}-{old.name}-{len(self.nodes)}-again")
        node = Node(old.name, Client(cfg, rng, old.state))
        self.nodes.append(node)
        node.client.start(self.now)
        self.pump()
        return node

    def restart_server(self, down_for: float = 0.0) -> None:
        """The relay process restarts: every connection drops, the new core remembers nothing."""
        for cid, node in list(self.links.items()):
            if node.cid == cid:
                node.cid = None
                node.client.connection_lost(self.now, "connection reset by peer")
        self.links.clear()
        self.silenced.clear()
        self.server = RelayServer(self.server_config, random.Random(self.seed + 1000))
        self.server_up = False
        self.pump()
        self.run(down_for)
        self.server_up = True
        self.pump()

    # --- moving bytes -------------------------------------------------------------------
    def pump(self) -> None:
        """Move everything that is ready until nothing moves."""
        server = self.server
        for _ in range(10_000):
            busy = False
            for node in list(self.nodes):
                busy |= self._pump_client(node)
            for cid, data in server.data_to_send():
                busy = True
                node = self.links.get(cid)
                if node is not None and node.cid == cid and cid not in self.silenced:
                    node.client.receive_data(data, self.now, self.wall)
            for cid in server.connections_to_close():
                busy = True
                node = self.links.pop(cid, None)
                if node is not None and node.cid == cid:
                    node.cid = None
                    if cid not in self.silenced:
                        node.client.connection_lost(self.now, "connection closed by the server")
            while (event := server.next_event()) is not None:
                busy = True
                self.server_events.append(event)
            if not busy:
                return
        raise AssertionError("the pump never settled")

    def _pump_client(self, node: Node) -> bool:
        server = self.server
        core = node.client
        busy = False
        if core.take_connect_request():
            busy = True
            if self.server_up:
                cid = next(self._cids)
                node.cid = cid
                self.links[cid] = node
                server.connection_made(cid, self.now, node.name)
                core.connection_made(self.now)
            else:
                core.connection_failed(self.now, "connection refused")
        data = core.data_to_send()
        if data:
            busy = True
            if node.cid is not None and node.cid not in self.silenced:
                server.receive_data(node.cid, data, self.now, self.wall)
        if core.take_close_request():
            busy = True
            cid, node.cid = node.cid, None
            if cid is not None:
                self.links.pop(cid, None)
                if cid not in self.silenced:
                    server.connection_lost(cid, "closed by the client")
        node.received.extend(core.packets_to_deliver())
        while (event := core.next_event()) is not None:
            busy = True
            node.events.append(event)
        return busy

    # --- time ---------------------------------------------------------------------------
    def _deadlines(self) -> list[float]:
        found = [n.client.next_deadline() for n in self.nodes]
        found.append(self.server.next_deadline())
        return [d for d in found if d is not None]

    def run(self, seconds: float) -> None:
        """Advance the clock by ``seconds``, firing every timer on the way."""
        target = self.now + seconds
        for _ in range(1_000_000):
            deadlines = self._deadlines()
            if not deadlines or min(deadlines) > target:
                break
            self.now = max(self.now, min(deadlines))
            for node in list(self.nodes):
                deadline = node.client.next_deadline()
                if deadline is not None and deadline <= self.now:
                    node.client.handle_timer(self.now)
            deadline = self.server.next_deadline()
            if deadline is not None and deadline <= self.now:
                self.server.handle_timer(self.now)
            self.pump()
        else:
            raise AssertionError("the clock never reached its target")
        self.now = target
        self.pump()

    def run_until(self, condition: Callable[[], bool], timeout: float, step: float = 0.5) -> float:
        """Advance in small steps until ``condition()``; returns the time it took."""
        start = self.now
        while not condition():
            assert self.now - start < timeout, f"not within {timeout} s"
            self.run(step)
        return self.now - start

    # --- traffic ------------------------------------------------------------------------
    def send(self, node: Node, dst: IPv4Address | str, body: bytes = b"payload") -> bytes:
        """``node`` writes a packet to its TUN device; returns it."""
        pkt = packet(node.ip, dst, body)
        node.client.receive_packet(pkt, self.now)
        self.pump()
        return pkt


def joined(*nodes: Node) -> Callable[[], bool]:
    return lambda: all(n.client.authenticated for n in nodes)


def assert_reachable(net: Net, a: Node, b: Node) -> None:
    """A packet from ``a`` arrives at ``b`` and the answer comes back."""
    a.take_received()
    b.take_received()
    ping = net.send(a, b.ip, b"ping from " + a.name.encode())
    assert b.take_received() == [ping]
    pong = net.send(b, a.ip, b"pong from " + b.name.encode())
    assert a.take_received() == [pong]


# --- scenarios --------------------------------------------------------------------------
def test_dynamic_clients_get_distinct_addresses_and_talk() -> None:
    net = Net()
    nodes = [net.client(name) for name in ("alpha", "bravo", "charlie")]
    net.run(1)
    network = IPv4Network(NET)
    addresses = [n.client.address for n in nodes]
    assert len(set(addresses)) == 3
    for node, address in zip(nodes, addresses, strict=True):
        assert address is not None and address.network == network
        assert address.ip not in (network.network_address, network.broadcast_address)
        assert node.of_type(AddressChanged) == [AddressChanged(address)]
        assert node.of_type(Connected) == [Connected(address)]
        assert node.state.address == address
    assert {e.ip for e in net.server_events if isinstance(e, ClientAuthenticated)} == {
        a.ip for a in addresses if a is not None
    }
    for a, b in itertools.permutations(nodes, 2):
        assert_reachable(net, a, b)


def test_packets_to_unknown_addresses_go_nowhere() -> None:
    net = Net()
    a, b = net.client("alpha"), net.client("bravo")
    net.run(1)
    net.send(a, "10.99.0.254" if b.ip != IPv4Address("10.99.0.254") else "10.99.0.253")
    net.send(a, "192.0.2.1")
    assert b.take_received() == []
    assert a.take_received() == []


def test_static_client_coexists_with_dynamic_ones() -> None:
    net = Net()
    a = net.client("alpha")
    s = net.client("static", tun="10.99.0.200/24")
    b = net.client("bravo")
    net.run(1)
    assert s.client.address == IPv4Interface("10.99.0.200/24")
    assert s.of_type(Connected) == [Connected(IPv4Interface("10.99.0.200/24"))]
    assert len({a.ip, b.ip, s.ip}) == 3
    for x, y in itertools.permutations((a, b, s), 2):
        assert_reachable(net, x, y)


def test_restarted_client_gets_its_address_back() -> None:
    net = Net()
    a, b = net.client("alpha"), net.client("bravo")
    net.run(1)
    address = a.client.address
    a.client.close()
    net.pump()
    net.run(5)
    net.client("charlie")  # the pool moves on meanwhile
    net.run(1)
    again = net.replace(a)
    net.run(1)
    assert again.client.address == address
    assert again.of_type(Connected) == [Connected(address)]
    assert_reachable(net, again, b)


def test_crashed_client_reclaims_its_address_while_the_server_still_holds_it() -> None:
    """Same VMAC, old connection not yet timed out: the server hands the address back."""
    net = Net()
    a, b = net.client("alpha"), net.client("bravo")
    net.run(1)
    address = a.client.address
    old_cid = a.cid
    again = net.replace(a)  # the old connection is silently gone
    net.run(1)
    assert again.client.address == address
    assert net.server.clients[address.ip] == again.cid
    closed = [e for e in net.server_events if isinstance(e, ClientDisconnected)]
    assert [e.cid for e in closed] == [old_cid]
    assert_reachable(net, again, b)


def test_server_restart_clients_reconnect_and_reclaim_addresses() -> None:
    net = Net()
    nodes = [net.client(name) for name in ("alpha", "bravo", "charlie")]
    s = net.client("static", tun="10.99.0.200/24")
    net.run(20)
    before = {n.name: n.client.address for n in [*nodes, s]}
    net.restart_server(down_for=6)
    for node in [*nodes, s]:
        assert node.of_type(Disconnected), node.name
        attempts = [e.attempt for e in node.of_type(Reconnecting)]
        assert attempts[0] == 1 and max(attempts) >= 2, attempts  # kept retrying while down
    took = net.run_until(joined(*nodes, s), timeout=60)
    assert took <= 20
    assert {n.name: n.client.address for n in [*nodes, s]} == before
    for node in nodes:
        assert node.of_type(AddressChanged) == [AddressChanged(before[node.name])]
    for x, y in itertools.permutations((*nodes, s), 2):
        assert_reachable(net, x, y)


def test_back_off_delays_grow_while_the_server_is_down() -> None:
    net = Net()
    a = net.client("alpha")
    net.run(20)
    net.restart_server(down_for=60)
    delays = [e.delay for e in a.of_type(Reconnecting)]
    assert len(delays) >= 5
    for delay, base in zip(delays, (1, 2, 4, 8, 16, 30), strict=False):
        assert base * 0.75 <= delay <= min(30, base * 1.25)
    net.run_until(joined(a), timeout=31)


def test_wrong_password_client_retries_with_growing_delays_others_unaffected() -> None:
    net = Net()
    a, b = net.client("alpha"), net.client("bravo")
    net.run(1)
    intruder = net.client("intruder", password="not-the-password")
    for _ in range(12):
        net.run(10)
        assert_reachable(net, a, b)
    assert not intruder.client.authenticated
    assert intruder.of_type(Connected) == []
    reasons = [e.reason for e in intruder.of_type(Disconnected)]
    assert len(reasons) >= 5
    assert all("wrong password" in r for r in reasons), reasons
    delays = [e.delay for e in intruder.of_type(Reconnecting)]
    assert [e.attempt for e in intruder.of_type(Reconnecting)] == list(range(1, len(delays) + 1))
    assert delays[:5] == sorted(delays[:5])
    assert delays[4] >= 16 * 0.75
    assert max(delays) <= 30
    for node in (a, b):
        assert node.of_type(Disconnected) == []
        assert len(node.of_type(Connected)) == 1


def test_wrong_password_static_client_is_refused_too() -> None:
    net = Net()
    a = net.client("alpha")
    s = net.client("static", tun="10.99.0.200/24", password="wrong")
    net.run(30)
    assert "wrong password" in s.of_type(Disconnected)[0].reason
    assert IPv4Address("10.99.0.200") not in net.server.clients
    assert a.client.authenticated


def test_silent_connection_is_declared_dead_and_the_client_comes_back() -> None:
    net = Net()
    a, b = net.client("alpha"), net.client("bravo")
    net.run(1)
    address = a.client.address
    net.send(b, a.ip)  # the last thing alpha hears
    went_silent = net.now
    net.silenced.add(a.cid)
    took = net.run_until(lambda: bool(a.of_type(Disconnected)), timeout=40, step=0.25)
    assert 29.5 <= took <= 30.5
    (disconnected,) = a.of_type(Disconnected)
    assert "30 s" in disconnected.reason
    assert a.of_type(Reconnecting)
    net.run_until(joined(a), timeout=5)
    assert net.now - went_silent < 35
    # The server has not noticed yet (its idle timeout is longer); the same VMAC gets the
    # same address back all the same.
    assert a.client.address == address
    assert_reachable(net, a, b)
    assert b.of_type(Disconnected) == []


def test_idle_clients_stay_connected_for_a_long_time() -> None:
    net = Net()
    a, b = net.client("alpha"), net.client("bravo")
    net.run(600)
    for node in (a, b):
        assert node.of_type(Disconnected) == []
        assert node.client.authenticated
    assert not [e for e in net.server_events if isinstance(e, ClientDisconnected)]
    assert_reachable(net, a, b)


@pytest.mark.parametrize("dst", ["10.99.0.255", "224.0.0.251", "239.255.255.250"])
def test_broadcast_and_multicast_reach_every_other_client(dst: str) -> None:
    net = Net()
    a, b, c = (net.client(n) for n in ("alpha", "bravo", "charlie"))
    s = net.client("static", tun="10.99.0.200/24")
    net.run(1)
    pkt = net.send(a, dst, b"hello everyone")
    for node in (b, c, s):
        assert node.take_received() == [pkt], node.name
    assert a.take_received() == []


def test_broadcast_of_another_network_is_not_relayed() -> None:
    net = Net()
    a, b = net.client("alpha"), net.client("bravo")
    net.run(1)
    net.send(a, "10.98.0.255")
    net.send(a, "255.255.255.255")
    assert b.take_received() == []


def test_a_newer_connection_takes_over_a_static_address() -> None:
    net = Net()
    first = net.client("first", tun="10.99.0.50/24")
    other = net.client("other")
    net.run(1)
    second = net.client("second", tun="10.99.0.50/24")
    net.run(0.5)
    assert second.client.authenticated
    assert first.of_type(Disconnected)
    assert net.server.clients[IPv4Address("10.99.0.50")] == second.cid
    other.take_received()
    assert_reachable(net, other, second)


def test_reconnecting_within_one_second_is_not_mistaken_for_a_replay() -> None:
    """Handshake timestamps only go forward, so a quick reconnect is not refused."""
    net = Net(seed=7)
    node = net.client("quick")
    net.run_until(lambda: node.client.authenticated, 5)
    for _ in range(3):  # drop and come back several times within the same wall second
        cid = node.cid
        assert cid is not None
        net.server.connection_lost(cid)
        net.links.pop(cid, None)
        node.cid = None
        node.client.connection_lost(net.now, "connection reset by peer")
        node.client._connect_at = net.now  # reconnect at once (an embedder's tiny back-off)
        node.client.handle_timer(net.now)
        net.pump()
        assert node.client.authenticated
    refusals = [e for e in net.server_events if "replay" in getattr(e, "reason", "")]
    assert not refusals, refusals
