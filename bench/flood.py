"""Connection flood against the relay: do honest clients still join, does relaying go on?

Run as root from the repository root::

    python bench/flood.py [--runtime asyncio,gevent,threaded] [--seconds 10] [--rate 2000]

Topology (network namespaces from tests/netns.py's Lab; documentation ranges only): a router
namespace ``rt`` with three routed veth links, to ``srv`` (203.0.113.1: the relay daemon,
``python -m shells.cli -m server --runtime R`` on :8080), ``flood`` (198.51.100.66: the
flooder) and ``honest`` (192.0.2.2: the honest clients). Only routes between those three
/24s exist, so nothing leaves the lab; loopback sources are exempt from the relay's
per-source limits, which is why every client here comes from another namespace.

One run per runtime, on a common clock (``t0``), three phases: ``before`` (5 s), ``flood``
(``--seconds``) and ``after`` (3 s). Four processes besides the daemon, each this script
in a role (``--role``), each bounded in time and writing its raw figures to a JSON file:

* **flooder** (``flood`` namespace, only during the flood phase): opens ``--rate``
  connections per second with non-blocking sockets (at most ``--max-inflight`` at once, each
  given up after 3 s), half sending garbage instead of an HTTP request, half a WebSocket
  upgrade pipelined with VMAC+AUTH under a wrong password. It classifies every connection
  by what came back: nothing at all before the close (refused by the limiter), a 4xx
  (garbage rejected), a 101 then the close (wrong password rejected), or a connect failure.
* **relay** (``honest``): two raw clients A (10.99.0.2) and B (10.99.0.3) that joined before
  ``t0``; A offers 1400-byte FORWARDs to B at ``--relay-rate`` frames/s (20 000, i.e.
  about 225 Mbit/s; 0: as fast as the relay delivers them), never more than 256 in flight.
  B counts the bytes it receives; the frames/s relayed per phase, the worst half second and
  the longest gap between two deliveries come from there.
* **joiner** (``honest``): a sink client (10.99.0.250) joined at start; then, at fixed times
  (2 before, ``--joins`` spread over the flood, 2 after), a fresh client connects, upgrades,
  sends VMAC+AUTH and one FORWARD to the sink. **join time** = from the start of the TCP
  connect to the sink receiving that FORWARD, i.e. to the relay having authenticated it.
* this process samples from /proc every 0.2 s the daemon's utime+stime, RSS and time spent
  waiting for a CPU (schedstat, all threads), the machine's busy and softirq time, every
  0.5 s the relay's accept queue (``ss -ltn``), at the end the server namespace's TcpExt
  counters (listen overflows, SYN cookies), and reads the daemon's log afterwards (the
  limiter logs refusals at most once a second).

``--daemon-code DIR`` runs the daemon from another source tree (``git archive`` of another
commit), to compare shells under the same flood.

Prints two markdown tables and writes every raw figure to bench/results-flood.json (see
bench/FLOOD.md for what each column means). Every loop is bounded in count and time; the
namespaces and processes are removed even on failure or Ctrl-C (the lab's close(), also on
SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import errno
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(BENCH))

import rawws  # noqa: E402

from candy_core.wsframe import FrameError, FrameParser  # noqa: E402

RUNTIMES = ["asyncio", "gevent", "threaded"]
SERVER_IP, FLOOD_IP, HONEST_IP = "203.0.113.1", "198.51.100.66", "192.0.2.2"
PORT = 8080
DHCP = "10.99.0.0/24"
VPN_A, VPN_B = IPv4Address("10.99.0.2"), IPv4Address("10.99.0.3")
SINK_IP = IPv4Address("10.99.0.250")
JOIN_BASE = int(IPv4Address("10.99.0.100"))
FLOOD_VPN_IP = IPv4Address("10.99.0.200")
WRONG_PASSWORD = "not-the-password"
ENV = {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}

BEFORE_S, AFTER_S = 5.0, 3.0
#: Seconds between starting the roles and t0 (interpreter start-up, the honest clients join).
SETUP_S = 4.0
JOIN_TIMEOUT = 10.0
JOIN_TARGET_S = 2.0
#: A flood connection is given up (aborted) this long after its connect started.
FLOOD_CONN_TIMEOUT = 3.0
FRAME_SIZE = 1400
RELAYED_FRAME = FRAME_SIZE + rawws.RELAYED_OVERHEAD  # bytes B receives per relayed FORWARD
WINDOW, BATCH = 256, 32
#: Frames/s A offers to B by default: a steady load well within one core's relay capacity.
RELAY_RATE = 20000.0
#: Gaps between two deliveries to B longer than this are recorded (stalls).
GAP_RECORDED = 0.05
SAMPLE_EVERY = 0.2
REFUSED_RE = re.compile(r"refused (\d+) connection\(s\) in the last second")


def log(text: str) -> None:
    print(f"[flood {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def mono_at(wall_t: float) -> float:
    """The monotonic time of a wall-clock instant (roles share ``t0`` as a wall time)."""
    return time.monotonic() + (wall_t - time.time())


# =============================================================================================
# role: flooder (flood namespace)
# =============================================================================================
class _FloodConn:
    __slots__ = ("connected", "got", "head", "kind", "opened", "sock")

    def __init__(self, sock: socket.socket, kind: str, opened: float) -> None:
        self.sock = sock
        self.kind = kind  # "garbage" or "ws"
        self.opened = opened
        self.connected = False
        self.got = 0
        self.head = b""


def _garbage_payloads() -> list[bytes]:
    return [
        b"\x16\x03\x01\x02\x00\x01" + os.urandom(40) + b"\r\n\r\n",  # a TLS hello on plain HTTP
        b"GARBAGE \x00\x7f /?" + os.urandom(24).hex().encode() + b" HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost " + os.urandom(8).hex().encode() + b"\r\n\r\n",  # no colon
        os.urandom(64) + b"\r\n\r\n",
    ]


def _ws_payloads(n: int = 64) -> list[bytes]:
    """Upgrade request pipelined with VMAC+AUTH under a wrong password (fresh timestamps)."""
    return [
        rawws.new_upgrade(PORT, SERVER_IP).request()
        + rawws.handshake_frames(FLOOD_VPN_IP, password=WRONG_PASSWORD)
        for _ in range(n)
    ]


def _classify(conn: _FloodConn, how: str) -> str:
    if not conn.connected:
        return f"connect_{how}"
    if conn.got == 0:
        return "refused" if how in ("eof", "reset") else f"no_answer_{how}"
    if conn.kind == "garbage":
        return "rejected_http" if conn.head.startswith(b"HTTP/1.1 4") else "other"
    return "rejected_auth" if conn.head.startswith(b"HTTP/1.1 101") else "other"


def role_flooder(args: argparse.Namespace) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, args.max_inflight + 256)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    target = (SERVER_IP, PORT)
    sel = selectors.EpollSelector()
    conns: dict[int, _FloodConn] = {}
    outcomes: Counter[str] = Counter()
    per_second: list[Counter[str]] = [Counter() for _ in range(int(args.seconds) + 5)]
    garbage, ws = _garbage_payloads(), _ws_payloads()
    ws_made = time.monotonic()
    start = mono_at(args.t0 + args.before)
    end = start + args.seconds
    hard_end = end + FLOOD_CONN_TIMEOUT + 1.0
    opened = skipped = max_inflight = 0
    credit = 0.0
    cpu0 = time.process_time()

    def finish(fd: int, conn: _FloodConn, how: str) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            sel.unregister(fd)
        conn.sock.close()
        del conns[fd]
        outcome = _classify(conn, how)
        outcomes[outcome] += 1
        second = int(conn.opened - start)
        if 0 <= second < len(per_second):
            per_second[second][outcome] += 1

    while time.monotonic() < start:
        time.sleep(min(0.05, max(0.0, start - time.monotonic())))
    last = time.monotonic()
    next_sweep = last + 0.1
    while True:
        now = time.monotonic()
        if now >= hard_end or (now >= end and not conns):
            break
        if now < end:
            credit = min(credit + (now - last) * args.rate, args.rate * 0.05)
            last = now
            if now - ws_made > 5.0:
                ws, ws_made = _ws_payloads(), now
            while credit >= 1.0:
                credit -= 1.0
                if len(conns) >= args.max_inflight:
                    skipped += 1
                    continue
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                kind = "garbage" if opened % 2 == 0 else "ws"
                conn = _FloodConn(sock, kind, now)
                opened += 1
                fd = sock.fileno()
                conns[fd] = conn
                err = sock.connect_ex(target)
                if err not in (0, errno.EINPROGRESS):
                    conn.head = errno.errorcode.get(err, str(err)).encode()
                    finish(fd, conn, "failed")
                    continue
                sel.register(fd, selectors.EVENT_WRITE)
            max_inflight = max(max_inflight, len(conns))
        for key, _mask in sel.select(timeout=0.002):
            fd = key.fd
            conn = conns.get(fd)
            if conn is None:
                continue
            if not conn.connected:
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(fd, conn, "failed")
                    continue
                conn.connected = True
                payload = (
                    garbage[opened % len(garbage)] if conn.kind == "garbage" else ws[fd % len(ws)]
                )
                try:
                    conn.sock.send(payload)
                except OSError:
                    finish(fd, conn, "reset")
                    continue
                sel.modify(fd, selectors.EVENT_READ)
                continue
            try:
                data = conn.sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                finish(fd, conn, "reset")
                continue
            if not data:
                finish(fd, conn, "eof")
                continue
            if conn.got < 16:
                conn.head += data[: 16 - conn.got]
            conn.got += len(data)
        if now >= next_sweep:
            next_sweep = now + 0.1
            for fd, conn in list(conns.items()):
                if now - conn.opened > FLOOD_CONN_TIMEOUT:
                    finish(fd, conn, "timeout")
    for fd, conn in list(conns.items()):
        finish(fd, conn, "timeout")
    sel.close()
    wall = time.monotonic() - start
    return {
        "opened": opened,
        "skipped_over_inflight_cap": skipped,
        "seconds": round(min(wall, args.seconds), 3),
        "opened_per_s": opened / args.seconds,
        "max_inflight": max_inflight,
        "outcomes": dict(outcomes),
        "per_second": [dict(c) for c in per_second if c],
        "cpu_s": round(time.process_time() - cpu0, 3),
    }


# =============================================================================================
# roles on the honest side: raw clients
# =============================================================================================
class RawClient(asyncio.Protocol):
    """Upgrade, then VMAC+AUTH (plus ``extra``) in one write; ``ready`` once they are sent."""

    def __init__(self, ip: IPv4Address, extra: bytes = b"") -> None:
        self.upgrade = rawws.new_upgrade(PORT, SERVER_IP)
        self.ip = ip
        self.extra = extra
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.upgraded = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(self.upgrade.request())

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self.stream(data)
            return
        result = self.upgrade.receive(data)
        if result.rejected:
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(f"upgrade rejected: {result.rejected}"))
            return
        if result.accepted:
            self.upgraded = True
            assert self.transport is not None
            self.transport.write(rawws.handshake_frames(self.ip) + self.extra)
            if not self.ready.done():
                self.ready.set_result(None)
            if result.trailing:
                self.stream(result.trailing)

    def stream(self, data: bytes) -> None:
        """Server bytes after the upgrade."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_client(client: RawClient, timeout: float) -> RawClient:
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.create_connection(lambda: client, SERVER_IP, PORT), timeout)
    await asyncio.wait_for(client.ready, timeout)
    return client


