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

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from uoomd import decision, pacing, thrash
from uoomd.actions import Output
from uoomd.carrier import Carrier, Notices
from uoomd.decision import Phase, State
from uoomd.errors import ExitCode, PolicyError, SetupError
from uoomd.executor import Executor, LiveExecutor
from uoomd.flight import FlightRecorder
from uoomd.logs import Log, Throttle, configure
from uoomd.metrics.collector import Metrics
from uoomd.metrics.outlets import MetricsOutlets
from uoomd.plan import GuardPlan, Plan
from uoomd.policy.isolated import CheckResult, PolicyCheck, load_plan_isolated
from uoomd.readings import GuardReading, Observation, ProcessKey
from uoomd.reload import Reloads, StartCheck
from uoomd.service import Notifier, Renaming, protect_self
from uoomd.sources import cgroup as cgroup_source
from uoomd.sources import procfs
from uoomd.sources.meminfo import MeminfoError
from uoomd.sources.watch import GuardWatch, open_watch
from uoomd.startup import guard_levels, signals_text
from uoomd.statusboard import Recent, ReloadRecord, StatusBoard, status_document, status_line
from uoomd.wakeup import Wakeup
from uoomd.warm import WarmRanking

if TYPE_CHECKING:
    from uoomd.metrics.listener import MetricsListener
    from uoomd.metrics.textfile import TextfileExporter

# A source that fails is retried; the failure is logged once per this many seconds.
ERROR_LOG_INTERVAL_S = 30.0
HOOK_POLL_S = 0.1
# With no guard near its levels, the state file (`uoomd status`) is rewritten this often.
# A quiet daemon still does a full tick this often (status line, state file, stuck victims).
QUIET_FULL_TICK_S = 30.0
QUIET_STATE_WRITE_S = 60.0  # `uoomd status` shows the age; a dump costs ~1 ms of a cold daemon


WatchOpener = Callable[[GuardPlan, float], GuardWatch]  # (guard, now): its sources, open


