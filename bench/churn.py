"""Connect/handshake/close churn against each runtime's relay daemon: RSS, descriptors, threads.

Run from the repository root (no root needed; 127.0.0.1 only)::

    python bench/churn.py [--runtimes asyncio,asyncio-plain,gevent,threaded] [--cycles 10000]
                          [--warmup 1000] [--wave 250] [--settle 0]

Per runtime, one relay daemon (``python -m shells.cli -m server --runtime X``; ``asyncio`` is
on uvloop when it is installed, ``asyncio-plain`` blocks the uvloop import) and this process
as the load generator, with plain blocking sockets (bench/rawws.py: upgrade, masked VMAC and
AUTH, then a PING whose PONG shows the AUTH was handled). Members join in waves of ``--wave``
connections open at once, then all of them close; a cycle is one member's connect, handshake
and close. The daemon's VmRSS, descriptors and threads are read empty, after ``--warmup``
cycles and after ``--cycles`` more, and with ``--settle S`` once more S seconds later, after
one more join (the relay forgets handshake hashes 30 s old only when a handshake arrives).

What the relay keeps on purpose is its replay guard: the hashes of every AUTH and VMAC it
accepted in the last 30 s (about 130 bytes each, at most 65536 of each). "replay est." is
that for the joins of the last 30 s of the run.

Every wait is bounded; the daemons are stopped even when a run fails or is interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import rawws  # noqa: E402

from candy_core.wsframe import OP_PONG, FrameError, FrameParser  # noqa: E402

RUNTIMES = ["asyncio", "asyncio-plain", "gevent", "threaded"]
#: Bytes the replay guard keeps per remembered handshake hash (auth.ReplayGuard's docstring).
REPLAY_ENTRY = 130
REPLAY_WINDOW = 30.0
BASE = int(IPv4Address("10.99.0.0"))


def member_ip(i: int) -> IPv4Address:
    return IPv4Address(BASE + 1 + i % 65000)


def start_daemon(runtime: str, log_path: Path) -> tuple[subprocess.Popen, int]:
    """The relay daemon of ``runtime`` on 127.0.0.1; returns (process, port)."""
    prelude = "sys.modules['uvloop'] = None; " if runtime == "asyncio-plain" else ""
    code = f"import sys; {prelude}from shells.cli import main; sys.exit(main())"
    for _ in range(3):  # a free port may be taken between probing and binding
        port = rawws.free_port()
        argv = rawws.server_argv(runtime.removesuffix("-plain"), port, "10.99.0.0/16")
        argv[1:3] = ["-c", code]
        argv += ["--control", "none"]  # no socket in /run/candy, no clash with another daemon
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=rawws.daemon_env(),
                cwd=rawws.REPO_ROOT,
                start_new_session=True,
            )
        if rawws.wait_for_text(log_path, rawws.LISTENING, proc, 20.0):
            return proc, port
        rawws.stop_process(proc)
    raise RuntimeError(f"{runtime} daemon did not start:\n{log_path.read_text(errors='replace')}")


def join(port: int, ip: IPv4Address, timeout: float = 10.0) -> socket.socket:
    """Connect, upgrade, VMAC+AUTH, then wait for the PONG of a PING sent after them."""
    sock = rawws.blocking_join(port, ip, timeout)
    try:
        sock.sendall(rawws.ping_frame())
        parser = FrameParser(1 << 16, expect_mask=False)
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("no PONG from the server")
            data = sock.recv(4096)
            if not data:
                raise ConnectionError("the server closed the connection")
            if any(frame.opcode == OP_PONG for frame in parser.feed(data)):
                return sock
    except (OSError, FrameError):
        sock.close()
        raise


def snapshot(pid: int) -> dict[str, float]:
    return {
        "rss_mib": rawws.rss_kib(pid) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": rawws.thread_count(pid),
    }


def churn(port: int, first: int, count: int, wave: int, stamps: list[float]) -> None:
    """``count`` cycles in waves of ``wave``; appends each wave's end time per cycle."""
    for start in range(first, first + count, wave):
        socks: list[socket.socket] = []
        try:
            for i in range(start, min(start + wave, first + count)):
                socks.append(join(port, member_ip(i)))
        finally:
            for sock in socks:
                sock.close()
        stamps.extend([time.monotonic()] * len(socks))


