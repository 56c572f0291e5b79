"""RelayServer end to end through bytes: fake clients upgrade, send masked frames, read replies."""

from __future__ import annotations

import base64
import itertools
import random
from ipaddress import IPv4Address, IPv4Interface

import pytest
from vectors import load_vectors

from candy_core import (
    AddressAssigned,
    ClientAuthenticated,
    ClientDisconnected,
    ProtocolError,
    ServerConfig,
)
from candy_core import messages as m
from candy_core.server import RelayServer
from candy_core.upgrade import ClientUpgrade
from candy_core.wsframe import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameParser,
    binary_header,
    close_payload,
    encode_frame,
    parse_close,
)

PASSWORD = "relay-test-pw"
WALL = 1_764_000_000
NET = "10.99.0.0/24"
CAPTURED = {v["name"]: v for v in load_vectors("captured-5.6")["websocket"]}


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def packet(src: str, dst: str, body: bytes = b"payload") -> bytes:
    """A minimal IPv4 packet: 20-byte header with the addresses, then ``body``."""
    head = bytearray(20)
    head[0] = 0x45
    head[2:4] = (20 + len(body)).to_bytes(2, "big")
    head[12:16] = ip(src).packed
    head[16:20] = ip(dst).packed
    return bytes(head) + body


def forward(src: str, dst: str, body: bytes = b"payload") -> bytes:
    return m.Forward(packet(src, dst, body)).encode()


def config(**kw: object) -> ServerConfig:
    dhcp = kw.pop("dhcp", NET)
    return ServerConfig.from_strings(kw.pop("password", PASSWORD), dhcp, **kw)  # type: ignore[arg-type]


class StartAt(random.Random):
    """A seeded rng whose ``randrange`` returns ``offset``: the pool's first pick."""

    def __init__(self, offset: int) -> None:
        super().__init__(0)
        self.offset = offset

    def randrange(self, *args: object, **kwargs: object) -> int:  # type: ignore[override]
        return self.offset


