"""The client core: handshake, packet routing, keep-alive and reconnection (PROTOCOL.md 3).

The shell opens a TCP (or TLS) connection when :meth:`Client.take_connect_request` says so,
hands every byte read to :meth:`Client.receive_data` and every TUN packet to
:meth:`Client.receive_packet`, and writes out what :meth:`Client.data_to_send` and
:meth:`Client.packets_to_deliver` return. Time comes in as arguments, randomness from the
``rng`` handed in.
"""

from __future__ import annotations

import base64
import logging
import random
from collections import deque
from dataclasses import asdict, dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv4Interface

from candy_core import icmp
from candy_core import messages as m
from candy_core.auth import within_window
from candy_core.config import ClientConfig
from candy_core.errors import ProtocolError
from candy_core.events import (
    AddressChanged,
    ClientEvent,
    Connected,
    Disconnected,
    PingReply,
    Reconnecting,
)
from candy_core.peers import MAX_PEERS, PeerManager
from candy_core.status import ClientStatus, ServerLink, Traffic
from candy_core.upgrade import ClientUpgrade
from candy_core.wsframe import (
    CLOSE_NORMAL,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameError,
    FrameParser,
    apply_mask,
    close_payload,
    close_reply,
    encode_frame,
    parse_close,
)

log = logging.getLogger("candy.client")

#: A connection that lasted this long resets the reconnection back-off.
STABLE_AFTER = 15.0
#: A server that closes this soon after our handshake, without a reason and without having
#: sent anything since, refused it.
REFUSED_WITHIN = 5.0
#: Most random padding bytes added to AUTH, EXPECTED and VMAC.
MAX_PADDING = 64
#: Seconds an unanswered ping is remembered, and how many may be in flight at once.
PING_FORGET = 30.0
MAX_PINGS = 256

_HEX = "0123456789abcdef"


def new_vmac(rng: random.Random) -> bytes:
    """A fresh VMAC: 16 random lowercase hex characters, as the reference makes it."""
    return "".join(rng.choice(_HEX) for _ in range(16)).encode()


@dataclass
class ClientState:
    """What a client remembers across runs (the shell loads and saves it)."""

    vmac: bytes
    #: Last address the server assigned (dynamic clients ask for it again).
    address: IPv4Interface | None = None


