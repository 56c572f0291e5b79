"""The daemons as an unprivileged user, with candy.service's capabilities and filters.

contrib/systemd/candy.service runs ``candy`` as a non-root user whose only capability is
CAP_NET_ADMIN. These tests do the same without systemd (which need not be PID 1 here): a
real system user ``candytest`` (created by the module, removed afterwards unless it
existed before) runs the client in a network namespace, against a relay and a second
client running as root, and must create its TUN device, join, carry pings both ways and
keep its state files; with every runtime. The relay also runs as that user, with no
capability at all (server.conf without CAP_NET_BIND_SERVICE). The control experiment: the
client without CAP_NET_ADMIN gets no TUN device. Like the unit, each run also has:

* ``setpriv``: the user's uid and gid, ambient, inheritable and bounding capability sets
  of CAP_NET_ADMIN alone (or empty), no_new_privs (``NoNewPrivileges=yes``), a clean
  environment;
* a private mount namespace with a fresh procfs mounted ``subset=pid,hidepid=invisible``
  (``ProcSubset=pid``, ``ProtectProc=invisible``);
* the unit's seccomp filters (system call allow list, W+X memory, address families,
  namespaces), rebuilt from the installed systemd's groups by tests/sandbox.py; without
  ``systemd-analyze`` or libseccomp this part is left out and the test says so.

Not reproduced: ``ProtectSystem=``/``ProtectHome=`` (the user can only write its own
directories anyway), ``DevicePolicy=`` (the daemon opens /dev/net/tun only).

Two things of this machine are worked around inside that private mount namespace only, never
on the host: when /dev/net/tun is not world read-write (distributions' udev rules make it
0666; some containers have 0600) a 0666 node of the same device is bound over it, and when
the Python interpreter or its packages lie under a directory the user cannot enter (a
pyenv under /root, mode 0700) a tmpfs replaces that directory, holding bind mounts of just
the needed subtrees, so the user runs the very same interpreter and packages. If the user
still cannot import them, the tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sandbox
from netns import Lab, have_netns_privileges, make_lab, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
OK, WHY = have_netns_privileges()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not OK, reason=WHY or "netns unavailable")]

USER = "candytest"
USER_COMMENT = "candy-py test user (tests/test_e2e_unprivileged.py)"
CAP_NET_ADMIN = 12
RUNTIMES = ["asyncio", "gevent", "threaded"]

PASSWORD = "secret"
VPN = ipaddress.IPv4Network("10.99.0.0/24")
SERVER_IP = "192.0.2.1"
SERVER_URL = f"ws://{SERVER_IP}:8080"
PUBLIC = {"a": "192.0.2.2", "b": "192.0.2.3"}
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
JOINED = "joined the network as"
LISTENING = "relay listening on"
ROOT_ENV = {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
_LOG_NUMBERS = itertools.count(1)


# --- the user ------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    """``candytest``: created if missing (and then removed at the end), never a login."""
    if shutil.which("useradd") is None or shutil.which("setpriv") is None:
        pytest.skip("needs useradd and setpriv (util-linux)")
    try:
        pw = pwd.getpwnam(USER)
        ours = pw.pw_gecos == USER_COMMENT  # left behind by an interrupted run of ours
    except KeyError:
        out = _run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
             "/nonexistent", "--shell", "/usr/sbin/nologin", "--comment", USER_COMMENT, USER]
        )  # fmt: skip
        if out.returncode != 0:
            pytest.skip(f"cannot create the user {USER}: {out.stderr.strip()}")
        pw, ours = pwd.getpwnam(USER), True
    try:
        yield User(USER, pw.pw_uid, pw.pw_gid)
    finally:
        if ours:
            _run(["userdel", USER])
            if _run(["getent", "group", USER]).returncode == 0:
                _run(["groupdel", USER])


# --- what the user needs to read -----------------------------------------------------------


def _needed_paths() -> list[Path]:
    """The interpreter, its standard library and packages, and the repository."""
    paths = {Path(os.path.realpath(sys.executable)), REPO_ROOT}
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        paths.add(Path(os.path.realpath(prefix)))
    for sp in site.getsitepackages():
        if Path(sp).exists():
            paths.add(Path(os.path.realpath(sp)))
    return sorted(paths)


def _closed_ancestors(user: User) -> dict[Path, set[str]]:
    """Directories on the way to a needed path that ``user`` cannot enter -> the entries
    below them that lead to the needed paths."""
    closed: dict[Path, set[str]] = {}
    for path in _needed_paths():
        for parent in reversed(path.parents):
            st = parent.stat()
            if st.st_uid == user.uid:
                enter = st.st_mode & stat.S_IXUSR
            elif st.st_gid == user.gid:
                enter = st.st_mode & stat.S_IXGRP
            else:
                enter = st.st_mode & stat.S_IXOTH
            if not enter:
                child = path.relative_to(parent).parts[0]
                closed.setdefault(parent, set()).add(child)
                break
    return closed


def _tun_world_rw() -> bool:
    mode = os.stat("/dev/net/tun").st_mode
    return mode & (stat.S_IROTH | stat.S_IWOTH) == (stat.S_IROTH | stat.S_IWOTH)


# --- running as the user -------------------------------------------------------------------


@dataclass
class Sandbox:
    """Builds the command lines that run a program as the user, as candy.service would."""

    user: User
    scratch: Path  # root's: mount points for the private mount namespace
    home: Path  # the user's: HOME, state directory, control socket
    spec: Path | None  # seccomp spec for tests/sandbox.py, or None
    notes: list[str] = field(default_factory=list)
    _count: int = 0

    def command(self, argv: list[str], *, seccomp: bool = True, caps: bool = True) -> list[str]:
        """``argv`` as the user with CAP_NET_ADMIN only (or none), for ``ip netns exec``."""
        self._count += 1
        mnt = self.scratch / f"mnt{self._count}"
        mnt.mkdir()
        script = ["set -e", f"mount -t tmpfs -o mode=0755 candy-sandbox {q(mnt)}"]
        if not _tun_world_rw():
            script += [
                f"mknod -m 0666 {q(mnt / 'tun')} c 10 200",
                f"mount --bind {q(mnt / 'tun')} /dev/net/tun",
            ]
        for i, (closed, children) in enumerate(sorted(_closed_ancestors(self.user).items())):
            for j, child in enumerate(sorted(children)):
                keep = mnt / f"keep{i}-{j}"
                script += [f"mkdir {q(keep)}", f"mount --bind {q(closed / child)} {q(keep)}"]
            script.append(f"mount -t tmpfs -o mode=0755 candy-sandbox {q(closed)}")
            for j, child in enumerate(sorted(children)):
                keep, target = mnt / f"keep{i}-{j}", closed / child
                make = "mkdir" if target.is_dir() else "touch"
                script += [f"{make} {q(target)}", f"mount --bind {q(keep)} {q(target)}"]
        script.append("mount -t proc -o subset=pid,hidepid=invisible proc /proc")
        env = [
            "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", f"HOME={self.home}",
            f"PYTHONPATH={REPO_ROOT}", "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1",
        ]  # fmt: skip
        if seccomp and self.spec is not None:
            launcher = REPO_ROOT / "tests" / "sandbox.py"
            argv = [sys.executable, str(launcher), str(self.spec), "--", *argv]
        add = ",+net_admin" if caps else ""
        setpriv = [
            "setpriv", f"--reuid={self.user.uid}", f"--regid={self.user.gid}", "--init-groups",
            f"--inh-caps=-all{add}", f"--ambient-caps=-all{add}", f"--bounding-set=-all{add}",
            "--no-new-privs", "--",
        ]  # fmt: skip
        script.append("exec " + shlex.join(setpriv + env + argv))
        shell = ["sh", "-c", "\n".join(script)]
        return ["unshare", "--mount", "--propagation", "private", "--", *shell]


def q(path: Path) -> str:
    return shlex.quote(str(path))


PROBE = """
import json, os, sys
import candy_core, cryptography, h11, libconf, pyroute2, shells.cli, wsproto
try:
    import gevent
