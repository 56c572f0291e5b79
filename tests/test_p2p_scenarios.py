"""Peer-to-peer scenarios (PROTOCOL.md section 4) on the deterministic simulator.

Every scenario wires the real cores -- a RelayServer, Client cores and a STUN server -- over
the virtual network of :mod:`candy_core.sim`, with simulated NATs, and checks what a
user would notice: which path packets take, whether they arrive, and the state of each
peer. Minutes of virtual time run in milliseconds.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from ipaddress import IPv4Address

import pytest

from candy_core import Disconnected, PeerStateChanged
from candy_core import peermsg as pm
from candy_core.crypto import PeerCipher, peer_key
from candy_core.peers import ENDPOINT_SILENCE
from candy_core.sim import NAT_KINDS, Nat, SimClient, Simulation, icmp, icmp_seq

PASSWORD = "p2p-scenarios"
LATENCY = 0.005


# --- helpers --------------------------------------------------------------------------------
class Traffic:
    """Numbered ICMP echoes between clients, so a test can tell which ones arrived."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.seq = 0
        #: (time sent, sender, receiver, sequence number)
        self.sent: list[tuple[float, SimClient, SimClient, int]] = []

    def send(self, src: SimClient, dst: SimClient) -> int:
        assert src.ip is not None and dst.ip is not None
        self.seq += 1
        self.sent.append((self.sim.now, src, dst, self.seq))
        src.send_packet(icmp(src.ip, dst.ip, self.seq))
        return self.seq

    def flow(
        self,
        pairs: Iterable[tuple[SimClient, SimClient]],
        seconds: float,
        interval: float = 0.1,
    ) -> None:
        """Send one packet per pair every ``interval`` for ``seconds``."""
        pairs = list(pairs)
        end = self.sim.now + seconds
        while self.sim.now < end - 1e-9:
            for src, dst in pairs:
                self.send(src, dst)
            self.sim.run(interval)

    def lost(self, since: float = 0.0) -> list[tuple[float, str, str, int]]:
        """Packets sent at or after ``since`` that never reached their receiver."""
        arrived = {
            client.name: {icmp_seq(p) for p in client.received}
            for client in self.sim.clients.values()
        }
        return [
            (round(t, 3), src.name, dst.name, seq)
            for t, src, dst, seq in self.sent
            if t >= since and seq not in arrived[dst.name]
        ]


def world(
    kind_a: str | None,
    kind_b: str | None,
    seed: int = 0,
    same_nat: bool = False,
    **config: object,
) -> tuple[Simulation, SimClient, SimClient]:
    """A server, a STUN server and clients a and b behind NATs of the given kinds (or none).

    The clients start 0.37 s apart, so their 1-second ticks are not in lockstep.
    """
    sim = Simulation(seed=seed, latency=LATENCY)
    sim.add_server(PASSWORD)
    sim.add_stun()
    nat_a = sim.add_nat("198.51.100.1", kind_a) if kind_a else None
    nat_b = nat_a if same_nat else sim.add_nat("198.51.100.2", kind_b) if kind_b else None
    a = sim.add_client("a", "192.168.1.10" if nat_a else "203.0.113.10", nat=nat_a, **config)
    sim.run(0.37)
    lan_b = "192.168.1.20" if same_nat else "192.168.2.20"
    b = sim.add_client("b", lan_b if nat_b else "203.0.113.20", nat=nat_b, **config)
    assert sim.run_until(lambda: a.connected and b.connected, timeout=5)
    sim.run(0.1)
    return sim, a, b


def both(a: SimClient, b: SimClient, state: str) -> bool:
    return a.peer_state(b) == state and b.peer_state(a) == state


def public_endpoint(client: SimClient) -> tuple[str, int]:
    """The (single, endpoint-independent) public mapping of ``client``'s socket."""
    assert client.nat is not None
    (port,) = client.nat.mappings[client.udp_addr]
    return client.nat.public_ip, port


def check_state_events(sim: Simulation) -> None:
    """Every peer state change was reported, with a reason, as a consistent chain.

    Per client and peer, the PeerStateChanged events must start from INIT, each one leave
    the state the previous one entered, never repeat a state, and end in the current state.
    """
    for client in sim.clients.values():
        chains: dict[IPv4Address, list[PeerStateChanged]] = {}
        for _, event in client.state_changes():
            chains.setdefault(event.ip, []).append(event)
        for ip, chain in chains.items():
            state = "INIT"
            for event in chain:
                assert event.reason, f"{client.name}: {event} has no reason"
                assert event.old == state, f"{client.name}: {event} does not follow {state}"
                assert event.new != event.old
                state = event.new
            assert client.peer_state(ip) == state, f"{client.name}: {ip} is not {state}"
        for status in client.core.peers.peer_status():
            if status.state != "INIT":
                assert status.ip in chains, f"{client.name}: {status} without any event"


