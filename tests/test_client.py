"""Client core unit tests: bytes in, bytes and events out, a virtual clock, seeded randomness.

The test plays the server by hand: it answers the upgrade, parses what the client writes
(masked frames) and feeds frames back. No sockets anywhere.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface

import h11
import pytest
from vectors import load_vectors
from wsproto.utilities import generate_accept_token

from candy_core import AddressChanged, ClientConfig, Connected, Disconnected, Reconnecting
from candy_core import messages as m
from candy_core.client import MAX_PADDING, Client, ClientState, new_vmac
from candy_core.wsframe import (
    CLOSE_NORMAL,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameParser,
    close_payload,
    encode_frame,
    parse_close,
)

PASSWORD = "client-test-pw"
WALL = 1_764_000_000
START = 100.0
NONCE = base64.b64encode(b"0123456789abcdef")
HOST = "vpn.example.org"
PORT = 8443
CAPTURED = {v["name"]: v for v in load_vectors("captured-5.6")["websocket"]}


def packet(src: str, dst: str, body: bytes = b"payload") -> bytes:
    """A minimal IPv4 packet: a 20-byte header with the addresses, then ``body``."""
    head = bytearray(20)
    head[0] = 0x45
    head[2:4] = (20 + len(body)).to_bytes(2, "big")
    head[12:16] = IPv4Address(src).packed
    head[16:20] = IPv4Address(dst).packed
    return bytes(head) + body


def response_101(nonce: bytes = NONCE) -> bytes:
    """The 5.6 server's answer to an upgrade request."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Connection: Upgrade\r\n"
        b"Upgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: " + generate_accept_token(nonce) + b"\r\n"
        b"Date: Mon, 24 Nov 2025 12:00:00 GMT\r\n\r\n"
    )


def config(**kw: object) -> ClientConfig:
    kw.setdefault("password", PASSWORD)
    kw.setdefault("host", HOST)
    kw.setdefault("port", PORT)
    kw.setdefault("confusion", False)
    tun = kw.pop("tun", None)
    return ClientConfig(tun=IPv4Interface(tun) if tun else None, **kw)  # type: ignore[arg-type]


class Harness:
    """One client core, a virtual clock and the server's side of the conversation."""

    def __init__(
        self,
        seed: int = 1,
        state: ClientState | None = None,
        **kw: object,
    ) -> None:
        self.rng = random.Random(seed)
        self.state = state if state is not None else ClientState(new_vmac(random.Random(seed)))
        self.client = Client(config(**kw), self.rng, self.state)
        self.now = START
        self.wall = float(WALL)
        self.parser = FrameParser(1 << 16, expect_mask=True)
        self.events: list[object] = []
        self.closes = 0

    # --- driving ----------------------------------------------------------------------
    def start(self) -> None:
        self.client.start(self.now)
        assert self.client.take_connect_request()

    def connect(self) -> bytes:
        """The TCP connection is up; returns the upgrade request the client wrote."""
        self.parser = FrameParser(1 << 16, expect_mask=True)
        self.client.connection_made(self.now, NONCE)
        return self.client.data_to_send()

    def open(self) -> list[Frame]:
        """Start, connect, accept the upgrade; returns the frames of the handshake."""
        self.start()
        self.connect()
        self.feed(response_101())
        return self.frames()

    def join(self, cidr: str = "10.0.0.7/24") -> None:
        """Open and, for a dynamic client, assign ``cidr``; discard what was written."""
        self.open()
        if self.client.config.tun is None:
            self.send_msg(m.Expected.create(PASSWORD, cidr, int(self.wall)).encode())
        self.frames()
        self.drain()
        assert self.client.authenticated

    def feed(self, data: bytes) -> None:
        self.client.receive_data(data, self.now, self.wall)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        self.feed(encode_frame(opcode, payload))

    def send_msg(self, payload: bytes) -> None:
        self.send_frame(OP_BINARY, payload)

    def advance(self, seconds: float) -> None:
        """Move the clock, running every timer that falls due on the way."""
        target = self.now + seconds
        for _ in range(10_000):
            deadline = self.client.next_deadline()
            if deadline is None or deadline > target:
                break
            assert deadline >= self.now - 1e-9, "a deadline in the past would spin a shell"
            self.now = max(self.now, deadline)
            self.wall = WALL + (self.now - START)
            self.client.handle_timer(self.now)
            self._collect()
        else:
            raise AssertionError("timer loop did not settle")
        self.now = target
        self.wall = WALL + (self.now - START)

    def _collect(self) -> None:
        if self.client.take_close_request():
            self.closes += 1

    # --- observing --------------------------------------------------------------------
    def frames(self) -> list[Frame]:
        """Frames the client wrote since the last call (all of them must be masked)."""
        return self.parser.feed(self.client.data_to_send())

    def messages(self) -> list[m.Message]:
        return [m.decode(f.payload) for f in self.frames() if f.opcode == OP_BINARY]

    def drain(self) -> list[object]:
        events = []
        while (event := self.client.next_event()) is not None:
            events.append(event)
        self.events.extend(events)
        return events

    def close_requested(self) -> bool:
        self._collect()
        return self.closes > 0