except ImportError:
    gevent = None
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(), "shells": shells.cli.__file__,
    "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
    "cap_amb": status["CapAmb"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "seccomp": status["Seccomp"].strip(), "gevent": gevent is not None,
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "proc_sys": os.path.exists("/proc/sys"),
}))
"""


@dataclass
class Net:
    lab: Lab
    srv: str
    a: str
    b: str
    box: Sandbox


@pytest.fixture(scope="module")
def net(user: User) -> Iterator[Net]:
    base = Path(tempfile.mkdtemp(prefix="candy-unpriv-"))
    try:
        os.chmod(base, 0o755)
        home = base / "home"
        home.mkdir(mode=0o700)
        os.chown(home, user.uid, user.gid)
        with make_lab("cunpriv") as lab:
            hub = lab.add_ns("hub")
            srv, a, b = lab.add_ns("srv"), lab.add_ns("a"), lab.add_ns("b")
            lab.bridge(
                hub, [(srv, f"{SERVER_IP}/24"), (a, f"{PUBLIC['a']}/24"), (b, f"{PUBLIC['b']}/24")]
            )
            scratch = lab.tmpdir / "sandbox"
            scratch.mkdir()
            box = Sandbox(user, scratch, home, _seccomp_spec(base))
            _probe(lab, a, box)
            yield Net(lab, srv, a, b, box)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _seccomp_spec(base: Path) -> Path | None:
    """The unit's filters as tests/sandbox.py's spec file (readable by the user), or None."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        print("\nseccomp filters left out: systemd-analyze is not installed")
        return None
    try:
        spec = sandbox.unit_spec(sandbox.syscall_groups(analyze))
        sandbox._Seccomp()  # libseccomp is there
    except sandbox.SandboxError as exc:
        print(f"\nseccomp filters left out: {exc}")
        return None
    path = base / "seccomp.json"
    path.write_text(json.dumps(spec))
    path.chmod(0o644)
    return path


