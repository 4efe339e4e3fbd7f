"""Properties of the escalation machine over random sequences of readings, rankings and exits (Hypothesis)."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.builders import make_candidate, make_guard, make_memory, make_process, make_psi_trigger, make_ranking
from uoomd.actions import KillCgroup, Output, Record, ReleaseMemory, RunHook, SendSignal
from uoomd.decision import (
    CHOOSERS,
    RATE_WINDOW_S,
    SIGKILL,
    SIGTERM,
    Phase,
    State,
    initial_state,
    is_quiet,
    levels,
    step,
)
from uoomd.plan import (
    Amount,
    DaemonPlan,
    EscalationPlan,
    EtaAction,
    EtaPlan,
    GuardPlan,
    HooksPlan,
    Plan,
    PsiAction,
    PsiKind,
    PsiTriggerPlan,
    VictimKind,
)
from uoomd.readings import GuardReading, Observation, ProcessKey
from uoomd.scoring import Candidate, Ranking

pytestmark = pytest.mark.unit

GiB = 1 << 30
TOTAL = 16 * GiB
LEVELS = (8 * GiB, 2 * GiB, 1 * GiB, GiB // 2)  # high, under the PSI gate, under term, under kill
DTS = (0.02, 0.3, 1.0, 2.0, 3.0, 5.0, 25.0)
POOL_SIZE = 6
ETAS = (
    EtaPlan(eta_s=3.0, min_fall=Amount(fraction=0.01), sustain_s=0.0),
    EtaPlan(eta_s=10.0, min_fall=Amount(fraction=0.01), sustain_s=1.0, action=EtaAction.KILL),
)


def world_candidate(pid: int, pages: int, *, starttime_ticks: int, name: str, cgroup: str | None = None) -> Candidate:
    process = make_process(
        pid, starttime_ticks=starttime_ticks, name=name, state="R", rss_anon_bytes=GiB, mm_rss_pages=None, cgroup=cgroup
    )
    return make_candidate(process, rss_pages=pages, totalpages=1, kernel_points=0)


def candidate(i: int) -> Candidate:
    """The pool's i-th candidate: the smaller i, the bigger, each in a cgroup of its own."""
    return world_candidate(100 + i, 1000 * (POOL_SIZE - i), starttime_ticks=5000 + i, name=f"p{i}", cgroup=f"/app{i}")


POOL = tuple(candidate(i) for i in range(POOL_SIZE))


def guard_plan(
    name: str, victim: VictimKind, psi_action: PsiAction | None, sustain_s: float, eta: EtaPlan | None = None
) -> GuardPlan:
    psi: tuple[PsiTriggerPlan, ...] = ()
    if psi_action is not None:
        psi = (
            make_psi_trigger(psi_action, kind=PsiKind.SOME, stall_us=100_000, window_us=1_000_000, sustain_s=sustain_s),
        )
    return make_guard(name, psi=psi, victim=victim, eta=eta)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    n = draw(st.integers(min_value=1, max_value=2))
    guards = tuple(
        guard_plan(
            f"g{i}",
            draw(st.sampled_from(VictimKind)),
            draw(st.none() | st.sampled_from(PsiAction)),
            draw(st.sampled_from((0.0, 1.0, 3.0))),
            # mem_available_eta: the trend is state too, and is_quiet() must know when it moves.
            draw(st.none() | st.sampled_from(ETAS)),
        )
        for i in range(n)
    )
    return Plan(
        source="prop.toml",
        daemon=DaemonPlan(dry_run=draw(st.booleans()), poll_min_s=0.02, poll_max_s=1.0),
        escalation=EscalationPlan(
            term_timeout_s=draw(st.sampled_from((1.0, 2.0, 5.0))),
            kill_timeout_s=draw(st.sampled_from((0.5, 1.0, 3.0))),
            max_kills_per_minute=draw(st.integers(min_value=1, max_value=4)),
        ),
        guards=guards,
        hooks=HooksPlan(after_kill=("/bin/true",) if draw(st.booleans()) else ()),
    )


