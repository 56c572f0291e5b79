"""Per-frame costs of the core's hot paths, each next to a baseline measured in the same run.

The last group measures each shell's relay I/O path: a ``candy`` server daemon per runtime on
127.0.0.1, fed by raw-socket clients (no root needed); see the comment above FRAMES.

Run: python -m pytest bench/test_micro.py --benchmark-only
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface

import pytest
import rawws  # bench/rawws.py (pytest puts bench/ on sys.path)
from wsproto.frame_protocol import FrameProtocol, Opcode

from candy_core import Client, ClientConfig, ClientState, RelayServer, ServerConfig, stun
from candy_core import messages as m
from candy_core.crypto import PeerCipher, peer_key
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


# --- the shells' relay I/O path on 127.0.0.1 ------------------------------------------------
#
# A relay daemon of each runtime (``python -m shells.cli -m server``) in a subprocess; two
# raw-socket clients in this process join it, then A pushes pre-built masked 1400-byte
# FORWARD frames at B through it, at most WINDOW frames in flight so that the server's
# bounded per-connection queue never has to drop. One round moves FRAMES frames; frames/s
# and µs/frame are in each result's extra_info. The baseline is the cheapest possible relay
# on the same loopback: a uvloop program copying A's bytes to B without looking at them.


FRAMES = 2000
WINDOW = 256
BATCH = 32
ROUND_TIMEOUT = 30.0
SHELL_RUNTIMES = ["asyncio", "gevent", "threaded"]

_SPLICE_SERVER = r"""
import asyncio, sys
try:
    import uvloop
    uvloop.install()
except ImportError:
    pass
conns = []
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        conns.append(self)
    def data_received(self, data):
        for c in conns:
            if c is not self:
                c.t.write(data)
    def connection_lost(self, exc):
        conns.remove(self)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
    print("relay listening on", srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()
asyncio.run(main())
"""


class _Pair:
    """Two joined raw clients and the bytes B receives per frame A sends."""

    def __init__(self, a: socket.socket, b: socket.socket, frame: bytes, out_len: int) -> None:
        self.a, self.b = a, b
        self.batch = frame * BATCH
        self.out_len = out_len
        for s in (a, b):
            s.setblocking(False)

    def relay(self, frames: int = FRAMES, window: int = WINDOW) -> int:
        """Push ``frames`` frames from A and wait until B has all of them; returns frames.

        At most ``window`` frames are in flight; ``window=1`` makes it a ping-pong.
        """
        a, b, out_len = self.a, self.b, self.out_len
        batch = min(BATCH, window)
        target = frames * out_len
        sent = received = 0
        pending = memoryview(b"")
        deadline = time.monotonic() + ROUND_TIMEOUT
        while received < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"B got {received // out_len} of {frames} frames")
            if not pending and sent < frames and sent - received // out_len < window:
                n = min(batch, frames - sent, window - (sent - received // out_len))
                pending = memoryview(self.batch)[: n * (len(self.batch) // BATCH)]
                sent += n
            readable, writable, _ = select.select([b], [a] if pending else [], [], 1.0)
            if writable:
                with contextlib.suppress(BlockingIOError):
                    pending = pending[a.send(pending) :]
            if readable:
                while True:
                    try:
                        data = b.recv(1 << 20)
                    except BlockingIOError:
                        break
                    if not data:
                        raise ConnectionError("B's connection closed")
                    received += len(data)
        return frames

    def close(self) -> None:
        self.a.close()
        self.b.close()


def _server_pair(port: int) -> _Pair:
    ip_a, ip_b = IPv4Address("10.99.0.11"), IPv4Address("10.99.0.12")
    b = rawws.blocking_join(port, ip_b)
    a = rawws.blocking_join(port, ip_a)
    probe = rawws.forward_frame(ip_a, ip_b, 100)
    b.settimeout(0.2)
    for _ in range(50):  # until the server has authenticated both (it sends no answer)
        a.sendall(probe)
        try:
            if b.recv(4096):
                break
        except TimeoutError:
            continue
    else:
        raise RuntimeError("the relay never forwarded the probe from A to B")
    time.sleep(0.3)
    b.settimeout(0.0)
    with contextlib.suppress(BlockingIOError):  # late probes
        while b.recv(1 << 16):
            pass
    frame = rawws.forward_frame(ip_a, ip_b)
    return _Pair(a, b, frame, len(frame) - 4)  # what the server writes: the same, unmasked


@pytest.fixture(scope="module", params=SHELL_RUNTIMES)
def relay_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator:
    log = tmp_path_factory.mktemp("relay") / f"server-{request.param}.log"
    proc, port = rawws.start_local_server(request.param, log)
    pair = None
    try:
        pair = _server_pair(port)
        yield request.param, pair, proc
    finally:
        if pair is not None:
            pair.close()
        rawws.stop_process(proc)


@pytest.fixture(scope="module")
def splice_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Pair]:
    log = tmp_path_factory.mktemp("splice") / "splice.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SPLICE_SERVER],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pair = None
    try:
        assert rawws.wait_for_text(log, rawws.LISTENING, proc, 20.0), log.read_text()
        port = int(log.read_text().split()[-1])
        a = socket.create_connection(("127.0.0.1", port), timeout=5)
        b = socket.create_connection(("127.0.0.1", port), timeout=5)
        a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        time.sleep(0.2)  # both accepted
        frame = rawws.forward_frame(A, B)
        pair = _Pair(a, b, frame, len(frame))
        yield pair
    finally:
        if pair is not None:
            pair.close()
        rawws.stop_process(proc)


def _record_rate(benchmark: pytest.FixtureRequest, frames: int = FRAMES) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    median = stats.stats.median
    benchmark.extra_info["frames_per_s"] = round(frames / median)
    benchmark.extra_info["us_per_frame"] = round(median / frames * 1e6, 2)


def test_shell_relay(benchmark: pytest.FixtureRequest, relay_pair: tuple) -> None:
    """A relay daemon of each runtime: FRAMES 1400-byte frames A → server → B per round."""
    runtime, pair, proc = relay_pair
    benchmark.group = "shell relay (2000 frames/round)"
    benchmark.extra_info["runtime"] = runtime
    cpu0 = rawws.cpu_seconds(proc.pid)
    benchmark.pedantic(pair.relay, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["server_cpu_us_per_frame"] = round(
        (rawws.cpu_seconds(proc.pid) - cpu0) / (22 * FRAMES) * 1e6, 2
    )
    _record_rate(benchmark)
    assert proc.poll() is None


def test_baseline_splice_relay(benchmark: pytest.FixtureRequest, splice_pair: _Pair) -> None:
    """Baseline: a uvloop program copying A's bytes to B unparsed, same frames and window."""
    benchmark.group = "shell relay (2000 frames/round)"
    benchmark.pedantic(splice_pair.relay, rounds=20, iterations=1, warmup_rounds=2)
    _record_rate(benchmark)
