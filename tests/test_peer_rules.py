"""Security rules of the peer-to-peer manager (PROTOCOL.md 4.1, 4.4, 4.5), one test per rule.

Each test drives a real :class:`~candy_core.peers.PeerManager` through its public methods
only: messages relayed by the server, sealed datagrams from peers and the STUN server, the
1-second tick. It observes what leaves the manager -- WebSocket messages, datagrams, state
change events and :meth:`~candy_core.peers.PeerManager.peer_status` -- never its internals.
Every test also shows the positive case, so that a harness that sends nothing valid cannot
make it pass.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Interface

import pytest

from candy_core import ClientConfig, PeerStateChanged, stun
from candy_core import messages as m
from candy_core import peermsg as pm
from candy_core.crypto import PeerCipher, peer_key
from candy_core.peers import MAX_PEERS, PeerManager, PeerStatus

PASSWORD = "peer-rules"
ME = IPv4Address("10.0.0.1")
B = IPv4Address("10.0.0.2")
C = IPv4Address("10.0.0.3")
STUN_SERVER = ("192.0.2.100", 3478)
OUR_LAN = "192.168.1.10"
OUR_PORT = 40000
B_LAN = ("192.168.1.20", 40002)
B_PUBLIC = ("203.0.113.2", 5002)
C_PUBLIC = ("203.0.113.3", 5003)
STRANGER = ("203.0.113.99", 5999)

Addr = tuple[str, int]


def ipv4_packet(src: IPv4Address, dst: IPv4Address, body: bytes = b"payload") -> bytes:
    head = bytearray(20)
    head[0] = 0x45
    head[2:4] = (20 + len(body)).to_bytes(2, "big")
    head[12:16] = src.packed
    head[16:20] = dst.packed
    return bytes(head) + body


class Node:
    """One PeerManager (ours, 10.0.0.1) with a virtual clock and everything it emits."""

    def __init__(self, route: int = 0) -> None:
        config = ClientConfig(password=PASSWORD, stun=STUN_SERVER, localhost=OUR_LAN, route=route)
        self.messages: list[m.Message] = []
        self.pm = PeerManager(config, random.Random(1), self._send_message)
        self.pm.local_port = OUR_PORT
        self.pm.set_address(IPv4Interface(f"{ME}/24"))
        self.now = 1000.0
        self.events: list[PeerStateChanged] = []
        self.datagrams: list[tuple[bytes, Addr]] = []
        # The peers' side: seals what they send us (K(our address)), with its own IVs.
        self._peer_cipher = PeerCipher(random.Random(2))
        self._opener = PeerCipher(random.Random(3))
        self.pm.handle_timer(self.now)  # schedules the first tick
        self.collect()

    def _send_message(self, payload: bytes) -> bool:
        self.messages.append(m.decode(payload))
        return True

    # --- driving ------------------------------------------------------------------------
    def collect(self) -> None:
        self.datagrams.extend(self.pm.datagrams_to_send())
        while (event := self.pm.next_event()) is not None:
            assert isinstance(event, PeerStateChanged)
            self.events.append(event)

    def tick(self, times: int = 1) -> None:
        for _ in range(times):
            self.now += 1.0
            self.pm.handle_timer(self.now)
            self.collect()

    def datagram(self, data: bytes, addr: Addr) -> list[bytes]:
        packets = self.pm.receive_datagram(data, addr, self.now)
        self.collect()
        return packets

    def from_peer(self, plaintext: bytes, addr: Addr) -> list[bytes]:
        """A datagram a peer sealed for us arrives from ``addr``."""
        sealed = self._peer_cipher.seal(peer_key(PASSWORD, ME.packed), plaintext)
        return self.datagram(sealed, addr)

    def heartbeat(self, peer: IPv4Address, addr: Addr, ack: bool) -> None:
        self.from_peer(pm.Heartbeat(peer, IPv4Address(addr[0]), addr[1], ack).encode(), addr)

    def relayed(self, msg: m.Peer | m.Discovery | m.General) -> None:
        self.pm.receive_message(msg, self.now)
        self.collect()

    def take(self) -> tuple[list[m.Message], list[tuple[bytes, Addr]], list[PeerStateChanged]]:
        """Everything emitted since the last call."""
        out = (self.messages, self.datagrams, self.events)
        self.messages, self.datagrams, self.events = [], [], []
        return out

    # --- observing ----------------------------------------------------------------------
    def status(self, peer: IPv4Address) -> PeerStatus | None:
        return next((s for s in self.pm.peer_status() if s.ip == peer), None)

    def state(self, peer: IPv4Address) -> str | None:
        status = self.status(peer)
        return status.state if status else None

    def opened(self, datagram: bytes, peer: IPv4Address) -> bytes | None:
        """The plaintext of a datagram we sealed for ``peer`` (None: not for that peer)."""
        return self._opener.open(peer_key(PASSWORD, peer.packed), datagram)

    def stun_requests(self) -> list[bytes]:
        return [data for data, addr in self.datagrams if addr == STUN_SERVER]

    # --- bringing a peer into a state ---------------------------------------------------
    def prepare(self, peer: IPv4Address) -> None:
        """A packet from ``peer`` came through the server: INIT -> PREPARING."""
        self.pm.relayed_from(peer.packed, self.now)
        self.collect()
        assert self.state(peer) == "PREPARING"

    def connect(self, peer: IPv4Address, addr: Addr) -> None:
        """PREPARING -> CONNECTING -> CONNECTED with heartbeats from ``addr``."""
        self.prepare(peer)
        self.heartbeat(peer, addr, ack=False)
        assert self.state(peer) == "CONNECTING"
        self.heartbeat(peer, addr, ack=True)
        assert self.state(peer) == "CONNECTED"

    def into(self, peer: IPv4Address, state: str) -> None:
        """Bring ``peer`` into ``state`` the way PROTOCOL.md 4.4 gets there."""
        if state == "PREPARING":
            self.prepare(peer)
        elif state == "SYNCHRONIZING":  # our public endpoint sent, theirs still unknown
            self.prepare(peer)
            self.tick(3)
            tid = stun_tid(self.stun_requests()[-1])
            self.datagram(stun.build_binding_response(tid, "198.51.100.1", 61000), STUN_SERVER)
        elif state == "CONNECTING":
            self.prepare(peer)
            self.heartbeat(peer, B_PUBLIC, ack=False)
        elif state == "CONNECTED":
            self.connect(peer, B_PUBLIC)
        elif state == "WAITING":  # CONNECTING without an answer for 10 s
            self.into(peer, "CONNECTING")
            self.tick(11)
        elif state == "FAILED":  # PREPARING without a STUN answer for 10 s
            self.prepare(peer)
            self.tick(11)
        elif state == "INIT":  # CONNECTED, then no heartbeat for 3 s
            self.connect(peer, B_PUBLIC)
            self.tick(4)
        assert self.state(peer) == state, self.events
        self.take()


def stun_tid(request: bytes) -> bytes:
    return request[8:20]


# --- 1. STUN answers must carry the id of one of our requests (PROTOCOL.md 4.1) -------------
def test_stun_answer_with_an_unknown_transaction_id_is_ignored() -> None:
    node = Node()
    # B told us its LAN endpoint: B is PREPARING and gets a heartbeat there every tick,
    # carrying the public endpoint we believe we have.
    node.relayed(m.General.lan_endpoint(B, ME, IPv4Address(B_LAN[0]), B_LAN[1]))
    assert node.state(B) == "PREPARING"
    node.tick(3)  # count > 2: a STUN answer now makes us send PEER
    requests = node.stun_requests()
    assert len(requests) >= 1
    real_tid = stun_tid(requests[-1])
    node.take()

    forged_ids = [
        bytes(12),  # what a 5.6 client sends; we never do
        bytes(b ^ 0xFF for b in real_tid),
        b"forged-tid!!",
    ]
    for tid in forged_ids:
        assert tid not in {stun_tid(r) for r in requests}
        node.datagram(stun.build_binding_response(tid, "6.6.6.6", 666), STUN_SERVER)
    messages, datagrams, events = node.take()
    assert messages == [], "a forged STUN answer made us announce an endpoint"
    assert datagrams == [] and events == []
    assert node.state(B) == "PREPARING"

    # Nothing was learned: the next heartbeat to B's LAN still carries our LAN endpoint.
    node.tick()
    _, datagrams, _ = node.take()
    beats = [node.opened(data, B) for data, addr in datagrams if addr == B_LAN]
    assert beats, datagrams
    for plain in beats:
        assert plain is not None
        hb = pm.Heartbeat.decode(plain)
        assert (str(hb.ip), hb.port) == (OUR_LAN, OUR_PORT), hb

    # The genuine answer to one of our requests is taken: PEER goes out with its endpoint.
    node.datagram(stun.build_binding_response(real_tid, "198.51.100.7", 40001), STUN_SERVER)
    messages, _, events = node.take()
    assert messages == [m.Peer(ME, B, IPv4Address("198.51.100.7"), 40001)]
    assert [(e.ip, e.old, e.new) for e in events] == [(B, "PREPARING", "SYNCHRONIZING")]


# --- 2. heartbeats count only in PREPARING, CONNECTING and CONNECTED (PROTOCOL.md 4.4) -----
@pytest.mark.parametrize("state", ["INIT", "SYNCHRONIZING", "WAITING", "FAILED"])
def test_heartbeat_in_a_state_that_does_not_accept_it_changes_nothing(state: str) -> None:
    node = Node()
    node.into(B, state)
    before = node.status(B)
    assert before is not None and before.endpoint is None

    for ack in (False, True):
        node.heartbeat(B, STRANGER, ack=ack)
    messages, datagrams, events = node.take()
    assert events == [], f"a heartbeat moved B out of {state}: {events}"
    assert node.status(B) == before, "a heartbeat changed what we know of B"
    assert datagrams == [] and messages == []

    # B's path is still negotiated as usual afterwards: no endpoint was kept from STRANGER.
    node.tick()
    _, datagrams, _ = node.take()
    assert all(addr != STRANGER for _, addr in datagrams), datagrams


def test_heartbeat_from_an_unknown_peer_tracks_nothing() -> None:
    node = Node()
    node.heartbeat(B, STRANGER, ack=True)
    assert node.pm.peer_status() == []
    assert node.take() == ([], [], [])


@pytest.mark.parametrize(
    ("state", "after"),
    [("PREPARING", "CONNECTING"), ("CONNECTING", "CONNECTED"), ("CONNECTED", "CONNECTED")],
)
def test_heartbeat_in_an_accepting_state_is_taken(state: str, after: str) -> None:
    """The same heartbeat datagrams as above do count where 4.4 allows them."""
    node = Node()
    node.into(B, state)
    before = node.status(B)
    assert before is not None
    # A CONNECTED peer's live endpoint does not move (test_peer_hostile.py): use it there.
    source = before.endpoint if state == "CONNECTED" and before.endpoint else STRANGER
    node.heartbeat(B, source, ack=state != "PREPARING")
    status = node.status(B)
    assert status is not None
    assert (status.state, status.endpoint, status.last_heartbeat) == (after, source, node.now)


# --- 3. forwarding other peers' packets only with routing on (PROTOCOL.md 4.5) -------------
def forward_for_c(route: int) -> tuple[Node, bytes, list[tuple[bytes, Addr]]]:
    """B and C are CONNECTED; B sends us a FORWARD for C. Returns what we sent after it."""
    node = Node(route=route)
    node.connect(B, B_PUBLIC)
    node.connect(C, C_PUBLIC)
    node.take()
    plaintext = bytes([pm.FORWARD]) + ipv4_packet(B, C, b"for C through us")
    delivered = node.from_peer(plaintext, B_PUBLIC)
    assert delivered == [], "a packet for C was written to our TUN"
    _, datagrams, _ = node.take()
    return node, plaintext, datagrams


def test_without_routing_a_forward_for_another_peer_is_not_resent() -> None:
    node, _, datagrams = forward_for_c(route=0)
    assert datagrams == [], f"route=0 but we forwarded: {datagrams}"
    # Our own packets still arrive over the same path.
    mine = ipv4_packet(B, ME, b"for us")
    assert node.from_peer(bytes([pm.FORWARD]) + mine, B_PUBLIC) == [mine]


def test_with_routing_a_forward_for_another_peer_goes_to_it() -> None:
    node, plaintext, datagrams = forward_for_c(route=5)
    assert [addr for _, addr in datagrams] == [C_PUBLIC]
    assert node.opened(datagrams[0][0], C) == plaintext


# --- 4. at most MAX_PEERS peers are tracked -------------------------------------------------
def test_peers_beyond_max_peers_are_not_tracked() -> None:
    node = Node()
    first = int(IPv4Address("10.1.0.0"))
    ips = [IPv4Address(first + i) for i in range(MAX_PEERS)]
    for ip in ips:
        node.pm.relayed_from(ip.packed, node.now)
    node.collect()
    messages, _, events = node.take()
    assert len(node.pm.peer_status()) == MAX_PEERS
    assert len(events) == MAX_PEERS and len(messages) == MAX_PEERS  # LAN endpoint to each

    # Every way a new peer can appear: traffic through the server, DISCOVERY, PEER, GENERAL.
    extra = [IPv4Address(first + MAX_PEERS + i) for i in range(4)]
    node.pm.relayed_from(extra[0].packed, node.now)
    node.relayed(m.Discovery(extra[1], ME))
    node.relayed(m.Peer(extra[2], ME, IPv4Address("203.0.113.50"), 5050))
    node.relayed(m.General.lan_endpoint(extra[3], ME, IPv4Address("192.168.1.50"), 5050))
    node.collect()
    messages, datagrams, events = node.take()
    statuses = node.pm.peer_status()
    assert len(statuses) == MAX_PEERS
    assert not {s.ip for s in statuses} & set(extra)
    assert (messages, datagrams, events) == ([], [], [])

    # The tracked peers still work.
    node.heartbeat(ips[0], B_PUBLIC, ack=False)
    assert node.state(ips[0]) == "CONNECTING"
