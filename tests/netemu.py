"""A user-space stand-in for ``tc qdisc ... netem`` on kernels built without sch_netem.

It binds an NFQUEUE (nfnetlink_queue, through a raw netlink socket: no library needed) in
the namespace it runs in and gives each queued packet a verdict the way netem treats it:

* ``--loss P``: dropped with probability P %;
* ``--reorder P``: sent at once, ahead of the delayed ones, with probability P %;
* otherwise held for ``--delay`` ms ± a uniform ``--jitter`` ms, and released in order of
  release time (so jitter reorders packets too, as netem's time-sorted queue does).

Duplication is not done here: test_e2e_netem adds an nftables ``dup`` rule for it.

The test queues packets as they *arrive* (raw PREROUTING, before conntrack and NAT) rather
than as they leave, so NAT mappings are made exactly as without impairment; a packet
crossing the public segment is still impaired once. (Only a ping run in the very namespace
that delays its replies would not see that delay: the kernel stamps packets on arrival.)

Run inside a test namespace, where the test sends packets to queue ``--queue`` (raw
PREROUTING with ``--queue-bypass``, so packets flow unimpaired when this process is gone)::

    python tests/netemu.py --queue 0 --loss 5 --delay 40 --jitter 10 --reorder 1 \\
        --stats /tmp/x/stats.json --lifetime 600

Every second it writes its counters as JSON to ``--stats``; it exits after ``--lifetime`` s
or on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NETLINK_NO_ENOBUFS = 5
SOL_NETLINK = 270
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = NFNL_SUBSYS_QUEUE << 8 | 0
NFQNL_MSG_VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1
NFQNL_MSG_CONFIG = NFNL_SUBSYS_QUEUE << 8 | 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_DROP, NF_ACCEPT = 0, 1
QUEUE_MAXLEN = 4096  # netem's default limit is 1000 packets; beyond it the kernel drops
MAX_READS = 256  # datagrams read per wake-up, so releases are never starved
SEND_BATCH = 1024  # verdicts per send (32 bytes each)


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, flags: int, seq: int, queue: int, attrs: bytes) -> bytes:
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attrs  # nfgenmsg
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def verdict(queue: int, packet_id: int, decision: int) -> bytes:
    """One NFQNL_MSG_VERDICT message."""
    hdr = struct.pack("!II", decision, packet_id)
    return _message(NFQNL_MSG_VERDICT, 0, 0, queue, _attr(NFQA_VERDICT_HDR, hdr))


def packet_ids(data: bytes) -> tuple[list[int], list[int]]:
    """The packet ids of queued-packet messages in ``data``, and any netlink error codes."""
    ids, errors = [], []
    pos = 0
    while pos + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, pos)
        if length < 16 or pos + length > len(data):
            break
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, pos + 16)
            if code:
                errors.append(code)
        elif kind == NFQNL_MSG_PACKET:
            apos, end = pos + 20, pos + length  # after nlmsghdr and nfgenmsg
            while apos + 4 <= end:
                alen, akind = struct.unpack_from("=HH", data, apos)
                if alen < 4:
                    break
                if akind & 0x3FFF == NFQA_PACKET_HDR and alen >= 8:
                    ids.append(struct.unpack_from("!I", data, apos + 4)[0])
                    break
                apos += alen + (-alen % 4)
        pos += length + (-length % 4)
    return ids, errors


class Netem:
    """The queue, the random decisions and the counters."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        if args.seed is None:
            args.seed = random.SystemRandom().randrange(1 << 32)
        self.rng = random.Random(args.seed)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (root)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self.held: list[tuple[float, int, int]] = []  # (release at, sequence, packet id)
        self.seq = 0
        self.counts = {"queued": 0, "dropped": 0, "delayed": 0, "reordered": 0, "released": 0}

    def bind(self) -> None:
        q = self.args.queue
        cmd = _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET))
        params = _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
        maxlen = _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
        for seq, attrs in enumerate((cmd, params + maxlen), 1):
            self.sock.sendto(_message(NFQNL_MSG_CONFIG, NLM_F_ACK, seq, q, attrs), (0, 0))
            self.sock.settimeout(5)
            _, errors = packet_ids(self.sock.recv(65536))
            if errors:
                raise OSError(-errors[0], f"binding NFQUEUE {q}: {os.strerror(-errors[0])}")
        self.sock.setblocking(False)

    def decide(self, packet_id: int, now: float, out: list[bytes]) -> None:
        a = self.args
        self.counts["queued"] += 1
        roll = self.rng.random() * 100
        if roll < a.loss:
            self.counts["dropped"] += 1
            out.append(verdict(a.queue, packet_id, NF_DROP))
        elif roll < a.loss + a.reorder:
            self.counts["reordered"] += 1
            out.append(verdict(a.queue, packet_id, NF_ACCEPT))
        else:
            delay = max(0.0, a.delay + self.rng.uniform(-a.jitter, a.jitter)) / 1000
            self.counts["delayed"] += 1
            self.seq += 1
            heapq.heappush(self.held, (now + delay, self.seq, packet_id))

    def run(self) -> None:
        a = self.args
        stop_at = time.monotonic() + a.lifetime
        next_stats = 0.0
        while (now := time.monotonic()) < stop_at and not STOP:
            out: list[bytes] = []
            while self.held and self.held[0][0] <= now:
                _, _, packet_id = heapq.heappop(self.held)
                self.counts["released"] += 1
                out.append(verdict(a.queue, packet_id, NF_ACCEPT))
            if now >= next_stats:
                next_stats = now + 1.0
                self.write_stats()
            wait = min(next_stats, stop_at) - now
            if self.held:
                wait = min(wait, self.held[0][0] - now)
            if not out:
                ready, _, _ = select.select([self.sock], [], [], max(0.0, wait))
                if not ready:
                    continue
                now = time.monotonic()
            for _ in range(MAX_READS):
                try:
                    data = self.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                ids, _ = packet_ids(data)
                for packet_id in ids:
                    self.decide(packet_id, now, out)
            for i in range(0, len(out), SEND_BATCH):
                self.sock.send(b"".join(out[i : i + SEND_BATCH]))
        self.write_stats()

    def write_stats(self) -> None:
        if not self.args.stats:
            return
        tmp = self.args.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**self.counts, "held": len(self.held)}, f)
        os.replace(tmp, self.args.stats)


STOP = False


def _stop(signum: int, frame: object) -> None:
    global STOP
    STOP = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queue", type=int, default=0)
    p.add_argument("--loss", type=float, default=0.0, help="percent")
    p.add_argument("--delay", type=float, default=0.0, help="milliseconds")
    p.add_argument("--jitter", type=float, default=0.0, help="milliseconds")
    p.add_argument("--reorder", type=float, default=0.0, help="percent")
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--stats", default="", help="JSON counters, rewritten every second")
    p.add_argument("--lifetime", type=float, default=600.0, help="seconds, then exit")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    emu = Netem(args)
    emu.bind()
    print(f"netemu: queue {args.queue} bound: {vars(args)}", flush=True)
    emu.run()
    print(f"netemu: done {emu.counts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
