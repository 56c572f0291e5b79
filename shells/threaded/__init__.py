"""Threaded runtime: plain OS threads and blocking sockets, no event loop.

``Server`` and ``Client`` start background threads with ``start()`` and end them with
``stop()`` (or use them as context managers); constructing one does no I/O.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable

from shells.blocking import BlockingClient, BlockingServer, Kit


def _spawn(fn: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=fn, args=args, daemon=True, name=f"candy-{fn.__name__}")
    thread.start()
    return thread


def _wait_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()  # not select(): a busy server's descriptors pass FD_SETSIZE (1024)
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000.0))


KIT = Kit(
    name="threaded",
    spawn=_spawn,
    lock=threading.RLock,
    event=threading.Event,
    queue=queue.SimpleQueue,
    socket=socket,
    ssl=ssl,
    wait_readable=_wait_readable,
    alive=threading.Thread.is_alive,
    direct_send=True,
    sleep=time.sleep,
    wait_before_recv=True,
    threads=True,
)


class Server(BlockingServer):
    """Relay server on OS threads."""

    kit = KIT


class Client(BlockingClient):
    """Client on OS threads."""

    kit = KIT


__all__ = ["KIT", "Client", "Server"]
