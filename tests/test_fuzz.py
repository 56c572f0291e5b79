"""Bounded, deterministic fuzzing of every decoder and both cores (targets: fuzz_targets.py).

Each target gets its seeds, then a fixed hypothesis budget (``derandomize=True``: the same
examples every run). The invariants are described in tests/fuzz_targets.py; the long run is
``python -m bench.fuzz`` (bench/FUZZ.md).

Known and newly found bugs are tolerated by the fuzz runs (``fuzz_targets.TOLERATED``) and
each has a strict xfail regression test below: when a fix lands, its test XPASSes and fails
the suite, which is the signal to delete the xfail mark and the TOLERATED entry.
"""

from __future__ import annotations

import random
import struct
from ipaddress import IPv4Address, IPv4Interface

import fuzz_targets as ft
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis import target as target_score

from candy_core import messages as m
from candy_core.client import Client, ClientState
from candy_core.config import ClientConfig
from candy_core.crypto import PeerCipher, peer_key
from candy_core.server import RelayServer

#: Hypothesis examples per target: about 17 s in all on one core (about 20 s with the rest).
BUDGET = {
    "messages": 700,
    "wsframe": 800,
    "upgrade": 600,
    "stun": 700,
    "peer": 700,
    "server": 1500,
    "client": 1500,
}


def _settings(name: str) -> settings:
    return settings(
        max_examples=BUDGET[name],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- the fuzz runs ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ft.TARGETS))
def test_seeds_keep_the_invariants(name: str) -> None:
    target = ft.TARGETS[name]
    for seed in target.seeds():
        ft.run_target(target, seed, ft.TOLERATED)


def _fuzz_test(name: str):
    target = ft.TARGETS[name]

    @_settings(name)
    @given(st.binary(max_size=target.max_len))
    def test(data: bytes) -> None:
        features, _ = ft.run_target(target, data, ft.TOLERATED)
        target_score(float(len(features)), label="features")  # steer towards richer runs

    test.__name__ = f"test_fuzz_{name}"
    return test


test_fuzz_messages = _fuzz_test("messages")
test_fuzz_wsframe = _fuzz_test("wsframe")
test_fuzz_upgrade = _fuzz_test("upgrade")
test_fuzz_stun = _fuzz_test("stun")
test_fuzz_peer = _fuzz_test("peer")
test_fuzz_server = _fuzz_test("server")
test_fuzz_client = _fuzz_test("client")


# --- memory floods ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["server_unknown_types", "server_connections", "server_paused_backlog",
             "client_discovery", "client_sources"]
)  # fmt: skip
def test_flood_levels_off(name: str) -> None:
    ft.FLOODS[name]()


EMPTY_FRAGMENTS = (
    "NEW: FrameParser keeps one list slot per empty continuation frame; an unfinished "
    "message of empty fragments grows without bound (max_size does not apply)"
)


def test_flood_wsframe_empty_fragments() -> None:
    ft.flood_wsframe_empty_fragments()


def test_flood_server_empty_fragments() -> None:
    ft.flood_server_empty_fragments()


def test_flood_client_empty_fragments() -> None:
    ft.flood_client_empty_fragments()


def test_flood_client_routes() -> None:
    ft.flood_client_routes()


# --- regression tests: known bugs (xfail until fixed) ---------------------------------------
def _joined(count: int = 1) -> RelayServer:
    server, _ = ft._joined_server(count)
    return server


@pytest.mark.parametrize("payload", [b"\x03", b"\x00\x00", b"\x03\xed", b"\x13\x88"])
def test_server_close_echo_is_a_valid_close(payload: bytes) -> None:
    server = _joined()
    stream = ft.WsStream("server", True, [])
    server.receive_data(1, ft.ws_frame(8, payload, b"abcd"), 101.0, ft.WALL0)
    for _, data in server.data_to_send():
        stream.feed(data)


@pytest.mark.parametrize("payload", [b"\x03", b"\x00\x00", b"\x03\xed", b"\x13\x88"])
def test_client_close_echo_is_a_valid_close(payload: bytes) -> None:
    client, _, now = ft._connected_client()
    stream = ft.WsStream("client", False, [])
    client.receive_data(ft.ws_frame(8, payload), now, ft.WALL0)
    stream.feed(client.data_to_send())


