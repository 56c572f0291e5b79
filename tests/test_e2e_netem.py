"""End to end on a bad network: loss, delay, jitter, reordering and duplicates between the
NATs and the server, then a 30 s blackhole of one client's uplink.

The topology is :class:`p2plab.Net` (a server with a STUN server, two cone NATs, a client
behind each; see p2plab's docstring). Every link of the public segment is impaired like::

    tc qdisc add dev <uplink> root netem loss 5% delay 40ms 10ms reorder 1% duplicate 1%

on the uplinks of ``srv``, ``nat-a`` and ``nat-b``, so each packet crossing the public
segment (client <-> relay, client <-> STUN, NAT <-> NAT on the direct path) is impaired
once. Where the kernel has no ``sch_netem`` (checked by trying it), the same impairment is
made without it: ``tests/netemu.py`` holds each packet arriving on those uplinks in an
NFQUEUE and gives it its verdict like netem (loss, 40 ms ± 10 ms uniform delay released in
time order, 1 % sent at once), and an nftables ``dup`` rule duplicates 1 % of the packets
leaving them. The test prints which one it used. Only when neither works is it skipped.

The tests:

* ``test_holds_on_a_bad_network``: both clients join, the peers reach CONNECTED and stay
  there for ~10 s of pinging (no state change, counters show the datagrams go NAT to NAT,
  hardly anything to the relay), >= 80 % of the pings are answered, a 3 s iperf3 TCP run
  moves data; then the direct path is cut (UDP blocked in ``b``), the peers fall back to the
  relay and ping and iperf3 work through it.
* ``test_comes_back_after_a_blackhole``: with the direct path up, every packet to and from
  nat-a's uplink is dropped for 30 s (iptables DROP), then let through again. Client ``a``
  must come back by itself with the same virtual address and the direct path must be
  rebuilt (CONNECTED again on both sides) within 60 s, and then carry 100 pings (5 s).

Each runs twice: everything on asyncio, and a mixed network (threaded relay, gevent client
``a``, threaded client ``b``). Run with ``-s`` to see the figures (pings, counters, iperf3).

Nothing is sent outside the namespaces the lab creates; every wait is bounded, and the
lab (processes, namespaces, rules) is torn down even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import CommandError, Lab, have_netns_privileges, make_lab, wait_until
from p2plab import REPO, SERVER, Net, vpn_address

_ok, _why = have_netns_privileges()
# Bounded waits that may all run out (and a 30 s blackhole) take longer than the default.
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not _ok, reason=_why), pytest.mark.timeout(300)]

PASSWORD = "netem-secret"
VPN = "10.99.0.0/24"
NETEM = "loss 5% delay 40ms 10ms reorder 1% duplicate 1%"
EMULATION = ["--loss", "5", "--delay", "40", "--jitter", "10", "--reorder", "1"]
DUPLICATE_PERCENT = 1
BLACKHOLE_SECONDS = 30
RECOVER_SECONDS = 60
#: (server, client a, client b) runtimes.
COMBOS = {
    "asyncio": ("asyncio", "asyncio", "asyncio"),
    "mixed": ("threaded", "gevent", "threaded"),
}
IPT = ("iptables", "-w", "5")
TRANSITION_RE = re.compile(r"peer (\d+\.\d+\.\d+\.\d+): (\w+) -> (\w+) \((.*)\)")


# --- the bad network -------------------------------------------------------------------------


class BadNet:
    """:class:`Net` with every uplink of the public segment impaired (netem or emulated)."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.lab = net.lab
        self.stats_paths: dict[str, Path] = {}
        self.mode = self._impair()

    def _impair(self) -> str:
        lab, uplinks = self.lab, self.net.uplink
        first_ns = next(iter(uplinks))
        if shutil.which("modprobe"):
            lab.run(first_ns, "modprobe", "sch_netem", check=False)
        probe = lab.run(
            first_ns,
            *("tc", "qdisc", "add", "dev", uplinks[first_ns], "root", "netem", *NETEM.split()),
            check=False,
        )
        if probe.returncode == 0:
            for ns, iface in list(uplinks.items())[1:]:
                lab.run(ns, "tc", "qdisc", "add", "dev", iface, "root", "netem", *NETEM.split())
            return f"tc netem {NETEM}"
        why_not = " ".join((probe.stderr or probe.stdout).split()) or "tc failed"
        try:
            self._emulate()
        except (CommandError, subprocess.SubprocessError, OSError, RuntimeError) as exc:
            pytest.skip(
                f"netem is unavailable (tc: {why_not}) and so is its NFQUEUE emulation: {exc}"
            )
        return f"NFQUEUE emulation of netem {NETEM} (no sch_netem here: tc said {why_not!r})"

    def _emulate(self) -> None:
        lab = self.lab
        netemu = [sys.executable, str(REPO / "tests" / "netemu.py"), "--queue", "0", *EMULATION]
        for n, (ns, iface) in enumerate(self.net.uplink.items()):
            stats = lab.tmpdir / f"netemu-{n}.json"
            proc = lab.spawn(ns, [*netemu, "--stats", str(stats), "--lifetime", "900"])
            if not wait_until(lambda p=proc: "bound" in lab.log(p) or p.poll() is not None, 15):
                raise RuntimeError(f"netemu did not start in {ns}")
            if proc.poll() is not None:
                raise RuntimeError(f"netemu failed in {ns}: {lab.log(proc).strip()[-500:]}")
            self.stats_paths[ns] = stats
            # Packets arriving on the uplink wait in the queue (unimpaired if netemu is gone).
            queue = ["-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"]
            lab.run(ns, *IPT, "-t", "raw", "-A", "PREROUTING", "-i", iface, *queue)
            # 1 % of the packets leaving it are duplicated, after NAT (priority 300).
            rules = (
                "table ip netem {\n chain out {\n"
                "  type filter hook postrouting priority 300; policy accept;\n"
                f'  oifname "{iface}" numgen random mod 100 < {DUPLICATE_PERCENT} '
                f'dup to ip daddr device "{iface}"\n'
                " }\n}\n"
            )
            lab.run(ns, "nft", "-f", "-", input=rules)

    def dropped(self) -> int:
        """Packets the impairment has dropped so far (all uplinks)."""
        total = 0
        if self.stats_paths:
            for path in self.stats_paths.values():
                with contextlib.suppress(OSError, ValueError):
                    total += json.loads(path.read_text())["dropped"]
            return total
        for ns, iface in self.net.uplink.items():
            out = self.lab.run(ns, "tc", "-s", "qdisc", "show", "dev", iface, check=False).stdout
            total += sum(int(n) for n in re.findall(r"dropped (\d+)", out))
        return total

    @contextlib.contextmanager
    def blackhole(self, ns: str) -> Iterator[None]:
        """Drop every packet into and out of ``ns``'s uplink while the block runs."""
        iface = self.net.uplink[ns]
        rules = [("raw", "PREROUTING", "-i"), ("mangle", "POSTROUTING", "-o")]
        try:
            for table, chain, direction in rules:
                self.lab.run(
                    ns, *IPT, "-t", table, "-I", chain, "1", direction, iface, "-j", "DROP"
                )
            yield
        finally:
            for table, chain, direction in rules:
                self.lab.run(
                    ns, *IPT, "-t", table, "-D", chain, direction, iface, "-j", "DROP", check=False
                )


