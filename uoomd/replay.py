"""Run the pure decision core over a recorded trace: what a policy would have done and when, and where two differ.

The replay steps :func:`uoomd.decision.step` exactly as the daemon's loop does: one
observation per recorded poll (every guard's reading at that poll), the core's own
:func:`uoomd.decision.needs` says which guards need a ranking, and the step is skipped where
:func:`uoomd.decision.is_quiet` says it changes nothing. Rankings come from the trace's
candidates, scored afresh under the replayed policy (its rules, its min_badness); a victim
is alive until the trace says it exited. So replaying a trace under the policy it was
recorded with reproduces the live daemon's decisions, and under another policy says what
that one would have done to the same machine. After a decision the machine goes on as
recorded: a victim that did not exit in the trace (nothing killed it then) stays alive, and
the replay escalates as the daemon would have against a victim that does not die.

Pure: it takes parsed trace lines (uoomd/tracefile.py reads them) and a Plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from uoomd.actions import Record
from uoomd.decision import Need, Phase, State, initial_state, is_quiet, levels, needs, step
from uoomd.logs import escape
from uoomd.plan import GuardPlan, Plan
from uoomd.readings import GuardReading, Observation, ProcessKey
from uoomd.scoring import Candidate, Exclusion, Ranking, score_process, victim_order
from uoomd.sources.psi import PsiWindow
from uoomd.thrash import RefaultMeter, advance, gate_bytes_per_s
from uoomd.trace import TraceError
from uoomd.tracelines import (
    RECORDED_BY_UOOMD,
    CandidatesLine,
    DecisionLine,
    EndLine,
    ExitLine,
    Header,
    ReadingLine,
    TraceItem,
)

DECISIONS = frozenset({"victim_chosen", "victim_escalated"})
# Two decisions of two policies for the same guard, on different victims, within this many
# seconds of each other are shown as one row (the policies differ on whom); farther apart,
# each is a decision the other policy did not take.
PAIR_S = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Moment:
    """One line of the timeline: what happened to a guard at ``at`` (seconds since the trace began)."""

    at: float
    guard: str
    event: str  # level_crossed, level_left, trigger_fired, or the core's own record names
    facts: tuple[tuple[str, object], ...] = ()

    def get(self, key: str, default: object = None) -> object:
        for name, value in self.facts:
            if name == key:
                return value
        return default


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardSummary:
    guard: str
    readings: int
    lowest_available_bytes: int | None = None
    lowest_at: float | None = None
    lowest_headroom_bytes: int | None = None  # above the kill level, at the lowest reading


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeline:
    policy: str
    header: Header
    moments: tuple[Moment, ...]
    guards: tuple[GuardSummary, ...]
    notes: tuple[str, ...]
    duration_s: float
    polls: int

    @property
    def decisions(self) -> tuple[Moment, ...]:
        return tuple(m for m in self.moments if m.event in DECISIONS)


# --- the replay --------------------------------------------------------------------------------


class _ComputedTrigger:
    """A PSI trigger the trace did not record, computed from its stall totals (as a polled trigger is)."""

    def __init__(self, stall_us: int, window_us: int, kind: str) -> None:
        self.window = PsiWindow(stall_us, window_us)
        self.window_s = window_us / 1e6
        self.kind = kind
        self.last_fired: float | None = None

    def fired(self, at: float, reading: ReadingLine) -> bool:
        if reading.pressure is None:
            return False
        total = reading.pressure.some_total_us if self.kind == "some" else reading.pressure.full_total_us
        if not self.window.update(at, total):
            return False
        if self.last_fired is not None and at < self.last_fired + self.window_s:
            return False  # at most once per window, like the kernel's update_triggers()
        self.last_fired = at
        return True


@dataclass(slots=True)
class _GuardReplay:
    plan: GuardPlan
    source: str  # the trace's guard it reads
    recorded_psi: bool  # the trace's `fired` are this guard's own triggers
    computed: list[_ComputedTrigger] = field(default_factory=list)
    ranking: Ranking | None = None
    refaults: RefaultMeter = field(default_factory=RefaultMeter)  # as the daemon's GuardWatch keeps it
    line: CandidatesLine | None = None
    crossed: tuple[bool, bool] = (False, False)  # term, kill
    readings: int = 0
    lowest: tuple[float, int, int] | None = None  # at, available, headroom


def _trigger_text(guard: GuardPlan, index: int) -> str:
    t = guard.psi[index]
    return f"{t.describe()} sustain {t.sustain_s:g}s {t.action}"


def _map_guards(plan: Plan, header: Header, notes: list[str]) -> dict[str, _GuardReplay]:
    """Each plan guard reads the trace's guard of the same name, else of the same scope, else the only one."""
    by_name = {g.name: g for g in header.guards}
    out: dict[str, _GuardReplay] = {}
    for guard in plan.guards:
        source = by_name.get(guard.name)
        if source is None:
            same_scope = [g for g in header.guards if g.scope == guard.scope.describe()]
            source = same_scope[0] if same_scope else header.guards[0] if len(header.guards) == 1 else None
            if source is None:
                notes.append(f"guard {guard.name}: no guard of the trace matches it by name or scope; it reads nothing")
                continue
            notes.append(f"guard {guard.name} reads the trace's guard {source.name} ({source.scope})")
        if source.scope != guard.scope.describe():
            notes.append(
                f"guard {guard.name} watches {guard.scope.describe()}, the trace recorded {source.scope}: "
                "its levels are resolved against the recorded totals"
            )
        own = tuple(_trigger_text(guard, i) for i in range(len(guard.psi)))
        recorded = own == source.psi and header.source in RECORDED_BY_UOOMD
        replay = _GuardReplay(plan=guard, source=source.name, recorded_psi=recorded)
        if guard.psi and not recorded:
            replay.computed = [_ComputedTrigger(t.stall_us, t.window_us, str(t.kind)) for t in guard.psi]
            where = "at every poll" if header.psi_every_poll else "only where the recording policy read them"
            notes.append(
                f"guard {guard.name}: its PSI triggers are not the recorded ones; computed from the stall "
                f"totals, which the trace has {where}"
            )
        out[guard.name] = replay
    return out


