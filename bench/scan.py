"""Time a full process scan + ranking with uoomd's reader, next to psutil doing the same reads.

    python bench/scan.py [--procs 2000] [--runs 15]

Starts N sleeping children (os.fork of this process: copy-on-write, nearly free), times
read_snapshot() + rank() over every process on the machine, then psutil.process_iter()
reading pid, name, ppid, status, uids, memory_info and oom_score_adj; prints median,
min and max per run and the cost per process. The children are stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import mmap
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib

from uoomd import kernel
from uoomd.plan import Amount, DaemonPlan, EscalationPlan, GuardPlan, Plan, Scope, ScopeKind
from uoomd.scoring import Ranking, rank
from uoomd.sources.procfs import read_snapshot
from uoomd.sources.scanner import ProcScanner


def start_sleepers(n: int, busy: int = 0) -> list[int]:
    """n children; the first ``busy`` of them wake every 100 ms and fault a page, so their
    stat line changes between scans (the rest never run: the incremental scan's best case)."""
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:  # child: sleep until killed, never return into the benchmark
            try:
                if i < busy:
                    while True:
                        time.sleep(0.1)
                        page = mmap.mmap(-1, 4096)
                        page[0] = 1
                        page.close()
                while True:
                    signal.pause()
            finally:
                os._exit(0)
        pids.append(pid)
    return pids


def stop_sleepers(pids: list[int]) -> None:
    for pid in pids:  # only our own children, by PID
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _plan() -> tuple[Plan, GuardPlan]:
    guard = GuardPlan(
        name="system",
        scope=Scope(kind=ScopeKind.SYSTEM),
        mem_available_term=Amount(fraction=0.1),
        mem_available_kill=Amount(fraction=0.05),
        swap_free_term=Amount(fraction=0.1),
        swap_free_kill=Amount(fraction=0.05),
    )
    return Plan(source="<bench>", daemon=DaemonPlan(), escalation=EscalationPlan(), guards=(guard,)), guard


def uoomd_scan() -> int:
    plan, guard = _plan()
    snap = read_snapshot()
    totalpages = kernel.system_totalpages(
        total_ram_bytes=snap.total_ram_bytes, total_swap_bytes=snap.total_swap_bytes, page_size=snap.page_size
    )
    ranking = rank(snap, plan, guard, totalpages=totalpages)
    return len(ranking.candidates) + len(ranking.excluded)


class Incremental:
    """The daemon's warm path: one ProcScanner and the previous ranking kept between scans."""

    def __init__(self, *, reuse_ranking: bool) -> None:
        self.scanner = ProcScanner()
        self.plan, self.guard = _plan()
        self.reuse_ranking = reuse_ranking
        self.previous: Ranking | None = None
        self.exact = 0

    def __call__(self) -> int:
        snap = self.scanner.scan()
        totalpages = kernel.system_totalpages(
            total_ram_bytes=snap.total_ram_bytes, total_swap_bytes=snap.total_swap_bytes, page_size=snap.page_size
        )
        previous = self.previous if self.reuse_ranking else None
        ranking = rank(snap, self.plan, self.guard, totalpages=totalpages, previous=previous)
        self.previous = ranking
        self.exact = ranking.exact_count
        return len(ranking.candidates) + len(ranking.excluded)


def psutil_scan() -> int:
    rows = []
    for p in psutil.process_iter():
        try:
            with open(f"/proc/{p.pid}/oom_score_adj", "rb") as f:
                adj = int(f.read())
            rows.append((p.pid, p.name(), p.ppid(), p.status(), p.uids().real, p.memory_info().rss, adj))
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
            continue
    rows.sort(key=lambda r: -r[5])
    return len(rows)


def timeit(scanners: dict[str, Callable[[], int]], runs: int) -> dict[str, tuple[list[float], int]]:
    """Round-robin (A B C A B C ...), so a neighbour's load on this shared machine falls on
    every scanner alike; one warm-up call each (pwd, imports, dentries, the held fds)."""
    for fn in scanners.values():
        fn()
    results: dict[str, tuple[list[float], int]] = {name: ([], 0) for name in scanners}
    for _ in range(runs):
        for name, fn in scanners.items():
            t0 = time.perf_counter()
            n = fn()
            elapsed = time.perf_counter() - t0
            times, _n = results[name]
            times.append(elapsed)
            results[name] = (times, n)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--procs", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--busy", type=int, default=0, help="children that fault a page every 100 ms")
    args = parser.parse_args()
    pids = start_sleepers(args.procs, args.busy)
    incremental = Incremental(reuse_ranking=True)
    plain = Incremental(reuse_ranking=False)
    try:
        time.sleep(0.5)
        slab_before = _slab_kib()
        scanners: dict[str, Callable[[], int]] = {
            "uoomd read_snapshot+rank": uoomd_scan,
            "uoomd ProcScanner.scan+rank": plain,
            "uoomd ProcScanner.scan+rank(previous=)": incremental,
            "psutil process_iter (same reads, no rank)": psutil_scan,
        }
        results = timeit(scanners, args.runs)
        plain.scanner.close()
        held_slab_kib = _slab_kib() - slab_before
        held_fds = incremental.scanner.held_fds
        incremental.scanner.close()
    finally:
        stop_sleepers(pids)
    print(f"{'scanner':<44} {'procs':>6} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'us/proc':>8}")
    for name, (times, n) in results.items():
        med = statistics.median(times)
        print(
            f"{name:<44} {n:>6} {med * 1e3:>10.1f} {min(times) * 1e3:>8.1f} {max(times) * 1e3:>8.1f}"
            f" {med / n * 1e6:>8.1f}"
        )
    scanner = incremental.scanner
    assert incremental.previous is not None
    print(
        f"incremental, last scan: {incremental.exact}/{len(incremental.previous.candidates)} candidates exact, "
        f"{scanner.status_reads} status reads, {held_fds} fds held; "
        f"kernel Slab +{held_slab_kib} KiB while held (machine-wide, noisy)"
    )
    return 0


def _slab_kib() -> int:
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"Slab:"):
                return int(line.split()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