def of_type(events: list[object], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


# --- the upgrade ------------------------------------------------------------------------
def parse_request(raw: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    return event


def test_upgrade_request_has_the_5_6_shape() -> None:
    h = Harness(path="/candy")
    h.start()
    raw = h.connect()
    assert raw.startswith(b"GET /candy HTTP/1.1\r\n")
    request = parse_request(raw)
    headers = {name.lower(): value for name, value in request.headers}
    assert set(headers) == {
        b"host",
        b"upgrade",
        b"connection",
        b"sec-websocket-key",
        b"sec-websocket-version",
    }
    assert headers[b"host"] == f"{HOST}:{PORT}".encode()
    assert headers[b"upgrade"].lower() == b"websocket"
    assert headers[b"connection"].lower() == b"upgrade"
    assert headers[b"sec-websocket-key"] == NONCE
    assert headers[b"sec-websocket-version"] == b"13"


def test_upgrade_request_default_path_and_random_key() -> None:
    h = Harness()
    h.start()
    h.client.connection_made(h.now)
    request = parse_request(h.client.data_to_send())
    assert request.target == b"/"
    key = dict((n.lower(), v) for n, v in request.headers)[b"sec-websocket-key"]
    assert len(base64.b64decode(key, validate=True)) == 16


def test_nothing_is_sent_before_the_upgrade_is_accepted() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.start()
    h.connect()
    h.feed(response_101()[:30])
    assert h.client.data_to_send() == b""
    assert not h.client.authenticated
    h.feed(response_101()[30:])
    assert [type(x) for x in h.messages()] == [m.Vmac, m.Auth]


# --- the handshake ----------------------------------------------------------------------
def test_static_client_sends_vmac_then_auth() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.start()
    assert h.drain() == [AddressChanged(IPv4Interface("10.0.0.5/24"))]
    h.connect()
    h.feed(response_101())
    vmac, auth = h.messages()
    assert isinstance(vmac, m.Vmac) and isinstance(auth, m.Auth)
    assert vmac.vmac == h.state.vmac
    assert vmac.verify(PASSWORD) and vmac.timestamp == WALL
    assert auth.ip == IPv4Address("10.0.0.5") and auth.timestamp == WALL
    assert auth.verify(PASSWORD)
    assert h.drain() == [Connected(IPv4Interface("10.0.0.5/24"))]
    assert h.client.authenticated


def test_dynamic_client_sends_vmac_then_expected_for_any_address() -> None:
    h = Harness()
    vmac, expected = (m.decode(f.payload) for f in h.open())
    assert isinstance(vmac, m.Vmac) and isinstance(expected, m.Expected)
    assert expected.cidr == "0.0.0.0/0"
    assert expected.verify(PASSWORD) and expected.timestamp == WALL
    assert not h.client.authenticated
    assert of_type(h.drain(), Connected) == []


def test_dynamic_client_asks_for_its_cached_address() -> None:
    state = ClientState(b"0123456789abcdef", IPv4Interface("10.0.0.42/24"))
    h = Harness(state=state)
    _, expected = (m.decode(f.payload) for f in h.open())
    assert isinstance(expected, m.Expected)
    assert expected.cidr == "10.0.0.42/24"


def test_address_assignment_configures_caches_and_authenticates() -> None:
    h = Harness()
    h.open()
    h.drain()
    h.send_msg(m.Expected.create(PASSWORD, "10.0.0.9/24", WALL).encode())
    address = IPv4Interface("10.0.0.9/24")
    assert h.drain() == [AddressChanged(address), Connected(address)]
    assert h.state.address == address
    assert h.client.address == address
    (auth,) = h.messages()
    assert isinstance(auth, m.Auth)
    assert auth.ip == address.ip and auth.verify(PASSWORD)
    assert h.client.authenticated


def test_reassigned_same_address_is_not_announced_again() -> None:
    h = Harness(state=ClientState(b"0123456789abcdef", IPv4Interface("10.0.0.9/24")))
    h.join("10.0.0.9/24")
    assert of_type(h.events, AddressChanged) == [AddressChanged(IPv4Interface("10.0.0.9/24"))]
    h.client.connection_lost(h.now, "reset")
    h.advance(60)
    assert h.client.take_connect_request()
    h.connect()
    h.feed(response_101())
    h.frames()
    h.drain()
    h.send_msg(m.Expected.create(PASSWORD, "10.0.0.9/24", int(h.wall)).encode())
    assert [type(e) for e in h.drain()] == [Connected]


def test_client_messages_match_the_captured_5_6_client() -> None:
    """Same password, VMAC and clock: VMAC and AUTH are byte for byte what 5.6 sent."""
    vmac_vec = CAPTURED["captured 5.6 client VMAC"]
    reply_vec = CAPTURED["captured 5.6 server EXPECTED reply (server range 10.77.0.0/24)"]
    auth_vec = CAPTURED["captured 5.6 client AUTH"]
    client_expected = CAPTURED[
        "captured 5.6 client EXPECTED (bytes after the cidr's NUL are uninitialised garbage)"
    ]
    h = Harness(password="testpw", state=ClientState(b"e9777b653c831e8e"))
    h.wall = float(vmac_vec["now"])
    h.start()
    h.connect()
    h.feed(response_101())
    vmac_frame, expected_frame = h.frames()
    assert vmac_frame.payload == bytes.fromhex(vmac_vec["hex"])
    ours = m.Expected.decode(expected_frame.payload)
    theirs = m.Expected.decode(bytes.fromhex(client_expected["hex"]))
    assert (ours.timestamp, ours.cidr, ours.hash) == (theirs.timestamp, theirs.cidr, theirs.hash)
    h.send_msg(bytes.fromhex(reply_vec["hex"]))
    (auth_frame,) = h.frames()
    assert auth_frame.payload == bytes.fromhex(auth_vec["hex"])
    assert h.client.address == IPv4Interface("10.77.0.176/24")


def test_trailing_frames_after_the_101_are_processed() -> None:
    h = Harness()
    h.start()
    h.connect()
    reply = m.Expected.create(PASSWORD, "10.0.0.3/24", WALL).encode()
    h.feed(response_101() + encode_frame(OP_BINARY, reply))
    assert [type(x) for x in h.messages()] == [m.Vmac, m.Expected, m.Auth]
    assert h.client.address == IPv4Interface("10.0.0.3/24")


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (m.Expected.create("not-the-password", "10.0.0.9/24", WALL), ["password"]),
        (m.Expected.create(PASSWORD, "10.0.0.9/24", WALL - 300), ["clock"]),
        (m.Expected.create(PASSWORD, "10.0.0.9/24", WALL + 300), ["clock"]),
        (m.Expected.create(PASSWORD, "no-address", WALL), ["invalid address"]),
        (m.Expected.create(PASSWORD, "10.0.0.300/24", WALL), ["invalid address"]),
        (m.Expected.create(PASSWORD, "0.0.0.0/0", WALL), ["unusable"]),
        (m.Expected.create(PASSWORD, "10.0.0.9/0", WALL), ["unusable"]),
    ],
)
def test_bad_address_assignment_closes_and_reconnects(reply: m.Expected, words: list[str]) -> None:
    h = Harness()
    h.open()
    h.drain()
    h.send_msg(reply.encode())
    events = h.drain()
    (disconnected,) = of_type(events, Disconnected)
    for word in words:
        assert word in disconnected.reason
    assert of_type(events, Reconnecting)
    assert of_type(events, AddressChanged) == []
    assert h.state.address is None
    assert not h.client.authenticated
    assert h.close_requested()
    (close,) = h.frames()  # a CLOSE frame goes out before the shell closes
    assert close.opcode == OP_CLOSE
    assert h.client.next_deadline() is not None
    h.advance(60)
    assert h.client.take_connect_request()


