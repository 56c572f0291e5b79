"""``candy --runtime threaded``: run a server or client on OS threads until SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import ssl
import threading

from shells.blocking import POLL
from shells.blocking.control import Controlled
from shells.blocking.daemon import run_until_signalled
from shells.common import client_kwargs, server_kwargs
from shells.metrics import ThreadedMetricsServer, with_metrics
from shells.settings import DaemonSettings
from shells.threaded import KIT, Client, Server


def _wait_for_signal() -> None:
    """Block the main thread until SIGINT or SIGTERM."""
    done = threading.Event()

    def handler(signum: int, frame: object) -> None:
        done.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not done.wait(POLL):  # bounded waits: the handler runs between them
            pass
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def run(settings: DaemonSettings) -> int:
    """Run the daemon on OS threads until SIGINT/SIGTERM; returns the exit status."""
    node: Server | Client
    if settings.mode == "server":
        assert settings.server is not None  # parse_args sets exactly the mode's config
        node = Server(settings.server, **server_kwargs(settings, ssl))
    else:
        assert settings.client is not None
        node = Client(settings.client, **client_kwargs(settings, ssl))
    served = with_metrics(
        Controlled(KIT, node, settings.control, settings.control_given),
        settings.metrics,
        ThreadedMetricsServer,
    )
    return run_until_signalled(served, _wait_for_signal)
