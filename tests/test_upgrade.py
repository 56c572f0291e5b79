"""The HTTP/1.1 WebSocket upgrade, both roles, against the 5.6 request and against wsproto."""

from __future__ import annotations

import base64
import hashlib

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request

from candy_core import ProtocolError
from candy_core.upgrade import MAX_HEAD, ClientUpgrade, ServerUpgrade, UpgradeResult

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

#: The upgrade request exactly as the 5.6 client sends it (captured-5.6.json ``_about``).
REQUEST_56 = (
    b"GET / HTTP/1.1\r\n"
    b"Connection: Upgrade\r\n"
    b"Upgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\n"
    b"Host: 192.0.2.1:8080\r\n"
    b"\r\n"
)


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply
    return int(reply.split(b" ", 2)[1])


def headers_of(reply: bytes) -> dict[bytes, bytes]:
    head = reply.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines)}


def accept_for(key: bytes) -> bytes:
    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    return base64.b64encode(hashlib.sha1(key + guid).digest())


# --- server side ------------------------------------------------------------------------------
def test_56_request_gets_101_with_the_right_accept_token() -> None:
    server = ServerUpgrade()
    result = server.receive(REQUEST_56)
    assert result.accepted and result.rejected is None
    assert result.trailing == b""
    assert status_of(result.reply) == 101
    assert result.reply.endswith(b"\r\n\r\n")
    headers = headers_of(result.reply)
    assert headers[b"sec-websocket-accept"] == ACCEPT == accept_for(KEY)
    assert headers[b"upgrade"].lower() == b"websocket"
    assert headers[b"connection"].lower() == b"upgrade"
    assert b"sec-websocket-extensions" not in headers
    assert b"sec-websocket-protocol" not in headers
    assert server.path == "/"


@pytest.mark.parametrize("step", [1, 2, 7, 50])
def test_request_split_in_pieces(step: int) -> None:
    server = ServerUpgrade()
    results = [server.receive(REQUEST_56[i : i + step]) for i in range(0, len(REQUEST_56), step)]
    assert all(r == UpgradeResult() for r in results[:-1])
    assert results[-1].accepted
    assert headers_of(results[-1].reply)[b"sec-websocket-accept"] == ACCEPT


def test_trailing_frame_bytes_after_the_request_are_returned() -> None:
    frames = b"\x82\x85abcd" + bytes(5) + b"\x89\x80wxyz"
    result = ServerUpgrade().receive(REQUEST_56 + frames)
    assert result.accepted
    assert result.trailing == frames


def test_trailing_bytes_when_the_request_arrives_in_two_pieces() -> None:
    server = ServerUpgrade()
    assert server.receive(REQUEST_56[:30]) == UpgradeResult()
    result = server.receive(REQUEST_56[30:] + b"\x82\x80abcd")
    assert result.accepted and result.trailing == b"\x82\x80abcd"


def test_path_is_recorded_and_header_case_ignored() -> None:
    request = (
        b"GET /candy/net1 HTTP/1.1\r\nhost: example.org\r\nupgrade: WebSocket\r\n"
        b"connection: keep-alive, Upgrade\r\nsec-websocket-key: " + KEY + b"\r\n"
        b"sec-websocket-version: 13\r\n\r\n"
    )
    server = ServerUpgrade()
    result = server.receive(request)
    assert result.accepted
    assert server.path == "/candy/net1"


def test_plain_get_is_forbidden() -> None:
    result = ServerUpgrade().receive(b"GET / HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n")
    assert not result.accepted
    assert result.rejected and "not a WebSocket" in result.rejected
    assert status_of(result.reply) == 403
    assert headers_of(result.reply)[b"connection"] == b"close"


@pytest.mark.parametrize(
    ("drop", "replace"),
    [
        (b"Upgrade: websocket\r\n", b""),
        (b"Connection: Upgrade\r\n", b""),
        (b"Sec-WebSocket-Key: " + KEY + b"\r\n", b""),
        (b"Sec-WebSocket-Version: 13\r\n", b"Sec-WebSocket-Version: 8\r\n"),
        (b"Upgrade: websocket\r\n", b"Upgrade: h2c\r\n"),
        (b"GET ", b"POST "),
    ],
    ids=["no-upgrade", "no-connection", "no-key", "version-8", "h2c", "post"],
)
def test_incomplete_upgrade_requests_are_forbidden(drop: bytes, replace: bytes) -> None:
    request = REQUEST_56.replace(drop, replace)
    if replace.startswith(b"POST"):
        request = request.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n")
    result = ServerUpgrade().receive(request)
    assert not result.accepted and result.rejected
    assert status_of(result.reply) == 403


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n",  # TLS hello
        b"hello world\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: Upgrade\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
    ],
    ids=["tls", "text", "no-host", "bad-header"],
)
def test_garbage_is_rejected_with_400(garbage: bytes) -> None:
    result = ServerUpgrade().receive(garbage)
    assert not result.accepted
    assert result.rejected and "malformed" in result.rejected
    assert status_of(result.reply) == 400


