"""Long fuzz run: a seeded mutation loop over every target of tests/fuzz_targets.py.

    python -m bench.fuzz                                   # every target, 10**6 inputs each
    python -m bench.fuzz --target server --inputs 100000 --jobs 2
    python -m bench.fuzz --floods                          # also the memory floods

Each target starts from its seeds (the vectors in tests/vectors/, valid messages and small
programs); every input is a mutation of a corpus entry (bit flips, interesting values,
insertions, deletions, duplications, splices) or, now and then, random bytes. An input that
shows a feature not seen before (a message type decoded, an error message, a peer state
reached, a counter's order of magnitude...) joins the corpus. Known bugs
(``fuzz_targets.TOLERATED``) are counted apart; any other violation is a finding: it is
minimised and printed with the core calls that reproduce it, bytes in hex.

Deterministic for a given ``--seed``, ``--inputs`` and ``--jobs``; stops early at
``--max-seconds`` per target. ``--json FILE`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzz_targets as ft  # needs the tests directory on the path (above)

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0xFE, 0x40, 0x20, 0x10, 126, 127, 125)
CORPUS_LIMIT = 4000


def mutate(rng: random.Random, data: bytes, corpus: list[bytes], max_len: int) -> bytes:
    """One to four stacked mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        kind = rng.randrange(10)
        n = len(buf)
        if kind == 0 and n:
            pos = rng.randrange(n)
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and n:
            buf[rng.randrange(n)] = rng.choice(INTERESTING)
        elif kind == 2 and n:
            buf[rng.randrange(n)] = rng.randrange(256)
        elif kind == 3:
            pos = rng.randrange(n + 1)
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        elif kind == 4 and n:
            pos = rng.randrange(n)
            del buf[pos : pos + rng.randrange(1, 17)]
        elif kind == 5 and n:
            start = rng.randrange(n)
            chunk = buf[start : start + rng.randrange(1, 33)]
            pos = rng.randrange(n + 1)
            buf[pos:pos] = chunk
        elif kind == 6 and corpus:
            other = rng.choice(corpus)
            cut_a = rng.randrange(n + 1)
            cut_b = rng.randrange(len(other) + 1)
            buf = buf[:cut_a] + other[cut_b:]
        elif kind == 7 and n >= 2:
            width = rng.choice((2, 4, 8))
            pos = rng.randrange(max(n - width, 0) + 1)
            value = rng.choice((0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 2**15))
            buf[pos : pos + width] = value.to_bytes(8, "big", signed=True)[-width:]
        elif kind == 8 and n:
            del buf[rng.randrange(n) :]
        else:
            buf += rng.randbytes(rng.randrange(1, 17))
    return bytes(buf[: max_len * 2])


@dataclass
class Finding:
    kind: str
    count: int = 0
    input_hex: str = ""
    minimized_hex: str = ""
    report: str = ""
    known: bool = False


@dataclass
class Result:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    corpus: int = 0
    features: int = 0
    findings: dict[str, Finding] = field(default_factory=dict)
    harness_errors: dict[str, str] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def _classify(target: ft.Target, data: bytes) -> str | None:
    """The violation kind ``data`` triggers (None: none)."""
    try:
        target.run(data)
    except ft.InvariantViolation as violation:
        return violation.kind
    except Exception as exc:  # a harness error: report it like a finding
        return f"harness error {type(exc).__name__}"
    return None


