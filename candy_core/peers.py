"""Peer-to-peer paths (PROTOCOL.md section 4): STUN, the per-peer state machine, heartbeats,
LAN shortcut, discovery, delay measurement and relay routes through peers.

Enabled only when a STUN server is configured; otherwise every packet goes to the server.
The manager is ticked once a second (``handle_timer``); datagrams it wants sent are
collected with ``datagrams_to_send``, WebSocket messages go out through ``send_message``.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Interface

from candy_core import messages as m
from candy_core import peermsg as pm
from candy_core import stun
from candy_core.config import ClientConfig
from candy_core.crypto import IV_SIZE, PeerCipher, RecentIvs, ReplayWindow, peer_key
from candy_core.errors import ProtocolError, StunError
from candy_core.events import ClientEvent, PeerStateChanged
from candy_core.peerstate import (
    EXCHANGE_AFTER,
    FORGET_ENDPOINT,
    FORGET_LAN,
    RETRY_MAX,
    RETRY_MIN,
    STUN_AFTER,
    TIMEOUTS,
    TRANSITIONS,
    PeerEvent,
    State,
)
from candy_core.status import Counters, PeerInfo, Traffic, endpoint_text

log = logging.getLogger("candy.peers")

SendMessage = Callable[[bytes], bool]
Addr = tuple[str, int]

TICK = 1.0
#: Ticks between DELAY probes on a connected path (with routing on).
DELAY_EVERY = 60
#: Most peers tracked; more are not negotiated with (memory stays bounded).
MAX_PEERS = 4096
#: Every datagram to us is sealed under one key, K(own address), whoever sends it: the
#: replay window is kept per key, across all source addresses (the last this many IVs).
REPLAY_WINDOW = 8192
#: Heartbeats (they move a peer's endpoint) are remembered this long, at most this many.
HEARTBEAT_MEMORY = 300.0
HEARTBEAT_MEMORY_SIZE = 16384
#: A CONNECTED peer's endpoint moves to a new address only after the current one has been
#: silent this long (two heartbeat intervals); NAT rebinding still recovers within seconds.
ENDPOINT_SILENCE = 2 * 1.0
#: A measured round trip above this is not believed (a forged or broken DELAY echo).
MAX_DELAY_MS = 60_000
#: Relay routes kept at most (like peers); destinations must lie inside our network.
MAX_ROUTES = MAX_PEERS
#: Largest delay a route may carry; one more means "withdrawn" (PROTOCOL.md 4.3).
MAX_ROUTE_DELAY = pm.ROUTE_WITHDRAWN - 1
_ZERO = IPv4Address(0)
#: The states in which relayed traffic matters, read from the table once: a relayed packet
#: from a peer in any other state (every packet while its path is FAILED) costs one lookup.
_TRAFFIC_STARTS = frozenset(s for s, e in TRANSITIONS if e is PeerEvent.SERVER_TRAFFIC)


@dataclass(slots=True)
class PeerStatus:
    """What a user sees of one peer."""

    ip: IPv4Address
    state: str
    endpoint: Addr | None
    last_heartbeat: float | None
    delay_ms: int | None
    route_via: IPv4Address | None


@dataclass(eq=False, slots=True)
class _Peer:
    ip: bytes
    key: bytes
    state: State = State.INIT
    count: int = 0
    endpoint: Addr | None = None
    lan: Addr | None = None
    ack: bool = False
    retry: int = RETRY_MIN
    last_heartbeat: float | None = None
    delay_ms: int | None = None
    delay_ticks: int = 0
    #: The reason of the last state change (why the path is what it is).
    reason: str | None = None


@dataclass(slots=True)
class _Route:
    next: bytes
    delay: int


@dataclass(slots=True)
class PeerStats:
    datagrams_sent: int = 0
    datagrams_received: int = 0
    undecryptable: int = 0
    replayed: int = 0
    forwarded_for_peers: int = 0
    #: Heartbeats from a new address ignored while the peer's endpoint was alive.
    endpoint_moves_refused: int = 0
    #: DELAY echoes and ROUTE announcements with values that cannot be true, ignored.
    implausible: int = 0


@dataclass(slots=True)
class _Stun:
    addr: Addr
    tids: deque[bytes] = field(default_factory=lambda: deque(maxlen=4))
    public: Addr | None = None


class PeerManager:
    """Direct UDP paths of one client to its peers."""

    def __init__(self, config: ClientConfig, rng: random.Random, send_message: SendMessage) -> None:
        self.config = config
        self.enabled = config.stun is not None
        self._rng = rng
        self._send_message = send_message
        self._cipher = PeerCipher(rng)
        self._events: deque[ClientEvent] = deque()
        self._datagrams: list[tuple[bytes, Addr]] = []
        self._peers: dict[bytes, _Peer] = {}
        self._routes: dict[bytes, _Route] = {}
        self._replay = ReplayWindow(REPLAY_WINDOW)
        self._heartbeat_ivs = RecentIvs(HEARTBEAT_MEMORY, HEARTBEAT_MEMORY_SIZE)
        self._stun = _Stun(config.stun) if config.stun else None
        self.address: IPv4Interface | None = None
        self._ip: bytes | None = None
        self._own_key = b""
        self.local_port = 0
        self._next_tick: float | None = None
        self._next_discovery: float | None = None
        self.stats = PeerStats()

    # --- configuration ------------------------------------------------------------------
    def set_address(self, address: IPv4Interface) -> None:
        """Our virtual address changed: keys change, so every path starts over."""
        self.address = address
        self._ip = address.ip.packed
        self._own_key = peer_key(self.config.password, self._ip)
        for peer in list(self._peers.values()):
            self._fire(peer, PeerEvent.ADDRESS_CHANGED)
        self._peers.clear()
        self._routes.clear()

    def peer_status(self) -> list[PeerStatus]:
        """Every known peer with its state, endpoint, last heartbeat and delay."""
        result = []
        for peer in self._peers.values():
            route = self._routes.get(peer.ip)
            via = IPv4Address(route.next) if route and route.next != peer.ip else None
            result.append(
                PeerStatus(
                    IPv4Address(peer.ip),
                    peer.state.value,
                    peer.endpoint,
                    peer.last_heartbeat,
                    peer.delay_ms,
                    via,
                )
            )
        return result

    # --- outputs ------------------------------------------------------------------------
    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        datagrams, self._datagrams = self._datagrams, []
        return datagrams

    def next_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        if not self.enabled or self._ip is None:
            return None
        return 0.0 if self._next_tick is None else self._next_tick

    # --- the hot paths ------------------------------------------------------------------
    def send_packet(self, dst: bytes, packet: bytes, now: float) -> str | None:
        """Send ``packet`` over a routed or direct path if one is up; returns which path
        ("route", "direct" or "lan"), or None: the caller relays it through the server."""
        if not self.enabled:
            return None
        route = self._routes.get(dst)
        if route is not None and route.next != dst:
            hop = self._peers.get(route.next)
            if hop is not None and hop.state is State.CONNECTED:
                self._seal_to(hop, b"\x01" + packet)
                return "route"
        peer = self._peers.get(dst)
        if peer is None or peer.state is not State.CONNECTED:
            return None
        self._seal_to(peer, b"\x01" + packet)
        return "lan" if peer.endpoint == peer.lan else "direct"

    def path_from(self, src: bytes, addr: Addr) -> str:
        """How a packet from ``src`` that arrived in a datagram from ``addr`` travelled."""
        peer = self._peers.get(src)
        if peer is None or peer.endpoint != addr:
            return "route"
        return "lan" if addr == peer.lan else "direct"

    def counters(self) -> dict[str, int]:
        """The peer-to-peer counters, by name."""
        return asdict(self.stats)

    def describe(self, now: float, traffic: Traffic) -> list[PeerInfo]:
        """Every peer (known to the state machine or seen in traffic) for ``candy status``."""
        result = []
        seen = set()
        for ip, peer in self._peers.items():
            seen.add(ip)
            route = self._routes.get(ip)
            via = route.next if route is not None and route.next != ip else None
            hop = self._peers.get(via) if via is not None else None
            if hop is not None and hop.state is State.CONNECTED:
                path = "route"
            elif peer.state is State.CONNECTED:
                path = "lan" if peer.endpoint == peer.lan else "direct"
                via = None
            else:
                path, via = "relay", None
            result.append(self._info(ip, peer.state.value, path, peer, via, now, traffic))
        for ip in traffic.peers:
            if ip not in seen:
                state = "NONE" if not self.enabled else State.INIT.value
                result.append(self._info(ip, state, "relay", None, None, now, traffic))
        return sorted(result, key=lambda info: IPv4Address(info.ip))

    def _info(
        self,
        ip: bytes,
        state: str,
        path: str,
        peer: _Peer | None,
        via: bytes | None,
        now: float,
        traffic: Traffic,
    ) -> PeerInfo:
        counters = traffic.peers.get(ip) or Counters()
        if path in ("direct", "lan", "route"):
            reason = None
        elif not self.enabled:
            reason = "peer-to-peer is off (no STUN server configured)"
        elif peer is None or peer.reason is None:
            reason = "no direct path negotiated yet"
        else:
            reason = peer.reason
        heard = peer.last_heartbeat if peer is not None else None
        return PeerInfo(
            ip=str(IPv4Address(ip)),
            state=state,
            path=path,
            endpoint=endpoint_text(peer.endpoint) if peer is not None and path != "relay" else None,
            via=str(IPv4Address(via)) if via is not None else None,
            rtt_ms=peer.delay_ms if peer is not None else None,
            last_heartbeat_s=round(now - heard, 3) if heard is not None else None,
            tx_bytes=counters.tx_bytes,
            rx_bytes=counters.rx_bytes,
            tx_packets=counters.tx_packets,
            rx_packets=counters.rx_packets,
            reason=reason,
        )

    def _seal_to(self, peer: _Peer, plaintext: bytes, addr: Addr | None = None) -> None:
        target = addr or peer.endpoint
        if target is None:
            return
        self._datagrams.append((self._cipher.seal(peer.key, plaintext), target))
        self.stats.datagrams_sent += 1

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> list[bytes]:
        """Handle one UDP datagram; returns packets for TUN."""
        if not self.enabled or self._ip is None:
            return []
        if self._stun is not None and addr == self._stun.addr:
            self._stun_answer(data, now)
            return []
        plain = self._cipher.open(self._own_key, data)
        if plain is None or not plain:
            self.stats.undecryptable += 1
            return []
        iv = data[:IV_SIZE]
        kind = plain[0]
        if self._replay.seen(iv) or (kind == pm.HEARTBEAT and self._heartbeat_ivs.seen(iv, now)):
            self.stats.replayed += 1
            return []
        self.stats.datagrams_received += 1
        if kind == pm.FORWARD:
            try:
                _, dst = m.ipv4_endpoints(plain, 1)
            except ProtocolError:
                return []
            if dst == self._ip:
                return [plain[1:]]
            self._forward_for_peer(plain, dst)
            return []
        try:
            if kind == pm.HEARTBEAT:
                self._heartbeat(pm.Heartbeat.decode(plain), addr, now)
            elif kind == pm.DELAY:
                self._delay(pm.Delay.decode(plain), addr, now)
            elif kind == pm.ROUTE:
                self._route(pm.Route.decode(plain), addr)
        except ProtocolError as exc:
            log.debug("ignoring a malformed peer message from %s: %s", addr, exc)
        return []

    def _forward_for_peer(self, plain: bytes, dst: bytes) -> None:
        if self.config.route <= 0:
            return
        route = self._routes.get(dst)
        hop = self._peers.get(route.next if route else dst)
        if hop is not None and hop.state is State.CONNECTED:
            self._seal_to(hop, plain)
            self.stats.forwarded_for_peers += 1

    def relayed_from(self, src: bytes, now: float) -> None:
        """A packet from ``src`` arrived through the server: try a direct path."""
        if not self.enabled:
            return
        peer = self._peers.get(src)
        if peer is not None and peer.state not in _TRAFFIC_STARTS:
            return
        peer = self._peer(src)
        if peer is not None and self._fire(peer, PeerEvent.SERVER_TRAFFIC):
            self._send_lan_endpoint(peer)

    # --- WebSocket messages -------------------------------------------------------------
    def receive_message(self, msg: m.Peer | m.Discovery | m.General, now: float) -> None:
        """A PEER, DISCOVERY or GENERAL message relayed by the server."""
        if not self.enabled or self._ip is None:
            return
        if msg.dst.packed != self._ip and msg.dst != m.BROADCAST:
            return
        src = msg.src.packed
        if src == self._ip:
            return
        if isinstance(msg, m.Discovery):
            if msg.dst == m.BROADCAST:
                self._send_message(m.Discovery(IPv4Address(self._ip), msg.src).encode())
            peer = self._peer(src)
            if peer is not None and self._fire(peer, PeerEvent.DISCOVERY):
                self._send_lan_endpoint(peer)
        elif isinstance(msg, m.Peer):
            self._peer_endpoint(src, (str(msg.ip), msg.port))
        else:
            endpoint = msg.endpoint()
            if endpoint is not None:
                self._lan_endpoint(src, (str(endpoint[0]), endpoint[1]))

    def _peer(self, ip: bytes) -> _Peer | None:
        peer = self._peers.get(ip)
        if peer is None:
            if len(self._peers) >= MAX_PEERS or ip == self._ip:
                return None
            peer = self._peers[ip] = _Peer(ip, peer_key(self.config.password, ip))
        return peer

    def _send_lan_endpoint(self, peer: _Peer) -> None:
        lan = self.config.localhost
        if not lan or not self.local_port or self._ip is None:
            return
        msg = m.General.lan_endpoint(
            IPv4Address(self._ip), IPv4Address(peer.ip), IPv4Address(lan), self.local_port
        )
        self._send_message(msg.encode())

    def _peer_endpoint(self, ip: bytes, endpoint: Addr) -> None:
        peer = self._peer(ip)
        if peer is None:
            return
        connecting = peer.state is State.CONNECTING
        self._fire(peer, PeerEvent.PEER_PUBLIC_ENDPOINT)
        if not connecting or peer.endpoint is None:  # CONNECTING keeps what a heartbeat showed
            peer.endpoint = endpoint

    def _lan_endpoint(self, ip: bytes, endpoint: Addr) -> None:
        peer = self._peer(ip)
        if peer is None:
            return
        peer.lan = endpoint
        if self._fire(peer, PeerEvent.PEER_LAN_ENDPOINT):
            self._send_lan_endpoint(peer)
        if peer.state in (State.PREPARING, State.CONNECTING):
            self._seal_to(peer, self._heartbeat_bytes(peer), endpoint)

    # --- peer datagrams -----------------------------------------------------------------
    def _heartbeat_bytes(self, peer: _Peer) -> bytes:
        public = self._stun.public if self._stun else None
        ip, port = public if public else (self.config.localhost or "0.0.0.0", self.local_port)
        return pm.Heartbeat(IPv4Address(self._ip), IPv4Address(ip), port, peer.ack).encode()

    def _heartbeat(self, hb: pm.Heartbeat, addr: Addr, now: float) -> None:
        peer = self._peers.get(hb.tun.packed)
        if peer is None:
            return
        if (
            addr != peer.endpoint
            and peer.state is State.CONNECTED
            and peer.last_heartbeat is not None
            and now - peer.last_heartbeat < ENDPOINT_SILENCE
        ):
            self.stats.endpoint_moves_refused += 1  # the current endpoint is alive: stay
            return
        was = peer.state
        if not self._fire(peer, PeerEvent.HEARTBEAT, host=addr[0], port=addr[1]):
            return
        peer.endpoint = addr
        peer.last_heartbeat = now
        first = not peer.ack
        peer.ack = True
        if peer.state is State.CONNECTING and (first or was is not State.CONNECTING):
            self._seal_to(peer, self._heartbeat_bytes(peer))  # answer the first heartbeat
        if hb.ack:
            was = peer.state
            self._fire(peer, PeerEvent.HEARTBEAT_ACK, host=addr[0])
            entered = peer.state is State.CONNECTED and was is not State.CONNECTED
            if entered and self.config.route > 0:
                self._send_delay(peer, now)  # PROTOCOL.md 4.4: measure the delay on entry

    def _delay(self, msg: pm.Delay, addr: Addr, now: float) -> None:
        if msg.dst.packed == self._ip:  # a probe from a peer: echo it unchanged, in any state
            peer = self._peers.get(msg.src.packed)
            if peer is not None:
                self._seal_to(peer, msg.encode(), addr)
        elif msg.src.packed == self._ip:  # our probe came back
            peer = self._peers.get(msg.dst.packed)
            if peer is None or peer.state is not State.CONNECTED:
                return
            rtt = int(now * 1000) - msg.timestamp_ms
            if not 0 <= rtt <= MAX_DELAY_MS:
                log.debug("ignoring a DELAY echo from %s with a round trip of %d ms", addr, rtt)
                self.stats.implausible += 1
                return
            peer.delay_ms = rtt
            self._update_route(peer.ip, peer.ip, rtt, announce=True)

    def _route(self, msg: pm.Route, addr: Addr) -> None:
        if self.config.route <= 0:
            return
        dst, via = msg.dst.packed, msg.next.packed
        if dst == self._ip or via == self._ip:
            return
        current = self._routes.get(dst)
        if msg.delay == pm.ROUTE_WITHDRAWN:
            if current is not None and current.next == via:
                del self._routes[dst]
            return
        if not 0 <= msg.delay <= MAX_ROUTE_DELAY or not self._routable(dst):
            self.stats.implausible += 1
            return
        direct = self._routes.get(via)
        if direct is None or direct.next != via:
            return
        if current is None and len(self._routes) >= MAX_ROUTES:
            self.stats.implausible += 1  # table full: bounded like the peer table
            return
        self._update_route(dst, via, direct.delay + msg.delay, announce=False)

    def _routable(self, dst: bytes) -> bool:
        """Whether ``dst`` can be a member: inside our network, not its network or broadcast."""
        net = self.address.network if self.address is not None else None
        if net is None:
            return False
        ip = IPv4Address(dst)
        return ip in net and ip != net.network_address and ip != net.broadcast_address

    def _update_route(self, dst: bytes, via: bytes, delay: int, announce: bool) -> None:
        delay = min(delay, MAX_ROUTE_DELAY)
        current = self._routes.get(dst)
        if current is None or current.next == via or delay < current.delay:
            self._routes[dst] = _Route(via, delay)
        if announce and self.config.route > 0:
            self._announce(dst, min(delay + self.config.route, MAX_ROUTE_DELAY))

    def _announce(self, dst: bytes, delay: int) -> None:
        msg = pm.Route(IPv4Address(dst), IPv4Address(self._ip), delay).encode()
        for peer in self._peers.values():
            if peer.state is State.CONNECTED and peer.ip != dst:
                self._seal_to(peer, msg)

    # --- STUN ---------------------------------------------------------------------------
    def _send_stun(self) -> None:
        assert self._stun is not None
        tid = self._rng.randbytes(stun.TRANSACTION_ID_SIZE)
        self._stun.tids.append(tid)
        self._datagrams.append(
            (stun.build_binding_request(tid, change_request=True), self._stun.addr)
        )

    def _stun_answer(self, data: bytes, now: float) -> None:
        assert self._stun is not None
        try:
            tid = bytes(data[8:20])
            if tid not in self._stun.tids:
                raise StunError("unknown transaction id")
            public = stun.parse_binding_response(data, tid)
        except StunError as exc:
            log.debug("ignoring a STUN answer: %s", exc)
            return
        if public != self._stun.public:
            log.info("public UDP endpoint is %s:%d", *public)
        self._stun.public = public
        ip, port = public
        for peer in list(self._peers.values()):
            if peer.state is not State.PREPARING or peer.count <= EXCHANGE_AFTER:
                continue
            msg = m.Peer(IPv4Address(self._ip), IPv4Address(peer.ip), IPv4Address(ip), port)
            self._send_message(msg.encode())
            if peer.endpoint is not None:
                self._fire(peer, PeerEvent.SENT_PUBLIC_ENDPOINT_KNOWING_THEIRS)
            else:
                self._fire(peer, PeerEvent.SENT_PUBLIC_ENDPOINT)

    # --- the 1-second tick --------------------------------------------------------------
    def handle_timer(self, now: float) -> None:
        if not self.enabled or self._ip is None:
            return
        if self._next_tick is None:
            self._next_tick = now + TICK
        if self.config.discovery > 0:
            if self._next_discovery is None:
                self._next_discovery = now
            if now >= self._next_discovery:
                self._next_discovery = now + self.config.discovery
                msg = m.Discovery(IPv4Address(self._ip), m.BROADCAST)
                self._send_message(msg.encode())
        if now < self._next_tick:
            return
        self._next_tick = max(self._next_tick + TICK, now)
        self._tick(now)

    def _tick(self, now: float) -> None:
        need_stun = False
        for peer in list(self._peers.values()):
            peer.count += 1
            state = peer.state
            timeout = TIMEOUTS.get(state)
            if timeout is not None and peer.count > timeout[0]:
                self._fire(peer, timeout[1])
                continue
            if state is State.PREPARING:
                need_stun = need_stun or peer.count > STUN_AFTER
                if peer.lan is not None:
                    self._seal_to(peer, self._heartbeat_bytes(peer), peer.lan)
            elif state is State.CONNECTING:
                beat = self._heartbeat_bytes(peer)
                self._seal_to(peer, beat)
                if peer.lan is not None and peer.lan != peer.endpoint:
                    self._seal_to(peer, beat, peer.lan)
            elif state is State.CONNECTED:
                self._seal_to(peer, self._heartbeat_bytes(peer))
                if self.config.route > 0:
                    peer.delay_ticks += 1
                    if peer.delay_ticks >= DELAY_EVERY:
                        self._send_delay(peer, now)
            elif state is State.WAITING and peer.count >= peer.retry:
                peer.retry = min(peer.retry * 2, RETRY_MAX)
                self._fire(peer, PeerEvent.RETRY)
        if need_stun and self._stun is not None:
            self._send_stun()

    def _send_delay(self, peer: _Peer, now: float) -> None:
        peer.delay_ticks = 0
        msg = pm.Delay(IPv4Address(self._ip), IPv4Address(peer.ip), int(now * 1000))
        self._seal_to(peer, msg.encode())

    # --- state changes (the table is in peerstate.py) -----------------------------------
    def _fire(self, peer: _Peer, event: PeerEvent, **details: object) -> bool:
        """Apply ``event`` to ``peer`` as TRANSITIONS says; ``False`` if it is ignored there."""
        rule = TRANSITIONS.get((peer.state, event))
        if rule is None:
            return False
        new, reason = rule
        if reason is None:  # STAY: accepted, nothing changes
            return True
        old = peer.state
        peer.count = 0
        if new in FORGET_ENDPOINT:
            peer.endpoint = None
            peer.ack = False
            if new in FORGET_LAN:
                peer.lan = None
        if old is new:
            return True
        peer.state = new
        peer.reason = text = reason.format(**details)
        self._events.append(PeerStateChanged(IPv4Address(peer.ip), old.value, new.value, text))
        if new is State.CONNECTED:
            peer.retry = RETRY_MIN
            peer.delay_ticks = 0  # the first DELAY goes out on entry (see _heartbeat)
        elif old is State.CONNECTED:
            peer.delay_ms = None
            self._withdraw(peer.ip)
        return True

    def _withdraw(self, via: bytes) -> None:
        """``via`` left CONNECTED: drop every route through it and tell the others."""
        gone = [dst for dst, route in self._routes.items() if route.next == via]
        for dst in gone:
            del self._routes[dst]
        if self.config.route > 0 and via in gone:
            self._announce(via, pm.ROUTE_WITHDRAWN)
