"""Rates and stall figures from the swap scenario's once-a-second samples (vm/scenarios/swap.py).

Pure functions of a case's recorded samples, for the swap tier's assertions and its tables.
Usage: ``python3 -m tests.vm.swapstats RESULTS_DIR...`` prints the measurement tables of the
boots whose results (facts.json) are in those directories; ``--table RESULTS_DIR...`` the
"Desktops with swap" table of BENCHMARKS.md.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAGE_BYTES = 4096
# The counters whose rates tell a thrash from steady swapping (pages per second).
RATE_KEYS = (
    "pswpin",
    "pswpout",
    "refault",  # workingset_refault_anon + workingset_refault_file
    "workingset_refault_anon",
    "workingset_refault_file",
    "workingset_restore_anon",
    "workingset_restore_file",
    "workingset_activate_anon",
    "workingset_activate_file",
    "pgmajfault",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Spread:
    median: float
    p90: float
    max: float

    def cells(self, fmt: str = "{:.0f}") -> str:
        return " / ".join(fmt.format(v) for v in (self.median, self.p90, self.max))


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[rank - 1])


def spread(values: Sequence[float]) -> Spread:
    return Spread(median=quantile(values, 0.5), p90=quantile(values, 0.9), max=max(values, default=0.0))


def value(sample: dict[str, Any], key: str) -> float:
    if key == "refault":
        return float(sample.get("workingset_refault_anon", 0) + sample.get("workingset_refault_file", 0))
    return float(sample.get(key, 0))


def rates(samples: Sequence[dict[str, Any]], key: str) -> list[float]:
    """Per-second rates of a counter between consecutive samples."""
    out = []
    for a, b in itertools.pairwise(samples):
        dt = b["t"] - a["t"]
        if dt > 0:
            out.append((value(b, key) - value(a, key)) / dt)
    return out


def window_means(samples: Sequence[dict[str, Any]], key: str, span_s: float) -> list[float]:
    """Mean rates of a counter over every stretch of ``span_s`` seconds (one per sample that has
    a sample ``span_s`` before it): what a gate that averages over that span would see."""
    out = []
    for i, b in enumerate(samples):
        earlier = [a for a in samples[:i] if b["t"] - a["t"] >= span_s - 0.25]
        if earlier:
            a = earlier[-1]
            out.append((value(b, key) - value(a, key)) / (b["t"] - a["t"]))
    return out


def between(samples: Sequence[dict[str, Any]], t0: float, t1: float) -> list[dict[str, Any]]:
    return [s for s in samples if t0 <= s["t"] <= t1]


def full_windows(samples: Sequence[dict[str, Any]], *, window_s: float = 2.0, stall_us: float = 200_000) -> list[bool]:
    """For each sample: did the last ``window_s`` hold at least ``stall_us`` of full stall? (The
    kernel trigger "full 200ms of 2s", seen through once-a-second totals.)"""
    out = []
    for i, s in enumerate(samples):
        earlier = [p for p in samples[:i] if s["t"] - p["t"] >= window_s - 0.25]
        if not earlier:
            out.append(False)
            continue
        p = earlier[-1]
        scale = window_s / (s["t"] - p["t"])
        out.append((s["psi_full_total"] - p["psi_full_total"]) * scale >= stall_us)
    return out


def longest_run_s(flags: Sequence[bool], samples: Sequence[dict[str, Any]]) -> float:
    """The longest stretch of consecutive True flags, in seconds (first to last sample of it)."""
    best, start = 0.0, None
    for flag, s in zip(flags, samples, strict=True):
        if flag:
            start = s["t"] if start is None else start
            best = max(best, s["t"] - start)
        else:
            start = None
    return best


def event_time(case: dict[str, Any], name: str) -> float | None:
    for event in case.get("outcome", {}).get("events", []):
        if event[0] == name:
            return float(event[1])
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseStats:
    label: str
    seconds: float
    swap_began_s: float | None  # after the workload started
    window: str  # which samples the rates are over
    rates: dict[str, Spread]  # pages/s
    mem_total: int
    some_avg10: Spread
    full_avg10: Spread
    full_over_10_s: int  # samples with full avg10 > 10%
    trigger_windows: float  # fraction of samples whose last 2 s held >= 200 ms of full stall
    trigger_longest_s: float  # the longest run of such samples
    swap_ins: int  # pswpin over the case
    swap_used_max_mib: int
    ended: str

    def pct_ram(self, pages_s: float) -> float:
        return pages_s * PAGE_BYTES / self.mem_total * 100


def case_stats(case: dict[str, Any], *, window: str = "after swap began") -> CaseStats:
    samples = case["samples"]
    t0 = case["t0"]
    began = case.get("swap_started")
    start = t0
    if window == "after swap began" and began is not None:
        start = began - 1.0
    elif window == "after fill":
        start = event_time(case, "FILLED") or t0
    chosen = between(samples, start, case["t1"])
    if len(chosen) < 2:
        chosen = list(samples)
    mem_total = int(samples[0]["MemTotal"])
    flags = full_windows(chosen)
    swap_used = [(s["SwapTotal"] - s["SwapFree"]) >> 20 for s in samples]
    return CaseStats(
        label=f"{case['kind']} {case['daemon']}:{case['workload']}",
        seconds=case["s"],
        swap_began_s=None if began is None else round(began - t0, 1),
        window=window,
        rates={key: spread(rates(chosen, key)) for key in RATE_KEYS},
        mem_total=mem_total,
        some_avg10=spread([s["psi_some_avg10"] for s in chosen]),
        full_avg10=spread([s["psi_full_avg10"] for s in chosen]),
        full_over_10_s=sum(1 for s in chosen if s["psi_full_avg10"] > 10),
        trigger_windows=sum(flags) / len(flags) if flags else 0.0,
        trigger_longest_s=longest_run_s(flags, chosen),
        swap_ins=swap_ins(case),
        swap_used_max_mib=max(swap_used, default=0),
        ended=how_it_ended(case),
    )


def swap_ins(case: dict[str, Any]) -> int:
    """Pages swapped in (pswpin) from the workload's start to the end of the case."""
    samples = case["samples"]
    return int(value(samples[-1], "pswpin") - value(samples[0], "pswpin")) if samples else 0


