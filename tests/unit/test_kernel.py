"""kernel.py against the C semantics of mm/oom_kill.c and fs/proc/base.c."""

from __future__ import annotations

import pytest

from uoomd import kernel

pytestmark = pytest.mark.unit

TOTAL = 6_171_021  # this VM: 24 GiB RAM, no swap, in 4 KiB pages


def badness(**kw: int | bool) -> int:
    args: dict[str, int | bool] = {
        "pid": 100,
        "kthread": False,
        "has_mm": True,
        "adj": 0,
        "rss_pages": 1000,
        "swap_pages": 0,
        "pgtables_bytes": 0,
        "page_size": 4096,
        "totalpages": TOTAL,
    }
    args.update(kw)
    return kernel.oom_badness(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("a", "b", "want"), [(7, 2, 3), (-7, 2, -3), (7, -2, -3), (-7, -2, 3), (-1, 3, 0)])
def test_c_div_truncates_toward_zero(a: int, b: int, want: int) -> None:
    assert kernel.c_div(a, b) == want


def test_badness_sums_rss_swap_and_page_tables_in_pages() -> None:
    assert badness(rss_pages=1000, swap_pages=200, pgtables_bytes=3 * 4096 + 100) == 1203


def test_adj_scales_by_totalpages_over_1000_with_integer_division() -> None:
    # 6171021 // 1000 == 6171, not 6171.021
    assert badness(rss_pages=0, adj=500) == 500 * 6171
    assert badness(rss_pages=10, adj=-999) == 10 - 999 * 6171


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"pid": 1}, "global init"),
        ({"kthread": True}, "PF_KTHREAD"),
        ({"has_mm": False}, "find_lock_task_mm() fails"),
        ({"adj": -1000}, "OOM_SCORE_ADJ_MIN"),
    ],
)
def test_unkillable_tasks_get_long_min(kw: dict[str, int | bool], why: str) -> None:
    assert badness(**kw) == kernel.LONG_MIN, why


def test_adj_minus_999_is_still_a_candidate() -> None:
    assert badness(adj=-999) != kernel.LONG_MIN


def test_proc_oom_score_of_unkillable_is_zero() -> None:
    assert kernel.proc_oom_score(kernel.LONG_MIN, TOTAL) == 0


def test_proc_oom_score_maps_zero_badness_to_666() -> None:
    assert kernel.proc_oom_score(0, TOTAL) == 666
    assert kernel.proc_oom_score(TOTAL, TOTAL) == 1333


def test_proc_oom_score_truncates_negative_badness_toward_zero() -> None:
    # badness * 1000 / totalpages = -3000 / 2000 = -1.5: C gives -1 -> (999*2)/3 = 666;
    # Python's floor would give -2 -> (998*2)//3 = 665.
    assert kernel.proc_oom_score(-3, 2000) == 666
    assert (1000 + (-3 * 1000) // 2000) * 2 // 3 == 665  # the bug this guards against


def test_proc_oom_score_of_strongly_negative_adj() -> None:
    # adj -999 on 1000 pages of RSS: badness = 1000 - 999*6171 = -6163829
    b = badness(adj=-999)
    assert kernel.proc_oom_score(b, TOTAL) == (1000 - 998) * 2 // 3  # -998.8 truncates to -998


def test_system_totalpages_is_ram_plus_swap_pages() -> None:
    assert kernel.system_totalpages(total_ram_bytes=8192 * 10, total_swap_bytes=4096 * 3, page_size=4096) == 23


def test_mem_cgroup_get_max_v1_adds_memsw_excess_capped_by_total_swap() -> None:
    assert kernel.mem_cgroup_get_max(memory_max_pages=1000, memsw_max_pages=1500, total_swap_pages=200) == 1200
    assert kernel.mem_cgroup_get_max(memory_max_pages=1000, memsw_max_pages=1500, total_swap_pages=9999) == 1500


def test_mem_cgroup_get_max_v2_adds_swap_max_capped_by_total_swap() -> None:
    assert kernel.mem_cgroup_get_max(memory_max_pages=1000, swap_max_pages=300, total_swap_pages=9999) == 1300
    assert kernel.mem_cgroup_get_max(memory_max_pages=1000, swap_max_pages=300, total_swap_pages=0) == 1000


def test_mem_cgroup_get_max_ignores_swap_when_swappiness_is_zero() -> None:
    assert (
        kernel.mem_cgroup_get_max(memory_max_pages=1000, swap_max_pages=300, total_swap_pages=999, swappiness=0) == 1000
    )


def test_mem_cgroup_get_max_of_zero_limit_is_one() -> None:
    # constrained_alloc(): mem_cgroup_get_max(oc->memcg) ?: 1
    assert kernel.mem_cgroup_get_max(memory_max_pages=0, total_swap_pages=0) == 1


def test_select_bad_process_keeps_the_last_of_equal_points() -> None:
    # oom_evaluate_task(): "points < oc->chosen_points" skips, so an equal one replaces.
    chosen = kernel.select_bad_process([("a", 5), ("b", 9), ("c", 9), ("d", 3)])
    assert chosen == ("c", 9)


def test_select_bad_process_skips_long_min_and_may_choose_nothing() -> None:
    assert kernel.select_bad_process([("a", kernel.LONG_MIN)]) is None
    assert kernel.select_bad_process([("a", kernel.LONG_MIN), ("b", -5)]) == ("b", -5)
