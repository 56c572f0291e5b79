"""A deterministic in-memory network for whole Candy scenarios (DESIGN.md: "a simulator").

A :class:`Simulation` wires real cores together -- one :class:`~candy_core.server.RelayServer`,
any number of :class:`~candy_core.client.Client` objects and a STUN server -- over a virtual
network with a virtual clock and simulated NATs. Nothing reads the real clock or the operating
system's random source: every random choice (client and server cores, NAT ports, packet loss)
comes from :class:`random.Random` instances seeded from the simulation's ``seed``, so a
scenario replays identically and runs in milliseconds.

The pieces:

- **Clock**: :attr:`Simulation.now` starts at 0 and only moves inside :meth:`Simulation.run`
  (and :meth:`Simulation.run_until`), which process a queue of timed actions: bytes arriving
  on a "TCP" pipe, datagrams arriving, and each core's timer (``next_deadline()`` /
  ``handle_timer(now)``). The wall clock handed to the cores is ``WALL_EPOCH + now``.
- **TCP**: each client talks to the server over an in-memory pipe carrying the raw stream
  bytes (HTTP upgrade, WebSocket frames) in order, reliably, after the link's latency. The
  glue does what a shell does: it opens a pipe when ``take_connect_request()`` says so,
  closes it on ``take_close_request()`` or ``connections_to_close()``.
- **UDP**: datagrams travel between sockets identified by ``(ip, port)``. A client behind a
  :class:`Nat` has its source translated on the way out and inbound datagrams filtered per
  the NAT's kind (RFC 4787 terms). Clients behind the *same* :class:`Nat` object share a LAN
  and reach each other's ``lan_ip`` directly, untranslated. A client without a NAT sits on
  the public network with ``lan_ip`` as its public address. Datagrams to any other address
  (another LAN's private address, say) are dropped. Every link has a latency and a loss
  rate (:meth:`Simulation.set_link`); loss applies to UDP only.

A minimal scenario::

    sim = Simulation(seed=1)
    sim.add_server("secret")
    sim.add_stun()
    a = sim.add_client("a", "192.168.1.2", nat=sim.add_nat("198.51.100.1", "full_cone"))
    b = sim.add_client("b", "192.168.2.2", nat=sim.add_nat("198.51.100.2", "full_cone"))
    sim.run_until(lambda: a.connected and b.connected, timeout=5)
    a.send_packet(icmp(a.ip, b.ip, 1))
    sim.run(1)
    assert b.received
"""

from __future__ import annotations

import heapq
import random
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, ip_address
from typing import Any

from candy_core.client import Client, ClientState, new_vmac
from candy_core.config import ClientConfig, ServerConfig
from candy_core.events import ClientEvent, PeerStateChanged, ServerEvent
from candy_core.peers import PeerStatus
from candy_core.server import RelayServer
from candy_core.stun import BINDING_REQUEST, build_binding_response, looks_like_stun

__all__ = [
    "DEFAULT_LATENCY",
    "NAT_KINDS",
    "WALL_EPOCH",
    "Nat",
    "SimClient",
    "Simulation",
    "icmp",
    "icmp_seq",
]

Addr = tuple[str, int]

#: The wall clock handed to the cores is ``WALL_EPOCH + now`` (Unix seconds).
WALL_EPOCH = 1_800_000_000
#: One-way latency of every link unless :meth:`Simulation.set_link` says otherwise (seconds).
DEFAULT_LATENCY = 0.005
#: The NAT behaviours :meth:`Simulation.add_nat` knows (RFC 4787 mapping and filtering).
NAT_KINDS = ("full_cone", "address_restricted", "port_restricted", "symmetric")
#: Name of the relay server and the STUN server in links and datagram counters.
SERVER = "server"
STUN = "stun"
#: Smallest step between two timer firings of one core (guards against a core that asks to
#: be woken "now" again right after handling its timer).
_MIN_TIMER_STEP = 0.001


