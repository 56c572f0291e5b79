"""RFC 6455 frame codec: an incremental parser and encoders, fast for binary data frames.

The HTTP upgrade is done with h11 (see :mod:`candy_core.upgrade`); after it, every byte of
the stream goes through :class:`FrameParser`. Data frames are the hot path of a relay, so the
parser works on one buffer with an offset and unmasks with a C routine when available.
Tests cross-check both directions against wsproto.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from candy_core.errors import CLOSE_PROTOCOL_ERROR as CLOSE_PROTOCOL_ERROR
from candy_core.errors import FrameError as FrameError
from candy_core.errors import ProtocolError as ProtocolError

_c_apply_mask: Callable[[bytes, bytes], bytes] | None
try:  # the websockets package ships a small C routine for exactly this
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - exercised when websockets lacks its extension
    _c_apply_mask = None

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013

_H2 = struct.Struct(">BB")
_H4 = struct.Struct(">BBH")
_H10 = struct.Struct(">BBQ")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


def _py_apply_mask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


apply_mask: Callable[[bytes, bytes], bytes] = _c_apply_mask or _py_apply_mask


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None, fin: bool = True) -> bytes:
    """Encode one frame; ``mask`` (4 bytes) is required from clients, absent from servers."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = _H2.pack(b0, mbit | n)
    elif n < 65536:
        head = _H4.pack(b0, mbit | 126, n)
    else:
        head = _H10.pack(b0, mbit | 127, n)
    if mask:
        return head + mask + apply_mask(payload, mask)
    return head + payload


def binary_header(n: int) -> bytes:
    """Header of an unmasked, final binary frame of ``n`` payload bytes (server side)."""
    if n < 126:
        return _H2.pack(0x82, n)
    if n < 65536:
        return _H4.pack(0x82, 126, n)
    return _H10.pack(0x82, 127, n)


def close_payload(code: int, reason: str = "") -> bytes:
    """Payload of a CLOSE frame; the reason is cut to fit the 125-byte control limit."""
    raw = reason.encode()[:123]
    while raw:
        try:
            raw.decode()
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return _U16.pack(code) + raw


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete message (data frames reassembled) or control frame."""

    opcode: int
    payload: bytes


class FrameParser:
    """Incremental frame parser for one direction of one connection.

    ``feed(data)`` returns the complete frames in ``data`` plus what was buffered before.
    Fragmented data messages are reassembled; control frames may interleave. A payload
    larger than ``max_size`` raises :class:`FrameError` with close code 1009 before it is
    buffered, so a peer cannot make us hold more than about ``max_size`` bytes.
    """

    def __init__(self, max_size: int, expect_mask: bool | None = None) -> None:
        self.max_size = max_size
        #: True: frames must be masked (server side); False: must not be; None: either.
        self.expect_mask = expect_mask
        self._buf = b""
        self._frag_op: int | None = None
        self._frag: list[bytes] = []
        self._frag_len = 0

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf + data if self._buf else data
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        max_size = self.max_size
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            hlen = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = _U16.unpack_from(buf, pos + 2)[0]
                hlen = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = _U64.unpack_from(buf, pos + 2)[0]
                hlen = 10
            if n > max_size:
                raise FrameError(
                    f"frame of {n} bytes exceeds the limit of {max_size}", CLOSE_TOO_BIG
                )
            masked = b1 & 0x80
            if masked:
                hlen += 4
            total = hlen + n
            if end - pos < total:
                break
            if b0 & 0x70:
                raise FrameError("reserved bits set (no extension was negotiated)")
            if self.expect_mask is not None and bool(masked) != self.expect_mask:
                raise FrameError(
                    "client frames must be masked"
                    if self.expect_mask
                    else "server frames must not be masked"
                )
            payload = buf[pos + hlen : pos + total]
            if masked:
                payload = apply_mask(payload, buf[pos + hlen - 4 : pos + hlen])
            pos += total
            opcode = b0 & 0x0F
            if b0 & 0x80 and opcode == OP_BINARY and self._frag_op is None:
                frames.append(Frame(OP_BINARY, payload))
            else:
                frame = self._slow_path(b0 & 0x80, opcode, payload)
                if frame is not None:
                    frames.append(frame)
        self._buf = buf[pos:] if pos < end else b""
        return frames

    def _slow_path(self, fin: int, opcode: int, payload: bytes) -> Frame | None:
        if opcode >= 0x8:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise FrameError(f"unknown control opcode {opcode:#x}")
            if not fin:
                raise FrameError("fragmented control frame")
            if len(payload) > 125:
                raise FrameError("control frame payload over 125 bytes")
            return Frame(opcode, payload)
        if opcode == OP_CONT:
            if self._frag_op is None:
                raise FrameError("continuation frame without a message to continue")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._frag_op is not None:
                raise FrameError("new data frame inside a fragmented message")
            self._frag_op = opcode
        else:
            raise FrameError(f"unknown data opcode {opcode:#x}")
        self._frag_len += len(payload)
        if self._frag_len > self.max_size:
            raise FrameError(
                f"message of over {self.max_size} bytes exceeds the limit", CLOSE_TOO_BIG
            )
        self._frag.append(payload)
        if not fin:
            return None
        frame = Frame(self._frag_op, b"".join(self._frag))
        self._frag_op = None
        self._frag = []
        self._frag_len = 0
        return frame


#: Status codes an endpoint may send (RFC 6455 section 7.4 and the IANA registry); 3000-4999
#: are for libraries and applications. 1004-1006, 1015 and everything else never go on the wire.
_SENDABLE_CLOSE_CODES = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
)
CLOSE_INVALID_DATA = 1007


def close_code_valid(code: int) -> bool:
    """True if ``code`` may appear in a CLOSE frame on the wire."""
    return code in _SENDABLE_CLOSE_CODES or 3000 <= code <= 4999


def close_reply(payload: bytes) -> bytes:
    """The payload to answer a received CLOSE with (RFC 6455 sections 5.5.1 and 7.4).

    A valid status code is echoed; an empty payload gets an empty answer. A one-byte payload
    or a code that may not be sent gets 1002, a reason that is not UTF-8 gets 1007: nothing
    the peer chose is sent back unchecked.
    """
    if not payload:
        return b""
    if len(payload) < 2:
        return close_payload(CLOSE_PROTOCOL_ERROR, "one-byte close payload")
    code = _U16.unpack_from(payload)[0]
    if not close_code_valid(code):
        return close_payload(CLOSE_PROTOCOL_ERROR, "invalid close code")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return close_payload(CLOSE_INVALID_DATA, "close reason is not UTF-8")
    return payload[:2]


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """Code and reason of a CLOSE payload (``None`` code when absent)."""
    if len(payload) < 2:
        return None, ""
    return _U16.unpack_from(payload)[0], payload[2:].decode("utf-8", "replace")
