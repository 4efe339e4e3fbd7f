"""Rule regexes: the worst crafted text against each shipped pattern; a scan + rank of 2,000 processes, 50 rules.

    python3 bench/regex.py [--procs 2000] [--runs 7] [--no-scan]

1. Every pattern of etc/uoomd.toml and policies/*.toml, compiled to its DFA (uoomd/dfa.py),
   searched in crafted texts of the longest command line the scanner reads (4096 bytes; 16,384
   characters when every byte is undecodable and becomes ``\\xNN``): runs of one character,
   the pattern's own words and their prefixes over and over (every one a false start), text
   that leaves the skip state every few characters, random text over the pattern's alphabet.
   The worst text per pattern is shown, with what ``re.search`` takes on it.
2. Issue 12's cases: the DFA, and ``re`` in a child killed after --re-timeout seconds.
3. N processes (sleep(1), exec'd through a symlink for its name, argv[0] a synthetic command
   line of 20 B to 4 KiB) scanned and ranked with a policy of 50 rules: read_snapshot() +
   rank() from nothing, the same with Python's ``re`` in place of the DFAs (for comparison
   only), and the daemon's path, ProcScanner.scan() + rank(previous=). The processes are
   ours and stopped by PID at the end.
4. The daemon's cost: VmRSS of importing uoomd.dfa and unpickling the 50-rule Plan in
   ``python -I -S``, against re.compile of the same patterns.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uoomd import kernel
from uoomd.dfa import Dfa
from uoomd.plan import MatchPlan, Plan
from uoomd.policy.automaton import SKIP_AFTER, compile_regex
from uoomd.policy.load import parse_plan
from uoomd.readings import Snapshot
from uoomd.scoring import Ranking, rank
from uoomd.sources.procfs import read_snapshot
from uoomd.sources.scanner import ProcScanner

ROOT = Path(__file__).resolve().parent.parent
CMDLINE_BYTES = 4096  # uoomd/sources/procfs.py _CMDLINE_MAX
LONGEST = CMDLINE_BYTES * 4  # characters, every byte undecodable: "\xNN"
SHIPPED = [ROOT / "etc" / "uoomd.toml", *sorted((ROOT / "policies").glob("*.toml"))]


def best_of(search: Callable[[str], object], text: str, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        search(text)
        best = min(best, time.perf_counter() - t0)
    return best


# --- 1. every shipped pattern, its worst crafted text -------------------------------------------


def shipped_patterns() -> list[tuple[str, str, str]]:
    """(where, key, pattern) for every regex of every shipped policy."""
    found = []
    for path in SHIPPED:
        for i, rule in enumerate(tomllib.loads(path.read_text())["rule"]):
            label = rule.get("name", f"rule[{i}]")
            for key in ("name", "cmdline", "exe", "cgroup"):
                if key in rule["match"]:
                    found.append((f"{path.name} {label}", key, rule["match"][key]))
    return found


def crafted_texts(pattern: str, rng: random.Random) -> dict[str, str]:
    words = [w for w in re.split(r"[^A-Za-z0-9_.=/@-]+", pattern.replace("\\.", ".")) if w]
    prefixes = "".join(w[:n] for w in words for n in range(1, len(w) + 1)) or "a"
    alphabet = sorted(set("".join(words)) | set(" -/.\\x\n")) or ["a"]

    def fill(unit: str, size: int = LONGEST) -> str:
        return (unit * (size // max(1, len(unit)) + 1))[:size]

    texts = {
        "a x 16384": fill("a"),
        "- x 16384": fill("-"),
        "/ x 16384": fill("/"),
        "\\xff x 4096 bytes": fill("\\xff"),
        "é x 16384": fill("é"),
        "its words' prefixes": fill(prefixes),
        "its words, a space": fill(" ".join(words) + " "),
        "words minus last char": fill(" ".join(w[:-1] for w in words if len(w) > 1) + " "),
        f"{SKIP_AFTER + 1} ignored, 1 left": fill("x" * (SKIP_AFTER + 1) + (words[0][0] if words else "-")),
    }
    for seed in range(3):
        texts[f"random over its alphabet #{seed}"] = "".join(rng.choice(alphabet) for _ in range(LONGEST))
    # A word the pattern needs, first or last: past the `in` prefilter, the DFA reads it all.
    for word in compile_regex(pattern).required:
        for label, text in list(texts.items()):
            texts[f"{word[:8]!r}, then {label}"] = (word + " " + text)[:LONGEST]
            texts[f"{label}, then {word[:8]!r}"] = text[: LONGEST - len(word) - 1] + " " + word
    return texts


def bench_patterns(runs: int) -> list[dict[str, Any]]:
    rng = random.Random(12)
    rows = []
    for where, key, pattern in shipped_patterns():
        dfa = compile_regex(pattern)
        compiled = re.compile(pattern)
        worst: tuple[float, str, str] = (-1.0, "", "")
        for label, text in crafted_texts(pattern, rng).items():
            elapsed = best_of(dfa.search, text, runs)
            assert dfa.search(text) == (compiled.search(text) is not None), (pattern, label)
            if elapsed > worst[0]:
                worst = (elapsed, label, text)
        elapsed, label, text = worst
        re_s = best_of(compiled.search, text, runs)
        rows.append(
            {
                "where": f"{where} .{key}",
                "pattern": pattern,
                "states": len(dfa.table) // dfa.classes,
                "classes": dfa.classes,
                "worst_text": label,
                "chars": len(text),
                "dfa_us": elapsed * 1e6,
                "ns_per_char": elapsed / len(text) * 1e9,
                "re_us": re_s * 1e6,
            }
        )
    return rows


# --- 2. issue 12's cases ------------------------------------------------------------------------

ISSUE_CASES = [
    ("(a+)+$", "'a' x 31 + '!'", "a" * 31 + "!"),
    ("(a+)+$", "'a' x 4096 + '!'", "a" * 4096 + "!"),
    (".*foo.*bar", "'foo' x 1365 (4 KiB)", "foo" * 1365),
    (".*java.*tomcat", "argv 'java' x 1024", " ".join(["java"] * 1024)),
]


def re_in_child(pattern: str, text: str, timeout_s: float) -> float | None:
    """re.search's time in a child process, or None when it was killed at ``timeout_s``."""
    code = "import re,sys,time;s=time.perf_counter();re.search(sys.argv[1],sys.argv[2]);print(time.perf_counter()-s)"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, pattern, text], capture_output=True, text=True, timeout=timeout_s, check=True
        )
    except subprocess.TimeoutExpired:
        return None
    return float(done.stdout)


