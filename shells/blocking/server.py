"""The blocking relay server: an accept loop, a reader and a writer per connection, one timer."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Hashable
from typing import Any

from candy_core.config import ServerConfig
from candy_core.server import RelayServer
from shells.blocking.loop import POLL, Kit, Loop, log, recv_loop
from shells.blocking.writer import SEND_TIMEOUT, Writer
from shells.common import LogEvery, system_rng
from shells.pump import ServerPump

#: Back-off of the accept loop while ``accept`` fails (out of descriptors): doubles up to MAX.
ACCEPT_BACKOFF = 0.1
ACCEPT_BACKOFF_MAX = 1.0


class BlockingServer:
    """A relay server: accept loop, a reader and a writer per connection, one timer.

    A runtime subclasses it with its :class:`Kit`; constructing one does no I/O.
    """

    kit: Kit

    def __init__(
        self,
        config: ServerConfig,
        host: str = "0.0.0.0",
        port: int = 80,
        ssl_context: Any = None,
        on_event: Callable[[object], None] | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.core = RelayServer(config, system_rng())
        self._ssl = ssl_context
        self._writers: dict[Hashable, Writer] = {}
        self._ids = itertools.count(1)
        self._pump = ServerPump(self.core, self._write, self._close, on_event)
        self._loop = Loop(self.kit, self.core.handle_timer, self._pump.flush)
        self._listener: Any = None
        self._stopped = self.kit.event()  # wakes the accept loop from its back-off
        self._accept_errors = LogEvery(log)

    def start(self) -> None:
        """Listen and serve in the background; :attr:`port` is the real port afterwards."""
        sock_mod = self.kit.socket
        listener = sock_mod.socket(sock_mod.AF_INET, sock_mod.SOCK_STREAM)
        listener.setsockopt(sock_mod.SOL_SOCKET, sock_mod.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(512)
        listener.settimeout(POLL)
        self._listener = listener
        self.port = listener.getsockname()[1]
        scheme = "wss" if self._ssl else "ws"
        log.info("relay listening on %s://%s:%d (%s)", scheme, self.host, self.port, self.kit.name)
        self._loop.spawn(self._loop.timer)
        self._loop.spawn(self._accept)

    def stop(self) -> None:
        """Stop listening, close every connection and wait for the workers."""
        loop = self._loop
        loop.stopping = True
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()
        with loop.lock:
            for writer in list(self._writers.values()):
                with contextlib.suppress(OSError):
                    writer.sock.shutdown(self.kit.socket.SHUT_RDWR)
                writer.close()
        loop.join()

    def __enter__(self) -> BlockingServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        """Accept connections; while ``accept`` fails, back off (never spin) and log rarely.

        Out of file descriptors, the kernel keeps new connections in the listen backlog
        until ours close; the lock is not held meanwhile, so joined clients are served.
        """
        timeout_error = self.kit.socket.timeout
        backoff = 0.0
        while not self._loop.stopping:
            try:
                sock, peer = self._listener.accept()
            except timeout_error:
                continue
            except ConnectionAbortedError:
                continue  # that one connection is gone; the next may be fine
            except OSError as exc:
                if self._loop.stopping:
                    return
                backoff = min(ACCEPT_BACKOFF_MAX, backoff * 2 or ACCEPT_BACKOFF)
                self._accept_errors.note(
                    f"cannot accept connections: {exc}; new ones wait in the "
                    f"backlog, next try in {backoff:g} s"
                )
                self._stopped.wait(backoff)
                continue
            backoff = 0.0
            self._loop.spawn(self._serve, sock, f"{peer[0]}:{peer[1]}")

    def _serve(self, sock: Any, peer: str) -> None:
        try:
            sock.setsockopt(self.kit.socket.IPPROTO_TCP, self.kit.socket.TCP_NODELAY, 1)
            sock.settimeout(SEND_TIMEOUT)
        except OSError:  # reset before we got to it
            sock.close()
            return
        if self._ssl is not None:
            try:
                sock = self._ssl.wrap_socket(sock, server_side=True)
            except (OSError, ValueError) as exc:
                log.info("%s: TLS handshake failed: %s", peer, exc)
                sock.close()
                return
        cid = next(self._ids)
        loop = self._loop
        writer = Writer(
            loop, sock, lambda: self.core.pause_writing(cid), lambda: self.core.resume_writing(cid)
        )
        with loop.lock:
            self._writers[cid] = writer
            self.core.connection_made(cid, time.monotonic(), peer)
            loop.flushed()
        if not writer.direct:
            with loop.lock:
                writer.start()

        def on_data(data: bytes) -> None:
            try:
                self.core.receive_data(cid, data, time.monotonic(), time.time())
            except Exception:
                self._pump.guard.failed(f"bytes from connection {cid}; closing it")
                self.core.connection_lost(cid, "internal error")
                self._close(cid)

        reason = recv_loop(loop, sock, on_data)
        with loop.lock:
            self.core.connection_lost(cid, reason)
            loop.flushed()
            self._close(cid)
        writer.finish()

    def _write(self, cid: Hashable, data: bytes) -> None:
        writer = self._writers.get(cid)
        if writer is not None:
            writer.write(data)

    def _close(self, cid: Hashable) -> None:
        writer = self._writers.pop(cid, None)
        if writer is not None:
            writer.close()