class StopDaemon(Exception):
    """Raised inside the loop to stop cleanly."""


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
        start_check: StartCheck = PolicyCheck.start,
        forced_dry_run: bool = False,
        open_sources: WatchOpener | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``metrics``: the Metrics whose processor is first in ``log``'s pipeline (run_daemon puts
        it there), so the log's events are counted; None: one of its own, fed by readings only."""
        self.plan = plan
        self.executor = executor
        self.log = log
        self.notifier = notifier or Notifier()
        self.proc_root = proc_root
        self.clock = clock
        # Tests pass scripted sources; the daemon opens the guard's files.
        self._open_watch: WatchOpener = open_sources or (
            lambda guard, now: open_watch(guard, proc_root=proc_root, now=now, log=log)
        )
        self.reloads = Reloads(
            log=log,
            start=start_check,
            clock=clock,
            answered=self._reload_answered,
            settled=lambda: self.notifier.ready(self.status_line()),
        )
        self.forced_dry_run = forced_dry_run  # --dry-run survives a reload of a policy without it
        self.state: State = decision.initial_state(plan)
        self.watches: list[GuardWatch] = []
        # The rankings kept warm near trouble; holds /proc fds of every process meanwhile.
        self.throttle = Throttle(log, clock, ERROR_LOG_INTERVAL_S)
        # The metrics outlive every reload: a counter never goes down (uoomd/metrics/registry.py).
        # Kept by every daemon (the counts are there whenever someone first looks: `uoomd status
        # --metrics`), written only where the policy says (uoomd/metrics/outlets.py).
        self.metrics = metrics or Metrics(wall_clock=time.time)
        self.metrics.observe_plan(plan)
        self.outlets = MetricsOutlets(self.metrics, log)  # opened by open(), changed by a reload
        self.warm = WarmRanking(proc_root, on_error=self._source_failed)
        self.board = StatusBoard(plan.daemon.state_file, log)
        self.wakeup = Wakeup()
        self._quiet_since: float | None = None  # since when polls take the quiet path (_quiet_tick)
        self.page_size = procfs.read_page_size()
        self.recent = Recent()
        self.carrier = Carrier(executor=executor, log=log, recent=self.recent, clock=clock, forget=self._victim_gone)
        # record_on_decision: the last minutes kept, written as a trace after each decision (uoomd/flight.py).
        self.flight = FlightRecorder(plan, log=log, started_at=clock(), page_size=self.page_size, proc_root=proc_root)
        self._state_written_at = float("-inf")
        self._state_marker: tuple[bool, int] = (False, 0)
        self.last_reload: ReloadRecord | None = None  # in the state file, for `uoomd reload`

    # -- set-up and tear-down

    def open(self) -> None:
        now = self.clock()
        self.watches = [self._open_watch(g, now) for g in self.plan.guards]
        for watch in self.watches:
            self._read(watch, now)
        self.outlets.configure(None, self.plan.daemon)

    @property
    def textfile(self) -> TextfileExporter | None:
        return self.outlets.textfile

    @property
    def listener(self) -> MetricsListener | None:
        return self.outlets.listener

    @property
    def desktop(self) -> Notices | None:
        """The desktop notices, created at the first (uoomd/carrier.py)."""
        return self.carrier.desktop

    @desktop.setter
    def desktop(self, notices: Notices | None) -> None:
        self.carrier.desktop = notices

    def close(self) -> None:
        self.reloads.cancel()
        self.outlets.close()
        for watch in self.watches:
            watch.close()
        self.watches = []
        self.warm.close()
        self.carrier.close()
        self.flight.close()
        self.executor.close()
        if self.desktop is not None:
            self.desktop.close()
        self.wakeup.close()

    def install_signal_handlers(self) -> None:
        """SIGHUP reloads, SIGTERM/SIGINT stop; handlers only note the signal and wake poll()."""
        self.wakeup.install_signal_handlers()

    # -- the loop

    def run(self) -> int:
        self.open()
        self.announce()
        self.notifier.ready(self.status_line())
        try:
            while True:
                timeout_s = self.tick(self.clock())
                self.wait(timeout_s)
                self._handle_signals()
                self.reloads.poll(self.clock())
        except StopDaemon:
            in_flight = [gs.guard for gs in self.state.guards if gs.phase is not Phase.IDLE]
            self.notifier.stopping()
            if self.reloads.check is not None:
                check = self.reloads.check
                self.log.info("policy_check_cancelled", policy=check.path, checker_pid=check.pid)
            self.log.info("stopping", in_flight=in_flight)
            return ExitCode.OK
        finally:
            self.close()

    def announce(self) -> None:
        """What the daemon says once it is open: started (and whether it signals), then each
        guard's levels resolved against its first reading; and the state file, at once."""
        self.log.info(
            "started",
            policy=self.plan.source,
            dry_run=self.plan.daemon.dry_run,
            signals=signals_text(self.plan.daemon.dry_run),
            guards=[w.guard.name for w in self.watches],
            pid=os.getpid(),
            # The renamed command line no longer shows -I -S: say here that the loop runs isolated.
            isolated=bool(sys.flags.isolated and sys.flags.no_site),
        )
        # Once, with the levels resolved against the first reading: a healthy machine hears
        # nothing more from the daemon, and "5%" means nothing until it meets the scope's total.
        for watch in self.watches:
            self.log.info("guard_levels", **guard_levels(watch.guard, watch.last))
        # Before READY=1: systemd runs ExecReload (`uoomd reload --pid $MAINPID`) only after it,
        # and that command checks the state file names this very process.
        self._write_state(self.clock(), force=True)

    def _handle_signals(self) -> None:
        pending = self.wakeup.take_signals()
        if signal.SIGTERM in pending or signal.SIGINT in pending:
            raise StopDaemon
        if signal.SIGHUP in pending:
            self.reload()

    def wait(self, timeout_s: float) -> None:
        """Sleep until the timeout, a PSI event, a victim's exit or a signal (uoomd/wakeup.py)."""
        self.wakeup.sleep(
            timeout_s,
            clock=self.clock,
            watches=self.watches,
            victim_fds=self.executor.victim_fds(),
            check_fd=self.reloads.fileno(),
            listener=self.listener,
            log=self.log,
        )

    def tick(self, now: float) -> float:
        """One pass; returns how long to sleep."""
        if self._quiet_since is not None and now - self._quiet_since < QUIET_FULL_TICK_S:
            fast = self._quiet_tick(now)
            if fast is not None:
                self._export_metrics(now, fast)
                return fast
        self._quiet_since = None
        timeout = self._full_tick(now)
        if self._may_tick_quietly():
            self._quiet_since = now
        self._export_metrics(now, timeout)
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
        """Hooks, desktop-notice or trace-writing children the loop must reap."""
        notices = self.desktop is not None and self.desktop.running > 0
        return self.executor.hooks_running() or notices or self.flight.running > 0

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
            if pacing.full_tick_needed(memory, watch.guard):  # a warm ranking, or an eta's trend
                return None
            watch.remember(memory, now)
            self.flight.memory(now, watch.guard.name, memory, state=self.state)
            self.metrics.observe_guard(watch.guard, memory, None, phase=Phase.IDLE, scope_present=True)
        self.notifier.watchdog(now)
        return self._next_timeout(now)

    def _full_tick(self, now: float) -> float:
        tick_at = now  # before this tick's readings: a signal logs the time since
        readings = [r for r in (self._read(w, now) for w in self.watches) if r is not None]
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
        before, outputs = self.state, list[Output]()
        if rankings or not decision.is_quiet(self.state, obs, self.plan):
            self.state, outputs = decision.step(self.state, obs, self.plan, rankings)
            self.carrier.carry_out(outputs, tick_at=tick_at)
            self.executor.keep_only(self.state.in_flight())
        self.carrier.poll(now, in_flight=self.state.in_flight())  # hooks reaped, held SIGTERMs released
        # After the signals: a decision's trace is written by a child, never by the loop.
        self.flight.tick(now, before=before, readings=readings, rankings=rankings, alive=alive, outputs=outputs)
        self.flight.poll(now)
        if self.desktop is not None:
            self.desktop.poll(now)
        self._observe(readings)
        self.notifier.watchdog(now)
        self.notifier.update_status(self.status_line)
        self._write_state(now)
        return self._next_timeout(now)

    def _observe(self, readings: list[GuardReading]) -> None:
        """What this tick read and the phase each guard is in now, for the metrics."""
        fresh = {r.guard: r for r in readings}
        for watch in self.watches:
            name = watch.guard.name
            reading = fresh.get(name)
            self.metrics.observe_guard(
                watch.guard,
                None if reading is None else reading.memory,  # none this tick: its gauges go, not go stale
                None if reading is None else reading.pressure,
                phase=self.state.guard(name).phase,
                scope_present=watch.gone_at is None,
            )
        if self.warm.rescanned:
            self.metrics.observe_scan(self.warm.scan_cost_s)

    def _export_metrics(self, now: float, timeout_s: float) -> None:
        """At the end of each tick: the chosen sleep, and the textfile when it is due."""
        self.metrics.observe_sleep(timeout_s)
        # Busy: a victim in flight must not wait behind a file write (uoomd/metrics/textfile.py
        # write_due); a dry run's hold has none.
        busy = any(gs.phase not in (Phase.IDLE, Phase.AUDIT_HOLD) for gs in self.state.guards)
        failed = self.outlets.write(now, busy=busy)
        if failed is not None:
            self.throttle.warning(
                f"textfile:{failed.path}",
                event="metrics_file_failed",
                path=failed.path,
                error=failed.error,
                refused=failed.refused,
            )

    def _write_state(self, now: float, *, force: bool = False) -> None:
        """The state file: at every tick while a guard may act (the board keeps it to 1/s), every
        QUIET_STATE_WRITE_S when all is quiet and nothing new was decided. Its JSON dump and
        rename at 1/s cost an idle daemon ~210 of 290 us per tick (bench/run.py --only idle).
        ``force``: now, whatever the pacing (a reload's outcome, which `uoomd reload` waits for)."""
        quiet = not self.warm.active and all(gs.phase is Phase.IDLE for gs in self.state.guards)
        # A new decision or the end of an episode is written at once, quiet or not.
        marker = (quiet, self.recent.added)
        if not force and quiet and marker == self._state_marker and now - self._state_written_at < QUIET_STATE_WRITE_S:
            return
        self._state_written_at, self._state_marker = now, marker
        self.board.maybe_write(
            now,
            status_document(
                plan=self.plan,
                state=self.state,
                watches=self.watches,
                recent=self.recent,
                metrics=self.metrics.dump(),
                reload=self.last_reload,
            ),
            force=force,
        )

    def status_line(self) -> str:
        """What systemd's STATUS= says now (uoomd/statusboard.py)."""
        return status_line(self.watches, self.recent)

    def _read(self, watch: GuardWatch, now: float) -> GuardReading | None:
        return watch.read(now, proc_root=self.proc_root, log=self.log, on_error=self._source_failed)

    def _victim_gone(self, key: ProcessKey) -> None:
        """A victim found gone when signalled: the warm ranking and the flight recorder forget it."""
        self.warm.forget(key)
        self.flight.gone(self.clock(), key)

    def _source_failed(self, key: str, event: str = "source_error", **facts: object) -> None:
        """A source that could not be read: counted each time, logged once per ERROR_LOG_INTERVAL_S."""
        if event == "reading_failed":
            source, guard = facts.get("source"), facts.get("guard")
            self.metrics.note_reading_failure(
                source if isinstance(source, str) else "other", guard if isinstance(guard, str) else None
            )
        self.throttle.warning(key, event, **facts)

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
            gs = self.state.guard(watch.guard.name)
            cap = thrash.poll_cap_s(watch.guard, sustaining=any(t.active_since is not None for t in gs.psi))
            if gs.phase is not Phase.IDLE:
                sleep_s = self.plan.daemon.poll_min_s
            elif cap is not None:
                sleep_s = min(sleep_s, cap)
            timeouts.append(sleep_s)
        if self._children_running():
            timeouts.append(HOOK_POLL_S)
        release_at = self.carrier.next_release()
        if release_at is not None:
            timeouts.append(max(0.0, release_at - now))  # a SIGTERM held behind before_kill goes then
        ping_in = self.notifier.watchdog_due_in(now)
        if ping_in is not None:
            timeouts.append(ping_in)  # never sleep past a watchdog ping
        check_due = self.reloads.due_in(now)
        if check_due is not None:
            timeouts.append(check_due)  # an overdue checker is killed then
        return min(timeouts)

    # -- reload

    def reload(self) -> None:
        """SIGHUP: check the policy file again in a child; the loop polls it, never waits (uoomd/reload.py)."""
        self.notifier.reloading()
        self.reloads.request(self.plan.source)

    def _reload_answered(self, result: CheckResult, started_at: float) -> None:
        """Apply a good plan, or log why not and keep the last good one; either way the state
        file says so at once, for `uoomd reload` waiting on it (uoomd/reload_request.py)."""
        error: str | None
        if isinstance(result, Plan):
            error = self._apply_plan(result)
        else:
            error = result.render() if isinstance(result, PolicyError) else str(result)
            self.log.error("policy_reload_failed", policy=self.plan.source, error=error, kept="previous policy")
        self.last_reload = ReloadRecord(
            started_at=started_at,
            finished_at=time.time(),
            outcome="applied" if error is None else "refused",
            policy=self.plan.source,
            error=error,
        )
        self._write_state(self.clock(), force=True)

    def _apply_plan(self, new_plan: Plan) -> str | None:
        """Run on ``new_plan`` from now on; why not, when its sources cannot be opened."""
        if self.forced_dry_run and not new_plan.daemon.dry_run:
            new_plan = replace(new_plan, daemon=replace(new_plan.daemon, dry_run=True))
        try:
            now = self.clock()
            watches = [self._open_watch(g, now) for g in new_plan.guards]
        except (SetupError, OSError) as exc:
            self.log.error("policy_reload_failed", policy=self.plan.source, error=str(exc), kept="previous policy")
            return str(exc)
        for watch in self.watches:
            watch.close()
        self.watches = watches
        self.state = _carry_state(self.state, new_plan)
        old_daemon, self.plan = self.plan.daemon, new_plan
        self.metrics.observe_plan(new_plan)
        self.outlets.configure(old_daemon, new_plan.daemon)
        self.warm.drop()  # ranked with the old plan's rules
        self.flight.reset(new_plan)  # a trace is replayed under one policy
        self._quiet_since = None
        self.board = StatusBoard(new_plan.daemon.state_file, self.log)
        self.log.info("policy_reloaded", policy=new_plan.source, guards=[g.name for g in new_plan.guards])
        return None


