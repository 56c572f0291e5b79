"""Handshake hashes, the clock window and the replay window."""

from __future__ import annotations

import hashlib
import struct
from ipaddress import IPv4Address
from typing import Any

import pytest
from vectors import load_vectors

from candy_core import auth

WEBSOCKET = load_vectors("protocol")["websocket"]
HASHED = [v for v in WEBSOCKET if "hash_hex" in v]
CAPTURED = [v for v in load_vectors("captured-5.6")["websocket"] if "timestamp" in v["fields"]]


def vector_hash(vec: dict[str, Any]) -> bytes:
    pw, ts = vec["password"], vec["timestamp"]
    if vec["type"] == 0:
        return auth.auth_hash(pw, IPv4Address(vec["ip"]).packed, ts)
    if vec["type"] == 2:
        return auth.expected_hash(pw, ts)
    if vec["type"] == 4:
        return auth.vmac_hash(pw, vec["vmac_ascii"].encode(), ts)
    raise AssertionError(vec["type"])


def test_vectors_present() -> None:
    assert {v["type"] for v in HASHED} == {0, 2, 4}
    assert len(CAPTURED) == 4


@pytest.mark.parametrize("vec", HASHED, ids=[v["name"] for v in HASHED])
def test_hash_matches_vector(vec: dict[str, Any]) -> None:
    assert vector_hash(vec) == bytes.fromhex(vec["hash_hex"])


@pytest.mark.parametrize("vec", CAPTURED, ids=[v["name"] for v in CAPTURED])
def test_hash_matches_captured_frame(vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["hex"])
    ts = vec["fields"]["timestamp"]
    kind = data[0]
    if kind == 0:
        expected, got = auth.auth_hash("testpw", data[1:5], ts), data[13:45]
    elif kind == 2:
        expected, got = auth.expected_hash("testpw", ts), data[41:73]
    else:
        expected, got = auth.vmac_hash("testpw", data[1:17], ts), data[25:57]
    assert expected == got


def test_hash_constructions() -> None:
    ts = struct.pack(">q", 1764000000)
    ip = bytes([10, 0, 0, 1])
    vmac = b"0123456789abcdef"
    assert auth.auth_hash("pw", ip, 1764000000) == hashlib.sha256(b"pw" + ip + ts).digest()
    assert auth.expected_hash("pw", 1764000000) == hashlib.sha256(b"pw" + ts).digest()
    assert auth.vmac_hash("pw", vmac, 1764000000) == hashlib.sha256(b"pw" + vmac + ts).digest()
    # UTF-8 passwords hash as their UTF-8 bytes.
    assert auth.expected_hash("pä", 0) == hashlib.sha256("pä".encode() + bytes(8)).digest()


def test_digest_equal() -> None:
    a = auth.expected_hash("pw", 1)
    assert auth.digest_equal(a, bytes(a))
    assert not auth.digest_equal(a, auth.expected_hash("pw", 2))
    assert not auth.digest_equal(a, a[:31])


@pytest.mark.parametrize(
    ("ts", "ok"),
    [(1000, True), (970, True), (1030, True), (969, False), (1031, False), (-1000, False)],
)
def test_within_window(ts: int, ok: bool) -> None:
    assert auth.within_window(ts, 1000.9) is ok


def test_within_window_custom_width() -> None:
    assert auth.within_window(1005, 1000, window=5)
    assert not auth.within_window(1006, 1000, window=5)


# --- ReplayGuard ------------------------------------------------------------------------------
def test_replay_refused_inside_the_window() -> None:
    guard = auth.ReplayGuard(window=30)
    assert guard.check_and_remember(b"k", 1000, wall=1000)
    for wall in (1000, 1010, 1029.9, 1030, 1030.9):
        assert not guard.check_and_remember(b"k", 1000, wall=wall), wall
    assert guard.check_and_remember(b"other", 1000, wall=1000)


def test_replay_accepted_again_after_expiry() -> None:
    guard = auth.ReplayGuard(window=30)
    assert guard.check_and_remember(b"k", 1000, wall=1000)
    # once the timestamp has left the window the server's clock check refuses it anyway,
    # so the guard may forget it
    assert guard.check_and_remember(b"k", 1000, wall=1031)
    assert len(guard) == 1


def test_expired_entries_are_forgotten() -> None:
    guard = auth.ReplayGuard(window=30)
    for i in range(100):
        assert guard.check_and_remember(i.to_bytes(4, "big"), 1000 + i, wall=1000 + i)
    assert len(guard) == 31  # timestamps 1069..1099 are still inside the window at 1099
    guard.check_and_remember(b"late", 2000, wall=2000)
    assert len(guard) == 1


def test_future_timestamp_is_remembered_until_it_leaves_the_window() -> None:
    guard = auth.ReplayGuard(window=30)
    assert guard.check_and_remember(b"k", 1030, wall=1000)
    assert not guard.check_and_remember(b"k", 1030, wall=1060)
    assert guard.check_and_remember(b"k", 1030, wall=1061)


def test_capacity_bound_drops_the_oldest() -> None:
    guard = auth.ReplayGuard(window=30, capacity=3)
    for key in (b"a", b"b", b"c", b"d"):
        assert guard.check_and_remember(key, 1000, wall=1000)
    assert len(guard) == 3
    assert not guard.check_and_remember(b"d", 1000, wall=1000)
    assert not guard.check_and_remember(b"b", 1000, wall=1000)
    assert guard.check_and_remember(b"a", 1000, wall=1000)  # evicted: forgotten


def test_capacity_bound_drops_the_oldest_timestamp_first() -> None:
    guard = auth.ReplayGuard(window=30, capacity=3)
    for key, ts in ((b"late", 1002), (b"early", 1000), (b"middle", 1001), (b"new", 1002)):
        assert guard.check_and_remember(key, ts, wall=1002)
    assert len(guard) == 3
    assert guard.check_and_remember(b"early", 1000, wall=1002)  # the oldest went first
    assert not guard.check_and_remember(b"late", 1002, wall=1002)
    assert not guard.check_and_remember(b"new", 1002, wall=1002)


def test_bounded_under_100k_distinct_entries() -> None:
    guard = auth.ReplayGuard()
    assert guard.capacity <= 100_000
    for i in range(100_000):
        guard.check_and_remember(i.to_bytes(8, "big"), 5000, wall=5000)
    assert len(guard) == guard.capacity
    # the most recent ones are still refused
    assert not guard.check_and_remember((99_999).to_bytes(8, "big"), 5000, wall=5000)
    small = auth.ReplayGuard(capacity=1000)
    for i in range(100_000):
        assert small.check_and_remember(i.to_bytes(8, "big"), 5000, wall=5000)
        assert len(small) <= 1000
