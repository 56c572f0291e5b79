"""``candy --runtime gevent``."""

from __future__ import annotations

import signal
from collections.abc import Callable

import gevent
import gevent.event

from shells.blocking import run_daemon
from shells.gevent import Client, Server
from shells.settings import DaemonSettings


def _wait_for_signal(stop: Callable[[], None]) -> None:
    done = gevent.event.Event()

    def handler() -> None:
        stop()
        done.set()

    handlers = [gevent.signal_handler(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        done.wait()
    finally:
        for h in handlers:
            h.cancel()


def run(settings: DaemonSettings) -> int:
    """Run the daemon on greenlets until SIGINT/SIGTERM."""
    return run_daemon(Server, Client, settings, _wait_for_signal)