@pytest.mark.parametrize(
    ("now", "timestamp_ms"),
    [(1000.0, -(2**63)), (1000.0, -(2**31)), (3e6, 0)],  # 3e6 s: a month of uptime
)
def test_client_delay_echo_with_an_extreme_timestamp(now: float, timestamp_ms: int) -> None:
    client, cipher, _ = ft._connected_client(route=5)
    echo = struct.pack(">B4s4sq", 2, ft.OWN, ft.PEERS[0], timestamp_ms)
    datagram = cipher.seal(peer_key(ft.PASSWORD, ft.OWN), echo)
    client.receive_datagram(datagram, ft.PEER_ADDRS[0], now)


def test_short_forwards_of_every_length_are_dropped_cleanly() -> None:
    """Reported as an IndexError for a 17-byte FORWARD; not reproduced at this commit."""
    server = _joined(2)
    stream = ft.WsStream("server", True, [])
    for size in range(1, 30):
        payload = (b"\x01" + ft.ipv4_packet(ft.IPS[0], ft.IPS[1], 40))[:size]
        server.receive_data(1, ft.ws_frame(2, payload, b"abcd"), 101.0, ft.WALL0)
        for cid, data in server.data_to_send():
            assert cid == 2 and size >= 21
            stream.feed(data)
    assert server.stats.frames_relayed == 9


def test_client_sends_nothing_after_close() -> None:
    cfg = ClientConfig(password=ft.PASSWORD, tun=IPv4Interface("10.99.0.1/24"))
    client = Client(cfg, random.Random(0), ClientState(ft.VMACS[0]))
    client.start(0.0)
    assert client.take_connect_request()
    client.connection_made(0.0, ft._NONCE)
    client.receive_data(ft._RESPONSE_101, 0.0, ft.WALL0)
    client.data_to_send()
    client.close()
    client.data_to_send()
    assert client.take_close_request()
    client.receive_packet(ft.ipv4_packet(ft.OWN, ft.PEERS[0], 28), 1.0)
    assert client.data_to_send() == b""


# --- the harness catches what it claims to catch --------------------------------------------
def test_harness_catches_a_spoofed_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    class Spoofing(RelayServer):
        def data_to_send(self):  # type: ignore[no-untyped-def]
            out = super().data_to_send()
            if len(self.clients) >= 2:
                forward = b"\x01" + ft.ipv4_packet(b"\x0a\x63\x00\x4d", ft.IPS[1], 28)
                out.append((1, ft.ws_frame(2, forward)))
            return out

    monkeypatch.setattr(ft, "RelayServer", Spoofing)
    program = ft._prog(1, 0, 5, 0, 5, 0, 0, 0, b"mask")
    with pytest.raises(ft.InvariantViolation, match="spoofed source"):
        ft.fuzz_server(program)


def test_harness_catches_an_escaping_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    class Fragile(RelayServer):
        def receive_data(self, cid, data, now, wall):  # type: ignore[no-untyped-def]
            if b"boom" in data:
                raise KeyError("boom")
            super().receive_data(cid, data, now, wall)

    monkeypatch.setattr(ft, "RelayServer", Fragile)
    with pytest.raises(ft.InvariantViolation, match="raised KeyError") as info:
        ft.fuzz_server(ft._prog(0, 0, 10, 0, 4, b"boom"))
    assert "server.receive_data(1, 626f6f6d" in info.value.describe()


def test_harness_catches_an_unmasked_client_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unmasked(Client):
        def data_to_send(self) -> bytes:
            data = super().data_to_send()
            if not data or data.startswith(b"GET "):
                return data
            return data + ft.ws_frame(2, b"\x05" + ft.OWN + ft.PEERS[0])  # not masked

    monkeypatch.setattr(ft, "Client", Unmasked)
    with pytest.raises(ft.InvariantViolation, match=r"invalid WebSocket frame|malformed"):
        for seed in ft.TARGETS["client"].seeds():
            ft.fuzz_client(seed)


def test_messages_target_round_trips_what_it_decodes() -> None:
    feats = ft.fuzz_messages(b"\x00" + m.Auth.create("x", IPv4Address(ft.OWN), 5).encode()[1:])
    assert "ok:Auth" in feats
    assert ft.fuzz_messages(b"\x01" + b"\x45" * 5) == {
        "err:FORWARD message: packet too short for an IPvN he"
    }


def test_peer_target_opens_what_it_seals() -> None:
    cipher = PeerCipher(random.Random(0))
    datagram = cipher.seal(ft._PEER_KEY, b"\x00" + bytes(11))
    assert "mode:0:closed" not in ft.fuzz_peer(b"\x00\x00" + datagram)
