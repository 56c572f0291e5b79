"""Peer message codec (PROTOCOL.md 4.3): sizes, round trips, and every truncation refused."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from candy_core import ProtocolError
from candy_core import peermsg as pm

A, B = IPv4Address("10.77.0.11"), IPv4Address("10.77.0.12")
SAMPLES = {
    "heartbeat": (pm.Heartbeat(A, IPv4Address("198.51.100.7"), 4051, True), 12),
    "delay": (pm.Delay(A, B, -(2**63)), 17),
    "route": (pm.Route(A, B, pm.ROUTE_WITHDRAWN), 13),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_size_and_round_trip(name: str) -> None:
    msg, size = SAMPLES[name]
    data = msg.encode()
    assert len(data) == size
    assert type(msg).decode(data) == msg
    assert type(msg).decode(data + b"padding") == msg  # bytes after the fixed part are ignored


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_truncation_is_a_protocol_error(name: str) -> None:
    msg, size = SAMPLES[name]
    data = msg.encode()
    for n in range(size):
        with pytest.raises(ProtocolError, match="too short"):
            type(msg).decode(data[:n])