# --- role: relay --------------------------------------------------------------------------------
class Receiver(RawClient):
    """B: counts relayed bytes (only A's fixed-size FORWARDs reach it) and delivery gaps."""

    def __init__(self, ip: IPv4Address, clock0: float, on_frames: Any) -> None:
        super().__init__(ip)
        self.bytes = 0
        self.clock0 = clock0
        self.last = 0.0
        self.gaps: list[tuple[float, float]] = []
        self.on_frames = on_frames

    def stream(self, data: bytes) -> None:
        now = time.monotonic()
        if self.last and now - self.last > GAP_RECORDED and len(self.gaps) < 10000:
            self.gaps.append((round(self.last - self.clock0, 3), round(now - self.last, 3)))
        self.last = now
        self.bytes += len(data)
        self.on_frames()


async def relay_main(args: argparse.Namespace) -> dict:
    clock0 = mono_at(args.t0)
    total = args.before + args.seconds + args.after
    batch = rawws.forward_frame(VPN_A, VPN_B, FRAME_SIZE) * BATCH
    sent = 0
    base = 0
    paced = args.relay_rate > 0
    credit = 0.0

    def frames() -> int:
        return b.bytes // RELAYED_FRAME - base

    def pump() -> None:
        nonlocal sent, credit
        if a.transport is None or a.transport.is_closing():
            return
        while sent - frames() <= WINDOW - BATCH and (not paced or credit >= BATCH):
            a.transport.write(batch)
            sent += BATCH
            if paced:
                credit -= BATCH

    b = Receiver(VPN_B, clock0, lambda: pump() if started else None)
    a = RawClient(VPN_A)
    started = False
    await open_client(b, 10.0)
    await asyncio.sleep(0.2)  # B's AUTH before A's first FORWARD
    await open_client(a, 10.0)
    one = rawws.forward_frame(VPN_A, VPN_B, FRAME_SIZE)
    for _ in range(100):  # until a FORWARD from A reaches B: both authenticated
        a.transport.write(one)  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        if b.bytes:
            break
    else:
        raise RuntimeError("the relay never delivered A's FORWARD to B")
    await asyncio.sleep(0.3)  # let the probes drain
    base = b.bytes // RELAYED_FRAME
    bins: list[tuple[float, int]] = []
    end = clock0 + total
    started = True
    tick = 0.01
    last = time.monotonic()
    next_bin = time.monotonic()
    while (now := time.monotonic()) < end:
        if paced:
            credit = min(credit + (now - last) * args.relay_rate, float(WINDOW))
        last = now
        pump()
        if now >= next_bin:
            bins.append((round(now - clock0, 3), frames()))
            next_bin += 0.1
        if a.lost or b.lost:
            break
        await asyncio.sleep(tick)
    bins.append((round(time.monotonic() - clock0, 3), frames()))
    a.close()
    b.close()
    return {
        "bins": bins,
        "gaps": b.gaps,
        "sent": sent,
        "received": frames(),
        "lost_connection": a.lost or b.lost,
        "relay_rate": args.relay_rate,
        "frame_size": FRAME_SIZE,
        "window": WINDOW,
        "cpu_s": round(time.process_time(), 3),
    }


