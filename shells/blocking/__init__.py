"""Server and client for runtimes with blocking calls: OS threads or gevent greenlets.

Both runtimes run the same code: one reader per socket, one writer per connection (so a
slow peer never blocks anyone else), a timer, and one lock around the core. What differs
(how to spawn, lock, wait, and which socket and ssl modules) comes in a :class:`Kit`.

``loop`` holds the kit and what a server and client share (lock, timer, flush, the reader's
loop), ``writer`` the per-socket writer, ``server`` and ``client`` the two shells, and
``daemon`` the lifecycle of ``candy --runtime gevent|threaded``.
"""

from shells.blocking.client import BlockingClient
from shells.blocking.loop import POLL, Kit
from shells.blocking.server import BlockingServer

__all__ = ["POLL", "BlockingClient", "BlockingServer", "Kit"]
