"""The RFC 6455 frame codec, cross-checked in both directions against wsproto."""

from __future__ import annotations

import random
import types
from collections.abc import Iterator

import pytest
import wsproto.frame_protocol as wfp
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
)
from wsproto.frame_protocol import FrameProtocol, Opcode

from candy_core import wsframe
from candy_core.upgrade import ServerUpgrade
from candy_core.wsframe import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameError,
    FrameParser,
    binary_header,
    close_payload,
    close_reply,
    encode_frame,
    parse_close,
)

BIG = 1 << 20
SIZES = [0, 1, 125, 126, 127, 65535, 65536]
MASK = b"\x37\xfa\x21\x3d"


@pytest.fixture(autouse=True)
def _deterministic_wsproto_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """wsproto draws its client masks from os.urandom; make them repeatable."""
    rng = random.Random(1234)
    monkeypatch.setattr(wfp, "os", types.SimpleNamespace(urandom=rng.randbytes))


def payload_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + n).randbytes(n)


def feed_in(parser: FrameParser, data: bytes, step: int) -> list[Frame]:
    frames: list[Frame] = []
    for i in range(0, len(data), step):
        frames.extend(parser.feed(data[i : i + step]))
    return frames


def wsproto_messages(proto: FrameProtocol, data: bytes) -> list[tuple[Opcode, object]]:
    """Feed ``data`` to a wsproto frame protocol; reassemble into (opcode, payload) messages."""
    proto.receive_bytes(data)
    out: list[tuple[Opcode, object]] = []
    partial: dict[str, object] = {}
    for frame in proto.received_frames():
        if frame.opcode.iscontrol():
            out.append((frame.opcode, frame.payload))
            continue
        if not partial:  # wsproto reports continuations with the message's opcode
            partial["op"] = frame.opcode
            partial["data"] = b""
        partial["data"] = bytes(partial["data"]) + bytes(frame.payload)  # type: ignore[arg-type]
        if frame.message_finished:
            out.append((partial["op"], partial["data"]))  # type: ignore[arg-type]
            partial.clear()
    return out


# --- wsproto client -> FrameParser(expect_mask=True) ------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_wsproto_client_frame_parsed_whole(size: int) -> None:
    client = FrameProtocol(client=True, extensions=[])
    payload = payload_of(size)
    data = bytes(client.send_data(payload))
    assert data[1] & 0x80  # wsproto masked it
    assert FrameParser(BIG, expect_mask=True).feed(data) == [Frame(OP_BINARY, payload)]


@pytest.mark.parametrize("size", SIZES)
def test_wsproto_client_frame_parsed_in_pieces(size: int) -> None:
    client = FrameProtocol(client=True, extensions=[])
    payload = payload_of(size, 1)
    data = bytes(client.send_data(payload))
    step = 1 if len(data) < 1000 else 997
    parser = FrameParser(BIG, expect_mask=True)
    if step > 1:  # the header alone, byte by byte, first
        assert feed_in(parser, data[:14], 1) == []
        data = data[14:]
    assert feed_in(parser, data, step) == [Frame(OP_BINARY, payload)]
    assert parser.feed(b"") == []


def test_wsproto_client_fragmented_message_with_controls_interleaved() -> None:
    client = FrameProtocol(client=True, extensions=[])
    parts = [payload_of(300, 1), payload_of(0, 2), payload_of(70000, 3), payload_of(5, 4)]
    data = bytes(client.send_data(parts[0], fin=False))
    data += bytes(client.ping(b"candy::linux::5.6"))
    data += bytes(client.send_data(parts[1], fin=False))
    data += bytes(client.pong(b"pong!"))
    data += bytes(client.send_data(parts[2], fin=False))
    data += bytes(client.send_data(parts[3], fin=True))
    data += bytes(client.send_data(b"next", fin=True))
    data += bytes(client.close(1000, "bye"))
    expected = [
        Frame(OP_PING, b"candy::linux::5.6"),
        Frame(OP_PONG, b"pong!"),
        Frame(OP_BINARY, b"".join(parts)),
        Frame(OP_BINARY, b"next"),
        Frame(OP_CLOSE, b"\x03\xe8bye"),
    ]
    assert FrameParser(BIG, expect_mask=True).feed(data) == expected
    assert feed_in(FrameParser(BIG, expect_mask=True), data, 1013) == expected
    # a parser sized just big enough for the reassembled message accepts it
    assert FrameParser(70305, expect_mask=True).feed(data) == expected


