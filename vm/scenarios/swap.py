"""Scenario 5: desktops with swap: a thrashing hog against a job that merely swaps (guest side).

``swap.py OUT TOKEN...``: ``swapfile`` (a 1 GiB swapfile) or ``zram`` (a 1 GiB zram device)
turns that swap on and any other off; each other TOKEN is ``DAEMON:WORKLOAD`` (or
``DAEMON:WORKLOAD=SECONDS``: a thrash's cap, or how long a steady swapper runs past its first
swap-out), run in turn with that daemon and nothing else under test running:

- DAEMON: ``kernel`` (no OOM daemon), ``desktop`` / ``default`` (uoomd on policies/desktop.toml
  or etc/uoomd.toml as shipped), ``desktop-dry`` (the same in dry-run: it logs what it would
  do), ``desktop-gateunmet`` (its refault gate set out of reach: only an ungated trigger, the
  backstop, can act on a thrash), ``earlyoom``, ``nohang``, ``systemd-oomd`` (configured as
  machine.PEER_CONFIG says), ``uoomd@NAME``: uoomd on the policy vm/scenarios/NAME.toml
  (the payload carries scenarios/), or ``record``: no OOM daemon, ``uoomd record`` on the
  shipped desktop policy writing ``trace-N.jsonl`` (what ``uoomd replay`` reads).
- ``mglru`` / ``classic-lru``: the multi-gen LRU on or off for the cases after it (each case
  records /sys/kernel/mm/lru_gen/enabled; the daemon is started anew, as it reads that once).
- WORKLOAD: ``idle`` (a baseline), ``steady`` (swapload.py steady: the hot set fits, the cold
  pages go to swap once), ``thrash`` (swapload.py thrash: a working set larger than RAM).

Once a second through every case a sampler records /proc/vmstat's swap and refault counters,
/proc/pressure/memory, MemAvailable and SwapFree, and the workload cgroup's memory.stat and
memory.pressure. Each case records those samples, when swapping began, how the workload ended
and uoomd's decisions; the host (tests/vm/swapstats.py) turns them into rates and verdicts.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from guestlib import (
    HERE,
    UOOMD,
    Scenario,
    alive,
    kernel_oom_kills,
    mark,
    shipped,
    show,
    uoomd_events,
    use_policy,
    wait_until,
)
from machine import start_daemon, stop_daemon

SWAP_MIB = 1024
VMSTAT_KEYS = (
    "pswpin",
    "pswpout",
    "pgmajfault",
    "workingset_refault_anon",
    "workingset_refault_file",
    "workingset_restore_anon",
    "workingset_restore_file",
    "workingset_activate_anon",
    "workingset_activate_file",
    "oom_kill",
)
MEMSTAT_KEYS = ("anon", "file", "workingset_refault_anon", "workingset_refault_file", "pgmajfault")
MEMINFO_KEYS = ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")
# How long each workload runs. A thrash is called after THRASH_LIMIT_S (the 120 s cap);
# a steady swapper runs STEADY_PAST_SWAP_S past the first page it swapped out, so a daemon has
# that long to get it wrong.
THRASH_LIMIT_S = 120.0
STEADY_PAST_SWAP_S = 90.0
STEADY_LIMIT_S = 300.0
IDLE_S = 30.0
RECORDS = Path("/var/lib/uoomd-vmtest-records")
LOAD = HERE / "swapload.py"


def read_keyed(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return found
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        name = name.rstrip(":")
        if name in keys:
            found[name] = int(value.split()[0])
    return found


def read_pressure(path: str) -> dict[str, float]:
    """some/full avg10 (percent) and total (microseconds) of a pressure file."""
    found: dict[str, float] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return found
    for line in text.splitlines():
        kind, *fields = line.split()
        for field in fields:
            key, _, value = field.partition("=")
            if key in ("avg10", "total"):
                found[f"{kind}_{key}"] = float(value)
    return found


class Sampler:
    """Once a second, in a thread of this (mlocked) process: the machine's and one cgroup's readings."""

    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []
        self.cgroup = ""  # the workload's cgroup directory, when there is one
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> dict[str, Any]:
        s: dict[str, Any] = {"t": round(time.monotonic(), 3)}
        s.update(read_keyed("/proc/vmstat", VMSTAT_KEYS))
        s.update({k: v * 1024 for k, v in read_keyed("/proc/meminfo", MEMINFO_KEYS).items()})  # bytes
        s.update({f"psi_{k}": v for k, v in read_pressure("/proc/pressure/memory").items()})
        cgroup = self.cgroup
        if cgroup:
            s.update({f"cg_{k}": v for k, v in read_keyed(f"{cgroup}/memory.stat", MEMSTAT_KEYS).items()})
            s.update({f"cg_psi_{k}": v for k, v in read_pressure(f"{cgroup}/memory.pressure").items()})
        return s

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.samples.append(self.sample())
            next_at += 1.0
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def since(self, t0: float) -> list[dict[str, Any]]:
        return [s for s in self.samples if s["t"] >= t0 - 1.0]


def setup_swap(sc: Scenario, kind: str) -> dict[str, Any]:
    if kind == "swapfile":
        # Written, not fallocated: the blocks of a fallocated file are unwritten extents, and the
        # first thrash on it swapped in at a third of the rate of the later ones (97k vs 243-441k
        # pages in 120 s, one boot), which made "the kernel alone" depend on coming first.
        sc.must("dd", "if=/dev/zero", "of=/swapfile", "bs=1M", f"count={SWAP_MIB}", "conv=fsync", timeout=600)
        Path("/swapfile").chmod(0o600)
        sc.must("mkswap", "/swapfile")
        sc.must("swapon", "/swapfile")
    elif kind == "zram":
        done = sc.sh("modprobe", "zram")
        if done.returncode != 0:
            raise RuntimeError(f"no zram in this kernel: {done.stderr.strip()}")
        Path("/sys/block/zram0/disksize").write_text(f"{SWAP_MIB}M")
        sc.must("mkswap", "/dev/zram0")
        sc.must("swapon", "/dev/zram0")
    else:
        raise ValueError(f"unknown swap kind {kind}")
    info: dict[str, Any] = {"kind": kind, "swaps": Path("/proc/swaps").read_text()}
    with contextlib.suppress(OSError):
        info["zram_algorithm"] = Path("/sys/block/zram0/comp_algorithm").read_text().strip()
    return info


def zram_stats() -> dict[str, int]:
    """zram0's mm_stat: orig_data_size, compr_data_size, mem_used_total (bytes), when there is one."""
    try:
        fields = Path("/sys/block/zram0/mm_stat").read_text().split()
    except OSError:
        return {}
    return {"orig_data_size": int(fields[0]), "compr_data_size": int(fields[1]), "mem_used_total": int(fields[2])}


