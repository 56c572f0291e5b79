"""asyncio runtime: ``Server`` and ``Client`` for programs with an event loop."""

from shells.asyncio.client import Client
from shells.asyncio.server import Server

__all__ = ["Client", "Server"]
