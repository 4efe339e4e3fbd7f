"""What ``uoomd record`` costs: CPU, RSS and bytes written over a recording, far from and near a level.

    python3 bench/record.py [--seconds 60] [--only idle,desktop,near]

Each scenario runs the installed ``uoomd record --duration SECONDS`` as a child and reads its
/proc/PID/stat and status: CPU (utime + stime) from the first poll to the last second, so the
policy checker's start-up (its own child, pydantic) is left out and reported apart; VmRSS
and VmHWM near the end; the bytes the trace holds. Per hour is the steady rate times 3,600.

- idle: the machine guard of the default policy (etc/uoomd.toml, poll_max 5 s), nothing near a level.
- desktop: policies/desktop.toml's guard (poll_max 1 s, a PSI trigger armed), idle too.
- near: a 256 MiB memory cgroup of our own with a process holding 120 MiB beside 8 idle ones
  (Python interpreters, ~9 MiB each):
  always within a 4 GiB/s fill of the term level, so the recorder polls at poll_min (20 ms)
  and ranks the cgroup's processes at every poll, the worst case of a long recording. The
  processes are ours (oom_score_adj 1000), stopped by PID with their cgroup at the end.

The recorder only reads: nothing here sends a signal but to our own children at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cgroups import scratch_cgroup  # noqa: E402
from tests.e2e.daemon_runner import hog_argv, read_record, wait_until  # noqa: E402

MIB = 1 << 20
TICK_S = os.sysconf("SC_CLK_TCK")


def uoomd() -> list[str]:
    beside = Path(sys.executable).parent / "uoomd"
    return [str(beside)] if beside.exists() else [shutil.which("uoomd") or "uoomd"]


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK_S  # utime, stime: fields 14 and 15


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def record(policy: Path, seconds: float, workdir: Path) -> dict[str, float]:
    trace = workdir / "trace.jsonl"
    log = workdir / "record.log"
    started = time.monotonic()
    with log.open("wb") as err:
        child = subprocess.Popen(
            [*uoomd(), "record", "--policy", str(policy), "--output", str(trace), "--duration", f"{seconds}s"],
            stderr=err,
            stdout=subprocess.DEVNULL,
        )
        assert wait_until(lambda: b"recording_started" in log.read_bytes(), 30), log.read_text()
        ready_s = time.monotonic() - started
        cpu_start = cpu_s(child.pid)
        t0 = time.monotonic()
        time.sleep(max(0.0, seconds - 1.5))
        cpu_end, t1 = cpu_s(child.pid), time.monotonic()
        rss_kib, hwm_kib = status_kib(child.pid, "VmRSS"), status_kib(child.pid, "VmHWM")
        _pid, code, usage = os.wait4(child.pid, 0)
    stopped = next(json.loads(line) for line in log.read_text().splitlines() if "recording_stopped" in line)
    rate = (cpu_end - cpu_start) / (t1 - t0)
    size = sum(p.stat().st_size for p in workdir.glob("trace.jsonl*"))
    with trace.open("rb") as f:
        header = len(f.readline())  # the policy's text rides in it, once per file: not a rate
    return {
        "exit": os.waitstatus_to_exitcode(code),
        "ready_s": ready_s,
        "cpu_s_per_hour": rate * 3600,
        "cpu_percent": rate * 100,
        "total_cpu_s_with_checker": usage.ru_utime + usage.ru_stime,
        "rss_mib": rss_kib / 1024,
        "hwm_mib": hwm_kib / 1024,
        "polls": stopped["polls"],
        "candidates_lines": stopped["candidates"],
        "bytes": size,
        "header_bytes": header,
        "mib_per_hour": (size - header) / seconds * 3600 / MIB,
    }


@contextmanager
def near_level(workdir: Path) -> Iterator[Path]:
    """A cgroup of 256 MiB, a holder of 120 MiB and 8 idle processes in it, and a policy guarding it."""
    with scratch_cgroup(limit_bytes=256 * MIB) as cg:
        cg.spawn(hog_argv(workdir / "holder.rec", "--max-mib", "120", "--mib-per-step", "30", "--hold"))
        for i in range(8):
            cg.spawn(hog_argv(workdir / f"idle{i}.rec", "--max-mib", "1", "--hold"))
        assert wait_until(lambda: any(r[0] == "HOLD" for r in read_record(workdir / "holder.rec")), 120), "no HOLD"
        policy = workdir / "near.toml"
        policy.write_text(
            f'[daemon]\npoll_min = "20ms"\npoll_max = "1s"\n\n[[guard]]\nname = "near"\n'
            f'scope = "cgroup:{cg.memory_path}"\nmem_available_term = "10%"\nmem_available_kill = "5%"\n'
        )
        yield policy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--only", default="idle,desktop,near")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for name in args.only.split(","):
        with tempfile.TemporaryDirectory(prefix="uoomd-bench-record-") as tmp:
            workdir = Path(tmp)
            if name == "idle":
                results[name] = record(ROOT / "etc" / "uoomd.toml", args.seconds, workdir)
            elif name == "desktop":
                results[name] = record(ROOT / "policies" / "desktop.toml", args.seconds, workdir)
            elif name == "near":
                with near_level(workdir) as policy:
                    results[name] = record(policy, args.seconds, workdir)
            else:
                parser.error(f"unknown scenario {name!r}")
        r = results[name]
        print(
            f"{name:8} {args.seconds:.0f}s: CPU {r['cpu_s_per_hour']:.1f} s/hour ({r['cpu_percent']:.2f}% of a core), "
            f"RSS {r['rss_mib']:.1f} MiB (peak {r['hwm_mib']:.1f}), {r['polls']} polls, "
            f"{r['candidates_lines']} candidate lines, {r['bytes'] / 1024:.0f} KiB = {r['mib_per_hour']:.1f} MiB/hour; "
            f"ready after {r['ready_s']:.2f}s; all CPU with the policy checker {r['total_cpu_s_with_checker']:.2f}s",
            flush=True,
        )
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
