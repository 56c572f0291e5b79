"""Peer datagram crypto (PROTOCOL.md 4.2): key derivation, AES-256-GCM sealing, replay filter."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

IV_SIZE = 12
TAG_SIZE = 16
OVERHEAD = IV_SIZE + TAG_SIZE
#: IVs drawn from the random source per call.
IV_BATCH = 256
#: AESGCM objects kept (one per peer key in use).
CACHE_SIZE = 1024


class RandomSource(Protocol):
    """The part of :class:`random.Random` the core uses."""

    def randbytes(self, n: int) -> bytes: ...


def peer_key(password: str, virtual_ip: bytes) -> bytes:
    """K(X) = SHA-256(password || X's address as a little-endian uint32).

    ``virtual_ip`` is the 4-byte network-order address; its bytes are hashed reversed, as 5.6
    hashes the host-order ``uint32`` on little-endian machines.
    """
    if len(virtual_ip) != 4:
        raise ValueError(f"virtual_ip must be 4 bytes, got {len(virtual_ip)}")
    return hashlib.sha256(password.encode() + bytes(virtual_ip[::-1])).digest()


class PeerCipher:
    """Seals and opens peer datagrams ``iv:12 | tag:16 | ciphertext`` (AES-256-GCM, no AD).

    IVs are random (never a counter: many senders share one key), drawn from ``rng`` in
    batches. Not thread-safe; one instance belongs to one core.
    """

    def __init__(self, rng: RandomSource, cache_size: int = CACHE_SIZE) -> None:
        self._rng = rng
        self._cache_size = cache_size
        self._aeads: OrderedDict[bytes, AESGCM] = OrderedDict()
        self._ivs = b""
        self._iv_pos = 0

    def _aead(self, key: bytes) -> AESGCM:
        """Return the cached AESGCM for ``key`` (LRU)."""
        aeads = self._aeads
        aead = aeads.get(key)
        if aead is None:
            aead = aeads[key] = AESGCM(key)
            if len(aeads) > self._cache_size:
                aeads.popitem(last=False)
        else:
            aeads.move_to_end(key)
        return aead

    def _next_iv(self) -> bytes:
        """Take the next random IV from the batch, drawing a new batch when used up."""
        pos = self._iv_pos
        if pos >= len(self._ivs):
            self._ivs = self._rng.randbytes(IV_SIZE * IV_BATCH)
            pos = 0
        self._iv_pos = pos + IV_SIZE
        return self._ivs[pos : pos + IV_SIZE]

    def seal(self, key: bytes, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` for the peer whose key is ``key``."""
        iv = self._next_iv()
        sealed = self._aead(key).encrypt(iv, plaintext, None)  # ciphertext || tag
        return iv + sealed[-TAG_SIZE:] + sealed[:-TAG_SIZE]

    def open(self, key: bytes, datagram: bytes) -> bytes | None:
        """Decrypt a datagram sealed with ``key``; None if too short or not authentic."""
        if len(datagram) < OVERHEAD:
            return None
        try:
            return self._aead(key).decrypt(
                datagram[:IV_SIZE], datagram[OVERHEAD:] + datagram[IV_SIZE:OVERHEAD], None
            )
        except InvalidTag:
            return None


class RecentIvs:
    """IVs seen in the last ``retention`` seconds, at most ``capacity`` (oldest forgotten first).

    For low-rate messages whose replay matters long after the fact (heartbeats move a peer's
    endpoint): a count-bounded window would forget them within a second of bulk traffic.
    """

    def __init__(self, retention: float, capacity: int) -> None:
        if retention <= 0 or capacity < 1:
            raise ValueError(
                f"retention and capacity must be positive, got {retention}, {capacity}"
            )
        self.retention = retention
        self.capacity = capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, iv: bytes, now: float) -> bool:
        """True if ``iv`` was seen within the retention time; otherwise record it, False."""
        seen = self._seen
        limit = now - self.retention
        while seen:
            oldest, at = next(iter(seen.items()))
            if at >= limit:
                break
            del seen[oldest]
        if iv in seen:
            return True
        seen[iv] = now
        if len(seen) > self.capacity:
            seen.popitem(last=False)
        return False


class ReplayWindow:
    """Remembers the last ``size`` IVs; O(1) per check, bounded memory."""

    def __init__(self, size: int = 4096) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self._ring: list[bytes | None] = [None] * size
        self._pos = 0
        self._seen: set[bytes] = set()

    def seen(self, iv: bytes) -> bool:
        """True if ``iv`` is in the window (a replay); otherwise record it and return False."""
        if iv in self._seen:
            return True
        ring, pos = self._ring, self._pos
        old = ring[pos]
        if old is not None:
            self._seen.discard(old)
        ring[pos] = iv
        self._seen.add(iv)
        self._pos = (pos + 1) % len(ring)
        return False
