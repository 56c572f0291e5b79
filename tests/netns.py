"""A small lab of Linux network namespaces for end-to-end tests.

Everything happens inside namespaces the lab creates (``ip -n`` / ``ip netns exec``);
the host's own interfaces, routes and iptables are never touched. Use documentation
ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) and 10.99.x.0/24 only inside
the lab. Every command and wait is bounded in time, and ``close()`` never raises.

Typical use in a test module::

    import pytest
    from netns import have_netns_privileges, make_lab

    OK, WHY = have_netns_privileges()
    pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not OK, reason=WHY)]

    @pytest.fixture
    def lab():
        with make_lab("cx") as lab:
            yield lab

    def test_ping(lab):
        a, b = lab.add_ns("a"), lab.add_ns("b")
        lab.link(a, "192.0.2.1/24", b, "192.0.2.2/24")
        lab.run(a, "ping", "-c", "2", "-W", "1", "192.0.2.2")
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "CommandError",
    "CommandTimeout",
    "Lab",
    "LabError",
    "Netns",
    "have_netns_privileges",
    "make_lab",
    "wait_until",
]

NETNS_ETC = Path("/etc/netns")
_NETNS_ETC_PREEXISTED = NETNS_ETC.exists()
DEFAULT_TIMEOUT = 10.0
TERM_GRACE = 3.0
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")
_OPEN_LABS: set[Lab] = set()


class LabError(RuntimeError):
    """The lab was used wrongly (unknown namespace, duplicate role, closed lab)."""


def _tail(text: str | bytes | None, limit: int = 4000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _describe(stdout: str | bytes | None, stderr: str | bytes | None) -> str:
    parts = [
        f"\n--- {label} ---\n{_tail(text)}"
        for label, text in (("stdout", stdout), ("stderr", stderr))
        if _tail(text)
    ]
    return "".join(parts)


class CommandError(subprocess.CalledProcessError):
    """A command failed; ``str()`` includes its output."""

    def __str__(self) -> str:
        return f"{shlex.join(self.cmd)} exited with {self.returncode}" + _describe(
            self.stdout, self.stderr
        )


class CommandTimeout(subprocess.TimeoutExpired):
    """A command ran out of time and was killed; ``str()`` includes its output."""

    def __str__(self) -> str:
        return f"{shlex.join(self.cmd)} timed out after {self.timeout:g} s" + _describe(
            self.stdout, self.stderr
        )


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, sig)


def _run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in its own process group; on timeout kill the whole group."""
    argv = [str(a) for a in argv]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=None if env is None else dict(env),
        cwd=cwd,
        start_new_session=True,
    )
    with proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            try:
                out, err = proc.communicate(timeout=2)
            except subprocess.TimeoutExpired:  # a grandchild left its group, holding the pipes
                out, err = "", ""
            raise CommandTimeout(argv, timeout, out, err) from None
        except BaseException:
            _kill_group(proc.pid, signal.SIGKILL)
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, argv, out, err)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is truthy (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval, remaining))


def _one_line(exc: BaseException) -> str:
    stderr = getattr(exc, "stderr", None)
    text = _tail(stderr) or str(exc)
    return " ".join(text.split())