class Workload:
    """swapload.py as a transient service (its own cgroup, as any program a user starts)."""

    def __init__(self, sc: Scenario, unit: str, *args: str) -> None:
        RECORDS.mkdir(parents=True, exist_ok=True)
        self.unit = unit
        self.record = RECORDS / unit
        self.record.unlink(missing_ok=True)
        sc.must(
            "systemd-run", f"--unit={unit}", "--service-type=exec", "--remain-after-exit",
            sys.executable, str(LOAD), *args, "--record", str(self.record), "--name", unit,
        )  # fmt: skip
        self.pid = int(show(unit, "MainPID").get("MainPID", "0"))
        group = show(unit, "ControlGroup").get("ControlGroup", "")
        self.cgroup = f"/sys/fs/cgroup{group}" if group else ""

    def events(self) -> list[list[str]]:
        try:
            return [line.split() for line in self.record.read_text().splitlines()]
        except OSError:
            return []

    def ended(self) -> bool:
        return self.pid == 0 or not alive(self.pid)

    def outcome(self) -> dict[str, Any]:
        state = show(self.unit, "Result", "ExecMainCode", "ExecMainStatus", "ActiveState", "SubState")
        return {"unit": self.unit, "pid": self.pid, "events": self.events(), **state}

    def stop(self) -> None:
        if self.cgroup:
            with contextlib.suppress(OSError):
                Path(self.cgroup, "cgroup.kill").write_text("1")
        subprocess.run(["systemctl", "stop", self.unit], capture_output=True, check=False)
        subprocess.run(["systemctl", "reset-failed", self.unit], capture_output=True, check=False)


def swap_started(samples: list[dict[str, Any]], t0: float) -> float | None:
    """When swapping began: the first sample after t0 whose pswpout rose past the one before t0."""
    before = [s for s in samples if s["t"] <= t0]
    base = before[-1]["pswpout"] if before else None
    for s in samples:
        if s["t"] > t0 and base is not None and s["pswpout"] > base:
            return float(s["t"])
    return None


# The refault gate no thrash on this machine meets (100% of RAM a second): what is left to act
# on a thrash is a trigger with gated = false, the backstop.
UNMET_GATE = 'psi_refault_gate = "100%"'


