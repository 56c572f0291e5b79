"""NetworkRouter: several networks on one relay, chosen by the URL path, isolated completely."""

from __future__ import annotations

import base64
import random
from ipaddress import IPv4Address as ip

import pytest
from test_server import PASSWORD, WALL, FakeClient, Relay, forward

from candy_core import (
    ConfigError,
    Network,
    NetworkRouter,
    RelayServer,
    ServerConfig,
    make_relay,
)
from candy_core import messages as m
from candy_core.limits import Limits
from candy_core.upgrade import ClientUpgrade, ServerUpgrade

OFFICE_PW = "office-pw"
LAB_PW = "lab-pw"


def networks(**kw: object) -> list[Network]:
    return [
        Network("/office", ServerConfig.from_strings(OFFICE_PW, "10.1.0.0/24", **kw)),  # type: ignore[arg-type]
        Network("/lab", ServerConfig.from_strings(LAB_PW, "10.1.0.0/24", **kw)),  # type: ignore[arg-type]
    ]


class Routed(Relay):
    """The test_server harness driving a NetworkRouter; clients pick a path and password."""

    def __init__(self, base: ServerConfig | None = None, **kw: object) -> None:
        super().__init__()
        self.server = NetworkRouter(base or ServerConfig(), networks(**kw), random.Random(7))  # type: ignore[assignment]

    def on(self, path: str, connect: bool = True) -> FakeClient:
        c = self.client(connect=False)
        c.upgrade = ClientUpgrade("192.0.2.1", 8080, path, base64.b64encode(c.rng.randbytes(16)))
        if connect:
            c.connect()
        return c

    def member(self, path: str, address: str | None = None) -> FakeClient:
        pw = OFFICE_PW if path.startswith("/office") else LAB_PW
        c = self.on(path)
        c.vmac(pw=pw)
        if address is None:
            address = str(c.expected(pw=pw).ip)
        c.auth(address, pw=pw)
        assert not c.closed, c.close_reason
        return c

    @property
    def router(self) -> NetworkRouter:
        assert isinstance(self.server, NetworkRouter)
        return self.server


@pytest.fixture
def routed() -> Routed:
    return Routed()


def test_make_relay_single_network_is_a_plain_relay_server() -> None:
    relay = make_relay(ServerConfig(), random.Random(1))
    assert type(relay) is RelayServer
    assert isinstance(make_relay(ServerConfig(), random.Random(1), networks()), NetworkRouter)


def test_single_network_accepts_any_path() -> None:
    relay = Relay()
    for path in ("/", "/office", "/anything/at/all?x=1"):
        c = relay.client(connect=False)
        c.upgrade = ClientUpgrade("192.0.2.1", 8080, path, base64.b64encode(c.rng.randbytes(16)))
        c.connect()
        assert c.open


def test_unknown_path_gets_404_and_is_closed(
    routed: Routed, caplog: pytest.LogCaptureFixture
) -> None:
    c = routed.on("/nope", connect=False)
    c.connect(upgrade=False)
    c.write(c.upgrade.request())
    assert c.http.startswith(b"HTTP/1.1 404 ")
    assert c.closed and not c.open
    assert "no network at path '/nope'" in caplog.text
    (event,) = routed.disconnects()
    assert event.ip is None
    assert routed.router.status(routed.now, routed.wall).counters["rejected"] == {
        "unknown_network": 1
    }


def test_path_query_is_ignored_for_routing(routed: Routed) -> None:
    c = routed.member("/office?token=1", "10.1.0.5")
    assert routed.router.networks["/office"].clients.keys() == {c.address}


def test_the_same_address_in_two_networks(routed: Routed) -> None:
    a1 = routed.member("/office", "10.1.0.1")
    a2 = routed.member("/office", "10.1.0.2")
    b1 = routed.member("/lab", "10.1.0.1")
    b2 = routed.member("/lab", "10.1.0.2")
    a1.send(forward("10.1.0.1", "10.1.0.2", b"office"))
    b1.send(forward("10.1.0.1", "10.1.0.2", b"lab"))
    assert a2.take() == [forward("10.1.0.1", "10.1.0.2", b"office")]
    assert b2.take() == [forward("10.1.0.1", "10.1.0.2", b"lab")]
    assert not a1.take() and not b1.take()
    assert not any(c.closed for c in (a1, a2, b1, b2))


