"""Several networks on one relay: a :class:`NetworkRouter` in front of one relay per network.

A client names its network with the path of the server URL (``ws://host:8080/office``); the
upgrade request carries it. The router holds each new connection *unrouted* until the
request head is parsed (with the same :class:`~candy_core.upgrade.ServerUpgrade`), then hands
it, upgraded, to that network's :class:`~candy_core.server.RelayServer` (which owns it from
then on: frames, handshakes, addresses, replay guards, counters), or answers 404 and closes.
Networks share nothing but the per-source flood limits (:mod:`candy_core.limits`): a source
floods the listening socket, not a network.

The router has the interface of a :class:`RelayServer`, so the shells drive either one the
same way; :func:`make_relay` builds a plain ``RelayServer`` when there is one network, so the
single-network relay pays nothing for this. Pure like the rest of the core: no I/O, no clock.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from candy_core.config import ConfigError, ServerConfig
from candy_core.events import ClientDisconnected, ServerEvent
from candy_core.limits import SourceLimiter, source_of
from candy_core.server import SWEEP_INTERVAL, RelayServer
from candy_core.status import ClientInfo, ServerStatus
from candy_core.upgrade import ServerUpgrade

__all__ = ["Network", "NetworkRouter", "check_network_path", "make_relay"]

log = logging.getLogger("candy.server")

#: Longest network path accepted (the reference reads the request into a small buffer).
MAX_PATH = 256


def check_network_path(path: object) -> str | None:
    """What is wrong with ``path`` as a network's URL path, or ``None``."""
    if not isinstance(path, str):
        return "expected a string"
    if not path.startswith("/"):
        return 'must start with "/"'
    if len(path) > MAX_PATH:
        return f"must be at most {MAX_PATH} characters"
    if any(ch in path for ch in "?#") or any(not 0x21 <= ord(ch) < 0x7F for ch in path):
        return "must be printable ASCII without spaces, '?' or '#'"
    return None


@dataclass(frozen=True, slots=True)
class Network:
    """One network of a relay: the URL path that selects it and its own relay config."""

    path: str
    config: ServerConfig

    def __post_init__(self) -> None:
        reason = check_network_path(self.path)
        if reason:
            raise ConfigError(f"invalid network path {self.path!r}: {reason}")
        if not isinstance(self.config, ServerConfig):
            raise ConfigError(f"network {self.path}: config must be a ServerConfig")


@dataclass(eq=False, slots=True)
class _Unrouted:
    peer: str
    source: str
    opened: float
    upgrade: ServerUpgrade
    received: int = 0


#: Counters of a relay's status that are not summed over its networks.
_NOT_SUMMED = ("rejected",)


