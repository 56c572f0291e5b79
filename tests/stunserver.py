"""A tiny STUN server for end-to-end tests: answers every Binding Request with the source.

Run inside a test namespace: ``python tests/stunserver.py 203.0.113.100 3478``.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from candy_core import stun


def serve(host: str, port: int) -> None:
    """Answer Binding Requests forever (the test kills the process)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))
        print(f"stun server on {host}:{port}", flush=True)
        while True:
            data, addr = sock.recvfrom(2048)
            if len(data) < 20 or data[:2] != b"\x00\x01" or not stun.looks_like_stun(data):
                continue
            sock.sendto(stun.build_binding_response(data[8:20], addr[0], addr[1]), addr)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3478)
