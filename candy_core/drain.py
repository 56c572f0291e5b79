"""Draining a core's outputs: the one loop every shell and the simulator run after an input.

After a shell hands a core anything (bytes, a datagram, a packet, a timer tick), it collects
everything the core produced and carries it out. :func:`drain_client` and
:func:`drain_server` do the collecting in one fixed order and hand each output to a *sink*
-- the shell's I/O operations (or the simulator's virtual network). They do no I/O of their
own and return the core's next deadline for the caller's timer.

The order is part of the contract (:func:`drain_client`): bytes for the server go out before
a requested close, so the last frames of a connection are not lost, and a new connection is
opened only after everything of the old one was handled.

These run once per input on the hot path: they allocate nothing beyond what the core hands
out, and a sink should expose its operations as plain attributes or methods (a shell may
store bound methods or closures on it).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

from candy_core.client import Client
from candy_core.events import ClientEvent, ServerEvent
from candy_core.router import NetworkRouter
from candy_core.server import RelayServer

__all__ = ["ClientSink", "ServerSink", "drain_client", "drain_server"]


class ClientSink(Protocol):
    """Where :func:`drain_client` puts a client core's outputs."""

    def write_server(self, data: bytes, /) -> None:
        """Write ``data`` (raw stream bytes) to the connection to the server."""

    def close_server(self) -> None:
        """Close the connection to the server."""

    def deliver_packets(self, packets: list[bytes], /) -> None:
        """Deliver IPv4 packets to the TUN device (or the embedding program), in order."""

    def send_datagrams(self, datagrams: list[tuple[bytes, tuple[str, int]]], /) -> None:
        """Send UDP datagrams, each to its ``(host, port)``, in order."""

    def handle_event(self, event: ClientEvent, /) -> None:
        """Act on, or report, one event of the core."""

    def open_connection(self) -> None:
        """Start opening a new connection to the server (the core is told when it is made)."""


class ServerSink(Protocol):
    """Where :func:`drain_server` puts a relay server core's outputs."""

    def write_connection(self, cid: Hashable, data: bytes, /) -> None:
        """Write ``data`` (raw stream bytes) to connection ``cid``."""

    def close_connection(self, cid: Hashable, /) -> None:
        """Close connection ``cid``."""

    def handle_event(self, event: ServerEvent, /) -> None:
        """Act on, or report, one event of the core."""


def drain_client(core: Client, sink: ClientSink) -> float | None:
    """Hand everything ``core`` produced to ``sink``; returns ``core.next_deadline()``.

    Order: bytes to the server, then a requested close of that connection, packets to
    deliver, datagrams, events, and last a request to open a new connection. Empty outputs
    are not handed over.
    """
    data = core.data_to_send()
    if data:
        sink.write_server(data)
    if core.take_close_request():
        sink.close_server()
    packets = core.packets_to_deliver()
    if packets:
        sink.deliver_packets(packets)
    datagrams = core.datagrams_to_send()
    if datagrams:
        sink.send_datagrams(datagrams)
    while (event := core.next_event()) is not None:
        sink.handle_event(event)
    if core.take_connect_request():
        sink.open_connection()
    return core.next_deadline()


def drain_server(core: RelayServer | NetworkRouter, sink: ServerSink) -> float | None:
    """Hand everything ``core`` produced to ``sink``; returns ``core.next_deadline()``.

    Order: bytes per connection, then connections to close (so a connection's last bytes
    are written before it closes), then events.
    """
    for cid, data in core.data_to_send():
        sink.write_connection(cid, data)
    for cid in core.connections_to_close():
        sink.close_connection(cid)
    while (event := core.next_event()) is not None:
        sink.handle_event(event)
    return core.next_deadline()