def settled(pid: int, expected_fds: float, timeout: float = 10.0) -> None:
    """Wait (bounded) until the daemon has closed the connections of the last wave."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(os.listdir(f"/proc/{pid}/fd")) > expected_fds:
        time.sleep(0.05)
    time.sleep(0.5)


def run(runtime: str, args: argparse.Namespace, tmp: Path) -> dict:
    proc, port = start_daemon(runtime, tmp / f"churn-{runtime}.log")
    try:
        time.sleep(1.0)
        empty = snapshot(proc.pid)
        stamps: list[float] = []
        churn(port, 0, args.warmup, args.wave, stamps)
        settled(proc.pid, empty["fds"])
        warm = snapshot(proc.pid)
        start, cpu = time.monotonic(), rawws.cpu_seconds(proc.pid)
        churn(port, args.warmup, args.cycles, args.wave, stamps)
        seconds = time.monotonic() - start
        cpu = rawws.cpu_seconds(proc.pid) - cpu
        settled(proc.pid, empty["fds"])
        end = snapshot(proc.pid)
        recent = sum(t > stamps[-1] - REPLAY_WINDOW for t in stamps)
        result = {
            "runtime": runtime,
            "empty": empty,
            "warm": warm,
            "end": end,
            "cycles_per_s": args.cycles / seconds,
            "cpu_ms_per_cycle": cpu / args.cycles * 1e3,
            "replay_est_mib": 2 * min(recent, 65536) * REPLAY_ENTRY / 2**20,
        }
        if args.settle > 0:
            time.sleep(args.settle)
            join(port, member_ip(args.warmup + args.cycles)).close()
            settled(proc.pid, empty["fds"])
            result["settled"] = snapshot(proc.pid)
        if proc.poll() is not None:
            raise RuntimeError("the daemon exited")
        return result
    finally:
        rawws.stop_process(proc)


def report(results: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"{args.cycles} cycles after {args.warmup} warm-up cycles, waves of {args.wave} "
        "connections; RSS in MiB, fds and threads of the daemon"
    )
    settle = f" | after {args.settle:g} s" if args.settle > 0 else ""
    lines = [
        head,
        "",
        "| runtime | empty | warm | end | growth | replay est. | fds empty/end "
        f"| threads empty/end | cycles/s | daemon CPU ms/cycle{settle} |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if settle else ""),
    ]
    for r in results:
        e, w, z = r["empty"], r["warm"], r["end"]
        row = (
            f"| {r['runtime']} | {e['rss_mib']:.1f} | {w['rss_mib']:.1f} | {z['rss_mib']:.1f} "
            f"| {z['rss_mib'] - w['rss_mib']:+.1f} | {r['replay_est_mib']:.1f} "
            f"| {e['fds']}/{z['fds']} | {e['threads']}/{z['threads']} | {r['cycles_per_s']:.0f} "
            f"| {r['cpu_ms_per_cycle']:.2f} |"
        )
        if "settled" in r:
            row += f" {r['settled']['rss_mib']:.1f} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated runtimes")
    p.add_argument("--cycles", type=int, default=10_000, help="measured cycles per runtime")
    p.add_argument("--warmup", type=int, default=1000, help="cycles before the first reading")
    p.add_argument("--wave", type=int, default=250, help="connections open at once")
    p.add_argument("--settle", type=float, default=0.0, help="read RSS again S seconds later")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="candy-churn-") as tmp:
        for runtime in args.runtimes.split(","):
            try:
                results.append(run(runtime, args, Path(tmp)))
                r = results[-1]
                print(
                    f"{runtime}: RSS {r['warm']['rss_mib']:.1f} -> {r['end']['rss_mib']:.1f} MiB, "
                    f"fds {r['end']['fds']}, threads {r['end']['threads']}",
                    file=sys.stderr,
                    flush=True,
                )
            except Exception as exc:  # report the others anyway
                print(f"{runtime}: FAILED: {exc}", file=sys.stderr, flush=True)
    print(report(results, args))
    return 0 if len(results) == len(args.runtimes.split(",")) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
