"""gevent runtime: greenlets and cooperative sockets, for programs already on gevent.

``Server`` and ``Client`` spawn greenlets with ``start()`` and end them with ``stop()``;
every call yields to the hub instead of blocking it (constructing one does no I/O; the
client resolves names in ``start()`` with gevent's cooperative resolver). No
monkey-patching is needed.
"""

from __future__ import annotations

import gevent
import gevent.event
import gevent.lock
import gevent.queue
import gevent.socket
import gevent.ssl

from shells.blocking import BlockingClient, BlockingServer, Kit


def _wait_readable(fd: int, timeout: float) -> bool:
    try:
        gevent.socket.wait_read(fd, timeout)
    except gevent.socket.timeout:
        return False
    return True


KIT = Kit(
    name="gevent",
    spawn=gevent.spawn,
    lock=gevent.lock.RLock,
    event=gevent.event.Event,
    queue=gevent.queue.Queue,
    socket=gevent.socket,
    ssl=gevent.ssl,
    wait_readable=_wait_readable,
    alive=lambda greenlet: not greenlet.dead,
    direct_send=False,
    sleep=gevent.sleep,
)


class Server(BlockingServer):
    """Relay server on greenlets."""

    kit = KIT


class Client(BlockingClient):
    """Client on greenlets."""

    kit = KIT


__all__ = ["KIT", "Client", "Server"]
