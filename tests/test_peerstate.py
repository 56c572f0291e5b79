"""The peer state machine table (candy_core/peerstate.py), walked entry by entry.

The structural tests read only the table. The walks drive a real :class:`PeerManager` through
its public inputs (relayed traffic, WebSocket messages, encrypted datagrams, STUN answers and
ticks) into every state, apply every event there, and check that what happens is exactly what
the table says, including that pairs missing from the table are ignored.
"""

from __future__ import annotations

import random
import string
from collections import deque
from ipaddress import IPv4Address, IPv4Interface

import pytest

from candy_core import ClientConfig, PeerStateChanged, stun
from candy_core import messages as m
from candy_core import peermsg as pm
from candy_core.crypto import PeerCipher, peer_key
from candy_core.peers import PeerManager, State
from candy_core.peerstate import (
    EXCHANGE_AFTER,
    FORGET_ENDPOINT,
    FORGET_LAN,
    RETRY_MAX,
    RETRY_MIN,
    STAY,
    STUN_AFTER,
    TIMEOUTS,
    TRANSITIONS,
    PeerEvent,
)

PASSWORD = "pw"
US = IPv4Address("10.0.0.1")
THEM = IPv4Address("10.0.0.2")
STUN = ("192.0.2.1", 3478)
OUR_PUBLIC = ("198.51.100.1", 6000)
THEIR_PUBLIC = ("203.0.113.2", 40000)
THEIR_LAN = ("192.168.1.2", 50000)

#: The details each event's reason may use.
DETAILS = {
    PeerEvent.HEARTBEAT: {"host": THEIR_PUBLIC[0], "port": THEIR_PUBLIC[1]},
    PeerEvent.HEARTBEAT_ACK: {"host": THEIR_PUBLIC[0]},
}
TICKED = {event for _, event in TIMEOUTS.values()} | {PeerEvent.RETRY}
#: Events that come from one message, not from the tick or a STUN exchange.
MESSAGES = [
    PeerEvent.SERVER_TRAFFIC,
    PeerEvent.DISCOVERY,
    PeerEvent.PEER_PUBLIC_ENDPOINT,
    PeerEvent.PEER_LAN_ENDPOINT,
    PeerEvent.HEARTBEAT,
]


def reason_of(state: State, event: PeerEvent) -> str:
    reason = TRANSITIONS[state, event][1]
    assert reason is not None
    return reason.format(**DETAILS.get(event, {}))


def leaves(state: State) -> dict[PeerEvent, State]:
    return {e: new for (s, e), (new, _) in TRANSITIONS.items() if s is state and new is not s}