def test_address_pools_are_per_network() -> None:
    routed = Routed()
    office = [routed.member("/office") for _ in range(3)]
    lab = [routed.member("/lab") for _ in range(3)]
    assert len({c.address for c in office}) == 3
    assert len({c.address for c in lab}) == 3


def test_a_hostile_client_reaches_nothing_in_the_other_network(routed: Routed) -> None:
    """Every message type, aimed at the other network's addresses, stays in its network."""
    victims = [routed.member("/lab", f"10.1.0.{n}") for n in (1, 2, 3, 50)]
    office_peer = routed.member("/office", "10.1.0.2")
    evil = routed.member("/office", "10.1.0.9")
    e = evil.address
    assert e is not None
    sent = [
        forward(str(e), "10.1.0.50"),  # unicast to a lab-only address
        forward(str(e), "10.1.0.1"),
        forward(str(e), "10.1.0.255"),  # directed broadcast
        forward(str(e), "255.255.255.255"),
        forward(str(e), "224.0.0.251"),  # multicast
        forward(str(e), "239.1.2.3"),
        forward("10.1.0.50", "10.1.0.1"),  # spoofed source
        m.Peer(e, ip("10.1.0.50"), ip("192.0.2.9"), 4000).encode(),
        m.Peer(e, ip("10.1.0.1"), ip("192.0.2.9"), 4000).encode(),
        m.Discovery(e, ip("10.1.0.50")).encode(),
        m.Discovery(e, ip("255.255.255.255")).encode(),
        m.General(1, 2, e, ip("10.1.0.50"), b"hello").encode(),
        m.General(1, 2, e, ip("255.255.255.255"), b"hello").encode(),
        m.General.lan_endpoint(e, ip("10.1.0.1"), ip("192.0.2.9"), 4000).encode(),
    ]
    for payload in sent:
        evil.send(payload)
    for victim in victims:
        assert victim.take() == [], victim.address
        assert not victim.closed
    # The office peer gets the broadcasts and its own unicasts: the network works.
    assert office_peer.take()
    lab = routed.router.networks["/lab"].stats
    assert lab.frames_relayed == 0 and lab.frames_dropped == 0


def test_wrong_password_is_judged_against_the_network_of_the_path(routed: Routed) -> None:
    c = routed.on("/lab")
    c.auth("10.1.0.7", pw=OFFICE_PW)  # right for /office, wrong for /lab
    assert c.closed and c.close_reason == "wrong password"
    ok = routed.on("/office")
    ok.auth("10.1.0.7", pw=OFFICE_PW)
    assert not ok.closed
    status = routed.router.status(routed.now, routed.wall)
    assert status.counters["networks"]["/lab"]["rejected"] == {"wrong_password": 1}
    assert status.counters["networks"]["/office"]["rejected"] == {}
    assert status.counters["rejected"] == {"wrong_password": 1}


def test_replay_guard_is_per_network(routed: Routed) -> None:
    first = routed.on("/office")
    data = first.auth("10.1.0.7", pw=OFFICE_PW)
    again = routed.on("/office")
    again.send(data)
    assert again.closed and again.close_reason == "replayed handshake"
    # The same AUTH bytes in /lab: a wrong password there, never a replay (its own guard).
    other = routed.on("/lab")
    other.send(data)
    assert other.close_reason == "wrong password"


def test_replay_guards_do_not_share_entries_when_passwords_match() -> None:
    shared = [
        Network("/a", ServerConfig.from_strings(PASSWORD, None)),
        Network("/b", ServerConfig.from_strings(PASSWORD, None)),
    ]
    routed = Routed()
    routed.server = NetworkRouter(ServerConfig(), shared, random.Random(1))  # type: ignore[assignment]
    a = routed.on("/a")
    data = a.auth("10.5.0.1")
    b = routed.on("/b")
    b.send(data)  # valid in /b: its own guard has not seen it
    assert not b.closed


def test_status_names_the_network_of_each_client(routed: Routed) -> None:
    routed.member("/office", "10.1.0.1")
    routed.member("/lab", "10.1.0.1")
    routed.member("/lab", "10.1.0.2")
    status = routed.router.status(routed.now, routed.wall)
    assert sorted((c.network, c.ip) for c in status.clients) == [
        ("/lab", "10.1.0.1"),
        ("/lab", "10.1.0.2"),
        ("/office", "10.1.0.1"),
    ]
    nets = status.counters["networks"]
    assert nets["/office"]["clients"] == 1 and nets["/lab"]["clients"] == 2
    assert status.counters["authenticated"] == 3
    assert status.counters["connections"] == 3
    assert status.as_dict()["clients"][0]["network"] in ("/lab", "/office")


