"""The Linux TUN device shared by all runtime shells (layer 3, no packet info header)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self

__all__ = ["TunDevice", "TunError"]

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
READ_SIZE = 65535
_IFREQ_SIZE = 40


class TunError(OSError):
    """A TUN device could not be created or configured; the message says why."""


def _tun_error(name: str, exc: OSError) -> TunError:
    if isinstance(exc, FileNotFoundError) or exc.errno in (errno.ENOENT, errno.ENODEV):
        reason = f"{TUN_PATH} is missing (is the tun kernel module loaded?)"
    elif exc.errno in (errno.EPERM, errno.EACCES):
        reason = "permission denied (run as root or with CAP_NET_ADMIN)"
    elif exc.errno == errno.EBUSY:
        reason = "device busy (the name is in use by another device)"
    else:
        reason = exc.strerror or str(exc)
    err = TunError(f"cannot create TUN device {name}: {reason}")
    err.errno = exc.errno
    return err


class TunDevice:
    """A non-blocking TUN device; closing it removes the interface."""

    def __init__(self, fd: int, name: str, mtu: int = 1400, txqueuelen: int = 1000) -> None:
        """Wrap an already attached TUN fd; use :meth:`create` instead."""
        self._fd = fd
        self.name = name
        self.mtu = mtu
        self.txqueuelen = txqueuelen
        self.dropped = 0
        """Packets dropped by :meth:`write` because the kernel queue was full."""
        self.routes: tuple[ipaddress.IPv4Network, ...] = ()
        """Subnet routes installed through this device (:meth:`set_routes`)."""

    @classmethod
    def create(cls, name: str, mtu: int = 1400, txqueuelen: int = 1000) -> Self:
        """Create the TUN interface ``name`` (not yet configured or up)."""
        raw = name.encode()
        if not raw or len(raw) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
            raise TunError(
                f"cannot create TUN device {name!r}: "
                f"name must be 1 to {IFNAMSIZ - 1} characters without '/' or spaces"
            )
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _tun_error(name, exc) from exc
        try:
            ifr = struct.pack(f"{IFNAMSIZ}sH", raw, IFF_TUN | IFF_NO_PI).ljust(_IFREQ_SIZE, b"\0")
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            raise _tun_error(name, exc) from exc
        actual = res[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        return cls(fd, actual, mtu, txqueuelen)

    def _in_thread(self, what: str, job: Callable[[], None]) -> None:
        """Run netlink ``job`` in a helper thread (see :meth:`configure`), re-raising its error."""
        errors: list[BaseException] = []

        def work() -> None:
            try:
                job()
            except BaseException as exc:  # handed back to the caller below
                errors.append(exc)

        worker = threading.Thread(target=work, name=f"{what}-{self.name}", daemon=True)
        worker.start()
        worker.join()
        if errors:
            raise errors[0]

    def set_routes(self, routes: Iterable[ipaddress.IPv4Network]) -> None:
        """Route exactly ``routes`` through this device: add the new ones, remove the others.

        Subnet routes pushed by the server (6.x ``sdwan``). An existing route to the same
        destination elsewhere is replaced. Blocks until done; raises :class:`TunError`.
        """
        wanted = tuple(dict.fromkeys(routes))
        self._in_thread("routes", lambda: self._routes_netlink(wanted))

    def _routes_netlink(self, wanted: tuple[ipaddress.IPv4Network, ...]) -> None:
        from pyroute2 import IPRoute

        ipr = IPRoute()
        try:
            found = ipr.link_lookup(ifname=self.name)
            if not found:
                raise TunError(f"cannot set routes on {self.name}: interface not found")
            index = found[0]
            for net in self.routes:
                if net not in wanted:
                    with contextlib.suppress(OSError):  # already gone (link down, by hand)
                        ipr.route("del", dst=str(net), oif=index)
                    self.routes = tuple(r for r in self.routes if r != net)
            for net in wanted:
                if net not in self.routes:
                    ipr.route("replace", dst=str(net), oif=index)
                    self.routes = (*self.routes, net)
        except TunError:
            raise
        except OSError as exc:
            raise TunError(f"cannot set routes on {self.name}: {exc.strerror or exc}") from exc
        finally:
            ipr.close()

    def configure(self, interface: ipaddress.IPv4Interface) -> None:
        """Set the only IPv4 address, MTU and txqueuelen, and bring the link up.

        Blocks until done. The netlink work runs in a short-lived helper thread: pyroute2's
        synchronous ``IPRoute`` drives an asyncio loop of its own and picks up the caller's
        running loop when there is one, which fails inside an asyncio shell ("this event
        loop is already running").
        """
        self._in_thread("configure", lambda: self._configure_netlink(interface))

    def _configure_netlink(self, interface: ipaddress.IPv4Interface) -> None:
        from pyroute2 import IPRoute  # imported lazily: a slow import not every user needs

        address = str(interface.ip)
        ipr = IPRoute()
        try:
            found = ipr.link_lookup(ifname=self.name)
            if not found:
                raise TunError(f"cannot configure TUN device {self.name}: interface not found")
            index = found[0]
            for old in ipr.get_addr(index=index, family=socket.AF_INET):
                ipr.addr(
                    "del",
                    index=index,
                    address=old.get_attr("IFA_ADDRESS"),
                    local=old.get_attr("IFA_LOCAL"),
                    prefixlen=old["prefixlen"],
                )
            ipr.addr(
                "add",
                index=index,
                address=address,
                local=address,
                prefixlen=interface.network.prefixlen,
            )
            ipr.link("set", index=index, mtu=self.mtu, txqlen=self.txqueuelen, state="up")
        except TunError:
            raise
        except OSError as exc:
            raise TunError(
                f"cannot configure TUN device {self.name} with {interface}: {exc.strerror or exc}"
            ) from exc
        finally:
            ipr.close()

    def fileno(self) -> int:
        """The file descriptor, for select/poll/event loops."""
        if self._fd < 0:
            raise ValueError(f"TUN device {self.name} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._fd < 0

    def read(self) -> bytes | None:
        """Read one packet, or None when none is waiting."""
        try:
            return os.read(self.fileno(), READ_SIZE)
        except BlockingIOError:
            return None

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        """Read up to ``max_packets`` packets, stopping early when none is waiting."""
        packets: list[bytes] = []
        fd = self.fileno()
        while len(packets) < max_packets:
            try:
                packets.append(os.read(fd, READ_SIZE))
            except BlockingIOError:
                break
        return packets

    def write(self, packet: bytes) -> None:
        """Write one packet; when the kernel queue is full it is dropped and counted."""
        try:
            os.write(self.fileno(), packet)
        except OSError:  # queue full (EAGAIN) or a packet the kernel refuses (EINVAL)
            self.dropped += 1

    def close(self) -> None:
        """Remove our routes, close the fd (which removes the interface). Safe to call twice."""
        if self.routes and self._fd >= 0:
            with contextlib.suppress(OSError):  # they go with the interface anyway
                self.set_routes(())
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<TunDevice {self.name} {state} dropped={self.dropped}>"
