"""Test packets for simulated scenarios: ICMP echo requests that can be told apart by number."""

from __future__ import annotations

from ipaddress import IPv4Address

from candy_core.icmp import ECHO_REQUEST, echo, parse_echo

__all__ = ["icmp", "icmp_seq"]

_IDENT = 0x4341


def icmp(
    src: str | IPv4Address, dst: str | IPv4Address, seq: int, payload: bytes = b"candy-sim"
) -> bytes:
    """An IPv4 ICMP echo request from ``src`` to ``dst`` with sequence number ``seq``.

    Header and ICMP checksums are valid, so the packet could be written to a real TUN device.
    """
    src_ip, dst_ip = IPv4Address(str(src)).packed, IPv4Address(str(dst)).packed
    return echo(src_ip, dst_ip, _IDENT, seq, payload)


def icmp_seq(packet: bytes) -> int | None:
    """The sequence number of an ICMP echo request, or ``None``."""
    fields = parse_echo(packet)
    return fields.seq if fields is not None and fields.kind == ECHO_REQUEST else None