def bench_issue(runs: int, timeout_s: float) -> list[dict[str, Any]]:
    rows = []
    for pattern, label, text in ISSUE_CASES:
        dfa = compile_regex(pattern)
        rows.append(
            {
                "pattern": pattern,
                "text": label,
                "dfa_us": best_of(dfa.search, text, runs) * 1e6,
                "re_s": re_in_child(pattern, text, timeout_s),
            }
        )
    return rows


# --- 3. a scan and a ranking of N processes with 50 rules ---------------------------------------

NAMES = [
    "sshd",
    "systemd",
    "postgres",
    "java",
    "chrome",
    "firefox",
    "python3",
    "node",
    "bash",
    "php-fpm",
    "nginx",
    "redis-server",
    "cc1plus",
    "rustc",
    "Xwayland",
    "pipewire",
    "worker",
    "gnome-shell",
    "containerd",
    "mysqld",
]


def fifty_rules() -> str:
    """A policy of 50 rules shaped like the shipped ones: anchored name lists, unanchored
    command-line words and .* pairs, anchored exe and cgroup paths."""
    rng = random.Random(50)
    words = [f"{a}{b}" for a in ("app", "svc", "job", "db", "web", "ml") for b in ("-api", "-worker", "d", "-sync", "")]
    rules = []
    for _ in range(20):
        names = "|".join(rng.sample([*NAMES, *words], 6))
        rules.append(f'match = {{ name = "^({names})$" }}\nadjust = {rng.choice([-300, -100, 100, 300])}')
    for i in range(15):
        a, b = rng.sample(words, 2)
        cmdline = rng.choice(
            [
                f"--{a}|--type={b}",
                f".*{a}.*{b}",
                f"-jar [^ ]*{a}[^ ]*\\\\.jar",
                f"^/usr/bin/python3 .*{a}\\\\.py",
                f"--config=/etc/{a}/",
            ]
        )
        rules.append(f'match = {{ cmdline = "{cmdline}" }}\nadjust = {100 + i}')
    for i in range(10):
        a, b = rng.sample(words, 2)
        rules.append(
            f'match = {{ cgroup = "^/system\\\\.slice/({a}|{b})(@[^/]+)?\\\\.service$" }}\nadjust = {-200 - i}'
        )
    for i in range(5):
        a = rng.choice(words)
        rules.append(f'match = {{ exe = "^/(usr/)?(s?bin|lib/{a})/" }}\nadjust = {-10 - i}')
    assert len(rules) == 50
    body = "".join(f"\n[[rule]]\nname = 'r{i}'\n{r}\n" for i, r in enumerate(rules))
    return f'[[guard]]\nname = "system"\nmem_available_term = "5%"\nmem_available_kill = "2%"\n{body}'


