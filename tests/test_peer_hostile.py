"""Hostile peer datagrams: replays from other addresses, endpoint theft, extreme DELAY and ROUTE.

A client at 10.77.0.12 with routing on, and a CONNECTED peer 10.77.0.11. Everything sealed
here is sealed under K(10.77.0.12), as every datagram to that client is, whoever sends it.
"""

from __future__ import annotations

import random
import struct
from ipaddress import IPv4Address, IPv4Interface

import pytest

from candy_core import ClientConfig
from candy_core import messages as m
from candy_core import peermsg as pm
from candy_core.crypto import PeerCipher, peer_key
from candy_core.peers import (
    ENDPOINT_SILENCE,
    HEARTBEAT_MEMORY,
    MAX_ROUTES,
    REPLAY_WINDOW,
    PeerManager,
    State,
)

PASSWORD = "hostile"
US = IPv4Address("10.77.0.12")
THEM = IPv4Address("10.77.0.11")
THIRD = IPv4Address("10.77.0.13")
ENDPOINT = ("198.51.100.11", 40000)
ATTACKER = ("203.0.113.66", 40001)
SEAL = PeerCipher(random.Random(5))
KEY = peer_key(PASSWORD, US.packed)


def seal(plaintext: bytes) -> bytes:
    return SEAL.seal(KEY, plaintext)


def heartbeat(ack: bool = True) -> bytes:
    return seal(pm.Heartbeat(THEM, IPv4Address(ENDPOINT[0]), ENDPOINT[1], ack).encode())


def packet(src: IPv4Address, dst: IPv4Address, payload: bytes = b"data") -> bytes:
    total = 20 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0, src.packed, dst.packed)
    return header + payload


class Peers:
    """A PeerManager at US with THEM connected at ENDPOINT; ``now`` moves forward by hand."""

    def __init__(self, route: int = 5) -> None:
        config = ClientConfig(
            password=PASSWORD, stun=("192.0.2.1", 3478), route=route, localhost="192.0.2.12"
        )
        self.messages: list[bytes] = []
        self.pm = PeerManager(config, random.Random(1), self._send)
        self.pm.local_port = 5000
        self.pm.set_address(IPv4Interface(f"{US}/24"))
        self.now = 100.0
        lan = m.General.lan_endpoint(THEM, US, IPv4Address(ENDPOINT[0]), ENDPOINT[1])
        self.pm.receive_message(lan, self.now)
        self.receive(heartbeat(ack=False))
        self.receive(heartbeat(ack=True))
        assert self.state() is State.CONNECTED and self.endpoint() == ENDPOINT
        self.pm.datagrams_to_send()

    def _send(self, data: bytes) -> bool:
        self.messages.append(data)
        return True

    def receive(self, datagram: bytes, addr: tuple[str, int] = ENDPOINT) -> list[bytes]:
        return self.pm.receive_datagram(datagram, addr, self.now)

    def status(self) -> object:
        (status,) = [s for s in self.pm.peer_status() if s.ip == THEM]
        return status

    def state(self) -> State:
        return State(self.status().state)  # type: ignore[attr-defined]

    def endpoint(self) -> tuple[str, int] | None:
        return self.status().endpoint  # type: ignore[attr-defined, no-any-return]

    def tick(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + 0.5)
            self.pm.handle_timer(self.now)


# --- replays ------------------------------------------------------------------------------------
def test_a_datagram_replayed_from_another_address_is_dropped() -> None:
    peers = Peers()
    data = seal(b"\x01" + packet(THEM, US))
    assert peers.receive(data) == [packet(THEM, US)]
    assert peers.receive(data, ("198.51.100.11", 40002)) == []  # same bytes, another port
    assert peers.receive(data, ATTACKER) == []
    assert peers.pm.stats.replayed == 2


def test_the_replay_window_is_one_bounded_window_for_all_sources() -> None:
    peers = Peers()
    first = seal(b"\x01" + packet(THEM, US, b"first"))
    assert peers.receive(first, ATTACKER) == [packet(THEM, US, b"first")]
    for i in range(REPLAY_WINDOW):  # from many sources: still one window, still bounded
        peers.receive(seal(b"\x01" + packet(THEM, US)), (f"203.0.113.{i % 250}", 1000 + i))
    # Out of the window now: data replays that old are the documented limit (no sequence
    # numbers in the 5.6 format); memory stays bounded whatever the sources.
    assert peers.receive(first, ATTACKER) == [packet(THEM, US, b"first")]
    assert len(peers.pm._replay._seen) == REPLAY_WINDOW


def test_a_replayed_heartbeat_does_not_move_the_endpoint() -> None:
    peers = Peers()
    captured = heartbeat()
    peers.receive(captured)
    peers.tick(ENDPOINT_SILENCE + 1)  # the real endpoint goes silent; the state is still up
    peers.receive(heartbeat())
    for _ in range(REPLAY_WINDOW + 10):  # bulk traffic pushes it out of the datagram window
        peers.receive(seal(b"\x01" + packet(THEM, US)))
    peers.tick(ENDPOINT_SILENCE + 0.5)
    assert peers.state() is State.CONNECTED
    peers.receive(captured, ATTACKER)  # minutes later than the datagram window remembers
    assert peers.endpoint() == ENDPOINT
    assert peers.pm.stats.replayed >= 1