class Phase(Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    UPGRADING = "upgrading"
    OPEN = "open"


@dataclass(slots=True)
class ClientStats:
    """Counters a user may want to see."""

    packets_to_server: int = 0
    packets_from_server: int = 0
    packets_dropped: int = 0
    reconnects: int = 0


class _MaskSource:
    """WebSocket masking keys drawn from the rng in batches (one call per 1024 frames)."""

    __slots__ = ("_buf", "_pos", "_rng")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._buf = b""
        self._pos = 0

    def take(self) -> bytes:
        pos = self._pos
        if pos >= len(self._buf):
            self._buf = self._rng.randbytes(4096)
            pos = 0
        self._pos = pos + 4
        return self._buf[pos : pos + 4]


class Client:
    """One client of one Candy network."""

    def __init__(self, config: ClientConfig, rng: random.Random, state: ClientState) -> None:
        self.config = config
        self.state = state
        self._rng = rng
        self._masks = _MaskSource(rng)
        self.address: IPv4Interface | None = config.tun
        self._ip: bytes | None = config.tun.ip.packed if config.tun else None
        self.phase = Phase.IDLE
        self.authenticated = False
        self._upgrade: ClientUpgrade | None = None
        self._parser: FrameParser | None = None
        self._out: list[bytes] = []
        self._to_tun: list[bytes] = []
        self._events: deque[ClientEvent] = deque()
        self._connect_requested = False
        self._close_requested = False
        self._connect_at: float | None = None
        self._attempt = 0
        self._opened_at = 0.0
        self._handshake_at: float | None = None
        self._last_recv = 0.0
        self._last_ping = 0.0
        self._close_reason: str | None = None
        self._handshake_ts = 0
        self._started = False
        self.stats = ClientStats()
        self.peers = PeerManager(config, rng, self._send_message)
        #: Tunnel packets per peer and per path (what ``candy status`` shows).
        self.traffic = Traffic(MAX_PEERS)
        self._link_state = "connecting"
        self._link_since = 0.0
        self._last_error: str | None = None
        self._ping_ident = rng.randrange(1, 0x10000)
        self._ping_seq = 0
        #: Echo requests in flight: (destination, sequence) -> monotonic time sent.
        self._pings: dict[tuple[bytes, int], float] = {}

    # --- lifecycle ----------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Begin: bring up a static address (if any) and ask for a connection."""
        if self._started:
            return
        self._started = True
        if self.address is not None:
            self._events.append(AddressChanged(self.address))
            self.peers.set_address(self.address)
        self._request_connect(now)

    def take_connect_request(self) -> bool:
        """``True`` once each time the shell should open a new connection to the server."""
        requested, self._connect_requested = self._connect_requested, False
        return requested

    def take_close_request(self) -> bool:
        """``True`` once when the shell should close the current connection."""
        requested, self._close_requested = self._close_requested, False
        return requested

    def connection_made(self, now: float, nonce: bytes | None = None) -> None:
        """The TCP (and TLS) connection is up: the upgrade request goes out."""
        cfg = self.config
        if nonce is None:
            nonce = base64.b64encode(self._rng.randbytes(16))
        self.phase = Phase.UPGRADING
        # Nothing queued for an earlier connection may precede this one's upgrade request.
        self._out.clear()
        self._opened_at = self._last_recv = self._last_ping = now
        self._handshake_at = None
        self._close_reason = None
        self.authenticated = False
        self._upgrade = ClientUpgrade(cfg.host, cfg.port, cfg.path, nonce)
        self._parser = FrameParser(cfg.max_frame, expect_mask=False)
        self._out.append(self._upgrade.request())

    def connection_failed(self, now: float, reason: str) -> None:
        """Opening the connection failed (refused, unreachable, TLS error...)."""
        if self.phase is Phase.CONNECTING:
            self.phase = Phase.IDLE
            self._last_error = f"cannot connect: {reason}"
            self._events.append(Disconnected(self._last_error))
            log.warning("cannot connect to the server: %s", reason)
            self._schedule_reconnect(now, stable=False)

    def connection_lost(self, now: float, reason: str = "connection closed by the server") -> None:
        """The connection ended (EOF or error) while the core still considered it open."""
        if self.phase in (Phase.UPGRADING, Phase.OPEN):
            self._lost(now, self._explain(now, reason))

    def _explain(self, now: float, reason: str) -> str:
        if self._close_reason:
            return f"server closed the connection: {self._close_reason}"
        handshake_at = self._handshake_at
        if (
            handshake_at is not None
            and self._last_recv <= handshake_at  # no answer: an address reply means accepted
            and now - handshake_at <= REFUSED_WITHIN
        ):
            return (
                "the server refused the handshake (a wrong password or a clock more than "
                "30 s off are the likely causes)"
            )
        return reason

    def _lost(self, now: float, reason: str) -> None:
        stable = self.phase is Phase.OPEN and now - self._opened_at >= STABLE_AFTER
        self.phase = Phase.IDLE
        self.authenticated = False
        self._upgrade = None
        self._parser = None
        self._out.clear()
        log.warning("disconnected: %s", reason)
        self._last_error = reason
        self._events.append(Disconnected(reason))
        self._schedule_reconnect(now, stable)

    def _request_connect(self, now: float) -> None:
        self.phase = Phase.CONNECTING
        self._connect_at = None
        self._connect_requested = True
        self._link(now, "connecting")

    def _link(self, now: float, state: str) -> None:
        if state != self._link_state:
            self._link_state = state
            self._link_since = now

    def _schedule_reconnect(self, now: float, stable: bool) -> None:
        cfg = self.config
        if stable:
            self._attempt = 0
        self._attempt += 1
        base = min(cfg.backoff_max, cfg.backoff_min * 2 ** (self._attempt - 1))
        delay = max(cfg.backoff_min, base * (0.75 + 0.5 * self._rng.random()))
        delay = min(delay, cfg.backoff_max)
        self._connect_at = now + delay
        self._link(now, "backoff")
        self.stats.reconnects += 1
        self._events.append(Reconnecting(delay, self._attempt))

    # --- timers -------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` wants to run next (monotonic seconds)."""
        deadlines = [self.peers.next_deadline()]
        if self._connect_at is not None:
            deadlines.append(self._connect_at)
        if self.phase in (Phase.UPGRADING, Phase.OPEN):
            cfg = self.config
            deadlines.append(self._last_recv + cfg.dead_after)
            if self.phase is Phase.OPEN:  # no pings before the upgrade completes
                deadlines.append(max(self._last_recv, self._last_ping) + cfg.ping_interval)
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def handle_timer(self, now: float) -> None:
        """Reconnect, keep the connection alive or declare it dead, tick the peers."""
        cfg = self.config
        if self._connect_at is not None and now >= self._connect_at:
            self._request_connect(now)
        if self.phase in (Phase.UPGRADING, Phase.OPEN):
            if now - self._last_recv >= cfg.dead_after:
                self._close_requested = True
                self._lost(now, f"no answer from the server for {cfg.dead_after:g} s")
            elif (
                self.phase is Phase.OPEN
                and now - max(self._last_recv, self._last_ping) >= cfg.ping_interval
            ):
                self._last_ping = now
                payload = f"candy::linux::{cfg.version}".encode()
                self._out.append(encode_frame(OP_PING, payload, self._masks.take()))
        self.peers.handle_timer(now)

    # --- output -------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        """Bytes to write to the server connection."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def packets_to_deliver(self) -> list[bytes]:
        """IPv4 packets to write to the TUN device (or hand to the embedding program)."""
        packets, self._to_tun = self._to_tun, []
        return packets

    def datagrams_to_send(self) -> list[tuple[bytes, tuple[str, int]]]:
        """UDP datagrams for peers and STUN, with their destination."""
        return self.peers.datagrams_to_send()

    def next_event(self) -> ClientEvent | None:
        """The next event for the embedding program, or ``None``."""
        if self._events:
            return self._events.popleft()
        return self.peers.next_event()

    def close(self) -> None:
        """Say goodbye: a CLOSE frame goes out; the shell then closes the connection."""
        if self.phase is Phase.OPEN:
            self._out.append(
                encode_frame(
                    OP_CLOSE, close_payload(CLOSE_NORMAL, "client exit"), self._masks.take()
                )
            )
        self.phase = Phase.IDLE
        self._connect_at = None
        self._close_requested = True

    # --- packets from TUN ---------------------------------------------------------------
    def receive_packet(self, packet: bytes, now: float) -> None:
        """One packet read from TUN: to ourselves, to a peer directly, or to the server."""
        ip = self._ip
        try:
            src, dst = m.ipv4_endpoints(packet)
        except ProtocolError:
            src = dst = b""  # dropped just below
        if ip is None or src != ip:
            self.stats.packets_dropped += 1
            return
        if dst == ip:
            if self._pings and self._ping_answered(packet, now, "local", None):
                return
            self._to_tun.append(packet)
            return
        path = self.peers.send_packet(dst, packet, now)
        if path is None:
            if not self.authenticated:
                self.stats.packets_dropped += 1
                return
            self.stats.packets_to_server += 1
            self._send_binary(b"\x01" + packet)
            path = "relay"
        self.traffic.sent(dst, path, len(packet))

    def _send_binary(self, payload: bytes) -> None:
        mask = self._masks.take()
        n = len(payload)
        # Payloads stay far below 64 KiB (an IP packet of at most the MTU plus one byte).
        head = bytes((0x82, 0x80 | n)) if n < 126 else bytes((0x82, 0xFE, n >> 8, n & 0xFF))
        self._out.append(head + mask + apply_mask(payload, mask))

    def _send_message(self, payload: bytes) -> bool:
        if not self.authenticated:
            return False
        self._send_binary(payload)
        return True

    # --- UDP ----------------------------------------------------------------------------
    def udp_bound(self, port: int) -> None:
        """The shell bound the peer-to-peer UDP socket to ``port``."""
        self.peers.local_port = port

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        """One UDP datagram (a peer's or the STUN server's answer)."""
        for packet in self.peers.receive_datagram(data, addr, now):
            src = packet[12:16]
            path = self.peers.path_from(src, addr)
            self.traffic.received(src, path, len(packet))
            if self._pings and self._ping_answered(packet, now, path, addr):
                continue
            self._to_tun.append(packet)

    # --- bytes from the server ----------------------------------------------------------
    def receive_data(self, data: bytes, now: float, wall: float) -> None:
        """Bytes read from the server connection."""
        if self.phase is Phase.UPGRADING:
            data = self._receive_upgrade(data, now, wall)
        if self.phase is not Phase.OPEN or not data:
            return
        self._last_recv = now
        assert self._parser is not None  # made in connection_made(), dropped when it ends
        try:
            frames = self._parser.feed(data)
        except FrameError as exc:
            self._protocol_failure(now, f"bad frame from the server: {exc}", exc.code)
            return
        for frame in frames:
            if self.phase is not Phase.OPEN:
                return
            if frame.opcode == OP_BINARY:
                payload = frame.payload
                if payload and payload[0] == m.FORWARD:
                    try:
                        src, _ = m.ipv4_endpoints(payload, 1)
                    except ProtocolError:
                        self.stats.packets_dropped += 1
                        continue
                    self.stats.packets_from_server += 1
                    packet = payload[1:]
                    self.traffic.received(src, "relay", len(packet))
                    self.peers.relayed_from(src, now)
                    if self._pings and self._ping_answered(packet, now, "relay", None):
                        continue
                    self._to_tun.append(packet)
                else:
                    self._message(payload, now, wall)
            elif frame.opcode == OP_PING:
                self._out.append(encode_frame(OP_PONG, frame.payload, self._masks.take()))
            elif frame.opcode == OP_CLOSE:
                code, reason = parse_close(frame.payload)
                self._close_reason = reason or (f"close code {code}" if code else "no reason")
                self._close_requested = True
                self._lost(now, self._explain(now, "closed"))
                # After _lost (which discards pending output): the echo must still go out.
                reply = close_reply(frame.payload)
                self._out.append(encode_frame(OP_CLOSE, reply, self._masks.take()))

    def _receive_upgrade(self, data: bytes, now: float, wall: float) -> bytes:
        assert self._upgrade is not None  # made in connection_made(), dropped once OPEN
        try:
            result = self._upgrade.receive(data)
        except ProtocolError as exc:
            self._protocol_failure(now, str(exc))
            return b""
        if result.rejected:
            self._protocol_failure(now, result.rejected)
            return b""
        if not result.accepted:
            return b""
        self.phase = Phase.OPEN
        self._last_recv = now
        self._upgrade = None
        log.debug("WebSocket open to %s:%d", self.config.host, self.config.port)
        self._send_handshake(now, wall)
        return result.trailing

    def _protocol_failure(self, now: float, reason: str, code: int = 1002) -> None:
        was_open = self.phase is Phase.OPEN
        self._close_requested = True
        self._lost(now, reason)
        if was_open:  # after _lost, which discards pending output
            self._out.append(
                encode_frame(OP_CLOSE, close_payload(code, reason[:100]), self._masks.take())
            )

    def _padding(self) -> bytes:
        if not self.config.confusion:
            return b""
        return self._rng.randbytes(self._rng.randrange(MAX_PADDING + 1))

    def _send_handshake(self, now: float, wall: float) -> None:
        cfg = self.config
        # The server refuses handshake bytes it has seen before (replay window); a reconnect
        # within the same second must not repeat them, so timestamps only go forward.
        ts = self._handshake_ts = max(int(wall), self._handshake_ts + 1)
        self._send_binary(
            m.Vmac.create(cfg.password, self.state.vmac, ts, self._padding()).encode()
        )
        if cfg.tun is not None:
            self._send_auth(now, ts)
        else:
            wanted = self.address or self.state.address
            cidr = str(wanted) if wanted else "0.0.0.0/0"
            self._send_binary(m.Expected.create(cfg.password, cidr, ts, self._padding()).encode())
        self._handshake_at = self._last_recv

    def _send_auth(self, now: float, ts: int) -> None:
        assert self.address is not None
        msg = m.Auth.create(self.config.password, self.address.ip, ts, self._padding())
        self._send_binary(msg.encode())
        self.authenticated = True
        self._link(now, "connected")
        self._events.append(Connected(self.address))

    def _message(self, payload: bytes, now: float, wall: float) -> None:
        try:
            msg = m.decode(payload)
        except ProtocolError as exc:
            log.warning("ignoring a malformed message from the server: %s", exc)
            return
        if isinstance(msg, m.Expected):
            self._expected_reply(msg, now, wall)
        elif isinstance(msg, m.Peer | m.Discovery | m.General):
            if self.authenticated:
                self.peers.receive_message(msg, now)
        elif not isinstance(msg, m.Unknown):
            log.debug("ignoring unexpected %s from the server", type(msg).__name__)

    def _expected_reply(self, msg: m.Expected, now: float, wall: float) -> None:
        cfg = self.config
        if cfg.tun is not None or self.authenticated:
            log.debug("ignoring an unsolicited address assignment")
            return
        if not msg.verify(cfg.password):
            self._protocol_failure(
                now, "the server's address assignment does not verify (is the password right?)"
            )
            return
        if not within_window(msg.timestamp, wall, cfg.clock_window):
            self._protocol_failure(
                now,
                f"the server's address assignment is {int(msg.timestamp - wall):+d} s away "
                "from our clock (is either clock wrong?)",
            )
            return
        try:
            address = IPv4Interface(msg.cidr)
        except ValueError:
            self._protocol_failure(now, f"the server assigned an invalid address {msg.cidr!r}")
            return
        if address.network.prefixlen == 0 or address.ip == IPv4Address(0):
            self._protocol_failure(now, f"the server assigned an unusable address {msg.cidr}")
            return
        if address != self.address:
            self.address = address
            self._ip = address.ip.packed
            self.state.address = address
            log.debug("assigned address %s", address)
            self._events.append(AddressChanged(address))
            self.peers.set_address(address)
        self._send_auth(now, self._handshake_ts)

    # --- what an operator sees ----------------------------------------------------------
    def ping(self, dst: IPv4Address, now: float, payload: bytes = b"candy ping") -> int | None:
        """Send an ICMP echo request from our address to ``dst`` over the usual path.

        Returns its sequence number, or None when we have no address yet. The reply becomes a
        :class:`PingReply` event (never a packet for TUN); unanswered requests are forgotten
        after :data:`PING_FORGET` seconds.
        """
        if self._ip is None:
            return None
        self._forget_pings(now)
        self._ping_seq = seq = (self._ping_seq + 1) & 0xFFFF
        self._pings[(dst.packed, seq)] = now
        request = icmp.echo(self._ip, dst.packed, self._ping_ident, seq, payload)
        self.receive_packet(request, now)
        return seq

    def _forget_pings(self, now: float) -> None:
        pings = self._pings
        for key in [k for k, sent in pings.items() if now - sent > PING_FORGET]:
            del pings[key]
        while len(pings) >= MAX_PINGS:
            del pings[next(iter(pings))]

    def _ping_answered(
        self, packet: bytes, now: float, path: str, addr: tuple[str, int] | None
    ) -> bool:
        """True (and a PingReply event) if ``packet`` answers one of our echo requests."""
        echo = icmp.parse_echo(packet)
        if echo is None or echo.kind != icmp.ECHO_REPLY or echo.ident != self._ping_ident:
            return False
        sent = self._pings.pop((echo.src, echo.seq), None)
        if sent is None:
            return False
        endpoint = f"{addr[0]}:{addr[1]}" if addr is not None and path != "route" else None
        rtt = round((now - sent) * 1000, 3)
        self._events.append(PingReply(IPv4Address(echo.src), echo.seq, rtt, path, endpoint))
        return True

    def status(self, now: float, wall: float, url: str) -> ClientStatus:
        """A snapshot for ``candy status``: the server link, every peer, the counters."""
        cfg = self.config
        link = ServerLink(
            url=url,
            state=self._link_state,
            since=round(wall - (now - self._link_since), 3) if self._started else wall,
            last_error=self._last_error,
        )
        counters = {
            "packets_to_server": self.stats.packets_to_server,
            "packets_from_server": self.stats.packets_from_server,
            "packets_dropped": self.stats.packets_dropped,
            "reconnects": self.stats.reconnects,
            **self.peers.counters(),
        }
        paths = {name: asdict(c) for name, c in self.traffic.paths.items()}
        return ClientStatus(
            name=cfg.name,
            interface=cfg.interface_name,
            address=str(self.address) if self.address else None,
            server=link,
            peers=self.peers.describe(now, self.traffic),
            counters=counters,
            paths=paths,
        )