def synthetic_cmdline(rng: random.Random, name: str) -> str:
    """20 B to 4 KiB: a script, a JVM with a long classpath, a browser renderer's flags."""
    kind = rng.random()
    if kind < 0.5:
        return f"/usr/bin/{name} /srv/app{rng.randint(0, 50)}/run.py --workers {rng.randint(1, 64)}"
    if kind < 0.8:
        jars = ":".join(
            f"/opt/app/lib/lib{rng.randint(0, 999)}-{rng.randint(1, 9)}.jar" for _ in range(rng.randint(5, 120))
        )
        return f"/usr/bin/java -Xmx{rng.randint(1, 16)}g -cp {jars} org.example.Main"[: CMDLINE_BYTES - 16]
    flags = " ".join(f"--flag-{rng.randint(0, 9999)}={rng.randint(0, 99)}" for _ in range(rng.randint(3, 60)))
    return f"/opt/google/chrome/chrome --type=renderer {flags}"


def start_processes(n: int, workdir: str) -> list[int]:
    """n sleep(1) processes: comm from a symlink's name, cmdline from argv[0] (free text)."""
    sleep = "/bin/sleep" if os.path.exists("/bin/sleep") else "/usr/bin/sleep"
    for name in NAMES:
        os.symlink(sleep, os.path.join(workdir, name))
    rng = random.Random(2000)
    pids = []
    for _ in range(n):
        name = rng.choice(NAMES)
        argv0 = synthetic_cmdline(rng, name)
        pid = os.fork()
        if pid == 0:
            try:
                os.execv(os.path.join(workdir, name), [argv0, "infinity"])
            finally:
                os._exit(127)
        pids.append(pid)
    return pids


def stop_processes(pids: list[int]) -> None:
    for pid in pids:  # only our own children, by PID
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def with_re(plan: Plan) -> Plan:
    """The same plan matching with Python's re (comparison only: what the DFAs replace)."""

    def swap(match: MatchPlan) -> MatchPlan:
        fields: dict[str, Any] = {
            k: re.compile(getattr(match, k).pattern) for k in ("name", "cmdline", "exe", "cgroup") if getattr(match, k)
        }
        return replace(match, **fields)

    return replace(plan, rules=tuple(replace(r, match=swap(r.match)) for r in plan.rules))


