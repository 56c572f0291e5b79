"""End to end: subnet routes (6.x ``sdwan``) through a gateway client, over the relay.

A hub bridge (192.0.2.0/24, documentation range) holds the server ``srv``, client ``a`` and
gateway client ``g``. Behind ``g`` a LAN namespace ``lan`` has 172.31.0.5/24; ``g`` has
172.31.0.1/24 on it, ``net.ipv4.ip_forward=1`` and a MASQUERADE rule out of the LAN
interface. The server pushes ``10.99.0.0/24,172.31.0.0/24,10.99.0.3``: ``a`` gets a kernel
route to 172.31.0.0/24 through its TUN device and pings 172.31.0.5; the route leaves with
``a``. Needs root; skipped with the reason otherwise. Every namespace goes with the lab.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Lab, have_netns_privileges, make_lab, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
OK, WHY = have_netns_privileges()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not OK, reason=WHY or "netns unavailable")]

ENV = {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
SDWAN = "10.99.0.0/24,172.31.0.0/24,10.99.0.3"
LAN_HOST = "172.31.0.5"
TIMEOUT = 15.0


@pytest.fixture
def lab() -> Iterator[Lab]:
    with make_lab("csdw") as lab:
        yield lab


def _wait_log(lab: Lab, proc: subprocess.Popen[bytes], text: str) -> None:
    wait_until(lambda: text in lab.log(proc) or proc.poll() is not None, TIMEOUT, 0.05)
    assert text in lab.log(proc), f"{text!r} not seen\n{lab.logs()}"


def _routes(lab: Lab, ns: str) -> list[dict[str, object]]:
    out = lab.run(ns, "ip", "-j", "route", "show", "172.31.0.0/24", timeout=5)
    return list(json.loads(out.stdout or "[]"))


@pytest.mark.parametrize("runtime", ["asyncio", "gevent", "threaded"])
def test_a_reaches_the_lan_behind_gateway_g_over_the_relay(lab: Lab, runtime: str) -> None:
    hub, srv, a, g = (lab.add_ns(role) for role in ("hub", "srv", "a", "g"))
    lan = lab.add_ns("lan")
    lab.bridge(hub, [(srv, "192.0.2.1/24"), (a, "192.0.2.2/24"), (g, "192.0.2.3/24")])
    g_lan, _ = lab.link(g, "172.31.0.1/24", lan, f"{LAN_HOST}/24")
    # The gateway's part (README "Subnet routes"): forwarding and masquerade onto the LAN.
    lab.sysctl(g, "net.ipv4.ip_forward", 1)
    lab.run(g, "iptables", "-w", "5", "-t", "nat", "-A", "POSTROUTING", "-o", g_lan,
            "-j", "MASQUERADE")  # fmt: skip

    cli = [
        sys.executable,
        "-m",
        "shells.cli",
        "--control",
        "none",
        "-p",
        "secret",
        "--runtime",
        runtime,
        "--debug",
    ]
    server = lab.spawn(
        srv, [*cli, "-m", "server", "-w", "ws://0.0.0.0:8080", "--sdwan", SDWAN], ENV, cwd=REPO_ROOT
    )
    _wait_log(lab, server, "relay listening on")
    url = "ws://192.0.2.1:8080"
    gw = lab.spawn(
        g, [*cli, "-m", "client", "-w", url, "-n", "g", "-t", "10.99.0.3/24",
            "--state-dir", str(lab.tmpdir / "g"), "--control", "none"], ENV, cwd=REPO_ROOT,
    )  # fmt: skip
    client = lab.spawn(
        a, [*cli, "-m", "client", "-w", url, "-n", "a", "-t", "10.99.0.2/24",
            "--state-dir", str(lab.tmpdir / "a"), "--control", "none"], ENV, cwd=REPO_ROOT,
    )  # fmt: skip
    _wait_log(lab, gw, "joined the network as")
    _wait_log(lab, client, "subnet routes: 172.31.0.0/24")

    assert wait_until(lambda: _routes(lab, a), TIMEOUT, 0.1), lab.logs()
    (route,) = _routes(lab, a)
    assert route["dev"] == "candy-a"
    assert _routes(lab, g) == [] or all(r["dev"] != "candy-g" for r in _routes(lab, g))
    mtu = lab.run(a, "cat", "/sys/class/net/candy-a/mtu", timeout=5).stdout.strip()
    assert mtu == "1400"

    def pinged() -> bool:
        out = lab.run(a, "ping", "-c", "1", "-W", "1", LAN_HOST, check=False, timeout=5)
        return out.returncode == 0

    assert wait_until(pinged, TIMEOUT, 0.2), f"no reply from {LAN_HOST}\n{lab.logs()}"
    out = lab.run(a, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-s", "1000", LAN_HOST, timeout=10)
    assert " 0% packet loss" in out.stdout

    client.send_signal(signal.SIGTERM)
    client.wait(timeout=10)
    assert _routes(lab, a) == [], lab.logs()
