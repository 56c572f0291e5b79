"""The blocking client: server connection, TUN and UDP readers, a writer and a timer."""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from candy_core import Client as ClientCore
from candy_core import ClientConfig, ClientEvent, PeerStatus, PingReply
from shells.blocking.loop import POLL, Kit, Loop, recv_loop
from shells.blocking.tls import shareable
from shells.blocking.writer import HIGH_WATER, SEND_TIMEOUT, Writer
from shells.common import CONNECT_TIMEOUT, track_joined
from shells.operate import client_document, server_url
from shells.pump import ClientPump
from shells.udp import UdpSocket


class BlockingClient:
    """A client: connection, TUN and UDP readers, a writer and a timer, one lock.

    A runtime subclasses it with its :class:`Kit`. Constructing one does no I/O: names are
    resolved (with the runtime's own resolver), the saved state is read and the TUN device
    is created in :meth:`start`.
    """

    kit: Kit

    def __init__(
        self,
        config: ClientConfig,
        *,
        ssl_context: Any = None,
        tun: bool = True,
        state_dir: str | None = None,
        udp_port: int = 0,
        stun_host: str | None = None,
        stun_port: int | None = None,
        on_event: Callable[[ClientEvent], None] | None = None,
    ) -> None:
        #: The configuration; after :meth:`start`, with the STUN server and LAN address resolved.
        self.config = config
        self._ssl = ssl_context
        self._udp_port = udp_port
        self._joined = self.kit.event()
        self._pump_args: dict[str, Any] = {
            "tun": tun,
            "state_dir": state_dir,
            "stun": (stun_host, stun_port),
            "on_event": track_joined(
                lambda: self._pump is not None and self._pump.joined, self._joined, on_event
            ),
        }
        self._pump: ClientPump | None = None
        #: The sans-IO core, made in :meth:`start` (``None`` before).
        self.core: ClientCore | None = None
        self._loop = Loop(self.kit)
        self._writer: Writer | None = None
        self._udp: UdpSocket | None = None
        self._packet_ready = self.kit.event()
        #: ping() calls waiting for their reply, by (address, sequence number): the flag it
        #: waits on and the slot the reply goes to.
        self._pings: dict[tuple[IPv4Address, int], tuple[Any, list[PingReply]]] = {}

    def status(self) -> dict[str, Any]:
        """The ``candy status`` document (after :meth:`start`)."""
        core = self.core
        if core is None:
            raise RuntimeError("call start() first")
        cfg = self.config
        url = server_url(self._ssl is not None, cfg.host, cfg.port, cfg.path)
        with self._loop.lock:
            snapshot = core.status(time.monotonic(), time.time(), url)
        return client_document(snapshot, self.kit.name)

    @property
    def address(self) -> IPv4Interface | None:
        """Our virtual address, once known (``None`` before :meth:`start`)."""
        return self.core.address if self.core is not None else None

    def start(self) -> None:
        """Resolve names, load the saved state, create the TUN device (if wanted) and the UDP
        socket (if P2P), start the workers and connect."""
        pump = ClientPump(self.config, **self._pump_args, getaddrinfo=self.kit.socket.getaddrinfo)
        self._pump = pump
        self.config = pump.config
        self.core = pump.core
        loop = self._loop
        loop.handle_timer = self.core.handle_timer
        loop.flush = pump.flush
        pump.write_server = self._write_server
        pump.close_server = self._close_server
        pump.open_connection = lambda: loop.spawn(self._connect)
        pump.packets_ready = self._packet_ready.set
        pump.ping_replied = self._ping_replied
        if self.config.stun is not None:
            self._udp = UdpSocket(self._udp_port)
            pump.send_datagrams = self._udp.send_many
            self.core.udp_bound(self._udp.port)
            loop.spawn(self._udp_reader)
        if pump.tun is not None:
            loop.spawn(self._tun_reader)
        loop.spawn(loop.timer)
        with loop.lock:
            self.core.start(time.monotonic())
            loop.flushed()

    def stop(self) -> None:
        """Say goodbye to the server, stop the workers, remove the TUN device."""
        loop = self._loop
        if self._pump is None:  # never started, or start() failed before the core existed
            loop.stopping = True
            return
        assert self.core is not None  # made together with the pump
        with loop.lock:
            self.core.close()
            loop.flushed()
        loop.stopping = True
        with loop.lock:
            if self._writer is not None:
                self._writer.close()
        loop.join()
        if self._udp is not None:
            self._udp.close()
        self._pump.close()

    def __enter__(self) -> BlockingClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- embedding API ------------------------------------------------------------------
    def send_packet(self, packet: bytes) -> None:
        """Send one IPv4 packet into the network (as if read from TUN)."""
        if self.core is None:
            raise RuntimeError("call start() first")
        with self._loop.lock:
            self.core.receive_packet(packet, time.monotonic())
            self._loop.flushed()

    def recv_packet(self, timeout: float | None = None) -> bytes | None:
        """The next packet from the network (only without TUN), or ``None`` on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._loop.lock:
                pump = self._pump
                if pump is not None and pump.packets:
                    return pump.packets.popleft()
                self._packet_ready.clear()
            left = POLL if end is None else min(POLL, end - time.monotonic())
            if left <= 0:
                return None
            self._packet_ready.wait(left)

    def ping(self, ip: IPv4Address | str, timeout: float = 2.0) -> PingReply | None:
        """Send an ICMP echo request to ``ip`` over the usual path and wait for the reply.

        Returns the reply (round trip, path, endpoint) or None after ``timeout`` seconds;
        raises ConnectionError while we have no virtual address.
        """
        core = self.core
        if core is None:
            raise RuntimeError("call start() first")
        dst = IPv4Address(ip)
        done = self.kit.event()
        slot: list[PingReply] = []
        with self._loop.lock:
            seq = core.ping(dst, time.monotonic())
            if seq is None:
                raise ConnectionError("not joined the network yet (no virtual address)")
            key = (dst, seq)
            self._pings[key] = (done, slot)
            self._loop.flushed()
        done.wait(timeout)
        with self._loop.lock:
            if self._pings.get(key, (None,))[0] is done:
                del self._pings[key]
            return slot[0] if slot else None

    def _ping_replied(self, reply: PingReply) -> None:  # lock held (called by the flush)
        waiter = self._pings.pop((reply.ip, reply.seq), None)
        if waiter is not None:
            done, slot = waiter
            slot.append(reply)
            done.set()

    def peer_status(self) -> list[PeerStatus]:
        """Each peer's state, endpoint, last heartbeat and delay (empty without STUN)."""
        if self.core is None:
            return []
        with self._loop.lock:
            return self.core.peers.peer_status()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the client has joined the network; ``False`` on timeout."""
        return bool(self._joined.wait(timeout))

    # --- workers ------------------------------------------------------------------------
    def _connect(self) -> None:
        cfg = self.config
        loop = self._loop
        # Connections are opened by the core, so after start() made it and the pump.
        assert self.core is not None and self._pump is not None
        sock_mod = self.kit.socket
        try:
            sock = sock_mod.create_connection((cfg.host, cfg.port), timeout=CONNECT_TIMEOUT)
            sock.setsockopt(sock_mod.IPPROTO_TCP, sock_mod.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=cfg.host)
            sock.settimeout(SEND_TIMEOUT)
            # OS threads read and write it at once: one OpenSSL call at a time.
            sock = shareable(sock, self.kit.threads, SEND_TIMEOUT)
        except (OSError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            with loop.lock:
                self.core.connection_failed(time.monotonic(), reason)
                loop.flushed()
            return
        writer = Writer(loop, sock, lambda: None, lambda: None)
        with loop.lock:
            if loop.stopping:
                sock.close()
                return
            self._writer = writer
            self.core.connection_made(time.monotonic())
            loop.flushed()
        if not writer.direct:
            with loop.lock:
                writer.start()
        core = self.core
        guard = self._pump.guard
        reason = recv_loop(
            loop,
            sock,
            lambda data: core.receive_data(data, time.monotonic(), time.time()),
            lambda: guard.failed("bytes from the server; dropping the connection"),
        )
        with loop.lock:
            if self._writer is writer:
                self._writer = None
                core.connection_lost(time.monotonic(), reason)
                loop.flushed()
        writer.finish()

    def _write_server(self, data: bytes) -> None:
        if self._writer is not None:
            self._writer.write(data)

    def _close_server(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _udp_reader(self) -> None:
        loop = self._loop
        udp = self._udp
        pump = self._pump
        assert udp is not None and pump is not None and self.core is not None
        fd = udp.fileno()
        while not loop.stopping:
            if not self.kit.wait_readable(fd, POLL):
                continue
            batch = udp.recv_batch(64)
            if not batch:
                continue
            with loop.lock:
                now = time.monotonic()
                for data, addr in batch:
                    try:
                        self.core.receive_datagram(data, addr, now)
                    except Exception:
                        pump.guard.failed(f"a datagram from {addr[0]}:{addr[1]}")
                loop.flushed()

    def _tun_reader(self) -> None:
        loop = self._loop
        assert self._pump is not None and self.core is not None
        tun = self._pump.tun
        assert tun is not None
        fd = tun.fileno()
        while not loop.stopping:
            writer = self._writer
            if writer is not None and writer.pending > HIGH_WATER:
                self.kit.sleep(0.001)  # the server connection is behind: let TUN queue up
                continue
            if not self.kit.wait_readable(fd, POLL):
                continue
            packets = tun.read_batch(64)
            if not packets:
                continue
            with loop.lock:
                now = time.monotonic()
                for packet in packets:
                    try:
                        self.core.receive_packet(packet, now)
                    except Exception:
                        self._pump.guard.failed("a packet from TUN")
                loop.flushed()
