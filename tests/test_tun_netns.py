"""End-to-end tests of the namespace lab and of shells.tun.TunDevice (root only)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import (
    NETNS_ETC,
    CommandError,
    CommandTimeout,
    Lab,
    have_netns_privileges,
    make_lab,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
OK, WHY = have_netns_privileges()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not OK, reason=WHY or "netns unavailable")]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with make_lab("ctun") as lab:
        yield lab


def netns_list() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10
    ).stdout


def is_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\tZ (zombie)" not in status and "\nState:\tX" not in status


def run_python(lab: Lab, ns: str, code: str, *prefix: str, timeout: float = 20) -> dict:
    """Run ``code`` with the repo importable inside ``ns``; it prints one JSON object."""
    proc = lab.run(
        ns,
        *prefix,
        sys.executable,
        "-c",
        code,
        timeout=timeout,
        check=False,
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, f"snippet failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the lab ------------------------------------------------------------------------------


def test_veth_pair_connects_two_namespaces(lab: Lab) -> None:
    a, b = lab.add_ns("a"), lab.add_ns("b")
    if_a, if_b = lab.link(a, "192.0.2.1/24", b, "192.0.2.2/24")
    assert (if_a, if_b) == ("veth1", "veth1")
    lab.run(a, "ping", "-c", "2", "-W", "1", "192.0.2.2")
    lab.run(b, "ping", "-c", "2", "-W", "1", "192.0.2.1")
    lab.run(a, "ping", "-c", "1", "-W", "1", "127.0.0.1")  # lo is up
    assert lab.run(a, "cat", "/etc/resolv.conf").stdout == "nameserver 127.0.0.1\n"
    assert a in netns_list() and b in netns_list()


def test_close_removes_everything_even_after_an_exception() -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"), make_lab("ctun") as lab:
        a, b = lab.add_ns("a"), lab.add_ns("b")
        lab.link(a, "192.0.2.1/24", b, "192.0.2.2/24")
        polite = lab.spawn(a, ["sleep", "60"])
        stubborn = lab.spawn(b, ["sh", "-c", "trap '' TERM; sleep 60"])
        # a straggler nobody tracks, left behind by run()
        straggler = int(lab.run(a, "sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!").stdout)
        assert a in netns_list()
        raise RuntimeError("boom")
    assert time.monotonic() - started < 10
    assert polite.returncode is not None
    assert stubborn.returncode is not None
    listed = netns_list()
    for name in (a, b):
        assert name not in listed
        assert not (NETNS_ETC / name).exists()
    assert not lab.tmpdir.exists()
    assert wait_until(lambda: not is_alive(straggler), 2)
    lab.close()  # idempotent


def test_bridge_puts_several_hosts_on_one_segment(lab: Lab) -> None:
    hub = lab.add_ns("hub")
    hosts = [lab.add_ns(f"h{i}") for i in range(1, 4)]
    ifaces = lab.bridge(hub, [(h, f"192.0.2.{i}/24") for i, h in enumerate(hosts, 1)])
    assert len(ifaces) == 3
    lab.run(hosts[0], "ping", "-c", "1", "-W", "1", "192.0.2.2")
    lab.run(hosts[0], "ping", "-c", "1", "-W", "1", "192.0.2.3")
    lab.run(hosts[2], "ping", "-c", "1", "-W", "1", "192.0.2.2")


UDP_ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 3478))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    print("from", addr[0], addr[1], flush=True)
    s.sendto(data, addr)
"""

UDP_CLIENT = """
import json, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.connect(("{dst}", {port}))  # connected, so an ICMP port unreachable raises
s.send(b"hi")
try:
    data = s.recv(2048)
    print(json.dumps({{"reply": data.decode()}}))
except TimeoutError:
    print(json.dumps({{"reply": None, "error": "timeout"}}))
except ConnectionRefusedError:
    print(json.dumps({{"reply": None, "error": "refused"}}))
"""


def test_nat_masquerades_and_drops_unsolicited_udp(lab: Lab) -> None:
    client, router, server = lab.add_ns("client"), lab.add_ns("router"), lab.add_ns("server")
    lab.link(client, "10.99.0.2/24", router, "10.99.0.1/24")
    _, wan = lab.link(server, "203.0.113.2/24", router, "203.0.113.1/24")
    lab.route(client, "default", "10.99.0.1")
    lab.nat(router, wan)
    echo = lab.spawn(server, [sys.executable, "-u", "-c", UDP_ECHO])
    assert wait_until(lambda: "ready" in lab.log(echo), 5), lab.logs()

    out = run_python(lab, client, UDP_CLIENT.format(dst="203.0.113.2", port=3478))
    assert out["reply"] == "hi", lab.logs()
    assert wait_until(lambda: "from 203.0.113.1 " in lab.log(echo), 2), lab.logs()
    assert echo.poll() is None

    # Unsolicited UDP to the router's public address is dropped, not refused.
    out = run_python(lab, server, UDP_CLIENT.format(dst="203.0.113.1", port=3478))
    assert out == {"reply": None, "error": "timeout"}


def test_run_reports_failures_and_timeouts(lab: Lab) -> None:
    a = lab.add_ns("a")
    with pytest.raises(CommandError, match="no-such-thing"):
        lab.run(a, "ls", "/no-such-thing")
    assert lab.run(a, "false", check=False).returncode == 1
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        lab.run(a, "sh", "-c", "sleep 30 & sleep 30", timeout=0.5)
    assert time.monotonic() - started < 5


def test_wait_until_is_bounded() -> None:
    started = time.monotonic()
    assert not wait_until(lambda: False, 0.2)
    assert time.monotonic() - started < 1
    assert wait_until(lambda: True, 0)


