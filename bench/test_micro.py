"""Per-frame costs of the core's hot paths, each next to a baseline measured in the same run.

Run: python -m pytest bench/test_micro.py --benchmark-only
"""

from __future__ import annotations

import os
import random
from ipaddress import IPv4Address, IPv4Interface

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from candy_core import messages as m
from candy_core import stun
from candy_core.client import Client, ClientState
from candy_core.config import ClientConfig, ServerConfig
from candy_core.crypto import PeerCipher, peer_key
from candy_core.server import RelayServer
from candy_core.upgrade import ClientUpgrade
from candy_core.wsframe import OP_BINARY, encode_frame

WALL = 1_800_000_000
A = IPv4Address("10.99.0.1")
B = IPv4Address("10.99.0.2")


def ip_packet(size: int = 1400, src: IPv4Address = A, dst: IPv4Address = B) -> bytes:
    header = bytes.fromhex("45000000000100004011") + b"\x00\x00" + src.packed + dst.packed
    header = header[:2] + size.to_bytes(2, "big") + header[4:]
    return header + os.urandom(size - len(header))


def _joined_server() -> RelayServer:
    server = RelayServer(ServerConfig.from_strings("pw", "10.99.0.0/24"), random.Random(1))
    for cid, ip in (("a", A), ("b", B)):
        server.connection_made(cid, 0.0)
        upgrade = ClientUpgrade("h", 80, "/", b"dGhlIHNhbXBsZSBub25jZQ==")
        server.receive_data(cid, upgrade.request(), 0.0, WALL)
        auth = m.Auth.create("pw", ip, WALL).encode()
        server.receive_data(cid, encode_frame(OP_BINARY, auth, os.urandom(4)), 0.0, WALL)
    server.data_to_send()
    return server


def test_server_relay_frame(benchmark: pytest.FixtureRequest) -> None:
    """Server core: A's raw TCP bytes of one 1400-byte FORWARD in, B's bytes out."""
    server = _joined_server()
    wire = encode_frame(OP_BINARY, b"\x01" + ip_packet(), os.urandom(4))

    def relay() -> list:
        server.receive_data("a", wire, 1.0, WALL)
        return server.data_to_send()

    out = benchmark(relay)
    assert out and out[0][0] == "b"


def test_baseline_wsproto_receive_send(benchmark: pytest.FixtureRequest) -> None:
    """Baseline: wsproto parsing the same masked frame and sending it on unmasked."""
    wire = encode_frame(OP_BINARY, b"\x01" + ip_packet(), os.urandom(4))
    receiver = FrameProtocol(client=False, extensions=[])
    sender = FrameProtocol(client=False, extensions=[])

    def relay() -> bytes:
        receiver.receive_bytes(wire)
        frame = next(iter(receiver.received_frames()))
        assert frame.opcode is Opcode.BINARY
        return sender.send_data(frame.payload, fin=True)

    benchmark(relay)


def _client() -> Client:
    config = ClientConfig(password="pw", tun=IPv4Interface(f"{A}/24"), confusion=False)
    client = Client(config, random.Random(2), ClientState(b"0123456789abcdef"))
    client.start(0.0)
    client.take_connect_request()
    client.connection_made(0.0)
    request = client.data_to_send()
    assert request.startswith(b"GET")
    from candy_core.upgrade import ServerUpgrade

    accept = ServerUpgrade().receive(request).reply
    client.receive_data(accept, 0.0, WALL)
    client.data_to_send()
    return client


def test_client_tun_to_websocket(benchmark: pytest.FixtureRequest) -> None:
    """Client core: one TUN packet in, masked WebSocket bytes out."""
    client = _client()
    packet = ip_packet()

    def send() -> bytes:
        client.receive_packet(packet, 1.0)
        return client.data_to_send()

    assert len(benchmark(send)) > 1400


def test_client_websocket_to_tun(benchmark: pytest.FixtureRequest) -> None:
    """Client core: the server's bytes of one FORWARD in, the TUN packet out."""
    client = _client()
    wire = encode_frame(OP_BINARY, b"\x01" + ip_packet(src=B, dst=A))

    def receive() -> list:
        client.receive_data(wire, 1.0, WALL)
        return client.packets_to_deliver()

    assert len(benchmark(receive)) == 1


def test_peer_seal_open(benchmark: pytest.FixtureRequest) -> None:
    """Peer datagram: seal and open one 1401-byte FORWARD (AES-256-GCM, random IV)."""
    cipher = PeerCipher(random.SystemRandom())
    key = peer_key("pw", B.packed)
    plain = b"\x01" + ip_packet()

    def roundtrip() -> bytes | None:
        return cipher.open(key, cipher.seal(key, plain))

    assert benchmark(roundtrip) == plain


def test_baseline_aesgcm(benchmark: pytest.FixtureRequest) -> None:
    """Baseline: AESGCM encrypt+decrypt of the same data with a fresh os.urandom IV."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(peer_key("pw", B.packed))
    plain = b"\x01" + ip_packet()

    def roundtrip() -> bytes:
        iv = os.urandom(12)
        return aead.decrypt(iv, aead.encrypt(iv, plain, None), None)

    assert benchmark(roundtrip) == plain


def test_stun_parse(benchmark: pytest.FixtureRequest) -> None:
    """STUN: parse a Binding success response."""
    tid = os.urandom(12)
    data = stun.build_binding_response(tid, "198.51.100.7", 40123)
    assert benchmark(stun.parse_binding_response, data, tid) == ("198.51.100.7", 40123)
