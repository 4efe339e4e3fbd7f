"""The ``uoomd record`` loop: read every guard at the daemon's pace and write what it saw as a trace; it never signals.

Each poll reads every guard through the daemon's own sources (uoomd/sources/watch.py: the
memory reader, the pressure file and the policy's PSI triggers), paced as the daemon paces
itself (uoomd/pacing.py), and writes one ``r`` line per guard. Near a level (where the
daemon keeps its ranking warm), or while memory falls toward the kill level fast enough
for a replayed mem_available_eta to act, it ranks the guard's processes as the daemon would
(uoomd/warm.py) and writes the finalists: the policy's best and the kernel's own picks,
each with its badness terms, so a replay under another policy can choose among them. A
finalist that exits gets an ``x`` line: a replay knows when its victim was gone.

It imports no executor and opens no pidfd: a recording is safe beside a live daemon.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from uoomd import pacing
from uoomd.decision import Need, levels
from uoomd.errors import SetupError
from uoomd.logs import Log, Throttle
from uoomd.plan import GuardPlan, Plan
from uoomd.readings import GuardReading, PressureReading, ProcessInfo, ProcessKey
from uoomd.scoring import (
    REASON_ADJ_MIN,
    REASON_INIT,
    REASON_KTHREAD,
    REASON_NO_MM,
    REASON_PARENT,
    REASON_SCOPE,
    REASON_SELF,
    Candidate,
    Exclusion,
    Ranking,
    kernel_badness,
)
from uoomd.sources import cgroup as cgroup_source
from uoomd.sources import procfs
from uoomd.sources.meminfo import read_meminfo_totals
from uoomd.sources.psi import PressureFileGone, PressureReader, PsiTrigger
from uoomd.sources.watch import GuardWatch, open_watch
from uoomd.trace import traced
from uoomd.tracefile import TraceWriter
from uoomd.tracelines import CandidatesLine, EndLine, ExitLine, Header, ReadingLine, TraceGuard
from uoomd.trend import room_and_floor
from uoomd.wakeup import Wakeup
from uoomd.warm import WarmRanking

TOP = 5  # finalists per candidates line: this many by the policy, as many by the kernel's points
# An unchanged list of finalists is written again at most this often; a new order, a new
# process or points moved by more than POINTS_SLACK of the best's are written at once.
CANDIDATES_EVERY_S = 1.0
POINTS_SLACK = 0.01
# A finalist is watched for its exit until it has not been listed for this long; a victim in
# flight is listed at every poll near a level, so this covers any escalation.
TRACK_S = 30.0
MAX_TRACKED = 64
# Each check is a read of /proc/PID/stat (~20 us): the policy's best of each guard, the likely
# victim, is checked at every poll; the other finalists at most this often, so an exit of one
# of them is seen up to this late.
EXIT_CHECK_S = 0.1
ERROR_LOG_INTERVAL_S = 30.0
# Finalists are listed, far from the levels too, while the last two readings' fall reaches the
# kill level within this: a replayed mem_available_eta up to this long finds its candidates.
FALL_HORIZON_S = 10.0
# Exclusions that depend on no policy: a replay under any policy excludes them the same way.
_FIXED_REASONS = frozenset({REASON_KTHREAD, REASON_INIT, REASON_NO_MM, REASON_ADJ_MIN, REASON_SELF, REASON_PARENT})


@dataclass(slots=True)
class _Listed:
    """What was last written for a guard's finalists."""

    at: float
    keys: tuple[ProcessKey, ...]
    points: tuple[int, ...]


@dataclass(slots=True)
class RecordStats:
    polls: int = 0
    readings: int = 0
    candidates: int = 0
    exits: int = 0


@dataclass(slots=True)
class _Details:
    """The expensive details of a finalist, read once (a rule of another policy may need them)."""

    cmdline: str | None
    exe: str | None
    cgroup: str | None
    user: str | None


def finalists(ranking: Ranking, *, top: int = TOP) -> list[Candidate | Exclusion]:
    """The processes a replay may have to choose among: the policy's best ``top``, then the
    ``top`` with the most kernel badness among every process a policy could choose (the
    candidates, and those excluded only by this policy's rules or min_badness)."""
    chosen: list[Candidate | Exclusion] = list(ranking.candidates[:top])
    inputs = ranking.inputs
    pool: list[tuple[int, int, Candidate | Exclusion]] = [
        (c.kernel_points, i, c) for i, c in enumerate(ranking.candidates)
    ]
    if inputs is not None:
        for i, e in enumerate(ranking.excluded):
            if e.reason in _FIXED_REASONS or e.reason == REASON_SCOPE:
                continue
            points = kernel_badness(e.process, totalpages=inputs.totalpages, page_size=inputs.page_size)
            pool.append((points, len(ranking.candidates) + i, e))
    seen = {r.process.key for r in chosen}
    for _points, _i, result in heapq.nlargest(top, pool, key=lambda item: (item[0], -item[1])):
        if result.process.key not in seen:
            seen.add(result.process.key)
            chosen.append(result)
    return chosen


