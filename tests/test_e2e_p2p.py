"""End to end: two clients behind their own cone NATs punch a direct, encrypted UDP path.

Topology (all inside namespaces this test creates)::

    a 192.0.2.2 ── nat-a ──┐                       ┌── nat-b ── b 198.51.100.2
       192.0.2.1  203.0.113.11 ── 203.0.113.0/24 ── 203.0.113.12  198.51.100.1
                                        │
                                  srv 203.0.113.1 (relay :8080, STUN :3478)

Each NAT masquerades and drops new inbound UDP (as home routers do). Counters on the NATs
show whether tunnel traffic flows directly between the NATs' public addresses or through
the relay.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Lab, have_netns_privileges, make_lab, wait_until

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "p2p-secret"
SERVER = "203.0.113.1"
NAT_A, NAT_B = "203.0.113.11", "203.0.113.12"

_ok, _why = have_netns_privileges()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not _ok, reason=_why)]


class Net:
    """The lab plus the names the tests need."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.pub = lab.add_ns("pub")
        self.srv = lab.add_ns("srv")
        self.nat_a = lab.add_ns("nata")
        self.nat_b = lab.add_ns("natb")
        self.a = lab.add_ns("a")
        self.b = lab.add_ns("b")
        _, out_a, out_b = lab.bridge(
            self.pub,
            [(self.srv, f"{SERVER}/24"), (self.nat_a, f"{NAT_A}/24"), (self.nat_b, f"{NAT_B}/24")],
        )
        lab.link(self.nat_a, "192.0.2.1/24", self.a, "192.0.2.2/24")
        lab.link(self.nat_b, "198.51.100.1/24", self.b, "198.51.100.2/24")
        lab.route(self.a, "default", "192.0.2.1")
        lab.route(self.b, "default", "198.51.100.1")
        lab.nat(self.nat_a, out_a, cone=True)
        lab.nat(self.nat_b, out_b, cone=True)
        # Counters: tunnel datagrams towards the other NAT, and frames towards the relay.
        for ns, other in ((self.nat_a, NAT_B), (self.nat_b, NAT_A)):
            lab.run(ns, "iptables", "-w", "5", "-I", "FORWARD", "1", "-p", "udp", "-d", other)
            lab.run(
                ns,
                "iptables",
                "-w",
                "5",
                "-I",
                "FORWARD",
                "1",
                "-p",
                "tcp",
                "-d",
                SERVER,
                "--dport",
                "8080",
            )
        self.env = {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.stun = lab.spawn(
            self.srv,
            [sys.executable, str(REPO / "tests" / "stunserver.py"), SERVER, "3478"],
            env=self.env,
        )

    def counters(self, ns: str) -> dict[str, int]:
        """Packets counted on a NAT: 'udp' to the other NAT, 'tcp' to the relay."""
        out = self.lab.run(ns, "iptables", "-w", "5", "-nvxL", "FORWARD").stdout
        counts = {"udp": 0, "tcp": 0}
        for line in out.splitlines():
            fields = line.split()  # pkts bytes [no target] prot opt in out source dest
            proto = {"17": "udp", "6": "tcp"}.get(fields[2]) if len(fields) > 3 else None
            if proto and fields[3] == "--":
                counts[proto] += int(fields[0])
        return counts


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    with make_lab("cp2p") as lab:
        yield Net(lab)


def _vpn_address(lab: Lab, ns: str, iface: str) -> str | None:
    out = lab.run(ns, "ip", "-4", "-o", "addr", "show", "dev", iface, check=False).stdout
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else None


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
