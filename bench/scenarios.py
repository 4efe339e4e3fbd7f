"""Run the benchmark's scenarios in pods: reaction to a hog, idle cost, selection cost, and what each daemon can see."""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import peers
from bench.analysis import Reaction, Step, reaction
from bench.peers import DaemonSpec, Levels
from bench.sandbox import Pod, PodError

BENCH = Path(__file__).resolve().parent
HOG = BENCH / "hog.py"
SELECTION = BENCH / "selection.py"
MIB = 1 << 20
GIB = 1 << 30

# The hog must allocate this much before MemAvailable reaches the term level...
HEADROOM_BYTES = 3 * GIB // 2
# ...and stops growing 1 GiB past it (2.5 GiB in all, under the 4 GiB cap), holding
# there for a few seconds before it gives up: a daemon that never reacts costs a round, not the machine.
HOG_PAST_LEVEL_MIB = 1024
HOG_GIVE_UP_S = 3.0
# SIGKILL levels sit 2 GiB under the term level: past anything the hog reaches, so every
# daemon's first signal is its SIGTERM and the hog's log is always written.
KILL_BELOW_TERM_BYTES = 2 * GIB
# Never start a round unless this much is available: the hog then leaves at least
# 8 - 2.5 = 5.5 GiB to the rest of the machine.
MIN_AVAILABLE_BYTES = 8 * GIB
SETTLE_S = 1.5  # after a daemon says it is watching, before the hog starts


class MachineBusy(RuntimeError):
    """Too little memory available to run a round safely."""


def meminfo_bytes() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


def available_bytes() -> int:
    return meminfo_bytes()["MemAvailable"]


def start_daemon(pod: Pod, spec: DaemonSpec, log: Path, timeout_s: float = 20.0) -> int:
    """Spawn the daemon in the pod and wait until its output says it is watching."""
    pid = pod.spawn(list(spec.argv), out=log, env=dict(spec.env))
    deadline = time.monotonic() + timeout_s
    while True:
        if log.exists() and spec.ready_marker in log.read_text(errors="replace"):
            return pid
        if pod.call("wait", pid=pid, timeout_s=0.02)["exited"]:
            raise PodError(f"{spec.name} exited at start; its output:\n{log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            pod.call("stop", pid=pid, grace_s=2)
            raise PodError(f"{spec.name} not ready within {timeout_s}s: {log}")


def wait_memory_back(target_bytes: int, timeout_s: float = 3.0) -> None:
    """The hog was reaped, so its memory is freed already; this waits out page-cache churn,
    briefly: on a shared machine others may hold more than before, which is no reason to stall."""
    deadline = time.monotonic() + timeout_s
    while available_bytes() < target_bytes and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)


# --- scenario 1 and 2: reaction --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReactionRound:
    daemon: str
    rate_mib_s: int
    procs: int
    round: int
    term_bytes: int
    result: Reaction | None
    detect_to_signal_ms: float | None = None  # uoomd: from its log
    selection_ms: tuple[float, ...] = ()  # nohang: its "Found N tasks ... in X ms"
    error: str | None = None
    log: str = ""