def _ranking(line: CandidatesLine, plan: Plan, guard: GuardPlan, page_size: int, exited: set[ProcessKey]) -> Ranking:
    """The trace's finalists as this policy ranks them."""
    candidates: list[Candidate] = []
    excluded: list[Exclusion] = []
    for item in line.processes:
        if item.process.key in exited:
            continue
        result = score_process(
            item.process,
            plan,
            guard,
            line.totalpages,
            page_size=page_size,
            system_totalpages=line.system_totalpages,
        )
        if isinstance(result, Candidate):
            candidates.append(result)
        else:
            excluded.append(result)
    candidates.sort(key=victim_order)
    return Ranking(guard=guard.name, candidates=tuple(candidates), excluded=tuple(excluded), taken_at=line.at)


def _ticks(items: Iterable[TraceItem]) -> Iterator[tuple[float, list[TraceItem]]]:
    """The trace's lines grouped by poll (the recorder stamps every line of a poll with its time)."""
    batch: list[TraceItem] = []
    at: float | None = None
    for item in items:
        if isinstance(item, Header):
            continue
        t = item.at
        if at is not None and t != at:
            yield at, batch
            batch = []
        at = t
        batch.append(item)
    if at is not None and batch:
        yield at, batch


def replay(items: Iterable[TraceItem], plan: Plan) -> Timeline:
    """The timeline of ``plan`` over a trace. The first item must be a header; a later header must
    be of the same recording (a rotated file), else TraceError."""
    iterator = iter(items)
    header = next(iterator, None)
    if not isinstance(header, Header):
        raise TraceError("a trace starts with its header line")

    def checked(stream: Iterator[TraceItem]) -> Iterator[TraceItem]:
        for item in stream:
            if isinstance(item, Header) and item.started_at != header.started_at:
                raise TraceError("these files are from different recordings (their headers differ)")
            yield item

    run = _Replayer(plan, header)
    for at, batch in _ticks(checked(iterator)):
        run.poll(at, batch)
    return run.timeline()


