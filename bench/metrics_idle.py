"""What the metrics cost an idle daemon: CPU and RSS of ``uoomd run`` with metrics off, with the
textfile, and with the textfile and a unix-socket listener scraped every 15 s (issue 17).

    sudo python3 bench/metrics_idle.py [--seconds 60] [--rounds 2] [--before TREE] [--json FILE]

The three daemons run at the same time (the machine's load is the same for all), in dry-run
(nothing is ever signalled), on the shipped default policy (etc/uoomd.toml: the machine's
scope, poll_max 5 s, one PSI trigger), each with its own state file and metrics in a temp
directory. Once each has written its state file and 5 s more, CPU is the scheduler's run time of the daemon
(/proc/PID/schedstat, ns) and utime+stime (/proc/PID/stat, ticks) over the window; RSS is
VmRSS at its end. Prints one line per daemon and round, and the medians.

``--before TREE``: a fourth daemon, "before", runs the uoomd package of another source tree
(e.g. ``git archive HEAD | tar -x -C TREE``) on the policy of "off": what the metrics cost
against a daemon that has none. For the README's table TREE was this tree with the import of
``Metrics`` in uoomd/daemon.py replaced by a class whose methods do nothing (``dump()``
None), so that nothing but the metrics differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRAPE_EVERY_S = 15.0  # Prometheus' default scrape_interval
VARIANTS = ("off", "textfile", "textfile+listener")


def uoomd() -> str:
    beside = Path(sys.executable).parent / "uoomd"
    return str(beside) if beside.exists() else shutil.which("uoomd") or sys.exit("uoomd is not installed")


def policy(workdir: Path, variant: str) -> Path:
    text = (ROOT / "etc" / "uoomd.toml").read_text()
    extra = f'state_file = "{workdir}/state.json"\n'
    if variant != "off":
        extra += f'metrics_file = "{workdir}/uoomd.prom"\n'
    if variant == "textfile+listener":
        extra += f'metrics_listen = "{workdir}/m.sock"\n'
    text = text.replace('state_file = "/run/uoomd/state.json"', extra.rstrip("\n"), 1)
    path = workdir / "policy.toml"
    path.write_text(text)
    return path


def usage(pid: int) -> tuple[int, int, int]:
    """(run ns, utime+stime ticks, VmRSS KiB) of ``pid``."""
    run_ns = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after comm (earlyoom's rule: the last ')')
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return run_ns, ticks, rss


def scrape(path: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(path))
        client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        got = 0
        while chunk := client.recv(65536):
            got += len(chunk)
    return got


def command(before: Path | None) -> list[str]:
    """``uoomd``, or the uoomd of the tree ``before`` (its cli re-execs the daemon from there)."""
    if before is None:
        return [uoomd()]
    boot = "import sys; sys.path.insert(0, sys.argv.pop(1)); from uoomd.cli import main; raise SystemExit(main())"
    return [sys.executable, "-c", boot, str(before.resolve())]


def one_round(seconds: float, base: Path, index: int, before: Path | None) -> list[dict[str, object]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    dirs: dict[str, Path] = {}
    try:
        for variant in (*VARIANTS, "before") if before else VARIANTS:
            workdir = base / f"{variant}-{index}"
            workdir.mkdir(mode=0o700)
            dirs[variant] = workdir
            log = open(workdir / "uoomd.log", "wb")  # noqa: SIM115 -- closed with the process
            procs[variant] = subprocess.Popen(
                [
                    *command(before if variant == "before" else None),
                    "run",
                    "--dry-run",
                    "--policy",
                    str(policy(workdir, "off" if variant == "before" else variant)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            log.close()
        deadline = time.monotonic() + 120
        while not all((d / "state.json").exists() for d in dirs.values()):  # each has started
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                sys.exit(f"a daemon did not start: see {base}/*/uoomd.log")
            time.sleep(0.2)
        time.sleep(5.0)  # start-up (the policy checker child, the first readings) is not idle cost
        first = {v: (time.monotonic(), usage(p.pid)) for v, p in procs.items()}
        end = time.monotonic() + seconds
        scraped = 0
        while time.monotonic() < end:
            scraped += scrape(dirs["textfile+listener"] / "m.sock")
            time.sleep(min(SCRAPE_EVERY_S, max(0.0, end - time.monotonic())))
        out: list[dict[str, object]] = []
        for variant, proc in procs.items():
            at0, (ns0, ticks0, _rss0) = first[variant]
            ns1, ticks1, rss1 = usage(proc.pid)
            span_s = time.monotonic() - at0
            out.append(
                {
                    "variant": variant,
                    "round": index,
                    "cpu_ms_per_min": (ns1 - ns0) / 1e6 / span_s * 60,
                    "tick_cpu_s_per_h": (ticks1 - ticks0) / os.sysconf("SC_CLK_TCK") / span_s * 3600,
                    "rss_mib": rss1 / 1024,
                    "seconds": span_s,
                    "scraped_bytes": scraped if variant == "textfile+listener" else 0,
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
    parser.add_argument("--before", type=Path, help="a uoomd source tree to run as the daemon without metrics")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="uoomd-metrics-idle-") as tmp:
        for index in range(args.rounds):
            for row in one_round(args.seconds, Path(tmp), index, args.before):
                rows.append(row)
                print(
                    f"round {index} {row['variant']:<18} cpu {row['cpu_ms_per_min']:7.2f} ms/min "
                    f"({row['tick_cpu_s_per_h']:5.2f} s/h by ticks)  rss {row['rss_mib']:5.1f} MiB",
                    flush=True,
                )
    for variant in ("before", *VARIANTS) if args.before else VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        cpu = statistics.median(float(str(r["cpu_ms_per_min"])) for r in mine)
        rss = statistics.median(float(str(r["rss_mib"])) for r in mine)
        print(f"median {variant:<18} cpu {cpu:7.2f} ms/min = {cpu * 60 / 1000:5.2f} s/h  rss {rss:5.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
