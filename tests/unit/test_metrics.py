"""Metrics (issue 17): the exposition parses with Prometheus' own parser, counters never go down
across reloads, one signal moves the signal counter by one, and no attacker's string reaches a label."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.check_layers import IO_MODULES, THIRD_PARTY, _imports
from uoomd.actions import KillCgroup, Output, Record, SendSignal
from uoomd.decision import Phase, State, initial_state, levels, step
from uoomd.logs import PipelineLogger, add_level, add_timestamp, escape_values, render_json
from uoomd.metrics.collector import FAMILIES, Metrics, render_dumped, trigger_label
from uoomd.metrics.exposition import escape_label_value, render
from uoomd.metrics.listener import ListenAddress, parse_listen, request_complete, respond
from uoomd.metrics.registry import Family, Registry
from uoomd.metrics.textfile import textfile_problem, write_due
from uoomd.plan import (
    Amount,
    DaemonPlan,
    EscalationPlan,
    GuardPlan,
    Plan,
    PsiAction,
    PsiKind,
    PsiTriggerPlan,
    Scope,
    ScopeKind,
)
from uoomd.readings import GuardReading, MemoryReading, Observation, Pid, PressureReading, ProcessInfo, Uid
from uoomd.results import ActionKind, Outcome, make_result
from uoomd.scoring import Badness, Candidate, Ranking

pytestmark = pytest.mark.unit

NOW_WALL = 1_700_000_000.0
PACKAGE = Path(__file__).resolve().parents[2] / "uoomd" / "metrics"


# --- builders (the decision core's own values: step() writes the records counted here) -----

GiB = 1 << 30
TOTAL = 16 * GiB
HIGH = 8 * GiB  # above every level
LOW = 1 * GiB  # below term (10%), above kill (5%)
TERM_TIMEOUT = 5.0


def guard_plan(name: str, *, psi: tuple[PsiTriggerPlan, ...] = (), cgroup: str | None = None) -> GuardPlan:
    return GuardPlan(
        name=name,
        scope=Scope(kind=ScopeKind.CGROUP, cgroup_path=cgroup) if cgroup else Scope(kind=ScopeKind.SYSTEM),
        mem_available_term=Amount(fraction=0.10),
        mem_available_kill=Amount(fraction=0.05),
        swap_free_term=Amount(fraction=0.10),
        swap_free_kill=Amount(fraction=0.05),
        psi=psi,
    )


def trigger(action: PsiAction) -> PsiTriggerPlan:
    return PsiTriggerPlan(kind=PsiKind.FULL, stall_us=200_000, window_us=2_000_000, sustain_s=0.0, action=action)


def make_plan(*guards: GuardPlan, dry_run: bool = False, max_kills: int = 10) -> Plan:
    return Plan(
        source="test.toml",
        daemon=DaemonPlan(dry_run=dry_run, poll_min_s=0.02, poll_max_s=1.0),
        escalation=EscalationPlan(term_timeout_s=TERM_TIMEOUT, kill_timeout_s=3.0, max_kills_per_minute=max_kills),
        guards=guards,
    )


def mem(available: int, *, swap_total: int = 0, swap_free: int = 0) -> MemoryReading:
    return MemoryReading(
        total_bytes=TOTAL, available_bytes=available, swap_total_bytes=swap_total, swap_free_bytes=swap_free
    )


def candidate(pid: int, rss_pages: int) -> Candidate:
    process = ProcessInfo(
        pid=Pid(pid),
        ppid=Pid(1),
        pgid=pid,
        starttime_ticks=10_000 + pid,
        name=f"hog{pid}",
        state="R",
        uid=Uid(1000),
        kthread=False,
        has_mm=True,
        oom_score_adj=0,
        rss_anon_bytes=rss_pages * 4096,
        rss_file_bytes=0,
        rss_shmem_bytes=0,
        swap_bytes=0,
        pgtables_bytes=8192,
    )
    badness = Badness(rss_pages=rss_pages, swap_pages=0, pgtables_pages=2, adj=0, adj_points=0, totalpages=4_000_000)
    return Candidate(
        process=process, badness=badness, kernel_points=badness.points, oom_score=0, effective_adj=0, rules=()
    )


class Driver:
    """Scripted polls of the one guard "system" through step(), as the daemon makes them."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.state: State = initial_state(plan)
        pool = (candidate(101, 5000), candidate(102, 3000))
        self.rankings = {"system": Ranking(guard="system", candidates=pool, excluded=(), taken_at=0.0)}

    def poll(self, now: float, available: int, *, exited: bool = False) -> list[Output]:
        alive = frozenset() if exited else self.state.in_flight()
        obs = Observation(now=now, guards=(GuardReading(guard="system", memory=mem(available)),), alive=alive)
        self.state, actions = step(self.state, obs, self.plan, self.rankings)
        return actions


