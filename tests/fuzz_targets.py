"""Fuzz targets for every decoder and both cores, with invariants checked after each step.

Shared by ``tests/test_fuzz.py`` (a short, deterministic hypothesis run in the suite) and
``bench/fuzz.py`` (a long, seeded mutation run). Every target takes one ``bytes`` input:

- the decoders get it (cut into chunks where they are incremental; a leading mode byte may
  ask for a structured input built from the following bytes instead of raw bytes);
- the cores read it as a small *program* of operations, the way libFuzzer's
  FuzzedDataProvider does: every byte string is a valid program (missing bytes read as
  zero), so random bytes and mutations of seed programs both reach deep states.

Only the public behaviour of the core is used (constructors, ``receive_*``,
``data_to_send``, ``connections_to_close``, ``next_event``, ``clients``,
``peers.peer_status()``...); what the cores write is checked with independent parsers
(wsproto for WebSocket frames, h11 for HTTP, the peer key for datagrams).

A broken invariant raises :class:`InvariantViolation`: ``kind`` is a short stable label
(used to group findings), the message says what broke, and ``trace`` holds the core calls
that led there with their bytes in hex, enough to write a reproducer.
"""

from __future__ import annotations

import base64
import logging
import random
import re
import struct
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import h11
from vectors import load_vectors
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed
from wsproto.utilities import generate_accept_token

from candy_core import auth, stun
from candy_core import messages as m
from candy_core import peermsg as pm
from candy_core.client import Client, ClientState
from candy_core.config import ClientConfig, ServerConfig
from candy_core.crypto import OVERHEAD, PeerCipher, ReplayWindow, peer_key
from candy_core.errors import CandyError
from candy_core.events import (
    AddressAssigned,
    AddressChanged,
    ClientAuthenticated,
    ClientDisconnected,
    Connected,
    Disconnected,
    PeerStateChanged,
    Reconnecting,
)
from candy_core.server import RelayServer
from candy_core.upgrade import MAX_HEAD, ClientUpgrade, ServerUpgrade
from candy_core.wsframe import FrameParser, parse_close

try:  # the peer table cap; refactors may move it, the bound stays documented at 4096
    from candy_core.peers import MAX_PEERS
except ImportError:  # pragma: no cover
    MAX_PEERS = 4096


# =============================================================================================
# Violations, known bugs, helpers
# =============================================================================================
class InvariantViolation(AssertionError):
    """An invariant broke; ``kind`` groups findings, ``trace`` lists the core calls."""

    def __init__(self, kind: str, detail: str, trace: list | None = None) -> None:
        self.kind = kind
        self.detail = detail
        self.trace = trace or []
        super().__init__(self.describe())

    def describe(self, last: int = 60) -> str:
        lines = [f"[{self.kind}] {self.detail}"]
        if self.trace:
            lines.append(f"trace (last {min(last, len(self.trace))} calls, bytes in hex):")
            lines += [f"  {trace_line(entry)}" for entry in self.trace[-last:]]
        return "\n".join(lines)


def _fmt(args: tuple) -> str:
    return ", ".join(a.hex() if isinstance(a, bytes) else repr(a) for a in args)


def trace_line(entry: str | tuple[str, tuple]) -> str:
    """One trace entry as text: ``what(args)`` with bytes in hex (formatted only when shown)."""
    if isinstance(entry, str):
        return entry
    what, args = entry
    return f"{what}({_fmt(args)})"


#: Bugs this harness found, not fixed yet (same treatment as KNOWN_BUGS; see the report).
NEW_BUGS: dict[str, str] = {}

#: Known bugs, by violation kind. A run given ``tolerate=KNOWN_BUGS`` stops the program that
#: hits one quietly instead of failing. Remove an entry (and the xfail of its regression test
#: in tests/test_fuzz.py) once the fix lands.
KNOWN_BUGS: dict[str, str] = {}

#: Everything a run in the suite tolerates (each has a strict xfail regression test).
TOLERATED: dict[str, str] = {**KNOWN_BUGS, **NEW_BUGS}

_CANDY_LOGGER = logging.getLogger("candy")


@contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence the cores' warnings while fuzzing (hostile input makes them chatty)."""
    old = _CANDY_LOGGER.level
    _CANDY_LOGGER.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        _CANDY_LOGGER.setLevel(old)


def _origin(exc: BaseException) -> str:
    """File and function of the innermost candy_core frame of ``exc`` (no line numbers)."""
    where = "?"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        path = frame.f_code.co_filename
        if "candy_core" in path:
            where = f"{Path(path).name}:{frame.f_code.co_qualname}"
    return where


def _exc_name(exc: BaseException) -> str:
    kind = type(exc)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def escaped(where: str, exc: BaseException, trace: list | None = None) -> InvariantViolation:
    """The violation for an exception that escaped ``where``."""
    kind = f"{where} raised {_exc_name(exc)} at {_origin(exc)}"
    tb = "".join(traceback.format_exception(exc)[-4:]).rstrip()
    return InvariantViolation(kind, f"{exc!r}\n{tb}", trace)


def _stat_features(prefix: str, stats: object) -> set[str]:
    """Counters as features, bucketed by their order of magnitude."""
    return {
        f"{prefix}:{name}:{getattr(stats, name).bit_length()}"
        for name in getattr(stats, "__dataclass_fields__", {})
        if isinstance(getattr(stats, name), int) and getattr(stats, name)
    }


def _template(text: str) -> str:
    """An error message with its numbers blanked: a cheap feature for the mutation loop."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"|b'[^']*'", "Q", text)  # quoted input
    return re.sub(r"0x[0-9a-fA-F]+|\d+", "N", text)[:48]


def held(root: object, max_depth: int = 8) -> tuple[int, int]:
    """Container items and bytes reachable from ``root`` through candy_core objects.

    A rough, implementation-agnostic measure of what a core keeps in memory: it walks the
    attributes of objects defined in candy_core and the dicts, lists, sets and deques they
    hold, counting items and the lengths of bytes and strings.
    """
    seen: set[int] = set()
    items = nbytes = 0
    stack: list[tuple[object, int]] = [(root, 0)]
    scalars = (int, float, bool, type(None))
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, scalars) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, bytes | bytearray | str):
            nbytes += len(obj)
            continue
        if isinstance(obj, dict):
            items += len(obj)
            children: list[object] = [*obj.keys(), *obj.values()]
        elif isinstance(obj, list | tuple | set | frozenset | deque):
            items += len(obj)
            children = [c for c in obj if not isinstance(c, scalars)]
        elif type(obj).__module__.startswith("candy_core") and not isinstance(obj, type):
            children = list(getattr(obj, "__dict__", {}).values())
            for klass in type(obj).__mro__:
                for name in getattr(klass, "__slots__", ()):
                    if hasattr(obj, name):
                        children.append(getattr(obj, name))
        else:
            continue
        if depth < max_depth:
            stack.extend((child, depth + 1) for child in children)
    return items, nbytes


class Reader:
    """Reads an input as fields; bytes past the end read as zero (every input is valid)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    def u8(self) -> int:
        pos = self.pos
        self.pos = pos + 1
        return self.data[pos] if pos < len(self.data) else 0

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n).ljust(n, b"\x00"), "big")

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def fixed(self, n: int) -> bytes:
        return self.take(n).ljust(n, b"\x00")

    def blob(self, max_len: int = 255) -> bytes:
        n = self.uint(2) % (max_len + 1) if max_len > 255 else self.u8() % (max_len + 1)
        return self.take(n)

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk


def xor_mask(data: bytes, mask: bytes) -> bytes:
    """RFC 6455 masking, written independently of candy_core.wsframe."""
    n = len(data)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


