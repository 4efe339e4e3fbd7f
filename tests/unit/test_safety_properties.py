"""Safety invariants of victim selection, property-tested through scoring.rank and decision.step together.

Hypothesis generates process tables (init, uoomd itself and its parent, kernel threads,
zombies, processes at oom_score_adj -1000, processes a rule protects, ordinary ones, all of
them possibly the biggest on the machine), guards scoped to the system or to a set of
members, and runs of readings in which processes come and go and victims die or do not.
Each step ranks the current table with the real :func:`uoomd.scoring.rank` and hands the
rankings to the real :func:`uoomd.decision.step`; every action it returns is checked
against the table it was chosen from:

- never PID 1, never uoomd (``snapshot.self_pid``) or its parent, never a kernel thread;
- never a process a ``protect`` rule matches, never one at oom_score_adj -1000;
- never a process outside the guard's scope (its ``members``);
- never more than one victim in flight per guard, never one process for two guards;
- never more than ``max_kills_per_minute`` victims in any 60 s.

(decision alone is property-tested in test_decision_properties.py; here the rankings are
not hand-made but come from scoring, so an exclusion scoring forgot would be caught.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.builders import make_guard, make_memory, make_process, make_rule
from uoomd import kernel
from uoomd.actions import KillCgroup, Record, ReleaseMemory, SendSignal
from uoomd.decision import (
    CHOOSERS,
    RATE_WINDOW_S,
    Phase,
    State,
    initial_state,
    levels,
    step,
)
from uoomd.plan import Amount, DaemonPlan, EscalationPlan, GuardPlan, Plan, Scope, ScopeKind, VictimKind
from uoomd.readings import GuardReading, Observation, Pid, ProcessInfo, ProcessKey, Snapshot
from uoomd.scoring import Ranking, rank

pytestmark = pytest.mark.unit

PAGE = 4096
GIB = 1 << 30
TOTAL = 16 * GIB
SELF_PID = 4242
PARENT_PID = 4241
PROTECTED_NAME = "keepme"  # matched by the protect rule below, by name
LEVELS = (12 * GIB, 3 * GIB, GIB, GIB // 4)  # plenty, under the PSI gate, under term, under kill
DTS = (0.02, 0.5, 1.0, 3.0, 7.0, 30.0)


# --- the process table --------------------------------------------------------------------


class Kind:
    ORDINARY = "ordinary"
    KTHREAD = "kthread"
    ZOMBIE = "zombie"
    ADJ_MIN = "adj_min"
    PROTECTED = "protected"


@dataclass(frozen=True)
class Spec:
    kind: str
    rss_mib: int
    adj: int
    name: str


FORBIDDEN_KINDS = (Kind.KTHREAD, Kind.ADJ_MIN, Kind.PROTECTED)

specs = st.builds(
    Spec,
    kind=st.sampled_from((Kind.ORDINARY, Kind.ORDINARY, Kind.KTHREAD, Kind.ZOMBIE, Kind.ADJ_MIN, Kind.PROTECTED)),
    rss_mib=st.integers(min_value=0, max_value=8192),
    adj=st.integers(min_value=-999, max_value=1000),
    # Names that look like the protected one, or like uoomd itself: only the rule decides.
    name=st.sampled_from(("app", "uoomd", "systemd", "init", "keepme ", "xkeepme", "kthreadd", "sshd")),
)


def build(pid: int, spec: Spec, starttime: int) -> ProcessInfo:
    rss = spec.rss_mib << 20
    match spec.kind:
        case Kind.KTHREAD:
            # Hostile on purpose: a "kernel thread" with a big mm and the top adj. Only the flag counts.
            return make_process(pid, name=spec.name, kthread=True, rss_anon_bytes=rss, oom_score_adj=1000)
        case Kind.ZOMBIE:
            return make_process(pid, name=spec.name, state="Z", has_mm=False, oom_score_adj=spec.adj)
        case Kind.ADJ_MIN:
            return make_process(pid, name=spec.name, rss_anon_bytes=rss, oom_score_adj=kernel.OOM_SCORE_ADJ_MIN)
        case Kind.PROTECTED:
            return make_process(pid, name=PROTECTED_NAME, rss_anon_bytes=rss, oom_score_adj=spec.adj)
        case _:
            return make_process(
                pid, name=spec.name, rss_anon_bytes=rss, oom_score_adj=spec.adj, starttime_ticks=starttime
            )


def fixed_processes() -> list[ProcessInfo]:
    """init, uoomd and its parent: each the biggest process there is, at the top adj."""
    huge = 64 * GIB
    return [
        make_process(1, name="systemd", rss_anon_bytes=huge, oom_score_adj=1000, ppid=Pid(0)),
        make_process(PARENT_PID, name="bash", rss_anon_bytes=huge, oom_score_adj=1000),
        make_process(SELF_PID, name="uoomd", rss_anon_bytes=huge, oom_score_adj=1000, ppid=Pid(PARENT_PID)),
    ]


def with_cgroup(process: ProcessInfo, pid: int) -> ProcessInfo:
    # Distinct cgroups per process, so a cgroup victim kind has a path to name.
    return replace(process, cgroup=f"/app{pid}.scope")


# --- the plan -----------------------------------------------------------------------------


def guard(name: str, *, cgroup: bool, victim: VictimKind) -> GuardPlan:
    scope = (
        Scope(kind=ScopeKind.CGROUP, cgroup_path=f"/sys/fs/cgroup/{name}") if cgroup else Scope(kind=ScopeKind.SYSTEM)
    )
    return make_guard(
        name,
        scope=scope,
        victim=victim,
        mem_available_term=Amount(fraction=0.10),
        mem_available_kill=Amount(fraction=0.05),
    )


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    n = draw(st.integers(min_value=1, max_value=2))
    guards = tuple(
        guard(f"g{i}", cgroup=draw(st.booleans()), victim=draw(st.sampled_from(VictimKind))) for i in range(n)
    )
    rules = (
        make_rule(0, protect=True, name=f"^{PROTECTED_NAME}$"),
        # Adjustments may push anything anywhere, but never past a protection or adj -1000.
        make_rule(1, adjust=draw(st.integers(min_value=-1000, max_value=1000)), name="keep|uoomd|init"),
    )
    return Plan(
        source="safety.toml",
        daemon=DaemonPlan(dry_run=draw(st.booleans())),
        escalation=EscalationPlan(
            term_timeout_s=draw(st.sampled_from((1.0, 5.0))),
            kill_timeout_s=draw(st.sampled_from((0.5, 3.0))),
            max_kills_per_minute=draw(st.integers(min_value=1, max_value=4)),
        ),
        guards=guards,
        rules=rules,
    )


# --- the run ------------------------------------------------------------------------------


@dataclass
class World:
    plan: Plan
    table: dict[int, ProcessInfo]
    members: dict[str, frozenset[Pid] | None]
    state: State
    now: float = 0.0
    next_pid: int = 10_000
    chosen_at: list[float] = field(default_factory=list)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            processes=tuple(sorted(self.table.values(), key=lambda p: p.pid)),
            taken_at=self.now,
            page_size=PAGE,
            total_ram_bytes=TOTAL,
            total_swap_bytes=0,
            self_pid=Pid(SELF_PID),
            details=frozenset({"cgroup"}),  # every generated process carries its cgroup
        )


def forbidden_reason(process: ProcessInfo, guard_name: str, world: World) -> str | None:
    """Why this process must never be acted on for this guard, straight from the invariants."""
    if process.pid == 1:
        return "pid 1"
    if process.pid == SELF_PID:
        return "uoomd itself"
    if process.pid == PARENT_PID:
        return "uoomd's parent"
    if process.kthread:
        return "kernel thread"
    if not process.has_mm:
        return "no mm (zombie)"
    if re.search(f"^{PROTECTED_NAME}$", process.name):
        return "protected by rule"
    if process.oom_score_adj == kernel.OOM_SCORE_ADJ_MIN:
        return "oom_score_adj -1000"
    members = world.members[guard_name]
    if members is not None and process.pid not in members:
        return "outside the guard's scope"
    return None


def check_target(world: World, snapshot: Snapshot, guard_name: str, key: ProcessKey) -> None:
    by_key = {p.key: p for p in snapshot.processes}
    process = by_key.get(key)
    if process is None:
        return  # an escalation of an earlier victim that has since left the table: checked when chosen
    reason = forbidden_reason(process, guard_name, world)
    assert reason is None, f"guard {guard_name} acted on pid {process.pid} ({reason})"


def run_step(world: World, data: st.DataObject) -> None:
    plan = world.plan
    world.now += data.draw(st.sampled_from(DTS), label="dt")
    # Processes come and go.
    for pid in data.draw(st.lists(st.sampled_from(sorted(world.table)), max_size=2), label="exits"):
        if pid not in (1, SELF_PID, PARENT_PID):
            world.table.pop(pid, None)
    for spec in data.draw(st.lists(specs, max_size=2), label="forks"):
        pid = world.next_pid
        world.next_pid += 1
        world.table[pid] = with_cgroup(build(pid, spec, starttime=int(world.now * 100) + pid), pid)
        for g in plan.guards:
            members = world.members[g.name]
            if members is not None and data.draw(st.booleans(), label="joins"):
                world.members[g.name] = members | {Pid(pid)}
    snapshot = world.snapshot()
    rankings: dict[str, Ranking] = {
        g.name: rank(snapshot, plan, g, totalpages=TOTAL // PAGE, members=world.members[g.name]) for g in plan.guards
    }
    present = {p.key for p in snapshot.processes}
    # A victim in flight lives on while it is in the table, unless the draw says it died.
    alive = frozenset(
        k for k in world.state.in_flight() if k in present and data.draw(st.integers(0, 3), label="lives") > 0
    )
    readings = tuple(
        GuardReading(
            guard=g.name,
            memory=make_memory(data.draw(st.sampled_from(LEVELS), label="available"), total_bytes=TOTAL),
        )
        for g in plan.guards
    )
    obs = Observation(now=world.now, guards=readings, alive=alive, snapshot=snapshot)
    before = world.state
    world.state, actions = step(before, obs, plan, rankings)
    for action in actions:
        match action:
            case Record(event="victim_chosen"):
                name = str(action.get("guard"))
                assert before.guard(name).phase in CHOOSERS, "a second victim while one is in flight"
                victim = world.state.guard(name).victim
                assert victim is not None
                check_target(world, snapshot, name, victim.key)
                assert victim.key in present, "chosen from the table of this step"
                reading = next(r for r in readings if r.guard == name)
                at_kill_level = levels(reading.memory, plan.guard(name)).kill_crossed
                if dict(action.fields).get("over_rate_limit"):
                    assert at_kill_level, "over the rate limit only below the kill level"
                else:
                    world.chosen_at.append(world.now)
            case SendSignal() | ReleaseMemory():
                check_target(world, snapshot, action.guard, action.target)
            case KillCgroup():
                assert action.path.strip("/"), "never the root cgroup"
                victim = world.state.guard(action.guard).victim
                assert victim is not None
                assert action.path == victim.process.cgroup
            case _:
                pass
    flying = [gs.victim.key for gs in world.state.guards if gs.phase in HOLDING and gs.victim is not None]
    assert len(flying) == len(set(flying)), "one process in flight for two guards"
    limit = plan.escalation.max_kills_per_minute
    for t in world.chosen_at:
        assert sum(1 for u in world.chosen_at if 0 <= t - u < RATE_WINDOW_S) <= limit


HOLDING = (Phase.TERM_SENT, Phase.KILL_SENT, Phase.AUDIT_HOLD)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    plan = draw(plans())
    table: dict[int, ProcessInfo] = {p.pid: with_cgroup(p, p.pid) for p in fixed_processes()}
    for i, spec in enumerate(draw(st.lists(specs, min_size=1, max_size=12), label="table")):
        pid = 100 + i
        table[pid] = with_cgroup(build(pid, spec, starttime=pid), pid)
    members: dict[str, frozenset[Pid] | None] = {}
    for g in plan.guards:
        if g.scope.kind is ScopeKind.SYSTEM:
            members[g.name] = None
        else:
            # The scope may even list init, uoomd or its parent: scope alone never makes them victims.
            chosen = draw(st.sets(st.sampled_from(sorted(table))), label=f"members of {g.name}")
            members[g.name] = frozenset(Pid(p) for p in chosen)
    return World(plan=plan, table=table, members=members, state=initial_state(plan))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), data=st.data(), n_steps=st.integers(min_value=1, max_value=30))
def test_rank_and_step_never_act_on_a_forbidden_process(world: World, data: st.DataObject, n_steps: int) -> None:
    for _ in range(n_steps):
        run_step(world, data)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_a_table_of_only_forbidden_processes_yields_no_victim_under_critical_memory(data: st.DataObject) -> None:
    # Memory is below the kill level at every step and everything on the machine is big,
    # but nothing is eligible: the guard logs no_candidate and sends nothing, ever.
    specs_drawn = data.draw(st.lists(specs.filter(lambda s: s.kind in (*FORBIDDEN_KINDS, Kind.ZOMBIE)), max_size=10))
    table: dict[int, ProcessInfo] = {p.pid: p for p in fixed_processes()}
    for i, spec in enumerate(specs_drawn):
        table[100 + i] = build(100 + i, spec, starttime=100 + i)
    plan = Plan(
        source="safety.toml",
        daemon=DaemonPlan(),
        escalation=EscalationPlan(),
        guards=(guard("g0", cgroup=False, victim=VictimKind.PROCESS),),
        rules=(make_rule(0, protect=True, name=f"^{PROTECTED_NAME}$"),),
    )
    world = World(plan=plan, table=table, members={"g0": None}, state=initial_state(plan))
    snapshot = world.snapshot()
    ranking = rank(snapshot, plan, plan.guards[0], totalpages=TOTAL // PAGE)
    assert ranking.candidates == ()
    state = world.state
    for i in range(5):
        obs = Observation(
            now=float(i),
            guards=(
                GuardReading(
                    guard="g0",
                    memory=make_memory(GIB // 8, total_bytes=TOTAL),
                ),
            ),
            snapshot=snapshot,
        )
        state, actions = step(state, obs, plan, {"g0": ranking})
        assert not [a for a in actions if isinstance(a, SendSignal | KillCgroup | ReleaseMemory)]
    assert state.guard("g0").phase is Phase.IDLE
