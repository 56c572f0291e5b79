"""The control socket on the asyncio loop: one task per connection, every wait bounded.

A control client that says nothing is closed after the idle timeout, one that does not read
its answers after :data:`~shells.control.WRITE_TIMEOUT`; neither ever blocks the loop, so the
data path keeps going. Requests are parsed and answered by :class:`shells.control.Commands`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from pathlib import Path
from typing import Any, Protocol

from shells.asyncio.accept import Acceptor
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

log = logging.getLogger("candy.asyncio")

READ_SIZE = 4096


class ControlServer:
    """Serves :class:`Commands` on the Unix socket ``path``.

    :meth:`open` checks and binds the path (raises
    :class:`~shells.control.ControlSocketError`); :meth:`start` (which opens if needed)
    begins answering; :meth:`stop` closes every connection and removes the socket file.
    """

    def __init__(
        self,
        path: Path,
        commands: Commands,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.path = path
        self.commands = commands
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._sock: Any = None
        self._identity: tuple[int, int] | None = None
        self._acceptor: Acceptor | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._stopping = False

    def open(self) -> None:
        """Check the path and bind the socket (connections wait until :meth:`start`)."""
        if self._sock is None:
            self._sock = open_socket(self.path)
            self._identity = socket_identity(self.path)

    async def start(self) -> None:
        """Answer requests from now on."""
        self.open()
        loop = asyncio.get_running_loop()

        def stream() -> asyncio.StreamReaderProtocol:  # what start_unix_server() would make
            return asyncio.StreamReaderProtocol(
                asyncio.StreamReader(loop=loop), self._serve, loop=loop
            )

        # Our own accept, not start_unix_server(): out of file descriptors it backs off and
        # logs one line a second (see shells.asyncio.accept).
        self._acceptor = Acceptor(loop, stream, None, log, "control connections")
        self._acceptor.adopt(self._sock)
        log.info("control socket %s", self.path)

    async def stop(self) -> None:
        """Stop listening, close every control connection, remove the socket file."""
        self._stopping = True
        if self._acceptor is not None:
            self._acceptor.close()  # closes the listening socket too
            self._acceptor = None
        elif self._sock is not None:
            self._sock.close()
        self._sock = None
        for task, writer in list(self._connections.items()):
            writer.transport.abort()
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        remove_socket(self.path, self._identity)
        self._identity = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections:
            writer.write(refusal())  # a fresh socket's buffer takes one line without waiting
            _close(writer)
            return
        self._connections[task] = writer
        try:
            await self._requests(reader, writer)
        except (OSError, TimeoutError, ConnectionError):
            pass  # gone, not reading, or silent: just close
        except asyncio.CancelledError:
            # stop() ends a connection waiting for a ping. (The stream protocol's callback
            # on Python 3.11 reports a cancelled task as an error: end normally instead.)
            if not self._stopping:
                raise
        finally:
            self._connections.pop(task, None)
            _close(writer)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines = Lines()
        while True:
            data = await asyncio.wait_for(reader.read(READ_SIZE), self.idle_timeout)
            if not data:
                return
            try:
                batch = lines.feed(data)
            except LineTooLong as exc:
                await self._send(writer, error(str(exc)))
                return
            for line in batch:
                if not line.strip():
                    continue
                response = self.commands.answer(line)
                if inspect.isawaitable(response):
                    response = await response
                await self._send(writer, response)

    async def _send(self, writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        writer.write(encode(response))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


def _close(writer: asyncio.StreamWriter) -> None:
    """Close after writing what is buffered; at once if the peer is not reading."""
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()


class Node(Protocol):
    """A started-and-stopped asyncio Server or Client with a status document."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class Controlled:
    """A daemon's node with its control socket (``path`` None: none).

    The socket is bound before the node starts, so a second daemon on the same path refuses
    to start before touching anything; it answers once the node runs.
    """

    def __init__(self, node: Node, path: Path | None, required: bool = True) -> None:
        self.required = required  # False for the default path: skipped if it cannot be made
        self.node = node
        self.control = ControlServer(path, Commands.of(node)) if path is not None else None

    def status(self) -> dict[str, Any]:
        """The node's status document (so that other wrappers can be stacked on this one)."""
        return self.node.status()

    async def start(self) -> None:
        if self.control is not None and not open_default_or_skip(self.control.open, self.required):
            self.control = None
        await self.node.start()
        if self.control is not None:
            await self.control.start()

    async def stop(self) -> None:
        try:
            if self.control is not None:
                await self.control.stop()
        finally:
            await self.node.stop()
