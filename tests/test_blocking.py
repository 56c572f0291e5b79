"""The blocking shells (gevent, threaded): a Client does its I/O in start(), on its runtime.

Constructing a client resolves nothing, reads no state and creates no device, so a gevent
program never blocks its hub by building one; ``start()`` resolves names with the runtime's
own resolver (gevent's cooperative one, or the stdlib's for threads).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import gevent.socket
import pytest
from runtimes import ADAPTERS, adapter_fixture, wait_until

from candy_core import ClientConfig, Disconnected
from shells.state import StateStore
from shells.tun import TunDevice
from shells.udp import UdpSocket

SERVER_HOST = "candy-server.invalid"
STUN_HOST = "candy-stun.invalid"
RESOLVERS = {"gevent": gevent.socket, "threaded": socket}


@pytest.fixture(params=[name for name in sorted(ADAPTERS) if name in RESOLVERS])
def adapter(request: pytest.FixtureRequest) -> Any:
    yield from adapter_fixture(request)


def config() -> ClientConfig:
    return ClientConfig(password="blocking", host=SERVER_HOST, port=443)


def spy_io(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every name lookup, state access, TUN device or UDP socket from now on, by name."""
    calls: list[str] = []

    def recorder(what: str) -> Any:
        def record(*args: Any, **kw: Any) -> Any:
            calls.append(what)
            raise OSError(f"{what} called")

        return record

    monkeypatch.setattr(socket, "getaddrinfo", recorder("socket.getaddrinfo"))
    monkeypatch.setattr(gevent.socket, "getaddrinfo", recorder("gevent.socket.getaddrinfo"))
    monkeypatch.setattr(StateStore, "load", recorder("StateStore.load"))
    monkeypatch.setattr(StateStore, "save_address", recorder("StateStore.save_address"))
    monkeypatch.setattr(TunDevice, "create", recorder("TunDevice.create"))
    monkeypatch.setattr(UdpSocket, "__init__", recorder("UdpSocket"))
    return calls


def test_constructing_a_client_does_no_io(
    adapter: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir = tmp_path / "missing" / "state"
    io = spy_io(monkeypatch)
    cfg = config()

    client = adapter.call(
        lambda: adapter.module.Client(cfg, state_dir=str(state_dir), stun_host=STUN_HOST)
    )

    assert io == []
    assert client.config is cfg
    assert client.address is None
    assert adapter.call(client.peer_status) == []
    assert adapter.call(lambda: client.recv_packet(timeout=0.01)) is None
    assert not adapter.call(lambda: client.wait_connected(0.01))
    with pytest.raises(RuntimeError, match="start"):
        adapter.call(lambda: client.send_packet(b"\x45" + bytes(19)))
    adapter.call(client.stop)  # a client that never started stops quietly
    assert io == []
    assert not (tmp_path / "missing").exists()


def test_start_resolves_names_with_the_runtimes_resolver(
    adapter: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime_resolver = RESOLVERS[adapter.name]
    other_resolver = gevent.socket if runtime_resolver is socket else socket
    asked: list[str] = []
    asked_elsewhere: list[str] = []
    real_other = other_resolver.getaddrinfo

    def resolve(host: str, port: int, *args: Any, **kw: Any) -> list[Any]:
        asked.append(host)
        if host == STUN_HOST:
            return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.1", port))]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def elsewhere(host: str, *args: Any, **kw: Any) -> Any:
        asked_elsewhere.append(host)
        return real_other(host, *args, **kw)

    monkeypatch.setattr(runtime_resolver, "getaddrinfo", resolve)
    monkeypatch.setattr(other_resolver, "getaddrinfo", elsewhere)
    state_dir = tmp_path / "missing" / "state"
    events: list[object] = []
    client = adapter.call(
        lambda: adapter.module.Client(
            config(),
            tun=False,
            state_dir=str(state_dir),
            stun_host=STUN_HOST,
            stun_port=9,
            on_event=events.append,
        )
    )
    assert asked == []
    try:
        adapter.call(client.start)
        # STUN resolved at start; the LAN address looked up towards the server, in vain.
        assert asked[:2] == [STUN_HOST, SERVER_HOST]
        assert client.config.stun == ("127.0.0.1", 9)
        assert client.config.localhost is None
        assert (state_dir / "vmac").is_dir()  # the state is read (and the VMAC saved) now
        # The connection attempts resolve the server's name with the same resolver.
        assert wait_until(lambda: asked.count(SERVER_HOST) >= 2, 5.0), asked
        assert wait_until(lambda: any(isinstance(e, Disconnected) for e in events), 5.0)
        assert client.address is None
    finally:
        adapter.call(client.stop)
    ours = {SERVER_HOST, STUN_HOST}
    assert not [host for host in asked_elsewhere if host in ours], asked_elsewhere
