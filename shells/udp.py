"""The peer-to-peer UDP socket shared by all runtime shells: non-blocking, read in batches."""

from __future__ import annotations

import contextlib
import socket

#: Socket buffers: a burst of tunnel traffic must not overflow the kernel's default queue.
BUFFER_SIZE = 4 * 1024 * 1024
RECV_SIZE = 65536


class UdpSocket:
    """A non-blocking UDP socket; the shell waits for readability, then drains a batch."""

    def __init__(self, port: int = 0, host: str = "0.0.0.0") -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_SIZE)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        #: Datagrams not sent because the socket buffer was full (or the send failed).
        self.dropped = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_batch(self, max_datagrams: int = 64) -> list[tuple[bytes, tuple[str, int]]]:
        """Up to ``max_datagrams`` waiting datagrams with their source addresses."""
        batch = []
        recvfrom = self._sock.recvfrom
        for _ in range(max_datagrams):
            try:
                batch.append(recvfrom(RECV_SIZE))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ICMP port unreachable reported on the socket
                continue
        return batch

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send one datagram; a full buffer or an unreachable peer drops it (counted)."""
        try:
            self._sock.sendto(data, addr)
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        self._sock.close()
