"""End to end: one relay with two networks (``/office``, ``/lab``), two real clients in each.

A hub namespace bridges 192.0.2.0/24: the server ``srv`` (192.0.2.1) and four clients. Both
networks use the same VPN range 10.1.0.0/24 and the same address 10.1.0.1 exists in both, so
the relay cannot tell them apart by address; the negative check is meaningful because
10.1.0.3 exists only in /lab (and answers there) while an /office client pings it in vain.
The VPN range exists only on the clients' TUN devices inside the lab. Needs root.
"""

from __future__ import annotations

import contextlib
import json
import os
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

SERVER_IP = "192.0.2.1"
#: name -> (public address, network path, password, static VPN address)
CLIENTS = {
    "o1": ("192.0.2.11", "/office", "office-pw", "10.1.0.1/24"),
    "o2": ("192.0.2.12", "/office", "office-pw", "10.1.0.2/24"),
    "l1": ("192.0.2.21", "/lab", "lab-pw", "10.1.0.1/24"),
    "l3": ("192.0.2.23", "/lab", "lab-pw", "10.1.0.3/24"),
}
ENV = {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
START_TIMEOUT = 15.0

SERVER_CONFIG = """
mode = "server";
websocket = "ws://0.0.0.0:8080";
networks = (
  { path = "/office"; password = "office-pw"; dhcp = "10.1.0.0/24"; },
  { path = "/lab"; password = "lab-pw"; dhcp = "10.1.0.0/24"; }
);
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, dict[str, str]]]:
    with make_lab("cnet") as lab:
        hub = lab.add_ns("hub")
        ns = {"srv": lab.add_ns("srv")} | {name: lab.add_ns(name) for name in CLIENTS}
        members = [(ns["srv"], f"{SERVER_IP}/24")]
        members += [(ns[name], f"{c[0]}/24") for name, c in CLIENTS.items()]
        lab.bridge(hub, members)
        yield lab, ns


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(2)


def _ping(lab: Lab, ns: str, dst: str, count: int) -> bool:
    out = lab.run(
        ns, "ping", "-c", str(count), "-W", "1", "-i", "0.2", dst, check=False, timeout=count + 5
    )
    return out.returncode == 0


@pytest.mark.parametrize("runtime", ["asyncio", "gevent", "threaded"])
def test_two_networks_are_isolated(
    lab: tuple[Lab, dict[str, str]], tmp_path: Path, runtime: str
) -> None:
    lab_, ns = lab
    cfg = tmp_path / "server.cfg"
    cfg.write_text(SERVER_CONFIG, encoding="utf-8")
    control = tmp_path / "server.sock"
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(where: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = tmp_path / f"{where}.log"
        proc = lab_.spawn(ns[where], argv, env=ENV, log_path=log, cwd=REPO_ROOT)
        procs.append(proc)
        return proc

    def logs() -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in tmp_path.glob("*.log"))

    try:
        cli = [sys.executable, "-m", "shells.cli"]  # every daemon gets its own --control
        server = spawn("srv", [*cli, "-c", str(cfg), "--runtime", runtime, "--debug",
                               "--control", str(control)])  # fmt: skip
        assert wait_until(lambda: "relay listening on" in lab_.log(server), START_TIMEOUT)
        clients = {}
        for name, (_, path, password, static) in CLIENTS.items():
            clients[name] = spawn(name, [
                *cli, "-m", "client", "-w", f"ws://{SERVER_IP}:8080{path}", "-p", password,
                "-n", name, "-t", static, "--runtime", runtime,
                "--state-dir", str(tmp_path / f"state-{name}"),
                "--control", str(tmp_path / f"{name}.sock"),
            ])  # fmt: skip
        for name, proc in clients.items():
            joined = wait_until(
                lambda p=proc: "joined the network as" in lab_.log(p), START_TIMEOUT
            )
            assert joined, f"{name} did not join\n{logs()}"

        # Inside each network: both directions work (the same 10.1.0.1 in both networks).
        assert wait_until(lambda: _ping(lab_, ns["o1"], "10.1.0.2", 1), 10, 0.2), logs()
        assert _ping(lab_, ns["o2"], "10.1.0.1", 3), logs()
        assert wait_until(lambda: _ping(lab_, ns["l1"], "10.1.0.3", 1), 10, 0.2), logs()
        assert _ping(lab_, ns["l3"], "10.1.0.1", 3), logs()
        # Across: 10.1.0.3 exists (and answers) only in /lab; from /office it is unreachable.
        assert not _ping(lab_, ns["o1"], "10.1.0.3", 3), logs()
        assert not _ping(lab_, ns["o2"], "10.1.0.3", 2), logs()
        assert _ping(lab_, ns["l1"], "10.1.0.3", 1), "the target was up all along"

        status = lab_.run(
            ns["srv"], *cli, "status", "--server", "--control", str(control), "--json",
            env=ENV, cwd=REPO_ROOT, timeout=15,
        )  # fmt: skip
        doc = json.loads(status.stdout)
        seen = sorted((c["network"], c["ip"]) for c in doc["clients"])
        assert seen == [
            ("/lab", "10.1.0.1"), ("/lab", "10.1.0.3"), ("/office", "10.1.0.1"),
            ("/office", "10.1.0.2"),
        ]  # fmt: skip
        assert set(doc["counters"]["networks"]) == {"/office", "/lab"}
        assert server.poll() is None
    finally:
        _stop(procs)