def ws_frame(
    opcode: int,
    payload: bytes,
    mask: bytes | None = None,
    fin: bool = True,
    rsv: int = 0,
    form: int | None = None,
) -> bytes:
    """One WebSocket frame, including ones a correct peer never sends (rsv, long forms)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
    mbit = 0x80 if mask is not None else 0
    if form is None:
        form = 0 if n < 126 else 126 if n < 65536 else 127
    if form == 0 and n < 126:
        head = bytes((b0, mbit | n))
    elif form == 126 and n < 65536:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if mask is not None:
        return head + mask + xor_mask(payload, mask)
    return head + payload


def ipv4_packet(src: bytes, dst: bytes, total: int, first: int = 0x45, fill: bytes = b"") -> bytes:
    """``total`` bytes of an IPv4-looking packet (cut short when ``total`` < 20)."""
    head = bytearray(20)
    head[0] = first
    head[2:4] = max(total, 0).to_bytes(2, "big")[-2:]
    head[8] = 64
    head[9] = 1
    head[12:16] = src
    head[16:20] = dst
    body = (fill or b"\x08\x00\xf7\xff") * (max(total - 20, 0) // max(len(fill or b"1234"), 1) + 1)
    return (bytes(head) + body)[: max(total, 0)]


I64_EDGES = (0, 1, -1, 2**31 - 1, -(2**31), 2**31, 2**32, 2**63 - 1, -(2**63), 2**62)
I32_EDGES = (0, 1, -1, 2**31 - 1, -(2**31), 2**31 - 2, 1000, 65535)
CLOSE_CODES = (1000, 1001, 1002, 1003, 1008, 1009, 1011, 3000, 4999, 0, 1, 999, 1004,
               1005, 1006, 1015, 1016, 2999, 5000, 65535)  # fmt: skip
LENGTHS = (0, 1, 2, 13, 14, 16, 17, 18, 20, 21, 22, 28, 60, 125, 126, 1401)


def pick_i64(r: Reader, base: int) -> int:
    v = r.u8()
    sel = v % 16
    if sel < len(I64_EDGES):
        return I64_EDGES[sel]
    if sel < 15:
        return base + (v >> 4) - 8
    return int.from_bytes(r.fixed(8), "big", signed=True)


def pick_i32(r: Reader) -> int:
    v = r.u8()
    sel = v % 10
    if sel < len(I32_EDGES):
        return I32_EDGES[sel]
    if sel == 8:
        return v >> 4
    return int.from_bytes(r.fixed(4), "big", signed=True)


def close_payload_for(r: Reader) -> bytes:
    """A CLOSE payload: empty, one byte, any code with a valid or invalid reason, or raw."""
    v = r.u8()
    mode = v % 6
    if mode == 0:
        return b""
    if mode == 1:
        return r.fixed(1)
    code = CLOSE_CODES[r.u8() % len(CLOSE_CODES)]
    if mode == 2:
        return struct.pack(">H", code)
    if mode == 3:
        return struct.pack(">H", code) + b"bye"
    if mode == 4:
        return struct.pack(">H", code) + b"\xff\xfe"  # not UTF-8
    return r.blob(130)


# =============================================================================================
# Strict readers of what the cores write
# =============================================================================================
def _close_kind(side: str, payload: bytes) -> str:
    # Payloads the cores build themselves (close_payload) always carry a reason; two bytes
    # or fewer can only be the echo of the first two bytes of the peer's CLOSE.
    if len(payload) <= 2:
        return f"{side} sent an invalid CLOSE (echoed payload)"
    return f"{side} sent an invalid CLOSE"


class WsStream:
    """One direction of a WebSocket connection, parsed strictly by wsproto (RFC 6455).

    ``from_server``: frames must be unmasked (server to client) or masked (client to server).
    ``feed`` returns complete messages and control frames as ``(opcode, payload bytes)``;
    any violation of RFC 6455, or a byte after a CLOSE frame, raises InvariantViolation.
    """

    def __init__(self, side: str, from_server: bool, trace: list) -> None:
        self.side = side
        self.from_server = from_server
        self.trace = trace
        self._fp = FrameProtocol(client=from_server, extensions=[])
        self._raw = b""
        self._parts: list[bytes] = []
        self.closed = False

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if not data:
            return []
        if self.closed:
            raise InvariantViolation(
                f"{self.side} wrote after its CLOSE frame",
                f"{len(data)} bytes after CLOSE: {data[:64].hex()}",
                self.trace,
            )
        self._raw += data
        self._fp.receive_bytes(data)
        out: list[tuple[int, bytes]] = []
        try:
            for frame in self._fp.received_frames():
                opcode = frame.opcode
                if opcode is Opcode.CLOSE:
                    code, reason = frame.payload
                    payload = b"" if code == 1005 and not reason else struct.pack(">H", code)
                    out.append((int(opcode), payload + reason.encode()))
                    self.closed = True
                    rest = (
                        len(self._fp._frame_decoder.buffer)
                        - self._fp._frame_decoder.buffer.bytes_used
                    )
                    if rest:
                        raise InvariantViolation(
                            f"{self.side} wrote after its CLOSE frame",
                            f"{rest} bytes follow the CLOSE frame in the same write",
                            self.trace,
                        )
                    break
                payload = frame.payload
                if isinstance(payload, str):
                    payload = payload.encode()
                if opcode.iscontrol():
                    out.append((int(opcode), bytes(payload)))
                    continue
                self._parts.append(bytes(payload))
                if frame.message_finished:
                    out.append((int(opcode), b"".join(self._parts)))
                    self._parts = []
        except ParseFailed as exc:
            text = str(exc)
            if "CLOSE" in text:
                payload = self._last_close_payload()
                raise InvariantViolation(
                    _close_kind(self.side, payload),
                    f"CLOSE payload {payload.hex() or '(empty)'}: wsproto says {text}",
                    self.trace,
                ) from None
            raise InvariantViolation(
                f"{self.side} wrote an invalid WebSocket frame",
                f"wsproto: {text}; stream tail {self._raw[-64:].hex()}",
                self.trace,
            ) from None
        return out

    def _last_close_payload(self) -> bytes:
        """The payload of the first CLOSE frame in what was written (lenient re-parse)."""
        try:
            frames = FrameParser(1 << 30, expect_mask=None).feed(self._raw)
        except CandyError:
            return b"?"
        for frame in frames:
            if frame.opcode == 0x8:
                return frame.payload
        return b"?"


def _upgrading_h11_client() -> h11.Connection:
    """An h11 client that has sent an upgrade request: it reads a 101 or a refusal."""
    client = h11.Connection(h11.CLIENT)
    headers = [("Host", "x"), ("Upgrade", "websocket"), ("Connection", "Upgrade")]
    client.send(h11.Request(method="GET", target="/", headers=headers))
    client.send(h11.EndOfMessage())
    return client


def _http_headers(event: h11.InformationalResponse | h11.Response) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in event.headers}


# =============================================================================================
# Decoder targets
# =============================================================================================
_MSG_TYPES = (m.AUTH, m.FORWARD, m.EXPECTED, m.PEER, m.VMAC, m.DISCOVERY, m.GENERAL)
_MSG_CLASS = {
    m.AUTH: m.Auth,
    m.FORWARD: m.Forward,
    m.EXPECTED: m.Expected,
    m.PEER: m.Peer,
    m.VMAC: m.Vmac,
    m.DISCOVERY: m.Discovery,
    m.GENERAL: m.General,
}


def fuzz_messages(data: bytes) -> set[str]:
    """messages.decode: only CandyError escapes; what decodes re-encodes and round-trips.

    Input: a first byte below 0x80 picks a known message type for the rest; otherwise the
    rest is decoded as it is.
    """
    if data and data[0] < 0x80:
        data = bytes((_MSG_TYPES[data[0] % len(_MSG_TYPES)],)) + data[1:]
    else:
        data = data[1:]
    try:
        msg = m.decode(data)
    except CandyError as exc:
        return {f"err:{_template(str(exc))}"}
    except Exception as exc:
        raise escaped("messages.decode", exc, [f"decode({data.hex()})"]) from exc
    name = type(msg).__name__
    expected = _MSG_CLASS.get(data[0], m.Unknown)
    if type(msg) is not expected:
        raise InvariantViolation(
            "messages.decode returned the wrong type", f"{name} for type byte {data[0]}"
        )
    try:
        if isinstance(msg, m.Auth | m.Vmac | m.Expected):
            msg.verify("fuzz")
        if isinstance(msg, m.General):
            msg.endpoint()
        encoded = msg.encode()
    except CandyError:  # an EXPECTED cidr of 32 characters cannot be re-encoded
        return {f"ok:{name}", "reencode-refused"}
    except Exception as exc:
        raise escaped(f"{name}.encode", exc, [f"decode({data.hex()})"]) from exc
    if not isinstance(msg, m.Expected) and not data.startswith(encoded):
        raise InvariantViolation(
            "message does not re-encode to its bytes",
            f"{name}: decoded from {data.hex()}, encodes to {encoded.hex()}",
        )
    try:
        again = m.decode(encoded)
    except Exception as exc:
        raise escaped("messages.decode (of a re-encoded message)", exc, [encoded.hex()]) from exc
    if again != msg:
        raise InvariantViolation(
            "message does not round-trip", f"{msg!r} -> {encoded.hex()} -> {again!r}"
        )
    return {f"ok:{name}", f"len:{min(len(data), 80) // 8}"}


_MAX_SIZES = (0, 1, 2, 16, 125, 126, 127, 4096, 65535, 65536)


def _wsframe_config(r: Reader) -> tuple[bool | None, int]:
    v = r.u8()
    return (True, False, None)[v % 3], _MAX_SIZES[(v // 3) % len(_MAX_SIZES)]


def _structured_frames(r: Reader, masked: bool | None) -> bytes:
    """Frames built from fields: opcodes, fin, rsv, mask, length forms, payloads."""
    out = []
    for _ in range(r.u8() % 8 + 1):
        flags = r.u8()
        opcode = (0, 1, 2, 8, 9, 10, 3, 11)[flags % 8]
        fin = not flags & 0x08
        rsv = (flags >> 4) & 7 if flags & 0x80 else 0
        use_mask = masked if masked is not None else bool(flags & 0x40)
        if flags & 0x80 and flags & 0x10:
            use_mask = not use_mask
        form = (None, None, None, 126, 127, None, None, None)[(flags >> 3) % 8]
        payload = r.blob(200)
        if opcode == 8 and flags & 0x20:
            payload = close_payload_for(r)
        out.append(ws_frame(opcode, payload, r.fixed(4) if use_mask else None, fin, rsv, form))
    return b"".join(out)


def _split(data: bytes, r: Reader) -> list[bytes]:
    """Cut ``data`` into chunks at positions read from ``r``."""
    chunks = []
    pos = 0
    while pos < len(data):
        n = r.u8()
        step = len(data) - pos if n == 0 else (n % 23) + 1
        chunks.append(data[pos : pos + step])
        pos += step
    return chunks


def _wsproto_messages(
    stream: bytes, client_side: bool
) -> tuple[list[tuple[int, object]], str | None]:
    fp = FrameProtocol(client=client_side, extensions=[])
    fp.receive_bytes(stream)
    out: list[tuple[int, object]] = []
    parts: list[bytes] = []
    try:
        for frame in fp.received_frames():
            if frame.opcode is Opcode.CLOSE:
                out.append((8, tuple(frame.payload)))
                break
            payload = frame.payload
            payload = payload.encode() if isinstance(payload, str) else bytes(payload)
            if frame.opcode.iscontrol():
                out.append((int(frame.opcode), payload))
                continue
            parts.append(payload)
            if frame.message_finished:
                out.append((int(frame.opcode), b"".join(parts)))
                parts = []
    except ParseFailed as exc:
        return out, str(exc)
    return out, None


# wsproto is stricter than our parser on purpose in these (the relay leaves close codes and
# text to the application, and accepts non-minimal length forms): no differential finding.
_WSPROTO_STRICTER = (
    "CLOSE",
    "utf-8",
    "codec",
    "sufficed",
    "Payload length used",
    "Control frame with payload len > 125",  # a short control frame in a long length form
)


def fuzz_wsframe(data: bytes) -> set[str]:
    """wsframe.FrameParser fed arbitrary chunks.

    Input: a config byte (expect_mask, max_size), a mode byte (raw stream or frames built
    from fields), the stream, then chunk sizes. Checks: only CandyError escapes; the result
    does not depend on how the stream is cut; frames respect the limits; the parser holds
    no more than about ``max_size`` (plus one header); where wsproto accepts the stream the
    two parsers agree.
    """
    r = Reader(data)
    expect_mask, max_size = _wsframe_config(r)
    mode = r.u8()
    if mode & 1:
        stream = _structured_frames(r, expect_mask)
        chunks = _split(stream, r)
    else:
        stream = r.blob(1024)
        chunks = _split(stream, r)
    trace = [f"FrameParser(max_size={max_size}, expect_mask={expect_mask})"]
    trace += [f"feed({c.hex()})" for c in chunks]

    def run(pieces: list[bytes]) -> tuple[list[tuple[int, bytes]], str | None, FrameParser]:
        parser = FrameParser(max_size, expect_mask=expect_mask)
        frames: list[tuple[int, bytes]] = []
        for piece in pieces:
            try:
                got = parser.feed(piece)
            except CandyError as exc:
                return frames, str(exc), parser
            except Exception as exc:
                raise escaped("FrameParser.feed", exc, trace) from exc
            frames += [(f.opcode, f.payload) for f in got]
            items, nbytes = held(parser)
            # An incomplete frame (header + max_size) plus a fragmented message (max_size),
            # and about one list slot per retained fragment.
            if nbytes + 8 * items > 2 * max_size + 14 + 8 * (max_size + 2) + 64:
                raise InvariantViolation(
                    "FrameParser holds more than its max_size allows",
                    f"{items} items and {nbytes} bytes held with max_size={max_size}",
                    trace,
                )
        return frames, None, parser

    frames, error, parser = run(chunks)
    pending = held(parser)[1] > 0  # an incomplete frame (not yet checked) is buffered
    features = {f"mode:{mode & 1}", f"err:{_template(error)}" if error else "ok"}
    whole, whole_error, _ = run([stream])
    if (error is None) != (whole_error is None) or (error is None and frames != whole):
        raise InvariantViolation(
            "FrameParser result depends on how the stream is cut",
            f"chunked: {len(frames)} frames, error {error!r}; "
            f"whole: {len(whole)} frames, error {whole_error!r}",
            trace,
        )
    for opcode, payload in frames:
        features.add(f"op:{opcode}")
        if opcode == 8:
            try:
                parse_close(payload)
            except Exception as exc:
                raise escaped("wsframe.parse_close", exc, trace) from exc
        if opcode not in (1, 2, 8, 9, 10):
            raise InvariantViolation("FrameParser returned a bad opcode", f"{opcode}", trace)
        if opcode >= 8 and len(payload) > 125:
            raise InvariantViolation("FrameParser returned a long control frame", "", trace)
        if len(payload) > max_size:
            raise InvariantViolation(
                "FrameParser returned a message over max_size", f"{len(payload)}", trace
            )
    if expect_mask is not None:
        features |= _wsframe_differential(stream, expect_mask, frames, error, pending, trace)
    return features


def _wsframe_differential(
    stream: bytes,
    expect_mask: bool,
    frames: list[tuple[int, bytes]],
    error: str | None,
    pending: bool,
    trace: list,
) -> set[str]:
    theirs, their_error = _wsproto_messages(stream, client_side=not expect_mask)
    ours: list[tuple[int, object]] = []
    for opcode, payload in frames:
        if opcode == 8:
            if not payload:
                ours.append((8, (1005, "")))
            elif len(payload) >= 2:
                code = struct.unpack(">H", payload[:2])[0]
                ours.append((8, (code, payload[2:].decode("utf-8", "replace"))))
            else:
                ours.append((8, ("short",)))
            break
        ours.append((opcode, payload))
    n = min(len(ours), len(theirs))
    if ours[:n] != theirs[:n]:
        raise InvariantViolation(
            "FrameParser and wsproto disagree on frames",
            f"ours {ours[:n]!r}\nwsproto {theirs[:n]!r}",
            trace,
        )
    ended_by_close = bool(theirs) and theirs[-1][0] == 8
    if error is None and their_error is None and not ended_by_close and len(ours) != len(theirs):
        raise InvariantViolation(
            "FrameParser and wsproto disagree on the number of frames",
            f"ours {ours!r}\nwsproto {theirs!r}",
            trace,
        )
    if error is None and their_error is not None:
        # wsproto checks a header as soon as it has it; ours once the frame is complete.
        if not pending and not any(word in their_error for word in _WSPROTO_STRICTER):
            raise InvariantViolation(
                "FrameParser accepts what wsproto rejects",
                f"wsproto: {their_error}",
                trace,
            )
        return {"diff:wsproto-stricter"}
    if error is not None and their_error is None and not ended_by_close:
        # Ours checks a frame once it is complete; wsproto checks the header as soon as it
        # has it, so it has seen every frame ours rejected. Only our size limit may differ.
        if "exceeds" not in error:
            raise InvariantViolation(
                "FrameParser rejects what wsproto accepts", f"ours: {error}", trace
            )
        return {"diff:too-big"}
    return set()


_NONCE = base64.b64encode(b"fuzz-nonce-16byt")
_REQUEST = ClientUpgrade("relay.example", 80, "/", _NONCE).request()

_METHODS = (b"GET", b"POST", b"get", b"GET ", b"", b"\x00")
_TARGETS = (b"/", b"/candy", b"*", b"http://x/", b"/" + b"a" * 300, b"/%00", b"/\xff")
_HEADER_CHOICES = (
    (b"Host", b"relay.example:80"),
    (b"Upgrade", b"websocket"),
    (b"Upgrade", b"WebSocket"),
    (b"Upgrade", b"h2c"),
    (b"Connection", b"Upgrade"),
    (b"Connection", b"keep-alive, Upgrade"),
    (b"Connection", b"close"),
    (b"Sec-WebSocket-Key", _NONCE),
    (b"Sec-WebSocket-Key", b""),
    (b"Sec-WebSocket-Key", b"\xff\xfe"),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Sec-WebSocket-Version", b"8"),
    (b"Content-Length", b"5"),
    (b"Content-Length", b"-1"),
    (b"Transfer-Encoding", b"chunked"),
    (b"X-Long", b"v" * 2000),
)


def _structured_request(r: Reader) -> bytes:
    method = _METHODS[r.u8() % len(_METHODS)]
    target = _TARGETS[r.u8() % len(_TARGETS)]
    version = (b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 ")[r.u8() % 4]
    eol = (b"\r\n", b"\r\n", b"\n", b"\r")[r.u8() % 4]
    lines = [method + b" " + target + b" " + version]
    for _ in range(r.u8() % 9):
        v = r.u8()
        if v >= 0xF0:
            lines.append(r.blob(40))
        else:
            name, value = _HEADER_CHOICES[v % len(_HEADER_CHOICES)]
            lines.append(name + b": " + value)
    return eol.join(lines) + eol + eol + r.blob(40)


def fuzz_upgrade(data: bytes) -> set[str]:
    """ServerUpgrade (and ClientUpgrade) fed arbitrary chunks.

    Input: a mode byte (server side: raw bytes, a mutated real request or a request built
    from fields; client side: raw bytes or a built 101), then the bytes and chunk sizes.
    Checks: only CandyError escapes; a result is accepted or rejected, never both; every
    reply is a well-formed HTTP response (h11); an acceptance carries the right
    Sec-WebSocket-Accept and hands back exactly the bytes after the request; a head larger
    than MAX_HEAD is refused rather than buffered.
    """
    r = Reader(data)
    mode = r.u8() % 8
    if mode == 6:
        return _fuzz_client_upgrade(r)
    if mode == 7:
        return _fuzz_client_upgrade(r, built=True)
    if mode == 1 and r.u8() == 0xFF:  # a head that never ends: it must be refused
        stream = _REQUEST[:-2] + b"X-Pad: " + b"a" * (MAX_HEAD + r.uint(2))
        return _upgrade_run(stream, [stream[i : i + 4096] for i in range(0, len(stream), 4096)])
    if mode in (0, 1):
        stream = r.blob(2048)
    elif mode in (2, 3):
        stream = bytearray(_REQUEST)
        for _ in range(r.u8() % 4 + 1):
            pos = r.uint(2) % (len(stream) + 1)
            action = r.u8() % 3
            if action == 0 and pos < len(stream):
                stream[pos] = r.u8()
            elif action == 1:
                stream[pos:pos] = r.blob(8)
            else:
                del stream[pos : pos + r.u8() % 8]
        stream = bytes(stream) + r.blob(40)
    else:
        stream = _structured_request(r)
    return _upgrade_run(stream, _split(stream, r))


def _upgrade_run(stream: bytes, chunks: list[bytes]) -> set[str]:
    trace = ["ServerUpgrade()"] + [f"receive({c.hex()})" for c in chunks]
    upgrade = ServerUpgrade()
    fed = b""
    result = None
    for chunk in chunks:
        fed += chunk
        try:
            result = upgrade.receive(chunk)
        except CandyError as exc:
            return {f"err:{_template(str(exc))}"}
        except Exception as exc:
            raise escaped("ServerUpgrade.receive", exc, trace) from exc
        if result.accepted or result.rejected:
            break
        if result.reply:
            raise InvariantViolation("ServerUpgrade replied before deciding", "", trace)
        if len(fed) > MAX_HEAD + 4096:
            raise InvariantViolation(
                "ServerUpgrade buffers past MAX_HEAD",
                f"{len(fed)} bytes fed without an answer",
                trace,
            )
    if result is None or not (result.accepted or result.rejected):
        return {"pending"}
    if result.accepted and result.rejected:
        raise InvariantViolation("ServerUpgrade both accepted and rejected", "", trace)
    client = _upgrading_h11_client()
    client.receive_data(result.reply)
    try:
        event = client.next_event()
    except h11.RemoteProtocolError as exc:
        raise InvariantViolation(
            "ServerUpgrade wrote a malformed HTTP response", f"{exc}: {result.reply!r}", trace
        ) from None
    if result.accepted:
        if not isinstance(event, h11.InformationalResponse) or event.status_code != 101:
            raise InvariantViolation("accepted upgrade without a 101", repr(event), trace)
        key = _request_key(fed)
        accept = _http_headers(event).get(b"sec-websocket-accept")
        if key is None or accept != generate_accept_token(key):
            raise InvariantViolation(
                "101 with a wrong Sec-WebSocket-Accept", f"key {key!r}, accept {accept!r}", trace
            )
        if not fed.endswith(result.trailing) or len(result.trailing) >= len(fed):
            raise InvariantViolation("trailing bytes are not the rest of the input", "", trace)
        return {"accepted", f"trailing:{bool(result.trailing)}"}
    if result.reply and (
        not isinstance(event, h11.Response) or event.status_code not in (400, 403)
    ):
        raise InvariantViolation("refusal is not a 400/403", repr(event), trace)
    return {f"rejected:{_template(result.rejected or '')}"}


def _request_key(request: bytes) -> bytes | None:
    """The Sec-WebSocket-Key of a request, read with a fresh h11 server."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(request)
    try:
        event = server.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    return {n.lower(): v for n, v in event.headers}.get(b"sec-websocket-key")