class Relay:
    """A RelayServer with a virtual clock, routing its output to fake clients."""

    def __init__(self, cfg: ServerConfig | None = None, rng: random.Random | None = None) -> None:
        self.server = RelayServer(cfg or config(), rng or random.Random(7))
        self.clients: dict[int, FakeClient] = {}
        self.events: list[object] = []
        self.now = 100.0
        self.wall = float(WALL)
        self._ids = itertools.count(1)

    def client(self, connect: bool = True) -> FakeClient:
        c = FakeClient(self, next(self._ids))
        self.clients[c.cid] = c
        if connect:
            c.connect()
        return c

    def join(self, address: str | None = None, *, vmac: bytes | None = None) -> FakeClient:
        """A client that sent VMAC, then EXPECTED (or nothing) and AUTH; ready to relay."""
        c = self.client()
        c.vmac(vmac)
        if address is None:
            address = str(c.expected().ip)
        c.auth(address)
        assert not c.closed, c.close_reason
        return c

    def pump(self) -> None:
        server = self.server
        for cid, data in server.data_to_send():
            self.clients[cid].receive(data)
        for cid in server.connections_to_close():
            self.clients[cid].closed = True
        while (event := server.next_event()) is not None:
            self.events.append(event)

    def advance(self, seconds: float) -> None:
        """Move the clock, running every timer the server asks for on the way."""
        target = self.now + seconds
        while (deadline := self.server.next_deadline()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            self.wall = WALL + (self.now - 100.0)
            self.server.handle_timer(self.now)
            self.pump()
        self.now = target
        self.wall = WALL + (self.now - 100.0)

    def disconnects(self) -> list[ClientDisconnected]:
        return [e for e in self.events if isinstance(e, ClientDisconnected)]


class FakeClient:
    """One client connection: ClientUpgrade, masked frames out, FrameParser on the replies."""

    def __init__(self, relay: Relay, cid: int) -> None:
        self.relay = relay
        self.cid = cid
        self.rng = random.Random(1000 + cid)
        self.upgrade = ClientUpgrade(
            "192.0.2.1", 8080, "/", base64.b64encode(self.rng.randbytes(16))
        )
        self.parser = FrameParser(1 << 20, expect_mask=False)
        self.http = b""  # bytes received before the WebSocket opened
        self.open = False
        self.rejected: str | None = None
        self.frames: list[Frame] = []
        self.closed = False
        self.address: IPv4Address | None = None
        self.vmac_bytes = self.rng.randbytes(8).hex().encode()

    # --- transport --------------------------------------------------------------------------
    def connect(self, upgrade: bool = True) -> None:
        self.relay.server.connection_made(self.cid, self.relay.now, f"198.51.100.{self.cid}:4000")
        if upgrade:
            self.write(self.upgrade.request())
            assert self.open, self.rejected

    def write(self, data: bytes) -> None:
        self.relay.server.receive_data(self.cid, data, self.relay.now, self.relay.wall)
        self.relay.pump()

    def frame(self, payload: bytes, opcode: int = OP_BINARY, fin: bool = True) -> bytes:
        return encode_frame(opcode, payload, self.rng.randbytes(4), fin)

    def send(self, payload: bytes, opcode: int = OP_BINARY) -> None:
        self.write(self.frame(payload, opcode))

    def receive(self, data: bytes) -> None:
        assert not self.closed, "server wrote to a connection it had closed"
        if not self.open:
            self.http += data
            try:
                result = self.upgrade.receive(data)
            except ProtocolError as exc:
                self.rejected = str(exc)
                return
            if result.rejected:
                self.rejected = result.rejected
            if not result.accepted:
                return
            self.open = True
            data = result.trailing
        self.frames.extend(self.parser.feed(data))

    # --- what arrived -----------------------------------------------------------------------
    def take(self) -> list[bytes]:
        """Binary payloads received since the last call (control frames stay)."""
        got = [f.payload for f in self.frames if f.opcode == OP_BINARY]
        self.frames = [f for f in self.frames if f.opcode != OP_BINARY]
        return got

    def controls(self, opcode: int) -> list[bytes]:
        return [f.payload for f in self.frames if f.opcode == opcode]

    @property
    def close_frame(self) -> tuple[int | None, str] | None:
        closes = self.controls(OP_CLOSE)
        assert len(closes) <= 1, closes
        return parse_close(closes[0]) if closes else None

    @property
    def close_reason(self) -> str | None:
        frame = self.close_frame
        return frame[1] if frame else None

    # --- handshake --------------------------------------------------------------------------
    def vmac(self, vmac: bytes | None = None, ts: int | None = None, pw: str = PASSWORD) -> bytes:
        data = m.Vmac.create(pw, vmac or self.vmac_bytes, self._ts(ts)).encode()
        self.send(data)
        return data

    def expected(
        self, cidr: str = "0.0.0.0/0", ts: int | None = None, pad: bytes = b"", pw: str = PASSWORD
    ) -> IPv4Interface:
        self.send(m.Expected.create(pw, cidr, self._ts(ts), pad).encode())
        replies = self.take()
        assert len(replies) == 1, (replies, self.close_frame)
        reply = m.decode(replies[0])
        assert isinstance(reply, m.Expected)
        self.last_reply = replies[0]
        return IPv4Interface(reply.cidr)

    def auth(
        self, address: str, ts: int | None = None, pad: bytes = b"", pw: str = PASSWORD
    ) -> bytes:
        data = m.Auth.create(pw, ip(address), self._ts(ts), pad).encode()
        self.send(data)
        if not self.closed:
            self.address = ip(address)
        return data

    def _ts(self, ts: int | None) -> int:
        return int(self.relay.wall) if ts is None else ts


@pytest.fixture
def relay() -> Relay:
    return Relay()


def trio(relay: Relay) -> tuple[FakeClient, FakeClient, FakeClient]:
    a = relay.join("10.99.0.1")
    b = relay.join("10.99.0.2")
    c = relay.join("10.99.0.3")
    return a, b, c


# --- HTTP stage -------------------------------------------------------------------------------
def test_plain_http_request_gets_403_and_is_closed(relay: Relay) -> None:
    c = relay.client(connect=False)
    c.connect(upgrade=False)
    c.write(b"GET / HTTP/1.1\r\nHost: 192.0.2.1:8080\r\n\r\n")
    assert c.http.startswith(b"HTTP/1.1 403 ")
    assert c.closed and not c.open
    (event,) = relay.disconnects()
    assert event.cid == c.cid and event.ip is None and "rejected" in event.reason
    assert relay.server.stats.rejected == 1
    # anything after that is ignored
    c.closed = False
    c.write(ClientUpgrade("192.0.2.1", 8080, "/", b"dGhlIHNhbXBsZSBub25jZQ==").request())
    assert c.http.count(b"HTTP/1.1") == 1


def test_garbage_before_the_upgrade_gets_400_and_is_closed(relay: Relay) -> None:
    c = relay.client(connect=False)
    c.connect(upgrade=False)
    c.write(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(30) + b"\r\n\r\n")
    assert c.http.startswith(b"HTTP/1.1 400 ")
    assert c.closed
    assert "malformed" in relay.disconnects()[0].reason


def test_upgrade_in_pieces_and_frames_in_the_same_read(relay: Relay) -> None:
    c = relay.client(connect=False)
    c.connect(upgrade=False)
    request = c.upgrade.request()
    for i in range(len(request) - 1):
        c.write(request[i : i + 1])
    assert not c.open and c.http == b""
    vmac = c.frame(m.Vmac.create(PASSWORD, c.vmac_bytes, WALL).encode())
    exp = c.frame(m.Expected.create(PASSWORD, "10.99.0.9/24", WALL).encode())
    c.write(request[-1:] + vmac + exp)
    assert c.open and c.http.startswith(b"HTTP/1.1 101 ")
    (reply,) = c.take()
    assert m.decode(reply).cidr == "10.99.0.9/24"  # type: ignore[union-attr]


# --- EXPECTED: dynamic addresses --------------------------------------------------------------
def test_first_pick_is_random_inside_the_range() -> None:
    picks = []
    for seed in range(30):
        relay = Relay(rng=random.Random(seed))
        c = relay.client()
        c.vmac()
        picks.append(c.expected())
        again = Relay(rng=random.Random(seed)).client()
        again.vmac()
        assert again.expected() == picks[-1]  # deterministic for a given rng
    net = IPv4Interface(NET).network
    for pick in picks:
        assert pick.network == net
        assert pick.ip not in (net.network_address, net.broadcast_address)
    assert len(set(picks)) >= 15


def test_next_free_after_the_last_handed_out() -> None:
    relay = Relay(rng=StartAt(40))
    a = relay.join()
    assert a.address == ip("10.99.0.40")
    b = relay.client()
    b.vmac()
    assert b.expected() == IPv4Interface("10.99.0.41/24")
    # even without AUTH, the next request gets the one after
    c = relay.client()
    c.vmac()
    assert c.expected() == IPv4Interface("10.99.0.42/24")


def test_next_free_skips_held_addresses() -> None:
    relay = Relay(rng=StartAt(5))
    relay.join()  # .5
    relay.join("10.99.0.6")  # static, held
    relay.join("10.99.0.7")
    c = relay.client()
    c.vmac()
    assert c.expected() == IPv4Interface("10.99.0.8/24")


def test_network_and_broadcast_are_skipped_when_wrapping() -> None:
    relay = Relay(rng=StartAt(254))
    a = relay.join()
    assert a.address == ip("10.99.0.254")
    b = relay.client()
    b.vmac()
    assert b.expected() == IPv4Interface("10.99.0.1/24")


def test_requested_address_kept_when_free(relay: Relay) -> None:
    c = relay.client()
    c.vmac()
    assert c.expected("10.99.0.77/24") == IPv4Interface("10.99.0.77/24")


@pytest.mark.parametrize(
    "requested",
    ["10.99.0.77/16", "10.98.0.77/24", "10.99.0.0/24", "10.99.0.255/24", "0.0.0.0/0", "junk"],
)
def test_requested_address_outside_the_range_is_replaced(requested: str) -> None:
    relay = Relay(rng=StartAt(20))
    c = relay.client()
    c.vmac()
    assert c.expected(requested) == IPv4Interface("10.99.0.20/24")


def test_requested_address_held_by_same_vmac_is_given_again(relay: Relay) -> None:
    old = relay.join("10.99.0.50", vmac=b"0123456789abcdef")
    new = relay.client()
    new.vmac(b"0123456789abcdef", ts=WALL + 1)  # same machine, a second later
    assert new.expected("10.99.0.50/24") == IPv4Interface("10.99.0.50/24")
    assert not old.closed  # only AUTH takes the address over
    new.auth("10.99.0.50", ts=WALL + 1)
    assert old.closed and not new.closed
    assert relay.server.clients[ip("10.99.0.50")] == new.cid


def test_requested_address_held_by_another_vmac_gets_a_new_address(relay: Relay) -> None:
    relay.join("10.99.0.50", vmac=b"0123456789abcdef")
    other = relay.client()
    other.vmac(b"fedcba9876543210")
    got = other.expected("10.99.0.50/24")
    assert got != IPv4Interface("10.99.0.50/24")
    assert got.network == IPv4Interface(NET).network


def test_requested_address_held_and_no_vmac_gets_a_new_address(relay: Relay) -> None:
    holder = relay.client()
    holder.auth("10.99.0.50")  # no VMAC at all
    other = relay.client()
    assert other.expected("10.99.0.50/24") != IPv4Interface("10.99.0.50/24")


@pytest.mark.parametrize("pad", [0, 1, 17, 200])
def test_reply_has_the_request_length_and_a_valid_hash(relay: Relay, pad: int) -> None:
    c = relay.client()
    c.vmac()
    relay.wall += 0.7
    c.expected(pad=bytes(range(pad)), ts=WALL - 20)
    reply = c.last_reply
    assert len(reply) == m.Expected.SIZE + pad
    msg = m.decode(reply)
    assert isinstance(msg, m.Expected)
    assert msg.verify(PASSWORD)
    assert not msg.verify("other")
    assert msg.timestamp == WALL  # a fresh timestamp, not the request's
    assert reply[9:41] == msg.cidr.encode().ljust(32, b"\x00")
    assert any(
        isinstance(e, AddressAssigned) and e.cid == c.cid and str(e.address) == msg.cidr
        for e in relay.events
    )


def test_identical_expected_bytes_from_two_connections_are_both_answered(relay: Relay) -> None:
    data = m.Expected.create(PASSWORD, "0.0.0.0/0", WALL).encode()
    a, b = relay.client(), relay.client()
    a.send(data)
    b.send(data)
    (ra,) = a.take()
    (rb,) = b.take()
    assert not a.closed and not b.closed
    assert m.decode(ra).cidr != m.decode(rb).cidr  # type: ignore[union-attr]


def test_exhausted_range_closes_with_a_reason() -> None:
    relay = Relay(config(dhcp="10.99.0.0/30"))
    first, second = relay.join(), relay.join()
    assert {first.address, second.address} == {ip("10.99.0.1"), ip("10.99.0.2")}
    third = relay.client()
    third.vmac()
    third.send(m.Expected.create(PASSWORD, "0.0.0.0/0", WALL).encode())
    assert third.take() == []
    assert third.closed
    assert third.close_frame == (CLOSE_TRY_AGAIN, "no free address")
    assert relay.disconnects()[-1].reason == "no free address"
    assert not first.closed and not second.closed


def test_expected_without_dhcp_closes() -> None:
    relay = Relay(config(dhcp=None))
    c = relay.client()
    c.send(m.Expected.create(PASSWORD, "0.0.0.0/0", WALL).encode())
    assert c.take() == [] and c.closed
    code, reason = c.close_frame  # type: ignore[misc]
    assert code == CLOSE_POLICY and "assigns no addresses" in reason
    # a static address still works on such a server
    relay.join("10.1.2.3")


def test_captured_56_handshake_and_forward() -> None:
    """Real 5.6 client bytes: VMAC, EXPECTED with garbage after the NUL, AUTH, FORWARD."""
    now = CAPTURED["captured 5.6 client VMAC"]["now"]
    relay = Relay(config(password="testpw", dhcp="10.77.0.0/24"))
    relay.wall = float(now)
    peer = relay.client()
    peer.auth("10.77.0.177", ts=now - 1, pw="testpw")
    c = relay.client()
    for name in ("captured 5.6 client VMAC", "captured 5.6 client EXPECTED (bytes after"):
        vec = next(v for k, v in CAPTURED.items() if k.startswith(name))
        c.send(bytes.fromhex(vec["hex"]))
    (reply,) = c.take()
    msg = m.decode(reply)
    assert isinstance(msg, m.Expected) and msg.verify("testpw")
    assert IPv4Interface(msg.cidr).network == IPv4Interface("10.77.0.0/24").network
    assert len(reply) == 73
    c.send(bytes.fromhex(CAPTURED["captured 5.6 client AUTH"]["hex"]))
    assert not c.closed
    assert relay.server.clients[ip("10.77.0.176")] == c.cid
    fwd = bytes.fromhex(
        CAPTURED["captured 5.6 client FORWARD (ICMP echo 10.77.0.176 -> 10.77.0.177)"]["hex"]
    )
    c.send(fwd)
    assert peer.take() == [fwd]


# --- AUTH -------------------------------------------------------------------------------------
def test_auth_binds_the_address(relay: Relay) -> None:
    c = relay.client()
    c.auth("10.99.0.10", pad=b"\x01\x02\x03")
    assert not c.closed
    assert relay.server.clients == {ip("10.99.0.10"): c.cid}
    assert ClientAuthenticated(c.cid, ip("10.99.0.10")) in relay.events
    assert c.take() == []  # the server never answers AUTH
    assert relay.server.stats.authenticated == 1


def test_auth_takes_over_an_older_connection(relay: Relay) -> None:
    old = relay.join("10.99.0.10")
    other = relay.join("10.99.0.11")
    new = relay.client()
    new.auth("10.99.0.10", ts=WALL + 2)
    assert old.closed and not new.closed
    assert old.close_frame == (CLOSE_GOING_AWAY, "address taken over by a newer connection")
    assert (
        ClientDisconnected(old.cid, ip("10.99.0.10"), "address taken over by a newer connection")
        in relay.events
    )
    assert relay.events[-1] == ClientAuthenticated(new.cid, ip("10.99.0.10"))
    other.send(forward("10.99.0.11", "10.99.0.10"))
    assert new.take() == [forward("10.99.0.11", "10.99.0.10")]


def test_reauth_with_another_address_moves_the_route(relay: Relay) -> None:
    a = relay.join("10.99.0.10")
    b = relay.join("10.99.0.11")
    a.auth("10.99.0.12", ts=WALL + 1)
    assert relay.server.clients == {ip("10.99.0.12"): a.cid, ip("10.99.0.11"): b.cid}
    b.send(forward("10.99.0.11", "10.99.0.10"))
    assert a.take() == []
    b.send(forward("10.99.0.11", "10.99.0.12"))
    assert len(a.take()) == 1


@pytest.mark.parametrize("kind", ["auth", "vmac", "expected"])
def test_wrong_password_closes_with_reason(relay: Relay, kind: str) -> None:
    c = relay.client()
    if kind == "auth":
        c.auth("10.99.0.10", pw="not-it")
    elif kind == "vmac":
        c.vmac(pw="not-it")
    else:
        c.send(m.Expected.create("not-it", "0.0.0.0/0", WALL).encode())
    assert c.closed and c.take() == []
    assert c.close_frame == (CLOSE_POLICY, "wrong password")
    (event,) = relay.disconnects()
    assert event == ClientDisconnected(c.cid, None, "wrong password")
    assert relay.server.clients == {}


def test_reject_vector_is_refused() -> None:
    vec = next(v for v in load_vectors("protocol")["websocket"] if v.get("expect") == "reject")
    relay = Relay(config(password=vec["password"]))
    relay.wall = float(vec["timestamp"])
    c = relay.client()
    c.send(bytes.fromhex(vec["message_hex"]))
    assert c.closed and c.close_reason == "wrong password"


@pytest.mark.parametrize("skew", [-31, 31, -3600, 10**9])
@pytest.mark.parametrize("kind", ["auth", "vmac", "expected"])
def test_stale_or_future_timestamp_closes(relay: Relay, kind: str, skew: int) -> None:
    c = relay.client()
    ts = WALL + skew
    if kind == "auth":
        c.auth("10.99.0.10", ts=ts)
    elif kind == "vmac":
        c.vmac(ts=ts)
    else:
        c.send(m.Expected.create(PASSWORD, "0.0.0.0/0", ts).encode())
    assert c.closed
    assert c.close_frame == (CLOSE_POLICY, "clock skew")
    assert relay.disconnects()[0].reason == "clock skew"
    assert relay.server.clients == {}


@pytest.mark.parametrize("skew", [-30, 30])
def test_timestamps_at_the_window_edge_are_accepted(relay: Relay, skew: int) -> None:
    c = relay.client()
    c.vmac(ts=WALL + skew)
    c.expected(ts=WALL + skew)
    c.auth("10.99.0.10", ts=WALL + skew)
    assert not c.closed
    assert relay.server.clients == {ip("10.99.0.10"): c.cid}


@pytest.mark.parametrize("kind", [m.AUTH, m.EXPECTED, m.VMAC])
def test_truncated_handshake_closes(relay: Relay, kind: int) -> None:
    c = relay.client()
    c.send(bytes([kind]) + bytes(20))
    assert c.closed
    assert c.close_frame == (CLOSE_POLICY, "malformed handshake")


def test_replayed_auth_is_refused_and_does_not_take_over(relay: Relay) -> None:
    victim = relay.client()
    captured = victim.auth("10.99.0.10")
    other = relay.join("10.99.0.11")
    relay.wall += 5
    attacker = relay.client()
    attacker.write(attacker.frame(captured))
    assert attacker.closed and attacker.close_reason == "replayed handshake"
    assert not victim.closed
    assert relay.server.clients[ip("10.99.0.10")] == victim.cid
    assert relay.disconnects() == [ClientDisconnected(attacker.cid, None, "replayed handshake")]
    other.send(forward("10.99.0.11", "10.99.0.10"))
    assert len(victim.take()) == 1
    # the same AUTH with extra padding is the same AUTH
    again = relay.client()
    again.send(captured + b"pad")
    assert again.closed and again.close_reason == "replayed handshake"


def test_replayed_vmac_is_refused(relay: Relay) -> None:
    first = relay.client()
    data = first.vmac()
    second = relay.client()
    second.send(data)
    assert second.closed and second.close_reason == "replayed handshake"
    assert not first.closed


# --- FORWARD ----------------------------------------------------------------------------------
def test_forward_before_auth_is_dropped(relay: Relay) -> None:
    b = relay.join("10.99.0.2")
    a = relay.client()
    a.vmac()
    a.send(forward("10.99.0.1", "10.99.0.2"))
    assert b.take() == []
    assert not a.closed
    assert relay.server.stats.frames_dropped == 1


def test_spoofed_source_is_dropped(relay: Relay) -> None:
    a, b, _ = trio(relay)
    a.send(forward("10.99.0.3", "10.99.0.2"))
    assert b.take() == [] and not a.closed
    assert relay.server.stats.frames_dropped == 1


def test_forward_shorter_than_an_ipv4_header_is_dropped(relay: Relay) -> None:
    a, b, _ = trio(relay)
    a.send(forward("10.99.0.1", "10.99.0.2", b"")[:20])  # 19-byte packet
    a.send(b"\x01")
    assert b.take() == [] and not a.closed
    assert relay.server.stats.frames_dropped == 2
    a.send(forward("10.99.0.1", "10.99.0.2", b""))  # exactly 20 bytes is fine
    assert len(b.take()) == 1


def test_forward_of_17_bytes_is_dropped_without_an_exception(relay: Relay) -> None:
    a, b, c = trio(relay)
    a.send(forward("10.99.0.1", "10.99.0.2", b"")[:17])  # the server itself raises nothing
    assert b.take() == [] and c.take() == [] and not a.closed
    assert relay.server.stats.frames_dropped == 1
    assert relay.server.stats.rejected == 0


def test_every_forward_shorter_than_a_header_is_dropped_and_counted(relay: Relay) -> None:
    a, b, _ = trio(relay)
    full = forward("10.99.0.1", "10.99.0.2", b"")
    assert len(full) == 21
    for n in range(1, 21):
        a.send(full[:n])
    assert b.take() == [] and not a.closed
    assert relay.server.stats.frames_dropped == 20
    a.send(full)  # 21 bytes, the minimum: relayed
    assert b.take() == [full]


def test_forward_of_a_non_ipv4_packet_is_dropped(relay: Relay) -> None:
    a, b, _ = trio(relay)
    data = forward("10.99.0.1", "10.99.0.2")
    a.send(data[:1] + b"\x60" + data[2:])
    assert b.take() == [] and not a.closed
    assert relay.server.stats.frames_dropped == 1


def test_a_candy_6_encapsulated_forward_with_a_zeroed_outer_header_is_relayed(
    relay: Relay,
) -> None:
    """6.x fills only protocol 4 and the addresses of the outer header (PROTOCOL.md 6.2)."""
    a, b, _ = trio(relay)
    inner = packet("10.99.0.1", "172.31.0.5", b"to the LAN behind b")
    outer = bytearray(20)
    outer[9] = 4
    outer[12:16] = bytes([10, 99, 0, 1])
    outer[16:20] = bytes([10, 99, 0, 2])
    data = m.Forward(bytes(outer) + inner).encode()
    a.send(data)
    assert b.take() == [data]
    outer[9] = 17  # a zeroed header that does not say IPIP is still not IPv4
    a.send(m.Forward(bytes(outer) + inner).encode())
    assert b.take() == []
    assert relay.server.stats.frames_dropped == 1


def test_unicast_forward_reaches_only_its_destination(relay: Relay) -> None:
    a, b, c = trio(relay)
    data = forward("10.99.0.1", "10.99.0.2", b"hello b")
    a.send(data)
    assert b.take() == [data]
    assert a.take() == [] and c.take() == []
    assert relay.server.stats.frames_relayed == 1


@pytest.mark.parametrize("dst", ["10.99.0.255", "224.0.0.251", "239.255.255.250"])
def test_broadcast_and_multicast_reach_all_others(relay: Relay, dst: str) -> None:
    a, b, c = trio(relay)
    lurker = relay.client()  # connected, not authenticated
    data = forward("10.99.0.1", dst, b"to all")
    a.send(data)
    assert b.take() == [data] and c.take() == [data]
    assert a.take() == [] and lurker.take() == []


@pytest.mark.parametrize("dst", ["10.99.0.99", "10.98.0.255", "255.255.255.255", "8.8.8.8"])
def test_unknown_destination_is_dropped(relay: Relay, dst: str) -> None:
    a, b, c = trio(relay)
    a.send(forward("10.99.0.1", dst))
    assert b.take() == [] and c.take() == []
    assert relay.server.stats.frames_dropped == 1


def test_directed_broadcast_needs_a_dhcp_range() -> None:
    relay = Relay(config(dhcp=None))
    a, b, _ = trio(relay)
    a.send(forward("10.99.0.1", "10.99.0.255"))
    assert b.take() == []
    a.send(forward("10.99.0.1", "224.0.0.251"))
    assert len(b.take()) == 1


def test_several_frames_in_one_read_and_split_across_reads(relay: Relay) -> None:
    a, b, c = trio(relay)
    frames = [forward("10.99.0.1", "10.99.0.2", bytes([i]) * i) for i in range(1, 30)]
    wire = b"".join(a.frame(f) for f in frames)
    a.write(wire)
    assert b.take() == frames
    for i in range(len(wire)):
        a.write(wire[i : i + 1])
    assert b.take() == frames
    cut = len(wire) // 3
    a.write(wire[:cut])
    a.write(wire[cut:])
    assert b.take() == frames
    assert c.take() == []


def test_fragmented_forward_is_reassembled(relay: Relay) -> None:
    a, b, _ = trio(relay)
    data = forward("10.99.0.1", "10.99.0.2", b"x" * 500)
    a.write(a.frame(data[:7], fin=False) + a.frame(b"", OP_PING) + a.frame(data[7:], 0))
    assert b.take() == [data]
    assert a.controls(OP_PONG) == [b""]


# --- PEER, DISCOVERY, GENERAL -----------------------------------------------------------------
def test_peer_is_relayed_to_dst_only_with_source_check(relay: Relay) -> None:
    a, b, c = trio(relay)
    data = m.Peer(ip("10.99.0.1"), ip("10.99.0.2"), ip("203.0.113.5"), 40123).encode()
    a.send(data)
    assert b.take() == [data] and c.take() == [] and a.take() == []
    spoofed = m.Peer(ip("10.99.0.3"), ip("10.99.0.2"), ip("203.0.113.5"), 1).encode()
    a.send(spoofed)
    assert b.take() == []
    broadcast = m.Peer(ip("10.99.0.1"), m.BROADCAST, ip("203.0.113.5"), 1).encode()
    a.send(broadcast)
    assert b.take() == [] and c.take() == []
    stranger = relay.client()
    stranger.send(data)
    assert b.take() == []
    assert relay.server.stats.frames_dropped == 3
    assert not a.closed and not stranger.closed


@pytest.mark.parametrize("kind", ["discovery", "general"])
def test_discovery_and_general_unicast_and_broadcast(relay: Relay, kind: str) -> None:
    a, b, c = trio(relay)

    def make(src: str, dst: str) -> bytes:
        if kind == "discovery":
            return m.Discovery(ip(src), ip(dst)).encode()
        return m.General(9, 77, ip(src), ip(dst), b"opaque data").encode()

    unicast = make("10.99.0.1", "10.99.0.3")
    a.send(unicast)
    assert c.take() == [unicast] and b.take() == [] and a.take() == []
    broadcast = make("10.99.0.1", "255.255.255.255")
    a.send(broadcast)
    assert b.take() == [broadcast] and c.take() == [broadcast] and a.take() == []
    dropped = relay.server.stats.frames_dropped
    a.send(make("10.99.0.2", "255.255.255.255"))  # spoofed broadcast
    a.send(make("10.99.0.2", "10.99.0.3"))  # spoofed unicast
    a.send(make("10.99.0.1", "10.99.0.200"))  # nobody there
    assert b.take() == [] and c.take() == []
    assert relay.server.stats.frames_dropped == dropped + 3
    stranger = relay.client()
    stranger.send(make("10.99.0.1", "255.255.255.255"))
    assert b.take() == [] and c.take() == []
    assert not a.closed and not stranger.closed


@pytest.mark.parametrize("kind", ["forward", "peer", "general", "discovery"])
def test_unicast_to_the_senders_own_address_is_not_sent_back(relay: Relay, kind: str) -> None:
    """A member never gets its own unicast frames back from the relay (nor does anyone else)."""
    a, b, c = trio(relay)
    own, other = ip("10.99.0.1"), ip("10.99.0.2")

    def make(dst: IPv4Address) -> bytes:
        if kind == "forward":
            return forward(str(own), str(dst), b"to myself")
        if kind == "peer":
            return m.Peer(own, dst, ip("203.0.113.5"), 40123).encode()
        if kind == "discovery":
            return m.Discovery(own, dst).encode()
        return m.General.lan_endpoint(own, dst, ip("192.168.1.10"), 40000).encode()

    a.send(make(own))
    assert a.take() == [], "the relay sent a member's frame back to it"
    assert b.take() == [] and c.take() == []
    assert relay.server.stats.frames_relayed == 0
    # The same frame for another member is relayed, and the sender stays connected.
    a.send(make(other))
    assert b.take() == [make(other)] and a.take() == [] and c.take() == []
    assert not a.closed


def test_general_lan_endpoint_is_passed_through_untouched(relay: Relay) -> None:
    a, b, _ = trio(relay)
    data = m.General.lan_endpoint(ip("10.99.0.1"), ip("10.99.0.2"), ip("0.0.0.0"), 0).encode()
    a.send(data)
    assert b.take() == [data]


def test_malformed_relay_messages_are_dropped_not_fatal(relay: Relay) -> None:
    a, b, _ = trio(relay)
    for kind in (m.PEER, m.DISCOVERY, m.GENERAL):
        a.send(bytes([kind]) + ip("10.99.0.1").packed)
    assert not a.closed and b.take() == []
    a.send(forward("10.99.0.1", "10.99.0.2"))
    assert len(b.take()) == 1


@pytest.mark.parametrize("payload", [b"\x07", b"\x06abc", b"\xfe" + bytes(100)])
def test_unknown_message_type_is_ignored(relay: Relay, payload: bytes) -> None:
    a, b, c = trio(relay)
    a.send(payload)
    assert not a.closed
    assert b.take() == [] and c.take() == [] and a.take() == []
    a.send(forward("10.99.0.1", "10.99.0.2"))
    assert len(b.take()) == 1


def test_empty_binary_frame_is_ignored(relay: Relay) -> None:
    a, b, _ = trio(relay)
    a.send(b"")
    assert not a.closed
    a.send(forward("10.99.0.1", "10.99.0.2"))
    assert len(b.take()) == 1


def test_text_frame_is_ignored(relay: Relay) -> None:
    a, b, _ = trio(relay)
    a.send(forward("10.99.0.1", "10.99.0.2"), OP_TEXT)
    assert b.take() == [] and not a.closed


# --- control frames ---------------------------------------------------------------------------
def test_ping_is_answered_with_pong_carrying_the_same_payload(relay: Relay) -> None:
    c = relay.client()  # no handshake needed
    c.send(b"candy::linux::5.6", OP_PING)
    assert c.controls(OP_PONG) == [b"candy::linux::5.6"]
    assert c.frames[-1] == Frame(OP_PONG, b"candy::linux::5.6")
    assert not c.closed


def test_client_close_is_answered_and_closed(relay: Relay) -> None:
    a, b, _ = trio(relay)
    a.send(close_payload(CLOSE_NORMAL, "bye"), OP_CLOSE)
    assert a.closed
    assert a.close_frame == (CLOSE_NORMAL, "")
    assert relay.disconnects() == [
        ClientDisconnected(a.cid, ip("10.99.0.1"), "client closed the connection")
    ]
    assert ip("10.99.0.1") not in relay.server.clients
    b.send(forward("10.99.0.2", "10.99.0.1"))
    assert relay.server.stats.frames_dropped == 1


@pytest.mark.parametrize(
    ("payload", "answer"),
    [
        (b"\x34", (CLOSE_PROTOCOL_ERROR, "one-byte close payload")),  # 88 81 <mask> 34
        (b"\x00\x00", (CLOSE_PROTOCOL_ERROR, "invalid close code")),
        (b"\x03\xed", (CLOSE_PROTOCOL_ERROR, "invalid close code")),  # 1005: local only
        (b"\x07\xd0", (CLOSE_PROTOCOL_ERROR, "invalid close code")),  # 2000: unassigned
        (b"", None),
    ],
)
def test_invalid_client_close_is_answered_with_a_protocol_error(
    relay: Relay, payload: bytes, answer: tuple[int, str] | None
) -> None:
    c = relay.client()
    c.send(payload, OP_CLOSE)
    assert c.closed
    assert c.controls(OP_CLOSE) == [b""] if answer is None else c.close_frame == answer


def test_frames_after_close_in_the_same_read_are_ignored(relay: Relay) -> None:
    a, b, _ = trio(relay)
    a.write(a.frame(b"\x03\xe8", OP_CLOSE) + a.frame(forward("10.99.0.1", "10.99.0.2")))
    assert a.closed and b.take() == []


def test_oversize_frame_closes_only_that_connection(relay: Relay) -> None:
    a, b, c = trio(relay)
    big = relay.server.config.max_frame + 1
    header = bytes([0x82, 0xFE]) + big.to_bytes(2, "big")  # masked, 16-bit length
    c.write(header)  # the payload never arrives: refused on the header
    assert c.closed
    code, reason = c.close_frame  # type: ignore[misc]
    assert code == CLOSE_TOO_BIG and "exceeds" in reason
    assert relay.disconnects()[0].cid == c.cid
    data = forward("10.99.0.1", "10.99.0.2", bytes(relay.server.config.max_frame - 21))
    assert len(data) == relay.server.config.max_frame
    a.send(data)
    assert b.take() == [data]
    b.send(forward("10.99.0.2", "10.99.0.1"))
    assert len(a.take()) == 1


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (bytes([0x82, 0x05]) + b"hello", 1002),  # unmasked
        (bytes([0xC2, 0x80]) + b"mask", 1002),  # RSV1
        (bytes([0x89, 0xFE, 0x00, 0x7E]) + b"mask" + bytes(126), 1002),  # ping > 125
    ],
    ids=["unmasked", "rsv1", "big-ping"],
)
def test_protocol_violations_close_with_their_code(relay: Relay, data: bytes, code: int) -> None:
    a, b, _ = trio(relay)
    a.write(data)
    assert a.closed and a.close_frame[0] == code  # type: ignore[index]
    assert not b.closed


