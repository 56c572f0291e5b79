"""End to end: two clients behind their own cone NATs punch a direct, encrypted UDP path.

The topology (server, STUN server, two cone NATs, two clients, all in namespaces this test
creates) is built by :class:`p2plab.Net`; see its module docstring. Counters on the NATs
show whether tunnel traffic flows directly between the NATs' public addresses or through
the relay.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import have_netns_privileges, make_lab, wait_until
from p2plab import REPO, SERVER, Net
from p2plab import vpn_address as _vpn_address

PASSWORD = "p2p-secret"

_ok, _why = have_netns_privileges()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not _ok, reason=_why)]


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    with make_lab("cp2p") as lab:
        yield Net(lab)


@pytest.mark.parametrize("runtime", ["asyncio", "gevent", "threaded"])
def test_clients_behind_nats_go_direct_and_fall_back_to_the_relay(
    net: Net, runtime: str, tmp_path: Path
) -> None:
    lab = net.lab
    cli = [sys.executable, "-m", "shells.cli", "--runtime", runtime, "--debug"]
    server = lab.spawn(
        net.srv,
        [*cli, "-m", "server", "-w", "ws://0.0.0.0:8080", "-p", PASSWORD, "-d", "10.99.0.0/24"],
        env=net.env,
        cwd=REPO,
    )
    clients = {}
    for ns, name in ((net.a, "pa"), (net.b, "pb")):
        clients[ns] = lab.spawn(
            ns,
            [
                *cli,
                "-m",
                "client",
                "-w",
                f"ws://{SERVER}:8080",
                "-p",
                PASSWORD,
                "-n",
                name,
                "-s",
                f"stun://{SERVER}:3478",
                "--state-dir",
                str(tmp_path / name),
            ],
            env=net.env,
            cwd=REPO,
        )
    a_log = lambda: lab.log(clients[net.a])  # noqa: E731
    b_log = lambda: lab.log(clients[net.b])  # noqa: E731
    try:
        assert wait_until(lambda: _vpn_address(lab, net.a, "candy-pa"), 20), lab.logs()
        assert wait_until(lambda: _vpn_address(lab, net.b, "candy-pb"), 20), lab.logs()
        vpn_b = _vpn_address(lab, net.b, "candy-pb")
        assert vpn_b is not None

        # Traffic through the relay starts the negotiation; both sides reach CONNECTED.
        def connected() -> bool:
            lab.run(net.a, "ping", "-c", "1", "-W", "1", vpn_b, check=False)
            return "-> CONNECTED" in a_log() and "-> CONNECTED" in b_log()

        assert wait_until(connected, 30, interval=0.2), lab.logs()

        before_a, before_b = net.counters(net.nat_a), net.counters(net.nat_b)
        lab.run(net.a, "ping", "-c", "20", "-i", "0.05", "-W", "1", vpn_b, timeout=20)
        after_a, after_b = net.counters(net.nat_a), net.counters(net.nat_b)
        direct = (after_a["udp"] - before_a["udp"]) + (after_b["udp"] - before_b["udp"])
        relayed = (after_a["tcp"] - before_a["tcp"]) + (after_b["tcp"] - before_b["tcp"])
        assert direct >= 40, f"only {direct} datagrams went directly\n{lab.logs()}"
        assert relayed <= 6, f"{relayed} packets went to the relay during the ping"

        # iperf3 over the direct path (figure reported, not asserted beyond > 0).
        iperf_server = lab.spawn(net.b, ["iperf3", "-s", "-1"])

        def iperf_listening() -> bool:
            out = lab.run(net.b, "ss", "-Hltn", "sport", "=", ":5201", check=False).stdout
            return bool(out.strip()) or iperf_server.poll() is not None

        assert wait_until(iperf_listening, 5), lab.log(iperf_server)
        assert iperf_server.poll() is None, lab.log(iperf_server)
        result = lab.run(net.a, "iperf3", "-c", vpn_b, "-t", "3", "-f", "m", timeout=30)
        summary = [line for line in result.stdout.splitlines() if "sender" in line]
        print(f"\n[{runtime}] iperf3 over the direct P2P path: {summary}")
        assert summary and " 0.00 Mbits/sec" not in summary[0]
        iperf_server.wait(timeout=10)

        # Cut b's UDP: the peer leaves CONNECTED and traffic falls back to the relay.
        for chain in ("INPUT", "OUTPUT"):
            lab.run(net.b, "iptables", "-w", "5", "-I", chain, "-p", "udp", "-j", "DROP")
        assert wait_until(lambda: "CONNECTED -> INIT" in a_log(), 10), a_log()
        ping = lab.run(net.a, "ping", "-c", "3", "-W", "2", vpn_b, check=False, timeout=20)
        assert ping.returncode == 0, f"no fallback to the relay\n{ping.stdout}\n{lab.logs()}"
    finally:
        for chain in ("INPUT", "OUTPUT"):
            lab.run(
                net.b, "iptables", "-w", "5", "-D", chain, "-p", "udp", "-j", "DROP", check=False
            )
        for proc in (*clients.values(), server):
            proc.terminate()
        for proc in (*clients.values(), server):
            try:
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