def _fuzz_client_upgrade(r: Reader, built: bool = False) -> set[str]:
    if built:
        status = (b"101", b"101", b"200", b"403", b"1010", b"")[r.u8() % 6]
        accept = (generate_accept_token(_NONCE), b"wrong", b"")[r.u8() % 3]
        lines = [b"HTTP/1.1 " + status + b" Switching Protocols"]
        if r.u8() & 1:
            lines.append(b"Sec-WebSocket-Accept: " + accept)
        for _ in range(r.u8() % 4):
            name, value = _HEADER_CHOICES[r.u8() % len(_HEADER_CHOICES)]
            lines.append(name + b": " + value)
        stream = b"\r\n".join(lines) + b"\r\n\r\n" + r.blob(40)
    else:
        stream = r.blob(1024)
    chunks = _split(stream, r)
    trace = ["ClientUpgrade()"] + [f"receive({c.hex()})" for c in chunks]
    upgrade = ClientUpgrade("relay.example", 80, "/", _NONCE)
    upgrade.request()
    fed = b""
    for chunk in chunks:
        fed += chunk
        try:
            result = upgrade.receive(chunk)
        except CandyError as exc:
            return {f"client-err:{_template(str(exc))}"}
        except Exception as exc:
            raise escaped("ClientUpgrade.receive", exc, trace) from exc
        if result.accepted and result.rejected:
            raise InvariantViolation("ClientUpgrade both accepted and rejected", "", trace)
        if result.accepted:
            if not fed.endswith(result.trailing):
                raise InvariantViolation("client trailing bytes are not the rest", "", trace)
            if generate_accept_token(_NONCE) not in fed:
                raise InvariantViolation("ClientUpgrade accepted a wrong accept token", "", trace)
            return {"client-accepted"}
        if result.rejected:
            return {f"client-rejected:{_template(result.rejected)}"}
    return {"client-pending"}


_STUN_TID = bytes(range(0xA1, 0xAD))


def _structured_stun(r: Reader) -> bytes:
    msg_type = (0x0101, 0x0101, 0x0101, 0x0001, 0x0111, r.uint(2))[r.u8() % 6]
    cookie = stun.MAGIC_COOKIE if r.u8() % 8 else r.uint(4)
    tid = _STUN_TID if r.u8() % 4 else r.fixed(12)
    body = b""
    for _ in range(r.u8() % 5):
        attr = (0x0020, 0x0001, 0x8022, 0x0003, 0x8020, r.uint(2))[r.u8() % 6]
        v = r.u8()
        if v % 4 == 0:
            value = r.blob(24)
        else:
            family = (1, 1, 2, 0, 3)[v % 5]
            value = bytes((r.u8() if v & 0x80 else 0, family)) + r.fixed(2) + r.fixed(4)
            if family == 2:
                value += r.fixed(12)
        declared = len(value) if r.u8() % 8 else r.uint(2)
        body += struct.pack("!HH", attr, declared) + value + b"\x00" * (-len(value) % 4)
    length = len(body) if r.u8() % 8 else r.uint(2)
    return struct.pack("!HHI12s", msg_type, length, cookie, tid) + body + r.blob(8)


def fuzz_stun(data: bytes) -> set[str]:
    """STUN decoding: parse_binding_response (with and without the id), looks_like_stun.

    Checks: only CandyError (StunError) escapes; what parses is a dotted IPv4 address and a
    port in range, and looks like STUN; built responses round-trip.
    """
    r = Reader(data)
    mode = r.u8()
    msg = _structured_stun(r) if mode & 1 else r.rest()
    tid = None if mode & 2 else _STUN_TID
    trace = [f"parse_binding_response({msg.hex()}, {tid.hex() if tid else None})"]
    try:
        looks = stun.looks_like_stun(msg)
        ip, port = stun.parse_binding_response(msg, tid)
    except CandyError as exc:
        return {f"err:{_template(str(exc))}"}
    except Exception as exc:
        raise escaped("stun.parse_binding_response", exc, trace) from exc
    try:
        IPv4Address(ip)
    except ValueError:
        raise InvariantViolation("STUN parse returned a bad address", ip, trace) from None
    if not (isinstance(port, int) and 0 <= port <= 0xFFFF) or not looks:
        raise InvariantViolation("STUN parse result out of range", f"{ip}:{port}", trace)
    again = stun.parse_binding_response(stun.build_binding_response(_STUN_TID, ip, port), None)
    if again != (ip, port):
        raise InvariantViolation("STUN response does not round-trip", f"{again}", trace)
    return {"ok", f"tid:{tid is not None}"}


_PEER_PASSWORD = "candy-test-password"
_PEER_RX = IPv4Address("10.77.0.12").packed
_PEER_KEY = peer_key(_PEER_PASSWORD, _PEER_RX)
_PEER_DECODERS = {pm.HEARTBEAT: pm.Heartbeat, pm.DELAY: pm.Delay, pm.ROUTE: pm.Route}


def _peer_plaintext(r: Reader) -> bytes:
    kind = r.u8() % 6
    if kind == 0:
        return pm.Heartbeat(
            IPv4Address(r.fixed(4)), IPv4Address(r.fixed(4)), r.uint(2), bool(r.u8() & 1)
        ).encode()[: 12 - r.u8() % 3]
    if kind == 1:
        return pm.Delay(
            IPv4Address(r.fixed(4)), IPv4Address(r.fixed(4)), pick_i64(r, 1_764_000_000_000)
        ).encode()[: 17 - r.u8() % 3]
    if kind == 2:
        return pm.Route(IPv4Address(r.fixed(4)), IPv4Address(r.fixed(4)), pick_i32(r)).encode()
    if kind == 3:
        return b"\x01" + ipv4_packet(r.fixed(4), r.fixed(4), LENGTHS[r.u8() % len(LENGTHS)])
    return r.blob(64)


def fuzz_peer(data: bytes) -> set[str]:
    """Peer datagrams: PeerCipher.open then peermsg decoding, and the replay window.

    Input: a mode byte. Raw datagrams must open to ``None`` (never raise); datagrams sealed
    with the right key carry hostile plaintext that must open unchanged and decode raising
    only CandyError, re-encoding to the same bytes; a tampered sealed datagram never opens;
    the replay window matches a reference model.
    """
    r = Reader(data)
    mode = r.u8() % 5
    cipher = PeerCipher(random.Random(r.u8()))
    if mode == 4:
        return _fuzz_replay_window(r)
    if mode == 0:
        datagram = r.rest()
        plain: bytes | None = None
    else:
        plain = _peer_plaintext(r)
        datagram = cipher.seal(_PEER_KEY, plain)
        if mode == 3:
            pos = r.uint(2) % len(datagram)
            datagram = datagram[:pos] + bytes((datagram[pos] ^ (r.u8() | 1),)) + datagram[pos + 1 :]
    trace = [f"open({datagram.hex()})"]
    try:
        opened = cipher.open(_PEER_KEY, datagram)
    except Exception as exc:
        raise escaped("PeerCipher.open", exc, trace) from exc
    if mode == 3 and opened is not None:
        raise InvariantViolation("a tampered datagram opened", "", trace)
    if mode in (1, 2) and opened != plain:
        raise InvariantViolation("a sealed datagram did not open to its plaintext", "", trace)
    if not opened:
        return {f"mode:{mode}:closed"}
    decoder = _PEER_DECODERS.get(opened[0])
    if decoder is None:
        return {f"type:{opened[0] if opened[0] < 8 else 'other'}"}
    try:
        msg = decoder.decode(opened)
        encoded = msg.encode()
    except CandyError as exc:
        return {f"err:{_template(str(exc))}"}
    except Exception as exc:
        raise escaped(f"{decoder.__name__}.decode/encode", exc, [*trace, opened.hex()]) from exc
    # A HEARTBEAT ack byte is a boolean: any non-zero value reads as 1.
    exact = decoder is not pm.Heartbeat or opened[11] in (0, 1)
    if (exact and not opened.startswith(encoded)) or decoder.decode(encoded) != msg:
        raise InvariantViolation(
            "peer message does not round-trip", f"{opened.hex()} -> {encoded.hex()}", trace
        )
    return {f"ok:{decoder.__name__}"}


def _fuzz_replay_window(r: Reader) -> set[str]:
    size = r.u8() % 8 + 1
    window = ReplayWindow(size)
    model: deque[bytes] = deque(maxlen=size)
    trace = [f"ReplayWindow({size})"]
    for _ in range(r.u8() % 64):
        iv = bytes((r.u8() % 12,)) * 12
        trace.append(f"seen({iv.hex()})")
        want = iv in model
        if not want:
            model.append(iv)
        if window.seen(iv) != want:
            raise InvariantViolation("ReplayWindow disagrees with its model", f"{want}", trace)
    return {"replay"}


