"""The two-NAT topology of the peer-to-peer end-to-end tests (test_e2e_p2p, test_e2e_netem).

Topology (all inside namespaces the lab creates)::

    a 192.0.2.2 ── nat-a ──┐                       ┌── nat-b ── b 198.51.100.2
       192.0.2.1  203.0.113.11 ── 203.0.113.0/24 ── 203.0.113.12  198.51.100.1
                                        │
                                  srv 203.0.113.1 (relay :8080, STUN :3478)

The "public" segment is a bridge in the ``pub`` namespace. Each NAT masquerades and drops
new inbound UDP (as home routers do). Counters on the NATs show whether tunnel traffic
flows directly between the NATs' public addresses or through the relay.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from netns import Lab

REPO = Path(__file__).resolve().parents[1]
SERVER = "203.0.113.1"
NAT_A, NAT_B = "203.0.113.11", "203.0.113.12"

__all__ = ["NAT_A", "NAT_B", "REPO", "SERVER", "Net", "vpn_address"]


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
        out_srv, out_a, out_b = lab.bridge(
            self.pub,
            [(self.srv, f"{SERVER}/24"), (self.nat_a, f"{NAT_A}/24"), (self.nat_b, f"{NAT_B}/24")],
        )
        #: The interface facing the public segment, per namespace (server and NATs).
        self.uplink = {self.srv: out_srv, self.nat_a: out_a, self.nat_b: out_b}
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


def vpn_address(lab: Lab, ns: str, iface: str) -> str | None:
    """The IPv4 address on ``iface`` in ``ns`` (the client's TUN device), or None."""
    out = lab.run(ns, "ip", "-4", "-o", "addr", "show", "dev", iface, check=False).stdout
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else None
