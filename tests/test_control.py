"""The control socket of every runtime, ``candy status`` and ``candy ping``.

Servers and clients run on 127.0.0.1 without TUN (tests/runtimes.py); each test puts a control
server on a Unix socket under ``tmp_path`` next to them and talks to it with plain sockets, as
``candy status`` does. The last tests start real daemons as subprocesses.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from runtimes import (
    ADAPTERS,
    AsyncioAdapter,
    ClientHandle,
    RuntimeAdapter,
    ServerHandle,
    adapter_fixture,
    free_port,
    icmp_packet,
    inet_checksum,
    ipv4_packet,
    recv_matching,
    wait_until,
)
from test_behaviour import client_config, ip_of, join, send_and_expect, server_config

from shells import cli, control, ctl
from shells.control import Commands, ControlSocketError, Lines, LineTooLong
from shells.settings import candy_version

REPO = Path(__file__).resolve().parents[1]

CLIENT_KEYS = {
    "role", "version", "runtime", "name", "interface", "address", "server", "peers", "counters",
}  # fmt: skip
SERVER_LINK_KEYS = {"url", "state", "since", "last_error"}
PEER_KEYS = {
    "ip", "state", "path", "endpoint", "via", "rtt_ms", "last_heartbeat_s",
    "tx_bytes", "rx_bytes", "tx_packets", "rx_packets", "reason",
}  # fmt: skip
SERVER_KEYS = {"role", "version", "runtime", "listen", "uptime_s", "clients", "counters"}
CLIENT_INFO_KEYS = {
    "ip", "vmac", "remote", "since", "tx_bytes", "rx_bytes", "frames_dropped", "backlog",
    "network",
}  # fmt: skip
SERVER_COUNTERS = {
    "connections", "authenticated", "rejected", "frames_relayed", "frames_dropped",
    "backlog_dropped",
}  # fmt: skip


@pytest.fixture(params=sorted(ADAPTERS))
def adapter(request: pytest.FixtureRequest) -> Any:
    yield from adapter_fixture(request)


Starter = Callable[..., Any]


@pytest.fixture
def serve(adapter: RuntimeAdapter) -> Iterator[Starter]:
    yield from control_servers(adapter)


def control_servers(adapter: RuntimeAdapter) -> Iterator[Starter]:
    """``serve(handle, path, **kw)``: a control server for a started server or client handle.

    Stopped (and its socket file removed) before the adapter stops the nodes.
    """
    stops: list[Callable[[], None]] = []

    def start(handle: Any, path: Path, **kw: Any) -> Any:
        node = handle._server if hasattr(handle, "_server") else handle._client
        server = new_control(adapter, path, Commands.of(node), **kw)
        if isinstance(adapter, AsyncioAdapter):
            adapter.call(server.start())
            stops.append(lambda: adapter.call(server.stop()))
        else:
            adapter.call(server.start)  # type: ignore[attr-defined]
            stops.append(lambda: adapter.call(server.stop))  # type: ignore[attr-defined]
        return server

    yield start
    for stop in reversed(stops):
        stop()


def new_control(adapter: RuntimeAdapter, path: Path, commands: Commands, **kw: Any) -> Any:
    if isinstance(adapter, AsyncioAdapter):
        from shells.asyncio.control import ControlServer as AsyncioControl

        return AsyncioControl(path, commands, **kw)
    from shells.blocking.control import ControlServer as BlockingControl

    return BlockingControl(adapter.module.KIT, path, commands, **kw)  # type: ignore[attr-defined]


def cells(line: str) -> list[str]:
    """The cells of a table row (columns are at least two spaces apart)."""
    return re.split(r" {2,}", line.strip())


def runtime_of(adapter: RuntimeAdapter) -> str:
    return "asyncio" if adapter.name.startswith("asyncio") else adapter.name


class Conn:
    """A control connection from the test thread: send a line, read a line."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes | None:
        """The next response line, or None at EOF."""
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def ask(self, request: Any) -> dict[str, Any]:
        self.send(json.dumps(request).encode() + b"\n")
        line = self.line()
        assert line is not None, f"connection closed instead of answering {request!r}"
        answer = json.loads(line)
        assert isinstance(answer, dict)
        return answer

    def closed(self) -> bool:
        """Whether the daemon closed the connection (EOF, nothing left unread)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def echo_reply(packet: bytes) -> bytes | None:
    """What a kernel answers to an ICMP echo request (None for anything else)."""
    if len(packet) < 28 or packet[9] != 1 or packet[20] != 8:
        return None
    body = bytearray(packet[20:])
    body[0] = 0  # echo reply
    body[2:4] = b"\0\0"
    body[2:4] = struct.pack("!H", inet_checksum(bytes(body)))
    return ipv4_packet(IPv4Address(packet[16:20]), IPv4Address(packet[12:16]), 1, bytes(body))


class Responder:
    """Answers the echo requests a client receives, like the kernel behind its TUN device."""

    def __init__(self, client: ClientHandle) -> None:
        self.client = client
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-responder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            packet = self.client.recv_packet(0.1)
            reply = echo_reply(packet) if packet else None
            if reply is not None:
                self.answered += 1
                self.client.send_packet(reply)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> Responder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def unused_address(*clients: ClientHandle) -> str:
    """An address of the network that none of ``clients`` holds."""
    taken = {ip_of(c) for c in clients}
    return str(next(ip for ip in IPv4Network("10.99.0.0/24").hosts() if ip not in taken))


def network(adapter: RuntimeAdapter, n: int = 2) -> tuple[ServerHandle, list[ClientHandle]]:
    server = adapter.start_server(server_config())
    clients = [adapter.start_client(client_config(server, name=f"c{i}")) for i in range(n)]
    join(server, *clients)
    return server, clients


# --- the protocol, every runtime --------------------------------------------------------------
def test_server_status(adapter: RuntimeAdapter, serve: Starter, tmp_path: Path) -> None:
    server, (a, b) = network(adapter)
    send_and_expect(a, b, b"count me")
    path = tmp_path / "server.sock"
    serve(server, path)
    conn = Conn(path)
    status = conn.ask({"cmd": "status"})
    json.dumps(status)
    assert set(status) == SERVER_KEYS
    assert status["role"] == "server" and status["runtime"] == runtime_of(adapter)
    assert status["listen"] == f"ws://127.0.0.1:{server.port}/"
    assert status["version"] and 0 <= status["uptime_s"] < 60
    clients = status["clients"]
    assert [c["ip"] for c in clients] == [str(ip) for ip in sorted(ip_of(c) for c in (a, b))]
    for info in clients:
        assert set(info) == CLIENT_INFO_KEYS
        assert info["remote"].startswith("127.0.0.1:") and info["rx_bytes"] > 0
        assert len(info["vmac"]) == 16 and info["backlog"] == 0 and info["frames_dropped"] == 0
        assert abs(info["since"] - time.time()) < 60
    counters = status["counters"]
    assert set(counters) >= SERVER_COUNTERS
    assert counters["connections"] == 2 and counters["authenticated"] == 2
    assert counters["frames_relayed"] >= 1 and counters["rejected"] == {}
    assert conn.ask({"cmd": "ping", "ip": "10.99.0.1"}) == {
        "error": "ping needs a client daemon; this one is a server"
    }
    conn.close()


def test_client_status_and_bad_requests(
    adapter: RuntimeAdapter, serve: Starter, tmp_path: Path
) -> None:
    server, (a, b) = network(adapter)
    send_and_expect(a, b, b"to b")
    path = tmp_path / "client.sock"
    serve(a, path)
    conn = Conn(path)
    status = conn.ask({"cmd": "status"})
    assert set(status) >= CLIENT_KEYS
    assert status["role"] == "client" and status["runtime"] == runtime_of(adapter)
    assert status["name"] == "c0" and status["interface"] == "candy-c0"
    assert status["address"] == str(a.address)
    assert set(status["server"]) == SERVER_LINK_KEYS
    assert status["server"]["url"] == f"ws://127.0.0.1:{server.port}/"
    assert status["server"]["state"] == "connected" and status["server"]["last_error"] is None
    assert abs(status["server"]["since"] - time.time()) < 60
    (peer,) = status["peers"]
    assert set(peer) == PEER_KEYS
    assert peer["ip"] == str(ip_of(b)) and peer["path"] == "relay"
    assert peer["tx_packets"] == 1 and peer["tx_bytes"] > 0 and peer["rx_packets"] == 0
    assert peer["reason"] == "peer-to-peer is off (no STUN server configured)"
    assert status["counters"]["packets_to_server"] >= 1

    # Whatever comes, the answer is an error object and the connection stays usable.
    for bad, why in [
        (b'{"cmd": "reboot"}', "unknown command 'reboot' (known: status, ping)"),
        (b"{not json", "malformed request: not JSON"),
        (b"\xff\xfe", "malformed request: not JSON"),
        (b'["status"]', "malformed request: expected an object"),
        (b'{"cmd": 7}', "malformed request: expected an object"),
        (b'{"cmd": "ping"}', 'ping needs "ip"'),
        (b'{"cmd": "ping", "ip": "10.99.0.300"}', "ping: bad IPv4 address '10.99.0.300'"),
        (b'{"cmd": "ping", "ip": "10.99.0.3", "timeout": 0}', 'ping: "timeout" must be'),
        (b'{"cmd": "ping", "ip": "10.99.0.3", "timeout": true}', 'ping: "timeout" must be'),
        (b'{"cmd": "ping", "ip": "10.99.0.3", "timeout": 31}', 'ping: "timeout" must be'),
    ]:
        conn.send(bad + b"\n")
        answer = json.loads(conn.line() or b"null")
        assert set(answer) == {"error"} and answer["error"].startswith(why), (bad, answer)
    conn.send(b"\n\r\n")  # blank lines are no requests: no answer
    assert conn.ask({"cmd": "status"})["role"] == "client"
    # Two requests in one write, the second split across writes: answered in order.
    conn.send(b'{"cmd": "nope"}\r\n{"cmd": "sta')
    time.sleep(0.05)
    conn.send(b'tus"}\n')
    assert "unknown command" in json.loads(conn.line() or b"")["error"]
    assert json.loads(conn.line() or b"")["role"] == "client"
    conn.close()


def test_ping_over_the_relay(adapter: RuntimeAdapter, serve: Starter, tmp_path: Path) -> None:
    _, (a, b) = network(adapter)
    path = tmp_path / "a.sock"
    serve(a, path)
    conn = Conn(path)
    with Responder(b) as responder:
        seqs = []
        for _ in range(3):
            reply = conn.ask({"cmd": "ping", "ip": str(ip_of(b)), "timeout": 5})
            assert set(reply) == {"ip", "seq", "rtt_ms", "path", "endpoint"}, reply
            assert reply["ip"] == str(ip_of(b)) and reply["path"] == "relay"
            # (0 happens: uvloop's clock, which the asyncio client runs on, counts milliseconds)
            assert reply["endpoint"] is None and 0 <= reply["rtt_ms"] < 5000
            seqs.append(reply["seq"])
        assert responder.answered == 3 and len(set(seqs)) == 3
        # Nobody holds this address: no reply within the timeout.
        started = time.monotonic()
        assert conn.ask({"cmd": "ping", "ip": unused_address(a, b), "timeout": 0.3}) == {
            "error": "timeout"
        }
        assert 0.25 < time.monotonic() - started < 3
    assert a.recv_packet(0.2) is None  # echo replies go to the ping, never to TUN
    peers = {p["ip"]: p for p in conn.ask({"cmd": "status"})["peers"]}
    assert peers[str(ip_of(b))]["tx_packets"] == 3 and peers[str(ip_of(b))]["rx_packets"] == 3
    assert peers[unused_address(a, b)]["tx_packets"] == 1
    conn.close()


def test_ping_before_joining_is_an_error(
    adapter: RuntimeAdapter, serve: Starter, tmp_path: Path
) -> None:
    # A client whose server does not answer never gets an address.
    client = adapter.start_client(client_config(free_port()))
    path = tmp_path / "lonely.sock"
    serve(client, path)
    conn = Conn(path)
    assert conn.ask({"cmd": "ping", "ip": "10.99.0.7"}) == {
        "error": "not joined the network yet (no virtual address)"
    }
    status = conn.ask({"cmd": "status"})
    assert status["address"] is None and status["server"]["state"] in ("connecting", "backoff")
    conn.close()


def test_a_silent_control_client_stalls_nothing(
    adapter: RuntimeAdapter, serve: Starter, tmp_path: Path
) -> None:
    _, (a, b) = network(adapter)
    path = tmp_path / "a.sock"
    serve(a, path, idle_timeout=2.0)
    silent = Conn(path)
    half = Conn(path)
    half.send(b'{"cmd": "sta')  # half a request, then nothing
    started = time.monotonic()
    talker = Conn(path)
    for n in range(5):
        assert talker.ask({"cmd": "status"})["role"] == "client"
        send_and_expect(a, b, f"still flowing {n}".encode())
        send_and_expect(b, a, f"and back {n}".encode())
    assert time.monotonic() - started < 1.5, "the data path waited for a control client"
    assert silent.closed() and half.closed()  # after the idle timeout
    assert 1.9 < time.monotonic() - started < 6
    talker.close()
    silent.close()
    half.close()


def test_many_control_clients_while_traffic_flows(
    adapter: RuntimeAdapter, serve: Starter, tmp_path: Path
) -> None:
    _, (a, b) = network(adapter)
    path = tmp_path / "a.sock"
    serve(a, path)
    conns = [Conn(path) for _ in range(control.MAX_CONNECTIONS)]
    for conn in conns:  # all 16 admitted (each answers)
        assert conn.ask({"cmd": "status"})["role"] == "client"
    extra = Conn(path)  # one too many: an error line, then closed at once
    assert json.loads(extra.line() or b"") == {
        "error": f"too many control connections (at most {control.MAX_CONNECTIONS})"
    }
    assert extra.closed()
    extra.close()

    failures: list[str] = []

    def ask_often(conn: Conn) -> None:
        try:
            for _ in range(20):
                if conn.ask({"cmd": "status"})["role"] != "client":
                    failures.append("bad answer")
        except Exception as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=ask_often, args=(conn,)) for conn in conns]
    for thread in threads:
        thread.start()
    packets = [icmp_packet(ip_of(a), ip_of(b), f"p{n}".encode(), seq=n) for n in range(40)]
    a.send_packets(packets)
    got = []
    for _ in packets:
        packet = recv_matching(b, lambda p: p in packets, 10.0)
        assert packet is not None, f"only {len(got)} of {len(packets)} packets arrived"
        got.append(packet)
    for thread in threads:
        thread.join(30)
    assert not failures
    assert sorted(got) == sorted(packets)
    for conn in conns:
        conn.close()
    # Their slots are free again.
    assert wait_until(lambda: _answers(path), 5)


def _answers(path: Path) -> bool:
    try:
        conn = Conn(path)
    except OSError:
        return False
    try:
        return "role" in conn.ask({"cmd": "status"})
    except (OSError, AssertionError, ValueError):
        return False
    finally:
        conn.close()


def test_a_too_long_line_is_refused_and_closed(
    adapter: RuntimeAdapter, serve: Starter, tmp_path: Path
) -> None:
    server = adapter.start_server(server_config())
    path = tmp_path / "server.sock"
    serve(server, path)
    conn = Conn(path)
    with contextlib.suppress(OSError):  # the daemon may close while we still write
        conn.send(b"x" * (control.MAX_LINE + 10_000))
    assert json.loads(conn.line() or b"") == {
        "error": f"request line longer than {control.MAX_LINE} bytes; closing the connection"
    }
    assert conn.closed()
    conn.close()
    assert Conn(path).ask({"cmd": "status"})["role"] == "server"


def test_socket_file_folder_stale_and_in_use(
    adapter: RuntimeAdapter, serve: Starter, tmp_path: Path
) -> None:
    server = adapter.start_server(server_config())
    path = tmp_path / "run" / "candy" / "server.sock"
    path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a killed daemon's socket: the file stays, nobody listens
    stale.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    serve(server, path)
    assert Conn(path).ask({"cmd": "status"})["role"] == "server"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660

    second = new_control(adapter, path, Commands.of(server._server))  # type: ignore[attr-defined]
    with pytest.raises(ControlSocketError) as info:
        second.open()
    assert str(info.value) == (
        f"another candy daemon is listening on the control socket {path} "
        "(stop it, or give this one --control PATH or --control none)"
    )
    # The refused one leaves the first one's socket alone.
    if isinstance(adapter, AsyncioAdapter):
        adapter.call(second.stop())
    else:
        adapter.call(second.stop)  # type: ignore[attr-defined]
    assert Conn(path).ask({"cmd": "status"})["role"] == "server"


def test_stop_removes_the_socket_file(adapter: RuntimeAdapter, tmp_path: Path) -> None:
    server = adapter.start_server(server_config())
    path = tmp_path / "new" / "dir" / "server.sock"
    ctl_server = new_control(adapter, path, Commands.of(server._server))  # type: ignore[attr-defined]
    if isinstance(adapter, AsyncioAdapter):
        adapter.call(ctl_server.start())
    else:
        adapter.call(ctl_server.start)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755
    conn = Conn(path)
    assert conn.ask({"cmd": "status"})["role"] == "server"
    if isinstance(adapter, AsyncioAdapter):
        adapter.call(ctl_server.stop())
    else:
        adapter.call(ctl_server.stop)
    assert not path.exists()
    assert conn.closed()  # open control connections are closed too
    conn.close()


# --- the socket file and the protocol, runtime-independent -------------------------------------
def test_only_sockets_are_replaced(tmp_path: Path) -> None:
    path = tmp_path / "server.sock"
    path.write_text("not a socket")
    with pytest.raises(ControlSocketError, match="it is not a socket"):
        control.open_socket(path)
    assert path.read_text() == "not a socket"


def test_the_socket_goes_to_group_candy_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    monkeypatch.setattr(
        control.grp, "getgrnam", lambda name: other if name == "candy" else grp.getgrnam(name)
    )
    sock = control.open_socket(tmp_path / "c.sock")
    try:
        st = os.lstat(tmp_path / "c.sock")
        assert st.st_gid == other.gr_gid and stat.S_IMODE(st.st_mode) == 0o660
    finally:
        sock.close()


def test_lines_are_split_and_bounded() -> None:
    lines = Lines(limit=10)
    assert lines.feed(b"ab") == []
    assert lines.feed(b"c\r\nde\n\nf") == [b"abc", b"de", b""]
    with pytest.raises(LineTooLong):  # "f0123456789": 11 bytes
        lines.feed(b"0123456789\n")
    lines = Lines(limit=10)
    assert lines.feed(b"0123456789\r\n") == [b"0123456789"]
    with pytest.raises(LineTooLong):
        lines.feed(b"0123456789xy")
    with pytest.raises(LineTooLong):
        Lines(limit=10).feed(b"0123456789xy\n")


def test_commands_report_a_failing_handler() -> None:
    def broken() -> dict[str, Any]:
        raise KeyError("boom")

    assert Commands(broken).answer(b'{"cmd": "status"}') == {
        "error": "internal error answering status: KeyError"
    }
    answer = Commands(lambda: {"uptime_s": float("nan")}).answer(b'{"cmd": "status"}')
    assert isinstance(answer, dict)
    assert json.loads(control.encode(answer))["error"].startswith(
        "internal error: response not serialisable"
    )


def test_default_socket_paths_of_the_commands() -> None:
    def path_of(*argv: str) -> Path:
        return ctl.control_path(ctl._parser(argv[0]).parse_args(list(argv[1:])))

    assert path_of("status") == Path("/run/candy/client.sock")
    assert path_of("status", "-n", "home") == Path("/run/candy/client-home.sock")
    assert path_of("status", "--server") == Path("/run/candy/server.sock")
    assert path_of("status", "--server", "--control", "/tmp/x.sock") == Path("/tmp/x.sock")
    assert path_of("ping", "-n", "home", "10.99.0.7") == Path("/run/candy/client-home.sock")
    assert path_of("ping", "10.99.0.7") == Path("/run/candy/client.sock")


# --- candy status / candy ping -----------------------------------------------------------------
def test_cli_without_a_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing.sock"
    assert cli.main(["status", "--control", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"candy: error: no daemon is listening on {missing} (no such socket; is candy running?)\n"
    )
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))
    assert cli.main(["ping", "--control", str(stale), "10.99.0.7"]) == 1
    assert capsys.readouterr().err == (
        f"candy: error: no daemon is listening on {stale} (connection refused: a stale socket)\n"
    )
    assert cli.main(["ping", "--control", str(stale), "10.99.0.300"]) == 2
    assert "not an IPv4 address" in capsys.readouterr().err
    assert cli.main(["status", "-n", "a", "--server"]) == 2  # argparse: not allowed together


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_cli_says_when_permission_is_refused(tmp_path: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "server.sock"
    sock = control.open_socket(path)  # 0660 root:root: nobody may not connect
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child only connects and reports (no locks, no logging)
        message = "connected"
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            ctl.ControlClient(path).close()
        except ctl.ControlUnavailable as exc:
            message = str(exc)
        except BaseException as exc:
            message = repr(exc)
        finally:
            os.write(write_end, message.encode())
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode()
        os.waitpid(child, 0)
    finally:
        sock.close()
    assert message == (
        f"permission denied connecting to {path} (run as root or as a member of the group candy)"
    )


@pytest.fixture
def threaded() -> Iterator[RuntimeAdapter]:
    adapter = ADAPTERS["threaded"]()
    try:
        yield adapter
    finally:
        adapter.close()


@pytest.fixture
def threaded_serve(threaded: RuntimeAdapter) -> Iterator[Starter]:
    yield from control_servers(threaded)


def test_cli_status_of_a_server(
    threaded: RuntimeAdapter,
    threaded_serve: Starter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, (a, b) = network(threaded)
    send_and_expect(a, b, b"x" * 1300)  # within the MTU (1400)
    path = tmp_path / "server.sock"
    threaded_serve(server, path)
    assert cli.main(["status", "--server", "--control", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"listen:  ws://127.0.0.1:{server.port}/"
    assert re.fullmatch(r"uptime:  \d+s", lines[1])
    assert lines[2:6] == ["clients: 2", "runtime: threaded", f"version: {candy_version()}", ""]
    assert cells(lines[6]) == ["IP", "VMAC", "REMOTE", "SINCE", "TX", "RX", "DROPPED", "BACKLOG"]
    rows = {row[0]: row for row in map(cells, lines[7:9])}
    assert set(rows) == {str(ip_of(a)), str(ip_of(b))}
    for row in rows.values():
        assert re.fullmatch(r"[0-9a-f]{16}", row[1]) and row[2].startswith("127.0.0.1:")
        assert re.fullmatch(r"\d+s", row[3]) and row[6:] == ["0", "0"]
    assert re.fullmatch(r"\d\.\d KiB", rows[str(ip_of(a))][5])  # a sent b 1500 bytes
    assert re.fullmatch(r"\d\.\d KiB", rows[str(ip_of(b))][4])
    assert lines[9] == ""
    assert lines[10].startswith(
        "counters: connections 2, open_connections 2, authenticated 2, rejected 0, refused 0, "
        "frames_relayed 1, frames_dropped 0, backlog_dropped 0, rx_bytes "
    )
    assert len(lines) == 11

    assert cli.main(["status", "--json", "--control", str(path)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document) == SERVER_KEYS and document["role"] == "server"
    assert len(document["clients"]) == 2


def test_cli_status_of_a_client_and_ping(
    threaded: RuntimeAdapter,
    threaded_serve: Starter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, (a, b) = network(threaded)
    path = tmp_path / "client-c0.sock"
    threaded_serve(a, path)
    with Responder(b):
        code = cli.main(["ping", "--control", str(path), str(ip_of(b)), "-c", "3", "-i", "0.1"])
        out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert len(out) == 5, out
    for line in out[:3]:
        assert line.startswith(f"pong from {ip_of(b)} via relay in ") and line.endswith(" ms")
    assert out[3] == f"--- {ip_of(b)}: 3 sent, 3 received, 0% lost"
    assert out[4].startswith("rtt min/avg/max ") and out[4].endswith(" ms")

    nobody = unused_address(a, b)
    code = cli.main(["ping", "--control", str(path), nobody, "-c", "2", "-W", "0.2"])
    assert code == 1
    assert capsys.readouterr().out.splitlines() == [
        f"timeout: no pong from {nobody} within 0.2 s",
        f"timeout: no pong from {nobody} within 0.2 s",
        f"--- {nobody}: 2 sent, 0 received, 100% lost",
    ]

    assert cli.main(["status", "--control", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "name:      c0"
    assert lines[1] == "interface: candy-c0"
    assert lines[2] == f"address:   {a.address}"
    assert lines[3].startswith(f"server:    ws://127.0.0.1:{server.port}/  connected since ")
    assert lines[4:6] == ["runtime:   threaded", lines[5]] and lines[5].startswith("version:   ")
    assert lines[3].endswith(" ago)")
    assert lines[6] == ""
    assert cells(lines[7]) == [
        "IP", "STATE", "PATH", "ENDPOINT/VIA", "RTT", "LAST HB", "TX", "RX", "REASON",
    ]  # fmt: skip
    rows = {row[0]: row for row in map(cells, lines[8:10])}
    off = "peer-to-peer is off (no STUN server configured)"
    assert rows == {
        str(ip_of(b)): [str(ip_of(b)), "NONE", "relay", "-", "-", "-", "114 B", "114 B", off],
        nobody: [nobody, "NONE", "relay", "-", "-", "-", "76 B", "0 B", off],
    }
    assert lines[10] == ""
    assert lines[11].startswith("counters: packets_to_server 5, packets_from_server 3, ")
    assert lines[12] == (
        "paths: direct 0 B out/0 B in, lan 0 B out/0 B in, route 0 B out/0 B in, "
        "relay 190 B out/114 B in"
    )
    assert len(lines) == 13

    assert cli.main(["status", "--json", "--control", str(path)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document) >= CLIENT_KEYS
    peers = {p["ip"]: p for p in document["peers"]}
    assert peers[str(ip_of(b))]["tx_packets"] == 3 and peers[nobody]["tx_packets"] == 2


def test_the_daemon_invocation_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(ctl, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["-m", "server"]) == 2  # the daemon parser: no -w/-p, an error
    assert seen == []
    assert cli.main(["status", "--json"]) == 0 and seen == [["status", "--json"]]


# --- real daemons ------------------------------------------------------------------------------
def _daemon(port: int, sock: Path, runtime: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "shells.cli", "-m", "server",
            "-w", f"ws://127.0.0.1:{port}", "-p", "pw", "-d", "10.99.0.0/24",
            "--control", str(sock), "--runtime", runtime, "--no-timestamp",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _candy(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shells.cli", *argv],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _listening(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("runtime", ["asyncio", "gevent", "threaded"])
def test_daemon_status_refusal_and_stale_socket(runtime: str, tmp_path: Path) -> None:
    sock = tmp_path / "run" / "server.sock"
    first = _daemon(free_port(), sock, runtime)
    try:
        assert wait_until(lambda: _listening(sock) or first.poll() is not None, 20)
        assert first.poll() is None, first.communicate()
        done = _candy("status", "--server", "--control", str(sock), "--json")
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        assert document["role"] == "server" and document["runtime"] == runtime
        assert _candy("status", "--server", "--control", str(sock)).stdout.startswith("listen: ")

        second = _daemon(free_port(), sock, runtime)
        _, err = second.communicate(timeout=30)
        assert second.returncode == 1
        errors = [line for line in err.splitlines() if "ERROR" in line]
        assert errors == [
            f"[ERROR] cannot start: another candy daemon is listening on the control socket "
            f"{sock} (stop it, or give this one --control PATH or --control none)"
        ]
        assert _candy("status", "--control", str(sock)).returncode == 0  # still the first

        first.send_signal(signal.SIGKILL)  # leaves a stale socket file
        first.wait(10)
        assert sock.exists() and not _listening(sock)
        missing = _candy("status", "--control", str(sock))
        assert missing.returncode == 1 and "connection refused" in missing.stderr
        first = _daemon(free_port(), sock, runtime)
        assert wait_until(lambda: _listening(sock) or first.poll() is not None, 20)
        assert _candy("status", "--server", "--control", str(sock)).returncode == 0
        first.send_signal(signal.SIGTERM)
        assert first.wait(15) == 0
        assert not sock.exists()  # removed on the way out
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
        if first.stdout is not None:
            first.stdout.close()
        if first.stderr is not None:
            first.stderr.close()


@pytest.mark.parametrize("runtime", ["asyncio", "gevent", "threaded"])
def test_a_default_socket_that_cannot_be_made_is_skipped_a_given_one_is_not(
    tmp_path: Path, runtime: str
) -> None:
    """An ordinary user cannot create /run/candy: the daemon runs without candy status;
    a path the operator named must work (exit 1 with one line)."""
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    sock = blocked / "sub" / "server.sock"  # its folder can never be made
    port = free_port()
    argv = [
        sys.executable, "-m", "shells.cli", "-m", "server", "-w", f"ws://127.0.0.1:{port}",
        "-p", "pw", "--runtime", runtime, "--no-timestamp",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    given = subprocess.run(
        [*argv, "--control", str(sock)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert given.returncode == 1 and "cannot create the folder" in given.stderr, given.stderr
    code = (
        "import sys, pathlib; from shells import settings;"
        f" settings.CONTROL_DIR = pathlib.Path({str(blocked / 'sub')!r});"
        " from shells.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv[3:]], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        assert wait_until(listening, 15), "the daemon did not start"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "candy status will not reach this daemon" in err
