"""STUN Binding codec against the shared vectors and malformed input."""

from __future__ import annotations

import struct

import pytest
from vectors import load_vectors

from candy_core.stun import (
    MAGIC_COOKIE,
    StunError,
    build_binding_request,
    build_binding_response,
    looks_like_stun,
    parse_binding_response,
)

STUN = load_vectors("protocol")["stun"]
REQUESTS = [v for v in STUN if "ip" not in v]
RESPONSES = [v for v in STUN if "ip" in v]
TID = bytes.fromhex("a1a2a3a4a5a6a7a8a9aaabac")
XOR_RESPONSE = bytes.fromhex(next(v for v in RESPONSES if "XOR" in v["name"])["message_hex"])


def response(attrs: bytes, msg_type: int = 0x0101, tid: bytes = TID) -> bytes:
    """Build a STUN message with the given attribute bytes."""
    return struct.pack("!HHI12s", msg_type, len(attrs), MAGIC_COOKIE, tid) + attrs


def attr(attr_type: int, value: bytes, declared: int | None = None) -> bytes:
    """Encode one attribute with padding; ``declared`` overrides the length field."""
    length = len(value) if declared is None else declared
    return struct.pack("!HH", attr_type, length) + value + bytes(-len(value) % 4)


def test_vectors_present() -> None:
    assert REQUESTS and RESPONSES


@pytest.mark.parametrize("vec", REQUESTS, ids=lambda v: v["name"])
def test_request_vector(vec: dict) -> None:
    tid = bytes.fromhex(vec["transaction_id_hex"])
    assert build_binding_request(tid).hex() == vec["message_hex"]


@pytest.mark.parametrize("vec", RESPONSES, ids=lambda v: v["name"])
def test_response_vector(vec: dict) -> None:
    data = bytes.fromhex(vec["message_hex"])
    tid = bytes.fromhex(vec["transaction_id_hex"])
    assert looks_like_stun(data)
    assert parse_binding_response(data, tid) == (vec["ip"], vec["port"])
    assert parse_binding_response(data, None) == (vec["ip"], vec["port"])


def test_request_with_change_request_like_5_6() -> None:
    req = build_binding_request(bytes(12), change_request=True)
    assert len(req) == 28
    assert req.hex() == "000100082112a442" + "00" * 12 + "0003000400000000"
    assert looks_like_stun(req)


def test_request_rejects_bad_transaction_id() -> None:
    with pytest.raises(StunError):
        build_binding_request(bytes(11))


def test_looks_like_stun() -> None:
    assert not looks_like_stun(XOR_RESPONSE[:19])
    assert not looks_like_stun(b"\x40" + XOR_RESPONSE[1:])
    assert not looks_like_stun(XOR_RESPONSE[:4] + b"\x00\x00\x00\x00" + XOR_RESPONSE[8:])
    assert not looks_like_stun(bytes(range(40)))


def test_xor_preferred_over_mapped() -> None:
    mapped = attr(0x0001, bytes.fromhex("0001000101020304"))
    xor = attr(0x0020, bytes.fromhex("0001bda9e721c045"))
    assert parse_binding_response(response(mapped + xor), TID) == ("198.51.100.7", 40123)
    assert parse_binding_response(response(mapped), TID) == ("1.2.3.4", 1)


def test_unknown_attributes_skipped_with_padding() -> None:
    attrs = (
        attr(0x8022, b"abcde")
        + attr(0x0004, b"\x00" * 8)
        + attr(0x0001, bytes.fromhex("000100500a000001"))
    )
    assert parse_binding_response(response(attrs), TID) == ("10.0.0.1", 80)


def test_wrong_transaction_id() -> None:
    with pytest.raises(StunError, match="transaction id"):
        parse_binding_response(XOR_RESPONSE, bytes(12))


@pytest.mark.parametrize("msg_type", [0x0001, 0x0111, 0x0102, 0x4101])
def test_wrong_type(msg_type: int) -> None:
    data = struct.pack("!H", msg_type) + XOR_RESPONSE[2:]
    with pytest.raises(StunError, match="type"):
        parse_binding_response(data, TID)


def test_bad_cookie() -> None:
    data = XOR_RESPONSE[:4] + b"\x21\x12\xa4\x43" + XOR_RESPONSE[8:]
    with pytest.raises(StunError, match="cookie"):
        parse_binding_response(data, TID)


