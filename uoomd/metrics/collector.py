"""What uoomd counts: its metric families, fed by the daemon's log events and each tick's readings (pure).

Two feeds, one owner per fact. What the daemon *did* arrives as the log events it already
emits (:meth:`Metrics.processor` sits in the logs pipeline, so a counter and its log line
can never disagree); what it *sees* (memory, levels, phase, pressure) is handed over once
per tick (:meth:`Metrics.observe_guard`). A :class:`Metrics` lives as long as the daemon:
a reload calls :meth:`Metrics.observe_plan`, which drops the gauges of removed guards and
never touches a counter.

No process name, command line or PID is ever a label: they are the attacker's to choose,
and a series per process would grow without bound. The facts about a victim are in the
log line that the counter counts.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from typing import Final

from uoomd import __version__
from uoomd.decision import Phase, levels
from uoomd.metrics.exposition import RenderCache, render
from uoomd.metrics.registry import Family, LabelValues, Registry
from uoomd.plan import GuardPlan, Plan, PsiAction, ScopeKind
from uoomd.readings import MemoryReading, PressureReading

# A /proc scan of ~2,000 processes takes a few ms (BENCHMARKS.md); a scan near a second
# means a machine already thrashing.
SCAN_BUCKETS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A hook's result carries its PID but not its guard (uoomd/hooks.py): remembered from its
# start. Hooks in flight are a handful; the cap keeps a bug from growing the map.
_HOOKS_REMEMBERED = 64

_G = ("guard",)
FAMILIES: Final = (
    Family(name="uoomd_build_info", kind="gauge", help="Always 1: the uoomd version and Python running it.",
           labels=("version", "python")),
    Family(name="uoomd_start_time_seconds", kind="gauge", help="Unix time the daemon started (counters start at 0)."),
    Family(name="uoomd_dry_run", kind="gauge", help="1 when the policy (or --dry-run) sends no signal."),
    Family(name="uoomd_poll_limit_seconds", kind="gauge", help="The policy's poll_min and poll_max.",
           labels=("limit",)),
    Family(name="uoomd_poll_interval_seconds", kind="gauge", help="How long the loop chose to sleep after its last "
           "tick."),
    Family(name="uoomd_scan_duration_seconds", kind="histogram", help="Time to scan /proc and rank the candidates.",
           buckets=SCAN_BUCKETS_S),
    Family(name="uoomd_reading_failures_total", kind="counter", help="Readings that failed, by source.",
           labels=("guard", "source")),
    Family(name="uoomd_policy_reloads_total", kind="counter", help="Policy reloads, by result (ok, failed).",
           labels=("result",)),
    Family(name="uoomd_log_events_total", kind="counter", help="Log events emitted, by level and event name.",
           labels=("level", "event")),
    # per guard: what it sees
    Family(name="uoomd_memory_available_bytes", kind="gauge", help="MemAvailable of the scope (a cgroup: its limit "
           "less usage plus reclaimable cache).", labels=_G),
    Family(name="uoomd_memory_total_bytes", kind="gauge", help="MemTotal of the scope (a cgroup: its limit).",
           labels=_G),
    Family(name="uoomd_swap_free_bytes", kind="gauge", help="Free swap of the scope.", labels=_G),
    Family(name="uoomd_swap_total_bytes", kind="gauge", help="Swap of the scope.", labels=_G),
    Family(name="uoomd_term_threshold_bytes", kind="gauge", help="SIGTERM below this much available memory.",
           labels=_G),
    Family(name="uoomd_kill_threshold_bytes", kind="gauge", help="SIGKILL below this much available memory.",
           labels=_G),
    Family(name="uoomd_swap_term_threshold_bytes", kind="gauge", help="With swap: SIGTERM only below this free swap "
           "too.", labels=_G),
    Family(name="uoomd_swap_kill_threshold_bytes", kind="gauge", help="With swap: SIGKILL only below this free swap "
           "too.", labels=_G),
    Family(name="uoomd_guard_phase", kind="gauge", help="1 for the escalation phase the guard is in, 0 for the others.",
           labels=("guard", "phase")),
    Family(name="uoomd_guard_scope_present", kind="gauge", help="0 while the guard's cgroup is gone (it is looked "
           "for again).", labels=_G),
    Family(name="uoomd_pressure_avg10_ratio", kind="gauge", help="PSI memory pressure, 10 s average, as a ratio "
           "(the file's percent / 100); read when a PSI trigger needs it.", labels=("guard", "kind")),
    Family(name="uoomd_pressure_stall_seconds_total", kind="counter", help="PSI memory stall time seen in the scope "
           "since uoomd started (the kernel's total, summed over its changes).", labels=("guard", "kind")),
    # per guard: what it did
    Family(name="uoomd_decisions_total", kind="counter", help="Victims chosen or escalated, by action (term, kill, "
           "would_term, would_kill) and trigger.", labels=("guard", "action", "trigger")),
    Family(name="uoomd_signals_total", kind="counter", help="Signals delivered, one per victim and signal (a group or "
           "cgroup victim counts once), by the trigger that decided it.", labels=("guard", "signal", "trigger")),
    Family(name="uoomd_actions_total", kind="counter", help="Signal, cgroup.kill and process_mrelease actions, by "
           "outcome.", labels=("guard", "action", "outcome")),
    Family(name="uoomd_last_kill_timestamp_seconds", kind="gauge", help="Unix time of the guard's last delivered "
           "signal; 0: none since the daemon started.", labels=_G),
    Family(name="uoomd_victims_stuck_total", kind="counter", help="Victims that outlived SIGKILL and kill_timeout, "
           "given up on.", labels=_G),
    Family(name="uoomd_victims_exited_total", kind="counter", help="Victims seen exiting after a signal.", labels=_G),
    Family(name="uoomd_recoveries_total", kind="counter", help="Episodes ended, by how (memory_back, timeout).",
           labels=("guard", "how")),
    Family(name="uoomd_rate_limited_total", kind="counter", help="Crossings that chose no victim: "
           "max_kills_per_minute reached (once per episode).", labels=_G),
    Family(name="uoomd_no_candidate_total", kind="counter", help="Crossings that found no victim to choose (once per "
           "episode).", labels=_G),
    Family(name="uoomd_psi_warnings_total", kind="counter", help="PSI triggers with action warn sustained (once per "
           "episode).", labels=_G),
    Family(name="uoomd_psi_events_total", kind="counter", help="PSI trigger events from the kernel (or the polled "
           "fallback).", labels=("guard", "trigger")),
    Family(name="uoomd_hooks_started_total", kind="counter", help="Hooks started (before_kill and after_kill).",
           labels=_G),
    Family(name="uoomd_hooks_finished_total", kind="counter", help="Hooks (before_kill and after_kill) ended, by "
           "outcome (completed, failed, timed_out; failed includes one that could not start).",
           labels=("guard", "outcome")),
    Family(name="uoomd_scope_lost_total", kind="counter", help="Times the guard's cgroup was removed under it.",
           labels=_G),
)  # fmt: skip

_TRIGGERS = frozenset({"mem_available_term", "mem_available_kill", "mem_available_eta", "term_timeout", "kill_timeout"})
_PSI_TRIGGER = re.compile(r"psi\[\d{1,4}\]")  # decision.describe_psi(): "psi[0] full 200000/2000000us ..."
_TOKEN = re.compile(r"[a-z][a-z0-9_]{0,39}")  # the daemon's own words: event names, outcomes, levels
_SIGNALS = frozenset({"SIGTERM", "SIGKILL"})
_PRESSURE_KINDS = ("some", "full")
_GUARD_GAUGES = (
    "uoomd_memory_available_bytes",
    "uoomd_memory_total_bytes",
    "uoomd_swap_free_bytes",
    "uoomd_swap_total_bytes",
    "uoomd_term_threshold_bytes",
    "uoomd_kill_threshold_bytes",
    "uoomd_swap_term_threshold_bytes",
    "uoomd_swap_kill_threshold_bytes",
)


def trigger_label(trigger: object) -> str:
    """A decision's trigger as a label of a closed set: a PSI trigger by its index alone
    (its description changes with every edit of its numbers, and would start a new series)."""
    if not isinstance(trigger, str):
        return "other"
    if trigger in _TRIGGERS:
        return trigger
    head = trigger.split(" ", 1)[0]
    return head if _PSI_TRIGGER.fullmatch(head) else "other"


def _token(value: object) -> str:
    return value if isinstance(value, str) and _TOKEN.fullmatch(value) else "other"


def _guard(facts: Mapping[str, object]) -> str:
    guard = facts.get("guard")
    return guard if isinstance(guard, str) else ""


def _signal(value: object) -> str:
    return value if isinstance(value, str) and value in _SIGNALS else "other"


def _signal_triggers(guard: GuardPlan) -> dict[str, tuple[str, ...]]:
    """The (signal, trigger) pairs a guard can produce, for the series created at 0."""
    psi = [(f"psi[{i}]", t.action) for i, t in enumerate(guard.psi)]
    eta = guard.eta.action.value if guard.eta is not None else None  # mem_available_eta: "term" or "kill"
    return {
        "SIGTERM": (
            "mem_available_term",
            *(name for name, action in psi if action is PsiAction.TERM),
            *(("mem_available_eta",) if eta == "term" else ()),
        ),
        "SIGKILL": (
            "mem_available_kill",
            "term_timeout",
            *(name for name, action in psi if action is PsiAction.KILL),
            *(("mem_available_eta",) if eta == "kill" else ()),
        ),
    }


class Metrics:
    """The daemon's metrics: fed by log events and readings, rendered on demand.

    ``wall_clock`` is ``time.time`` in the daemon (a timestamp metric is wall time, which the
    pure core never reads); tests pass a fake."""

    def __init__(self, *, wall_clock: Callable[[], float]) -> None:
        self.registry = Registry(FAMILIES)
        self._wall_clock = wall_clock
        self._last_trigger: dict[str, str] = {}  # guard -> the trigger of its last decision
        self._hook_guards: dict[int, str] = {}  # a running hook's pid -> its guard
        self._stall_seen_us: dict[tuple[str, str], int] = {}  # (guard, kind) -> the kernel's last total
        self._scopes: dict[str, str] = {}  # guard -> the scope its pressure baselines belong to
        self._rendered_generation = -1
        self._rendered = b""
        self._render_cache: RenderCache = {}
        python = ".".join(str(part) for part in sys.version_info[:3])
        reg = self.registry
        reg.set("uoomd_build_info", (__version__, python), 1)
        reg.set("uoomd_start_time_seconds", (), wall_clock())
        reg.ensure("uoomd_scan_duration_seconds")
        for result in ("ok", "failed"):
            reg.ensure("uoomd_policy_reloads_total", (result,))
        self._handlers: dict[str, Callable[[Mapping[str, object]], None]] = {
            "victim_chosen": self._decision,
            "victim_escalated": self._decision,
            "action_result": self._action_result,
            "victim_stuck": lambda f: reg.inc("uoomd_victims_stuck_total", (_guard(f),)),
            "victim_exited": lambda f: reg.inc("uoomd_victims_exited_total", (_guard(f),)),
            "memory_recovered": lambda f: reg.inc("uoomd_recoveries_total", (_guard(f), "memory_back")),
            "recovery_timeout": lambda f: reg.inc("uoomd_recoveries_total", (_guard(f), "timeout")),
            "rate_limited": lambda f: reg.inc("uoomd_rate_limited_total", (_guard(f),)),
            "no_candidate": lambda f: reg.inc("uoomd_no_candidate_total", (_guard(f),)),
            "psi_warn": lambda f: reg.inc("uoomd_psi_warnings_total", (_guard(f),)),
            "trigger_fired": lambda f: reg.inc("uoomd_psi_events_total", (_guard(f), trigger_label(f.get("trigger")))),
            "scope_gone": lambda f: reg.inc("uoomd_scope_lost_total", (_guard(f),)),
            "policy_reloaded": lambda _f: reg.inc("uoomd_policy_reloads_total", ("ok",)),
            "policy_reload_failed": lambda _f: reg.inc("uoomd_policy_reloads_total", ("failed",)),
            # reading_failed is not counted from the log: the daemon logs it at most once per
            # 30 s per source (daemon.py ERROR_LOG_INTERVAL_S); note_reading_failure() counts each.
        }

    # -- feed 1: log events

    def processor(self, level: str, event: dict[str, object]) -> dict[str, object]:
        """A logs pipeline processor (uoomd/logs.py Processor): counts the event, passes it on unchanged.

        Put it first, before escaping: it reads the facts as the daemon gave them."""
        name = event.get("event")
        if isinstance(name, str):
            self.count_event(level, name, event)
        return event

    def count_event(self, level: str, event: str, facts: Mapping[str, object]) -> None:
        self.registry.inc("uoomd_log_events_total", (_token(level), _token(event)))
        handler = self._handlers.get(event)
        if handler is not None:
            handler(facts)

    def _decision(self, facts: Mapping[str, object]) -> None:
        guard, trigger = _guard(facts), trigger_label(facts.get("trigger"))
        self.registry.inc("uoomd_decisions_total", (guard, _token(facts.get("action")), trigger))
        # Its signal is the next action_result of this guard (daemon.py _execute: the record,
        # then the SendSignal or KillCgroup it came with).
        self._last_trigger[guard] = trigger

    def _action_result(self, facts: Mapping[str, object]) -> None:
        action, outcome, guard = _token(facts.get("action")), _token(facts.get("outcome")), _guard(facts)
        pid = facts.get("pid")
        reg = self.registry
        if action == "hook":
            if outcome == "started" and isinstance(pid, int):
                if len(self._hook_guards) >= _HOOKS_REMEMBERED:
                    self._hook_guards.pop(next(iter(self._hook_guards)))
                self._hook_guards[pid] = guard
                reg.inc("uoomd_hooks_started_total", (guard,))
            else:
                started_by = self._hook_guards.pop(pid, "") if isinstance(pid, int) else ""
                reg.inc("uoomd_hooks_finished_total", (guard or started_by, outcome))
            return
        reg.inc("uoomd_actions_total", (guard, action, outcome))
        if action in ("signal", "cgroup_kill") and outcome == "sent":
            signal = _signal(facts.get("signal"))
            reg.inc("uoomd_signals_total", (guard, signal, self._last_trigger.get(guard, "other")))
            reg.set("uoomd_last_kill_timestamp_seconds", (guard,), self._wall_clock())

    # -- feed 2: the daemon's readings

    def observe_plan(self, plan: Plan) -> None:
        """At start and after each reload: the policy's settings, zero series for what each guard
        can count, and the gauges of removed guards dropped. No counter is touched."""
        reg = self.registry
        reg.set("uoomd_dry_run", (), int(plan.daemon.dry_run))
        reg.set("uoomd_poll_limit_seconds", ("min",), plan.daemon.poll_min_s)
        reg.set("uoomd_poll_limit_seconds", ("max",), plan.daemon.poll_max_s)
        names = {g.name for g in plan.guards}
        for gone in set(self._scopes) - names:
            self._forget_guard(gone)
        for guard in plan.guards:
            scope = guard.scope.describe()
            if self._scopes.get(guard.name) != scope:
                self._drop_pressure_baseline(guard.name)  # another cgroup's totals are not a change of ours
            self._scopes[guard.name] = scope
            self._ensure_guard_counters(guard, dry_run=plan.daemon.dry_run)
            if reg.value("uoomd_last_kill_timestamp_seconds", (guard.name,)) is None:
                reg.set("uoomd_last_kill_timestamp_seconds", (guard.name,), 0)

    def _ensure_guard_counters(self, guard: GuardPlan, *, dry_run: bool) -> None:
        reg, name = self.registry, guard.name
        actions = {"SIGTERM": "would_term" if dry_run else "term", "SIGKILL": "would_kill" if dry_run else "kill"}
        for signal, triggers in _signal_triggers(guard).items():
            for trigger in triggers:
                if not dry_run:
                    reg.ensure("uoomd_signals_total", (name, signal, trigger))
                if not (dry_run and trigger == "term_timeout"):  # a dry run holds, never escalates
                    reg.ensure("uoomd_decisions_total", (name, actions[signal], trigger))
        for family in (
            "uoomd_victims_stuck_total",
            "uoomd_victims_exited_total",
            "uoomd_rate_limited_total",
            "uoomd_no_candidate_total",
        ):
            reg.ensure(family, (name,))
        for how in ("memory_back", "timeout"):
            reg.ensure("uoomd_recoveries_total", (name, how))
        reg.ensure("uoomd_reading_failures_total", (name, "memory"))
        if guard.psi:
            reg.ensure("uoomd_reading_failures_total", (name, "psi"))
            reg.ensure("uoomd_psi_warnings_total", (name,))
        if guard.scope.kind is ScopeKind.CGROUP:
            reg.ensure("uoomd_scope_lost_total", (name,))

    def _forget_guard(self, name: str) -> None:
        """A guard the new policy does not have: its gauges go (they would be stale), its counters stay."""
        for family in (
            *_GUARD_GAUGES,
            "uoomd_guard_phase",
            "uoomd_guard_scope_present",
            "uoomd_pressure_avg10_ratio",
            "uoomd_last_kill_timestamp_seconds",
        ):
            self.registry.remove_matching(family, "guard", name)
        self._drop_pressure_baseline(name)
        self._scopes.pop(name, None)
        self._last_trigger.pop(name, None)

    def _drop_pressure_baseline(self, guard: str) -> None:
        for kind in _PRESSURE_KINDS:
            self._stall_seen_us.pop((guard, kind), None)

    def observe_guard(
        self,
        guard: GuardPlan,
        memory: MemoryReading | None,
        pressure: PressureReading | None,
        *,
        phase: Phase,
        scope_present: bool,
    ) -> None:
        """One guard's state at this tick. ``memory`` None: no reading now (its gauges go rather
        than go stale); ``pressure`` None: not read this tick (the last values stay)."""
        reg, name = self.registry, guard.name
        key: LabelValues = (name,)
        for each in Phase:
            reg.set("uoomd_guard_phase", (name, str(each)), int(each is phase))
        reg.set("uoomd_guard_scope_present", key, int(scope_present))
        if memory is None:
            for family in _GUARD_GAUGES:
                reg.remove(family, key)
        else:
            lv = levels(memory, guard)  # the core's own levels: one owner of the arithmetic
            reg.set("uoomd_memory_available_bytes", key, memory.available_bytes)
            reg.set("uoomd_memory_total_bytes", key, memory.total_bytes)
            reg.set("uoomd_swap_free_bytes", key, memory.swap_free_bytes)
            reg.set("uoomd_swap_total_bytes", key, memory.swap_total_bytes)
            reg.set("uoomd_term_threshold_bytes", key, lv.term_bytes)
            reg.set("uoomd_kill_threshold_bytes", key, lv.kill_bytes)
            reg.set("uoomd_swap_term_threshold_bytes", key, lv.swap_term_bytes)
            reg.set("uoomd_swap_kill_threshold_bytes", key, lv.swap_kill_bytes)
        if not scope_present:
            for kind in _PRESSURE_KINDS:
                reg.remove("uoomd_pressure_avg10_ratio", (name, kind))
            self._drop_pressure_baseline(name)
        elif pressure is not None:
            self._observe_pressure(name, "some", pressure.some_avg10, pressure.some_total_us)
            self._observe_pressure(name, "full", pressure.full_avg10, pressure.full_total_us)

    def _observe_pressure(self, guard: str, kind: str, avg10_percent: float, total_us: int) -> None:
        reg, labels = self.registry, (guard, kind)
        reg.set("uoomd_pressure_avg10_ratio", labels, avg10_percent / 100)
        reg.ensure("uoomd_pressure_stall_seconds_total", labels)
        seen = self._stall_seen_us.get(labels)
        self._stall_seen_us[labels] = total_us
        if seen is None:
            return  # the first reading is the baseline: stall before uoomd looked is not counted
        # A total below the last one is a new cgroup of the same name (its count began at 0
        # when it was created): all of it is new. The sum never goes down.
        added_us = total_us - seen if total_us >= seen else total_us
        if added_us:
            reg.inc("uoomd_pressure_stall_seconds_total", labels, added_us / 1_000_000)

    def observe_sleep(self, sleep_s: float) -> None:
        self.registry.set("uoomd_poll_interval_seconds", (), sleep_s)

    def observe_scan(self, duration_s: float) -> None:
        self.registry.observe("uoomd_scan_duration_seconds", (), duration_s)

    def note_reading_failure(self, source: str, guard: str | None) -> None:
        """Every failed reading, before the daemon's log rate limit (sources: memory, psi, processes, members)."""
        self.registry.inc("uoomd_reading_failures_total", (guard or "", _token(source)))

    # -- out

    def exposition(self) -> bytes:
        """The text format, rendered again only when a value changed since the last call."""
        if self._rendered_generation != self.registry.generation:
            self._rendered = render(self.registry, self._render_cache).encode()
            self._rendered_generation = self.registry.generation
        return self._rendered

    def dump(self) -> dict[str, list[list[object]]]:
        """For the state file, so that ``uoomd status --metrics`` renders the same values."""
        return self.registry.dump()


def render_dumped(dumped: object) -> str:
    """The exposition of a :meth:`Metrics.dump` read back from the state file; ValueError if malformed."""
    registry = Registry(FAMILIES)
    registry.load(dumped)
    return render(registry)
