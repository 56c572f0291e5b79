"""The simulation: real cores driven by a virtual clock over the virtual network.

:class:`Simulation` builds the world (server, STUN server, NATs, clients), injects faults
and runs the clock; :class:`SimClient` is one client as a user of the simulation sees it.
Between them sits what a shell would do: drain each core after every input
(:mod:`candy_core.drain`, with a sink that feeds the virtual network) and arm its timer.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable, Hashable
from ipaddress import IPv4Address, IPv4Interface, ip_address
from typing import Any

from candy_core.client import Client, ClientState, new_vmac
from candy_core.config import ClientConfig, ServerConfig
from candy_core.drain import drain_client, drain_server
from candy_core.events import ClientEvent, PeerStateChanged, ServerEvent
from candy_core.icmp import ECHO_REPLY, ECHO_REQUEST, parse_echo
from candy_core.icmp import echo as icmp_echo
from candy_core.peers import PeerStatus
from candy_core.server import RelayServer
from candy_core.sim.nat import Addr, Nat
from candy_core.sim.network import (
    DEFAULT_LATENCY,
    SERVER,
    STUN,
    WALL_EPOCH,
    Clock,
    Network,
    Pipe,
    Timer,
)
from candy_core.status import ClientStatus

__all__ = ["SimClient", "Simulation"]


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
        #: When ``True``, ICMP echo requests to this client are answered as a kernel would
        #: (the reply goes back in through the core, like a packet read from TUN).
        self.answer_pings = False
        self._pipe: Pipe | None = None
        self._timer = Timer()
        self._sink = _ClientSink(sim, self)

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

    def ping(self, other: SimClient | IPv4Address | str) -> int | None:
        """Send an ICMP echo to ``other`` as ``candy ping`` does; the answer is a PingReply
        event in :attr:`events`. Returns the sequence number (None before joining)."""
        ip = self.sim._virtual_ip(other)
        if ip is None:
            return None
        seq = self.core.ping(ip, self.sim.now)
        self.sim._service_client(self)
        return seq

    def status(self) -> ClientStatus:
        """What ``candy status`` would show for this client now."""
        return self.core.status(self.sim.now, self.sim.wall, "ws://candy.sim/")

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


class Simulation:
    """Cores wired together over a virtual network, driven by a virtual clock.

    ``seed`` determines every random choice; ``latency`` (seconds, one way) and ``loss``
    (probability a datagram is dropped, 0..1) are the defaults for every link.
    """

    def __init__(self, seed: int = 0, latency: float = DEFAULT_LATENCY, loss: float = 0.0) -> None:
        self.seed = seed
        self.clients: dict[str, SimClient] = {}
        self.nats: list[Nat] = []
        #: The relay server core (``None`` before :meth:`add_server` and while stopped).
        self.server: RelayServer | None = None
        self.server_config: ServerConfig | None = None
        #: Server events with the virtual time they were produced.
        self.server_events: list[tuple[float, ServerEvent]] = []
        self._clock = Clock()
        self._network = Network(self._clock, self._rng("net"), latency, loss, self.inject_datagram)
        self._pipes: dict[str, Pipe] = {}
        self._pipe_count = 0
        self._server_generation = 0
        self._server_timer = Timer()
        self._server_sink = _ServerSink(self)
        self._relayed_before = 0

    # --- what a user looks at ---------------------------------------------------------------
    @property
    def now(self) -> float:
        """Virtual monotonic time in seconds (starts at 0)."""
        return self._clock.now

    @property
    def wall(self) -> float:
        """The wall clock (Unix seconds) handed to the cores: ``WALL_EPOCH + now``."""
        return WALL_EPOCH + self._clock.now

    @property
    def stun(self) -> Addr | None:
        """The STUN server's address (``None`` before :meth:`add_stun`)."""
        return self._network.stun

    @property
    def datagrams(self) -> Counter[tuple[str, str]]:
        """Datagrams delivered, per ``(sender name, receiver name)``; the STUN server is
        ``"stun"``. Only datagrams that reached their socket are counted."""
        return self._network.datagrams

    @property
    def datagrams_dropped(self) -> int:
        """Datagrams dropped: by loss, cut UDP, NAT filtering or an unreachable address."""
        return self._network.dropped

    @property
    def frames_relayed(self) -> int:
        """Frames relayed by the server, over all its runs (``RelayServer.stats``)."""
        current = self.server.stats.frames_relayed if self.server is not None else 0
        return self._relayed_before + current

    def delivered(self, a: SimClient | str, b: SimClient | str) -> int:
        """Datagrams delivered from ``a`` to ``b`` so far."""
        return self._network.datagrams[self._name(a), self._name(b)]

    # --- building the world -----------------------------------------------------------------
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
        addr = (str(IPv4Address(ip)), port)
        self._network.add_stun(addr)
        return addr

    def add_nat(self, public_ip: str, kind: str = "port_restricted", hairpin: bool = False) -> Nat:
        """A NAT with public address ``public_ip`` and behaviour ``kind`` (see :class:`Nat`)."""
        public_ip = str(IPv4Address(public_ip))
        self._network.check_public_ip(public_ip)
        nat = Nat(public_ip, kind, self._rng(f"nat/{public_ip}"), hairpin)
        self._network.add_nat(nat)
        self.nats.append(nat)
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
            self._network.check_public_ip(lan_ip)
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
        self._network.add_host(client)
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
        self._network.set_link(self._name(a), self._name(b), latency, loss)

    def _name(self, node: SimClient | str) -> str:
        return node.name if isinstance(node, SimClient) else node

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
        self._server_timer.cancel()
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

    def inject_datagram(self, client: SimClient, data: bytes, src: Addr) -> None:
        """Hand ``data`` to ``client``'s UDP socket now, as if it came from ``src``."""
        client.core.receive_datagram(data, src, self._clock.now)
        self._service_client(client)

    # --- running ----------------------------------------------------------------------------
    def run(self, seconds: float) -> None:
        """Advance the clock by ``seconds``, processing everything due in that time."""
        self._clock.run_to(self._clock.now + seconds)

    def run_until(self, condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
        """Run in ``step`` increments until ``condition()`` holds (``True``) or ``timeout``."""
        clock = self._clock
        end = clock.now + timeout
        while not condition():
            if clock.now >= end:
                return False
            clock.run_to(min(end, clock.now + step))
        return True

    # --- shell glue: draining the cores and arming their timers -----------------------------
    def _service_client(self, client: SimClient) -> None:
        sink = client._sink
        self._clock.arm(client._timer, drain_client(client.core, sink), sink.fire)

    def _service_server(self) -> None:
        server = self.server
        if server is None:
            return
        sink = self._server_sink
        self._clock.arm(self._server_timer, drain_server(server, sink), sink.fire)

    # --- the "TCP" pipes --------------------------------------------------------------------
    def _connect(self, client: SimClient) -> None:
        latency = self._network.link(client.name, SERVER).latency
        self._clock.at(self.now + latency, lambda: self._established(client))

    def _established(self, client: SimClient) -> None:
        server = self.server
        if server is None:
            client.core.connection_failed(self.now, "connection refused")
            self._service_client(client)
            return
        self._pipe_count += 1
        pipe = Pipe(f"{client.name}#{self._pipe_count}", client)
        self._pipes[pipe.cid] = pipe
        client._pipe = pipe
        server.connection_made(pipe.cid, self.now, client.name)
        client.core.connection_made(self.now)
        self._service_server()
        self._service_client(client)

    def _send_up(self, pipe: Pipe, data: bytes) -> None:
        def arrive() -> None:
            if pipe.server_open and self.server is not None:
                self.server.receive_data(pipe.cid, data, self.now, self.wall)
                self._service_server()

        self._network.pipe_up(pipe, arrive)

    def _send_down(self, pipe: Pipe, data: bytes) -> None:
        def arrive() -> None:
            if pipe.client_open:
                pipe.client.core.receive_data(data, self.now, self.wall)
                self._service_client(pipe.client)

        self._network.pipe_down(pipe, arrive)

    def _close_to_server(self, pipe: Pipe) -> None:
        def arrive() -> None:
            if pipe.server_open:
                pipe.server_open = False
                self._pipes.pop(pipe.cid, None)
                if self.server is not None:
                    self.server.connection_lost(pipe.cid, "connection closed by the client")
                    self._service_server()

        self._network.pipe_up(pipe, arrive)

    def _close_to_client(self, pipe: Pipe, reason: str) -> None:
        def arrive() -> None:
            if pipe.client_open:
                pipe.client_open = False
                client = pipe.client
                if client._pipe is pipe:
                    client._pipe = None
                client.core.connection_lost(self.now, reason)
                self._service_client(client)

        self._network.pipe_down(pipe, arrive)


class _ClientSink:
    """Carries one client core's outputs into the simulation (a :class:`ClientSink`)."""

    __slots__ = ("client", "sim")

    def __init__(self, sim: Simulation, client: SimClient) -> None:
        self.sim = sim
        self.client = client

    def write_server(self, data: bytes) -> None:
        pipe = self.client._pipe
        if pipe is not None and pipe.client_open:
            self.sim._send_up(pipe, data)

    def close_server(self) -> None:
        client = self.client
        pipe = client._pipe
        if pipe is not None and pipe.client_open:
            pipe.client_open = False
            client._pipe = None
            self.sim._close_to_server(pipe)

    def deliver_packets(self, packets: list[bytes]) -> None:
        client = self.client
        client.received.extend(packets)
        if client.answer_pings:
            for packet in packets:
                echo = parse_echo(packet)
                if echo is not None and echo.kind == ECHO_REQUEST:
                    reply = icmp_echo(echo.dst, echo.src, echo.ident, echo.seq, b"", ECHO_REPLY)
                    self.sim._clock.at(self.sim.now, functools.partial(client.send_packet, reply))

    def send_datagrams(self, datagrams: list[tuple[bytes, Addr]]) -> None:
        send = self.sim._network.send_datagram
        client = self.client
        for datagram, addr in datagrams:
            send(client, datagram, addr)

    def handle_event(self, event: ClientEvent) -> None:
        self.client.events.append((self.sim.now, event))

    def open_connection(self) -> None:
        self.sim._connect(self.client)

    def fire(self) -> None:
        """The client's timer is due."""
        client = self.client
        client.core.handle_timer(self.sim.now)
        self.sim._service_client(client)


class _ServerSink:
    """Carries the relay server core's outputs into the simulation (a :class:`ServerSink`)."""

    __slots__ = ("sim",)

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    def write_connection(self, cid: Hashable, data: bytes) -> None:
        pipe = self.sim._pipes.get(str(cid))
        if pipe is not None and pipe.server_open:
            self.sim._send_down(pipe, data)

    def close_connection(self, cid: Hashable) -> None:
        pipe = self.sim._pipes.pop(str(cid), None)
        if pipe is not None and pipe.server_open:
            pipe.server_open = False
            self.sim._close_to_client(pipe, "connection closed by the server")

    def handle_event(self, event: ServerEvent) -> None:
        self.sim.server_events.append((self.sim.now, event))

    def fire(self) -> None:
        """The server's timer is due."""
        server = self.sim.server
        if server is not None:
            server.handle_timer(self.sim.now)
            self.sim._service_server()