# --- the table on its own ---------------------------------------------------------------------
def test_the_table_is_protocol_4_4() -> None:
    """A second witness, transcribed from PROTOCOL.md 4.4: where each event leads from each
    state (a change to the table that is not a change to the protocol fails here)."""
    S, E = State, PeerEvent
    spec = {
        S.INIT: {
            E.SERVER_TRAFFIC: S.PREPARING,  # "a FORWARD arriving via the server ..."
            E.DISCOVERY: S.PREPARING,  # "... (or a DISCOVERY ..."
            E.PEER_LAN_ENDPOINT: S.PREPARING,  # "... or a LAN exchange) moves it to PREPARING"
            E.PEER_PUBLIC_ENDPOINT: S.PREPARING,  # "PEER in any state other than ..."
        },
        S.PREPARING: {
            E.SENT_PUBLIC_ENDPOINT_KNOWING_THEIRS: S.CONNECTING,  # "CONNECTING if we already
            E.SENT_PUBLIC_ENDPOINT: S.SYNCHRONIZING,  # know the peer's endpoint, else SYNC..."
            E.STUN_TIMEOUT: S.FAILED,  # "count > 10 -> FAILED"
            E.PEER_PUBLIC_ENDPOINT: S.PREPARING,
            E.HEARTBEAT: S.CONNECTING,  # "accepted in PREPARING ... answered"
        },
        S.SYNCHRONIZING: {
            E.PEER_PUBLIC_ENDPOINT: S.CONNECTING,  # "Receiving PEER -> CONNECTING"
            E.NO_PUBLIC_ENDPOINT: S.FAILED,  # "count > 10 -> FAILED"
        },
        S.CONNECTING: {
            E.HEARTBEAT: S.CONNECTING,  # "sets our ack flag"
            E.HEARTBEAT_ACK: S.CONNECTED,  # "a heartbeat carrying ack = 1 -> CONNECTED"
            E.NO_ANSWER: S.WAITING,  # "count > 10 -> WAITING"
            E.PEER_PUBLIC_ENDPOINT: S.CONNECTING,
        },
        S.CONNECTED: {
            E.HEARTBEAT: S.CONNECTED,
            E.HEARTBEAT_ACK: S.CONNECTED,  # "every received heartbeat with ack resets count"
            E.HEARTBEAT_LOST: S.INIT,  # "count > 3 ... -> INIT"
            E.PEER_PUBLIC_ENDPOINT: S.PREPARING,
        },
        S.WAITING: {
            E.RETRY: S.INIT,  # "after retry ticks go to INIT"
            E.PEER_PUBLIC_ENDPOINT: S.PREPARING,
        },
        S.FAILED: {
            E.PEER_PUBLIC_ENDPOINT: S.PREPARING,  # "a PEER or LAN exchange from the peer
            E.PEER_LAN_ENDPOINT: S.PREPARING,  # moves it to PREPARING again"
        },
    }
    expected = {(s, e): new for s, row in spec.items() for e, new in row.items()}
    expected |= {(s, E.ADDRESS_CHANGED): S.INIT for s in State}
    assert {key: new for key, (new, _) in TRANSITIONS.items()} == expected
    assert {s: limit for s, (limit, _) in TIMEOUTS.items()} == {
        S.PREPARING: 10,
        S.SYNCHRONIZING: 10,
        S.CONNECTING: 10,
        S.CONNECTED: 3,
    }
    assert (RETRY_MIN, RETRY_MAX, STUN_AFTER, EXCHANGE_AFTER) == (30, 3600, 1, 2)


def test_entries_are_well_formed() -> None:
    for (state, event), (new, reason) in TRANSITIONS.items():
        assert isinstance(state, State) and isinstance(event, PeerEvent)
        assert isinstance(new, State)
        if reason is STAY:
            assert new is state, f"{state.name} x {event.name}: STAY must not move"
            continue
        fields = {f for _, f, _, _ in string.Formatter().parse(reason) if f is not None}
        assert fields <= set(DETAILS.get(event, {})), f"{reason!r} uses unknown details"
        assert reason.format(**DETAILS.get(event, {}))


def test_every_event_is_used() -> None:
    assert {event for _, event in TRANSITIONS} == set(PeerEvent)


def test_every_state_is_reachable_from_init() -> None:
    seen, todo = {State.INIT}, deque([State.INIT])
    while todo:
        for new in leaves(todo.popleft()).values():
            if new not in seen:
                seen.add(new)
                todo.append(new)
    assert seen == set(State)


def test_every_state_has_a_way_out_besides_an_address_change() -> None:
    for state in State:
        ways = {e: new for e, new in leaves(state).items() if e is not PeerEvent.ADDRESS_CHANGED}
        assert ways, f"{state.name} is a trap"


def test_only_init_and_failed_wait_for_the_network_forever() -> None:
    """PROTOCOL.md 4.4: INIT waits for traffic, FAILED "does nothing actively"; every other
    state ends on its own (a timeout, or the back-off of WAITING)."""
    timed = set(TIMEOUTS) | {s for s, e in TRANSITIONS if e is PeerEvent.RETRY}
    assert set(State) - timed == {State.INIT, State.FAILED}
    for state, (limit, event) in TIMEOUTS.items():
        assert limit > 0
        assert TRANSITIONS[state, event][0] is not state
        assert [s for s, e in TRANSITIONS if e is event] == [state], "one state per timeout"


def test_an_address_change_restarts_every_state() -> None:
    for state in State:
        assert TRANSITIONS[state, PeerEvent.ADDRESS_CHANGED] == (State.INIT, "our address changed")


def test_only_an_acknowledged_heartbeat_makes_a_path() -> None:
    into = {e for s in State for e, new in leaves(s).items() if new is State.CONNECTED}
    assert into == {PeerEvent.HEARTBEAT_ACK}