# --- role: joiner -------------------------------------------------------------------------------
class Sink(RawClient):
    """Resolves a waiter when a FORWARD from a given source address arrives."""

    def __init__(self, ip: IPv4Address) -> None:
        super().__init__(ip)
        self.parser = FrameParser(1 << 20, expect_mask=False)
        self.waiters: dict[bytes, asyncio.Future[float]] = {}

    def expect(self, src: IPv4Address) -> asyncio.Future[float]:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[src.packed] = fut
        return fut

    def stream(self, data: bytes) -> None:
        now = time.perf_counter()
        try:
            frames = self.parser.feed(data)
        except FrameError:
            return
        for frame in frames:
            p = frame.payload
            if p[:1] == b"\x01" and len(p) >= 21:
                fut = self.waiters.pop(p[13:17], None)
                if fut is not None and not fut.done():
                    fut.set_result(now)


async def one_join(sink: Sink, i: int, at: float, phase: str) -> dict:
    ip = IPv4Address(JOIN_BASE + i)
    result: dict[str, Any] = {"i": i, "at": round(at, 3), "phase": phase}
    arrived = sink.expect(ip)
    client = RawClient(ip, rawws.forward_frame(ip, SINK_IP, 28))
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    deadline = start + JOIN_TIMEOUT
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: client, SERVER_IP, PORT), JOIN_TIMEOUT
        )
        result["connect_s"] = round(time.perf_counter() - start, 4)
        await asyncio.wait_for(client.ready, max(0.01, deadline - time.perf_counter()))
        result["upgraded_s"] = round(time.perf_counter() - start, 4)
        done = await asyncio.wait_for(arrived, max(0.01, deadline - time.perf_counter()))
        result["join_s"] = round(done - start, 4)
    except (TimeoutError, OSError, ConnectionError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
        sink.waiters.pop(ip.packed, None)
    return result


async def joiner_main(args: argparse.Namespace) -> dict:
    clock0 = mono_at(args.t0)
    sink = Sink(SINK_IP)
    await open_client(sink, 10.0)
    b, s, a = args.before, args.seconds, args.after
    schedule = [(b * f, "before") for f in (0.3, 0.7)]
    schedule += [(b + s * (k + 0.5) / args.joins, "flood") for k in range(args.joins)]
    schedule += [(b + s + a * f, "after") for f in (0.3, 0.7)]
    tasks = []
    for i, (at, phase) in enumerate(schedule):
        delay = clock0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one_join(sink, i, at, phase)))
    joins = await asyncio.wait_for(asyncio.gather(*tasks), JOIN_TIMEOUT + 5.0)
    sink_lost = sink.lost
    sink.close()
    return {"joins": list(joins), "sink_lost": sink_lost}


