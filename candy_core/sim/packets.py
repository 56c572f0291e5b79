"""Test packets for simulated scenarios: ICMP echo requests that can be told apart by number."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

__all__ = ["icmp", "icmp_seq"]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp(
    src: str | IPv4Address, dst: str | IPv4Address, seq: int, payload: bytes = b"candy-sim"
) -> bytes:
    """An IPv4 ICMP echo request from ``src`` to ``dst`` with sequence number ``seq``.

    Header and ICMP checksums are valid, so the packet could be written to a real TUN device.
    """
    body = struct.pack("!BBHHH", 8, 0, 0, 0x4341, seq & 0xFFFF) + payload
    body = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(body),
        seq & 0xFFFF,
        0,
        64,
        1,
        0,
        IPv4Address(str(src)).packed,
        IPv4Address(str(dst)).packed,
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + body


def icmp_seq(packet: bytes) -> int | None:
    """The sequence number of an ICMP echo built by :func:`icmp`, or ``None``."""
    if len(packet) < 28 or packet[0] != 0x45 or packet[9] != 1 or packet[20] != 8:
        return None
    return int.from_bytes(packet[26:28], "big")
