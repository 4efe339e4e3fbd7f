"""The benchmark's hog: fills memory at a set rate, logging each step with MemAvailable to interpolate the crossing.

    python3 bench/hog.py --out FILE --fill-rate-mib-s 256 [--mib-per-step 2] [--max-mib 2560] [--give-up-s 20]

tests/hogs.py fsyncs a line per event, which at a 2 MiB step would throttle the fill; this
hog keeps its step log in memory and writes it once, as JSON, when SIGTERM arrives (then
exits 0) or when it gives up at --max-mib. Each step is ``[t_before, t_after, held_mib,
mem_available_kib]``: monotonic seconds around the allocation, the MiB held after it, and
MemAvailable read right after. It sets its own oom_score_adj to 1000 and its name.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from types import FrameType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.hogs import set_name, set_oom_score_adj, touch

_MIB = 1 << 20


def read_available_kib(fd: int) -> int:
    """MemAvailable from an open /proc/meminfo (pread at 0 regenerates it)."""
    text = os.pread(fd, 4096, 0)
    start = text.index(b"MemAvailable:") + len(b"MemAvailable:")
    return int(text[start : text.index(b"kB", start)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fill-rate-mib-s", type=float, required=True)
    parser.add_argument("--mib-per-step", type=int, default=2)
    parser.add_argument("--max-mib", type=int, default=2560)
    parser.add_argument("--give-up-s", type=float, default=20.0, help="hold at --max-mib this long, then exit")
    parser.add_argument("--name", default="benchhog")
    args = parser.parse_args(argv)
    if args.max_mib > 4096:
        parser.error("--max-mib above 4096: the benchmark keeps every hog under 4 GiB")

    set_oom_score_adj(1000)
    set_name(args.name)
    meminfo = os.open("/proc/meminfo", os.O_RDONLY)
    steps: list[tuple[float, float, int, int]] = []
    held: list[bytearray] = []
    state = {"held_mib": 0}
    started = time.monotonic()

    def write(signal_at: float | None, signal_mib: int | None) -> None:
        payload = {
            "pid": os.getpid(),
            "started": started,
            "fill_rate_mib_s": args.fill_rate_mib_s,
            "mib_per_step": args.mib_per_step,
            "signal_at": signal_at,
            "signal_mib": signal_mib,
            "signal_available_kib": read_available_kib(meminfo),
            "steps": steps,
        }
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, args.out)  # the harness never reads half a file

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        at = time.monotonic()
        write(at, state["held_mib"])
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    page_size = os.sysconf("SC_PAGE_SIZE")
    interval_s = args.mib_per_step / args.fill_rate_mib_s
    next_step = time.monotonic()
    while state["held_mib"] < args.max_mib:
        before = time.monotonic()
        buf = bytearray(args.mib_per_step * _MIB)
        touch(buf, page_size)
        held.append(buf)
        state["held_mib"] += args.mib_per_step
        steps.append((before, time.monotonic(), state["held_mib"], read_available_kib(meminfo)))
        next_step += interval_s
        delay_s = next_step - time.monotonic()
        if delay_s > 0:
            time.sleep(delay_s)
    deadline = time.monotonic() + args.give_up_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    write(None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
