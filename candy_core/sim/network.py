"""The virtual clock and network of a :class:`~candy_core.sim.Simulation`.

- :class:`Clock`: virtual monotonic time and the queue of actions due at given times; core
  timers are armed on it.
- :class:`Network`: links with latency and UDP loss, the public address space with its
  NATs and STUN server, UDP routing (translation and filtering by :class:`Nat`), and the
  timing of the in-order "TCP" pipes between clients and the relay server.

Neither touches a core: what arrives is handed to callbacks of the simulation.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from candy_core.sim.nat import Addr, Nat
from candy_core.stun import BINDING_REQUEST, build_binding_response, looks_like_stun

if TYPE_CHECKING:
    from candy_core.sim.simulation import SimClient

__all__ = [
    "DEFAULT_LATENCY",
    "SERVER",
    "STUN",
    "WALL_EPOCH",
    "Clock",
    "Link",
    "Network",
    "Pipe",
    "Timer",
]

#: The wall clock handed to the cores is ``WALL_EPOCH + now`` (Unix seconds).
WALL_EPOCH = 1_800_000_000
#: One-way latency of every link unless :meth:`Simulation.set_link` says otherwise (seconds).
DEFAULT_LATENCY = 0.005
#: Name of the relay server and the STUN server in links and datagram counters.
SERVER = "server"
STUN = "stun"
#: Smallest step between two timer firings of one core (guards against a core that asks to
#: be woken "now" again right after handling its timer).
MIN_TIMER_STEP = 0.001


# --- time -----------------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class Timer:
    """One core's timer: when it is armed for, and which arming is current."""

    at: float | None = None
    generation: int = 0
    last_fired: float = -1.0

    def cancel(self) -> None:
        """Disarm: a pending firing is ignored."""
        self.generation += 1
        self.at = None