# --- timers -----------------------------------------------------------------------------------
def test_authentication_timeout(relay: Relay) -> None:
    timeout = relay.server.config.auth_timeout
    idle = relay.client()  # upgraded, never authenticates
    silent = relay.client(connect=False)
    silent.connect(upgrade=False)  # never even upgrades
    good = relay.join("10.99.0.1")
    assert relay.server.next_deadline() is not None
    relay.advance(timeout)
    assert not idle.closed and not silent.closed
    relay.advance(1.0)
    assert idle.closed and silent.closed and not good.closed
    assert idle.close_frame == (CLOSE_POLICY, "authentication timeout")
    assert silent.http == b""  # no HTTP answer, no frame: just closed
    reasons = {e.cid: e.reason for e in relay.disconnects()}
    assert reasons == {idle.cid: "authentication timeout", silent.cid: "authentication timeout"}


def test_handle_timer_before_the_deadline_does_nothing(relay: Relay) -> None:
    c = relay.client()
    deadline = relay.server.next_deadline()
    assert deadline is not None
    relay.server.handle_timer(relay.now + 1000)  # late: sweeps once
    relay.pump()
    assert c.closed
    assert relay.server.next_deadline() is None  # nothing left to watch
    d = relay.client()
    assert relay.server.next_deadline() is not None
    relay.server.handle_timer(relay.now + 0.5)  # early: ignored
    relay.pump()
    assert not d.closed


