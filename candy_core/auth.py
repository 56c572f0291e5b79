"""Handshake hashes, the clock window and the replay window (PROTOCOL.md 2.1, 2.3, 2.5)."""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import deque

_TS = struct.Struct(">q")


def auth_hash(password: str, ip: bytes, timestamp: int) -> bytes:
    """SHA-256(password || ip(4) || timestamp(8, big-endian))."""
    return hashlib.sha256(password.encode() + ip + _TS.pack(timestamp)).digest()


def expected_hash(password: str, timestamp: int) -> bytes:
    """SHA-256(password || timestamp(8)); 5.6 does not hash the address."""
    return hashlib.sha256(password.encode() + _TS.pack(timestamp)).digest()


def vmac_hash(password: str, vmac: bytes, timestamp: int) -> bytes:
    """SHA-256(password || vmac(16) || timestamp(8))."""
    return hashlib.sha256(password.encode() + vmac + _TS.pack(timestamp)).digest()


def digest_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of two digests."""
    return hmac.compare_digest(a, b)


def within_window(timestamp: int, wall: float, window: int = 30) -> bool:
    """Whether ``timestamp`` is at most ``window`` seconds away from the wall clock."""
    return abs(timestamp - int(wall)) <= window


class ReplayGuard:
    """Remembers accepted handshake messages while their timestamp is inside the window.

    A message seen again before its timestamp leaves the window is a replay. Entries expire
    with their timestamp, and the table never holds more than ``capacity`` entries (the
    oldest timestamps go first, in arrival order within one second), so memory stays
    bounded however many handshakes arrive.

    Keys are kept in one set and one queue per timestamp (a key is a message's hash, which
    covers its timestamp): a whole second expires at once, and an entry costs about 130
    bytes, the key included (an ordered dict of key -> timestamp took about 200).
    """

    def __init__(self, window: int = 30, capacity: int = 65536) -> None:
        self.window = window
        self.capacity = capacity
        self._seconds: dict[int, tuple[set[bytes], deque[bytes]]] = {}
        self._count = 0
        self._oldest: int | None = None

    def __len__(self) -> int:
        return self._count

    def check_and_remember(self, key: bytes, timestamp: int, wall: float) -> bool:
        """Return ``False`` for a replay, else remember ``key`` and return ``True``."""
        self._expire(wall)
        second = self._seconds.get(timestamp)
        if second is None:
            second = self._seconds[timestamp] = (set(), deque())
            if self._oldest is None or timestamp < self._oldest:
                self._oldest = timestamp
        elif key in second[0]:
            return False
        second[0].add(key)
        second[1].append(key)
        self._count += 1
        while self._count > self.capacity:
            self._evict_one()
        return True

    def _evict_one(self) -> None:
        oldest = self._oldest
        assert oldest is not None
        keys, order = self._seconds[oldest]
        keys.discard(order.popleft())
        self._count -= 1
        if not order:
            self._drop_second(oldest)

    def _expire(self, wall: float) -> None:
        limit = int(wall) - self.window
        while self._oldest is not None and self._oldest < limit:
            self._drop_second(self._oldest)

    def _drop_second(self, timestamp: int) -> None:
        keys, _ = self._seconds.pop(timestamp)
        self._count -= len(keys)
        self._oldest = min(self._seconds) if self._seconds else None