def _probe(lab: Lab, ns: str, box: Sandbox) -> None:
    """The user can run this interpreter with its packages and this repository, or skip."""
    closed = _closed_ancestors(box.user)
    for where, children in closed.items():
        box.notes.append(
            f"{where} cannot be entered by {box.user.name}; in the daemon's mount namespace a "
            f"tmpfs replaces it, with bind mounts of {', '.join(sorted(children))}"
        )
    if not _tun_world_rw():
        mode = stat.filemode(os.stat("/dev/net/tun").st_mode)
        box.notes.append(f"/dev/net/tun is {mode} here; a 0666 node is bound over it there")
    out = lab.run(ns, *box.command([sys.executable, "-c", PROBE], seccomp=False), check=False,
                  cwd=REPO_ROOT, timeout=30)  # fmt: skip
    if out.returncode != 0:
        pytest.skip(
            f"{box.user.name} cannot run {sys.executable} with candy-py's packages "
            f"(exit {out.returncode}): {out.stderr.strip()[-600:]}"
        )
    info = json.loads(out.stdout)
    assert info["shells"] == str(REPO_ROOT / "shells" / "cli.py"), info
    assert (info["uid"], info["gid"]) == (box.user.uid, box.user.gid), info
    for key in ("cap_eff", "cap_bnd", "cap_amb"):
        assert int(info[key], 16) == 1 << CAP_NET_ADMIN, info
    assert info["no_new_privs"] == "1", info
    assert info["pids"] == [info["pid"]], f"hidepid=invisible: only its own process {info}"
    assert not info["proc_sys"], f"subset=pid: no /proc/sys {info}"
    print("\n" + "\n".join(box.notes))


# --- the daemons ---------------------------------------------------------------------------