# -- the TUN device -----------------------------------------------------------------------

TUN_PING = """
import ipaddress, json, select, struct, subprocess, time
from shells.tun import TunDevice

def checksum(data):
    if len(data) % 2:
        data += b"\\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

def echo_reply(pkt):
    ihl = (pkt[0] & 0x0F) * 4
    hdr = bytearray(pkt[:ihl])
    hdr[8] = 64
    hdr[12:16], hdr[16:20] = pkt[16:20], pkt[12:16]
    hdr[10:12] = b"\\0\\0"
    hdr[10:12] = struct.pack("!H", checksum(bytes(hdr)))
    icmp = bytearray(pkt[ihl:])
    icmp[0] = 0
    icmp[2:4] = b"\\0\\0"
    icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
    return bytes(hdr + icmp)

result = {"requests": []}
with TunDevice.create("candy-t") as tun:
    tun.configure(ipaddress.IPv4Interface("10.99.0.1/24"))
    ping = subprocess.Popen(["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.99.0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 8
    while ping.poll() is None and time.monotonic() < deadline:
        readable, _, _ = select.select([tun], [], [], 0.1)
        for pkt in tun.read_batch() if readable else []:
            if len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != 1:
                continue  # not IPv4 ICMP (e.g. IPv6 router solicitations)
            if pkt[(pkt[0] & 0x0F) * 4] == 8:
                result["requests"].append({
                    "src": str(ipaddress.IPv4Address(pkt[12:16])),
                    "dst": str(ipaddress.IPv4Address(pkt[16:20])),
                })
                tun.write(echo_reply(pkt))
    if ping.poll() is None:
        ping.kill()
    result["ping_output"] = ping.communicate(timeout=2)[0]
    result["ping_rc"] = ping.returncode
    result["dropped"] = tun.dropped
print(json.dumps(result))
"""

TUN_CONFIGURE = """
import ipaddress, json, socket, subprocess
from shells.tun import TunDevice

def show(*args):
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]

tun = TunDevice.create("candy-t", mtu=1280, txqueuelen=500)
present = socket.if_nametoindex("candy-t") > 0
tun.configure(ipaddress.IPv4Interface("10.99.0.5/24"))
tun.configure(ipaddress.IPv4Interface("10.99.1.1/16"))
link = show("-d", "link", "show", "dev", "candy-t")
addrs = show("-4", "addr", "show", "dev", "candy-t")["addr_info"]
tun.close()
tun.close()
try:
    socket.if_nametoindex("candy-t")
    gone = False
except OSError:
    gone = True
try:
    tun.fileno()
    fileno_error = None
except ValueError as exc:
    fileno_error = str(exc)
print(json.dumps({
    "name": tun.name, "present": present, "gone": gone, "fileno_error": fileno_error,
    "mtu": link["mtu"], "txqlen": link["txqlen"], "flags": link["flags"],
    "kind": link["linkinfo"]["info_kind"], "pi": link["linkinfo"]["info_data"].get("pi"),
    "addrs": [f"{a['local']}/{a['prefixlen']}" for a in addrs],
}))
"""

TUN_ERRORS = """
import json
from shells.tun import TunDevice, TunError
errors = {}
for name in ("candy-" + "x" * 10, "NAME"):
    try:
        TunDevice.create(name).close()
        errors[name] = None
    except TunError as exc:
        assert isinstance(exc, OSError)
        errors[name] = str(exc)
print(json.dumps(errors))
"""


def test_tun_reads_echo_request_and_written_reply_reaches_ping(lab: Lab) -> None:
    ns = lab.add_ns("tun")
    out = run_python(lab, ns, TUN_PING)
    assert out["requests"], out
    assert out["requests"][0] == {"src": "10.99.0.1", "dst": "10.99.0.2"}
    assert out["ping_rc"] == 0, out["ping_output"]
    assert " 0% packet loss" in out["ping_output"]
    assert out["dropped"] == 0


def test_tun_configure_and_close(lab: Lab) -> None:
    ns = lab.add_ns("tun")
    out = run_python(lab, ns, TUN_CONFIGURE)
    assert out["name"] == "candy-t"
    assert out["present"]
    assert out["kind"] == "tun" and out["pi"] is False
    assert out["mtu"] == 1280 and out["txqlen"] == 500
    assert "UP" in out["flags"]
    assert out["addrs"] == ["10.99.1.1/16"]  # the earlier address was replaced
    assert out["gone"], "interface still present after close()"
    assert out["fileno_error"]
    # Nothing left in the namespace, and nothing ever appeared on the host.
    assert lab.run(ns, "ip", "link", "show", "candy-t", check=False).returncode != 0
    assert (
        subprocess.run(
            ["ip", "link", "show", "candy-t"], capture_output=True, timeout=10
        ).returncode
        != 0
    )


def test_tun_errors_are_readable(lab: Lab) -> None:
    ns = lab.add_ns("tun")
    out = run_python(lab, ns, TUN_ERRORS.replace("NAME", "candy-ok"))
    assert out["candy-ok"] is None
    assert "15 characters" in out["candy-" + "x" * 10]
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed: cannot drop CAP_NET_ADMIN")
    out = run_python(
        lab,
        ns,
        TUN_ERRORS.replace("NAME", "candy-x"),
        "setpriv",
        "--bounding-set=-net_admin",
        "--inh-caps=-net_admin",
    )
    assert out["candy-x"] == (
        "cannot create TUN device candy-x: permission denied (run as root or with CAP_NET_ADMIN)"
    )
