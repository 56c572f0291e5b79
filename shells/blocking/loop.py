"""The runtime kit, and the lock, timer and flush that a blocking server and client share."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger("candy.blocking")

#: Every wait is bounded so that stop() is noticed promptly.
POLL = 0.5
RECV_SIZE = 65536


@dataclass(frozen=True)
class Kit:
    """The concurrency primitives of one runtime."""

    name: str
    spawn: Callable[..., Any]  # spawn(fn, *args) -> handle with .join(timeout)
    lock: Callable[[], Any]
    event: Callable[[], Any]
    queue: Callable[[], Any]
    socket: ModuleType
    ssl: ModuleType
    wait_readable: Callable[[int, float], bool]
    alive: Callable[[Any], bool]
    #: Whether a writer may write to an idle socket directly from the caller's thread.
    direct_send: bool
    sleep: Callable[[float], None]
    #: Whether a reader waits for its socket to be readable before calling ``recv``: a
    #: blocking ``recv(n)`` allocates its n-byte buffer before it waits, so with OS threads
    #: every idle connection would hold 64 KiB of heap (gevent's ``recv`` waits first itself).
    wait_before_recv: bool = False
    #: Whether workers are OS threads (then a TLS connection's reader and writer need a lock).
    threads: bool = False


def _no_deadline() -> float | None:
    return None


def _ignore_timer(now: float) -> None:
    pass


class Loop:
    """The lock, the timer and the flush shared by a blocking server and client.

    ``handle_timer(now)`` and ``flush()`` (which returns the core's next deadline) are the
    core's; a client whose core is made in ``start()`` sets them there.
    """

    def __init__(
        self,
        kit: Kit,
        handle_timer: Callable[[float], None] = _ignore_timer,
        flush: Callable[[], float | None] = _no_deadline,
    ) -> None:
        self.kit = kit
        self.lock = kit.lock()
        self.stopping = False
        self.handle_timer = handle_timer
        self.flush = flush
        self._deadline: float | None = None
        self._wake = kit.event()
        self.workers: list[Any] = []
        self._workers_lock = kit.lock()  # the accept loop and writers spawn from many threads
        #: Writers currently behind (over the high-water mark); readers then yield.
        self.backlogged = 0

    def spawn(self, fn: Callable[..., None], *args: object) -> None:
        worker = self.kit.spawn(self._guard, fn, *args)
        with self._workers_lock:
            workers = self.workers
            if len(workers) % 64 == 63:  # forget finished workers now and then: bounded memory
                alive = self.kit.alive
                workers[:] = [w for w in workers if alive(w)]
            workers.append(worker)

    def _guard(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            if not self.stopping:
                log.exception("%s worker %s failed", self.kit.name, fn.__name__)

    def flushed(self) -> None:
        """Flush the core (lock held) and re-arm the timer."""
        deadline = self.flush()
        if deadline is not None and (self._deadline is None or deadline < self._deadline):
            self._deadline = deadline
            self._wake.set()
        elif deadline is None:
            self._deadline = None

    def timer(self) -> None:
        while not self.stopping:
            deadline = self._deadline
            timeout = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if timeout > 0:
                self._wake.wait(timeout)
            self._wake.clear()
            if self.stopping:
                break
            with self.lock:
                now = time.monotonic()
                if self._deadline is not None and now >= self._deadline:
                    self._deadline = None
                    self.handle_timer(now)
                    self.flushed()

    def join(self, timeout: float = 3.0) -> None:
        self._wake.set()
        end = time.monotonic() + timeout
        for _ in range(3):  # a worker may spawn another (a writer) while stopping
            with self._workers_lock:
                workers = list(self.workers)
                self.workers.clear()
            if not workers:
                break
            for worker in workers:
                worker.join(max(0.0, end - time.monotonic()))


def recv_loop(
    loop: Loop,
    sock: Any,
    on_data: Callable[[bytes], None],
    on_error: Callable[[], None] | None = None,
) -> str:
    """Read one socket until EOF, error or stop, flushing after each read; returns why it ended.

    If ``on_data`` raises, ``on_error`` is called inside the ``except`` block (to log and
    count) and the loop ends with "internal error": the stream cannot be trusted any more.
    """
    kit = loop.kit
    timeout_error = kit.socket.timeout
    fd = sock.fileno()
    wait = kit.wait_readable if kit.wait_before_recv else None
    idle = sock.gettimeout() or POLL  # stop() shuts the socket down, which wakes the wait
    pending = getattr(sock, "pending", None)  # TLS: decrypted bytes need no readable fd
    while not loop.stopping:
        if wait is not None and not (pending is not None and pending()) and not wait(fd, idle):
            continue
        try:
            data = sock.recv(RECV_SIZE)
        except timeout_error:
            continue
        except OSError as exc:
            return f"connection lost: {exc}"
        if not data:
            return "connection closed by peer"
        with loop.lock:
            try:
                on_data(data)
            except Exception:
                if on_error is None:
                    log.exception("internal error reading a connection; closing it")
                else:
                    on_error()
                return "internal error"
            loop.flushed()
        if loop.backlogged:  # let the writers drain before reading more (greenlets never
            loop.kit.sleep(0)  # switch on their own while a socket stays readable)
    return "stopping"
