"""The warn level and PSI warn triggers reach people: a record naming the likely victim, a notice to its owner."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.builders import make_guard, make_memory, make_plan, make_psi_trigger
from tests.harness import RecordingNotices, loop_harness
from tests.unit.test_decision import GATED, HIGH, LOW, MiB, driver, records, signals
from uoomd import pacing
from uoomd.actions import NotifyWarning, Output
from uoomd.decision import WARN_INTERVAL_S, Need, is_quiet, levels, needs
from uoomd.desktop import warn_notice
from uoomd.errors import PolicyError
from uoomd.plan import Amount, DaemonPlan, PsiAction
from uoomd.policy.load import parse_plan
from uoomd.readings import GuardReading, Observation
from uoomd.startup import guard_levels

pytestmark = pytest.mark.unit

WARN = Amount(fraction=0.25)  # of 16 GiB: 4 GiB; term 10 % (1.6 GiB), kill 5 %
BELOW_WARN = GATED  # 2 GiB: below warn, above term


def test_below_the_warn_level_the_record_names_the_likely_victim_and_its_owner_gets_a_notice() -> None:
    d = driver(make_guard(mem_available_warn=WARN), notify_desktop=True)
    out = d.poll(0.0, BELOW_WARN)
    (rec,) = records(out, "memory_warn")
    assert (rec.get("trigger"), rec.get("action"), rec.get("pid"), rec.get("name")) == (
        "mem_available_warn",
        "warn",
        101,
        "hog101",
    )
    assert rec.get("runner_up_pid") == 102
    (notice,) = [o for o in out if isinstance(o, NotifyWarning)]
    assert (notice.uid, notice.record) == (1000, rec)  # the builders' processes run as uid 1000
    assert signals(out) == []


def notices(out: list[Output]) -> list[NotifyWarning]:
    return [o for o in out if isinstance(o, NotifyWarning)]


def test_a_warning_is_logged_once_an_episode_and_noticed_once_a_minute_per_guard() -> None:
    d = driver(make_guard(mem_available_warn=WARN), notify_desktop=True)
    first = d.poll(0.0, BELOW_WARN)
    assert records(first, "memory_warn")[0].get("notice") == "sent"
    assert len(notices(first)) == 1
    assert d.poll(1.0, BELOW_WARN) == [], "the same episode"
    assert d.poll(2.0, HIGH) == []  # memory back: the episode ends
    again = d.poll(3.0, BELOW_WARN)  # a new episode within the minute: logged, not noticed
    (rec,) = records(again, "memory_warn")
    assert (rec.get("notice"), rec.get("pid")) == ("one a minute", 101)  # the ranking at hand names it
    assert notices(again) == []
    d.poll(4.0, HIGH)
    later = d.poll(WARN_INTERVAL_S + 0.5, BELOW_WARN)
    assert records(later, "memory_warn")[0].get("notice") == "sent"
    assert len(notices(later)) == 1


def test_a_dry_run_warns_in_the_log_but_sends_no_notice() -> None:
    # A notice promises a SIGTERM "if this goes on", and a dry run sends none (like the kill notice).
    d = driver(make_guard(mem_available_warn=WARN), notify_desktop=True, dry_run=True)
    out = d.poll(0.0, BELOW_WARN)
    assert records(out, "memory_warn")[0].get("notice") == "dry run"
    assert not [o for o in out if isinstance(o, NotifyWarning)]


def test_no_notice_without_notify_desktop_and_none_without_a_victim() -> None:
    d = driver(make_guard(mem_available_warn=WARN))
    out = d.poll(0.0, BELOW_WARN)
    assert records(out, "memory_warn")[0].get("notice") == "notify_desktop off"
    assert not [o for o in out if isinstance(o, NotifyWarning)]
    lonely = driver(make_guard(mem_available_warn=WARN), notify_desktop=True, cands=())
    out = lonely.poll(0.0, BELOW_WARN)
    (rec,) = records(out, "memory_warn")
    assert "pid" not in rec.as_dict(), "nobody to name"
    assert rec.get("notice") == "no likely victim"
    assert not [o for o in out if isinstance(o, NotifyWarning)]


def test_the_term_level_wins_over_the_warn_level() -> None:
    d = driver(make_guard(mem_available_warn=WARN), notify_desktop=True)
    out = d.poll(0.0, LOW)
    assert [r.event for r in records(out)] == ["victim_chosen"]


def test_a_psi_warn_trigger_names_the_likely_victim_and_notifies_its_owner_too() -> None:
    d = driver(make_guard(psi=(make_psi_trigger(PsiAction.WARN),)), notify_desktop=True)
    out = d.poll(0.0, HIGH, fired=(0,))
    (rec,) = records(out, "psi_warn")
    assert rec.get("pid") == 101
    assert [o.uid for o in out if isinstance(o, NotifyWarning)] == [1000]


def test_swap_free_warn_needs_swap_low_too_where_there_is_swap() -> None:
    guard = make_guard(mem_available_warn=WARN, swap_free_warn=Amount(fraction=0.5))
    swap_plenty = make_memory(BELOW_WARN, swap_total_bytes=8 << 30, swap_free_bytes=6 << 30)
    swap_low = make_memory(BELOW_WARN, swap_total_bytes=8 << 30, swap_free_bytes=2 << 30)
    assert not levels(swap_plenty, guard).warn_crossed
    assert levels(swap_low, guard).warn_crossed
    assert levels(make_memory(BELOW_WARN), guard).warn_crossed, "no swap: memory alone decides"
    memory_alone = make_guard(mem_available_warn=WARN)
    assert levels(swap_plenty, memory_alone).warn_crossed, "swap_free_warn unset: memory alone decides"
    assert not levels(make_memory(BELOW_WARN), make_guard()).warn_crossed, "no warn level"


def test_below_the_warn_level_the_loop_steps_and_asks_for_a_current_ranking_once() -> None:
    # Warn at half the memory, read at 7 of 16 GiB: far from the term level, where no ranking is kept warm.
    d = driver(make_guard(mem_available_warn=Amount(fraction=0.5)), notify_desktop=True)
    reading = GuardReading(guard="system", memory=make_memory(7 << 30))
    obs = Observation(now=0.0, guards=(reading,))
    assert not is_quiet(d.state, obs, d.plan)
    assert pacing.full_tick_needed(reading.memory, d.plan.guard("system"))
    assert needs(d.state, obs, d.plan) == {"system": Need.NOW}
    d.poll(0.0, 7 << 30)
    later = replace(obs, now=1.0)
    assert needs(d.state, later, d.plan) == {"system": Need.NONE}, "said: no more scans for it"
    far = make_memory(HIGH)
    assert not pacing.full_tick_needed(far, d.plan.guard("system"))


def test_the_warn_notice_names_the_victim_and_its_size_escaped() -> None:
    summary, body = warn_notice(
        {"name": "firefox", "rss_bytes": int(2.1 * (1 << 30)), "available_fraction": 0.071, "guard": "system"}
    )
    assert summary == "Memory low: firefox (2.1 GiB) will be stopped if this goes on"
    assert "7.1% of memory available" in body
    hostile, _ = warn_notice({"name": "<b>x</b>\n&", "rss_bytes": 340 * MiB})
    assert hostile == "Memory low: &lt;b&gt;x&lt;/b&gt;\\x0a&amp; (340 MiB) will be stopped if this goes on"


# --- the loop ------------------------------------------------------------------------------------


def test_the_loop_sends_one_warning_notice_to_the_victims_owner_and_logs_it(tmp_path: Path) -> None:
    plan = make_plan(
        guards=(make_guard(mem_available_warn=WARN),), daemon=DaemonPlan(notify_desktop=True, poll_max_s=1.0)
    )
    with loop_harness(plan, tmp_path, available_bytes=HIGH) as h:
        h.daemon.desktop = desktop = RecordingNotices()
        h.tick()  # far above every level: quiet ticks from here
        h.tick()
        h.set_available(BELOW_WARN)
        h.tick()
        (warned,) = h.events("memory_warn")
        assert len(desktop.sent) == 1
        assert desktop.uids == [warned["uid"]]
        assert warned["name"] in desktop.sent[0][0]
        for _ in range(5):
            h.tick()
        assert len(desktop.sent) == 1, "at most once a minute"
        assert h.signals() == []


def test_a_warn_level_below_the_term_level_is_refused() -> None:
    base = '[[guard]]\nname = "system"\nmem_available_term = "10%"\nmem_available_kill = "5%"\n'
    with pytest.raises(PolicyError, match="the warn level must be at or above the term level"):
        parse_plan(base + 'mem_available_warn = "8%"\n')
    with pytest.raises(PolicyError, match="swap_free_warn only with mem_available_warn"):
        parse_plan(base + 'swap_free_warn = "50%"\n')
    plan = parse_plan(base + 'mem_available_warn = "20%"\nswap_free_warn = "40%"\n')
    assert plan.guard("system").mem_available_warn == Amount(fraction=0.2)
    assert plan.guard("system").swap_free_warn == Amount(fraction=0.4)


def test_the_started_guard_levels_line_says_the_warn_level() -> None:
    guard = make_guard(mem_available_warn=WARN)
    assert "; warn below 4.0GiB (25%) available" in guard_levels(guard, make_memory(8 << 30))["levels"]
    assert "warn" not in guard_levels(make_guard(), make_memory(8 << 30))["levels"]
