"""Out of file descriptors, every runtime's relay daemon keeps going: the members it has keep
relaying, new connections wait (one log line a second at most per listener), the CPU stays
idle, and it recovers once descriptors free up.

The daemon (``python -m shells.cli -m server``, with its control socket and metrics endpoint)
runs with RLIMIT_NOFILE 256, soft and hard; 400 connections arrive and stay open (those it
accepts authenticate, so no timeout frees them), and one connection waits on the control
socket and one on the metrics port. On 127.0.0.1 only, no namespaces. The asyncio runtime
runs twice: on uvloop, which the daemon picks when it can import it, and on plain asyncio
(uvloop's import blocked).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from rawclient import RawMember, handshake, upgrade_request
from runtimes import HOST, free_port, icmp_packet, msg_forward, wait_until

from shells.asyncio.accept import Acceptor
from shells.common import AcceptBackoff, LogEvery

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "fds"
LIMIT = 256
HELD = 400
#: Seconds over which the daemon's CPU time is read while it is out of descriptors.
WINDOW = 3.0
#: Share of one core the daemon may use meanwhile (it should be close to nothing).
CPU_SHARE = 0.2
#: What each listener logs while its accept fails.
REFUSING = {
    "relay": "cannot accept connections:",
    "control": "cannot accept control connections:",
    "metrics": "cannot accept metrics connections:",
}
A, B, C = IPv4Address("10.99.0.1"), IPv4Address("10.99.0.2"), IPv4Address("10.99.0.3")

#: How each case starts ``shells.cli``: plain asyncio blocks the uvloop import first.
PRELUDE = {
    "asyncio-uvloop": "",
    "asyncio": "sys.modules['uvloop'] = None; ",
    "gevent": "",
    "threaded": "",
}


def _available(case: str) -> bool:
    module = {"asyncio-uvloop": "uvloop", "gevent": "gevent"}.get(case)
    return module is None or importlib.util.find_spec(module) is not None


CASES = [
    pytest.param(
        case, marks=pytest.mark.skipif(not _available(case), reason=f"{case} not installed")
    )
    for case in PRELUDE
]


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def _log_text(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5.0)


@pytest.fixture(params=CASES)
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    """The relay daemon of one runtime with 256 descriptors."""
    case = request.param
    runtime = "asyncio" if case.startswith("asyncio") else case
    code = f"import sys; {PRELUDE[case]}from shells.cli import main; sys.exit(main())"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log_path = tmp_path / f"{case}.log"
    for _ in range(3):  # a free port may be taken between probing and binding
        port, metrics = free_port(), free_port()
        control = tmp_path / "control.sock"
        argv = [
            sys.executable, "-c", code, "-m", "server", "-w", f"ws://{HOST}:{port}",
            "-p", PASSWORD, "-d", "10.99.0.0/16", "--runtime", runtime,
            "--control", str(control), "--metrics", f"{HOST}:{metrics}",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,
                preexec_fn=_limit_descriptors,
            )
        try:
            if _wait_listening(proc, log_path):
                maps = Path(f"/proc/{proc.pid}/maps").read_text()
                assert ("uvloop" in maps) == (case == "asyncio-uvloop"), "wrong event loop"
                yield Daemon(proc, port, control, metrics, log_path)
                assert proc.poll() is None, f"the daemon exited:\n{_log_text(log_path)[-3000:]}"
                return
        finally:
            _stop(proc)
    pytest.fail(f"the {case} daemon did not start:\n{_log_text(log_path)[-3000:]}")


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    control: Path
    metrics: int
    log: Path


def _wait_listening(proc: subprocess.Popen[bytes], log_path: Path) -> bool:
    def ready() -> bool:
        return "relay listening on" in _log_text(log_path) or proc.poll() is not None

    return wait_until(ready, 20.0) and proc.poll() is None


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _refusals(log_path: Path) -> dict[str, int]:
    text = _log_text(log_path)
    return {listener: text.count(line) for listener, line in REFUSING.items()}


def _lines(log_path: Path) -> list[str]:
    """Log lines but the members' joins (the held connections it accepted authenticate)."""
    return [line for line in _log_text(log_path).splitlines() if "authenticated as" not in line]


