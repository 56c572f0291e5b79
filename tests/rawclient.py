"""A Candy member written with plain blocking sockets, for tests that open many connections.

The upgrade request, the masked frames and the handshake messages are written by hand here
(messages from :mod:`runtimes`), never with ``candy_core``, so these tests check the server
against an independent reading of PROTOCOL.md, and a connection costs the test process
nothing but a socket.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import time
from ipaddress import IPv4Address

from runtimes import HOST, msg_auth, msg_vmac, random_vmac

OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def upgrade_request(port: int) -> bytes:
    """A WebSocket upgrade request with a fresh key, as the 5.6 client sends it."""
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (HOST.encode(), port, key)
    )


def masked_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """One final client frame (RFC 6455: a client masks every frame)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    else:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


def handshake(password: str, ip: IPv4Address) -> bytes:
    """VMAC then AUTH for a member with the static address ``ip``."""
    now = int(time.time())
    return masked_frame(msg_vmac(password, random_vmac(), now)) + masked_frame(
        msg_auth(password, ip, now)
    )


class RawMember:
    """One connection to a relay: upgrade, VMAC+AUTH, frames in and out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    @classmethod
    def join(
        cls, port: int, password: str, ip: IPv4Address, timeout: float = 5.0, confirm: bool = True
    ) -> RawMember:
        """Connect, upgrade and authenticate as ``ip``.

        With ``confirm`` a PING follows the AUTH and its PONG is awaited: the relay handles a
        connection's frames in order, so the AUTH has been handled when the PONG arrives.
        """
        sock = socket.create_connection((HOST, port), timeout=timeout)
        member = cls(sock)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(upgrade_request(port))
            member._read_head(timeout)
            sock.sendall(handshake(password, ip) + (masked_frame(b"", OP_PING) if confirm else b""))
            if confirm:
                opcode, _ = member.recv_frame(timeout)
                assert opcode == OP_PONG, f"expected a PONG after AUTH, got opcode {opcode}"
        except BaseException:
            sock.close()
            raise
        return member

    def _read_head(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self._buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("the server closed the connection during the upgrade")
            self._buffer += data
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise ConnectionError(f"upgrade refused: {status!r}")

    def send(self, payload: bytes, opcode: int = OP_BINARY) -> None:
        self.sock.sendall(masked_frame(payload, opcode))

    def recv_frame(self, timeout: float) -> tuple[int, bytes]:
        """The next server frame (unmasked) as (opcode, payload); raises on timeout or EOF."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the server")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self._buffer += data

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        n, at = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, at = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, at = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < at + n:
            return None
        self._buffer = buf[at + n :]
        return buf[0] & 0x0F, buf[at : at + n]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
