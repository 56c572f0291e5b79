"""Typed events the cores hand to embedding programs (``next_event()``)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface


# --- server -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClientAuthenticated:
    """A connection authenticated and now holds ``ip``."""

    cid: Hashable
    ip: IPv4Address


@dataclass(frozen=True, slots=True)
class AddressAssigned:
    """The server answered an EXPECTED request with ``address`` (server side: for ``cid``)."""

    cid: Hashable
    address: IPv4Interface


@dataclass(frozen=True, slots=True)
class ClientDisconnected:
    """A connection ended; ``ip`` is the address it held (if any), ``reason`` says why."""

    cid: Hashable
    ip: IPv4Address | None
    reason: str


# --- client -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Connected:
    """Joined: the WebSocket is open and AUTH with ``address`` has been sent."""

    address: IPv4Interface


@dataclass(frozen=True, slots=True)
class AddressChanged:
    """Our virtual address is now ``address``: configure the TUN device with it."""

    address: IPv4Interface


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection to the server ended; ``reason`` is meant for the user."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The client will open a new connection after ``delay`` seconds."""

    delay: float
    attempt: int


@dataclass(frozen=True, slots=True)
class PeerStateChanged:
    """The direct path to ``ip`` changed state (PROTOCOL.md 4.4), with the reason."""

    ip: IPv4Address
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class PingReply:
    """An answer to :meth:`Client.ping`: how long it took and which way it came."""

    ip: IPv4Address
    seq: int
    rtt_ms: float
    #: "direct", "lan", "route" or "relay" (see candy_core.status.PATHS).
    path: str
    #: The peer's UDP endpoint ("ip:port") on a direct path, else None.
    endpoint: str | None


ServerEvent = ClientAuthenticated | AddressAssigned | ClientDisconnected
ClientEvent = (
    Connected | AddressChanged | Disconnected | Reconnecting | PeerStateChanged | PingReply
)