def metrics_for(plan: Plan) -> Metrics:
    m = Metrics(wall_clock=lambda: NOW_WALL)
    m.observe_plan(plan)
    return m


def pressure(
    *, some_total_us: int = 0, full_total_us: int = 0, some: float = 0.0, full: float = 0.0
) -> PressureReading:
    return PressureReading(
        some_avg10=some,
        some_avg60=0.0,
        some_avg300=0.0,
        some_total_us=some_total_us,
        full_avg10=full,
        full_avg60=0.0,
        full_avg300=0.0,
        full_total_us=full_total_us,
    )


def execute(metrics: Metrics, actions: Iterable[Output], outcome: Outcome = Outcome.SENT) -> None:
    """What daemon.py _execute does with step()'s actions: log each record, then each result."""
    for action in actions:
        if isinstance(action, Record):
            metrics.count_event("info", action.event, action.as_dict())
        elif isinstance(action, SendSignal):
            name = {15: "SIGTERM", 9: "SIGKILL"}[action.signal]
            result = make_result(ActionKind.SIGNAL, outcome, pid=action.target.pid, guard=action.guard, signal=name)
            metrics.count_event("info", "action_result", result.fields())
        elif isinstance(action, KillCgroup):
            result = make_result(ActionKind.CGROUP_KILL, outcome, guard=action.guard, signal="SIGKILL")
            metrics.count_event("info", "action_result", result.fields())


