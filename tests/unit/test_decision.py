"""The escalation state machine: one test per table row, then scripted scenarios on synthetic readings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import pytest

from tests.builders import (
    make_candidate,
    make_guard,
    make_key,
    make_memory,
    make_plan,
    make_process,
    make_psi_trigger,
    make_ranking,
    make_snapshot,
)
from uoomd.actions import KillCgroup, Notify, Output, Record, ReleaseMemory, RunHook, SendSignal
from uoomd.decision import (
    DRY_RUN_TABLE,
    SIGKILL,
    SIGTERM,
    TABLE,
    Event,
    GuardState,
    Need,
    Phase,
    PsiTrack,
    Response,
    State,
    Transition,
    describe_psi,
    initial_state,
    levels,
    needs,
    step,
    update_psi,
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
    PsiTriggerPlan,
    VictimKind,
)
from uoomd.readings import GuardReading, MemoryReading, Observation, ProcessInfo, ProcessKey
from uoomd.scoring import Candidate, Ranking
from uoomd.trend import Sample, Trend

pytestmark = pytest.mark.unit

GiB = 1 << 30
MiB = 1 << 20
TOTAL = 16 * GiB
HIGH = 8 * GiB  # well above every level
LOW = 1 * GiB  # below term (10% = 1.6 GiB), above kill (5% = 0.8 GiB)
CRIT = GiB // 2  # below kill
REFAULT_GATE = 64 * MiB  # per second, where a test's guard has a refault gate
GATED = 2 * GiB  # above term, below the PSI gate (20% = 3.2 GiB)
TERM_TIMEOUT = 5.0
KILL_TIMEOUT = 3.0


# --- builders ---------------------------------------------------------------------------


def proc(pid: int, *, name: str = "", pgid: int | None = None, cgroup: str | None = None) -> ProcessInfo:
    """The scenarios' process: pid x 100 pages of anon memory, started at tick 10_000 + pid."""
    return make_process(
        pid,
        name=name or f"hog{pid}",
        pgid=pid if pgid is None else pgid,
        starttime_ticks=10_000 + pid,
        state="R",
        rss_anon_bytes=pid * 4096 * 100,
        rss_file_bytes=4096,
        pgtables_bytes=8192,
        mm_rss_pages=None,
        cgroup=cgroup,
    )


def cand(pid: int, points: int = 0, *, rules: tuple[str, ...] = (), **kw: object) -> Candidate:
    """A candidate of ``points`` rss pages (default pid x 100), plus 3 swap, 2 page-table and
    200 adj points (adj 50 of 4,000,000 totalpages)."""
    rss = points or pid * 100
    return make_candidate(
        proc(pid, **kw),  # type: ignore[arg-type]
        rss_pages=rss,
        swap_pages=3,
        pgtables_pages=2,
        adj=50,
        adj_points=200,
        totalpages=4_000_000,
        kernel_points=rss + 5,
        oom_score=(rss + 205) // 4000,
        rules=rules,
    )


def scenario_plan(
    *guards: GuardPlan,
    dry_run: bool = False,
    max_kills: int = 10,
    hook: tuple[str, ...] = (),
    notify_desktop: bool = False,
) -> Plan:
    """The scenarios' plan: these guards (one system guard by default), poll 20 ms-1 s, SIGKILL
    after TERM_TIMEOUT, given up on after KILL_TIMEOUT."""
    return make_plan(
        guards=guards or (make_guard(),),
        daemon=DaemonPlan(dry_run=dry_run, poll_min_s=0.02, poll_max_s=1.0, notify_desktop=notify_desktop),
        escalation=EscalationPlan(
            term_timeout_s=TERM_TIMEOUT, kill_timeout_s=KILL_TIMEOUT, max_kills_per_minute=max_kills
        ),
        hooks=HooksPlan(after_kill=hook),
        source="test.toml",
    )


@dataclass
class Driver:
    """Feeds scripted polls to step(); by default every in-flight victim stays alive."""

    plan: Plan
    rankings: dict[str, Ranking]
    state: State = field(init=False)
    log: list[Output] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = initial_state(self.plan)

    def poll(
        self,
        now: float,
        available: int | Mapping[str, MemoryReading] = HIGH,
        *,
        alive: Iterable[ProcessKey] | None = None,
        fired: tuple[int, ...] = (),
        snapshot: tuple[ProcessInfo, ...] | None = None,
        ineligible: Iterable[ProcessKey] = (),
        refault_rate: float | None = None,
        refault_above_since: float | None = None,
    ) -> list[Output]:
        readings = (
            {g.name: make_memory(available) for g in self.plan.guards}
            if isinstance(available, int)
            else dict(available)
        )
        obs = Observation(
            now=now,
            guards=tuple(
                GuardReading(
                    guard=n,
                    memory=m,
                    psi_fired=fired,
                    refault_rate=refault_rate,
                    refault_above_since=refault_above_since,
                )
                for n, m in readings.items()
            ),
            alive=self.state.in_flight() if alive is None else frozenset(alive),
            snapshot=None
            if snapshot is None
            else make_snapshot(*snapshot, taken_at=now, total_ram_bytes=TOTAL, self_pid=1),
            ineligible=frozenset(ineligible),
        )
        self.state, actions = step(self.state, obs, self.plan, self.rankings)
        self.log.extend(actions)
        return actions

    def phase(self, guard: str = "system") -> Phase:
        return self.state.guard(guard).phase


def driver(*guards: GuardPlan, cands: tuple[Candidate, ...] | None = None, **plan_kw: object) -> Driver:
    plan = scenario_plan(*guards, **plan_kw)  # type: ignore[arg-type]
    pool = cands if cands is not None else (cand(101, 5000), cand(102, 3000), cand(103, 1000))
    return Driver(plan=plan, rankings={g.name: make_ranking(g.name, *pool) for g in plan.guards})


def records(actions: Iterable[Output], event: str | None = None) -> list[Record]:
    return [a for a in actions if isinstance(a, Record) and (event is None or a.event == event)]


def signals(actions: Iterable[Output]) -> list[SendSignal]:
    return [a for a in actions if isinstance(a, SendSignal)]


def releases(actions: Iterable[Output]) -> list[ReleaseMemory]:
    return [a for a in actions if isinstance(a, ReleaseMemory)]


def key(pid: int) -> ProcessKey:
    return make_key(pid, 10_000 + pid)


# --- one test per table row ---------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    now: float
    available: int
    alive: bool = True  # the in-flight victim is alive
    fired: tuple[int, ...] = ()
    swap_free: int | None = None  # with swap: TOTAL of it, this much free
    left: bool = False  # the in-flight victim is alive but no longer eligible
    fell_from: int | None = None  # mem_available_eta: the room (available + swap free) 0.3 s before
    refault_rate: float | None = None  # with a refault gate (REFAULT_GATE): refaults read, this fast

    def readings(self) -> int | dict[str, MemoryReading]:
        if self.refault_rate is not None:
            return {"system": make_memory(self.available, refault_bytes=1 << 30)}
        if self.swap_free is None:
            return self.available
        return {"system": make_memory(self.available, swap_total_bytes=TOTAL, swap_free_bytes=self.swap_free)}


