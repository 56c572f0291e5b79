"""``candy status`` and ``candy ping``: ask a running daemon over its control socket.

``candy`` runs these when the first argument is ``status`` or ``ping``; anything else starts a
daemon (shells.cli). Both talk the newline-delimited JSON of :mod:`shells.control` over the
daemon's Unix socket and exit 0 with an answer, 1 with one line on stderr saying why not
(which socket was tried, and whether it is missing, refused or not permitted).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from shells.control import MAX_LINE, MAX_PING_TIMEOUT, PING_TIMEOUT
from shells.settings import default_control_path

__all__ = ["COMMANDS", "ControlClient", "ControlUnavailable", "format_status", "main"]

COMMANDS = ("status", "ping")
#: Longest wait for the daemon's answer to ``status`` (and beyond its timeout for ``ping``).
ANSWER_TIMEOUT = 5.0


class ControlUnavailable(Exception):
    """No answer from the daemon; ``str()`` is one line for the user."""


class ControlClient:
    """One connection to a daemon's control socket; :meth:`request` sends and reads a line."""

    def __init__(self, path: Path, timeout: float = ANSWER_TIMEOUT) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise ControlUnavailable(_why_not(path, exc)) from None
        self._sock = sock
        self._buffer = b""

    def request(self, request: dict[str, Any], timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        """Send ``request`` and return the daemon's response object."""
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            while b"\n" not in self._buffer:
                data = self._sock.recv(65536)
                if not data:
                    raise ControlUnavailable(
                        f"the daemon on {self.path} closed the connection without an answer"
                    )
                self._buffer += data
                if len(self._buffer) > 64 * MAX_LINE:
                    raise ControlUnavailable(f"the answer from {self.path} is too long")
        except TimeoutError:
            raise ControlUnavailable(
                f"the daemon on {self.path} did not answer within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise ControlUnavailable(
                f"lost the connection to {self.path}: {exc.strerror or exc}"
            ) from None
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            response = json.loads(line)
        except ValueError:
            raise ControlUnavailable(f"the answer from {self.path} is not JSON") from None
        if not isinstance(response, dict):
            raise ControlUnavailable(f"the answer from {self.path} is not a JSON object")
        return response

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _why_not(path: Path, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no daemon is listening on {path} (no such socket; is candy running?)"
    if isinstance(exc, ConnectionRefusedError):
        return f"no daemon is listening on {path} (connection refused: a stale socket)"
    if isinstance(exc, PermissionError):
        return (
            f"permission denied connecting to {path} "
            "(run as root or as a member of the group candy)"
        )
    if isinstance(exc, TimeoutError):
        return f"the daemon on {path} does not accept connections (timed out)"
    return f"cannot connect to {path}: {exc.strerror or exc}"


# --- command line -----------------------------------------------------------------------------
def _parser(command: str) -> argparse.ArgumentParser:
    if command == "status":
        p = argparse.ArgumentParser(
            prog="candy status",
            description="Show what a running candy daemon is doing.",
            allow_abbrev=False,
        )
        p.add_argument("--json", action="store_true", help="print the status document as JSON")
    else:
        p = argparse.ArgumentParser(
            prog="candy ping",
            description="Ping a virtual address through a running candy client.",
            allow_abbrev=False,
        )
    which = p.add_mutually_exclusive_group()
    which.add_argument("-n", "--name", metavar="NAME", help="the client started with -n NAME")
    if command == "status":
        which.add_argument("--server", action="store_true", help="the server daemon")
    p.add_argument(
        "--control", metavar="PATH", help="the daemon's control socket (overrides -n, --server)"
    )
    if command == "ping":
        p.add_argument("ip", metavar="VIRTUAL-IP", help="the peer's virtual IPv4 address")
        p.add_argument("-c", "--count", type=_positive_int, default=4, help="pings (default 4)")
        p.add_argument(
            "-i", "--interval", type=float, default=1.0, metavar="SECONDS",
            help="between pings (default 1)",
        )  # fmt: skip
        p.add_argument(
            "-W", "--timeout", type=_ping_timeout, default=PING_TIMEOUT, metavar="SECONDS",
            help=f"wait this long for each reply (default {PING_TIMEOUT:g})",
        )  # fmt: skip
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _ping_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= MAX_PING_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most {MAX_PING_TIMEOUT:g}")
    return value


def control_path(args: argparse.Namespace) -> Path:
    """The socket named by ``--control``, ``--server`` or ``-n`` (default: the client's)."""
    if args.control:
        return Path(args.control)
    if getattr(args, "server", False):
        return default_control_path("server")
    return default_control_path("client", args.name or "")


def main(argv: list[str]) -> int:
    """Run ``candy status ...`` or ``candy ping ...`` (``argv[0]`` is the command)."""
    command, rest = argv[0], argv[1:]
    try:
        args = _parser(command).parse_args(rest)
    except SystemExit as exc:  # --help, or argparse's usage error
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        if command == "status":
            return _status(args)
        try:
            IPv4Address(args.ip)
        except ValueError:
            _error(f"not an IPv4 address: {args.ip!r}")
            return 2
        return _ping(args)
    except ControlUnavailable as exc:
        _error(str(exc))
        return 1


def _error(line: str) -> None:
    print(f"candy: error: {line}", file=sys.stderr)


def _status(args: argparse.Namespace) -> int:
    with ControlClient(control_path(args)) as control:
        document = control.request({"cmd": "status"})
    if "error" in document and "role" not in document:
        _error(f"the daemon answered: {document['error']}")
        return 1
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(format_status(document), end="")
    return 0


def _ping(
    args: argparse.Namespace,
    sleep: Callable[[float], None] = time.sleep,
    out: Callable[[str], None] = print,
) -> int:
    ip, timeout = args.ip, args.timeout
    rtts: list[float] = []
    sent = 0
    with ControlClient(control_path(args)) as control:
        for n in range(args.count):
            started = time.monotonic()
            reply = control.request(
                {"cmd": "ping", "ip": ip, "timeout": timeout}, timeout + ANSWER_TIMEOUT
            )
            sent += 1
            if "rtt_ms" in reply:
                rtts.append(float(reply["rtt_ms"]))
                out(pong_line(reply))
            elif reply.get("error") == "timeout":
                out(f"timeout: no pong from {ip} within {timeout:g} s")
            else:
                _error(f"the daemon answered: {reply.get('error', reply)}")
                return 1
            if n + 1 < args.count:
                sleep(max(0.0, started + args.interval - time.monotonic()))
    out(f"--- {ip}: {sent} sent, {len(rtts)} received, {100 - 100 * len(rtts) // sent}% lost")
    if rtts:
        low, mean, high = min(rtts), sum(rtts) / len(rtts), max(rtts)
        out(f"rtt min/avg/max {_ms(low)}/{_ms(mean)}/{_ms(high)} ms")
    return 0 if rtts else 1


def pong_line(reply: dict[str, Any]) -> str:
    """``pong from 10.99.0.7 via direct 198.51.100.7:4051 in 0.4 ms``."""
    endpoint = reply.get("endpoint")
    where = f"{reply.get('path')} {endpoint}" if endpoint else str(reply.get("path"))
    return f"pong from {reply.get('ip')} via {where} in {_ms(float(reply['rtt_ms']))} ms"


# --- the status table -------------------------------------------------------------------------
def format_status(document: dict[str, Any], now: float | None = None) -> str:
    """The readable form of a status document (client or server), ending with a newline."""
    now = time.time() if now is None else now
    if document.get("role") == "server":
        return _format_server(document, now)
    return _format_client(document, now)


def _format_client(doc: dict[str, Any], now: float) -> str:
    server = doc.get("server") or {}
    since = server.get("since")
    state = str(server.get("state", "?"))
    if isinstance(since, int | float):
        state += f" since {_clock(since)} ({human_duration(now - since)} ago)"
    header = [
        ("name", doc.get("name") or "(none)"),
        ("interface", doc.get("interface")),
        ("address", doc.get("address") or "(none yet)"),
        ("server", f"{server.get('url', '?')}  {state}"),
    ]
    if server.get("last_error"):
        header.append(("last error", server["last_error"]))
    header += [("runtime", doc.get("runtime")), ("version", doc.get("version"))]
    lines = _pairs(header)
    lines.append("")
    peers = doc.get("peers") or []
    if peers:
        rows = [
            [
                p.get("ip"),
                p.get("state"),
                p.get("path"),
                p.get("endpoint") or (f"via {p['via']}" if p.get("via") else "-"),
                f"{p['rtt_ms']} ms" if p.get("rtt_ms") is not None else "-",
                _ago(p.get("last_heartbeat_s")),
                human_bytes(p.get("tx_bytes", 0)),
                human_bytes(p.get("rx_bytes", 0)),
                p.get("reason") or "-",
            ]
            for p in peers
        ]
        heads = ["IP", "STATE", "PATH", "ENDPOINT/VIA", "RTT", "LAST HB", "TX", "RX", "REASON"]
        lines += _table(heads, rows, right={4, 5, 6, 7})
    else:
        lines.append("no peers yet")
    lines.append("")
    lines += _counters(doc.get("counters") or {})
    paths = doc.get("paths") or {}
    if paths:
        traffic = ", ".join(
            f"{name} {human_bytes(c.get('tx_bytes', 0))} out/{human_bytes(c.get('rx_bytes', 0))} in"
            for name, c in paths.items()
        )
        lines.append(f"paths: {traffic}")
    return "\n".join(lines) + "\n"


def _format_server(doc: dict[str, Any], now: float) -> str:
    clients = doc.get("clients") or []
    uptime = doc.get("uptime_s")
    header = [
        ("listen", doc.get("listen")),
        ("uptime", human_duration(uptime) if isinstance(uptime, int | float) else "?"),
        ("clients", len(clients)),
        ("runtime", doc.get("runtime")),
        ("version", doc.get("version")),
    ]
    lines = _pairs(header)
    lines.append("")
    if clients:
        rows = [
            [
                c.get("ip"),
                c.get("vmac") or "-",
                c.get("remote"),
                human_duration(now - c["since"])
                if isinstance(c.get("since"), int | float)
                else "-",
                human_bytes(c.get("tx_bytes", 0)),
                human_bytes(c.get("rx_bytes", 0)),
                c.get("frames_dropped", 0),
                c.get("backlog", 0),
            ]
            for c in clients
        ]
        heads = ["IP", "VMAC", "REMOTE", "SINCE", "TX", "RX", "DROPPED", "BACKLOG"]
        lines += _table(heads, rows, right={3, 4, 5, 6, 7})
    else:
        lines.append("no clients")
    lines.append("")
    lines += _counters(doc.get("counters") or {})
    return "\n".join(lines) + "\n"


def _counters(counters: dict[str, Any]) -> list[str]:
    parts = []
    for name, value in counters.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {v}" for k, v in value.items())
            total = sum(v for v in value.values() if isinstance(v, int))
            parts.append(f"{name} {total}" + (f" ({inner})" if inner else ""))
        elif name.endswith("_bytes") and isinstance(value, int):
            parts.append(f"{name} {human_bytes(value)}")
        else:
            parts.append(f"{name} {value}")
    return [f"counters: {', '.join(parts)}"] if parts else []


def _pairs(pairs: list[tuple[str, Any]]) -> list[str]:
    width = max(len(key) for key, _ in pairs) + 1
    return [f"{key + ':':<{width}} {value}" for key, value in pairs]


def _table(heads: list[str], rows: list[list[Any]], right: set[int]) -> list[str]:
    cells = [heads] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(heads))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return lines


def human_bytes(n: object) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 MiB``..."""
    if not isinstance(n, int | float):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``42s``, ``5m 3s``, ``3h 2m``, ``2d 4h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _ago(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    return f"{seconds:.1f}s" if seconds < 60 else human_duration(seconds)


def _clock(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 0.1 or value == 0 else f"{value:.2f}"
