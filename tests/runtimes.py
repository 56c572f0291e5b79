"""One synchronous face for every runtime shell, so one behaviour suite can drive them all.

A test talks to a :class:`RuntimeAdapter` from the main thread with plain blocking calls; the
adapter runs the shell in whatever way its runtime wants (an event loop in a background
thread for asyncio, a hub for gevent, plain threads for the threaded shell) and marshals each
call into it. Test modules parametrise over :data:`ADAPTERS`::

    @pytest.fixture(params=sorted(ADAPTERS))
    def adapter(request):
        yield from adapter_fixture(request)

Besides the adapters this module holds small helpers shared by the shell tests: IPv4 packet
builders and the Candy handshake messages written by hand with ``hashlib`` and ``struct``
(never with ``candy_core``), so tests that use them check the code against an independent
reading of PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from ipaddress import IPv4Address, IPv4Interface
from typing import Any, Protocol, TypeVar

import pytest

from candy_core import ClientConfig, ServerConfig, ServerStats

T = TypeVar("T")

#: Longest a single marshalled call may take before the test fails instead of hanging.
CALL_TIMEOUT = 10.0
#: The address every test server listens on.
HOST = "127.0.0.1"


# --- the interface ----------------------------------------------------------------------------
class ServerHandle(Protocol):
    """A running relay server of some runtime."""

    #: The TCP port it listens on (the real one when started with port 0).
    port: int
    #: Every core event, appended as it happens (safe to read from the test thread).
    events: list[Any]

    def stats(self) -> ServerStats:
        """A snapshot of the relay core's counters."""
        ...

    def authenticated(self) -> set[IPv4Address]:
        """The addresses currently held by authenticated connections."""
        ...

    def stop(self) -> None:
        """Stop listening and close every connection (idempotent)."""
        ...


class ClientHandle(Protocol):
    """A running client of some runtime, without a TUN device."""

    #: Every core event, appended as it happens (safe to read from the test thread).
    events: list[Any]

    @property
    def address(self) -> IPv4Interface | None:
        """Our virtual address, once known."""
        ...

    def wait_connected(self, timeout: float) -> bool:
        """Wait until the client has joined (AUTH sent); ``False`` on timeout."""
        ...

    def send_packet(self, packet: bytes) -> None:
        """Hand one IPv4 packet to the client, as if read from its TUN device."""
        ...

    def send_packets(self, packets: list[bytes]) -> None:
        """Send several packets in one call (cheap on every runtime)."""
        ...

    def recv_packet(self, timeout: float) -> bytes | None:
        """The next packet the client delivers, or ``None`` after ``timeout`` seconds."""
        ...

    def stop(self) -> None:
        """Leave the network and release everything (idempotent)."""
        ...


class RuntimeAdapter(Protocol):
    """Starts servers and clients of one runtime and drives them synchronously."""

    name: str

    def start_server(
        self, config: ServerConfig, ssl_context: Any = None, port: int = 0
    ) -> ServerHandle:
        """A relay listening on 127.0.0.1 (``port`` 0: any free port)."""
        ...

    def start_client(
        self, config: ClientConfig, state_dir: str | None = None, ssl_context: Any = None
    ) -> ClientHandle:
        """A client with ``tun=False``; ``config`` says where the server is."""
        ...

    def close(self) -> None:
        """Stop everything started here and assert nothing is left running."""
        ...


# --- asyncio ----------------------------------------------------------------------------------
class _AsyncioServer:
    def __init__(self, adapter: AsyncioAdapter, server: Any, events: list[Any]) -> None:
        self._adapter = adapter
        self._server = server
        self.events = events
        self.port: int = server.port
        self._stopped = False

    def stats(self) -> ServerStats:
        async def snapshot() -> ServerStats:
            return dataclasses.replace(self._server.core.stats)

        return self._adapter.call(snapshot())

    def authenticated(self) -> set[IPv4Address]:
        async def clients() -> set[IPv4Address]:
            return set(self._server.core.clients)

        return self._adapter.call(clients())

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._adapter.call(self._server.stop())

    def leftovers(self) -> list[str]:
        """What a stopped server still holds (should be nothing)."""
        left = []
        if self._server._transports:
            left.append(f"server on port {self.port}: open connections")
        if self._server._timer is not None and self._server._timer.armed:
            left.append(f"server on port {self.port}: armed timer")
        return left


