"""The control socket on a blocking runtime: an accept worker and one worker per connection.

Workers are the kit's (OS threads, or greenlets for gevent); every socket call has a timeout,
so a silent control client is closed after the idle timeout and one that does not read its
answers after :data:`~shells.control.WRITE_TIMEOUT`. A worker takes the node's lock only
inside ``status()`` (a snapshot), never while reading or writing the control socket.
Requests are parsed and answered by :class:`shells.control.Commands`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from shells.blocking.loop import POLL, Kit
from shells.common import AcceptBackoff
from shells.control import (
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    WRITE_TIMEOUT,
    Commands,
    Lines,
    LineTooLong,
    encode,
    error,
    open_default_or_skip,
    open_socket,
    refusal,
    remove_socket,
    socket_identity,
)

log = logging.getLogger("candy.blocking")

READ_SIZE = 4096


class ControlServer:
    """Serves :class:`Commands` on the Unix socket ``path`` with the workers of ``kit``.

    :meth:`open` checks and binds the path (raises
    :class:`~shells.control.ControlSocketError`); :meth:`start` (which opens if needed)
    begins answering; :meth:`stop` closes every connection and removes the socket file.
    """

    def __init__(
        self,
        kit: Kit,
        path: Path,
        commands: Commands,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.kit = kit
        self.path = path
        self.commands = commands
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.stopping = False
        self._listener: Any = None
        self._identity: tuple[int, int] | None = None
        self._lock = kit.lock()
        self._connections: set[Any] = set()
        self._workers: list[Any] = []
        self._backoff = AcceptBackoff(log, "control connections")

    def open(self) -> None:
        """Check the path and bind the socket (connections wait until :meth:`start`)."""
        if self._listener is None:
            self._listener = open_socket(self.path, self.kit.socket)
            self._identity = socket_identity(self.path)
            self._listener.settimeout(POLL)

    def start(self) -> None:
        """Answer requests from now on."""
        self.open()
        self._spawn(self._accept)
        log.info("control socket %s", self.path)

    def stop(self) -> None:
        """Stop listening, close every control connection, wait for the workers."""
        self.stopping = True
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(self.kit.socket.SHUT_RDWR)
        end = time.monotonic() + 3.0
        for worker in self._workers:
            worker.join(max(0.0, end - time.monotonic()))
        self._workers.clear()
        remove_socket(self.path, self._identity)
        self._identity = None

    def _spawn(self, fn: Any, *args: object) -> None:
        workers = self._workers
        if len(workers) % 32 == 31:  # forget finished workers now and then: bounded memory
            workers[:] = [w for w in workers if self.kit.alive(w)]
        workers.append(self.kit.spawn(fn, *args))

    def _accept(self) -> None:
        timeout_error = self.kit.socket.timeout
        while not self.stopping:
            listener = self._listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except timeout_error:
                continue
            except OSError as exc:  # out of file descriptors, say: back off, log rarely
                if self.stopping:
                    return
                self.kit.sleep(self._backoff.failed(exc))
                continue
            self._backoff.succeeded()
            with self._lock:
                admitted = len(self._connections) < self.max_connections
                if admitted:
                    self._connections.add(conn)
            if admitted:
                self._spawn(self._serve, conn)
            else:
                _refuse(conn)

    def _serve(self, conn: Any) -> None:
        try:
            self._requests(conn)
        except OSError:
            pass  # gone, or not reading its answers: just close
        except Exception:
            log.exception("control connection failed")
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _requests(self, conn: Any) -> None:
        timeout_error = self.kit.socket.timeout
        lines = Lines()
        conn.settimeout(POLL)  # bounded waits: stop() is noticed promptly
        idle_since = time.monotonic()
        while not self.stopping:
            try:
                data = conn.recv(READ_SIZE)
            except timeout_error:
                if time.monotonic() - idle_since >= self.idle_timeout:
                    return
                continue
            if not data:
                return
            try:
                batch = lines.feed(data)
            except LineTooLong as exc:
                _send(conn, encode(error(str(exc))), POLL)
                return
            for line in batch:
                if line.strip():
                    response = self.commands.answer(line)
                    assert isinstance(response, dict)  # blocking pings answer directly
                    _send(conn, encode(response), POLL)
            idle_since = time.monotonic()


def _send(conn: Any, data: bytes, poll: float) -> None:
    conn.settimeout(WRITE_TIMEOUT)  # sendall's timeout bounds the whole write
    conn.sendall(data)
    conn.settimeout(poll)


def _refuse(conn: Any) -> None:
    """One error line (a fresh socket's buffer takes it without waiting), then close."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(refusal())
    conn.close()


class Node(Protocol):
    """A started-and-stopped blocking Server or Client with a status document."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class Controlled:
    """A daemon's node with its control socket (``path`` None: none).

    The socket is bound before the node starts, so a second daemon on the same path refuses
    to start before touching anything; it answers once the node runs.
    """

    def __init__(self, kit: Kit, node: Node, path: Path | None, required: bool = True) -> None:
        self.required = required  # False for the default path: skipped if it cannot be made
        self.node = node
        self.control = ControlServer(kit, path, Commands.of(node)) if path is not None else None

    def status(self) -> dict[str, Any]:
        """The node's status document (so that other wrappers can be stacked on this one)."""
        return self.node.status()

    def start(self) -> None:
        if self.control is not None and not open_default_or_skip(self.control.open, self.required):
            self.control = None
        self.node.start()
        if self.control is not None:
            self.control.start()

    def stop(self) -> None:
        try:
            if self.control is not None:
                self.control.stop()
        finally:
            self.node.stop()