def changes_after(client: SimClient, other: SimClient, since: float) -> list[tuple[str, str]]:
    return [(e.old, e.new) for t, e in client.state_changes(other) if t >= since]


def waiting_durations(client: SimClient, other: SimClient) -> list[float]:
    """How long each completed WAITING period of ``client``'s view of ``other`` lasted."""
    changes = client.state_changes(other)
    return [
        round(changes[i + 1][0] - t, 1)
        for i, (t, event) in enumerate(changes[:-1])
        if event.new == "WAITING"
    ]


# --- the simulator itself ---------------------------------------------------------------------
def test_icmp_helper_builds_a_valid_ipv4_echo() -> None:
    packet = icmp("10.0.0.1", "10.0.0.2", 513)
    assert packet[0] == 0x45 and packet[9] == 1 and len(packet) == int.from_bytes(packet[2:4])
    assert packet[12:16] == IPv4Address("10.0.0.1").packed
    assert packet[16:20] == IPv4Address("10.0.0.2").packed
    assert icmp_seq(packet) == 513
    assert icmp_seq(packet[:20]) is None

    def folded(data: bytes) -> int:
        total = sum(int.from_bytes(data[i : i + 2]) for i in range(0, len(data), 2))
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
        return total

    assert folded(packet[:20]) == 0xFFFF  # header checksum verifies
    assert folded(packet[20:] + b"\x00" * (len(packet) % 2)) == 0xFFFF  # ICMP checksum too


@pytest.mark.parametrize("kind", NAT_KINDS)
def test_nat_mapping_and_filtering(kind: str) -> None:
    nat = Nat("198.51.100.9", kind, random.Random(0))
    inside = ("192.168.0.2", 4000)
    one, other_port, other_ip = ("203.0.113.1", 1000), ("203.0.113.1", 2000), ("203.0.113.2", 1)
    first = nat.outbound(inside, one)
    second = nat.outbound(inside, other_ip)
    assert first[0] == second[0] == "198.51.100.9"
    assert (first[1] != second[1]) is (kind == "symmetric")  # mapping behaviour
    assert nat.inbound(one, first[1]) == inside  # the remote we sent to always gets in
    expect_other_port = kind in ("full_cone", "address_restricted")
    assert (nat.inbound(other_port, first[1]) == inside) is expect_other_port
    assert (nat.inbound(("198.18.0.1", 9), first[1]) == inside) is (kind == "full_cone")
    nat.rebind()
    assert nat.inbound(one, first[1]) is None
    assert nat.outbound(inside, one)[1] != first[1]


def test_simulation_is_deterministic() -> None:
    def run(seed: int) -> tuple[object, ...]:
        sim, a, b = world("port_restricted", "full_cone", seed=seed)
        Traffic(sim).flow([(a, b), (b, a)], seconds=8, interval=0.25)
        return (
            [(t, repr(e)) for t, e in a.events + b.events],
            sorted(sim.datagrams.items()),
            sim.frames_relayed,
            a.received,
            b.received,
        )

    assert run(7) == run(7)
    assert run(7) != run(8)


# --- direct paths through NATs ------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind_a", "kind_b"),
    [
        ("full_cone", "full_cone"),
        ("port_restricted", "port_restricted"),
        ("address_restricted", "port_restricted"),
        ("full_cone", "port_restricted"),
        ("symmetric", "full_cone"),
        (None, "port_restricted"),
    ],
)
def test_cone_nats_go_direct_after_traffic_via_the_server(
    kind_a: str | None, kind_b: str | None
) -> None:
    sim, a, b = world(kind_a, kind_b, seed=1)
    traffic = Traffic(sim)
    traffic.send(a, b)
    sim.run(0.1)
    assert b.core.stats.packets_from_server == 1  # the first packet went through the server
    assert b.peer_state(a) != "INIT"  # ... and started the negotiation

    assert sim.run_until(lambda: both(a, b, "CONNECTED"), timeout=15)
    assert sim.now < 12
    if kind_b in ("full_cone", "port_restricted", "address_restricted"):
        assert a.peer_status(b).endpoint == public_endpoint(b)
    else:
        assert a.peer_status(b).endpoint == b.udp_addr

    relayed = sim.frames_relayed
    direct = sim.delivered(a, b), sim.delivered(b, a)
    traffic.flow([(a, b), (b, a)], seconds=2, interval=0.1)
    sim.run(0.5)
    assert traffic.lost() == []
    assert sim.frames_relayed == relayed  # nothing more through the server
    assert sim.delivered(a, b) - direct[0] >= 20  # 20 packets (and a few heartbeats) by UDP
    assert sim.delivered(b, a) - direct[1] >= 20
    assert both(a, b, "CONNECTED")
    check_state_events(sim)


