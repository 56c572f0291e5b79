"""asyncio shell of the relay server: moves bytes between sockets and :class:`RelayServer`."""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

from candy_core import Network, ServerConfig, ServerEvent, make_relay
from shells.asyncio.accept import Acceptor
from shells.asyncio.timer import DeadlineTimer
from shells.common import LISTEN_BACKLOG, system_rng
from shells.operate import server_document, server_url
from shells.pump import ServerPump

log = logging.getLogger("candy.asyncio")

EventHandler = Callable[[ServerEvent], None]


class _Connection(asyncio.Protocol):
    """One accepted TCP (or TLS) connection; every byte goes straight to the core."""

    __slots__ = ("cid", "relay", "transport")

    def __init__(self, relay: Server, cid: int) -> None:
        self.relay = relay
        self.cid = cid
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # connect_accepted_socket() makes stream transports; the Protocol API names only the
        # base class.
        transport = cast(asyncio.Transport, transport)
        if self.relay._stopped:  # accepted just before stop(), set up just after
            transport.abort()
            return
        self.transport = transport
        peer = transport.get_extra_info("peername")
        label = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.relay._transports[self.cid] = transport
        self.relay.core.connection_made(self.cid, self.relay._loop.time(), label)
        self.relay._flush()

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        try:
            relay.core.receive_data(self.cid, data, relay._loop.time(), time.time())
        except Exception:  # a bug must cost only this connection, never the relay
            relay._pump.guard.failed(f"bytes from connection {self.cid}; closing it")
            relay.core.connection_lost(self.cid, "internal error")
            relay._transports.pop(self.cid, None)
            if self.transport is not None:
                self.transport.abort()
        relay._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        relay = self.relay
        relay._transports.pop(self.cid, None)
        reason = f"connection lost: {exc}" if exc else "connection closed by peer"
        relay.core.connection_lost(self.cid, reason)
        relay._flush()

    def pause_writing(self) -> None:
        self.relay.core.pause_writing(self.cid)

    def resume_writing(self) -> None:
        self.relay.core.resume_writing(self.cid)
        self.relay._flush()


class Server:
    """A relay server on the running asyncio loop.

    ::

        async with Server(ServerConfig.from_strings("secret", "10.0.0.0/24"), port=8080) as srv:
            await srv.serve_forever()

    It accepts connections itself (:mod:`shells.asyncio.accept`): out of file descriptors it
    backs off and logs one line a second, on asyncio and uvloop alike.
    """

    def __init__(
        self,
        config: ServerConfig,
        host: str = "0.0.0.0",
        port: int = 80,
        ssl_context: ssl.SSLContext | None = None,
        on_event: EventHandler | None = None,
        networks: Sequence[Network] = (),
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.core = make_relay(config, system_rng(), networks)
        self._ssl = ssl_context
        self._transports: dict[Hashable, asyncio.Transport] = {}
        self._pump = ServerPump(self.core, self._write, self._close, on_event)
        self._ids = itertools.count(1)
        self._acceptor: Acceptor | None = None
        self._closed: asyncio.Future[None] | None = None
        self._timer: DeadlineTimer | None = None
        self._loop: asyncio.AbstractEventLoop  # the running loop, bound in start()
        self._stopped = False
        self._started = time.time()

    async def start(self) -> None:
        """Start listening; :attr:`port` is the real port afterwards (useful with port 0)."""
        self._loop = asyncio.get_running_loop()
        self._timer = DeadlineTimer(self._loop, self._on_timer)
        self._closed = self._loop.create_future()
        acceptor = Acceptor(self._loop, lambda: _Connection(self, next(self._ids)), self._ssl, log)
        await acceptor.listen(self.host, self.port, LISTEN_BACKLOG)
        self._acceptor = acceptor
        self.port = acceptor.sockets[0].getsockname()[1]
        scheme = "wss" if self._ssl else "ws"
        log.info("relay listening on %s://%s:%d", scheme, self.host, self.port)

    def status(self) -> dict[str, Any]:
        """The ``candy status --server`` document (call it on the loop)."""
        listen = server_url(self._ssl is not None, self.host, self.port)
        snapshot = self.core.status(self._loop.time(), time.time())
        return server_document(snapshot, "asyncio", listen, self._started)

    async def serve_forever(self) -> None:
        """Serve until :meth:`stop` (or until cancelled)."""
        assert self._closed is not None, "call start() first"
        await asyncio.shield(self._closed)

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        for transport in list(self._transports.values()):
            transport.abort()
        self._transports.clear()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _flush(self) -> None:
        deadline = self._pump.flush()
        if self._stopped:
            return
        if self._timer is not None:
            self._timer.arm(deadline)

    def _write(self, cid: Hashable, data: bytes) -> None:
        transport = self._transports.get(cid)
        if transport is not None:
            transport.write(data)

    def _close(self, cid: Hashable) -> None:
        transport = self._transports.pop(cid, None)
        if transport is not None:
            transport.close()

    def _on_timer(self, now: float) -> None:
        self.core.handle_timer(now)
        self._flush()
