"""RFC 5389 STUN Binding codec (pure): build requests, parse success responses.

Only what Candy needs: a Binding Request (optionally with the CHANGE-REQUEST attribute that
the 5.6 client sends) and the public IPv4 endpoint from a Binding success response. The
server side (:func:`build_binding_response`) serves the simulator and end-to-end test tools.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from candy_core.errors import StunError

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
TRANSACTION_ID_SIZE = 12

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_CHANGE_REQUEST = 0x0003
ATTR_XOR_MAPPED_ADDRESS = 0x0020

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_HEADER = struct.Struct("!HHI12s")
_ATTR = struct.Struct("!HH")
_ADDRESS_V4 = struct.Struct("!xBH4s")


def build_binding_request(transaction_id: bytes, change_request: bool = False) -> bytes:
    """Encode a Binding Request; ``change_request`` appends CHANGE-REQUEST=0 (28 bytes, as 5.6)."""
    if len(transaction_id) != TRANSACTION_ID_SIZE:
        raise StunError(f"transaction id must be 12 bytes, got {len(transaction_id)}")
    body = _ATTR.pack(ATTR_CHANGE_REQUEST, 4) + bytes(4) if change_request else b""
    return _HEADER.pack(BINDING_REQUEST, len(body), MAGIC_COOKIE, transaction_id) + body


def build_binding_response(transaction_id: bytes, ip: str, port: int) -> bytes:
    """Encode a Binding success response whose XOR-MAPPED-ADDRESS is ``ip:port`` (32 bytes).

    This is what a STUN server answers a Binding Request with: ``transaction_id`` is the
    request's, ``ip:port`` the source address the request came from.
    """
    if len(transaction_id) != TRANSACTION_ID_SIZE:
        raise StunError(f"transaction id must be 12 bytes, got {len(transaction_id)}")
    try:
        packed = IPv4Address(ip).packed
    except ValueError:
        raise StunError(f"not an IPv4 address: {ip!r}") from None
    if not 0 <= port <= 0xFFFF:
        raise StunError(f"port out of range: {port}")
    xport = port ^ (MAGIC_COOKIE >> 16)
    xaddr = (int.from_bytes(packed, "big") ^ MAGIC_COOKIE).to_bytes(4, "big")
    value = _ADDRESS_V4.pack(FAMILY_IPV4, xport, xaddr)
    body = _ATTR.pack(ATTR_XOR_MAPPED_ADDRESS, len(value)) + value
    return _HEADER.pack(BINDING_SUCCESS, len(body), MAGIC_COOKIE, transaction_id) + body


def looks_like_stun(data: bytes) -> bool:
    """Cheap check: at least a header, top two bits zero and the magic cookie in place."""
    return len(data) >= HEADER_SIZE and data[0] & 0xC0 == 0 and data[4:8] == _COOKIE_BYTES


def parse_binding_response(data: bytes, transaction_id: bytes | None) -> tuple[str, int]:
    """Return the ``("a.b.c.d", port)`` of a Binding success response, strictly validated.

    XOR-MAPPED-ADDRESS is preferred over MAPPED-ADDRESS; ``transaction_id=None`` skips the
    id check (5.6 sends an all-zero id). Unknown attributes are ignored, because classic
    servers answer CHANGE-REQUEST with RFC 3489 attributes. Raises :class:`StunError`.
    """
    if len(data) < HEADER_SIZE:
        raise StunError(f"STUN message truncated: {len(data)} bytes, header needs {HEADER_SIZE}")
    msg_type, length, cookie, tid = _HEADER.unpack_from(data)
    if msg_type != BINDING_SUCCESS:
        raise StunError(f"not a Binding success response: type 0x{msg_type:04x}")
    if cookie != MAGIC_COOKIE:
        raise StunError(f"bad magic cookie 0x{cookie:08x}")
    if length != len(data) - HEADER_SIZE:
        raise StunError(
            f"STUN length field {length} does not match the {len(data) - HEADER_SIZE} "
            "bytes after the header"
        )
    if length % 4:
        raise StunError(f"STUN length field {length} is not a multiple of 4")
    if transaction_id is not None and tid != transaction_id:
        raise StunError("transaction id does not match the request")

    found: dict[int, bytes] = {}
    offset, end = HEADER_SIZE, len(data)
    while offset < end:
        if end - offset < _ATTR.size:
            raise StunError(f"attribute header truncated at offset {offset}")
        attr_type, attr_len = _ATTR.unpack_from(data, offset)
        start = offset + _ATTR.size
        padded = (attr_len + 3) & ~3
        if start + padded > end:
            raise StunError(
                f"attribute 0x{attr_type:04x} length {attr_len} overruns the message "
                f"at offset {offset}"
            )
        found.setdefault(attr_type, bytes(data[start : start + attr_len]))
        offset = start + padded

    if ATTR_XOR_MAPPED_ADDRESS in found:
        return _decode_address(found[ATTR_XOR_MAPPED_ADDRESS], xor=True)
    if ATTR_MAPPED_ADDRESS in found:
        return _decode_address(found[ATTR_MAPPED_ADDRESS], xor=False)
    raise StunError("no XOR-MAPPED-ADDRESS or MAPPED-ADDRESS in the response")


def _decode_address(value: bytes, xor: bool) -> tuple[str, int]:
    """Decode a (XOR-)MAPPED-ADDRESS value; only the IPv4 family is accepted."""
    name = "XOR-MAPPED-ADDRESS" if xor else "MAPPED-ADDRESS"
    if len(value) < 4:
        raise StunError(f"{name} too short: {len(value)} bytes")
    family = value[1]
    if family == FAMILY_IPV6:
        raise StunError(f"{name} is IPv6; only IPv4 is supported")
    if family != FAMILY_IPV4:
        raise StunError(f"{name} has unknown address family 0x{family:02x}")
    if len(value) != _ADDRESS_V4.size:
        raise StunError(f"{name} IPv4 value must be 8 bytes, got {len(value)}")
    _, port, addr = _ADDRESS_V4.unpack(value)
    if xor:
        port ^= MAGIC_COOKIE >> 16
        addr = (int.from_bytes(addr, "big") ^ MAGIC_COOKIE).to_bytes(4, "big")
    return ".".join(map(str, addr)), port