def test_heartbeats_are_remembered_for_a_bounded_time() -> None:
    peers = Peers()
    captured = heartbeat()
    peers.receive(captured)
    assert len(peers.pm._heartbeat_ivs) <= 3
    peers.now += HEARTBEAT_MEMORY + 1
    peers.receive(heartbeat())  # anything arriving expires what is older than the memory
    assert len(peers.pm._heartbeat_ivs) == 1


def test_a_fresh_heartbeat_from_a_new_address_waits_for_the_old_one_to_go_silent() -> None:
    peers = Peers()
    peers.receive(heartbeat(), ATTACKER)  # a member elsewhere, or a rebinding NAT: fresh
    assert peers.endpoint() == ENDPOINT  # the current endpoint spoke just now: it stays
    assert peers.pm.stats.endpoint_moves_refused == 1
    peers.tick(1.0)
    peers.receive(heartbeat())
    peers.tick(ENDPOINT_SILENCE - 0.5)
    peers.receive(heartbeat(), ATTACKER)
    assert peers.endpoint() == ENDPOINT
    peers.tick(0.5)  # now silent for ENDPOINT_SILENCE: a fresh heartbeat moves it (rebinding)
    peers.receive(heartbeat(), ATTACKER)
    assert peers.endpoint() == ATTACKER
    assert peers.state() is State.CONNECTED


# --- DELAY ------------------------------------------------------------------------------------
@pytest.mark.parametrize("timestamp", [-(2**31), -1, 0, 2**62])
def test_a_delay_echo_with_an_extreme_timestamp_is_ignored(timestamp: int) -> None:
    """The plaintext of the report was 02 0a4d000c 0a4d000b ffffffff80000000."""
    peers = Peers()
    peers.now = 30 * 86400.0  # the monotonic clock past 24.8 days: timestamp 0 overflowed
    peers.receive(heartbeat())
    echo = pm.Delay(US, THEM, timestamp).encode()
    assert peers.receive(seal(echo)) == []  # no struct.error out of the core
    assert peers.status().delay_ms is None  # type: ignore[attr-defined]
    assert peers.pm.stats.implausible == 1


def test_the_reported_delay_plaintext_is_refused_cleanly() -> None:
    peers = Peers()
    plain = bytes.fromhex("02 0a4d000c 0a4d000b ffffffff80000000".replace(" ", ""))
    assert peers.receive(seal(plain)) == []
    assert peers.pm.stats.implausible == 1


def test_a_true_delay_echo_is_measured_and_announced_within_32_bits() -> None:
    peers = Peers(route=1000)
    echo = pm.Delay(US, THEM, int(peers.now * 1000) - 25).encode()
    peers.receive(seal(echo))
    assert peers.status().delay_ms == 25  # type: ignore[attr-defined]


# --- ROUTE ------------------------------------------------------------------------------------
def route(dst: IPv4Address, delay: int) -> bytes:
    return seal(pm.Route(dst, THEM, delay).encode())


def with_direct_route() -> Peers:
    peers = Peers()
    peers.receive(seal(pm.Delay(US, THEM, int(peers.now * 1000) - 10).encode()))
    return peers


def test_the_route_table_is_bounded_and_holds_only_members() -> None:
    peers = with_direct_route()
    for i in range(60_000):  # one peer announcing a new destination each time
        peers.receive(route(IPv4Address(0x0A000000 + i), 5))
    assert len(peers.pm._routes) == 1  # none of 10.0.x.x is inside 10.77.0.0/24
    for host in range(1, 255):
        peers.receive(route(IPv4Address(f"10.77.0.{host}"), 5))
    assert len(peers.pm._routes) <= min(MAX_ROUTES, 254)
    for outside in ("10.77.0.0", "10.77.0.255", "192.0.2.1"):
        assert IPv4Address(outside).packed not in peers.pm._routes


@pytest.mark.parametrize("delay", [-1, -(2**31)])
def test_a_negative_route_delay_cannot_win(delay: int) -> None:
    peers = with_direct_route()
    peers.receive(route(THIRD, delay))
    assert THIRD.packed not in peers.pm._routes
    assert peers.pm.stats.implausible == 1


def test_route_delays_add_up_without_overflow() -> None:
    peers = with_direct_route()
    peers.receive(route(THIRD, pm.ROUTE_WITHDRAWN - 1))  # + 10 ms direct: clamped, kept
    assert peers.pm._routes[THIRD.packed].delay == pm.ROUTE_WITHDRAWN - 1
    assert pm.Route(THIRD, US, peers.pm._routes[THIRD.packed].delay).encode()  # packs


def test_the_route_table_stops_at_max_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    from candy_core import peers as peers_module

    monkeypatch.setattr(peers_module, "MAX_ROUTES", 16)
    peers = with_direct_route()
    for host in range(1, 255):
        peers.receive(route(IPv4Address(f"10.77.0.{host}"), 5))
    assert len(peers.pm._routes) == 16
    assert peers.pm.stats.implausible >= 254 - 16 - 2
