"""Codec of the peer messages inside encrypted datagrams (PROTOCOL.md 4.3)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from candy_core.errors import ProtocolError

HEARTBEAT = 0
FORWARD = 1
DELAY = 2
ROUTE = 4

#: ROUTE delay meaning "withdrawn".
ROUTE_WITHDRAWN = 2147483647

_HEARTBEAT = struct.Struct(">B4s4sHB")
_DELAY = struct.Struct(">B4s4sq")
_ROUTE = struct.Struct(">B4s4si")


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """HEARTBEAT: ``tun`` is the sender; ``ip:port`` informative only (5.6 sends port 0)."""

    tun: IPv4Address
    ip: IPv4Address
    port: int
    ack: bool

    def encode(self) -> bytes:
        return _HEARTBEAT.pack(HEARTBEAT, self.tun.packed, self.ip.packed, self.port, int(self.ack))

    @classmethod
    def decode(cls, data: bytes) -> Heartbeat:
        if len(data) < _HEARTBEAT.size:
            raise ProtocolError(f"peer HEARTBEAT too short: {len(data)} bytes")
        _, tun, ip, port, ack = _HEARTBEAT.unpack_from(data)
        return cls(IPv4Address(tun), IPv4Address(ip), port, bool(ack))


@dataclass(frozen=True, slots=True)
class Delay:
    """DELAY: round-trip probe; ``dst`` echoes it back unchanged to ``src``."""

    src: IPv4Address
    dst: IPv4Address
    timestamp_ms: int

    def encode(self) -> bytes:
        return _DELAY.pack(DELAY, self.src.packed, self.dst.packed, self.timestamp_ms)

    @classmethod
    def decode(cls, data: bytes) -> Delay:
        if len(data) < _DELAY.size:
            raise ProtocolError(f"peer DELAY too short: {len(data)} bytes")
        _, src, dst, ts = _DELAY.unpack_from(data)
        return cls(IPv4Address(src), IPv4Address(dst), ts)


@dataclass(frozen=True, slots=True)
class Route:
    """ROUTE: ``dst`` is reachable through ``next`` with ``delay`` ms (withdrawn at max)."""

    dst: IPv4Address
    next: IPv4Address
    delay: int

    def encode(self) -> bytes:
        return _ROUTE.pack(ROUTE, self.dst.packed, self.next.packed, self.delay)

    @classmethod
    def decode(cls, data: bytes) -> Route:
        if len(data) < _ROUTE.size:
            raise ProtocolError(f"peer ROUTE too short: {len(data)} bytes")
        _, dst, nxt, delay = _ROUTE.unpack_from(data)
        return cls(IPv4Address(dst), IPv4Address(nxt), delay)