def test_symmetric_nats_stay_relayed_and_back_off_exponentially() -> None:
    sim, a, b = world("symmetric", "symmetric", seed=2)
    traffic = Traffic(sim)
    traffic.flow([(a, b), (b, a)], seconds=25, interval=1.0)
    assert a.peer_state(b) in ("WAITING", "FAILED")
    assert b.peer_state(a) in ("WAITING", "FAILED")

    traffic.flow([(a, b), (b, a)], seconds=300, interval=1.0)
    sim.run(0.5)
    assert traffic.lost() == []  # everything arrived, through the server
    assert sim.frames_relayed >= len(traffic.sent)
    assert sim.delivered(a, b) == sim.delivered(b, a) == 0  # no datagram ever got through
    for x, y in ((a, b), (b, a)):
        assert all(e.new != "CONNECTED" for _, e in x.state_changes(y))
        assert waiting_durations(x, y)[:3] == pytest.approx([30, 60, 120], abs=1.5)
    check_state_events(sim)


def test_same_lan_clients_connect_via_their_lan_endpoints() -> None:
    sim, a, b = world("port_restricted", None, same_nat=True, seed=3)
    traffic = Traffic(sim)
    traffic.send(a, b)
    assert sim.run_until(lambda: both(a, b, "CONNECTED"), timeout=10)
    assert a.peer_status(b).endpoint == b.udp_addr == ("192.168.1.20", b.udp_port)
    assert b.peer_status(a).endpoint == a.udp_addr == ("192.168.1.10", a.udp_port)

    relayed, direct = sim.frames_relayed, sim.delivered(a, b)
    traffic.flow([(a, b), (b, a)], seconds=1, interval=0.1)
    sim.run(0.2)
    assert traffic.lost() == []
    assert sim.frames_relayed == relayed
    assert sim.delivered(a, b) - direct >= 10
    check_state_events(sim)


# --- faults ---------------------------------------------------------------------------------
def test_nat_rebinding_behind_a_full_cone_keeps_the_path() -> None:
    """The peer moves to the new mapping once the old one has been silent for
    ENDPOINT_SILENCE (a replayed heartbeat cannot move a live endpoint); only packets it sent
    to the stale mapping before that (two ticks' worth) are lost, and the state stays up."""
    sim, a, b = world("full_cone", "full_cone", seed=4)
    traffic = Traffic(sim)
    traffic.flow([(a, b), (b, a)], seconds=8)
    assert both(a, b, "CONNECTED")
    old = public_endpoint(a)

    rebound = sim.now
    sim.rebind_nat(a.nat)
    relayed = sim.frames_relayed
    traffic.flow([(a, b), (b, a)], seconds=6)
    sim.run(0.5)

    assert public_endpoint(a) != old
    assert b.peer_status(a).endpoint == public_endpoint(a)
    lost = traffic.lost()
    assert all(src == "b" for _, src, _, _ in lost)  # a's packets use the new mapping at once
    assert all(t <= rebound + ENDPOINT_SILENCE + 2 * LATENCY for t, *_ in lost)
    assert len(lost) <= 21  # 10 packets a second
    assert changes_after(a, b, rebound) == changes_after(b, a, rebound) == []
    assert sim.frames_relayed == relayed
    check_state_events(sim)


