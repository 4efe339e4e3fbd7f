"""mem_available_eta (uoomd/trend.py and its use in uoomd/decision.py): the projection, its sustain, and replays
of run-outs and of allocations freed soon after."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.builders import GIB, make_guard, make_memory, make_plan, make_ranking
from tests.traces import candidates, hog, reading, run_out, trace
from uoomd.actions import Record
from uoomd.decision import Need, initial_state, is_quiet, needs, step
from uoomd.pacing import eta_watch_needed, next_poll_s
from uoomd.plan import Amount, DaemonPlan, EscalationPlan, EtaAction, EtaPlan, GuardPlan, Plan
from uoomd.policy.load import parse_plan
from uoomd.readings import GuardReading, Observation
from uoomd.replay import Timeline, replay
from uoomd.tracefile import read_lines
from uoomd.tracelines import TraceItem
from uoomd.trend import LOOKBACK_S, MAX_GAP_S, Trend, reached, update_trend

pytestmark = pytest.mark.unit

MIB = 1 << 20
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "traces"
ETA = EtaPlan(eta_s=3.0, min_fall=Amount(bytes=64 * MIB), sustain_s=0.5)
# The builders' machine: 16 GiB, no swap, term below 10 % (1.6 GiB), kill below 5 % (0.8 GiB).
KILL = int(16 * GIB * 0.05)


def guard(eta: EtaPlan | None = ETA) -> GuardPlan:
    return make_guard(eta=eta)


def plan(eta: EtaPlan | None = ETA, *, term_timeout_s: float = 5.0) -> Plan:
    return make_plan(
        guards=(guard(eta),),
        daemon=DaemonPlan(poll_min_s=0.02, poll_max_s=1.0),
        escalation=EscalationPlan(term_timeout_s=term_timeout_s),
        source="eta.toml",
    )


def feed(points: list[tuple[float, int]], eta: EtaPlan = ETA) -> Trend:
    t = Trend()
    for at, available in points:
        t = update_trend(t, make_memory(available), guard(eta), eta, at)
    return t


# --- the projection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fall_mib_s", "available", "within"),
    [
        (1024, KILL + 2 * GIB, True),  # 2 s to the kill level, eta 3 s
        (1024, KILL + 4 * GIB, False),  # 4 s away
        (512, KILL + 1 * GIB, True),  # 2 s away at half the speed
        (32, KILL + 50 * MIB, False),  # 1.6 s away, but slower than min_fall (64 MiB/s): a slow leak
        (0, KILL + 10 * MIB, False),  # not falling at all
        (-500, KILL + 10 * MIB, False),  # rising
    ],
)
def test_the_projection_is_the_time_to_the_kill_level_at_the_measured_fall(
    fall_mib_s: int, available: int, within: bool
) -> None:
    step_s = 0.05
    points = [(i * step_s, available + int((10 - i) * step_s * fall_mib_s * MIB)) for i in range(11)]
    t = feed(points)
    assert (t.since is not None) == within
    if fall_mib_s > 0:
        assert t.fall_bytes_per_s == pytest.approx(fall_mib_s * MIB, rel=0.01)
    if within:
        assert t.eta_s == pytest.approx((available - KILL) / (fall_mib_s * MIB), rel=0.01)


def test_the_projection_must_hold_for_the_sustain_and_a_stop_starts_it_anew() -> None:
    fall = [(i * 0.05, KILL + 2 * GIB - i * 50 * MIB) for i in range(8)]  # 1 GiB/s
    t = feed(fall)
    assert t.since is not None
    assert not reached(t, ETA, 0.35)
    since = t.since
    t = feed([*fall, (0.40, KILL + 2 * GIB - 8 * 50 * MIB), (0.55, KILL + 2 * GIB - 11 * 50 * MIB)])
    assert t.since == since
    assert reached(t, ETA, since + ETA.sustain_s)
    # The allocation stops: once its fall leaves the lookback, the projection ends.
    flat = [*fall, *((0.35 + i * 0.05, KILL + 2 * GIB - 7 * 50 * MIB) for i in range(1, 8))]
    assert feed(flat).since is None


def test_a_gap_in_the_readings_is_no_trend() -> None:
    t = feed([(0.0, KILL + 3 * GIB), (0.3, KILL + 2 * GIB), (0.3 + MAX_GAP_S + 0.1, KILL + GIB)])
    assert t.since is None
    assert len(t.samples) == 1


def test_the_lookback_keeps_one_reading_older_than_it_and_no_more() -> None:
    t = feed([(i * 0.01, 8 * GIB - i * MIB) for i in range(100)])
    assert t.samples[0].at <= 0.99 - LOOKBACK_S < t.samples[1].at


def test_the_trend_is_watched_only_where_the_worst_fill_could_bring_the_eta() -> None:
    assert eta_watch_needed(make_memory(8 * GIB), guard())
    assert not eta_watch_needed(make_memory(8 * GIB), guard(None))
    huge = make_memory(1000 * GIB, total_bytes=1024 * GIB)
    assert not eta_watch_needed(huge, make_guard(eta=ETA, mem_available_kill=Amount(fraction=0.05)))


def test_pacing_polls_through_the_sustain_once_the_eta_is_near() -> None:
    daemon = DaemonPlan(poll_min_s=0.01, poll_max_s=5.0)
    now, before = make_memory(KILL + 3 * GIB), make_memory(KILL + 3 * GIB + 100 * MIB)
    without = next_poll_s(now, before, 0.1, guard(None), daemon)
    with_eta = next_poll_s(now, before, 0.1, guard(), daemon)  # 3 s away at 1 GiB/s: the eta's edge
    assert with_eta <= ETA.sustain_s / 4 + 1e-9 < without


# --- in the core ---------------------------------------------------------------------------------


def observe(at: float, available: int) -> Observation:
    return Observation(now=at, guards=(GuardReading(guard="system", memory=make_memory(available)),))


def test_the_core_acts_on_the_eta_above_the_term_level_and_says_why() -> None:
    p = plan()
    state = initial_state(p)
    ranking = {"system": make_ranking("system")}  # no candidate: the record says why it would act
    chosen = None
    for i in range(40):
        at, available = i * 0.05, KILL + 3 * GIB - i * 50 * MIB  # 1 GiB/s
        obs = observe(at, available)
        assert not is_quiet(state, obs, p)  # sampled at every reading near the eta
        state, out = step(state, obs, p, ranking)
        records = [o for o in out if isinstance(o, Record) and o.event == "no_candidate"]
        if records:
            chosen = (at, available, records[0])
            break
    assert chosen is not None
    at, available, record = chosen
    assert available > int(16 * GIB * 0.1)  # above the term level
    assert record.get("trigger") == "mem_available_eta"


def test_needs_asks_for_a_ranking_while_the_projection_is_sustained_and_now_when_it_acts() -> None:
    # 64 GiB with levels of 1 GiB and 512 MiB: no ranking is warm for the levels above 5 GiB.
    # Falling 1 GiB/s from 12 GiB, a 10 s eta is within from 10.5 GiB (1.5 s), held 0.5 s.
    eta = EtaPlan(eta_s=10.0, min_fall=Amount(bytes=64 * MIB), sustain_s=0.5)
    g = make_guard(eta=eta, mem_available_term=Amount(bytes=GIB), mem_available_kill=Amount(bytes=GIB // 2))
    p = make_plan(guards=(g,), daemon=DaemonPlan(poll_min_s=0.02, poll_max_s=1.0))
    state = initial_state(p)
    seen: list[tuple[float, Need]] = []
    for i in range(50):
        at = round(i * 0.05, 2)
        obs = Observation(
            now=at,
            guards=(
                GuardReading(guard="system", memory=make_memory(12 * GIB - i * (GIB // 20), total_bytes=64 * GIB)),
            ),
        )
        seen.append((at, needs(state, obs, p)["system"]))
        state, _ = step(state, obs, p, {})
    first = {need: min(at for at, n in seen if n is need) for need in (Need.WARM, Need.NOW)}
    assert all(n is Need.NONE for at, n in seen if at < first[Need.WARM])
    assert first[Need.WARM] == pytest.approx(1.5, abs=0.06)
    assert first[Need.NOW] == pytest.approx(first[Need.WARM] + 0.5, abs=0.06)


def test_the_eta_action_kill_sends_sigkill_at_once() -> None:
    p = plan(EtaPlan(eta_s=3.0, min_fall=Amount(bytes=64 * MIB), sustain_s=0.2, action=EtaAction.KILL))
    items = trace(
        run_out(start_bytes=KILL + 3 * GIB, fall_bytes_per_s=GIB, until_bytes=KILL), candidates(0.0, hog(7, 900))
    )
    (first, *_) = replay(items, p).decisions
    assert (first.get("action"), first.get("trigger")) == ("kill", "mem_available_eta")


# --- replays: the lead time, and the false alarm it must not raise --------------------------------


def first_decision(timeline: Timeline) -> float:
    assert timeline.decisions, "no decision"
    return timeline.decisions[0].at


def test_on_a_synthetic_run_out_the_eta_acts_eta_minus_sustain_before_the_kill_level() -> None:
    # 8 GiB down at 1 GiB/s: the term level (1.6 GiB) is reached at 6.4 s, the kill level at 7.2 s.
    items = trace(
        run_out(start_bytes=8 * GIB, fall_bytes_per_s=GIB, until_bytes=GIB // 2), candidates(0.0, hog(7, 900))
    )
    levels_only, trend = replay(items, plan(None)), replay(items, plan())
    kill_at = (8 * GIB - KILL) / GIB
    assert first_decision(levels_only) == pytest.approx(6.45, abs=0.06)  # the first reading under 1.6 GiB
    assert kill_at - first_decision(trend) == pytest.approx(ETA.eta_s - ETA.sustain_s, abs=0.1)
    lead = first_decision(levels_only) - first_decision(trend)
    assert lead == pytest.approx(1.7, abs=0.1)
    (decision,) = trend.decisions[:1]
    assert decision.get("trigger") == "mem_available_eta"
    eta_s = decision.get("eta_s")
    assert isinstance(eta_s, float)
    assert eta_s <= ETA.eta_s


def freed_soon_after(*, alloc_s: float, hold_s: float = 2.0) -> list[TraceItem]:
    """6 GiB available; an allocation of 6 GiB/s for ``alloc_s`` (3 GiB in 0.5 s), held, then freed."""
    polls = []
    at, available = 0.0, 6 * GIB
    for _ in range(20):
        polls.append(reading(round(at, 4), available))
        at += 0.05
    for _ in range(round(alloc_s / 0.05)):
        available -= int(6 * GIB * 0.05)
        polls.append(reading(round(at, 4), available))
        at += 0.05
    for _ in range(round(hold_s / 0.05)):
        polls.append(reading(round(at, 4), available))
        at += 0.05
    for _ in range(20):
        polls.append(reading(round(at, 4), 6 * GIB))
        at += 0.05
    return trace(polls, candidates(0.0, hog(7, 3000)))


def test_an_allocation_freed_soon_after_never_triggers_the_eta() -> None:
    # 3 GiB in 0.5 s never reaches the term level (3 GiB stays available), and the fall stops
    # before the projection has held for the sustain: no decision at all.
    sustained = plan(EtaPlan(eta_s=3.0, min_fall=Amount(bytes=64 * MIB), sustain_s=1.0))
    assert replay(freed_soon_after(alloc_s=0.5), sustained).decisions == ()
    # The trade-off, shown: with a sustain shorter than the allocation, it is a false alarm.
    hasty = plan(EtaPlan(eta_s=3.0, min_fall=Amount(bytes=64 * MIB), sustain_s=0.2))
    assert [m.get("trigger") for m in replay(freed_soon_after(alloc_s=0.5), hasty).decisions] == ["mem_available_eta"]


RECORDED_ETA = """
[[guard]]
name = "test"
scope = "cgroup:/recorded"
mem_available_term = "30%"
mem_available_kill = "10%"
"""
ETA_KEYS = """mem_available_eta = "4s"
mem_available_eta_min_fall = "5%"
mem_available_eta_sustain = "1s"
"""


def recorded(name: str) -> list[TraceItem]:
    return [located.item for located in read_lines([str(FIXTURES / name)])]


def test_on_a_recorded_run_out_the_eta_acts_before_the_term_level() -> None:
    # tests/fixtures/traces/make_traces.py: a hog growing ~100 MiB/s in a 512 MiB memory
    # cgroup up to 470 MiB, recorded here by `uoomd record` (no daemon acting).
    items = recorded("runout_cgroup.jsonl")
    levels_only = replay(items, parse_plan(RECORDED_ETA))
    trend = replay(items, parse_plan(RECORDED_ETA + ETA_KEYS))
    assert [m.get("trigger") for m in levels_only.decisions[:1]] == ["mem_available_term"]
    assert [m.get("trigger") for m in trend.decisions[:1]] == ["mem_available_eta"]
    lead = first_decision(levels_only) - first_decision(trend)
    # 0.94 s on this recording: the hog paused ~0.5 s at 417 MiB available (a stop, which restarts
    # the sustain), so the eta acted 1.85 s before the kill level and the term level 0.91 s before it.
    assert lead > 0.5, f"the eta acted only {lead:.2f} s before the term level"
    assert trend.decisions[0].get("name") == levels_only.decisions[0].get("name") == "runout"


def test_on_a_recorded_allocation_freed_soon_after_the_eta_stays_quiet() -> None:
    # The same cgroup: a hog takes 240 MiB as fast as it can and exits a second later.
    items = recorded("burst_cgroup.jsonl")
    assert replay(items, parse_plan(RECORDED_ETA + ETA_KEYS)).decisions == ()


def test_the_eta_keys_load_and_are_refused_without_mem_available_eta() -> None:
    p = parse_plan(RECORDED_ETA + ETA_KEYS)
    eta = p.guards[0].eta
    assert eta == EtaPlan(eta_s=4.0, min_fall=Amount(fraction=0.05), sustain_s=1.0, action=EtaAction.TERM)
    from uoomd.errors import PolicyError

    with pytest.raises(PolicyError, match="mem_available_eta_sustain only with mem_available_eta"):
        parse_plan(RECORDED_ETA + 'mem_available_eta_sustain = "1s"\n')
    with pytest.raises(PolicyError, match="more than 0"):
        parse_plan(RECORDED_ETA + 'mem_available_eta = "0s"\n')