class NetworkRouter:
    """Routes each connection by its URL path to the :class:`RelayServer` of that network.

    ``config`` holds what comes before a network is known: the flood ``limits`` (one
    limiter for all networks) and ``auth_timeout`` (an unrouted connection counts against
    it, and so does its time unrouted once routed).
    """

    def __init__(
        self, config: ServerConfig, networks: Sequence[Network], rng: random.Random
    ) -> None:
        if not networks:
            raise ConfigError("a network router needs at least one network")
        self.config = config
        self._limiter = SourceLimiter(config.limits)
        self.networks: dict[str, RelayServer] = {}
        for net in networks:
            if net.path in self.networks:
                raise ConfigError(f"network path {net.path} is given twice")
            self.networks[net.path] = RelayServer(net.config, rng, limiter=self._limiter)
        self._relays = tuple(self.networks.values())
        self._unrouted: dict[Hashable, _Unrouted] = {}
        self._routed: dict[Hashable, RelayServer] = {}
        self._out: list[tuple[Hashable, bytes]] = []
        self._closing: list[Hashable] = []
        self._events: deque[ServerEvent] = deque()
        self._next_sweep: float | None = None
        self._refused_since_log = 0
        self._refused_log_at = float("-inf")
        #: Before routing: connections accepted, refused by the limits, closed (by reason).
        self.connections = 0
        self.refused = 0
        self.rejections: dict[str, int] = {}

    # --- connection lifecycle -----------------------------------------------------------
    def connection_made(self, cid: Hashable, now: float, peer: str = "?") -> None:
        """Admit (flood limits) and hold ``cid`` until its upgrade request names a network."""
        self.connections += 1
        source = source_of(peer)
        refusal = self._limiter.admit(source, now)
        if refusal is not None:
            self.refused += 1
            self._closing.append(cid)
            self._refused_since_log += 1
            if now - self._refused_log_at >= 1.0:
                log.warning(
                    "refused %d connection(s) in the last second: %s",
                    self._refused_since_log,
                    refusal,
                )
                self._refused_since_log = 0
                self._refused_log_at = now
            return
        self._unrouted[cid] = _Unrouted(peer, source, now, ServerUpgrade(self.networks))
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_INTERVAL

    def connection_lost(self, cid: Hashable, reason: str = "connection closed by peer") -> None:
        relay = self._routed.pop(cid, None)
        if relay is not None:
            relay.connection_lost(cid, reason)
        elif cid in self._unrouted:
            self._forget(cid, reason, failed=False, now=self._unrouted[cid].opened)

    def pause_writing(self, cid: Hashable) -> None:
        relay = self._routed.get(cid)
        if relay is not None:
            relay.pause_writing(cid)

    def resume_writing(self, cid: Hashable) -> None:
        relay = self._routed.get(cid)
        if relay is not None:
            relay.resume_writing(cid)

    # --- input --------------------------------------------------------------------------
    def receive_data(self, cid: Hashable, data: bytes, now: float, wall: float) -> None:
        relay = self._routed.get(cid)
        if relay is not None:
            relay.receive_data(cid, data, now, wall)
            return
        conn = self._unrouted.get(cid)
        if conn is None or not data:
            return
        conn.received += len(data)
        result = conn.upgrade.receive(data)
        if result.rejected:
            unknown = result.rejected.startswith("no network")
            log.warning("%s: rejected HTTP request: %s", conn.peer, result.rejected)
            if result.reply:
                self._out.append((cid, result.reply))
            self._closing.append(cid)
            self._forget(cid, f"HTTP request rejected: {result.rejected}", True, now)
            label = "unknown_network" if unknown else "http"
            self.rejections[label] = self.rejections.get(label, 0) + 1
            return
        if not result.accepted:
            return
        del self._unrouted[cid]
        relay = self.networks[conn.upgrade.route]
        self._routed[cid] = relay
        head = (result.reply, conn.received - len(result.trailing), result.trailing)
        relay.connection_upgraded(cid, now, wall, conn.peer, conn.opened, head)

    def handle_timer(self, now: float) -> None:
        for relay in self._relays:
            relay.handle_timer(now)
        if self._next_sweep is None or now < self._next_sweep:
            return
        timeout = self.config.auth_timeout
        for cid, conn in list(self._unrouted.items()):
            if now - conn.opened > timeout:
                log.warning("%s: closing: no upgrade request after %g s", conn.peer, timeout)
                self.rejections["timeout"] = self.rejections.get("timeout", 0) + 1
                self._closing.append(cid)
                self._forget(cid, "authentication timeout", True, now)
        self._next_sweep = now + SWEEP_INTERVAL if self._unrouted else None

    # --- output -------------------------------------------------------------------------
    def data_to_send(self) -> list[tuple[Hashable, bytes]]:
        out, self._out = self._out, []
        for relay in self._relays:
            out.extend(relay.data_to_send())
        return out

    def connections_to_close(self) -> list[Hashable]:
        closing, self._closing = self._closing, []
        routed = self._routed
        for relay in self._relays:
            for cid in relay.connections_to_close():
                routed.pop(cid, None)
                closing.append(cid)
        return closing

    def next_event(self) -> ServerEvent | None:
        if self._events:
            return self._events.popleft()
        for relay in self._relays:
            event = relay.next_event()
            if event is not None:
                return event
        return None

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (r.next_deadline() for r in self._relays) if d is not None]
        if self._next_sweep is not None:
            deadlines.append(self._next_sweep)
        return min(deadlines, default=None)

    def status(self, now: float, wall: float) -> ServerStatus:
        """Every network's clients (``network`` set), summed counters and ``networks``."""
        clients: list[ClientInfo] = []
        per_network: dict[str, dict[str, Any]] = {}
        rejected = dict(self.rejections)
        counters: dict[str, Any] = {
            "connections": self.connections,
            "open_connections": len(self._unrouted),
            "refused": self.refused,
        }
        for path, relay in self.networks.items():
            snap = relay.status(now, wall)
            clients.extend(replace(client, network=path) for client in snap.clients)
            net_counters = dict(snap.counters)
            # Connections reach a network once routed: those are counted by the router.
            net_counters["clients"] = len(snap.clients)
            per_network[path] = net_counters
            for key, value in snap.counters.items():
                if key == "connections":
                    continue
                if key in _NOT_SUMMED:
                    for label, n in value.items():
                        rejected[label] = rejected.get(label, 0) + n
                else:
                    counters[key] = counters.get(key, 0) + value
        counters["rejected"] = rejected
        counters["networks"] = per_network
        return ServerStatus(clients=clients, counters=counters)

    def _forget(self, cid: Hashable, reason: str, failed: bool, now: float) -> None:
        conn = self._unrouted.pop(cid)
        self._limiter.settled(conn.source, failed, now)
        self._events.append(ClientDisconnected(cid, None, reason))


def make_relay(
    config: ServerConfig, rng: random.Random, networks: Sequence[Network] = ()
) -> RelayServer | NetworkRouter:
    """A :class:`RelayServer` (one network, any path) or, with ``networks``, a router."""
    if networks:
        return NetworkRouter(config, networks, rng)
    return RelayServer(config, rng)