def test_garbage_expected_reply_bytes_do_not_crash() -> None:
    h = Harness()
    h.open()
    bad_cidr = bytearray(m.Expected.create(PASSWORD, "10.0.0.9/24", WALL).encode())
    bad_cidr[9:41] = b"\xff" * 32  # not ASCII: a malformed message, ignored
    h.send_msg(bytes(bad_cidr))
    h.send_msg(b"\x02" + bytes(72))  # zero timestamp, empty cidr, wrong hash
    events = h.drain()
    assert not h.client.authenticated
    assert of_type(events, Disconnected)


def test_unsolicited_assignment_is_ignored() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.send_msg(m.Expected.create(PASSWORD, "10.0.0.99/24", WALL).encode())
    assert h.client.address == IPv4Interface("10.0.0.5/24")
    assert h.drain() == []
    assert h.frames() == []


# --- confusion padding ------------------------------------------------------------------
def handshake_lengths(seed: int, confusion: bool, tun: str | None) -> list[int]:
    h = Harness(seed=seed, confusion=confusion, tun=tun)
    lengths = [len(f.payload) for f in h.open()]
    if tun is None:
        h.send_msg(m.Expected.create(PASSWORD, "10.0.0.9/24", WALL).encode())
        lengths += [len(f.payload) for f in h.frames()]
    return lengths


