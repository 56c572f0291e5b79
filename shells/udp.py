"""The peer-to-peer UDP socket shared by all runtime shells: non-blocking, read in batches."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Sequence

#: Socket buffers: a burst of tunnel traffic must not overflow the kernel's default queue.
BUFFER_SIZE = 4 * 1024 * 1024
RECV_SIZE = 65536
#: Linux UDP generic segmentation offload: many equal-sized datagrams in one sendmsg.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
_CMSG_SPACE = socket.CMSG_SPACE(4)
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000

Addr = tuple[str, int]


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
        #: The kernel may hand over several datagrams of one sender in one read (GRO).
        self.gro = True
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            self.gro = False
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        #: Datagrams not sent because the socket buffer was full (or the send failed).
        self.dropped = 0
        #: Off once the kernel refuses segmentation offload; then every datagram is sent alone.
        self.gso = True

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_batch(self, max_reads: int = 64) -> list[tuple[bytes, Addr]]:
        """Waiting datagrams with their source addresses, from up to ``max_reads`` reads."""
        if not self.gro:
            return self._recvfrom_batch(max_reads)
        batch: list[tuple[bytes, Addr]] = []
        recvmsg = self._sock.recvmsg
        for _ in range(max_reads):
            try:
                data, ancillary, _flags, addr = recvmsg(RECV_SIZE, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ICMP port unreachable reported on the socket
                continue
            size = 0
            for level, kind, value in ancillary:
                if level == SOL_UDP and kind == UDP_GRO:
                    size = int.from_bytes(value[:4], "little")
            if size and len(data) > size:
                batch.extend((data[k : k + size], addr) for k in range(0, len(data), size))
            else:
                batch.append((data, addr))
        return batch

    def _recvfrom_batch(self, max_reads: int) -> list[tuple[bytes, Addr]]:
        batch = []
        recvfrom = self._sock.recvfrom
        for _ in range(max_reads):
            try:
                batch.append(recvfrom(RECV_SIZE))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
        return batch

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send one datagram; a full buffer or an unreachable peer drops it (counted)."""
        try:
            self._sock.sendto(data, addr)
        except OSError:
            self.dropped += 1

    def send_many(self, datagrams: Sequence[tuple[bytes, Addr]]) -> None:
        """Send datagrams in order, coalescing runs to one peer into one GSO ``sendmsg``.

        A run is a sequence of datagrams to the same address whose sizes are equal except
        that the last may be shorter; the kernel splits it back into those datagrams.
        """
        if len(datagrams) == 1 or not self.gso:
            for data, addr in datagrams:
                self.send(data, addr)
            return
        i, n = 0, len(datagrams)
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            j = i + 1
            total = size
            while (
                j < n
                and j - i < GSO_MAX_SEGMENTS
                and datagrams[j][1] == addr
                and total + len(datagrams[j][0]) <= GSO_MAX_BYTES
                and len(datagrams[j - 1][0]) == size
                and len(datagrams[j][0]) <= size
            ):
                total += len(datagrams[j][0])
                j += 1
            if j - i == 1:
                self.send(data, addr)
            else:
                self._send_segments([d for d, _ in datagrams[i:j]], size, addr)
            i = j

    def _send_segments(self, segments: list[bytes], size: int, addr: Addr) -> None:
        try:
            self._sock.sendmsg(
                [b"".join(segments)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, addr
            )
        except (BlockingIOError, InterruptedError):
            self.dropped += len(segments)
        except OSError:  # no segmentation offload here: from now on one datagram per call
            self.gso = False
            for segment in segments:
                self.send(segment, addr)

    def close(self) -> None:
        self._sock.close()
