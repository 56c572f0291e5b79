"""The control socket of a daemon (``candy status``, ``candy ping``): what every runtime shares.

The daemon listens on a Unix socket (never TCP) and speaks newline-delimited JSON: one
request object per line, one response object per line, in order::

    {"cmd": "status"}                                  -> the status document
    {"cmd": "ping", "ip": "10.99.0.7", "timeout": 2}   -> {"ip", "seq", "rtt_ms", "path",
                                                           "endpoint"} or {"error": "timeout"}

Anything else gets ``{"error": "..."}`` and the connection stays usable; only a line longer
than :data:`MAX_LINE` closes it (after the error). This module holds the runtime-independent
part: splitting lines, parsing and dispatching a request (:class:`Commands`), encoding the
answer, and preparing the socket file (folder, stale socket, a daemon already listening,
permissions). The serving loops are per runtime: ``shells.asyncio.control`` and
``shells.blocking.control`` (gevent and threaded).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import inspect
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from types import ModuleType
from typing import Any

from candy_core import PingReply

log = logging.getLogger("candy.control")

#: Longest request line (bytes, without the newline); a longer one is answered with an error
#: and the connection closed.
MAX_LINE = 64 * 1024
#: A control connection that sends no request for this long is closed.
IDLE_TIMEOUT = 30.0
#: Longest a response may take to be written (a client that does not read is dropped).
WRITE_TIMEOUT = 10.0
#: Control connections served at once; one more is closed at once (after a one-line error).
MAX_CONNECTIONS = 16
#: Pending connections the kernel holds for the control socket.
BACKLOG = 16
#: ``ping`` waits this long for the reply unless the request says otherwise, and at most
#: :data:`MAX_PING_TIMEOUT`.
PING_TIMEOUT = 2.0
MAX_PING_TIMEOUT = 30.0
#: The socket file's mode, and the group given access to it when it exists.
SOCKET_MODE = 0o660
SOCKET_GROUP = "candy"
#: The mode of the socket's folder when the daemon creates it.
FOLDER_MODE = 0o755

COMMANDS = ("status", "ping")

Response = dict[str, Any]
#: A runtime's ping: ``ping(ip, timeout)`` -> the reply or None on timeout (asyncio: awaitable).
#: Raises ConnectionError while the client has no address.
PingFunction = Callable[[IPv4Address, float], Any]


class ControlSocketError(OSError):
    """The control socket cannot be opened; ``str()`` is one line for the operator."""


class ControlSocketInUse(ControlSocketError):
    """Another daemon is listening on the control socket's path."""


def open_default_or_skip(open_socket: Callable[[], None], required: bool) -> bool:
    """Open the control socket; a default one that cannot be made is skipped with a warning.

    A daemon started as an ordinary user cannot create ``/run/candy``: it still runs, without
    ``candy status``. A path given by the operator (``required``) must work, and a socket in
    use by another daemon always refuses the start. Returns whether the socket is open.
    """
    try:
        open_socket()
    except ControlSocketInUse:
        raise
    except ControlSocketError as exc:
        if required:
            raise
        log.warning(
            "%s; candy status will not reach this daemon (--control PATH picks "
            "another place, --control none turns it off)",
            exc,
        )
        return False
    return True


class LineTooLong(ValueError):
    """A request line is longer than :data:`MAX_LINE`."""


# --- lines ------------------------------------------------------------------------------------
class Lines:
    """Splits a byte stream into request lines (without ``\\n`` or ``\\r\\n``), bounded."""

    __slots__ = ("_buffer", "limit")

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines in what came so far; raises :class:`LineTooLong`."""
        buffer = self._buffer
        buffer += data
        lines = []
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end]).rstrip(b"\r")
            if len(line) > self.limit:
                raise LineTooLong(too_long_message(self.limit))
            lines.append(line)
            start = end + 1
        del buffer[:start]
        if len(buffer) > self.limit + 1:  # + 1: the "\r" of a "\r\n" still to come
            raise LineTooLong(too_long_message(self.limit))
        return lines


def too_long_message(limit: int) -> str:
    return f"request line longer than {limit} bytes; closing the connection"


# --- requests ---------------------------------------------------------------------------------
def error(message: str) -> Response:
    """An error response."""
    return {"error": message}


def encode(response: Response) -> bytes:
    """One response line (an error line if ``response`` is not plain JSON data)."""
    try:
        text = json.dumps(response, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        log.error("control response not serialisable: %s", exc)
        text = json.dumps(error(f"internal error: response not serialisable ({exc})"))
    return text.encode() + b"\n"


def ping_response(reply: PingReply | None) -> Response:
    """The answer to ``ping``: the reply's fields, or ``{"error": "timeout"}``."""
    if reply is None:
        return error("timeout")
    return {
        "ip": str(reply.ip),
        "seq": reply.seq,
        "rtt_ms": reply.rtt_ms,
        "path": reply.path,
        "endpoint": reply.endpoint,
    }


@dataclass(frozen=True)
class PingRequest:
    ip: IPv4Address
    timeout: float


