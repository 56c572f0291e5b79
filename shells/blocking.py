"""Server and client for runtimes with blocking calls: OS threads or gevent greenlets.

Both runtimes run the same code: one reader per socket, one writer per connection (so a
slow peer never blocks anyone else), a timer, and one lock around the core. What differs
(how to spawn, lock, wait, and which socket and ssl modules) comes in a :class:`Kit`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from ipaddress import IPv4Interface
from types import ModuleType
from typing import Any

from candy_core.config import ClientConfig, ServerConfig
from candy_core.peers import PeerStatus
from candy_core.server import RelayServer
from shells.common import system_rng
from shells.pump import ClientPump, ServerPump
from shells.udp import UdpSocket

log = logging.getLogger("candy.blocking")

#: Bytes queued for one socket before the core is told to hold frames back, and resume mark.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
#: Longest a blocked send may take before the connection is given up.
SEND_TIMEOUT = 30.0
#: Every wait is bounded so that stop() is noticed promptly.
POLL = 0.5
CONNECT_TIMEOUT = 10.0
RECV_SIZE = 65536


@dataclass(frozen=True)
class Kit:
    """The concurrency primitives of one runtime."""

    name: str
    spawn: Callable[..., Any]  # spawn(fn, *args) -> handle with .join(timeout)
    lock: Callable[[], Any]
    event: Callable[[], Any]
    queue: Callable[[], Any]
    socket: ModuleType
    ssl: ModuleType
    wait_readable: Callable[[int, float], bool]
    alive: Callable[[Any], bool]
    #: Whether a writer may write to an idle socket directly from the caller's thread.
    direct_send: bool
    sleep: Callable[[float], None]


class _Loop:
    """The lock, the timer and the flush shared by a blocking server and client."""

    def __init__(
        self, kit: Kit, handle_timer: Callable[[float], None], flush: Callable[[], float | None]
    ) -> None:
        self.kit = kit
        self.lock = kit.lock()
        self.stopping = False
        self._handle_timer = handle_timer
        self._flush = flush
        self._deadline: float | None = None
        self._wake = kit.event()
        self.workers: list[Any] = []
        #: Writers currently behind (over the high-water mark); readers then yield.
        self.backlogged = 0

    def spawn(self, fn: Callable[..., None], *args: object) -> None:
        workers = self.workers
        if len(workers) % 64 == 63:  # forget finished workers now and then: bounded memory
            alive = self.kit.alive
            workers[:] = [w for w in workers if alive(w)]
        workers.append(self.kit.spawn(self._guard, fn, *args))

    def _guard(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            if not self.stopping:
                log.exception("%s worker %s failed", self.kit.name, fn.__name__)

    def flushed(self) -> None:
        """Flush the core (lock held) and re-arm the timer."""
        deadline = self._flush()
        if deadline is not None and (self._deadline is None or deadline < self._deadline):
            self._deadline = deadline
            self._wake.set()
        elif deadline is None:
            self._deadline = None

    def timer(self) -> None:
        while not self.stopping:
            deadline = self._deadline
            timeout = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if timeout > 0:
                self._wake.wait(timeout)
            self._wake.clear()
            if self.stopping:
                break
            with self.lock:
                now = time.monotonic()
                if self._deadline is not None and now >= self._deadline:
                    self._deadline = None
                    self._handle_timer(now)
                    self.flushed()

    def join(self, timeout: float = 3.0) -> None:
        self._wake.set()
        end = time.monotonic() + timeout
        for worker in self.workers:
            worker.join(max(0.0, end - time.monotonic()))
        self.workers.clear()


class _Writer:
    """Queue and worker writing to one socket; reports back-pressure to the core."""

    def __init__(
        self, loop: _Loop, sock: Any, on_pause: Callable[[], None], on_resume: Callable[[], None]
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.queue = loop.kit.queue()
        self.pending = 0
        self.paused = False
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._done = loop.kit.event()
        self._started = False
        self._finished = False
        # With OS threads, a write to an idle socket goes out at once, without handing it to
        # the writer thread (a wake-up per write). A socket with a timeout is non-blocking at
        # the OS level, so a plain write(2) never waits; TLS needs its own framing.
        self._direct_fd = (
            sock.fileno()
            if loop.kit.direct_send and not isinstance(sock, ssl.SSLSocket) and sock.gettimeout()
            else None
        )

    @property
    def direct(self) -> bool:
        """Whether writes go out from the caller (the worker starts only when needed)."""
        return self._direct_fd is not None

    def write(self, data: bytes) -> None:  # lock held
        if self._finished:
            return
        if self._direct_fd is not None and self.pending == 0:
            try:
                sent = os.write(self._direct_fd, data)
            except OSError:  # full, or broken: the writer thread finds out and closes
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.start()
        self.queue.put(data)
        self.pending += len(data)
        if not self.paused and self.pending > HIGH_WATER:
            self.paused = True
            self.loop.backlogged += 1
            self._on_pause()

    def start(self) -> None:  # lock held
        """Run the writer worker; with direct writes only once a write could not finish."""
        if not self._started:
            self._started = True
            self.loop.spawn(self.run)

    def close(self) -> None:  # lock held: write what is queued, then close
        if self._started:
            self.queue.put(None)
        else:  # nothing queued: end the connection now (this also wakes the reader)
            with contextlib.suppress(OSError):
                self.sock.shutdown(self.loop.kit.socket.SHUT_RDWR)

    def run(self) -> None:
        sock = self.sock
        try:
            while True:
                data = self.queue.get()  # every way out (close, stop) enqueues None
                if data is None:
                    break
                sock.sendall(data)
                with self.loop.lock:  # pending is shared with write(): counted under the lock
                    self.pending -= len(data)
                    if self.paused and self.pending < LOW_WATER:
                        self.paused = False
                        self.loop.backlogged -= 1
                        self._on_resume()
                        self.loop.flushed()
        except OSError as exc:
            log.debug("write failed: %s", exc)
        finally:
            with self.loop.lock:  # write() must not touch the fd once it may be reused
                self._direct_fd = None
                if self.paused:
                    self.paused = False
                    self.loop.backlogged -= 1
            with contextlib.suppress(OSError):
                sock.shutdown(self.loop.kit.socket.SHUT_RDWR)  # wakes the reader
            self._done.set()

    def finish(self) -> None:
        """Called by the reader once it stops: wait for the writer, then close the socket.

        Only the reader closes, and only after both have stopped using the descriptor, so
        neither can touch a descriptor number the system has already given to a new socket.
        """
        with self.loop.lock:
            self.close()
            started = self._started
            self._finished = True  # from now on, writes go nowhere
            self._direct_fd = None
        if started:
            self._done.wait(SEND_TIMEOUT + 1.0)
        with contextlib.suppress(OSError):
            self.sock.close()


def _recv_loop(loop: _Loop, sock: Any, on_data: Callable[[bytes], None]) -> str:
    """Read until EOF, error or stop; returns why it ended."""
    timeout_error = loop.kit.socket.timeout
    while not loop.stopping:
        try:
            data = sock.recv(RECV_SIZE)
        except timeout_error:
            continue
        except OSError as exc:
            return f"connection lost: {exc}"
        if not data:
            return "connection closed by peer"
        with loop.lock:
            on_data(data)
            loop.flushed()
        if loop.backlogged:  # let the writers drain before reading more (greenlets never
            loop.kit.sleep(0)  # switch on their own while a socket stays readable)
    return "stopping"


class BlockingServer:
    """A relay server: accept loop, a reader and a writer per connection, one timer."""

    kit: Kit

    def __init__(
        self,
        config: ServerConfig,
        host: str = "0.0.0.0",
        port: int = 80,
        ssl_context: Any = None,
        on_event: Callable[[object], None] | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.core = RelayServer(config, system_rng())
        self._ssl = ssl_context
        self._writers: dict[Hashable, _Writer] = {}
        self._ids = itertools.count(1)
        self._pump = ServerPump(self.core, self._write, self._close, on_event)
        self._loop = _Loop(self.kit, self.core.handle_timer, self._pump.flush)
        self._listener: Any = None

    def start(self) -> None:
        """Listen and serve in the background; :attr:`port` is the real port afterwards."""
        sock_mod = self.kit.socket
        listener = sock_mod.socket(sock_mod.AF_INET, sock_mod.SOCK_STREAM)
        listener.setsockopt(sock_mod.SOL_SOCKET, sock_mod.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(512)
        listener.settimeout(POLL)
        self._listener = listener
        self.port = listener.getsockname()[1]
        scheme = "wss" if self._ssl else "ws"
        log.info("relay listening on %s://%s:%d (%s)", scheme, self.host, self.port, self.kit.name)
        self._loop.spawn(self._loop.timer)
        self._loop.spawn(self._accept)

    def stop(self) -> None:
        """Stop listening, close every connection and wait for the workers."""
        loop = self._loop
        loop.stopping = True
        if self._listener is not None:
            self._listener.close()
        with loop.lock:
            for writer in list(self._writers.values()):
                with contextlib.suppress(OSError):
                    writer.sock.shutdown(self.kit.socket.SHUT_RDWR)
                writer.close()
        loop.join()

    def __enter__(self) -> BlockingServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        timeout_error = self.kit.socket.timeout
        while not self._loop.stopping:
            try:
                sock, peer = self._listener.accept()
            except timeout_error:
                continue
            except OSError:
                if self._loop.stopping:
                    return
                self.kit.sleep(0.05)  # e.g. out of file descriptors: do not spin
                continue
            self._loop.spawn(self._serve, sock, f"{peer[0]}:{peer[1]}")

    def _serve(self, sock: Any, peer: str) -> None:
        sock.setsockopt(self.kit.socket.IPPROTO_TCP, self.kit.socket.TCP_NODELAY, 1)
        sock.settimeout(SEND_TIMEOUT)
        if self._ssl is not None:
            try:
                sock = self._ssl.wrap_socket(sock, server_side=True)
            except (OSError, ValueError) as exc:
                log.info("%s: TLS handshake failed: %s", peer, exc)
                sock.close()
                return
        cid = next(self._ids)
        loop = self._loop
        writer = _Writer(
            loop, sock, lambda: self.core.pause_writing(cid), lambda: self.core.resume_writing(cid)
        )
        with loop.lock:
            self._writers[cid] = writer
            self.core.connection_made(cid, time.monotonic(), peer)
            loop.flushed()
        if not writer.direct:
            with loop.lock:
                writer.start()

        def on_data(data: bytes) -> None:
            try:
                self.core.receive_data(cid, data, time.monotonic(), time.time())
            except Exception:
                log.exception("connection %s: internal error; closing it", cid)
                self.core.connection_lost(cid, "internal error")
                self._close(cid)

        reason = _recv_loop(loop, sock, on_data)
        with loop.lock:
            self.core.connection_lost(cid, reason)
            loop.flushed()
            self._close(cid)
        writer.finish()

    def _write(self, cid: Hashable, data: bytes) -> None:
        writer = self._writers.get(cid)
        if writer is not None:
            writer.write(data)

    def _close(self, cid: Hashable) -> None:
        writer = self._writers.pop(cid, None)
        if writer is not None:
            writer.close()


class BlockingClient:
    """A client: connection, TUN and UDP readers, a writer and a timer, one lock."""

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
        on_event: Callable[[object], None] | None = None,
    ) -> None:
        self._ssl = ssl_context
        self._udp_port = udp_port
        self._pump = ClientPump(
            config, tun=tun, state_dir=state_dir, stun=(stun_host, stun_port), on_event=on_event
        )
        self.config = self._pump.config
        self.core = self._pump.core
        self._loop = _Loop(self.kit, self.core.handle_timer, self._pump.flush)
        self._writer: _Writer | None = None
        self._udp: UdpSocket | None = None
        self._packet_ready = self.kit.event()
        self._joined = self.kit.event()
        pump = self._pump
        pump.write_server = self._write_server
        pump.close_server = self._close_server
        pump.open_connection = lambda: self._loop.spawn(self._connect)
        pump.packets_ready = self._packet_ready.set
        pump.on_event = self._track(on_event)

    def _track(self, user: Callable[[object], None] | None) -> Callable[[object], None]:
        def handler(event: object) -> None:
            if self._pump.joined:
                self._joined.set()
            else:
                self._joined.clear()
            if user is not None:
                user(event)

        return handler

    @property
    def address(self) -> IPv4Interface | None:
        """Our virtual address, once known."""
        return self.core.address

    def start(self) -> None:
        """Start the workers and connect."""
        loop = self._loop
        if self.config.stun is not None:
            self._udp = UdpSocket(self._udp_port)
            self._pump.send_datagrams = self._udp.send_many
            self.core.udp_bound(self._udp.port)
            loop.spawn(self._udp_reader)
        if self._pump.tun is not None:
            loop.spawn(self._tun_reader)
        loop.spawn(loop.timer)
        with loop.lock:
            self.core.start(time.monotonic())
            loop.flushed()

    def stop(self) -> None:
        """Say goodbye to the server, stop the workers, remove the TUN device."""
        loop = self._loop
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
        with self._loop.lock:
            self.core.receive_packet(packet, time.monotonic())
            self._loop.flushed()

    def recv_packet(self, timeout: float | None = None) -> bytes | None:
        """The next packet from the network (only without TUN), or ``None`` on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._loop.lock:
                if self._pump.packets:
                    return self._pump.packets.popleft()
                self._packet_ready.clear()
            left = POLL if end is None else min(POLL, end - time.monotonic())
            if left <= 0:
                return None
            self._packet_ready.wait(left)

    def peer_status(self) -> list[PeerStatus]:
        """Each peer's state, endpoint, last heartbeat and delay (empty without STUN)."""
        with self._loop.lock:
            return self.core.peers.peer_status()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the client has joined the network; ``False`` on timeout."""
        return bool(self._joined.wait(timeout))

    # --- workers ------------------------------------------------------------------------
    def _connect(self) -> None:
        cfg = self.config
        loop = self._loop
        sock_mod = self.kit.socket
        try:
            sock = sock_mod.create_connection((cfg.host, cfg.port), timeout=CONNECT_TIMEOUT)
            sock.setsockopt(sock_mod.IPPROTO_TCP, sock_mod.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=cfg.host)
            sock.settimeout(SEND_TIMEOUT)
        except (OSError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            with loop.lock:
                self.core.connection_failed(time.monotonic(), reason)
                loop.flushed()
            return
        writer = _Writer(loop, sock, lambda: None, lambda: None)
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
        reason = _recv_loop(
            loop, sock, lambda data: core.receive_data(data, time.monotonic(), time.time())
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
        assert udp is not None
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
                    self.core.receive_datagram(data, addr, now)
                loop.flushed()

    def _tun_reader(self) -> None:
        loop = self._loop
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
                    self.core.receive_packet(packet, now)
                loop.flushed()


def run_daemon(
    server_cls: type[BlockingServer],
    client_cls: type[BlockingClient],
    settings: Any,
    wait_for_signal: Callable[[Callable[[], None]], None],
) -> int:
    """Run ``candy`` on a blocking runtime until SIGINT/SIGTERM."""
    from shells.common import client_kwargs, server_kwargs

    node: BlockingServer | BlockingClient
    ssl_module = server_cls.kit.ssl
    if settings.mode == "server":
        node = server_cls(settings.server, **server_kwargs(settings, ssl_module))
    else:
        node = client_cls(settings.client, **client_kwargs(settings, ssl_module))
    try:
        node.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        node.stop()
        return 1
    stopping = {"done": False}

    def stop() -> None:
        stopping["done"] = True

    wait_for_signal(stop)
    log.info("shutting down")
    node.stop()
    return 0


def wait_for_signal_threads(stop: Callable[[], None]) -> None:
    """Block the main thread until SIGINT or SIGTERM."""
    import threading

    done = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop()
        done.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not done.wait(POLL):
            pass
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
