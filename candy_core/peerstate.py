"""The per-peer state machine of PROTOCOL.md 4.4, as data: read :data:`TRANSITIONS` to learn it.

:class:`~candy_core.peers.PeerManager` turns what it receives (relayed traffic, PEER,
DISCOVERY, GENERAL and heartbeat messages, STUN answers) and its 1-second tick into a
:class:`PeerEvent` and fires it; this module says what each event does in each state. What a
peer *sends* in each state (heartbeats, STUN requests, PEER and LAN endpoint messages, DELAY
probes) stays in peers.py.

How an entry ``(state, event): (new, reason)`` is applied:

- a pair that is not in the table is ignored: the peer stays, nothing about it changes;
- ``reason is None`` (shown as ``STAY``): the event is accepted (the caller records what it
  carries) but the peer stays, and its tick count keeps running;
- otherwise the peer enters ``new``: its tick count restarts at 0, entering a state of
  :data:`FORGET_ENDPOINT` forgets its endpoint and ack flag (and, in :data:`FORGET_LAN`, its LAN
  endpoint), and if ``new`` differs from ``state`` a ``PeerStateChanged`` event reports
  ``reason.format(**details)``. Re-entering the same state only restarts the count.

No state is a trap: every one is left by some event (``test_peerstate`` walks the table).
INIT waits for traffic and FAILED for the peer (4.4: "do nothing actively"); every other state
has a timeout in :data:`TIMEOUTS`, or the back-off of WAITING.
"""

from __future__ import annotations

from enum import Enum


class State(Enum):
    # Members are singletons compared by identity: hash them the same way, in C (Enum's own
    # __hash__ is Python code, and the table is looked up on every packet relayed to a peer).
    __hash__ = object.__hash__

    INIT = "INIT"
    PREPARING = "PREPARING"
    SYNCHRONIZING = "SYNCHRONIZING"
    CONNECTING = "CONNECTING"
    CONNECTED = "CONNECTED"
    WAITING = "WAITING"
    FAILED = "FAILED"


class PeerEvent(Enum):
    """Something that happened to one peer; the details a reason may use are in brackets."""

    __hash__ = object.__hash__

    #: Our own virtual address changed (keys change, every path starts over).
    ADDRESS_CHANGED = "address changed"
    #: A FORWARD from the peer arrived through the server.
    SERVER_TRAFFIC = "server traffic"
    #: A DISCOVERY from the peer (or its answer to ours).
    DISCOVERY = "discovery"
    #: A PEER message: the peer's public endpoint.
    PEER_PUBLIC_ENDPOINT = "peer public endpoint"
    #: A GENERAL subtype 0: the peer's LAN endpoint.
    PEER_LAN_ENDPOINT = "peer LAN endpoint"
    #: A HEARTBEAT from the peer, with or without ack [host, port: where it came from].
    HEARTBEAT = "heartbeat"
    #: The HEARTBEAT just received carries ``ack = 1`` (fired after HEARTBEAT) [host].
    HEARTBEAT_ACK = "heartbeat ack"
    #: A STUN answer arrived and we sent PEER with our public endpoint; theirs is unknown.
    SENT_PUBLIC_ENDPOINT = "sent public endpoint"
    #: The same, and we already know their endpoint (from a PEER that came first).
    SENT_PUBLIC_ENDPOINT_KNOWING_THEIRS = "sent public endpoint, knowing theirs"
    #: Timeouts, fired by the tick (see TIMEOUTS), and the end of WAITING's back-off.
    STUN_TIMEOUT = "STUN timeout"
    NO_PUBLIC_ENDPOINT = "no public endpoint"
    NO_ANSWER = "no answer"
    HEARTBEAT_LOST = "heartbeat lost"
    RETRY = "retry"


#: ``reason`` of an entry that accepts an event without a transition.
STAY = None

_S, _E = State, PeerEvent
_PUBLIC = "received the peer's public endpoint"
_LAN = "received the peer's LAN endpoint"