# =============================================================================================
# The relay server core
# =============================================================================================
PASSWORD = "fuzz-password"
WALL0 = 1_764_000_000
NET = IPv4Network("10.99.0.0/24")
IPS = [IPv4Address(f"10.99.0.{i}").packed for i in (1, 2, 3, 4)]
DIRECTED = IPv4Address("10.99.0.255").packed
BROADCAST = b"\xff\xff\xff\xff"
VMACS = [b"0123456789abcdef", b"fedcba9876543210", b"00000000ffffffff"]
CIDRS = (
    "10.99.0.7/24", "10.99.0.254/24", "10.99.0.0/24", "10.99.0.255/24", "10.98.0.1/24",
    "0.0.0.0/0", "10.99.0.7/16", "10.99.0.7", "", "garbage", "10.99.0.7/33", "10.99.0.1/24",
    "a" * 31,
)  # fmt: skip
MAX_CONNS = 8
MAX_OPS = 48
_RESPONSE_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + generate_accept_token(_NONCE) + b"\r\n\r\n"
)
_RELAYED = {m.FORWARD: (13, 17), m.PEER: (1, 5), m.DISCOVERY: (1, 5), m.GENERAL: (4, 8)}


@dataclass
class _SrvConn:
    cid: int
    out: _ServerHttp
    gone: bool = False  # closed by the server or lost
    ip: bytes | None = None  # last address held (stays after losing it, as the events say)
    disconnected: bool = False


#: 101 answers to the standard request, already checked with h11 (a fast path).
_VERIFIED_101: set[bytes] = set()


class _ServerHttp:
    """What one fake client reads from the server: the HTTP answer, then frames."""

    def __init__(self, cid: int, nonce: bytes | None, trace: list) -> None:
        self.cid = cid
        self.nonce = nonce
        self.trace = trace
        self.state = "http"
        self.ws = WsStream("server", True, trace)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self.state == "ws":
            return self.ws.feed(data)
        if self.state == "refused":
            raise InvariantViolation(
                "server wrote after refusing the upgrade", data[:64].hex(), self.trace
            )
        end = data.find(b"\r\n\r\n") + 4
        if self.nonce is not None and end > 4 and data[:end] in _VERIFIED_101:
            self.state = "ws"
            return self.ws.feed(data[end:])
        client = _upgrading_h11_client()
        client.receive_data(data)
        try:
            event = client.next_event()
        except h11.RemoteProtocolError as exc:
            raise InvariantViolation(
                "server wrote a malformed HTTP response", f"{exc}: {data[:200]!r}", self.trace
            ) from None
        if event is h11.NEED_DATA:
            raise InvariantViolation(
                "server wrote a partial HTTP response", repr(data[:200]), self.trace
            )
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            accept = _http_headers(event).get(b"sec-websocket-accept")
            if self.nonce is not None and accept != generate_accept_token(self.nonce):
                raise InvariantViolation("server 101 with a wrong accept", repr(accept), self.trace)
            self.state = "ws"
            trailing = bytes(client.trailing_data[0])
            if self.nonce is not None and data.endswith(trailing):
                _VERIFIED_101.add(data[: len(data) - len(trailing)])
            return self.ws.feed(trailing)
        if isinstance(event, h11.Response) and event.status_code in (400, 403):
            self.state = "refused"
            return []
        raise InvariantViolation("server answered the upgrade oddly", repr(event), self.trace)