def test_without_confusion_handshake_lengths_are_exact() -> None:
    for seed in range(10):
        assert handshake_lengths(seed, False, None) == [57, 73, 45]
        assert handshake_lengths(seed, False, "10.0.0.5/24") == [57, 45]


def test_confusion_pads_handshake_messages_randomly() -> None:
    seen: dict[int, set[int]] = {57: set(), 73: set(), 45: set()}
    for seed in range(40):
        for base, length in zip((57, 73, 45), handshake_lengths(seed, True, None), strict=True):
            assert base <= length <= base + MAX_PADDING
            seen[base].add(length - base)
    for base, extras in seen.items():
        assert len(extras) > 5, f"padding of the {base}-byte message hardly varies: {extras}"
    assert MAX_PADDING == 64


def test_padded_handshake_still_verifies() -> None:
    h = Harness(seed=3, confusion=True, tun="10.0.0.5/24")
    vmac, auth = (m.decode(f.payload) for f in h.open())
    assert isinstance(vmac, m.Vmac) and vmac.verify(PASSWORD)
    assert isinstance(auth, m.Auth) and auth.verify(PASSWORD)


# --- packets from TUN -------------------------------------------------------------------
def test_outgoing_packets_are_routed_or_dropped() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    me, other = "10.0.0.5", "10.0.0.6"
    good = packet(me, other)
    h.client.receive_packet(good, h.now)
    (fwd,) = h.messages()
    assert fwd == m.Forward(good)
    assert h.client.stats.packets_to_server == 1

    ipv6 = bytes([0x60]) + good[1:]
    for bad in (ipv6, good[:19], packet("10.0.0.77", other), b""):
        h.client.receive_packet(bad, h.now)
    assert h.frames() == []
    assert h.client.stats.packets_dropped == 4

    to_self = packet(me, me, b"loop")
    h.client.receive_packet(to_self, h.now)
    assert h.client.packets_to_deliver() == [to_self]
    assert h.frames() == []


def test_packets_before_joining_are_dropped() -> None:
    h = Harness()
    h.start()
    h.client.receive_packet(packet("10.0.0.5", "10.0.0.6"), h.now)
    assert h.client.stats.packets_dropped == 1
    h.connect()
    h.feed(response_101())
    h.frames()
    h.client.receive_packet(packet("0.0.0.0", "10.0.0.6"), h.now)
    assert h.frames() == []


def test_incoming_forward_goes_to_tun() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    pkt = packet("10.0.0.6", "10.0.0.5", b"hello")
    h.send_msg(m.Forward(pkt).encode())
    assert h.client.packets_to_deliver() == [pkt]
    assert h.client.stats.packets_from_server == 1
    assert h.client.packets_to_deliver() == []


