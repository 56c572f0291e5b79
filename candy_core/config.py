"""Configuration values handed to the cores (plain data, validated on creation)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from candy_core.errors import ConfigError
from candy_core.limits import Limits

#: Largest WebSocket frame payload a legitimate peer sends: a type byte, a TUN packet of at
#: most the MTU (1400) and some padding. The reference reads into a 1500-byte buffer.
DEFAULT_MAX_FRAME = 4096


def parse_interface(text: str, what: str = "address") -> ipaddress.IPv4Interface:
    """Parse ``a.b.c.d/prefix`` strictly, raising :class:`ConfigError` with a clear message."""
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError as exc:
        raise ConfigError(f"invalid {what} {text!r}: expected a.b.c.d/prefix ({exc})") from None
    if "/" not in text:
        raise ConfigError(f"invalid {what} {text!r}: the prefix length is missing (a.b.c.d/24)")
    return iface


@dataclass(frozen=True)
class ServerConfig:
    """What a relay server needs to know; no sockets or addresses to listen on."""

    password: str = ""
    #: Dynamic address range (``10.0.0.0/24``) or ``None`` when clients bring their own.
    dhcp: ipaddress.IPv4Network | None = None
    #: Largest accepted frame payload; a larger frame closes only that connection.
    max_frame: int = DEFAULT_MAX_FRAME
    #: Seconds a connection may take to authenticate before it is closed.
    auth_timeout: float = 10.0
    #: Seconds without receiving anything (clients ping every 15 s) before a connection is closed.
    idle_timeout: float = 75.0
    #: Frames queued for a connection whose socket is not writable; beyond it the oldest go.
    send_queue_limit: int = 1024
    #: Allowed difference between a handshake timestamp and the server clock, in seconds.
    clock_window: int = 30
    #: Bounds on connections and handshakes per source address (floods).
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.dhcp is not None and self.dhcp.prefixlen > 30:
            raise ConfigError(f"dhcp range {self.dhcp} is too small: use a prefix of /30 or less")

    @classmethod
    def from_strings(
        cls, password: str = "", dhcp: str | None = None, **kw: object
    ) -> ServerConfig:
        """Build from user-facing strings (``dhcp="10.0.0.0/24"``)."""
        net = None
        if dhcp:
            iface = parse_interface(dhcp, "dhcp range")
            net = iface.network
            if net.prefixlen > 30:
                raise ConfigError(f"dhcp range {dhcp!r} is too small: use a prefix of /30 or less")
        return cls(password=password, dhcp=net, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ClientConfig:
    """What a client needs to know; the shell resolves host names before building it."""

    password: str = ""
    #: Network name: the interface is ``candy-<name>`` and state is cached under it.
    name: str = ""
    #: Static address, or ``None`` to ask the server for one (EXPECTED).
    tun: ipaddress.IPv4Interface | None = None
    #: Host, port and path of the server URL (used in the upgrade request).
    host: str = "localhost"
    port: int = 80
    path: str = "/"
    #: Add random padding to AUTH, EXPECTED and VMAC so their sizes do not identify Candy.
    confusion: bool = True
    #: STUN server as (IPv4 address, port), or ``None`` to disable peer-to-peer.
    stun: tuple[str, int] | None = None
    #: LAN address to announce to peers (``None``: none known).
    localhost: str | None = None
    #: Relay route cost (0 = off, at most 1000).
    route: int = 0
    #: Active discovery interval in seconds (0 = off).
    discovery: int = 0
    #: Keep-alive: ping after this many idle seconds, declare the connection dead after twice it.
    ping_interval: float = 15.0
    dead_after: float = 30.0
    #: Reconnection back-off bounds in seconds.
    backoff_min: float = 1.0
    backoff_max: float = 30.0
    #: Version string sent in keep-alive pings (``candy::linux::<version>``).
    version: str = "5.6"
    max_frame: int = DEFAULT_MAX_FRAME
    clock_window: int = 30

    @property
    def interface_name(self) -> str:
        """The TUN interface name, as the reference names it."""
        return f"candy-{self.name}" if self.name else "candy"

    @property
    def cache_key(self) -> str:
        """The file name used for cached state (``__noname__`` when unnamed)."""
        return self.name or "__noname__"
