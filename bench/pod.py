"""PID 1 of a benchmark's own PID and mount namespace: starts, reports on and stops its processes as the harness asks.

Started by :class:`bench.sandbox.Pod` as ``unshare --pid --fork --mount-proc --kill-child=SIGKILL
python3 -I bench/pod.py``. Inside, /proc is a fresh mount that lists only this namespace's
processes, and kill() resolves PIDs in this namespace only (kernel/signal.c kill_proc_info()
-> find_vpid(), Linux 6.18): a daemon started here can see and signal nothing but the
processes this pod started. /proc/meminfo and /proc/pressure/memory stay machine-wide.

Protocol: one JSON object per line on stdin (``{"op": ..., ...}``), one JSON answer per line
on stdout. Stdlib only (it runs with ``python3 -I``). When stdin closes, or on SIGTERM from
the harness, every child is SIGKILLed; when this process exits the kernel kills whatever is
left in the namespace (kernel/pid_namespace.c zap_pid_ns_processes()).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

SYS_PROCESS_MRELEASE = 448  # arch/x86/entry/syscalls/syscall_64.tbl, Linux 5.15+

children: dict[int, subprocess.Popen[bytes]] = {}
sleepers: list[subprocess.Popen[bytes]] = []


def _set_adj(adj: int) -> None:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(adj))


def spawn(argv: list[str], out: str | None, env: dict[str, str] | None, adj: int | None) -> dict[str, Any]:
    stdout: Any = subprocess.DEVNULL
    if out is not None:
        stdout = open(out, "wb")  # noqa: SIM115 -- handed to the child, closed right after
    full_env = {**os.environ, **(env or {})}
    preexec = None if adj is None else (lambda: _set_adj(adj))
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            env=full_env,
            preexec_fn=preexec,  # noqa: PLW1509 -- the pod has no threads
        )
    finally:
        if out is not None:
            stdout.close()
    children[proc.pid] = proc
    return {"pid": proc.pid}


def wait(pid: int, timeout_s: float) -> dict[str, Any]:
    proc = children[pid]
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return {"exited": False}
    del children[pid]
    return {"exited": True, "returncode": code}


def stop(pid: int, grace_s: float) -> dict[str, Any]:
    """SIGTERM our own child, SIGKILL it after ``grace_s``; Popen signals only an unreaped child."""
    proc = children.pop(pid, None)
    if proc is None:
        return {"stopped": False}
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"stopped": True, "returncode": proc.returncode}


def start_sleepers(n: int) -> dict[str, Any]:
    started = time.monotonic()
    for _ in range(n):
        sleepers.append(
            subprocess.Popen(
                ["sleep", "100000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
    return {"sleepers": len(sleepers), "took_s": round(time.monotonic() - started, 2)}


def stop_sleepers() -> dict[str, Any]:
    for proc in sleepers:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    for proc in sleepers:
        proc.wait()
    n = len(sleepers)
    sleepers.clear()
    return {"stopped": n}


def visible() -> dict[str, Any]:
    """Every process this namespace's /proc lists, as (pid, ppid, comm): what a daemon here can see."""
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        rows.append([int(entry), ppid, comm])
    return {"processes": sorted(rows), "ours": sorted([os.getpid(), *children, *(p.pid for p in sleepers)])}


def usage(pid: int) -> dict[str, Any]:
    """CPU time (utime + stime ticks from /proc/PID/stat; ns from /proc/PID/schedstat) and VmRSS in KiB."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().decode(errors="replace").rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # 14th and 15th fields; [0] is the 3rd (state)
    rss_kib = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    # schedstat's first field: ns on a CPU (kernel/sched/stats.c show_schedstat(), sum_exec_runtime),
    # finer than the 10 ms ticks of utime/stime, which round an idle minute to 0 or 0.6 s/h.
    with open(f"/proc/{pid}/schedstat") as f:
        run_ns = int(f.read().split()[0])
    return {
        "ticks": ticks,
        "clk_tck": os.sysconf("SC_CLK_TCK"),
        "run_ns": run_ns,
        "rss_kib": rss_kib,
        "at": time.monotonic(),
    }


def probe() -> dict[str, Any]:
    """Check that what uoomd relies on works in here: pidfds, process_mrelease, PSI triggers."""
    out: dict[str, Any] = {"pid": os.getpid()}
    child = subprocess.Popen(["sleep", "60"])
    try:
        pidfd = os.pidfd_open(child.pid)
        signal.pidfd_send_signal(pidfd, 0)
        out["pidfd"] = "ok"
        libc = ctypes.CDLL(None, use_errno=True)
        # A live process that is not dying: the kernel answers EINVAL (mm/oom_kill.c
        # process_mrelease()), which proves the syscall exists; ENOSYS would not.
        rc = libc.syscall(SYS_PROCESS_MRELEASE, pidfd, 0)
        live = errno.errorcode.get(ctypes.get_errno(), "0") if rc != 0 else "0"
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        rc = libc.syscall(SYS_PROCESS_MRELEASE, pidfd, 0)
        dying = "0" if rc == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
        out["process_mrelease"] = {"live_victim": live, "after_sigkill": dying}
        os.close(pidfd)
    finally:
        child.kill()
        child.wait()
    try:
        fd = os.open("/proc/pressure/memory", os.O_RDWR | os.O_NONBLOCK)
        try:
            os.write(fd, b"some 150000 2000000\0")
            poller = select.poll()
            poller.register(fd, select.POLLPRI)
            poller.poll(0)
            out["psi_trigger"] = "ok"
        finally:
            os.close(fd)
    except OSError as exc:
        out["psi_trigger"] = errno.errorcode.get(exc.errno or 0, str(exc))
    with open("/proc/meminfo") as f:
        out["meminfo_first_line"] = f.readline().strip()
    return out


def cleanup() -> None:
    for proc in list(children.values()):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    for proc in list(children.values()):
        proc.wait()
    children.clear()
    stop_sleepers()


def handle(request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "spawn":
        return spawn(request["argv"], request.get("out"), request.get("env"), request.get("adj"))
    if op == "wait":
        return wait(request["pid"], request.get("timeout_s", 30.0))
    if op == "stop":
        return stop(request["pid"], request.get("grace_s", 3.0))
    if op == "sleepers":
        return start_sleepers(request["n"])
    if op == "stop_sleepers":
        return stop_sleepers()
    if op == "visible":
        return visible()
    if op == "usage":
        return usage(request["pid"])
    if op == "probe":
        return probe()
    raise ValueError(f"unknown op {op!r}")


def _on_term(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def main() -> int:
    signal.signal(signal.SIGTERM, _on_term)
    try:
        for line in sys.stdin:
            try:
                answer = handle(json.loads(line))
            except Exception as exc:  # reported to the harness, which raises it
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