_SCENES: dict[Event, Scene] = {
    Event.TERM_LEVEL: Scene(now=1.0, available=LOW),
    Event.KILL_LEVEL: Scene(now=1.0, available=CRIT),
    Event.PSI_TERM: Scene(now=1.0, available=GATED, fired=(0,)),
    Event.PSI_KILL: Scene(now=1.0, available=GATED, fired=(0,)),
    Event.PSI_WARN: Scene(now=1.0, available=GATED, fired=(0,)),
    Event.WARN_LEVEL: Scene(now=1.0, available=GATED),  # above term (10%), below the rows' warn level (50%)
    # Memory short and the trigger sustained, but pages come back slower than the gate.
    Event.PSI_HELD: Scene(now=1.0, available=GATED, fired=(0,), refault_rate=REFAULT_GATE / 10),
    Event.VICTIM_EXITED: Scene(now=1.0, available=LOW, alive=False),
    Event.TERM_TIMEOUT: Scene(now=TERM_TIMEOUT, available=LOW),
    Event.KILL_TIMEOUT: Scene(now=KILL_TIMEOUT, available=LOW),
    Event.MEMORY_BACK: Scene(now=1.0, available=HIGH),
    # RAM short, swap not: neither a level crossed nor memory back, so only the timeout ends it.
    Event.RECOVERY_TIMEOUT: Scene(now=KILL_TIMEOUT, available=LOW, swap_free=HIGH),
    Event.HOLD_EXPIRED: Scene(now=TERM_TIMEOUT, available=LOW),
    Event.VICTIM_LEFT: Scene(now=1.0, available=LOW, left=True),
    # Above the term level, falling 1 GiB/s: the kill level (0.8 GiB) is 1.2 s away, within 3 s.
    Event.ETA_TERM: Scene(now=1.0, available=GATED, fell_from=GATED + 300 * MiB),
    Event.ETA_KILL: Scene(now=1.0, available=GATED, fell_from=GATED + 300 * MiB),
}
# In recovering, memory above the term level is memory_back, which wins: a PSI term trigger
# acts there only with RAM short while swap is not (neither crossed nor back).
_SCENES_IN: dict[tuple[Phase, Event], Scene] = {
    (Phase.RECOVERING, Event.PSI_TERM): Scene(now=1.0, available=LOW, fired=(0,), swap_free=HIGH),
    (Phase.RECOVERING, Event.PSI_KILL): Scene(now=1.0, available=LOW, fired=(0,)),
    # RAM short and swap not (neither a level nor memory back), both falling 3 GiB/s together.
    (Phase.RECOVERING, Event.ETA_TERM): Scene(now=1.0, available=LOW, swap_free=HIGH, fell_from=LOW + HIGH + 900 * MiB),
    (Phase.RECOVERING, Event.ETA_KILL): Scene(now=1.0, available=LOW, swap_free=HIGH, fell_from=LOW + HIGH + 900 * MiB),
}
_ETA_ACTION = {Event.ETA_TERM: EtaAction.TERM, Event.ETA_KILL: EtaAction.KILL}

_PSI_ACTION = {
    Event.PSI_TERM: PsiAction.TERM,
    Event.PSI_KILL: PsiAction.KILL,
    Event.PSI_WARN: PsiAction.WARN,
    Event.PSI_HELD: PsiAction.TERM,
}

_ROWS = [
    pytest.param(dry, phase, event, tr, id=f"{'dry' if dry else 'live'}:{phase}+{event}->{tr.next}:{tr.response}")
    for dry, table in ((False, TABLE), (True, DRY_RUN_TABLE))
    for (phase, event), tr in table.items()
]


@pytest.mark.parametrize(("dry_run", "phase", "event", "transition"), _ROWS)
def test_table_row(dry_run: bool, phase: Phase, event: Event, transition: Transition) -> None:
    psi = (make_psi_trigger(_PSI_ACTION[event]),) if event in _PSI_ACTION else ()
    eta = None
    if event in _ETA_ACTION:
        eta = EtaPlan(eta_s=3.0, min_fall=Amount(bytes=64 * MiB), sustain_s=0.5, action=_ETA_ACTION[event])
    scene = _SCENES_IN.get((phase, event), _SCENES[event])
    gate = Amount(bytes=REFAULT_GATE if scene.refault_rate is not None else 0)
    warn = Amount(fraction=0.5) if event is Event.WARN_LEVEL else None
    d = driver(make_guard(psi=psi, eta=eta, psi_refault_gate=gate, mem_available_warn=warn), dry_run=dry_run)
    victim = d.rankings["system"].candidates[0]
    held = phase is not Phase.IDLE
    # An eta's projection has said "within" since 0.6 s before; its lookback's base is 0.3 s before.
    fell = Trend()
    if scene.fell_from is not None:
        fell = Trend(samples=(Sample(at=scene.now - 0.3, room_bytes=scene.fell_from),), since=scene.now - 0.6)
    d.state = State(
        guards=(
            GuardState(
                guard="system",
                phase=phase,
                victim=victim if held else None,
                psi=(PsiTrack(),) * len(psi),
                trend=fell,
            ),
        )
    )
    actions = d.poll(
        scene.now,
        scene.readings(),
        alive=[victim.key] if scene.alive else [],
        fired=scene.fired,
        ineligible=[victim.key] if scene.left else [],
        refault_rate=scene.refault_rate,
    )
    if phase is Phase.RECOVERING and transition.response in (Response.TERM, Response.KILL):
        # The previous victim is gone: the next one is chosen, never the one that exited.
        victim = d.rankings["system"].candidates[1]

    gs = d.state.guard("system")
    assert gs.phase is transition.next
    sent = signals(actions)
    match transition.response:
        case Response.TERM | Response.WOULD_TERM:
            assert [(s.target, s.signal, s.dry_run) for s in sent] == [(victim.key, SIGTERM, dry_run)]
            assert releases(actions) == []
        case Response.KILL | Response.WOULD_KILL:
            assert [(s.target, s.signal, s.dry_run) for s in sent] == [(victim.key, SIGKILL, dry_run)]
            assert releases(actions) == ([] if dry_run else [ReleaseMemory(guard="system", target=victim.key)])
        case Response.WARN:
            assert sent == []
            assert [r.event for r in records(actions)] == [str(event)]
        case Response.MARK_STUCK:
            assert sent == []
            assert gs.stuck == {victim.key}
            assert [r.event for r in records(actions)] == ["victim_stuck"]
        case Response.NONE:
            assert sent == []
            assert len(records(actions)) == 1
    decisions = [r for r in records(actions) if r.event in ("victim_chosen", "victim_escalated", "psi_warn")]
    if decisions:
        (decision,) = decisions
        expected = transition.response
        if dry_run and expected is Response.KILL:
            expected = Response.WOULD_KILL
        assert decision.get("action") == expected