def reaction_round(
    pod: Pod, name: str, *, rate_mib_s: int, procs: int, round_index: int, workdir: Path
) -> ReactionRound:
    before = available_bytes()
    if before < MIN_AVAILABLE_BYTES:
        raise MachineBusy(f"only {before / GIB:.1f} GiB available; a round needs {MIN_AVAILABLE_BYTES / GIB:.0f}")
    levels = Levels(term_bytes=before - HEADROOM_BYTES, kill_bytes=before - HEADROOM_BYTES - KILL_BELOW_TERM_BYTES)
    tag = f"{name}-{rate_mib_s}-{procs}-{round_index}"
    log = workdir / f"{tag}.log"
    hog_out = workdir / f"{tag}.hog.json"
    spec = peers.spec_for(name, levels, workdir / tag)
    hog_max_mib = (HEADROOM_BYTES // MIB) + HOG_PAST_LEVEL_MIB

    def done(result: Reaction | None, error: str | None, text: str = "") -> ReactionRound:
        return ReactionRound(
            daemon=name,
            rate_mib_s=rate_mib_s,
            procs=procs,
            round=round_index,
            term_bytes=levels.term_bytes,
            result=result,
            detect_to_signal_ms=peers.uoomd_detect_to_signal_ms(text) if name == "uoomd" else None,
            selection_ms=tuple(ms for _n, ms in peers.nohang_selection_ms(text)) if name == "nohang" else (),
            error=error,
            log=str(log),
        )

    daemon_pid = start_daemon(pod, spec, log)
    error = None
    try:
        time.sleep(SETTLE_S)
        hog_argv = [
            sys.executable,
            str(HOG),
            "--out",
            str(hog_out),
            "--fill-rate-mib-s",
            str(rate_mib_s),
            "--max-mib",
            str(hog_max_mib),
            "--give-up-s",
            str(HOG_GIVE_UP_S),
        ]
        hog_pid = pod.spawn(hog_argv, adj=1000)
        timeout_s = hog_max_mib / min(rate_mib_s, 200) + HOG_GIVE_UP_S + 10
        if not pod.call("wait", pid=hog_pid, timeout_s=timeout_s)["exited"]:
            pod.call("stop", pid=hog_pid, grace_s=0.5)
            error = "hog did not finish"
    finally:
        pod.call("stop", pid=daemon_pid, grace_s=3)
    wait_memory_back(before - 256 * MIB)
    text = log.read_text(errors="replace")
    if error is None and not hog_out.exists():
        error = "hog wrote no log (killed?)"
    if error is not None:
        return done(None, error, text)
    record: dict[str, Any] = json.loads(hog_out.read_text())
    steps: list[Step] = [(float(a), float(b), int(c), int(d)) for a, b, c, d in record["steps"]]
    if steps and record["signal_at"] is not None:
        # The hog's handler read MemAvailable too: one more reading, at the signal. Others'
        # allocations can carry memory under the level between the hog's last step and it.
        steps.append((steps[-1][1], record["signal_at"], record["signal_mib"], record["signal_available_kib"]))
    result = reaction(steps, levels.term_bytes, record["signal_at"], record["signal_mib"])
    if result is None:
        error = "no SIGTERM before the hog gave up" if record["signal_at"] is None else "no crossing seen"
    return done(result, error, text)


# --- scenario 3: idle cost -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IdleRound:
    daemon: str
    round: int
    cpu_s_per_h: float  # from schedstat (ns)
    tick_cpu_s_per_h: float  # from utime + stime (10 ms ticks), for comparison
    rss_mib: float
    seconds: float


def idle_round(round_index: int, *, seconds: float, workdir: Path) -> list[IdleRound]:
    """All three daemons at once, each in its own pod, on their shipped default levels."""
    out: list[IdleRound] = []
    pods: dict[str, Pod] = {}
    try:
        pids: dict[str, int] = {}
        for name in peers.NAMES:
            pods[name] = Pod()
            spec = peers.spec_for(name, None, workdir / f"idle-{name}-{round_index}")
            pids[name] = start_daemon(pods[name], spec, workdir / f"idle-{name}-{round_index}.log")
        time.sleep(5.0)  # start-up work (uoomd's policy child, nohang's config parse) is not idle cost
        first = {name: pods[name].call("usage", pid=pids[name]) for name in peers.NAMES}
        time.sleep(seconds)
        for name in peers.NAMES:
            last = pods[name].call("usage", pid=pids[name])
            span_s = last["at"] - first[name]["at"]
            cpu_s = (last["run_ns"] - first[name]["run_ns"]) / 1e9
            tick_cpu_s = (last["ticks"] - first[name]["ticks"]) / last["clk_tck"]
            out.append(
                IdleRound(
                    daemon=name,
                    round=round_index,
                    cpu_s_per_h=cpu_s / span_s * 3600,
                    tick_cpu_s_per_h=tick_cpu_s / span_s * 3600,
                    rss_mib=last["rss_kib"] / 1024,
                    seconds=span_s,
                )
            )
    finally:
        for pod in pods.values():
            pod.close()
    return out


# --- scenario 4: selection cost --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    uoomd_full_ms: list[float] = field(default_factory=list)
    uoomd_warm_ms: list[float] = field(default_factory=list)
    uoomd_procs: int = 0
    earlyoom_ms: list[float] = field(default_factory=list)


def selection(pod: Pod, *, workdir: Path, runs: int = 15) -> Selection:
    """uoomd's rank over the pod's processes (library, in the pod); earlyoom's own timing of its
    victim search, printed with -d in --dryrun while the term level sits above what is available."""
    out = workdir / "selection-uoomd.json"
    pid = pod.spawn([sys.executable, str(SELECTION), "--out", str(out), "--runs", str(runs)])
    if not pod.call("wait", pid=pid, timeout_s=120)["exited"]:
        pod.call("stop", pid=pid, grace_s=1)
        raise PodError("bench/selection.py did not finish")
    data: dict[str, Any] = json.loads(out.read_text())
    info = meminfo_bytes()
    # Above MemAvailable (so it "acts" at every poll, in dry-run) and under MemTotal (earlyoom's bound).
    term = (info["MemAvailable"] + info["MemTotal"]) // 2
    spec = peers.earlyoom_spec(Levels(term_bytes=term, kill_bytes=term // 2), debug=True, dryrun=True)
    log = workdir / "selection-earlyoom.log"
    eo_pid = start_daemon(pod, spec, log)
    time.sleep(3.0)
    pod.call("stop", pid=eo_pid, grace_s=2)
    return Selection(
        uoomd_full_ms=data["full_ms"],
        uoomd_warm_ms=data.get("warm_ms", []),
        uoomd_procs=data["procs"],
        earlyoom_ms=peers.earlyoom_selection_ms(log.read_text(errors="replace")),
    )


# --- confinement: what each daemon sees -------------------------------------------------------


def confinement(pod: Pod, *, workdir: Path) -> dict[str, Any]:
    """What the pod, earlyoom (-d), nohang (--tasks) and uoomd (candidates) list as processes;
    every PID each one sees must be one the pod started (or the pod itself)."""
    report: dict[str, Any] = {"probe": pod.call("probe")}
    visible = pod.call("visible")
    ours = set(visible["ours"])
    report["pod_sees"] = len(visible["processes"])
    report["host_processes"] = sum(1 for e in Path("/proc").iterdir() if e.name.isdigit())

    info = meminfo_bytes()
    term = (info["MemAvailable"] + info["MemTotal"]) // 2
    log = workdir / "confine-earlyoom.log"
    spec = peers.earlyoom_spec(Levels(term_bytes=term, kill_bytes=term // 2), debug=True, dryrun=True)
    eo_pid = start_daemon(pod, spec, log)
    pod.call("stop", pid=eo_pid, grace_s=2)
    seen_eo = {p for p, _n in peers.earlyoom_seen(log.read_text(errors="replace"))}

    conf_dir = workdir / "confine-nohang"
    conf_dir.mkdir(parents=True, exist_ok=True)
    peers.nohang_spec(None, conf_dir)
    tasks_log = workdir / "confine-nohang.log"
    argv = ["/usr/bin/python3", str(peers.NOHANG), "--tasks", "--config", str(conf_dir / "nohang.conf")]
    nh_pid = pod.spawn(argv, out=tasks_log)
    pod.call("wait", pid=nh_pid, timeout_s=60)
    seen_nh = {int(m) for m in re.findall(r"^#\s+(\d+)\s", tasks_log.read_text(), re.MULTILINE)}

    uo_dir = workdir / "confine-uoomd"
    uo_dir.mkdir(parents=True, exist_ok=True)
    policy = uo_dir / "uoomd.toml"
    policy.write_text(peers.uoomd_policy(None, uo_dir))
    cand_out = workdir / "confine-uoomd.json"
    uo_pid = pod.spawn([*peers.uoomd_command(), "candidates", "--policy", str(policy), "--json"], out=cand_out)
    pod.call("wait", pid=uo_pid, timeout_s=60)
    seen_uo = {int(row["pid"]) for row in json.loads(cand_out.read_text())}
    # Each listing ran as the pod's child: its own PID (and its children's, uoomd's policy
    # loader) came after `ours` was taken, so PIDs above the last one the pod knew are its own.
    for name, seen, own in (("earlyoom", seen_eo, eo_pid), ("nohang", seen_nh, nh_pid), ("uoomd", seen_uo, uo_pid)):
        foreign = sorted(p for p in seen - ours if p < own)
        report[name] = {"sees": len(seen), "not_started_by_the_pod": foreign}
    return report