def test_forgetting_states() -> None:
    assert FORGET_LAN <= FORGET_ENDPOINT
    assert {State.INIT, State.WAITING, State.FAILED} == FORGET_ENDPOINT  # PROTOCOL.md 4.4


# --- a PeerManager driven through its inputs --------------------------------------------------
class Harness:
    """Our PeerManager (10.0.0.1) and one remote peer (10.0.0.2) we play by hand."""

    def __init__(self, route: int = 0) -> None:
        config = ClientConfig(
            password=PASSWORD,
            tun=IPv4Interface(f"{US}/24"),
            stun=STUN,
            localhost="192.168.1.1",
            route=route,
        )
        self.messages: list[bytes] = []
        self.pm = PeerManager(config, random.Random(1), self._send)
        self.pm.set_address(IPv4Interface(f"{US}/24"))
        self.pm.local_port = 5000
        self.cipher = PeerCipher(random.Random(2))
        self.now = 0.0
        self.pm.handle_timer(self.now)  # schedules the first tick
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def _send(self, data: bytes) -> bool:
        self.messages.append(data)
        return True

    # what we see
    @property
    def peer(self):  # type: ignore[no-untyped-def]
        return self.pm._peers.get(THEM.packed)

    @property
    def state(self) -> State | None:
        return self.peer.state if self.peer else None

    def changes(self) -> list[tuple[str, str, str]]:
        out = []
        while (event := self.pm.next_event()) is not None:
            assert isinstance(event, PeerStateChanged) and event.ip == THEM
            out.append((event.old, event.new, event.reason))
        return out

    def datagrams(self) -> list[tuple[bytes, tuple[str, int]]]:
        self.sent += self.pm.datagrams_to_send()
        return self.sent

    def to_them(self) -> list[bytes]:
        """Plaintexts of what we sealed for the peer."""
        key = peer_key(PASSWORD, THEM.packed)
        plain = (self.cipher.open(key, d) for d, a in self.datagrams() if a != STUN)
        return [p for p in plain if p is not None]

    # inputs
    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.now += 1.0
            self.pm.handle_timer(self.now)
            self.datagrams()

    def traffic(self) -> None:
        self.pm.relayed_from(THEM.packed, self.now)

    def discovery(self) -> None:
        self.pm.receive_message(m.Discovery(THEM, US), self.now)

    def peer_message(self) -> None:
        msg = m.Peer(THEM, US, IPv4Address(THEIR_PUBLIC[0]), THEIR_PUBLIC[1])
        self.pm.receive_message(msg, self.now)

    def lan(self) -> None:
        msg = m.General.lan_endpoint(THEM, US, IPv4Address(THEIR_LAN[0]), THEIR_LAN[1])
        self.pm.receive_message(msg, self.now)

    def heartbeat(self, ack: bool) -> None:
        beat = pm.Heartbeat(THEM, IPv4Address(THEIR_PUBLIC[0]), 0, ack).encode()
        sealed = self.cipher.seal(peer_key(PASSWORD, US.packed), beat)
        self.pm.receive_datagram(sealed, THEIR_PUBLIC, self.now)

    def stun_answer(self) -> None:
        requests = [d for d, a in self.datagrams() if a == STUN]
        assert requests, "no STUN request went out"
        answer = stun.build_binding_response(requests[-1][8:20], *OUR_PUBLIC)
        self.pm.receive_datagram(answer, STUN, self.now)

    def new_address(self) -> None:
        self.pm.set_address(IPv4Interface("10.0.0.9/24"))

    # walks
    def reach(self, state: State) -> None:
        """Drive the peer into ``state`` the way the network would."""
        if state is State.INIT:
            self.reach(State.CONNECTED)
            self.tick(TIMEOUTS[State.CONNECTED][0] + 1)
        elif state is State.PREPARING:
            self.traffic()
        elif state is State.SYNCHRONIZING:
            self.reach(State.PREPARING)
            self.tick(3)
            self.stun_answer()
        elif state is State.CONNECTING:
            self.reach(State.PREPARING)
            self.heartbeat(ack=False)
        elif state is State.CONNECTED:
            self.reach(State.CONNECTING)
            self.heartbeat(ack=True)
        elif state is State.WAITING:
            self.reach(State.CONNECTING)
            self.tick(TIMEOUTS[State.CONNECTING][0] + 1)
        elif state is State.FAILED:
            self.reach(State.PREPARING)
            self.tick(TIMEOUTS[State.PREPARING][0] + 1)
        assert self.state is state
        self.changes()

    def apply(self, event: PeerEvent) -> None:
        """Make ``event`` happen to the peer through the manager's inputs."""
        state = self.state
        if event in TICKED:
            limit = RETRY_MIN - 1 if event is PeerEvent.RETRY else TIMEOUTS[state][0]
            self.tick(limit)
            assert self.state is state, f"{state} left before its limit"
            self.tick()
        elif event is PeerEvent.SENT_PUBLIC_ENDPOINT:
            self.tick(3)
            self.stun_answer()
        elif event is PeerEvent.SENT_PUBLIC_ENDPOINT_KNOWING_THEIRS:
            self.peer_message()
            self.tick(3)
            self.stun_answer()
        else:
            {
                PeerEvent.ADDRESS_CHANGED: self.new_address,
                PeerEvent.SERVER_TRAFFIC: self.traffic,
                PeerEvent.DISCOVERY: self.discovery,
                PeerEvent.PEER_PUBLIC_ENDPOINT: self.peer_message,
                PeerEvent.PEER_LAN_ENDPOINT: self.lan,
                PeerEvent.HEARTBEAT: lambda: self.heartbeat(ack=False),
                PeerEvent.HEARTBEAT_ACK: lambda: self.heartbeat(ack=True),
            }[event]()


