"""Listening sockets on the asyncio loop with an accept that backs off when it fails.

``loop.create_server`` is not used for the relay because neither event loop copes well with
running out of file descriptors:

- asyncio's selector loop (Python 3.11) reports every failed ``accept`` to the loop's
  exception handler with a traceback and, as it keeps trying after the first failure in a
  wake-up, schedules one retry per failure: the retries multiply, from a hundred failed
  accepts a second to thousands after ten seconds (CPython issue gh-151615).
- uvloop (0.23; libuv's "EMFILE trick") accepts the connections it has no descriptor for
  and closes them at once, logging nothing; on any other accept error it closes the
  listening socket for good, silently.

Here a failed ``accept`` removes the listener from the loop for a back-off (0.1 s doubling
to 1 s), logs one line a second at most, and the connections meanwhile wait in the kernel's
backlog: the same behaviour as the gevent and threaded servers, on both event loops.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from shells.common import LISTEN_BACKLOG, AcceptBackoff

#: Connections accepted per wake-up at most, so accepting never starves the loop.
ACCEPT_BATCH = 100


class Acceptor:
    """Hands every connection accepted on its sockets to ``protocol_factory``.

    :meth:`listen` binds ``host:port``; :meth:`adopt` takes a socket already listening.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol_factory: Callable[[], asyncio.Protocol],
        ssl_context: ssl.SSLContext | None,
        log: logging.Logger,
        what: str = "connections",
    ) -> None:
        self._loop = loop
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._log = log
        self._backoff = AcceptBackoff(log, what)
        self._retries: dict[socket.socket, asyncio.TimerHandle] = {}
        #: Connections being set up; the socket while no transport owns it yet.
        self._starting: dict[asyncio.Task[None], socket.socket | None] = {}
        self._closed = False
        self.sockets: list[socket.socket] = []

    async def listen(self, host: str | None, port: int, backlog: int = LISTEN_BACKLOG) -> None:
        """Bind every address ``host`` resolves to (as ``create_server`` does) and listen."""
        infos = await self._loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[int, object]] = set()
        try:
            for family, kind, proto, _name, address in infos:
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"error while attempting to bind on address {address!r}: {exc.strerror}",
                    ) from None
                sock.listen(backlog)
                sock.setblocking(False)
            if not self.sockets:
                raise OSError(f"no address to listen on for {host!r}")
        except BaseException:
            self.close()
            raise
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def adopt(self, sock: socket.socket) -> None:
        """Accept on ``sock``, a socket already bound and listening (a Unix socket, say)."""
        sock.setblocking(False)
        self.sockets.append(sock)
        self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop listening and abandon the connections still being set up."""
        self._closed = True
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for sock in self.sockets:
            if sock.fileno() != -1:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        for task, conn in list(self._starting.items()):
            task.cancel()
            if conn is not None:  # the task never ran: nothing else will close it
                conn.close()
        self._starting.clear()

    # --- accepting ------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # that one connection is gone; the next may be fine
            except OSError as exc:
                self._pause(listener, exc)
                return
            self._backoff.succeeded()
            try:
                conn.setblocking(False)
                if conn.family in (socket.AF_INET, socket.AF_INET6):
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # reset before we got to it
                conn.close()
                continue
            task = self._loop.create_task(self._connect(conn))
            self._starting[task] = conn
            task.add_done_callback(self._started)

    def _pause(self, listener: socket.socket, exc: OSError) -> None:
        """``accept`` failed (out of descriptors, say): leave the listener alone a while."""
        self._loop.remove_reader(listener.fileno())
        delay = self._backoff.failed(exc)
        self._retries[listener] = self._loop.call_later(delay, self._resume, listener)

    def _resume(self, listener: socket.socket) -> None:
        self._retries.pop(listener, None)
        if not self._closed:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    async def _connect(self, conn: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._starting[task] = None  # from here on the transport closes the socket
        await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl)

    def _started(self, task: asyncio.Task[None]) -> None:
        self._starting.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.debug("an accepted connection failed to start: %r", exc)
