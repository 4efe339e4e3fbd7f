"""The kernel's OOM arithmetic, ported faithfully in pages with C integer semantics (pure).

Sources read for this port (Linux 6.18, mm/oom_kill.c, fs/proc/base.c, mm/memcontrol.c):
``oom_unkillable_task()``, ``oom_badness()``, ``oom_evaluate_task()``,
``select_bad_process()``, ``constrained_alloc()``, ``proc_oom_score()`` and
``mem_cgroup_get_max()``. Names follow the kernel's, on purpose.

Which RSS counter: since Linux 6.2 the mm RSS counters are per-CPU
(percpu_counter). oom_badness() uses get_mm_rss(), the cheap approximate read
(percpu_counter_read_positive), and so does /proc/PID/stat field 24
(fs/proc/array.c do_task_stat()). /proc/PID/status prints exact sums
(get_mm_counter_sum(), fs/proc/task_mmu.c task_mem(), since 6.16). Measured on
this project's test VM (Linux 6.18.44, 2 CPUs, 24 GiB, no swap): the two differ for
18 of 18 user processes (by 5-90 pages), yet both reproduce /proc/PID/oom_score for
79/79 live processes (tests/integration/test_oom_score_live.py prints both), because
one oom_score point is totalpages/1500 ~ 4,100 pages here. The stat value is used: it
is the very counter oom_badness() reads, which matters for ranking near-equals.

What /proc cannot show, and so is not reproduced: MMF_OOM_SKIP (an mm already
reaped), in_vfork() (a vfork child before exec), oom_task_origin() (swapoff), and
an exited group leader whose other threads still hold the mm (find_lock_task_mm()
would use such a thread; /proc/PID/stat shows no rss for the zombie leader).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

# include/uapi/linux/oom.h
OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000

# include/vdso/limits.h, 64-bit long
LONG_MIN = -(2**63)
LONG_MAX = 2**63 - 1
_ULONG_MOD = 2**64

T = TypeVar("T")


def c_long(value: int) -> int:
    """Wrap to a C ``long`` (two's complement, 64 bits), as the kernel's arithmetic does."""
    value %= _ULONG_MOD
    return value - _ULONG_MOD if value > LONG_MAX else value


def c_div(a: int, b: int) -> int:
    """C99 integer division: truncates toward zero (Python's // floors)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def oom_unkillable_task(*, pid: int, kthread: bool) -> bool:
    """mm/oom_kill.c oom_unkillable_task(), Linux 6.18: global init or PF_KTHREAD."""
    # is_global_init(): the tgid is 1 in the initial PID namespace; uoomd reads the
    # initial namespace's /proc (a daemon in a container sees its own init as 1).
    return pid == 1 or kthread


def oom_badness_points(*, rss_pages: int, swap_pages: int, pgtables_bytes: int, page_size: int) -> int:
    """The memory part of oom_badness(): get_mm_rss() + MM_SWAPENTS + mm_pgtables_bytes()/PAGE_SIZE."""
    return rss_pages + swap_pages + pgtables_bytes // page_size


def adj_points(adj: int, totalpages: int) -> int:
    """mm/oom_kill.c oom_badness(): ``adj *= totalpages / 1000`` (unsigned division, then
    the product stored back in a long)."""
    return c_long(adj * (totalpages // 1000))


def oom_badness(
    *,
    pid: int,
    kthread: bool,
    has_mm: bool,
    adj: int,
    rss_pages: int,
    swap_pages: int,
    pgtables_bytes: int,
    page_size: int,
    totalpages: int,
) -> int:
    """mm/oom_kill.c oom_badness(), Linux 6.18. LONG_MIN means "never a victim"."""
    if oom_unkillable_task(pid=pid, kthread=kthread):
        return LONG_MIN
    # find_lock_task_mm() fails: zombie or exiting, no thread holds an mm.
    if not has_mm:
        return LONG_MIN
    # "explicitly marked oom unkillable" (MMF_OOM_SKIP and in_vfork() are invisible here)
    if adj == OOM_SCORE_ADJ_MIN:
        return LONG_MIN
    points = oom_badness_points(
        rss_pages=rss_pages, swap_pages=swap_pages, pgtables_bytes=pgtables_bytes, page_size=page_size
    )
    return c_long(points + adj_points(adj, totalpages))


def proc_oom_score(badness: int, totalpages: int) -> int:
    """fs/proc/base.c proc_oom_score(), Linux 6.18: what /proc/PID/oom_score shows.

    ``points = (1000 + badness * 1000 / (long)totalpages) * 2 / 3`` in signed long
    arithmetic (division truncates toward zero, which matters for a negative badness),
    printed as unsigned long; LONG_MIN (unkillable) shows as 0.
    """
    if badness == LONG_MIN:
        return 0
    points = c_div(c_long(1000 + c_div(c_long(badness * 1000), totalpages)) * 2, 3)
    return points % _ULONG_MOD  # "%lu" of an unsigned long


def system_totalpages(*, total_ram_bytes: int, total_swap_bytes: int, page_size: int) -> int:
    """mm/oom_kill.c constrained_alloc() and proc_oom_score(): totalram_pages() + total_swap_pages.
    MemTotal and SwapTotal in /proc/meminfo are exactly those counts, in kB."""
    return total_ram_bytes // page_size + total_swap_bytes // page_size


def mem_cgroup_get_max(
    *,
    memory_max_pages: int,
    total_swap_pages: int,
    swappiness: int = 60,
    memsw_max_pages: int | None = None,
    swap_max_pages: int | None = None,
) -> int:
    """mm/memcontrol.c mem_cgroup_get_max(), Linux 6.18: the totalpages of a memcg OOM.

    cgroup v1 with memsw accounting (do_memsw_account()): pass ``memsw_max_pages``
    (memory.memsw.limit_in_bytes); the swap allowance is memsw.max - memory.max.
    cgroup v2: pass ``swap_max_pages`` (memory.swap.max). Either way the allowance is
    capped at total_swap_pages and counts only when the memcg may swap (swappiness).
    constrained_alloc() turns a 0 into 1 (``mem_cgroup_get_max(oc->memcg) ?: 1``).
    """
    max_pages = memory_max_pages
    if swappiness:
        if memsw_max_pages is not None:
            swap = max(memsw_max_pages - max_pages, 0)  # memsw.max >= memory.max is enforced
            max_pages += min(swap, total_swap_pages)
        elif swap_max_pages is not None:
            max_pages += min(swap_max_pages, total_swap_pages)
    return max_pages or 1


def select_bad_process(evaluated: Iterable[tuple[T, int]]) -> tuple[T, int] | None:
    """mm/oom_kill.c select_bad_process() / oom_evaluate_task(), Linux 6.18.

    ``evaluated`` is (task, oom_badness()) in the kernel's iteration order. The kernel
    skips a task only when ``points == LONG_MIN || points < oc->chosen_points``, so a
    task with points EQUAL to the current choice replaces it: among equals the LAST
    one in iteration order wins. For a system OOM that order is for_each_process(),
    the init_task.tasks list, to which copy_process() appends each new process
    (list_add_tail_rcu): fork order, which uoomd reconstructs as (starttime, pid).
    """
    chosen: tuple[T, int] | None = None
    for task, points in evaluated:
        if points == LONG_MIN:
            continue
        if chosen is not None and points < chosen[1]:
            continue
        chosen = (task, points)
    return chosen