def parsed(metrics: Metrics) -> dict[str, list[Sample]]:
    """Every sample by its name, through prometheus_client's text-format parser (the family
    of ``x_total`` is ``x`` there; its samples keep the whole name)."""
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        out.setdefault(family.name, [])  # a family with no series yet
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def sample(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [s.value for s in samples[name] if s.labels == labels]
    assert len(found) == 1, (name, labels, samples[name])
    return float(found[0])


def counter_values(metrics: Metrics) -> dict[tuple[str, tuple[str, ...]], float]:
    """Every counter series and every histogram's count and sum (which only go up too)."""
    out: dict[tuple[str, tuple[str, ...]], float] = {}
    for family in metrics.registry.family_list():
        if family.kind == "counter":
            out |= {(family.name, k): float(v) for k, v in metrics.registry.series(family.name).items()}
        elif family.kind == "histogram":
            for k, h in metrics.registry.histograms(family.name):
                out[(family.name + "_count", k)] = h.count
                out[(family.name + "_sum", k)] = h.sum
                out |= {(f"{family.name}_bucket{i}", k): c for i, c in enumerate(h.cumulative())}
    return out


def two_guards() -> Plan:
    app = guard_plan("app", psi=(trigger(PsiAction.TERM), trigger(PsiAction.KILL)), cgroup="/sys/fs/cgroup/app")
    return make_plan(guard_plan("system"), app)


# --- the exposition -----------------------------------------------------------------------


def test_the_exposition_parses_with_prometheus_clients_parser_with_every_value_in_it() -> None:
    plan = two_guards()
    m = metrics_for(plan)
    memory = mem(LOW, swap_total=4 << 30, swap_free=1 << 30)
    m.observe_guard(plan.guards[0], memory, None, phase=Phase.TERM_SENT, scope_present=True)
    m.observe_guard(
        plan.guards[1], memory, pressure(some=12.5, full=3.0, some_total_us=7), phase=Phase.IDLE, scope_present=True
    )
    m.observe_scan(0.003)
    m.observe_scan(7.0)  # past the last bucket: +Inf only
    m.observe_sleep(0.02)
    m.note_reading_failure("memory", "app")
    samples = parsed(m)

    lv = levels(memory, plan.guards[0])
    assert sample(samples, "uoomd_memory_available_bytes", guard="system") == LOW
    assert sample(samples, "uoomd_swap_free_bytes", guard="system") == 1 << 30
    assert sample(samples, "uoomd_term_threshold_bytes", guard="system") == lv.term_bytes
    assert sample(samples, "uoomd_kill_threshold_bytes", guard="system") == lv.kill_bytes
    assert sample(samples, "uoomd_swap_kill_threshold_bytes", guard="system") == lv.swap_kill_bytes
    assert sample(samples, "uoomd_guard_phase", guard="system", phase="term_sent") == 1
    assert sum(s.value for s in samples["uoomd_guard_phase"] if s.labels["guard"] == "system") == 1
    assert sample(samples, "uoomd_pressure_avg10_ratio", guard="app", kind="some") == pytest.approx(0.125)
    assert sample(samples, "uoomd_pressure_stall_seconds_total", guard="app", kind="full") == 0
    assert sample(samples, "uoomd_reading_failures_total", guard="app", source="memory") == 1
    assert sample(samples, "uoomd_scan_duration_seconds_count") == 2
    assert sample(samples, "uoomd_scan_duration_seconds_bucket", le="0.005") == 1
    assert sample(samples, "uoomd_scan_duration_seconds_bucket", le="+Inf") == 2
    assert sample(samples, "uoomd_poll_limit_seconds", limit="min") == plan.daemon.poll_min_s
    assert sample(samples, "uoomd_build_info", version="0.1.0", python=".".join(map(str, sys.version_info[:3]))) == 1
    assert sample(samples, "uoomd_start_time_seconds") == NOW_WALL


def test_every_family_has_help_type_and_a_name_in_base_units() -> None:
    text = render(Metrics(wall_clock=lambda: 0.0).registry)
    unitless = {"uoomd_build_info", "uoomd_dry_run", "uoomd_guard_phase", "uoomd_guard_scope_present"}
    for family in FAMILIES:
        assert f"# HELP {family.name} " in text
        assert f"# TYPE {family.name} {family.kind}\n" in text
        assert family.name.startswith("uoomd_")
        base = family.name.removesuffix("_total")
        # Prometheus: base units (seconds, bytes, ratios), never ms, KiB or percent.
        assert family.name in unitless or family.kind == "counter" or base.endswith(("_seconds", "_bytes", "_ratio"))
        assert not any(unit in family.name for unit in ("_ms", "_kib", "_kb", "_percent", "_pages", "_us"))


def test_rendering_is_cached_until_a_value_changes() -> None:
    m = metrics_for(two_guards())
    first = m.exposition()
    assert m.exposition() is first  # nothing changed: not rendered again
    m.observe_sleep(1.0)
    second = m.exposition()
    assert second is not first
    m.observe_sleep(1.0)  # the same value is no change
    assert m.exposition() is second


# --- counting what the daemon did ---------------------------------------------------------


def test_one_sent_signal_moves_the_signal_counter_by_exactly_one() -> None:
    d = Driver(make_plan(guard_plan("system")))
    m = metrics_for(d.plan)
    term = d.poll(0.0, LOW)
    assert [a.signal for a in term if isinstance(a, SendSignal)] == [15]
    execute(m, term)
    samples = parsed(m)
    signals = "uoomd_signals_total"
    assert sample(samples, signals, guard="system", signal="SIGTERM", trigger="mem_available_term") == 1
    assert sum(s.value for s in samples["uoomd_signals_total"]) == 1
    assert sample(samples, "uoomd_decisions_total", guard="system", action="term", trigger="mem_available_term") == 1
    # term_timeout escalates the same victim: one SIGKILL, counted under the trigger that escalated.
    kill = d.poll(TERM_TIMEOUT, LOW)
    execute(m, kill)
    samples = parsed(m)
    assert sample(samples, signals, guard="system", signal="SIGKILL", trigger="term_timeout") == 1
    assert sum(s.value for s in samples["uoomd_signals_total"]) == 2
    assert sample(samples, "uoomd_last_kill_timestamp_seconds", guard="system") == NOW_WALL


@pytest.mark.parametrize("outcome", [Outcome.GONE, Outcome.RECYCLED, Outcome.REFUSED, Outcome.FAILED, Outcome.DRY_RUN])
def test_a_signal_that_was_not_delivered_is_not_counted_as_one(outcome: Outcome) -> None:
    d = Driver(make_plan(guard_plan("system")))
    m = metrics_for(d.plan)
    execute(m, d.poll(0.0, LOW), outcome=outcome)
    samples = parsed(m)
    assert sum(s.value for s in samples["uoomd_signals_total"]) == 0
    assert sample(samples, "uoomd_actions_total", guard="system", action="signal", outcome=str(outcome)) == 1
    assert sample(samples, "uoomd_last_kill_timestamp_seconds", guard="system") == 0


def test_the_records_of_an_episode_each_move_their_counter() -> None:
    d = Driver(make_plan(guard_plan("system"), max_kills=1))
    m = metrics_for(d.plan)
    execute(m, d.poll(0.0, LOW))
    key = next(iter(d.state.in_flight()))
    execute(m, d.poll(1.0, LOW, exited=True))  # exited on SIGTERM
    execute(m, d.poll(2.0, HIGH))  # memory back
    execute(m, d.poll(3.0, LOW))  # a second crossing within the minute: rate limited
    samples = parsed(m)
    assert key.pid == 101
    assert sample(samples, "uoomd_victims_exited_total", guard="system") == 1
    assert sample(samples, "uoomd_recoveries_total", guard="system", how="memory_back") == 1
    assert sample(samples, "uoomd_rate_limited_total", guard="system") == 1
    assert sample(samples, "uoomd_log_events_total", level="info", event="victim_chosen") == 1


def test_a_hooks_result_is_counted_under_the_guard_that_started_it() -> None:
    m = metrics_for(two_guards())
    started = make_result(ActionKind.HOOK, Outcome.STARTED, pid=4242, guard="app", argv0="/bin/true")
    m.count_event("info", "action_result", started.fields())
    ended = make_result(ActionKind.HOOK, Outcome.TIMED_OUT, pid=4242, argv0="/bin/true")  # no guard: hooks.py
    m.count_event("warning", "action_result", ended.fields())
    samples = parsed(m)
    assert sample(samples, "uoomd_hooks_started_total", guard="app") == 1
    assert sample(samples, "uoomd_hooks_finished_total", guard="app", outcome="timed_out") == 1


def test_the_processor_counts_in_a_real_log_pipeline_even_when_the_stream_is_broken() -> None:
    m = metrics_for(two_guards())
    stream = io.StringIO()
    log = PipelineLogger([m.processor, add_level, add_timestamp, escape_values], render_json, stream)
    log.warning("victim_stuck", guard="system", pid=1, name="x\ny", starttime_ticks=1, after_s=3.0)
    line = json.loads(stream.getvalue())
    assert line["name"] == "x\\x0ay"  # the processor passed the event on untouched, escaping still ran
    stream.close()  # the journal went away: the line is dropped, the fact still counted
    log.info("policy_reloaded", policy="/etc/uoomd/uoomd.toml", guards=["system"])
    assert log.dropped == 1
    samples = parsed(m)
    assert sample(samples, "uoomd_victims_stuck_total", guard="system") == 1
    assert sample(samples, "uoomd_policy_reloads_total", result="ok") == 1


def test_every_series_an_alert_needs_exists_at_zero_before_the_first_event() -> None:
    # A series that appears at 1 hides its first increase from increase(): the first kill
    # would never fire "uoomd killed something in the last 10 minutes".
    samples = parsed(metrics_for(two_guards()))
    signals = {(s.labels["guard"], s.labels["signal"], s.labels["trigger"]) for s in samples["uoomd_signals_total"]}
    assert signals == {
        ("system", "SIGTERM", "mem_available_term"),
        ("system", "SIGKILL", "mem_available_kill"),
        ("system", "SIGKILL", "term_timeout"),
        ("app", "SIGTERM", "mem_available_term"),
        ("app", "SIGTERM", "psi[0]"),
        ("app", "SIGKILL", "mem_available_kill"),
        ("app", "SIGKILL", "term_timeout"),
        ("app", "SIGKILL", "psi[1]"),
    }
    assert all(s.value == 0 for s in samples["uoomd_signals_total"])
    assert sample(samples, "uoomd_victims_stuck_total", guard="app") == 0
    assert sample(samples, "uoomd_scope_lost_total", guard="app") == 0


@pytest.mark.parametrize(
    ("trigger_text", "label"),
    [
        ("mem_available_term", "mem_available_term"),
        ("psi[3] full 200000/2000000us sustained 4s", "psi[3]"),
        ("psi[3]", "psi[3]"),
        ('psi[0]"} 1\nuoomd_forged 1', "other"),
        ("", "other"),
        (None, "other"),
    ],
)
def test_a_trigger_becomes_a_label_of_a_closed_set(trigger_text: object, label: str) -> None:
    assert trigger_label(trigger_text) == label


# --- reloads ------------------------------------------------------------------------------


def test_a_reload_drops_the_gauges_of_a_removed_guard_and_keeps_its_counters() -> None:
    plan = two_guards()
    m = metrics_for(plan)
    for guard in plan.guards:
        m.observe_guard(guard, mem(LOW), pressure(some_total_us=10), phase=Phase.IDLE, scope_present=True)
    m.count_event("info", "victim_stuck", {"guard": "app"})
    m.observe_plan(make_plan(guard_plan("system"), guard_plan("new")))
    samples = parsed(m)
    assert {s.labels["guard"] for s in samples["uoomd_memory_available_bytes"]} == {"system"}
    assert not [s for s in samples["uoomd_guard_phase"] if s.labels["guard"] == "app"]
    assert not [s for s in samples["uoomd_pressure_avg10_ratio"] if s.labels["guard"] == "app"]
    assert sample(samples, "uoomd_victims_stuck_total", guard="app") == 1
    assert sample(samples, "uoomd_victims_stuck_total", guard="new") == 0


def test_the_stall_counter_sums_the_kernels_changes_and_never_goes_down() -> None:
    plan = two_guards()
    app = plan.guards[1]
    m = metrics_for(plan)

    def stall() -> float:
        return float(m.registry.value("uoomd_pressure_stall_seconds_total", ("app", "some")) or 0)

    def see(total_us: int, guard: GuardPlan = app) -> None:
        m.observe_guard(guard, mem(HIGH), pressure(some_total_us=total_us), phase=Phase.IDLE, scope_present=True)

    see(5_000_000)
    assert stall() == 0  # stall before uoomd looked is not ours to count
    see(6_500_000)
    assert stall() == pytest.approx(1.5)
    see(250_000)  # the cgroup was removed and made again: its total began at 0
    assert stall() == pytest.approx(1.75)
    moved = replace(app, scope=Scope(kind=ScopeKind.CGROUP, cgroup_path="/sys/fs/cgroup/other"))
    m.observe_plan(make_plan(plan.guards[0], moved))
    see(90_000_000, moved)  # another cgroup's total is a new baseline, not 89 s of stall
    assert stall() == pytest.approx(1.75)
    m.observe_guard(moved, None, None, phase=Phase.IDLE, scope_present=False)
    see(1_000_000, moved)  # back after being gone: a baseline again
    assert stall() == pytest.approx(1.75)


EVENTS: list[tuple[str, dict[str, object]]] = [
    ("victim_chosen", {"guard": "system", "trigger": "mem_available_term", "action": "term"}),
    ("victim_escalated", {"guard": "app", "trigger": "term_timeout", "action": "kill"}),
    ("action_result", {"action": "signal", "outcome": "sent", "guard": "system", "signal": "SIGTERM"}),
    ("action_result", {"action": "cgroup_kill", "outcome": "sent", "guard": "app", "signal": "SIGKILL"}),
    ("action_result", {"action": "hook", "outcome": "started", "guard": "app", "pid": 7}),
    ("action_result", {"action": "hook", "outcome": "failed", "pid": 7}),
    ("victim_stuck", {"guard": "gone"}),
    ("policy_reload_failed", {}),
    ("trigger_fired", {"guard": "app", "trigger": "psi[1] some 1/2us sustained 0s"}),
    ("scope_gone", {"guard": "app"}),
]
PLANS = [two_guards(), make_plan(guard_plan("system")), make_plan(guard_plan("gone"), dry_run=True)]
Op = tuple[str, int, int]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["event", "plan", "reading", "failure", "scan"]),
            st.integers(0, 9),
            st.integers(0, 3_000_000),
        ),
        max_size=40,
    )
)
def test_counters_never_go_down_whatever_happens_across_reloads(ops: list[Op]) -> None:
    m = metrics_for(PLANS[0])
    plan = PLANS[0]
    before = counter_values(m)
    for op, pick, number in ops:
        match op:
            case "event":
                m.count_event("info", *EVENTS[pick])
            case "plan":
                plan = PLANS[pick % len(PLANS)]
                m.observe_plan(plan)
            case "reading":
                guard = plan.guards[pick % len(plan.guards)]
                reading = pressure(some_total_us=number, full_total_us=number // 2)
                m.observe_guard(guard, mem(number), reading, phase=Phase.IDLE, scope_present=pick % 5 != 0)
            case "failure":
                m.note_reading_failure("psi", "system")
            case _:
                m.observe_scan(number / 1e6)
        after = counter_values(m)
        assert before.keys() <= after.keys(), "a counter series disappeared"
        assert all(after[k] >= v for k, v in before.items()), "a counter went down"
        before = after
        # The families kept from the last rendering are the ones whose values did not move.
        assert m.exposition().decode() == render(m.registry)
    text_string_to_metric_families(m.exposition().decode())  # and it still parses


# --- labels and hostile strings -----------------------------------------------------------

HOSTILE = [
    'quote"brace}',
    "back\\slash\\n",
    "new\nline",
    'x"} 1\nuoomd_forged_total 1\n# TYPE',
    "\x1b[31mred\x1b[0m\r\x00",
    "c1\x85\x9b",
    "surrogate\udcff\udc80",
    "",
    "ünïcödé ✓",
]


def test_hostile_label_values_stay_inside_their_label() -> None:
    registry = Registry([Family(name="t_total", kind="counter", help='a "help" with \\ and\nnewline', labels=("v",))])
    for value in HOSTILE:
        registry.inc("t_total", (value,))
    text = render(registry)
    text.encode("utf-8")  # lone surrogates did not survive into the text
    lines = text.splitlines()
    assert len(lines) == 2 + len(HOSTILE)  # HELP, TYPE, one line per series: nothing forged a line
    assert not any(line.startswith("uoomd_forged") for line in lines)
    (family,) = text_string_to_metric_families(text)
    assert family.documentation == 'a "help" with \\ and\nnewline'
    got = sorted(s.labels["v"] for s in family.samples)
    expected = sorted(
        "".join(
            "\ufffd" if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 else c
            for c in value
        )
        for value in HOSTILE
    )
    assert got == expected


@pytest.mark.parametrize("value", HOSTILE)
def test_escaping_leaves_no_raw_control_character(value: str) -> None:
    out = escape_label_value(value)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in out)
    assert '"' not in out.replace('\\"', "")


