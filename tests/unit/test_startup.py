"""What the daemon says about itself at start (issue 13): each guard's levels resolved against the
scope's total, PSI thresholds in milliseconds, whether it signals, and why self-protection fell short."""

from __future__ import annotations

import errno
from dataclasses import replace
from pathlib import Path

import pytest

from tests.builders import GIB, make_guard, make_memory, make_plan, make_psi_trigger
from tests.harness import loop_harness
from uoomd.plan import Amount, PsiAction
from uoomd.service import adj_error, nice_error
from uoomd.startup import SIGNALS_OFF, describe_stall, guard_levels, signals_text
from uoomd.status import read_state

pytestmark = pytest.mark.unit

MIB = 1 << 20


def test_levels_are_stated_in_bytes_of_the_scopes_total_without_swap() -> None:
    facts = guard_levels(make_guard(), make_memory(8 * GIB))  # 16 GiB, term 10%, kill 5%
    assert facts["levels"] == "term below 1.6GiB (10%) of 16.0GiB available, kill below 819.2MiB (5%); no swap"
    assert facts["mem_available_term_bytes"] == int(16 * GIB * 0.1)
    assert facts["mem_available_kill_bytes"] == int(16 * GIB * 0.05)
    assert (facts["swap_free_term_bytes"], facts["swap_free_kill_bytes"]) == (None, None)


def test_with_swap_both_levels_are_in_one_clause_since_both_must_be_low() -> None:
    memory = make_memory(8 * GIB, swap_total_bytes=4 * GIB, swap_free_bytes=GIB)
    text = guard_levels(make_guard(), memory)["levels"]
    assert text == (
        "term below 1.6GiB (10%) of 16.0GiB available and 409.6MiB (10%) of 4.0GiB swap free, "
        "kill below 819.2MiB (5%) and 204.8MiB (5%) swap free"
    )


def test_a_level_in_bytes_has_no_share_and_an_unread_scope_keeps_the_policys_words() -> None:
    guard = make_guard(mem_available_term=Amount(bytes=512 * MIB), mem_available_kill=Amount(bytes=256 * MIB))
    assert guard_levels(guard, make_memory(GIB))["levels"].startswith(
        "term below 512.0MiB of 16.0GiB available, kill below 256.0MiB;"
    )
    unread = guard_levels(make_guard(), None)
    assert unread["levels"] == "term below 10% available, kill below 5%"
    assert unread["mem_available_term_bytes"] is None


def test_psi_triggers_are_in_milliseconds_with_their_gate() -> None:
    guard = make_guard(
        psi=(
            make_psi_trigger(PsiAction.TERM, sustain_s=2.0),
            make_psi_trigger(PsiAction.WARN, stall_us=1_500, window_us=1_000_000),
        )
    )
    facts = guard_levels(guard, make_memory(8 * GIB))  # the gate: 20% of 16 GiB
    assert facts["psi"] == [
        "psi[0] full 200ms in 2s for 2s: term below 3.2GiB available",
        "psi[1] full 1.5ms in 1s: warn",
    ]
    assert facts["levels"].endswith("; " + "; ".join(facts["psi"]))
    assert describe_stall("some", 200_000, 2_000_000) == "some 200ms in 2s"


def test_a_refault_gate_says_the_sustain_this_scope_counts_with() -> None:
    guard = make_guard(
        psi=(make_psi_trigger(PsiAction.TERM, sustain_s=2.0),),
        psi_refault_gate=Amount(fraction=0.001),
        psi_refault_sustain_s=5.0,
        psi_refault_sustain_all_s=15.0,
    )
    before = guard_levels(guard, None)["psi"][0]
    assert before.endswith("and refaults above 0.1%/s for 5s (for 15s where every refault counts)"), before
    classic = guard_levels(guard, make_memory(8 * GIB, refault_bytes=0))["psi"][0]
    assert classic.endswith("and refaults above 16.4MiB/s for 5s"), classic  # 0.1% of 16 GiB
    every = guard_levels(guard, make_memory(8 * GIB, refault_bytes=0, refaults_all=True))["psi"][0]
    assert every.endswith("and refaults above 16.4MiB/s for 15s (every refault counts here)"), every


def test_signals_are_said_on_or_off() -> None:
    assert signals_text(True) == SIGNALS_OFF == "dry-run: nothing will be signalled"
    assert signals_text(False).startswith("on:")


def test_self_protection_says_which_capability_is_missing() -> None:
    assert adj_error(errno.EACCES, 0) == (
        "oom_score_adj stays 0: CAP_SYS_RESOURCE missing (OOMScoreAdjust=-1000 in the unit sets it)"
    )
    assert adj_error(errno.EROFS, None) == "oom_score_adj stays unknown: Read-only file system"
    assert nice_error(errno.EACCES, 0) == "nice stays 0: CAP_SYS_NICE missing (Nice=-10 in the unit sets it)"


@pytest.mark.parametrize("dry_run", [False, True])
def test_the_daemon_announces_whether_it_signals_and_each_guards_levels(tmp_path: Path, dry_run: bool) -> None:
    plan = make_plan(guards=(make_guard("a"), make_guard("b")))
    plan = replace(plan, daemon=replace(plan.daemon, dry_run=dry_run))
    with loop_harness(plan, tmp_path, available_bytes=8 * GIB) as h:
        h.daemon.announce()
        [started] = h.events("started")
        assert started["signals"] == signals_text(dry_run)
        levels = h.events("guard_levels")
        assert [e["guard"] for e in levels] == ["a", "b"]
        assert levels[0]["levels"] == guard_levels(make_guard("a"), make_memory(8 * GIB))["levels"]
        # The state file is there before READY=1, for `uoomd reload --pid $MAINPID` to check.
        state, _data = read_state(str(tmp_path / "state.json"))
        assert [g.levels for g in state.guards] == [levels[0]["levels"], levels[1]["levels"]]