def test_idle_timeout(relay: Relay) -> None:
    idle_timeout = relay.server.config.idle_timeout
    quiet = relay.join("10.99.0.1")
    chatty = relay.join("10.99.0.2")
    elapsed = 0.0
    while elapsed + 15 < idle_timeout:
        relay.advance(15)
        elapsed += 15
        chatty.send(b"candy::linux::5.6", OP_PING)
    relay.advance(idle_timeout - elapsed)
    assert not quiet.closed  # exactly idle_timeout: not yet
    relay.advance(1.0)
    assert quiet.closed and not chatty.closed
    assert quiet.close_frame == (CLOSE_GOING_AWAY, "idle timeout")
    assert relay.disconnects() == [ClientDisconnected(quiet.cid, ip("10.99.0.1"), "idle timeout")]
    assert ip("10.99.0.1") not in relay.server.clients


def test_silent_client_is_pinged_and_kept_while_it_answers(relay: Relay) -> None:
    """A client that only receives never pings; the server asks, and a PONG keeps it."""
    idle_timeout = relay.server.config.idle_timeout
    listener = relay.join("10.99.0.1")
    relay.advance(idle_timeout / 3 + 1)
    pings = listener.controls(OP_PING)
    assert pings, "the server did not ping a silent client"
    for _ in range(4):
        listener.send(pings[-1], OP_PONG)
        relay.advance(idle_timeout / 2)
        pings = listener.controls(OP_PING) or pings
    assert not listener.closed
    relay.advance(idle_timeout + 1)  # stops answering: closed as idle
    assert listener.close_frame == (CLOSE_GOING_AWAY, "idle timeout")


