"""Configuration values handed to the cores: plain data that checks itself on creation.

Every rule a value must follow is written here, once. A broken rule raises
:class:`FieldError` (a :class:`ConfigError`) naming the field, the value and the rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from candy_core.errors import ConfigError
from candy_core.limits import Limits

__all__ = [
    "DEFAULT_MAX_FRAME",
    "ClientConfig",
    "ConfigError",
    "FieldError",
    "ServerConfig",
    "check_port",
    "parse_interface",
]

#: Largest WebSocket frame payload a legitimate peer sends: a type byte, a TUN packet of at
#: most the MTU (1400) and some padding. The reference reads into a 1500-byte buffer.
DEFAULT_MAX_FRAME = 4096
#: A smaller limit would refuse frames the reference sends.
MIN_MAX_FRAME = 1500
#: Linux interface names hold at most 15 characters; ``candy-`` takes six of them.
MAX_NAME_LENGTH = 15 - len("candy-")
MAX_ROUTE_COST = 1000
#: A dhcp range needs room for at least two hosts besides its network and broadcast addresses.
MAX_DHCP_PREFIX = 30
MAX_PORT = 65535

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]*")

#: A rule returns what is wrong with a value, or ``None`` when nothing is.
_Rule = Callable[[Any], str | None]


class FieldError(ConfigError):
    """``field`` holds ``value``, which breaks the rule ``reason``."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        shown = value if isinstance(value, IPv4Interface | IPv4Network) else repr(value)
        super().__init__(f"invalid {field} {shown}: {reason}")
        self.field, self.value, self.reason = field, value, reason


