"""Wire codec for the WebSocket messages of PROTOCOL.md section 2.

Every message is one binary WebSocket frame whose first byte is the type. Each message is a
small frozen value with ``encode()``; :func:`decode` parses any payload strictly and raises
:class:`ProtocolError` with a clear message on malformed input. Bytes after the fixed part of
AUTH, EXPECTED, VMAC, PEER and DISCOVERY are padding and are ignored.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from candy_core import auth
from candy_core.errors import ProtocolError

AUTH = 0
FORWARD = 1
EXPECTED = 2
PEER = 3
VMAC = 4
DISCOVERY = 5
GENERAL = 255

#: GENERAL subtype carrying a LAN endpoint.
GENERAL_LAN = 0

BROADCAST = IPv4Address("255.255.255.255")

_TS = struct.Struct(">q")
_ADDR_PORT = struct.Struct(">4sH")

#: The shortest IPv4 packet accepted: a bare header. Source address at offset 12, destination 16.
IPV4_HEADER_SIZE = 20
#: IP protocol number of IPv4-in-IPv4 (Candy 6.x subnet routes encapsulate with it).
IPPROTO_IPIP = 4
_IPV4_ADDRESSES = struct.Struct(">4s4s")


def _need(data: bytes, size: int, name: str) -> None:
    if len(data) < size:
        raise ProtocolError(f"{name} message too short: {len(data)} bytes, need {size}")


def _ip(data: bytes, offset: int) -> IPv4Address:
    return IPv4Address(bytes(data[offset : offset + 4]))


@dataclass(frozen=True, slots=True)
class Auth:
    """AUTH (type 0): bind this connection to ``ip``."""

    ip: IPv4Address
    timestamp: int
    hash: bytes
    padding: bytes = b""

    SIZE = 45

    @classmethod
    def create(cls, password: str, ip: IPv4Address, timestamp: int, padding: bytes = b"") -> Auth:
        """Build an AUTH with its hash computed from ``password``."""
        return cls(ip, timestamp, auth.auth_hash(password, ip.packed, timestamp), padding)

    def verify(self, password: str) -> bool:
        """Whether the hash matches ``password``."""
        return auth.digest_equal(
            self.hash, auth.auth_hash(password, self.ip.packed, self.timestamp)
        )

    def encode(self) -> bytes:
        return b"\x00" + self.ip.packed + _TS.pack(self.timestamp) + self.hash + self.padding

    @classmethod
    def decode(cls, data: bytes) -> Auth:
        _need(data, cls.SIZE, "AUTH")
        return cls(_ip(data, 1), _TS.unpack_from(data, 5)[0], bytes(data[13:45]), bytes(data[45:]))


def ipv4_endpoints(data: bytes, start: int = 0) -> tuple[bytes, bytes]:
    """Source and destination address (4 bytes each) of the IPv4 packet at ``data[start:]``.

    The one reader of packet addresses: a TUN packet (``start=0``) or the packet inside a
    FORWARD, on the WebSocket or between peers (``start=1``, after the type byte). Raises
    :class:`ProtocolError` when there is less than an IPv4 header or the version is not 4.
    A Candy 6.x encapsulated packet is accepted too: its outer header has only protocol 4
    and the two addresses filled in, the version byte left zero (PROTOCOL.md 6.2).
    On the relay's hot path: one call, allocating only the two addresses and their tuple.
    """
    if len(data) < start + IPV4_HEADER_SIZE:
        size = max(len(data) - start, 0)
        raise ProtocolError(f"packet too short for an IPv4 header: {size} bytes, need 20")
    if data[start] >> 4 != 4 and (data[start] != 0 or data[start + 9] != IPPROTO_IPIP):
        raise ProtocolError(f"not an IPv4 packet: IP version {data[start] >> 4}")
    return _IPV4_ADDRESSES.unpack_from(data, start + 12)


@dataclass(frozen=True, slots=True)
class Forward:
    """FORWARD (type 1): one raw IPv4 packet (at least its 20-byte header)."""

    packet: bytes

    def encode(self) -> bytes:
        return b"\x01" + self.packet

    @classmethod
    def decode(cls, data: bytes) -> Forward:
        try:
            ipv4_endpoints(data, 1)
        except ProtocolError as exc:
            raise ProtocolError(f"FORWARD message: {exc}") from None
        return cls(bytes(data[1:]))


def _encode_cidr(cidr: str) -> bytes:
    raw = cidr.encode("ascii")
    if len(raw) >= 32:
        raise ProtocolError(f"cidr {cidr!r} does not fit in 32 bytes")
    return raw.ljust(32, b"\x00")


def _decode_cidr(raw: bytes) -> str:
    text = raw.split(b"\x00", 1)[0]
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("EXPECTED cidr is not ASCII text") from None


@dataclass(frozen=True, slots=True)
class Expected:
    """EXPECTED (type 2): dynamic address request (client) or assignment (server).

    ``cidr`` is the text up to the first NUL; the bytes after it may be garbage (5.6 clients
    leave them uninitialised) and are not kept.
    """

    timestamp: int
    cidr: str
    hash: bytes
    padding: bytes = b""

    SIZE = 73

    @classmethod
    def create(cls, password: str, cidr: str, timestamp: int, padding: bytes = b"") -> Expected:
        return cls(timestamp, cidr, auth.expected_hash(password, timestamp), padding)

    def verify(self, password: str) -> bool:
        return auth.digest_equal(self.hash, auth.expected_hash(password, self.timestamp))

    def encode(self) -> bytes:
        return (
            b"\x02" + _TS.pack(self.timestamp) + _encode_cidr(self.cidr) + self.hash + self.padding
        )

    @classmethod
    def decode(cls, data: bytes) -> Expected:
        _need(data, cls.SIZE, "EXPECTED")
        return cls(
            _TS.unpack_from(data, 1)[0],
            _decode_cidr(bytes(data[9:41])),
            bytes(data[41:73]),
            bytes(data[73:]),
        )


@dataclass(frozen=True, slots=True)
class Peer:
    """PEER (type 3): the sender's public UDP endpoint, for ``dst``."""

    src: IPv4Address
    dst: IPv4Address
    ip: IPv4Address
    port: int

    SIZE = 15

    def encode(self) -> bytes:
        return (
            b"\x03" + self.src.packed + self.dst.packed + _ADDR_PORT.pack(self.ip.packed, self.port)
        )

    @classmethod
    def decode(cls, data: bytes) -> Peer:
        _need(data, cls.SIZE, "PEER")
        ip, port = _ADDR_PORT.unpack_from(data, 9)
        return cls(_ip(data, 1), _ip(data, 5), IPv4Address(ip), port)


