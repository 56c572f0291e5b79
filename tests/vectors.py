"""Load the protocol test vectors kept in ``tests/vectors/``.

- ``protocol.json``: computed from the protocol text (PROTOCOL.md) for every message type,
  the handshake hashes, STUN and peer datagrams.
- ``captured-5.6.json``: bytes captured on the wire between two real Candy 5.6 processes
  (WebSocket messages and peer datagrams); where the two disagree, the captured bytes decide.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"


@cache
def load_vectors(name: str) -> dict[str, Any]:
    """Return the parsed vector file ``name`` (``"protocol"`` or ``"protocol.json"``)."""
    path = VECTORS_DIR / (name if name.endswith(".json") else f"{name}.json")
    with path.open(encoding="utf-8") as f:
        return json.load(f)