def test_wsproto_client_small_frames_byte_by_byte() -> None:
    client = FrameProtocol(client=True, extensions=[])
    data = bytes(client.send_data(b"ab", fin=False))
    data += bytes(client.ping(b""))
    data += bytes(client.send_data(b"cd", fin=True))
    data += bytes(client.send_data("text é"))
    data += bytes(client.close(1001, "going"))
    frames = feed_in(FrameParser(BIG, expect_mask=True), data, 1)
    assert frames == [
        Frame(OP_PING, b""),
        Frame(OP_BINARY, b"abcd"),
        Frame(OP_TEXT, "text é".encode()),
        Frame(OP_CLOSE, b"\x03\xe9going"),
    ]
    assert parse_close(frames[-1].payload) == (1001, "going")


def test_many_frames_in_one_feed() -> None:
    client = FrameProtocol(client=True, extensions=[])
    payloads = [payload_of(n, 5) for n in range(1, 200, 7)]
    data = b"".join(bytes(client.send_data(p)) for p in payloads)
    frames = FrameParser(BIG, expect_mask=True).feed(data + data[:3])
    assert frames == [Frame(OP_BINARY, p) for p in payloads]


# --- encode_frame / binary_header -> wsproto --------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_server_frames_parsed_by_wsproto(size: int) -> None:
    payload = payload_of(size, 6)
    data = encode_frame(OP_BINARY, payload)
    assert data == binary_header(size) + payload
    assert not data[1] & 0x80
    client = FrameProtocol(client=True, extensions=[])
    assert wsproto_messages(client, data) == [(Opcode.BINARY, payload)]


@pytest.mark.parametrize("size", SIZES)
def test_masked_frames_parsed_by_wsproto_server(size: int) -> None:
    payload = payload_of(size, 7)
    data = encode_frame(OP_BINARY, payload, MASK)
    assert data[1] & 0x80
    server = FrameProtocol(client=False, extensions=[])
    assert wsproto_messages(server, data) == [(Opcode.BINARY, payload)]
    assert FrameParser(BIG, expect_mask=True).feed(data) == [Frame(OP_BINARY, payload)]


def test_encoded_control_and_fragmented_frames_parsed_by_wsproto() -> None:
    data = encode_frame(OP_BINARY, b"frag-", fin=False)
    data += encode_frame(OP_PING, b"candy::linux::5.6")
    data += encode_frame(OP_CONT, b"mented", fin=True)
    data += encode_frame(OP_PONG, b"x")
    data += encode_frame(OP_CLOSE, close_payload(1009, "too big"))
    client = FrameProtocol(client=True, extensions=[])
    assert wsproto_messages(client, data) == [
        (Opcode.PING, b"candy::linux::5.6"),
        (Opcode.BINARY, b"frag-mented"),
        (Opcode.PONG, b"x"),
        (Opcode.CLOSE, (1009, "too big")),
    ]


def test_header_lengths_are_minimal() -> None:
    assert binary_header(0) == b"\x82\x00"
    assert binary_header(125) == b"\x82\x7d"
    assert binary_header(126) == b"\x82\x7e\x00\x7e"
    assert binary_header(65535) == b"\x82\x7e\xff\xff"
    assert binary_header(65536) == b"\x82\x7f" + (65536).to_bytes(8, "big")
    assert encode_frame(OP_PING, b"", MASK) == b"\x89\x80" + MASK
    assert encode_frame(OP_TEXT, b"a", fin=False)[0] == 0x01


@pytest.fixture
def ws_client() -> Iterator[WSConnection]:
    """A wsproto client connection that went through the handshake with ServerUpgrade."""
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="192.0.2.1:8080", target="/"))
    result = ServerUpgrade().receive(request)
    assert result.accepted
    client.receive_data(result.reply)
    assert isinstance(next(client.events()), AcceptConnection)
    yield client


def test_wsproto_connection_reads_server_frames(ws_client: WSConnection) -> None:
    payload = payload_of(1500, 8)
    data = binary_header(len(payload)) + payload
    data += encode_frame(OP_PING, b"hi")
    data += encode_frame(OP_BINARY, b"")
    data += encode_frame(OP_CLOSE, close_payload(1008, "wrong password"))
    ws_client.receive_data(data)
    events = list(ws_client.events())
    assert isinstance(events[0], BytesMessage) and events[0].data == payload
    assert isinstance(events[1], Ping) and events[1].payload == b"hi"
    assert isinstance(events[2], BytesMessage) and events[2].data == b""
    assert isinstance(events[3], CloseConnection)
    assert (events[3].code, events[3].reason) == (1008, "wrong password")