TRANSITIONS: dict[tuple[State, PeerEvent], tuple[State, str | None]] = {
    # INIT: a direct path is only negotiated once something comes from the peer.
    (_S.INIT, _E.SERVER_TRAFFIC): (_S.PREPARING, "traffic through the server"),
    (_S.INIT, _E.DISCOVERY): (_S.PREPARING, "discovery"),
    (_S.INIT, _E.PEER_PUBLIC_ENDPOINT): (_S.PREPARING, _PUBLIC),
    (_S.INIT, _E.PEER_LAN_ENDPOINT): (_S.PREPARING, _LAN),
    # PREPARING: asking STUN for our public endpoint.
    (_S.PREPARING, _E.PEER_PUBLIC_ENDPOINT): (_S.PREPARING, _PUBLIC),  # count restarts
    (_S.PREPARING, _E.HEARTBEAT): (_S.CONNECTING, "heartbeat from {host}:{port}"),
    (_S.PREPARING, _E.SENT_PUBLIC_ENDPOINT): (_S.SYNCHRONIZING, "sent our public endpoint"),
    (_S.PREPARING, _E.SENT_PUBLIC_ENDPOINT_KNOWING_THEIRS): (
        _S.CONNECTING,
        "sent our public endpoint",
    ),
    (_S.PREPARING, _E.STUN_TIMEOUT): (_S.FAILED, "STUN timeout"),
    # SYNCHRONIZING: we sent ours, waiting for theirs.
    (_S.SYNCHRONIZING, _E.PEER_PUBLIC_ENDPOINT): (_S.CONNECTING, _PUBLIC),
    (_S.SYNCHRONIZING, _E.NO_PUBLIC_ENDPOINT): (_S.FAILED, "no public endpoint from the peer"),
    # CONNECTING: heartbeats both ways until one carries ack.
    (_S.CONNECTING, _E.PEER_PUBLIC_ENDPOINT): (_S.CONNECTING, STAY),  # recorded if none yet
    (_S.CONNECTING, _E.HEARTBEAT): (_S.CONNECTING, STAY),  # sets our ack flag
    (_S.CONNECTING, _E.HEARTBEAT_ACK): (_S.CONNECTED, "heartbeat acknowledged by {host}"),
    (_S.CONNECTING, _E.NO_ANSWER): (_S.WAITING, "no answer to heartbeats for 10 s"),
    # CONNECTED: packets go direct; every acknowledged heartbeat restarts the count.
    (_S.CONNECTED, _E.PEER_PUBLIC_ENDPOINT): (_S.PREPARING, _PUBLIC),
    (_S.CONNECTED, _E.HEARTBEAT): (_S.CONNECTED, STAY),
    (_S.CONNECTED, _E.HEARTBEAT_ACK): (_S.CONNECTED, "heartbeat acknowledged by {host}"),
    (_S.CONNECTED, _E.HEARTBEAT_LOST): (_S.INIT, "no heartbeat for 3 s"),
    # WAITING: back-off after a failed attempt.
    (_S.WAITING, _E.PEER_PUBLIC_ENDPOINT): (_S.PREPARING, _PUBLIC),
    (_S.WAITING, _E.RETRY): (_S.INIT, "retrying after back-off"),
    # FAILED: nothing is tried until the peer tries.
    (_S.FAILED, _E.PEER_PUBLIC_ENDPOINT): (_S.PREPARING, _PUBLIC),
    (_S.FAILED, _E.PEER_LAN_ENDPOINT): (_S.PREPARING, _LAN),
    # Any state: a new address of ours means new keys.
    **{(state, _E.ADDRESS_CHANGED): (_S.INIT, "our address changed") for state in State},
}

#: States whose entry forgets the peer's endpoint and ack flag ...
FORGET_ENDPOINT = frozenset({State.INIT, State.WAITING, State.FAILED})
#: ... and, except WAITING, its LAN endpoint too.
FORGET_LAN = frozenset({State.INIT, State.FAILED})

#: Tick-driven timeouts: in ``state``, once the count exceeds ``limit``, fire ``event``.
TIMEOUTS: dict[State, tuple[int, PeerEvent]] = {
    State.PREPARING: (10, PeerEvent.STUN_TIMEOUT),
    State.SYNCHRONIZING: (10, PeerEvent.NO_PUBLIC_ENDPOINT),
    State.CONNECTING: (10, PeerEvent.NO_ANSWER),
    State.CONNECTED: (3, PeerEvent.HEARTBEAT_LOST),
}
#: PREPARING asks STUN while its count exceeds this ...
STUN_AFTER = 1
#: ... and sends PEER on a STUN answer once its count exceeds this.
EXCHANGE_AFTER = 2
#: WAITING fires RETRY after ``retry`` ticks; ``retry`` doubles from RETRY_MIN up to RETRY_MAX
#: with every retry and starts over at RETRY_MIN on reaching CONNECTED.
RETRY_MIN = 30
RETRY_MAX = 3600
