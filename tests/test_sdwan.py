"""Subnet routes (Candy 6.x ``sdwan``, PROTOCOL.md 6.1 to 6.3): codec, server push, client.

Vectors are written out by hand from PROTOCOL.md 6.1 (type 6, count, two reserved zero bytes,
12-byte entries dst/mask/nexthop) and 6.2 (an outer header of which 6.x fills only protocol
4 and the two addresses).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from test_client import Harness, packet, response_101
from test_server import Relay, config

from candy_core import ClientConfig, ConfigError, Connected, RoutesChanged, ServerConfig
from candy_core import messages as m
from candy_core.errors import ProtocolError
from candy_core.sdwan import (
    RouteTable,
    decapsulate,
    encapsulate,
    ipv4_checksum,
    is_encapsulated,
    parse_sdwan,
)
from candy_core.wsframe import OP_PING, OP_PONG
from shells.settings import SettingsError, parse_args

A = IPv4Address


def entry(dst: str, mask: str, hop: str) -> m.RouteEntry:
    return m.RouteEntry(A(dst), A(mask), A(hop))


# --- codec (PROTOCOL.md 6.1) --------------------------------------------------------------
ONE_ROUTE = bytes.fromhex("06 01 0000 ac1f0000 ffffff00 0a000003")
TWO_ROUTES = bytes.fromhex("06 02 0000 ac1f0000 ffffff00 0a000003 c0a80000 ffff0000 0a000004")


def test_route_vectors_from_the_protocol() -> None:
    one = m.Route((entry("172.31.0.0", "255.255.255.0", "10.0.0.3"),))
    assert one.encode() == ONE_ROUTE
    assert m.decode(ONE_ROUTE) == one
    two = m.decode(TWO_ROUTES)
    assert isinstance(two, m.Route)
    assert two.entries[1] == entry("192.168.0.0", "255.255.0.0", "10.0.0.4")
    assert two.entries[1].network == IPv4Network("192.168.0.0/16")
    assert two.encode() == TWO_ROUTES
    assert m.decode(b"\x06\x00\x00\x00") == m.Route(())


@pytest.mark.parametrize(
    "data",
    [
        b"\x06",
        b"\x06\x01\x00",
        ONE_ROUTE[:-1],
        ONE_ROUTE + b"\x00",
        TWO_ROUTES[:16],
        b"\x06\x00\x00\x00\x00",
    ],
)
def test_route_decode_is_strict(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="ROUTE"):
        m.decode(data)


def test_more_than_100_routes_go_in_several_messages() -> None:
    entries = [
        entry(f"172.{16 + i // 256}.{i % 256}.0", "255.255.255.0", "10.0.0.3") for i in range(250)
    ]
    batches = m.Route.batches(entries)
    assert [len(b.entries) for b in batches] == [100, 100, 50]
    wire = [b.encode() for b in batches]
    assert [w[:4] for w in wire] == [b"\x06\x64\x00\x00", b"\x06\x64\x00\x00", b"\x06\x32\x00\x00"]
    assert len(wire[0]) == 4 + 12 * 100
    decoded = [m.decode(w) for w in wire]
    assert [e for d in decoded if isinstance(d, m.Route) for e in d.entries] == entries


# --- config ---------------------------------------------------------------------------------
def test_sdwan_parsing() -> None:
    routes = parse_sdwan(
        " 10.0.0.0/24,172.31.0.0/24,10.0.0.3 ; 10.0.0.0/25,192.168.0.0/16,10.0.0.4;"
    )
    assert [str(r) for r in routes] == [
        "10.0.0.0/24,172.31.0.0/24,10.0.0.3",
        "10.0.0.0/25,192.168.0.0/16,10.0.0.4",
    ]
    cfg = ServerConfig.from_strings(sdwan="10.0.0.0/24,172.31.0.0/24,10.0.0.3")
    assert cfg.sdwan == routes[:1]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10.0.0.1/24,172.31.0.0/24,10.0.0.3", "host bits"),
        ("10.0.0.0/24,172.31.0.9/24,10.0.0.3", "host bits"),
        ("10.0.0.0/24,172.31.0.0/24", "dev,dst,nexthop"),
        ("10.0.0.0,172.31.0.0/24,10.0.0.3", "a.b.c.d/prefix"),
        ("10.0.0.0/24,172.31.0.0/24,10.0.0.0/24", "not an IPv4 address"),
    ],
)
def test_bad_sdwan_is_refused(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        ServerConfig.from_strings(sdwan=text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-m", "server", "--sdwan", "10.0.0.1/24,172.31.0.0/24,10.0.0.3"], "invalid --sdwan"),
        (["-m", "server", "--clock-window", "0"], "invalid --clock-window '0': must be at least 1"),
        (["-m", "client", "--mtu", "575"], "invalid --mtu '575': must be between 576 and 1500"),
        (["-m", "client", "--mtu", "1501"], "invalid --mtu '1501'"),
        (["-m", "client", "--mtu", "big"], "invalid --mtu 'big'"),
    ],
)
def test_settings_refuse_bad_values(argv: list[str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        parse_args([*argv, "-w", "ws://127.0.0.1:8080/"])


def test_config_file_sdwan_error_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "candy.cfg"
    path.write_text('mode = "server"\nwebsocket = "ws://h"\nsdwan = "10.0.0.0/24,x,10.0.0.3"\n')
    with pytest.raises(SettingsError, match=f"^{path}: invalid sdwan .*: dst 'x' is not"):
        parse_args(["-c", str(path)])
    path.write_text('mode = "client"\nwebsocket = "ws://h"\nmtu = 1280\nclock_window = 60\n')
    client = parse_args(["-c", str(path)]).client
    assert client is not None and (client.mtu, client.clock_window) == (1280, 60)


def test_settings_accept_the_6x_keys() -> None:
    s = parse_args(
        ["-m", "server", "-w", "ws://127.0.0.1:8080/", "--clock-window", "90",
         "--sdwan", "10.0.0.0/24,172.31.0.0/24,10.0.0.3"]
    )  # fmt: skip
    assert s.server is not None and s.server.clock_window == 90
    assert [str(r) for r in s.server.sdwan] == ["10.0.0.0/24,172.31.0.0/24,10.0.0.3"]
    c = parse_args(["-m", "client", "-w", "ws://127.0.0.1:8080/", "--mtu", "1280"])
    assert c.client is not None and c.client.mtu == 1280
    assert ClientConfig().mtu == 1400 and ServerConfig().clock_window == 30


def test_replay_window_follows_clock_window() -> None:
    relay = Relay(config(clock_window=90))
    a = relay.client()
    a.vmac()
    a.auth("10.99.0.1", ts=int(relay.wall) - 80)  # outside 30 s, inside 90 s
    assert not a.closed
    b = relay.client()
    b.auth("10.99.0.2", ts=int(relay.wall) - 100)
    assert b.closed


# --- server push ----------------------------------------------------------------------------
SDWAN = "10.99.0.0/24,172.31.0.0/24,10.99.0.3;10.99.1.0/24,192.168.9.0/24,10.99.1.3"


def test_server_pushes_the_routes_whose_dev_holds_the_client() -> None:
    relay = Relay(config(sdwan=SDWAN))
    a = relay.join("10.99.0.1")
    assert a.take() == [ONE_ROUTE.replace(bytes.fromhex("0a000003"), A("10.99.0.3").packed)]
    b = relay.join("10.99.1.1")
    got = [m.decode(p) for p in b.take()]
    assert got == [m.Route((entry("192.168.9.0", "255.255.255.0", "10.99.1.3"),))]
    c = relay.join("10.99.2.1")  # in no dev: nothing
    assert c.take() == []


def test_server_batches_many_routes() -> None:
    text = ";".join(
        f"10.99.0.0/24,172.{16 + i // 256}.{i % 256}.0/24,10.99.0.3" for i in range(205)
    )
    relay = Relay(config(sdwan=text))
    a = relay.join("10.99.0.1")
    got = a.take()
    assert [p[1] for p in got] == [100, 100, 5]
    assert all(p[0] == m.ROUTE and p[2:4] == b"\x00\x00" for p in got)


# --- encapsulation (PROTOCOL.md 6.2) --------------------------------------------------------
def test_encapsulate_writes_a_full_valid_outer_header() -> None:
    inner = packet("10.0.0.5", "172.31.0.5", b"x" * 30)
    out = encapsulate(inner, A("10.0.0.5").packed, A("10.0.0.3").packed)
    head = out[:20]
    assert head[0] == 0x45 and head[9] == 4 and head[8] == 64
    assert int.from_bytes(head[2:4], "big") == len(out) == 20 + len(inner)
    assert head[12:16] == A("10.0.0.5").packed and head[16:20] == A("10.0.0.3").packed
    assert ipv4_checksum(head) == 0  # a valid checksum sums to zero
    assert out[20:] == inner
    assert is_encapsulated(out) and decapsulate(out) == inner
    assert m.ipv4_endpoints(out) == (A("10.0.0.5").packed, A("10.0.0.3").packed)


def zeroed_6x(inner: bytes, src: str, dst: str) -> bytes:
    """The 6.x outer header: only protocol 4 and the addresses filled in."""
    head = bytearray(20)
    head[9] = 4
    head[12:16] = A(src).packed
    head[16:20] = A(dst).packed
    return bytes(head) + inner


def test_route_table_longest_prefix_and_own_routes() -> None:
    table = RouteTable(
        [
            entry("172.31.0.0", "255.255.0.0", "10.0.0.3"),
            entry("172.31.5.0", "255.255.255.0", "10.0.0.4"),
            entry("192.168.0.0", "255.255.0.0", "10.0.0.5"),
        ],
        me=A("10.0.0.5").packed,
    )
    assert table.nexthop(A("172.31.5.9").packed) == A("10.0.0.4").packed
    assert table.nexthop(A("172.31.6.9").packed) == A("10.0.0.3").packed
    assert table.nexthop(A("192.168.1.1").packed) is None  # through ourselves: left out
    assert table.gateway
    assert table.networks() == (IPv4Network("172.31.0.0/16"), IPv4Network("172.31.5.0/24"))


def routed_client(**kw: object) -> Harness:
    h = Harness(tun="10.0.0.5/24", **kw)
    h.join()
    h.send_msg(
        m.Route(
            (
                entry("172.31.0.0", "255.255.255.0", "10.0.0.3"),
                entry("192.168.7.0", "255.255.255.0", "10.0.0.5"),  # through us
            )
        ).encode()
    )
    return h


def test_client_routes_changed_and_encapsulates() -> None:
    h = routed_client()
    assert h.drain() == [RoutesChanged((IPv4Network("172.31.0.0/24"),))]
    inner = packet("10.0.0.5", "172.31.0.9")
    h.client.receive_packet(inner, h.now)
    (sent,) = h.messages()
    assert isinstance(sent, m.Forward)
    assert sent.packet[:20] == encapsulate(inner, A("10.0.0.5").packed, A("10.0.0.3").packed)[:20]
    assert sent.packet[20:] == inner
    # An unrouted destination goes as before.
    plain = packet("10.0.0.5", "10.0.0.6")
    h.client.receive_packet(plain, h.now)
    assert h.messages() == [m.Forward(plain)]


def test_gateway_encapsulates_a_lan_hosts_reply_to_its_virtual_destination() -> None:
    h = routed_client()  # a route goes through us: we are a gateway
    reply = packet("192.168.7.20", "10.0.0.6")
    h.client.receive_packet(reply, h.now)
    (sent,) = h.messages()
    assert isinstance(sent, m.Forward)
    assert sent.packet[12:20] == A("10.0.0.5").packed + A("10.0.0.6").packed
    assert sent.packet[20:] == reply
    # Not for the virtual network: still dropped.
    h.client.receive_packet(packet("192.168.7.20", "198.51.100.1"), h.now)
    assert h.messages() == []


def test_client_decapsulates_valid_and_zeroed_outer_headers() -> None:
    h = routed_client()
    inner = packet("192.168.7.20", "10.0.0.5")
    h.send_msg(m.Forward(encapsulate(inner, A("10.0.0.3").packed, A("10.0.0.5").packed)).encode())
    h.send_msg(b"\x01" + zeroed_6x(inner, "10.0.0.3", "10.0.0.5"))
    # The gateway's part: the inner packet is for a LAN host behind us.
    lan = packet("10.0.0.6", "192.168.7.20")
    h.send_msg(b"\x01" + zeroed_6x(lan, "10.0.0.6", "10.0.0.5"))
    assert h.client.packets_to_deliver() == [inner, inner, lan]


def test_loops_are_dropped_and_counted() -> None:
    h = routed_client()
    twice = zeroed_6x(
        zeroed_6x(packet("10.0.0.6", "10.0.0.5"), "10.0.0.6", "10.0.0.5"), "10.0.0.6", "10.0.0.5"
    )
    back = zeroed_6x(packet("10.0.0.3", "172.31.0.9"), "10.0.0.3", "10.0.0.5")  # routes back
    h.send_msg(b"\x01" + twice)
    h.send_msg(b"\x01" + back)
    assert h.client.packets_to_deliver() == []
    # Read from TUN: already encapsulated and routed, it would be encapsulated twice.
    h.client.receive_packet(
        zeroed_6x(packet("10.0.0.5", "172.31.0.9"), "10.0.0.5", "172.31.0.9"), h.now
    )
    assert h.messages() == []
    assert h.client.stats.packets_looped == 3
    assert h.client.status(h.now, h.wall, "ws://x/").counters["packets_looped"] == 3


def test_routes_replaced_on_reconnect_and_emptied_when_none_come() -> None:
    h = routed_client()
    h.drain()
    h.client.connection_lost(h.now)
    h.advance(60)
    assert h.client.take_connect_request()
    h.connect()
    h.feed(response_101())
    h.frames()
    assert Connected(IPv4Interface("10.0.0.5/24")) in h.drain()  # no RoutesChanged meanwhile
    assert h.client.routes.networks() == (IPv4Network("172.31.0.0/24"),)
    h.send_msg(m.Route((entry("172.31.0.0", "255.255.0.0", "10.0.0.3"),)).encode())
    assert h.drain() == [RoutesChanged((IPv4Network("172.31.0.0/16"),))]
    # Next connection: the server sends no ROUTE; the first other frame empties the table.
    h.client.connection_lost(h.now)
    h.advance(60)
    assert h.client.take_connect_request()
    h.connect()
    h.feed(response_101())
    h.frames()
    h.drain()
    h.send_frame(OP_PONG, b"")
    assert h.drain() == [RoutesChanged(())]


# --- MTU and ping payload (PROTOCOL.md 6.3) -------------------------------------------------
def test_packets_above_the_mtu_never_go_out() -> None:
    h = Harness(tun="10.0.0.5/24", mtu=600)
    h.join()
    h.client.receive_packet(packet("10.0.0.5", "10.0.0.6", bytes(581)), h.now)
    assert h.messages() == []
    assert h.client.stats.packets_too_big == 1
    ok = packet("10.0.0.5", "10.0.0.6", bytes(580))
    h.client.receive_packet(ok, h.now)
    assert h.messages() == [m.Forward(ok)]


def test_mtu_above_what_56_receives_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    Harness(tun="10.0.0.5/24", mtu=1480).start()
    assert "at most 1471 bytes over a direct path" in caplog.text
    caplog.clear()
    Harness(tun="10.0.0.5/24", mtu=1500).start()
    assert "at most 1499 bytes over the relay" in caplog.text
    caplog.clear()
    Harness(tun="10.0.0.5/24").start()
    assert "mtu" not in caplog.text


def test_ping_payload_has_the_6x_form() -> None:
    h = Harness(tun="10.0.0.5/24", version="1.2.3", hostname="gw1")
    h.join()
    h.advance(16)
    pings = [f.payload for f in h.frames() if f.opcode == OP_PING]
    assert pings == [b"candy::linux::1.2.3::gw1"]


def test_routed_packets_take_the_direct_path_to_the_gateway() -> None:
    """Simulated: A's packet for the LAN behind G is encapsulated towards G and, once A and G
    have a direct path, goes there in a peer datagram, not through the relay."""
    from candy_core import Simulation
    from candy_core.sim import icmp

    sim = Simulation(seed=7, latency=0.005)
    sim.add_server("pw", "10.99.0.0/24", sdwan="10.99.0.0/24,172.31.0.0/24,10.99.0.3")
    sim.add_stun()
    nat_a = sim.add_nat("198.51.100.1", "port_restricted")
    nat_g = sim.add_nat("198.51.100.2", "port_restricted")
    g = sim.add_client("g", "192.168.2.3", nat=nat_g, tun="10.99.0.3/24")
    a = sim.add_client("a", "192.168.1.10", nat=nat_a, tun="10.99.0.2/24")
    assert sim.run_until(lambda: a.connected and g.connected, timeout=5)
    lan_host = "172.31.0.5"
    a.send_packet(icmp(a.ip, lan_host, 1))  # through the relay; starts the negotiation
    sim.run(0.5)
    assert g.received and g.received[-1] == icmp(a.ip, lan_host, 1)  # decapsulated for TUN
    assert sim.run_until(
        lambda: a.peer_state(g) == "CONNECTED" and g.peer_state(a) == "CONNECTED", 30
    )
    relayed = sim.frames_relayed
    for seq in range(2, 12):
        a.send_packet(icmp(a.ip, lan_host, seq))
        sim.run(0.05)
    sim.run(0.5)
    assert [p for p in g.received if p == icmp(a.ip, lan_host, 11)]
    assert sim.frames_relayed == relayed  # nothing went through the relay
    (peer,) = [p for p in a.status().peers if p.ip == str(g.ip)]
    assert peer.path == "direct" and peer.tx_packets >= 10
