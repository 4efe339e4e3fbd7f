"""The daemon loop: wait, read, step, execute, log; a reload keeps the last good plan.

One iteration (a *tick*): read each guard's memory (a pread of a kept file, ~17 µs),
its PSI triggers, keep the candidate ranking warm while a guard nears its term level,
re-check the chosen victim against /proc when a guard crosses, hand everything to the
pure :func:`uoomd.decision.step`, execute the actions it returns and log every record.
Then sleep in ``poll()`` on the PSI trigger fds, the in-flight victims' pidfds and the
signal wake-up pipe, for as long as :mod:`uoomd.pacing` says is safe.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from uoomd import decision, pacing
from uoomd.actions import Executor, LiveExecutor
from uoomd.decision import KillCgroup, Phase, Record, SendSignal, State
from uoomd.errors import ExitCode, PolicyError, SetupError
from uoomd.logs import Log, configure, escape
from uoomd.plan import GuardPlan, Plan, PsiKind, ScopeKind
from uoomd.policy.isolated import load_plan_isolated
from uoomd.readings import GuardReading, MemoryReading, Observation, Pid, PressureReading, ProcessKey, Snapshot
from uoomd.results import ActionResult, Outcome
from uoomd.scoring import Candidate, Ranking, rank, score_process, uoomd_pids
from uoomd.service import Notifier, protect_self
from uoomd.sources import cgroup as cgroup_source
from uoomd.sources import procfs
from uoomd.sources.meminfo import MeminfoError
from uoomd.sources.psi import PressureFileGone, PressureReader, PsiKindName, PsiTrigger, PsiTriggerGone, TriggerMode
from uoomd.sources.scope import MemoryReader, open_memory_reader
from uoomd.status import StatusBoard

if TYPE_CHECKING:
    from uoomd.desktop import DesktopNotices

# The warm ranking may cost at most this share of one core: a rescan that took
# 50 ms is not repeated within 50 ms / SCAN_CPU_SHARE.
SCAN_CPU_SHARE = 0.1
WARM_REFRESH_MIN_S = 0.5
# A victim re-check that finds the best candidate gone tries the next ones, up to this many,
# before a full rescan: the crossing must cost a few /proc reads, not a scan.
RECHECK_DEPTH = 8
# A source that fails is retried; the failure is logged once per this many seconds.
ERROR_LOG_INTERVAL_S = 30.0
HOOK_POLL_S = 0.1
# With no guard near its levels, the state file (`uoomd status`) is rewritten this often.
# A quiet daemon still does a full tick this often (status line, state file, stuck victims).
QUIET_FULL_TICK_S = 30.0
QUIET_STATE_WRITE_S = 60.0  # `uoomd status` shows the age; a dump costs ~1 ms of a cold daemon
# A guard that crossed with an empty warm ranking rescans at most this often.
EMPTY_RESCAN_S = 0.1


class StopDaemon(Exception):
    """Raised inside the loop to stop cleanly."""


@dataclass(slots=True)
class GuardWatch:
    """The open sources of one guard, and what the loop remembers of its last reading."""

    guard: GuardPlan
    memory: MemoryReader
    pressure: PressureReader | None
    triggers: tuple[PsiTrigger | None, ...]
    previous: MemoryReading | None = None
    previous_at: float = 0.0
    last: MemoryReading | None = None
    last_at: float = 0.0
    last_pressure: PressureReading | None = None
    psi_event_seen: bool = False  # a kernel trigger's fd signalled since the last reading

    @property
    def has_polled_trigger(self) -> bool:
        """A PSI trigger the kernel refused: it needs the pressure file read at every poll."""
        return any(t is not None and t.mode is TriggerMode.POLLED for t in self.triggers)

    def remember(self, memory: MemoryReading, now: float) -> None:
        """Keep this reading and the one before it, for pacing's fall rate."""
        if self.last is not None:
            self.previous, self.previous_at = self.last, self.last_at
        self.last, self.last_at = memory, now

    def close(self) -> None:
        self.memory.close()
        if self.pressure is not None:
            self.pressure.close()
        for trigger in self.triggers:
            if trigger is not None:
                trigger.close()


@dataclass(slots=True)
class Warm:
    """The ranking kept warm between ticks."""

    rankings: dict[str, Ranking] = field(default_factory=dict)
    snapshot: Snapshot | None = None
    scanned_at: float = float("-inf")
    scan_cost_s: float = 0.0


