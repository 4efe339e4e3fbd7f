"""The replay (uoomd/replay.py): the core over recorded and synthetic traces, the timeline, the two-policy diff."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.builders import GIB, make_guard, make_plan, make_psi_trigger, make_rule
from tests.traces import candidates, exit_of, hog, reading, trace, trace_header
from uoomd.cli import main
from uoomd.errors import ExitCode
from uoomd.plan import Amount, DaemonPlan, EscalationPlan, Plan, PsiAction, PsiKind, RulePlan, Scope, ScopeKind
from uoomd.policy.load import load_plan, parse_plan
from uoomd.replay import Moment, Timeline, diff, replay
from uoomd.replayreport import describe, render_diff, render_text
from uoomd.trace import TraceError
from uoomd.tracefile import read_lines
from uoomd.tracelines import Header, ReadingLine, TraceGuard, TraceItem

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "traces"
MIB = 1 << 20
LOW = 1 * GIB  # below the builders' term level (10% of 16 GiB), above kill (5%)
HIGH = 8 * GIB


def fixture(name: str) -> list[TraceItem]:
    return [located.item for located in read_lines([str(FIXTURES / name)])]


def recorded_plan(items: list[TraceItem]) -> Plan:
    from uoomd.policy.load import parse_plan

    header = items[0]
    assert isinstance(header, Header)
    assert header.policy_text is not None
    return parse_plan(header.policy_text, "recorded")


def replay_with(items: list[TraceItem], key: str, value: str) -> Timeline:
    """The trace replayed under its recorded policy with one guard key set to ``value``."""
    header = items[0]
    assert isinstance(header, Header)
    assert header.policy_text is not None
    line = re.compile(rf'^{key} = "[^"]*"', flags=re.MULTILINE)
    text, found = line.subn(f'{key} = "{value}"', header.policy_text)
    assert found == 1, key
    return replay(items, parse_plan(text, f"{key}={value}"))


def live_decisions(name: str) -> list[dict[str, object]]:
    data: list[dict[str, object]] = json.loads((FIXTURES / name).read_text())
    return data


def wall(timestamp: object) -> float:
    return datetime.fromisoformat(str(timestamp).replace("Z", "+00:00")).timestamp()


def same(m: Moment) -> tuple[object, ...]:
    return (m.event, m.get("pid"), m.get("action"), m.get("trigger"))


def events(timeline: Timeline, *names: str) -> list[Moment]:
    return [m for m in timeline.moments if not names or m.event in names]


def plan_of(*rules: RulePlan, term_timeout_s: float = 5.0, kill_timeout_s: float = 3.0, **guard: Any) -> Plan:
    return make_plan(
        *rules,
        guards=(make_guard(**guard),),
        daemon=DaemonPlan(poll_min_s=0.02, poll_max_s=1.0),
        escalation=EscalationPlan(term_timeout_s=term_timeout_s, kill_timeout_s=kill_timeout_s),
        source="synthetic.toml",
    )


# --- recorded here: real hogs in a real memory cgroup -----------------------------------------


def test_the_live_trace_replayed_under_the_daemons_policy_gives_the_daemons_decisions() -> None:
    # tests/e2e/test_replay_e2e.py made it: `uoomd run` stopped two hogs in a row beside an
    # idle one while `uoomd record` ran; the daemon's own log lines are the .decisions.json.
    items = fixture("two_hogs_live.jsonl")
    timeline = replay(items, load_plan(str(FIXTURES / "two_hogs_live.toml"), check_system=False))
    live = live_decisions("two_hogs_live.decisions.json")
    assert [same(m) for m in timeline.decisions] == [(d["event"], d["pid"], d["action"], d["trigger"]) for d in live]
    header = items[0]
    assert isinstance(header, Header)
    gaps = [
        abs(header.started_wall + m.at - wall(d["timestamp"])) for m, d in zip(timeline.decisions, live, strict=False)
    ]
    assert max(gaps) < 0.2  # the daemon's poll_max: both saw the crossing within a poll
    assert [m.get("name") for m in events(timeline, "victim_exited")] == ["grow0", "grow1"]


def test_the_dry_run_trace_replayed_under_its_recorded_policy_gives_the_daemons_decisions() -> None:
    items = fixture("holder_dry_run.jsonl")
    timeline = replay(items, recorded_plan(items))
    live = live_decisions("holder_dry_run.decisions.json")
    assert [same(m) for m in timeline.decisions[: len(live)]] == [
        (d["event"], d["pid"], d["action"], d["trigger"]) for d in live
    ]
    assert [m.get("action") for m in timeline.decisions[:2]] == ["would_term", "would_kill"]


def test_a_decision_comes_after_its_level_crossing_and_says_its_headroom() -> None:
    items = fixture("two_hogs_live.jsonl")
    timeline = replay(items, load_plan(str(FIXTURES / "two_hogs_live.toml"), check_system=False))
    first = timeline.decisions[0]
    crossing = [m for m in timeline.moments if m.event == "level_crossed" and m.at <= first.at]
    assert crossing
    assert crossing[-1].get("level") == "term"
    available, kill = first.get("available_bytes"), first.get("kill_threshold_bytes")
    assert isinstance(available, int)
    assert isinstance(kill, int)
    assert first.get("headroom_bytes") == available - kill > 0


def test_another_policy_chooses_among_the_recorded_finalists() -> None:
    items = fixture("two_hogs_live.jsonl")
    daemon = load_plan(str(FIXTURES / "two_hogs_live.toml"), check_system=False)
    # Protect the growers: the idle bystander is what this policy would have stopped.
    sparing = make_plan(
        make_rule(0, protect=True, name="^grow"),
        guards=daemon.guards,
        daemon=daemon.daemon,
        escalation=daemon.escalation,
        source="sparing.toml",
    )
    a, b = replay(items, daemon), replay(items, sparing)
    assert {m.get("name") for m in b.decisions} == {"idlehog"}
    rows = diff(a, b)
    assert rows[0].verdict == "different victim"
    assert rows[0].a is not None
    assert rows[0].a.get("name") == "grow0"
    assert rows[0].b is not None
    assert rows[0].b.get("name") == "idlehog"
    text = render_diff(a, b, rows)
    assert "different victim" in text
    assert "idlehog" in text


# --- synthetic traces --------------------------------------------------------------------------


def test_a_victim_is_alive_until_the_trace_says_it_exited() -> None:
    big, small = hog(101, 900), hog(102, 100)
    poll = [reading(t / 10, LOW) for t in range(0, 100)]
    gone_at = trace(poll, candidates(0.0, big, small), exit_of(0.3, big))
    timeline = replay(gone_at, plan_of())
    assert [(m.event, m.get("name")) for m in events(timeline, "victim_chosen", "victim_exited")][:2] == [
        ("victim_chosen", "hog101"),
        ("victim_exited", "hog101"),
    ]
    assert events(timeline, "victim_exited")[0].at == pytest.approx(0.3)
    # Never exited (nothing killed it then): the replay escalates as the daemon would have.
    never = replay(trace(poll, candidates(0.0, big, small)), plan_of(term_timeout_s=2.0, kill_timeout_s=1.0))
    assert [(m.event, m.get("action")) for m in events(never, "victim_escalated", "victim_stuck")][:2] == [
        ("victim_escalated", "kill"),
        ("victim_stuck", None),
    ]
    assert events(never, "victim_escalated")[0].at == pytest.approx(2.0)
    cut = replay(trace(poll[:10], candidates(0.0, big, small)), plan_of())
    assert any("pid 101 (hog101) in term_sent: it had not exited" in note for note in cut.notes)


def test_psi_triggers_the_trace_did_not_record_are_computed_from_its_stall_totals() -> None:
    # 300 ms of stall in every 1 s from t=2 s: a "some 200ms 2s" trigger fires once 200 ms
    # have grown within 2 s. Available is below the PSI gate (20%) and above the term level.
    gated = 2 * GIB
    polls = [reading(t / 10, gated, stall_us=max(0, (t - 20)) * 30_000) for t in range(60)]
    items = trace(polls, candidates(0.0, hog(101, 900)))
    psi = (make_psi_trigger(PsiAction.TERM, kind=PsiKind.SOME, stall_us=200_000, window_us=2_000_000),)
    timeline = replay(items, plan_of(psi=psi))
    fired = events(timeline, "trigger_fired")
    assert fired
    assert fired[0].at == pytest.approx(2.7)
    (chosen, *_rest) = timeline.decisions
    assert str(chosen.get("trigger")).startswith("psi[0] some")
    assert chosen.at == pytest.approx(2.7)
    assert any("computed from the stall totals" in note for note in timeline.notes)


@pytest.mark.parametrize(
    ("refaults_per_poll", "chosen"),
    [(64 << 20, True), (1 << 20, False)],
    ids=["thrash: 640 MiB/s of refaults", "steady swapping: 10 MiB/s"],
)
def test_a_refault_gated_trigger_acts_on_the_thrash_and_holds_on_the_job_that_swaps(
    refaults_per_poll: int, chosen: bool
) -> None:
    # The same stall (a full trigger firing from t=2 s) with memory short; what differs is how
    # fast evicted pages come back. The gate: 100 MiB/s. The meter runs on the trace's readings.
    gated = 2 * GIB
    polls = [
        reading(t / 10, gated, stall_us=max(0, t - 20) * 30_000, refault_bytes=t * refaults_per_poll) for t in range(60)
    ]
    psi = (make_psi_trigger(PsiAction.TERM, kind=PsiKind.SOME, stall_us=200_000, window_us=2_000_000),)
    timeline = replay(
        trace(polls, candidates(0.0, hog(101, 900))), plan_of(psi=psi, psi_refault_gate=Amount(bytes=100 << 20))
    )
    assert events(timeline, "trigger_fired")
    if chosen:
        (decision, *_rest) = timeline.decisions
        assert decision.get("refault_bytes_per_s") == pytest.approx(640 << 20, rel=0.01)
        assert events(timeline, "psi_held") == []
    else:
        assert timeline.decisions == ()
        (held,) = events(timeline, "psi_held")
        assert held.get("refault_bytes_per_s") == pytest.approx(10 << 20, rel=0.01)
        assert held.get("refault_gate_bytes_per_s") == 100 << 20


def test_a_guard_of_another_name_reads_the_only_guard_of_the_trace_and_says_so() -> None:
    items = trace(
        [reading(0.0, HIGH, guard="box"), reading(0.5, LOW, guard="box")],
        candidates(0.5, hog(101, 500), guard="box"),
        header=trace_header(TraceGuard(name="box", scope="system")),
    )
    timeline = replay(items, plan_of())
    assert [m.get("name") for m in timeline.decisions] == ["hog101"]
    assert any("reads the trace's guard box" in note for note in timeline.notes)


def test_a_cgroup_guard_on_a_system_trace_is_resolved_against_the_recorded_totals() -> None:
    scope = Scope(kind=ScopeKind.CGROUP, cgroup_path="/sys/fs/cgroup/app")
    timeline = replay(trace([reading(0.0, LOW)]), plan_of(scope=scope, mem_available_term=Amount(fraction=0.1)))
    assert any("the trace recorded system" in note for note in timeline.notes)
    assert [m.get("level") for m in events(timeline, "level_crossed")] == ["term"]


def test_files_of_two_recordings_are_refused_and_a_trace_needs_its_header() -> None:
    other = trace_header()
    other = replace(other, started_at=999.0)
    with pytest.raises(TraceError, match="different recordings"):
        replay([trace_header(), reading(0.0, HIGH), other, reading(1.0, HIGH)], plan_of())
    with pytest.raises(TraceError, match="header"):
        replay([reading(0.0, HIGH)], plan_of())


def test_the_text_timeline_escapes_what_processes_named_themselves() -> None:
    evil = hog(101, 900, name="\x1b]0;pwned\x07")
    timeline = replay(trace([reading(0.0, LOW)], candidates(0.0, evil)), plan_of())
    text = render_text(timeline)
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\\x1b]0;pwned\\x07" in describe(timeline.decisions[0])


# --- the command -----------------------------------------------------------------------------


def test_uoomd_replay_uses_the_recorded_policy_and_prints_json() -> None:
    out = io.StringIO()
    assert main(["replay", str(FIXTURES / "holder_dry_run.jsonl"), "--json"], out=out) == ExitCode.OK
    doc = json.loads(out.getvalue())
    assert "recorded" in doc["policy"]
    assert [e["action"] for e in doc["events"] if e["event"] == "victim_chosen"][:2] == ["would_term", "would_kill"]


def test_uoomd_replay_with_two_policies_prints_where_they_differ(tmp_path: Path) -> None:
    policy = (FIXTURES / "two_hogs_live.toml").read_text()
    sparing = tmp_path / "sparing.toml"
    sparing.write_text(policy + '\n[[rule]]\nmatch = { name = "^grow" }\nprotect = true\n')
    out = io.StringIO()
    code = main(
        [
            "replay",
            str(FIXTURES / "two_hogs_live.jsonl"),
            "--policy",
            str(FIXTURES / "two_hogs_live.toml"),
            "--policy",
            str(sparing),
        ],
        out=out,
    )
    assert code == ExitCode.OK
    assert "different victim" in out.getvalue()


def test_uoomd_replay_of_a_bad_trace_exits_3_naming_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text((FIXTURES / "holder_dry_run.jsonl").read_text().splitlines()[0] + "\n{oops\n")
    err = io.StringIO()
    code = main(["replay", str(bad), "--policy", str(FIXTURES / "two_hogs_live.toml")], out=io.StringIO(), err=err)
    assert code == ExitCode.SETUP
    assert "bad.jsonl:2: not JSON" in err.getvalue()
    three = ["--policy", str(FIXTURES / "two_hogs_live.toml")] * 3
    assert main(["replay", str(bad), *three], out=io.StringIO(), err=io.StringIO()) == ExitCode.SETUP


# --- recorded in the VM: a 1 GiB guest with a swapfile (vm/scenarios/swap.py "record") ---------


def test_a_vm_recording_of_jobs_that_swap_is_spared_by_the_refault_gate_and_not_without_it() -> None:
    # `uoomd record` on the shipped desktop policy, no OOM daemon: a 1.2x-RAM job filling RAM
    # (stopped after 60 s, before its passes), then the steady swapper growing past RAM with its
    # hot set refaulted, mostly activated (README, Swap). The recorded policy stalls and holds;
    # the same policy without its refault gate would have taken both (issue 18's first finding).
    items = fixture("vm_swapfile_steady.jsonl")
    recorded = recorded_plan(items)
    spared = replay(items, recorded)
    assert spared.decisions == ()
    assert events(spared, "trigger_fired")
    assert events(spared, "psi_held")
    ungated = replay_with(items, "psi_refault_gate", "0")
    chosen = [d.get("name") for d in ungated.decisions if d.event == "victim_chosen"]
    assert chosen == ["swap-thrash", "swap-steady"]


def test_a_vm_recording_of_a_thrash_is_stopped_once_its_refaults_have_lasted_and_not_before() -> None:
    # `uoomd record` on the shipped desktop policy, no OOM daemon: the thrash (a working set of
    # 1.14x RAM rewritten pass after pass) from 3.5 s after it began to swap; the kernel alone let
    # it run its 60 s cap with 143k swap-ins, and the recording stops at 62 s.
    items = fixture("vm_swapfile_thrash.jsonl")
    recorded = recorded_plan(items)
    (guard,) = recorded.guards
    gated = replay(items, recorded)
    decided = [(d.event, d.get("action"), d.get("name")) for d in gated.decisions]
    assert decided == [("victim_chosen", "term", "swap-thrash"), ("victim_escalated", "kill", "swap-thrash")]
    chosen = gated.decisions[0]
    # While it filled RAM the stall fired the trigger and the gate held it back: its refaults
    # then were few. It was chosen once the unactivated refaults of its passes had come faster
    # than the gate for the sustain, which the trace's own counter shows.
    (held, *_) = events(gated, "psi_held")
    assert held.at < chosen.at - guard.psi_refault_sustain_s
    readings = [i for i in items if isinstance(i, ReadingLine) and i.memory.refault_bytes is not None]
    gate_bytes_per_s = guard.psi_refault_gate.resolve_bytes(readings[0].memory.total_bytes)

    def refaulted(at: float) -> int:
        before = [r for r in readings if r.at <= at]
        return int(before[-1].memory.refault_bytes or 0)

    window_start = chosen.at - guard.psi_refault_sustain_s
    assert refaulted(chosen.at) - refaulted(window_start) >= gate_bytes_per_s * guard.psi_refault_sustain_s
    assert refaulted(held.at) - refaulted(held.at - 2.0) < gate_bytes_per_s * 2.0
    # Without the gate: the same victim at the stall's first sustain, while it was only filling.
    ungated = replay_with(items, "psi_refault_gate", "0")
    assert [(d.event, d.get("name")) for d in ungated.decisions][:1] == [("victim_chosen", "swap-thrash")]
    assert ungated.decisions[0].at < held.at + 0.5 < chosen.at - 10
    # The gate out of reach: only the backstop can act, and its 90 s are longer than the trace.
    unreached = replay_with(items, "psi_refault_gate", "100%")
    assert unreached.decisions == ()


def test_a_vm_recording_with_the_multi_gen_lru_spares_the_growing_job_only_with_the_longer_sustain() -> None:
    # `uoomd record` (desktop.toml) in the guest with /sys/kernel/mm/lru_gen/enabled on: the
    # steady swapper growing past RAM, then the thrash. Every refault counts there, and the
    # growing job's hot set came back above the gate for ~13 s: psi_refault_sustain_all 15 s
    # spares it and takes the thrash; 5 s, the classic LRU's sustain, would take both.
    items = fixture("vm_mglru_swapfile.jsonl")
    readings = [i for i in items if isinstance(i, ReadingLine) and i.memory.refault_bytes is not None]
    assert readings
    assert all(r.memory.refaults_all for r in readings)
    recorded = recorded_plan(items)
    (guard,) = recorded.guards
    assert (guard.psi_refault_sustain_s, guard.psi_refault_sustain_all_s) == (5.0, 15.0)
    shipped = replay(items, recorded)
    decided = [(d.event, d.get("name"), d.get("refaults"), d.get("refault_sustain_s")) for d in shipped.decisions]
    assert decided == [
        ("victim_chosen", "swap-thrash", "all", 15.0),
        ("victim_escalated", "swap-thrash", None, None),
    ]
    assert events(shipped, "psi_held")  # the growing job's stall, held
    short = replay_with(items, "psi_refault_sustain_all", "5s")
    chosen = [d.get("name") for d in short.decisions if d.event == "victim_chosen"]
    assert chosen == ["swap-steady", "swap-thrash"]
    assert short.decisions[-2].at < shipped.decisions[0].at - 5  # the thrash ~10 s sooner: the cost
