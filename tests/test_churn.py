"""Connect, handshake, close, thousands of times: every runtime's server leaves nothing behind.

Members join in waves (WAVE connections open at once, then all closed), so each server also
goes through many connections alive together, as a relay does when clients come and go.
After a warm-up (the allocator's high-water marks, the first worker threads) the process's
RSS may grow only a little: what the server keeps on purpose is the replay guard (two
handshake hashes per join, about 130 bytes each, for 30 s), about 0.5 MiB for these cycles.
Before the threaded server waited for a socket to be readable before calling ``recv``, each
idle reader held a 64 KiB receive buffer and the heap grew by about 3 MiB per 1000 cycles.

The longer run against the daemons (10 000 cycles per runtime) is bench/churn.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import socket
import threading
from ipaddress import IPv4Address
from typing import Any

import pytest
from rawclient import RawMember
from runtimes import ADAPTERS, adapter_fixture, open_fds, wait_until

from candy_core.config import ServerConfig
from shells.blocking.loop import Loop, recv_loop

PASSWORD = "churn"
WARMUP = 1000
CYCLES = 2000
WAVE = 250
#: RSS growth allowed over CYCLES after the warm-up.
RSS_GROWTH_KIB = 2048


@pytest.fixture(params=sorted(ADAPTERS))
def adapter(request: pytest.FixtureRequest) -> Any:
    yield from adapter_fixture(request)


def address(i: int) -> IPv4Address:
    return IPv4Address(int(IPv4Address("10.99.0.0")) + 1 + i % 65000)


def churn(server: Any, first: int, count: int) -> None:
    """``count`` join+close cycles, WAVE connections open at a time."""
    for start in range(first, first + count, WAVE):
        members: list[RawMember] = []
        try:
            for i in range(start, min(start + WAVE, first + count)):
                members.append(RawMember.join(server.port, PASSWORD, address(i)))
        finally:
            for member in members:
                member.close()
        server.events.clear()  # the adapter records every event: not the server's memory


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def server_state(adapter: Any, handle: Any) -> dict[str, int]:
    """What the running server holds: connections (core and shell) and its workers or tasks."""
    server = handle._server
    if adapter.name.startswith("asyncio"):

        async def state() -> dict[str, int]:
            current = asyncio.current_task()
            return {
                "core": len(server.core._conns),
                "shell": len(server._transports),
                "starting": len(server._acceptor._starting),
                "tasks": sum(t is not current for t in asyncio.all_tasks()),
            }

        return adapter.call(state())

    def blocking_state() -> dict[str, int]:
        alive = server.kit.alive
        return {
            "core": len(server.core._conns),
            "shell": len(server._writers),
            "workers": sum(bool(alive(w)) for w in server._loop.workers),  # timer and accept
        }

    return adapter.call(blocking_state)


def idle_state(adapter: Any) -> dict[str, int]:
    if adapter.name.startswith("asyncio"):
        return {"core": 0, "shell": 0, "starting": 0, "tasks": 0}
    return {"core": 0, "shell": 0, "workers": 2}


def candy_threads() -> int:
    return sum(t.name.startswith("candy-") for t in threading.enumerate())


@pytest.mark.slow
def test_churn_leaves_no_connection_descriptor_thread_or_memory_behind(adapter: Any) -> None:
    server = adapter.start_server(ServerConfig.from_strings(PASSWORD))
    idle = idle_state(adapter)

    churn(server, 0, WARMUP)
    assert wait_until(lambda: server_state(adapter, server) == idle, 10.0), server_state(
        adapter, server
    )
    gc.collect()
    fds, threads, rss = open_fds(), candy_threads(), rss_kib()

    churn(server, WARMUP, CYCLES)
    assert wait_until(lambda: server_state(adapter, server) == idle, 10.0), server_state(
        adapter, server
    )
    assert wait_until(lambda: open_fds() <= fds, 5.0), f"descriptors: {fds} -> {open_fds()}"
    assert wait_until(lambda: candy_threads() <= threads, 5.0), (
        f"threads: {threads} -> {candy_threads()}"
    )
    assert server.stats().authenticated == WARMUP + CYCLES
    gc.collect()
    growth = rss_kib() - rss
    print(f"{adapter.name}: RSS {rss} -> {rss + growth} KiB over {CYCLES} cycles")
    assert growth <= RSS_GROWTH_KIB, f"RSS grew by {growth} KiB over {CYCLES} cycles"


def test_threaded_reader_waits_for_data_before_it_allocates_a_receive_buffer() -> None:
    """``recv(65536)`` allocates its buffer first, then blocks: a reader must wait before it."""
    from shells.threaded import KIT

    calls: list[object] = []

    def wait_readable(fd: int, timeout: float) -> bool:
        calls.append("wait")
        return KIT.wait_readable(fd, timeout)

    class Recording:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def fileno(self) -> int:
            return self.sock.fileno()

        def gettimeout(self) -> float | None:
            return self.sock.gettimeout()

        def recv(self, size: int) -> bytes:
            calls.append("recv")
            return self.sock.recv(size)

    loop = Loop(dataclasses.replace(KIT, wait_readable=wait_readable))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(5.0)
        theirs.sendall(b"frame")
        theirs.shutdown(socket.SHUT_WR)
        reason = recv_loop(loop, Recording(ours), calls.append)
    assert reason == "connection closed by peer"
    assert calls == ["wait", "recv", b"frame", "wait", "recv"]