class _AsyncioClient:
    def __init__(self, adapter: AsyncioAdapter, client: Any, events: list[Any]) -> None:
        self._adapter = adapter
        self._client = client
        self.events = events
        self._stopped = False

    @property
    def address(self) -> IPv4Interface | None:
        return self._client.address

    def wait_connected(self, timeout: float) -> bool:
        async def wait() -> bool:
            try:
                await self._client.wait_connected(timeout)
            except TimeoutError:
                return False
            return True

        return self._adapter.call(wait(), timeout + CALL_TIMEOUT)

    def send_packet(self, packet: bytes) -> None:
        async def send() -> None:
            self._client.send_packet(packet)

        self._adapter.call(send())

    def send_packets(self, packets: list[bytes]) -> None:
        async def send() -> None:
            for packet in packets:
                self._client.send_packet(packet)

        self._adapter.call(send())

    def recv_packet(self, timeout: float) -> bytes | None:
        async def recv() -> bytes | None:
            try:
                return await asyncio.wait_for(self._client.recv_packet(), timeout)
            except TimeoutError:
                return None

        return self._adapter.call(recv(), timeout + CALL_TIMEOUT)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._adapter.call(self._client.stop())

    def leftovers(self) -> list[str]:
        """What a stopped client still holds (should be nothing)."""
        client, left = self._client, []
        if client._link is not None:
            left.append("client: server connection still open")
        if client._tasks:
            left.append(f"client: {len(client._tasks)} tasks")
        if client._timer is not None and client._timer.armed:
            left.append("client: armed timer")
        return left


class AsyncioAdapter:
    """The asyncio shells on one event loop running in a background daemon thread."""

    name = "asyncio"
    use_uvloop = False

    def __init__(self) -> None:
        if self.use_uvloop:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.SelectorEventLoop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(self._on_loop_error)
        self.leftover_tasks: list[asyncio.Task[Any]] = []
        self._servers: list[_AsyncioServer] = []
        self._clients: list[_AsyncioClient] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(context)
        loop.default_exception_handler(context)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        assert not self._closed, "adapter already closed"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_server(
        self, config: ServerConfig, ssl_context: Any = None, port: int = 0
    ) -> _AsyncioServer:
        from shells.asyncio.server import Server

        events: list[Any] = []

        async def start() -> Any:
            server = Server(config, HOST, port, ssl_context=ssl_context, on_event=events.append)
            await server.start()
            return server

        handle = _AsyncioServer(self, self.call(start()), events)
        self._servers.append(handle)
        return handle

    def start_client(
        self, config: ClientConfig, state_dir: str | None = None, ssl_context: Any = None
    ) -> _AsyncioClient:
        from shells.asyncio.client import Client

        events: list[Any] = []

        async def start() -> Any:
            client = Client(
                config,
                tun=False,
                state_dir=state_dir,
                ssl_context=ssl_context,
                on_event=events.append,
            )
            await client.start()
            return client

        handle = _AsyncioClient(self, self.call(start()), events)
        self._clients.append(handle)
        return handle

    async def _settle(self) -> list[asyncio.Task[Any]]:
        # Let the transports run their connection_lost callbacks, then look for stragglers.
        for _ in range(5):
            await asyncio.sleep(0.02)
        await self.loop.shutdown_default_executor()
        current = asyncio.current_task()
        return [task for task in asyncio.all_tasks() if task is not current]

    def close(self) -> None:
        if self._closed:
            return
        try:
            for client in self._clients:
                client.stop()
            for server in self._servers:
                server.stop()
            self.leftover_tasks = self.call(self._settle())
            leftovers = [item for h in self._servers + self._clients for item in h.leftovers()]
        finally:
            self._closed = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CALL_TIMEOUT)
            if not self._thread.is_alive():
                self.loop.close()
        assert not self._thread.is_alive(), "the event loop thread did not stop"
        assert not self.leftover_tasks, f"tasks left pending: {self.leftover_tasks}"
        assert not leftovers, f"left running: {leftovers}"
        assert not self.loop_errors, f"errors on the event loop: {self.loop_errors}"


class UvloopAdapter(AsyncioAdapter):
    """The asyncio shells on a uvloop event loop."""

    name = "asyncio-uvloop"
    use_uvloop = True


def _uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


# --- threads and greenlets -------------------------------------------------------------------
class _BlockingServer:
    def __init__(self, adapter: BlockingAdapter, server: Any, events: list[Any]) -> None:
        self._adapter = adapter
        self._server = server
        self.events = events
        self.port: int = server.port
        self._stopped = False

    def stats(self) -> ServerStats:
        return self._adapter.call(lambda: dataclasses.replace(self._server.core.stats))

    def authenticated(self) -> set[IPv4Address]:
        return self._adapter.call(lambda: set(self._server.core.clients))

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._adapter.call(self._server.stop)

    def leftovers(self) -> list[str]:
        return [f"server worker {w!r}" for w in self._server._loop.workers]