def test_wsproto_connection_frames_read_by_parser(ws_client: WSConnection) -> None:
    data = ws_client.send(Message(data=b"\x01packet"))
    data += ws_client.send(Ping(payload=b"candy::linux::5.6"))
    data += ws_client.send(CloseConnection(code=1000, reason="done"))
    frames = FrameParser(4096, expect_mask=True).feed(data)
    assert frames == [
        Frame(OP_BINARY, b"\x01packet"),
        Frame(OP_PING, b"candy::linux::5.6"),
        Frame(OP_CLOSE, b"\x03\xe8done"),
    ]


# --- errors -----------------------------------------------------------------------------------
def raises(parser: FrameParser, data: bytes, code: int = CLOSE_PROTOCOL_ERROR) -> FrameError:
    with pytest.raises(FrameError) as info:
        parser.feed(data)
    assert info.value.code == code
    return info.value


@pytest.mark.parametrize("size", [101, 126, 65535, 65536, 1 << 40])
def test_oversize_frame_raises_on_its_header(size: int) -> None:
    head = binary_header(size)
    header = bytes([0x82, head[1] | 0x80]) + head[2:]  # masked, mask key not even sent yet
    parser = FrameParser(100, expect_mask=True)
    err = raises(parser, header, CLOSE_TOO_BIG)
    assert "exceeds" in str(err)


def test_oversize_frame_limit_is_inclusive() -> None:
    parser = FrameParser(100, expect_mask=True)
    assert parser.feed(encode_frame(OP_BINARY, bytes(100), MASK)) == [Frame(OP_BINARY, bytes(100))]
    raises(parser, encode_frame(OP_BINARY, bytes(101), MASK)[:8], CLOSE_TOO_BIG)


def test_oversize_fragmented_message_raises_1009() -> None:
    parser = FrameParser(100, expect_mask=True)
    assert parser.feed(encode_frame(OP_BINARY, bytes(60), MASK, fin=False)) == []
    raises(parser, encode_frame(OP_CONT, bytes(60), MASK, fin=False), CLOSE_TOO_BIG)


@pytest.mark.parametrize("bits", [0x40, 0x20, 0x10])
def test_reserved_bits_raise(bits: int) -> None:
    data = bytearray(encode_frame(OP_BINARY, b"abc", MASK))
    data[0] |= bits
    raises(FrameParser(BIG, expect_mask=True), bytes(data))


def test_unmasked_client_frame_raises() -> None:
    err = raises(FrameParser(BIG, expect_mask=True), encode_frame(OP_BINARY, b"abc"))
    assert "masked" in str(err)


def test_masked_server_frame_raises_on_client_side() -> None:
    raises(FrameParser(BIG, expect_mask=False), encode_frame(OP_BINARY, b"abc", MASK))


def test_either_masking_when_unspecified() -> None:
    parser = FrameParser(BIG)
    data = encode_frame(OP_BINARY, b"a", MASK) + encode_frame(OP_BINARY, b"b")
    assert parser.feed(data) == [Frame(OP_BINARY, b"a"), Frame(OP_BINARY, b"b")]


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame_raises(opcode: int) -> None:
    err = raises(FrameParser(BIG, expect_mask=True), encode_frame(opcode, b"x", MASK, fin=False))
    assert "fragmented control" in str(err)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_over_125_bytes_raises(opcode: int) -> None:
    parser = FrameParser(BIG, expect_mask=True)
    assert parser.feed(encode_frame(opcode, bytes(125), MASK)) == [Frame(opcode, bytes(125))]
    raises(parser, encode_frame(opcode, bytes(126), MASK))


def test_continuation_without_start_raises() -> None:
    raises(FrameParser(BIG, expect_mask=True), encode_frame(OP_CONT, b"x", MASK))


def test_new_message_inside_fragmented_one_raises() -> None:
    parser = FrameParser(BIG, expect_mask=True)
    parser.feed(encode_frame(OP_BINARY, b"x", MASK, fin=False))
    raises(parser, encode_frame(OP_BINARY, b"y", MASK))


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_raise(opcode: int) -> None:
    err = raises(FrameParser(BIG, expect_mask=True), encode_frame(opcode, b"x", MASK))
    assert "opcode" in str(err)