# --- packets --------------------------------------------------------------------------------
def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp(
    src: str | IPv4Address, dst: str | IPv4Address, seq: int, payload: bytes = b"candy-sim"
) -> bytes:
    """An IPv4 ICMP echo request from ``src`` to ``dst`` with sequence number ``seq``.

    Header and ICMP checksums are valid, so the packet could be written to a real TUN device.
    """
    body = struct.pack("!BBHHH", 8, 0, 0, 0x4341, seq & 0xFFFF) + payload
    body = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(body),
        seq & 0xFFFF,
        0,
        64,
        1,
        0,
        IPv4Address(str(src)).packed,
        IPv4Address(str(dst)).packed,
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + body


def icmp_seq(packet: bytes) -> int | None:
    """The sequence number of an ICMP echo built by :func:`icmp`, or ``None``."""
    if len(packet) < 28 or packet[0] != 0x45 or packet[9] != 1 or packet[20] != 8:
        return None
    return int.from_bytes(packet[26:28], "big")


# --- NAT ------------------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class _Mapping:
    internal: Addr
    port: int
    #: Remote addresses the internal host has sent to through this mapping.
    permitted: set[Addr] = field(default_factory=set)
    permitted_ips: set[str] = field(default_factory=set)


class Nat:
    """A simulated NAT in front of one LAN, with RFC 4787 mapping and filtering behaviour.

    ``kind`` is one of :data:`NAT_KINDS`:

    - ``full_cone``: endpoint-independent mapping and filtering (anyone may send to a mapping);
    - ``address_restricted``: endpoint-independent mapping, inbound only from remote IPs the
      internal host has sent to;
    - ``port_restricted``: endpoint-independent mapping, inbound only from remote ``ip:port``
      pairs the internal host has sent to;
    - ``symmetric``: a new public port per destination ``ip:port``, inbound only from that
      destination.

    Public ports are allocated sequentially from a random base. Mappings never expire on
    their own; :meth:`rebind` drops them all and moves the port base (NAT rebinding).
    ``hairpin`` says whether a datagram from the LAN to the NAT's own public address is
    looped back in (off by default, so clients on one LAN must use their LAN endpoints).
    """

    def __init__(self, public_ip: str, kind: str, rng: random.Random, hairpin: bool = False):
        if kind not in NAT_KINDS:
            raise ValueError(f"unknown NAT kind {kind!r}: expected one of {', '.join(NAT_KINDS)}")
        self.public_ip = str(IPv4Address(public_ip))
        self.kind = kind
        self.hairpin = hairpin
        #: The clients on this NAT's LAN, by LAN address.
        self.hosts: dict[str, SimClient] = {}
        self.rebinds = 0
        self._rng = rng
        self._next_port = rng.randrange(20000, 40000)
        self._mappings: dict[tuple[Any, ...], _Mapping] = {}
        self._by_port: dict[int, _Mapping] = {}

    def __repr__(self) -> str:
        return f"Nat({self.public_ip!r}, {self.kind!r})"

    @property
    def mappings(self) -> dict[Addr, list[int]]:
        """Public ports currently mapped, per internal ``(ip, port)``."""
        result: dict[Addr, list[int]] = {}
        for mapping in self._by_port.values():
            result.setdefault(mapping.internal, []).append(mapping.port)
        return result

    def outbound(self, internal: Addr, remote: Addr) -> Addr:
        """Translate a datagram from ``internal`` to ``remote``; returns the public source."""
        key: tuple[Any, ...] = (internal, remote) if self.kind == "symmetric" else (internal,)
        mapping = self._mappings.get(key)
        if mapping is None:
            port = self._allocate()
            mapping = self._mappings[key] = self._by_port[port] = _Mapping(internal, port)
        mapping.permitted.add(remote)
        mapping.permitted_ips.add(remote[0])
        return self.public_ip, mapping.port

    def inbound(self, remote: Addr, port: int) -> Addr | None:
        """The internal address a datagram from ``remote`` to public ``port`` goes to, if any."""
        mapping = self._by_port.get(port)
        if mapping is None:
            return None
        if self.kind == "full_cone":
            return mapping.internal
        if self.kind == "address_restricted":
            return mapping.internal if remote[0] in mapping.permitted_ips else None
        return mapping.internal if remote in mapping.permitted else None

    def rebind(self) -> None:
        """Forget every mapping; later datagrams get new public ports."""
        self._mappings.clear()
        self._by_port.clear()
        self._next_port += 1000 + self._rng.randrange(1000)
        self.rebinds += 1

    def _allocate(self) -> int:
        while True:
            port = self._next_port
            self._next_port += 1
            if self._next_port > 65535:
                self._next_port = 1024
            if port not in self._by_port:
                return port