def minimize(target: ft.Target, data: bytes, kind: str, budget: float = 20.0) -> bytes:
    """Delta debugging: drop chunks, then zero bytes, while the same kind still fires."""
    deadline = time.monotonic() + budget
    best = data
    size = max(len(best) // 2, 1)
    while size >= 1 and time.monotonic() < deadline:
        pos = 0
        while pos < len(best) and time.monotonic() < deadline:
            candidate = best[:pos] + best[pos + size :]
            if _classify(target, candidate) == kind:
                best = candidate
            else:
                pos += size
        size //= 2
    for pos in range(len(best)):
        if time.monotonic() >= deadline:
            break
        if best[pos]:
            candidate = best[:pos] + b"\x00" + best[pos + 1 :]
            if _classify(target, candidate) == kind:
                best = candidate
    return best


def fuzz(name: str, inputs: int, seed: int, max_seconds: float, minimize_s: float) -> Result:
    """The mutation loop for one target in this process."""
    target = ft.TARGETS[name]
    rng = random.Random(f"{name}:{seed}")
    corpus = list(target.seeds()) or [b""]
    seen: set[str] = set()
    result = Result(name)
    started = time.perf_counter()
    cpu_started = time.process_time()
    stop = started + max_seconds
    pending: list[bytes] = list(corpus)
    with ft.quiet_logs():
        for i in range(inputs):
            if pending:
                data = pending.pop()
            elif rng.random() < 0.02:
                data = rng.randbytes(rng.randrange(target.max_len))
            else:
                data = mutate(rng, rng.choice(corpus), corpus, target.max_len)
            try:
                features, violation = ft.run_target(target, data, ft.TOLERATED)
            except ft.InvariantViolation as violation:
                features, finding = set(), result.findings.get(violation.kind)
                if finding is None:
                    finding = result.findings[violation.kind] = Finding(violation.kind)
                    finding.input_hex = data.hex()
                    finding.report = violation.describe(last=30)
                elif len(data) * 2 < len(finding.input_hex):
                    finding.input_hex = data.hex()
                    finding.report = violation.describe(last=30)
                finding.count += 1
            except Exception as exc:  # the harness itself broke
                key = f"{type(exc).__name__}: {exc}"[:200]
                result.harness_errors.setdefault(key, data.hex())
                features = set()
            else:
                if violation is not None:
                    finding = result.findings.get(violation.kind)
                    if finding is None:
                        finding = result.findings[violation.kind] = Finding(violation.kind)
                        finding.known = True
                        finding.input_hex = data.hex()
                    finding.count += 1
            if not features <= seen:
                seen |= features
                if len(corpus) < CORPUS_LIMIT:
                    corpus.append(data)
                else:
                    corpus[rng.randrange(CORPUS_LIMIT)] = data
            result.inputs = i + 1
            if not i % 256 and time.perf_counter() > stop:
                break
        result.seconds = time.perf_counter() - started
        result.cpu_seconds = time.process_time() - cpu_started
        for finding in result.findings.values():
            if finding.known or not minimize_s:
                continue
            small = minimize(target, bytes.fromhex(finding.input_hex), finding.kind, minimize_s)
            finding.minimized_hex = small.hex()
            try:
                target.run(small)
            except ft.InvariantViolation as violation:
                finding.report = violation.describe(last=30)
    result.corpus = len(corpus)
    result.features = len(seen)
    return result


def _job(args: tuple[str, int, int, float, float]) -> Result:
    return fuzz(*args)


def merge(results: list[Result]) -> Result:
    total = Result(results[0].target)
    for r in results:
        total.inputs += r.inputs
        total.seconds = max(total.seconds, r.seconds)
        total.cpu_seconds += r.cpu_seconds
        total.corpus += r.corpus
        total.features = max(total.features, r.features)
        total.harness_errors.update(r.harness_errors)
        for kind, finding in r.findings.items():
            mine = total.findings.get(kind)
            if mine is None:
                total.findings[kind] = finding
            else:
                mine.count += finding.count
    return total


def run_floods() -> dict[str, str]:
    out = {}
    for name, flood in ft.FLOODS.items():
        started = time.perf_counter()
        try:
            flood()
            verdict = "levels off"
        except ft.InvariantViolation as violation:
            verdict = f"GROWS: {violation.detail}"
        out[name] = verdict
        print(f"  flood {name:<26} {time.perf_counter() - started:5.1f} s  {verdict}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=sorted(ft.TARGETS),
                        help="target to fuzz (repeatable; default: all)")  # fmt: skip
    parser.add_argument("--inputs", type=int, default=10**6, help="inputs per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="processes per target")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="stop a target after this long (per process)")  # fmt: skip
    parser.add_argument("--minimize-seconds", type=float, default=20.0,
                        help="time spent minimising each new finding (0: do not)")  # fmt: skip
    parser.add_argument("--floods", action="store_true", help="also run the memory floods")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)

    names = args.target or list(ft.TARGETS)
    results = []
    print(f"{'target':<10} {'inputs':>9} {'seconds':>8} {'inputs/s':>9} {'per CPU s':>9} "
          f"{'corpus':>7} {'features':>8}  findings")  # fmt: skip
    for name in names:
        jobs = max(args.jobs, 1)
        share = [args.inputs // jobs + (1 if i < args.inputs % jobs else 0) for i in range(jobs)]
        work = [(name, share[i], args.seed * 1000 + i, args.max_seconds, args.minimize_seconds)
                for i in range(jobs)]  # fmt: skip
        if jobs == 1:
            parts = [_job(work[0])]
        else:
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                parts = pool.map(_job, work)
        result = merge(parts)
        results.append(result)
        new = [f for f in result.findings.values() if not f.known]
        known = [f for f in result.findings.values() if f.known]
        summary = f"{len(new)} new, {sum(f.count for f in known)} hits of {len(known)} known"
        rate = result.inputs / result.seconds if result.seconds else 0.0
        per_cpu = result.inputs / result.cpu_seconds if result.cpu_seconds else 0.0
        print(f"{name:<10} {result.inputs:>9} {result.seconds:>8.1f} {rate:>9.0f} {per_cpu:>9.0f} "
              f"{result.corpus:>7} {result.features:>8}  {summary}", flush=True)  # fmt: skip
        for finding in known:
            print(f"    known ({finding.count}x): {finding.kind}")
        for finding in new:
            print(f"    NEW ({finding.count}x): {finding.kind}")
            print(f"      input: {finding.input_hex}")
            if finding.minimized_hex:
                print(f"      minimised input: {finding.minimized_hex}")
            print("      " + finding.report.replace("\n", "\n      "))
        for error, data in result.harness_errors.items():
            print(f"    HARNESS ERROR: {error}\n      input: {data}")
    floods = run_floods() if args.floods else {}
    if args.json:
        payload = {
            "seed": args.seed,
            "jobs": args.jobs,
            "targets": [
                {
                    "target": r.target,
                    "inputs": r.inputs,
                    "seconds": round(r.seconds, 2),
                    "inputs_per_s": round(r.inputs / r.seconds, 1) if r.seconds else None,
                    "cpu_seconds": round(r.cpu_seconds, 2),
                    "inputs_per_cpu_s": round(r.inputs / r.cpu_seconds, 1)
                    if r.cpu_seconds
                    else None,
                    "corpus": r.corpus,
                    "features": r.features,
                    "findings": [vars(f) for f in r.findings.values()],
                    "harness_errors": r.harness_errors,
                }
                for r in results
            ],
            "floods": floods,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    failed = any(not f.known for r in results for f in r.findings.values())
    failed = failed or any(r.harness_errors for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
