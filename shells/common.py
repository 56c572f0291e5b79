"""What every runtime shell shares for real I/O: clocks, randomness, TLS and event logging."""

from __future__ import annotations

import dataclasses
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from candy_core import (
    AddressAssigned,
    AddressChanged,
    ClientAuthenticated,
    ClientConfig,
    ClientDisconnected,
    ClientEvent,
    Connected,
    Disconnected,
    PeerStateChanged,
    PingReply,
    Reconnecting,
    RoutesChanged,
)

if TYPE_CHECKING:
    from shells.settings import DaemonSettings

log = logging.getLogger("candy")

#: Monotonic seconds for the cores' timers.
monotonic = time.monotonic
#: Unix seconds for handshake timestamps.
wall = time.time
#: Longest a client waits for the server's TCP (and TLS) connection, on every runtime.
CONNECT_TIMEOUT = 10.0
#: Connections the kernel may hold for a relay until it accepts them (the system caps it at
#: net.core.somaxconn). When this accept queue is full the kernel drops new SYNs, an honest
#: client's too, and that client retries only after 1 s, then 3 s: asyncio's default of 100
#: fills in 50 ms of a 2000/s connection flood whenever the relay is busy or descheduled.
LISTEN_BACKLOG = 4096

#: ``getaddrinfo(host, port, family, type)``: the stdlib's, or a runtime's own (gevent's
#: cooperative one), so that resolving a name never blocks the runtime.
Resolver = Callable[..., list[tuple[Any, ...]]]


class LogEvery:
    """Logs a recurring condition at most once per ``interval`` seconds, with a count.

    ``note(text)`` counts one occurrence; it writes ``text`` and how many occurrences the
    line stands for only if ``interval`` seconds passed since its last line, so a condition
    that repeats thousands of times a second (an ``accept`` failing for want of file
    descriptors) costs one line a second. Not thread-safe: one caller at a time.
    """

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.WARNING,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self.clock = clock
        #: Occurrences since the last line written.
        self.count = 0
        self._last = float("-inf")

    def note(self, text: str) -> bool:
        """Count one occurrence; returns whether a line was written for it."""
        self.count += 1
        now = self.clock()
        if now - self._last < self.interval:
            return False
        self.logger.log(self.level, "%s (%d time(s) since the last report)", text, self.count)
        self.count = 0
        self._last = now
        return True


class AcceptBackoff:
    """How an accept loop waits while ``accept`` fails (out of file descriptors, say).

    The kernel keeps new connections in the listen backlog meanwhile. :meth:`failed` logs
    (one line a second at most, :class:`LogEvery`) and returns how long to leave the
    listener alone: FIRST seconds, doubling up to MOST; :meth:`succeeded` starts over.
    """

    FIRST = 0.1
    MOST = 1.0

    def __init__(self, logger: logging.Logger, what: str = "connections") -> None:
        self.what = what
        self.delay = 0.0
        self._log = LogEvery(logger)

    def failed(self, exc: OSError) -> float:
        """One failed ``accept``: log it (rarely) and return the seconds to wait."""
        self.delay = min(self.MOST, self.delay * 2 or self.FIRST)
        self._log.note(
            f"cannot accept {self.what}: {exc}; new ones wait in the backlog, "
            f"next try in {self.delay:g} s"
        )
        return self.delay

    def succeeded(self) -> None:
        self.delay = 0.0


def system_rng() -> random.Random:
    """The randomness handed to cores in production (os.urandom underneath)."""
    return random.SystemRandom()


# The contexts are made of ``ssl_module.SSLContext`` rather than by its create_default_context:
# gevent.ssl's is the stdlib function itself, which returns a stdlib context whose sockets
# block the whole hub (no monkey-patching here). Settings as create_default_context's.
def server_ssl_context(cert: str, key: str, ssl_module: ModuleType = ssl) -> ssl.SSLContext:
    """TLS context for a ``wss://`` listener (``ssl_module``: ``gevent.ssl`` for gevent)."""
    ctx = ssl_module.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def client_ssl_context(
    verify: bool = True, ca_file: str | None = None, ssl_module: ModuleType = ssl
) -> ssl.SSLContext:
    """TLS context for a ``wss://`` client: verifies certificate and host name by default."""
    ctx = ssl_module.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    else:
        ctx.load_default_certs()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def describe(event: object) -> str:
    """A one-line, human readable form of a core event."""
    match event:
        case ClientAuthenticated(cid, ip):
            return f"client {cid} authenticated as {ip}"
        case AddressAssigned(cid, address):
            return f"assigned {address} to client {cid}"
        case ClientDisconnected(cid, ip, reason):
            return f"client {cid}{f' ({ip})' if ip else ''} disconnected: {reason}"
        case Connected(address):
            return f"joined the network as {address}"
        case AddressChanged(address):
            return f"virtual address is {address}"
        case Disconnected(reason):
            return f"disconnected from the server: {reason}"
        case Reconnecting(delay, attempt):
            return f"reconnecting in {delay:.1f} s (attempt {attempt})"
        case PeerStateChanged(ip, old, new, reason):
            return f"peer {ip}: {old} -> {new} ({reason})"
        case RoutesChanged(routes):
            return "subnet routes: " + (", ".join(map(str, routes)) or "none")
        case PingReply(ip, seq, rtt_ms, path, endpoint):
            where = f" {endpoint}" if endpoint else ""
            return f"ping reply from {ip} (seq {seq}) via {path}{where} in {rtt_ms} ms"
    return repr(event)


