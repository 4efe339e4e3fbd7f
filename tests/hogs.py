"""A memory hog for tests and benchmarks: allocates and touches memory step by step, records signals (stdlib only).

Usage::

    python tests/hogs.py --mib-per-step 32 --interval-ms 5 --max-mib 600 --record FILE \
        [--hold] [--ignore-term] [--adj 1000] [--name NAME] [--fill-rate-mib-s RATE] \
        [--join-cgroup PROCS]... [--on-term-join PROCS]... [--pause-at-mib M --pause-s S] [--fork N] \
        [--start-at MONOTONIC]

The record file gets one line per event, appended and fsynced so a test can read it even after
the hog was SIGKILLed:

    START <monotonic> <pid>      after oom_score_adj, the name and --join-cgroup are set, before allocating
                                 (after waiting for --start-at, if given)
    PAUSE <monotonic> <mib>      growth paused at --pause-at-mib (for --pause-s seconds)
    RESUME <monotonic> <mib>     growth resumed after the pause
    HOLD <monotonic> <mib>       the hog reached --max-mib and holds it (only with --hold)
    DONE <monotonic> <mib>       the hog reached --max-mib and exits 0 (without --hold)
    SIGTERM <monotonic> <mib>    a signal arrived, with the MiB held then (also SIGINT, SIGHUP, SIGUSR1, SIGUSR2)
    MOVED <monotonic> <mib>      after SIGTERM, with --on-term-join: the hog joined those cgroups and stops growing

On SIGTERM the hog exits with status 0 after recording it, unless --ignore-term or --on-term-join.

``--idle``-style bystanders are ``--max-mib N --hold``: allocate N MiB, then sleep until killed.

With ``--fork N`` the process is a parent that allocates nothing itself: it forks N children
that each run the hog above (same sizes and options), child ``i`` recording to ``FILE.i``. The
parent records its own signals to FILE, plus:

    CHILD <monotonic> <pid> <i>          a child was forked
    EXIT <monotonic> <pid> <how>         a child ended: ``code:N`` or ``signal:N`` (SIGKILL is 9)

and exits 0 once every child has ended (on SIGTERM it exits at once, like a single hog).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
from types import FrameType

_MIB = 1024 * 1024
_PR_SET_NAME = 15  # include/uapi/linux/prctl.h
_RECORDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def record(path: str | None, line: str) -> None:
    """Append one line and fsync it: the test may read the file right after the hog died."""
    if path is None:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def set_name(name: str) -> None:
    """Set comm (what /proc/PID/stat and `ps` show); the kernel truncates it to 15 bytes."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def set_oom_score_adj(adj: int) -> None:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(adj))


def join_cgroups(procs_files: list[str]) -> None:
    """Move this process into each cgroup whose ``cgroup.procs`` is given (v1 and v2 alike)."""
    for procs in procs_files:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)


def touch(buf: bytearray, page_size: int) -> None:
    """Write one byte in every page so the memory is resident, not just reserved."""
    pages = len(buf) // page_size
    buf[::page_size] = b"\x01" * pages


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib-per-step", type=int, default=32)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--max-mib", type=int, default=600, help="stop growing here; 0: allocate nothing")
    parser.add_argument("--record", default=None, help="file to append events to")
    parser.add_argument("--hold", action="store_true", help="hold the memory at --max-mib until signalled")
    parser.add_argument("--ignore-term", action="store_true", help="record SIGTERM but keep running")
    parser.add_argument("--adj", type=int, default=1000, help="oom_score_adj to set on itself")
    parser.add_argument("--name", default=None, help="process name (comm) to set")
    parser.add_argument(
        "--fill-rate-mib-s", type=float, default=None, help="grow at this rate instead of --interval-ms"
    )
    parser.add_argument(
        "--join-cgroup", action="append", default=[], metavar="PROCS", help="join this cgroup.procs at start"
    )
    parser.add_argument(
        "--on-term-join",
        action="append",
        default=[],
        metavar="PROCS",
        help="on SIGTERM: join this cgroup.procs, stop growing and hold (implies ignoring SIGTERM)",
    )
    parser.add_argument("--pause-at-mib", type=int, default=None, help="pause growth once, at this size")
    parser.add_argument("--pause-s", type=float, default=0.0, help="how long the pause at --pause-at-mib lasts")
    parser.add_argument("--fork", type=int, default=0, metavar="N", help="fork N children that each run the hog")
    parser.add_argument(
        "--start-at",
        type=float,
        default=None,
        metavar="MONOTONIC",
        help="wait until this time.monotonic() before allocating (CLOCK_MONOTONIC is system-wide)",
    )
    return parser.parse_args(argv)