def test_oversized_head_is_rejected() -> None:
    server = ServerUpgrade()
    result = server.receive(b"GET / HTTP/1.1\r\nX-Filler: ")
    chunk = b"a" * 1000
    sent = 0
    while result == UpgradeResult():
        result = server.receive(chunk)
        sent += len(chunk)
        assert sent <= 2 * MAX_HEAD, "never rejected"
    assert not result.accepted and result.rejected
    assert status_of(result.reply) in (400, 431)


# --- client side ------------------------------------------------------------------------------
def test_client_request_matches_what_56_sends() -> None:
    request = ClientUpgrade("192.0.2.1", 8080, "/", KEY).request()
    assert request.startswith(b"GET / HTTP/1.1\r\n")
    headers = headers_of(request)
    assert headers == {
        b"host": b"192.0.2.1:8080",
        b"upgrade": b"websocket",
        b"connection": b"Upgrade",
        b"sec-websocket-key": KEY,
        b"sec-websocket-version": b"13",
    }


def test_client_server_round_trip() -> None:
    client = ClientUpgrade("candy.example", 443, "/net", KEY)
    server = ServerUpgrade()
    result = server.receive(client.request() + b"\x82\x80abcd")
    assert result.accepted and result.trailing == b"\x82\x80abcd"
    assert server.path == "/net"
    answer = client.receive(result.reply + b"\x82\x01\x05")
    assert answer.accepted and answer.rejected is None
    assert answer.trailing == b"\x82\x01\x05"


def test_client_empty_path_becomes_slash() -> None:
    assert ClientUpgrade("h", 80, "", KEY).request().startswith(b"GET / HTTP/1.1\r\n")


def test_client_response_in_pieces() -> None:
    client = ClientUpgrade("192.0.2.1", 8080, "/", KEY)
    client.request()
    reply = ServerUpgrade().receive(REQUEST_56).reply
    for i in range(len(reply) - 1):
        assert client.receive(reply[i : i + 1]) == UpgradeResult()
    assert client.receive(reply[-1:]).accepted


def test_client_rejects_a_wrong_accept_token() -> None:
    client = ClientUpgrade("192.0.2.1", 8080, "/", KEY)
    client.request()
    reply = ServerUpgrade().receive(REQUEST_56.replace(KEY, b"AAAAAAAAAAAAAAAAAAAAAA==")).reply
    result = client.receive(reply)
    assert not result.accepted
    assert result.rejected and "Sec-WebSocket-Accept" in result.rejected


def test_client_rejects_a_missing_accept_token() -> None:
    client = ClientUpgrade("192.0.2.1", 8080, "/", KEY)
    client.request()
    result = client.receive(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    assert not result.accepted and result.rejected


@pytest.mark.parametrize("status", [200, 403, 404, 502])
def test_client_rejects_a_non_101_response(status: int) -> None:
    client = ClientUpgrade("192.0.2.1", 8080, "/", KEY)
    client.request()
    result = client.receive(f"HTTP/1.1 {status} Nope\r\nContent-Length: 0\r\n\r\n".encode())
    assert not result.accepted
    assert result.rejected and f"HTTP {status}" in result.rejected


def test_client_403_from_our_server() -> None:
    client = ClientUpgrade("192.0.2.1", 8080, "/", KEY)
    client.request()
    reply = ServerUpgrade().receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").reply
    result = client.receive(reply)
    assert result.rejected and "403" in result.rejected


def test_client_malformed_response_raises() -> None:
    client = ClientUpgrade("192.0.2.1", 8080, "/", KEY)
    client.request()
    with pytest.raises(ProtocolError, match="malformed HTTP response"):
        client.receive(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


# --- against wsproto --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extras",
    [{}, {"subprotocols": ["chat"]}, {"extra_headers": [(b"User-Agent", b"test")]}],
    ids=["plain", "subprotocol-offered", "extra-header"],
)
def test_wsproto_client_handshake_accepted(extras: dict) -> None:
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="192.0.2.1:8080", target="/ws", **extras))
    server = ServerUpgrade()
    result = server.receive(request)
    assert result.accepted
    assert server.path == "/ws"
    client.receive_data(result.reply)
    events = list(client.events())
    assert len(events) == 1 and isinstance(events[0], AcceptConnection)
    assert events[0].subprotocol is None and events[0].extensions == []


def test_wsproto_server_accepts_our_client() -> None:
    server = WSConnection(ConnectionType.SERVER)
    client = ClientUpgrade("192.0.2.1", 8080, "/", KEY)
    server.receive_data(client.request())
    events = list(server.events())
    assert len(events) == 1 and isinstance(events[0], Request)
    assert events[0].host == "192.0.2.1:8080" and events[0].target == "/"
    reply = server.send(AcceptConnection())
    assert client.receive(reply).accepted


def test_wsproto_server_rejection_seen_by_our_client() -> None:
    server = WSConnection(ConnectionType.SERVER)
    client = ClientUpgrade("192.0.2.1", 8080, "/", KEY)
    server.receive_data(client.request())
    list(server.events())
    result = client.receive(server.send(RejectConnection(status_code=401)))
    assert result.rejected and "401" in result.rejected
