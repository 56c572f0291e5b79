"""asyncio shell of the client: server connection, TUN device, UDP socket and one timer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface
from typing import TYPE_CHECKING, Any, cast

from candy_core import Client as ClientCore
from candy_core import ClientConfig, ClientEvent, PeerStatus, PingReply
from shells.asyncio.timer import DeadlineTimer
from shells.common import CONNECT_TIMEOUT, client_kwargs, track_joined
from shells.operate import client_document, server_url
from shells.pump import ClientPump
from shells.tun import TunDevice
from shells.udp import UdpSocket

if TYPE_CHECKING:
    from shells.settings import DaemonSettings

log = logging.getLogger("candy.asyncio")

EventHandler = Callable[[ClientEvent], None]


class _ServerLink(asyncio.Protocol):
    """The WebSocket's TCP (or TLS) connection; bytes go straight to the core."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_connection() makes a stream transport; the Protocol API names only the base.
        self.transport = cast(asyncio.Transport, transport)
        assert self.client.core is not None  # links are made by _connect(), after start()
        self.client._link = self
        self.client.core.connection_made(self.client._loop.time())
        self.client._flush()

    def data_received(self, data: bytes) -> None:
        client = self.client
        assert client.core is not None and client._pump is not None
        try:
            client.core.receive_data(data, client._loop.time(), time.time())
        except Exception:  # the stream is unusable now: drop this connection, reconnect
            client._pump.guard.failed("bytes from the server")
            client._link = None
            client.core.connection_lost(client._loop.time(), "internal error")
            if self.transport is not None:
                self.transport.abort()
        client._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        assert client.core is not None
        if client._link is self:
            client._link = None
            reason = f"connection lost: {exc}" if exc else "connection closed by the server"
            client.core.connection_lost(client._loop.time(), reason)
            client._flush()

    def pause_writing(self) -> None:
        self.client._pause_tun()

    def resume_writing(self) -> None:
        self.client._resume_tun()


