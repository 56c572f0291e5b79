"""Handshake hashes, the clock window and the replay window (PROTOCOL.md 2.1, 2.3, 2.5)."""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict

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
    oldest go first), so memory stays bounded however many handshakes arrive.
    """

    def __init__(self, window: int = 30, capacity: int = 65536) -> None:
        self.window = window
        self.capacity = capacity
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_remember(self, key: bytes, timestamp: int, wall: float) -> bool:
        """Return ``False`` for a replay, else remember ``key`` and return ``True``."""
        self._expire(wall)
        if key in self._seen:
            return False
        self._seen[key] = timestamp
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True

    def _expire(self, wall: float) -> None:
        # Entries are ordered by insertion, not timestamp; expire from the front while old,
        # and let capacity bound the rest (timestamps arrive roughly in order anyway).
        limit = int(wall) - self.window
        seen = self._seen
        while seen:
            key, ts = next(iter(seen.items()))
            if ts >= limit:
                break
            del seen[key]
