"""``candy --runtime threaded``."""

from __future__ import annotations

from shells.blocking import run_daemon, wait_for_signal_threads
from shells.settings import DaemonSettings
from shells.threaded import Client, Server


def run(settings: DaemonSettings) -> int:
    """Run the daemon on OS threads until SIGINT/SIGTERM."""
    return run_daemon(Server, Client, settings, wait_for_signal_threads)