ENTRIES = sorted(TRANSITIONS, key=lambda k: (list(State).index(k[0]), list(PeerEvent).index(k[1])))


@pytest.mark.parametrize("state,event", ENTRIES, ids=[f"{s.name}-{e.name}" for s, e in ENTRIES])
def test_each_entry_happens_as_written(state: State, event: PeerEvent) -> None:
    new, reason = TRANSITIONS[state, event]
    h = Harness()
    h.reach(state)
    if event not in TICKED and event is not PeerEvent.SENT_PUBLIC_ENDPOINT:
        h.tick()  # a running count, to see whether the event restarts it
    count = h.peer.count
    h.peer.lan = THEIR_LAN  # (known or not, it changes no transition; to see it forgotten)
    h.apply(event)
    changes = h.changes()
    if event is PeerEvent.ADDRESS_CHANGED:  # every peer is forgotten after the transition
        assert h.peer is None
        assert changes == ([] if state is new else [(state.value, new.value, reason)])
        return
    assert h.state is new
    if reason is STAY:
        assert changes == [] and h.peer.count == count
    elif new is state:
        assert changes == [] and h.peer.count == 0
    else:
        assert changes[-1] == (state.value, new.value, reason_of(state, event))
        assert h.peer.count == 0
        if new in FORGET_ENDPOINT:
            assert h.peer.endpoint is None and not h.peer.ack
            assert (h.peer.lan is None) == (new in FORGET_LAN)


MISSING = [(s, e) for s in State for e in MESSAGES if (s, e) not in TRANSITIONS]


@pytest.mark.parametrize("state,event", MISSING, ids=[f"{s.name}-{e.name}" for s, e in MISSING])
def test_each_missing_pair_is_ignored(state: State, event: PeerEvent) -> None:
    h = Harness()
    h.reach(state)
    h.tick()
    before = (h.peer.count, h.peer.endpoint, h.peer.ack, h.peer.last_heartbeat)
    h.apply(event)
    assert h.state is state and h.changes() == []
    if event is not PeerEvent.PEER_LAN_ENDPOINT:  # (a LAN endpoint is always recorded)
        assert (h.peer.count, h.peer.endpoint, h.peer.ack, h.peer.last_heartbeat) == before


@pytest.mark.parametrize("state", [State.INIT, State.FAILED])
def test_init_and_failed_stay_put_without_input(state: State) -> None:
    h = Harness()
    h.reach(state)
    h.tick(RETRY_MAX)
    assert h.state is state and h.changes() == []


# --- scenarios (what a user sees, written out: every reason appears at least once) ------------


