"""What ``record_on_decision`` costs the daemon: CPU and RSS with it off and on, idle, near a level, and deciding.

    sudo python3 bench/flight.py [--seconds 60] [--rounds 2] [--only idle,near,deciding] [--json FILE]

In each scenario two ``uoomd run --dry-run`` (nothing is ever signalled) run side by side on the
same policy, one with ``record_on_decision = true``: the machine's load is the same for both.
Once each has written its state file and 5 s more, CPU is the scheduler's run time of the
daemon (/proc/PID/schedstat) over the window, and of its reaped children (utime + stime of
``cutime``/``cstime``: the trace writers); RSS is VmRSS at the end.

- idle: the shipped default policy (etc/uoomd.toml: the machine, poll_max 5 s, quiet ticks).
- near: bench/record.py's cgroup: 256 MiB, a holder of 120 MiB and 8 idle processes, always
  within reach of the term level, so both poll at poll_min (20 ms) with a warm ranking; the ring
  is full after 82 s (it is allocated, and counted in RSS, from the start).
- deciding: the same cgroup with the term level above what is available, term_timeout 1 s: a
  would_term every ~1 s, so the recording daemon writes a trace every second (``trace_written``:
  how long the loop was held by the fork, ``loop_ms``, and its CPU, ``loop_cpu_ms``; what the child
  did, ``write_s`` and ``bytes``).

The processes are ours (oom_score_adj 1000), stopped by PID with their cgroup at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import near_level  # noqa: E402

TICK_S = os.sysconf("SC_CLK_TCK")
VARIANTS = ("off", "on")


def uoomd() -> str:
    beside = Path(sys.executable).parent / "uoomd"
    return str(beside) if beside.exists() else shutil.which("uoomd") or sys.exit("uoomd is not installed")


def usage(pid: int) -> tuple[int, float, int]:
    """(run ns, children's utime + stime in s, VmRSS KiB) of ``pid``."""
    run_ns = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    children_s = (int(fields[13]) + int(fields[14])) / TICK_S  # cutime, cstime: fields 16 and 17 of proc(5)
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return run_ns, children_s, rss


def policy_for(base_text: str, workdir: Path, variant: str) -> Path:
    extra = f'state_file = "{workdir}/state.json"\n'
    if variant == "on":
        extra += f'record_on_decision = true\nrecord_dir = "{workdir}/traces"\n'
    # The keys set here, as the base policy may set them too (etc/uoomd.toml does, commented):
    ours = ("state_file =", "record_on_decision =", "record_dir =")
    text = "\n".join(line for line in base_text.splitlines() if not line.startswith(ours)) + "\n"
    if "[daemon]" not in text:
        text = "[daemon]\n" + text
    text = text.replace("[daemon]\n", "[daemon]\n" + extra, 1)
    path = workdir / "policy.toml"
    path.write_text(text)
    return path


@contextmanager
def scenario(name: str, base: Path) -> Iterator[str]:
    """The policy text of a scenario, with whatever it needs running meanwhile."""
    if name == "idle":
        yield (ROOT / "etc" / "uoomd.toml").read_text()
        return
    base.mkdir(mode=0o700, parents=True)
    with near_level(base) as policy:
        text = policy.read_text()
        if name == "deciding":
            text = text.replace('mem_available_term = "10%"', 'mem_available_term = "80%"')
            text = text.replace(
                "[[guard]]", '[escalation]\nterm_timeout = "1s"\nmax_kills_per_minute = 1000\n\n[[guard]]'
            )
        yield text


def one_round(name: str, seconds: float, base: Path, index: int) -> list[dict[str, object]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    dirs: dict[str, Path] = {}
    with scenario(name, base / f"{name}-{index}-scene") as text:
        try:
            for variant in VARIANTS:
                workdir = base / f"{name}-{index}-{variant}"
                workdir.mkdir(mode=0o700, parents=True)
                dirs[variant] = workdir
                with (workdir / "uoomd.log").open("wb") as log:
                    procs[variant] = subprocess.Popen(
                        [uoomd(), "run", "--dry-run", "--policy", str(policy_for(text, workdir, variant))],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
            deadline = time.monotonic() + 120
            while not all((d / "state.json").exists() for d in dirs.values()):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                    sys.exit(f"a daemon did not start: see {base}/*/uoomd.log")
                time.sleep(0.2)
            time.sleep(5.0)  # start-up (the policy checker child, the first readings) is not the steady cost
            first = {v: (time.monotonic(), usage(p.pid)) for v, p in procs.items()}
            time.sleep(seconds)
            out: list[dict[str, object]] = []
            for variant, proc in procs.items():
                at0, (ns0, child0, _rss0) = first[variant]
                ns1, child1, rss1 = usage(proc.pid)
                span_s = time.monotonic() - at0
                events = [
                    json.loads(line)
                    for line in (dirs[variant] / "uoomd.log").read_text().splitlines()
                    if line.startswith("{")
                ]
                written = [e for e in events if e.get("event") == "trace_written"]
                out.append(
                    {
                        "scenario": name,
                        "variant": variant,
                        "round": index,
                        "cpu_ms_per_min": (ns1 - ns0) / 1e6 / span_s * 60,
                        "children_cpu_ms_per_min": (child1 - child0) * 1000 / span_s * 60,
                        "rss_mib": rss1 / 1024,
                        "decisions": sum(1 for e in events if e.get("event") == "victim_chosen"),
                        "traces": len(written),
                        "loop_ms": statistics.median(float(e["loop_ms"]) for e in written) if written else None,
                        "loop_cpu_ms": statistics.median(float(e["loop_cpu_ms"]) for e in written) if written else None,
                        "write_s": statistics.median(float(e["write_s"]) for e in written) if written else None,
                        "trace_kib": statistics.median(int(e["bytes"]) for e in written) / 1024 if written else None,
                        "failed": sum(1 for e in events if e.get("event") == "trace_write_failed"),
                    }
                )
            return out
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="idle,near,deciding")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="uoomd-bench-flight-") as tmp:
        for name in args.only.split(","):
            for index in range(args.rounds):
                for row in one_round(name, args.seconds, Path(tmp), index):
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    for name in args.only.split(","):
        for variant in VARIANTS:
            mine = [r for r in rows if r["scenario"] == name and r["variant"] == variant]
            cpu = statistics.median(float(str(r["cpu_ms_per_min"])) for r in mine)
            kids = statistics.median(float(str(r["children_cpu_ms_per_min"])) for r in mine)
            rss = statistics.median(float(str(r["rss_mib"])) for r in mine)
            traces = [r for r in mine if r["traces"]]
            extra = ""
            if traces:
                loop = statistics.median(float(str(r["loop_ms"])) for r in traces)
                loop_cpu = statistics.median(float(str(r["loop_cpu_ms"])) for r in traces)
                write = statistics.median(float(str(r["write_s"])) for r in traces)
                kib = statistics.median(float(str(r["trace_kib"])) for r in traces)
                per_min = statistics.median(float(str(r["traces"])) / args.seconds * 60 for r in traces)
                extra = (
                    f"; {per_min:.0f} traces/min, loop held {loop:.2f} ms ({loop_cpu:.2f} ms CPU), "
                    f"child {write * 1000:.0f} ms, {kib:.0f} KiB each"
                )
            print(
                f"median {name:<9} {variant:<3} cpu {cpu:7.2f} ms/min = {cpu * 60 / 1000:6.2f} s/h, "
                f"children {kids:6.2f} ms/min, rss {rss:5.1f} MiB{extra}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
