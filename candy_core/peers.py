"""Peer-to-peer paths (PROTOCOL.md section 4). Without a STUN server every packet is relayed."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from ipaddress import IPv4Interface

from candy_core import messages as m
from candy_core.config import ClientConfig
from candy_core.events import ClientEvent

SendMessage = Callable[[bytes], bool]


class PeerManager:
    """Direct UDP paths of one client to its peers."""

    def __init__(self, config: ClientConfig, rng: random.Random, send_message: SendMessage) -> None:
        self.config = config
        self.enabled = config.stun is not None
        self._rng = rng
        self._send_message = send_message
        self._events: deque[ClientEvent] = deque()
        self._datagrams: list[tuple[bytes, tuple[str, int]]] = []
        self.address: IPv4Interface | None = None
        self.local_port = 0

    def set_address(self, address: IPv4Interface) -> None:
        self.address = address

    def server_lost(self) -> None:
        """The WebSocket is gone; direct paths stay but negotiation waits for it."""

    def next_deadline(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def datagrams_to_send(self) -> list[tuple[bytes, tuple[str, int]]]:
        datagrams, self._datagrams = self._datagrams, []
        return datagrams

    def next_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None

    def send_packet(self, dst: bytes, packet: bytes, now: float) -> bool:
        """Send ``packet`` over a direct or routed path if one is up; ``False`` otherwise."""
        return False

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> list[bytes]:
        """Handle one UDP datagram; returns packets for TUN."""
        return []

    def relayed_from(self, src: bytes, now: float) -> None:
        """A packet from ``src`` arrived through the server."""

    def receive_message(self, msg: m.Peer | m.Discovery | m.General, now: float) -> None:
        """A PEER, DISCOVERY or GENERAL message relayed by the server."""
