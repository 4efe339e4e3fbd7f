"""The daemon's loop, tick by tick, on scripted memory and a recorded /proc: what it reads, when it
steps, in what order it logs and acts, how long it sleeps. Nothing is signalled (tests/harness.py)."""

from __future__ import annotations

import errno
import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.builders import CHILDREN, GIB, MIB, make_memory, make_plan, recorded_children
from tests.harness import RecordingNotices, loop_harness
from uoomd.actions import SendSignal
from uoomd.daemon import ERROR_LOG_INTERVAL_S
from uoomd.plan import DaemonPlan
from uoomd.results import Outcome

pytestmark = pytest.mark.unit

PLENTY = 12 * GIB  # far above every level of make_guard() (16 GiB: term 1.6 GiB, warm ~5.6 GiB)
LOW = GIB  # below the term level, above the kill level
HOGS = frozenset(recorded_children(CHILDREN))


def test_far_from_every_level_a_tick_reads_memory_only_and_sleeps_poll_max(tmp_path: Path) -> None:
    with loop_harness(make_plan(), tmp_path, available_bytes=PLENTY) as h:
        reads = h.memory["system"].reads
        for _ in range(5):
            assert h.tick() == h.daemon.plan.daemon.poll_max_s
        assert h.memory["system"].reads == reads + 5, "one reading per tick"
        assert not h.daemon.warm.active, "no ranking is kept far from trouble"
        assert h.executor.actions == []
        assert h.events("victim_chosen") == []


def test_a_crossing_after_quiet_ticks_is_acted_on_in_the_same_tick(tmp_path: Path) -> None:
    with loop_harness(make_plan(), tmp_path, available_bytes=PLENTY) as h:
        h.tick()
        h.tick()  # the quiet path by now
        h.set_available(LOW)
        assert h.tick() == h.daemon.plan.daemon.poll_min_s, "a victim in flight: poll as fast as allowed"
        [signal] = h.signals()
        [chosen] = h.events("victim_chosen")
        assert signal.target.pid == chosen["pid"] in HOGS
        assert chosen["trigger"] == "mem_available_term"


def test_the_decision_is_logged_before_the_result_of_its_signal(tmp_path: Path) -> None:
    with loop_harness(make_plan(), tmp_path, available_bytes=LOW) as h:
        h.tick()
        names = [e["event"] for e in h.events() if e["event"] in {"victim_chosen", "action_result"}]
        assert names == ["victim_chosen", "action_result"]
        result = h.events("action_result")[0]
        assert result["pid"] == h.events("victim_chosen")[0]["pid"]
        assert "since_reading_ms" in result, "a signal says how long after the reading it was sent"


@pytest.mark.parametrize(("answer", "notices"), [(Outcome.SENT, 1), (Outcome.GONE, 0), (Outcome.DRY_RUN, 0)])
def test_a_desktop_notice_follows_only_a_delivered_signal(tmp_path: Path, answer: Outcome, notices: int) -> None:
    plan = make_plan(daemon=DaemonPlan(notify_desktop=True))
    with loop_harness(plan, tmp_path, available_bytes=LOW) as h:
        h.daemon.desktop = desktop = RecordingNotices()
        h.executor.answer = answer
        h.tick()
        assert len(h.signals()) == 1
        assert len(desktop.sent) == notices
        if notices:
            summary, _body = desktop.sent[0]
            assert h.events("victim_chosen")[0]["name"] in summary


def test_an_exited_victim_ends_the_episode_and_memory_back_quiets_the_loop(tmp_path: Path) -> None:
    with loop_harness(make_plan(), tmp_path, available_bytes=LOW) as h:
        h.tick()
        [signal] = h.signals()
        h.executor.mark_exited(signal.target)
        h.set_available(PLENTY)
        h.tick()
        h.tick()
        assert [e["event"] for e in h.events() if e["event"] in {"victim_exited", "memory_recovered"}] == [
            "victim_exited",
            "memory_recovered",
        ]
        assert h.daemon.state.guard("system").victim is None
        assert h.tick() == h.daemon.plan.daemon.poll_max_s
        assert len(h.signals()) == 1, "no second victim once memory is back"


def test_a_victim_that_ignores_sigterm_gets_sigkill_after_term_timeout(tmp_path: Path) -> None:
    with loop_harness(make_plan(), tmp_path, available_bytes=LOW) as h:
        h.tick()
        h.tick(h.daemon.plan.escalation.term_timeout_s)
        first, second = h.signals()
        assert (first.target, first.signal, second.signal) == (second.target, 15, 9)
        assert [e["event"] for e in h.events() if e["event"].startswith("victim_")] == [
            "victim_chosen",
            "victim_escalated",
        ]


def test_a_failing_memory_source_is_logged_once_per_interval_and_guarding_resumes(tmp_path: Path) -> None:
    with loop_harness(make_plan(), tmp_path, available_bytes=PLENTY) as h:
        h.memory["system"].failure = OSError(errno.EIO, "Input/output error")
        for _ in range(10):
            h.tick(1.0)
        assert len(h.events("reading_failed")) == 1
        h.tick(ERROR_LOG_INTERVAL_S)
        assert len(h.events("reading_failed")) == 2, "said again once the interval passed"
        assert h.executor.actions == [], "no reading, no decision"
        h.memory["system"].failure = None
        h.set_available(LOW)
        h.tick()
        assert [type(a) for a in h.executor.actions][:1] == [SendSignal]


def test_the_status_line_names_the_last_victim(tmp_path: Path) -> None:
    with loop_harness(make_plan(), tmp_path, available_bytes=LOW) as h:
        assert h.daemon.status_line().endswith("last kill: none")
        h.tick()
        chosen = h.events("victim_chosen")[0]
        assert h.daemon.status_line().endswith(f"last kill: {chosen['name']} ({chosen['pid']})")


def test_a_dry_run_decides_and_logs_but_asks_for_nothing_but_dry_run_signals(tmp_path: Path) -> None:
    plan = make_plan()
    plan = replace(plan, daemon=replace(plan.daemon, dry_run=True))
    with loop_harness(plan, tmp_path, available_bytes=LOW) as h:
        h.tick()
        assert h.events("victim_chosen")[0]["action"] == "would_term"
        assert [s.dry_run for s in h.signals()] == [True]


def test_the_refault_meter_advances_on_quiet_ticks_and_reaches_the_state_file(tmp_path: Path) -> None:
    # The light path (memory only, no step) still feeds the meter: the rate is there the
    # moment a PSI trigger asks for it (uoomd/thrash.py).
    with loop_harness(make_plan(), tmp_path, available_bytes=PLENTY) as h:
        for i in range(4):
            h.memory["system"].reading = make_memory(PLENTY, refault_bytes=i * 8 * MIB)
            h.tick(1.0)
        assert h.daemon.watches[0].refaults.rate == 8 * MIB
        h.daemon._write_state(h.clock.now, force=True)
        state = json.loads((tmp_path / "state.json").read_text())
        assert state["guards"][0]["memory"]["refault_bytes_per_s"] == 8 * MIB