class ServerProgram:
    """A fresh RelayServer driven by one program; the invariants are checked after every call."""

    def __init__(self, data: bytes) -> None:
        self.r = Reader(data)
        self.trace: list = []
        self.features: set[str] = set()
        setup = self.r.u8()
        cfg = self.r.u8()
        self.max_frame = 1500 if cfg & 1 else 4096  # 1500: the smallest the config allows
        self.dhcp = None if cfg & 4 else NET
        self.server = RelayServer(
            ServerConfig(
                password=PASSWORD,
                dhcp=self.dhcp,
                max_frame=self.max_frame,
                send_queue_limit=2 if cfg & 2 else 1024,
            ),
            random.Random(cfg),
        )
        self.trace.append(
            f"RelayServer(password={PASSWORD!r}, dhcp={self.dhcp}, max_frame={self.max_frame},"
            f" send_queue_limit={2 if cfg & 2 else 1024})"
        )
        self.now = 100.0
        self.wall = float(WALL0)
        self.conns: dict[int, _SrvConn] = {}
        self.order: list[int] = []
        self.owner: dict[bytes, int] = {}
        self.ever_held: set[bytes] = set()
        self.handshakes = 0
        self.calls = 0
        self.owner_before: dict[bytes, int] = {}
        self.split = 0
        self.batch_left = 0
        self.batch: list[bytes] = []
        self.batch_cid: int | None = None
        for i in range(1 + setup % 3):
            cid = self.open(raw=None)
            self.deliver(cid, _setup_frames(i))
            self.handshakes += 2

    # --- running -----------------------------------------------------------------------
    def run(self) -> set[str]:
        ops = (
            self.op_open, self.op_open_raw, self.op_auth, self.op_vmac, self.op_expected,
            self.op_forward, self.op_relay, self.op_control, self.op_frag, self.op_rawframe,
            self.op_rawbytes, self.op_bigheader, self.op_time, self.op_lost, self.op_pause,
            self.op_stale, self.op_split, self.op_batch,
        )  # fmt: skip
        framing = {"op_forward", "op_relay", "op_control", "op_frag", "op_rawframe", "op_auth",
                   "op_vmac", "op_expected"}  # fmt: skip
        count = 0
        while not self.r.exhausted and count < MAX_OPS:
            count += 1
            op = ops[self.r.u8() % len(ops)]
            if op.__name__ not in framing:
                self.flush_batch()
            op()
            self.features.add(op.__name__)
        self.flush_batch()
        self.finish()
        return self.features

    def call(self, what: str, fn: Callable, *args: object, sender: int | None = None) -> None:
        self.trace.append(("server." + what, args))
        held_during = set()
        if sender is not None and sender in self.conns and self.conns[sender].ip is not None:
            held_during.add(self.conns[sender].ip)
        try:
            fn(*args)
        except Exception as exc:
            raise escaped(f"RelayServer.{what}", exc, self.trace) from exc
        self.collect(sender, held_during)

    def pick(self) -> int | None:
        v = self.r.u8()
        return self.order[v % len(self.order)] if self.order else None

    def open(self, raw: bytes | None) -> int:
        cid = len(self.order) + 1
        self.order.append(cid)
        self.conns[cid] = _SrvConn(
            cid, _ServerHttp(cid, None if raw is not None else _NONCE, self.trace)
        )
        self.call("connection_made", self.server.connection_made, cid, self.now, f"fuzz{cid}")
        self.deliver(cid, _REQUEST if raw is None else raw, direct=True)
        return cid

    def deliver(self, cid: int, data: bytes, direct: bool = False) -> None:
        if not direct and self.batch_left > 0:
            if self.batch_cid not in (None, cid):
                self.flush_batch()
            else:
                self.batch.append(data)
                self.batch_cid = cid
                self.batch_left -= 1
                if self.batch_left == 0:
                    self.flush_batch()
                return
        if self.split and len(data) > 1:
            size = max(self.split % 17 + 1, -(-len(data) // 16))  # at most 16 pieces
            for pos in range(0, len(data), size):
                self.receive(cid, data[pos : pos + size])
        else:
            self.receive(cid, data)

    def flush_batch(self) -> None:
        if self.batch and self.batch_cid is not None:
            data, cid = b"".join(self.batch), self.batch_cid
            self.batch, self.batch_cid, self.batch_left = [], None, 0
            self.deliver(cid, data)
        self.batch, self.batch_cid, self.batch_left = [], None, 0

    def receive(self, cid: int, data: bytes) -> None:
        self.now += 0.001
        self.wall += 0.001
        self.call("receive_data", self.server.receive_data, cid, data, self.now, self.wall,
                  sender=cid)  # fmt: skip

    def mask(self) -> bytes:
        return self.r.fixed(4)

    def send_frame(self, cid: int, payload: bytes, opcode: int = 2) -> None:
        self.deliver(cid, ws_frame(opcode, payload, self.mask()))

    def own(self, cid: int) -> bytes:
        return self.conns[cid].ip or IPS[0]

    def pick_ip(self) -> bytes:
        v = self.r.u8()
        choices = (*IPS, DIRECTED, BROADCAST, b"\xe0\x00\x00\x01")
        return choices[v % 8] if v % 8 < 7 else self.r.fixed(4)

    def pick_src(self, cid: int) -> bytes:
        v = self.r.u8()
        sel = v % 6
        if sel == 0 or (sel == 5 and v < 128):
            return self.own(cid)
        if sel == 5:
            return self.r.fixed(4)
        return (IPS[(v >> 3) % 4], b"\x00\x00\x00\x00", DIRECTED, BROADCAST)[sel - 1]

    def pick_dst(self) -> bytes:
        v = self.r.u8()
        sel = v % 8
        if sel < 2:
            return IPS[(v >> 3) % 4]
        choices = (DIRECTED, BROADCAST, b"\xe0\x00\x00\xfb", b"\xef\xff\xff\xfa", b"\x00" * 4)
        return choices[sel - 2] if sel < 7 else self.r.fixed(4)

    def pick_ts(self) -> int:
        v = self.r.u8()
        wall = int(self.wall)
        sel = v % 8
        if sel == 0:
            return wall
        if sel == 1:
            return wall + (v >> 3) % 61 - 30
        if sel == 7:
            return int.from_bytes(self.r.fixed(8), "big", signed=True)
        return (wall - 31, wall + 31, 0, -(2**63), 2**63 - 1)[sel - 2]

    def hashed(self, make: Callable[[str], bytes]) -> bytes:
        mode = self.r.u8() % 4
        if mode == 1:
            return make("wrong-password")
        if mode == 2:
            return self.r.fixed(32)
        return make(PASSWORD)

    # --- operations --------------------------------------------------------------------
    def op_open(self) -> None:
        if len(self.order) < MAX_CONNS:
            self.open(raw=None)

    def op_open_raw(self) -> None:
        mode = self.r.u8() % 3
        if mode == 0:
            raw = self.r.blob()
        elif mode == 1:
            raw = _REQUEST[: self.r.u8()]
        else:
            pos = self.r.u8() * len(_REQUEST) // 256
            raw = _REQUEST[:pos] + bytes((self.r.u8(),)) + _REQUEST[pos + 1 :]
        if len(self.order) < MAX_CONNS and raw:
            self.open(raw=raw)

    def op_auth(self) -> None:
        cid, ip, ts = self.pick(), self.pick_ip(), self.pick_ts()
        digest = self.hashed(lambda pw: auth.auth_hash(pw, ip, ts))
        payload = b"\x00" + ip + struct.pack(">q", ts) + digest + self.r.blob(64)
        if self.r.u8() % 8 == 0:
            payload = payload[: self.r.u8() % 45]
        if cid is not None:
            self.handshakes += 1
            self.send_frame(cid, payload)

    def op_vmac(self) -> None:
        cid, v = self.pick(), self.r.u8()
        vmac = VMACS[v % 3] if v % 4 < 3 else self.r.fixed(16)
        ts = self.pick_ts()
        digest = self.hashed(lambda pw: auth.vmac_hash(pw, vmac, ts))
        if cid is not None:
            self.handshakes += 1
            self.send_frame(cid, b"\x04" + vmac + struct.pack(">q", ts) + digest + self.r.blob(64))

    def op_expected(self) -> None:
        cid, v = self.pick(), self.r.u8()
        raw = CIDRS[v % len(CIDRS)].encode().ljust(32, b"\x00") if v < 0xF0 else self.r.fixed(32)
        ts = self.pick_ts()
        digest = self.hashed(lambda pw: auth.expected_hash(pw, ts))
        payload = b"\x02" + struct.pack(">q", ts) + raw + digest + self.r.blob(64)
        if cid is not None:
            self.send_frame(cid, payload)

    def op_forward(self) -> None:
        cid = self.pick()
        if cid is None:
            return
        v = self.r.u8()
        size = LENGTHS[v % len(LENGTHS)] if v < 0xF0 else self.r.u8()
        src, dst = self.pick_src(cid), self.pick_dst()
        first = self.r.u8()
        packet = ipv4_packet(src, dst, max(size - 1, 0), 0x45 if first < 0xC0 else first)
        self.send_frame(cid, (b"\x01" + packet)[: max(size, 1)])

    def op_relay(self) -> None:
        cid = self.pick()
        if cid is None:
            return
        kind = (m.PEER, m.DISCOVERY, m.GENERAL)[self.r.u8() % 3]
        src, dst, extra, cut = self.pick_src(cid), self.pick_dst(), self.r.blob(32), self.r.u8()
        if kind == m.GENERAL:
            payload = b"\xff" + extra[:3].ljust(3, b"\x00") + src + dst + extra[3:]
        else:
            payload = bytes((kind,)) + src + dst + extra
        if cut < 16:
            payload = payload[: max(len(payload) - cut, 1)]
        self.send_frame(cid, payload)

    def op_control(self) -> None:
        cid = self.pick()
        opcode = (9, 10, 8, 1, 3, 7, 11, 15)[self.r.u8() % 8]
        payload = close_payload_for(self.r) if opcode == 8 else self.r.blob(130)
        flags = self.r.u8()
        mask = None if flags & 0x80 and flags & 0x10 else self.mask()
        rsv = (flags >> 4) & 7 if flags & 0x40 else 0
        if cid is not None:
            self.deliver(cid, ws_frame(opcode, payload, mask, not flags & 0x20, rsv))

    def op_frag(self) -> None:
        cid, mode, dst = self.pick(), self.r.u8(), self.pick_dst()
        parts = [self.r.blob(40) for _ in range(mode % 4 + 1)]
        extra = self.r.u8() if (mode >> 5) % 4 == 3 else 0
        if cid is None:
            return
        if mode & 0x10:  # a FORWARD cut into the fragments
            message = b"\x01" + ipv4_packet(self.own(cid), dst, 40)
            size = len(message) // len(parts) + 1
            parts = [message[i * size : (i + 1) * size] for i in range(len(parts))]
        kind = (mode >> 5) % 4
        count = len(parts) + extra
        out = []
        for i in range(count):
            part = parts[i] if i < len(parts) else b""
            first, last = i == 0, i == count - 1
            opcode = 2 if first and kind != 1 else 0
            if kind == 2 and i == 1:
                opcode = 2  # a new data frame inside a fragmented message
            out.append(ws_frame(opcode, part, self.mask(), fin=last and not mode & 0x80))
            if mode & 0x08 and first:
                out.append(ws_frame(9, b"ping", self.mask()))
        self.deliver(cid, b"".join(out))

    def op_rawframe(self) -> None:
        cid, b0, payload, flags = self.pick(), self.r.u8(), self.r.blob(), self.r.u8()
        mask = None if flags == 0xFF else self.mask()
        if cid is not None:
            self.deliver(cid, ws_frame(b0 & 0x0F, payload, mask, bool(b0 & 0x80), (b0 >> 4) & 7))

    def op_rawbytes(self) -> None:
        cid, data = self.pick(), self.r.blob()
        if cid is not None and data:
            self.deliver(cid, data)

    def op_bigheader(self) -> None:
        cid, v = self.pick(), self.r.u8()
        n = (self.max_frame, self.max_frame + 1, 65535, 65536, 2**63, 2**64 - 1, 126, 0)[v % 8]
        head = bytes((0x82, 0xFF)) + n.to_bytes(8, "big")
        if n < 65536 and v & 0x80:
            head = bytes((0x82, 0xFE)) + n.to_bytes(2, "big")
        if cid is not None:
            self.deliver(cid, head + self.mask() + self.r.blob(64))

    def op_time(self) -> None:
        v = self.r.u8()
        dt = (0.25, 1.0, 1.0, 5.0, 11.0, 26.0, 76.0, (v >> 3) * 3.0)[v % 8]
        self.now += dt
        self.wall += dt
        self.call("handle_timer", self.server.handle_timer, self.now)
        deadline = self.server.next_deadline()
        if deadline is not None and deadline <= self.now:
            raise InvariantViolation(
                "server deadline not in the future after handle_timer",
                f"deadline {deadline}, now {self.now}",
                self.trace,
            )

    def op_lost(self) -> None:
        cid = self.pick()
        if cid is not None:
            self.conns[cid].gone = True
            self.call("connection_lost", self.server.connection_lost, cid, "fuzz: lost")

    def op_pause(self) -> None:
        cid, flag = self.pick(), self.r.u8() & 1
        if cid is not None:
            fn = self.server.resume_writing if flag else self.server.pause_writing
            self.call(fn.__name__, fn, cid)

    def op_stale(self) -> None:
        v, data = self.r.u8(), self.r.blob(32) or b"\x82\x80abcd"
        gone = [c for c in self.order if self.conns[c].gone]
        cid = gone[v % len(gone)] if gone and v & 1 else 999
        self.call("receive_data", self.server.receive_data, cid, data, self.now, self.wall,
                  sender=cid)  # fmt: skip

    def op_split(self) -> None:
        self.split = self.r.u8()

    def op_batch(self) -> None:
        self.flush_batch()
        self.batch_left = self.r.u8() % 4 + 2

    # --- invariants --------------------------------------------------------------------
    def collect(self, sender: int | None, held_during: set[bytes]) -> None:
        server, trace = self.server, self.trace
        # Frames are queued during the call: a receiver may have held its address at the
        # start (then lost it to a takeover later in the same call) or only at the end.
        self.owner_before = dict(self.owner)
        events = []
        while (event := server.next_event()) is not None:
            events.append(event)
        for event in events:
            self.features.add(type(event).__name__)
            conn = self.conns.get(getattr(event, "cid", -1))
            if conn is None:
                raise InvariantViolation("event for an unknown connection", repr(event), trace)
            if isinstance(event, ClientAuthenticated):
                ip = event.ip.packed
                if conn.gone or conn.disconnected:
                    raise InvariantViolation(
                        "a closed connection authenticated", repr(event), trace
                    )
                holder = self.owner.get(ip)
                if holder not in (None, event.cid):
                    raise InvariantViolation(
                        "two connections own one address",
                        f"{event.ip} held by {holder}, authenticated by {event.cid}",
                        trace,
                    )
                if conn.ip is not None and conn.ip != ip and self.owner.get(conn.ip) == event.cid:
                    del self.owner[conn.ip]
                self.owner[ip] = event.cid
                conn.ip = ip
                self.ever_held.add(ip)
                if event.cid == sender:
                    held_during.add(ip)
            elif isinstance(event, ClientDisconnected):
                if conn.disconnected:
                    raise InvariantViolation("ClientDisconnected twice", repr(event), trace)
                conn.disconnected = True
                want = IPv4Address(conn.ip) if conn.ip else None
                if event.ip != want:
                    raise InvariantViolation(
                        "ClientDisconnected names the wrong address",
                        f"{event!r}, held {want}",
                        trace,
                    )
                if conn.ip is not None and self.owner.get(conn.ip) == event.cid:
                    del self.owner[conn.ip]
            elif isinstance(event, AddressAssigned):
                net = self.dhcp
                ip = event.address.ip
                if (
                    net is None
                    or ip not in net
                    or ip in (net.network_address, net.broadcast_address)
                    or event.address.network.prefixlen != net.prefixlen
                ):
                    raise InvariantViolation("server assigned a bad address", repr(event), trace)
        closes = set()
        outputs = server.data_to_send()
        to_close = server.connections_to_close()
        written = set()
        closing_frames = set()
        for cid, data in outputs:
            conn = self.conns.get(cid)
            if conn is None:
                raise InvariantViolation("server wrote to an unknown connection", f"{cid}", trace)
            if cid in written:
                raise InvariantViolation("data_to_send lists a connection twice", f"{cid}", trace)
            written.add(cid)
            if conn.gone:
                raise InvariantViolation(
                    "server wrote to a closed connection", f"{cid}: {data[:64].hex()}", trace
                )
            for opcode, payload in conn.out.feed(data):
                self.check_frame(cid, opcode, payload, sender, held_during)
                if opcode == 8:
                    closing_frames.add(cid)
                    self.features.add(f"close:{_template(payload[2:].decode('utf-8', 'replace'))}")
        for cid in to_close:
            conn = self.conns.get(cid)
            if conn is None or cid in closes:
                raise InvariantViolation("bad connections_to_close entry", f"{cid}", trace)
            closes.add(cid)
            if not conn.disconnected:
                raise InvariantViolation(
                    "connection closed without a ClientDisconnected event", f"{cid}", trace
                )
        for cid in closing_frames - closes:
            raise InvariantViolation(
                "CLOSE frame sent but the connection is not closed", f"{cid}", trace
            )
        for cid in closes:
            # What a shell does: close the socket, then report it gone.
            self.conns[cid].gone = True
            self.trace.append(f"server.connection_lost({cid}) [after connections_to_close]")
            try:
                server.connection_lost(cid, "closed")
            except Exception as exc:
                raise escaped("RelayServer.connection_lost", exc, trace) from exc
            if server.next_event() is not None or server.data_to_send():
                raise InvariantViolation(
                    "connection_lost after a close produced more output", f"{cid}", trace
                )
        self.calls += 1
        if not events and not to_close and self.calls % 8:
            return  # ownership only changes with events; still compared every 8th call
        public = {ip.packed: cid for ip, cid in server.clients.items()}
        if public != self.owner:
            raise InvariantViolation(
                "server.clients disagrees with the events",
                f"clients {server.clients}, events say {self.owner}",
                trace,
            )
        if len(set(public.values())) != len(public):
            raise InvariantViolation("one connection holds two addresses", f"{public}", trace)
        for cid in public.values():
            if self.conns[cid].gone:
                raise InvariantViolation(
                    "a closed connection still holds an address", f"{cid}", trace
                )

    def check_frame(
        self, cid: int, opcode: int, payload: bytes, sender: int | None, held_during: set[bytes]
    ) -> None:
        trace = self.trace
        if opcode == 10 and cid != sender:
            raise InvariantViolation("PONG to a connection that did not ping", f"{cid}", trace)
        if opcode == 9 and sender is not None:
            raise InvariantViolation("server PING outside its timer", f"{cid}", trace)
        if opcode == 1:
            raise InvariantViolation("server sent a text frame", payload[:64].hex(), trace)
        if opcode != 2:
            return
        if not payload:
            raise InvariantViolation("server sent an empty binary frame", f"{cid}", trace)
        kind = payload[0]
        if cid == sender:
            if kind != m.EXPECTED:
                raise InvariantViolation(
                    "server sent a connection its own message back", payload[:64].hex(), trace
                )
            reply = m.decode(payload)
            assert isinstance(reply, m.Expected)
            if not reply.verify(PASSWORD) or IPv4Interface(reply.cidr).ip not in NET:
                raise InvariantViolation("server EXPECTED reply is bad", repr(reply), trace)
            self.features.add("expected-reply")
            return
        offsets = _RELAYED.get(kind)
        if offsets is None:
            raise InvariantViolation(
                "server relayed an unexpected message type", payload[:64].hex(), trace
            )
        src_at, dst_at = offsets
        if len(payload) < dst_at + 4:
            raise InvariantViolation("server relayed a truncated message", payload.hex(), trace)
        src, dst = payload[src_at : src_at + 4], payload[dst_at : dst_at + 4]
        receiver = self.conns[cid]
        if receiver.ip is None or cid not in (
            self.owner.get(receiver.ip),
            self.owner_before.get(receiver.ip),
        ):
            raise InvariantViolation(
                "server relayed to an unauthenticated connection", f"{cid}", trace
            )
        if sender is not None:
            if src not in held_during:
                raise InvariantViolation(
                    "server relayed a spoofed source",
                    f"type {kind} src {IPv4Address(src)} from connection {sender} holding "
                    f"{[str(IPv4Address(i)) for i in held_during]}",
                    trace,
                )
        elif src not in self.ever_held:
            raise InvariantViolation("server released a spoofed frame", payload.hex(), trace)
        if dst != receiver.ip:
            group = (
                dst == BROADCAST if kind != m.FORWARD else dst == DIRECTED or 224 <= dst[0] <= 239
            )
            if kind == m.FORWARD and self.dhcp is None:
                group = 224 <= dst[0] <= 239
            if not group:
                raise InvariantViolation(
                    "server delivered a frame to the wrong connection",
                    f"dst {IPv4Address(dst)} delivered to {cid} holding {IPv4Address(receiver.ip)}",
                    trace,
                )
        self.features.add(f"relay:{kind}")

    def finish(self) -> None:
        self.features |= _stat_features("stat", self.server.stats)
        for cid in self.order:
            if not self.conns[cid].gone:
                self.conns[cid].gone = True
                self.call("connection_lost", self.server.connection_lost, cid, "fuzz: end")
        if self.server.clients:
            raise InvariantViolation(
                "addresses still held after every connection ended",
                f"{self.server.clients}",
                self.trace,
            )
        missing = [cid for cid in self.order if not self.conns[cid].disconnected]
        if missing:
            raise InvariantViolation(
                "connections ended without ClientDisconnected", f"{missing}", self.trace
            )
        items, _ = held(self.server)
        if items > 64 + 2 * self.handshakes:
            raise InvariantViolation(
                "server keeps state for connections that are gone",
                f"{items} container items held, {self.handshakes} handshakes sent",
                self.trace,
            )


_SETUP_CACHE: dict[int, bytes] = {}


def _setup_frames(i: int) -> bytes:
    """VMAC and AUTH (for IPS[i], at WALL0) as masked frames: a client joining."""
    if i not in _SETUP_CACHE:
        vmac = m.Vmac.create(PASSWORD, VMACS[i % 3], WALL0).encode()
        auth = m.Auth.create(PASSWORD, IPv4Address(IPS[i]), WALL0).encode()
        _SETUP_CACHE[i] = ws_frame(2, vmac, b"\x01\x02\x03\x04") + ws_frame(
            2, auth, b"\x05\x06\x07\x08"
        )
    return _SETUP_CACHE[i]


def fuzz_server(data: bytes) -> set[str]:
    """RelayServer fed hostile frames and bytes after valid handshakes, on 1 to 8 connections.

    Checks after every call: nothing escapes the core; what it writes is a valid HTTP answer
    then valid unmasked frames (wsproto), nothing after a CLOSE or a refusal, a CLOSE always
    followed by closing; relayed frames carry the sender's own source address, go only to
    authenticated connections holding the destination (or to everyone for broadcast); no two
    connections own one address and ``clients`` matches the events; when every connection
    has ended nothing is held for them.
    """
    with quiet_logs():
        return ServerProgram(data).run()


# =============================================================================================
# The client core
# =============================================================================================
OWN = IPv4Address("10.99.0.1").packed
PEERS = [IPv4Address(f"10.99.0.{i}").packed for i in (2, 3, 4)]
STUN_ADDR = ("192.0.2.100", 3478)
PEER_ADDRS = (("198.51.100.2", 40000), ("198.51.100.3", 40001), ("192.168.1.20", 50000))


class _ClientOut:
    """What the server reads from the client on one connection: the request, then frames."""

    def __init__(self, trace: list) -> None:
        self.trace = trace
        self.state = "request"
        self.ws = WsStream("client", False, trace)
        self.accepted = False
        self.auth_ip: bytes | None = None
        self.received = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self.state == "request":
            if not data.startswith(b"GET ") or b"\r\n\r\n" not in data:
                raise InvariantViolation(
                    "client upgrade request is malformed", repr(data[:200]), self.trace
                )
            rest = data.partition(b"\r\n\r\n")[2]
            self.state = "frames"
            data = rest
        if data and not self.accepted and _is_valid_101(self.received):
            self.accepted = True
        if data and not self.accepted:
            raise InvariantViolation(
                "client sent frames before its upgrade was accepted", data[:64].hex(), self.trace
            )
        return self.ws.feed(data)


class ClientProgram:
    """A fresh Client driven by one program; the invariants are checked after every call."""

    def __init__(self, data: bytes) -> None:
        self.r = Reader(data)
        self.trace: list = []
        self.features: set[str] = set()
        cfg = self.r.u8()
        self.route = (5, 0, 1000, 5)[cfg & 3]
        dynamic = bool(cfg & 4)
        self.config = ClientConfig(
            password=PASSWORD,
            tun=None if dynamic else IPv4Interface("10.99.0.1/24"),
            host="relay.example",
            port=80,
            stun=None if cfg & 8 and cfg & 0x80 else STUN_ADDR,
            localhost=None if cfg & 0x40 else "192.168.1.2",
            route=self.route,
            discovery=1 if cfg & 0x10 else 0,
            confusion=bool(cfg & 0x20),
        )
        self.trace.append(f"Client({self.config!r})")
        self.client = Client(self.config, random.Random(cfg), ClientState(VMACS[0]))
        self.cipher = PeerCipher(random.Random(1))
        self.now = 1000.0
        self.wall = float(WALL0)
        self.out: _ClientOut | None = None
        self.sent: list[bytes] = []
        self.tids: list[bytes] = []
        self.split = 0
        self.hostile_upgrade: bytes | None = None
        self.mentioned: set[bytes] = {OWN, *PEERS}
        self.keys: dict[bytes, bytes] = {}
        self.chains: dict[IPv4Address, str] = {}
        self.servicing = False
        self.closed = False
        self.call("start", self.client.start, self.now)
        self.call("udp_bound", self.client.udp_bound, 40000)
        if dynamic:
            reply = m.Expected.create(PASSWORD, "10.99.0.1/24", WALL0).encode()
            self.server_send(ws_frame(2, reply))

    # --- plumbing ----------------------------------------------------------------------
    def run(self) -> set[str]:
        ops = (
            self.op_s_forward, self.op_s_peer, self.op_s_discovery, self.op_s_general,
            self.op_s_expected, self.op_s_rawmsg, self.op_s_control, self.op_s_rawbytes,
            self.op_d_sealed, self.op_d_raw, self.op_d_stun, self.op_tun, self.op_time,
            self.op_conn, self.op_split, self.op_replay,
        )  # fmt: skip
        count = 0
        while not self.r.exhausted and count < MAX_OPS:
            count += 1
            op = ops[self.r.u8() % len(ops)]
            op()
            self.features.add(op.__name__)
        self.features |= _stat_features("stat", self.client.stats)
        self.features |= _stat_features("peerstat", self.client.peers.stats)
        return self.features

    def call(self, what: str, fn: Callable, *args: object) -> None:
        self.trace.append(("client." + what, args))
        try:
            fn(*args)
        except Exception as exc:
            raise escaped(f"Client.{what}", exc, self.trace) from exc
        self.service()

    def own(self) -> bytes:
        address = self.client.address
        return address.ip.packed if address is not None else OWN

    def key_of(self, ip: bytes) -> bytes:
        key = self.keys.get(ip)
        if key is None:
            key = self.keys[ip] = peer_key(PASSWORD, ip)
        return key

    def server_send(self, data: bytes) -> None:
        if self.out is not None:
            self.out.received += data
        self.now += 0.001
        self.wall += 0.001
        if self.split and len(data) > 1:
            size = max(self.split % 17 + 1, -(-len(data) // 16))  # at most 16 pieces
            for pos in range(0, len(data), size):
                self.call("receive_data", self.client.receive_data, data[pos : pos + size],
                          self.now, self.wall)  # fmt: skip
        else:
            self.call("receive_data", self.client.receive_data, data, self.now, self.wall)

    def server_msg(self, payload: bytes) -> None:
        self.server_send(ws_frame(2, payload))

    def datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append(data)
        self.now += 0.001
        self.call("receive_datagram", self.client.receive_datagram, data, addr, self.now)

    def pick_ip(self) -> bytes:
        v = self.r.u8()
        sel = v % 7
        if sel < 2:
            return PEERS[(v >> 3) % 3]
        if sel == 6:
            ip = self.r.fixed(4)
            self.mentioned.add(ip)
            return ip
        return (self.own(), BROADCAST, b"\x00\x00\x00\x00", DIRECTED)[sel - 2]

    def pick_addr(self) -> tuple[str, int]:
        v = self.r.u8() % 5
        if v < 3:
            return PEER_ADDRS[v]
        return STUN_ADDR if v == 3 else ("203.0.113.9", self.r.uint(2))

    # --- server bytes ------------------------------------------------------------------
    def op_s_forward(self) -> None:
        v = self.r.u8()
        size = LENGTHS[v % len(LENGTHS)] if v < 0xF0 else self.r.u8()
        src, dst, first = self.pick_ip(), self.pick_ip(), self.r.u8()
        packet = ipv4_packet(src, dst, max(size - 1, 0), 0x45 if first < 0xC0 else first)
        self.server_msg((b"\x01" + packet)[: max(size, 1)])

    def op_s_peer(self) -> None:
        src, dst, v, port = self.pick_ip(), self.pick_ip(), self.r.u8(), self.r.uint(2)
        ip = IPv4Address(PEER_ADDRS[v % 3][0]).packed if v % 4 < 3 else self.r.fixed(4)
        self.server_msg(b"\x03" + src + dst + ip + struct.pack(">H", port))

    def op_s_discovery(self) -> None:
        self.server_msg(b"\x05" + self.pick_ip() + self.pick_ip())

    def op_s_general(self) -> None:
        subtype, extra = self.r.u8(), self.r.u8()
        subtype = 0 if subtype % 4 else subtype
        src, dst, v = self.pick_ip(), self.pick_ip(), self.r.u8()
        if v % 3:
            body = IPv4Address(PEER_ADDRS[v % 3][0]).packed + struct.pack(">H", self.r.uint(2))
        else:
            body = self.r.blob(16)
        self.server_msg(bytes((0xFF, subtype, 0, extra)) + src + dst + body)

    def op_s_expected(self) -> None:
        v = self.r.u8()
        raw = CIDRS[v % len(CIDRS)].encode().ljust(32, b"\x00") if v < 0xF0 else self.r.fixed(32)
        ts = pick_i64(self.r, int(self.wall))
        mode = self.r.u8() % 3
        pw = PASSWORD if mode == 0 else "wrong"
        digest = auth.expected_hash(pw, ts) if mode < 2 else self.r.fixed(32)
        self.server_msg(b"\x02" + struct.pack(">q", ts) + raw + digest + self.r.blob(16))

    def op_s_rawmsg(self) -> None:
        self.server_msg(self.r.blob())

    def op_s_control(self) -> None:
        opcode = (9, 10, 8, 1, 3, 7, 11, 0)[self.r.u8() % 8]
        payload = close_payload_for(self.r) if opcode == 8 else self.r.blob(130)
        flags = self.r.u8()
        mask = self.r.fixed(4) if flags & 0x80 and flags & 0x10 else None
        rsv = (flags >> 4) & 7 if flags & 0x40 else 0
        self.server_send(ws_frame(opcode, payload, mask, not flags & 0x20, rsv))

    def op_s_rawbytes(self) -> None:
        data = self.r.blob()
        if data:
            self.server_send(data)

    # --- datagrams ---------------------------------------------------------------------
    def op_d_sealed(self) -> None:
        addr, kv, kind = self.pick_addr(), self.r.u8(), self.r.u8() % 6
        if kind == 0:
            tun, ip, port, ack = self.pick_ip(), self.pick_ip(), self.r.uint(2), self.r.u8()
            plain = struct.pack(">B4s4sHB", 0, tun, ip, port, ack & 1 if ack < 0xF0 else ack)
        elif kind == 1:
            src, dst = self.pick_ip(), self.pick_ip()
            plain = struct.pack(">B4s4sq", 2, src, dst, pick_i64(self.r, int(self.now * 1000)))
        elif kind == 2:
            plain = struct.pack(">B4s4si", 4, self.pick_ip(), self.pick_ip(), pick_i32(self.r))
        elif kind == 3:
            v = self.r.u8()
            src, dst = self.pick_ip(), self.pick_ip()
            plain = b"\x01" + ipv4_packet(src, dst, LENGTHS[v % len(LENGTHS)])
        elif kind == 4:
            plain = self.r.blob(64)
        else:
            plain = b""
        key = (self.key_of(self.own()), self.key_of(self.own()), self.key_of(PEERS[0]))
        chosen = key[kv % 3] if kv % 4 < 3 else self.r.fixed(32)
        self.datagram(self.cipher.seal(chosen, plain), addr)

    def op_d_raw(self) -> None:
        addr, data = self.pick_addr(), self.r.blob()
        self.datagram(data, addr)

    def op_d_stun(self) -> None:
        mode, v, port = self.r.u8() % 4, self.r.u8(), self.r.uint(2)
        tid = self.tids[v % len(self.tids)] if self.tids and mode != 3 else self.r.fixed(12)
        ip = ("198.51.100.99", "0.0.0.0", "255.255.255.255", "203.0.113.9")[v % 4]
        if mode == 0:
            data = stun.build_binding_response(tid, ip, port)
        elif mode == 1:
            value = struct.pack("!xBH4s", 1, port, IPv4Address(ip).packed)
            body = struct.pack("!HH", 0x0001, 8) + value
            data = struct.pack("!HHI12s", 0x0101, len(body), stun.MAGIC_COOKIE, tid) + body
        else:
            body = self.r.blob(40)
            data = struct.pack("!HHI12s", 0x0101, len(body), stun.MAGIC_COOKIE, tid) + body
        self.datagram(data, STUN_ADDR)

    def op_replay(self) -> None:
        v, addr = self.r.u8(), self.pick_addr()
        if self.sent:
            self.datagram(self.sent[v % len(self.sent)], addr)

    # --- TUN, time, connection ---------------------------------------------------------
    def op_tun(self) -> None:
        v = self.r.u8()
        size = LENGTHS[v % len(LENGTHS)] if v < 0xF0 else self.r.u8()
        src = self.own() if self.r.u8() % 4 else self.pick_ip()
        dst, first = self.pick_ip(), self.r.u8()
        packet = ipv4_packet(src, dst, size, 0x45 if first < 0xC0 else first)
        self.now += 0.001
        self.call("receive_packet", self.client.receive_packet, packet, self.now)

    def op_time(self) -> None:
        v = self.r.u8()
        dt = (0.2, 1.0, 1.0, 3.0, 11.0, 16.0, 31.0, (v >> 3) * 2.0)[v % 8]
        self.now += dt
        self.wall += dt
        self.timers()

    def timers(self) -> None:
        for _ in range(4):
            deadline = self.client.next_deadline()
            if deadline is None or deadline > self.now:
                return
            self.call("handle_timer", self.client.handle_timer, self.now)
        raise InvariantViolation(
            "client deadline stays in the past (busy loop)",
            f"deadline {self.client.next_deadline()}, now {self.now}",
            self.trace,
        )

    def op_conn(self) -> None:
        mode = self.r.u8() % 5
        if mode == 0:
            self.out = None  # the socket is gone: nothing may be written until a new one
            self.call("connection_lost", self.client.connection_lost, self.now, "fuzz: lost")
        elif mode == 1:
            self.call("connection_failed", self.client.connection_failed, self.now, "fuzz: refused")
        elif mode == 2:
            self.closed = True
            self.call("close", self.client.close)
        elif mode == 3:
            self.hostile_upgrade = self.r.blob()
        else:
            self.now += 40.0
            self.wall += 40.0
            self.timers()

    def op_split(self) -> None:
        self.split = self.r.u8()

    # --- invariants --------------------------------------------------------------------
    def service(self) -> None:
        if self.servicing:
            return
        self.servicing = True
        try:
            self._service()
        finally:
            self.servicing = False

    def _service(self) -> None:
        client, trace = self.client, self.trace
        while (event := client.next_event()) is not None:
            self.check_event(event)
        data = client.data_to_send()
        if data:
            if self.out is None:
                raise InvariantViolation(
                    "client wrote after close()"
                    if self.closed
                    else "client wrote without a connection",
                    data[:64].hex(),
                    trace,
                )
            for opcode, payload in self.out.feed(data):
                self.check_client_frame(opcode, payload)
        if client.take_close_request():
            self.out = None
            self.features.add("closed")
        for packet in client.packets_to_deliver():
            if len(packet) < 20 or packet[0] >> 4 != 4:
                raise InvariantViolation(
                    "client delivered a non-IPv4 packet to TUN", packet.hex(), trace
                )
        for datagram, addr in client.datagrams_to_send():
            self.check_datagram(datagram, addr)
        if len(client.peers.peer_status()) > MAX_PEERS:
            raise InvariantViolation("client tracks more than MAX_PEERS peers", "", trace)
        if client.take_connect_request():
            self.connect()

    def connect(self) -> None:
        self.out = _ClientOut(self.trace)
        self.trace.append(("client.connection_made", (self.now, _NONCE)))
        try:
            self.client.connection_made(self.now, _NONCE)
        except Exception as exc:
            raise escaped("Client.connection_made", exc, self.trace) from exc
        self._service()
        response, self.hostile_upgrade = self.hostile_upgrade or _RESPONSE_101, None
        if self.out is not None and (response == _RESPONSE_101 or _is_valid_101(response)):
            self.out.accepted = True
        if self.out is not None:
            self.out.received += response
        self.trace.append(("client.receive_data", (response, self.now, self.wall)))
        try:
            self.client.receive_data(response, self.now, self.wall)
        except Exception as exc:
            raise escaped("Client.receive_data", exc, self.trace) from exc
        self._service()
        self.features.add("connected")

    def check_event(self, event: object) -> None:
        trace = self.trace
        self.features.add(type(event).__name__)
        if isinstance(event, PeerStateChanged):
            state = self.chains.get(event.ip, "INIT")
            if event.old != state or event.new == event.old or not event.reason:
                raise InvariantViolation(
                    "peer state events do not chain", f"{event!r} after {state}", trace
                )
            self.chains[event.ip] = event.new
            self.features.add(f"peer:{event.new}")
        elif isinstance(event, AddressChanged | Connected):
            address = event.address
            if address.network.prefixlen == 0 or address.ip == IPv4Address(0):
                raise InvariantViolation("client took an unusable address", repr(event), trace)
        elif isinstance(event, Reconnecting):
            if not 0 <= event.delay <= self.config.backoff_max:
                raise InvariantViolation("reconnect delay out of bounds", repr(event), trace)
        elif isinstance(event, Disconnected) and not event.reason:
            raise InvariantViolation("Disconnected without a reason", repr(event), trace)

    def check_client_frame(self, opcode: int, payload: bytes) -> None:
        trace = self.trace
        assert self.out is not None
        if opcode == 1:
            raise InvariantViolation("client sent a text frame", payload.hex(), trace)
        if opcode != 2:
            return
        try:
            msg = m.decode(payload)
        except CandyError as exc:
            raise InvariantViolation("client sent a malformed message", f"{exc}", trace) from None
        name = type(msg).__name__
        self.features.add(f"sent:{name}")
        if isinstance(msg, m.Auth | m.Vmac | m.Expected):
            if not msg.verify(PASSWORD):
                raise InvariantViolation("client handshake does not verify", repr(msg), trace)
            if isinstance(msg, m.Auth):
                self.out.auth_ip = msg.ip.packed
            return
        if isinstance(msg, m.Unknown):
            raise InvariantViolation("client sent an unknown message type", payload.hex(), trace)
        if self.out.auth_ip is None:
            raise InvariantViolation("client sent traffic before AUTH", f"{name}", trace)
        src = msg.packet[12:16] if isinstance(msg, m.Forward) else msg.src.packed  # type: ignore[union-attr]
        if src != self.out.auth_ip:
            raise InvariantViolation(
                "client sent a foreign source address",
                f"{name} from {IPv4Address(src)}, authenticated as {IPv4Address(self.out.auth_ip)}",
                trace,
            )

    def check_datagram(self, datagram: bytes, addr: tuple[str, int]) -> None:
        trace = self.trace
        try:
            IPv4Address(addr[0])
            ok = isinstance(addr[1], int) and 0 <= addr[1] <= 0xFFFF
        except (ValueError, TypeError, IndexError):
            ok = False
        if not ok:
            raise InvariantViolation("client sends a datagram to a bad address", f"{addr!r}", trace)
        if addr == STUN_ADDR and stun.looks_like_stun(datagram):
            msg_type, length = struct.unpack_from("!HH", datagram)
            if msg_type != stun.BINDING_REQUEST or length != len(datagram) - 20:
                raise InvariantViolation("client STUN request is malformed", datagram.hex(), trace)
            self.tids.append(datagram[8:20])
            self.features.add("stun-request")
            return
        if len(datagram) < OVERHEAD:
            raise InvariantViolation("client sent a short datagram", datagram.hex(), trace)
        known = self.mentioned | {s.ip.packed for s in self.client.peers.peer_status()}
        for ip in known:
            plain = self.cipher.open(self.key_of(ip), datagram)
            if plain is not None:
                break
        else:
            raise InvariantViolation(
                "client sent a datagram no peer key opens",
                f"to {addr}: {datagram[:48].hex()}",
                trace,
            )
        own = self.own()
        kind = plain[0] if plain else None
        if kind == pm.HEARTBEAT and len(plain) >= 12 and plain[1:5] == own:
            self.features.add("dgram:heartbeat")
        elif kind == pm.ROUTE and len(plain) >= 13 and plain[5:9] == own:
            self.features.add("dgram:route")
        elif kind == pm.DELAY and len(plain) >= 17 and own in (plain[1:5], plain[5:9]):
            self.features.add("dgram:delay")
        elif kind == pm.FORWARD and len(plain) >= 21 and plain[1] >> 4 == 4:
            self.features.add("dgram:forward")
        else:
            raise InvariantViolation("client sealed an odd peer message", plain.hex(), trace)


def _is_valid_101(response: bytes) -> bool:
    upgrade = ClientUpgrade("relay.example", 80, "/", _NONCE)
    upgrade.request()
    try:
        return upgrade.receive(response).accepted
    except CandyError:
        return False


def fuzz_client(data: bytes) -> set[str]:
    """Client fed hostile server bytes (after the 101), hostile datagrams and TUN packets.

    Datagrams are mostly sealed with the client's own key (a network member can), carrying
    HEARTBEAT, DELAY, ROUTE and FORWARD with extreme fields; STUN answers come from the
    configured STUN address. Checks after every call: nothing escapes the core; what it
    writes is the upgrade request then valid masked frames (wsproto), nothing after its
    CLOSE, handshakes that verify, traffic only after AUTH and only from its own address;
    datagrams go to valid endpoints and open with a peer key to a sane peer message;
    TUN gets IPv4 packets only; peer state events chain; at most MAX_PEERS peers; timers
    never ask to run in the past after running.
    """
    with quiet_logs():
        return ClientProgram(data).run()


# =============================================================================================
# Memory floods: many hostile inputs of one kind, the held state must level off
# =============================================================================================
def _level_off(name: str, measure: Callable[[int], tuple[int, int]], n: int) -> None:
    """``measure(k)`` feeds k more inputs and returns held(); growth must stop."""
    items1, bytes1 = measure(n // 2)
    items2, bytes2 = measure(n - n // 2)
    cost1, cost2 = bytes1 + 8 * items1, bytes2 + 8 * items2
    if cost2 > cost1 * 1.05 + 4096:
        raise InvariantViolation(
            f"{name}: held state grows with hostile input",
            f"after {n // 2} inputs: {items1} items, {bytes1} bytes; "
            f"after {n}: {items2} items, {bytes2} bytes",
        )


def flood_wsframe_empty_fragments(n: int = 40000) -> None:
    """Empty continuation frames of an unfinished message (6 bytes each)."""
    parser = FrameParser(4096, expect_mask=True)
    parser.feed(ws_frame(2, b"x", b"abcd", fin=False))
    frame = ws_frame(0, b"", b"abcd", fin=False)

    def measure(k: int) -> tuple[int, int]:
        parser.feed(frame * k)
        return held(parser)

    _level_off("FrameParser", measure, n)


def _joined_server(count: int, **kw: object) -> tuple[RelayServer, list[int]]:
    server = RelayServer(ServerConfig(password=PASSWORD, dhcp=NET, **kw), random.Random(0))  # type: ignore[arg-type]
    cids = []
    for i in range(count):
        server.connection_made(i + 1, 100.0)
        server.receive_data(i + 1, _REQUEST + _setup_frames(i), 100.0, WALL0)
        cids.append(i + 1)
    server.data_to_send()
    while server.next_event():
        pass
    assert len(server.clients) == count
    return server, cids


def flood_server_empty_fragments(n: int = 40000) -> None:
    with quiet_logs():
        server, _ = _joined_server(1)
        server.receive_data(1, ws_frame(2, b"\x01", b"abcd", fin=False), 100.0, WALL0)
        frame = ws_frame(0, b"", b"abcd", fin=False)

        def measure(k: int) -> tuple[int, int]:
            server.receive_data(1, frame * k, 100.0, WALL0)
            server.data_to_send()
            return held(server)

        _level_off("RelayServer (empty fragments)", measure, n)


def flood_server_unknown_types(n: int = 20000) -> None:
    with quiet_logs():
        server, _ = _joined_server(1)
        frames = [ws_frame(2, bytes((t,)) + b"junk", b"abcd") for t in range(6, 255)]

        def measure(k: int) -> tuple[int, int]:
            server.receive_data(
                1, b"".join(frames[i % len(frames)] for i in range(k)), 100.0, WALL0
            )
            server.data_to_send()
            return held(server)

        _level_off("RelayServer (unknown types)", measure, n)


def flood_server_connections(n: int = 4000) -> None:
    """Connections that open, half-send a request or frames, and vanish."""
    with quiet_logs():
        server, _ = _joined_server(1)
        counter = [10]

        def measure(k: int) -> tuple[int, int]:
            for _ in range(k):
                cid = counter[0] = counter[0] + 1
                server.connection_made(cid, 100.0)
                server.receive_data(cid, _REQUEST[: cid % len(_REQUEST)], 100.0, WALL0)
                if cid % 3 == 0:
                    server.receive_data(cid, _REQUEST, 100.0, WALL0)
                server.connection_lost(cid)
                server.data_to_send()
                server.connections_to_close()
                while server.next_event():
                    pass
            return held(server)

        _level_off("RelayServer (connections)", measure, n)


def flood_server_paused_backlog(n: int = 20000) -> None:
    """A reader that never drains while another client relays to it."""
    with quiet_logs():
        server, _ = _joined_server(2, send_queue_limit=64)
        server.pause_writing(2)
        frame = ws_frame(2, b"\x01" + ipv4_packet(IPS[0], IPS[1], 60), b"abcd")

        def measure(k: int) -> tuple[int, int]:
            for _ in range(k // 100):
                server.receive_data(1, frame * 100, 100.0, WALL0)
                server.data_to_send()
            return held(server)

        _level_off("RelayServer (paused backlog)", measure, n)


def _connected_client(route: int = 5) -> tuple[Client, PeerCipher, float]:
    """A static client joined to a fake server, with PEERS[0] CONNECTED over UDP."""
    cfg = ClientConfig(
        password=PASSWORD,
        tun=IPv4Interface("10.99.0.1/24"),
        stun=STUN_ADDR,
        localhost="192.168.1.2",
        route=route,
    )
    client = Client(cfg, random.Random(0), ClientState(VMACS[0]))
    now = 1000.0
    client.start(now)
    client.udp_bound(40000)
    assert client.take_connect_request()
    client.connection_made(now, _NONCE)
    client.receive_data(_RESPONSE_101, now, WALL0)
    assert client.authenticated
    client.receive_data(ws_frame(2, b"\x05" + PEERS[0] + OWN), now, WALL0)
    cipher = PeerCipher(random.Random(5))
    hb = struct.pack(">B4s4sHB", 0, PEERS[0], IPv4Address(PEER_ADDRS[0][0]).packed, 40000, 1)
    client.receive_datagram(cipher.seal(peer_key(PASSWORD, OWN), hb), PEER_ADDRS[0], now)
    states = {s.ip.packed: s.state for s in client.peers.peer_status()}
    assert states.get(PEERS[0]) == "CONNECTED", states
    _drain_client(client)
    return client, cipher, now


def _drain_client(client: Client) -> None:
    client.data_to_send()
    client.datagrams_to_send()
    client.packets_to_deliver()
    while client.next_event():
        pass


def flood_client_discovery(n: int = 10000) -> None:
    """DISCOVERY from ever new sources: the peer table must stop at MAX_PEERS."""
    with quiet_logs():
        client, _, now = _connected_client()
        counter = [0]

        def measure(k: int) -> tuple[int, int]:
            frames = []
            for _ in range(k):
                counter[0] += 1
                src = (0x0A000000 + 0x10000 + counter[0]).to_bytes(4, "big")
                frames.append(ws_frame(2, b"\x05" + src + BROADCAST))
            client.receive_data(b"".join(frames), now, WALL0)
            _drain_client(client)
            return held(client)

        _level_off("Client (discovery)", measure, n)
        if len(client.peers.peer_status()) > MAX_PEERS:
            raise InvariantViolation("Client (discovery): over MAX_PEERS peers", "")


def flood_client_routes(n: int = 20000) -> None:
    """A CONNECTED peer announcing ever new destinations: the route table must level off."""
    with quiet_logs():
        client, cipher, now = _connected_client()
        key = peer_key(PASSWORD, OWN)
        # Measure the direct path first so ROUTE announcements through PEERS[0] count.
        probe = struct.pack(">B4s4sq", 2, OWN, PEERS[0], int(now * 1000) - 5)
        client.receive_datagram(cipher.seal(key, probe), PEER_ADDRS[0], now)
        counter = [0]

        def measure(k: int) -> tuple[int, int]:
            for _ in range(k):
                counter[0] += 1
                dst = (0x0B000000 + counter[0]).to_bytes(4, "big")
                route = struct.pack(">B4s4si", 4, dst, PEERS[0], 10)
                client.receive_datagram(cipher.seal(key, route), PEER_ADDRS[0], now)
            _drain_client(client)
            return held(client)

        _level_off("Client (routes)", measure, n)


def flood_client_sources(n: int = 60000) -> None:
    """Valid datagrams from ever new UDP source addresses: one replay window for them all
    (8192 IVs) and the heartbeat memory (16384) fill up, then hold steady."""
    with quiet_logs():
        client, cipher, now = _connected_client()
        key = peer_key(PASSWORD, OWN)
        counter = [0]

        def measure(k: int) -> tuple[int, int]:
            for _ in range(k):
                counter[0] += 1
                hb = struct.pack(">B4s4sHB", 0, PEERS[1], OWN, 1, 0)
                client.receive_datagram(
                    cipher.seal(key, hb), ("203.0.113.1", counter[0] % 65536), now
                )
            _drain_client(client)
            return held(client)

        _level_off("Client (UDP sources)", measure, n)


def flood_client_empty_fragments(n: int = 40000) -> None:
    with quiet_logs():
        client, _, now = _connected_client()
        client.receive_data(ws_frame(2, b"\x01", fin=False), now, WALL0)
        frame = ws_frame(0, b"", fin=False)

        def measure(k: int) -> tuple[int, int]:
            client.receive_data(frame * k, now, WALL0)
            _drain_client(client)
            return held(client)

        _level_off("Client (empty fragments)", measure, n)


FLOODS: dict[str, Callable[..., None]] = {
    "wsframe_empty_fragments": flood_wsframe_empty_fragments,
    "server_empty_fragments": flood_server_empty_fragments,
    "server_unknown_types": flood_server_unknown_types,
    "server_connections": flood_server_connections,
    "server_paused_backlog": flood_server_paused_backlog,
    "client_discovery": flood_client_discovery,
    "client_routes": flood_client_routes,
    "client_sources": flood_client_sources,
    "client_empty_fragments": flood_client_empty_fragments,
}


# =============================================================================================
# Seeds and the registry
# =============================================================================================
def _vector_messages() -> list[bytes]:
    out = [bytes.fromhex(v["message_hex"]) for v in load_vectors("protocol")["websocket"]]
    out += [bytes.fromhex(v["hex"]) for v in load_vectors("captured-5.6")["websocket"]]
    return out


def _seeds_messages() -> list[bytes]:
    out = [b"\x80" + msg for msg in _vector_messages()]
    out += [
        b"\x80"
        + m.Peer(IPv4Address(OWN), IPv4Address(PEERS[0]), IPv4Address("1.2.3.4"), 5).encode(),
        b"\x80" + m.Discovery(IPv4Address(OWN), m.BROADCAST).encode(),
        b"\x80"
        + m.General.lan_endpoint(
            IPv4Address(OWN), IPv4Address(PEERS[0]), IPv4Address("192.168.1.2"), 4
        ).encode(),
        b"\x80\x06unknown",
        b"\x80" + b"\x02" + bytes(8) + b"a" * 32 + bytes(32),
    ]
    return out


def _seeds_wsframe() -> list[bytes]:
    out = []
    for i, msg in enumerate(_vector_messages()):
        cfg = bytes((0 + 3 * 7,)) if i % 2 else bytes((1 + 3 * 7,))
        mask = b"\x11\x22\x33\x44" if i % 2 else None
        stream = ws_frame(2, msg, mask) + ws_frame(9, b"ping", mask)
        out.append(cfg + b"\x00" + bytes((len(stream) % 256,)) + stream[:255] + b"\x05\x07")
    out.append(bytes((21, 1, 3, 0x40, 4)) + b"abcd" + bytes((0x2B, 2, 0x20)) + b"\x03\x00\x00\x00")
    out.append(bytes((22, 1, 2, 0x08, 3)) + b"abc" + bytes((0x00, 3)) + b"def")
    return out


def _seeds_upgrade() -> list[bytes]:
    out = [b"\x00" + bytes((len(_REQUEST) >> 8, len(_REQUEST) & 0xFF)) + _REQUEST + b"\x07\x00"]
    out.append(b"\x02\x01\x00\x10\x00\x41")
    out.append(bytes((4, 0, 0, 0, 0, 5, 1, 4, 7, 10, 0, 0)))
    out.append(bytes((7, 0, 0, 1, 0)))
    out.append(bytes((6, 0)))
    out.append(bytes((1, 0xFF, 0, 0x10)))  # a head that never ends
    return out


def _seeds_stun() -> list[bytes]:
    out = [b"\x00" + bytes.fromhex(v["message_hex"]) for v in load_vectors("protocol")["stun"]]
    out += [b"\x02" + stun.build_binding_response(_STUN_TID, "203.0.113.7", 4242)]
    out += [bytes((1, 0, 1, 1, 2, 0, 1, 1, 0, 0, 0xBE, 0xEF, 1, 2, 3, 4, 1, 1))]
    return out


def _seeds_peer() -> list[bytes]:
    out = []
    for v in load_vectors("protocol")["peer"] + load_vectors("captured-5.6")["peer"]:
        out.append(b"\x00\x00" + bytes.fromhex(v["datagram_hex"]))
    out += [bytes((1, 7, k)) + bytes(range(20)) for k in range(6)]
    out += [bytes((3, 1, 1)) + bytes(24), bytes((4, 0, 3, 40)) + bytes(range(40))]
    return out


def _prog(*parts: bytes | int) -> bytes:
    return b"".join(bytes((p,)) if isinstance(p, int) else p for p in parts)


_M = b"mask"  # a masking key inside seed programs


def _seeds_server() -> list[bytes]:
    """Small programs (see ServerProgram for the field order of each operation)."""
    fwd_1_to_2 = _prog(5, 0, 11, 0, 8, 0, _M)  # 28-byte FORWARD, own source, to IPS[1]
    return [
        # two clients: unicast, directed broadcast, a 17-byte FORWARD, a ping, a short CLOSE
        _prog(1, 0, fwd_1_to_2, 5, 0, 11, 0, 2, 0, _M, 5, 0, 6, 0, 8, 0, _M,
              7, 0, 0, 4, b"ping", 0, _M, 7, 0, 2, 1, 0x41, 0, _M),
        # PEER 1->2, DISCOVERY broadcast, GENERAL 2->1, a spoofed PEER, a PONG, a normal CLOSE
        _prog(1, 0, 6, 0, 0, 0, 8, 6, b"\xc6\x33\x64\x07\x9c\x40", 16, _M,
              6, 0, 1, 0, 3, 0, 16, _M, 6, 1, 2, 0, 0, 5, b"\x00\x00\x00\x01\x02", 16, _M,
              6, 0, 0, 13, 8, 6, b"\xc6\x33\x64\x07\x9c\x40", 16, _M,
              7, 1, 1, 2, b"hi", 0, _M, 7, 1, 2, 3, 0, 0, _M),
        # connection 2 takes over IPS[0]; time passes (pings, idle timeout)
        _prog(1, 0, 2, 1, 0, 0, 0, 0, 1, _M, fwd_1_to_2, 12, 5, 12, 6, 12, 6),
        # a fourth connection: VMAC shared with connection 1, EXPECTED, then one for IPS[0]
        _prog(2, 0, 0, 3, 3, 0, 0, 0, 0, _M, 4, 3, 0, 0, 0, 0, _M, 4, 3, 11, 0, 0, 0, _M,
              4, 3, 7, 0, 0, 0, _M),
        # wrong password, clock skew, replay, garbage hash, truncated AUTH
        _prog(0, 0, 0, 2, 1, 1, 0, 0, 0, 1, _M, 0, 2, 2, 1, 3, 0, 0, 1, _M,
              0, 2, 3, 0, 0, 0, 0, 1, _M, 2, 0, 1, 0, 2, bytes(32), 0, 8, 20, _M),
        # one batch: a FORWARD to connection 2, then connection 1 takes over its address
        _prog(1, 0, 17, 0, fwd_1_to_2, 2, 0, 0x41, 1, 0, 0, 0x47, _M),
        # a slow reader: paused, relayed to, resumed (queue limit 2)
        _prog(1, 2, 14, 1, 0, fwd_1_to_2, fwd_1_to_2, fwd_1_to_2, fwd_1_to_2, 14, 1, 1),
        # batching and split delivery, a lost connection, bytes for a closed one
        _prog(1, 0, 17, 2, fwd_1_to_2, fwd_1_to_2, 7, 0, 0, 0, 0, _M, 16, 3, fwd_1_to_2,
              13, 1, 15, 1, 2, b"xx"),
        # no dhcp: raw and cut upgrade requests, EXPECTED refused
        _prog(0, 4, 1, 1, 60, 1, 2, 128, 0x41, 1, 0, 5, b"GET /", 4, 0, 0, 0, 0, 0, _M),
        # max_frame 1500: a fragmented FORWARD with a ping inside, empty fragments, big headers
        _prog(1, 1, 8, 0, 0x19, 8, 0, 0, _M, _M, _M, 8, 0, 0x60, 0, 1, b"A", 5, _M * 6,
              11, 0, 1, _M, 0, 11, 0, 4, _M, 0),
        # text frame, unknown opcode, reserved bits, an unmasked ping
        _prog(0, 0, 7, 0, 3, 2, b"hi", 0, _M, 9, 0, 0x86, 3, b"abc", 0, _M,
              9, 0, 0xC2, 1, b"x", 0, _M, 7, 0, 0, 0, 0x90),
    ]  # fmt: skip


def _seeds_client() -> list[bytes]:
    """Small programs (see ClientProgram for the field order of each operation)."""
    connect_0 = _prog(2, 0, 2, 8, 0, 0, 0, 0, 2, 0, 0, 1)  # DISCOVERY, HEARTBEAT with ack
    connect_1 = _prog(2, 8, 2, 8, 1, 0, 0, 8, 2, 0, 0, 1)
    return [
        # PEERS[0] CONNECTED; DELAY probes answered; a DELAY echo with an extreme timestamp
        _prog(0, connect_0, 12, 1, 8, 0, 0, 1, 2, 0, 0x8A, 8, 0, 0, 1, 0, 2, 0x21),
        _prog(0, connect_0, 8, 0, 0, 1, 2, 0, 8),
        # two peers: a measured route announced, a ROUTE learnt, traffic routed and relayed
        _prog(0, connect_0, connect_1, 8, 0, 0, 1, 2, 0, 0x8A,
              8, 0, 0, 2, 6, b"\x0b\x00\x00\x01", 0, 1,
              11, 11, 1, 6, b"\x0b\x00\x00\x01", 0, 8, 0, 0, 3, 11, 8, 2,
              8, 0, 0, 3, 11, 0, 8, 8, 0, 0, 2, 6, b"\x0b\x00\x00\x01", 0, 3,
              12, 4, 12, 4),
        # STUN: peer PREPARING, ticks, a STUN answer, the peer's PEER message, heartbeats
        _prog(0, 2, 0, 2, 12, 1, 12, 1, 12, 1, 12, 1, 12, 1, 10, 0, 0, 0x9C, 0x40,
              1, 0, 2, 0, 0x9C, 0x41, 8, 0, 0, 0, 0, 2, 0, 0, 1, 12, 1, 12, 1),
        # server messages: GENERAL LAN endpoint, FORWARD, a ping, a CLOSE with a reason
        _prog(0, 3, 0, 0, 0, 2, 1, 0x9C, 0x40, 0, 11, 0, 2, 0, 6, 0, 4, b"ping", 0,
              6, 2, 3, 0, 0),
        # a dynamic client: EXPECTED replies (bad hash, bad cidr), STUN, a hostile 101 on
        # reconnection, then a good one
        _prog(4, 4, 0, 0, 1, 0, 4, 8, 0, 0, 0, 12, 1, 12, 1, 10, 0, 0, 0x10,
              13, 3, 5, b"HTTP/", 13, 0, 12, 6, 12, 6, 12, 6),
        # discovery on, TUN packets, server bytes split, a frame too big, an unmasked reply
        _prog(0x10, 12, 1, 12, 1, 11, 11, 1, 0, 0, 11, 11, 1, 2, 0, 14, 3, 0, 11, 0, 2, 0,
              7, 4, b"\x82\x7f\x00\x00", 6, 0, 0, 0x90, b"abcd"),
        # close() then traffic (a known-new bug), reconnect timers
        _prog(0, 13, 2, 11, 11, 1, 0, 0, 12, 6),
    ]  # fmt: skip


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], set[str]]
    seeds: Callable[[], list[bytes]]
    #: Largest input worth generating (hypothesis and the mutation loop).
    max_len: int = 512
    doc: str = field(default="")


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("messages", fuzz_messages, _seeds_messages, 200),
        Target("wsframe", fuzz_wsframe, _seeds_wsframe, 600),
        Target("upgrade", fuzz_upgrade, _seeds_upgrade, 600),
        Target("stun", fuzz_stun, _seeds_stun, 120),
        Target("peer", fuzz_peer, _seeds_peer, 200),
        Target("server", fuzz_server, _seeds_server, 600),
        Target("client", fuzz_client, _seeds_client, 600),
    )
}


def run_target(
    target: Target, data: bytes, tolerate: frozenset[str] | dict[str, str] = frozenset()
) -> tuple[set[str], InvariantViolation | None]:
    """Run one input; a violation of a tolerated (known) kind is returned, not raised."""
    try:
        return target.run(data), None
    except InvariantViolation as violation:
        if violation.kind in tolerate:
            return {f"known:{violation.kind}"}, violation
        raise
