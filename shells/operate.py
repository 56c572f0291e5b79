"""What every runtime shows an operator: the status documents ``candy status`` prints.

The cores make the snapshots (:meth:`Client.status`, :meth:`RelayServer.status`); this adds
what only the shell knows (version, runtime, URLs, uptime) in the same way for every runtime.
"""

from __future__ import annotations

import time
from typing import Any

from candy_core import ClientStatus, ServerStatus
from shells.settings import candy_version


def server_url(secure: bool, host: str, port: int, path: str = "/") -> str:
    """``ws://host:port/path`` (``wss`` with TLS)."""
    return f"{'wss' if secure else 'ws'}://{host}:{port}{path}"


def client_document(status: ClientStatus, runtime: str) -> dict[str, Any]:
    """The JSON document of ``candy status`` for a client."""
    return {"role": "client", "version": candy_version(), "runtime": runtime, **status.as_dict()}


def server_document(
    status: ServerStatus, runtime: str, listen: str, started: float
) -> dict[str, Any]:
    """The JSON document of ``candy status --server``; ``started`` is a Unix time."""
    return {
        "role": "server",
        "version": candy_version(),
        "runtime": runtime,
        "listen": listen,
        "uptime_s": round(time.time() - started, 3),
        **status.as_dict(),
    }