def test_frame_error_is_a_protocol_error() -> None:
    from candy_core.messages import ProtocolError

    assert issubclass(FrameError, ProtocolError)
    assert FrameError("x").code == CLOSE_PROTOCOL_ERROR


# --- masking and close payloads ---------------------------------------------------------------
def naive_mask(data: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def test_py_apply_mask_equals_c_apply_mask() -> None:
    from websockets.speedups import apply_mask as c_apply_mask

    rng = random.Random(99)
    for n in [*range(0, 70), 125, 126, 1000, 4096, 65537]:
        data, mask = rng.randbytes(n), rng.randbytes(4)
        expected = naive_mask(data, mask)
        assert wsframe._py_apply_mask(data, mask) == expected
        assert c_apply_mask(data, mask) == expected
        assert wsframe.apply_mask(wsframe.apply_mask(data, mask), mask) == data


def test_py_apply_mask_keeps_leading_zero_bytes() -> None:
    assert wsframe._py_apply_mask(b"\x00\x00\x01", b"\x00\x00\x00\x00") == b"\x00\x00\x01"
    assert wsframe._py_apply_mask(b"\xff\xff", b"\xff\xff\x00\x00") == b"\x00\x00"


def test_close_payload_and_parse_close() -> None:
    assert close_payload(1000) == b"\x03\xe8"
    assert parse_close(close_payload(1008, "wrong password")) == (1008, "wrong password")
    assert parse_close(b"") == (None, "")
    assert parse_close(b"\x03") == (None, "")


@pytest.mark.parametrize(
    ("received", "reply"),
    [
        (b"", b""),
        (close_payload(1000, "bye"), b"\x03\xe8"),
        (close_payload(1008), b"\x03\xf0"),
        (close_payload(3000), b"\x0b\xb8"),
        (close_payload(4999), b"\x13\x87"),
        (b"\x03", close_payload(CLOSE_PROTOCOL_ERROR, "one-byte close payload")),
        (b"\x00\x00", close_payload(CLOSE_PROTOCOL_ERROR, "invalid close code")),
        (close_payload(999), close_payload(CLOSE_PROTOCOL_ERROR, "invalid close code")),
        (close_payload(1004), close_payload(CLOSE_PROTOCOL_ERROR, "invalid close code")),
        (close_payload(1005), close_payload(CLOSE_PROTOCOL_ERROR, "invalid close code")),
        (close_payload(1006), close_payload(CLOSE_PROTOCOL_ERROR, "invalid close code")),
        (close_payload(1015), close_payload(CLOSE_PROTOCOL_ERROR, "invalid close code")),
        (close_payload(2000), close_payload(CLOSE_PROTOCOL_ERROR, "invalid close code")),
        (close_payload(2999), close_payload(CLOSE_PROTOCOL_ERROR, "invalid close code")),
        (close_payload(5000), close_payload(CLOSE_PROTOCOL_ERROR, "invalid close code")),
        (b"\x03\xe8\xff\xfe", close_payload(1007, "close reason is not UTF-8")),
    ],
)
def test_close_reply_follows_rfc6455(received: bytes, reply: bytes) -> None:
    assert close_reply(received) == reply
    if reply:  # whatever goes back is a CLOSE that a strict implementation (wsproto) accepts
        client = FrameProtocol(client=True, extensions=[])
        ((opcode, _),) = wsproto_messages(client, encode_frame(OP_CLOSE, reply))
        assert opcode == Opcode.CLOSE


def test_close_payload_truncated_to_control_limit() -> None:
    payload = close_payload(1008, "x" * 500)
    assert len(payload) == 125
    assert parse_close(payload) == (1008, "x" * 123)
    # a multi-byte character is never cut in half
    payload = close_payload(1008, "a" + "é" * 100)
    assert len(payload) <= 125
    code, reason = parse_close(payload)
    assert code == 1008 and reason == "a" + "é" * 61
    payload[2:].decode("utf-8")  # strict: raises if a character was cut
    # and wsproto accepts it as a CLOSE frame
    client = FrameProtocol(client=True, extensions=[])
    assert wsproto_messages(client, encode_frame(OP_CLOSE, payload)) == [
        (Opcode.CLOSE, (1008, reason))
    ]