class Checker:
    """Runs the machine and checks every invariant after every step."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.state: State = initial_state(plan)
        self.now = 0.0
        self.dead: set[ProcessKey] = set()
        self.chosen_at: list[float] = []
        self.chosen: dict[str, Candidate] = {}  # latest victim chosen per guard
        self.sigterms: defaultdict[ProcessKey, int] = defaultdict(int)
        self.readings: tuple[GuardReading, ...] = ()

    def run_step(self, data: st.DataObject) -> None:
        plan = self.plan
        self.now += data.draw(st.sampled_from(DTS))
        in_flight = sorted(self.state.in_flight(), key=lambda k: k.pid)
        alive = frozenset(
            k for k in in_flight if data.draw(st.integers(min_value=0, max_value=3)) > 0
        )  # 3 in 4 live on
        self.dead |= set(in_flight) - alive
        living = [c for c in POOL if c.key not in self.dead]
        rankings: dict[str, Ranking] = {}
        for g in plan.guards:
            order = data.draw(st.permutations(living))
            keep = data.draw(st.integers(min_value=0, max_value=len(order)))
            rankings[g.name] = make_ranking(g.name, *tuple(order[:keep]))
        readings = tuple(
            GuardReading(
                guard=g.name,
                memory=make_memory(data.draw(st.sampled_from(LEVELS))),
                psi_fired=(0,) if len(g.psi) > 0 and data.draw(st.booleans()) else (),
            )
            for g in plan.guards
        )
        obs = Observation(now=self.now, guards=readings, alive=alive)
        self.readings = readings
        before = self.state
        quiet = is_quiet(before, obs, plan)
        self.state, actions = step(before, obs, plan, rankings)
        event("quiet step" if quiet else "acting step")
        if quiet:
            # The daemon skips step() when is_quiet() says so: it must really be a no-op.
            assert actions == []
            assert self.state.guards == before.guards
        self.check(before, actions, rankings)

    def check(self, before: State, actions: list[Output], rankings: dict[str, Ranking]) -> None:
        dry = self.plan.daemon.dry_run
        after = self.state
        # At most one in-flight victim per guard (structural), and never one process for two guards.
        flying = [gs.victim.key for gs in after.guards if gs.phase in _HOLDING and gs.victim is not None]
        assert len(flying) == len(set(flying))
        for gs in after.guards:
            assert (gs.victim is not None) == (gs.phase in _HOLDING or gs.phase is Phase.RECOVERING)
        killed: set[tuple[str, ProcessKey]] = set()
        for action in actions:
            match action:
                case Record(event="victim_chosen"):
                    guard = str(action.get("guard"))
                    prev = before.guard(guard) if any(g.guard == guard for g in before.guards) else None
                    assert prev is None or prev.phase in CHOOSERS  # never a second victim in flight
                    victim = after.guard(guard).victim
                    assert victim is not None
                    assert victim.key in {c.key for c in rankings[guard].candidates}
                    assert prev is None or victim.key not in prev.stuck
                    self.chosen[guard] = victim
                    if dict(action.fields).get("over_rate_limit"):
                        reading = next(r for r in self.readings if r.guard == guard)
                        assert levels(reading.memory, self.plan.guard(guard)).kill_crossed
                    else:
                        self.chosen_at.append(self.now)
                case SendSignal():
                    victim = self.chosen.get(action.guard)
                    assert victim is not None
                    assert action.target == victim.key  # every signal goes to the guard's chosen victim
                    assert action.dry_run == dry
                    if action.signal == SIGKILL:
                        killed.add((action.guard, action.target))
                    elif action.signal == SIGTERM and not dry:
                        self.sigterms[action.target] += 1
                        assert self.sigterms[action.target] == 1  # earlyoom#373: never a second SIGTERM
                case KillCgroup():
                    victim = self.chosen.get(action.guard)
                    assert victim is not None
                    assert action.path == victim.process.cgroup
                    assert action.dry_run == dry
                    killed.add((action.guard, victim.key))
                case ReleaseMemory():
                    assert not dry
                    assert (action.guard, action.target) in killed  # only after a SIGKILL to that target
                case RunHook():
                    assert not dry
                case Record():
                    pass
        # Rate limit: never more than max_kills_per_minute victims in any window of 60 s (counted
        # as decision.py does, t - u < window: the same float arithmetic, no edge disagreement).
        limit = self.plan.escalation.max_kills_per_minute
        for t in self.chosen_at:
            assert sum(1 for u in self.chosen_at if 0 <= t - u < RATE_WINDOW_S) <= limit
        if dry:
            assert all(not gs.stuck for gs in after.guards)


_HOLDING = (Phase.TERM_SENT, Phase.KILL_SENT, Phase.AUDIT_HOLD)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans(), data=st.data(), n_steps=st.integers(min_value=1, max_value=40))
def test_invariants_hold_over_random_runs(plan: Plan, data: st.DataObject, n_steps: int) -> None:
    checker = Checker(plan)
    for _ in range(n_steps):
        checker.run_step(data)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), max_kills=st.integers(min_value=1, max_value=3))
def test_a_run_that_always_kills_stays_under_the_rate_limit(data: st.DataObject, max_kills: int) -> None:
    # Every victim dies at once and memory stays below the term level (above the kill level,
    # where the limit does not hold back): the limit is the only brake.
    plan = Plan(
        source="prop.toml",
        daemon=DaemonPlan(),
        escalation=EscalationPlan(term_timeout_s=1.0, kill_timeout_s=0.5, max_kills_per_minute=max_kills),
        guards=(guard_plan("g0", VictimKind.PROCESS, None, 0.0), guard_plan("g1", VictimKind.PROCESS, None, 0.0)),
    )
    state = initial_state(plan)
    now = 0.0
    chosen: list[float] = []
    ranking = {g.name: make_ranking(g.name, *POOL) for g in plan.guards}
    for _ in range(60):
        now += data.draw(st.sampled_from((0.5, 1.0, 4.0, 10.0)))
        obs = Observation(
            now=now,
            guards=tuple(
                GuardReading(
                    guard=g.name,
                    memory=make_memory(GiB),
                )
                for g in plan.guards
            ),
            alive=frozenset(),
        )
        state, actions = step(state, obs, plan, ranking)
        chosen += [now for a in actions if isinstance(a, Record) and a.event == "victim_chosen"]
    assert chosen  # the run did act
    for t in chosen:
        assert sum(1 for u in chosen if 0 <= t - u < RATE_WINDOW_S) <= max_kills


# --- a world where processes appear, grow and exit ----------------------------------------------


def _proc_candidate(pid: int, pages: int) -> Candidate:
    return world_candidate(pid, pages, starttime_ticks=10_000 + pid, name=f"w{pid}", cgroup="/app0")


KILL_LOW = GiB // 2  # below the kill level (5% of 16 GiB)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_steps=st.integers(min_value=2, max_value=40), victim=st.sampled_from(VictimKind))
def test_below_the_kill_level_with_a_candidate_a_signal_is_in_flight_within_one_poll(
    data: st.DataObject, n_steps: int, victim: VictimKind
) -> None:
    # Processes are born, grow and exit; victims exit on their signal or not; a victim may
    # leave the scope; the ranking is the living world as the warm ranking hands it at a
    # crossing. Whenever two polls in a row are below the kill level with a candidate the
    # core may choose, one of them has this guard's signal in flight (or sends one).
    plan = Plan(
        source="world.toml",
        daemon=DaemonPlan(poll_min_s=0.02, poll_max_s=1.0),
        escalation=EscalationPlan(term_timeout_s=1.0, kill_timeout_s=0.5, max_kills_per_minute=10_000),
        guards=(guard_plan("g", victim, None, 0.0),),
    )
    state = initial_state(plan)
    world: dict[int, int] = {}  # pid -> pages
    next_pid = 200
    now = 0.0
    previous_uncovered = False
    for _ in range(n_steps):
        now += data.draw(st.sampled_from((0.02, 0.1, 0.3, 0.6, 1.2)))
        for _born in range(data.draw(st.integers(min_value=0, max_value=2))):
            world[next_pid] = data.draw(st.integers(min_value=1, max_value=5000))
            next_pid += 1
        for pid in list(world):
            world[pid] += data.draw(st.sampled_from((0, 0, 100, 2000)))
            if data.draw(st.integers(min_value=0, max_value=9)) == 0:
                del world[pid]  # exited on its own
        in_flight = state.in_flight()
        for key in in_flight:  # a signalled victim exits, or not
            if key.pid in world and data.draw(st.booleans()):
                del world[key.pid]
        ineligible = frozenset(
            k for k in in_flight if k.pid in world and data.draw(st.integers(min_value=0, max_value=5)) == 0
        )
        alive = frozenset(k for k in in_flight if k.pid in world)
        ranked = sorted((_proc_candidate(pid, pages) for pid, pages in world.items()), key=lambda c: -c.badness.points)
        available = data.draw(st.sampled_from((8 * GiB, GiB, KILL_LOW, KILL_LOW)))
        obs = Observation(
            now=now,
            guards=(
                GuardReading(
                    guard="g",
                    memory=make_memory(available),
                ),
            ),
            alive=alive,
            ineligible=ineligible,
        )
        before = state
        state, actions = step(state, obs, plan, {"g": make_ranking("g", *ranked)})
        gs = state.guard("g")
        unusable = before.guard("g").stuck | ineligible | before.guard("g").signalled
        choosable = any(c.key not in unusable for c in ranked)
        signalled = any(isinstance(a, SendSignal | KillCgroup) for a in actions)
        covered = signalled or (gs.phase in (Phase.TERM_SENT, Phase.KILL_SENT) and gs.victim is not None)
        uncovered = available < TOTAL // 20 and choosable and not covered
        event("uncovered poll" if uncovered else "covered or no need")
        assert not (uncovered and previous_uncovered), (before.guard("g"), gs, actions)
        previous_uncovered = uncovered
