"""Helpers shared by the benchmarks: raw-socket Candy clients, server daemons, /proc readings.

The clients here are deliberately not the project's shells: they speak the protocol with
plain sockets and candy_core's codec (upgrade request, masked VMAC/AUTH/FORWARD frames), so a
benchmark measures the server under test and as little of the load generator as possible.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

from candy_core import messages as m
from candy_core.upgrade import ClientUpgrade
from candy_core.wsframe import OP_BINARY, OP_PING, encode_frame

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "pw"
LOOPBACK = "127.0.0.1"
LISTENING = "relay listening on"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Bytes the server writes per relayed FORWARD of a ``size``-byte packet: 4-byte header + type.
RELAYED_OVERHEAD = 4 + 1


# --- frames -----------------------------------------------------------------------------------
def ip_packet(src: IPv4Address, dst: IPv4Address, size: int = 1400) -> bytes:
    """An IPv4/UDP-looking packet of ``size`` bytes from ``src`` to ``dst``."""
    header = bytearray.fromhex("45000000000100004011") + b"\x00\x00" + src.packed + dst.packed
    header[2:4] = size.to_bytes(2, "big")
    return bytes(header) + os.urandom(size - len(header))


def forward_frame(src: IPv4Address, dst: IPv4Address, size: int = 1400) -> bytes:
    """One masked WebSocket frame carrying a FORWARD of a ``size``-byte packet."""
    return encode_frame(OP_BINARY, b"\x01" + ip_packet(src, dst, size), os.urandom(4))


def handshake_frames(ip: IPv4Address, wall: int | None = None, password: str = PASSWORD) -> bytes:
    """Masked VMAC then AUTH frames, as a 5.6 client with a static address sends them."""
    ts = int(time.time()) if wall is None else wall
    vmac = m.Vmac.create(password, os.urandom(16), ts).encode()
    auth = m.Auth.create(password, ip, ts).encode()
    return encode_frame(OP_BINARY, vmac, os.urandom(4)) + encode_frame(
        OP_BINARY, auth, os.urandom(4)
    )


def ping_frame() -> bytes:
    """A masked WebSocket PING (what keeps an idle client alive)."""
    return encode_frame(OP_PING, b"", os.urandom(4))


def new_upgrade(port: int, host: str = LOOPBACK) -> ClientUpgrade:
    """A client upgrade with a fresh nonce."""
    return ClientUpgrade(host, port, "/", base64.b64encode(os.urandom(16)))


def blocking_join(port: int, ip: IPv4Address, timeout: float = 5.0) -> socket.socket:
    """Connect, upgrade and send VMAC+AUTH; returns the blocking socket (timeout set)."""
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upgrade = new_upgrade(port)
        sock.sendall(upgrade.request())
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("no 101 from the server")
            data = sock.recv(4096)
            if not data:
                raise ConnectionError("server closed during the upgrade")
            result = upgrade.receive(data)
            if result.rejected:
                raise ConnectionError(result.rejected)
            if result.accepted:
                break
        sock.sendall(handshake_frames(ip))
    except BaseException:
        sock.close()
        raise
    return sock


# --- processes --------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def daemon_env() -> dict[str, str]:
    """Environment for ``python -m shells.cli`` run from the repository."""
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else ""),
        "PYTHONUNBUFFERED": "1",
    }


def server_argv(runtime: str, port: int, dhcp: str, host: str = LOOPBACK) -> list[str]:
    """Command line of a relay daemon (INFO logging)."""
    return [
        sys.executable, "-m", "shells.cli", "--control", "none", "-m", "server", "-w", f"ws://{host}:{port}",
        "-p", PASSWORD, "-d", dhcp, "--runtime", runtime,
    ]  # fmt: skip


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll a log file until ``text`` shows up; False on timeout or when ``proc`` exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if text in path.read_text(errors="replace"):
                return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def start_local_server(runtime: str, log_path: Path, dhcp: str = "10.99.0.0/24") -> tuple:
    """A relay daemon of ``runtime`` on 127.0.0.1; returns (Popen, port). Raises if it fails."""
    for _ in range(3):  # a free port may be taken between probing and binding
        port = free_port()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                server_argv(runtime, port, dhcp),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=daemon_env(),
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        if wait_for_text(log_path, LISTENING, proc, 20.0):
            return proc, port
        stop_process(proc)
    raise RuntimeError(f"{runtime} server did not start:\n{log_path.read_text(errors='replace')}")


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group, SIGKILL after ``grace`` seconds. Never raises."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)


# --- /proc ------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime+stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def thread_count(pid: int) -> int:
    """Threads of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0
