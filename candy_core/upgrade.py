"""The HTTP/1.1 WebSocket upgrade, both roles, with h11 (and wsproto's token helpers)."""

from __future__ import annotations

from dataclasses import dataclass

import h11
from wsproto.utilities import generate_accept_token

from candy_core.errors import ProtocolError

#: Most bytes of HTTP request/response head we accept before giving up on a peer.
MAX_HEAD = 16384

_REASONS = {400: b"Bad Request", 403: b"Forbidden"}


@dataclass(frozen=True, slots=True)
class UpgradeResult:
    """Outcome of feeding bytes to an upgrade: reply bytes, whether done, and leftover bytes."""

    reply: bytes = b""
    accepted: bool = False
    rejected: str | None = None
    trailing: bytes = b""


def _headers(event: h11.Request | h11.InformationalResponse | h11.Response) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in event.headers}


class ServerUpgrade:
    """Server side: parse the request, answer 101 for a WebSocket upgrade, 403 otherwise."""

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.path = "/"

    def receive(self, data: bytes) -> UpgradeResult:
        self._h11.receive_data(data)
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            return self._reject(400, f"malformed HTTP request ({exc})")
        if event is h11.NEED_DATA:
            return UpgradeResult()
        if not isinstance(event, h11.Request):
            return self._reject(400, "expected an HTTP request")
        self.path = event.target.decode("ascii", "replace")
        headers = _headers(event)
        tokens = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
        key = headers.get(b"sec-websocket-key")
        if (
            event.method != b"GET"
            or headers.get(b"upgrade", b"").lower() != b"websocket"
            or b"upgrade" not in tokens
            or not key
        ):
            return self._reject(403, "not a WebSocket upgrade request")
        if headers.get(b"sec-websocket-version") != b"13":
            return self._reject(403, "unsupported WebSocket version")
        response = h11.InformationalResponse(
            status_code=101,
            reason=b"Switching Protocols",
            headers=[
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Accept", generate_accept_token(key)),
            ],
        )
        reply = self._h11.send(response) or b""
        return UpgradeResult(reply=reply, accepted=True, trailing=bytes(self._h11.trailing_data[0]))

    def _reject(self, status: int, why: str) -> UpgradeResult:
        reply = b""
        if self._h11.our_state is h11.IDLE or self._h11.our_state is h11.SEND_RESPONSE:
            try:
                reply = (
                    self._h11.send(
                        h11.Response(
                            status_code=status,
                            reason=_REASONS.get(status, b"Error"),
                            headers=[(b"Content-Length", b"0"), (b"Connection", b"close")],
                        )
                    )
                    or b""
                )
                reply += self._h11.send(h11.EndOfMessage()) or b""
            except h11.LocalProtocolError:
                reply = (
                    f"HTTP/1.1 {status} Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                ).encode()
        return UpgradeResult(reply=reply, rejected=why)


class ClientUpgrade:
    """Client side: the upgrade request as the 5.6 client sends it, and the 101 check."""

    def __init__(self, host: str, port: int, path: str, nonce: bytes) -> None:
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self._nonce = nonce
        self._request = h11.Request(
            method=b"GET",
            target=path or "/",
            headers=[
                (b"Host", f"{host}:{port}".encode("idna")),
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Key", nonce),
                (b"Sec-WebSocket-Version", b"13"),
            ],
        )

    def request(self) -> bytes:
        """The bytes of the upgrade request."""
        data = self._h11.send(self._request) or b""
        return data + (self._h11.send(h11.EndOfMessage()) or b"")

    def receive(self, data: bytes) -> UpgradeResult:
        self._h11.receive_data(data)
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(f"malformed HTTP response from server ({exc})") from None
        if event is h11.NEED_DATA:
            return UpgradeResult()
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            headers = _headers(event)
            if headers.get(b"sec-websocket-accept") != generate_accept_token(self._nonce):
                return UpgradeResult(rejected="server sent a wrong Sec-WebSocket-Accept")
            return UpgradeResult(accepted=True, trailing=bytes(self._h11.trailing_data[0]))
        status = getattr(event, "status_code", None)
        return UpgradeResult(rejected=f"server refused the WebSocket upgrade (HTTP {status})")
