"""What ``candy status`` and ``candy ping`` read from the cores (pure, no sockets).

The simulator plays two clients behind NATs with a relay and STUN; the snapshots are
compared with what happened: which path each packet took, how many bytes moved.
"""

from __future__ import annotations

import json
import random

from test_p2p_scenarios import LATENCY, both, public_endpoint, world
from test_server import Relay, forward, trio

from candy_core import PingReply, Simulation
from candy_core.sim import icmp

CLIENT_KEYS = {"name", "interface", "address", "server", "peers", "counters", "paths"}
PEER_KEYS = {
    "ip", "state", "path", "endpoint", "via", "rtt_ms", "last_heartbeat_s",
    "tx_bytes", "rx_bytes", "tx_packets", "rx_packets", "reason",
}  # fmt: skip


def replies(client: object) -> list[PingReply]:
    return [e for _, e in client.events if isinstance(e, PingReply)]  # type: ignore[attr-defined]


def test_client_status_before_and_after_a_direct_path() -> None:
    sim, a, b = world("port_restricted", "port_restricted", seed=3)
    sim.run_until(lambda: a.connected and b.connected, 10)
    a.send_packet(icmp(a.ip, b.ip, 1))  # the first packet goes through the relay
    sim.run(0.5)
    status = a.status().as_dict()
    json.dumps(status)  # plain, serialisable values only
    assert set(status) == CLIENT_KEYS
    assert status["address"] == f"{a.ip}/24"
    assert status["server"]["state"] == "connected" and status["server"]["last_error"] is None
    (peer,) = status["peers"]
    assert set(peer) == PEER_KEYS
    assert peer["ip"] == str(b.ip) and peer["path"] == "relay"
    assert peer["tx_packets"] == 1 and peer["tx_bytes"] == len(icmp(a.ip, b.ip, 1))
    assert peer["reason"] is not None  # why it is not direct (yet)
    assert status["paths"]["relay"]["tx_packets"] == 1

    assert sim.run_until(lambda: both(a, b, "CONNECTED"), 30)
    for seq in range(2, 12):
        a.send_packet(icmp(a.ip, b.ip, seq))
        sim.run(0.05)
    sim.run(0.5)
    (peer,) = a.status().as_dict()["peers"]
    assert peer["state"] == "CONNECTED" and peer["path"] == "direct"
    assert peer["endpoint"] == "{}:{}".format(*public_endpoint(b))
    assert peer["tx_packets"] == 11 and peer["reason"] is None
    assert 0 <= peer["last_heartbeat_s"] <= 1.5
    (seen_by_b,) = b.status().as_dict()["peers"]
    assert seen_by_b["rx_packets"] == 11 and seen_by_b["path"] == "direct"
    assert b.status().paths["direct"]["rx_packets"] == 10


def test_ping_reports_the_path_and_is_not_written_to_tun() -> None:
    sim, a, b = world("full_cone", "full_cone", seed=5)
    b.answer_pings = True  # b's kernel answers echo requests
    sim.run_until(lambda: a.connected and b.connected, 10)
    assert a.ping(b) == 1
    sim.run(1)
    (first,) = replies(a)
    assert first.ip == b.ip and first.seq == 1 and first.path == "relay"
    assert first.endpoint is None
    assert abs(first.rtt_ms - 4 * LATENCY * 1000) < 1  # two relayed legs each way
    assert a.received == []  # the echo reply went to the ping, not to TUN
    assert sim.run_until(lambda: both(a, b, "CONNECTED"), 30)
    a.ping(b)
    sim.run(1)
    second = replies(a)[-1]
    assert second.path == "direct" and second.endpoint == "{}:{}".format(*public_endpoint(b))
    assert second.rtt_ms < first.rtt_ms
    assert a.received == []


def test_a_ping_nobody_answers_is_forgotten() -> None:
    sim = Simulation(seed=1)
    sim.add_server("pw", "10.99.0.0/24")
    a = sim.add_client("a", "203.0.113.20", stun=None)
    sim.run_until(lambda: a.connected, 10)
    for _ in range(300):
        a.ping("10.99.0.200")
    sim.run(40)
    assert replies(a) == []
    assert len(a.core._pings) <= 256


def test_status_without_peer_to_peer_lists_relayed_peers() -> None:
    sim = Simulation(seed=2)
    sim.add_server("pw", "10.99.0.0/24")
    a = sim.add_client("a", "203.0.113.20", stun=None)
    b = sim.add_client("b", "203.0.113.21", stun=None)
    sim.run_until(lambda: a.connected and b.connected, 10)
    a.send_packet(icmp(a.ip, b.ip, 1))
    sim.run(0.5)
    (peer,) = a.status().peers
    assert (peer.state, peer.path) == ("NONE", "relay")
    assert "no STUN" in str(peer.reason)


def test_server_link_state_follows_the_connection() -> None:
    sim = Simulation(seed=3)
    sim.add_server("pw", "10.99.0.0/24")
    a = sim.add_client("a", "203.0.113.20", stun=None)
    sim.run_until(lambda: a.connected, 10)
    joined = a.status().server
    assert joined.state == "connected"
    sim.stop_server()
    sim.run(0.5)
    down = a.status().server
    assert down.state in ("backoff", "connecting") and down.last_error
    assert down.since > joined.since


# --- the relay -------------------------------------------------------------------------------
def test_server_status_lists_clients_with_bytes_that_grow() -> None:
    relay = Relay(rng=random.Random(9))
    a, _, _ = trio(relay)
    before = {info.ip: info for info in relay.server.status(relay.now, relay.wall).clients}
    assert sorted(before) == ["10.99.0.1", "10.99.0.2", "10.99.0.3"]
    assert before["10.99.0.1"].remote.startswith("198.51.100.")
    assert before["10.99.0.1"].vmac == a.vmac_bytes.decode()
    a.send(forward("10.99.0.1", "10.99.0.2"))
    a.send(forward("10.99.0.9", "10.99.0.2"))  # spoofed: dropped and counted
    status = relay.server.status(relay.now, relay.wall)
    after = {info.ip: info for info in status.clients}
    assert after["10.99.0.1"].rx_bytes > before["10.99.0.1"].rx_bytes
    assert after["10.99.0.2"].tx_bytes > before["10.99.0.2"].tx_bytes
    assert after["10.99.0.1"].frames_dropped == 1
    counters = status.as_dict()["counters"]
    assert counters["frames_relayed"] == 1 and counters["authenticated"] == 3
    json.dumps(status.as_dict())


def test_server_counts_rejections_by_reason() -> None:
    relay = Relay()
    bad = relay.client()
    bad.vmac(pw="wrong")
    late = relay.client()
    late.vmac(ts=int(relay.wall) - 3600)
    http = relay.client(connect=False)
    http.connect(upgrade=False)
    http.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    counters = relay.server.status(relay.now, relay.wall).counters
    assert counters["rejected"] == {"wrong_password": 1, "clock_skew": 1, "http": 1}
