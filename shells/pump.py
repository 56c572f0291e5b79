"""Moving a core's outputs to real I/O: the one loop body every runtime shell shares.

A shell hands a pump the I/O operations of its runtime (write to a connection, close it,
send a datagram, open a connection) and calls :meth:`flush` after every input it gave the
core; the pump returns the core's next deadline for the shell's timer.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Hashable
from typing import TypeVar

from candy_core import (
    AddressChanged,
    ClientConfig,
    ClientEvent,
    Connected,
    Disconnected,
    PingReply,
    RelayServer,
    ServerEvent,
    drain_client,
    drain_server,
)
from candy_core import Client as ClientCore
from shells.common import Resolver, client_config_for_run, describe, system_rng
from shells.state import StateStore
from shells.tun import TunDevice

log = logging.getLogger("candy")

#: Packets kept for an embedding program that reads them itself (beyond: dropped, counted).
PACKET_QUEUE = 4096


_Event = TypeVar("_Event", ClientEvent, ServerEvent)


def _call_handler(handler: Callable[[_Event], None] | None, event: _Event) -> None:
    if handler is None:
        return
    try:
        handler(event)
    except Exception:
        log.exception("event handler failed")


class InputGuard:
    """Keeps a reader going when handing one input to a core raises: logs, counts, drops.

    A bug, or a rule broken by hostile input, then costs one datagram, packet or connection,
    never the reader (in the gevent and threaded shells one escaped exception would end a
    reader for good). Call :meth:`failed` from inside the ``except`` block.
    """

    def __init__(self) -> None:
        #: Inputs dropped because handling them raised.
        self.errors = 0

    def failed(self, what: str) -> None:
        self.errors += 1
        count = self.errors
        if count <= 10 or count % 1000 == 0:  # bounded logging, however hostile the input
            log.exception("internal error handling %s (%d so far); dropped it", what, count)


class ServerPump:
    """Flushes a :class:`RelayServer` into per-connection write and close operations."""

    def __init__(
        self,
        core: RelayServer,
        write: Callable[[Hashable, bytes], None],
        close: Callable[[Hashable], None],
        on_event: Callable[[ServerEvent], None] | None = None,
    ) -> None:
        self.core = core
        self.write_connection = write
        self.close_connection = close
        self.on_event = on_event
        self.guard = InputGuard()

    def flush(self) -> float | None:
        """Write, close and report what the core produced; returns its next deadline."""
        return drain_server(self.core, self)

    def handle_event(self, event: ServerEvent) -> None:
        """Log ``event`` and pass it to the ``on_event`` handler."""
        log.debug("%s", describe(event))
        _call_handler(self.on_event, event)


class ClientPump:
    """A client core with its TUN device (optional), saved state and event handling.

    The shell supplies how to write to and close the server connection, send a datagram and
    open a new connection; the pump does the rest the same way for every runtime.
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        tun: bool,
        state_dir: str | None,
        stun: tuple[str | None, int | None] = (None, None),
        on_event: Callable[[ClientEvent], None] | None = None,
        getaddrinfo: Resolver | None = None,
    ) -> None:
        # Resolves names (with ``getaddrinfo``: the runtime's resolver, default the stdlib's),
        # reads the saved state and creates the TUN device: shells make it in start().
        self.config = client_config_for_run(config, *stun, getaddrinfo)
        rng = system_rng()
        self.store = StateStore(state_dir, config.cache_key)
        self.core = ClientCore(self.config, rng, self.store.load(rng))
        self.tun = TunDevice.create(self.config.interface_name) if tun else None
        self.on_event = on_event
        self.guard = InputGuard()
        #: Packets for an embedding program (no TUN), oldest first.
        self.packets: deque[bytes] = deque(maxlen=PACKET_QUEUE)
        self.joined = False
        self.write_server: Callable[[bytes], None] = lambda data: None
        self.close_server: Callable[[], None] = lambda: None
        self.send_datagrams: Callable[[list[tuple[bytes, tuple[str, int]]]], None] = (
            lambda datagrams: None
        )
        self.open_connection: Callable[[], None] = lambda: None
        self.packets_ready: Callable[[], None] = lambda: None
        #: Hands each :class:`PingReply` to the shell's waiting ``ping()``.
        self.ping_replied: Callable[[PingReply], None] = lambda reply: None

    def flush(self) -> float | None:
        """Carry out everything the core produced; returns its next deadline."""
        return drain_client(self.core, self)

    def deliver_packets(self, packets: list[bytes]) -> None:
        """Write ``packets`` to TUN, or queue them for the embedding program."""
        if self.tun is not None:
            write = self.tun.write
            for packet in packets:
                write(packet)
        else:
            self.packets.extend(packets)
            self.packets_ready()

    def close(self) -> None:
        """Remove the TUN device."""
        if self.tun is not None:
            self.tun.close()

    def handle_event(self, event: ClientEvent) -> None:
        """Log ``event``, configure TUN and save the address it names, then pass it on."""
        if isinstance(event, PingReply):
            log.debug("%s", describe(event))
            self.ping_replied(event)
            _call_handler(self.on_event, event)
            return
        log.info("%s", describe(event))
        if isinstance(event, AddressChanged):
            if self.tun is not None:
                try:
                    self.tun.configure(event.address)
                except OSError as exc:
                    log.error("cannot configure %s with %s: %s", self.tun.name, event.address, exc)
            if self.config.tun is None:
                self.store.save_address(event.address)
        elif isinstance(event, Connected):
            self.joined = True
        elif isinstance(event, Disconnected):
            self.joined = False
        _call_handler(self.on_event, event)