def test_incoming_non_ipv4_or_short_forward_is_dropped() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    pkt = packet("10.0.0.6", "10.0.0.5")
    h.send_msg(b"\x01" + bytes([0x60]) + pkt[1:])
    h.send_msg(b"\x01" + pkt[:19])
    h.send_msg(b"\x01")
    assert h.client.packets_to_deliver() == []
    assert h.client.stats.packets_dropped == 3
    assert not h.close_requested()


# --- keep-alive -------------------------------------------------------------------------
def pings(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f.opcode == OP_PING]


def test_keepalive_ping_after_15_idle_seconds() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.advance(14.9)
    assert h.frames() == []
    h.advance(0.1)
    (ping,) = h.frames()
    assert ping.opcode == OP_PING and ping.payload == b"candy::linux::5.6"


def test_keepalive_repeats_while_idle_and_answers_keep_it_alive() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    times = []
    for _ in range(60):
        h.advance(1)
        for frame in pings(h.frames()):
            times.append(h.now - START)
            h.send_frame(OP_PONG, frame.payload)  # the server answers each ping
    assert times == pytest.approx([15, 30, 45, 60])
    assert not h.close_requested()
    assert of_type(h.drain(), Disconnected) == []


def test_any_received_frame_postpones_the_ping() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.advance(10)
    h.send_msg(m.Forward(packet("10.0.0.6", "10.0.0.5")).encode())
    h.advance(14)
    assert h.frames() == []
    h.send_frame(OP_TEXT, b"ignored, but it is traffic")
    h.advance(14)
    assert h.frames() == []
    h.advance(1)
    assert len(pings(h.frames())) == 1


def test_server_ping_is_answered_with_pong() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.send_frame(OP_PING, b"hi")
    (pong,) = h.frames()
    assert (pong.opcode, pong.payload) == (OP_PONG, b"hi")


def test_silent_server_is_declared_dead_after_30_seconds() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.advance(29.9)
    assert not h.close_requested()
    assert len(pings(h.frames())) == 1  # at 15 s; the next would be at 30 s
    h.advance(0.1)
    assert h.close_requested()
    events = h.drain()
    (disconnected,) = of_type(events, Disconnected)
    assert "30 s" in disconnected.reason
    (reconnecting,) = of_type(events, Reconnecting)
    assert reconnecting.attempt >= 1
    assert not h.client.authenticated
    assert h.frames() == []  # no ping to a dead connection


def test_server_that_never_answers_the_upgrade_is_dead_after_30_seconds() -> None:
    h = Harness()
    h.start()
    h.connect()
    h.advance(29)
    assert h.client.data_to_send() == b""  # no ping before the upgrade
    h.advance(1)
    assert h.close_requested()
    assert "30 s" in of_type(h.drain(), Disconnected)[0].reason


# --- reconnection back-off --------------------------------------------------------------
def fail_until_connect(h: Harness) -> float:
    """Fail the pending connection; return the delay until the next connect request."""
    h.client.connection_failed(h.now, "connection refused")
    (reconnecting,) = of_type(h.drain(), Reconnecting)
    failed_at = h.now
    for _ in range(400):
        h.advance(0.25)
        if h.client.take_connect_request():
            delay = h.now - failed_at
            assert reconnecting.delay == pytest.approx(delay, abs=0.25)
            return reconnecting.delay
    raise AssertionError("no reconnection")


def test_backoff_grows_and_is_capped() -> None:
    for seed in range(20):
        h = Harness(seed=seed, tun="10.0.0.5/24")
        h.start()
        delays = [fail_until_connect(h) for _ in range(8)]
        for delay, base in zip(delays, (1, 2, 4, 8, 16, 30, 30, 30), strict=True):
            assert max(1.0, base * 0.75) <= delay <= min(30.0, base * 1.25), (seed, delays)


def test_backoff_has_jitter() -> None:
    firsts = set()
    for seed in range(10):
        h = Harness(seed=seed, tun="10.0.0.5/24")
        h.start()
        fail_until_connect(h)
        firsts.add(round(fail_until_connect(h), 6))
    assert len(firsts) > 5


def test_backoff_respects_configured_bounds() -> None:
    h = Harness(tun="10.0.0.5/24", backoff_min=2.0, backoff_max=5.0)
    h.start()
    delays = [fail_until_connect(h) for _ in range(6)]
    assert all(2.0 <= d <= 5.0 for d in delays)
    assert delays[-1] >= 5.0 * 0.75