# --- slow readers -----------------------------------------------------------------------------
def test_slow_reader_gets_a_bounded_backlog() -> None:
    relay = Relay(config(send_queue_limit=3))
    a, b, c = trio(relay)
    relay.server.pause_writing(b.cid)
    to_b = [forward("10.99.0.1", "10.99.0.2", b"b%d" % i) for i in range(10)]
    to_c = [forward("10.99.0.1", "10.99.0.3", b"c%d" % i) for i in range(10)]
    for fb, fc in zip(to_b, to_c, strict=True):
        a.send(fb)
        a.send(fc)
    broadcast = forward("10.99.0.1", "10.99.0.255", b"all")
    a.send(broadcast)
    assert b.take() == []
    assert c.take() == [*to_c, broadcast]  # others unaffected
    assert relay.server.stats.backlog_dropped == 8  # 11 frames, room for 3
    # b's own frames still flow while it is paused
    b.send(forward("10.99.0.2", "10.99.0.1"))
    assert len(a.take()) == 1
    relay.server.resume_writing(b.cid)
    relay.pump()
    assert b.take() == [to_b[8], to_b[9], broadcast]  # the newest, in order
    a.send(to_b[0])
    assert b.take() == [to_b[0]]


def test_resume_releases_the_backlog_in_order(relay: Relay) -> None:
    a, b, _ = trio(relay)
    relay.server.pause_writing(b.cid)
    frames = [forward("10.99.0.1", "10.99.0.2", bytes([i])) for i in range(50)]
    for f in frames:
        a.send(f)
    assert b.take() == []
    assert relay.server.stats.backlog_dropped == 0
    relay.server.resume_writing(b.cid)
    relay.server.resume_writing(b.cid)  # twice is harmless
    relay.pump()
    assert b.take() == frames