def resolve_ipv4(host: str, port: int, getaddrinfo: Resolver | None = None) -> str:
    """The first IPv4 address of ``host`` (used once at start-up; default: stdlib resolver)."""
    resolve = getaddrinfo or socket.getaddrinfo
    infos = resolve(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    return str(infos[0][4][0])


def detect_lan_address(
    server_host: str, server_port: int, getaddrinfo: Resolver | None = None
) -> str | None:
    """The local IPv4 address of the route towards the server (no packet is sent)."""
    try:
        ip = resolve_ipv4(server_host, server_port, getaddrinfo)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((ip, server_port or 80))
            local = str(probe.getsockname()[0])
    except OSError:
        return None
    return None if local.startswith("127.") or local == "0.0.0.0" else local


def client_config_for_run(
    config: ClientConfig,
    stun_host: str | None,
    stun_port: int | None,
    getaddrinfo: Resolver | None = None,
) -> ClientConfig:
    """Resolve what the core needs as addresses: the STUN server and our LAN address."""
    changes: dict[str, Any] = {}
    if stun_host:
        port = stun_port or 3478
        try:
            changes["stun"] = (resolve_ipv4(stun_host, port, getaddrinfo), port)
        except OSError as exc:
            log.warning("cannot resolve STUN server %s (peer-to-peer disabled): %s", stun_host, exc)
    if not config.hostname:  # for the keep-alive ping payload (6.x form)
        changes["hostname"] = socket.gethostname()
    if (changes.get("stun") or config.stun) and not config.localhost:
        lan = detect_lan_address(config.host, config.port, getaddrinfo)
        if lan:
            changes["localhost"] = lan
    return dataclasses.replace(config, **changes) if changes else config


class Flag(Protocol):
    """An event flag of some runtime (``asyncio.Event``, ``threading.Event``, gevent's)."""

    def set(self) -> None: ...

    def clear(self) -> None: ...


def track_joined(
    joined: Callable[[], bool], flag: Flag, user: Callable[[ClientEvent], None] | None
) -> Callable[[ClientEvent], None]:
    """A client's event handler: keeps ``flag`` set while ``joined()``, then calls ``user``.

    ``joined`` is the pump's view (updated before the handler runs); a shell's
    ``wait_connected()`` waits on ``flag``.
    """

    def handler(event: ClientEvent) -> None:
        if joined():
            flag.set()
        else:
            flag.clear()
        if user is not None:
            user(event)

    return handler


def server_kwargs(settings: DaemonSettings, ssl_module: ModuleType = ssl) -> dict[str, Any]:
    """Listening address and TLS context of the daemon's server, for any runtime's Server."""
    ctx = None
    if settings.ws_scheme == "wss":
        ctx = server_ssl_context(str(settings.tls_cert), str(settings.tls_key), ssl_module)
    return {
        "host": settings.ws_host,
        "port": settings.ws_port,
        "ssl_context": ctx,
        "networks": settings.networks,
    }


def client_kwargs(settings: DaemonSettings, ssl_module: ModuleType = ssl) -> dict[str, Any]:
    """Everything but the config for the daemon's client, for any runtime's Client."""
    ctx = None
    if settings.ws_scheme == "wss":
        ca = str(settings.tls_ca) if settings.tls_ca else None
        ctx = client_ssl_context(settings.tls_verify, ca, ssl_module)
    return {
        "ssl_context": ctx,
        "tun": True,
        "state_dir": str(settings.state_dir),
        "udp_port": settings.udp_port,
        "stun_host": settings.stun_host,
        "stun_port": settings.stun_port,
    }