def swap_used_max_mib(case: dict[str, Any]) -> int:
    return max(((s["SwapTotal"] - s["SwapFree"]) >> 20 for s in case["samples"]), default=0)


def full_over_10_s(case: dict[str, Any]) -> int:
    """Samples (seconds) with full avg10 above 10%: the issue's "full PSI > 10%" column."""
    return sum(1 for s in case["samples"] if s["t"] >= case["t0"] and s["psi_full_avg10"] > 10)


def signals_got(case: dict[str, Any]) -> list[str]:
    """The signals the workload recorded, and 'SIGKILL' (or 'signal N') if it died by one."""
    got = [e[0] for e in case.get("outcome", {}).get("events", []) if e[0].startswith("SIG")]
    outcome = case.get("outcome", {})
    if outcome.get("ExecMainCode") in ("2", "3"):  # CLD_KILLED, CLD_DUMPED
        status = outcome.get("ExecMainStatus")
        got.append("SIGKILL" if status == "9" else f"signal {status}")
    return got


def uoomd_victims(case: dict[str, Any]) -> list[dict[str, Any]]:
    """uoomd's victim_chosen events that named the workload (dry-run ones included)."""
    pid = case.get("outcome", {}).get("pid")
    return [e for e in case.get("uoomd", []) if e["event"] == "victim_chosen" and e.get("pid") == pid]


def trigger_index(trigger: object) -> int | None:
    """N of a trigger described as "psi[N] full ...", None for a level or anything else."""
    text = str(trigger)
    if not text.startswith("psi["):
        return None
    return int(text[4 : text.index("]")])


def passes_s(case: dict[str, Any]) -> float | None:
    """How long a thrash ran its passes (from FILLED to its end); None if it never filled."""
    filled = event_time(case, "FILLED")
    if filled is None:
        return None
    return float(case["t1"]) - filled if not case.get("ended") else _end_s(case) - filled


def _end_s(case: dict[str, Any]) -> float:
    """When the workload was last seen (the last sample before it ended, or the case's end)."""
    exited = [e for e in case.get("uoomd", []) if e["event"] == "victim_exited"]
    return float(exited[0]["mono"]) if exited else float(case["t1"])


def acted_s(case: dict[str, Any]) -> float | None:
    """When the workload got its first signal, after its start (its own record, else uoomd's)."""
    t0 = float(case["t0"])
    term = event_time(case, "SIGTERM")
    if term is not None:
        return term - t0
    chosen = uoomd_victims(case)
    if chosen:
        return float(chosen[0]["mono"]) - t0
    return None


def how_it_ended(case: dict[str, Any]) -> str:
    """Who ended the workload and how: its own record of a SIGTERM, how systemd saw it die, the
    kernel's OOM kills, and uoomd's escalation."""
    if case["workload"] == "idle":
        return "-"
    outcome = case.get("outcome", {})
    killed = outcome.get("ExecMainCode") in ("2", "3")  # CLD_KILLED, CLD_DUMPED
    if case.get("kernel_oom_kills"):
        return f"kernel OOM killer ({case['kernel_oom_kills']} kills)"
    escalated = any(e["event"] == "victim_escalated" for e in case.get("uoomd", []))
    by = " by uoomd" if uoomd_victims(case) else ""
    if event_time(case, "SIGTERM") is not None:
        return f"SIGTERM{by}" + (", then SIGKILL" if killed else "")
    if killed:
        status = outcome.get("ExecMainStatus")
        name = "SIGKILL" if status == "9" else f"signal {status}"
        # A SIGTERM the hog never handled: stuck in the kernel faulting its pages back in.
        return f"SIGTERM{by} (not handled in time), then {name}" if escalated else f"{name}{by}"
    return "never" if not case.get("ended") else f"exit {outcome.get('ExecMainStatus')}"


