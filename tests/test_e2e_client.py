"""End-to-end tests of the ``candy`` daemon: a relay and two clients in network namespaces.

One lab serves the whole module: a hub namespace holds a bridge on 192.0.2.0/24 with the
server ``srv`` (192.0.2.1) and the clients ``a`` (192.0.2.2) and ``b`` (192.0.2.3) on it.
Every test starts its own daemons (``python -m shells.cli``) and stops them afterwards, so
tests do not depend on each other. The VPN range 10.99.0.0/24 exists only on the clients'
``candy-<name>`` TUN devices inside the lab. Needs root; skipped with the reason otherwise.

Run with ``-s`` to see the iperf3 figures; ``E2E_SHOW_LOGS=1`` also prints every test's
daemon logs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import Lab, have_netns_privileges, make_lab, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
OK, WHY = have_netns_privileges()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not OK, reason=WHY or "netns unavailable")]

RUNTIMES = ["asyncio", "gevent", "threaded"]
#: (server, client a, client b) runtimes: each runtime alone, and one mixed network.
COMBOS = {rt: (rt, rt, rt) for rt in RUNTIMES} | {"mixed": ("asyncio", "gevent", "threaded")}

PASSWORD = "secret"
VPN = ipaddress.IPv4Network("10.99.0.0/24")
SERVER_IP = "192.0.2.1"
PUBLIC = {"a": "192.0.2.2", "b": "192.0.2.3"}
SERVER_URL = f"ws://{SERVER_IP}:8080"

START_TIMEOUT = 15.0  # a daemon listening / a client joined (interpreter start included)
STOP_TIMEOUT = 5.0  # SIGTERM to exit
RECOVER_TIMEOUT = 15.0  # back on the network after the server or the connection went away
ENV = {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}

JOINED = "joined the network as"
LISTENING = "relay listening on"
ATTEMPT_RE = re.compile(r"reconnecting in [\d.]+ s \(attempt (\d+)\)")
DISCONNECTED_RE = re.compile(r"disconnected from the server: (.*)")
_LOG_NUMBERS = itertools.count(1)


# --- the lab -------------------------------------------------------------------------------


@dataclass
class Net:
    """The module's lab and the roles of its namespaces."""

    lab: Lab
    hub: str
    srv: str
    a: str
    b: str

    def ns(self, role: str) -> str:
        return {"srv": self.srv, "a": self.a, "b": self.b}[role]


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    with make_lab("ce2e") as lab:
        hub = lab.add_ns("hub")
        srv, a, b = lab.add_ns("srv"), lab.add_ns("a"), lab.add_ns("b")
        lab.bridge(
            hub, [(srv, f"{SERVER_IP}/24"), (a, f"{PUBLIC['a']}/24"), (b, f"{PUBLIC['b']}/24")]
        )
        yield Net(lab, hub, srv, a, b)