def role_main(args: argparse.Namespace) -> int:
    try:
        if args.role == "flooder":
            out = role_flooder(args)
        else:
            import uvloop

            main = relay_main if args.role == "relay" else joiner_main
            out = uvloop.run(main(args))
    except Exception as exc:  # reported to the orchestrator, which shows it
        out = {"error": f"{type(exc).__name__}: {exc}"}
    Path(args.out).write_text(json.dumps(out) + "\n")
    return 0 if "error" not in out else 1


# =============================================================================================
# the orchestrator (root namespace)
# =============================================================================================
def proc_sample(pid: int) -> tuple[float, int, float, float] | None:
    """(cpu_s, rss_kib, run_s, runqueue_wait_s) of a process, all its threads summed."""
    try:
        run = wait = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
                run += int(fields[0])
                wait += int(fields[1])
        return rawws.cpu_seconds(pid), rawws.rss_kib(pid), run / 1e9, wait / 1e9
    except (OSError, IndexError, ValueError):
        return None


def system_sample() -> tuple[float, float, float]:
    """Machine-wide (busy_s, softirq_s, idle_s) over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / rawws.CLK_TCK, values[6] / rawws.CLK_TCK, idle / rawws.CLK_TCK


def listen_queue(lab: Any, ns: str) -> tuple[int, int] | None:
    """(connections waiting in the accept queue, listen backlog) of the relay's socket."""
    try:
        out = lab.run(ns, "ss", "-ltnH", f"sport = :{PORT}", timeout=3).stdout.split()
        return int(out[1]), int(out[2])
    except Exception:
        return None


