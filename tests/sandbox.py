"""The seccomp part of contrib/systemd/candy.service, applied without systemd, then ``exec``.

systemd is not PID 1 on every test machine, so the end-to-end test of the unprivileged
client (tests/test_e2e_unprivileged.py) rebuilds the unit's system call filters itself
with libseccomp (through ctypes, as systemd uses it) and runs the daemon under them::

    python tests/sandbox.py SPEC.json -- python -m shells.cli -m client ...

SPEC.json is written by :func:`unit_spec` from the installed systemd's own system call
groups (``systemd-analyze syscall-filter``), so the lists match what systemd would load:

* ``SystemCallFilter=@system-service`` then ``~@privileged @resources``, with
  ``SystemCallErrorNumber=EPERM``: an allow list, everything else fails with EPERM;
  ``@default`` is always allowed, as systemd adds it to every allow list;
* ``SystemCallArchitectures=native``: other ABIs kill the process (libseccomp's default);
* ``MemoryDenyWriteExecute=yes``: EPERM for mmap with PROT_WRITE|PROT_EXEC, mprotect and
  pkey_mprotect with PROT_EXEC, shmat with SHM_EXEC (systemd 252's seccomp rules);
* ``RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK``: socket() of any other
  family fails with EAFNOSUPPORT;
* ``RestrictNamespaces=yes``: clone3 fails with ENOSYS (so the C library falls back to
  clone, whose flags can be checked), clone/unshare/setns with namespace flags with EPERM.

The other settings of the unit (users, capabilities, /proc options, mounts, devices) are
done by the test with setpriv and mounts; see its docstring. Linux x86-64/arm64 only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["SandboxError", "apply", "syscall_groups", "unit_spec"]

#: libseccomp's actions and comparison operators (seccomp.h).
ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000
CMP_EQ = 4
CMP_GE = 5
CMP_MASKED_EQ = 7

PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
CLONE_NEW_ANY = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
    | 0x00000080  # CLONE_NEWTIME
)
AF_MAX = 46  # one more than the highest address family of current kernels

#: The unit's settings that this module reproduces.
UNIT_ALLOW = ("@system-service",)
UNIT_DENY = ("@privileged", "@resources")
UNIT_FAMILIES = ("AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK")


class SandboxError(RuntimeError):
    """libseccomp or systemd-analyze is missing, or a filter could not be built."""


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


# --- the lists, from systemd ----------------------------------------------------------------


def syscall_groups(analyze: str = "systemd-analyze") -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter`` as {"@group": [entries, possibly "@groups"]}."""
    try:
        out = subprocess.run(
            [analyze, "syscall-filter"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxError(f"cannot list systemd's system call groups: {exc}") from exc
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if re.fullmatch(r"@[a-z0-9-]+", line):
            current = groups.setdefault(line, [])
        elif not line.strip() or not line.startswith(" "):
            current = None
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    if "@system-service" not in groups or "@default" not in groups:
        raise SandboxError("systemd-analyze syscall-filter printed no @system-service group")
    return groups


def _expand(names: tuple[str, ...], groups: dict[str, list[str]]) -> set[str]:
    found: set[str] = set()
    todo = list(names)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.startswith("@"):
            todo.extend(groups[name])
        else:
            found.add(name)
    return found


def unit_spec(groups: dict[str, list[str]]) -> dict[str, list]:
    """The filters of candy.service, as JSON-able data for :func:`apply`."""
    allowed = _expand((*UNIT_ALLOW, "@default"), groups) - _expand(UNIT_DENY, groups)
    return {
        "allow": sorted(allowed),
        "families": [int(getattr(socket, name)) for name in UNIT_FAMILIES],
    }


# --- loading the filters --------------------------------------------------------------------


class _Seccomp:
    def __init__(self) -> None:
        path = ctypes.util.find_library("seccomp")
        if path is None:
            raise SandboxError("libseccomp is not installed")
        lib = ctypes.CDLL(path, use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]  # fmt: skip
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.restype = None
        self.lib = lib

    def number(self, name: str) -> int | None:
        """The native system call number, or None when it does not exist here."""
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        return nr if nr >= 0 else None

    def load(self, default: int, rules: list[tuple[int, str, list[tuple[int, int, int, int]]]]):
        """One filter: ``default`` action, then (action, syscall, [(arg, op, a, b)]) rules."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise SandboxError("seccomp_init failed")
        try:
            for action, name, conds in rules:
                nr = self.number(name)
                if nr is None:
                    continue
                array = (_ArgCmp * max(1, len(conds)))(*(_ArgCmp(*c) for c in conds))
                rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(conds), array)
                if rc < 0:
                    raise SandboxError(f"seccomp_rule_add({name}): {os.strerror(-rc)}")
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise SandboxError(f"seccomp_load: {os.strerror(-rc)}")
        finally:
            self.lib.seccomp_release(ctx)


def apply(spec: dict[str, list]) -> None:
    """Load the filters of ``spec`` (from :func:`unit_spec`) into this process, for good."""
    sc = _Seccomp()
    eperm = _act_errno(errno.EPERM)
    # MemoryDenyWriteExecute=yes
    wx = PROT_WRITE | PROT_EXEC
    sc.load(
        ACT_ALLOW,
        [
            (eperm, "mmap", [(2, CMP_MASKED_EQ, wx, wx)]),
            (eperm, "mprotect", [(2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (eperm, "pkey_mprotect", [(2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (eperm, "shmat", [(2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
        ],
    )
    # RestrictAddressFamilies=
    families = set(spec["families"])
    refuse = _act_errno(errno.EAFNOSUPPORT)
    rules = [(refuse, "socket", [(0, CMP_EQ, af, 0)]) for af in range(AF_MAX) if af not in families]
    rules.append((refuse, "socket", [(0, CMP_GE, AF_MAX, 0)]))
    sc.load(ACT_ALLOW, rules)
    # RestrictNamespaces=yes: clone3's flags are behind a pointer, so it is refused outright.
    rules = [(_act_errno(errno.ENOSYS), "clone3", [])]
    rules += [
        (eperm, call, [(arg, CMP_MASKED_EQ, flag, flag)])
        for call, arg in (("clone", 0), ("unshare", 0), ("setns", 1))
        for flag in _bits(CLONE_NEW_ANY)
    ]
    sc.load(ACT_ALLOW, rules)
    # SystemCallFilter= (allow list, SystemCallErrorNumber=EPERM), last: it denies seccomp().
    sc.load(eperm, [(ACT_ALLOW, name, []) for name in spec["allow"]])


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: sandbox.py SPEC.json -- PROGRAM [ARG...]")
    spec = json.loads(Path(argv[0]).read_text())
    apply(spec)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