def test_connection_failed_schedules_a_retry() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.start()
    h.client.connection_failed(h.now, "connection refused")
    events = h.drain()
    (disconnected,) = of_type(events, Disconnected)
    assert "connection refused" in disconnected.reason
    (reconnecting,) = of_type(events, Reconnecting)
    assert reconnecting.attempt == 1
    assert not h.client.take_connect_request()
    assert h.client.next_deadline() == pytest.approx(h.now + reconnecting.delay)
    h.advance(reconnecting.delay)
    assert h.client.take_connect_request()
    assert not h.client.take_connect_request()  # once


def test_connection_failed_outside_connecting_is_ignored() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.client.connection_failed(h.now, "late")
    assert h.drain() == []
    assert h.client.authenticated


def test_backoff_resets_after_a_stable_connection() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.start()
    for _ in range(5):
        fail_until_connect(h)
    # A connection that stays up 20 s, then drops: the next delay is short again.
    h.connect()
    h.feed(response_101())
    h.advance(20)
    h.client.connection_lost(h.now, "reset by peer")
    (reconnecting,) = of_type(h.drain(), Reconnecting)
    assert reconnecting.attempt == 1
    assert reconnecting.delay <= 1.25


def test_backoff_keeps_growing_across_short_lived_connections() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.start()
    attempts = []
    for _ in range(4):
        h.connect()
        h.feed(response_101())
        h.advance(2)
        h.client.connection_lost(h.now, "reset by peer")
        (reconnecting,) = of_type(h.drain(), Reconnecting)
        attempts.append(reconnecting.attempt)
        h.advance(reconnecting.delay)
        assert h.client.take_connect_request()
    assert attempts == [1, 2, 3, 4]


# --- the server closing -----------------------------------------------------------------
def test_server_close_frame_reason_reaches_the_user() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.send_frame(OP_CLOSE, close_payload(1008, "wrong password"))
    events = h.drain()
    (disconnected,) = of_type(events, Disconnected)
    assert "wrong password" in disconnected.reason
    assert of_type(events, Reconnecting)
    assert h.close_requested()
    (echo,) = h.frames()
    assert echo.opcode == OP_CLOSE and parse_close(echo.payload)[0] == 1008
    h.client.connection_lost(h.now, "closed")  # the shell's EOF afterwards changes nothing
    assert h.drain() == []


@pytest.mark.parametrize(
    ("payload", "code"), [(b"\x34", 1002), (b"\x07\xd0", 1002), (b"\x03\xe8\xc3", 1007)]
)
def test_invalid_server_close_is_answered_with_an_error_code(payload: bytes, code: int) -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.send_frame(OP_CLOSE, payload)
    assert of_type(h.drain(), Disconnected)
    (echo,) = h.frames()
    assert echo.opcode == OP_CLOSE and parse_close(echo.payload)[0] == code


def test_close_frame_without_reason_names_the_code() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.advance(10)
    h.send_frame(OP_CLOSE, close_payload(1001))
    (disconnected,) = of_type(h.drain(), Disconnected)
    assert "1001" in disconnected.reason


@pytest.mark.parametrize("tun", ["10.0.0.5/24", None])
def test_silent_close_right_after_handshake_means_refused(tun: str | None) -> None:
    """The 5.6 server closes without a word on a bad password or clock."""
    h = Harness(tun=tun)
    h.open()
    h.drain()
    h.advance(2)
    h.client.connection_lost(h.now, "connection closed by the server")
    events = h.drain()
    (disconnected,) = of_type(events, Disconnected)
    assert "refused the handshake" in disconnected.reason
    assert "password" in disconnected.reason and "clock" in disconnected.reason
    assert of_type(events, Reconnecting)


def test_close_long_after_handshake_is_a_plain_disconnect() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    for _ in range(4):
        h.advance(5)
        h.send_frame(OP_PONG, b"")
    h.client.connection_lost(h.now, "connection closed by the server")
    (disconnected,) = of_type(h.drain(), Disconnected)
    assert disconnected.reason == "connection closed by the server"


