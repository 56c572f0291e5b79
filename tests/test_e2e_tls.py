"""End to end over wss://: the ``candy`` daemon verifies the relay's certificate.

A relay in namespace ``srv`` (192.0.2.1) serves wss:// with a certificate issued by a
throw-away test CA; clients run in namespaces ``a`` and ``b`` on the same bridge. A client
that does not know the CA must refuse the relay (and say why in its log); clients given the
CA with ``--tls-ca`` join and reach each other. Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import Lab, have_netns_privileges, make_lab, wait_until
from test_tls import Pki, make_pki

REPO_ROOT = Path(__file__).resolve().parent.parent
OK, WHY = have_netns_privileges()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not OK, reason=WHY or "netns unavailable")]

PASSWORD = "tls-e2e"
SERVER_IP = "192.0.2.1"
URL = f"wss://{SERVER_IP}:8443"
ENV = {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
START_TIMEOUT = 15.0
JOINED_RE = re.compile(r"joined the network as (\d+\.\d+\.\d+\.\d+)/\d+")
DISCONNECTED_RE = re.compile(r"disconnected from the server: (.*)")
ATTEMPT_RE = re.compile(r"reconnecting in [\d.]+ s \(attempt (\d+)\)")


@dataclass
class Net:
    lab: Lab
    srv: str
    a: str
    b: str
    pki: Pki


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    pki = make_pki(tmp_path_factory.mktemp("pki"), dns="relay.test", ips=(SERVER_IP,))
    with make_lab("ctls") as lab:
        hub = lab.add_ns("hub")
        srv, a, b = lab.add_ns("srv"), lab.add_ns("a"), lab.add_ns("b")
        lab.bridge(hub, [(srv, f"{SERVER_IP}/24"), (a, "192.0.2.2/24"), (b, "192.0.2.3/24")])
        yield Net(lab, srv, a, b, pki)


class Daemons:
    """The processes of one test, all stopped when it ends (the lab stops stragglers)."""

    def __init__(self, net: Net, runtime: str, tmp: Path) -> None:
        self.net, self.lab, self.runtime, self.tmp = net, net.lab, runtime, tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, ns: str, *args: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "shells.cli", "--runtime", self.runtime, "--debug", *args]
        proc = self.lab.spawn(ns, argv, env=ENV, cwd=REPO_ROOT)
        self.procs.append(proc)
        return proc

    def server(self) -> subprocess.Popen[bytes]:
        pki = self.net.pki
        proc = self.spawn(
            self.net.srv,
            *("-m", "server", "-w", "wss://0.0.0.0:8443", "-p", PASSWORD, "-d", "10.99.0.0/24"),
            *("--tls-cert", pki.cert, "--tls-key", pki.key),
        )
        self.wait_for(proc, lambda log: "relay listening on" in log)
        return proc

    def client(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        ns = {"a": self.net.a, "b": self.net.b}[name]
        state = str(self.tmp / f"state-{name}")
        return self.spawn(
            ns, "-m", "client", "-w", URL, "-p", PASSWORD, "-n", name, "--state-dir", state, *extra
        )

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.lab.log(proc)

    def wait_for(self, proc: subprocess.Popen[bytes], seen: object) -> str:
        """Wait until ``seen(log)`` holds (failing early if the process exits)."""
        assert callable(seen)
        wait_until(lambda: seen(self.log(proc)) or proc.poll() is not None, START_TIMEOUT)
        assert seen(self.log(proc)), (
            f"not seen within {START_TIMEOUT:g} s (process "
            f"{'running' if proc.poll() is None else f'exited {proc.returncode}'})\n{self.logs()}"
        )
        return self.log(proc)

    def joined(self, proc: subprocess.Popen[bytes]) -> str:
        """The virtual address the client joined with."""
        match = JOINED_RE.search(self.wait_for(proc, JOINED_RE.search))
        assert match is not None
        return match.group(1)

    def ping(self, ns: str, dst: str, count: int) -> bool:
        argv = ["ping", "-c", str(count), "-W", "1", "-i", "0.2", dst]
        return self.lab.run(ns, *argv, check=False, timeout=count + 5).returncode == 0

    def logs(self) -> str:
        return "\n".join(f"===== pid {p.pid} =====\n{self.log(p)[-6000:]}" for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(2)


@pytest.fixture
def daemons(net: Net, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(net, request.node.callspec.params["runtime"], tmp_path)
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.parametrize("runtime", ["asyncio", "gevent", "threaded"])
def test_only_a_client_that_knows_the_ca_joins_over_wss(daemons: Daemons, runtime: str) -> None:
    server = daemons.server()

    # Without the test CA the relay's certificate cannot be verified: the client keeps
    # trying, never joins, and its log says why.
    stranger = daemons.client("a")
    log = daemons.wait_for(
        stranger, lambda text: len(ATTEMPT_RE.findall(text)) >= 2 or JOINED_RE.search(text)
    )
    assert not JOINED_RE.search(log), f"joined without the CA\n{daemons.logs()}"
    reasons = DISCONNECTED_RE.findall(log)
    assert reasons, daemons.logs()
    for reason in reasons:
        assert "certificate verify failed" in reason.lower(), daemons.logs()
    assert stranger.poll() is None, "the client gave up instead of retrying"
    assert "authenticated as" not in daemons.log(server), daemons.logs()
    stranger.terminate()
    stranger.wait(5)

    # With --tls-ca both clients join through the same relay and reach each other.
    a = daemons.client("a", "--tls-ca", daemons.net.pki.ca)
    b = daemons.client("b", "--tls-ca", daemons.net.pki.ca)
    addr_a, addr_b = daemons.joined(a), daemons.joined(b)
    for src, dst in ((daemons.net.a, addr_b), (daemons.net.b, addr_a)):
        first = functools.partial(daemons.ping, src, dst, 1)
        assert wait_until(first, START_TIMEOUT, 0.2), f"no reply from {dst}\n{daemons.logs()}"
        assert daemons.ping(src, dst, 3), f"ping to {dst} lost packets\n{daemons.logs()}"
    assert not DISCONNECTED_RE.search(daemons.log(a)), daemons.logs()
