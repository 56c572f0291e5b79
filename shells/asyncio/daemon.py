"""``candy --runtime asyncio``: run a server or client until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from shells.asyncio.control import Controlled
from shells.common import server_kwargs
from shells.metrics import with_metrics_async
from shells.settings import DaemonSettings

if TYPE_CHECKING:
    from shells.asyncio.client import Client
    from shells.asyncio.server import Server

log = logging.getLogger("candy.asyncio")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    log.debug("using uvloop")
    return uvloop.new_event_loop()


async def _until_signalled(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await start()
        await stopping.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await stop()


def run(settings: DaemonSettings) -> int:
    """Run the daemon described by ``settings``; returns the exit status."""
    node: Server | Client
    if settings.mode == "server":
        from shells.asyncio.server import Server

        assert settings.server is not None
        node = Server(settings.server, **server_kwargs(settings))
    else:
        from shells.asyncio.client import Client

        node = Client.from_settings(settings)
    served = with_metrics_async(
        Controlled(node, settings.control, settings.control_given), settings.metrics
    )
    loop = _new_loop()
    try:
        loop.run_until_complete(_until_signalled(served.start, served.stop))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        loop.close()
    return 0