def test_close_sends_a_close_frame_and_asks_the_shell_to_close() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.client.close()
    (frame,) = h.frames()
    assert frame.opcode == OP_CLOSE
    assert parse_close(frame.payload)[0] == CLOSE_NORMAL
    assert h.close_requested()
    h.advance(120)
    assert not h.client.take_connect_request()
    assert h.client.data_to_send() == b""


def test_close_before_connecting_stops_reconnecting() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.start()
    h.client.connection_failed(h.now, "refused")
    h.client.close()
    assert h.client.data_to_send() == b""
    h.advance(120)
    assert not h.client.take_connect_request()


# --- malformed input from the server ----------------------------------------------------
def truncated_messages() -> Iterator[tuple[str, bytes]]:
    ip = IPv4Address("10.0.0.6")
    me = IPv4Address("10.0.0.5")
    full = {
        "auth": m.Auth.create(PASSWORD, ip, WALL).encode(),
        "forward": m.Forward(packet("10.0.0.6", "10.0.0.5")).encode(),
        "expected": m.Expected.create(PASSWORD, "10.0.0.9/24", WALL).encode(),
        "peer": m.Peer(ip, me, IPv4Address("192.0.2.1"), 4000).encode(),
        "vmac": m.Vmac.create(PASSWORD, b"0123456789abcdef", WALL).encode(),
        "discovery": m.Discovery(ip, me).encode(),
        "general": m.General.lan_endpoint(ip, me, IPv4Address("192.168.1.2"), 5000).encode(),
    }
    for name, data in full.items():
        # A FORWARD is only malformed when the IPv4 header itself is cut.
        size = 21 if name == "forward" else len(data)
        for cut in sorted({1, 2, size // 2, size - 1}):
            yield f"{name}[:{cut}]", data[:cut]


TRUNCATED = list(truncated_messages())


@pytest.mark.parametrize("tun", ["10.0.0.5/24", None])
@pytest.mark.parametrize(("name", "data"), TRUNCATED, ids=[n for n, _ in TRUNCATED])
def test_truncated_messages_are_ignored(name: str, data: bytes, tun: str | None) -> None:
    h = Harness(tun=tun)
    h.open()  # a dynamic client is still waiting for its address
    h.drain()
    h.send_msg(data)
    assert h.client.packets_to_deliver() == []
    assert of_type(h.drain(), Disconnected) == []
    assert not h.close_requested()
    assert h.frames() == []


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x06", b"\x07" + bytes(100), b"\x80hello", b"\xfe" * 5, bytes([200]) + bytes(1400)],
)
def test_unknown_types_and_empty_frames_are_ignored(payload: bytes) -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.send_msg(payload)
    h.send_frame(OP_TEXT, b"text frames carry nothing in Candy")
    h.send_frame(OP_PONG, b"unsolicited")
    assert h.drain() == []
    assert not h.close_requested()
    pkt = packet("10.0.0.6", "10.0.0.5")
    h.send_msg(m.Forward(pkt).encode())
    assert h.client.packets_to_deliver() == [pkt]


def test_peer_messages_without_stun_are_ignored() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    ip, me = IPv4Address("10.0.0.6"), IPv4Address("10.0.0.5")
    h.send_msg(m.Peer(ip, me, IPv4Address("192.0.2.1"), 4000).encode())
    h.send_msg(m.Discovery(ip, m.BROADCAST).encode())
    h.send_msg(m.General.lan_endpoint(ip, me, IPv4Address("192.168.1.2"), 5000).encode())
    h.send_msg(m.General(7, 9, ip, me, b"future").encode())
    assert not h.close_requested()
    assert h.client.datagrams_to_send() == []


@pytest.mark.parametrize(
    "garbage",
    [
        encode_frame(OP_BINARY, b"\x01" + bytes(30), mask=b"abcd"),  # masked server frame
        bytes([0xC2, 0x01, 0x01]),  # reserved bit set
        bytes([0x83, 0x00]),  # unknown data opcode
        bytes([0x8B, 0x00]),  # unknown control opcode
        bytes([0x09, 0x00]),  # fragmented ping
        bytes([0x80, 0x01, 0x00]),  # continuation without a message
        bytes([0x82, 0x7F]) + (1 << 40).to_bytes(8, "big"),  # absurd length
        bytes([0x89, 0x7E, 0x00, 0xC8]) + bytes(200),  # control frame over 125 bytes
        b"\xff" * 64,
    ],
    ids=[
        "masked",
        "reserved-bits",
        "data-opcode",
        "control-opcode",
        "fragmented-ping",
        "bare-continuation",
        "huge-length",
        "long-control",
        "ff-bytes",
    ],
)
def test_garbage_that_breaks_framing_closes_cleanly(garbage: bytes) -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.feed(garbage)
    events = h.drain()
    (disconnected,) = of_type(events, Disconnected)
    assert "frame" in disconnected.reason
    assert of_type(events, Reconnecting)
    assert h.close_requested()
    (close,) = h.frames()
    assert close.opcode == OP_CLOSE
    h.feed(encode_frame(OP_BINARY, b"\x01" + packet("10.0.0.6", "10.0.0.5")))  # stale bytes
    assert h.client.packets_to_deliver() == []


REFUSED = "server refused the WebSocket upgrade"
MALFORMED = "malformed HTTP response from server ("


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", f"{REFUSED} (HTTP 403)"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", f"{REFUSED} (HTTP 200)"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "server sent a wrong Sec-WebSocket-Accept",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: AAAA\r\n\r\n",
            "server sent a wrong Sec-WebSocket-Accept",
        ),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", MALFORMED),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n", MALFORMED),
        (b"HTTP/1.1 999\r\n\r\n", f"{REFUSED} (HTTP 999)"),
    ],
    ids=["403", "200", "101-no-accept", "101-wrong-accept", "ssh", "tls", "999"],
)
def test_bad_upgrade_responses_close_cleanly(response: bytes, reason: str) -> None:
    h = Harness(tun="10.0.0.5/24")
    h.start()
    h.connect()
    h.feed(response)
    events = h.drain()
    (disconnected,) = of_type(events, Disconnected)
    if reason == MALFORMED:  # the parser's own words follow
        assert disconnected.reason.startswith(MALFORMED), disconnected.reason
    else:
        assert disconnected.reason == reason
    # One retry is scheduled, after the configured minimum back-off (1 s, up to +25 %).
    (retry,) = of_type(events, Reconnecting)
    assert retry.attempt == 1 and 1.0 <= retry.delay <= 1.25, retry
    assert h.close_requested() and h.closes == 1
    assert h.client.data_to_send() == b""  # no CLOSE frame on a connection never upgraded
    assert h.client.authenticated is False