class Clock:
    """Virtual monotonic time (starts at 0) and the queue of timed actions."""

    def __init__(self) -> None:
        #: Virtual monotonic time in seconds.
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` at virtual time ``when`` (actions due together run in call order)."""
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, action))

    def run_to(self, end: float) -> None:
        """Run every action due until ``end``, then set the time to ``end``."""
        queue = self._queue
        while queue and queue[0][0] <= end:
            when, _, action = heapq.heappop(queue)
            self.now = max(self.now, when)
            action()
        self.now = max(self.now, end)

    def arm(self, timer: Timer, deadline: float | None, fire: Callable[[], None]) -> None:
        """Arm ``timer`` for ``deadline`` (``None``: disarm); ``fire()`` runs when it is due.

        A firing left over from an earlier arming is ignored. A deadline in the past fires
        now, but never twice within :data:`MIN_TIMER_STEP`.
        """
        if deadline is None:
            timer.at = None
            return
        deadline = max(deadline, self.now)
        if deadline <= timer.last_fired:
            deadline = timer.last_fired + MIN_TIMER_STEP
        if timer.at == deadline:
            return
        timer.at = deadline
        timer.generation += 1
        generation = timer.generation

        def due() -> None:
            if generation != timer.generation:
                return
            timer.at = None
            timer.last_fired = self.now
            fire()

        self.at(deadline, due)


# --- links and pipes ------------------------------------------------------------------------
@dataclass(slots=True)
class Link:
    """One-way latency (seconds) and UDP loss probability (0..1) between two nodes."""

    latency: float
    loss: float


@dataclass(eq=False, slots=True)
class Pipe:
    """One in-memory "TCP" connection between a client and the server."""

    cid: str
    client: SimClient
    client_open: bool = True
    server_open: bool = True
    #: Arrival time of the last bytes scheduled in each direction (keeps the stream in order).
    up_last: float = 0.0
    down_last: float = 0.0


# --- the network ----------------------------------------------------------------------------
class Network:
    """Links, addresses, NATs and the STUN server; carries datagrams and times the pipes.

    ``deliver(client, data, source)`` is called when a datagram reaches a client's socket.
    """

    def __init__(
        self,
        clock: Clock,
        rng: random.Random,
        latency: float,
        loss: float,
        deliver: Callable[[SimClient, bytes, Addr], None],
    ) -> None:
        self.clock = clock
        #: The STUN server's address (``None`` until :meth:`add_stun`).
        self.stun: Addr | None = None
        #: Datagrams delivered, per ``(sender name, receiver name)``.
        self.datagrams: Counter[tuple[str, str]] = Counter()
        #: Datagrams dropped: by loss, cut UDP, NAT filtering or an unreachable address.
        self.dropped = 0
        self._deliver = deliver
        self._rng = rng
        self._default = Link(latency, loss)
        self._links: dict[frozenset[str], Link] = {}
        self._public: dict[str, SimClient] = {}
        self._nat_by_ip: dict[str, Nat] = {}

    # --- the address space ------------------------------------------------------------------
    def check_public_ip(self, ip: str) -> None:
        """Raise :class:`ValueError` if ``ip`` is taken on the public network."""
        if ip in self._public or ip in self._nat_by_ip or (self.stun and self.stun[0] == ip):
            raise ValueError(f"public address {ip} is already in use")

    def add_stun(self, addr: Addr) -> None:
        """Put the STUN server at ``addr``."""
        self.check_public_ip(addr[0])
        self.stun = addr

    def add_nat(self, nat: Nat) -> None:
        """Put ``nat`` on the public network at its public address."""
        self.check_public_ip(nat.public_ip)
        self._nat_by_ip[nat.public_ip] = nat

    def add_host(self, client: SimClient) -> None:
        """Attach ``client`` to its NAT's LAN, or to the public network without a NAT."""
        if client.nat is None:
            self._public[client.lan_ip] = client
        else:
            client.nat.hosts[client.lan_ip] = client

    # --- links ------------------------------------------------------------------------------
    def set_link(self, a: str, b: str, latency: float | None, loss: float | None) -> None:
        """Change the latency and/or loss between nodes ``a`` and ``b`` (``None``: keep)."""
        key = frozenset((a, b))
        current = self._links.get(key, self._default)
        self._links[key] = Link(
            current.latency if latency is None else latency,
            current.loss if loss is None else loss,
        )

    def link(self, a: str, b: str) -> Link:
        """The link between nodes ``a`` and ``b``."""
        return self._links.get(frozenset((a, b)), self._default)

    # --- "TCP" ------------------------------------------------------------------------------
    def pipe_up(self, pipe: Pipe, arrive: Callable[[], None]) -> None:
        """Run ``arrive`` when what the client sends now reaches the server, in stream order."""
        at = max(self.clock.now + self.link(pipe.client.name, SERVER).latency, pipe.up_last)
        pipe.up_last = at
        self.clock.at(at, arrive)

    def pipe_down(self, pipe: Pipe, arrive: Callable[[], None]) -> None:
        """Run ``arrive`` when what the server sends now reaches the client, in stream order."""
        at = max(self.clock.now + self.link(pipe.client.name, SERVER).latency, pipe.down_last)
        pipe.down_last = at
        self.clock.at(at, arrive)

    # --- UDP --------------------------------------------------------------------------------
    def send_datagram(self, sender: SimClient, data: bytes, dst: Addr) -> None:
        """Send ``data`` from ``sender``'s UDP socket to ``dst`` (through its NAT, if any)."""
        if sender.udp_cut:
            self.dropped += 1
            return
        src: Addr = sender.udp_addr
        nat = sender.nat
        if nat is not None:
            neighbour = nat.hosts.get(dst[0])
            if neighbour is not None:  # same LAN: no translation
                self._transmit(sender.name, neighbour.name, data, src, dst, lan=nat)
                return
            if dst[0] == nat.public_ip and not nat.hairpin:
                self.dropped += 1
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
            internal = nat.mapped_to(dst[1])
            if internal is not None:
                inside = nat.hosts.get(internal[0])
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
            self.dropped += 1
            return
        link = self.link(sender, receiver)
        if link.loss > 0 and self._rng.random() < link.loss:
            self.dropped += 1
            return
        self.clock.at(
            self.clock.now + link.latency, lambda: self._arrive(sender, data, src, dst, lan)
        )

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
            self.dropped += 1
            return
        self.datagrams[sender, target.name] += 1
        if target.capture:
            target.captured.append((data, src))
        self._deliver(target, data, src)

    def _stun_answer(self, data: bytes, src: Addr) -> None:
        if not looks_like_stun(data) or int.from_bytes(data[:2], "big") != BINDING_REQUEST:
            return
        assert self.stun is not None
        reply = build_binding_response(bytes(data[8:20]), src[0], src[1])
        self._transmit(STUN, self._resolve(src), reply, self.stun, src)