@functools.cache
def have_netns_privileges() -> tuple[bool, str]:
    """(True, "") when namespaces and TUN devices can be used here, else (False, reason)."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces and TUN devices)"
    if shutil.which("ip") is None:
        return False, "the 'ip' command (iproute2) is not installed"
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun is missing (tun kernel module not loaded?)"
    probe = f"candyprobe-{secrets.token_hex(3)}"
    try:
        _run(["ip", "netns", "add", probe])
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"'ip netns add' does not work here: {_one_line(exc)}"
    try:
        _run(["ip", "netns", "del", probe])
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"'ip netns del' does not work here: {_one_line(exc)}"
    return True, ""


@dataclass
class _Spawned:
    proc: subprocess.Popen[bytes]
    ns: str
    argv: list[str]
    log_path: Path


class Lab:
    """A set of network namespaces, links and background processes, torn down by close()."""

    def __init__(self, prefix: str) -> None:
        """Start an empty lab; namespace names are ``<prefix><random>-<role>``."""
        if not _NAME_RE.match(prefix):
            raise LabError(f"bad lab prefix {prefix!r}: use 1-20 of [a-z0-9-]")
        self.id = f"{prefix}{secrets.token_hex(3)}"
        self._namespaces: dict[str, str] = {}  # role -> namespace name
        self._procs: list[_Spawned] = []
        self._links = 0
        self._closed = False
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.id}-"))
        _OPEN_LABS.add(self)

    # -- namespaces --------------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        """Names of all namespaces of this lab, in creation order."""
        return list(self._namespaces.values())

    def add_ns(self, role: str) -> str:
        """Create a namespace with ``lo`` up and resolv.conf pointing at 127.0.0.1."""
        self._check_open()
        if not _NAME_RE.match(role):
            raise LabError(f"bad role {role!r}: use 1-20 of [a-z0-9-]")
        if role in self._namespaces:
            raise LabError(f"role {role!r} already exists in lab {self.id}")
        name = f"{self.id}-{role}"
        _run(["ip", "netns", "add", name])
        self._namespaces[role] = name
        etc = NETNS_ETC / name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        self._ip(name, "link", "set", "lo", "up")
        return name

    def link(
        self,
        ns_a: str,
        addr_a: str | None,
        ns_b: str,
        addr_b: str | None,
        *,
        if_a: str | None = None,
        if_b: str | None = None,
    ) -> tuple[str, str]:
        """Join two namespaces with a veth pair; returns the interface names (a, b)."""
        self._check_ns(ns_a, ns_b)
        n = self._next_link()
        if_a = if_a or f"veth{n}"
        if_b = if_b or (f"veth{n}" if ns_a != ns_b else f"veth{n}b")
        self._ip(ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        self._iface_up(ns_a, if_a, addr_a)
        self._iface_up(ns_b, if_b, addr_b)
        return if_a, if_b

    def bridge(
        self,
        ns_hub: str,
        members: Sequence[tuple[str, str | None]],
        *,
        hub_cidr: str | None = None,
    ) -> list[str]:
        """One L2 segment: a bridge in ``ns_hub`` and a veth to each (ns, cidr) member.

        Returns the member-side interface names in order; ``hub_cidr`` optionally puts
        an address on the bridge itself.
        """
        self._check_ns(ns_hub, *(ns for ns, _ in members))
        br = f"br{self._next_link()}"
        self._ip(ns_hub, "link", "add", br, "type", "bridge")
        self._iface_up(ns_hub, br, hub_cidr)
        names = []
        for i, (ns, cidr) in enumerate(members):
            port = f"{br}p{i}"
            member_if = f"veth{self._next_link()}"
            self._ip(
                ns_hub, "link", "add", port, "type", "veth", "peer", "name", member_if, "netns", ns
            )
            self._ip(ns_hub, "link", "set", port, "master", br, "up")
            self._iface_up(ns, member_if, cidr)
            names.append(member_if)
        return names

    def route(self, ns: str, dst_cidr: str, via: str, *, dev: str | None = None) -> None:
        """Add or replace a route (``dst_cidr`` may be "default") in ``ns``."""
        self._check_ns(ns)
        self._ip(ns, "route", "replace", dst_cidr, "via", via, *(("dev", dev) if dev else ()))

    def sysctl(self, ns: str, key: str, value: object) -> None:
        """Set a (per-namespace) sysctl such as net.ipv4.ip_forward inside ``ns``."""
        if "=" in key or not key:
            raise LabError(f"bad sysctl key {key!r}")
        self.run(ns, "sysctl", "-qw", f"{key}={value}")

    def nat(self, ns_nat: str, out_iface: str, cone: bool = True) -> None:
        """Make ``ns_nat`` a NAT router: forwarding on, MASQUERADE out of ``out_iface``.

        With ``cone`` it also drops new inbound UDP to itself, like a home router.
        """
        self.sysctl(ns_nat, "net.ipv4.ip_forward", 1)
        ipt = ("iptables", "-w", "5")
        masquerade = f"-t nat -A POSTROUTING -o {out_iface} -j MASQUERADE"
        self.run(ns_nat, *ipt, *masquerade.split())
        if cone:
            drop_new_udp = "-A INPUT -p udp -m conntrack --ctstate NEW -j DROP"
            self.run(ns_nat, *ipt, *drop_new_udp.split())

    # -- processes ---------------------------------------------------------------------

    def run(
        self,
        ns: str,
        *argv: str,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in ``ns`` and capture its text output.

        ``env`` is merged over os.environ. Raises CommandError (a CalledProcessError) on
        failure when ``check``, CommandTimeout (a TimeoutExpired) after ``timeout`` s.
        """
        self._check_ns(ns)
        return _run(
            ["ip", "netns", "exec", ns, *argv],
            timeout=timeout,
            check=check,
            env=self._env(env),
            cwd=cwd,
            input=input,
        )

    def spawn(
        self,
        ns: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        *,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a background process in ``ns``; stdout+stderr go to a log file.

        ``env`` is merged over os.environ. The process is stopped by close().
        """
        self._check_ns(ns)
        argv = [str(a) for a in argv]
        if log_path is None:
            role = ns.removeprefix(f"{self.id}-")
            log_path = self.tmpdir / f"{len(self._procs):02d}-{role}-{Path(argv[0]).name}.log"
        path = Path(log_path)
        with path.open("wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(env),
                cwd=cwd,
                start_new_session=True,
            )
        self._procs.append(_Spawned(proc, ns, argv, path))
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """The output so far of one process started by :meth:`spawn` ("" if none yet)."""
        for sp in self._procs:
            if sp.proc is proc:
                try:
                    return sp.log_path.read_bytes().decode(errors="replace")
                except OSError:
                    return ""
        raise LabError(f"process {proc.pid} was not started by lab {self.id}")

    def logs(self, tail: int = 20000) -> str:
        """All spawned processes' command lines and (last ``tail`` characters of) output.

        Meant for failure messages; poll a single process's output with :meth:`log`.
        """
        parts = []
        for sp in self._procs:
            rc = sp.proc.poll()
            state = "running" if rc is None else f"exit {rc}"
            try:
                text = sp.log_path.read_bytes().decode(errors="replace")
            except OSError as exc:
                text = f"<log unreadable: {exc}>"
            if len(text) > tail:
                text = "..." + text[-tail:]
            parts.append(f"===== [{sp.ns}] {shlex.join(sp.argv)} ({state}) =====\n{text}")
        return "\n".join(parts)

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop all processes and delete all namespaces. Never raises; safe to repeat."""
        if self._closed:
            return
        self._closed = True
        _OPEN_LABS.discard(self)
        for step in (self._stop_processes, self._kill_stragglers, self._delete_namespaces):
            with contextlib.suppress(Exception):
                step()
        with contextlib.suppress(Exception):
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _stop_processes(self) -> None:
        running = [sp.proc for sp in self._procs if sp.proc.poll() is None]
        for proc in running:
            _kill_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in running:
            if proc.poll() is None:
                _kill_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2)

    def _kill_stragglers(self) -> None:
        """SIGKILL whatever still lives in our namespaces (e.g. children of run())."""
        for name in self._namespaces.values():
            with contextlib.suppress(Exception):
                out = _run(["ip", "netns", "pids", name], timeout=5, check=False).stdout
                for pid in (int(p) for p in out.split() if p.isdigit()):
                    if pid != os.getpid():
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)

    def _delete_namespaces(self) -> None:
        for name in self._namespaces.values():
            for _ in range(3):
                with contextlib.suppress(Exception):
                    _run(["ip", "netns", "del", name], timeout=5, check=False)
                if not Path("/run/netns", name).exists():
                    break
                time.sleep(0.1)
            with contextlib.suppress(Exception):
                shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        if not _NETNS_ETC_PREEXISTED:
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()  # only succeeds when no other lab uses it

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Lab {self.id} namespaces={self.namespaces} closed={self._closed}>"

    # -- helpers -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LabError(f"lab {self.id} is closed")

    def _check_ns(self, *names: str) -> None:
        self._check_open()
        for name in names:
            if name not in self._namespaces.values():
                raise LabError(f"{name!r} is not a namespace of lab {self.id}")

    def _next_link(self) -> int:
        self._links += 1
        return self._links

    def _ip(self, ns: str, *args: str) -> None:
        _run(["ip", "-n", ns, *args])

    def _iface_up(self, ns: str, iface: str, cidr: str | None) -> None:
        if cidr:
            self._ip(ns, "addr", "add", cidr, "dev", iface)
        self._ip(ns, "link", "set", iface, "up")

    @staticmethod
    def _env(extra: Mapping[str, str] | None) -> dict[str, str] | None:
        return None if extra is None else {**os.environ, **extra}


Netns = Lab
"""Alias of :class:`Lab`."""


def make_lab(prefix: str) -> Lab:
    """A new, empty :class:`Lab`; use it as a context manager in a pytest fixture."""
    return Lab(prefix)


@atexit.register
def _close_forgotten_labs() -> None:
    for lab in list(_OPEN_LABS):
        lab.close()