def test_nat_rebinding_behind_port_restricted_nats_recovers_via_init() -> None:
    """With address-dependent filtering the old path is dead on both sides: each side notices
    within ~4 s, falls back to the server, and negotiates a new direct path."""
    sim, a, b = world("port_restricted", "port_restricted", seed=5)
    traffic = Traffic(sim)
    traffic.flow([(a, b), (b, a)], seconds=8)
    assert both(a, b, "CONNECTED")

    rebound = sim.now
    sim.rebind_nat(a.nat)
    traffic.flow([(a, b), (b, a)], seconds=4.5)
    assert a.peer_state(b) != "CONNECTED" and b.peer_state(a) != "CONNECTED"
    relayed = sim.frames_relayed
    traffic.flow([(a, b), (b, a)], seconds=0.5)
    assert sim.frames_relayed > relayed  # the fallback is the server
    while not both(a, b, "CONNECTED"):
        assert sim.now < rebound + 30
        traffic.flow([(a, b), (b, a)], seconds=0.5)
    recovered = sim.now
    relayed = sim.frames_relayed
    traffic.flow([(a, b), (b, a)], seconds=3)
    sim.run(0.5)

    assert b.peer_status(a).endpoint == public_endpoint(a)
    assert sim.frames_relayed == relayed  # direct again
    for x, y in ((a, b), (b, a)):
        assert changes_after(x, y, rebound)[0] == ("CONNECTED", "INIT")
        assert changes_after(x, y, rebound)[-1][1] == "CONNECTED"
    # Lost: only what was sent into the dead path before it was declared dead.
    assert traffic.lost()
    assert all(rebound <= t <= rebound + 4.2 for t, *_ in traffic.lost())
    assert traffic.lost(since=recovered) == []
    check_state_events(sim)


def test_cut_udp_falls_back_to_the_server() -> None:
    sim, a, b = world("full_cone", "port_restricted", seed=6)
    traffic = Traffic(sim)
    traffic.flow([(a, b), (b, a)], seconds=8)
    assert both(a, b, "CONNECTED")

    cut = sim.now
    sim.cut_udp(a)
    relayed, direct = sim.frames_relayed, sim.delivered(a, b)
    left: dict[str, float] = {}
    while len(left) < 2:
        assert sim.now < cut + 5
        traffic.flow([(a, b), (b, a)], seconds=0.1)
        for x, y in ((a, b), (b, a)):
            if x.name not in left and x.peer_state(y) != "CONNECTED":
                left[x.name] = sim.now - cut
    assert max(left.values()) <= 4.2  # "no heartbeat for about 3 s"
    for x, y in ((a, b), (b, a)):
        (_, left_connected), *_ = [(t, e) for t, e in x.state_changes(y) if t > cut]
        assert (left_connected.old, left_connected.new) == ("CONNECTED", "INIT")
        assert left_connected.reason == "no heartbeat for 3 s"

    fallback = sim.now
    traffic.flow([(a, b), (b, a)], seconds=20)
    sim.run(0.5)
    assert traffic.lost(since=fallback) == []  # all delivered, via the server
    assert sim.frames_relayed - relayed >= 2 * 200
    assert sim.delivered(a, b) == direct  # a's UDP is cut
    assert a.peer_state(b) in ("PREPARING", "FAILED") and b.peer_state(a) != "CONNECTED"
    check_state_events(sim)


def test_server_restart_does_not_disturb_a_direct_path() -> None:
    sim, a, b = world("full_cone", "full_cone", seed=7)
    traffic = Traffic(sim)
    traffic.flow([(a, b), (b, a)], seconds=8)
    assert both(a, b, "CONNECTED")
    ips = a.ip, b.ip

    stopped = sim.now
    sim.stop_server()
    traffic.flow([(a, b), (b, a)], seconds=10)
    assert not a.connected and not b.connected
    sim.start_server()
    while not (a.connected and b.connected):
        assert sim.now < stopped + 60
        traffic.flow([(a, b), (b, a)], seconds=0.5)
    traffic.flow([(a, b), (b, a)], seconds=2)
    sim.run(0.5)

    assert traffic.lost() == []  # the direct path carried everything meanwhile
    assert (a.ip, b.ip) == ips  # both reclaimed their addresses
    assert any(isinstance(e, Disconnected) for t, e in a.events if t >= stopped)
    assert changes_after(a, b, stopped) == changes_after(b, a, stopped) == []
    check_state_events(sim)


# --- relay routes through peers (4.5) -----------------------------------------------------
def triangle(seed: int, direct_ac: bool) -> tuple[Simulation, SimClient, SimClient, SimClient]:
    """Public clients a, b, c with route cost 5 and discovery; the a-c link is slow (100 ms
    one way), or unusable for UDP when ``direct_ac`` is false."""
    sim = Simulation(seed=seed, latency=LATENCY)
    sim.add_server(PASSWORD)
    sim.add_stun()
    clients = []
    for i, name in enumerate("abc"):
        clients.append(sim.add_client(name, f"203.0.113.{10 + i}", route=5, discovery=5))
        sim.run(0.3)
    a, b, c = clients
    if direct_ac:
        sim.set_link(a, c, latency=0.1)
    else:
        sim.set_link(a, c, loss=1.0)
    return sim, a, b, c


