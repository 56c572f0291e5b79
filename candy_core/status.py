"""What the cores tell an operator: traffic counters and plain, serialisable snapshots.

The cores fill these in; a shell only serialises them (``as_dict()`` gives JSON-ready values:
strings, numbers, lists, dicts) and adds what only it knows (version, runtime, URLs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: How a packet to or from a peer travelled: a direct UDP path (through NATs), a direct path
#: on the LAN, through another peer (relay routing), or through the relay server.
PATHS = ("direct", "lan", "route", "relay")


@dataclass(slots=True)
class Counters:
    """Bytes and packets in each direction."""

    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    rx_packets: int = 0


class Traffic:
    """Per-peer and per-path counters of a client's tunnel packets (bounded in peers)."""

    __slots__ = ("max_peers", "paths", "peers")

    def __init__(self, max_peers: int) -> None:
        self.max_peers = max_peers
        self.peers: dict[bytes, Counters] = {}
        self.paths: dict[str, Counters] = {path: Counters() for path in PATHS}

    def _peer(self, ip: bytes) -> Counters | None:
        counters = self.peers.get(ip)
        if counters is None and len(self.peers) < self.max_peers:
            counters = self.peers[ip] = Counters()
        return counters

    def sent(self, ip: bytes, path: str, size: int) -> None:
        total = self.paths[path]
        total.tx_bytes += size
        total.tx_packets += 1
        peer = self._peer(ip)
        if peer is not None:
            peer.tx_bytes += size
            peer.tx_packets += 1

    def received(self, ip: bytes, path: str, size: int) -> None:
        total = self.paths[path]
        total.rx_bytes += size
        total.rx_packets += 1
        peer = self._peer(ip)
        if peer is not None:
            peer.rx_bytes += size
            peer.rx_packets += 1

    def clear_peers(self) -> None:
        """Our address changed: per-peer counters start over (the totals go on)."""
        self.peers.clear()


class Snapshot:
    """A dataclass snapshot that turns itself into JSON-ready values."""

    __slots__ = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True, slots=True)
class PeerInfo(Snapshot):
    """One peer as ``candy status`` shows it."""

    ip: str
    #: The peer state machine's state (INIT ... CONNECTED), or "NONE" without peer-to-peer.
    state: str
    path: str
    endpoint: str | None
    via: str | None
    rtt_ms: int | None
    last_heartbeat_s: float | None
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int
    #: Why the path is not direct (the last state change's reason), or None.
    reason: str | None


@dataclass(frozen=True, slots=True)
class ServerLink(Snapshot):
    url: str
    #: "connected", "connecting" or "backoff".
    state: str
    #: Unix time of the last change of ``state``.
    since: float
    last_error: str | None


@dataclass(frozen=True, slots=True)
class ClientStatus(Snapshot):
    """A client's snapshot (the shell adds role, version, runtime and the URL's scheme)."""

    name: str
    interface: str
    address: str | None
    server: ServerLink
    peers: list[PeerInfo]
    counters: dict[str, int]
    paths: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClientInfo(Snapshot):
    """One authenticated client as the relay sees it."""

    ip: str
    vmac: str | None
    remote: str
    #: Unix time the connection was accepted.
    since: float
    #: Bytes the relay wrote to it and read from it.
    tx_bytes: int
    rx_bytes: int
    frames_dropped: int
    #: Frames queued because its socket is not keeping up.
    backlog: int


@dataclass(frozen=True, slots=True)
class ServerStatus(Snapshot):
    """A relay's snapshot (the shell adds role, version, runtime, listen and uptime)."""

    clients: list[ClientInfo]
    counters: dict[str, Any]


def endpoint_text(addr: tuple[str, int] | None) -> str | None:
    """``ip:port`` or None."""
    return None if addr is None else f"{addr[0]}:{addr[1]}"