def _integer(value: object, low: int, high: int | None = None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return "expected an integer"
    if value < low or (high is not None and value > high):
        return f"must be at least {low}" if high is None else f"must be between {low} and {high}"
    return None


def _port(value: object, low: int = 1) -> str | None:
    return _integer(value, low, MAX_PORT)


def _seconds(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return "expected a number of seconds"
    return None if value > 0 else "must be more than 0 seconds"


def _string(value: object) -> str | None:
    return None if isinstance(value, str) else "expected a string"


def _nonempty(value: object) -> str | None:
    return _string(value) or (None if value else "must not be empty")


def _boolean(value: object) -> str | None:
    return None if isinstance(value, bool) else "expected true or false"


def _ipv4(value: object) -> str | None:
    if not isinstance(value, str):
        return "expected an IPv4 address"
    try:
        IPv4Address(value)
    except ValueError as exc:
        return f"expected an IPv4 address ({exc})"
    return None


def _limits(value: object) -> str | None:
    if not isinstance(value, Limits):
        return "expected a candy_core.limits.Limits"
    for f in fields(value):
        number = getattr(value, f.name)
        if isinstance(number, bool) or not isinstance(number, int | float) or not number >= 0:
            return f"{f.name} must be a number of at least 0"
    if value.connect_rate <= 0 or value.connect_burst < 1 or value.max_sources < 1:
        return "connect_rate must be above 0, connect_burst and max_sources at least 1"
    return None


def _optional(rule: _Rule) -> _Rule:
    return lambda value: None if value is None else rule(value)


def _name(value: object) -> str | None:
    if not isinstance(value, str):
        return "expected a string"
    if len(value) > MAX_NAME_LENGTH:
        return (
            f"at most {MAX_NAME_LENGTH} characters, so that candy-{value} fits the"
            " 15-character interface name limit"
        )
    if not _NAME_RE.fullmatch(value) or value in (".", ".."):
        return "use only letters, digits, '_', '.' and '-'"
    return None


def _dhcp(value: object) -> str | None:
    if not isinstance(value, IPv4Network):
        return "expected an IPv4Network such as 10.0.0.0/24"
    if value.prefixlen > MAX_DHCP_PREFIX:
        return f"the range is too small: use a prefix of /{MAX_DHCP_PREFIX} or less"
    return None


def _tun(value: object) -> str | None:
    if not isinstance(value, IPv4Interface):
        return "expected an IPv4Interface such as 10.0.0.2/24"
    net = value.network
    if net.prefixlen <= 30 and value.ip in (net[0], net[-1]):  # /31 and /32 have neither
        which = "network" if value.ip == net[0] else "broadcast"
        return f"{value.ip} is the {which} address of {net}"
    return None


def _stun(value: object) -> str | None:
    if not isinstance(value, tuple) or len(value) != 2:
        return "expected (IPv4 address, port)"
    bad_port = _port(value[1])
    return _ipv4(value[0]) or (bad_port and f"port {bad_port}")


def _path(value: object) -> str | None:
    return _string(value) or (None if str(value).startswith("/") else "the path must start with /")


def _check(config: Any, rules: Mapping[str, _Rule]) -> None:
    """Apply each field's rule, in field order; a field without a rule is a KeyError."""
    for each in fields(config):
        value = getattr(config, each.name)
        reason = rules[each.name](value)
        if reason:
            raise FieldError(each.name, value, reason)


def check_port(field: str, value: object, *, any_ok: bool = False) -> None:
    """Refuse anything but a port number; 0 (the system chooses) only with ``any_ok``."""
    reason = _port(value, 0 if any_ok else 1)
    if reason:
        raise FieldError(field, value, reason)


def parse_interface(text: str, what: str = "address") -> IPv4Interface:
    """Parse ``a.b.c.d/prefix`` strictly, raising :class:`FieldError` named ``what``."""
    try:
        iface = IPv4Interface(text)
    except ValueError as exc:
        raise FieldError(what, text, f"expected a.b.c.d/prefix ({exc})") from None
    if "/" not in text:
        raise FieldError(what, text, "the prefix length is missing (a.b.c.d/24)")
    return iface


_COMMON_RULES: dict[str, _Rule] = {
    "password": _string,
    "max_frame": lambda value: _integer(value, MIN_MAX_FRAME),
    "clock_window": lambda value: _integer(value, 1),
}


@dataclass(frozen=True)
class ServerConfig:
    """What a relay server needs to know; no sockets or addresses to listen on."""

    password: str = ""
    #: Dynamic address range (``10.0.0.0/24``, at most /30) or ``None``: clients bring their own.
    dhcp: IPv4Network | None = None
    #: Largest accepted frame payload (at least 1500); a larger frame closes that connection.
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
        _check(self, _SERVER_RULES)

    @classmethod
    def from_strings(cls, password: str = "", dhcp: str | None = None, **kw: Any) -> ServerConfig:
        """Build from user-facing strings (``dhcp="10.0.0.0/24"``)."""
        net = parse_interface(dhcp, "dhcp").network if dhcp else None
        return cls(password=password, dhcp=net, **kw)


_SERVER_RULES: dict[str, _Rule] = {
    **_COMMON_RULES,
    "dhcp": _optional(_dhcp),
    "auth_timeout": _seconds,
    "idle_timeout": _seconds,
    "send_queue_limit": lambda value: _integer(value, 1),
    "limits": _limits,
}


@dataclass(frozen=True)
class ClientConfig:
    """What a client needs to know; the shell resolves host names before building it."""

    password: str = ""
    #: Network name (at most 9 of ``A-Za-z0-9_.-``): interface ``candy-<name>``, state cache key.
    name: str = ""
    #: Static address, or ``None`` to ask the server for one (EXPECTED).
    tun: IPv4Interface | None = None
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
    #: Keep-alive: ping after this many idle seconds; the connection is dead after ``dead_after``.
    ping_interval: float = 15.0
    dead_after: float = 30.0
    #: Reconnection back-off bounds in seconds.
    backoff_min: float = 1.0
    backoff_max: float = 30.0
    #: Version string sent in keep-alive pings (``candy::linux::<version>``).
    version: str = "5.6"
    max_frame: int = DEFAULT_MAX_FRAME
    clock_window: int = 30

    def __post_init__(self) -> None:
        _check(self, _CLIENT_RULES)
        if self.dead_after <= self.ping_interval:
            reason = f"must be more than ping_interval ({self.ping_interval:g} s)"
            raise FieldError("dead_after", self.dead_after, reason)
        if self.backoff_max < self.backoff_min:
            reason = f"must be at least backoff_min ({self.backoff_min:g} s)"
            raise FieldError("backoff_max", self.backoff_max, reason)

    @property
    def interface_name(self) -> str:
        """The TUN interface name, as the reference names it."""
        return f"candy-{self.name}" if self.name else "candy"

    @property
    def cache_key(self) -> str:
        """The file name used for cached state (``__noname__`` when unnamed)."""
        return self.name or "__noname__"


_CLIENT_RULES: dict[str, _Rule] = {
    **_COMMON_RULES,
    "name": _name,
    "tun": _optional(_tun),
    "host": _nonempty,
    "port": _port,
    "path": _path,
    "confusion": _boolean,
    "stun": _optional(_stun),
    "localhost": _optional(_ipv4),
    "route": lambda value: _integer(value, 0, MAX_ROUTE_COST),
    "discovery": lambda value: _integer(value, 0),
    "ping_interval": _seconds,
    "dead_after": _seconds,
    "backoff_min": _seconds,
    "backoff_max": _seconds,
    "version": _nonempty,
}
