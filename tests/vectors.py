"""Load the shared test vectors (``/work/shared/vectors`` next to the repository)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

VECTORS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"


@cache
def load_vectors(name: str) -> dict[str, Any]:
    """Return the parsed vector file ``name`` (``"protocol"`` or ``"protocol.json"``)."""
    path = VECTORS_DIR / (name if name.endswith(".json") else f"{name}.json")
    with path.open(encoding="utf-8") as f:
        return json.load(f)