class Hog:
    """One allocating process: its record file, what it holds, and what its signals asked for."""

    def __init__(self, args: argparse.Namespace, record_path: str | None) -> None:
        self.args = args
        self.record_path = record_path
        self.held_mib = 0  # read by the signal handler: how far the hog got when it was signalled
        self.moved = False  # set by the handler after --on-term-join: stop growing

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        record(self.record_path, f"{signal.Signals(signum).name} {time.monotonic():.6f} {self.held_mib}")
        if signum != signal.SIGTERM:
            return
        if self.args.on_term_join:
            if not self.moved:
                join_cgroups(self.args.on_term_join)
                self.moved = True
                record(self.record_path, f"MOVED {time.monotonic():.6f} {self.held_mib}")
            return
        if not self.args.ignore_term:
            sys.exit(0)

    def install_handlers(self) -> None:
        for sig in _RECORDED_SIGNALS:
            signal.signal(sig, self.on_signal)

    def run(self) -> int:
        args = self.args
        interval_s = args.interval_ms / 1000
        if args.fill_rate_mib_s:
            interval_s = args.mib_per_step / args.fill_rate_mib_s
        page_size = os.sysconf("SC_PAGE_SIZE")
        if args.start_at is not None:
            time.sleep(max(0.0, args.start_at - time.monotonic()))
        record(self.record_path, f"START {time.monotonic():.6f} {os.getpid()}")

        held: list[bytearray] = []
        paused = args.pause_at_mib is None
        next_step = time.monotonic()
        while self.held_mib < args.max_mib and not self.moved:
            if not paused and self.held_mib >= args.pause_at_mib:
                paused = True
                record(self.record_path, f"PAUSE {time.monotonic():.6f} {self.held_mib}")
                time.sleep(args.pause_s)
                record(self.record_path, f"RESUME {time.monotonic():.6f} {self.held_mib}")
                next_step = time.monotonic()
                continue
            step_mib = min(args.mib_per_step, args.max_mib - self.held_mib)
            if not paused:
                step_mib = min(step_mib, args.pause_at_mib - self.held_mib)
            buf = bytearray(step_mib * _MIB)
            touch(buf, page_size)
            held.append(buf)
            self.held_mib += step_mib
            next_step += interval_s
            delay_s = next_step - time.monotonic()
            if delay_s > 0:
                time.sleep(delay_s)

        if self.moved:
            while True:  # out of the scope that signalled it: hold what it has, grow no more
                signal.pause()
        if not args.hold:
            record(self.record_path, f"DONE {time.monotonic():.6f} {self.held_mib}")
            return 0
        record(self.record_path, f"HOLD {time.monotonic():.6f} {self.held_mib}")
        while True:
            signal.pause()


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal:{os.WTERMSIG(status)}"
    return f"code:{os.waitstatus_to_exitcode(status)}"


def run_forking(args: argparse.Namespace) -> int:
    """The --fork parent: fork the children, record their ends, exit when all have ended."""
    parent = Hog(args, args.record)
    parent.install_handlers()
    record(args.record, f"START {time.monotonic():.6f} {os.getpid()}")
    children: set[int] = set()
    for index in range(args.fork):
        pid = os.fork()
        if pid == 0:
            child = Hog(args, None if args.record is None else f"{args.record}.{index}")
            code = 70
            try:
                child.install_handlers()
                code = child.run()
            except SystemExit as exc:  # the SIGTERM handler's sys.exit(0)
                code = exc.code if isinstance(exc.code, int) else 0
            finally:
                os._exit(code)
        children.add(pid)
        record(args.record, f"CHILD {time.monotonic():.6f} {pid} {index}")
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
        record(args.record, f"EXIT {time.monotonic():.6f} {pid} {_describe_status(status)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_oom_score_adj(args.adj)
    if args.name:
        set_name(args.name)
    if args.join_cgroup:
        join_cgroups(args.join_cgroup)
    if args.fork:
        return run_forking(args)
    hog = Hog(args, args.record)
    hog.install_handlers()
    return hog.run()


if __name__ == "__main__":
    sys.exit(main())