def policy_text(daemon: str) -> str:
    """The policy a uoomd DAEMON token names: ``desktop`` or ``default`` as shipped, or
    ``uoomd@NAME``; ``-dry`` adds dry_run, ``-gateunmet`` sets every guard's refault gate to
    UNMET_GATE."""
    base, _, variant = daemon.partition("-")
    if base.startswith("uoomd@"):
        text = (HERE / f"{base.removeprefix('uoomd@')}.toml").read_text()
    else:
        text = shipped("policies/desktop.toml" if base == "desktop" else "etc/uoomd.toml")
    if variant == "dry":
        text = text.replace("[daemon]\n", "[daemon]\ndry_run = true\n", 1)
    elif variant == "gateunmet":
        text, found = re.subn(r"^psi_refault_gate\s*=\s*\S+", UNMET_GATE, text, flags=re.MULTILINE)
        if not found:
            raise RuntimeError(f"{daemon}: the policy has no psi_refault_gate line to set")
    elif variant:
        raise ValueError(f"unknown uoomd variant {daemon}")
    return text


def start_uoomd(sc: Scenario, daemon: str) -> str:
    text = policy_text(daemon)
    sc.save_file(f"policy-{daemon}.toml", text)
    use_policy(sc, text)
    return "uoomd.service"


def is_uoomd(daemon: str) -> bool:
    return daemon.split("-", maxsplit=1)[0] in ("desktop", "default") or daemon.startswith("uoomd@")


class Daemons:
    """The daemon under test, kept running across consecutive cases that name the same one (a
    restart costs ~15 s of emulated time), its journal saved when it is stopped."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.name = "kernel"
        self.unit = ""
        self.runs = 0
        self.recorder: subprocess.Popen[bytes] | None = None

    def use(self, name: str) -> None:
        if name == self.name:
            return
        self.stop()
        with self.sc.step(f"start {name}"):
            if is_uoomd(name):
                self.unit = start_uoomd(self.sc, name)
            elif name == "record":
                self.start_recorder()
            elif name != "kernel":
                self.unit = start_daemon(self.sc, name, "")
            self.name = name
            time.sleep(3)  # the daemon's first readings

    def start_recorder(self) -> None:
        self.runs += 1
        # Beside the daemon's own: a policy in a directory only root can write (uoomd refuses others).
        policy = Path("/etc/uoomd/record.toml")
        policy.write_text(shipped("policies/desktop.toml"))
        policy.chmod(0o644)
        trace = self.sc.out / f"trace-{self.runs}.jsonl"
        argv = [str(UOOMD), "record", "--policy", str(policy), "-o", str(trace), "--max-size", "8MiB"]
        with (self.sc.out / f"record-{self.runs}.log").open("w") as log:
            self.recorder = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(5)  # its start-up (seconds when emulated), so the trace holds the whole case
        if self.recorder.poll() is not None:
            self.sc.note(f"uoomd record exited {self.recorder.returncode}: see record-{self.runs}.log")

    def stop(self) -> None:
        if self.recorder is not None:
            with self.sc.step("stop record"):
                self.recorder.send_signal(signal.SIGINT)  # it closes the trace and exits 0
                self.recorder.wait(timeout=60)
            self.recorder = None
        if not self.unit:
            self.name = "kernel"
            return
        with self.sc.step(f"stop {self.name}"):
            self.runs += 1
            journal = self.sc.sh("journalctl", "-b", "-u", self.unit, "--no-pager", "-o", "short-monotonic")
            self.sc.save_file(f"journal-{self.runs}-{self.name}.txt", journal.stdout)
            if is_uoomd(self.name):
                self.sc.must("systemctl", "stop", self.unit)
            else:
                stop_daemon(self.sc, self.name, self.unit)
        self.name, self.unit = "kernel", ""


UOOMD_EVENTS = (
    "victim_chosen",
    "victim_escalated",
    "action_result",
    "trigger_fired",
    "psi_warn",
    "psi_held",
    "no_candidate",
    "rate_limited",
    "victim_exited",
)


def workload_args(workload: str, mib_ram: int) -> tuple[str, ...]:
    if workload == "thrash":
        # 1.2x RAM: on the swapfile ~350 MiB must be out at any time, so every pass faults it
        # back in; on zram (4:1) the compressed pages take RAM too, and it thrashes as well.
        return ("thrash", "--mib", str(int(mib_ram * 1.2)))
    if workload == "steady":
        return ("steady", "--hot-mib", "300", "--total-mib", str(int(mib_ram * 1.25)))
    raise ValueError(f"unknown workload {workload}")


def run_case(
    sc: Scenario, sampler: Sampler, kind: str, daemons: Daemons, workload: str, *, limit_s: float | None
) -> dict[str, Any]:
    """One workload under the daemon now running; ``limit_s``: a thrash's cap, or how long a
    steady swapper runs past its first swap-out (None: THRASH_LIMIT_S / STEADY_PAST_SWAP_S)."""
    since = mark()
    t0 = time.monotonic()
    oom0 = kernel_oom_kills()
    record: dict[str, Any] = {"kind": kind, "daemon": daemons.name, "workload": workload, "t0": round(t0, 3)}
    record["lru_gen"] = lru_gen()
    mem_total = sampler.sample()["MemTotal"]
    load: Workload | None = None
    if workload == "idle":
        time.sleep(limit_s or IDLE_S)
    else:
        args = workload_args(workload, mem_total >> 20)
        record["args"] = list(args)
        load = Workload(sc, f"swap-{workload}", *args)
        sampler.cgroup = load.cgroup
        running = load
        past_swap_s = limit_s or STEADY_PAST_SWAP_S
        cap_s = limit_s or THRASH_LIMIT_S

        def over() -> bool:
            if running.ended():
                return True
            if workload == "thrash":
                return time.monotonic() - t0 >= cap_s
            began = swap_started(sampler.samples, t0)
            if began is not None and time.monotonic() - began >= past_swap_s:
                return True
            return time.monotonic() - t0 >= STEADY_LIMIT_S

        wait_until(over, STEADY_LIMIT_S + 10, 0.5)
        record["ended"] = load.ended()
    t1 = time.monotonic()
    record.update(s=round(t1 - t0, 1), t1=round(t1, 3), zram=zram_stats())
    if load is not None:
        record["outcome"] = load.outcome()
        load.stop()
    sampler.cgroup = ""
    record["kernel_oom_kills"] = kernel_oom_kills() - oom0
    if daemons.unit == "uoomd.service":
        events = [e for e in uoomd_events(since=since) if e["event"] in UOOMD_EVENTS]
        record["uoomd"] = events  # whole: the refault gate's facts (refault_bytes_per_s, ...) with the rest
    record["swap_started"] = swap_started(sampler.samples, t0)
    record["samples"] = [s for s in sampler.samples if t0 - 2 <= s["t"] <= t1]
    # Back to quiet before the next case: the workload's swap freed, memory back.
    wait_until(lambda: sampler.sample()["MemAvailable"] > mem_total // 2, 60, 1.0)
    time.sleep(3)
    sc.note(f"case {kind} {daemons.name}:{workload}: {record['s']} s, ended {record.get('ended')}, swap began "
            f"{record['swap_started']}")  # fmt: skip
    return record


LRU_GEN = Path("/sys/kernel/mm/lru_gen/enabled")
LRU_TOKENS = {"mglru": True, "classic-lru": False}


def lru_gen() -> str | None:
    """The multi-gen LRU's mask as the kernel shows it (0x0000: the classic LRU); None: no MGLRU."""
    try:
        return LRU_GEN.read_text().strip()
    except OSError:
        return None