def per_second(samples: list[tuple], index: int, t_from: float, t_to: float) -> float | None:
    """Growth per second of ``samples[i][index]`` between two times, in % (t is index 0)."""
    inside = [s for s in samples if t_from <= s[0] <= t_to]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] <= 0:
        return None
    growth = inside[-1][index] - inside[0][index]
    return round(growth / (inside[-1][0] - inside[0][0]) * 100, 1)


def netstat(lab: Any, ns: str) -> dict[str, int]:
    """The namespace's TcpExt counters about listen queues and SYN cookies."""
    wanted = [
        "ListenOverflows",
        "ListenDrops",
        "SyncookiesSent",
        "SyncookiesRecv",
        "SyncookiesFailed",
        "TCPReqQFullDrop",
        "TCPReqQFullDoCookies",
        "TCPBacklogDrop",
        "TCPAbortOnData",
    ]
    try:
        lines = lab.run(ns, "cat", "/proc/net/netstat", timeout=3).stdout.splitlines()
    except Exception:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {k: int(table[k]) for k in wanted if k in table}
    return {}


def relay_rates(relay: dict, before: float, seconds: float, after: float) -> dict:
    """Frames/s delivered to B in each phase (1 s of warm-up skipped, 0.5 s after a change)."""
    bins = relay.get("bins") or []
    windows = {
        "before": (1.0, before),
        "flood": (before, before + seconds),
        "after": (before + seconds + 0.5, before + seconds + after),
    }
    out: dict[str, Any] = {}
    for name, (lo, hi) in windows.items():
        inside = [b for b in bins if lo <= b[0] <= hi]
        if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
            out[name] = round((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]))
        else:
            out[name] = None
        gaps = [g for t, g in relay.get("gaps", []) if lo <= t < hi]
        out[f"{name}_longest_gap_s"] = max(gaps, default=0.0)
        # the worst 0.5 s of the phase: does relaying ever stop?
        worst = None
        for j, (t, n) in enumerate(inside):
            later = [b for b in inside[j:] if b[0] >= t + 0.5]
            if later:
                rate = (later[0][1] - n) / (later[0][0] - t)
                worst = rate if worst is None else min(worst, rate)
        out[f"{name}_worst_half_second"] = None if worst is None else round(worst)
    if out.get("before") and out.get("flood") is not None:
        out["flood_vs_before"] = round(out["flood"] / out["before"], 3)
    return out


def read_server_log(path: Path) -> dict:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    lines = text.splitlines()
    return {
        "lines": len(lines),
        "bytes": len(text.encode()),
        "refused_logged": sum(int(m.group(1)) for m in REFUSED_RE.finditer(text)),
        "refusal_log_lines": sum(1 for line in lines if REFUSED_RE.search(line)),
        "closing_lines": sum(1 for line in lines if ": closing: " in line),
        "rejected_http_lines": sum(1 for line in lines if "rejected HTTP request" in line),
        "authenticated_lines": sum(1 for line in lines if ": authenticated as " in line),
        "errors": [line for line in lines if "[ERROR]" in line or "Traceback" in line][:20],
        "tail": lines[-15:],
    }


