"""Simulated NATs with RFC 4787 mapping and filtering behaviour."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from candy_core.sim.simulation import SimClient

__all__ = ["NAT_KINDS", "Addr", "Nat"]

#: A UDP socket address, ``(ip, port)``.
Addr = tuple[str, int]

#: The NAT behaviours :meth:`Simulation.add_nat` knows (RFC 4787 mapping and filtering).
NAT_KINDS = ("full_cone", "address_restricted", "port_restricted", "symmetric")


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

    def mapped_to(self, port: int) -> Addr | None:
        """The internal address public ``port`` maps to, regardless of filtering, if any."""
        mapping = self._by_port.get(port)
        return mapping.internal if mapping is not None else None

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
