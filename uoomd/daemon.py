"""The daemon loop: wait, read, step, execute, log; a reload keeps the last good plan.

One iteration (a *tick*): read each guard's memory (a pread of a kept file, ~17 µs),
its PSI triggers, keep the candidate ranking warm while a guard nears its term level,
re-check the chosen victim against /proc when a guard crosses, hand everything to the
pure :func:`uoomd.decision.step`, execute the actions it returns and log every record.
Then sleep in ``poll()`` on the PSI trigger fds, the in-flight victims' pidfds, a reload's
policy checker (its pidfd) and the signal wake-up pipe, for as long as :mod:`uoomd.pacing`
says is safe.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from uoomd import decision, pacing
from uoomd.actions import Executor, LiveExecutor
from uoomd.decision import KillCgroup, Phase, Record, SendSignal, State
from uoomd.errors import ExitCode, PolicyError, SetupError
from uoomd.logs import Log, configure, escape
from uoomd.plan import GuardPlan, Plan, PsiKind
from uoomd.policy.isolated import CheckResult, PolicyCheck, load_plan_isolated
from uoomd.readings import GuardReading, MemoryReading, Observation, PressureReading
from uoomd.results import ActionResult, Outcome
from uoomd.service import Notifier, protect_self
from uoomd.sources import cgroup as cgroup_source
from uoomd.sources import procfs
from uoomd.sources.meminfo import MeminfoError
from uoomd.sources.psi import PressureFileGone, PressureReader, PsiKindName, PsiTrigger, PsiTriggerGone, TriggerMode
from uoomd.sources.scope import MemoryReader, open_memory_reader
from uoomd.status import StatusBoard
from uoomd.warm import WarmRanking

if TYPE_CHECKING:
    from uoomd.desktop import DesktopNotices

# A source that fails is retried; the failure is logged once per this many seconds.
ERROR_LOG_INTERVAL_S = 30.0
HOOK_POLL_S = 0.1
# With no guard near its levels, the state file (`uoomd status`) is rewritten this often.
# A quiet daemon still does a full tick this often (status line, state file, stuck victims).
QUIET_FULL_TICK_S = 30.0
QUIET_STATE_WRITE_S = 60.0  # `uoomd status` shows the age; a dump costs ~1 ms of a cold daemon
# A guard whose cgroup was removed (a service restart) looks for it again at most this often:
# a missing cgroup costs one stat per retry, and a restarted service is guarded within this.
SCOPE_RETRY_S = 0.5


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
    gone_at: float | None = None  # when its cgroup was removed; its files stay closed until it is back
    retry_at: float = 0.0  # when reopen() looks for a gone cgroup next

    @property
    def has_polled_trigger(self) -> bool:
        """A PSI trigger the kernel refused: it needs the pressure file read at every poll."""
        return any(t is not None and t.mode is TriggerMode.POLLED for t in self.triggers)

    def remember(self, memory: MemoryReading, now: float) -> None:
        """Keep this reading and the one before it, for pacing's fall rate."""
        if self.last is not None:
            self.previous, self.previous_at = self.last, self.last_at
        self.last, self.last_at = memory, now

    def mark_gone(self, now: float, log: Log, *, error: str) -> None:
        """The cgroup was removed: close every kept file, forget its readings, look for it later.

        Its fds are dead for good (ENODEV, even once a cgroup of that name exists again:
        see CgroupGone), and a dead trigger fd polls POLLERR for ever (kernfs_fop_poll()),
        which would spin the loop; closed, wait() leaves them out of the poll set."""
        self.close()
        self.pressure = None
        self.triggers = tuple(None for _ in self.triggers)
        self.previous = self.last = None
        self.last_pressure = None
        self.psi_event_seen = False
        self.gone_at = now
        self.retry_at = now + SCOPE_RETRY_S  # not at once: systemd removes a unit's hierarchies one by one
        log.warning("scope_gone", guard=self.guard.name, scope=self.guard.scope.describe(), error=error)

    def reopen(self, *, proc_root: str, now: float, log: Log) -> bool:
        """Whether the scope's files are open; a gone cgroup is looked for (one stat) at most
        every SCOPE_RETRY_S, and once back its files are reopened and its triggers re-armed."""
        if self.gone_at is None:
            return True
        if now < self.retry_at:
            return False
        self.retry_at = now + SCOPE_RETRY_S
        assert self.guard.scope.cgroup_path is not None  # only a cgroup goes
        if not cgroup_source.cgroup_exists(self.guard.scope.cgroup_path):
            return False
        try:
            fresh = open_sources(self.guard, proc_root=proc_root, now=now)
        except (SetupError, OSError, ValueError, PressureFileGone):
            return False  # gone again, or not all there yet: the next retry sees
        self.memory, self.pressure, self.triggers = fresh.memory, fresh.pressure, fresh.triggers
        gone_s, self.gone_at = now - self.gone_at, None
        log.info(
            "scope_back",
            guard=self.guard.name,
            scope=self.guard.scope.describe(),
            gone_s=round(gone_s, 3),
            psi=[str(t.mode) if t is not None else "unavailable" for t in self.triggers],
        )
        return True

    def close(self) -> None:
        self.memory.close()
        if self.pressure is not None:
            self.pressure.close()
        for trigger in self.triggers:
            if trigger is not None:
                trigger.close()