def _carry_state(state: State, plan: Plan) -> State:
    """Keep the escalation of guards that survive a reload; new guards start idle."""
    fresh = decision.initial_state(plan)
    kept = {gs.guard: gs for gs in state.guards}
    guards = tuple(kept.get(gs.guard, gs) for gs in fresh.guards)
    return replace(fresh, guards=guards, kill_times=state.kill_times)


def run_daemon(*, policy_path: str, dry_run: bool, renaming: Renaming | None = None) -> int:
    """``uoomd run``: load, protect ourselves, loop until SIGTERM. ``renaming``: how taking the
    name ``uoomd`` went (uoomd/cli.py run_isolated), logged once there is a log."""
    plan = load_plan_isolated(policy_path)
    if dry_run:
        plan = replace(plan, daemon=replace(plan.daemon, dry_run=True))
    metrics = Metrics(wall_clock=time.time)  # first in the pipeline: it counts every event, self_protected too
    log = configure(plan.daemon.log_format, debug=bool(os.environ.get("UOOMD_DEBUG")), first=[metrics.processor])
    protection = protect_self()
    log.info(
        "self_protected",
        oom_score_adj=protection.oom_score_adj,
        mlocked=protection.mlocked,
        mlock_error=protection.mlock_error,
        nice=protection.nice,
        nofile=protection.nofile,
        oom_score_adj_error=protection.oom_score_adj_error,
        nice_error=protection.nice_error,
    )
    if renaming is not None and not renaming.complete:
        # The daemon guards as well under the interpreter's name; ps and protect rules by name do not see it.
        log.warning("process_name_kept", comm_error=renaming.comm_error, cmdline_error=renaming.cmdline_error)
    executor = LiveExecutor(hook_timeout_s=plan.hooks.timeout_s)
    daemon = Daemon(plan, executor=executor, log=log, forced_dry_run=dry_run, metrics=metrics)
    daemon.install_signal_handlers()
    return daemon.run()