@dataclass(slots=True)
class Recorder:
    """The open sources of every guard, the warm ranking and what was written; one tick per poll."""

    plan: Plan
    writer: TraceWriter
    log: Log
    started_at: float
    proc_root: str = "/proc"
    clock: Callable[[], float] = time.monotonic
    psi_every_poll: bool = False
    watches: list[GuardWatch] = field(default_factory=list)
    stats: RecordStats = field(default_factory=RecordStats)
    _pressure: dict[str, PressureReader] = field(default_factory=dict)
    _listed: dict[str, _Listed] = field(default_factory=dict)
    _tracked: dict[ProcessKey, float] = field(default_factory=dict)
    _details: dict[ProcessKey, _Details] = field(default_factory=dict)
    _best: dict[str, ProcessKey] = field(default_factory=dict)  # each guard's best: its exit is checked every poll
    _checked_at: float = float("-inf")
    _ranked: dict[str, Ranking] = field(default_factory=dict)  # the ranking each guard's last line came from
    _throttle: Throttle = field(init=False)
    _warm: WarmRanking = field(init=False)

    def __post_init__(self) -> None:
        self._throttle = Throttle(self.log, self.clock, ERROR_LOG_INTERVAL_S)
        self._warm = WarmRanking(self.proc_root, self._throttle.warning)

    def open(self) -> None:
        now = self.clock()
        for guard in self.plan.guards:
            self.watches.append(open_watch(guard, proc_root=self.proc_root, now=now, log=self.log, refaults=True))
        if self.psi_every_poll:
            for watch in self.watches:
                path = cgroup_source.pressure_path_for(watch.guard.scope, self.proc_root)
                if path is not None:
                    self._pressure[watch.guard.name] = PressureReader(path)

    def close(self) -> None:
        for watch in self.watches:
            watch.close()
        for reader in self._pressure.values():
            reader.close()
        self._pressure.clear()
        self._warm.close()

    # -- one poll

    def tick(self, now: float) -> float:
        """Read, write, and say how long to sleep."""
        self.stats.polls += 1
        at = now - self.started_at
        readings: list[GuardReading] = []
        for watch in self.watches:
            reading = watch.read(now, proc_root=self.proc_root, log=self.log, on_error=self._throttle.warning)
            if reading is None:
                continue
            pressure = reading.pressure or self._read_pressure(watch.guard.name)
            self.writer.write(
                ReadingLine(
                    at=at, guard=reading.guard, memory=reading.memory, pressure=pressure, fired=reading.psi_fired
                )
            )
            self.stats.readings += 1
            readings.append(reading)
        self._write_exits(now, at)
        near = {r.guard: self._need(r) for r in readings if self._near(r)}
        if near:
            rankings = self._warm.provide(self.plan, near, readings, now)
            for name, ranking in rankings.items():
                self._write_candidates(name, ranking, now, at)
        elif self._warm.active:
            self._warm.drop()  # far from every level: hold no /proc fd, as the daemon does
            self._listed.clear()
            self._ranked.clear()
        self.writer.flush()
        return self._next_timeout(now)

    def last_tick(self, now: float) -> None:
        """The machine as it was when told to stop, every watched finalist checked for its exit."""
        self._checked_at = float("-inf")
        self.tick(now)

    def _read_pressure(self, guard: str) -> PressureReading | None:
        reader = self._pressure.get(guard)
        if reader is None:
            return None
        try:
            return reader.read()
        except (OSError, ValueError, PressureFileGone):
            return None

    def _need(self, reading: GuardReading) -> Need:
        """As the daemon ranks: current where a level is crossed or a trigger fired (a choice may be
        made now), else warm (rescanned at a bounded rate, uoomd/warm.py)."""
        guard = self.plan.guard(reading.guard)
        lv = levels(reading.memory, guard)
        return Need.NOW if lv.term_crossed or lv.kill_crossed or reading.psi_fired else Need.WARM

    def _near(self, reading: GuardReading) -> bool:
        """Where a replay may choose a victim: where the daemon keeps a ranking warm, or where
        memory falls fast enough to reach the kill level within FALL_HORIZON_S (a replayed
        mem_available_eta acts there, far above the levels of a large machine)."""
        watch = next(w for w in self.watches if w.guard.name == reading.guard)
        guard = watch.guard
        if pacing.warm_ranking_needed(reading.memory, guard):
            return True
        # watch.read() has just remembered this reading: the one before it is watch.previous.
        if watch.previous is None or watch.last_at <= watch.previous_at:
            return False
        room, floor = room_and_floor(reading.memory, guard)
        before, _ = room_and_floor(watch.previous, guard)
        fall = (before - room) / (watch.last_at - watch.previous_at)
        horizon_s = max(FALL_HORIZON_S, guard.eta.eta_s + guard.eta.sustain_s) if guard.eta else FALL_HORIZON_S
        return fall > 0 and (room - floor) / fall <= horizon_s

    def _write_candidates(self, guard: str, ranking: Ranking, now: float, at: float) -> None:
        last = self._listed.get(guard)
        if self._ranked.get(guard) is ranking and last is not None and now - last.at < CANDIDATES_EVERY_S:
            return  # the same warm ranking as last poll: nothing new to list
        self._ranked[guard] = ranking
        chosen = finalists(ranking)
        keys = tuple(r.process.key for r in chosen)
        points = tuple(r.badness.points if isinstance(r, Candidate) else -1 for r in chosen)
        if ranking.candidates:
            self._best[guard] = ranking.candidates[0].key
        if last is not None and last.keys == keys and now - last.at < CANDIDATES_EVERY_S:
            slack = max(1, int(abs(points[0]) * POINTS_SLACK)) if points else 1
            if all(abs(a - b) <= slack for a, b in zip(points, last.points, strict=True)):
                return
        self._listed[guard] = _Listed(at=now, keys=keys, points=points)
        inputs = ranking.inputs
        assert inputs is not None  # rank() sets them
        items = tuple(traced(self._with_details(r)) for r in chosen)
        self.writer.write(
            CandidatesLine(
                at=at,
                guard=guard,
                totalpages=inputs.totalpages,
                system_totalpages=inputs.system_totalpages,
                processes=items,
            )
        )
        self.stats.candidates += 1
        for key in keys:
            self._tracked[key] = now
        if len(self._tracked) > MAX_TRACKED:
            for key in sorted(self._tracked, key=self._tracked.__getitem__)[: len(self._tracked) - MAX_TRACKED]:
                del self._tracked[key]
                self._details.pop(key, None)

    def _with_details(self, result: Candidate | Exclusion) -> Candidate | Exclusion:
        """The finalist with every detail a rule can match on (cmdline, exe, cgroup, user), read
        once per process: the recording policy may not need them, another policy may."""
        process = result.process
        missing = [k for k in procfs.DETAILS if getattr(process, k) is None]
        if not missing:
            return result
        details = self._details.get(process.key)
        if details is None:
            info = procfs.read_process(self.proc_root, process.pid, procfs.DETAILS)
            if info is None or info.starttime_ticks != process.starttime_ticks:
                return result
            details = _Details(cmdline=info.cmdline, exe=info.exe, cgroup=info.cgroup, user=info.user)
            self._details[process.key] = details
        filled: ProcessInfo = replace(
            process,
            cmdline=process.cmdline if process.cmdline is not None else details.cmdline,
            exe=process.exe if process.exe is not None else details.exe,
            cgroup=process.cgroup if process.cgroup is not None else details.cgroup,
            user=process.user if process.user is not None else details.user,
        )
        return replace(result, process=filled)

    def _write_exits(self, now: float, at: float) -> None:
        """An ``x`` line for each watched finalist that is gone, recycled, or a zombie (what
        the daemon's pidfd reports as an exit); finalists long unlisted are let go."""
        every = now - self._checked_at >= EXIT_CHECK_S
        if every:
            self._checked_at = now
        best = set(self._best.values())
        for key, listed_at in list(self._tracked.items()):
            if not every and key not in best:
                continue
            stat = procfs.read_stat(self.proc_root, key.pid)
            gone = stat is None or stat.starttime_ticks != key.starttime_ticks or stat.state in ("Z", "X")
            if gone:
                self.writer.write(ExitLine(at=at, key=key))
                self.stats.exits += 1
            if gone or now - listed_at > TRACK_S:
                del self._tracked[key]
                self._details.pop(key, None)

    def _next_timeout(self, now: float) -> float:
        daemon = self.plan.daemon
        timeouts = [daemon.poll_max_s]
        for watch in self.watches:
            if watch.gone_at is not None:
                timeouts.append(max(0.0, watch.retry_at - now))
            elif watch.last is None:
                timeouts.append(daemon.poll_min_s)
            else:
                dt = watch.last_at - watch.previous_at if watch.previous is not None else 0.0
                timeouts.append(pacing.next_poll_s(watch.last, watch.previous, dt, watch.guard, daemon))
        return min(timeouts)

    def poll_fds(self) -> dict[int, tuple[GuardWatch, PsiTrigger]]:
        """The PSI trigger fds to sleep on, as the daemon does: an event wakes the next poll."""
        out: dict[int, tuple[GuardWatch, PsiTrigger]] = {}
        for watch in self.watches:
            for trigger in watch.triggers:
                if trigger is not None and trigger.pollable:
                    out[trigger.fileno()] = (watch, trigger)
        return out