# --- clients --------------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class _Pipe:
    """One in-memory "TCP" connection between a client and the server."""

    cid: str
    client: SimClient
    client_open: bool = True
    server_open: bool = True
    #: Arrival time of the last bytes scheduled in each direction (keeps the stream in order).
    up_last: float = 0.0
    down_last: float = 0.0


@dataclass(eq=False, slots=True)
class _Timer:
    at: float | None = None
    generation: int = 0
    last_fired: float = -1.0


class SimClient:
    """One client in a :class:`Simulation`: the core plus what a shell would hold.

    ``core`` is the real :class:`~candy_core.client.Client`. Packets the core delivers to TUN
    are appended to :attr:`received`; events go to :attr:`events` as ``(time, event)``.
    """

    def __init__(
        self,
        sim: Simulation,
        name: str,
        lan_ip: str,
        nat: Nat | None,
        udp_port: int,
        core: Client,
    ) -> None:
        self.sim = sim
        self.name = name
        self.lan_ip = lan_ip
        self.nat = nat
        self.udp_port = udp_port
        self.core = core
        #: IPv4 packets the core wrote to its (virtual) TUN device, in order.
        self.received: list[bytes] = []
        #: Every event of the core with the virtual time it was produced.
        self.events: list[tuple[float, ClientEvent]] = []
        #: When ``True``, every datagram delivered to this client is appended to
        #: :attr:`captured` as ``(data, source address)``.
        self.capture = False
        self.captured: list[tuple[bytes, Addr]] = []
        #: ``True`` while :meth:`Simulation.cut_udp` is in force for this client.
        self.udp_cut = False
        self._pipe: _Pipe | None = None
        self._timer = _Timer()

    def __repr__(self) -> str:
        return f"SimClient({self.name!r}, ip={self.ip})"

    # --- what a user looks at ---------------------------------------------------------------
    @property
    def ip(self) -> IPv4Address | None:
        """The client's virtual address (``None`` until the server assigned one)."""
        address = self.core.address
        return address.ip if address is not None else None

    @property
    def connected(self) -> bool:
        """Whether the client has joined the network (WebSocket open, AUTH sent)."""
        return self.core.authenticated

    @property
    def udp_addr(self) -> Addr:
        """The client's UDP socket address on its own LAN (its public one without a NAT)."""
        return self.lan_ip, self.udp_port

    def send_packet(self, packet: bytes) -> None:
        """Inject ``packet`` as if read from the client's TUN device, now."""
        self.core.receive_packet(packet, self.sim.now)
        self.sim._service_client(self)

    def peer_status(self, other: SimClient | IPv4Address | str) -> PeerStatus | None:
        """This client's view of the direct path to ``other``, or ``None`` if not tracked."""
        ip = self.sim._virtual_ip(other)
        for status in self.core.peers.peer_status():
            if status.ip == ip:
                return status
        return None

    def peer_state(self, other: SimClient | IPv4Address | str) -> str:
        """State of the direct path to ``other`` (PROTOCOL.md 4.4); ``INIT`` if not tracked."""
        status = self.peer_status(other)
        return status.state if status is not None else "INIT"

    def state_changes(
        self, other: SimClient | IPv4Address | str | None = None
    ) -> list[tuple[float, PeerStateChanged]]:
        """The :class:`PeerStateChanged` events so far (for ``other`` only, if given)."""
        ip = self.sim._virtual_ip(other) if other is not None else None
        return [
            (t, ev)
            for t, ev in self.events
            if isinstance(ev, PeerStateChanged) and (ip is None or ev.ip == ip)
        ]


@dataclass(slots=True)
class _Link:
    latency: float
    loss: float