def render(stats: Sequence[CaseStats]) -> str:
    head = "| case | window | ended | swap began (s) | swap-ins | swap used max (MiB) |"
    lines = [head, "|---|---|---|---|---|---|"]
    for st in stats:
        lines.append(
            f"| {st.label} | {st.window} | {st.ended} | {st.swap_began_s} | {st.swap_ins} | {st.swap_used_max_mib} |"
        )
    lines += ["", "Rates in pages/s, median / p90 / max (and the p90 as % of RAM per second):", ""]
    lines.append("| case | window | " + " | ".join(RATE_KEYS) + " |")
    lines.append("|---|---|" + "---|" * len(RATE_KEYS))
    for st in stats:
        cells = [f"{st.rates[k].cells()} ({st.pct_ram(st.rates[k].p90):.2f}%)" for k in RATE_KEYS]
        lines.append(f"| {st.label} | {st.window} | " + " | ".join(cells) + " |")
    lines += ["", "PSI memory (avg10 %, median / p90 / max), and the desktop trigger (full 200 ms of 2 s):", ""]
    lines.append("| case | window | some avg10 | full avg10 | s with full avg10 > 10% | 2 s windows >= 200 ms full "
                 "| longest run of them (s) |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|")
    for st in stats:
        lines.append(
            f"| {st.label} | {st.window} | {st.some_avg10.cells('{:.1f}')} | {st.full_avg10.cells('{:.1f}')} "
            f"| {st.full_over_10_s} | {st.trigger_windows:.0%} | {st.trigger_longest_s:.0f} |"
        )
    return "\n".join(lines) + "\n"


DAEMON_LABELS = {
    "kernel": "kernel alone",
    "desktop": "uoomd, policies/desktop.toml",
    "default": "uoomd, etc/uoomd.toml",
    "earlyoom": "earlyoom",
    "nohang": "nohang",
    "systemd-oomd": "systemd-oomd",
}


def thrash_cells(case: dict[str, Any] | None) -> str:
    if case is None:
        return "(not run) | | | |"
    acted = acted_s(case)
    began = case.get("swap_started")
    after = "—"
    if acted is not None and case.get("ended"):
        since_swap = f", {acted - (began - case['t0']):.0f} s after swapping began" if began else ""
        after = f"{acted:.0f} s{since_swap}"
    ended = how_it_ended(case) if case.get("ended") else f"never ({case['s']:.0f} s cap)"
    return f"{ended} | {after} | {swap_ins(case):,} | {full_over_10_s(case)} s"


def steady_cells(case: dict[str, Any] | None) -> str:
    if case is None:
        return "(not run) |"
    began = case.get("swap_started")
    ran = f"{case['t1'] - began:.0f} s past swapping" if began else "never swapped"
    got = signals_got(case)
    verdict = f"**signalled** ({', '.join(got)} after {acted_s(case) or 0:.0f} s)" if got else "never signalled"
    return f"{verdict} ({ran}, {swap_used_max_mib(case)} MiB in swap) | {swap_ins(case):,}"


def render_table(cases: Sequence[dict[str, Any]]) -> str:
    """The "Desktops with swap" table: per daemon and swap kind, the thrash and the steady swapper
    (the last recorded case of each, when a combination ran more than once)."""
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for case in cases:
        found[(case["daemon"], case["kind"], case["workload"])] = case
    lines = [
        "| daemon | swap | thrash: hog ended | after | swap-ins (pages) | full PSI avg10 > 10% "
        "| steady swapper | its swap-ins |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for daemon, label in DAEMON_LABELS.items():
        for kind in ("swapfile", "zram"):
            thrash, steady = found.get((daemon, kind, "thrash")), found.get((daemon, kind, "steady"))
            if thrash is None and steady is None:
                continue
            lines.append(f"| {label} | {kind} | {thrash_cells(thrash)} | {steady_cells(steady)} |")
    return "\n".join(lines) + "\n"


def load_cases(results: Path) -> list[dict[str, Any]]:
    facts = json.loads((results / "facts.json").read_text())
    cases: list[dict[str, Any]] = facts.get("cases", [])
    return cases


def main(argv: list[str]) -> int:
    if argv[:1] == ["--table"]:
        sys.stdout.write(render_table([c for d in argv[1:] for c in load_cases(Path(d))]))
        return 0
    stats: list[CaseStats] = []
    for directory in argv:
        for case in load_cases(Path(directory)):
            stats.append(case_stats(case, window="whole case"))
            if case["workload"] != "idle":
                stats.append(case_stats(case))
            if case["workload"] == "steady":
                stats.append(case_stats(case, window="after fill"))
    sys.stdout.write(render(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