def test_scenario_theirs_first_then_connected_then_silence() -> None:
    h = Harness()
    h.traffic()
    h.tick()
    h.peer_message()  # their PEER arrives while we still wait for STUN
    h.tick(3)
    h.stun_answer()
    h.heartbeat(ack=True)
    h.tick(4)
    assert h.changes() == [
        ("INIT", "PREPARING", "traffic through the server"),
        ("PREPARING", "CONNECTING", "sent our public endpoint"),
        ("CONNECTING", "CONNECTED", "heartbeat acknowledged by 203.0.113.2"),
        ("CONNECTED", "INIT", "no heartbeat for 3 s"),
    ]
    peers = [m.decode(msg) for msg in h.messages]
    assert any(isinstance(p, m.Peer) and p.port == OUR_PUBLIC[1] for p in peers)


def test_scenario_ours_first_then_no_answer_and_back_off() -> None:
    h = Harness()
    h.discovery()
    h.tick(3)
    h.stun_answer()
    h.peer_message()
    h.tick(11)
    assert h.peer.retry == RETRY_MIN
    h.tick(RETRY_MIN)
    assert h.changes() == [
        ("INIT", "PREPARING", "discovery"),
        ("PREPARING", "SYNCHRONIZING", "sent our public endpoint"),
        ("SYNCHRONIZING", "CONNECTING", "received the peer's public endpoint"),
        ("CONNECTING", "WAITING", "no answer to heartbeats for 10 s"),
        ("WAITING", "INIT", "retrying after back-off"),
    ]
    assert h.peer.retry == 2 * RETRY_MIN  # the next WAITING lasts twice as long
    h.traffic()
    h.heartbeat(ack=False)
    h.tick(11)
    h.tick(2 * RETRY_MIN - 1)
    assert h.state is State.WAITING
    h.tick()
    assert h.state is State.INIT


def test_scenario_lan_only_fails_then_lan_again_restarts() -> None:
    h = Harness()
    h.lan()
    h.tick(11)  # heartbeats to the LAN endpoint, no answer, no STUN answer
    assert any(a == THEIR_LAN for _, a in h.datagrams())
    h.lan()
    assert h.changes() == [
        ("INIT", "PREPARING", "received the peer's LAN endpoint"),
        ("PREPARING", "FAILED", "STUN timeout"),
        ("FAILED", "PREPARING", "received the peer's LAN endpoint"),
    ]


def test_scenario_no_public_endpoint_from_the_peer_then_a_new_address() -> None:
    h = Harness()
    h.traffic()
    h.tick(3)
    h.stun_answer()
    h.tick(11)
    h.new_address()
    assert h.changes() == [
        ("INIT", "PREPARING", "traffic through the server"),
        ("PREPARING", "SYNCHRONIZING", "sent our public endpoint"),
        ("SYNCHRONIZING", "FAILED", "no public endpoint from the peer"),
        ("FAILED", "INIT", "our address changed"),
    ]


def test_scenario_heartbeats_keep_a_path_and_delay_is_sent_once_on_entry() -> None:
    h = Harness(route=5)
    h.reach(State.CONNECTED)
    delays = [p for p in h.to_them() if p[0] == pm.DELAY]
    assert len(delays) == 1
    for _ in range(10):  # acknowledged heartbeats restart the count: the path stays
        h.tick(3)
        h.heartbeat(ack=True)
    assert h.state is State.CONNECTED and h.changes() == []
    assert len([p for p in h.to_them() if p[0] == pm.DELAY]) == 1
    h.peer_message()  # a new public endpoint: negotiate again
    assert h.changes() == [("CONNECTED", "PREPARING", "received the peer's public endpoint")]
    assert h.peer.endpoint == THEIR_PUBLIC and h.peer.delay_ms is None


def test_a_heartbeat_in_preparing_is_answered() -> None:
    h = Harness()
    h.traffic()
    h.heartbeat(ack=False)
    beats = [pm.Heartbeat.decode(p) for p in h.to_them() if p[0] == pm.HEARTBEAT]
    assert beats and beats[-1].ack
    assert h.changes()[-1] == ("PREPARING", "CONNECTING", "heartbeat from 203.0.113.2:40000")
