"""The daemon's lifecycle on a blocking runtime: start, wait for a signal, stop."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("candy.blocking")


class Node(Protocol):
    """A started-and-stopped server or client of a blocking runtime."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def run_until_signalled(node: Node, wait_for_signal: Callable[[], None]) -> int:
    """Start ``node``, block in ``wait_for_signal()`` (until SIGINT/SIGTERM), then stop it.

    Returns the exit status: 1 if the node cannot start (e.g. no permission for TUN).
    """
    try:
        node.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        node.stop()
        return 1
    wait_for_signal()
    log.info("shutting down")
    node.stop()
    return 0
