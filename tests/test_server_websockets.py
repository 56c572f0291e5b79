"""The asyncio relay server against clients built on the independent ``websockets`` library.

The Candy messages are written by hand from PROTOCOL.md section 2 (``hashlib``/``struct``
helpers in tests/runtimes.py, never ``candy_core.messages``), so these tests check the server
against a second reading of the protocol and a second WebSocket implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import pytest
from runtimes import (
    HOST,
    icmp_packet,
    msg_auth,
    msg_expected,
    msg_forward,
    msg_vmac,
    parse_expected,
    random_vmac,
    udp_packet,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from candy_core import ClientAuthenticated, ClientDisconnected, ServerConfig
from shells.asyncio.server import Server

PASSWORD = "independent"
NETWORK = IPv4Network("10.99.0.0/24")
A, B, C = (IPv4Address(f"10.99.0.{n}") for n in (10, 11, 12))
QUIET = 0.3  # how long to listen for frames that must not come


def run(scenario: Callable[[], Awaitable[None]], limit: float = 10.0) -> None:
    """Run one scenario on a fresh event loop, bounded in time."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario(), limit)

    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def relay(**kw: Any) -> AsyncIterator[tuple[Server, list[Any]]]:
    events: list[Any] = []
    config = ServerConfig.from_strings(PASSWORD, str(NETWORK), **kw)
    async with Server(config, HOST, 0, on_event=events.append) as server:
        yield server, events


@contextlib.asynccontextmanager
async def member(port: int) -> AsyncIterator[ClientConnection]:
    """One WebSocket connection made with the ``websockets`` library."""
    async with connect(
        f"ws://{HOST}:{port}/", proxy=None, ping_interval=None, open_timeout=5, close_timeout=1
    ) as ws:
        yield ws


async def synced(ws: ClientConnection) -> None:
    """Wait until the server has processed everything sent so far (PING is answered in order)."""
    pong = await ws.ping(b"sync")
    await asyncio.wait_for(pong, 5)


async def join_static(ws: ClientConnection, ip: IPv4Address, password: str = PASSWORD) -> int:
    """VMAC and AUTH as ``ip``; returns the handshake timestamp used."""
    ts = int(time.time())
    await ws.send(msg_vmac(password, random_vmac(), ts))
    await ws.send(msg_auth(password, ip, ts, padding=b"\x5a" * 7))
    await synced(ws)
    return ts


async def join_dynamic(
    ws: ClientConnection, want: str = "0.0.0.0/0", padding: bytes = b""
) -> IPv4Interface:
    """EXPECTED, check the reply, then AUTH with the assigned address."""
    ts = int(time.time())
    await ws.send(msg_vmac(PASSWORD, random_vmac(), ts))
    request = msg_expected(PASSWORD, want, ts, padding)
    await ws.send(request)
    reply = await asyncio.wait_for(ws.recv(), 5)
    assert isinstance(reply, bytes), "Candy messages travel in binary frames"
    assert len(reply) == len(request), "the reply has the request's length"
    address, reply_ts, verified = parse_expected(reply, PASSWORD)
    assert verified, "the reply's hash is SHA-256(password | timestamp)"
    assert abs(reply_ts - time.time()) <= 5
    assert address.network == NETWORK
    await ws.send(msg_auth(PASSWORD, address.ip, int(time.time())))
    await synced(ws)
    return address


async def expect(ws: ClientConnection, frame: bytes) -> None:
    got = await asyncio.wait_for(ws.recv(), 5)
    assert got == frame


async def expect_nothing(ws: ClientConnection) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), QUIET)


async def expect_refused(ws: ClientConnection, reason: str) -> None:
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1008
    assert ws.close_reason == reason


# --- tests ------------------------------------------------------------------------------------
def test_static_and_dynamic_members_exchange_forward_frames() -> None:
    async def scenario() -> None:
        async with relay() as (server, events), member(server.port) as a, member(server.port) as b:
            await join_static(a, A)
            b_addr = await join_dynamic(b, padding=b"\x00" * 11)
            assert b_addr.ip not in (A, NETWORK.network_address, NETWORK.broadcast_address)
            assert {e.ip for e in events if isinstance(e, ClientAuthenticated)} == {
                A,
                b_addr.ip,
            }

            to_b = msg_forward(icmp_packet(A, b_addr.ip, b"hello b"))
            await a.send(to_b)
            await expect(b, to_b)
            to_a = msg_forward(icmp_packet(b_addr.ip, A, b"hello a"))
            await b.send(to_a)
            await expect(a, to_a)

            # A spoofed source and an address nobody holds are both dropped.
            await a.send(msg_forward(icmp_packet(b_addr.ip, b_addr.ip, b"spoofed")))
            await a.send(msg_forward(icmp_packet(A, IPv4Address("10.99.0.99"), b"nobody")))
            await expect_nothing(b)
            await b.send(to_a)
            await expect(a, to_a)

    run(scenario)


