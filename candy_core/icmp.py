"""ICMP echo packets: built for ``candy ping`` and the simulator, recognised in replies."""

from __future__ import annotations

import struct
from typing import NamedTuple

ECHO_REPLY = 0
ECHO_REQUEST = 8
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_ECHO = struct.Struct("!BBHHH")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo(
    src: bytes, dst: bytes, ident: int, seq: int, payload: bytes, kind: int = ECHO_REQUEST
) -> bytes:
    """An IPv4 ICMP echo (request by default) with valid header and ICMP checksums."""
    body = _ECHO.pack(kind, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + payload
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    header = _IPV4.pack(0x45, 0, 20 + len(body), seq & 0xFFFF, 0, 64, 1, 0, src, dst)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + body


class Echo(NamedTuple):
    """The fields of an ICMP echo request or reply."""

    kind: int
    ident: int
    seq: int
    src: bytes
    dst: bytes


def parse_echo(packet: bytes) -> Echo | None:
    """The echo fields of ``packet``, or None if it is not an IPv4 ICMP echo request/reply."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8 or packet[ihl] not in (ECHO_REQUEST, ECHO_REPLY):
        return None
    kind, _, _, ident, seq = _ECHO.unpack_from(packet, ihl)
    return Echo(kind, ident, seq, packet[12:16], packet[16:20])