def open_watch(guard: GuardPlan, *, proc_root: str, now: float, log: Log) -> GuardWatch:
    """Open a guard's sources; a PSI trigger the kernel refuses falls back to polling, and says so."""
    memory = open_memory_reader(guard.scope, proc_root)
    pressure: PressureReader | None = None
    triggers: list[PsiTrigger | None] = []
    if guard.psi:
        path = cgroup_source.pressure_path_for(guard.scope, proc_root)
        if path is None:
            log.warning("psi_unavailable", guard=guard.name, scope=guard.scope.describe(), triggers=len(guard.psi))
            triggers = [None] * len(guard.psi)
        else:
            pressure = PressureReader(path)
            initial = pressure.read()
            for index, plan_trigger in enumerate(guard.psi):
                kind: PsiKindName = "some" if plan_trigger.kind is PsiKind.SOME else "full"
                trigger = PsiTrigger.arm(
                    path, kind, plan_trigger.stall_us, plan_trigger.window_us, now=now, initial=initial
                )
                triggers.append(trigger)
                log.info(
                    "psi_trigger_armed",
                    guard=guard.name,
                    trigger=index,
                    path=path,
                    mode=str(trigger.mode),
                    kind=trigger.kind,
                    stall_us=trigger.stall_us,
                    window_us=trigger.window_us,
                    reason=trigger.reason,
                )
    return GuardWatch(guard=guard, memory=memory, pressure=pressure, triggers=tuple(triggers))


def _system_totalpages(snapshot: Snapshot) -> int:
    return (snapshot.total_ram_bytes + snapshot.total_swap_bytes) // snapshot.page_size


