"""Our oom_score against the kernel's /proc/PID/oom_score, over every live process and real hogs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers_proc import start_children, stop_children
from uoomd import kernel
from uoomd.readings import ProcessInfo, Snapshot
from uoomd.scoring import kernel_badness, kernel_choice
from uoomd.sources.procfs import read_oom_score, read_process, read_snapshot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started = start_children()
    try:
        yield started
    finally:
        stop_children(started)


def _totalpages(snap: Snapshot) -> int:
    return kernel.system_totalpages(
        total_ram_bytes=snap.total_ram_bytes, total_swap_bytes=snap.total_swap_bytes, page_size=snap.page_size
    )


def _ours(p: ProcessInfo, totalpages: int, page_size: int) -> int:
    return kernel.proc_oom_score(kernel_badness(p, totalpages=totalpages, page_size=page_size), totalpages)


def _same_memory(a: ProcessInfo, b: ProcessInfo | None) -> bool:
    return b is not None and (a.mm_rss_pages, a.pgtables_bytes, a.swap_bytes, a.oom_score_adj) == (
        b.mm_rss_pages,
        b.pgtables_bytes,
        b.swap_bytes,
        b.oom_score_adj,
    )


def _compare_all() -> tuple[int, int, int, int]:
    """(agree, stable, total, agree_with_status_rss): read ours, the kernel's, ours again."""
    snap = read_snapshot()
    totalpages = _totalpages(snap)
    agree = stable = agree_status = 0
    for p in snap.processes:
        theirs = read_oom_score("/proc", p.pid)
        again = read_process("/proc", p.pid)
        if theirs is None or not _same_memory(p, again):
            continue  # it changed or exited between the reads: no verdict either way
        stable += 1
        agree += _ours(p, totalpages, snap.page_size) == theirs
        by_status = kernel.proc_oom_score(
            kernel.oom_badness(
                pid=p.pid,
                kthread=p.kthread,
                has_mm=p.has_mm,
                adj=p.oom_score_adj,
                rss_pages=p.rss_bytes // snap.page_size,
                swap_pages=p.swap_bytes // snap.page_size,
                pgtables_bytes=p.pgtables_bytes,
                page_size=snap.page_size,
                totalpages=totalpages,
            ),
            totalpages,
        )
        agree_status += by_status == theirs
    return agree, stable, len(snap.processes), agree_status


def test_our_oom_score_equals_the_kernels_for_every_live_process(children: list[subprocess.Popen[bytes]]) -> None:
    agree, stable, total, agree_status = _compare_all()
    print(f"oom_score agree: stat rss {agree}/{stable}, status rss {agree_status}/{stable} ({total} processes)")
    assert stable >= 0.9 * total
    assert agree >= 0.99 * stable


def test_children_oom_scores_match_exactly(children: list[subprocess.Popen[bytes]]) -> None:
    snap = read_snapshot(pids=[c.pid for c in children])
    totalpages = _totalpages(snap)
    assert len(snap.processes) == len(children)
    for p in snap.processes:
        assert _ours(p, totalpages, snap.page_size) == read_oom_score("/proc", p.pid), p.name


def test_children_adj_is_what_the_kernel_allowed(children: list[subprocess.Popen[bytes]]) -> None:
    adjs = {p.name: p.oom_score_adj for p in read_snapshot(pids=[c.pid for c in children]).processes}
    assert adjs["uoomd-t-pos"] == 500
    assert adjs["uoomd-t-max"] == 1000
    # Without CAP_SYS_RESOURCE a process cannot lower its adj below oom_score_adj_min (0 here).
    assert adjs["uoomd-t-min"] in (-1000, 0)


def test_kernels_top_pick_is_ours(children: list[subprocess.Popen[bytes]]) -> None:
    snap = read_snapshot()
    totalpages = _totalpages(snap)
    scores = {p.pid: read_oom_score("/proc", p.pid) or 0 for p in snap.processes}
    top_score = max(scores.values())
    kernel_tops = {pid for pid, s in scores.items() if s == top_score}
    ours = kernel_choice(snap, totalpages=totalpages)
    assert ours is not None
    assert ours.pid in kernel_tops
    assert ours.name == "uoomd-t-max"  # adj 1000 beats 300 MiB at adj 0


def test_a_hog_at_adj_minus_1000_scores_zero_when_allowed(children: list[subprocess.Popen[bytes]]) -> None:
    child = next(c for c in children if read_process("/proc", c.pid) is not None)
    info = read_snapshot(pids=[c.pid for c in children]).processes
    lowest = min(info, key=lambda p: p.oom_score_adj)
    if lowest.oom_score_adj != -1000:
        pytest.skip(f"no CAP_SYS_RESOURCE (uid {os.getuid()}): cannot set oom_score_adj -1000 (child {child.pid})")
    assert read_oom_score("/proc", lowest.pid) == 0
