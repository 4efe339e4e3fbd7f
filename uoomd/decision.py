"""Decide, from one observation, which guard escalates against which victim: the escalation state machine (pure).

Modelled on h11: phases and events are closed sets, the transitions are data
(:data:`TABLE` and :data:`DRY_RUN_TABLE`) that tests and docs enumerate, and
:func:`step` is a function of its inputs.  It reads no file and no clock: ``obs.now``
is the daemon's ``time.monotonic()``, ``obs.alive`` says which in-flight victims the
daemon still found alive through their pidfds.  What to do comes back as frozen values
(:data:`uoomd.actions.Output`): the executor carries out the actions, the daemon sends the
notices and logs the records, a test asserts on them.

Every decision, acted on or not, is exactly one :class:`Record` with the trigger, the
reading, the victim with its badness terms, the runner-up and the ``action`` taken.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import assert_never

from uoomd import pacing, trend
from uoomd.actions import (
    Action,
    HoldForHook,
    KillCgroup,
    Notify,
    NotifyWarning,
    Output,
    Record,
    ReleaseMemory,
    RunHook,
    SendSignal,
)
from uoomd.plan import EtaAction, GuardPlan, Plan, PsiAction, PsiTriggerPlan, VictimKind
from uoomd.readings import GuardReading, MemoryReading, Observation, ProcessInfo, ProcessKey, Snapshot
from uoomd.scoring import Candidate, Ranking
from uoomd.thrash import gate_bytes_per_s, has_refault_gate, refault_gate_open, refault_sustain_s
from uoomd.trend import Trend

RATE_WINDOW_S = 60.0  # max_kills_per_minute counts victims chosen in this sliding window
# A warning that reaches people (the warn level, a PSI warn trigger) is said at most this often
# per guard: it names the likely victim (a current ranking, a scan) and may send a desktop notice.
WARN_INTERVAL_S = 60.0

SIGTERM = int(signal.SIGTERM)
SIGKILL = int(signal.SIGKILL)
_SIGNAL_NAMES = {SIGTERM: "SIGTERM", SIGKILL: "SIGKILL"}


class Phase(StrEnum):
    IDLE = "idle"
    TERM_SENT = "term_sent"
    KILL_SENT = "kill_sent"
    RECOVERING = "recovering"
    AUDIT_HOLD = "audit_hold"  # dry-run: a victim was named but nothing was sent; wait term_timeout


class Event(StrEnum):
    TERM_LEVEL = "term_level"  # available (and swap, where there is swap) below the term level
    KILL_LEVEL = "kill_level"
    PSI_TERM = "psi_term"  # a PSI trigger with action "term" sustained, below the PSI memory gate
    PSI_KILL = "psi_kill"
    PSI_WARN = "psi_warn"
    PSI_HELD = "psi_held"  # a term/kill trigger sustained below psi_mem_gate, held back by psi_refault_gate
    WARN_LEVEL = "memory_warn"  # available (and swap, where swap_free_warn is set) below the warn level
    # mem_available_eta: the observed fall reaches the kill level within eta, sustained
    # (uoomd/trend.py), with the guard's eta action term or kill; also above the term level.
    ETA_TERM = "eta_term"
    ETA_KILL = "eta_kill"
    VICTIM_EXITED = "victim_exited"  # the in-flight victim is not in obs.alive any more
    # The in-flight victim lives on but may no longer be signalled: it left the guard's scope,
    # or a protect rule (or oom_score_adj -1000) covers it now (obs.ineligible).
    VICTIM_LEFT = "victim_left"
    TERM_TIMEOUT = "term_timeout"
    KILL_TIMEOUT = "kill_timeout"
    MEMORY_BACK = "memory_back"  # available (and swap) at or above the term level again
    RECOVERY_TIMEOUT = "recovery_timeout"
    HOLD_EXPIRED = "hold_expired"  # dry-run: term_timeout after a would_term/would_kill


class Response(StrEnum):
    """What a transition does; the ``action`` field of its Record. (What an executed action
    came to is a :class:`uoomd.results.Response`.)"""

    TERM = "term"
    KILL = "kill"
    WOULD_TERM = "would_term"
    WOULD_KILL = "would_kill"
    WARN = "warn"
    MARK_STUCK = "mark_stuck"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Transition:
    next: Phase
    response: Response


_COMMON: dict[tuple[Phase, Event], Transition] = {
    (Phase.IDLE, Event.PSI_WARN): Transition(Phase.IDLE, Response.WARN),
    (Phase.IDLE, Event.PSI_HELD): Transition(Phase.IDLE, Response.WARN),
    (Phase.IDLE, Event.WARN_LEVEL): Transition(Phase.IDLE, Response.WARN),
    (Phase.TERM_SENT, Event.VICTIM_EXITED): Transition(Phase.RECOVERING, Response.NONE),
    # Escalate the same victim; never a second SIGTERM (earlyoom#373: a process that
    # ignores SIGTERM was sent SIGTERM again and again while memory ran out).
    (Phase.TERM_SENT, Event.TERM_TIMEOUT): Transition(Phase.KILL_SENT, Response.KILL),
    (Phase.TERM_SENT, Event.KILL_LEVEL): Transition(Phase.KILL_SENT, Response.KILL),
    (Phase.KILL_SENT, Event.VICTIM_EXITED): Transition(Phase.RECOVERING, Response.NONE),
    # Never SIGKILL what is no longer ours to kill: drop it, and decide afresh next poll.
    (Phase.TERM_SENT, Event.VICTIM_LEFT): Transition(Phase.IDLE, Response.NONE),
    (Phase.KILL_SENT, Event.VICTIM_LEFT): Transition(Phase.IDLE, Response.NONE),
    (Phase.AUDIT_HOLD, Event.VICTIM_LEFT): Transition(Phase.IDLE, Response.NONE),
    # A SIGKILLed process that does not exit is stuck in the kernel (D state, a frozen
    # cgroup): give up on it, never pick it again for this guard, and move on.
    (Phase.KILL_SENT, Event.KILL_TIMEOUT): Transition(Phase.IDLE, Response.MARK_STUCK),
    (Phase.RECOVERING, Event.MEMORY_BACK): Transition(Phase.IDLE, Response.NONE),
    (Phase.RECOVERING, Event.RECOVERY_TIMEOUT): Transition(Phase.IDLE, Response.NONE),
    # Present in both tables so that a reload switching dry_run never strands a guard.
    (Phase.AUDIT_HOLD, Event.HOLD_EXPIRED): Transition(Phase.IDLE, Response.NONE),
    (Phase.AUDIT_HOLD, Event.MEMORY_BACK): Transition(Phase.IDLE, Response.NONE),
}

TABLE: Mapping[tuple[Phase, Event], Transition] = {
    (Phase.IDLE, Event.TERM_LEVEL): Transition(Phase.TERM_SENT, Response.TERM),
    (Phase.IDLE, Event.PSI_TERM): Transition(Phase.TERM_SENT, Response.TERM),
    (Phase.IDLE, Event.KILL_LEVEL): Transition(Phase.KILL_SENT, Response.KILL),
    (Phase.IDLE, Event.PSI_KILL): Transition(Phase.KILL_SENT, Response.KILL),
    (Phase.IDLE, Event.ETA_TERM): Transition(Phase.TERM_SENT, Response.TERM),
    (Phase.IDLE, Event.ETA_KILL): Transition(Phase.KILL_SENT, Response.KILL),
    # Recovery is not blind: the victim is gone, yet a reading taken since (the next poll: the
    # exit is seen after this poll's reading) is still past a level. Its memory was not what
    # ran out (a second grower, a forking hog), so the next victim is chosen now. A victim's
    # memory is freed before its pidfd polls readable (kernel/exit.c do_exit(): exit_mm()
    # before exit_notify(), Linux 6.18), so waiting longer would only let the grower win.
    (Phase.RECOVERING, Event.TERM_LEVEL): Transition(Phase.TERM_SENT, Response.TERM),
    (Phase.RECOVERING, Event.PSI_TERM): Transition(Phase.TERM_SENT, Response.TERM),
    (Phase.RECOVERING, Event.KILL_LEVEL): Transition(Phase.KILL_SENT, Response.KILL),
    (Phase.RECOVERING, Event.PSI_KILL): Transition(Phase.KILL_SENT, Response.KILL),
    (Phase.RECOVERING, Event.ETA_TERM): Transition(Phase.TERM_SENT, Response.TERM),
    (Phase.RECOVERING, Event.ETA_KILL): Transition(Phase.KILL_SENT, Response.KILL),
    **_COMMON,
}
"""The live escalation table: (phase, event) -> (next phase, response). A pair that is
not in the table leaves the guard where it is."""

DRY_RUN_TABLE: Mapping[tuple[Phase, Event], Transition] = {
    # The victim will not exit (nothing is sent), so hold for term_timeout and then
    # decide afresh: each decision is logged again, and no victim is ever marked stuck.
    (Phase.IDLE, Event.TERM_LEVEL): Transition(Phase.AUDIT_HOLD, Response.WOULD_TERM),
    (Phase.IDLE, Event.PSI_TERM): Transition(Phase.AUDIT_HOLD, Response.WOULD_TERM),
    (Phase.IDLE, Event.KILL_LEVEL): Transition(Phase.AUDIT_HOLD, Response.WOULD_KILL),
    (Phase.IDLE, Event.PSI_KILL): Transition(Phase.AUDIT_HOLD, Response.WOULD_KILL),
    (Phase.IDLE, Event.ETA_TERM): Transition(Phase.AUDIT_HOLD, Response.WOULD_TERM),
    (Phase.IDLE, Event.ETA_KILL): Transition(Phase.AUDIT_HOLD, Response.WOULD_KILL),
    **_COMMON,
}
"""The dry-run table: the same decisions, parked in ``audit_hold`` instead of waiting for an exit."""


def _warn_record(event: Event | None, fields: tuple[tuple[str, object], ...]) -> Record:
    """The record a warning-only event logs, its name written out (the README's events table is
    checked against the code's literals, tests/unit/test_readme_tables.py)."""
    match event:
        case Event.PSI_HELD:
            return Record(event="psi_held", fields=fields)
        case Event.WARN_LEVEL:
            return Record(event="memory_warn", fields=fields)
        case _:
            return Record(event="psi_warn", fields=fields)


_CHOOSING = frozenset({Response.TERM, Response.KILL, Response.WOULD_TERM, Response.WOULD_KILL})
_HOLDING = frozenset({Phase.TERM_SENT, Phase.KILL_SENT, Phase.AUDIT_HOLD})  # phases with an in-flight victim
CHOOSERS = frozenset({Phase.IDLE, Phase.RECOVERING})  # phases with no victim in flight: a crossing picks one


# --- state --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PsiTrack:
    """One PSI trigger's recent history: when the kernel last reported it, and since when
    it has been reported without a gap."""

    last_fired_at: float | None = None
    active_since: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardState:
    guard: str
    phase: Phase = Phase.IDLE
    victim: Candidate | None = None
    phase_since: float = 0.0
    trigger: str = ""  # what started the current escalation, repeated in its later records
    stuck: frozenset[ProcessKey] = frozenset()
    psi: tuple[PsiTrack, ...] = ()
    noted: frozenset[str] = frozenset()  # once-per-episode records already emitted
    # Every process signalled in this episode (a group victim's members too): never chosen
    # again while the episode lasts, so a member still exiting gets no second SIGTERM.
    signalled: frozenset[ProcessKey] = frozenset()
    trend: Trend = field(default_factory=Trend)  # mem_available_eta's readings; empty without an eta or far from it
    warned_at: float | None = None  # when a warning (memory_warn, psi_warn) was last said: WARN_INTERVAL_S apart


@dataclass(frozen=True, slots=True, kw_only=True)
class State:
    guards: tuple[GuardState, ...]
    kill_times: tuple[float, ...] = ()  # when victims were chosen, any guard, last RATE_WINDOW_S

    def guard(self, name: str) -> GuardState:
        for gs in self.guards:
            if gs.guard == name:
                return gs
        raise KeyError(name)

    def in_flight(self) -> frozenset[ProcessKey]:
        return frozenset(gs.victim.key for gs in self.guards if gs.phase in _HOLDING and gs.victim)

    def unchoosable(self) -> frozenset[ProcessKey]:
        """Processes no guard may choose now: in flight, stuck, or signalled in an open episode."""
        out = set(self.in_flight())
        for gs in self.guards:
            out |= gs.stuck | gs.signalled
        return frozenset(out)

    def in_flight_by_guard(self) -> tuple[tuple[str, ProcessKey], ...]:
        """(guard, victim) for every victim in flight."""
        return tuple((gs.guard, gs.victim.key) for gs in self.guards if gs.phase in _HOLDING and gs.victim)


def initial_state(plan: Plan) -> State:
    return State(guards=tuple(_fresh_guard_state(g) for g in plan.guards))


def _fresh_guard_state(guard: GuardPlan) -> GuardState:
    return GuardState(guard=guard.name, psi=tuple(PsiTrack() for _ in guard.psi))


# --- levels and PSI (pure predicates) -----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Levels:
    """A guard's thresholds resolved against one reading, and where the reading stands."""

    term_bytes: int
    kill_bytes: int
    swap_term_bytes: int
    swap_kill_bytes: int
    gate_bytes: int
    term_crossed: bool
    kill_crossed: bool
    memory_back: bool
    warn_crossed: bool = False  # below the warn level (mem_available_warn, and swap_free_warn if set)


def levels(reading: MemoryReading, guard: GuardPlan) -> Levels:
    """Both memory and swap must be low to act; with no swap at all, MemAvailable alone is
    enough (oomd#80: a swapless machine never fired because "swap free" never fell)."""
    term_bytes = guard.mem_available_term.resolve_bytes(reading.total_bytes)
    kill_bytes = guard.mem_available_kill.resolve_bytes(reading.total_bytes)
    swap_term = guard.swap_free_term.resolve_bytes(reading.swap_total_bytes)
    swap_kill = guard.swap_free_kill.resolve_bytes(reading.swap_total_bytes)
    no_swap = reading.swap_total_bytes == 0
    avail = reading.available_bytes
    swap_free = reading.swap_free_bytes
    return Levels(
        term_bytes=term_bytes,
        kill_bytes=kill_bytes,
        swap_term_bytes=swap_term,
        swap_kill_bytes=swap_kill,
        gate_bytes=guard.psi_mem_gate.resolve_bytes(reading.total_bytes),
        term_crossed=avail < term_bytes and (no_swap or swap_free < swap_term),
        kill_crossed=avail < kill_bytes and (no_swap or swap_free < swap_kill),
        memory_back=avail >= term_bytes and (no_swap or swap_free >= swap_term),
        warn_crossed=_warn_crossed(reading, guard),
    )


def _warn_crossed(reading: MemoryReading, guard: GuardPlan) -> bool:
    """Below the warn level: memory, and swap too where swap_free_warn is set and there is swap."""
    if guard.mem_available_warn is None:
        return False
    if reading.available_bytes >= guard.mem_available_warn.resolve_bytes(reading.total_bytes):
        return False
    swap = guard.swap_free_warn
    return (
        swap is None
        or reading.swap_total_bytes == 0
        or reading.swap_free_bytes < swap.resolve_bytes(reading.swap_total_bytes)
    )


def update_psi(
    tracks: tuple[PsiTrack, ...],
    triggers: tuple[PsiTriggerPlan, ...],
    fired: tuple[int, ...],
    now: float,
    grace_s: float,
) -> tuple[PsiTrack, ...]:
    """Advance each trigger's history by one poll.

    The kernel reports a trigger at most once per window while the stall lasts
    (kernel/sched/psi.c update_triggers(), Linux 6.18: no new event before
    last_event_time + win.size), and we see a report up to one poll late, so a trigger
    stays active while its last report is younger than window + grace_s."""
    if len(tracks) != len(triggers):
        tracks = tuple(PsiTrack() for _ in triggers)
    out: list[PsiTrack] = []
    for i, (track, trigger) in enumerate(zip(tracks, triggers, strict=True)):
        horizon_s = trigger.window_us / 1e6 + grace_s
        was_active = track.last_fired_at is not None and now - track.last_fired_at <= horizon_s
        if i in fired:
            since = track.active_since if was_active and track.active_since is not None else now
            out.append(PsiTrack(last_fired_at=now, active_since=since))
        elif was_active:
            out.append(track)
        else:
            out.append(PsiTrack(last_fired_at=track.last_fired_at, active_since=None))
    return tuple(out)


def _stall_answered(gs: GuardState) -> GuardState:
    """The guard once its victim exited or was given up as stuck: the stall and the fall of
    memory so far were that victim's, so a PSI trigger (and the eta projection) must be
    sustained anew before it can choose the next one (else one old stall would take two)."""
    return replace(gs, psi=tuple(replace(t, active_since=None) for t in gs.psi), trend=replace(gs.trend, since=None))


def sustained(track: PsiTrack, trigger: PsiTriggerPlan, now: float) -> bool:
    return track.active_since is not None and now - track.active_since >= trigger.sustain_s


def describe_psi(index: int, trigger: PsiTriggerPlan) -> str:
    """E.g. ``psi[0] full 200000/2000000us sustained 4s``."""
    return f"psi[{index}] {trigger.kind} {trigger.stall_us}/{trigger.window_us}us sustained {trigger.sustain_s:g}s"


# --- the step -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Ctx:
    guard: GuardPlan
    plan: Plan
    obs: Observation
    reading: GuardReading | None
    lv: Levels | None
    ranking: Ranking | None
    table: Mapping[tuple[Phase, Event], Transition]
    others: frozenset[ProcessKey]  # in-flight victims of other guards: never picked here
    stuck_elsewhere: frozenset[ProcessKey]  # survived another guard's SIGKILL: would survive ours
    kill_times: tuple[float, ...]  # victims chosen in the last RATE_WINDOW_S, all guards


@dataclass(frozen=True, slots=True, kw_only=True)
class _Detected:
    event: Event | None
    trigger: str
    facts: tuple[tuple[str, object], ...] = ()  # what the trigger saw, for the decision's record


def _detect(gs: GuardState, ctx: _Ctx) -> _Detected:
    """The one event this poll brings to this guard, by priority within its phase."""
    obs, lv, esc = ctx.obs, ctx.lv, ctx.plan.escalation
    elapsed_s = obs.now - gs.phase_since
    match gs.phase:
        case Phase.IDLE:
            return _detect_idle(gs, ctx)
        case Phase.TERM_SENT:
            if gs.victim is None or gs.victim.key not in obs.alive:
                return _Detected(event=Event.VICTIM_EXITED, trigger=gs.trigger)
            if gs.victim.key in obs.ineligible:
                return _Detected(event=Event.VICTIM_LEFT, trigger=gs.trigger)
            if lv is not None and lv.kill_crossed:
                return _Detected(event=Event.KILL_LEVEL, trigger="mem_available_kill")
            # A before_kill hook may hold the SIGTERM this long: the victim's term_timeout starts after it.
            if elapsed_s >= esc.term_timeout_s + _hold_budget_s(ctx.plan):
                return _Detected(event=Event.TERM_TIMEOUT, trigger="term_timeout")
        case Phase.KILL_SENT:
            if gs.victim is None or gs.victim.key not in obs.alive:
                return _Detected(event=Event.VICTIM_EXITED, trigger=gs.trigger)
            if gs.victim.key in obs.ineligible:
                return _Detected(event=Event.VICTIM_LEFT, trigger=gs.trigger)
            if elapsed_s >= esc.kill_timeout_s:
                return _Detected(event=Event.KILL_TIMEOUT, trigger="kill_timeout")
        case Phase.RECOVERING:
            if lv is not None and lv.memory_back:
                return _Detected(event=Event.MEMORY_BACK, trigger=gs.trigger)
            crossing = _detect_idle(gs, ctx)
            if crossing.event is not None and crossing.event not in (Event.PSI_WARN, Event.PSI_HELD, Event.WARN_LEVEL):
                return crossing
            if elapsed_s >= esc.kill_timeout_s:
                return _Detected(event=Event.RECOVERY_TIMEOUT, trigger=gs.trigger)
        case Phase.AUDIT_HOLD:
            if gs.victim is not None and gs.victim.key in obs.ineligible:
                return _Detected(event=Event.VICTIM_LEFT, trigger=gs.trigger)
            if lv is not None and lv.memory_back:
                return _Detected(event=Event.MEMORY_BACK, trigger=gs.trigger)
            if elapsed_s >= esc.term_timeout_s:
                return _Detected(event=Event.HOLD_EXPIRED, trigger=gs.trigger)
        case _:
            assert_never(gs.phase)
    return _Detected(event=None, trigger=gs.trigger)


def _detect_idle(gs: GuardState, ctx: _Ctx) -> _Detected:
    """Priority: kill level, PSI kill, term level, PSI term, PSI warn."""
    guard, reading, lv, now = ctx.guard, ctx.reading, ctx.lv, ctx.obs.now
    if reading is None or lv is None:
        return _Detected(event=None, trigger="")
    if lv.kill_crossed:
        return _Detected(event=Event.KILL_LEVEL, trigger="mem_available_kill")
    active = [(i, t) for i, t in enumerate(guard.psi) if i < len(gs.psi) and sustained(gs.psi[i], t, now)]
    # nohang#25: PSI alone hit busy but healthy machines; it acts only when memory is short too.
    # And short memory with a stall is not yet a thrash: a job pushing its cold pages out to
    # swap stalls in reclaim too (issue 18); the refault gate waits for evicted pages coming
    # back (uoomd/thrash.py). An ungated trigger, the backstop on a long stall, passes the
    # refault gate, never the memory gate: in the VM a backstop sustained through a thrash
    # took a bystander once the thrash was killed, with 83% of RAM available.
    memory_short = reading.memory.available_bytes < lv.gate_bytes
    refaults_known = reading.memory.refault_bytes is not None
    thrashing = refault_gate_open(guard, reading, now)
    open_to = [(i, t) for i, t in active if memory_short and (thrashing or not t.gated)]
    thrash_facts = _refault_facts(guard, reading, now) if refaults_known and has_refault_gate(guard) else ()
    psi_kill = [(i, t) for i, t in open_to if t.action is PsiAction.KILL]
    if psi_kill:
        return _Detected(event=Event.PSI_KILL, trigger=describe_psi(*psi_kill[0]), facts=thrash_facts)
    eta = guard.eta
    eta_reached = eta is not None and trend.reached(gs.trend, eta, now)
    if eta_reached and eta is not None and eta.action is EtaAction.KILL:
        return _Detected(event=Event.ETA_KILL, trigger="mem_available_eta", facts=_eta_facts(gs.trend))
    if lv.term_crossed:
        return _Detected(event=Event.TERM_LEVEL, trigger="mem_available_term")
    if eta_reached:
        return _Detected(event=Event.ETA_TERM, trigger="mem_available_eta", facts=_eta_facts(gs.trend))
    psi_term = [(i, t) for i, t in open_to if t.action is PsiAction.TERM]
    if psi_term:
        return _Detected(event=Event.PSI_TERM, trigger=describe_psi(*psi_term[0]), facts=thrash_facts)
    # Sustained with memory short, held back by the refault gate alone: said once per
    # episode, so the log shows what the gate spared (and a replay what it would have done).
    held = [(i, t) for i, t in active if t.action is not PsiAction.WARN and memory_short and not thrashing]
    if held:
        return _Detected(event=Event.PSI_HELD, trigger=describe_psi(*held[0]), facts=thrash_facts)
    if lv.warn_crossed:
        return _Detected(event=Event.WARN_LEVEL, trigger="mem_available_warn")
    # A warning acts on nothing, so it is not gated: it is how a user learns the trigger fires.
    warn = [(i, t) for i, t in active if t.action is PsiAction.WARN]
    if warn:
        return _Detected(event=Event.PSI_WARN, trigger=describe_psi(*warn[0]))
    return _Detected(event=None, trigger="")


def _refault_facts(guard: GuardPlan, reading: GuardReading, now: float) -> tuple[tuple[str, object], ...]:
    rate = reading.refault_rate
    since = reading.refault_above_since
    return (
        ("refault_bytes_per_s", None if rate is None else int(rate)),
        ("refault_gate_bytes_per_s", gate_bytes_per_s(guard, reading.memory.total_bytes)),
        ("refault_above_s", None if since is None else round(now - since, 3)),
        ("refault_sustain_s", refault_sustain_s(guard, reading.memory)),
        ("refaults", "all" if reading.memory.refaults_all else "unactivated"),
    )


def _eta_facts(t: Trend) -> tuple[tuple[str, object], ...]:
    return (
        ("eta_s", round(t.eta_s, 3) if t.eta_s is not None else None),
        ("fall_bytes_per_s", int(t.fall_bytes_per_s)),
    )


def advance_trend(gs: GuardState, reading: GuardReading | None, guard: GuardPlan, now: float) -> Trend:
    """The guard's trend after this poll's reading: sampled only where pacing says the eta may
    be near (the daemon steps the core there at every poll), emptied elsewhere."""
    if guard.eta is None:
        return gs.trend if not gs.trend.samples else Trend()  # a reload took the eta away
    if reading is None:
        return gs.trend
    if not pacing.eta_watch_needed(reading.memory, guard):
        return gs.trend if not gs.trend.samples else Trend()
    return trend.update_trend(gs.trend, reading.memory, guard, guard.eta, now)


def step(state: State, obs: Observation, plan: Plan, rankings: Mapping[str, Ranking]) -> tuple[State, list[Output]]:
    """Advance every guard by one poll; return the new state and what to do, in order."""
    readings = {r.guard: r for r in obs.guards}
    kill_times = tuple(t for t in state.kill_times if obs.now - t < RATE_WINDOW_S)
    old = {gs.guard: gs for gs in state.guards}
    in_flight = set(state.in_flight())
    stuck_any: set[ProcessKey] = set().union(*(gs.stuck for gs in state.guards))
    table = DRY_RUN_TABLE if plan.daemon.dry_run else TABLE
    new_states: list[GuardState] = []
    actions: list[Output] = []
    for guard in plan.guards:
        gs = old.get(guard.name) or _fresh_guard_state(guard)
        reading = readings.get(guard.name)
        fired = reading.psi_fired if reading else ()
        gs = replace(gs, psi=update_psi(gs.psi, guard.psi, fired, obs.now, plan.daemon.poll_max_s))
        gs = replace(gs, trend=advance_trend(gs, reading, guard, obs.now))
        gs = _prune_stuck(gs, obs.snapshot)
        if gs.victim is not None:
            in_flight.discard(gs.victim.key)
        ctx = _Ctx(
            guard=guard,
            plan=plan,
            obs=obs,
            reading=reading,
            lv=levels(reading.memory, guard) if reading is not None else None,
            ranking=rankings.get(guard.name),
            table=table,
            others=frozenset(in_flight),
            stuck_elsewhere=frozenset(stuck_any - gs.stuck),
            kill_times=kill_times,
        )
        gs, acts, chosen = _step_guard(gs, ctx)
        stuck_any |= gs.stuck
        if chosen:
            kill_times = (*kill_times, obs.now)
        if gs.phase in _HOLDING and gs.victim is not None:
            in_flight.add(gs.victim.key)
        new_states.append(gs)
        actions.extend(acts)
    return State(guards=tuple(new_states), kill_times=kill_times), actions


def is_quiet(state: State, obs: Observation, plan: Plan) -> bool:
    """True when :func:`step` would return no action and change nothing that matters: every
    guard idle with no episode open, no PSI trigger fired or still active, no level crossed.

    The daemon skips the step then, so a poll far from trouble costs a reading and a few
    comparisons (a cold step costs ~350 us of an idle daemon's ~500 us per wake-up,
    measured at poll_max = 1 s). tests/unit/test_decision_properties.py checks the claim
    against step() itself."""
    if obs.snapshot is not None:
        return False
    readings = {r.guard: r for r in obs.guards}
    old = {gs.guard: gs for gs in state.guards}
    for guard in plan.guards:
        gs = old.get(guard.name)
        reading = readings.get(guard.name)
        if gs is None or reading is None or gs.phase is not Phase.IDLE or gs.victim is not None or gs.noted:
            return False
        if reading.psi_fired or any(t.active_since is not None for t in gs.psi) or len(gs.psi) != len(guard.psi):
            return False
        if gs.trend.samples or pacing.eta_watch_needed(reading.memory, guard):
            return False  # the trend is sampled at every reading near its eta (advance_trend())
        lv = levels(reading.memory, guard)
        if lv.term_crossed or lv.kill_crossed or lv.warn_crossed:
            return False
    return True


class Need(StrEnum):
    """What ranking a guard needs before this poll's step: the core says it, the daemon provides it."""

    NONE = "none"  # far from every level, nothing in flight: keep no ranking (a stale one is never acted on)
    WARM = "warm"  # may act soon, or a victim is in flight: a ranking refreshed at a bounded rate
    NOW = "now"  # this poll chooses a victim (or signals a group): the scope's processes as they are now


def needs(state: State, obs: Observation, plan: Plan) -> dict[str, Need]:
    """For each guard, the ranking :func:`step` needs at this observation (pure).

    NOW exactly when step() would choose a victim for the guard, or escalate a group victim
    (whose members are re-derived): the same detection as step(), so the daemon never
    re-derives levels or the PSI gate itself."""
    readings = {r.guard: r for r in obs.guards}
    old = {gs.guard: gs for gs in state.guards}
    kill_times = tuple(t for t in state.kill_times if obs.now - t < RATE_WINDOW_S)
    table = DRY_RUN_TABLE if plan.daemon.dry_run else TABLE
    out: dict[str, Need] = {}
    for guard in plan.guards:
        gs = old.get(guard.name) or _fresh_guard_state(guard)
        reading = readings.get(guard.name)
        if reading is None:
            out[guard.name] = Need.NONE if gs.phase is Phase.IDLE else Need.WARM
            continue
        gs = replace(gs, psi=update_psi(gs.psi, guard.psi, reading.psi_fired, obs.now, plan.daemon.poll_max_s))
        gs = replace(gs, trend=advance_trend(gs, reading, guard, obs.now))
        ctx = _Ctx(
            guard=guard,
            plan=plan,
            obs=obs,
            reading=reading,
            lv=levels(reading.memory, guard),
            ranking=None,
            table=table,
            others=frozenset(),
            stuck_elsewhere=frozenset(),
            kill_times=kill_times,
        )
        detected = _detect(gs, ctx)
        transition = table.get((gs.phase, detected.event)) if detected.event is not None else None
        response = transition.response if transition is not None else Response.NONE
        choosing = gs.phase in CHOOSERS and response in _CHOOSING
        at_kill = ctx.lv is not None and ctx.lv.kill_crossed
        chooses_now = choosing and (len(kill_times) < plan.escalation.max_kills_per_minute or at_kill)
        escalates_group = response in (Response.KILL, Response.WOULD_KILL) and guard.victim is not VictimKind.PROCESS
        gated = reading.memory.available_bytes < guard.psi_mem_gate.resolve_bytes(reading.memory.total_bytes)
        if chooses_now or escalates_group or (response is Response.WARN and _warning_due(gs, detected.event, obs.now)):
            out[guard.name] = Need.NOW  # a warning due names the likely victim
        elif gs.phase is not Phase.IDLE or choosing or pacing.warm_ranking_needed(reading.memory, guard):
            out[guard.name] = Need.WARM
        elif any(t.active_since is not None for t in gs.psi) and gated:
            out[guard.name] = Need.WARM  # a PSI trigger is being sustained below the gate
        elif gs.trend.since is not None:
            out[guard.name] = Need.WARM  # the eta projection is being sustained
        else:
            out[guard.name] = Need.NONE
    return out


def _prune_stuck(gs: GuardState, snapshot: Snapshot | None) -> GuardState:
    """Forget stuck processes that no longer exist, so the set stays small.

    Only a full snapshot can say a process is gone: a ranking may leave a live one out,
    and a forgotten stuck process would be picked, and SIGTERMed, again."""
    if snapshot is None or not gs.stuck:
        return gs
    present = {p.key for p in snapshot.processes}
    return replace(gs, stuck=gs.stuck & present)


def _step_guard(gs: GuardState, ctx: _Ctx) -> tuple[GuardState, list[Output], bool]:
    """One guard, one poll: (new guard state, actions, whether a new victim was chosen)."""
    detected = _detect(gs, ctx)
    if detected.event is None:
        if gs.phase is Phase.IDLE:
            gs = replace(gs, noted=frozenset())  # the episode is over
        return gs, [], False
    transition = ctx.table.get((gs.phase, detected.event))
    if transition is None:
        return gs, [], False
    now = ctx.obs.now
    after_s = now - gs.phase_since
    response = transition.response
    if gs.phase in CHOOSERS and response in _CHOOSING:
        return _choose(gs, ctx, transition, detected.trigger, detected.facts)
    match response:
        case Response.WARN:
            name = str(detected.event)  # psi_warn, psi_held, memory_warn: as _warn_record() names them
            if name in gs.noted:
                return gs, [], False
            if detected.event in _WARNINGS:
                return _warn(gs, ctx, detected)
            fields = (*_decision_fields(ctx, detected.trigger, None, Response.WARN), *detected.facts)
            return replace(gs, noted=gs.noted | {name}), [_warn_record(detected.event, fields)], False
        case Response.KILL | Response.WOULD_KILL:  # escalation of the in-flight victim
            assert gs.victim is not None
            response = Response.WOULD_KILL if ctx.plan.daemon.dry_run else Response.KILL
            rest = (ctx.ranking or _empty_ranking(ctx.guard.name)).top(
                1, gs.stuck | ctx.stuck_elsewhere | ctx.others | {gs.victim.key}
            )
            fields = _decision_fields(ctx, detected.trigger, gs.victim, response, runner_up=rest[0] if rest else None)
            rec = Record(event="victim_escalated", fields=(*fields, ("after_s", after_s)))
            signal_act, follow, group = _signal_actions(ctx, gs.victim, SIGKILL, gs.trigger)
            new = replace(gs, phase=transition.next, phase_since=now, signalled=gs.signalled | group)
            return new, [rec, signal_act, *follow], False
        case Response.MARK_STUCK:
            assert gs.victim is not None
            rec = Record(event="victim_stuck", fields=(*_guard_victim_fields(ctx, gs.victim), ("after_s", after_s)))
            new = replace(gs, phase=transition.next, phase_since=now, victim=None, stuck=gs.stuck | {gs.victim.key})
            # The stall so far was the stuck victim's too: the next victim needs a stall of its own
            # (seen in the VM: a backstop sustained through a thrash took a 4 KiB bystander 20 s
            # after the thrash's SIGKILL, with 83% of RAM available, as the thrash took long to exit).
            new = _stall_answered(new)
            return replace(new, trigger="", noted=frozenset(), signalled=frozenset()), [rec], False
        case Response.NONE:
            return _quiet_transition(gs, ctx, transition, detected.event, after_s)
        case Response.TERM | Response.WOULD_TERM:
            raise AssertionError(f"{response} outside idle: table row ({gs.phase}, {detected.event})")
        case _:
            assert_never(response)


def _quiet_transition(
    gs: GuardState, ctx: _Ctx, transition: Transition, event: Event, after_s: float
) -> tuple[GuardState, list[Output], bool]:
    now = ctx.obs.now
    records: list[Output] = []
    match event:
        case Event.VICTIM_EXITED:
            assert gs.victim is not None
            records.append(
                Record(
                    event="victim_exited",
                    fields=(*_guard_victim_fields(ctx, gs.victim), ("phase", str(gs.phase)), ("after_s", after_s)),
                )
            )
        case Event.MEMORY_BACK:
            records.append(
                Record(
                    event="memory_recovered",
                    fields=(("guard", ctx.guard.name), *_reading_fields(ctx), ("after_s", after_s)),
                )
            )
        case Event.RECOVERY_TIMEOUT:
            records.append(
                Record(
                    event="recovery_timeout",
                    fields=(("guard", ctx.guard.name), *_reading_fields(ctx), ("after_s", after_s)),
                )
            )
        case Event.HOLD_EXPIRED:
            records.append(Record(event="audit_hold_ended", fields=(("guard", ctx.guard.name), ("after_s", after_s))))
        case Event.VICTIM_LEFT:
            assert gs.victim is not None
            records.append(
                Record(
                    event="victim_left",
                    fields=(*_guard_victim_fields(ctx, gs.victim), ("phase", str(gs.phase)), ("after_s", after_s)),
                )
            )
        case _:
            pass
    victim = gs.victim if transition.next is Phase.RECOVERING else None
    trigger = gs.trigger if transition.next is not Phase.IDLE else ""
    new = replace(gs, phase=transition.next, phase_since=now, victim=victim, trigger=trigger)
    if transition.next is Phase.RECOVERING:
        new = _stall_answered(new)
    if transition.next is Phase.IDLE:
        new = replace(new, noted=frozenset(), signalled=frozenset())
    return new, records, False


def _choose(
    gs: GuardState,
    ctx: _Ctx,
    transition: Transition,
    trigger: str,
    facts: tuple[tuple[str, object], ...] = (),
) -> tuple[GuardState, list[Output], bool]:
    """Idle -> a victim: the guard conditions (rate limit, a candidate left) and the signal."""
    others, kill_times = ctx.others, ctx.kill_times
    limit = ctx.plan.escalation.max_kills_per_minute
    # The limit stops a crash loop from emptying the machine at the term level. Below the
    # kill level it would only hand the choice to the kernel's OOM killer, which acts there
    # anyway and knows nothing of the rules (seen in the VM: a forking hog after 4 victims).
    over_limit = len(kill_times) >= limit
    if over_limit and not (ctx.lv is not None and ctx.lv.kill_crossed):
        if "rate_limited" in gs.noted:
            return gs, [], False
        rec = Record(
            event="rate_limited",
            fields=(
                *_decision_fields(ctx, trigger, None, Response.NONE),
                ("victims_last_minute", len(kill_times)),
                ("max_kills_per_minute", limit),
            ),
        )
        return replace(gs, noted=gs.noted | {"rate_limited"}), [rec], False
    # In recovering, the victim that just exited is never chosen again, even if a ranking
    # read before its exit still holds it.
    previous = {gs.victim.key} if gs.victim is not None else set()
    best = (ctx.ranking or _empty_ranking(ctx.guard.name)).top(
        2, gs.stuck | ctx.stuck_elsewhere | others | gs.signalled | ctx.obs.ineligible | previous
    )
    victim = best[0] if best else None
    if victim is None:
        if "no_candidate" in gs.noted:
            return gs, [], False
        rec = Record(
            event="no_candidate",
            fields=(
                *_decision_fields(ctx, trigger, None, Response.NONE),
                ("ranking", "missing" if ctx.ranking is None else "empty"),
                ("excluded", len(ctx.ranking.excluded) if ctx.ranking else 0),
                ("stuck", len(gs.stuck | ctx.stuck_elsewhere)),
                ("in_flight_elsewhere", len(others)),
            ),
        )
        return replace(gs, noted=gs.noted | {"no_candidate"}), [rec], False
    response = transition.response
    rec = Record(
        event="victim_chosen",
        fields=(
            *_decision_fields(ctx, trigger, victim, response, runner_up=best[1] if len(best) > 1 else None),
            ("after_victim", gs.phase is Phase.RECOVERING),  # the episode's previous victim was not enough
            *((("over_rate_limit", True),) if over_limit else ()),
            *facts,
        ),
    )
    sig = SIGKILL if response in (Response.KILL, Response.WOULD_KILL) else SIGTERM
    signal_act, follow, group = _signal_actions(ctx, victim, sig, trigger)
    # A notice tells of a kill: never in a dry run, and the daemon sends it only once
    # signal_act was delivered (a victim already gone was killed by nobody).
    notify = ctx.plan.daemon.notify_desktop and not ctx.plan.daemon.dry_run
    notices = [Notify(guard=ctx.guard.name, after=signal_act, record=rec)] if notify else []
    # The notice (a fork and a D-Bus call) goes last: after SIGKILL, process_mrelease() must
    # not wait for it.
    then: list[Output] = [signal_act, *follow, *notices]
    if isinstance(signal_act, SendSignal) and sig == SIGTERM and _hold_budget_s(ctx.plan) > 0:
        # before_kill gathers its facts while the victim still runs; the SIGTERM and what
        # follows it wait for the hook. At the kill level (SIGKILL) nothing waits.
        hook = _hook(ctx, victim, sig, trigger, signal_act.victim_kind, stage="before_kill")
        then = [HoldForHook(guard=ctx.guard.name, hook=hook, then=(signal_act, *follow, *notices))]
    new = replace(
        gs,
        phase=transition.next,
        phase_since=ctx.obs.now,
        victim=victim,
        trigger=trigger,
        noted=frozenset(),
        signalled=gs.signalled | group,
    )
    return new, [rec, *then], True


_WARNINGS = frozenset({Event.WARN_LEVEL, Event.PSI_WARN})  # what reaches people: the likely victim named


def _warning_due(gs: GuardState, event: Event | None, now: float) -> bool:
    """A warning whose notice may go now: not yet said in this episode, and no notice of this guard's
    in the last WARN_INTERVAL_S. Only then does the core ask for a current ranking (a scan)."""
    if event not in _WARNINGS or str(event) in gs.noted:
        return False
    return gs.warned_at is None or now - gs.warned_at >= WARN_INTERVAL_S


def _warn(gs: GuardState, ctx: _Ctx, detected: _Detected) -> tuple[GuardState, list[Output], bool]:
    """The warn level or a PSI warn trigger: once an episode a record naming the likely victim,
    always; for its owner a notice, at most once a WARN_INTERVAL_S per guard (``notice`` says
    why not). A notice promises a SIGTERM "if this goes on": never in a dry run, which sends
    none (as the kill notice)."""
    now = ctx.obs.now
    due = _warning_due(gs, detected.event, now)
    excluded = gs.stuck | ctx.stuck_elsewhere | ctx.others | gs.signalled | ctx.obs.ineligible
    # Within the minute no scan is asked for: the record names a victim where a ranking is warm anyway.
    best = (ctx.ranking or _empty_ranking(ctx.guard.name)).top(2, excluded)
    victim = best[0] if best else None
    daemon = ctx.plan.daemon
    notice = "sent"
    if not daemon.notify_desktop:
        notice = "notify_desktop off"
    elif daemon.dry_run:
        notice = "dry run"
    elif not due:
        notice = "one a minute"
    elif victim is None:
        notice = "no likely victim"
    fields = _decision_fields(
        ctx, detected.trigger, victim, Response.WARN, runner_up=best[1] if len(best) > 1 else None
    )
    rec = _warn_record(detected.event, (*fields, *detected.facts, ("notice", notice)))
    out: list[Output] = [rec]
    if notice == "sent" and victim is not None:
        out.append(NotifyWarning(guard=ctx.guard.name, uid=int(victim.process.uid), record=rec))
    return replace(gs, noted=gs.noted | {str(detected.event)}, warned_at=now if due else gs.warned_at), out, False


def _hold_budget_s(plan: Plan) -> float:
    """How long a before_kill hook may hold a SIGTERM: its timeout, or 0 (none, or a dry run, which runs no hook)."""
    return plan.hooks.before_kill_timeout_s if plan.hooks.before_kill and not plan.daemon.dry_run else 0.0


def _empty_ranking(guard: str) -> Ranking:
    return Ranking(guard=guard, candidates=(), excluded=(), taken_at=0.0)


# --- building actions ---------------------------------------------------------------------


def _cgroup_target(victim: Candidate) -> str | None:
    """The cgroup to kill, or None to fall back to the process: never the root, which would be everything."""
    path = victim.process.cgroup
    if path is None or path.strip("/") == "":
        return None
    return path


def _signal_actions(
    ctx: _Ctx, victim: Candidate, sig: int, trigger: str
) -> tuple[SendSignal | KillCgroup, list[Action], frozenset[ProcessKey]]:
    """The action that signals a victim, the ones that follow it (release, hook), and every process they may signal."""
    dry_run = ctx.plan.daemon.dry_run
    kind = ctx.guard.victim
    proc = victim.process
    cgroup = _cgroup_target(victim) if kind is VictimKind.CGROUP else proc.cgroup
    if kind is VictimKind.CGROUP and cgroup is None:
        kind = VictimKind.PROCESS  # the cgroup was not read, or is the root: the process alone
    if kind is VictimKind.PROCESS_GROUP and proc.pgid <= 1:
        kind = VictimKind.PROCESS  # killpg(0) is our own group and killpg(1) init's: never
    # The group as the ranking sees it now: members in the scope, protected by no rule.
    ranking = ctx.ranking or _empty_ranking(ctx.guard.name)
    group: tuple[ProcessKey, ...] = ()
    match kind:
        case VictimKind.PROCESS:
            pass
        case VictimKind.PROCESS_GROUP:
            group = ranking.group_of(victim, pgid=proc.pgid)
        case VictimKind.CGROUP:
            group = ranking.group_of(victim, cgroup=cgroup)
        case _:
            assert_never(kind)
    signal_act: SendSignal | KillCgroup
    if kind is VictimKind.CGROUP and sig == SIGKILL:
        assert cgroup is not None
        signal_act = KillCgroup(guard=ctx.guard.name, path=cgroup, dry_run=dry_run, group=group)
    else:
        signal_act = SendSignal(
            guard=ctx.guard.name,
            target=victim.key,
            signal=sig,
            victim_kind=kind,
            pgid=proc.pgid,
            cgroup=cgroup,
            dry_run=dry_run,
            group=group,
        )
    signalled = frozenset(group) | {victim.key}
    follow: list[Action] = []
    if dry_run:
        return signal_act, follow, signalled
    if sig == SIGKILL:
        follow.append(ReleaseMemory(guard=ctx.guard.name, target=victim.key))
    if ctx.plan.hooks.after_kill:
        follow.append(_hook(ctx, victim, sig, trigger, kind))
    return signal_act, follow, signalled


def _hook(
    ctx: _Ctx, victim: Candidate, sig: int, trigger: str, kind: VictimKind, *, stage: str = "after_kill"
) -> RunHook:
    """The after_kill hook of a signal sent, or (``stage`` before_kill) the hook that holds a SIGTERM."""
    proc = victim.process
    env = (
        ("UOOMD_HOOK", stage),
        ("UOOMD_GUARD", ctx.guard.name),
        ("UOOMD_PID", str(proc.pid)),
        ("UOOMD_STARTTIME", str(proc.starttime_ticks)),
        ("UOOMD_NAME", proc.name),
        ("UOOMD_SIGNAL", _SIGNAL_NAMES[sig]),
        ("UOOMD_VICTIM_KIND", str(kind)),
        ("UOOMD_BADNESS", str(victim.badness.points)),
        ("UOOMD_RULES", ",".join(victim.rules)),
        ("UOOMD_TRIGGER", trigger),
        ("UOOMD_RSS_BYTES", str(proc.rss_bytes)),
        ("UOOMD_CGROUP", proc.cgroup or ""),
    )
    if stage == "before_kill":
        hooks = ctx.plan.hooks
        return RunHook(guard=ctx.guard.name, argv=hooks.before_kill, env=env, timeout_s=hooks.before_kill_timeout_s)
    return RunHook(guard=ctx.guard.name, argv=ctx.plan.hooks.after_kill, env=env)


# --- record fields ------------------------------------------------------------------------


def _reading_fields(ctx: _Ctx) -> tuple[tuple[str, object], ...]:
    if ctx.reading is None or ctx.lv is None:
        return (("reading", None),)
    mem = ctx.reading.memory
    fields: list[tuple[str, object]] = [
        ("available_bytes", mem.available_bytes),
        ("available_fraction", round(mem.available_fraction, 4)),
        ("total_bytes", mem.total_bytes),
        ("swap_free_bytes", mem.swap_free_bytes),
        ("swap_total_bytes", mem.swap_total_bytes),
        ("term_threshold_bytes", ctx.lv.term_bytes),
        ("kill_threshold_bytes", ctx.lv.kill_bytes),
        ("swap_term_threshold_bytes", ctx.lv.swap_term_bytes),
        ("swap_kill_threshold_bytes", ctx.lv.swap_kill_bytes),
    ]
    pressure = ctx.reading.pressure
    if pressure is not None:
        fields += [("psi_some_avg10", pressure.some_avg10), ("psi_full_avg10", pressure.full_avg10)]
    return tuple(fields)


def _guard_victim_fields(ctx: _Ctx, victim: Candidate) -> tuple[tuple[str, object], ...]:
    proc = victim.process
    return (
        ("guard", ctx.guard.name),
        ("pid", int(proc.pid)),
        ("name", proc.name),
        ("starttime_ticks", proc.starttime_ticks),
    )


def _kernel_kill_fields(proc: ProcessInfo) -> tuple[tuple[str, object], ...]:
    """The facts the kernel prints for its own kills, in bytes where it prints kB:
    mm/oom_kill.c __oom_kill_process() "Killed process %d (%s) total-vm:%lukB, anon-rss:%lukB,
    file-rss:%lukB, shmem-rss:%lukB, UID:%u pgtables:%lukB oom_score_adj:%hd" (Linux 6.18)."""
    return (
        ("total_vm_bytes", proc.vm_size_bytes),
        ("anon_rss_bytes", proc.rss_anon_bytes),
        ("file_rss_bytes", proc.rss_file_bytes),
        ("shmem_rss_bytes", proc.rss_shmem_bytes),
        ("uid", int(proc.uid)),
        ("pgtables_bytes", proc.pgtables_bytes),
        ("oom_score_adj", proc.oom_score_adj),
    )


def _decision_fields(
    ctx: _Ctx, trigger: str, victim: Candidate | None, response: Response, runner_up: Candidate | None = None
) -> tuple[tuple[str, object], ...]:
    fields: list[tuple[str, object]] = [("guard", ctx.guard.name), ("trigger", trigger), *_reading_fields(ctx)]
    if victim is not None:
        proc = victim.process
        b = victim.badness
        fields += [
            ("pid", int(proc.pid)),
            ("name", proc.name),
            ("starttime_ticks", proc.starttime_ticks),
            ("badness", b.points),
            ("rss_pages", b.rss_pages),
            ("swap_pages", b.swap_pages),
            ("pgtables_pages", b.pgtables_pages),
            ("adj_points", b.adj_points),
            ("totalpages", b.totalpages),
            ("effective_adj", victim.effective_adj),
            ("rules", victim.rules),
            ("rss_bytes", proc.rss_bytes),
            ("victim_kind", str(ctx.guard.victim)),
            *_kernel_kill_fields(proc),
        ]
        fields += [
            ("runner_up_pid", int(runner_up.process.pid) if runner_up else None),
            ("runner_up_name", runner_up.process.name if runner_up else None),
            ("runner_up_badness", runner_up.badness.points if runner_up else None),
        ]
    fields.append(("action", str(response)))
    return tuple(fields)
