"""Soak: `uoomd run` against hog after hog in a memory cgroup; no OOM kill, flat RSS, no fd leak.

The short form (``UOOMD_SOAK_S``, default 60 s) runs in the normal suite; the long form is
the same test with a longer duration, e.g. ``UOOMD_SOAK_S=600 python3 -m pytest -m soak``.
Every hog is a child of this test in a ``uoomd-test-*`` cgroup at oom_score_adj 1000; the
daemon guards only that cgroup.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.builders import cgroup_policy
from tests.cgroups import ScratchCgroup
from tests.e2e.daemon_runner import RunningDaemon, hog_argv, read_record, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.soak]

SOAK_S = float(os.environ.get("UOOMD_SOAK_S", "60"))
RSS_GROWTH_MAX_KIB = 1024  # between the first and the last third, after warm-up


@dataclass(frozen=True)
class Sample:
    at_s: float
    rss_kib: int
    fds: int


def sample(pid: int, at_s: float) -> Sample:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return Sample(at_s=at_s, rss_kib=rss, fds=len(os.listdir(f"/proc/{pid}/fd")))


def guards_idle(state_file: Path) -> bool:
    """The daemon's state file says every guard is idle: no victim in flight, no pidfd held."""
    try:
        guards = json.loads(state_file.read_text())["guards"]
    except (OSError, ValueError, KeyError):
        return False  # not written yet, or caught mid-rename
    return all(guard["phase"] == "idle" for guard in guards)


def test_soak_hogs_again_and_again_no_oom_kill_flat_rss_no_fd_leak(
    cgroup: ScratchCgroup, start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    daemon = start_daemon(
        cgroup_policy(cgroup, tmp_path, name="soak", term_timeout="500ms", kill_timeout="2s", max_kills=1000)
    )
    daemon.wait_for("started")
    pid = daemon.process.pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"uoomd" in f.read(), "sampling the daemon itself, not a wrapper"
    start = time.monotonic()
    samples: list[Sample] = []
    hogs = stubborn = 0
    while time.monotonic() - start < SOAK_S:
        record = tmp_path / f"hog{hogs}.rec"
        # Every fourth hog ignores SIGTERM: the escalation path soaks too.
        extra = ("--ignore-term",) if hogs % 4 == 3 else ()
        hog = cgroup.spawn(
            hog_argv(record, "--mib-per-step", "32", "--interval-ms", "5", "--max-mib", "900", "--hold", *extra)
        )
        hog.wait(30)  # stopped by uoomd, or this raises TimeoutExpired
        events = [line[0] for line in read_record(record)]
        assert "HOLD" not in events, f"hog {hogs} reached its target: nothing stopped it"
        assert "SIGTERM" in events, f"hog {hogs} was never sent SIGTERM"
        stubborn += bool(extra)
        hogs += 1
        assert cgroup.oom_kill_count() == 0, f"the kernel's OOM killer acted at hog {hogs}"
        # fds are compared once no victim is in flight: the hog's exit reaches this test before the
        # daemon's next tick closes its pidfd (a 17th fd seen at load 3 was that, not a leak).
        assert wait_until(lambda: guards_idle(tmp_path / "state.json"), 15), f"still in flight after hog {hogs}"
        samples.append(sample(pid, time.monotonic() - start))
    assert daemon.process.poll() is None, "the daemon died"
    assert hogs >= 10, f"only {hogs} hogs in {SOAK_S:.0f} s"
    chosen = daemon.find("victim_chosen", action="term")
    assert len(chosen) == hogs
    assert len(daemon.find("victim_escalated", action="kill")) >= stubborn
    # Warm-up: the first hogs load code paths and fill caches; compare the thirds after it.
    steady = samples[len(samples) // 10 :]
    third = max(1, len(steady) // 3)
    first, last = steady[:third], steady[-third:]
    growth_kib = statistics.median(s.rss_kib for s in last) - statistics.median(s.rss_kib for s in first)
    report = (
        f"{hogs} hogs in {SOAK_S:.0f} s; RSS {first[0].rss_kib} -> {last[-1].rss_kib} KiB "
        f"(median growth {growth_kib:+.0f} KiB); fds {first[0].fds} -> {last[-1].fds}"
    )
    print(report)
    assert growth_kib < RSS_GROWTH_MAX_KIB, report
    # A leak grows with every hog (~38 here); a transient fd does not. Even with the guards idle
    # the daemon may still hold an fd or two it closes at its next ticks (its warm ranking's
    # /proc files: 17 vs 16 seen with two busy loops beside the suite), so compare the fewest
    # fds of each third: a leaked fd raises every later sample, a transient one a few.
    assert min(s.fds for s in last) <= min(s.fds for s in first), report
