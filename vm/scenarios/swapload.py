"""The swap scenario's two workloads: a thrashing hog and a steady swapper (guest side, stdlib only).

``swapload.py thrash --mib N --record FILE``: allocate N MiB (more than RAM) and rewrite every
page of it, pass after pass, forever: its working set is all of it, so each pass faults back in
what the last one pushed out (the issue's thrash).

``swapload.py steady --hot-mib H --total-mib T --record FILE``: allocate the hot set H (which
fits in RAM), then grow to T in all (more than RAM) at a modest pace while rewriting the hot set
once every --hot-period-s, and go on doing only that: the cold pages go to swap once and stay.

Both set oom_score_adj 1000 and their comm (--name), and append fsynced event lines to FILE::

    START <monotonic> <pid>
    FILLED <monotonic> <mib> [<n>]  all the memory is allocated (steady: the hot set, then n cold chunks)
    PASS <monotonic> <n> <seconds>  pass n over the working set (thrash: all; steady: the hot set) took this long
    SIGTERM <monotonic> <mib>       a signal arrived (also SIGINT, SIGHUP); the process exits 0

Page contents: 1 KiB of random bytes and 3 KiB of zeros, so zram compresses a page about 4:1
(a common ratio for anonymous memory) instead of storing an all-zero page in a few bytes, which
would make zram swap nearly free and no test of anything.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
CHUNK_MIB = 16
_PR_SET_NAME = 15  # include/uapi/linux/prctl.h


class Recorder:
    def __init__(self, path: str) -> None:
        self.path = path
        self.held_mib = 0

    def line(self, text: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (text + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.line(f"{signal.Signals(signum).name} {time.monotonic():.6f} {self.held_mib}")
        sys.exit(0)


def chunk_template() -> bytes:
    page = os.urandom(1024) + bytes(PAGE - 1024)
    return page * (CHUNK_MIB * MIB // PAGE)


def rewrite(chunk: bytearray, stamp: int) -> None:
    """Write one byte in every page of ``chunk`` (a store, so the page is dirty again)."""
    chunk[::PAGE] = bytes([stamp & 0xFF]) * (len(chunk) // PAGE)


def allocate(
    rec: Recorder, template: bytes, mib: int, pace_mib_s: float, tick: Callable[[], None] | None = None
) -> list[bytearray]:
    chunks: list[bytearray] = []
    step_s = CHUNK_MIB / pace_mib_s if pace_mib_s > 0 else 0.0
    next_at = time.monotonic()
    while rec.held_mib < mib:
        chunks.append(bytearray(template))
        rec.held_mib += CHUNK_MIB
        if tick is not None:
            tick()
        next_at += step_s
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return chunks


def thrash(rec: Recorder, mib: int) -> None:
    template = chunk_template()
    chunks = allocate(rec, template, mib, 0.0)
    rec.line(f"FILLED {time.monotonic():.6f} {rec.held_mib}")
    n = 0
    while True:
        n += 1
        t0 = time.monotonic()
        for chunk in chunks:
            rewrite(chunk, n)
        rec.line(f"PASS {time.monotonic():.6f} {n} {time.monotonic() - t0:.3f}")


def steady(rec: Recorder, hot_mib: int, total_mib: int, pace_mib_s: float, hot_period_s: float) -> None:
    template = chunk_template()
    hot = allocate(rec, template, hot_mib, 0.0)
    state = {"n": 0, "next": time.monotonic() + hot_period_s, "t0": time.monotonic()}

    def touch_hot() -> None:
        # One pass over the hot set every hot_period_s, also while the cold part grows: the job
        # keeps working on its data while it accumulates more of it.
        if time.monotonic() < state["next"]:
            return
        t0 = time.monotonic()
        state["n"] += 1
        for chunk in hot:
            rewrite(chunk, int(state["n"]))
        rec.line(f"PASS {time.monotonic():.6f} {int(state['n'])} {time.monotonic() - t0:.3f}")
        state["next"] = max(state["next"] + hot_period_s, time.monotonic())

    cold = allocate(rec, template, total_mib, pace_mib_s, touch_hot)  # held, never touched again
    rec.line(f"FILLED {time.monotonic():.6f} {rec.held_mib} {len(cold)}")
    while True:
        touch_hot()
        time.sleep(max(0.05, state["next"] - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("thrash", "steady"))
    parser.add_argument("--record", required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--mib", type=int, default=1200, help="thrash: the working set")
    parser.add_argument("--hot-mib", type=int, default=300, help="steady: the hot set")
    parser.add_argument("--total-mib", type=int, default=1250, help="steady: all it allocates")
    parser.add_argument("--pace-mib-s", type=float, default=40.0, help="steady: how fast the cold part grows")
    parser.add_argument("--hot-period-s", type=float, default=2.0, help="steady: one pass over the hot set per")
    args = parser.parse_args(argv)
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    if args.name:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(args.name.encode()[:15]), 0, 0, 0)
    rec = Recorder(args.record)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, rec.on_signal)
    rec.line(f"START {time.monotonic():.6f} {os.getpid()}")
    if args.mode == "thrash":
        thrash(rec, args.mib)
    else:
        steady(rec, args.hot_mib, args.total_mib, args.pace_mib_s, args.hot_period_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