def _wait_on_control(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(str(path))  # waits in the backlog
    sock.sendall(b'{"cmd": "status"}\n')
    return sock


def _wait_on_metrics(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=5.0)  # waits in the backlog
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: candy\r\n\r\n")
    return sock


def _reply(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    with sock:
        while end not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def _relay(sender: RawMember, src: IPv4Address, receiver: RawMember, dst: IPv4Address) -> None:
    """One FORWARD from ``sender`` reaches ``receiver`` through the relay."""
    packet = icmp_packet(src, dst, seq=int(time.monotonic() * 1000) & 0xFFFF)
    sender.send(msg_forward(packet))
    opcode, payload = receiver.recv_frame(5.0)
    assert (opcode, payload) == (0x2, msg_forward(packet))


def _open_held(port: int) -> list[socket.socket]:
    """HELD connections; each one that connects sends an upgrade and a handshake at once."""
    held: list[socket.socket] = []
    for _ in range(HELD):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        held.append(sock)
        sock.setblocking(False)
        sock.connect_ex((HOST, port))
    waiting = {sock.fileno(): sock for sock in held}
    poller = select.poll()
    for fd in waiting:
        poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + 5.0
    n = 0
    while waiting and time.monotonic() < deadline:
        for fd, _event in poller.poll(100):
            poller.unregister(fd)
            sock = waiting.pop(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                n += 1
                ip = IPv4Address(int(IPv4Address("10.99.1.0")) + n)
                with contextlib.suppress(OSError):  # a few hundred bytes: they fit the buffer
                    sock.send(upgrade_request(port) + handshake(PASSWORD, ip))
    return held


@pytest.mark.slow
def test_out_of_descriptors_the_relay_serves_its_members_logs_rarely_and_recovers(
    daemon: Daemon,
) -> None:
    pid, port = daemon.proc.pid, daemon.port
    members: list[RawMember] = []
    held: list[socket.socket] = []
    try:
        a = RawMember.join(port, PASSWORD, A)
        members.append(a)
        b = RawMember.join(port, PASSWORD, B)
        members.append(b)
        _relay(a, A, b, B)
        calm_fds = _fds(pid)

        held = _open_held(port)
        assert wait_until(lambda: _fds(pid) >= LIMIT - 4, 15.0), "never out of descriptors"
        assert wait_until(lambda: _refusals(daemon.log)["relay"] > 0, 5.0), "nothing logged"
        held.append(_wait_on_control(daemon.control))
        held.append(_wait_on_metrics(daemon.metrics))
        assert wait_until(lambda: min(_refusals(daemon.log).values()) > 0, 5.0), _refusals(
            daemon.log
        )

        lines, refused = len(_lines(daemon.log)), _refusals(daemon.log)
        cpu, start = _cpu_seconds(pid), time.monotonic()
        time.sleep(WINDOW)
        used, elapsed = _cpu_seconds(pid) - cpu, time.monotonic() - start
        logged = _lines(daemon.log)[lines:]
        per_listener = {k: n - refused[k] for k, n in _refusals(daemon.log).items()}
        print(f"out of descriptors: {used:.2f} s of CPU in {elapsed:.1f} s, {per_listener}")
        assert used <= CPU_SHARE * elapsed, f"{used:.2f} s of CPU in {elapsed:.1f} s: spinning"
        assert max(per_listener.values()) <= elapsed + 1, per_listener  # a line a second
        others = [line for line in logged if not any(r in line for r in REFUSING.values())]
        assert not others, "\n".join(others[-10:])

        _relay(a, A, b, B)  # the members it has are served meanwhile
        _relay(b, B, a, A)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as newcomer:
            newcomer.settimeout(1.5)
            reply = b""
            with contextlib.suppress(TimeoutError, ConnectionError):  # waits in the backlog
                newcomer.connect((HOST, port))
                newcomer.sendall(upgrade_request(port))
                reply = newcomer.recv(4096)
            assert b" 101 " not in reply, "a new connection was served"

        for sock in held:
            sock.close()
        held.clear()
        deadline = time.monotonic() + 20.0
        while True:  # the backlog drains (those connections were closed), then C gets in
            try:
                c = RawMember.join(port, PASSWORD, C, timeout=2.0)
                break
            except (OSError, AssertionError):
                if time.monotonic() > deadline:
                    raise
        members.append(c)
        _relay(a, A, c, C)
        _relay(c, C, b, B)
        assert json.loads(_reply(_wait_on_control(daemon.control), b"\n"))["role"] == "server"
        status_line = _reply(_wait_on_metrics(daemon.metrics), b"\r\n").split(b"\r\n")[0]
        assert status_line.startswith(b"HTTP/1.") and b" 200 " in status_line, status_line
        assert wait_until(lambda: _fds(pid) <= calm_fds + 1, 10.0), _fds(pid)
    finally:
        for sock in held:
            sock.close()
        for member in members:
            member.close()


# --- the pieces, without a daemon -------------------------------------------------------------
def test_log_every_writes_one_line_a_second_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    limiter = LogEvery(logging.getLogger("candy.test"), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "candy.test"):
        assert limiter.note("out of descriptors")
        for _ in range(999):
            now[0] += 0.0005
            assert not limiter.note("out of descriptors")
        now[0] = 101.0
        assert limiter.note("out of descriptors")
    assert [r.getMessage() for r in caplog.records] == [
        "out of descriptors (1 time(s) since the last report)",
        "out of descriptors (1000 time(s) since the last report)",
    ]


class _Exhausted:
    """Stands in for a listening socket out of descriptors: ``accept`` fails with EMFILE."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.calls = 0

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")


def test_acceptor_backs_off_while_accept_fails_and_never_retries_in_the_same_wake_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        acceptor = Acceptor(loop, asyncio.Protocol, None, logging.getLogger("candy.test"))
        await acceptor.listen(HOST, 0)
        try:
            listener = _Exhausted(acceptor.sockets[0])
            delays = []
            for _ in range(6):
                acceptor._accept(listener)  # type: ignore[arg-type]
                handle = acceptor._retries.pop(listener)  # type: ignore[call-overload]
                delays.append(round(handle.when() - loop.time(), 1))
                handle.cancel()
            assert listener.calls == 6  # one failed accept per wake-up, not a hundred
            return delays
        finally:
            acceptor.close()

    with caplog.at_level(logging.WARNING, "candy.test"):
        delays = asyncio.run(scenario())
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert (AcceptBackoff.FIRST, AcceptBackoff.MOST) == (0.1, 1.0)
    assert len(caplog.records) == 1  # the other five fell within the same second