def test_every_phase_has_a_way_back_to_idle() -> None:
    for table in (TABLE, DRY_RUN_TABLE):
        reach = {Phase.IDLE}
        changed = True
        while changed:
            before = set(reach)
            reach |= {phase for (phase, _), tr in table.items() if tr.next in reach}
            changed = reach != before
        assert reach == set(Phase)


def test_no_row_sends_a_second_sigterm() -> None:
    # earlyoom#373: once SIGTERM went out, the only signal left is SIGKILL. A SIGTERM is
    # only ever sent from a phase with no victim in flight (a new victim).
    for table in (TABLE, DRY_RUN_TABLE):
        for (phase, _), tr in table.items():
            if tr.response in (Response.TERM, Response.WOULD_TERM):
                assert phase in (Phase.IDLE, Phase.RECOVERING)


# --- escalation timing ---------------------------------------------------------------------


def test_term_timeout_escalates_to_kill_exactly_then_and_not_before() -> None:
    d = driver()
    first = d.poll(0.0, LOW)
    assert [(s.target, s.signal) for s in signals(first)] == [(key(101), SIGTERM)]
    assert d.phase() is Phase.TERM_SENT
    for t in (0.5, 1.0, 2.5, 4.0, 4.99):
        assert d.poll(t, LOW) == []
    assert d.phase() is Phase.TERM_SENT
    kill = d.poll(5.0, LOW)
    assert [(s.target, s.signal) for s in signals(kill)] == [(key(101), SIGKILL)]
    assert releases(kill) == [ReleaseMemory(guard="system", target=key(101))]
    (rec,) = records(kill)
    assert (rec.event, rec.get("action"), rec.get("trigger"), rec.get("after_s")) == (
        "victim_escalated",
        "kill",
        "term_timeout",
        5.0,
    )
    assert d.phase() is Phase.KILL_SENT
    sigterms = [s for s in signals(d.log) if s.signal == SIGTERM]
    assert len(sigterms) == 1


def test_kill_level_during_term_sent_escalates_immediately() -> None:
    d = driver()
    d.poll(0.0, LOW)
    actions = d.poll(0.1, CRIT)
    assert [(s.target, s.signal) for s in signals(actions)] == [(key(101), SIGKILL)]
    assert releases(actions) == [ReleaseMemory(guard="system", target=key(101))]
    assert records(actions)[0].get("trigger") == "mem_available_kill"


def test_kill_level_from_idle_sends_sigkill_and_release_at_once() -> None:
    d = driver()
    actions = d.poll(0.0, CRIT)
    assert [type(a).__name__ for a in actions] == ["Record", "SendSignal", "ReleaseMemory"]
    assert signals(actions)[0].signal == SIGKILL
    assert records(actions)[0].get("action") == "kill"
    assert d.phase() is Phase.KILL_SENT


def test_a_desktop_notice_follows_the_first_signal_of_a_chosen_victim_only() -> None:
    d = driver(notify_desktop=True)
    chosen = d.poll(0.0, CRIT)
    assert [type(a).__name__ for a in chosen] == ["Record", "SendSignal", "ReleaseMemory", "Notify"]
    notice = chosen[3]
    assert isinstance(notice, Notify)
    assert notice.after is chosen[1], "the notice names the signal whose delivery it reports"
    assert notice.record is chosen[0]
    d = driver(notify_desktop=True)
    d.poll(0.0, LOW)
    escalated = d.poll(TERM_TIMEOUT, LOW)
    assert signals(escalated)[0].signal == SIGKILL
    assert not [a for a in escalated if isinstance(a, Notify)], "one notice per victim, not per signal"


def test_a_dry_run_sends_no_desktop_notice() -> None:
    d = driver(notify_desktop=True, dry_run=True)
    assert not [a for a in d.poll(0.0, CRIT) if isinstance(a, Notify)]


def test_release_memory_follows_sigkill_to_the_same_target() -> None:
    d = driver()
    actions = d.poll(0.0, CRIT)
    sig_at = next(i for i, a in enumerate(actions) if isinstance(a, SendSignal))
    rel_at = next(i for i, a in enumerate(actions) if isinstance(a, ReleaseMemory))
    assert sig_at < rel_at
    assert releases(actions)[0].target == signals(actions)[0].target


# --- recovery ------------------------------------------------------------------------------


def test_victim_exiting_on_sigterm_recovers_without_a_kill() -> None:
    d = driver()
    d.poll(0.0, LOW)
    exited = d.poll(1.0, LOW, alive=[])
    assert [r.event for r in records(exited)] == ["victim_exited"]
    assert records(exited)[0].get("after_s") == 1.0
    assert d.phase() is Phase.RECOVERING
    back = d.poll(1.5, HIGH)
    assert [r.event for r in records(back)] == ["memory_recovered"]
    assert d.phase() is Phase.IDLE
    assert [(s.target, s.signal) for s in signals(d.log)] == [(key(101), SIGTERM)]


def test_a_crossing_in_recovering_chooses_the_next_victim_at_the_next_poll() -> None:
    # The victim is gone and a reading taken since is still past the term level: a second
    # grower. The one that exited is never chosen again, even by a ranking that still holds it.
    d = driver()
    d.poll(0.0, LOW)
    d.poll(1.0, LOW, alive=[])
    assert d.phase() is Phase.RECOVERING
    again = d.poll(1.01, LOW)
    assert [(s.target, s.signal) for s in signals(again)] == [(key(102), SIGTERM)]
    (chosen,) = records(again, "victim_chosen")
    assert chosen.get("after_victim") is True
    assert d.phase() is Phase.TERM_SENT


def test_a_kill_level_crossing_in_recovering_kills_the_next_victim() -> None:
    d = driver()
    d.poll(0.0, LOW)
    d.poll(1.0, LOW, alive=[])
    again = d.poll(1.01, CRIT)
    assert [(s.target, s.signal) for s in signals(again)] == [(key(102), SIGKILL)]
    assert d.phase() is Phase.KILL_SENT


def test_a_victim_that_left_the_scope_gets_no_sigkill() -> None:
    d = driver()
    d.poll(0.0, LOW)
    left = d.poll(0.5, CRIT, ineligible=[key(101)])
    assert signals(left) == []
    assert [r.event for r in records(left)] == ["victim_left"]
    assert d.phase() is Phase.IDLE
    # Decided afresh: it is never chosen again while it is ineligible.
    d.rankings["system"] = make_ranking("system", cand(101, 5000), cand(102, 3000))
    nxt = d.poll(0.52, CRIT, ineligible=[key(101)])
    assert [(s.target, s.signal) for s in signals(nxt)] == [(key(102), SIGKILL)]


