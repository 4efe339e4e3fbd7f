"""The benchmark's one entry point: uoomd next to earlyoom and nohang, each confined to a PID namespace of its own hogs.

    sudo python3 bench/run.py [--rounds 5] [--procs 2000] [--rates 256,1024] [--idle-s 60]
                              [--only reaction,idle,selection] [--json FILE] [--markdown FILE]

Installs Debian's earlyoom and nohang when missing (apt-get). Scenarios, each daemon in turn
(A B C, A B C, ..., the order rotated every round):

1. reaction: a hog fills memory at each nominal rate; the time from MemAvailable crossing the
   term level (interpolated from the hog's own per-step log) to the hog's SIGTERM handler,
   and the MiB it allocated in between. The levels sit 1.5 GiB under what is available when
   the round starts, identical for all three daemons.
2. the same with --procs idle processes alive beside the hog (the scan cost shows); uoomd's
   detect -> signal time from its log; nohang's victim search time from its log.
3. idle: CPU seconds per hour and VmRSS of each daemon on its shipped defaults.
4. selection: uoomd's read_snapshot + rank over --procs processes, earlyoom's "selecting
   victim took" (-d, --dryrun), nohang's "Found N tasks ... in X ms" from scenario 2.

Not run by CI: it takes ~15 minutes, needs root, and fills up to 2.5 GiB at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers, scenarios
from bench.analysis import Summary, markdown_table, ratio, summarize
from bench.sandbox import Pod
from bench.scenarios import IdleRound, ReactionRound, Selection

PEERS = ("earlyoom", "nohang")


def machine() -> dict[str, str]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = scenarios.meminfo_bytes()
    return {
        "cpu": f"{model}, {os.cpu_count()} CPUs",
        "memory": f"{info['MemTotal'] / (1 << 30):.1f} GiB, swap {info['SwapTotal'] / (1 << 30):.1f} GiB",
        "kernel": platform.release(),
    }


def _stop_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: pods closed, processes stopped


def rotated(names: Sequence[str], by: int) -> list[str]:
    by %= len(names)
    return [*names[by:], *names[:by]]


def run_reaction(args: argparse.Namespace, workdir: Path, out: dict[str, Any]) -> list[ReactionRound]:
    rounds: list[ReactionRound] = []
    for procs in (0, args.procs):
        with Pod() as pod:
            if procs:
                started = pod.call("sleepers", n=procs)
                print(f"[pod] {started['sleepers']} idle processes started in {started['took_s']} s", flush=True)
                out["confinement"] = scenarios.confinement(pod, workdir=workdir)
                print(f"[confinement] {json.dumps(out['confinement'])}", flush=True)
                if "selection" in args.only:
                    sel = scenarios.selection(pod, workdir=workdir)
                    out["selection"] = dataclasses.asdict(sel)
            if "reaction" not in args.only:
                continue
            for rate in args.rates:
                for index in range(args.rounds):
                    for name in rotated(peers.NAMES, index):
                        r = scenarios.reaction_round(
                            pod, name, rate_mib_s=rate, procs=procs, round_index=index, workdir=workdir
                        )
                        rounds.append(r)
                        res = r.result
                        print(
                            f"[reaction] {name:<8} rate={rate:<5} procs={procs:<5} round={index} "
                            + (
                                f"latency={res.latency_ms:7.1f} ms past={res.past_mib:6.1f} MiB "
                                f"real={res.fill_rate_mib_s:5.0f} MiB/s"
                                if res
                                else f"FAILED: {r.error}"
                            )
                            + (
                                f" detect->signal={r.detect_to_signal_ms} ms"
                                if r.detect_to_signal_ms is not None
                                else ""
                            )
                            + (f" nohang-search={list(r.selection_ms)} ms" if r.selection_ms else ""),
                            flush=True,
                        )
    return rounds


def run_idle(args: argparse.Namespace, workdir: Path) -> list[IdleRound]:
    out: list[IdleRound] = []
    for index in range(args.rounds):
        for r in scenarios.idle_round(index, seconds=args.idle_s, workdir=workdir):
            out.append(r)
            print(
                f"[idle] {r.daemon:<8} round={index} cpu={r.cpu_s_per_h:6.2f} s/h rss={r.rss_mib:5.1f} MiB", flush=True
            )
    return out


# --- tables -----------------------------------------------------------------------------------


def _row(label: str, per: dict[str, Summary], digits: int = 1) -> list[str]:
    return [
        label,
        *(per[n].cell(digits) for n in peers.NAMES),
        *(ratio(per["uoomd"], per[p]) for p in PEERS),
    ]


HEADER = ["measure", "uoomd", "earlyoom", "nohang", "uoomd/earlyoom", "uoomd/nohang"]


def reaction_tables(rounds: list[ReactionRound], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    rows: list[list[str]] = []
    medians: dict[str, Any] = {}
    for procs in (0, args.procs):
        for rate in args.rates:
            sel = [r for r in rounds if r.procs == procs and r.rate_mib_s == rate]
            ok = [r for r in sel if r.result is not None]
            if not sel:
                continue
            real = summarize([r.result.fill_rate_mib_s for r in ok if r.result is not None])
            lat = {n: summarize([r.result.latency_ms for r in ok if r.daemon == n and r.result]) for n in peers.NAMES}
            past = {n: summarize([r.result.past_mib for r in ok if r.daemon == n and r.result]) for n in peers.NAMES}
            where = f"{rate} MiB/s nominal (real {real.median:.0f}), {procs} other processes"
            rows.append(_row(f"reaction ms, {where}", lat))
            rows.append(_row(f"MiB past the level, {where}", past))
            failed = {n: sum(1 for r in sel if r.daemon == n and r.result is None) for n in peers.NAMES}
            if any(failed.values()):
                rows.append(["rounds without a reaction", *(str(failed[n]) for n in peers.NAMES), "", ""])
            medians[f"{rate}/{procs}"] = {n: lat[n].median for n in peers.NAMES}
    return markdown_table(HEADER, rows), medians


def cost_tables(
    rounds: list[ReactionRound], idle: list[IdleRound], sel: Selection | None, args: argparse.Namespace
) -> str:
    rows: list[list[str]] = []
    if idle:
        cpu = {n: summarize([r.cpu_s_per_h for r in idle if r.daemon == n]) for n in peers.NAMES}
        rss = {n: summarize([r.rss_mib for r in idle if r.daemon == n]) for n in peers.NAMES}
        rows.append(_row(f"idle CPU s per hour ({args.idle_s:.0f} s windows)", cpu, 2))
        rows.append(_row("idle RSS MiB", rss, 1))
    na = summarize([])
    if sel is not None:
        nohang = summarize(
            [ms for r in rounds if r.daemon == "nohang" and r.procs == args.procs for ms in r.selection_ms]
        )
        rows.append(
            _row(
                f"select a victim among {args.procs} processes, ms",
                {"uoomd": summarize(sel.uoomd_full_ms), "earlyoom": summarize(sel.earlyoom_ms), "nohang": nohang},
            )
        )
        rows.append(
            _row(
                "  uoomd's warm refresh (kept scanner + ranking), ms",
                {"uoomd": summarize(sel.uoomd_warm_ms), "earlyoom": na, "nohang": na},
            )
        )
    for procs in (0, args.procs):
        d2s = summarize(
            [r.detect_to_signal_ms for r in rounds if r.procs == procs and r.detect_to_signal_ms is not None]
        )
        if d2s.n:
            rows.append(
                _row(
                    f"uoomd detect -> signal, {procs} other processes, ms",
                    {"uoomd": d2s, "earlyoom": na, "nohang": na},
                    2,
                )
            )
    return markdown_table(HEADER, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--procs", type=int, default=2000)
    parser.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024])
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--only", type=lambda s: set(s.split(",")), default={"reaction", "idle", "selection"})
    parser.add_argument("--json", type=Path, default=None, help="write every round here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root: PID namespaces, /proc mounts and oom_score_adj")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    installed = peers.ensure_installed()
    workdir = Path(tempfile.mkdtemp(prefix="uoomd-bench-"))
    out: dict[str, Any] = {
        "command": " ".join(["python3", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "versions": peers.versions(),
        "installed": installed,
        "workdir": str(workdir),
    }
    print(f"[bench] logs in {workdir}; {json.dumps(out['versions'])}", flush=True)
    rounds: list[ReactionRound] = []
    idle: list[IdleRound] = []
    try:
        if {"reaction", "selection"} & args.only:
            rounds = run_reaction(args, workdir, out)
        if "idle" in args.only:
            idle = run_idle(args, workdir)
    except KeyboardInterrupt:
        print("[bench] interrupted: every pod was closed, its processes killed", file=sys.stderr)
        return 130
    finally:
        out["reaction"] = [dataclasses.asdict(r) for r in rounds]
        out["idle"] = [dataclasses.asdict(r) for r in idle]
        if args.json is not None:
            args.json.write_text(json.dumps(out, indent=1, default=str))
    sel = Selection(**out["selection"]) if "selection" in out else None
    reaction_md, medians = reaction_tables(rounds, args)
    out["medians"] = medians
    text = "\n\n".join(
        [
            f"Command: `{out['command']}`  ",
            f"Machine: {out['machine']['cpu']}, {out['machine']['memory']}, Linux {out['machine']['kernel']}  ",
            "Versions: " + "; ".join(f"{k} {v}" for k, v in out["versions"].items()),
            "Reaction (crossing of the term level -> SIGTERM in the hog), median (min–max):",
            reaction_md,
            "Costs, median (min–max):",
            cost_tables(rounds, idle, sel, args),
        ]
    )
    print("\n" + text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
