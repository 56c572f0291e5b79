"""The client's cached state on disk, in the reference layout (vmac/<name>, address/<name>)."""

from __future__ import annotations

import logging
import os
import random
from ipaddress import IPv4Interface
from pathlib import Path

from candy_core import ClientState, new_vmac

log = logging.getLogger("candy.state")


class StateStore:
    """Loads and saves one network's VMAC and last address under ``state_dir``.

    ``state_dir=None`` keeps everything in memory (embedding programs, tests).
    """

    def __init__(self, state_dir: Path | str | None, key: str) -> None:
        self.dir = Path(state_dir) if state_dir is not None else None
        self.key = key

    def _path(self, kind: str) -> Path | None:
        return self.dir / kind / self.key if self.dir is not None else None

    def load(self, rng: random.Random) -> ClientState:
        """The saved state, with a new VMAC generated (and saved) on first use."""
        vmac = self._read("vmac")
        if vmac is None or len(vmac) != 16 or not all(c in "0123456789abcdef" for c in vmac):
            if vmac is not None:
                log.warning("ignoring an invalid cached VMAC %r (a new one is made)", vmac)
            vmac = new_vmac(rng).decode()
            self._write("vmac", vmac)
        address = None
        text = self._read("address")
        if text:
            try:
                address = IPv4Interface(text)
            except ValueError:
                log.warning("ignoring an invalid cached address %r", text)
        return ClientState(vmac.encode(), address)

    def save_address(self, address: IPv4Interface) -> None:
        self._write("address", str(address))

    def _read(self, kind: str) -> str | None:
        path = self._path(kind)
        if path is None:
            return None
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:  # unreadable or not text: ignored
            log.warning("cannot read %s: %s", path, exc)
            return None

    def _write(self, kind: str, text: str) -> None:
        path = self._path(kind)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot save %s (the state is kept in memory only): %s", path, exc)