def test_recovery_waits_for_swap_as_well_where_there_is_swap() -> None:
    d = driver()
    swap = 8 * GiB
    d.poll(0.0, {"system": make_memory(LOW, swap_total_bytes=swap, swap_free_bytes=0)})
    d.poll(0.5, {"system": make_memory(LOW, swap_total_bytes=swap, swap_free_bytes=0)}, alive=[])
    assert d.phase() is Phase.RECOVERING
    # swap still under its 10%
    d.poll(1.0, {"system": make_memory(HIGH, swap_total_bytes=swap, swap_free_bytes=GiB // 2)})
    assert d.phase() is Phase.RECOVERING
    d.poll(1.5, {"system": make_memory(HIGH, swap_total_bytes=swap, swap_free_bytes=2 * GiB)})
    assert d.phase() is Phase.IDLE


def test_recovery_timeout_returns_to_idle_and_next_poll_decides_again() -> None:
    d = driver(cands=(cand(101, 5000), cand(102, 3000)))
    # RAM short but swap not: neither a level crossed nor memory back, so recovering waits.
    middle = {"system": make_memory(LOW, swap_total_bytes=TOTAL, swap_free_bytes=HIGH)}
    d.poll(0.0, LOW)
    d.poll(0.5, LOW, alive=[])
    assert d.poll(0.5 + KILL_TIMEOUT - 0.01, middle) == []
    timeout = d.poll(0.5 + KILL_TIMEOUT, middle)
    assert [r.event for r in records(timeout)] == ["recovery_timeout"]
    assert d.phase() is Phase.IDLE
    d.rankings["system"] = make_ranking("system", cand(102, 3000))  # 101 is gone
    again = d.poll(4.0, LOW)
    assert [(s.target, s.signal) for s in signals(again)] == [(key(102), SIGTERM)]


# --- stuck victims -------------------------------------------------------------------------


def test_victim_alive_after_kill_timeout_is_marked_stuck_and_the_next_one_chosen() -> None:
    d = driver()
    d.poll(0.0, CRIT)
    assert d.poll(KILL_TIMEOUT - 0.01, CRIT) == []
    stuck = d.poll(KILL_TIMEOUT, CRIT)
    assert [r.event for r in records(stuck)] == ["victim_stuck"]
    assert records(stuck)[0].get("pid") == 101
    assert d.state.guard("system").stuck == {key(101)}
    assert d.phase() is Phase.IDLE
    nxt = d.poll(KILL_TIMEOUT + 0.1, CRIT)
    assert [(s.target, s.signal) for s in signals(nxt)] == [(key(102), SIGKILL)]
    assert records(nxt)[0].get("runner_up_pid") == 103  # the stuck one is no runner-up either


def test_a_psi_trigger_is_sustained_anew_after_a_victim_is_given_up_as_stuck() -> None:
    # Seen in the VM: a thrash took its SIGKILL but took longer than kill_timeout to exit; a
    # trigger sustained through the thrash then took the next process at once, with RAM free.
    d = driver(make_guard(psi=(make_psi_trigger(PsiAction.TERM, sustain_s=4.0),)))
    t = 0.0
    while not signals(d.poll(t, GATED, fired=(0,))):
        t += 1.0
    assert t == 4.0
    chosen_at = t
    while d.phase() is not Phase.IDLE:  # SIGTERM, SIGKILL, then stuck: the trigger fires all along
        t += 1.0
        d.poll(t, GATED, fired=(0,))
    assert d.state.guard("system").stuck == {key(101)}
    assert t == chosen_at + TERM_TIMEOUT + KILL_TIMEOUT
    given_up = t
    nxt: list[SendSignal] = []
    while not nxt:
        t += 1.0
        nxt = signals(d.poll(t, GATED, fired=(0,)))
    assert [(s.target, s.signal) for s in nxt] == [(key(102), SIGTERM)]
    assert t - given_up > 4.0  # a stall of its own: the trigger's whole sustain after the stuck one


def test_stuck_victim_is_kept_while_it_exists_and_forgotten_once_gone_from_the_snapshot() -> None:
    d = driver()
    d.poll(0.0, CRIT)
    d.poll(KILL_TIMEOUT, CRIT)
    assert d.state.guard("system").stuck == {key(101)}
    d.rankings["system"] = make_ranking("system", cand(102, 3000))  # a ranking alone proves nothing
    d.poll(KILL_TIMEOUT + 0.1, HIGH)
    assert d.state.guard("system").stuck == {key(101)}
    d.poll(KILL_TIMEOUT + 0.2, HIGH, snapshot=(proc(101), proc(102)))
    assert d.state.guard("system").stuck == {key(101)}
    d.poll(KILL_TIMEOUT + 0.3, HIGH, snapshot=(proc(102),))
    assert d.state.guard("system").stuck == frozenset()


def test_a_process_stuck_for_one_guard_is_not_picked_by_another() -> None:
    # It survived SIGKILL for kill_timeout: another guard's SIGTERM and SIGKILL would only lose time.
    a, b = make_guard("a"), make_guard("b")
    d = driver(a, b, cands=(cand(101, 5000), cand(102, 3000)))
    d.poll(0.0, {"a": make_memory(CRIT), "b": make_memory(HIGH)})
    d.poll(KILL_TIMEOUT, {"a": make_memory(CRIT), "b": make_memory(HIGH)})
    assert d.state.guard("a").stuck == {key(101)}
    assert d.state.guard("b").stuck == frozenset()
    actions = d.poll(KILL_TIMEOUT + 0.1, {"a": make_memory(HIGH), "b": make_memory(CRIT)})
    assert [(s.guard, s.target) for s in signals(actions)] == [("b", key(102))]


# --- rate limit ----------------------------------------------------------------------------


def _exit_cycle(d: Driver, t: float) -> None:
    """Victim chosen at t, exits at t+0.1, memory back at t+0.2."""
    d.poll(t, LOW)
    d.poll(t + 0.1, LOW, alive=[])
    d.poll(t + 0.2, HIGH)


def test_rate_limit_holds_victims_per_minute_and_records_once_per_episode() -> None:
    pool = tuple(cand(100 + i, 9000 - i) for i in range(10))
    d = driver(cands=pool, max_kills=2)
    _exit_cycle(d, 0.0)
    d.rankings["system"] = make_ranking("system", *pool[1:])
    _exit_cycle(d, 10.0)
    d.rankings["system"] = make_ranking("system", *pool[2:])
    limited = [d.poll(20.0 + i, LOW) for i in range(10)]
    assert [r.event for r in records(limited[0])] == ["rate_limited"]
    assert records(limited[0])[0].get("victims_last_minute") == 2
    assert all(a == [] for a in limited[1:])  # once per episode, not per poll
    assert d.phase() is Phase.IDLE
    assert d.poll(59.99, LOW) == []
    freed = d.poll(60.0, LOW)  # the first victim (t=0) left the window
    assert [(s.target, s.signal) for s in signals(freed)] == [(key(102), SIGTERM)]


def test_rate_limit_record_repeats_in_a_new_episode() -> None:
    d = driver(max_kills=1)
    _exit_cycle(d, 0.0)
    assert records(d.poll(1.0, LOW), "rate_limited")
    d.poll(2.0, HIGH)  # episode over
    assert records(d.poll(3.0, LOW), "rate_limited")


def test_the_rate_limit_never_holds_back_the_kill_level() -> None:
    # Below the kill level the kernel's OOM killer acts next: holding back there only hands
    # it the choice (seen in the VM: the global OOM killer fired while uoomd was limited).
    pool = tuple(cand(100 + i, 9000 - i) for i in range(10))
    d = driver(cands=pool, max_kills=1)
    _exit_cycle(d, 0.0)
    d.rankings["system"] = make_ranking("system", *pool[1:])
    assert records(d.poll(1.0, LOW), "rate_limited")  # the term level waits
    actions = d.poll(1.1, CRIT)
    assert [(s.target, s.signal) for s in signals(actions)] == [(key(101), SIGKILL)]
    assert records(actions, "victim_chosen")[0].get("over_rate_limit") is True


def test_escalating_the_same_victim_is_not_rate_limited() -> None:
    d = driver(max_kills=1)
    d.poll(0.0, LOW)
    kill = d.poll(TERM_TIMEOUT, LOW)
    assert [s.signal for s in signals(kill)] == [SIGKILL]


# --- one victim at a time ----------------------------------------------------------------


def test_no_second_victim_while_one_is_in_flight() -> None:
    d = driver()
    d.poll(0.0, LOW)
    for t in (0.1, 0.2, 0.3):
        assert signals(d.poll(t, LOW)) == []
    assert {s.target for s in signals(d.log)} == {key(101)}


def test_two_guards_never_pick_the_same_process() -> None:
    d = driver(make_guard("a"), make_guard("b"))
    actions = d.poll(0.0, LOW)
    assert [(s.guard, s.target) for s in signals(actions)] == [("a", key(101)), ("b", key(102))]
    assert records(actions, "victim_chosen")[1].get("runner_up_pid") == 103


def test_second_guard_skips_the_first_guards_victim_in_later_polls() -> None:
    d = driver(make_guard("a"), make_guard("b"))
    d.poll(0.0, {"a": make_memory(LOW), "b": make_memory(HIGH)})
    actions = d.poll(1.0, {"a": make_memory(LOW), "b": make_memory(LOW)})
    assert [(s.guard, s.target) for s in signals(actions)] == [("b", key(102))]


def test_guard_with_only_another_guards_victim_left_has_no_candidate() -> None:
    d = driver(make_guard("a"), make_guard("b"), cands=(cand(101),))
    actions = d.poll(0.0, LOW)
    assert [(s.guard, s.target) for s in signals(actions)] == [("a", key(101))]
    (nc,) = records(actions, "no_candidate")
    assert (nc.get("guard"), nc.get("in_flight_elsewhere"), nc.get("action")) == ("b", 1, "none")


# --- levels, swap ---------------------------------------------------------------------------


def test_without_swap_mem_available_alone_is_enough() -> None:
    # oomd#80: a swapless machine never acted because "swap free" could not fall.
    d = driver()
    actions = d.poll(0.0, {"system": make_memory(LOW, swap_total_bytes=0, swap_free_bytes=0)})
    assert [s.signal for s in signals(actions)] == [SIGTERM]


def test_with_plenty_of_swap_low_memory_alone_does_not_act() -> None:
    d = driver()
    assert d.poll(0.0, {"system": make_memory(LOW, swap_total_bytes=8 * GiB, swap_free_bytes=4 * GiB)}) == []
    actions = d.poll(1.0, {"system": make_memory(LOW, swap_total_bytes=8 * GiB, swap_free_bytes=GiB // 2)})
    assert [s.signal for s in signals(actions)] == [SIGTERM]


def test_levels_at_the_threshold_are_not_crossed() -> None:
    lv = levels(make_memory(TOTAL // 10), make_guard())
    assert lv.term_bytes == TOTAL // 10
    assert not lv.term_crossed
    assert lv.memory_back
    assert levels(make_memory(TOTAL // 10 - 1), make_guard()).term_crossed


# --- PSI -------------------------------------------------------------------------------


def test_psi_trigger_acts_only_after_sustain() -> None:
    d = driver(make_guard(psi=(make_psi_trigger(PsiAction.TERM, sustain_s=4.0),)))
    assert d.poll(0.0, GATED, fired=(0,)) == []
    assert d.poll(1.0, GATED) == []  # no report this poll, still within the 2 s window
    assert d.poll(2.0, GATED, fired=(0,)) == []
    assert d.poll(3.9, GATED) == []
    actions = d.poll(4.0, GATED, fired=(0,))
    assert [s.signal for s in signals(actions)] == [SIGTERM]
    assert records(actions)[0].get("trigger") == "psi[0] full 200000/2000000us sustained 4s"


def test_psi_gap_longer_than_window_restarts_the_sustain_clock() -> None:
    d = driver(make_guard(psi=(make_psi_trigger(PsiAction.TERM, sustain_s=4.0),)))
    d.poll(0.0, GATED, fired=(0,))
    d.poll(2.0, GATED, fired=(0,))
    # Last report at 2.0; window 2 s + one poll_max (1 s) of lateness: inactive after 5.0.
    d.poll(5.5, GATED)
    assert d.poll(6.0, GATED, fired=(0,)) == []
    assert d.poll(8.0, GATED, fired=(0,)) == []
    assert signals(d.poll(10.0, GATED, fired=(0,)))


def test_psi_trigger_above_the_memory_gate_never_acts() -> None:
    # nohang#25: a busy machine with plenty of memory is stalling, not running out.
    d = driver(make_guard(psi=(make_psi_trigger(PsiAction.KILL),)))
    for t in range(0, 20, 2):
        assert d.poll(float(t), HIGH, fired=(0,)) == []
    assert signals(d.poll(20.0, GATED, fired=(0,)))


def test_psi_kill_action_sends_sigkill() -> None:
    d = driver(make_guard(psi=(make_psi_trigger(PsiAction.KILL),)))
    actions = d.poll(0.0, GATED, fired=(0,))
    assert [s.signal for s in signals(actions)] == [SIGKILL]
    assert releases(actions)


def test_psi_warn_records_once_per_episode_and_signals_nothing() -> None:
    d = driver(make_guard(psi=(make_psi_trigger(PsiAction.WARN),)))
    first = d.poll(0.0, HIGH, fired=(0,))  # a warning is not gated by memory
    assert [r.event for r in records(first)] == ["psi_warn"]
    assert records(first)[0].get("action") == "warn"
    assert d.poll(2.0, HIGH, fired=(0,)) == []
    assert d.poll(4.0, HIGH, fired=(0,)) == []
    d.poll(10.0, HIGH)  # inactive: the episode ends
    assert [r.event for r in records(d.poll(12.0, HIGH, fired=(0,)))] == ["psi_warn"]
    assert signals(d.log) == []


def test_update_psi_keeps_active_since_across_reports_within_the_window() -> None:
    trig = (make_psi_trigger(PsiAction.TERM),)
    tracks = update_psi((PsiTrack(),), trig, (0,), 1.0, 1.0)
    tracks = update_psi(tracks, trig, (0,), 3.0, 1.0)
    assert tracks == (PsiTrack(last_fired_at=3.0, active_since=1.0),)
    tracks = update_psi(tracks, trig, (), 6.5, 1.0)
    assert tracks[0].active_since is None


def test_describe_psi_names_the_trigger() -> None:
    assert (
        describe_psi(2, make_psi_trigger(PsiAction.TERM, sustain_s=1.5))
        == "psi[2] full 200000/2000000us sustained 1.5s"
    )


# --- no candidate ----------------------------------------------------------------------------


def test_empty_ranking_records_no_candidate_once_per_episode() -> None:
    d = driver(cands=())
    first = d.poll(0.0, LOW)
    assert [(r.event, r.get("ranking")) for r in records(first)] == [("no_candidate", "empty")]
    assert d.poll(0.5, CRIT) == []
    d.poll(1.0, HIGH)
    assert records(d.poll(1.5, LOW), "no_candidate")


def test_missing_ranking_is_reported_and_acted_on_when_it_arrives() -> None:
    d = driver()
    pool = d.rankings.pop("system")
    (rec,) = records(d.poll(0.0, LOW))
    assert (rec.event, rec.get("ranking")) == ("no_candidate", "missing")
    d.rankings["system"] = pool
    assert [s.target for s in signals(d.poll(0.1, LOW))] == [key(101)]


# --- dry run ---------------------------------------------------------------------------------


def test_dry_run_logs_would_term_holds_then_decides_again_and_never_marks_stuck() -> None:
    d = driver(dry_run=True, hook=("/usr/bin/true",))
    first = d.poll(0.0, LOW)
    assert records(first)[0].get("action") == "would_term"
    assert [(s.target, s.signal, s.dry_run) for s in signals(first)] == [(key(101), SIGTERM, True)]
    assert [type(a) for a in first if isinstance(a, (ReleaseMemory, RunHook))] == []
    assert d.phase() is Phase.AUDIT_HOLD
    for t in (1.0, 2.0, 4.99):
        assert d.poll(t, CRIT) == []  # the hold: no per-poll spam, no would_kill walk
    ended = d.poll(TERM_TIMEOUT, LOW)
    assert [r.event for r in records(ended)] == ["audit_hold_ended"]
    again = d.poll(TERM_TIMEOUT + 0.1, LOW)
    assert [(r.event, r.get("action"), r.get("pid")) for r in records(again)] == [("victim_chosen", "would_term", 101)]
    assert d.state.guard("system").stuck == frozenset()


def test_dry_run_kill_level_logs_would_kill_without_release() -> None:
    d = driver(dry_run=True)
    actions = d.poll(0.0, CRIT)
    assert records(actions)[0].get("action") == "would_kill"
    assert [(s.signal, s.dry_run) for s in signals(actions)] == [(SIGKILL, True)]
    assert releases(actions) == []


def test_dry_run_cgroup_kill_carries_dry_run() -> None:
    d = driver(make_guard(victim=VictimKind.CGROUP), cands=(cand(101, cgroup="/app"),), dry_run=True)
    actions = d.poll(0.0, CRIT)
    assert [a for a in actions if isinstance(a, KillCgroup)] == [
        KillCgroup(guard="system", path="/app", dry_run=True, group=(key(101),))
    ]


# --- the record carries the facts ----------------------------------------------------------


def test_victim_chosen_record_carries_trigger_reading_victim_runner_up_and_action() -> None:
    d = driver(cands=(cand(101, 5000, rules=("browsers",), name="firefox"), cand(102, 3000, name="make")))
    (rec,) = records(d.poll(0.0, LOW))
    assert rec.event == "victim_chosen"
    assert rec.as_dict() == {
        "guard": "system",
        "trigger": "mem_available_term",
        "available_bytes": LOW,
        "available_fraction": 0.0625,
        "total_bytes": TOTAL,
        "swap_free_bytes": 0,
        "swap_total_bytes": 0,
        "term_threshold_bytes": int(TOTAL * 0.10),
        "kill_threshold_bytes": int(TOTAL * 0.05),
        "swap_term_threshold_bytes": 0,
        "swap_kill_threshold_bytes": 0,
        "pid": 101,
        "name": "firefox",
        "starttime_ticks": 10_101,
        "badness": 5000 + 3 + 2 + 200,
        "rss_pages": 5000,
        "swap_pages": 3,
        "pgtables_pages": 2,
        "adj_points": 200,
        "totalpages": 4_000_000,
        "effective_adj": 50,
        "rules": ("browsers",),
        "rss_bytes": 101 * 4096 * 100 + 4096,
        "victim_kind": "process",
        "total_vm_bytes": 0,
        "anon_rss_bytes": 101 * 4096 * 100,
        "file_rss_bytes": 4096,
        "shmem_rss_bytes": 0,
        "uid": 1000,
        "pgtables_bytes": 8192,
        "oom_score_adj": 0,
        "runner_up_pid": 102,
        "runner_up_name": "make",
        "runner_up_badness": 3000 + 3 + 2 + 200,
        "action": "term",
        "after_victim": False,
    }


def test_every_decision_is_exactly_one_record() -> None:
    d = driver()
    for t, avail in ((0.0, LOW), (TERM_TIMEOUT, LOW)):
        actions = d.poll(t, avail)
        assert len(records(actions)) == 1


# --- victim kinds and hooks -------------------------------------------------------------------


def test_process_group_victim_carries_pgid() -> None:
    d = driver(make_guard(victim=VictimKind.PROCESS_GROUP), cands=(cand(101, pgid=77),))
    (sig,) = signals(d.poll(0.0, LOW))
    assert (sig.victim_kind, sig.pgid, sig.target) == (VictimKind.PROCESS_GROUP, 77, key(101))


def test_process_group_of_init_or_zero_falls_back_to_the_process() -> None:
    d = driver(make_guard(victim=VictimKind.PROCESS_GROUP), cands=(cand(101, pgid=1),))
    (sig,) = signals(d.poll(0.0, LOW))
    assert sig.victim_kind is VictimKind.PROCESS


def test_cgroup_victim_is_termed_by_members_and_killed_by_cgroup_kill() -> None:
    d = driver(make_guard(victim=VictimKind.CGROUP), cands=(cand(101, cgroup="/user.slice/app"),))
    (term,) = signals(d.poll(0.0, LOW))
    assert (term.victim_kind, term.cgroup, term.signal) == (VictimKind.CGROUP, "/user.slice/app", SIGTERM)
    kill = d.poll(TERM_TIMEOUT, LOW)
    assert [a for a in kill if isinstance(a, KillCgroup)] == [
        KillCgroup(guard="system", path="/user.slice/app", dry_run=False, group=(key(101),))
    ]
    assert releases(kill) == [ReleaseMemory(guard="system", target=key(101))]


@pytest.mark.parametrize("cgroup", [None, "/", ""])
def test_cgroup_victim_without_a_killable_cgroup_falls_back_to_the_process(cgroup: str | None) -> None:
    d = driver(make_guard(victim=VictimKind.CGROUP), cands=(cand(101, cgroup=cgroup),))
    actions = d.poll(0.0, CRIT)
    assert [a for a in actions if isinstance(a, KillCgroup)] == []
    assert [(s.victim_kind, s.signal) for s in signals(actions)] == [(VictimKind.PROCESS, SIGKILL)]


def test_hook_runs_after_term_and_kill_with_the_facts_in_its_environment() -> None:
    d = driver(hook=("/usr/local/bin/notify", "--oom"), cands=(cand(101, 5000, rules=("a", "b"), name="x; rm -rf"),))
    term = d.poll(0.0, LOW)
    (hook,) = [a for a in term if isinstance(a, RunHook)]
    env = dict(hook.env)
    assert hook.argv == ("/usr/local/bin/notify", "--oom")
    assert {k: env[k] for k in ("UOOMD_PID", "UOOMD_NAME", "UOOMD_SIGNAL", "UOOMD_GUARD", "UOOMD_RULES")} == {
        "UOOMD_PID": "101",
        "UOOMD_NAME": "x; rm -rf",  # a value in the environment, never a shell word
        "UOOMD_SIGNAL": "SIGTERM",
        "UOOMD_GUARD": "system",
        "UOOMD_RULES": "a,b",
    }
    assert env["UOOMD_BADNESS"] == str(5000 + 205)
    assert env["UOOMD_TRIGGER"] == "mem_available_term"
    assert env["UOOMD_RSS_BYTES"] == str(101 * 4096 * 100 + 4096)
    kill = d.poll(TERM_TIMEOUT, LOW)
    (hook2,) = [a for a in kill if isinstance(a, RunHook)]
    assert dict(hook2.env)["UOOMD_SIGNAL"] == "SIGKILL"


def test_no_hook_when_none_is_configured() -> None:
    d = driver()
    assert [a for a in d.poll(0.0, CRIT) if isinstance(a, RunHook)] == []


# --- plan changes and missing readings ------------------------------------------------------


def test_a_guard_added_by_reload_starts_idle() -> None:
    d = driver()
    d.plan = scenario_plan(make_guard("system"), make_guard("new"))
    d.rankings["new"] = make_ranking("new", cand(201))
    actions = d.poll(0.0, {"system": make_memory(HIGH), "new": make_memory(LOW)})
    assert [(s.guard, s.target.pid) for s in signals(actions)] == [("new", 201)]
    assert [gs.guard for gs in d.state.guards] == ["system", "new"]


def test_guard_without_a_reading_still_sees_its_victim_exit() -> None:
    d = driver()
    d.poll(0.0, LOW)
    actions = d.poll(1.0, {}, alive=[])
    assert [r.event for r in records(actions)] == ["victim_exited"]


def test_step_is_pure_same_inputs_same_outputs() -> None:
    d = driver()
    d.poll(0.0, LOW)
    before = d.state
    obs = Observation(
        now=TERM_TIMEOUT, guards=(GuardReading(guard="system", memory=make_memory(LOW)),), alive=before.in_flight()
    )
    first = step(before, obs, d.plan, d.rankings)
    second = step(before, obs, d.plan, d.rankings)
    assert first == second
    assert before.guard("system").phase is Phase.TERM_SENT  # the input state is a value, not mutated
    assert first[0].guard("system").phase is Phase.KILL_SENT


# --- group victims stay inside the scope ---------------------------------------------------


def test_process_group_victim_signals_only_the_group_members_the_ranking_holds() -> None:
    # 101 and 102 share group 77 and are candidates (in scope, not protected); a member of 77
    # outside the scope or protected is not a candidate, so it is not in the group.
    d = driver(
        make_guard(victim=VictimKind.PROCESS_GROUP),
        cands=(cand(101, 5000, pgid=77), cand(103, 4000, pgid=88), cand(102, 3000, pgid=77)),
    )
    (sig,) = signals(d.poll(0.0, LOW))
    assert sig.group == (key(101), key(102))
    # Escalation re-derives the group from this poll's ranking: 102 has become ineligible.
    d.rankings["system"] = make_ranking("system", cand(101, 5000, pgid=77), cand(103, 4000, pgid=88))
    (kill,) = signals(d.poll(TERM_TIMEOUT, LOW))
    assert (kill.signal, kill.group) == (SIGKILL, (key(101),))


def test_members_signalled_in_an_episode_are_not_chosen_again_in_recovering() -> None:
    d = driver(
        make_guard(victim=VictimKind.PROCESS_GROUP),
        cands=(cand(101, 5000, pgid=77), cand(102, 3000, pgid=77), cand(103, 1000, pgid=88)),
    )
    d.poll(0.0, LOW)
    d.poll(0.5, LOW, alive=[])  # the leader exited; 102 is still exiting on its SIGTERM
    (nxt,) = signals(d.poll(0.52, LOW))
    assert nxt.target == key(103)  # never a second SIGTERM to 102


# --- what ranking the core needs ------------------------------------------------------------


def test_needs_says_now_exactly_when_a_victim_would_be_chosen() -> None:
    d = driver()
    obs = Observation(now=0.0, guards=(GuardReading(guard="system", memory=make_memory(HIGH)),))
    assert needs(d.state, obs, d.plan) == {"system": Need.NONE}
    near = Observation(now=0.0, guards=(GuardReading(guard="system", memory=make_memory(GATED)),))
    assert needs(d.state, near, d.plan) == {"system": Need.WARM}
    low = Observation(now=0.0, guards=(GuardReading(guard="system", memory=make_memory(LOW)),))
    assert needs(d.state, low, d.plan) == {"system": Need.NOW}
    d.poll(0.0, LOW)  # term_sent: the victim is known, only a warm ranking is wanted
    assert needs(d.state, replace(low, now=0.1, alive=d.state.in_flight()), d.plan) == {"system": Need.WARM}
    d.poll(0.5, LOW, alive=[])  # recovering: the next low reading chooses
    assert needs(d.state, replace(low, now=0.6), d.plan) == {"system": Need.NOW}


def test_needs_is_warm_when_rate_limited() -> None:
    d = driver(max_kills=1)
    d.poll(0.0, LOW)
    d.poll(0.5, LOW, alive=[])
    d.poll(0.6, HIGH)  # memory back: idle, one victim in the last minute
    low = Observation(now=1.0, guards=(GuardReading(guard="system", memory=make_memory(LOW)),))
    assert needs(d.state, low, d.plan) == {"system": Need.WARM}


# --- the refault gate (issue 18: a thrash, not a job that swaps) -----------------------------


def _gated_driver(*triggers: PsiTriggerPlan, sustain_s: float = 0.0, sustain_all_s: float | None = None) -> Driver:
    guard = make_guard(
        psi=triggers,
        psi_refault_gate=Amount(bytes=REFAULT_GATE),
        psi_refault_sustain_s=sustain_s,
        psi_refault_sustain_all_s=sustain_s if sustain_all_s is None else sustain_all_s,
    )
    return driver(guard)


def _refaulting(available: int = GATED, *, every: bool = False) -> dict[str, MemoryReading]:
    return {"system": make_memory(available, refault_bytes=1 << 30, refaults_all=every)}


def test_a_stall_with_few_refaults_is_held_and_said_once() -> None:
    # A job pushing cold pages to swap: memory short, the stall sustained, refaults slow.
    d = _gated_driver(make_psi_trigger(PsiAction.TERM))
    first = d.poll(1.0, _refaulting(), fired=(0,), refault_rate=REFAULT_GATE / 10)
    assert signals(first) == []
    (held,) = records(first, "psi_held")
    assert held.get("refault_bytes_per_s") == REFAULT_GATE // 10
    assert held.get("refault_gate_bytes_per_s") == REFAULT_GATE
    assert held.get("refault_above_s") is None
    assert d.poll(1.5, _refaulting(), fired=(0,), refault_rate=REFAULT_GATE / 10) == []


def test_refaults_at_the_gate_for_its_sustain_choose_and_the_record_says_how_long() -> None:
    d = _gated_driver(make_psi_trigger(PsiAction.TERM), sustain_s=10.0)

    def at_gate(now: float) -> list[Output]:
        return d.poll(now, _refaulting(), fired=(0,), refault_rate=float(REFAULT_GATE), refault_above_since=1.0)

    assert signals(at_gate(1.0)) == []
    assert signals(at_gate(10.9)) == []  # a burst, so far
    acts = at_gate(11.0)
    assert [(s.target, s.signal) for s in signals(acts)] == [(key(101), SIGTERM)]
    (chosen,) = records(acts, "victim_chosen")
    assert (chosen.get("refault_bytes_per_s"), chosen.get("refault_above_s")) == (REFAULT_GATE, 10.0)
    assert (chosen.get("refault_sustain_s"), chosen.get("refaults")) == (10.0, "unactivated")


def test_where_every_refault_counts_the_gate_waits_the_longer_sustain_and_says_why() -> None:
    # The multi-gen LRU: a growing job's hot set comes back as fast as a thrash, for up to ~12 s.
    d = _gated_driver(make_psi_trigger(PsiAction.TERM), sustain_s=5.0, sustain_all_s=15.0)

    def at_gate(now: float) -> list[Output]:
        refaults = _refaulting(every=True)
        return d.poll(now, refaults, fired=(0,), refault_rate=float(REFAULT_GATE), refault_above_since=1.0)

    (held,) = records(at_gate(7.0), "psi_held")  # 6 s: past the 5 s sustain, not the 15 s one
    assert (held.get("refault_above_s"), held.get("refault_sustain_s"), held.get("refaults")) == (6.0, 15.0, "all")
    assert signals(at_gate(15.9)) == []
    acts = at_gate(16.0)
    assert [(s.target, s.signal) for s in signals(acts)] == [(key(101), SIGTERM)]
    assert records(acts, "victim_chosen")[0].get("refault_above_s") == 15.0


def test_an_unmeasured_rate_holds_where_refaults_can_be_read() -> None:
    # The first second of a stall: one reading, no whole window yet.
    d = _gated_driver(make_psi_trigger(PsiAction.KILL))
    acts = d.poll(1.0, _refaulting(), fired=(0,), refault_rate=None)
    assert signals(acts) == []
    assert records(acts, "psi_held")[0].get("refault_bytes_per_s") is None


def test_a_scope_without_refault_counters_is_not_held_by_the_gate() -> None:
    d = _gated_driver(make_psi_trigger(PsiAction.TERM))
    acts = d.poll(1.0, GATED, fired=(0,), refault_rate=None)  # refault_bytes None: cannot be read
    assert [s.signal for s in signals(acts)] == [SIGTERM]
    assert records(acts, "psi_held") == []


def test_an_ungated_trigger_acts_with_memory_short_and_no_refaults() -> None:
    # The backstop: a long full stall with memory short is a freeze whatever refaults say.
    backstop = make_psi_trigger(PsiAction.TERM, sustain_s=2.0, gated=False)
    d = _gated_driver(backstop)
    assert signals(d.poll(1.0, _refaulting(GATED), fired=(0,), refault_rate=0.0)) == []
    acts = d.poll(3.0, _refaulting(GATED), fired=(0,), refault_rate=0.0)
    assert [s.signal for s in signals(acts)] == [SIGTERM]
    assert records(acts, "victim_chosen")[0].get("trigger") == describe_psi(0, backstop)
    assert records(acts, "psi_held") == []


def test_an_ungated_trigger_never_acts_with_memory_plentiful() -> None:
    # nohang#25 holds for the backstop too; in the VM, its stall sustained through a thrash
    # outlived the thrash's SIGKILL, and with 83% of RAM back it took a bystander.
    backstop = make_psi_trigger(PsiAction.TERM, sustain_s=2.0, gated=False)
    d = _gated_driver(backstop)
    for t in range(0, 20, 2):
        acts = d.poll(float(t), _refaulting(HIGH), fired=(0,), refault_rate=0.0)
        assert signals(acts) == []
        assert records(acts, "victim_chosen") == []


def test_the_refault_gate_never_holds_back_a_level() -> None:
    d = _gated_driver(make_psi_trigger(PsiAction.TERM))
    acts = d.poll(1.0, _refaulting(LOW), fired=(0,), refault_rate=0.0)
    assert [s.signal for s in signals(acts)] == [SIGTERM]
    assert records(acts, "victim_chosen")[0].get("trigger") == "mem_available_term"
