"""Profile the daemon's tick at a crossing: warm ranking in place, memory under the term level, one tick under cProfile.

    python3 bench/profile_crossing.py [--procs 2000] [--repeat 20] [--top 25]

Runs the real :class:`uoomd.daemon.Daemon` in-process with a RecordingExecutor (nothing is
signalled) inside a pod (bench/sandbox.py) with --procs idle processes. Its system guard's term
level sits above what is available, so every tick crosses; before each profiled tick the warm
ranking is refreshed by hand and the escalation reset to idle, as in a daemon that kept its
ranking warm while memory came down. Prints the median tick and cProfile's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers, scenarios
from bench.sandbox import Pod
from uoomd import decision
from uoomd.daemon import Daemon
from uoomd.executor import RecordingExecutor
from uoomd.logs import configure
from uoomd.plan import LogFormat
from uoomd.policy.load import parse_plan


def inside(repeat: int, top: int) -> int:
    info = scenarios.meminfo_bytes()
    term = (info["MemAvailable"] + info["MemTotal"]) // 2
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    levels = peers.Levels(term_bytes=term, kill_bytes=term // 4)
    plan = parse_plan(peers.uoomd_policy(levels, workdir))
    with open(os.devnull, "w") as devnull:
        daemon = Daemon(plan, executor=RecordingExecutor(), log=configure(LogFormat.JSON, devnull))
        daemon.open()
        ticks: list[float] = []
        profile = cProfile.Profile()
        for _ in range(repeat):
            now = time.monotonic()
            readings = [r for r in (daemon._read(w, now) for w in daemon.watches) if r is not None]
            daemon.warm.rescan(plan, readings, now)  # the warm ranking, as the loop keeps it near the level
            daemon.state = decision.initial_state(plan)
            started = time.perf_counter()
            profile.enable()
            daemon.tick(time.monotonic())
            profile.disable()
            ticks.append((time.perf_counter() - started) * 1000)
        daemon.close()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(top)
    print(f"crossing tick over {len(daemon.warm.snapshot.processes) if daemon.warm.snapshot else '?'} processes:")
    print(f"  median {statistics.median(ticks):.2f} ms, min {min(ticks):.2f}, max {max(ticks):.2f} (cProfile on)")
    print(out.getvalue())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--procs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return inside(args.repeat, args.top)
    out = Path(f"/tmp/uoomd-bench-profile-{os.getpid()}.txt")
    with Pod() as pod:
        pod.call("sleepers", n=args.procs)
        argv = [sys.executable, __file__, "--inside", "--repeat", str(args.repeat), "--top", str(args.top)]
        pid = pod.spawn(argv, out=out)
        pod.call("wait", pid=pid, timeout_s=300)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