class Client:
    """A Candy client on the running asyncio loop.

    With ``tun=True`` (the daemon) it brings up the ``candy-<name>`` TUN device; with
    ``tun=False`` the program exchanges packets itself through :meth:`send_packet` and
    :meth:`recv_packet`::

        async with Client(config, tun=False) as client:
            await client.wait_connected()
            client.send_packet(ip_packet)
            reply = await client.recv_packet()
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        tun: bool = True,
        state_dir: str | None = None,
        udp_port: int = 0,
        stun_host: str | None = None,
        stun_port: int | None = None,
        on_event: EventHandler | None = None,
    ) -> None:
        self.config = config
        self._ssl = ssl_context
        self._joined = asyncio.Event()
        self._pump_args: dict[str, Any] = {
            "tun": tun,
            "state_dir": state_dir,
            "stun": (stun_host, stun_port),
            "on_event": track_joined(
                lambda: self._pump is not None and self._pump.joined, self._joined, on_event
            ),
        }
        self._udp_port = udp_port
        self._pump: ClientPump | None = None
        #: The sans-IO core, made in :meth:`start` (``None`` before).
        self.core: ClientCore | None = None
        self.tun: TunDevice | None = None
        self._loop: asyncio.AbstractEventLoop  # the running loop, bound in start()
        self._link: _ServerLink | None = None
        self._udp: UdpSocket | None = None
        self._timer: DeadlineTimer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._packet_ready = asyncio.Event()
        self._tun_paused = False
        self._stopped = False
        #: ping() calls waiting for their reply, by (address, sequence number).
        self._pings: dict[tuple[IPv4Address, int], asyncio.Future[PingReply]] = {}

    def status(self) -> dict[str, Any]:
        """The ``candy status`` document (call it on the loop, after :meth:`start`)."""
        if self.core is None:
            raise RuntimeError("call start() first")
        cfg = self.config
        url = server_url(self._ssl is not None, cfg.host, cfg.port, cfg.path)
        snapshot = self.core.status(self._loop.time(), time.time(), url)
        return client_document(snapshot, "asyncio")

    @classmethod
    def from_settings(cls, settings: DaemonSettings) -> Client:
        """The daemon's client, from parsed command-line/config settings."""
        assert settings.client is not None
        return cls(settings.client, **client_kwargs(settings))

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Create the TUN device (if wanted), the UDP socket (if P2P) and connect."""
        self._loop = asyncio.get_running_loop()
        self._timer = DeadlineTimer(self._loop, self._on_timer)
        # Resolving names and reading the saved state block: do it off the loop.
        pump = await self._loop.run_in_executor(
            None, functools.partial(ClientPump, self.config, **self._pump_args)
        )
        self._pump = pump
        self.config = pump.config
        self.core = pump.core
        self.tun = pump.tun
        pump.write_server = self._write_server
        pump.close_server = self._close_server
        pump.open_connection = self._open_connection
        pump.packets_ready = self._packet_ready.set
        pump.ping_replied = self._ping_replied
        if self.tun is not None:
            self._loop.add_reader(self.tun.fileno(), self._on_tun)
        if self.config.stun is not None:
            self._udp = UdpSocket(self._udp_port)
            pump.send_datagrams = self._udp.send_many
            self.core.udp_bound(self._udp.port)
            self._loop.add_reader(self._udp.fileno(), self._on_udp)
        self.core.start(self._loop.time())
        self._flush()

    async def stop(self) -> None:
        """Say goodbye to the server, remove the TUN device, cancel everything."""
        if self._stopped or self._pump is None:
            self._stopped = True
            return
        self._stopped = True
        assert self.core is not None  # made together with the pump
        self.core.close()
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._link is not None and self._link.transport is not None:
            self._link.transport.abort()
            self._link = None
        if self._udp is not None:
            self._loop.remove_reader(self._udp.fileno())
            self._udp.close()
        if self.tun is not None:
            if not self._tun_paused:
                self._loop.remove_reader(self.tun.fileno())
            self.tun = None
        self._pump.close()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- embedding API ------------------------------------------------------------------
    def send_packet(self, packet: bytes) -> None:
        """Send one IPv4 packet into the network (as if read from TUN)."""
        if self.core is None:
            raise RuntimeError("call start() first")
        self.core.receive_packet(packet, self._loop.time())
        self._flush()

    async def recv_packet(self) -> bytes:
        """The next IPv4 packet from the network (only with ``tun=False``)."""
        assert self._pump is not None, "call start() first"
        packets = self._pump.packets
        while not packets:
            self._packet_ready.clear()
            await self._packet_ready.wait()
        return packets.popleft()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the client has joined the network (AUTH sent with its address)."""
        await asyncio.wait_for(self._joined.wait(), timeout)

    @property
    def address(self) -> IPv4Interface | None:
        """Our virtual address, once known."""
        return self.core.address if self.core else None

    async def ping(self, ip: IPv4Address | str, timeout: float = 2.0) -> PingReply | None:
        """Send an ICMP echo request to ``ip`` over the usual path and wait for the reply.

        Returns the reply (round trip, path, endpoint) or None after ``timeout`` seconds;
        raises ConnectionError while we have no virtual address.
        """
        if self.core is None:
            raise RuntimeError("call start() first")
        dst = IPv4Address(ip)
        seq = self.core.ping(dst, self._loop.time())
        if seq is None:
            raise ConnectionError("not joined the network yet (no virtual address)")
        key = (dst, seq)
        waiter = self._pings[key] = self._loop.create_future()
        self._flush()
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return None
        finally:
            if self._pings.get(key) is waiter:
                del self._pings[key]

    def _ping_replied(self, reply: PingReply) -> None:
        waiter = self._pings.pop((reply.ip, reply.seq), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def peer_status(self) -> list[PeerStatus]:
        """Each peer's state, endpoint, last heartbeat and delay (empty without STUN)."""
        return self.core.peers.peer_status() if self.core else []

    # --- plumbing -----------------------------------------------------------------------
    def _on_tun(self) -> None:
        tun = self.tun
        if tun is None:
            return
        core = self.core
        assert core is not None and self._pump is not None  # readers are added in start()
        now = self._loop.time()
        for packet in tun.read_batch(64):
            try:
                core.receive_packet(packet, now)
            except Exception:
                self._pump.guard.failed("a packet from TUN")
        self._flush()

    def _on_udp(self) -> None:
        udp = self._udp
        if udp is None:
            return
        core = self.core
        assert core is not None and self._pump is not None  # readers are added in start()
        now = self._loop.time()
        for data, addr in udp.recv_batch(64):
            try:
                core.receive_datagram(data, addr, now)
            except Exception:
                self._pump.guard.failed(f"a datagram from {addr[0]}:{addr[1]}")
        self._flush()

    def _pause_tun(self) -> None:
        if self.tun is not None and not self._tun_paused:
            self._tun_paused = True
            self._loop.remove_reader(self.tun.fileno())

    def _resume_tun(self) -> None:
        if self.tun is not None and self._tun_paused:
            self._tun_paused = False
            self._loop.add_reader(self.tun.fileno(), self._on_tun)

    def _write_server(self, data: bytes) -> None:
        link = self._link
        if link is not None and link.transport is not None:
            link.transport.write(data)

    def _close_server(self) -> None:
        link, self._link = self._link, None
        if link is not None and link.transport is not None:
            link.transport.close()
        self._resume_tun()

    def _open_connection(self) -> None:
        if self._stopped:
            return
        task = self._loop.create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _flush(self) -> None:
        assert self._pump is not None  # every caller runs after start()
        deadline = self._pump.flush()
        if self._stopped:
            return
        if self._timer is not None:
            self._timer.arm(deadline)

    def _on_timer(self, now: float) -> None:
        assert self.core is not None  # the timer is made in start()
        self.core.handle_timer(now)
        self._flush()

    async def _connect(self) -> None:
        cfg = self.config
        assert self.core is not None  # connections are opened by the core, after start()
        try:
            await asyncio.wait_for(
                self._loop.create_connection(
                    lambda: _ServerLink(self),
                    cfg.host,
                    cfg.port,
                    ssl=self._ssl,
                    server_hostname=cfg.host if self._ssl else None,
                ),
                CONNECT_TIMEOUT,
            )
        except Exception as exc:  # OSError, TLS, timeout, also bad names (UnicodeError)
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {CONNECT_TIMEOUT:g} s"
            self.core.connection_failed(self._loop.time(), reason)
            self._flush()
