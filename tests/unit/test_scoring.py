"""Ranking with rules, on synthetic processes and on the recorded /proc trees."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.builders import (
    CHILDREN,
    IDLE,
    make_guard,
    make_plan,
    make_process,
    make_rule,
    make_snapshot,
    recorded_oom_score,
)
from uoomd import kernel, rules
from uoomd.plan import MatchPlan, Plan
from uoomd.readings import Pid, ProcessInfo
from uoomd.rules import MissingDetailError
from uoomd.scoring import Candidate, Exclusion, kernel_choice, rank, score_process
from uoomd.sources.procfs import read_snapshot

pytestmark = pytest.mark.unit

TOTAL = 1_048_576  # 4 GiB in pages: make_snapshot()'s machine


def reasons(ranking_excluded: tuple[Exclusion, ...]) -> dict[int, str]:
    return {e.process.pid: e.reason for e in ranking_excluded}


def test_biggest_process_ranks_first() -> None:
    snap = make_snapshot(make_process(10, mm_rss_pages=100), make_process(11, mm_rss_pages=300))
    ranking = rank(snap, make_plan(), make_guard(), totalpages=TOTAL)
    assert [c.process.pid for c in ranking.candidates] == [11, 10]


@pytest.mark.parametrize(
    ("process", "reason"),
    [
        (make_process(2, kthread=True, has_mm=False), "kernel thread"),
        (make_process(1, mm_rss_pages=5000), "init"),
        (make_process(30, state="Z", has_mm=False), "no mm"),
        (make_process(31, oom_score_adj=-1000, mm_rss_pages=9000), "oom_score_adj -1000"),
        (make_process(999_999, mm_rss_pages=9000), "self"),
        (make_process(500, mm_rss_pages=9000), "uoomd's parent"),
    ],
)
def test_exclusions_carry_their_reason(process: ProcessInfo, reason: str) -> None:
    me = make_process(999_999, ppid=Pid(500), mm_rss_pages=1)
    snap = make_snapshot(process, me) if process.pid != me.pid else make_snapshot(me)
    ranking = rank(snap, make_plan(), make_guard(), totalpages=TOTAL)
    assert reasons(ranking.excluded)[process.pid] == reason


def test_protect_rule_wins_over_size_and_adjust() -> None:
    plan = make_plan(make_rule(0, protect=True, name="^db$"), make_rule(1, adjust=900, name="^db$"))
    snap = make_snapshot(make_process(10, name="db", mm_rss_pages=9000), make_process(11, mm_rss_pages=10))
    ranking = rank(snap, plan, make_guard(), totalpages=TOTAL)
    assert [c.process.pid for c in ranking.candidates] == [11]
    (excl,) = ranking.excluded
    assert excl.reason == "protected by rule 'rule[0]'"
    assert excl.rules == ("rule[0]", "rule[1]")


def test_adjustments_of_all_matching_rules_add_up_and_clamp() -> None:
    plan = make_plan(make_rule(0, adjust=600, name="web"), make_rule(1, adjust=700, uid=1000))
    process = make_process(10, name="web", oom_score_adj=100, mm_rss_pages=10)
    result = score_process(process, plan, make_guard(), TOTAL, page_size=4096, system_totalpages=TOTAL)
    assert isinstance(result, Candidate)
    assert result.effective_adj == 1000  # 100 + 600 + 700 clamped
    assert result.badness.adj_points == 1000 * (TOTAL // 1000)
    assert result.kernel_points == 10 + 100 * (TOTAL // 1000)  # the kernel's own view is unchanged
    assert result.rules == ("rule[0]", "rule[1]")


def test_negative_adjust_can_push_below_a_smaller_process() -> None:
    plan = make_plan(make_rule(0, adjust=-500, name="^big$"))
    snap = make_snapshot(make_process(10, name="big", mm_rss_pages=5000), make_process(11, mm_rss_pages=100))
    ranking = rank(snap, plan, make_guard(), totalpages=TOTAL)
    assert ranking.best is not None
    assert ranking.best.process.pid == 11


def test_rules_reaching_adj_min_exclude_like_the_kernel() -> None:
    plan = make_plan(make_rule(0, adjust=-1000, name="x"))
    result = score_process(
        make_process(10, name="x"), plan, make_guard(), TOTAL, page_size=4096, system_totalpages=TOTAL
    )
    assert isinstance(result, Exclusion)
    assert "-1000" in result.reason


def test_ignore_positive_adj_counts_a_positive_own_adj_as_zero() -> None:
    guard = make_guard(ignore_positive_adj=True)
    snap = make_snapshot(
        make_process(10, oom_score_adj=1000, mm_rss_pages=10), make_process(11, oom_score_adj=0, mm_rss_pages=50)
    )
    ranking = rank(snap, make_plan(), guard, totalpages=TOTAL)
    assert [c.process.pid for c in ranking.candidates] == [11, 10]
    assert ranking.candidates[1].effective_adj == 0


def test_guard_scope_members_restrict_candidates() -> None:
    snap = make_snapshot(make_process(10, mm_rss_pages=9000), make_process(11, mm_rss_pages=10))
    ranking = rank(snap, make_plan(), make_guard(), totalpages=TOTAL, members=frozenset({Pid(11)}))
    assert [c.process.pid for c in ranking.candidates] == [11]
    assert reasons(ranking.excluded)[10] == "outside the guard's scope"


def test_min_badness_excludes_small_processes() -> None:
    snap = make_snapshot(make_process(10, mm_rss_pages=99), make_process(11, mm_rss_pages=100))
    ranking = rank(snap, make_plan(), make_guard(min_badness=100), totalpages=TOTAL)
    assert [c.process.pid for c in ranking.candidates] == [11]
    assert reasons(ranking.excluded)[10].startswith("badness 99 below min_badness 100")


def test_rules_of_another_guard_do_not_apply() -> None:
    plan = make_plan(make_rule(0, protect=True, name="x", guards=("other",)))
    ranking = rank(make_snapshot(make_process(10, name="x")), plan, make_guard(), totalpages=TOTAL)
    assert len(ranking.candidates) == 1


def test_a_rule_needing_an_unread_detail_is_a_programming_error() -> None:
    plan = make_plan(make_rule(0, protect=True, cmdline="postgres"))
    with pytest.raises(MissingDetailError, match="cmdline"):
        rank(make_snapshot(make_process(10)), plan, make_guard(), totalpages=TOTAL)


def test_all_match_keys_must_match() -> None:
    plan = make_plan(make_rule(0, protect=True, name="^a$", user="alice"))
    snap = make_snapshot(
        make_process(10, name="a", user="bob"), make_process(11, name="a", user="alice"), details=frozenset({"user"})
    )
    ranking = rank(snap, plan, make_guard(), totalpages=TOTAL)
    assert [c.process.pid for c in ranking.candidates] == [10]


def test_equal_points_rank_the_later_forked_first_like_the_kernel() -> None:
    # oom_evaluate_task() replaces its choice on equal points; for_each_process() walks fork order.
    early = make_process(300, starttime_ticks=100, mm_rss_pages=50)
    late = make_process(200, starttime_ticks=200, mm_rss_pages=50)  # a wrapped, smaller PID forked later
    snap = make_snapshot(early, late)
    ranking = rank(snap, make_plan(), make_guard(), totalpages=TOTAL)
    assert ranking.best is not None
    assert ranking.best.process.pid == 200
    chosen = kernel_choice(snap, totalpages=TOTAL)
    assert chosen is not None
    assert chosen.pid == 200


def test_hostile_names_are_matched_as_data_not_syntax() -> None:
    plan = make_plan(make_rule(0, protect=True, name=r"^evil\) S"))
    snap = make_snapshot(make_process(10, name="evil) S 1 1\nx", mm_rss_pages=9))
    assert rank(snap, plan, make_guard(), totalpages=TOTAL).candidates == ()


@pytest.mark.parametrize("root", [IDLE, CHILDREN])
def test_computed_oom_score_equals_the_recorded_one(root: str) -> None:
    snap = read_snapshot(root)
    total = kernel.system_totalpages(
        total_ram_bytes=snap.total_ram_bytes, total_swap_bytes=snap.total_swap_bytes, page_size=snap.page_size
    )
    ranking = rank(snap, make_plan(), make_guard(), totalpages=total)
    scored = {c.process.pid: c.oom_score for c in ranking.candidates}
    assert scored
    assert all(score == recorded_oom_score(root, pid) for pid, score in scored.items())


@pytest.mark.parametrize("root", [IDLE, CHILDREN])
def test_without_rules_uoomd_picks_the_kernels_choice(root: str) -> None:
    snap = read_snapshot(root, self_pid=0)  # no uoomd process in the recording
    total = kernel.system_totalpages(
        total_ram_bytes=snap.total_ram_bytes, total_swap_bytes=snap.total_swap_bytes, page_size=snap.page_size
    )
    best = rank(snap, make_plan(), make_guard(), totalpages=total).best
    chosen = kernel_choice(snap, totalpages=total)
    assert best is not None
    assert chosen is not None
    assert best.process.pid == chosen.pid


def test_recorded_adj_1000_hog_is_the_victim() -> None:
    snap = read_snapshot(CHILDREN, self_pid=0)
    total = kernel.system_totalpages(
        total_ram_bytes=snap.total_ram_bytes, total_swap_bytes=snap.total_swap_bytes, page_size=snap.page_size
    )
    ranking = rank(snap, make_plan(), make_guard(), totalpages=total)
    assert ranking.best is not None
    assert ranking.best.process.name == "hog-adj-max"
    assert ranking.candidates[1].process.name == "hog-adj-pos"


# --- rank(previous=): verdicts of unchanged processes are reused, results are identical ---


def _mixed_snapshot() -> tuple[ProcessInfo, ...]:
    return (
        make_process(2, kthread=True, has_mm=False),
        make_process(10, mm_rss_pages=100),
        make_process(11, mm_rss_pages=300, oom_score_adj=200),
        make_process(12, name="db", mm_rss_pages=900),
        make_process(13, state="Z", has_mm=False),
    )


def test_rank_with_previous_reuses_verdicts_of_the_same_objects() -> None:
    plan = make_plan(make_rule(0, protect=True, name="^db$"))
    guard = plan.guards[0]
    processes = _mixed_snapshot()
    first = rank(make_snapshot(*processes), plan, guard, totalpages=TOTAL)
    grown = make_process(10, mm_rss_pages=500_000)
    again = make_snapshot(grown, *processes[2:])
    second = rank(again, plan, guard, totalpages=TOTAL, previous=first)
    assert second == rank(again, plan, guard, totalpages=TOTAL)
    assert second.best is not None
    assert second.best.process is grown  # rescored, now first
    reused = {id(r) for r in (*first.candidates, *first.excluded)}
    verdicts: list[Candidate | Exclusion] = [*second.candidates, *second.excluded]
    by_pid = {r.process.pid: r for r in verdicts}
    assert id(by_pid[Pid(11)]) in reused
    assert id(by_pid[Pid(12)]) in reused
    assert id(by_pid[Pid(10)]) not in reused


def test_rank_with_previous_of_other_inputs_rescores_everything() -> None:
    plan = make_plan()
    guard = plan.guards[0]
    snap = make_snapshot(*_mixed_snapshot())
    first = rank(snap, plan, guard, totalpages=TOTAL)
    second = rank(snap, plan, guard, totalpages=TOTAL // 2, previous=first)
    assert second == rank(snap, plan, guard, totalpages=TOTAL // 2)
    assert not {id(c) for c in second.candidates} & {id(c) for c in first.candidates}
    other_plan = make_plan(make_rule(0, adjust=500, name="proc10"))
    third = rank(snap, other_plan, other_plan.guards[0], totalpages=TOTAL, previous=first)
    assert third == rank(snap, other_plan, other_plan.guards[0], totalpages=TOTAL)
    assert third.best is not None
    assert third.best.process.pid == 10


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=12),
    adjs=st.lists(st.integers(min_value=-1000, max_value=1000), min_size=12, max_size=12),
    changed=st.sets(st.integers(min_value=0, max_value=11)),
    adjust=st.integers(min_value=-1000, max_value=1000),
)
def test_rank_with_previous_equals_rank_without(
    sizes: list[int], adjs: list[int], changed: set[int], adjust: int
) -> None:
    plan = make_plan(make_rule(0, adjust=adjust, name="^proc1"))
    guard = plan.guards[0]
    before = [make_process(10 + i, mm_rss_pages=n, oom_score_adj=adjs[i]) for i, n in enumerate(sizes)]
    after = [
        make_process(p.pid, mm_rss_pages=sizes[-1 - i], oom_score_adj=adjs[-1 - i]) if i in changed else p
        for i, p in enumerate(before)
    ]
    first = rank(make_snapshot(*before), plan, guard, totalpages=TOTAL)
    snap = make_snapshot(*after)
    assert rank(snap, plan, guard, totalpages=TOTAL, previous=first) == rank(snap, plan, guard, totalpages=TOTAL)


def test_is_exact_tells_carried_status_from_this_scans() -> None:
    snap = replace(
        make_snapshot(
            make_process(10, mm_rss_pages=100),  # status read with stat (read_snapshot)
            make_process(11, mm_rss_pages=200, status_read_at=10.0),  # read in this scan
            make_process(12, mm_rss_pages=300, status_read_at=4.0),  # carried from an earlier scan
        ),
        taken_at=10.0,
    )
    ranking = rank(snap, make_plan(), make_guard(), totalpages=TOTAL)
    assert {c.process.pid: ranking.is_exact(c) for c in ranking.candidates} == {10: True, 11: True, 12: False}
    assert ranking.exact_count == 2


# --- the verdict cache: a process whose match key did not change is never matched again ---


def _count_matching(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = rules.rule_matches

    def counting(match: MatchPlan, process: ProcessInfo) -> bool:
        calls[0] += 1
        return real(match, process)

    monkeypatch.setattr(rules, "rule_matches", counting)
    return calls


def _ruled() -> tuple[Plan, tuple[ProcessInfo, ...]]:
    plan = make_plan(
        make_rule(0, protect=True, name="^db$"),
        make_rule(1, adjust=300, cmdline="--type=renderer"),
        make_rule(2, adjust=-100, cmdline=".*java.*tomcat"),
    )
    processes = (
        make_process(10, name="db", cmdline="db -D /var/lib/db", mm_rss_pages=900),
        make_process(11, name="chrome", cmdline="chrome --type=renderer", mm_rss_pages=300),
        make_process(12, name="java", cmdline="java -jar tomcat.jar", mm_rss_pages=500),
        make_process(13, name="sh", cmdline="sh", mm_rss_pages=5),
    )
    return plan, processes


def test_a_second_rank_of_unchanged_processes_matches_no_rule_again(monkeypatch: pytest.MonkeyPatch) -> None:
    plan, processes = _ruled()
    guard = plan.guards[0]
    calls = _count_matching(monkeypatch)
    first = rank(make_snapshot(*processes, details=frozenset({"cmdline"})), plan, guard, totalpages=TOTAL)
    assert calls[0] == 4 * 3
    assert first.rules_matched == 4
    # Every process ran and grew (new ProcessInfo objects, so no verdict is reused by identity),
    # but none changed its name, command line, exe, cgroup, user or uid.
    grown = tuple(replace(p, mm_rss_pages=(p.mm_rss_pages or 0) + 1000) for p in processes)
    snapshot = make_snapshot(*grown, details=frozenset({"cmdline"}))
    second = rank(snapshot, plan, guard, totalpages=TOTAL, previous=first)
    assert calls[0] == 4 * 3
    assert second.rules_matched == 0
    assert second == rank(snapshot, plan, guard, totalpages=TOTAL)  # the same answer as matching afresh


def test_a_changed_command_line_is_matched_again_and_a_gone_process_leaves_the_verdicts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan, processes = _ruled()
    guard = plan.guards[0]
    first = rank(make_snapshot(*processes, details=frozenset({"cmdline"})), plan, guard, totalpages=TOTAL)
    calls = _count_matching(monkeypatch)
    renamed = replace(processes[3], cmdline="sh -c 'java -Dx tomcat'")
    snapshot = make_snapshot(processes[0], processes[1], renamed, details=frozenset({"cmdline"}))
    second = rank(snapshot, plan, guard, totalpages=TOTAL, previous=first)
    assert calls[0] == 3  # the one process whose command line changed, against the three rules
    assert second.rules_matched == 1
    results: list[Candidate | Exclusion] = [*second.candidates, *second.excluded]
    by_pid = {r.process.pid: r.rules for r in results}
    assert by_pid[Pid(13)] == ("rule[2]",)
    # Bounded by the snapshot: the java process left, and so did its verdict.
    assert set(second.verdicts) == {rules.match_key(p) for p in snapshot.processes}


def test_identical_processes_are_matched_once(monkeypatch: pytest.MonkeyPatch) -> None:
    plan, _ = _ruled()
    calls = _count_matching(monkeypatch)
    workers = [make_process(100 + i, name="php-fpm", cmdline="php-fpm: pool www", mm_rss_pages=50) for i in range(500)]
    ranking = rank(make_snapshot(*workers, details=frozenset({"cmdline"})), plan, plan.guards[0], totalpages=TOTAL)
    assert calls[0] == 3
    assert ranking.rules_matched == 1
    assert len(ranking.candidates) == 500


def test_a_reloaded_plan_matches_everything_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    plan, processes = _ruled()
    snapshot = make_snapshot(*processes, details=frozenset({"cmdline"}))
    first = rank(snapshot, plan, plan.guards[0], totalpages=TOTAL)
    reloaded, _ = _ruled()  # equal rules, new objects: a reload
    calls = _count_matching(monkeypatch)
    rank(snapshot, reloaded, reloaded.guards[0], totalpages=TOTAL, previous=first)
    assert calls[0] == 4 * 3