def test_a_dynamic_member_gets_the_address_it_asks_for() -> None:
    async def scenario() -> None:
        async with relay() as (server, _), member(server.port) as ws:
            assert await join_dynamic(ws, "10.99.0.42/24") == IPv4Interface("10.99.0.42/24")

    run(scenario)


def test_broadcast_and_multicast_reach_every_other_member() -> None:
    async def scenario() -> None:
        async with (
            relay() as (server, _),
            member(server.port) as a,
            member(server.port) as b,
            member(server.port) as c,
        ):
            for ws, ip in ((a, A), (b, B), (c, C)):
                await join_static(ws, ip)
            for dst in (NETWORK.broadcast_address, IPv4Address("224.0.0.251")):
                frame = msg_forward(udp_packet(A, dst, 5353, 5353, f"to {dst}".encode()))
                await a.send(frame)
                await expect(b, frame)
                await expect(c, frame)
                await expect_nothing(a)

    run(scenario)


@pytest.mark.parametrize("wrong", ["VMAC", "AUTH", "EXPECTED"])
def test_a_wrong_password_closes_only_that_connection(wrong: str) -> None:
    async def scenario() -> None:
        async with (
            relay() as (server, events),
            member(server.port) as a,
            member(server.port) as b,
            member(server.port) as bad,
        ):
            await join_static(a, A)
            await join_static(b, B)
            ts = int(time.time())
            password = {name: PASSWORD for name in ("VMAC", "AUTH", "EXPECTED")}
            password[wrong] = "guessed"
            await bad.send(msg_vmac(password["VMAC"], random_vmac(), ts))
            if wrong == "EXPECTED":
                await bad.send(msg_expected(password["EXPECTED"], "0.0.0.0/0", ts))
            else:
                await bad.send(msg_auth(password["AUTH"], C, ts))
            await expect_refused(bad, "wrong password")

            frame = msg_forward(icmp_packet(A, B, b"still here"))
            await a.send(frame)
            await expect(b, frame)
            frame = msg_forward(icmp_packet(B, A, b"me too"))
            await b.send(frame)
            await expect(a, frame)
            assert set(server.core.clients) == {A, B}
            refused = [e for e in events if isinstance(e, ClientDisconnected)]
            assert [e.reason for e in refused] == ["wrong password"]

    run(scenario)


def test_a_newer_connection_takes_over_the_address() -> None:
    async def scenario() -> None:
        async with (
            relay() as (server, _),
            member(server.port) as a,
            member(server.port) as old,
            member(server.port) as new,
        ):
            await join_static(a, A)
            old_ts = await join_static(old, B)
            ts = old_ts - 1  # another AUTH for B, not a replay of the first one
            await new.send(msg_vmac(PASSWORD, random_vmac(), ts))
            await new.send(msg_auth(PASSWORD, B, ts))
            await synced(new)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(old.recv(), 5)
            assert (old.close_code, old.close_reason) == (
                1001,
                "address taken over by a newer connection",
            )
            frame = msg_forward(icmp_packet(A, B, b"to the newer one"))
            await a.send(frame)
            await expect(new, frame)

    run(scenario)


def test_a_plain_http_request_gets_403() -> None:
    async def scenario() -> None:
        async with relay() as (server, _), member(server.port) as a:
            await join_static(a, A)

            def get() -> int:
                conn = http.client.HTTPConnection(HOST, server.port, timeout=5)
                try:
                    conn.request("GET", "/")
                    return conn.getresponse().status
                finally:
                    conn.close()

            assert await asyncio.to_thread(get) == 403
            assert server.core.stats.rejected == 1
            await synced(a)  # the relay is unaffected

    run(scenario)


def test_ping_gets_pong_with_the_same_payload() -> None:
    async def scenario() -> None:
        async with relay() as (server, _), member(server.port) as ws:
            for payload in (b"candy::linux::5.6", b"", bytes(range(125))):
                pong = await ws.ping(payload)  # resolved only by a PONG with this payload
                await asyncio.wait_for(pong, 5)
                if payload == b"":
                    await join_static(ws, A)

    run(scenario)
