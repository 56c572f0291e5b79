"""IPv4 helpers and the server's dynamic address pool (PROTOCOL.md 2.3)."""

from __future__ import annotations

import random
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

BROADCAST = b"\xff\xff\xff\xff"


def is_multicast(ip: bytes) -> bool:
    """Whether a 4-byte address lies in 224.0.0.0/4."""
    return 224 <= ip[0] <= 239


class AddressPool:
    """Chooses addresses for EXPECTED requests inside one network.

    The first pick starts at a random host; later picks take the next free host after the
    last one handed out, wrapping around and skipping the network and broadcast addresses.
    """

    def __init__(self, network: IPv4Network, rng: random.Random) -> None:
        self.network = network
        self._first = int(network.network_address)
        self._size = network.num_addresses
        self._last: int | None = None
        self._rng = rng
        self.broadcast = network.broadcast_address.packed

    def is_host(self, ip: IPv4Address) -> bool:
        """Whether ``ip`` is a usable host address of the network."""
        return (
            ip in self.network
            and ip != self.network.network_address
            and ip != self.network.broadcast_address
        )

    def choose(
        self,
        requested: IPv4Interface | None,
        available: Callable[[bytes], bool],
    ) -> IPv4Interface | None:
        """Pick an address; ``available(ip)`` says whether this client may hold ``ip``.

        ``requested`` is kept when it lies in the range with the same prefix and is
        available; otherwise the next available host is chosen. ``None`` when full.
        """
        prefix = self.network.prefixlen
        if (
            requested is not None
            and requested.network.prefixlen == prefix
            and self.is_host(requested.ip)
            and available(requested.ip.packed)
        ):
            return requested
        hosts = self._size - 2
        if self._last is None:
            self._last = self._first + self._rng.randrange(1, self._size - 1) - 1
        for step in range(1, self._size + 1):
            offset = (self._last - self._first + step) % self._size
            if offset == 0 or offset == self._size - 1:
                continue
            ip = (self._first + offset).to_bytes(4, "big")
            if available(ip):
                self._last = self._first + offset
                return IPv4Interface(f"{IPv4Address(ip)}/{prefix}")
            hosts -= 1
            if hosts <= 0:
                break
        return None