def spawn_role(
    lab: Any, ns: str, role: str, args: argparse.Namespace, t0: float, out: Path, log_path: Path
) -> subprocess.Popen:
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--role", role, "--out", str(out),
        "--t0", repr(t0), "--before", str(args.before), "--seconds", str(args.seconds),
        "--after", str(args.after), "--rate", str(args.rate), "--joins", str(args.joins),
        "--max-inflight", str(args.max_inflight), "--relay-rate", str(args.relay_rate),
    ]  # fmt: skip
    return lab.spawn(ns, argv, env=ENV, log_path=log_path, cwd=REPO_ROOT)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"no result ({exc})"}


def run_runtime(runtime: str, args: argparse.Namespace, logs: Path) -> dict:
    from netns import Lab

    result: dict[str, Any] = {"runtime": runtime}
    with Lab("fl") as lab:
        rt, srv = lab.add_ns("rt"), lab.add_ns("srv")
        fl, hon = lab.add_ns("flood"), lab.add_ns("honest")
        lab.sysctl(rt, "net.ipv4.ip_forward", 1)
        for ns, net, addr in (
            (srv, "203.0.113", SERVER_IP),
            (fl, "198.51.100", FLOOD_IP),
            (hon, "192.0.2", HONEST_IP),
        ):
            lab.link(rt, f"{net}.254/24", ns, f"{addr}/24")
        for ns, gw in ((srv, "203.0.113.254"), (fl, "198.51.100.254"), (hon, "192.0.2.254")):
            for net in ("203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24"):
                if not gw.startswith(net.rsplit(".", 1)[0] + "."):
                    lab.route(ns, net, gw)
        lab.sysctl(fl, "net.ipv4.ip_local_port_range", "1024 65000")
        lab.run(hon, "ping", "-c", "1", "-W", "2", SERVER_IP)
        lab.run(fl, "ping", "-c", "1", "-W", "2", SERVER_IP)

        server_log = logs / f"server-{runtime}.log"
        argv = [
            sys.executable, "-m", "shells.cli", "-m", "server", "-w", f"ws://{SERVER_IP}:{PORT}",
            "-p", rawws.PASSWORD, "-d", DHCP, "--runtime", runtime,
        ]  # fmt: skip
        code = Path(args.daemon_code or REPO_ROOT)
        env = {**ENV, "PYTHONPATH": str(code)}
        server = lab.spawn(srv, argv, env=env, log_path=server_log, cwd=code)
        if not rawws.wait_for_text(server_log, rawws.LISTENING, server, 20.0):
            raise RuntimeError(f"{runtime} server did not start:\n{lab.logs()}")
        time.sleep(0.5)
        rss_empty = rawws.rss_kib(server.pid)

        t0 = time.time() + SETUP_S
        outs = {role: logs / f"{role}-{runtime}.json" for role in ("flooder", "relay", "joiner")}
        procs = {
            role: spawn_role(lab, ns, role, args, t0, outs[role], logs / f"{role}-{runtime}.log")
            for role, ns in (("relay", hon), ("joiner", hon), ("flooder", fl))
        }
        total = args.before + args.seconds + args.after
        samples: dict[str, list[tuple]] = {k: [] for k in ("server", *procs)}
        system: list[tuple] = []
        queue: list[tuple] = []
        pids = {"server": server.pid, **{k: p.pid for k, p in procs.items()}}
        t0_mono = mono_at(t0)
        end = t0_mono + total + 0.5
        log(f"{runtime}: t0 in {SETUP_S:g} s, run ends {total + SETUP_S:.0f} s from now")
        next_sample = next_queue = time.monotonic()
        while (now := time.monotonic()) < end:
            t = round(now - t0_mono, 3)
            for name, pid in pids.items():
                reading = proc_sample(pid)
                if reading is not None:
                    samples[name].append((t, *reading))
            system.append((t, *system_sample()))
            if now >= next_queue:
                next_queue += 0.5
                q = listen_queue(lab, srv)
                if q is not None:
                    queue.append((t, *q))
            if server.poll() is not None:
                break
            next_sample += SAMPLE_EVERY
            time.sleep(max(0.0, next_sample - time.monotonic()))
        for name, proc in procs.items():
            try:
                proc.wait(JOIN_TIMEOUT + FLOOD_CONN_TIMEOUT + 5.0)
            except subprocess.TimeoutExpired:
                log(f"{runtime}: the {name} role did not finish in time")
        server_alive = server.poll() is None
        rss_end = rawws.rss_kib(server.pid) if server_alive else None
        b, s, a = args.before, args.seconds, args.after
        phases = {"before": (0.0, b), "flood": (b, b + s), "after": (b + s, b + s + a)}
        srv_samples = samples["server"]

        def by_phase(rows: list[tuple], index: int) -> dict[str, float | None]:
            return {name: per_second(rows, index, lo, hi) for name, (lo, hi) in phases.items()}

        def queue_max(lo: float, hi: float) -> int | None:
            inside = [q[1] for q in queue if lo <= q[0] < hi]
            return max(inside) if inside else None

        result.update(
            server_alive=server_alive,
            server_cpu_pct=by_phase(srv_samples, 1),
            server_runqueue_wait_pct=by_phase(srv_samples, 4),
            server_rss_mib={
                "empty": round(rss_empty / 1024, 1),
                "max": round(max((x[2] for x in srv_samples), default=0) / 1024, 1),
                "end": None if rss_end is None else round(rss_end / 1024, 1),
            },
            roles_cpu_pct={name: by_phase(samples[name], 1) for name in procs},
            machine_busy_pct=by_phase(system, 1),
            machine_softirq_pct=by_phase(system, 2),
            listen_queue={
                "backlog": queue[0][2] if queue else None,
                **{f"max_{name}": queue_max(lo, hi) for name, (lo, hi) in phases.items()},
                "samples": queue,
            },
            netstat=netstat(lab, srv),
            server_timeline=[(t, round(c, 2), r, round(w, 3)) for t, c, r, _, w in srv_samples],
            flooder=read_json(outs["flooder"]),
            relay=read_json(outs["relay"]),
            joiner=read_json(outs["joiner"]),
        )
        rawws.stop_process(server)
        result["server_log"] = read_server_log(server_log)
        for name, proc in procs.items():
            if proc.returncode not in (0, None) or "error" in result[name]:
                result[name]["log_tail"] = lab.log(proc)[-3000:]
    result["relay_rates"] = relay_rates(result["relay"], args.before, args.seconds, args.after)
    joins = result["joiner"].get("joins", [])
    result["join_summary"] = {
        phase: summarize_joins([j for j in joins if j["phase"] == phase])
        for phase in ("before", "flood", "after")
    }
    return result