@pytest.mark.parametrize("cut", range(len(XOR_RESPONSE)))
def test_truncated_at_every_length(cut: int) -> None:
    with pytest.raises(StunError):
        parse_binding_response(XOR_RESPONSE[:cut], TID)


def test_trailing_garbage() -> None:
    with pytest.raises(StunError, match="length"):
        parse_binding_response(XOR_RESPONSE + bytes(4), TID)


@pytest.mark.parametrize("cut", range(0, len(XOR_RESPONSE) - 20, 4))
def test_truncated_with_consistent_length_field(cut: int) -> None:
    """Cut at attribute granularity and fix the length field: still must not pass."""
    body = XOR_RESPONSE[20 : 20 + cut]
    data = response(body)
    with pytest.raises(StunError):
        parse_binding_response(data, TID)


def test_length_not_multiple_of_four() -> None:
    data = response(attr(0x0020, bytes.fromhex("0001bda9e721c045")) + b"\x00\x00")
    with pytest.raises(StunError):
        parse_binding_response(data, TID)


@pytest.mark.parametrize(
    "attrs",
    [
        attr(0x0020, bytes.fromhex("0001bda9e721c045"), declared=12),  # overruns
        attr(0x0020, bytes.fromhex("0001bda9e721c045"), declared=200),
        attr(0x8022, b"test", declared=9) + attr(0x0020, bytes.fromhex("0001bda9e721c045")),
        attr(0x0020, bytes.fromhex("0001bda9e721"), declared=6),  # short IPv4
        attr(0x0020, bytes.fromhex("0001bda9e721c04500000000")),  # long IPv4
        attr(0x0001, bytes.fromhex("0001")),  # too short for a family
        attr(0x0020, b""),
        b"\x00\x20\x00",  # attribute header cut (length then not a multiple of 4)
    ],
)
def test_bad_attribute_lengths(attrs: bytes) -> None:
    with pytest.raises(StunError):
        parse_binding_response(response(attrs), TID)


@pytest.mark.parametrize("attr_type", [0x0020, 0x0001])
def test_ipv6_family_rejected(attr_type: int) -> None:
    value = bytes.fromhex("0002bda9") + bytes(16)
    with pytest.raises(StunError, match="IPv6"):
        parse_binding_response(response(attr(attr_type, value)), TID)


def test_unknown_family_rejected() -> None:
    with pytest.raises(StunError, match="family"):
        parse_binding_response(response(attr(0x0020, bytes.fromhex("0003bda9e721c045"))), TID)


@pytest.mark.parametrize("attrs", [b"", attr(0x8022, b"test"), attr(0x0004, bytes(8))])
def test_missing_address(attrs: bytes) -> None:
    with pytest.raises(StunError, match="no XOR-MAPPED-ADDRESS"):
        parse_binding_response(response(attrs), TID)


@pytest.mark.parametrize(
    ("ip", "port"), [("198.51.100.7", 40123), ("0.0.0.0", 0), ("255.255.255.255", 65535)]
)
def test_binding_response_round_trip(ip: str, port: int) -> None:
    data = build_binding_response(TID, ip, port)
    assert len(data) == 32
    assert looks_like_stun(data)
    assert parse_binding_response(data, TID) == (ip, port)
    assert parse_binding_response(data, None) == (ip, port)
    with pytest.raises(StunError, match="transaction id"):
        parse_binding_response(data, bytes(12))


def test_binding_response_matches_vector() -> None:
    vec = next(v for v in RESPONSES if "XOR" in v["name"])
    tid = bytes.fromhex(vec["transaction_id_hex"])
    data = build_binding_response(tid, vec["ip"], vec["port"])
    assert parse_binding_response(data, tid) == (vec["ip"], vec["port"])
    # XOR-MAPPED-ADDRESS attribute bytes are the same as in the vector
    assert data[20:32].hex() in vec["message_hex"]


@pytest.mark.parametrize(
    ("tid", "ip", "port"),
    [(bytes(11), "1.2.3.4", 1), (TID, "::1", 1), (TID, "1.2.3", 1), (TID, "1.2.3.4", 65536)],
)
def test_binding_response_rejects_bad_input(tid: bytes, ip: str, port: int) -> None:
    with pytest.raises(StunError):
        build_binding_response(tid, ip, port)