@pytest.fixture(scope="module")
def bad() -> Iterator[BadNet]:
    with make_lab("cnem") as lab:
        net = Net(lab)
        bad_net = BadNet(net)
        print(f"\nimpairment: {bad_net.mode}")
        yield bad_net


# --- the VPN -----------------------------------------------------------------------------------


class Candy:
    """A relay and two clients (``a`` behind nat-a, ``b`` behind nat-b) for one test."""

    def __init__(self, bad_net: BadNet, runtimes: tuple[str, str, str], tmp: Path) -> None:
        self.bad = bad_net
        self.net = net = bad_net.net
        self.lab = lab = net.lab
        srv_rt, a_rt, b_rt = runtimes
        cli = [sys.executable, "-m", "shells.cli", "--debug", "--runtime"]
        self.server = lab.spawn(
            net.srv,
            [*cli, srv_rt, "-m", "server", "-w", "ws://0.0.0.0:8080", "-p", PASSWORD, "-d", VPN],
            env=net.env,
            cwd=REPO,
        )
        self.iface = {net.a: "candy-na", net.b: "candy-nb"}
        self.procs = {}
        for ns, name, rt in ((net.a, "na", a_rt), (net.b, "nb", b_rt)):
            argv = [*cli, rt, "-m", "client", "-w", f"ws://{SERVER}:8080", "-p", PASSWORD]
            argv += ["-n", name, "-s", f"stun://{SERVER}:3478", "--state-dir", str(tmp / name)]
            self.procs[ns] = lab.spawn(ns, argv, env=net.env, cwd=REPO)
        self.iperf_port = 5201

    def stop(self) -> None:
        procs = [*self.procs.values(), self.server]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- watching ------------------------------------------------------------------------

    def log(self, ns: str) -> str:
        return self.lab.log(self.procs[ns])

    def transitions(self, ns: str) -> list[tuple[str, str, str]]:
        """(old, new, reason) of every peer state change the client in ``ns`` logged."""
        return [m.group(2, 3, 4) for m in TRANSITION_RE.finditer(self.log(ns))]

    def state(self, ns: str) -> str | None:
        changes = self.transitions(ns)
        return changes[-1][1] if changes else None

    def address(self, ns: str) -> str | None:
        return vpn_address(self.lab, ns, self.iface[ns])

    def report(self) -> str:
        return f"\nimpairment: {self.bad.mode}\n{self.lab.logs()}"

    # -- doing ---------------------------------------------------------------------------

    def join(self) -> tuple[str, str]:
        """Both clients' virtual addresses, once they have them (<= 30 s)."""
        net = self.net
        for ns in (net.a, net.b):
            assert wait_until(lambda ns=ns: self.address(ns), 30, 0.2), (
                f"{ns} got no address" + self.report()
            )
        a, b = self.address(net.a), self.address(net.b)
        assert a and b
        return a, b

    def go_direct(self, dst: str, timeout: float) -> bool:
        """Ping ``dst`` from a (through the relay) until both peers are CONNECTED."""
        net, lab = self.net, self.lab

        def connected() -> bool:
            lab.run(net.a, "ping", "-c", "1", "-W", "1", dst, check=False, timeout=5)
            return self.state(net.a) == "CONNECTED" and self.state(net.b) == "CONNECTED"

        return wait_until(connected, timeout, 0.2)

    def ping(self, dst: str, count: int, interval: float, wait: float = 2) -> tuple[int, str]:
        """Pings from a to ``dst``: (answered, output)."""
        out = self.lab.run(
            self.net.a,
            *("ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait), dst),
            check=False,
            timeout=count * interval + wait + 10,
        ).stdout
        match = re.search(r"(\d+) received", out)
        return (int(match.group(1)) if match else 0), out

    def counted(self) -> dict[str, int]:
        """Packets so far on both NATs: 'udp' NAT to NAT (direct), 'tcp' to the relay."""
        a, b = self.net.counters(self.net.nat_a), self.net.counters(self.net.nat_b)
        return {k: a[k] + b[k] for k in a}

    def iperf3(self, dst: str, seconds: int = 3) -> float:
        """Bits per second received by an iperf3 server in b from a client in a."""
        lab, net = self.lab, self.net
        self.iperf_port += 1
        port = str(self.iperf_port)
        server = lab.spawn(net.b, ["iperf3", "-s", "-1", "-p", port])
        try:
            listening = wait_until(
                lambda: f":{port} " in lab.run(net.b, "ss", "-ltnH", check=False).stdout, 10, 0.1
            )
            assert listening, "iperf3 server did not start" + self.report()
            out = lab.run(
                net.a,
                *("iperf3", "-c", dst, "-p", port, "-t", str(seconds), "-J"),
                *("--connect-timeout", "10000"),
                check=False,
                timeout=seconds + 40,
            )
            try:
                result = json.loads(out.stdout)
                return float(result["end"]["sum_received"]["bits_per_second"])
            except (ValueError, KeyError) as exc:
                raise AssertionError(
                    f"iperf3 to {dst} failed ({exc}):\n{out.stdout[-3000:]}{out.stderr}"
                    + self.report()
                ) from None
        finally:
            if server.poll() is None:
                server.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(5)


@pytest.fixture(params=list(COMBOS))
def candy(bad: BadNet, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Candy]:
    network = Candy(bad, COMBOS[request.param], tmp_path)
    try:
        yield network
    finally:
        network.stop()


@contextlib.contextmanager
def _udp_blocked(lab: Lab, ns: str) -> Iterator[None]:
    """No UDP into or out of ``ns`` (the direct path and STUN) while the block runs."""
    try:
        for chain in ("INPUT", "OUTPUT"):
            lab.run(ns, *IPT, "-I", chain, "-p", "udp", "-j", "DROP")
        yield
    finally:
        for chain in ("INPUT", "OUTPUT"):
            lab.run(ns, *IPT, "-D", chain, "-p", "udp", "-j", "DROP", check=False)


# --- the tests ---------------------------------------------------------------------------------


def _stays_direct(candy: Candy, dst: str, what: str, interval: float = 0.1) -> None:
    """100 pings from a to ``dst``: answered, over the direct path, which stays up."""
    net = candy.net
    marks = {ns: len(candy.transitions(ns)) for ns in (net.a, net.b)}
    before, dropped_before = candy.counted(), candy.bad.dropped()
    answered, out = candy.ping(dst, 100, interval)
    after, dropped = candy.counted(), candy.bad.dropped() - dropped_before
    direct, relayed = after["udp"] - before["udp"], after["tcp"] - before["tcp"]
    print(
        f"{what}: {answered}/100 pings answered, {direct} datagrams NAT to NAT, "
        f"{relayed} packets to the relay, {dropped} dropped by the impairment"
    )
    for ns in (net.a, net.b):
        changes = candy.transitions(ns)[marks[ns] :]
        assert not changes, f"{ns} left the direct path: {changes}" + candy.report()
    # Each ping crosses the impairment twice (~10 % lost); 80 % leaves a wide margin.
    assert answered >= 80, f"only {answered}/100 pings answered ({what})\n{out}"
    assert direct >= 160, f"only {direct} datagrams went NAT to NAT ({what})" + candy.report()
    assert relayed <= 10, f"{relayed} packets went to the relay ({what})"
    assert dropped > 0, "the impairment dropped nothing: is the network really bad?"


def test_holds_on_a_bad_network(candy: Candy) -> None:
    net, lab = candy.net, candy.lab
    started = time.monotonic()
    _, vpn_b = candy.join()
    assert candy.go_direct(vpn_b, 45), "the peers never reached CONNECTED" + candy.report()
    print(f"\ndirect path after {time.monotonic() - started:.1f} s")
    _stays_direct(candy, vpn_b, "direct")

    rate = candy.iperf3(vpn_b)
    print(f"iperf3 over the direct path: {rate / 1e6:.2f} Mbit/s")
    assert rate > 0

    # Cut the direct path: the peers fall back to the relay, which carries ping and iperf3.
    with _udp_blocked(lab, net.b):
        left = lambda: "CONNECTED" not in (candy.state(net.a), candy.state(net.b))  # noqa: E731
        assert wait_until(left, 15, 0.2), "a peer stayed CONNECTED without UDP" + candy.report()
        before = candy.counted()
        answered, out = candy.ping(vpn_b, 20, 0.25, wait=3)
        after = candy.counted()
        relayed = after["tcp"] - before["tcp"]
        print(f"relay: {answered}/20 pings answered, {relayed} packets to the relay")
        assert answered >= 16, f"only {answered}/20 pings answered through the relay\n{out}"
        assert relayed >= 2 * answered, f"only {relayed} packets went to the relay"
        rate = candy.iperf3(vpn_b)
        print(f"iperf3 through the relay: {rate / 1e6:.2f} Mbit/s")
        assert rate > 0
    print(f"test took {time.monotonic() - started:.1f} s")


def test_comes_back_after_a_blackhole(candy: Candy) -> None:
    net, lab = candy.net, candy.lab
    started = time.monotonic()
    vpn_a, vpn_b = candy.join()
    assert candy.go_direct(vpn_b, 45), "the peers never reached CONNECTED" + candy.report()
    marks = {ns: len(candy.transitions(ns)) for ns in (net.a, net.b)}
    log_mark = len(candy.log(net.a))

    with candy.bad.blackhole(net.nat_a):
        cut_at = time.monotonic()
        # Traffic keeps trying during the cut; a's side is unreachable.
        answered, _ = candy.ping(vpn_b, 3, 0.5, wait=1)
        assert answered == 0, "pings crossed the blackhole"
        assert wait_until(lambda: candy.state(net.b) != "CONNECTED", 10, 0.2), (
            "b stayed CONNECTED to a blackholed peer" + candy.report()
        )
        remaining = BLACKHOLE_SECONDS - (time.monotonic() - cut_at)
        time.sleep(max(0.0, remaining))
    restored_at = time.monotonic()
    print(f"\nblackhole of nat-a's uplink for {restored_at - cut_at:.1f} s, restored")

    def back() -> bool:
        lab.run(net.a, "ping", "-c", "1", "-W", "1", vpn_b, check=False, timeout=5)
        return (
            candy.address(net.a) == vpn_a
            and candy.state(net.a) == "CONNECTED"
            and candy.state(net.b) == "CONNECTED"
            and len(candy.transitions(net.a)) > marks[net.a]
            and len(candy.transitions(net.b)) > marks[net.b]
        )

    recovered = wait_until(back, RECOVER_SECONDS, 0.5)
    took = time.monotonic() - restored_at
    later = candy.log(net.a)[log_mark:]
    reconnected = "disconnected from the server" in later
    states = [c[:2] for c in candy.transitions(net.a)[marks[net.a] :]]
    print(f"recovered={recovered} after {took:.1f} s; a reconnected to the server: {reconnected}")
    print(f"a's peer states since the cut: {states}")
    assert candy.address(net.a) == vpn_a, (
        f"a's address changed from {vpn_a} to {candy.address(net.a)}" + candy.report()
    )
    assert candy.address(net.b) == vpn_b
    assert recovered, (
        f"no direct path {RECOVER_SECONDS} s after the blackhole: a is {candy.state(net.a)}, "
        f"b is {candy.state(net.b)}" + candy.report()
    )

    _stays_direct(candy, vpn_b, "after the recovery", interval=0.05)
    print(f"test took {time.monotonic() - started:.1f} s")