class Daemons:
    """The processes of one test: started on demand, all stopped when the test ends."""

    def __init__(self, net: Net, tmp: Path, test: str) -> None:
        self.net = net
        self.lab = net.lab
        self.tmp = tmp
        self.test = test
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    # -- starting ----------------------------------------------------------------------

    def spawn(self, role: str, argv: list[str], label: str) -> subprocess.Popen[bytes]:
        log_path = self.lab.tmpdir / f"{next(_LOG_NUMBERS):03d}-{self.test}-{label}.log"
        proc = self.lab.spawn(self.net.ns(role), argv, env=ENV, log_path=log_path, cwd=REPO_ROOT)
        self.procs.append((label, proc))
        return proc

    def server(self, runtime: str, *, wait: bool = True) -> subprocess.Popen[bytes]:
        """The relay in ``srv``, listening on 192.0.2.1:8080, range 10.99.0.0/24."""
        argv = [
            sys.executable,
            "-m",
            "shells.cli",
            "--control",
            "none",
            "-m",
            "server",
            "-w",
            "ws://0.0.0.0:8080",
        ]
        argv += ["-p", PASSWORD, "-d", str(VPN), "--runtime", runtime, "--debug"]
        proc = self.spawn("srv", argv, f"server-{runtime}")
        if wait:
            self.wait_log(proc, LISTENING, START_TIMEOUT)
        return proc

    def client(
        self,
        role: str,
        runtime: str,
        *,
        password: str = PASSWORD,
        static: str | None = None,
        wait: bool = True,
    ) -> subprocess.Popen[bytes]:
        """A client named ``role`` in namespace ``role`` (interface ``candy-<role>``)."""
        argv = [
            sys.executable,
            "-m",
            "shells.cli",
            "--control",
            "none",
            "-m",
            "client",
            "-w",
            SERVER_URL,
        ]
        argv += ["-p", password, "-n", role, "--state-dir", str(self.state_dir(role))]
        argv += ["--runtime", runtime, "--debug"]
        if static:
            argv += ["-t", static]
        proc = self.spawn(role, argv, f"client-{role}-{runtime}")
        if wait:
            self.wait_joined(proc)
        return proc

    def state_dir(self, role: str) -> Path:
        return self.tmp / f"state-{role}"

    # -- watching ----------------------------------------------------------------------

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.lab.log(proc)

    def wait_log(
        self, proc: subprocess.Popen[bytes], text: str, timeout: float, count: int = 1
    ) -> None:
        """Wait until ``text`` appears ``count`` times in the process's log.

        Fails early when the process exits without having written it.
        """

        def seen() -> bool:
            return self.log(proc).count(text) >= count or proc.poll() is not None

        wait_until(seen, timeout, 0.05)
        assert self.log(proc).count(text) >= count, (
            f"{text!r} not seen {count}x within {timeout:g} s "
            f"(process {'running' if proc.poll() is None else f'exited {proc.returncode}'})"
            f"\n{self.logs()}"
        )

    def wait_joined(self, proc: subprocess.Popen[bytes], count: int = 1) -> None:
        self.wait_log(proc, JOINED, START_TIMEOUT, count)

    def link(self, role: str) -> dict:
        """``ip -j addr show dev candy-<role>`` inside ``role``'s namespace."""
        out = self.lab.run(
            self.net.ns(role), "ip", "-j", "addr", "show", "dev", f"candy-{role}", timeout=5
        )
        return json.loads(out.stdout)[0]

    def has_link(self, role: str) -> bool:
        out = self.lab.run(
            self.net.ns(role), "ip", "link", "show", "dev", f"candy-{role}", check=False, timeout=5
        )
        return out.returncode == 0

    def address(self, role: str) -> ipaddress.IPv4Interface | None:
        """The IPv4 address of ``candy-<role>``, or None (no device or no address)."""
        if not self.has_link(role):
            return None
        for info in self.link(role).get("addr_info", []):
            if info.get("family") == "inet":
                return ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
        return None

    def wait_address(self, role: str, timeout: float = START_TIMEOUT) -> ipaddress.IPv4Interface:
        found: list[ipaddress.IPv4Interface] = []

        def has_address() -> bool:
            addr = self.address(role)
            if addr is not None:
                found.append(addr)
            return addr is not None

        assert wait_until(has_address, timeout, 0.1), (
            f"candy-{role} got no IPv4 address within {timeout:g} s\n{self.logs()}"
        )
        return found[-1]

    def ping(
        self, role: str, dst: object, count: int = 3, *extra: str
    ) -> subprocess.CompletedProcess:
        return self.lab.run(
            self.net.ns(role),
            "ping", "-c", str(count), "-W", "1", "-i", "0.2", *extra, str(dst),
            check=False,
            timeout=count + 5,
        )  # fmt: skip

    def assert_ping(self, role: str, dst: object, count: int = 3) -> None:
        out = self.ping(role, dst, count)
        assert out.returncode == 0, (
            f"ping from {role} to {dst} failed:\n{out.stdout}{out.stderr}\n{self.logs()}"
        )

    def wait_ping(self, role: str, dst: object, timeout: float) -> float:
        """Ping once a second until a reply comes back; returns the seconds it took."""
        started = time.monotonic()
        ok = wait_until(lambda: self.ping(role, dst, 1).returncode == 0, timeout, 0.2)
        assert ok, f"no ping reply from {dst} to {role} within {timeout:g} s\n{self.logs()}"
        return time.monotonic() - started

    # -- stopping ----------------------------------------------------------------------

    def signal(self, proc: subprocess.Popen[bytes], sig: int, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` to the daemon; its exit status once it ended within ``timeout``."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            name = signal.Signals(sig).name
            pytest.fail(f"pid {proc.pid} still running {timeout:g} s after {name}\n{self.logs()}")

    def close(self) -> None:
        """Stop every process of the test: SIGTERM to its group, SIGKILL after a grace."""
        running = [proc for _, proc in self.procs if proc.poll() is None]
        for proc in running:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in running:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2)

    def logs(self) -> str:
        """Like ``lab.logs()``, for this test's processes only: for assertion messages."""
        parts = []
        for label, proc in self.procs:
            state = "running" if proc.poll() is None else f"exit {proc.returncode}"
            text = self.log(proc)
            if len(text) > 12000:
                text = "..." + text[-12000:]
            parts.append(f"===== {label} pid {proc.pid} ({state}) =====\n{text}")
        return "\n".join(parts)


@pytest.fixture
def candy(net: Net, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Daemons]:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    daemons = Daemons(net, tmp_path, name)
    try:
        yield daemons
    finally:
        daemons.close()
        if os.environ.get("E2E_SHOW_LOGS"):
            print(daemons.logs())


def start_network(
    candy: Daemons, combo: tuple[str, str, str]
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """Server and both clients, each on its runtime; returns once both clients joined."""
    srv_rt, a_rt, b_rt = combo
    server = candy.server(srv_rt)
    a = candy.client("a", a_rt, wait=False)
    b = candy.client("b", b_rt, wait=False)
    candy.wait_joined(a)
    candy.wait_joined(b)
    return server, a, b


def disconnect_reasons(candy: Daemons, proc: subprocess.Popen[bytes]) -> list[str]:
    """The reasons a client logged for losing the server, in order."""
    return DISCONNECTED_RE.findall(candy.log(proc))


def in_vpn(addr: ipaddress.IPv4Interface) -> bool:
    return addr.network == VPN and addr.ip not in (VPN.network_address, VPN.broadcast_address)


# --- 1. join and ping ----------------------------------------------------------------------


@pytest.mark.parametrize("combo", list(COMBOS), ids=list(COMBOS))
def test_two_dynamic_clients_join_and_ping_each_other(candy: Daemons, combo: str) -> None:
    start_network(candy, COMBOS[combo])
    addr_a, addr_b = candy.wait_address("a"), candy.wait_address("b")
    assert in_vpn(addr_a) and in_vpn(addr_b), (addr_a, addr_b, candy.logs())
    assert addr_a.ip != addr_b.ip
    for role in ("a", "b"):
        link = candy.link(role)
        assert link["mtu"] == 1400, link
        assert "UP" in link["flags"], link
    candy.assert_ping("a", addr_b.ip)
    candy.assert_ping("b", addr_a.ip)


# --- 2. broadcast and multicast ------------------------------------------------------------

MCAST_GROUP, MCAST_PORT = "224.0.0.251", 5353

MCAST_LISTEN = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{group}", {port}))
mreq = struct.pack("4s4s", socket.inet_aton("{group}"), socket.inet_aton("{local}"))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
s.settimeout(10)
print("ready", flush=True)
data, addr = s.recvfrom(2048)
print("received", data.decode(), "from", addr[0], flush=True)
"""

MCAST_SEND = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(b"hello-candy", ("{group}", {port}))
    time.sleep(0.2)
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_broadcast_and_multicast_reach_the_other_client(candy: Daemons, runtime: str) -> None:
    start_network(candy, COMBOS[runtime])
    addr_a, addr_b = candy.wait_address("a"), candy.wait_address("b")
    lab, net = candy.lab, candy.net

    lab.sysctl(net.b, "net.ipv4.icmp_echo_ignore_broadcasts", 0)
    out = candy.ping("a", VPN.broadcast_address, 2, "-b")
    assert out.returncode == 0 and f"from {addr_b.ip}:" in out.stdout, (
        f"broadcast ping:\n{out.stdout}{out.stderr}\n{candy.logs()}"
    )

    listener = candy.spawn(
        "b",
        [
            sys.executable,
            "-c",
            MCAST_LISTEN.format(group=MCAST_GROUP, port=MCAST_PORT, local=addr_b.ip),
        ],
        "mcast-listener",
    )
    candy.wait_log(listener, "ready", 5)
    lab.run(net.a, "ip", "route", "add", "224.0.0.0/4", "dev", "candy-a")
    lab.run(net.a, sys.executable, "-c", MCAST_SEND.format(group=MCAST_GROUP, port=MCAST_PORT))
    candy.wait_log(listener, "received", 5)
    assert f"received hello-candy from {addr_a.ip}" in candy.log(listener), candy.logs()


# --- 3. the address is kept ----------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_address_kept_across_restart_and_connection_cut(candy: Daemons, runtime: str) -> None:
    _, a, _ = start_network(candy, COMBOS[runtime])
    addr_a = candy.wait_address("a")
    cached = candy.state_dir("a") / "address" / "a"
    assert cached.read_text().strip() == str(addr_a), candy.logs()

    # The client restarts: it asks for its cached address and gets it back.
    assert candy.signal(a, signal.SIGTERM) == 0, candy.logs()
    a = candy.client("a", runtime)
    assert candy.wait_address("a") == addr_a, candy.logs()
    candy.assert_ping("b", addr_a.ip)

    # The connection is cut under the running client (the kernel aborts the socket and
    # resets the server's side): it reconnects on its own and keeps its address.
    lost, joined = len(disconnect_reasons(candy, a)), candy.log(a).count(JOINED)
    candy.lab.run(candy.net.a, "ss", "-K", "-t", "dst", f"{SERVER_IP}:8080")
    candy.wait_log(a, "disconnected from the server", 5, count=lost + 1)
    reason = disconnect_reasons(candy, a)[lost]
    assert "refused" not in reason and "password" not in reason, candy.logs()
    candy.wait_joined(a, count=joined + 1)
    assert a.poll() is None
    assert candy.address("a") == addr_a, candy.logs()
    candy.wait_ping("b", addr_a.ip, RECOVER_TIMEOUT)


# --- 4. the server restarts ----------------------------------------------------------------


@pytest.mark.parametrize("combo", list(COMBOS), ids=list(COMBOS))
def test_clients_recover_after_the_server_is_killed(candy: Daemons, combo: str) -> None:
    server, a, b = start_network(candy, COMBOS[combo])
    addr_a, addr_b = candy.wait_address("a"), candy.wait_address("b")
    candy.assert_ping("a", addr_b.ip, 1)

    lost = {client: len(disconnect_reasons(candy, client)) for client in (a, b)}
    assert candy.signal(server, signal.SIGKILL) == -signal.SIGKILL
    started = time.monotonic()
    for client in (a, b):  # the reason given is the server going away, not a refusal
        candy.wait_log(client, "disconnected from the server", 5, count=lost[client] + 1)
        reason = disconnect_reasons(candy, client)[lost[client]]
        assert "refused" not in reason and "password" not in reason, candy.logs()
    candy.server(COMBOS[combo][0])
    candy.wait_ping("a", addr_b.ip, RECOVER_TIMEOUT)
    candy.wait_ping("b", addr_a.ip, RECOVER_TIMEOUT)
    took = time.monotonic() - started
    assert candy.address("a") == addr_a and candy.address("b") == addr_b, candy.logs()
    assert a.poll() is None and b.poll() is None
    print(f"[{combo}] clients back on the network {took:.1f} s after the server was killed")


# --- 5. wrong password ---------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_wrong_password_is_reported_and_retried_with_backoff(candy: Daemons, runtime: str) -> None:
    candy.server(runtime)
    started = time.monotonic()
    bad = candy.client("b", runtime, password="not-the-secret", wait=False)

    def attempts() -> int:
        return len(ATTEMPT_RE.findall(candy.log(bad)))

    assert wait_until(lambda: attempts() >= 2 or bad.poll() is not None, 10, 0.1), candy.logs()
    # Watch a few seconds more: back-off (about 1 s, 2 s, 4 s...) keeps the count small.
    time.sleep(max(0.0, started + 6 - time.monotonic()))
    log = candy.log(bad)
    assert bad.poll() is None, f"the client gave up\n{candy.logs()}"
    assert "wrong password" in log, candy.logs()
    assert 2 <= attempts() <= 6, f"{attempts()} attempts in 6 s\n{candy.logs()}"
    assert JOINED not in log


# --- 6. static address ---------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_static_client_is_reachable_from_a_dynamic_one(candy: Daemons, runtime: str) -> None:
    candy.server(runtime)
    candy.client("b", runtime, static="10.99.0.77/24")  # first, so nobody is handed .77
    candy.client("a", runtime)
    assert candy.wait_address("b") == ipaddress.IPv4Interface("10.99.0.77/24"), candy.logs()
    addr_a = candy.wait_address("a")
    assert in_vpn(addr_a) and addr_a.ip != ipaddress.IPv4Address("10.99.0.77")
    candy.assert_ping("a", "10.99.0.77")
    candy.assert_ping("b", addr_a.ip)


# --- 7. throughput -------------------------------------------------------------------------


def iperf3(candy: Daemons, dst: str, seconds: int = 3) -> float:
    """Bits per second received by the iperf3 server in b, from a client in a."""
    out = candy.lab.run(
        candy.net.a,
        "iperf3",
        "-c",
        dst,
        "-t",
        str(seconds),
        "-J",
        check=False,
        timeout=seconds + 15,
    )
    assert out.returncode == 0, f"iperf3 to {dst}:\n{out.stdout}{out.stderr}\n{candy.logs()}"
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"])


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_iperf3_through_the_tunnel(
    candy: Daemons, runtime: str, record_property: pytest.RecordProperty
) -> None:
    start_network(candy, COMBOS[runtime])
    addr_b = candy.wait_address("b")
    candy.assert_ping("a", addr_b.ip, 1)
    server = candy.spawn("b", ["iperf3", "-s", "--forceflush"], "iperf3-server")

    def listening() -> bool:
        out = candy.lab.run(candy.net.b, "ss", "-Hltn", "sport", "=", ":5201", check=False)
        return bool(out.stdout.strip())

    assert wait_until(listening, 5, 0.1), candy.logs()
    tunnel = iperf3(candy, str(addr_b.ip))
    plain = iperf3(candy, PUBLIC["b"])
    assert server.poll() is None
    record_property("tunnel_bits_per_second", tunnel)
    record_property("veth_bits_per_second", plain)
    print(
        f"\niperf3 [{runtime}]: tunnel {tunnel / 1e6:.1f} Mbit/s, "
        f"plain veth {plain / 1e6:.1f} Mbit/s ({tunnel / plain:.1%})"
    )
    assert tunnel > 0 and plain > 0


# --- 8. SIGTERM ----------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sigterm_removes_the_interface_and_exits_cleanly(candy: Daemons, runtime: str) -> None:
    server = candy.server(runtime)
    a = candy.client("a", runtime)
    candy.wait_address("a")
    started = time.monotonic()
    assert candy.signal(a, signal.SIGTERM) == 0, candy.logs()
    assert not candy.has_link("a"), f"candy-a still present\n{candy.logs()}"
    assert candy.signal(server, signal.SIGTERM) == 0, candy.logs()
    took = time.monotonic() - started
    assert took < 2 * STOP_TIMEOUT