def guard_totalpages(reading: MemoryReading, page_size: int) -> int:
    """totalpages for oom_badness(): RAM + swap for the system, the cgroup's limit plus its
    swap allowance for a cgroup (mm/memcontrol.c mem_cgroup_get_max(), Linux 6.18)."""
    return max(1, (reading.total_bytes + reading.swap_total_bytes) // page_size)


class Daemon:
    """The loop's state: the plan, the open sources, the escalation state and the warm ranking."""

    def __init__(
        self,
        plan: Plan,
        *,
        executor: Executor,
        log: Log,
        notifier: Notifier | None = None,
        proc_root: str = "/proc",
        clock: Callable[[], float] = time.monotonic,
        load_plan: Callable[[str], Plan] | None = None,
        forced_dry_run: bool = False,
    ) -> None:
        self.plan = plan
        self.executor = executor
        self.log = log
        self.notifier = notifier or Notifier()
        self.proc_root = proc_root
        self.clock = clock
        self._load_plan = load_plan
        self.forced_dry_run = forced_dry_run  # --dry-run survives a reload of a policy without it
        self.state: State = decision.initial_state(plan)
        self.watches: list[GuardWatch] = []
        self.warm = Warm()
        # Holds /proc fds of every process while the ranking is kept warm (closed when dropped).
        self.scanner = procfs.ProcScanner(proc_root)
        self.board = StatusBoard(plan.daemon.state_file, log)
        self._pending: set[int] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # One poll set for the daemon's life, updated only when its fds change: rebuilding it
        # at every wake-up was a quarter of an idle wake-up's CPU.
        self._poller = select.poll()
        self._quiet_since: float | None = None  # since when polls take the quiet path (_quiet_tick)
        self._poller.register(self._wake_r, select.POLLIN)
        self._polled: dict[int, int] = {}
        self._error_logged_at: dict[str, float] = {}
        self.page_size = procfs.read_page_size()
        self.recent: deque[dict[str, Any]] = deque(maxlen=20)
        self._tick_at = 0.0  # clock() before this tick's readings: a signal logs the time since
        self._state_written_at = float("-inf")
        self._state_marker: tuple[bool, int] = (False, 0)
        self.desktop: DesktopNotices | None = None  # created at the first notice (daemon.notify_desktop)
        self._chosen: Record | None = None  # the victim_chosen record whose signal comes next

    # -- set-up and tear-down

    def open(self) -> None:
        now = self.clock()
        self.watches = [open_watch(g, proc_root=self.proc_root, now=now, log=self.log) for g in self.plan.guards]
        for watch in self.watches:
            self._read_guard(watch, now)

    def close(self) -> None:
        for watch in self.watches:
            watch.close()
        self.watches = []
        self.scanner.close()
        self.executor.close()
        if self.desktop is not None:
            self.desktop.close()
        with contextlib.suppress(OSError):
            os.close(self._wake_r)
            os.close(self._wake_w)

    def install_signal_handlers(self) -> None:
        """SIGHUP reloads, SIGTERM/SIGINT stop; handlers only note the signal and wake poll()."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._note_signal)

    def _note_signal(self, signum: int, _frame: object) -> None:
        self._pending.add(signum)

    # -- the loop

    def run(self) -> int:
        self.open()
        self.log.info(
            "started",
            policy=self.plan.source,
            dry_run=self.plan.daemon.dry_run,
            guards=[w.guard.name for w in self.watches],
            pid=os.getpid(),
        )
        self.notifier.ready(self.status_line())
        try:
            while True:
                timeout_s = self.tick(self.clock())
                self.wait(timeout_s)
                self._handle_signals()
        except StopDaemon:
            in_flight = [gs.guard for gs in self.state.guards if gs.phase is not Phase.IDLE]
            self.notifier.stopping()
            self.log.info("stopping", in_flight=in_flight)
            return ExitCode.OK
        finally:
            self.close()

    def _handle_signals(self) -> None:
        pending, self._pending = self._pending, set()
        if signal.SIGTERM in pending or signal.SIGINT in pending:
            raise StopDaemon
        if signal.SIGHUP in pending:
            self.reload()

    def wait(self, timeout_s: float) -> None:
        """Sleep until the timeout, a PSI event, a victim's exit or a signal."""
        owners: dict[int, tuple[GuardWatch, PsiTrigger]] = {}
        wanted: dict[int, int] = {}
        for watch in self.watches:
            for trigger in watch.triggers:
                if trigger is not None and trigger.pollable:
                    owners[trigger.fileno()] = (watch, trigger)
                    wanted[trigger.fileno()] = select.POLLPRI
        for fd in self._victim_fds():
            wanted[fd] = select.POLLIN
        if wanted != self._polled:
            for fd in self._polled.keys() - wanted.keys():
                with contextlib.suppress(KeyError):
                    self._poller.unregister(fd)
            for fd, mask in wanted.items():
                if self._polled.get(fd) != mask:
                    self._poller.register(fd, mask)
            self._polled = wanted
        try:
            events = self._poller.poll(max(0, int(timeout_s * 1000)))
        except InterruptedError:
            events = []
        for fd, revents in events:
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
            elif fd in owners:
                watch, trigger = owners[fd]
                watch.psi_event_seen = True
                try:
                    trigger.note_revents(revents)
                except PressureFileGone as exc:
                    self._drop_trigger(watch, trigger, exc)

    def _drop_trigger(self, watch: GuardWatch, trigger: PsiTrigger, exc: Exception) -> None:
        """Close a trigger whose pressure file went away (its cgroup was removed). Such a file
        polls POLLERR for ever (kernfs_fop_poll() on a removed node, Linux 6.18): kept in the
        poll set it wakes the loop at once, every time, and the daemon spins at 100 % CPU."""
        watch.triggers = tuple(None if t is trigger else t for t in watch.triggers)
        trigger.close()
        self.log.warning("psi_trigger_gone", guard=watch.guard.name, path=trigger.path, error=str(exc))

    def _victim_fds(self) -> tuple[int, ...]:
        return self.executor.victim_fds()

    def tick(self, now: float) -> float:
        """One pass; returns how long to sleep."""
        if self._quiet_since is not None and now - self._quiet_since < QUIET_FULL_TICK_S:
            fast = self._quiet_tick(now)
            if fast is not None:
                return fast
        self._quiet_since = None
        timeout = self._full_tick(now)
        if self._may_tick_quietly():
            self._quiet_since = now
        return timeout

    def _may_tick_quietly(self) -> bool:
        """After a full tick: nothing in flight or running, no warm ranking, no PSI trigger that
        needs a reading each poll. Then the next polls only need to watch memory."""
        if self.warm.rankings or self.state.in_flight() or any(gs.phase is not Phase.IDLE for gs in self.state.guards):
            return False
        if self._children_running():
            return False
        if any(t.active_since is not None for gs in self.state.guards for t in gs.psi):
            return False
        return not any(watch.has_polled_trigger for watch in self.watches)

    def _children_running(self) -> bool:
        """Hooks or desktop-notice children the loop must reap."""
        return self.executor.hooks_running() or (self.desktop is not None and self.desktop.running > 0)

    def _quiet_tick(self, now: float) -> float | None:
        """A poll far from every level: read memory, check it is still far, sleep. None: do a full tick.

        A cold full tick costs an idle daemon ~550 us of CPU per wake-up (measured here with
        thread_time at poll_max 5 s); this path is a pread, a parse and a few comparisons.
        What it skips cannot change anything while memory stays above the warm level and no
        PSI event arrived: decision.is_quiet() would hold and no ranking would be kept."""
        for watch in self.watches:
            if watch.psi_event_seen:
                return None
            try:
                memory = watch.memory.read()
            except (OSError, MeminfoError, cgroup_source.CgroupError):
                return None  # the full tick logs it
            if pacing.warm_ranking_needed(memory, watch.guard):
                return None
            watch.remember(memory, now)
        self.notifier.watchdog(now)
        return self._next_timeout(now)

    def _full_tick(self, now: float) -> float:
        self._tick_at = now
        readings = [r for r in (self._read_guard(w, now) for w in self.watches) if r is not None]
        scanned_before = self.warm.scanned_at
        rankings = self._rankings_for(readings, now)
        alive = frozenset(k for k in self.state.in_flight() if self.executor.alive(k))
        # A fresh snapshot lets the core forget stuck victims that have since gone.
        fresh = self.warm.snapshot if self.warm.scanned_at != scanned_before else None
        obs = Observation(now=now, guards=tuple(readings), alive=alive, snapshot=fresh)
        # Far from every level with nothing in flight, step() would change nothing (is_quiet()
        # says so, and a property test holds it to that): a poll at poll_max stays cheap.
        if rankings or not decision.is_quiet(self.state, obs, self.plan):
            self.state, actions = decision.step(self.state, obs, self.plan, rankings)
            for action in actions:
                self._execute(action)
        for result in self.executor.poll(now):
            self._log_result(result)
        if self.desktop is not None:
            self.desktop.poll(now)
        self.notifier.watchdog(now)
        self.notifier.update_status(self.status_line)
        self._write_state(now)
        return self._next_timeout(now)

    def _write_state(self, now: float) -> None:
        """The state file: at every tick while a guard may act (the board keeps it to 1/s), every
        QUIET_STATE_WRITE_S when all is quiet and nothing new was decided. Its JSON dump and
        rename at 1/s cost an idle daemon ~210 of 290 us per tick (bench/run.py --only idle)."""
        quiet = not self.warm.rankings and all(gs.phase is Phase.IDLE for gs in self.state.guards)
        # A new decision or the end of an episode is written at once, quiet or not.
        marker = (quiet, id(self.recent[-1]) if self.recent else 0)
        if quiet and marker == self._state_marker and now - self._state_written_at < QUIET_STATE_WRITE_S:
            return
        self._state_written_at, self._state_marker = now, marker
        self.board.maybe_write(now, self._status(now))

    # -- readings

    def _read_guard(self, watch: GuardWatch, now: float) -> GuardReading | None:
        name = watch.guard.name
        try:
            memory = watch.memory.read()
        except (OSError, MeminfoError, cgroup_source.CgroupError) as exc:
            self._log_error(f"memory:{name}", event="reading_failed", guard=name, source="memory", error=str(exc))
            return None
        fired: list[int] = []
        pressure: PressureReading | None = None
        # The pressure file is read only when a trigger needs it: a polled trigger computes its
        # window from it, and a kernel event is confirmed against it. Reading it at every poll
        # would delay the kernel's own unprivileged triggers (see uoomd/sources/psi.py).
        needs_reading = watch.psi_event_seen or watch.has_polled_trigger
        watch.psi_event_seen = False
        try:
            if watch.pressure is not None and needs_reading:
                pressure = watch.pressure.read()
            for index, trigger in enumerate(watch.triggers):
                if trigger is None:
                    continue
                try:
                    if trigger.fired(now, pressure):
                        fired.append(index)
                except PsiTriggerGone as exc:
                    self._drop_trigger(watch, trigger, exc)
        except (OSError, PressureFileGone, ValueError) as exc:
            self._log_error(f"psi:{name}", event="reading_failed", guard=name, source="psi", error=str(exc))
        for index in fired:
            plan_trigger = watch.guard.psi[index]
            self.log.info(
                "trigger_fired",
                guard=name,
                trigger=decision.describe_psi(index, plan_trigger),
                available_bytes=memory.available_bytes,
            )
        watch.remember(memory, now)
        watch.last_pressure = pressure or watch.last_pressure
        return GuardReading(guard=name, memory=memory, pressure=pressure, psi_fired=tuple(fired))

    def _log_error(self, key: str, event: str = "source_error", **facts: Any) -> None:
        now = self.clock()
        last = self._error_logged_at.get(key)
        if last is None or now - last >= ERROR_LOG_INTERVAL_S:
            self._error_logged_at[key] = now
            self.log.warning(event, **facts)

    # -- the warm ranking

    def _rankings_for(self, readings: list[GuardReading], now: float) -> dict[str, Ranking]:
        """Rankings for the guards that may act: warm ones refreshed at a bounded rate,
        a synchronous scan only when a guard crosses with nothing warm."""
        urgent: list[GuardReading] = []
        warm_wanted = False
        for reading in readings:
            guard = self.plan.guard(reading.guard)
            gs = self.state.guard(guard.name)
            lv = decision.levels(reading.memory, guard)
            psi_live = bool(reading.psi_fired) or any(t.active_since is not None for t in gs.psi)
            if lv.term_crossed or lv.kill_crossed or (psi_live and reading.memory.available_bytes < lv.gate_bytes):
                urgent.append(reading)
            elif gs.phase is not Phase.IDLE or pacing.warm_ranking_needed(reading.memory, guard):
                warm_wanted = True
        if not urgent and not warm_wanted:
            self.warm = Warm()  # far from trouble: drop it, a stale ranking must never be acted on
            self.scanner.close()  # and the scanner's held /proc fds: an idle daemon holds none
            return {}
        age = now - self.warm.scanned_at
        refresh_after = max(WARM_REFRESH_MIN_S, self.warm.scan_cost_s / SCAN_CPU_SHARE)
        if not self.warm.rankings or age >= refresh_after:
            self._rescan(readings, now)
        idle_urgent = [r for r in urgent if self.state.guard(r.guard).phase is Phase.IDLE]
        if any(not self._has_candidates(r.guard) for r in idle_urgent) and age >= EMPTY_RESCAN_S:
            # Crossed with no candidate warm (the hog may have started since the last scan):
            # only a scan can find it. Bounded so a scope with truly nothing to kill is not
            # rescanned at every poll.
            self._rescan(readings, now)
        rankings = dict(self.warm.rankings)
        for reading in idle_urgent:
            if reading.guard in rankings:
                rankings[reading.guard] = self._recheck(rankings[reading.guard], reading)
        return {name: self._head(ranking) for name, ranking in rankings.items()}

    def _head(self, ranking: Ranking) -> Ranking:
        """The part of a ranking that step() can use: it takes the best and the runner-up left
        after removing stuck and in-flight processes (and the victim), so 2 + that many suffice.
        Handing it all 2,000 candidates cost ~5 ms per crossing: Ranking.without() builds a
        ProcessKey per candidate (bench/profile_crossing.py, 2,000 sleepers, this VM)."""
        removable = len(self.state.in_flight()) + sum(len(gs.stuck) for gs in self.state.guards) + 1
        head = 2 + removable
        if len(ranking.candidates) <= head:
            return ranking
        return replace(ranking, candidates=ranking.candidates[:head])

    def _has_candidates(self, guard_name: str) -> bool:
        """Whether the warm ranking holds a process the core could still choose: stuck and
        in-flight victims do not count, so a crossing with only those warm rescans at once
        (a hog started since the last scan is then found)."""
        ranking = self.warm.rankings.get(guard_name)
        if ranking is None:
            return False
        unusable = self.state.in_flight().union(*(gs.stuck for gs in self.state.guards))
        return any(c.key not in unusable for c in ranking.candidates)

    def _members(self, guard: GuardPlan) -> frozenset[Pid] | None:
        if guard.scope.kind is ScopeKind.SYSTEM:
            return None
        assert guard.scope.cgroup_path is not None
        try:
            return frozenset(Pid(p) for p in cgroup_source.read_members(guard.scope.cgroup_path))
        except OSError as exc:
            self._log_error(f"members:{guard.name}", event="reading_failed", guard=guard.name, error=str(exc))
            return frozenset()

    def _rescan(self, readings: list[GuardReading], now: float) -> None:
        started = time.perf_counter()
        members = {r.guard: self._members(self.plan.guard(r.guard)) for r in readings}
        pids: set[int] | None = set()
        for found in members.values():
            if found is None:
                pids = None
                break
            assert pids is not None
            pids |= found
        # uoomd itself and its parent are read too, so scoring can spare them by name.
        if pids is not None:
            pids |= {os.getpid(), os.getppid()}
        try:
            # The warm top is re-read in full (status too); the rest re-reads only what changed.
            finalists = {c.process.pid for r in self.warm.rankings.values() for c in r.candidates[:RECHECK_DEPTH]}
            snapshot = self.scanner.scan(details=self.plan.needed_details(), pids=pids, refresh=finalists)
        except (OSError, ValueError) as exc:
            # A scan that fails (meminfo unreadable, EMFILE, ENOMEM) is a fault of this poll, not
            # the end of the daemon: log it, keep no ranking (a stale one is never acted on) and
            # scan again at the next poll that needs it.
            self._log_error("scan", event="reading_failed", source="processes", error=str(exc))
            self.warm = Warm(scanned_at=now, scan_cost_s=self.warm.scan_cost_s)
            return
        rankings: dict[str, Ranking] = {}
        for reading in readings:
            guard = self.plan.guard(reading.guard)
            totalpages = guard_totalpages(reading.memory, snapshot.page_size)
            rankings[guard.name] = rank(
                snapshot,
                self.plan,
                guard,
                totalpages=totalpages,
                members=members[guard.name],
                previous=self.warm.rankings.get(guard.name),
            )
        cost = time.perf_counter() - started
        self.warm = Warm(rankings=rankings, snapshot=snapshot, scanned_at=now, scan_cost_s=cost)
        self.log.debug("ranking_refreshed", processes=len(snapshot.processes), scan_ms=round(cost * 1000, 2))

    def _recheck(self, ranking: Ranking, reading: GuardReading) -> Ranking:
        """Re-read the first candidates from /proc, so the victim is judged on what it is now:
        a process that exited, exec'd into a protected program or left the scope drops out."""
        snapshot = self.warm.snapshot
        if snapshot is None:
            return ranking
        guard = self.plan.guard(reading.guard)
        totalpages = guard_totalpages(reading.memory, snapshot.page_size)
        members = self._members(guard)
        spared = uoomd_pids(snapshot)
        fresh: list[Candidate] = []
        dropped: set[ProcessKey] = set()
        for candidate in ranking.candidates[:RECHECK_DEPTH]:
            now_info = procfs.read_process(self.proc_root, candidate.process.pid, self.plan.needed_details())
            if now_info is None or now_info.starttime_ticks != candidate.process.starttime_ticks:
                dropped.add(candidate.key)
                continue
            result = score_process(
                now_info,
                self.plan,
                guard,
                totalpages,
                page_size=snapshot.page_size,
                system_totalpages=_system_totalpages(snapshot),
                spared=spared,
                members=members,
            )
            if isinstance(result, Candidate):
                fresh.append(result)
                break
            dropped.add(candidate.key)
        if not fresh and len(dropped) >= min(RECHECK_DEPTH, len(ranking.candidates)) and ranking.candidates:
            self._rescan([reading], self.clock())
            return self.warm.rankings.get(guard.name, ranking)
        # Only the first RECHECK_DEPTH were re-read, so only they can drop out or be replaced:
        # the rest is kept as it is, without a key per candidate (~12 ms for 2,000).
        taken = {c.key for c in fresh} | dropped
        head = [c for c in ranking.candidates[:RECHECK_DEPTH] if c.key not in taken]
        return replace(ranking, candidates=(*fresh, *head, *ranking.candidates[RECHECK_DEPTH:]))

    # -- acting and logging

    def _execute(self, action: decision.Action) -> None:
        if isinstance(action, Record):
            self._log_record(action)
            if action.event == "victim_chosen":
                self._chosen = action
            return
        result = self.executor.execute(action)
        if isinstance(action, SendSignal):
            # Detect -> signal: from the reading that crossed (this tick's) to the signal sent.
            since_ms = round((self.clock() - self._tick_at) * 1000, 3)
            result = replace(result, details=(*result.details, ("since_reading_ms", since_ms)))
        self._log_result(result)
        if isinstance(action, SendSignal | KillCgroup) and self._chosen is not None:
            chosen, self._chosen = self._chosen, None
            if result.outcome is Outcome.SENT and self.plan.daemon.notify_desktop:
                self._notice_desktop(chosen)
        if isinstance(action, SendSignal) and result.outcome in (Outcome.GONE, Outcome.RECYCLED):
            # The victim is not there to signal: drop it from the warm ranking so the next
            # step does not choose it again.
            self.warm.rankings = {name: r.without(frozenset({action.target})) for name, r in self.warm.rankings.items()}

    def _notice_desktop(self, chosen: Record) -> None:
        """One desktop notice per victim, at its first signal; children, never a blocking call."""
        # Imported here: only desktop policies pay its memory (0.6 MiB RSS measured).
        from uoomd.desktop import DesktopNotices, kill_notice  # noqa: PLC0415

        if self.desktop is None:
            self.desktop = DesktopNotices(self.log)
        summary, body = kill_notice(chosen.as_dict())
        self.desktop.notify(summary, body, now=self.clock())

    def _log_record(self, record: Record) -> None:
        facts = record.as_dict()
        level = "warning" if record.event in {"term", "kill", "victim_stuck", "rate_limited"} else "info"
        getattr(self.log, level)(record.event, **facts)
        self.recent.append({"event": record.event, "at": time.time(), **_jsonable(facts)})

    def _log_result(self, result: ActionResult) -> None:
        facts = result.fields()
        failed = result.outcome in (Outcome.FAILED, Outcome.REFUSED, Outcome.TIMED_OUT)
        (self.log.warning if failed else self.log.info)("action_result", **facts)
        if result.outcome in (Outcome.SENT, Outcome.RELEASED, Outcome.FAILED, Outcome.REFUSED):
            self.recent.append({"event": "action_result", "at": time.time(), **_jsonable(facts)})

    # -- pacing

    def _next_timeout(self, now: float) -> float:
        timeouts: list[float] = [self.plan.daemon.poll_max_s]
        for watch in self.watches:
            if watch.last is None:
                timeouts.append(self.plan.daemon.poll_min_s)
                continue
            dt = watch.last_at - watch.previous_at if watch.previous is not None else 0.0
            sleep_s = pacing.next_poll_s(watch.last, watch.previous, dt, watch.guard, self.plan.daemon)
            if self.state.guard(watch.guard.name).phase is not Phase.IDLE:
                sleep_s = self.plan.daemon.poll_min_s
            timeouts.append(sleep_s)
        if self._children_running():
            timeouts.append(HOOK_POLL_S)
        ping_in = self.notifier.watchdog_due_in(now)
        if ping_in is not None:
            timeouts.append(ping_in)  # never sleep past a watchdog ping
        return min(timeouts)

    # -- reload

    def reload(self) -> None:
        """Validate the new policy first; a bad one is logged and the old one keeps running."""
        self.notifier.reloading()
        loader = self._load_plan or load_plan_isolated
        try:
            new_plan = loader(self.plan.source)
        except SetupError as exc:
            self.log.error("policy_reload_failed", policy=self.plan.source, error=str(exc), kept="previous policy")
            self.notifier.ready(self.status_line())
            return
        except PolicyError as exc:
            self.log.error("policy_reload_failed", policy=self.plan.source, error=exc.render(), kept="previous policy")
            self.notifier.ready(self.status_line())
            return
        if self.forced_dry_run and not new_plan.daemon.dry_run:
            new_plan = replace(new_plan, daemon=replace(new_plan.daemon, dry_run=True))
        try:
            now = self.clock()
            watches = [open_watch(g, proc_root=self.proc_root, now=now, log=self.log) for g in new_plan.guards]
        except (SetupError, OSError) as exc:
            self.log.error("policy_reload_failed", policy=self.plan.source, error=str(exc), kept="previous policy")
            self.notifier.ready(self.status_line())
            return
        for watch in self.watches:
            watch.close()
        self.watches = watches
        self.state = _carry_state(self.state, new_plan)
        self.plan = new_plan
        self.warm = Warm()
        self._quiet_since = None
        self.board = StatusBoard(new_plan.daemon.state_file, self.log)
        self.log.info("policy_reloaded", policy=new_plan.source, guards=[g.name for g in new_plan.guards])
        self.notifier.ready(self.status_line())

    # -- status

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what the daemon sees now, e.g.
        "mem 41% avail, swap 90% free, psi full 0.0, last kill: none" (guards named when several)."""
        parts: list[str] = []
        for watch in self.watches:
            m = watch.last
            if m is None:
                continue
            part = f"mem {m.available_fraction * 100:.0f}% avail"
            part += f", swap {m.swap_free_fraction * 100:.0f}% free" if m.swap_total_bytes else ", no swap"
            if watch.last_pressure is not None:
                part += f", psi full {watch.last_pressure.full_avg10:.1f}"
            parts.append(f"{watch.guard.name}: {part}" if len(self.watches) > 1 else part)
        kills = [r for r in self.recent if r.get("event") in {"victim_chosen", "victim_escalated"}]
        last = "last kill: none"
        if kills:
            # escape(): a name is attacker-controlled, and a newline in it would start a new
            # sd_notify assignment (a process named "x\nREADY=1" must not speak for us).
            dry = " (dry-run)" if str(kills[-1].get("action", "")).startswith("would") else ""
            last = f"last kill{dry}: {escape(str(kills[-1].get('name', '?')))} ({kills[-1].get('pid', '?')})"
        return "; ".join([*parts, last]) if len(self.watches) > 1 else ", ".join([*parts, last])

    def _status(self, now: float) -> dict[str, Any]:
        guards: list[dict[str, Any]] = []
        for watch in self.watches:
            gs = self.state.guard(watch.guard.name)
            m = watch.last
            guards.append(
                {
                    "name": watch.guard.name,
                    "scope": watch.guard.scope.describe(),
                    "phase": str(gs.phase),
                    "victim": None
                    if gs.victim is None
                    else {"pid": gs.victim.process.pid, "name": gs.victim.process.name},
                    "memory": None
                    if m is None
                    else {
                        "total_bytes": m.total_bytes,
                        "available_bytes": m.available_bytes,
                        "swap_total_bytes": m.swap_total_bytes,
                        "swap_free_bytes": m.swap_free_bytes,
                    },
                    "psi": [
                        None if t is None else {"mode": str(t.mode), "describe": t.describe()} for t in watch.triggers
                    ],
                }
            )
        return {
            "pid": os.getpid(),
            "policy": self.plan.source,
            "dry_run": self.plan.daemon.dry_run,
            "updated_at": time.time(),
            "status": self.status_line(),
            "guards": guards,
            "recent": list(self.recent),
        }


def _jsonable(facts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in facts.items():
        out[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
    return out


def _carry_state(state: State, plan: Plan) -> State:
    """Keep the escalation of guards that survive a reload; new guards start idle."""
    fresh = decision.initial_state(plan)
    kept = {gs.guard: gs for gs in state.guards}
    guards = tuple(kept.get(gs.guard, gs) for gs in fresh.guards)
    return replace(fresh, guards=guards, kill_times=state.kill_times)


def run_daemon(*, policy_path: str, dry_run: bool) -> int:
    """``uoomd run``: load, protect ourselves, loop until SIGTERM."""
    plan = load_plan_isolated(policy_path)
    if dry_run:
        plan = replace(plan, daemon=replace(plan.daemon, dry_run=True))
    log = configure(plan.daemon.log_format, debug=bool(os.environ.get("UOOMD_DEBUG")))
    protection = protect_self()
    log.info(
        "self_protected",
        oom_score_adj=protection.oom_score_adj,
        mlocked=protection.mlocked,
        mlock_error=protection.mlock_error,
        nice=protection.nice,
        nofile=protection.nofile,
    )
    executor = LiveExecutor(hook_timeout_s=plan.hooks.timeout_s)
    daemon = Daemon(plan, executor=executor, log=log, forced_dry_run=dry_run)
    daemon.install_signal_handlers()
    return daemon.run()