def test_unrouted_connection_times_out() -> None:
    routed = Routed(ServerConfig(auth_timeout=5.0))
    c = routed.on("/office", connect=False)
    c.connect(upgrade=False)
    c.write(b"GET /off")  # an incomplete head
    routed.advance(7.0)
    assert c.closed
    assert routed.router.status(routed.now, routed.wall).counters["rejected"] == {"timeout": 1}
    assert routed.server.next_deadline() is None


def test_auth_timeout_counts_from_accept_not_from_routing() -> None:
    routed = Routed(ServerConfig(), auth_timeout=5.0)
    c = routed.on("/office", connect=False)
    c.connect(upgrade=False)
    routed.advance(4.0)
    c.write(c.upgrade.request())
    assert c.open
    routed.advance(2.5)
    assert c.closed and c.close_reason == "authentication timeout"


def test_one_flood_limiter_for_all_networks() -> None:
    limits = Limits(max_pending_per_source=2)
    routed = Routed(ServerConfig(limits=limits), limits=limits)
    same = "198.51.100.77:4000"
    router = routed.router

    def connect(cid: int, path: str) -> None:
        router.connection_made(cid, routed.now, same)
        head = ClientUpgrade("h", 1, path, b"dGhlIHNhbXBsZSBub25jZQ==").request()
        router.receive_data(cid, head, routed.now, routed.wall)

    connect(1, "/office")
    connect(2, "/lab")
    router.data_to_send()
    assert router.connections_to_close() == []
    router.connection_made(3, routed.now, same)
    assert router.connections_to_close() == [3]  # two pending already, whatever their networks
    assert router.status(routed.now, routed.wall).counters["refused"] == 1
    router.connection_lost(1)  # settles with the shared limiter
    router.connection_made(4, routed.now, same)
    assert router.connections_to_close() == []


def test_connection_lost_before_and_after_routing(routed: Routed) -> None:
    c = routed.on("/office", connect=False)
    c.connect(upgrade=False)
    routed.server.connection_lost(c.cid)
    d = routed.member("/lab", "10.1.0.1")
    routed.server.connection_lost(d.cid)
    routed.pump()
    status = routed.router.status(routed.now, routed.wall)
    assert status.clients == [] and status.counters["open_connections"] == 0


def test_trailing_bytes_after_the_head_reach_the_network(routed: Routed) -> None:
    c = routed.on("/office", connect=False)
    c.connect(upgrade=False)
    auth = m.Auth.create(OFFICE_PW, ip("10.1.0.3"), WALL).encode()
    c.write(c.upgrade.request() + c.frame(auth))
    assert c.open and not c.closed
    assert "10.1.0.3" in [str(a) for a in routed.router.networks["/office"].clients]


def test_network_paths_are_checked() -> None:
    for bad in ("office", "/a b", "/a?b", "", "/" + "x" * 300):
        with pytest.raises(ConfigError):
            Network(bad, ServerConfig())
    with pytest.raises(ConfigError, match="twice"):
        NetworkRouter(
            ServerConfig(),
            [Network("/a", ServerConfig()), Network("/a", ServerConfig())],
            random.Random(1),
        )


def test_server_upgrade_404_only_with_paths() -> None:
    req = ClientUpgrade("h", 1, "/x", b"dGhlIHNhbXBsZSBub25jZQ==").request()
    assert ServerUpgrade().receive(req).accepted
    result = ServerUpgrade({"/y"}).receive(req)
    assert result.rejected and result.reply.startswith(b"HTTP/1.1 404 ")


def test_status_document_text_and_metrics_with_networks(routed: Routed) -> None:
    from shells.ctl import format_status
    from shells.metrics import status_metrics
    from shells.operate import server_document

    routed.member("/office", "10.1.0.1")
    routed.member("/lab", "10.1.0.1")
    doc = server_document(routed.router.status(routed.now, routed.wall), "asyncio", "ws://x", 0)
    text = format_status(doc, now=float(WALL))
    assert "NETWORK" in text and "network /office counters:" in text
    assert "network /lab counters:" in text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in status_metrics(doc)
        for s in family.samples
    }
    assert samples[("candy_server_network_clients", (("network", "/lab"),))] == 1
    assert samples[("candy_server_clients", ())] == 2