class _Replayer:
    """The daemon's loop with the trace for a machine: one poll per recorded poll."""

    def __init__(self, plan: Plan, header: Header) -> None:
        self.plan = plan
        self.header = header
        self.notes: list[str] = list(header.notes)
        self.guards = _map_guards(plan, header, self.notes)
        self.state: State = initial_state(plan)
        self.moments: list[Moment] = []
        self.exited: set[ProcessKey] = set()
        self.polls = 0
        self.last_at = 0.0

    def poll(self, at: float, batch: list[TraceItem]) -> None:
        readings: dict[str, ReadingLine] = {}
        for item in batch:
            match item:
                case ReadingLine():
                    readings[item.guard] = item
                case ExitLine():
                    self.exited.add(item.key)
                case CandidatesLine():
                    for g in self.guards.values():
                        if g.source == item.guard:
                            g.line, g.ranking = item, None  # scored when a step needs it
                case DecisionLine() | EndLine() | Header():
                    pass
        if not readings:
            return
        self.polls += 1
        self.last_at = at
        observed: list[GuardReading] = []
        for name, g in self.guards.items():
            line = readings.get(g.source)
            if line is None:
                continue
            fired = line.fired if g.recorded_psi else tuple(i for i, c in enumerate(g.computed) if c.fired(at, line))
            gate = gate_bytes_per_s(g.plan, line.memory.total_bytes)
            g.refaults = advance(g.refaults, line.memory.refault_bytes, at, gate_bytes_per_s=gate)
            observed.append(
                GuardReading(
                    guard=name,
                    memory=line.memory,
                    pressure=line.pressure,
                    psi_fired=fired,
                    refault_rate=g.refaults.rate,
                    refault_above_since=g.refaults.above_since,
                )
            )
            self.moments += _watch_levels(g, at, line, fired)
        alive = frozenset(k for k in self.state.in_flight() if k not in self.exited)
        obs = Observation(now=at, guards=tuple(observed), alive=alive)
        rankings = self._rankings(obs)
        # As the daemon's loop: no step where is_quiet() says it would change nothing.
        if rankings or not is_quiet(self.state, obs, self.plan):
            self.state, outputs = step(self.state, obs, self.plan, rankings)
            self.moments += [_moment(at, o) for o in outputs if isinstance(o, Record)]

    def _rankings(self, obs: Observation) -> dict[str, Ranking]:
        """The rankings the core asks for (needs()), from the newest candidates of each guard."""
        out: dict[str, Ranking] = {}
        for name, need in needs(self.state, obs, self.plan).items():
            g = self.guards.get(name)
            if need is Need.NONE or g is None or g.line is None:
                continue
            if g.ranking is None or need is Need.NOW:
                g.ranking = _ranking(g.line, self.plan, g.plan, self.header.page_size, self.exited)
            out[name] = g.ranking
        return out

    def timeline(self) -> Timeline:
        summaries = tuple(
            GuardSummary(
                guard=name,
                readings=g.readings,
                lowest_available_bytes=g.lowest[1] if g.lowest else None,
                lowest_at=g.lowest[0] if g.lowest else None,
                lowest_headroom_bytes=g.lowest[2] if g.lowest else None,
            )
            for name, g in self.guards.items()
        )
        _note_unfinished(self.state, self.notes)
        return Timeline(
            policy=self.plan.source,
            header=self.header,
            moments=tuple(self.moments),
            guards=summaries,
            notes=tuple(self.notes),
            duration_s=self.last_at,
            polls=self.polls,
        )


def _note_unfinished(state: State, notes: list[str]) -> None:
    for gs in state.guards:
        if gs.phase is not Phase.IDLE and gs.victim is not None:
            proc = gs.victim.process
            notes.append(
                f"guard {gs.guard}: the trace ends with pid {proc.pid} ({escape(proc.name)}) in {gs.phase}: "
                "it had not exited when the recording stopped"
            )