class _BlockingClient:
    def __init__(self, adapter: BlockingAdapter, client: Any, events: list[Any]) -> None:
        self._adapter = adapter
        self._client = client
        self.events = events
        self._stopped = False

    @property
    def address(self) -> IPv4Interface | None:
        return self._client.address

    def wait_connected(self, timeout: float) -> bool:
        return self._adapter.call(lambda: self._client.wait_connected(timeout), timeout + 5)

    def send_packet(self, packet: bytes) -> None:
        self._adapter.call(lambda: self._client.send_packet(packet))

    def send_packets(self, packets: list[bytes]) -> None:
        def send() -> None:
            for packet in packets:
                self._client.send_packet(packet)

        self._adapter.call(send)

    def recv_packet(self, timeout: float) -> bytes | None:
        return self._adapter.call(lambda: self._client.recv_packet(timeout), timeout + 5)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._adapter.call(self._client.stop)

    def leftovers(self) -> list[str]:
        return [f"client worker {w!r}" for w in self._client._loop.workers]


class BlockingAdapter:
    """The threaded shells, called directly from the test thread."""

    name = "threaded"

    def __init__(self) -> None:
        self._servers: list[_BlockingServer] = []
        self._clients: list[_BlockingClient] = []
        self._threads_before = set(threading.enumerate())
        self._closed = False

    @property
    def module(self) -> Any:
        import shells.threaded

        return shells.threaded

    def call(self, fn: Callable[[], T], timeout: float = CALL_TIMEOUT) -> T:
        return fn()

    def start_server(
        self, config: ServerConfig, ssl_context: Any = None, port: int = 0
    ) -> _BlockingServer:
        events: list[Any] = []

        def start() -> Any:
            server = self.module.Server(config, HOST, port, ssl_context, on_event=events.append)
            server.start()
            return server

        handle = _BlockingServer(self, self.call(start), events)
        self._servers.append(handle)
        return handle

    def start_client(
        self, config: ClientConfig, state_dir: str | None = None, ssl_context: Any = None
    ) -> _BlockingClient:
        events: list[Any] = []

        def start() -> Any:
            client = self.module.Client(
                config,
                tun=False,
                state_dir=state_dir,
                ssl_context=ssl_context,
                on_event=events.append,
            )
            client.start()
            return client

        handle = _BlockingClient(self, self.call(start), events)
        self._clients.append(handle)
        return handle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for client in self._clients:
            client.stop()
        for server in self._servers:
            server.stop()
        leftovers = [item for h in self._servers + self._clients for item in h.leftovers()]
        self._finish()
        assert not leftovers, f"left running: {leftovers}"
        wait_until(lambda: not self._new_candy_threads(), 3.0)
        assert not self._new_candy_threads(), f"threads left: {self._new_candy_threads()}"

    def _finish(self) -> None:
        pass

    def _new_candy_threads(self) -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t not in self._threads_before and t.name.startswith("candy-") and t.is_alive()
        ]


class GeventAdapter(BlockingAdapter):
    """The gevent shells on a gevent hub running in its own thread.

    Test code is plain blocking code (``time.sleep`` would stall a hub in the test thread),
    so every call is handed to a greenlet in the hub's thread and its result waited for.
    """

    name = "gevent"

    def __init__(self) -> None:
        super().__init__()
        import queue as stdlib_queue

        self._requests: stdlib_queue.SimpleQueue[Any] = stdlib_queue.SimpleQueue()
        self._thread = threading.Thread(target=self._hub, name="gevent-hub", daemon=True)
        self._thread.start()

    @property
    def module(self) -> Any:
        import shells.gevent

        return shells.gevent

    def _hub(self) -> None:
        import gevent

        def run(fn: Callable[[], Any], future: concurrent.futures.Future[Any]) -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed back to the caller
                future.set_exception(exc)

        while True:
            try:
                item = self._requests.get_nowait()
            except Exception:
                gevent.sleep(0.001)
                continue
            if item is None:
                break
            gevent.spawn(run, *item)
        gevent.get_hub().destroy(destroy_loop=True)

    def call(self, fn: Callable[[], T], timeout: float = CALL_TIMEOUT) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._requests.put((fn, future))
        return future.result(timeout)

    def _finish(self) -> None:
        self._requests.put(None)
        self._thread.join(CALL_TIMEOUT)
        assert not self._thread.is_alive(), "the gevent hub thread did not stop"