def set_lru_gen(on: bool) -> str:
    """Turn the multi-gen LRU on (every component, "y") or off; its mask after."""
    if lru_gen() is None:
        raise RuntimeError("no multi-gen LRU in this kernel (CONFIG_LRU_GEN)")
    LRU_GEN.write_text("y" if on else "n")
    return lru_gen() or ""


def swap_off(sc: Scenario) -> None:
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        sc.must("swapoff", line.split()[0], timeout=600)


def main() -> int:
    """``swap.py OUT TOKEN...``: ``swapfile`` / ``zram`` turn that swap on (and the other off);
    ``DAEMON:WORKLOAD`` or ``DAEMON:WORKLOAD=SECONDS`` run a case (see the module docstring)."""
    out, *tokens = sys.argv[1:]
    sc = Scenario(Path(out))
    sampler = Sampler()
    sampler.start()
    cases: list[dict[str, Any]] = []
    sc.facts["cases"] = cases
    sc.facts["swap"] = {}
    daemons = Daemons(sc)
    kind = ""
    for token in tokens:
        if token in ("swapfile", "zram"):
            with sc.step(f"swap {token}") as rec:
                swap_off(sc)
                kind = ""
                rec.update(setup_swap(sc, token))
                kind = token
            sc.facts["swap"][token] = rec
            continue
        if token in LRU_TOKENS:
            # The daemon reads which LRU runs when it opens its readers: the next case starts it anew.
            daemons.stop()
            with sc.step(f"lru {token}") as rec:
                rec["lru_gen"] = set_lru_gen(LRU_TOKENS[token])
            sc.facts.setdefault("lru", []).append(rec)
            continue
        if not kind:
            sc.note(f"{token}: no swap on, skipped")
            continue
        daemon, _, rest = token.partition(":")
        workload, _, limit = rest.partition("=")
        with sc.step(f"{kind} {token}"):
            daemons.use(daemon)
            cases.append(run_case(sc, sampler, kind, daemons, workload, limit_s=float(limit) if limit else None))
        sc.save()
    daemons.stop()
    sampler.stop()
    (Path(out) / "samples.json").write_text(json.dumps(sampler.samples))
    sc.note("scenario done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
