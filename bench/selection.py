"""Time uoomd's victim selection over every process it can see and write the times as JSON (run inside a pod).

    python3 bench/selection.py --out FILE [--runs 15]

Two paths, both from bench/scan.py, timed round-robin: ``full`` is read_snapshot() + rank() from nothing (what
`uoomd candidates` and a cold daemon do); ``warm`` is the daemon's refresh, a kept
ProcScanner and the previous ranking reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import scan


def timed(scanners: dict[str, Callable[[], int]], runs: int) -> tuple[dict[str, list[float]], int]:
    """ms per call, round-robin after one warm-up call each; and how many processes were ranked."""
    procs = 0
    for fn in scanners.values():
        procs = fn()
    out: dict[str, list[float]] = {name: [] for name in scanners}
    for _ in range(runs):
        for name, fn in scanners.items():
            started = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - started) * 1000)
    return out, procs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    scanners: dict[str, Callable[[], int]] = {"full_ms": scan.uoomd_scan}
    if hasattr(scan, "Incremental"):
        scanners["warm_ms"] = scan.Incremental(reuse_ranking=True)
    times, procs = timed(scanners, args.runs)
    with open(args.out, "w") as f:
        json.dump({"procs": procs, **times}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
