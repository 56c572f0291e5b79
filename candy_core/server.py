"""The relay server core: all connections of one relay, raw TCP bytes in, bytes out.

No sockets, no clock: the shell calls :meth:`RelayServer.connection_made`,
:meth:`~RelayServer.receive_data` and :meth:`~RelayServer.handle_timer` with the current
time, then collects :meth:`~RelayServer.data_to_send`, :meth:`~RelayServer.connections_to_close`
and :meth:`~RelayServer.next_event`.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from candy_core import messages as m
from candy_core.addressing import BROADCAST, AddressPool, is_multicast
from candy_core.auth import ReplayGuard, within_window
from candy_core.config import ServerConfig
from candy_core.errors import ProtocolError
from candy_core.events import AddressAssigned, ClientAuthenticated, ClientDisconnected, ServerEvent
from candy_core.limits import SourceLimiter, source_of
from candy_core.status import ClientInfo, ServerStatus
from candy_core.upgrade import ServerUpgrade
from candy_core.wsframe import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameError,
    FrameParser,
    binary_header,
    close_payload,
    close_reply,
    encode_frame,
)

log = logging.getLogger("candy.server")

#: How often the server sweeps connections for handshake and idle timeouts, in seconds.
SWEEP_INTERVAL = 1.0


class Phase(Enum):
    UPGRADING = "upgrading"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(eq=False, slots=True)
class _Connection:
    cid: Hashable
    peer: str
    source: str
    opened: float
    last_seen: float
    last_ping: float = 0.0
    phase: Phase = Phase.UPGRADING
    upgrade: ServerUpgrade | None = field(default_factory=ServerUpgrade)
    parser: FrameParser | None = None
    ip: bytes | None = None
    vmac: bytes | None = None
    out: list[bytes] = field(default_factory=list)
    paused: bool = False
    backlog: deque[bytes] = field(default_factory=deque)
    dropped: int = 0
    #: Frames from this connection that were dropped (malformed, spoofed, unroutable).
    refused_frames: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    warned: set[str] = field(default_factory=set)
    #: Counted by the limiter until it authenticates or ends; ``failed``: it broke a rule.
    pending: bool = True
    failed: bool = False

    def label(self) -> str:
        ip = f" {IPv4Address(self.ip)}" if self.ip else ""
        return f"{self.peer}{ip}"


#: Short labels for the reasons a connection is closed (metrics and ``candy status``).
REJECTIONS = {
    "wrong password": "wrong_password",
    "clock skew": "clock_skew",
    "replayed handshake": "replay",
    "authentication timeout": "timeout",
    "malformed handshake": "malformed",
    "idle timeout": "idle",
    "no free address": "no_address",
    "this server assigns no addresses": "no_dhcp",
    "http": "http",
}


@dataclass(slots=True)
class ServerStats:
    """Counters an operator may want to see."""

    connections: int = 0
    authenticated: int = 0
    frames_relayed: int = 0
    frames_dropped: int = 0
    backlog_dropped: int = 0
    rejected: int = 0
    #: Connections refused at once by the per-source limits (floods).
    refused: int = 0
    #: Connections closed for breaking a rule, by reason (the labels of :data:`REJECTIONS`).
    rejections: dict[str, int] = field(default_factory=dict)
    #: Bytes read from and written to all connections.
    rx_bytes: int = 0
    tx_bytes: int = 0


class RelayServer:
    """One relay: authenticates clients, assigns addresses and relays their frames."""

    def __init__(self, config: ServerConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._conns: dict[Hashable, _Connection] = {}
        self._by_ip: dict[bytes, _Connection] = {}
        self._dirty: dict[Hashable, _Connection] = {}
        self._closing: list[Hashable] = []
        self._events: deque[ServerEvent] = deque()
        self._auth_replay = ReplayGuard(config.clock_window)
        self._vmac_replay = ReplayGuard(config.clock_window)
        self._pool = AddressPool(config.dhcp, rng) if config.dhcp else None
        self._directed = self._pool.broadcast if self._pool else None
        self._next_sweep: float | None = None
        self._limiter = SourceLimiter(config.limits)
        self._refused_since_log = 0
        self._refused_reason = ""
        self._refused_log_at = float("-inf")
        self.stats = ServerStats()

    # --- connection lifecycle -----------------------------------------------------------
    def connection_made(self, cid: Hashable, now: float, peer: str = "?") -> None:
        """A TCP (or TLS) connection was accepted from ``peer`` (``host:port``).

        A source over its limits (:mod:`candy_core.limits`) is closed at once, before any
        byte of it is parsed; the shell sees it in :meth:`connections_to_close`.
        """
        self.stats.connections += 1
        source = source_of(peer)
        refusal = self._limiter.admit(source, now)
        if refusal is not None:
            self._refuse(cid, refusal, now)
            return
        self._conns[cid] = _Connection(cid, peer, source, now, now)
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_INTERVAL

    def connection_lost(self, cid: Hashable, reason: str = "connection closed by peer") -> None:
        """The shell saw the socket end (EOF or error); forget the connection."""
        conn = self._conns.get(cid)
        if conn is not None:
            self._drop(conn, reason)

    def pause_writing(self, cid: Hashable) -> None:
        """The socket of ``cid`` is not keeping up: queue its frames (bounded) meanwhile."""
        conn = self._conns.get(cid)
        if conn is not None:
            conn.paused = True

    def resume_writing(self, cid: Hashable) -> None:
        """The socket of ``cid`` drained: release what was queued for it."""
        conn = self._conns.get(cid)
        if conn is None or not conn.paused:
            return
        conn.paused = False
        if conn.backlog:
            conn.out.extend(conn.backlog)
            conn.backlog.clear()
            self._dirty[cid] = conn

    # --- output -------------------------------------------------------------------------
    def data_to_send(self) -> list[tuple[Hashable, bytes]]:
        """Bytes to write, one entry per connection with pending output."""
        if not self._dirty:
            return []
        result = []
        sent = 0
        for cid, conn in self._dirty.items():
            if conn.out:
                data = b"".join(conn.out)
                conn.out.clear()
                conn.tx_bytes += len(data)
                sent += len(data)
                result.append((cid, data))
        self.stats.tx_bytes += sent
        self._dirty.clear()
        return result

    def connections_to_close(self) -> list[Hashable]:
        """Connections the shell must close after writing their pending data."""
        closing, self._closing = self._closing, []
        return closing

    def next_event(self) -> ServerEvent | None:
        """The next event for the embedding program, or ``None``."""
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` wants to run next (monotonic seconds), or ``None``."""
        return self._next_sweep

    def handle_timer(self, now: float) -> None:
        """Close connections that did not authenticate in time or went silent."""
        if self._next_sweep is None or now < self._next_sweep:
            return
        cfg = self.config
        for conn in list(self._conns.values()):
            if conn.ip is None and now - conn.opened > cfg.auth_timeout:
                self._reject(
                    conn,
                    CLOSE_POLICY,
                    "authentication timeout",
                    f"not authenticated after {cfg.auth_timeout:g} s",
                )
            elif now - conn.last_seen > cfg.idle_timeout:
                self._reject(
                    conn,
                    CLOSE_GOING_AWAY,
                    "idle timeout",
                    f"nothing received for {cfg.idle_timeout:g} s",
                )
            elif (
                conn.ip is not None
                and now - conn.last_seen >= cfg.idle_timeout / 3
                and now - conn.last_ping >= cfg.idle_timeout / 3
            ):
                # Clients ping only when they receive nothing; one that only receives
                # relayed traffic stays silent, so ask it for a PONG (5.6 clients answer).
                conn.last_ping = now
                self._send_raw(conn, encode_frame(OP_PING, b"candy"))
        if self._refused_since_log and now - self._refused_log_at >= 1.0:
            self._log_refusals(now)
        self._next_sweep = now + SWEEP_INTERVAL if self._conns else None

    def status(self, now: float, wall: float) -> ServerStatus:
        """A snapshot for ``candy status --server``: every authenticated client, the counters."""
        clients = [
            ClientInfo(
                ip=str(IPv4Address(ip)),
                vmac=conn.vmac.decode("ascii", "replace") if conn.vmac else None,
                remote=conn.peer,
                since=round(wall - (now - conn.opened), 3),
                tx_bytes=conn.tx_bytes,
                rx_bytes=conn.rx_bytes,
                frames_dropped=conn.refused_frames + conn.dropped,
                backlog=len(conn.backlog) // 2,
            )
            for ip, conn in sorted(self._by_ip.items())
        ]
        stats = self.stats
        counters: dict[str, Any] = {
            "connections": stats.connections,
            "open_connections": len(self._conns),
            "authenticated": stats.authenticated,
            "rejected": dict(stats.rejections),
            "refused": stats.refused,
            "frames_relayed": stats.frames_relayed,
            "frames_dropped": stats.frames_dropped,
            "backlog_dropped": stats.backlog_dropped,
            "rx_bytes": stats.rx_bytes,
            "tx_bytes": stats.tx_bytes,
        }
        return ServerStatus(clients=clients, counters=counters)

    @property
    def clients(self) -> dict[IPv4Address, Hashable]:
        """Authenticated addresses and the connection holding each."""
        return {IPv4Address(ip): conn.cid for ip, conn in self._by_ip.items()}

    # --- input --------------------------------------------------------------------------
    def receive_data(self, cid: Hashable, data: bytes, now: float, wall: float) -> None:
        """Raw bytes read from connection ``cid``; ``wall`` is Unix time for handshakes."""
        conn = self._conns.get(cid)
        if conn is None or conn.phase is Phase.CLOSED or not data:
            return
        conn.last_seen = now
        conn.rx_bytes += len(data)
        self.stats.rx_bytes += len(data)
        if conn.phase is Phase.UPGRADING:
            data = self._upgrade(conn, data)
            if not data:
                return
        assert conn.parser is not None  # made when the upgrade completed (phase OPEN)
        try:
            frames = conn.parser.feed(data)
        except FrameError as exc:
            self._reject(conn, exc.code, str(exc), str(exc))
            return
        for frame in frames:
            if conn.phase is not Phase.OPEN:  # handling a frame may have closed it
                return
            if frame.opcode == OP_BINARY:
                payload = frame.payload
                if payload and payload[0] == m.FORWARD:
                    self._forward(conn, payload)
                else:
                    self._message(conn, payload, wall)
            else:
                self._control(conn, frame.opcode, frame.payload)

    def _upgrade(self, conn: _Connection, data: bytes) -> bytes:
        assert conn.upgrade is not None  # kept until the upgrade completes
        result = conn.upgrade.receive(data)
        if result.reply:
            self._send_raw(conn, result.reply)
        if result.rejected:
            log.info("%s: rejected HTTP request: %s", conn.peer, result.rejected)
            self._count_rejection("http")
            conn.failed = True
            self._close(conn, f"HTTP request rejected: {result.rejected}")
            return b""
        if not result.accepted:
            return b""
        conn.phase = Phase.OPEN
        conn.upgrade = None
        conn.parser = FrameParser(self.config.max_frame, expect_mask=True)
        log.debug("%s: WebSocket open", conn.peer)
        return result.trailing

    def _control(self, conn: _Connection, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self._send_raw(conn, encode_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self._send_raw(conn, encode_frame(OP_CLOSE, close_reply(payload)))
            self._close(conn, "client closed the connection")
        elif opcode != OP_PONG:
            self._warn_once(conn, "text", "ignoring a non-binary data frame")

    # --- the relay hot path -------------------------------------------------------------
    def _forward(self, conn: _Connection, payload: bytes) -> None:
        src_ip = conn.ip
        if src_ip is None:
            self._drop_frame(conn, "unauthenticated", "FORWARD before AUTH dropped")
            return
        try:
            src, dst = m.ipv4_endpoints(payload, 1)
        except ProtocolError as exc:
            self._drop_frame(conn, "malformed1", f"FORWARD dropped: {exc}")
            return
        if src != src_ip:
            self._drop_frame(conn, "spoofed", "FORWARD with a spoofed source address dropped")
            return
        target = self._by_ip.get(dst)
        if target is not None:
            if target is not conn:
                self._queue(target, binary_header(len(payload)), payload)
                self.stats.frames_relayed += 1
        elif dst == self._directed or is_multicast(dst):
            self._to_all_but(conn, payload)
        else:
            self.stats.frames_dropped += 1
            conn.refused_frames += 1

    def _queue(self, target: _Connection, header: bytes, payload: bytes) -> None:
        if target.paused:
            backlog = target.backlog
            if len(backlog) >= 2 * self.config.send_queue_limit:
                backlog.popleft()
                backlog.popleft()
                target.dropped += 1
                self.stats.backlog_dropped += 1
                if target.dropped in (1, 100, 10000) or target.dropped % 100000 == 0:
                    log.warning(
                        "%s: slow reader, %d frames dropped from its queue so far",
                        target.label(),
                        target.dropped,
                    )
            backlog.append(header)
            backlog.append(payload)
            return
        target.out.append(header)
        target.out.append(payload)
        self._dirty[target.cid] = target

    def _to_all_but(self, conn: _Connection, payload: bytes) -> None:
        header = binary_header(len(payload))
        for other in self._by_ip.values():
            if other is not conn:
                self._queue(other, header, payload)
                self.stats.frames_relayed += 1

    # --- handshake and peer negotiation messages ----------------------------------------
    def _message(self, conn: _Connection, payload: bytes, wall: float) -> None:
        if not payload:
            self._drop_frame(conn, "empty", "empty binary frame dropped")
            return
        try:
            msg = m.decode(payload)
        except ProtocolError as exc:
            if payload[0] in (m.AUTH, m.EXPECTED, m.VMAC):
                self._reject(conn, CLOSE_POLICY, "malformed handshake", str(exc))
            else:
                self._drop_frame(conn, f"malformed{payload[0]}", f"{exc}; dropped")
            return
        if isinstance(msg, m.Auth):
            self._auth(conn, msg, payload, wall)
        elif isinstance(msg, m.Vmac):
            self._vmac(conn, msg, wall)
        elif isinstance(msg, m.Expected):
            self._expected(conn, msg, payload, wall)
        elif isinstance(msg, m.Peer):
            self._relay_unicast(conn, msg.src.packed, msg.dst.packed, payload, "PEER")
        elif isinstance(msg, m.Discovery | m.General):
            name = "DISCOVERY" if isinstance(msg, m.Discovery) else "GENERAL"
            src, dst = msg.src.packed, msg.dst.packed
            if dst == BROADCAST:
                if self._source_ok(conn, src, name):
                    self._to_all_but(conn, payload)
            else:
                self._relay_unicast(conn, src, dst, payload, name)
        else:
            self._warn_once(
                conn, f"type{payload[0]}", f"ignoring unknown message type {payload[0]}"
            )

    def _check_handshake(
        self, conn: _Connection, name: str, ok: bool, ts: int, wall: float
    ) -> bool:
        if not within_window(ts, wall, self.config.clock_window):
            self._reject(
                conn,
                CLOSE_POLICY,
                "clock skew",
                f"{name} timestamp is {int(ts - wall):+d} s away from the server clock",
            )
            return False
        if not ok:
            self._reject(conn, CLOSE_POLICY, "wrong password", f"{name} hash does not match")
            return False
        return True

    def _auth(self, conn: _Connection, msg: m.Auth, payload: bytes, wall: float) -> None:
        password = self.config.password
        if not self._check_handshake(conn, "AUTH", msg.verify(password), msg.timestamp, wall):
            return
        if not self._auth_replay.check_and_remember(msg.hash, msg.timestamp, wall):
            self._reject(conn, CLOSE_POLICY, "replayed handshake", "AUTH was already used")
            return
        ip = msg.ip.packed
        holder = self._by_ip.get(ip)
        if holder is not None and holder is not conn:
            log.info(
                "%s: %s taken over by a new connection from %s", holder.peer, msg.ip, conn.peer
            )
            self._reject(
                holder,
                CLOSE_GOING_AWAY,
                "address taken over by a newer connection",
                "reconnect",
                quiet=True,
            )
        if conn.ip is not None and conn.ip != ip:
            self._by_ip.pop(conn.ip, None)
        if conn.ip is None:
            self.stats.authenticated += 1
        conn.ip = ip
        self._by_ip[ip] = conn
        self._settle(conn, conn.last_seen)
        log.info("%s: authenticated as %s", conn.peer, msg.ip)
        self._events.append(ClientAuthenticated(conn.cid, msg.ip))

    def _vmac(self, conn: _Connection, msg: m.Vmac, wall: float) -> None:
        password = self.config.password
        if not self._check_handshake(conn, "VMAC", msg.verify(password), msg.timestamp, wall):
            return
        if not self._vmac_replay.check_and_remember(msg.hash, msg.timestamp, wall):
            self._reject(conn, CLOSE_POLICY, "replayed handshake", "VMAC was already used")
            return
        conn.vmac = msg.vmac

    def _expected(self, conn: _Connection, msg: m.Expected, payload: bytes, wall: float) -> None:
        password = self.config.password
        if not self._check_handshake(conn, "EXPECTED", msg.verify(password), msg.timestamp, wall):
            return
        if self._pool is None:
            self._reject(
                conn,
                CLOSE_POLICY,
                "this server assigns no addresses",
                "EXPECTED but no dhcp range is configured",
            )
            return
        try:
            requested: IPv4Interface | None = IPv4Interface(msg.cidr)
        except ValueError:
            requested = None

        def available(ip: bytes) -> bool:
            holder = self._by_ip.get(ip)
            return (
                holder is None
                or holder is conn
                or (holder.vmac is not None and holder.vmac == conn.vmac)
            )

        chosen = self._pool.choose(requested, available)
        if chosen is None:
            self._reject(
                conn,
                CLOSE_TRY_AGAIN,
                "no free address",
                f"address range {self._pool.network} is exhausted",
            )
            return
        pad = self._rng.randbytes(len(payload) - m.Expected.SIZE)
        reply = m.Expected.create(password, str(chosen), int(wall), pad).encode()
        self._send_raw(conn, binary_header(len(reply)) + reply)
        log.info("%s: assigned %s", conn.peer, chosen)
        self._events.append(AddressAssigned(conn.cid, chosen))

    def _source_ok(self, conn: _Connection, src: bytes, name: str) -> bool:
        if conn.ip is None:
            self._drop_frame(conn, "unauthenticated", f"{name} before AUTH dropped")
            return False
        if src != conn.ip:
            self._drop_frame(conn, "spoofed", f"{name} with a spoofed source address dropped")
            return False
        return True

    def _relay_unicast(
        self, conn: _Connection, src: bytes, dst: bytes, payload: bytes, name: str
    ) -> None:
        if not self._source_ok(conn, src, name):
            return
        target = self._by_ip.get(dst)
        if target is not None and target is not conn:
            self._queue(target, binary_header(len(payload)), payload)
            self.stats.frames_relayed += 1
        else:
            self.stats.frames_dropped += 1
            conn.refused_frames += 1

    # --- helpers ------------------------------------------------------------------------
    def _refuse(self, cid: Hashable, reason: str, now: float) -> None:
        self.stats.refused += 1
        self._closing.append(cid)
        self._refused_since_log += 1
        self._refused_reason = reason
        if now - self._refused_log_at >= 1.0:  # one line a second at most, however hard the flood
            self._log_refusals(now)

    def _count_rejection(self, label: str) -> None:
        self.stats.rejected += 1
        rejections = self.stats.rejections
        rejections[label] = rejections.get(label, 0) + 1

    def _log_refusals(self, now: float) -> None:
        log.warning(
            "refused %d connection(s) in the last second: %s",
            self._refused_since_log,
            self._refused_reason,
        )
        self._refused_since_log = 0
        self._refused_log_at = now

    def _settle(self, conn: _Connection, now: float) -> None:
        if conn.pending:
            conn.pending = False
            self._limiter.settled(conn.source, conn.failed, now)

    def _send_raw(self, conn: _Connection, data: bytes) -> None:
        conn.out.append(data)
        self._dirty[conn.cid] = conn

    def _warn_once(self, conn: _Connection, key: str, text: str) -> None:
        if key not in conn.warned:
            conn.warned.add(key)
            log.warning("%s: %s (further ones not logged)", conn.label(), text)

    def _drop_frame(self, conn: _Connection, key: str, text: str) -> None:
        self.stats.frames_dropped += 1
        conn.refused_frames += 1
        self._warn_once(conn, key, text)

    def _reject(
        self, conn: _Connection, code: int, reason: str, detail: str, quiet: bool = False
    ) -> None:
        """Close ``conn`` with a CLOSE frame carrying ``reason`` and log why."""
        if conn.phase is Phase.CLOSED:
            return
        if conn.ip is None:
            conn.failed = True  # a broken handshake: its source pays for it
        if not quiet:
            log.warning("%s: closing: %s (%s)", conn.label(), reason, detail)
            self._count_rejection(REJECTIONS.get(reason, "protocol"))
        if conn.phase is Phase.OPEN:
            # A closing connection gets its close frame even when its queue is paused.
            self._send_raw(conn, encode_frame(OP_CLOSE, close_payload(code, reason)))
        self._close(conn, reason)

    def _close(self, conn: _Connection, reason: str) -> None:
        self._drop(conn, reason)
        self._closing.append(conn.cid)

    def _drop(self, conn: _Connection, reason: str) -> None:
        if conn.phase is Phase.CLOSED:
            self._conns.pop(conn.cid, None)
            return
        conn.phase = Phase.CLOSED
        conn.backlog.clear()
        self._settle(conn, conn.last_seen)
        ip = conn.ip
        if ip is not None and self._by_ip.get(ip) is conn:
            del self._by_ip[ip]
        self._conns.pop(conn.cid, None)
        log.debug("%s: disconnected: %s", conn.label(), reason)
        self._events.append(ClientDisconnected(conn.cid, IPv4Address(ip) if ip else None, reason))