def make_header(plan: Plan, *, policy_text: str | None, psi_every_poll: bool, proc_root: str, now: float) -> Header:
    ram, swap = read_meminfo_totals(proc_root)
    uname = os.uname()
    return Header(
        started_at=now,
        started_wall=time.time(),
        host=uname.nodename,
        kernel=uname.release,
        page_size=procfs.read_page_size(),
        ram_bytes=ram,
        swap_bytes=swap,
        source="uoomd record",
        policy=plan.source,
        policy_text=policy_text,
        details=procfs.DETAILS,
        psi_every_poll=psi_every_poll,
        guards=tuple(trace_guard(g) for g in plan.guards),
    )


def trace_guard(guard: GuardPlan) -> TraceGuard:
    """A guard as a trace's header names it (the daemon's own traces too: uoomd/flight.py)."""
    return TraceGuard(
        name=guard.name,
        scope=guard.scope.describe(),
        psi=tuple(f"{t.describe()} sustain {t.sustain_s:g}s {t.action}" for t in guard.psi),
    )


def run_recorder(
    plan: Plan,
    *,
    output: str,
    duration_s: float | None,
    max_bytes: int,
    policy_text: str | None,
    psi_every_poll: bool,
    log: Log,
    proc_root: str = "/proc",
) -> RecordStats:
    """``uoomd record``: until ``duration_s`` has passed, SIGINT/SIGTERM/SIGHUP, or for ever."""
    started = time.monotonic()
    header = make_header(plan, policy_text=policy_text, psi_every_poll=psi_every_poll, proc_root=proc_root, now=started)
    try:
        writer = TraceWriter(output, header, max_bytes=max_bytes)
    except OSError as exc:
        raise SetupError(f"cannot write the trace {output}: {exc.strerror or exc}") from None
    recorder = Recorder(
        plan=plan, writer=writer, log=log, started_at=started, proc_root=proc_root, psi_every_poll=psi_every_poll
    )
    wakeup = Wakeup()
    wakeup.install_signal_handlers()
    reason = "signal"
    deadline = started + duration_s if duration_s is not None else float("inf")
    try:
        recorder.open()
        log.info(
            "recording_started",
            output=output,
            policy=plan.source,
            guards=[g.name for g in plan.guards],
            duration_s=duration_s,
            max_bytes=writer.max_bytes,
            psi_every_poll=psi_every_poll,
        )
        while True:
            now = time.monotonic()
            if now >= deadline:
                reason = "duration"
                break
            timeout_s = min(recorder.tick(now), max(0.0, deadline - time.monotonic()))
            owners = recorder.poll_fds()
            for fd, revents in wakeup.wait(dict.fromkeys(owners, select.POLLPRI), timeout_s):
                watch, trigger = owners[fd]
                watch.note_revents(trigger, revents, now=time.monotonic(), log=log)
            if wakeup.take_signals():
                recorder.last_tick(time.monotonic())
                break
    finally:
        with contextlib.suppress(OSError):
            writer.write(EndLine(at=time.monotonic() - started, reason=reason))
        writer.close()
        recorder.close()
        wakeup.close()
    log.info(
        "recording_stopped",
        output=output,
        reason=reason,
        polls=recorder.stats.polls,
        readings=recorder.stats.readings,
        candidates=recorder.stats.candidates,
        exits=recorder.stats.exits,
        bytes=writer.size_bytes,
        rotations=writer.rotations,
    )
    return recorder.stats
