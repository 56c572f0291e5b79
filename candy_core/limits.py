"""Bounds on what one remote address can make a relay do before it has authenticated.

A flood of connections or handshakes from one source must not crowd out honest clients
(WireGuard bounds handshake initiations the same way). Three bounds, all O(1) per event:

- unauthenticated connections in total and per source address;
- a token bucket of new connections per source address;
- a failed handshake (wrong password, clock skew, replay, malformed, timeout) costs the
  source extra tokens, so guessing slows itself down.

Loopback sources are exempt from the per-source bounds (not from the total): a local process
is already on the machine, and a TLS proxy in front of the relay makes every client loopback.
Memory is bounded: at most ``max_sources`` buckets are kept, the least recently used go first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """The numbers; the defaults leave honest traffic (even thousands of clients) untouched."""

    #: Connections not yet authenticated, in total and from one source address.
    max_pending: int = 4096
    max_pending_per_source: int = 256
    #: New connections per second from one source, and the burst allowed above that rate.
    connect_rate: float = 64.0
    connect_burst: float = 256.0
    #: Tokens a failed handshake costs its source on top of its connection.
    failure_cost: float = 16.0
    #: Sources remembered at most (least recently used forgotten first).
    max_sources: int = 65536


def source_of(peer: str) -> str:
    """The address part of a ``host:port`` label (``[v6]:port`` and bare hosts too)."""
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        return peer
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(source: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (IPv4-mapped too)."""
    return source.startswith(("127.", "::ffff:127.")) or source == "::1"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    pending: int = 0


class SourceLimiter:
    """Decides whether a new connection from a source is admitted; tracks its pending ones."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.pending = 0
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, source: str, now: float) -> str | None:
        """Count a new connection from ``source``; the reason it is refused, or ``None``."""
        lim = self.limits
        if self.pending >= lim.max_pending:
            return f"{self.pending} connections are already waiting to authenticate"
        if is_loopback(source):
            self.pending += 1
            return None
        bucket = self._bucket(source, now)
        if bucket.pending >= lim.max_pending_per_source:
            return f"{bucket.pending} connections from {source} are already waiting"
        if bucket.tokens < 1.0:
            return f"too many connections from {source} (over {lim.connect_rate:g}/s)"
        bucket.tokens -= 1.0
        bucket.pending += 1
        self.pending += 1
        return None

    def settled(self, source: str, failed: bool, now: float) -> None:
        """A pending connection from ``source`` authenticated or ended; ``failed`` costs more."""
        self.pending = max(0, self.pending - 1)
        if is_loopback(source):
            return
        bucket = self._buckets.get(source)
        if bucket is None:
            if not failed:
                return
            bucket = self._bucket(source, now)
        bucket.pending = max(0, bucket.pending - 1)
        if failed:
            self._refill(bucket, now)
            floor = -4 * self.limits.connect_burst  # a penalty, not a ban: bounded
            bucket.tokens = max(floor, bucket.tokens - self.limits.failure_cost)

    def _bucket(self, source: str, now: float) -> _Bucket:
        buckets = self._buckets
        bucket = buckets.get(source)
        if bucket is None:
            bucket = buckets[source] = _Bucket(self.limits.connect_burst, now)
            while len(buckets) > self.limits.max_sources:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(source)
            self._refill(bucket, now)
        return bucket

    def _refill(self, bucket: _Bucket, now: float) -> None:
        lim = self.limits
        elapsed = now - bucket.stamp
        if elapsed > 0:  # times from the caller may lag slightly; never refill twice
            bucket.stamp = now
            bucket.tokens = min(lim.connect_burst, bucket.tokens + elapsed * lim.connect_rate)