class Daemons:
    """One test's processes: started on demand, all stopped when the test ends."""

    def __init__(self, net: Net, name: str, tmp: Path) -> None:
        self.net, self.lab, self.name, self.tmp = net, net.lab, name, tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, ns: str, argv: list[str], label: str) -> subprocess.Popen[bytes]:
        log = self.lab.tmpdir / f"{next(_LOG_NUMBERS):03d}-{self.name}-{label}.log"
        proc = self.lab.spawn(ns, argv, env=ROOT_ENV, log_path=log, cwd=REPO_ROOT)
        self.procs.append((label, proc))
        return proc

    def server(self, runtime: str, *, as_user: bool = False) -> subprocess.Popen[bytes]:
        """The relay, as root or (``as_user``) as the user in the sandbox with no capability."""
        argv = [sys.executable, "-m", "shells.cli", "-m", "server", "-w", "ws://0.0.0.0:8080"]
        argv += ["-p", PASSWORD, "-d", str(VPN), "--runtime", runtime, "--control", "none"]
        if as_user:
            argv = self.net.box.command(argv, caps=False)
        proc = self.spawn(self.net.srv, argv, "server-user" if as_user else "server")
        self.wait_log(proc, LISTENING)
        return proc

    def root_client(self, runtime: str, role: str = "b") -> subprocess.Popen[bytes]:
        """A client as root, in namespace ``role`` (``b``: the other end of the pings)."""
        argv = [sys.executable, "-m", "shells.cli", "-m", "client", "-w", SERVER_URL]
        argv += ["-p", PASSWORD, "-n", role, "--state-dir", str(self.tmp / f"state-{role}")]
        argv += ["--runtime", runtime, "--control", "none"]
        ns = {"a": self.net.a, "b": self.net.b}[role]
        return self.spawn(ns, argv, f"client-{role}-root")

    def user_client(
        self, runtime: str, *, caps: bool = True, control: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Client ``a``, as the user in the sandbox; state and control socket in its home."""
        home = self.net.box.home
        argv = [sys.executable, "-m", "shells.cli", "-m", "client", "-w", SERVER_URL]
        argv += ["-p", PASSWORD, "-n", "a", "--state-dir", str(home / "state")]
        argv += ["--runtime", runtime, "--debug"]
        argv += ["--control", str(control) if control is not None else "none"]
        command = self.net.box.command(argv, caps=caps)
        return self.spawn(self.net.a, command, f"client-a-{self.net.box.user.name}")

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.lab.log(proc)

    def logs(self) -> str:
        parts = []
        for label, proc in self.procs:
            state = "running" if proc.poll() is None else f"exit {proc.returncode}"
            parts.append(f"===== {label} pid {proc.pid} ({state}) =====\n{self.log(proc)[-8000:]}")
        return "\n".join(parts)

    def wait_log(self, proc: subprocess.Popen[bytes], text: str) -> None:
        wait_until(lambda: text in self.log(proc) or proc.poll() is not None, START_TIMEOUT, 0.05)
        assert text in self.log(proc), f"{text!r} not seen\n{self.logs()}"

    def address(self, ns: str, dev: str) -> ipaddress.IPv4Interface | None:
        out = self.lab.run(ns, "ip", "-j", "addr", "show", "dev", dev, check=False, timeout=5)
        if out.returncode != 0:
            return None
        for info in json.loads(out.stdout)[0].get("addr_info", []):
            if info.get("family") == "inet":
                return ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
        return None

    def wait_address(self, ns: str, dev: str) -> ipaddress.IPv4Interface:
        found: list[ipaddress.IPv4Interface] = []

        def has() -> bool:
            addr = self.address(ns, dev)
            found.extend([addr] if addr else [])
            return addr is not None

        assert wait_until(has, START_TIMEOUT, 0.1), f"{dev}: no address\n{self.logs()}"
        return found[-1]

    def ping(self, ns: str, dst: object) -> None:
        out = self.lab.run(ns, "ping", "-c", "3", "-W", "1", "-i", "0.2", str(dst),
                           check=False, timeout=10)  # fmt: skip
        assert out.returncode == 0, f"ping {dst}:\n{out.stdout}{out.stderr}\n{self.logs()}"

    def stop(self, proc: subprocess.Popen[bytes]) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pid {proc.pid} still running after SIGTERM\n{self.logs()}")

    def close(self) -> None:
        running = [proc for _, proc in self.procs if proc.poll() is None]
        for proc in running:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in running:
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2)


@pytest.fixture
def candy(net: Net, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Daemons]:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    daemons = Daemons(net, name, tmp_path)
    home = net.box.home
    try:
        yield daemons
    finally:
        daemons.close()
        for entry in home.iterdir():  # the next test starts with an empty home
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if os.environ.get("E2E_SHOW_LOGS"):
            print(daemons.logs())


def proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines())


def assert_least_privilege(
    proc: subprocess.Popen[bytes], user: User, sandboxed: bool, caps: int = 1 << CAP_NET_ADMIN
) -> None:
    """The daemon runs as ``user`` with the capabilities ``caps`` only, in the sandbox."""
    status = proc_status(proc.pid)
    assert "shells.cli" in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(), status
    assert status["Uid"].split() == [str(user.uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(user.gid)] * 4, status["Gid"]
    for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(status[key], 16) == caps, (key, status[key])
    assert status["NoNewPrivs"].strip() == "1"
    if sandboxed:  # the unit's four filters, plus none other
        assert status["Seccomp"].strip() == "2" and status["Seccomp_filters"].strip() == "4"


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_unprivileged_client_joins_pings_and_keeps_its_state(
    candy: Daemons, net: Net, runtime: str
) -> None:
    if runtime == "gevent":
        pytest.importorskip("gevent")
    user, home = net.box.user, net.box.home
    candy.server(runtime)
    b = candy.root_client(runtime)
    a = candy.user_client(runtime)
    candy.wait_log(a, JOINED)
    candy.wait_log(b, JOINED)
    assert_least_privilege(a, user, net.box.spec is not None)

    # It created and configured its TUN device with CAP_NET_ADMIN alone...
    addr_a = candy.wait_address(net.a, "candy-a")
    addr_b = candy.wait_address(net.b, "candy-b")
    assert addr_a.network == VPN and addr_a.ip != addr_b.ip, candy.logs()
    # ...and carries traffic both ways.
    candy.ping(net.a, addr_b.ip)
    candy.ping(net.b, addr_a.ip)

    # Its state directory, created by the user in the user's own directory.
    state = home / "state"
    address, vmac = state / "address" / "a", state / "vmac" / "a"
    assert address.read_text().strip() == str(addr_a), candy.logs()
    assert re.fullmatch(r"[0-9a-f]{16}", vmac.read_text().strip()), vmac.read_text()
    for path in (state, address.parent, address, vmac.parent, vmac):
        assert (path.stat().st_uid, path.stat().st_gid) == (user.uid, user.gid), path

    # SIGTERM: a clean exit, and the interface is gone.
    assert candy.stop(a) == 0, candy.logs()
    assert candy.address(net.a, "candy-a") is None
    assert "Traceback" not in candy.log(a), candy.logs()
    print(f"\n[{runtime}] uid {user.uid} ({user.name}), CAP_NET_ADMIN only: joined as {addr_a}")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_unprivileged_server_needs_no_capability(candy: Daemons, net: Net, runtime: str) -> None:
    """The relay in the same sandbox with no capability at all (its port is above 1023)."""
    if runtime == "gevent":
        pytest.importorskip("gevent")
    server = candy.server(runtime, as_user=True)
    assert_least_privilege(server, net.box.user, net.box.spec is not None, caps=0)
    a, b = candy.root_client(runtime, "a"), candy.root_client(runtime, "b")
    candy.wait_log(a, JOINED)
    candy.wait_log(b, JOINED)
    addr_a = candy.wait_address(net.a, "candy-a")
    addr_b = candy.wait_address(net.b, "candy-b")
    candy.ping(net.a, addr_b.ip)
    candy.ping(net.b, addr_a.ip)
    assert candy.stop(server) == 0, candy.logs()
    assert "Traceback" not in candy.log(server), candy.logs()


def _control_socket_implemented() -> bool:
    """Whether this tree's daemons serve ``--control`` (a Unix socket server in shells/)."""
    pattern = re.compile(r"AF_UNIX|unix_server|UnixStreamServer|bind_unix")
    return any(
        pattern.search(path.read_text())
        for path in (REPO_ROOT / "shells").rglob("*.py")
        if path.name != "settings.py"
    )


def test_unprivileged_client_serves_its_control_socket(candy: Daemons, net: Net) -> None:
    if not _control_socket_implemented():
        pytest.skip("this tree's daemons do not serve --control yet (no Unix socket in shells/)")
    user, home = net.box.user, net.box.home
    control = home / "run" / "client-a.sock"
    control.parent.mkdir()
    os.chown(control.parent, user.uid, user.gid)
    candy.server("asyncio")
    a = candy.user_client("asyncio", control=control)
    candy.wait_log(a, JOINED)
    assert wait_until(control.exists, 5, 0.05), f"no {control}\n{candy.logs()}"
    st = control.stat()
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == user.uid, stat.filemode(st.st_mode)
    # The user (not only root) can connect to it.
    connect = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(5); "
        "s.connect(sys.argv[1]); print('connected')"
    )
    argv = net.box.command([sys.executable, "-c", connect, str(control)], seccomp=False)
    out = net.lab.run(net.a, *argv, check=False, cwd=REPO_ROOT, timeout=20)
    assert out.returncode == 0 and "connected" in out.stdout, f"{out.stderr}\n{candy.logs()}"


def test_without_cap_net_admin_the_client_cannot_create_its_tun(candy: Daemons, net: Net) -> None:
    """The control experiment: the same sandbox minus CAP_NET_ADMIN gets no TUN device."""
    candy.server("asyncio")
    a = candy.user_client("asyncio", caps=False)
    wait_until(lambda: "CAP_NET_ADMIN" in candy.log(a) or a.poll() is not None, START_TIMEOUT)
    assert "permission denied (run as root or with CAP_NET_ADMIN)" in candy.log(a), candy.logs()
    assert candy.address(net.a, "candy-a") is None
    assert JOINED not in candy.log(a)
