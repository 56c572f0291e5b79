"""The shells' UDP socket: batches in and out, GSO coalescing, and its fallback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shells.udp import UdpSocket


@pytest.fixture
def pair() -> Iterator[tuple[UdpSocket, UdpSocket]]:
    a, b = UdpSocket(0, "127.0.0.1"), UdpSocket(0, "127.0.0.1")
    yield a, b
    a.close()
    b.close()


def _drain(sock: UdpSocket, expected: int, timeout: float = 2.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        got += [data for data, _ in sock.recv_batch(64)]
        time.sleep(0.005)
    return got


def test_send_many_delivers_every_datagram_in_order(pair: tuple[UdpSocket, UdpSocket]) -> None:
    a, b = pair
    to_b, to_a = ("127.0.0.1", b.port), ("127.0.0.1", a.port)
    datagrams = [(bytes([i]) * 1445, to_b) for i in range(50)]  # one GSO run (and a split)
    datagrams += [(b"short", to_b), (b"other" * 10, to_a), (b"z" * 1445, to_b)]
    a.send_many(datagrams)
    got = _drain(b, 52)
    assert got == [d for d, addr in datagrams if addr == to_b]
    assert _drain(a, 1) == [b"other" * 10]
    assert a.dropped == 0


def test_without_gso_every_datagram_goes_alone(pair: tuple[UdpSocket, UdpSocket]) -> None:
    a, b = pair
    a.gso = False
    datagrams = [(bytes([i]) * 1000, ("127.0.0.1", b.port)) for i in range(5)]
    a.send_many(datagrams)
    assert _drain(b, 5) == [d for d, _ in datagrams]


def test_a_refused_segmentation_falls_back_to_single_datagrams(
    pair: tuple[UdpSocket, UdpSocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair

    class NoGso:
        def __init__(self, sock: object) -> None:
            self._sock = sock

        def sendmsg(self, *args: object) -> int:
            raise OSError(5, "Input/output error")

        def __getattr__(self, name: str) -> object:
            return getattr(self._sock, name)

    monkeypatch.setattr(a, "_sock", NoGso(a._sock))
    datagrams = [(bytes([i]) * 800, ("127.0.0.1", b.port)) for i in range(4)]
    a.send_many(datagrams)
    assert not a.gso
    assert _drain(b, 4) == [d for d, _ in datagrams]