def via(x: SimClient, y: SimClient) -> IPv4Address | None:
    status = x.peer_status(y)
    return status.route_via if status is not None else None


@pytest.mark.parametrize("direct_ac", [True, False], ids=["slow-direct", "no-direct"])
def test_relay_route_through_a_faster_peer_and_its_withdrawal(direct_ac: bool) -> None:
    sim, a, b, c = triangle(seed=8, direct_ac=direct_ac)
    traffic = Traffic(sim)
    assert sim.run_until(lambda: via(a, c) == b.ip and via(c, a) == b.ip, timeout=130)
    assert both(a, b, "CONNECTED") and both(b, c, "CONNECTED")
    assert a.peer_status(b).delay_ms == pytest.approx(2000 * LATENCY, abs=2)
    if direct_ac:
        assert both(a, c, "CONNECTED")
        assert a.peer_status(c).delay_ms == pytest.approx(200, abs=2)  # measured directly
    else:
        assert a.peer_state(c) != "CONNECTED"

    def to_server() -> int:
        return a.core.stats.packets_to_server + c.core.stats.packets_to_server

    counters = sim.delivered(a, b), sim.delivered(b, c), sim.delivered(a, c)
    relayed = to_server()
    forwarded = b.core.peers.stats.forwarded_for_peers
    for _ in range(20):
        traffic.send(a, c)
        traffic.send(c, a)
    sim.run(0.5)
    assert traffic.lost() == []
    assert b.core.peers.stats.forwarded_for_peers - forwarded == 40
    assert sim.delivered(a, b) - counters[0] >= 20
    assert sim.delivered(b, c) - counters[1] >= 20
    assert sim.delivered(a, c) - counters[2] <= 2  # heartbeats at most
    assert to_server() == relayed

    # b drops out: a and c withdraw the routes through it.
    dropped = sim.now
    sim.cut_udp(b)
    assert sim.run_until(lambda: a.peer_state(b) != "CONNECTED", timeout=4.5)
    assert sim.run_until(lambda: c.peer_state(b) != "CONNECTED", timeout=4.5)
    assert via(a, c) is None and via(c, a) is None
    counters = sim.delivered(a, b), sim.delivered(b, c), sim.delivered(a, c)
    relayed = to_server()
    sent_from = sim.now
    for _ in range(20):
        traffic.send(a, c)
        traffic.send(c, a)
    sim.run(1)
    assert traffic.lost(since=sent_from) == []
    assert sim.delivered(a, b) == counters[0]
    if direct_ac:  # straight to c now
        assert sim.delivered(a, c) - counters[2] >= 20
        assert to_server() == relayed
    else:  # through the server
        assert to_server() - relayed == 40
    assert sim.now - dropped < 10
    check_state_events(sim)


# --- active discovery (4.6) -------------------------------------------------------------------
def test_discovery_sets_up_direct_paths_without_traffic() -> None:
    sim, a, b = world("port_restricted", "port_restricted", seed=9, discovery=5)
    assert sim.run_until(lambda: both(a, b, "CONNECTED"), timeout=15)
    assert a.received == b.received == []
    assert a.core.stats.packets_to_server == b.core.stats.packets_to_server == 0

    traffic = Traffic(sim)
    direct = sim.delivered(a, b)
    for _ in range(10):
        traffic.send(a, b)
    sim.run(0.2)
    assert traffic.lost() == []
    assert a.core.stats.packets_to_server == 0  # the very first packets went direct
    assert sim.delivered(a, b) - direct >= 10
    check_state_events(sim)


def test_without_discovery_idle_clients_do_not_negotiate() -> None:
    sim, a, b = world("port_restricted", "port_restricted", seed=9)
    sim.run(30)
    assert a.peer_status(b) is None and b.peer_status(a) is None
    assert sim.delivered(a, b) == sim.delivered(b, a) == 0