class Commands:
    """The commands one daemon answers: ``status`` (both roles), ``ping`` (a client).

    ``status()`` returns the status document; ``ping`` is the shell client's ``ping(ip,
    timeout)``. :meth:`answer` returns the response, or (asyncio) an awaitable of it.
    """

    def __init__(self, status: Callable[[], Response], ping: PingFunction | None = None) -> None:
        self._status = status
        self._ping = ping

    @classmethod
    def of(cls, node: Any) -> Commands:
        """The commands of a shell's Server or Client (a client also answers ``ping``)."""
        return cls(node.status, getattr(node, "ping", None))

    def answer(self, line: bytes) -> Response | Awaitable[Response]:
        """The response to one request line (never raises)."""
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, ValueError) as exc:
            return error(f"malformed request: not JSON ({exc})")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return error('malformed request: expected an object like {"cmd": "status"}')
        cmd = request["cmd"]
        try:
            if cmd == "status":
                return self._status()
            if cmd == "ping":
                return self._start_ping(request)
        except Exception as exc:
            return _failed(cmd, exc)
        return error(f"unknown command {cmd[:64]!r} (known: {', '.join(COMMANDS)})")

    def _start_ping(self, request: dict[str, Any]) -> Response | Awaitable[Response]:
        if self._ping is None:
            return error("ping needs a client daemon; this one is a server")
        parsed = parse_ping(request)
        if isinstance(parsed, dict):
            return parsed
        result = self._ping(parsed.ip, parsed.timeout)
        if inspect.isawaitable(result):
            return _await_ping(result)
        return ping_response(result)


async def _await_ping(result: Awaitable[PingReply | None]) -> Response:
    try:
        return ping_response(await result)
    except Exception as exc:
        return _failed("ping", exc)


def _failed(cmd: str, exc: Exception) -> Response:
    if isinstance(exc, ConnectionError):  # e.g. the client has not joined yet
        return error(str(exc))
    log.exception("control command %s failed", cmd)
    return error(f"internal error answering {cmd}: {type(exc).__name__}")


def parse_ping(request: dict[str, Any]) -> PingRequest | Response:
    """The ping's address and timeout, or an error response."""
    ip = request.get("ip")
    if not isinstance(ip, str):
        return error('ping needs "ip": a virtual IPv4 address as a string')
    try:
        address = IPv4Address(ip)
    except ValueError:
        return error(f"ping: bad IPv4 address {ip[:64]!r}")
    timeout = request.get("timeout", PING_TIMEOUT)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_PING_TIMEOUT
    ):
        limit = f"{MAX_PING_TIMEOUT:g}"
        return error(f'ping: "timeout" must be a number of seconds above 0, at most {limit}')
    return PingRequest(address, float(timeout))


# --- the socket file --------------------------------------------------------------------------
def open_socket(path: Path, socket_module: ModuleType = socket) -> Any:
    """A listening Unix socket at ``path`` (made with ``socket_module``: gevent's or stdlib).

    Creates the folder (mode 0755) if missing; replaces a stale socket file left by a killed
    daemon; refuses (:class:`ControlSocketError`) when a daemon is listening there or the
    path is something else than a socket. The socket file gets mode 0660 and, when a group
    ``candy`` exists, that group.
    """
    folder = path.parent
    if not folder.is_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, FOLDER_MODE)
        except OSError as exc:
            raise ControlSocketError(
                f"cannot create the folder of the control socket {folder}: {exc.strerror or exc}"
            ) from None
    _remove_stale(path)
    sock = socket_module.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Nobody can connect before listen(): set the permissions first.
        os.chmod(path, SOCKET_MODE)
        _give_to_group(path)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:  # another daemon won the race for the path
            raise ControlSocketInUse(in_use_message(path)) from None
        raise ControlSocketError(
            f"cannot open the control socket {path}: {exc.strerror or exc}"
        ) from None
    return sock


def in_use_message(path: Path) -> str:
    return (
        f"another candy daemon is listening on the control socket {path} "
        "(stop it, or give this one --control PATH or --control none)"
    )


def _remove_stale(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlSocketError(
            f"cannot use the control socket {path}: {exc.strerror or exc}"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise ControlSocketError(f"cannot use the control socket {path}: it is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: a daemon was killed without removing it
    except TimeoutError:  # someone listens but is busy: still in use
        raise ControlSocketInUse(in_use_message(path)) from None
    except OSError as exc:
        raise ControlSocketError(
            f"cannot use the control socket {path}: {exc.strerror or exc}"
        ) from None
    else:
        raise ControlSocketInUse(in_use_message(path))
    finally:
        probe.close()
    log.info("removing the stale control socket %s", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _give_to_group(path: Path) -> None:
    try:
        gid = grp.getgrnam(SOCKET_GROUP).gr_gid
    except KeyError:
        return
    try:
        os.chown(path, -1, gid)
    except OSError as exc:
        log.warning("cannot give %s to group %s: %s", path, SOCKET_GROUP, exc.strerror or exc)


def socket_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, to remove only our own socket later."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def remove_socket(path: Path, identity: tuple[int, int] | None) -> None:
    """Remove the socket file at ``path`` if it is still the one we bound."""
    if identity is not None and socket_identity(path) == identity:
        with contextlib.suppress(OSError):
            os.unlink(path)


def refusal() -> bytes:
    """What a connection beyond :data:`MAX_CONNECTIONS` reads before it is closed."""
    return encode(error(f"too many control connections (at most {MAX_CONNECTIONS})"))