def _watch_levels(g: _GuardReplay, at: float, line: ReadingLine, fired: tuple[int, ...]) -> list[Moment]:
    """Levels crossed and left, triggers fired, and the lowest point of the guard's memory."""
    g.readings += 1
    lv = levels(line.memory, g.plan)
    headroom = line.memory.available_bytes - lv.kill_bytes
    if g.lowest is None or line.memory.available_bytes < g.lowest[1]:
        g.lowest = (at, line.memory.available_bytes, headroom)
    out: list[Moment] = []
    facts: tuple[tuple[str, object], ...] = (
        ("available_bytes", line.memory.available_bytes),
        ("term_threshold_bytes", lv.term_bytes),
        ("kill_threshold_bytes", lv.kill_bytes),
        ("headroom_bytes", headroom),
    )
    for index, (level, now_crossed) in enumerate((("term", lv.term_crossed), ("kill", lv.kill_crossed))):
        if now_crossed != g.crossed[index]:
            event = "level_crossed" if now_crossed else "level_left"
            out.append(Moment(at=at, guard=g.plan.name, event=event, facts=(("level", level), *facts)))
    g.crossed = (lv.term_crossed, lv.kill_crossed)
    for index in fired:
        if index < len(g.plan.psi):
            out.append(
                Moment(
                    at=at,
                    guard=g.plan.name,
                    event="trigger_fired",
                    facts=(("trigger", _trigger_text(g.plan, index)), *facts),
                )
            )
    return out


def _moment(at: float, record: Record) -> Moment:
    facts = record.fields
    d = record.as_dict()
    available, kill = d.get("available_bytes"), d.get("kill_threshold_bytes")
    if isinstance(available, int) and isinstance(kill, int):
        facts = (*facts, ("headroom_bytes", available - kill))
    return Moment(at=at, guard=str(d.get("guard", "")), event=record.event, facts=facts)


# --- two policies --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DiffRow:
    """A decision of one policy and the other's counterpart, if any."""

    guard: str
    a: Moment | None
    b: Moment | None
    verdict: str  # "same", "same victim, B earlier by 1.2s", "different victim", "only A", "only B"

    @property
    def at(self) -> float:
        times = [m.at for m in (self.a, self.b) if m is not None]
        return min(times)


def _victim(m: Moment) -> tuple[object, object, object]:
    return (m.get("pid"), m.get("starttime_ticks"), m.get("action"))


def diff(a: Timeline, b: Timeline, *, tolerance_s: float = 0.0) -> tuple[DiffRow, ...]:
    """Where two policies decide differently on one trace: decisions on the same victim are
    paired in order (with how much sooner one took it), then unpaired decisions of one guard
    within PAIR_S of each other (different victims), then what only one took."""
    left, right = list(a.decisions), list(b.decisions)
    pairs: dict[int, int] = {}
    j_floor = 0
    for i, m in enumerate(left):
        for j in range(j_floor, len(right)):
            if j not in pairs.values() and right[j].guard == m.guard and _victim(right[j]) == _victim(m):
                pairs[i] = j
                j_floor = j + 1
                break
    rows: list[DiffRow] = []
    for i, j in pairs.items():
        dt = right[j].at - left[i].at
        if abs(dt) <= tolerance_s:
            verdict = "same"
        else:
            verdict = f"same victim, {'B' if dt < 0 else 'A'} earlier by {abs(dt):.3f}s"
        rows.append(DiffRow(guard=left[i].guard, a=left[i], b=right[j], verdict=verdict))
    rest_a = [m for i, m in enumerate(left) if i not in pairs]
    paired_b = set(pairs.values())
    rest_b = [m for j, m in enumerate(right) if j not in paired_b]
    for m in rest_a:
        near = next((n for n in rest_b if n.guard == m.guard and abs(n.at - m.at) <= PAIR_S), None)
        if near is not None:
            rest_b.remove(near)
            rows.append(DiffRow(guard=m.guard, a=m, b=near, verdict="different victim"))
        else:
            rows.append(DiffRow(guard=m.guard, a=m, b=None, verdict="only A"))
    rows += [DiffRow(guard=m.guard, a=None, b=m, verdict="only B") for m in rest_b]
    rows.sort(key=lambda r: r.at)
    return tuple(rows)