# --- the simulation -------------------------------------------------------------------------
class Simulation:
    """Cores wired together over a virtual network, driven by a virtual clock.

    ``seed`` determines every random choice; ``latency`` (seconds, one way) and ``loss``
    (probability a datagram is dropped, 0..1) are the defaults for every link.
    """

    def __init__(self, seed: int = 0, latency: float = DEFAULT_LATENCY, loss: float = 0.0) -> None:
        self.seed = seed
        #: Virtual monotonic time in seconds.
        self.now = 0.0
        self.clients: dict[str, SimClient] = {}
        self.nats: list[Nat] = []
        #: The relay server core (``None`` before :meth:`add_server` and while stopped).
        self.server: RelayServer | None = None
        self.server_config: ServerConfig | None = None
        #: Server events with the virtual time they were produced.
        self.server_events: list[tuple[float, ServerEvent]] = []
        #: The STUN server's address (``None`` before :meth:`add_stun`).
        self.stun: Addr | None = None
        #: Datagrams delivered, per ``(sender name, receiver name)``; the STUN server is
        #: ``"stun"``. Only datagrams that reached their socket are counted.
        self.datagrams: Counter[tuple[str, str]] = Counter()
        #: Datagrams dropped: by loss, cut UDP, NAT filtering or an unreachable address.
        self.datagrams_dropped = 0
        self._default = _Link(latency, loss)
        self._links: dict[frozenset[str], _Link] = {}
        self._net_rng = self._rng("net")
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._pipes: dict[str, _Pipe] = {}
        self._pipe_count = 0
        self._server_generation = 0
        self._server_timer = _Timer()
        self._relayed_before = 0
        self._public: dict[str, SimClient] = {}
        self._nat_by_ip: dict[str, Nat] = {}

    # --- building the world -----------------------------------------------------------------
    @property
    def wall(self) -> float:
        """The wall clock (Unix seconds) handed to the cores: ``WALL_EPOCH + now``."""
        return WALL_EPOCH + self.now

    def _rng(self, purpose: str) -> random.Random:
        return random.Random(f"candy-sim/{self.seed}/{purpose}")

    def add_server(
        self, password: str = "", dhcp: str | None = "10.99.0.0/24", **config: Any
    ) -> RelayServer:
        """Start the relay server; ``config`` goes to :class:`ServerConfig`."""
        if self.server_config is not None:
            raise RuntimeError("the simulation already has a server")
        self.server_config = ServerConfig.from_strings(password, dhcp, **config)
        self.start_server()
        assert self.server is not None
        return self.server

    def add_stun(self, ip: str = "203.0.113.100", port: int = 3478) -> Addr:
        """Put a STUN server on the public network; clients added later use it."""
        ip = str(IPv4Address(ip))
        self._check_public_ip(ip)
        self.stun = (ip, port)
        return self.stun

    def add_nat(self, public_ip: str, kind: str = "port_restricted", hairpin: bool = False) -> Nat:
        """A NAT with public address ``public_ip`` and behaviour ``kind`` (see :class:`Nat`)."""
        public_ip = str(IPv4Address(public_ip))
        self._check_public_ip(public_ip)
        nat = Nat(public_ip, kind, self._rng(f"nat/{public_ip}"), hairpin)
        self.nats.append(nat)
        self._nat_by_ip[public_ip] = nat
        return nat

    def add_client(
        self,
        name: str,
        lan_ip: str,
        nat: Nat | None = None,
        udp_port: int = 0,
        **config: Any,
    ) -> SimClient:
        """Add and start a client.

        ``lan_ip`` is its address on the LAN behind ``nat``, or its public address when
        ``nat`` is ``None``. ``udp_port`` is the port its UDP socket binds (0: a random one).
        ``config`` goes to :class:`ClientConfig`; by default the client uses the server's
        password, the simulation's STUN server (if any; pass ``stun=None`` to disable P2P)
        and announces ``lan_ip`` as its LAN address (``localhost``).
        """
        if name in self.clients or name in (SERVER, STUN):
            raise ValueError(f"client name {name!r} is taken")
        lan_ip = str(IPv4Address(lan_ip))
        if nat is None:
            self._check_public_ip(lan_ip)
        elif lan_ip in nat.hosts:
            raise ValueError(f"{lan_ip} is already used on the LAN behind {nat.public_ip}")
        if self.server_config is not None:
            config.setdefault("password", self.server_config.password)
        config.setdefault("host", "candy.sim")
        config.setdefault("stun", self.stun)
        config.setdefault("localhost", lan_ip)
        if isinstance(config.get("tun"), str):
            config["tun"] = IPv4Interface(config["tun"])
        rng = self._rng(f"client/{name}")
        if not udp_port:
            udp_port = self._rng(f"port/{name}").randrange(30000, 60000)
        core = Client(ClientConfig(**config), rng, ClientState(new_vmac(rng)))
        client = SimClient(self, name, lan_ip, nat, udp_port, core)
        self.clients[name] = client
        if nat is None:
            self._public[lan_ip] = client
        else:
            nat.hosts[lan_ip] = client
        core.udp_bound(udp_port)
        core.start(self.now)
        self._service_client(client)
        return client

    def set_link(
        self,
        a: SimClient | str,
        b: SimClient | str,
        latency: float | None = None,
        loss: float | None = None,
    ) -> None:
        """Set the one-way latency and/or UDP loss between ``a`` and ``b`` (both directions).

        Endpoints are clients (or their names), ``"server"`` or ``"stun"``.
        """
        key = frozenset((self._name(a), self._name(b)))
        current = self._links.get(key, self._default)
        self._links[key] = _Link(
            current.latency if latency is None else latency,
            current.loss if loss is None else loss,
        )

    def _check_public_ip(self, ip: str) -> None:
        if ip in self._public or ip in self._nat_by_ip or (self.stun and self.stun[0] == ip):
            raise ValueError(f"public address {ip} is already in use")

    def _name(self, node: SimClient | str) -> str:
        return node.name if isinstance(node, SimClient) else node

    def _link(self, a: str, b: str) -> _Link:
        return self._links.get(frozenset((a, b)), self._default)

    def _virtual_ip(self, other: SimClient | IPv4Address | str) -> IPv4Address | None:
        if isinstance(other, SimClient):
            return other.ip
        if isinstance(other, str) and other in self.clients:
            return self.clients[other].ip
        return IPv4Address(str(ip_address(str(other))))

    # --- faults -----------------------------------------------------------------------------
    def cut_udp(self, client: SimClient) -> None:
        """Drop every datagram from or to ``client`` (its WebSocket keeps working)."""
        client.udp_cut = True

    def restore_udp(self, client: SimClient) -> None:
        """Undo :meth:`cut_udp`."""
        client.udp_cut = False

    def rebind_nat(self, nat: Nat) -> None:
        """NAT rebinding: ``nat`` forgets its mappings; traffic continues on new public ports."""
        nat.rebind()

    def stop_server(self) -> None:
        """Crash the relay server: every connection is reset, its state is gone."""
        server = self.server
        if server is None:
            return
        self._relayed_before += server.stats.frames_relayed
        self.server = None
        self._server_timer.generation += 1
        self._server_timer.at = None
        for pipe in list(self._pipes.values()):
            pipe.server_open = False
            self._close_to_client(pipe, "connection reset by the server")
        self._pipes.clear()

    def start_server(self) -> None:
        """Start (or restart) the relay server with the configuration of :meth:`add_server`."""
        if self.server is not None:
            return
        if self.server_config is None:
            raise RuntimeError("add_server() first")
        self._server_generation += 1
        self.server = RelayServer(
            self.server_config, self._rng(f"server/{self._server_generation}")
        )
        self._service_server()

    @property
    def frames_relayed(self) -> int:
        """Frames relayed by the server, over all its runs (``RelayServer.stats``)."""
        current = self.server.stats.frames_relayed if self.server is not None else 0
        return self._relayed_before + current

    def delivered(self, a: SimClient | str, b: SimClient | str) -> int:
        """Datagrams delivered from ``a`` to ``b`` so far."""
        return self.datagrams[self._name(a), self._name(b)]

    def inject_datagram(self, client: SimClient, data: bytes, src: Addr) -> None:
        """Hand ``data`` to ``client``'s UDP socket now, as if it came from ``src``."""
        client.core.receive_datagram(data, src, self.now)
        self._service_client(client)

    # --- running ----------------------------------------------------------------------------
    def run(self, seconds: float) -> None:
        """Advance the clock by ``seconds``, processing everything due in that time."""
        self._run_to(self.now + seconds)

    def run_until(self, condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
        """Run in ``step`` increments until ``condition()`` holds (``True``) or ``timeout``."""
        end = self.now + timeout
        while not condition():
            if self.now >= end:
                return False
            self._run_to(min(end, self.now + step))
        return True

    def _run_to(self, end: float) -> None:
        queue = self._queue
        while queue and queue[0][0] <= end:
            at, _, action = heapq.heappop(queue)
            self.now = max(self.now, at)
            action()
        self.now = max(self.now, end)

    def _at(self, at: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, action))

    # --- shell glue: timers -----------------------------------------------------------------
    def _arm(self, timer: _Timer, deadline: float | None, fire: Callable[[int], None]) -> None:
        if deadline is None:
            timer.at = None
            return
        deadline = max(deadline, self.now)
        if deadline <= timer.last_fired:
            deadline = timer.last_fired + _MIN_TIMER_STEP
        if timer.at == deadline:
            return
        timer.at = deadline
        timer.generation += 1
        generation = timer.generation
        self._at(deadline, lambda: fire(generation))

    def _fire_client(self, client: SimClient, generation: int) -> None:
        timer = client._timer
        if generation != timer.generation or client.name not in self.clients:
            return
        timer.at = None
        timer.last_fired = self.now
        client.core.handle_timer(self.now)
        self._service_client(client)

    def _fire_server(self, generation: int) -> None:
        timer = self._server_timer
        if generation != timer.generation or self.server is None:
            return
        timer.at = None
        timer.last_fired = self.now
        self.server.handle_timer(self.now)
        self._service_server()

    # --- shell glue: flushing the cores -----------------------------------------------------
    def _service_client(self, client: SimClient) -> None:
        core = client.core
        while (event := core.next_event()) is not None:
            client.events.append((self.now, event))
        data = core.data_to_send()
        pipe = client._pipe
        if data and pipe is not None and pipe.client_open:
            self._send_up(pipe, data)
        for datagram, addr in core.datagrams_to_send():
            self._send_udp(client, datagram, addr)
        client.received.extend(core.packets_to_deliver())
        if core.take_close_request() and pipe is not None and pipe.client_open:
            pipe.client_open = False
            client._pipe = None
            self._close_to_server(pipe)
        if core.take_connect_request():
            self._connect(client)
        self._arm(
            client._timer,
            core.next_deadline(),
            lambda generation: self._fire_client(client, generation),
        )

    def _service_server(self) -> None:
        server = self.server
        if server is None:
            return
        while (event := server.next_event()) is not None:
            self.server_events.append((self.now, event))
        for cid, data in server.data_to_send():
            pipe = self._pipes.get(str(cid))
            if pipe is not None and pipe.server_open:
                self._send_down(pipe, data)
        for cid in server.connections_to_close():
            pipe = self._pipes.pop(str(cid), None)
            if pipe is not None and pipe.server_open:
                pipe.server_open = False
                self._close_to_client(pipe, "connection closed by the server")
        self._arm(self._server_timer, server.next_deadline(), self._fire_server)

    # --- the "TCP" pipes --------------------------------------------------------------------
    def _connect(self, client: SimClient) -> None:
        latency = self._link(client.name, SERVER).latency
        self._at(self.now + latency, lambda: self._established(client))

    def _established(self, client: SimClient) -> None:
        server = self.server
        if server is None:
            client.core.connection_failed(self.now, "connection refused")
            self._service_client(client)
            return
        self._pipe_count += 1
        pipe = _Pipe(f"{client.name}#{self._pipe_count}", client)
        self._pipes[pipe.cid] = pipe
        client._pipe = pipe
        server.connection_made(pipe.cid, self.now, client.name)
        client.core.connection_made(self.now)
        self._service_server()
        self._service_client(client)

    def _send_up(self, pipe: _Pipe, data: bytes) -> None:
        at = max(self.now + self._link(pipe.client.name, SERVER).latency, pipe.up_last)
        pipe.up_last = at

        def arrive() -> None:
            if pipe.server_open and self.server is not None:
                self.server.receive_data(pipe.cid, data, self.now, self.wall)
                self._service_server()

        self._at(at, arrive)

    def _send_down(self, pipe: _Pipe, data: bytes) -> None:
        at = max(self.now + self._link(pipe.client.name, SERVER).latency, pipe.down_last)
        pipe.down_last = at

        def arrive() -> None:
            if pipe.client_open:
                pipe.client.core.receive_data(data, self.now, self.wall)
                self._service_client(pipe.client)

        self._at(at, arrive)

    def _close_to_server(self, pipe: _Pipe) -> None:
        at = max(self.now + self._link(pipe.client.name, SERVER).latency, pipe.up_last)
        pipe.up_last = at

        def arrive() -> None:
            if pipe.server_open:
                pipe.server_open = False
                self._pipes.pop(pipe.cid, None)
                if self.server is not None:
                    self.server.connection_lost(pipe.cid, "connection closed by the client")
                    self._service_server()

        self._at(at, arrive)

    def _close_to_client(self, pipe: _Pipe, reason: str) -> None:
        at = max(self.now + self._link(pipe.client.name, SERVER).latency, pipe.down_last)
        pipe.down_last = at

        def arrive() -> None:
            if pipe.client_open:
                pipe.client_open = False
                client = pipe.client
                if client._pipe is pipe:
                    client._pipe = None
                client.core.connection_lost(self.now, reason)
                self._service_client(client)

        self._at(at, arrive)

    # --- UDP --------------------------------------------------------------------------------
    def _send_udp(self, sender: SimClient, data: bytes, dst: Addr) -> None:
        if sender.udp_cut:
            self.datagrams_dropped += 1
            return
        src: Addr = sender.udp_addr
        nat = sender.nat
        if nat is not None:
            neighbour = nat.hosts.get(dst[0])
            if neighbour is not None:  # same LAN: no translation
                self._transmit(sender.name, neighbour.name, data, src, dst, lan=nat)
                return
            if dst[0] == nat.public_ip and not nat.hairpin:
                self.datagrams_dropped += 1
                return
            src = nat.outbound(src, dst)
        self._transmit(sender.name, self._resolve(dst), data, src, dst)

    def _resolve(self, dst: Addr) -> str | None:
        """Name of the node that ``dst`` on the public network leads to (ignoring filters)."""
        if dst == self.stun:
            return STUN
        host = self._public.get(dst[0])
        if host is not None:
            return host.name
        nat = self._nat_by_ip.get(dst[0])
        if nat is not None:
            mapping = nat._by_port.get(dst[1])
            if mapping is not None:
                inside = nat.hosts.get(mapping.internal[0])
                return inside.name if inside is not None else None
        return None

    def _transmit(
        self,
        sender: str,
        receiver: str | None,
        data: bytes,
        src: Addr,
        dst: Addr,
        lan: Nat | None = None,
    ) -> None:
        if receiver is None:
            self.datagrams_dropped += 1
            return
        link = self._link(sender, receiver)
        if link.loss > 0 and self._net_rng.random() < link.loss:
            self.datagrams_dropped += 1
            return
        self._at(self.now + link.latency, lambda: self._arrive(sender, data, src, dst, lan))

    def _arrive(self, sender: str, data: bytes, src: Addr, dst: Addr, lan: Nat | None) -> None:
        if lan is not None:
            target = lan.hosts.get(dst[0])
        elif dst == self.stun:
            self.datagrams[sender, STUN] += 1
            self._stun_answer(data, src)
            return
        elif dst[0] in self._public:
            target = self._public[dst[0]]
        elif dst[0] in self._nat_by_ip:
            nat = self._nat_by_ip[dst[0]]
            internal = nat.inbound(src, dst[1])
            target = nat.hosts.get(internal[0]) if internal else None
            if target is not None and internal is not None:
                dst = internal
        else:
            target = None
        if target is None or target.udp_cut or target.udp_port != dst[1]:
            self.datagrams_dropped += 1
            return
        self.datagrams[sender, target.name] += 1
        if target.capture:
            target.captured.append((data, src))
        target.core.receive_datagram(data, src, self.now)
        self._service_client(target)

    def _stun_answer(self, data: bytes, src: Addr) -> None:
        if not looks_like_stun(data) or int.from_bytes(data[:2], "big") != BINDING_REQUEST:
            return
        assert self.stun is not None
        reply = build_binding_response(bytes(data[8:20]), src[0], src[1])
        self._transmit(STUN, self._resolve(src), reply, self.stun, src)