def open_watch(guard: GuardPlan, *, proc_root: str, now: float, log: Log) -> GuardWatch:
    """Open a guard's sources; a PSI trigger the kernel refuses falls back to polling, and says so."""
    watch = open_sources(guard, proc_root=proc_root, now=now)
    if guard.psi and watch.pressure is None:
        log.warning("psi_unavailable", guard=guard.name, scope=guard.scope.describe(), triggers=len(guard.psi))
    for index, trigger in enumerate(watch.triggers):
        if trigger is not None:
            log.info(
                "psi_trigger_armed",
                guard=guard.name,
                trigger=index,
                path=trigger.path,
                mode=str(trigger.mode),
                kind=trigger.kind,
                stall_us=trigger.stall_us,
                window_us=trigger.window_us,
                reason=trigger.reason,
            )
    return watch


def open_sources(guard: GuardPlan, *, proc_root: str, now: float) -> GuardWatch:
    """A guard's sources, opened without a word logged; when one fails, none stays open (a
    gone cgroup is retried every SCOPE_RETRY_S: a leak there would be an fd per retry)."""
    watch = GuardWatch(
        guard=guard, memory=open_memory_reader(guard.scope, proc_root), pressure=None, triggers=(None,) * len(guard.psi)
    )
    armed: list[PsiTrigger] = []
    try:
        path = cgroup_source.pressure_path_for(guard.scope, proc_root) if guard.psi else None
        if path is not None:
            watch.pressure = PressureReader(path)
            initial = watch.pressure.read()
            for plan_trigger in guard.psi:
                kind: PsiKindName = "some" if plan_trigger.kind is PsiKind.SOME else "full"
                armed.append(
                    PsiTrigger.arm(path, kind, plan_trigger.stall_us, plan_trigger.window_us, now=now, initial=initial)
                )
            watch.triggers = tuple(armed)
    except BaseException:
        for trigger in armed:
            trigger.close()
        watch.close()
        raise
    return watch


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
        start_check: Callable[[str, float], PolicyCheck] = PolicyCheck.start,
        forced_dry_run: bool = False,
    ) -> None:
        self.plan = plan
        self.executor = executor
        self.log = log
        self.notifier = notifier or Notifier()
        self.proc_root = proc_root
        self.clock = clock
        self._start_check = start_check  # tests pass a checker that is slow, or fails
        self._check: PolicyCheck | None = None  # a reload's check in its child, polled by the loop
        self._check_again = False  # a SIGHUP came while it ran: check once more after it
        self.forced_dry_run = forced_dry_run  # --dry-run survives a reload of a policy without it
        self.state: State = decision.initial_state(plan)
        self.watches: list[GuardWatch] = []
        # The rankings kept warm near trouble; holds /proc fds of every process meanwhile.
        self.warm = WarmRanking(proc_root, on_error=self._log_error)
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
        if self._check is not None:
            self._check.cancel()  # stopped during a reload: the checker is killed and reaped
            self._check = None
        for watch in self.watches:
            watch.close()
        self.watches = []
        self.warm.close()
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
                self._poll_check(self.clock())
        except StopDaemon:
            in_flight = [gs.guard for gs in self.state.guards if gs.phase is not Phase.IDLE]
            self.notifier.stopping()
            if self._check is not None:
                self.log.info("policy_check_cancelled", policy=self._check.path, checker_pid=self._check.pid)
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
        if self._check is not None:
            wanted[self._check.fileno()] = select.POLLIN  # the checker exited: _poll_check() has its answer
        if wanted != self._polled:
            for fd in self._polled.keys() - wanted.keys():
                with contextlib.suppress(KeyError):
                    self._poller.unregister(fd)
            for fd, mask in wanted.items():
                if self._polled.get(fd) != mask:
                    self._poller.register(fd, mask)
            self._polled = wanted
        try:
            # Rounded up: a deadline 0.4 ms away (a gone scope's retry) polled 0 ms when
            # truncated, and the loop spun until it passed (~90 wake-ups, seen in a test).
            events = self._poller.poll(max(0, math.ceil(timeout_s * 1000)))
        except InterruptedError:
            events = []
        for fd, revents in events:
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
            elif fd in owners:
                watch, trigger = owners[fd]
                if watch.gone_at is not None:
                    continue  # marked gone by an earlier event of this poll: its fds are closed
                watch.psi_event_seen = True
                try:
                    trigger.note_revents(revents)
                except PressureFileGone as exc:
                    self._drop_trigger(watch, trigger, exc)

    def _drop_trigger(self, watch: GuardWatch, trigger: PsiTrigger, exc: Exception) -> None:
        """Close a trigger whose pressure file went away (its cgroup was removed). Such a file
        polls POLLERR for ever (kernfs_fop_poll() on a removed node, Linux 6.18): kept in the
        poll set it wakes the loop at once, every time, and the daemon spins at 100 % CPU.

        For a cgroup the whole scope is gone then (mark_gone(): one scope_gone, every file
        closed, reopen() re-arms it later), even while a hybrid machine's v1 memory cgroup is
        still there: systemd removes a unit's v2 cgroup first and its v1 ones after it
        (cg_trim_everywhere()), and a v2 cgroup with members cannot be removed at all."""
        if watch.gone_at is not None:
            return
        if watch.guard.scope.cgroup_path is not None:
            watch.mark_gone(self.clock(), self.log, error=str(exc))
            return
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
        if self.warm.active or self.state.in_flight() or any(gs.phase is not Phase.IDLE for gs in self.state.guards):
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
            if watch.gone_at is not None:
                if watch.reopen(proc_root=self.proc_root, now=now, log=self.log):
                    return None  # back: a full tick reads it, and wait() polls its new triggers
                continue  # still gone: that cost one stat at most
            if watch.psi_event_seen:
                return None
            try:
                memory = watch.memory.read()
            except (OSError, MeminfoError, cgroup_source.CgroupError):
                return None  # the full tick logs it, or marks the scope gone
            if pacing.warm_ranking_needed(memory, watch.guard):
                return None
            watch.remember(memory, now)
        self.notifier.watchdog(now)
        return self._next_timeout(now)

    def _full_tick(self, now: float) -> float:
        self._tick_at = now
        readings = [r for r in (self._read_guard(w, now) for w in self.watches) if r is not None]
        alive = frozenset(k for k in self.state.in_flight() if self.executor.alive(k))
        obs = Observation(now=now, guards=tuple(readings), alive=alive)
        # The core says which guards need a ranking, and which need it as the scope is now.
        wanted = decision.needs(self.state, obs, self.plan)
        rankings = self.warm.provide(self.plan, wanted, readings, now, self.state.unchoosable())
        if rankings:
            stats = self.warm.stats
            self.log.debug("ranking_ready", rescanned=stats.rescanned, new=stats.new, reread=stats.reread)
        # Re-judged before any SIGKILL: a victim that left the scope or is protected now is dropped.
        flying = [(g, k) for g, k in self.state.in_flight_by_guard() if k in alive]
        obs = replace(
            obs,
            # A fresh snapshot lets the core forget stuck victims that have since gone.
            snapshot=self.warm.snapshot if self.warm.rescanned else None,
            ineligible=self.warm.ineligible(self.plan, flying) if flying else frozenset(),
        )
        # Far from every level with nothing in flight, step() would change nothing (is_quiet()
        # says so, and a property test holds it to that): a poll at poll_max stays cheap.
        if rankings or not decision.is_quiet(self.state, obs, self.plan):
            self.state, actions = decision.step(self.state, obs, self.plan, rankings)
            for action in actions:
                self._execute(action)
            self.executor.keep_only(self.state.in_flight())
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
        quiet = not self.warm.active and all(gs.phase is Phase.IDLE for gs in self.state.guards)
        # A new decision or the end of an episode is written at once, quiet or not.
        marker = (quiet, id(self.recent[-1]) if self.recent else 0)
        if quiet and marker == self._state_marker and now - self._state_written_at < QUIET_STATE_WRITE_S:
            return
        self._state_written_at, self._state_marker = now, marker
        self.board.maybe_write(now, self._status(now))

    # -- readings

    def _read_guard(self, watch: GuardWatch, now: float) -> GuardReading | None:
        name = watch.guard.name
        if not watch.reopen(proc_root=self.proc_root, now=now, log=self.log):
            return None  # its cgroup is gone: no reading, so the core does nothing for it
        try:
            memory = watch.memory.read()
        except cgroup_source.CgroupGone as exc:
            watch.mark_gone(now, self.log, error=str(exc))
            return None
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
                    if watch.gone_at is not None:
                        return None  # the cgroup went since the memory reading
        except PressureFileGone as exc:
            if watch.guard.scope.cgroup_path is not None:
                watch.mark_gone(now, self.log, error=str(exc))  # _drop_trigger() says why
                return None
            self._log_error(f"psi:{name}", event="reading_failed", guard=name, source="psi", error=str(exc))
        except (OSError, ValueError) as exc:
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
            self.warm.forget(action.target)

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
            if watch.gone_at is not None:
                timeouts.append(max(0.0, watch.retry_at - now))  # no reading to pace: look for it then
                continue
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
        check_due = self._check.due_in(now) if self._check is not None else None
        if check_due is not None:
            timeouts.append(check_due)  # an overdue checker is killed then
        return min(timeouts)

    # -- reload

    def reload(self) -> None:
        """SIGHUP: check the policy file again in a child; the loop polls it (_poll_check), never waits.

        A SIGHUP while a check runs is coalesced, not a restart: that check runs on and its
        answer is applied, then one more check reads the file again (the child may have read
        it before the edit this SIGHUP announces). Never killing a check under way keeps one
        checker at a time, and a burst of SIGHUPs (a script looping `systemctl reload`) still
        makes progress; any number of them during a check make one more check."""
        self.notifier.reloading()
        if self._check is not None:
            self._check_again = True
            self.log.info("policy_reload_coalesced", policy=self.plan.source, checker_pid=self._check.pid)
            return
        self._begin_check()

    def _begin_check(self) -> None:
        try:
            self._check = self._start_check(self.plan.source, self.clock())
        except (PolicyError, SetupError) as exc:  # a FIFO, a device, no file: refused without a child
            self._reload_done(exc)
            return
        self.log.info("policy_check_started", policy=self.plan.source, checker_pid=self._check.pid)

    def _poll_check(self, now: float) -> None:
        """A reload's checker that exited (or is overdue): apply its answer."""
        if self._check is None:
            return
        result = self._check.poll(now)
        if result is not None:
            self._check = None
            self._reload_done(result)

    def _reload_done(self, result: CheckResult) -> None:
        """Apply a good plan, or log why not and keep the last good one; then READY=1, or the next check."""
        if isinstance(result, Plan):
            self._apply_plan(result)
        else:
            error = result.render() if isinstance(result, PolicyError) else str(result)
            self.log.error("policy_reload_failed", policy=self.plan.source, error=error, kept="previous policy")
        if self._check_again:
            self._check_again = False
            self._begin_check()
        else:
            self.notifier.ready(self.status_line())

    def _apply_plan(self, new_plan: Plan) -> None:
        if self.forced_dry_run and not new_plan.daemon.dry_run:
            new_plan = replace(new_plan, daemon=replace(new_plan.daemon, dry_run=True))
        try:
            now = self.clock()
            watches = [open_watch(g, proc_root=self.proc_root, now=now, log=self.log) for g in new_plan.guards]
        except (SetupError, OSError) as exc:
            self.log.error("policy_reload_failed", policy=self.plan.source, error=str(exc), kept="previous policy")
            return
        for watch in self.watches:
            watch.close()
        self.watches = watches
        self.state = _carry_state(self.state, new_plan)
        self.plan = new_plan
        self.warm.drop()  # ranked with the old plan's rules
        self._quiet_since = None
        self.board = StatusBoard(new_plan.daemon.state_file, self.log)
        self.log.info("policy_reloaded", policy=new_plan.source, guards=[g.name for g in new_plan.guards])

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
                    "scope_gone": watch.gone_at is not None,
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