def test_a_process_name_never_reaches_the_exposition() -> None:
    m = metrics_for(two_guards())
    evil = 'hog"} 1\nuoomd_forged_total 1\n'
    m.count_event(
        "warning",
        "victim_chosen",
        {
            "guard": "system",
            "trigger": "mem_available_term",
            "action": "term",
            "name": evil,
            "pid": 6,
            "cmdline": evil,
            "runner_up_name": evil,
            "rules": [evil],
        },
    )
    m.count_event("info", "action_result", {"action": "signal", "outcome": "sent", "guard": "system", "name": evil})
    m.count_event("info", evil, {"guard": evil})  # not even as an event name or a guard of an unknown event
    text = m.exposition().decode()
    assert "hog" not in text
    assert "forged" not in text
    assert 'event="other"' in text


# --- the registry's own rules -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "signals", "kind": "counter"},  # a counter ends in _total
        {"name": "x_total", "kind": "gauge"},  # and only a counter does
        {"name": "9x", "kind": "gauge"},
        {"name": "x", "kind": "gauge", "labels": ("__reserved",)},
        {"name": "x", "kind": "gauge", "labels": ("a", "a")},
        {"name": "x", "kind": "gauge", "labels": ("bad-label",)},
        {"name": "h", "kind": "histogram"},  # no buckets
        {"name": "h", "kind": "histogram", "buckets": (1.0, 0.5)},
        {"name": "h", "kind": "histogram", "buckets": (1.0, math.inf)},
        {"name": "h", "kind": "histogram", "buckets": (1.0,), "labels": ("le",)},
        {"name": "h_count", "kind": "histogram", "buckets": (1.0,)},
    ],
)
def test_a_family_against_the_conventions_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- the message is the family's
        Family(help="h", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("amount", [-1, math.nan, math.inf])
def test_a_counter_refuses_to_go_down(amount: float) -> None:
    registry = Registry([Family(name="t_total", kind="counter", help="h")])
    with pytest.raises(ValueError, match="only goes up"):
        registry.inc("t_total", (), amount)


def test_a_gauge_cannot_be_used_as_a_counter() -> None:
    registry = Registry([Family(name="g", kind="gauge", help="h")])
    with pytest.raises(TypeError):
        registry.inc("g")


# --- the state file: `uoomd status --metrics` ----------------------------------------------


def test_a_dump_read_back_renders_the_same_exposition() -> None:
    plan = two_guards()
    m = metrics_for(plan)
    m.observe_guard(plan.guards[1], mem(LOW), pressure(some_total_us=3), phase=Phase.KILL_SENT, scope_present=True)
    m.observe_scan(0.01)
    execute(m, [Record(event="victim_chosen", fields=(("guard", "app"), ("trigger", "psi[1] x"), ("action", "kill")))])
    dumped = json.loads(json.dumps(m.dump()))
    assert render_dumped(dumped) == m.exposition().decode()


@pytest.mark.parametrize(
    "dumped",
    [
        [],
        {"uoomd_signals_total": "x"},
        {"uoomd_signals_total": [[["system", "SIGTERM"], 1]]},  # a label missing
        {"uoomd_signals_total": [[["system", "SIGTERM", 3], 1]]},
        {"uoomd_signals_total": [[["system", "SIGTERM", "t"], -1]]},
        {"uoomd_signals_total": [[["system", "SIGTERM", "t"], True]]},
        {"uoomd_signals_total": [[["system", "SIGTERM", "t"], "1"]]},
        {"uoomd_scan_duration_seconds": [[[], [[1] * 13, 0.1, 2]]]},  # counts do not add up
        {"uoomd_scan_duration_seconds": [[[], [[1], 0.1, 1]]]},
    ],
)
def test_a_malformed_dump_is_refused_with_where(dumped: object) -> None:
    with pytest.raises(ValueError, match="metrics"):
        render_dumped(dumped)


def test_a_family_unknown_to_this_version_is_skipped() -> None:
    assert "uoomd_from_the_future" not in render_dumped({"uoomd_from_the_future_total": [[[], 1]]})


# --- pure decisions of the writers --------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed_s", "changed", "busy", "due"),
    [
        (0.0, True, False, False),  # just written
        (4.9, True, False, False),  # changed, but within the interval
        (5.0, True, False, True),
        (30.0, False, False, False),  # unchanged: only the heartbeat
        (60.0, False, False, True),
        (30.0, True, True, False),  # a guard is acting: no file write in its way
        (60.0, True, True, True),  # ... but a stuck guard still shows
        (math.inf, False, True, True),  # never written: at once
    ],
)
def test_when_the_textfile_is_written(elapsed_s: float, changed: bool, busy: bool, due: bool) -> None:
    last = 100.0 - elapsed_s
    assert write_due(100.0, last_attempt_at=last, changed=changed, busy=busy, interval_s=5.0, heartbeat_s=60.0) is due


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/var/lib/node_exporter/textfile_collector/uoomd.prom", None),
        ("uoomd.prom", "absolute"),
        ("/var/lib/node_exporter/textfile_collector/uoomd.txt", "*.prom"),
        ("/var/lib/node_exporter/textfile_collector/", "*.prom"),
        ("/var/lib/node_exporter/textfile_collector/.prom", "*.prom"),
        ("/var/lib/x\0/uoomd.prom", "NUL"),
    ],
)
def test_a_metrics_file_path_is_checked_before_any_file_is_looked_at(path: str, problem: str | None) -> None:
    found = textfile_problem(path)
    assert found is None if problem is None else problem in (found or "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9595", ListenAddress(family=parse_listen("1.2.3.4:1").family, host="127.0.0.1", port=9595)),
        ("[::1]:9595", ListenAddress(family=parse_listen("[::]:1").family, host="::1", port=9595)),
        ("/run/uoomd//metrics.sock", ListenAddress(family=parse_listen("/x").family, path="/run/uoomd/metrics.sock")),
    ],
)
def test_a_listen_address_is_parsed(text: str, expected: ListenAddress) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "localhost:9595",
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:95x",
        "::1:9595",
        ":9595",
        "127.1:9595",
        "run/metrics.sock",
        "/run/\0.sock",
        "/" + "x" * 107,
        "127.0.0.1:٩٥",
    ],
)
def test_a_bad_listen_address_is_refused(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- the message says which part
        parse_listen(text)


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.0 200 OK"),
        (b"GET /metrics?x=1 HTTP/1.0\n\n", b"HTTP/1.0 200 OK"),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.0 200 OK"),
        (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.0 404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.0 405 Method Not Allowed"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"HTTP/1.0 400 Bad Request"),  # TLS hello
        (b"GET /metrics\r\n\r\n", b"HTTP/1.0 400 Bad Request"),
    ],
)
def test_the_http_answer(request_head: bytes, status: bytes) -> None:
    assert request_complete(request_head)
    answer = respond(request_head, lambda: b"body\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == status
    length = int(next(h for h in head.split(b"\r\n") if h.startswith(b"Content-Length:")).split(b":")[1])
    if request_head.startswith(b"HEAD"):
        assert body == b""
        assert length == len(b"body\n")
    else:
        assert length == len(body)
    if status.endswith(b"200 OK"):
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head


# --- layers and cost ----------------------------------------------------------------------


@pytest.mark.parametrize("module", ["registry", "exposition", "collector"])
def test_the_metrics_core_is_pure(module: str) -> None:
    imported = {name.split(".")[0] for _, name in _imports(PACKAGE / f"{module}.py")}
    assert not imported & set(IO_MODULES + THIRD_PARTY + ("prometheus_client",))


def test_the_daemon_side_of_metrics_imports_nothing_heavy() -> None:
    heavy = "('prometheus_client', 'pydantic', 'psutil', 'asyncio', 'ssl', 'http', 'threading')"
    code = (
        "import sys\nbefore = set(sys.modules)\n"
        "import uoomd.metrics.collector, uoomd.metrics.textfile, uoomd.metrics.listener\n"
        f"print(sorted(m for m in {heavy} if m in sys.modules and m not in before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
