"""Flood limits: what one source address can make a relay do before it authenticates."""

from __future__ import annotations

import logging
import random

import pytest
from test_server import PASSWORD, Relay

from candy_core import ServerConfig
from candy_core.limits import Limits, SourceLimiter, is_loopback, source_of

FLOODER = "203.0.113.66"


def test_source_of_takes_the_address_of_a_label() -> None:
    assert source_of("198.51.100.7:4000") == "198.51.100.7"
    assert source_of("[2001:db8::1]:443") == "2001:db8::1"
    assert source_of("?") == "?"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.9")
    assert not is_loopback("198.51.100.7")


def test_a_burst_is_admitted_then_the_rate_holds() -> None:
    lim = SourceLimiter(Limits(connect_rate=10, connect_burst=20))
    admitted = [lim.admit(FLOODER, 0.0) is None for _ in range(30)]
    assert admitted == [True] * 20 + [False] * 10
    for _ in range(20):
        lim.settled(FLOODER, failed=False, now=0.0)
    assert lim.admit(FLOODER, 0.05) is not None  # half a token: still refused
    assert lim.admit(FLOODER, 0.1) is None  # one token back after 1/rate seconds
    assert lim.admit("198.51.100.1", 0.1) is None  # another source is not affected


def test_failed_handshakes_slow_a_source_down_further() -> None:
    honest, guesser = (
        SourceLimiter(Limits(connect_rate=10, connect_burst=20)),
        SourceLimiter(Limits(connect_rate=10, connect_burst=20, failure_cost=5)),
    )
    for lim, failed in ((honest, False), (guesser, True)):
        for _ in range(3):
            assert lim.admit(FLOODER, 0.0) is None
            lim.settled(FLOODER, failed=failed, now=0.0)
    count = {id(lim): 0 for lim in (honest, guesser)}
    for lim in (honest, guesser):
        while lim.admit(FLOODER, 0.0) is None:
            count[id(lim)] += 1
    assert count[id(honest)] == 17 and count[id(guesser)] == 2  # 20 - 3 - 3 * 5


def test_the_penalty_is_bounded() -> None:
    lim = SourceLimiter(Limits(connect_rate=100, connect_burst=10, failure_cost=1000))
    assert lim.admit(FLOODER, 0.0) is None
    lim.settled(FLOODER, failed=True, now=0.0)  # 1000 tokens owed, capped at 4 bursts (40)
    assert lim.admit(FLOODER, 0.35) is not None
    assert lim.admit(FLOODER, 0.45) is None  # 40 tokens at 100/s: back after 0.4 s


def test_pending_connections_are_bounded_per_source_and_in_total() -> None:
    lim = SourceLimiter(Limits(max_pending=10, max_pending_per_source=4, connect_burst=100))
    assert [lim.admit(FLOODER, 0.0) is None for _ in range(5)] == [True] * 4 + [False]
    lim.settled(FLOODER, failed=False, now=0.0)
    assert lim.admit(FLOODER, 0.0) is None
    for i in range(6):
        assert lim.admit(f"198.51.100.{i}", 0.0) is None
    assert lim.pending == 10
    refusal = lim.admit("198.51.100.200", 0.0)
    assert refusal is not None and "waiting to authenticate" in refusal
    assert lim.admit("127.0.0.1", 0.0) is not None  # the total holds for loopback too


def test_loopback_is_exempt_from_the_per_source_bounds() -> None:
    lim = SourceLimiter(Limits(connect_rate=1, connect_burst=2, max_pending_per_source=2))
    assert all(lim.admit("127.0.0.1", 0.0) is None for _ in range(100))
    assert len(lim) == 0


def test_memory_is_bounded_by_max_sources() -> None:
    lim = SourceLimiter(Limits(max_sources=100))
    for i in range(10_000):
        lim.admit(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", float(i))
        lim.settled(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", failed=True, now=float(i))
    assert len(lim) <= 100


# --- in the relay ---------------------------------------------------------------------------
def flood_relay(**limits: float) -> Relay:
    cfg = ServerConfig.from_strings(PASSWORD, "10.99.0.0/24", limits=Limits(**limits))  # type: ignore[arg-type]
    return Relay(cfg, random.Random(3))


def test_a_flooding_source_is_refused_at_once_while_others_join() -> None:
    relay = flood_relay(connect_rate=5, connect_burst=10)
    server = relay.server
    for cid in range(10_000, 10_100):
        server.connection_made(cid, relay.now, f"{FLOODER}:{cid}")
        server.receive_data(cid, b"GET / HTTP/1.1\r\n\r\n", relay.now, relay.wall)
    (answered,) = server.data_to_send()  # only the admitted one got an answer (HTTP 400)
    assert answered[1].startswith(b"HTTP/1.1 400 ")
    closing = set(server.connections_to_close())
    assert len(closing) == 100
    # The first one's garbage cost its source 16 tokens more than the burst left: the other
    # 99 are refused at once, before a byte of theirs is parsed.
    assert server.stats.rejected == 1
    assert server.stats.refused == 99
    honest = relay.join()  # from 198.51.100.x: joins as usual
    assert honest.address is not None and not honest.closed
    assert len(server.clients) == 1


def test_refusals_are_logged_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    relay = flood_relay(connect_rate=1, connect_burst=1)
    caplog.set_level(logging.WARNING, logger="candy.server")
    for i in range(1000):
        c = relay.client(connect=False)
        relay.server.connection_made(c.cid, relay.now + i * 0.01, f"{FLOODER}:{i}")
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 10  # 10 seconds of flood
    assert lines[1].startswith("refused 99 connection(s)")  # one a second got in
    relay.advance(12)  # the flood stops: the sweep reports what the last line did not say
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 11
    total = sum(int(line.split()[1]) for line in lines)
    assert total == relay.server.stats.refused == 990


def test_a_wrong_password_costs_its_source_more() -> None:
    relay = flood_relay(connect_rate=0.001, connect_burst=20, failure_cost=5)
    attempts = 0
    while True:
        c = relay.client(connect=False)
        relay.server.connection_made(c.cid, relay.now, f"{FLOODER}:{c.cid}")
        relay.pump()
        if c.closed:
            break
        attempts += 1
        c.write(c.upgrade.request())
        c.vmac(pw="wrong")
        assert c.closed
    assert attempts == 4  # 20 tokens: 1 + 5 per guess


def test_authenticated_clients_do_not_count_as_pending() -> None:
    relay = flood_relay(max_pending_per_source=2)
    for i in range(5):  # five clients behind one NAT address join one after the other
        c = relay.client(connect=False)
        relay.server.connection_made(c.cid, relay.now, f"{FLOODER}:{4000 + i}")
        c.write(c.upgrade.request())
        c.vmac()
        c.auth(f"10.99.0.{i + 1}")
        assert not c.closed
    assert len(relay.server.clients) == 5


def test_a_silent_connection_is_settled_by_the_auth_timeout() -> None:
    relay = flood_relay(max_pending_per_source=1)
    first = relay.client(connect=False)
    relay.server.connection_made(first.cid, relay.now, f"{FLOODER}:1")
    second = relay.client(connect=False)
    relay.server.connection_made(second.cid, relay.now, f"{FLOODER}:2")
    relay.pump()
    assert second.closed and not first.closed
    relay.advance(11)  # auth timeout (10 s) closes the first; the source may try again
    assert first.closed
    third = relay.client(connect=False)
    relay.server.connection_made(third.cid, relay.now, f"{FLOODER}:3")
    relay.pump()
    assert not third.closed