def summarize_joins(joins: list[dict]) -> dict:
    """p50 and max of the join times; a join that never completed counts as infinitely long."""
    times = [j.get("join_s", float("inf")) for j in joins]
    connects = [j["connect_s"] for j in joins if "connect_s" in j]
    ok = [t for t in times if t != float("inf")]

    def finite(value: float | None) -> float | None:  # JSON has no infinity: None
        return None if value is None or value == float("inf") else value

    return {
        "n": len(joins),
        "ok": len(ok),
        "p50_s": finite(statistics.median(times) if times else None),
        "max_s": finite(max(times) if times else None),
        "max_connect_s": max(connects) if connects else None,
        "within_target": bool(times) and max(times) <= JOIN_TARGET_S,
    }


# --- report -----------------------------------------------------------------------------------
def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def ms(value: float | None, none: str = "-") -> str:
    """Milliseconds (``none`` for None: a join that never completed, a gap not recorded)."""
    if not value:
        return none
    return f"{value * 1e3:.0f} ms" if value >= 0.0095 else f"{value * 1e3:.1f} ms"


def markdown(results: dict) -> str:
    """Two tables: what an honest user sees, then why (queues, CPU, the flood's fate)."""
    main = [
        "| runtime | joins in flood (ok/n) | join p50 / max in flood | join p50 before | "
        "relay frames/s before → flood (ratio) | worst 0.5 s in flood | longest relay gap "
        "in flood | server CPU % before → flood | server RSS MiB (max) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    why = [
        "| runtime | flood conns/s | refused: flooder saw / server logged | rejected after "
        "parsing | flood conns that timed out | accept queue max (backlog) | SYNs dropped "
        "(ListenOverflows) | server waiting for a CPU % (flood) | machine busy % of 200 (flood) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    never = f"> {JOIN_TIMEOUT:g} s"
    for r in results["runs"]:
        if "relay_rates" not in r:
            main.append(f"| {r['runtime']} | error: {r.get('error')} |" + " |" * 7)
            continue
        jf, jb = r["join_summary"]["flood"], r["join_summary"]["before"]
        rr = r["relay_rates"]
        fo = r["flooder"].get("outcomes", {})
        cpu = r["server_cpu_pct"]
        main.append(
            f"| {r['runtime']} | {jf['ok']}/{jf['n']} | {ms(jf['p50_s'], never)} / "
            f"{ms(jf['max_s'], never)} | {ms(jb['p50_s'], never)} | "
            f"{fmt(rr.get('before'), ',')} → {fmt(rr.get('flood'), ',')} "
            f"({fmt(rr.get('flood_vs_before'), '.2f')}) | "
            f"{fmt(rr.get('flood_worst_half_second'), ',')} | "
            f"{ms(rr.get('flood_longest_gap_s'), f'< {GAP_RECORDED * 1e3:.0f} ms')} | "
            f"{fmt(cpu['before'])} → {fmt(cpu['flood'])} | "
            f"{fmt(r['server_rss_mib']['max'])} |"
        )
        rejected = fo.get("rejected_http", 0) + fo.get("rejected_auth", 0)
        timed_out = sum(n for k, n in fo.items() if k.endswith("timeout"))
        q = r["listen_queue"]
        why.append(
            f"| {r['runtime']} | {fmt(r['flooder'].get('opened_per_s'), '.0f')} | "
            f"{fo.get('refused', 0)} / {r['server_log'].get('refused_logged', '-')} | "
            f"{rejected} | {timed_out} | {fmt(q.get('max_flood'))} ({fmt(q.get('backlog'))}) | "
            f"{fmt(r['netstat'].get('ListenOverflows'))} | "
            f"{fmt(r['server_runqueue_wait_pct']['flood'])} | "
            f"{fmt(r['machine_busy_pct']['flood'])} |"
        )
    return "\n".join(main) + "\n\n" + "\n".join(why)


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "candy_core", "shells"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", "--runtimes", default=",".join(RUNTIMES), help="comma-separated")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the flood")
    p.add_argument("--rate", type=float, default=2000.0, help="flood connections per second")
    p.add_argument("--joins", type=int, default=5, help="honest joins during the flood")
    p.add_argument("--max-inflight", type=int, default=4000, help="flood connections open at most")
    p.add_argument(
        "--relay-rate", type=float, default=RELAY_RATE,
        help="frames/s A offers to B, 256 in flight at most (0: as fast as the relay delivers)",
    )  # fmt: skip
    p.add_argument("--before", type=float, default=BEFORE_S, help=argparse.SUPPRESS)
    p.add_argument("--after", type=float, default=AFTER_S, help=argparse.SUPPRESS)
    p.add_argument("--json", default=str(BENCH / "results-flood.json"), help="output file")
    p.add_argument(
        "--daemon-code", metavar="DIR",
        help="run the daemon from this source tree (e.g. `git archive` of another commit)",
    )  # fmt: skip
    p.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs (path printed)")
    p.add_argument("--role", choices=["flooder", "relay", "joiner"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.runtime = [r.strip() for r in args.runtime.split(",") if r.strip()]
    unknown = set(args.runtime) - set(RUNTIMES)
    if unknown:
        p.error(f"unknown runtime(s): {', '.join(sorted(unknown))}")
    if not 1 <= args.seconds <= 120 or not 1 <= args.rate <= 20000 or not 1 <= args.joins <= 50:
        p.error("--seconds 1..120, --rate 1..20000, --joins 1..50")
    if args.role and (args.out is None or args.t0 is None):
        p.error("--role needs --out and --t0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role:
        return role_main(args)
    from netns import have_netns_privileges

    ok, why = have_netns_privileges()
    if not ok:
        log(f"cannot run: {why}")
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the lab's close()

    signal.signal(signal.SIGTERM, on_term)
    logs = Path(tempfile.mkdtemp(prefix="candy-flood-"))
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "daemon_code": args.daemon_code or "this repository",
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg(),
        },
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "role", "out", "t0")},
        "runs": [],
    }
    started = time.monotonic()
    try:
        for runtime in args.runtime:
            log(f"{runtime}: setting up")
            try:
                results["runs"].append(run_runtime(runtime, args, logs))
            except Exception as exc:  # report the others; the lab is closed by now
                log(f"{runtime}: failed: {exc}")
                results["runs"].append(
                    {"runtime": runtime, "error": f"{type(exc).__name__}: {exc}"}
                )
    except KeyboardInterrupt:
        log("interrupted: the lab is torn down, no results written")
        return 130
    finally:
        if args.keep_logs:
            log(f"logs kept in {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    results["table"] = markdown(results)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(results["table"])
    log(f"wrote {args.json} after {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