# --- datagram integrity (4.2) -------------------------------------------------------------
def test_replayed_and_tampered_datagrams_are_dropped() -> None:
    sim, a, b = world("full_cone", "full_cone", seed=10)
    traffic = Traffic(sim)
    traffic.send(a, b)
    assert sim.run_until(lambda: both(a, b, "CONNECTED"), timeout=15)

    b.capture = True
    traffic.send(a, b)
    sim.run(0.1)
    assert traffic.lost() == []
    forward = max(b.captured, key=lambda item: len(item[0]))  # the FORWARD, not a heartbeat
    data, src = forward
    stats = b.core.peers.stats
    received, replayed, undecryptable = len(b.received), stats.replayed, stats.undecryptable

    sim.inject_datagram(b, data, src)
    assert stats.replayed == replayed + 1
    tampered = data[:-1] + bytes([data[-1] ^ 0x01])
    sim.inject_datagram(b, tampered, src)
    assert stats.undecryptable == undecryptable + 1
    sim.inject_datagram(b, data[:20], src)  # shorter than IV and tag
    assert stats.undecryptable == undecryptable + 2
    assert len(b.received) == received  # none of them reached TUN

    traffic.flow([(a, b)], seconds=1)
    sim.run(0.2)
    assert traffic.lost() == [] and both(a, b, "CONNECTED")
    check_state_events(sim)


def test_delay_probe_is_echoed_before_the_path_is_up() -> None:
    """PROTOCOL.md 4.3: the receiver named in ``dst`` echoes a DELAY unchanged, whatever the
    state of its own view of the path (a probe overtaking the last handshake heartbeat must
    not cost the sender a whole measurement period)."""
    sim, a, b = world(None, None, seed=11)
    traffic = Traffic(sim)
    traffic.send(a, b)
    sim.run(0.02)  # b is negotiating; its view of a is not CONNECTED
    assert b.peer_state(a) in ("PREPARING", "CONNECTING")
    assert a.ip is not None and b.ip is not None
    probe = pm.Delay(a.ip, b.ip, 123456).encode()
    sealed = PeerCipher(random.Random(0)).seal(peer_key(PASSWORD, b.ip.packed), probe)
    a.capture = True
    sim.inject_datagram(b, sealed, a.udp_addr)
    sim.run(0.1)
    own = PeerCipher(random.Random(1))
    echoes = [
        plain
        for data, _ in a.captured
        if (plain := own.open(peer_key(PASSWORD, a.ip.packed), data)) is not None
        and plain[0] == pm.DELAY
    ]
    assert echoes == [probe]


def test_delay_is_measured_on_entering_connected() -> None:
    """PROTOCOL.md 4.4: with routing on, CONNECTED sends DELAY on entry, not a tick later."""
    sim, a, b = world("full_cone", "port_restricted", seed=13, route=5)
    Traffic(sim).send(a, b)
    assert sim.run_until(lambda: a.peer_state(b) == "CONNECTED", timeout=15, step=0.001)
    assert a.peer_status(b).delay_ms is None
    sim.run(2 * LATENCY + 0.002)  # one round trip later
    assert a.peer_status(b).delay_ms == pytest.approx(2000 * LATENCY, abs=1)
    check_state_events(sim)


def test_lossy_path_comes_up_and_loses_about_the_link_loss() -> None:
    """10 % UDP loss between the NATs: the handshake retries every tick until it gets
    through; afterwards the VPN loses what the link loses (no retransmission) and the path
    does not flap."""
    sim, a, b = world("port_restricted", "port_restricted", seed=14)
    sim.set_link(a, b, loss=0.1)
    traffic = Traffic(sim)
    traffic.send(a, b)
    assert sim.run_until(lambda: both(a, b, "CONNECTED"), timeout=20)
    connected = sim.now
    relayed = sim.frames_relayed
    traffic.flow([(a, b), (b, a)], seconds=60)
    sim.run(0.5)
    sent = sum(1 for t, *_ in traffic.sent if t >= connected)
    assert 0.05 * sent < len(traffic.lost(since=connected)) < 0.16 * sent
    assert changes_after(a, b, connected) == changes_after(b, a, connected) == []
    assert sim.frames_relayed == relayed
    assert sim.datagrams_dropped > 0
    check_state_events(sim)


# --- found by the simulator ---------------------------------------------------------------
def test_a_client_that_only_receives_is_not_dropped() -> None:
    """The server pings a silent client (which answers) instead of dropping it."""
    sim, a, b = world(None, None, seed=12, stun=None)
    traffic = Traffic(sim)
    traffic.flow([(a, b)], seconds=200, interval=1.0)
    sim.run(0.5)
    assert not any(isinstance(e, Disconnected) for _, e in b.events)
    assert traffic.lost() == []
