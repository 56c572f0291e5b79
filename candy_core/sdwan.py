"""Subnet routes (Candy 6.x ``sdwan``, PROTOCOL.md 6.1 and 6.2): parsing, lookup, IPIP.

The server is configured with ``dev,dst,nexthop;...`` (:func:`parse_sdwan`) and pushes every
route whose ``dev`` holds a client's address to that client (a ROUTE message). A client keeps
them in a :class:`RouteTable`; a packet for a routed destination gets an outer IPv4 header
(:func:`encapsulate`) addressed to the route's gateway, which strips it (:func:`decapsulate`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from candy_core.messages import IPPROTO_IPIP, IPV4_HEADER_SIZE, RouteEntry

__all__ = [
    "OUTER_TTL",
    "RouteTable",
    "SdwanRoute",
    "decapsulate",
    "encapsulate",
    "ipv4_checksum",
    "is_encapsulated",
    "parse_sdwan",
]

#: TTL of the outer header we write (6.x writes zero; any receiver ignores it).
OUTER_TTL = 64
_OUTER = struct.Struct(">BBHHHBBH4s4s")


@dataclass(frozen=True, slots=True)
class SdwanRoute:
    """One server route: clients inside ``dev`` reach ``dst`` through ``nexthop``."""

    dev: IPv4Network
    dst: IPv4Network
    nexthop: IPv4Address

    def entry(self) -> RouteEntry:
        """The ROUTE message entry (dst, mask, nexthop)."""
        return RouteEntry(self.dst.network_address, self.dst.netmask, self.nexthop)

    def __str__(self) -> str:
        return f"{self.dev},{self.dst},{self.nexthop}"


def parse_sdwan(text: str) -> tuple[SdwanRoute, ...]:
    """Parse ``dev,dst,nexthop;...`` (6.x syntax); raises ``ValueError`` saying what is wrong.

    ``dev`` and ``dst`` are network CIDRs with their host bits zero, ``nexthop`` an IPv4
    address. Empty items (a trailing ``;``) and spaces around values are allowed.
    """
    routes: list[SdwanRoute] = []
    for item in text.split(";"):
        if not item.strip():
            continue
        parts = [part.strip() for part in item.split(",")]
        if len(parts) != 3:
            raise ValueError(f"route {item.strip()!r} is not dev,dst,nexthop")
        dev, dst = (_network(parts[0], "dev"), _network(parts[1], "dst"))
        try:
            nexthop = IPv4Address(parts[2])
        except ValueError:
            raise ValueError(f"nexthop {parts[2]!r} is not an IPv4 address") from None
        routes.append(SdwanRoute(dev, dst, nexthop))
    return tuple(routes)


def _network(text: str, what: str) -> IPv4Network:
    if "/" not in text:
        raise ValueError(f"{what} {text!r} is not a network a.b.c.d/prefix")
    try:
        return IPv4Network(text)
    except ValueError as exc:
        reason = f"{what} {text!r} is not a network with its host bits zero ({exc})"
        raise ValueError(reason) from None


class RouteTable:
    """The routes a client uses, by longest prefix; entries through ``me`` are left out."""

    def __init__(self, entries: Iterable[RouteEntry] = (), me: bytes | None = None) -> None:
        self.entries: tuple[RouteEntry, ...] = ()
        #: Some route goes through ``me``: we are a gateway, forwarding for a LAN.
        self.gateway = False
        #: (network as int, mask as int, prefix length, nexthop bytes), longest prefix first.
        self._lookup: list[tuple[int, int, int, bytes]] = []
        self.replace(entries, me)

    def replace(self, entries: Iterable[RouteEntry], me: bytes | None) -> None:
        kept: list[RouteEntry] = []
        lookup: list[tuple[int, int, int, bytes]] = []
        self.gateway = False
        for entry in entries:
            if me is not None and entry.nexthop.packed == me:
                self.gateway = True
                continue
            try:
                net = entry.network
            except ValueError:  # a non-contiguous mask: not a route
                continue
            if entry in kept:
                continue
            kept.append(entry)
            mask = int(net.netmask)
            lookup.append((int(net.network_address), mask, net.prefixlen, entry.nexthop.packed))
        lookup.sort(key=lambda row: -row[2])
        self.entries = tuple(kept)
        self._lookup = lookup

    def networks(self) -> tuple[IPv4Network, ...]:
        """The destinations, as networks (what the kernel routes through TUN)."""
        return tuple(dict.fromkeys(entry.network for entry in self.entries))

    def nexthop(self, dst: bytes) -> bytes | None:
        """The gateway for destination ``dst`` (4 bytes), or ``None`` when no route matches."""
        if not self._lookup:
            return None
        value = int.from_bytes(dst, "big")
        for net, mask, _, hop in self._lookup:
            if value & mask == net:
                return hop
        return None

    def __bool__(self) -> bool:
        return bool(self._lookup) or self.gateway

    def __len__(self) -> int:
        return len(self.entries)


def ipv4_checksum(header: bytes) -> int:
    """The Internet checksum of ``header`` (its checksum field taken as zero by the caller)."""
    total: int = sum(struct.unpack(f">{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def encapsulate(packet: bytes, src: bytes, dst: bytes) -> bytes:
    """``packet`` behind a full, valid 20-byte IPv4 header: protocol 4, ``src`` -> ``dst``.

    Version 4, IHL 5, total length, TTL :data:`OUTER_TTL`, don't-fragment clear, checksum
    computed: what a 6.x receiver (which reads only protocol and addresses) and any other
    reader accept.
    """
    total = IPV4_HEADER_SIZE + len(packet)
    if total > 0xFFFF:
        raise ValueError(f"packet of {len(packet)} bytes is too large to encapsulate")
    header = _OUTER.pack(0x45, 0, total, 0, 0, OUTER_TTL, IPPROTO_IPIP, 0, src, dst)
    checksum = ipv4_checksum(header)
    return header[:10] + checksum.to_bytes(2, "big") + header[12:] + packet


def is_encapsulated(packet: bytes) -> bool:
    """Whether ``packet`` carries another IPv4 packet (protocol 4 at offset 9).

    Recognised by the protocol alone, so 6.x's zeroed outer header (version byte 0, no
    length, no checksum) counts.
    """
    return len(packet) >= IPV4_HEADER_SIZE and packet[9] == IPPROTO_IPIP


def decapsulate(packet: bytes) -> bytes | None:
    """The inner packet of an encapsulated one (at least a header's worth), else ``None``."""
    if not is_encapsulated(packet) or len(packet) < 2 * IPV4_HEADER_SIZE:
        return None
    return bytes(packet[IPV4_HEADER_SIZE:])
