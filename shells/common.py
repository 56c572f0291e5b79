"""What every runtime shell shares for real I/O: clocks, randomness, TLS and event logging."""

from __future__ import annotations

import logging
import random
import ssl
import time

from candy_core import events as ev

log = logging.getLogger("candy")

#: Monotonic seconds for the cores' timers.
monotonic = time.monotonic
#: Unix seconds for handshake timestamps.
wall = time.time


def system_rng() -> random.Random:
    """The randomness handed to cores in production (os.urandom underneath)."""
    return random.SystemRandom()


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS context for a ``wss://`` listener."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def client_ssl_context(verify: bool = True, ca_file: str | None = None) -> ssl.SSLContext:
    """TLS context for a ``wss://`` client: verifies certificate and host name by default."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def describe(event: object) -> str:
    """A one-line, human readable form of a core event."""
    match event:
        case ev.ClientAuthenticated(cid, ip):
            return f"client {cid} authenticated as {ip}"
        case ev.AddressAssigned(cid, address):
            return f"assigned {address} to client {cid}"
        case ev.ClientDisconnected(cid, ip, reason):
            return f"client {cid}{f' ({ip})' if ip else ''} disconnected: {reason}"
        case ev.Connected():
            return "connected to the server"
        case ev.AddressChanged(address):
            return f"virtual address is {address}"
        case ev.Disconnected(reason):
            return f"disconnected from the server: {reason}"
        case ev.Reconnecting(delay, attempt):
            return f"reconnecting in {delay:.1f} s (attempt {attempt})"
        case ev.PeerStateChanged(ip, old, new, reason):
            return f"peer {ip}: {old} -> {new} ({reason})"
    return repr(event)
