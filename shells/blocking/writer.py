"""The writer of one socket: a queue and a worker, with back-pressure reported to the core."""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable
from typing import Any

from shells.blocking.loop import Loop, log

#: Bytes queued for one socket before the core is told to hold frames back, and resume mark.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
#: Longest a blocked send may take before the connection is given up.
SEND_TIMEOUT = 30.0


class Writer:
    """Queue and worker writing to one socket; reports back-pressure to the core."""

    def __init__(
        self, loop: Loop, sock: Any, on_pause: Callable[[], None], on_resume: Callable[[], None]
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.queue = loop.kit.queue()
        self.pending = 0
        self.paused = False
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._done = loop.kit.event()
        self._started = False
        self._finished = False
        # With OS threads, a write to an idle socket goes out at once, without handing it to
        # the writer thread (a wake-up per write). A socket with a timeout is non-blocking at
        # the OS level, so a plain write(2) never waits; TLS needs its own framing.
        self._direct_fd = (
            sock.fileno()
            if loop.kit.direct_send
            and not isinstance(sock, ssl.SSLSocket)
            and not getattr(sock, "tls", False)
            and sock.gettimeout()
            else None
        )

    @property
    def direct(self) -> bool:
        """Whether writes go out from the caller (the worker starts only when needed)."""
        return self._direct_fd is not None

    def write(self, data: bytes) -> None:  # lock held
        if self._finished:
            return
        if self._direct_fd is not None and self.pending == 0:
            try:
                sent = os.write(self._direct_fd, data)
            except OSError:  # full, or broken: the writer thread finds out and closes
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.start()
        self.queue.put(data)
        self.pending += len(data)
        if not self.paused and self.pending > HIGH_WATER:
            self.paused = True
            self.loop.backlogged += 1
            self._on_pause()

    def start(self) -> None:  # lock held
        """Run the writer worker; with direct writes only once a write could not finish."""
        if not self._started:
            self._started = True
            self.loop.spawn(self.run)

    def close(self) -> None:  # lock held: write what is queued, then close
        if self._started:
            self.queue.put(None)
        else:  # nothing queued: end the connection now (this also wakes the reader)
            with contextlib.suppress(OSError):
                self.sock.shutdown(self.loop.kit.socket.SHUT_RDWR)

    def run(self) -> None:
        sock = self.sock
        try:
            while True:
                data = self.queue.get()  # every way out (close, stop) enqueues None
                if data is None:
                    break
                sock.sendall(data)
                with self.loop.lock:  # pending is shared with write(): counted under the lock
                    self.pending -= len(data)
                    if self.paused and self.pending < LOW_WATER:
                        self.paused = False
                        self.loop.backlogged -= 1
                        self._on_resume()
                        self.loop.flushed()
        except OSError as exc:
            log.debug("write failed: %s", exc)
        finally:
            with self.loop.lock:  # write() must not touch the fd once it may be reused
                self._direct_fd = None
                if self.paused:
                    self.paused = False
                    self.loop.backlogged -= 1
            with contextlib.suppress(OSError):
                sock.shutdown(self.loop.kit.socket.SHUT_RDWR)  # wakes the reader
            self._done.set()

    def finish(self) -> None:
        """Called by the reader once it stops: wait for the writer, then close the socket.

        Only the reader closes, and only after both have stopped using the descriptor, so
        neither can touch a descriptor number the system has already given to a new socket.
        """
        with self.loop.lock:
            self.close()
            started = self._started
            self._finished = True  # from now on, writes go nowhere
            self._direct_fd = None
        if started:
            self._done.wait(SEND_TIMEOUT + 1.0)
        with contextlib.suppress(OSError):
            self.sock.close()
