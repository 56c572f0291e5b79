"""The drain loop hands a core's outputs to a sink in one fixed order (candy_core/drain.py)."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any

from candy_core.drain import drain_client, drain_server


class Recorder:
    """A sink of both kinds that records every call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args))


class FakeClientCore:
    """Every output of a client core at once."""

    def __init__(self, *, close: bool = True, connect: bool = True) -> None:
        self.data = b"frame"
        self.close = close
        self.connect = connect
        self.packets = [b"p1", b"p2"]
        self.datagrams = [(b"d1", ("192.0.2.1", 1)), (b"d2", ("192.0.2.2", 2))]
        self.events: deque[str] = deque(["e1", "e2"])

    def data_to_send(self) -> bytes:
        data, self.data = self.data, b""
        return data

    def take_close_request(self) -> bool:
        close, self.close = self.close, False
        return close

    def packets_to_deliver(self) -> list[bytes]:
        packets, self.packets = self.packets, []
        return packets

    def datagrams_to_send(self) -> list[tuple[bytes, tuple[str, int]]]:
        datagrams, self.datagrams = self.datagrams, []
        return datagrams

    def next_event(self) -> str | None:
        return self.events.popleft() if self.events else None

    def take_connect_request(self) -> bool:
        connect, self.connect = self.connect, False
        return connect

    def next_deadline(self) -> float | None:
        return 12.5


class FakeServerCore:
    def __init__(self) -> None:
        self.data: list[tuple[Hashable, bytes]] = [(1, b"a"), (2, b"b")]
        self.closing: list[Hashable] = [2]
        self.events: deque[str] = deque(["e1"])

    def data_to_send(self) -> list[tuple[Hashable, bytes]]:
        data, self.data = self.data, []
        return data

    def connections_to_close(self) -> list[Hashable]:
        closing, self.closing = self.closing, []
        return closing

    def next_event(self) -> str | None:
        return self.events.popleft() if self.events else None

    def next_deadline(self) -> float | None:
        return None


def test_client_outputs_go_out_data_then_close_then_packets_datagrams_events_connect() -> None:
    core, sink = FakeClientCore(), Recorder()
    assert drain_client(core, sink) == 12.5  # type: ignore[arg-type]
    assert sink.calls == [
        ("write_server", b"frame"),
        ("close_server",),
        ("deliver_packets", [b"p1", b"p2"]),
        ("send_datagrams", [(b"d1", ("192.0.2.1", 1)), (b"d2", ("192.0.2.2", 2))]),
        ("handle_event", "e1"),
        ("handle_event", "e2"),
        ("open_connection",),
    ]


def test_empty_client_outputs_are_not_handed_over() -> None:
    core, sink = FakeClientCore(close=False, connect=False), Recorder()
    drain_client(core, sink)  # type: ignore[arg-type]
    sink.calls.clear()
    assert drain_client(core, sink) == 12.5  # type: ignore[arg-type]
    assert sink.calls == []


def test_server_writes_before_it_closes_then_reports_events() -> None:
    core, sink = FakeServerCore(), Recorder()
    assert drain_server(core, sink) is None  # type: ignore[arg-type]
    assert sink.calls == [
        ("write_connection", 1, b"a"),
        ("write_connection", 2, b"b"),
        ("close_connection", 2),
        ("handle_event", "e1"),
    ]
