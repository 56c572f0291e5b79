"""The blocking relay server: an accept loop, a reader and a writer per connection, one timer."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from candy_core import Network, ServerConfig, ServerEvent, make_relay
from shells.blocking.loop import POLL, Kit, Loop, log, recv_loop
from shells.blocking.tls import shareable
from shells.blocking.writer import SEND_TIMEOUT, Writer
from shells.common import LISTEN_BACKLOG, AcceptBackoff, system_rng
from shells.operate import server_document, server_url
from shells.pump import ServerPump


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
        on_event: Callable[[ServerEvent], None] | None = None,
        networks: Sequence[Network] = (),
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.core = make_relay(config, system_rng(), networks)
        self._ssl = ssl_context
        self._writers: dict[Hashable, Writer] = {}
        #: Connections the core was told about whose worker has not taken them over yet.
        self._accepted: dict[Hashable, Any] = {}
        self._ids = itertools.count(1)
        self._pump = ServerPump(self.core, self._write, self._close, on_event)
        self._loop = Loop(self.kit, self.core.handle_timer, self._pump.flush)
        self._listener: Any = None
        self._stopped = self.kit.event()  # wakes the accept loop from its back-off
        self._backoff = AcceptBackoff(log)
        self._started = time.time()

    def status(self) -> dict[str, Any]:
        """The ``candy status --server`` document."""
        listen = server_url(self._ssl is not None, self.host, self.port)
        with self._loop.lock:
            snapshot = self.core.status(time.monotonic(), time.time())
        return server_document(snapshot, self.kit.name, listen, self._started)

    def start(self) -> None:
        """Listen and serve in the background; :attr:`port` is the real port afterwards."""
        sock_mod = self.kit.socket
        listener = sock_mod.socket(sock_mod.AF_INET, sock_mod.SOCK_STREAM)
        listener.setsockopt(sock_mod.SOL_SOCKET, sock_mod.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(LISTEN_BACKLOG)
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
        """Accept connections; the core admits or refuses each one before any worker starts.

        A connection the per-source limits refuse (a flood) costs an accept and a close, not
        a worker, a writer and a TLS handshake, so the accept queue keeps draining faster
        than a flood fills it. The loop yields after every connection: a gevent accept never
        switches while connections are waiting, which would starve every other greenlet.

        While ``accept`` fails (out of file descriptors) it backs off, 0.1 s doubling to 1 s,
        and logs one line a second at most; the kernel keeps new connections in the listen
        backlog meanwhile, and the lock is not held, so joined clients are served.
        """
        kit = self.kit
        timeout_error = kit.socket.timeout
        loop = self._loop
        while not loop.stopping:
            try:
                sock, peer = self._listener.accept()
            except timeout_error:
                continue
            except ConnectionAbortedError:
                continue  # that one connection is gone; the next may be fine
            except OSError as exc:
                if loop.stopping:
                    return
                self._stopped.wait(self._backoff.failed(exc))
                continue
            self._backoff.succeeded()
            cid = next(self._ids)
            label = f"{peer[0]}:{peer[1]}"
            with loop.lock:
                self._accepted[cid] = sock
                try:
                    self.core.connection_made(cid, time.monotonic(), label)
                    loop.flushed()
                except Exception:  # a bug must cost this connection, never the accept loop
                    self._pump.guard.failed(f"a new connection from {label}; closing it")
                    self._accepted.pop(cid, None)
                admitted = cid in self._accepted  # a refusal closed it during the flush
            if admitted:
                loop.spawn(self._serve, sock, cid, label)
            else:
                sock.close()
            kit.sleep(0)

    def _serve(self, sock: Any, cid: int, peer: str) -> None:
        loop = self._loop
        sock.setsockopt(self.kit.socket.IPPROTO_TCP, self.kit.socket.TCP_NODELAY, 1)
        sock.settimeout(SEND_TIMEOUT)
        if self._ssl is not None:
            try:
                sock = self._ssl.wrap_socket(sock, server_side=True)
                # OS threads read and write it at once: one OpenSSL call at a time.
                sock = shareable(sock, self.kit.threads, SEND_TIMEOUT)
            except (OSError, ValueError) as exc:
                with loop.lock:
                    if self._accepted.pop(cid, None) is not None:
                        log.info("%s: TLS handshake failed: %s", peer, exc)
                        self.core.connection_lost(cid, f"TLS handshake failed: {exc}")
                        loop.flushed()
                sock.close()
                return
        writer = Writer(
            loop, sock, lambda: self.core.pause_writing(cid), lambda: self.core.resume_writing(cid)
        )
        with loop.lock:
            if self._accepted.pop(cid, None) is None:  # the core closed it meanwhile
                sock.close()
                return
            self._writers[cid] = writer
            if not writer.direct:
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
        else:  # accepted, no worker yet: _accept or _serve closes the socket
            self._accepted.pop(cid, None)
