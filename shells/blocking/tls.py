"""A TLS socket that one reader thread and one writer thread may share safely.

An OpenSSL connection must not be used by two threads at once, yet the threaded runtime reads
a connection in one thread and writes it in another (TLS 1.3 reads may also write, e.g. to
answer a key update, and writes may read). This wrapper takes a per-connection lock around
every OpenSSL call and never holds it while waiting: the socket is non-blocking, and a call
that would block releases the lock, waits for the descriptor with ``select``, and retries.
"""

from __future__ import annotations

import select
import ssl
import threading
import time
from typing import Any

from shells.blocking.loop import POLL


class LockedTls:
    """Wraps a connected, handshaken :class:`ssl.SSLSocket`; used by the threaded runtime."""

    #: Writers check this: TLS framing means no direct ``os.write`` on the descriptor.
    tls = True

    def __init__(self, sock: ssl.SSLSocket, send_timeout: float) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._send_timeout = send_timeout
        self._fd = sock.fileno()
        sock.setblocking(False)

    def fileno(self) -> int:
        return self._fd

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes; raises :class:`socket.timeout` after ``POLL`` s of nothing."""
        while True:
            with self._lock:
                try:
                    return self._sock.recv(size)
                except ssl.SSLWantWriteError:
                    wait_write = True
                except ssl.SSLWantReadError:
                    wait_write = False
            ready = (
                select.select([], [self._fd], [], POLL)
                if wait_write
                else select.select([self._fd], [], [], POLL)
            )
            if not (ready[0] or ready[1]):
                raise TimeoutError("no data")

    def sendall(self, data: bytes) -> None:
        """Send everything or raise (:class:`socket.timeout` after the send timeout)."""
        view = memoryview(data)
        deadline = time.monotonic() + self._send_timeout
        while view:
            with self._lock:
                try:
                    view = view[self._sock.send(view) :]
                    continue
                except ssl.SSLWantReadError:
                    wait_write = False
                except ssl.SSLWantWriteError:
                    wait_write = True
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("send timed out")
            if wait_write:
                select.select([], [self._fd], [], min(left, POLL))
            else:
                select.select([self._fd], [], [], min(left, POLL))

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)  # a plain socket call (no OpenSSL), safe from any thread

    def close(self) -> None:
        with self._lock:
            self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def shareable(sock: Any, threads: bool, send_timeout: float) -> Any:
    """``sock`` ready for a reader and a writer: wrapped when they are OS threads and it is TLS."""
    if threads and isinstance(sock, ssl.SSLSocket):
        return LockedTls(sock, send_timeout)
    return sock