def test_endless_response_head_is_refused() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.start()
    h.connect()
    h.feed(b"HTTP/1.1 101 Switching Protocols\r\n")
    lines = 0
    while lines < 100 and not h.close_requested():
        h.feed(b"X-Filler: " + b"a" * 500 + b"\r\n")
        lines += 1
    assert h.close_requested() and lines < 100, f"still reading after {lines} header lines"
    (disconnected,) = of_type(h.drain(), Disconnected)
    assert disconnected.reason.startswith(MALFORMED), disconnected.reason


def test_random_garbage_never_raises() -> None:
    rng = random.Random(7)
    for round_ in range(200):
        h = Harness(seed=round_, tun="10.0.0.5/24" if round_ % 2 else None)
        h.open()
        for _ in range(20):
            size = rng.randrange(1, 40)
            if rng.random() < 0.5:
                h.send_msg(bytes([rng.choice([0, 1, 2, 3, 4, 5, 255])]) + rng.randbytes(size))
            else:
                h.feed(rng.randbytes(size))
            h.drain()
            h.client.data_to_send()
            h.client.packets_to_deliver()


def test_bytes_after_the_connection_ended_are_ignored() -> None:
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.client.connection_lost(h.now, "reset")
    h.drain()
    h.send_msg(m.Forward(packet("10.0.0.6", "10.0.0.5")).encode())
    assert h.client.packets_to_deliver() == []
    assert h.client.data_to_send() == b""


def test_reconnect_sends_only_the_new_upgrade_request() -> None:
    """Nothing queued for the old connection leaks in front of the new upgrade request."""
    h = Harness(tun="10.0.0.5/24")
    h.join()
    h.send_frame(OP_CLOSE, close_payload(1008, "wrong password"))  # echo is queued
    h.advance(60)
    assert h.client.take_connect_request()
    request = h.connect()
    assert request.startswith(b"GET / HTTP/1.1\r\n")
