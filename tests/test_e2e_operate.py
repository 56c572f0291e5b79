"""End to end: what an operator sees of a real network (``candy status``, ``candy ping``, metrics).

Two clients behind cone NATs with STUN and a relay, all real daemons in namespaces
(:class:`p2plab.Net`). The control sockets live in the test's temporary folder; the metrics
endpoint listens on the server namespace's own loopback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns import have_netns_privileges, make_lab, wait_until
from p2plab import NAT_B, REPO, SERVER, Net, vpn_address

PASSWORD = "operate-secret"
METRICS = "127.0.0.1:9470"

_ok, _why = have_netns_privileges()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not _ok, reason=_why)]


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    with make_lab("cop") as lab:
        yield Net(lab)


def candy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shells.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def status(sock: Path, *extra: str) -> dict[str, Any]:
    done = candy("status", "--json", "--control", str(sock), *extra)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def peer(sock: Path, ip: str) -> dict[str, Any] | None:
    return next((p for p in status(sock)["peers"] if p["ip"] == ip), None)


def scrape(net: Net) -> str:
    url = f"http://{METRICS}/metrics"
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    return net.lab.run(net.srv, sys.executable, "-c", code, timeout=10).stdout


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in\n{text}"
    return float(match.group(1))


@pytest.mark.parametrize("runtime", ["asyncio", "gevent", "threaded"])
def test_status_ping_and_metrics_follow_the_paths(net: Net, runtime: str, tmp_path: Path) -> None:
    lab = net.lab
    cli = [sys.executable, "-m", "shells.cli", "--runtime", runtime]
    socks = {name: tmp_path / f"{name}.sock" for name in ("srv", "a", "b")}
    server = lab.spawn(
        net.srv,
        [*cli, "-m", "server", "-w", "ws://0.0.0.0:8080", "-p", PASSWORD, "-d", "10.99.0.0/24",
         "--control", str(socks["srv"]), "--metrics", METRICS],
        env=net.env,
        cwd=REPO,
    )  # fmt: skip
    clients = [
        lab.spawn(
            ns,
            [*cli, "-m", "client", "-w", f"ws://{SERVER}:8080", "-p", PASSWORD, "-n", name,
             "-s", f"stun://{SERVER}:3478", "--state-dir", str(tmp_path / name),
             "--control", str(socks[name])],
            env=net.env,
            cwd=REPO,
        )
        for ns, name in ((net.a, "a"), (net.b, "b"))
    ]  # fmt: skip
    try:
        assert wait_until(lambda: vpn_address(lab, net.a, "candy-a"), 20), lab.logs()
        assert wait_until(lambda: vpn_address(lab, net.b, "candy-b"), 20), lab.logs()
        vpn_a, vpn_b = vpn_address(lab, net.a, "candy-a"), vpn_address(lab, net.b, "candy-b")
        assert vpn_a and vpn_b

        # The server lists both clients; its metrics endpoint answers.
        assert wait_until(lambda: len(status(socks["srv"], "--server")["clients"]) == 2, 10)
        first = scrape(net)
        assert f'candy_build_info{{role="server",runtime="{runtime}"' in first

        # A ping starts the negotiation; both sides end up with a direct path.
        def direct() -> bool:
            lab.run(net.a, "ping", "-c", "1", "-W", "1", vpn_b, check=False)
            seen_a, seen_b = peer(socks["a"], vpn_b), peer(socks["b"], vpn_a)
            return bool(
                seen_a and seen_b and seen_a["path"] == "direct" and seen_b["path"] == "direct"
            )

        assert wait_until(direct, 40, interval=0.5), lab.logs()
        seen = peer(socks["a"], vpn_b)
        assert seen is not None and seen["state"] == "CONNECTED" and seen["reason"] is None
        assert seen["endpoint"].startswith(net_b_public(net))
        pinged = candy("ping", "--control", str(socks["a"]), vpn_b, "-c", "3", "-i", "0.2")
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr
        assert f"pong from {vpn_b} via direct {net_b_public(net)}" in pinged.stdout
        table = candy("status", "--control", str(socks["a"]))
        assert table.returncode == 0 and "direct" in table.stdout and vpn_b in table.stdout
        print(f"\n[{runtime}] candy status (client a):\n{table.stdout}")

        # Block b's UDP: a shows b as relay (with the reason), and the relay's bytes grow.
        before = {c["ip"]: c for c in status(socks["srv"], "--server")["clients"]}
        relayed_before = metric(scrape(net), "candy_server_frames_relayed_total")
        for chain in ("INPUT", "OUTPUT"):
            lab.run(net.b, "iptables", "-w", "5", "-I", chain, "-p", "udp", "-j", "DROP")

        def relayed() -> bool:
            lab.run(net.a, "ping", "-c", "1", "-W", "1", vpn_b, check=False)
            seen = peer(socks["a"], vpn_b)
            return bool(seen and seen["path"] == "relay")

        assert wait_until(relayed, 20, interval=0.5), status(socks["a"])
        seen = peer(socks["a"], vpn_b)
        assert seen is not None and seen["reason"]
        pinged = candy("ping", "--control", str(socks["a"]), vpn_b, "-c", "2", "-i", "0.2")
        assert f"pong from {vpn_b} via relay" in pinged.stdout, pinged.stdout
        after = {c["ip"]: c for c in status(socks["srv"], "--server")["clients"]}
        for ip in (vpn_a, vpn_b):
            assert after[ip]["rx_bytes"] > before[ip]["rx_bytes"]
            assert after[ip]["tx_bytes"] > before[ip]["tx_bytes"]
        text = scrape(net)
        assert metric(text, "candy_server_frames_relayed_total") > relayed_before
        assert metric(text, "candy_server_clients") == 2
        table = candy("status", "--server", "--control", str(socks["srv"]))
        print(f"\n[{runtime}] candy status --server:\n{table.stdout}")
    finally:
        for chain in ("INPUT", "OUTPUT"):
            lab.run(net.b, "iptables", "-w", "5", "-D", chain, "-p", "udp", "-j", "DROP",
                    check=False)  # fmt: skip
        for proc in (*clients, server):
            proc.terminate()
        for proc in (*clients, server):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def net_b_public(net: Net) -> str:
    """The start of b's public endpoint (its NAT's address)."""
    return f"{NAT_B}:"