def test_paused_connection_is_still_closed_with_its_reason(relay: Relay) -> None:
    a = relay.join("10.99.0.1")
    relay.server.pause_writing(a.cid)
    replacement = relay.client()
    replacement.auth("10.99.0.1", ts=WALL + 1)
    assert a.closed
    assert a.close_reason == "address taken over by a newer connection"


# --- connection_lost --------------------------------------------------------------------------
def test_connection_lost_removes_the_route(relay: Relay) -> None:
    a, b, c = trio(relay)
    relay.server.connection_lost(b.cid, "connection reset")
    relay.pump()
    assert relay.disconnects() == [ClientDisconnected(b.cid, ip("10.99.0.2"), "connection reset")]
    assert ip("10.99.0.2") not in relay.server.clients
    b.closed = True  # the socket is gone: nothing may be written to it any more
    a.send(forward("10.99.0.1", "10.99.0.2"))
    a.send(forward("10.99.0.1", "10.99.0.255"))
    assert c.take() == [forward("10.99.0.1", "10.99.0.255")]
    assert relay.server.stats.frames_dropped == 1
    # the address is free again: no take-over needed
    d = relay.client()
    d.auth("10.99.0.2", ts=WALL + 1)
    assert relay.server.clients[ip("10.99.0.2")] == d.cid
    relay.server.connection_lost(b.cid)  # a second report is ignored
    relay.server.connection_lost("never-seen")
    relay.pump()
    assert len(relay.disconnects()) == 1


def test_connection_lost_after_server_close_reports_once(relay: Relay) -> None:
    c = relay.client()
    c.auth("10.99.0.1", pw="wrong")
    assert c.closed
    relay.server.connection_lost(c.cid)
    relay.pump()
    assert [e.reason for e in relay.disconnects()] == ["wrong password"]


def test_stats_count_connections(relay: Relay) -> None:
    trio(relay)
    relay.client().auth("10.99.0.9", pw="wrong")
    stats = relay.server.stats
    assert stats.connections == 4
    assert stats.authenticated == 3
    assert stats.rejected == 1


def test_binary_header_used_for_relayed_frames(relay: Relay) -> None:
    """Relayed frames are plain unmasked binary frames, whatever their size."""
    a, b, _ = trio(relay)
    data = forward("10.99.0.1", "10.99.0.2", bytes(300))
    a.send(data)
    assert b.take() == [data]
    relay.server.pause_writing(b.cid)
    a.send(data)
    relay.server.resume_writing(b.cid)
    raw = relay.server.data_to_send()
    assert raw == [(b.cid, binary_header(len(data)) + data)]