def totalpages_of(snapshot: Snapshot) -> int:
    return kernel.system_totalpages(
        total_ram_bytes=snapshot.total_ram_bytes,
        total_swap_bytes=snapshot.total_swap_bytes,
        page_size=snapshot.page_size,
    )


def bench_scan(procs: int, runs: int) -> dict[str, Any]:
    plan = parse_plan(fifty_rules(), "<50 rules>")
    re_plan = with_re(plan)
    guard = plan.guards[0]
    details = plan.needed_details()
    out: dict[str, Any] = {"procs": procs, "rules": len(plan.rules)}
    with tempfile.TemporaryDirectory() as workdir:
        pids = start_processes(procs, workdir)
        try:
            time.sleep(1.0)
            snapshot = read_snapshot(details=details)
            totalpages = totalpages_of(snapshot)
            out["processes_seen"] = len(snapshot.processes)
            out["longest_cmdline_chars"] = max(len(p.cmdline or "") for p in snapshot.processes)
            timings: dict[str, list[float]] = {}
            matched: dict[str, int] = {}

            def timed(label: str, fn: Callable[[], Ranking | None]) -> None:
                t0 = time.perf_counter()
                ranking = fn()
                timings.setdefault(label, []).append(time.perf_counter() - t0)
                if ranking is not None:
                    matched[label] = ranking.rules_matched

            scanner = ProcScanner()
            previous = rank(scanner.scan(details=details), plan, guard, totalpages=totalpages)
            # Every process ran and grew: new objects, the same names and command lines.
            grown = Snapshot(
                processes=tuple(replace(p, mm_rss_pages=(p.mm_rss_pages or 0) + 1) for p in snapshot.processes),
                taken_at=snapshot.taken_at + 1,
                page_size=snapshot.page_size,
                total_ram_bytes=snapshot.total_ram_bytes,
                total_swap_bytes=snapshot.total_swap_bytes,
                self_pid=snapshot.self_pid,
                details=snapshot.details,
            )
            first = rank(snapshot, plan, guard, totalpages=totalpages)

            def scan_only() -> None:
                read_snapshot(details=details)

            def cold() -> Ranking:
                return rank(read_snapshot(details=details), plan, guard, totalpages=totalpages)

            def warm() -> Ranking:
                nonlocal previous
                previous = rank(scanner.scan(details=details), plan, guard, totalpages=totalpages, previous=previous)
                return previous

            rows: dict[str, Callable[[], Ranking | None]] = {
                "read_snapshot only (what every row below reads)": scan_only,
                "read_snapshot + rank, from nothing (DFA)": cold,
                "rank from nothing (DFA)": lambda: rank(snapshot, plan, guard, totalpages=totalpages),
                "rank from nothing (re, for comparison)": lambda: rank(snapshot, re_plan, guard, totalpages=totalpages),
                "rank, every process grew (verdicts cached)": lambda: rank(
                    grown, plan, guard, totalpages=totalpages, previous=first
                ),
                "ProcScanner.scan + rank(previous=): the daemon": warm,
            }
            for _ in range(runs):  # round-robin, so a neighbour's load falls on every row alike
                for label, fn in rows.items():
                    timed(label, fn)
            scanner.close()
        finally:
            stop_processes(pids)
    out["rows"] = {
        label: {
            "median_ms": statistics.median(t) * 1e3,
            "min_ms": min(t) * 1e3,
            "max_ms": max(t) * 1e3,
            "rules_matched": matched.get(label),
        }
        for label, t in timings.items()
    }
    out["plan"] = plan
    return out


# --- 4. the daemon's memory ---------------------------------------------------------------------

_RSS_CHILD = """
import pickle, sys
sys.path.insert(0, sys.argv[1])
def rss():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS'))
import re, dataclasses, enum, typing
import uoomd.readings  # the daemon imports these whatever its plan holds
base = rss()
import uoomd.plan
after_import = rss()
data = sys.stdin.buffer.read()
patterns, blob = pickle.loads(data[: int(sys.argv[2])]), data[int(sys.argv[2]) :]
before = rss()
plan = pickle.loads(blob)
after_plan = rss()
compiled = [re.compile(p) for p in patterns]
after_re = rss()
print(after_import - base, after_plan - before, after_re - after_plan)
"""


