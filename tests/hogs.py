"""A memory hog for tests and benchmarks: allocates and touches memory step by step, records signals (stdlib only).

Usage::

    python tests/hogs.py --mib-per-step 32 --interval-ms 5 --max-mib 600 --record FILE \
        [--hold] [--ignore-term] [--adj 1000] [--name NAME] [--fill-rate-mib-s RATE]

The record file gets one line per event, appended and fsynced so a test can read it even after
the hog was SIGKILLed:

    START <monotonic> <pid>      after oom_score_adj and the name are set, before allocating
    HOLD <monotonic> <mib>       the hog reached --max-mib and holds it (only with --hold)
    DONE <monotonic> <mib>       the hog reached --max-mib and exits 0 (without --hold)
    SIGTERM <monotonic> <mib>    a signal arrived, with the MiB held then (also SIGINT, SIGHUP, SIGUSR1, SIGUSR2)

On SIGTERM the hog exits with status 0 after recording it, unless --ignore-term.
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


def touch(buf: bytearray, page_size: int) -> None:
    """Write one byte in every page so the memory is resident, not just reserved."""
    pages = len(buf) // page_size
    buf[::page_size] = b"\x01" * pages


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

    set_oom_score_adj(args.adj)
    if args.name:
        set_name(args.name)

    held_mib = [0]  # read by the signal handler: how far the hog got when it was signalled

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        record(args.record, f"{signal.Signals(signum).name} {time.monotonic():.6f} {held_mib[0]}")
        if signum == signal.SIGTERM and not args.ignore_term:
            sys.exit(0)

    for sig in _RECORDED_SIGNALS:
        signal.signal(sig, on_signal)

    interval_s = args.interval_ms / 1000
    if args.fill_rate_mib_s:
        interval_s = args.mib_per_step / args.fill_rate_mib_s
    page_size = os.sysconf("SC_PAGE_SIZE")
    record(args.record, f"START {time.monotonic():.6f} {os.getpid()}")

    held: list[bytearray] = []
    have_mib = 0
    next_step = time.monotonic()
    while have_mib < args.max_mib:
        step_mib = min(args.mib_per_step, args.max_mib - have_mib)
        buf = bytearray(step_mib * _MIB)
        touch(buf, page_size)
        held.append(buf)
        have_mib += step_mib
        held_mib[0] = have_mib
        next_step += interval_s
        delay_s = next_step - time.monotonic()
        if delay_s > 0:
            time.sleep(delay_s)

    if not args.hold:
        record(args.record, f"DONE {time.monotonic():.6f} {have_mib}")
        return 0
    record(args.record, f"HOLD {time.monotonic():.6f} {have_mib}")
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
