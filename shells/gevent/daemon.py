"""``candy --runtime gevent``: run a server or client on greenlets until SIGINT/SIGTERM."""

from __future__ import annotations

import signal

import gevent
import gevent.event
import gevent.ssl

from shells.blocking.control import Controlled
from shells.blocking.daemon import run_until_signalled
from shells.common import client_kwargs, server_kwargs
from shells.gevent import KIT, Client, Server
from shells.metrics import GeventMetricsServer, with_metrics
from shells.settings import DaemonSettings


def _wait_for_signal() -> None:
    """Block this greenlet (the rest keep running) until SIGINT or SIGTERM."""
    done = gevent.event.Event()
    handlers = [gevent.signal_handler(sig, done.set) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        done.wait()
    finally:
        for h in handlers:
            h.cancel()


def run(settings: DaemonSettings) -> int:
    """Run the daemon on greenlets until SIGINT/SIGTERM; returns the exit status."""
    node: Server | Client
    if settings.mode == "server":
        assert settings.server is not None  # parse_args sets exactly the mode's config
        node = Server(settings.server, **server_kwargs(settings, gevent.ssl))
    else:
        assert settings.client is not None
        node = Client(settings.client, **client_kwargs(settings, gevent.ssl))
    served = with_metrics(
        Controlled(KIT, node, settings.control, settings.control_given),
        settings.metrics,
        GeventMetricsServer,
    )
    return run_until_signalled(served, _wait_for_signal)
