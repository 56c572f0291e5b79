"""The WebSocket message codec against the shared vectors and captured 5.6 frames."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address
from typing import Any

import pytest
from vectors import load_vectors

from candy_core import auth
from candy_core import messages as m

WEBSOCKET = load_vectors("protocol")["websocket"]
GOOD = [v for v in WEBSOCKET if "expect" not in v]
REJECT = [v for v in WEBSOCKET if v.get("expect") == "reject"]
DROP = [v for v in WEBSOCKET if v.get("expect") == "drop"]
HASHED = [v for v in GOOD if "hash_hex" in v]
WINDOWED = [v for v in WEBSOCKET if "valid_at_now" in v]
CAPTURED = load_vectors("captured-5.6")["websocket"]

FIXED_SIZES = {
    m.AUTH: m.Auth.SIZE,
    m.FORWARD: 21,
    m.EXPECTED: m.Expected.SIZE,
    m.PEER: m.Peer.SIZE,
    m.VMAC: m.Vmac.SIZE,
    m.DISCOVERY: m.Discovery.SIZE,
    m.GENERAL: m.General.SIZE,
}
CLASSES = {
    m.AUTH: m.Auth,
    m.FORWARD: m.Forward,
    m.EXPECTED: m.Expected,
    m.PEER: m.Peer,
    m.VMAC: m.Vmac,
    m.DISCOVERY: m.Discovery,
    m.GENERAL: m.General,
}


def ids(vecs: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vecs]


def build(vec: dict[str, Any]) -> m.Message:
    """The message a vector describes, built from its fields (hash computed, not copied)."""
    kind = vec["type"]
    pad = bytes.fromhex(vec.get("padding_hex", ""))
    if kind == m.AUTH:
        return m.Auth.create(vec["password"], IPv4Address(vec["ip"]), vec["timestamp"], pad)
    if kind == m.EXPECTED:
        return m.Expected.create(vec["password"], vec["cidr"], vec["timestamp"], pad)
    if kind == m.VMAC:
        return m.Vmac.create(vec["password"], vec["vmac_ascii"].encode(), vec["timestamp"], pad)
    if kind == m.FORWARD:
        return m.Forward(bytes.fromhex(vec["packet_hex"]))
    if kind == m.PEER:
        src, dst, ip = (IPv4Address(vec[k]) for k in ("src", "dst", "ip"))
        return m.Peer(src, dst, ip, vec["port"])
    if kind == m.DISCOVERY:
        return m.Discovery(IPv4Address(vec["src"]), IPv4Address(vec["dst"]))
    if kind == m.GENERAL:
        src, dst, ip = (IPv4Address(vec[k]) for k in ("src", "dst", "ip"))
        assert vec["subtype"] == m.GENERAL_LAN and vec["extra"] == 0
        return m.General.lan_endpoint(src, dst, ip, vec["port"])
    raise AssertionError(f"vector type {kind} not covered")


def test_vectors_present() -> None:
    assert GOOD and REJECT and DROP and WINDOWED and CAPTURED
    assert {v["type"] for v in GOOD} == set(CLASSES)


# --- protocol.json, both directions -----------------------------------------------------------
@pytest.mark.parametrize("vec", GOOD, ids=ids(GOOD))
def test_vector_decodes_to_its_fields(vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["message_hex"])
    msg = m.decode(data)
    assert isinstance(msg, CLASSES[vec["type"]])
    assert msg == build(vec)
    if "hash_hex" in vec:
        assert msg.hash == bytes.fromhex(vec["hash_hex"])  # type: ignore[union-attr]
    if "padding_hex" in vec:
        assert msg.padding == bytes.fromhex(vec["padding_hex"])  # type: ignore[union-attr]


@pytest.mark.parametrize("vec", GOOD, ids=ids(GOOD))
def test_vector_fields_encode_to_its_bytes(vec: dict[str, Any]) -> None:
    assert build(vec).encode() == bytes.fromhex(vec["message_hex"])


@pytest.mark.parametrize("vec", HASHED, ids=ids(HASHED))
def test_vector_hash_verifies_with_the_password(vec: dict[str, Any]) -> None:
    msg = m.decode(bytes.fromhex(vec["message_hex"]))
    assert msg.verify(vec["password"])  # type: ignore[union-attr]
    assert not msg.verify(vec["password"] + "x")  # type: ignore[union-attr]


def test_specific_fields_of_the_vectors() -> None:
    """Spot checks that do not go through :func:`build` (which could share a bug)."""
    by_name = {v["name"]: m.decode(bytes.fromhex(v["message_hex"])) for v in GOOD}
    auth_msg = by_name["auth 172.16.0.1 pad=7"]
    assert isinstance(auth_msg, m.Auth)
    assert auth_msg.ip == IPv4Address("172.16.0.1")
    assert auth_msg.timestamp == 1764000000
    assert auth_msg.padding == bytes(range(7))
    exp = by_name["expected 10.77.0.42/24 pad=5"]
    assert isinstance(exp, m.Expected)
    assert exp.cidr == "10.77.0.42/24"
    assert exp.padding == b"\xaa" * 5
    vmac = by_name["vmac"]
    assert isinstance(vmac, m.Vmac) and vmac.vmac == b"3f9a0c11d2e4b7a8"
    peer = by_name["peer"]
    assert isinstance(peer, m.Peer)
    assert (peer.ip, peer.port) == (IPv4Address("203.0.113.5"), 40123)
    disc = by_name["discovery broadcast"]
    assert isinstance(disc, m.Discovery) and disc.dst == m.BROADCAST
    gen = by_name["general subtype 0 (LAN endpoint)"]
    assert isinstance(gen, m.General)
    assert gen.endpoint() == (IPv4Address("192.168.1.20"), 51820)
    fwd = by_name["forward icmp 10.77.0.11->10.77.0.12"]
    assert isinstance(fwd, m.Forward)
    assert fwd.packet[12:16] == IPv4Address("10.77.0.11").packed
    assert fwd.packet[16:20] == IPv4Address("10.77.0.12").packed


@pytest.mark.parametrize("vec", WINDOWED, ids=ids(WINDOWED))
def test_auth_vector_clock_window(vec: dict[str, Any]) -> None:
    msg = m.decode(bytes.fromhex(vec["message_hex"]))
    assert isinstance(msg, m.Auth)
    for now in vec["valid_at_now"]:
        assert auth.within_window(msg.timestamp, now), now
    for now in vec["invalid_at_now"]:
        assert not auth.within_window(msg.timestamp, now), now


@pytest.mark.parametrize("vec", REJECT, ids=ids(REJECT))
def test_reject_vector_fails_verification(vec: dict[str, Any]) -> None:
    msg = m.decode(bytes.fromhex(vec["message_hex"]))
    assert isinstance(msg, m.Auth)
    assert msg.ip == IPv4Address(vec["ip"])
    assert msg.timestamp == vec["timestamp"]
    assert not msg.verify(vec["password"])


@pytest.mark.parametrize("vec", DROP, ids=ids(DROP))
def test_short_forward_vector_is_a_protocol_error(vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["message_hex"])
    assert len(data) == 20  # type byte + a 19-byte "packet"
    with pytest.raises(m.ProtocolError, match="FORWARD"):
        m.decode(data)


# --- frames captured from 5.6 ------------------------------------------------------------------
@pytest.mark.parametrize("vec", CAPTURED, ids=ids(CAPTURED))
def test_captured_frame_decodes_and_verifies(vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["hex"])
    fields = vec["fields"]
    msg = m.decode(data)
    assert isinstance(msg, CLASSES[fields["type"]])
    if "timestamp" in fields:
        assert msg.timestamp == fields["timestamp"]  # type: ignore[union-attr]
        assert auth.within_window(msg.timestamp, vec["now"])  # type: ignore[union-attr]
    if hasattr(msg, "verify"):
        assert msg.verify(vec["password"])  # type: ignore[union-attr]
        assert not msg.verify("not-" + vec["password"])  # type: ignore[union-attr]
    if "ip" in fields:
        assert msg.ip == IPv4Address(fields["ip"])  # type: ignore[union-attr]
    if "vmac" in fields:
        assert msg.vmac == fields["vmac"].encode()  # type: ignore[union-attr]
    if "cidr" in fields:
        assert msg.cidr == fields["cidr"]  # type: ignore[union-attr]


def test_captured_expected_with_garbage_after_nul() -> None:
    vec = next(v for v in CAPTURED if "garbage" in v["name"])
    data = bytes.fromhex(vec["hex"])
    assert data[9:41].split(b"\x00", 1)[1].strip(b"\x00")  # there really is garbage
    msg = m.decode(data)
    assert isinstance(msg, m.Expected)
    assert msg.cidr == "0.0.0.0/0"
    assert msg.verify("testpw")
    # Re-encoding cleans the garbage to NULs and keeps everything else.
    clean = msg.encode()
    assert len(clean) == len(data)
    assert clean[9:41] == b"0.0.0.0/0".ljust(32, b"\x00")
    assert clean[:9] == data[:9] and clean[41:] == data[41:]


def test_captured_forward_is_the_icmp_packet() -> None:
    vec = next(v for v in CAPTURED if v["fields"]["type"] == m.FORWARD)
    data = bytes.fromhex(vec["hex"])
    msg = m.decode(data)
    assert isinstance(msg, m.Forward)
    assert msg.packet == data[1:]
    assert msg.encode() == data


# --- strictness ------------------------------------------------------------------------------
def _sample(kind: int) -> bytes:
    vec = next(v for v in GOOD if v["type"] == kind)
    return bytes.fromhex(vec["message_hex"])


@pytest.mark.parametrize("kind", sorted(FIXED_SIZES), ids=lambda k: f"type{k}")
def test_truncated_messages_raise(kind: int) -> None:
    full = _sample(kind)
    size = FIXED_SIZES[kind]
    assert len(full) >= size
    for n in range(1, size):
        with pytest.raises(m.ProtocolError):
            m.decode(full[:n])
    assert isinstance(m.decode(full[:size]), CLASSES[kind])


@pytest.mark.parametrize("kind", sorted(FIXED_SIZES), ids=lambda k: f"type{k}")
def test_class_decoders_reject_truncation_too(kind: int) -> None:
    full = _sample(kind)
    with pytest.raises(m.ProtocolError, match="too short"):
        CLASSES[kind].decode(full[: FIXED_SIZES[kind] - 1])


def test_empty_message_raises() -> None:
    with pytest.raises(m.ProtocolError):
        m.decode(b"")


@pytest.mark.parametrize("kind", [m.AUTH, m.EXPECTED, m.VMAC], ids=["auth", "expected", "vmac"])
def test_padding_is_accepted_and_ignored_by_verify(kind: int) -> None:
    data = _sample(kind)[: FIXED_SIZES[kind]]
    password = next(v for v in GOOD if v["type"] == kind)["password"]
    plain = m.decode(data)
    padded = m.decode(data + b"\x99" * 40)
    assert padded.padding == b"\x99" * 40  # type: ignore[union-attr]
    assert padded.verify(password)  # type: ignore[union-attr]
    assert padded.hash == plain.hash  # type: ignore[union-attr]
    assert padded.encode() == data + b"\x99" * 40


@pytest.mark.parametrize("kind", [m.PEER, m.DISCOVERY], ids=["peer", "discovery"])
def test_extra_bytes_after_fixed_messages_are_ignored(kind: int) -> None:
    data = _sample(kind)
    assert m.decode(data + b"junk") == m.decode(data)


def test_general_keeps_its_data() -> None:
    msg = m.General(7, 0x1234, IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), b"hello")
    data = msg.encode()
    assert data[:4] == b"\xff\x07\x12\x34"
    assert m.decode(data) == msg
    assert msg.endpoint() is None  # not subtype 0


@pytest.mark.parametrize("kind", [6, 7, 100, 254])
def test_unknown_type_is_unknown_not_an_error(kind: int) -> None:
    data = bytes([kind]) + b"whatever"
    msg = m.decode(data)
    assert isinstance(msg, m.Unknown)
    assert msg.type == kind
    assert msg.encode() == data
    assert m.decode(bytes([kind])) == m.Unknown(kind, bytes([kind]))


@pytest.mark.parametrize(
    ("ip", "port"),
    [("0.0.0.0", 0), ("0.0.0.0", 1234), ("192.168.1.2", 0)],
)
def test_general_zero_endpoint_is_none(ip: str, port: int) -> None:
    src, dst = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    msg = m.decode(m.General.lan_endpoint(src, dst, IPv4Address(ip), port).encode())
    assert isinstance(msg, m.General)
    assert msg.endpoint() is None


def test_general_short_endpoint_is_none() -> None:
    src, dst = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    msg = m.General(m.GENERAL_LAN, 0, src, dst, b"\xc0\xa8\x01")
    assert msg.endpoint() is None


def test_expected_cidr_must_fit() -> None:
    with pytest.raises(m.ProtocolError):
        m.Expected.create("pw", "x" * 32, 1).encode()
    assert len(m.Expected.create("pw", "x" * 31, 1).encode()) == m.Expected.SIZE


def test_expected_cidr_not_ascii_is_an_error() -> None:
    data = bytearray(_sample(m.EXPECTED))
    data[9] = 0xC3
    with pytest.raises(m.ProtocolError, match="ASCII"):
        m.decode(bytes(data))


def test_vmac_must_be_16_bytes() -> None:
    with pytest.raises(m.ProtocolError):
        m.Vmac.create("pw", b"short", 1)


def test_timestamps_are_signed_big_endian() -> None:
    msg = m.Auth.create("pw", IPv4Address("10.0.0.1"), -2)
    data = msg.encode()
    assert data[5:13] == struct.pack(">q", -2)
    assert m.decode(data).timestamp == -2  # type: ignore[union-attr]


def test_decode_accepts_memoryview_and_bytearray() -> None:
    data = _sample(m.AUTH)
    assert m.decode(bytearray(data)) == m.decode(data)
    assert m.decode(memoryview(data)) == m.decode(data)  # type: ignore[arg-type]


# --- the IPv4 packet inside FORWARD (and from TUN) -----------------------------------------------
HEADER = bytes.fromhex("4500001400010000400100000a4d000b0a4d000c")  # 20 bytes, 10.77.0.11 -> .12


def test_ipv4_endpoints_reads_source_and_destination() -> None:
    assert m.ipv4_endpoints(HEADER) == (bytes([10, 77, 0, 11]), bytes([10, 77, 0, 12]))
    assert m.ipv4_endpoints(b"\x01" + HEADER + b"body", 1) == m.ipv4_endpoints(HEADER)
    src, dst = m.ipv4_endpoints(memoryview(HEADER))
    assert type(src) is bytes and type(dst) is bytes  # hashable, whatever the input


@pytest.mark.parametrize("start", [0, 1])
def test_ipv4_endpoints_boundary(start: int) -> None:
    data = b"\x01" * start + HEADER
    assert len(data) == start + m.IPV4_HEADER_SIZE
    m.ipv4_endpoints(data, start)  # exactly a header: accepted
    for n in range(len(data)):  # one byte less, down to nothing: refused, never IndexError
        with pytest.raises(m.ProtocolError, match="too short"):
            m.ipv4_endpoints(data[:n], start)


@pytest.mark.parametrize("first", [0x00, 0x35, 0x60, 0x65, 0xF5])
def test_ipv4_endpoints_refuses_other_versions(first: int) -> None:
    with pytest.raises(m.ProtocolError, match="not an IPv4 packet"):
        m.ipv4_endpoints(bytes([first]) + HEADER[1:])


def test_ipv4_endpoints_accepts_header_options() -> None:
    assert m.ipv4_endpoints(b"\x46" + HEADER[1:] + bytes(4)) == m.ipv4_endpoints(HEADER)


def test_forward_decode_uses_the_same_rule() -> None:
    assert m.decode(b"\x01" + HEADER) == m.Forward(HEADER)
    with pytest.raises(m.ProtocolError, match=r"FORWARD.*too short"):
        m.decode(b"\x01" + HEADER[:19])
    with pytest.raises(m.ProtocolError, match=r"FORWARD.*not an IPv4 packet"):
        m.decode(b"\x01\x60" + HEADER[1:])
