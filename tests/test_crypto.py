"""Peer datagram crypto against the shared vectors and captured 5.6 traffic."""

from __future__ import annotations

import ipaddress
import random

import pytest
from vectors import load_vectors

from candy_core.crypto import OVERHEAD, PeerCipher, ReplayWindow, peer_key

PEER = load_vectors("protocol")["peer"]
GOOD = [v for v in PEER if v.get("expect") != "drop"]
TAMPERED = [v for v in PEER if v.get("expect") == "drop"]
CAPTURED = load_vectors("captured-5.6")["peer"]


class FixedIvRng:
    """An rng whose ``randbytes`` repeats one IV, so sealing is deterministic."""

    def __init__(self, iv: bytes) -> None:
        self.iv = iv
        self.calls = 0

    def randbytes(self, n: int) -> bytes:
        self.calls += 1
        return (self.iv * (n // len(self.iv) + 1))[:n]


def ip(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def key_of(vec: dict) -> bytes:
    return peer_key(vec["password"], ip(vec["receiver_ip"]))


def test_vectors_present() -> None:
    assert GOOD and TAMPERED and CAPTURED


def test_key_hashes_little_endian_address() -> None:
    import hashlib

    expected = hashlib.sha256(b"pw" + bytes([12, 0, 77, 10])).digest()
    assert peer_key("pw", ip("10.77.0.12")) == expected
    with pytest.raises(ValueError):
        peer_key("pw", b"\x0a\x4d\x00")


@pytest.mark.parametrize("vec", GOOD, ids=lambda v: v["name"])
def test_peer_key_vector(vec: dict) -> None:
    assert key_of(vec).hex() == vec["key_hex"]


@pytest.mark.parametrize("vec", GOOD, ids=lambda v: v["name"])
def test_seal_vector(vec: dict) -> None:
    cipher = PeerCipher(FixedIvRng(bytes.fromhex(vec["iv_hex"])))
    sealed = cipher.seal(key_of(vec), bytes.fromhex(vec["plaintext_hex"]))
    assert sealed.hex() == vec["datagram_hex"]


@pytest.mark.parametrize("vec", GOOD, ids=lambda v: v["name"])
def test_open_vector(vec: dict) -> None:
    cipher = PeerCipher(random.Random(0))
    opened = cipher.open(key_of(vec), bytes.fromhex(vec["datagram_hex"]))
    assert opened is not None and opened.hex() == vec["plaintext_hex"]


@pytest.mark.parametrize("vec", TAMPERED, ids=lambda v: v["name"])
def test_tampered_vector_dropped(vec: dict) -> None:
    cipher = PeerCipher(random.Random(0))
    assert cipher.open(key_of(vec), bytes.fromhex(vec["datagram_hex"])) is None


@pytest.mark.parametrize("vec", CAPTURED, ids=lambda v: v["name"])
def test_captured_5_6_datagram_opens(vec: dict) -> None:
    cipher = PeerCipher(random.Random(0))
    opened = cipher.open(key_of(vec), bytes.fromhex(vec["datagram_hex"]))
    assert opened is not None and opened.hex() == vec["plaintext_hex"]


def test_open_rejects_short_wrong_key_and_tampering() -> None:
    cipher = PeerCipher(random.Random(1))
    key = peer_key("pw", ip("10.0.0.1"))
    sealed = cipher.seal(key, b"hello")
    assert cipher.open(key, sealed) == b"hello"
    assert cipher.open(peer_key("pw", ip("10.0.0.2")), sealed) is None
    for n in range(OVERHEAD):
        assert cipher.open(key, sealed[:n]) is None
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        assert cipher.open(key, bytes(bad)) is None


def test_empty_plaintext_round_trip() -> None:
    cipher = PeerCipher(random.Random(2))
    key = peer_key("pw", ip("10.0.0.1"))
    sealed = cipher.seal(key, b"")
    assert len(sealed) == OVERHEAD
    assert cipher.open(key, sealed) == b""


def test_random_ivs_differ_across_seals_and_batches() -> None:
    cipher = PeerCipher(random.Random(3))
    key = peer_key("pw", ip("10.0.0.1"))
    ivs = {cipher.seal(key, b"x")[:12] for _ in range(1000)}
    assert len(ivs) == 1000


def test_ivs_come_from_rng_in_batches() -> None:
    rng = FixedIvRng(bytes(range(12)))
    cipher = PeerCipher(rng)
    key = peer_key("pw", ip("10.0.0.1"))
    for _ in range(256):
        cipher.seal(key, b"x")
    assert rng.calls == 1
    cipher.seal(key, b"x")
    assert rng.calls == 2


def test_deterministic_with_seeded_rng() -> None:
    key = peer_key("pw", ip("10.0.0.1"))
    a = [PeerCipher(random.Random(7)).seal(key, b"data") for _ in range(2)]
    assert a[0] == a[1]


def test_key_cache_is_bounded() -> None:
    cipher = PeerCipher(random.Random(4), cache_size=4)
    keys = [peer_key("pw", bytes([10, 0, 0, i])) for i in range(10)]
    for k in keys:
        assert cipher.open(k, cipher.seal(k, b"m")) == b"m"
    assert len(cipher._aeads) == 4
    assert cipher.open(keys[0], cipher.seal(keys[0], b"again")) == b"again"


def test_replay_window_detects_repeats() -> None:
    window = ReplayWindow(4)
    assert not window.seen(b"a" * 12)
    assert window.seen(b"a" * 12)
    assert not window.seen(b"b" * 12)
    assert window.seen(b"a" * 12)
    assert window.seen(b"b" * 12)


def test_replay_window_forgets_past_its_size() -> None:
    window = ReplayWindow(3)
    ivs = [bytes([i]) * 12 for i in range(5)]
    for iv in ivs[:3]:
        assert not window.seen(iv)
    assert not window.seen(ivs[3])  # evicts ivs[0]
    assert not window.seen(ivs[0])  # forgotten, recorded again (evicts ivs[1])
    assert window.seen(ivs[2]) and window.seen(ivs[3]) and window.seen(ivs[0])
    assert not window.seen(ivs[1])
    assert len(window._seen) == 3


def test_replay_window_rejects_bad_size() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(0)