ADAPTERS: dict[str, Callable[[], RuntimeAdapter]] = {
    "asyncio": AsyncioAdapter,
    "threaded": BlockingAdapter,
    "gevent": GeventAdapter,
}
if _uvloop_available():
    ADAPTERS["asyncio-uvloop"] = UvloopAdapter


def adapter_fixture(request: pytest.FixtureRequest) -> Iterator[RuntimeAdapter]:
    """Body of a parametrised fixture: the adapter named by ``request.param``, closed after."""
    adapter = ADAPTERS[request.param]()
    try:
        yield adapter
    finally:
        adapter.close()


# --- waiting ----------------------------------------------------------------------------------
def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def recv_matching(
    client: ClientHandle, predicate: Callable[[bytes], bool], timeout: float
) -> bytes | None:
    """The first packet ``client`` delivers that satisfies ``predicate`` (others skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        packet = client.recv_packet(left)
        if packet is None:
            return None
        if predicate(packet):
            return packet
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def open_fds() -> int:
    """How many file descriptors this process holds."""
    import os

    return len(os.listdir("/proc/self/fd"))


# --- IPv4 packets -----------------------------------------------------------------------------
def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_packet(src: IPv4Address, dst: IPv4Address, proto: int, payload: bytes) -> bytes:
    """An IPv4 packet (no options, DF set, TTL 64) with a correct header checksum."""
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0, src.packed, dst.packed
    )
    return header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:] + payload


def icmp_packet(
    src: IPv4Address, dst: IPv4Address, payload: bytes = b"candy ping", ident: int = 1, seq: int = 1
) -> bytes:
    """An IPv4 ICMP echo request from ``src`` to ``dst``."""
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    csum = inet_checksum(head + payload)
    return ipv4_packet(src, dst, 1, head[:2] + struct.pack("!H", csum) + head[4:] + payload)


def udp_packet(
    src: IPv4Address, dst: IPv4Address, sport: int, dport: int, payload: bytes = b"candy"
) -> bytes:
    """An IPv4 UDP datagram with a correct UDP checksum."""
    length = 8 + len(payload)
    pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 17, length)
    head = struct.pack("!HHHH", sport, dport, length, 0)
    csum = inet_checksum(pseudo + head + payload) or 0xFFFF
    return ipv4_packet(src, dst, 17, head[:6] + struct.pack("!H", csum) + payload)


# --- Candy handshake messages, by hand (PROTOCOL.md section 2) -------------------------------
_TS = struct.Struct("!q")


def msg_vmac(password: str, vmac: bytes, ts: int, padding: bytes = b"") -> bytes:
    """VMAC (type 4): vmac(16) | timestamp | SHA-256(password | vmac | timestamp)."""
    assert len(vmac) == 16
    stamp = _TS.pack(ts)
    return (
        b"\x04" + vmac + stamp + hashlib.sha256(password.encode() + vmac + stamp).digest() + padding
    )


def msg_auth(password: str, ip: IPv4Address, ts: int, padding: bytes = b"") -> bytes:
    """AUTH (type 0): ip | timestamp | SHA-256(password | ip | timestamp)."""
    stamp = _TS.pack(ts)
    digest = hashlib.sha256(password.encode() + ip.packed + stamp).digest()
    return b"\x00" + ip.packed + stamp + digest + padding


def msg_expected(password: str, cidr: str, ts: int, padding: bytes = b"") -> bytes:
    """EXPECTED (type 2): timestamp | cidr (32 bytes, NUL-filled) | SHA-256(password | ts)."""
    stamp = _TS.pack(ts)
    field = cidr.encode().ljust(32, b"\0")
    return b"\x02" + stamp + field + hashlib.sha256(password.encode() + stamp).digest() + padding


def parse_expected(message: bytes, password: str) -> tuple[IPv4Interface, int, bool]:
    """An EXPECTED reply: (address, timestamp, whether its hash verifies with ``password``)."""
    assert message[0] == 2 and len(message) >= 73, message
    stamp = message[1:9]
    cidr = message[9:41].split(b"\0", 1)[0].decode()
    ok = message[41:73] == hashlib.sha256(password.encode() + stamp).digest()
    return IPv4Interface(cidr), _TS.unpack(stamp)[0], ok


def msg_forward(packet: bytes) -> bytes:
    """FORWARD (type 1): the raw IPv4 packet behind a type byte."""
    return b"\x01" + packet


def random_vmac() -> bytes:
    """16 random lowercase hex characters, like the reference client's VMAC."""
    import secrets

    return secrets.token_hex(8).encode()
