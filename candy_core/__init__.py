"""Candy protocol core: pure, sans-IO (bytes, time and randomness in; bytes and events out).

Everything an embedding program or a runtime shell needs is importable from here, as
``from candy_core import RelayServer, Client, ClientConfig``; the modules behind these names
(``server``, ``client``, ``peers``, ``peerstate``, ``config``, ``limits``, ``drain``, ``events``,
``errors``, ``auth``, ``addressing``) are the implementation, imported directly only by their
own unit tests. The wire codecs (``messages``, ``peermsg``, ``wsframe``, ``upgrade``, ``stun``,
``crypto``) are public modules for tools and test harnesses that speak the protocol, and
``candy_core.sim`` is the simulator. Every error the core raises on purpose is a
:class:`CandyError`.
"""

from candy_core.client import Client, ClientState, ClientStats, new_vmac
from candy_core.config import (
    DEFAULT_MAX_FRAME,
    ClientConfig,
    FieldError,
    ServerConfig,
    check_port,
    parse_interface,
)
from candy_core.drain import ClientSink, ServerSink, drain_client, drain_server
from candy_core.errors import (
    CandyError,
    ConfigError,
    FrameError,
    ProtocolError,
    StunError,
)
from candy_core.events import (
    AddressAssigned,
    AddressChanged,
    ClientAuthenticated,
    ClientDisconnected,
    ClientEvent,
    Connected,
    Disconnected,
    PeerStateChanged,
    PingReply,
    Reconnecting,
    ServerEvent,
)
from candy_core.limits import Limits
from candy_core.peers import PeerStatus
from candy_core.peerstate import PeerEvent, State
from candy_core.server import RelayServer, ServerStats
from candy_core.sim import Nat, SimClient, Simulation
from candy_core.status import ClientInfo, ClientStatus, PeerInfo, ServerStatus

__all__ = [
    "DEFAULT_MAX_FRAME",
    "AddressAssigned",
    "AddressChanged",
    "CandyError",
    "Client",
    "ClientAuthenticated",
    "ClientConfig",
    "ClientDisconnected",
    "ClientEvent",
    "ClientInfo",
    "ClientSink",
    "ClientState",
    "ClientStats",
    "ClientStatus",
    "ConfigError",
    "Connected",
    "Disconnected",
    "FieldError",
    "FrameError",
    "Limits",
    "Nat",
    "PeerEvent",
    "PeerInfo",
    "PeerStateChanged",
    "PeerStatus",
    "PingReply",
    "ProtocolError",
    "Reconnecting",
    "RelayServer",
    "ServerConfig",
    "ServerEvent",
    "ServerSink",
    "ServerStats",
    "ServerStatus",
    "SimClient",
    "Simulation",
    "State",
    "StunError",
    "check_port",
    "drain_client",
    "drain_server",
    "new_vmac",
    "parse_interface",
]