@dataclass(frozen=True, slots=True)
class Vmac:
    """VMAC (type 4): the client's 16-byte virtual hardware address."""

    vmac: bytes
    timestamp: int
    hash: bytes
    padding: bytes = b""

    SIZE = 57

    @classmethod
    def create(cls, password: str, vmac: bytes, timestamp: int, padding: bytes = b"") -> Vmac:
        if len(vmac) != 16:
            raise ProtocolError(f"vmac must be 16 bytes, got {len(vmac)}")
        return cls(vmac, timestamp, auth.vmac_hash(password, vmac, timestamp), padding)

    def verify(self, password: str) -> bool:
        return auth.digest_equal(self.hash, auth.vmac_hash(password, self.vmac, self.timestamp))

    def encode(self) -> bytes:
        return b"\x04" + self.vmac + _TS.pack(self.timestamp) + self.hash + self.padding

    @classmethod
    def decode(cls, data: bytes) -> Vmac:
        _need(data, cls.SIZE, "VMAC")
        return cls(
            bytes(data[1:17]), _TS.unpack_from(data, 17)[0], bytes(data[25:57]), bytes(data[57:])
        )


@dataclass(frozen=True, slots=True)
class Discovery:
    """DISCOVERY (type 5): ``dst`` 255.255.255.255 asks every other client to answer."""

    src: IPv4Address
    dst: IPv4Address

    SIZE = 9

    def encode(self) -> bytes:
        return b"\x05" + self.src.packed + self.dst.packed

    @classmethod
    def decode(cls, data: bytes) -> Discovery:
        _need(data, cls.SIZE, "DISCOVERY")
        return cls(_ip(data, 1), _ip(data, 5))


@dataclass(frozen=True, slots=True)
class General:
    """GENERAL (type 255): opaque relayed message; subtype 0 carries a LAN endpoint."""

    subtype: int
    extra: int
    src: IPv4Address
    dst: IPv4Address
    data: bytes = b""

    SIZE = 12

    @classmethod
    def lan_endpoint(
        cls, src: IPv4Address, dst: IPv4Address, ip: IPv4Address, port: int
    ) -> General:
        return cls(GENERAL_LAN, 0, src, dst, _ADDR_PORT.pack(ip.packed, port))

    def endpoint(self) -> tuple[IPv4Address, int] | None:
        """The LAN endpoint of a subtype-0 message, or ``None`` (other subtype, short, zero)."""
        if self.subtype != GENERAL_LAN or len(self.data) < 6:
            return None
        ip, port = _ADDR_PORT.unpack_from(self.data)
        if ip == b"\x00\x00\x00\x00" or port == 0:
            return None
        return IPv4Address(ip), port

    def encode(self) -> bytes:
        return (
            struct.pack(">BBH", GENERAL, self.subtype, self.extra)
            + self.src.packed
            + self.dst.packed
            + self.data
        )

    @classmethod
    def decode(cls, data: bytes) -> General:
        _need(data, cls.SIZE, "GENERAL")
        _, subtype, extra = struct.unpack_from(">BBH", data)
        return cls(subtype, extra, _ip(data, 4), _ip(data, 8), bytes(data[12:]))


@dataclass(frozen=True, slots=True)
class Unknown:
    """A message of a type this implementation does not know (ignored, never an error)."""

    type: int
    data: bytes

    def encode(self) -> bytes:
        return self.data


Message = Auth | Forward | Expected | Peer | Vmac | Discovery | General | Unknown

_DECODERS: dict[int, Callable[[bytes], Message]] = {
    AUTH: Auth.decode,
    FORWARD: Forward.decode,
    EXPECTED: Expected.decode,
    PEER: Peer.decode,
    VMAC: Vmac.decode,
    DISCOVERY: Discovery.decode,
    GENERAL: General.decode,
}


def decode(data: bytes) -> Message:
    """Decode one frame payload; raises :class:`ProtocolError` when malformed."""
    if not data:
        raise ProtocolError("empty message")
    decoder = _DECODERS.get(data[0])
    if decoder is None:
        return Unknown(data[0], bytes(data))
    return decoder(data)