def bench_memory(plan: Plan) -> dict[str, int]:
    patterns = [
        getattr(r.match, k).pattern
        for r in plan.rules
        for k in ("name", "cmdline", "exe", "cgroup")
        if getattr(r.match, k)
    ]
    head = pickle.dumps(patterns)
    blob = pickle.dumps(plan)
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _RSS_CHILD, str(ROOT), str(len(head))],
        input=head + blob,
        capture_output=True,
        check=True,
    )
    imported, unpickled, with_re_kib = (int(x) for x in done.stdout.split())
    return {
        "plan_pickle_bytes": len(blob),
        "import_uoomd_plan_and_dfa_kib": imported,
        "unpickle_plan_kib": unpickled,
        "re_compile_same_patterns_kib": with_re_kib,
        "table_cells": sum(len(d.table) for d in _dfas(plan)),
    }


def _dfas(plan: Plan) -> list[Dfa]:
    return [d for r in plan.rules for d in (r.match.name, r.match.cmdline, r.match.exe, r.match.cgroup) if d]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--procs", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--re-timeout", type=float, default=5.0, help="kill re.search on issue 12's cases after this")
    parser.add_argument("--no-scan", action="store_true", help="patterns only: start no processes")
    args = parser.parse_args()

    print("1. The worst crafted text against every shipped pattern")
    heads = ("states", "cls", "worst text", "chars", "DFA us", "ns/ch", "re us")
    print(f"{'pattern':<44} {heads[0]:>6} {heads[1]:>4} {heads[2]:<30} " + " ".join(f"{h:>8}" for h in heads[3:]))
    for row in bench_patterns(args.runs):
        print(
            f"{row['where'][:44]:<44} {row['states']:>6} {row['classes']:>4} {row['worst_text'][:30]:<30} "
            f"{row['chars']:>8} {row['dfa_us']:>8.0f} {row['ns_per_char']:>8.0f} {row['re_us']:>8.0f}"
        )
    print(f"\n2. Issue 12's cases (re in a child, killed after {args.re_timeout:g} s)")
    for row in bench_issue(args.runs, args.re_timeout):
        re_text = f"> {args.re_timeout:g} s (killed)" if row["re_s"] is None else f"{row['re_s'] * 1e3:.1f} ms"
        print(f"{row['pattern']:<16} {row['text']:<24} DFA {row['dfa_us'] / 1e3:7.2f} ms   re {re_text}")
    if args.no_scan:
        return 0
    scan = bench_scan(args.procs, args.runs)
    print(
        f"\n3. {scan['processes_seen']} processes ({scan['procs']} started; longest cmdline "
        f"{scan['longest_cmdline_chars']} chars), {scan['rules']} rules, {args.runs} runs"
    )
    print(f"{'':<50} {'median ms':>10} {'min':>7} {'max':>7} {'matched':>8}")
    for label, row in scan["rows"].items():
        matched = "" if row["rules_matched"] is None else str(row["rules_matched"])
        print(f"{label:<50} {row['median_ms']:>10.1f} {row['min_ms']:>7.1f} {row['max_ms']:>7.1f} {matched:>8}")
    memory = bench_memory(scan["plan"])
    print(
        f"\n4. The 50-rule plan in the daemon (python -I -S): pickled {memory['plan_pickle_bytes'] / 1024:.0f} KiB, "
        f"{memory['table_cells']} table cells; VmRSS +{memory['import_uoomd_plan_and_dfa_kib']} KiB importing "
        f"uoomd.plan (with uoomd.dfa, array, bisect), +{memory['unpickle_plan_kib']} KiB unpickling the plan; "
        f"re.compile of the same patterns: +{memory['re_compile_same_patterns_kib']} KiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
