"""The compiled policy: frozen, validated values the daemon runs on (stdlib only).

``policy/`` turns a TOML file into a :class:`Plan`; nothing downstream ever sees
pydantic or TOML.  Every quantity carries its unit in its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from uoomd.dfa import Dfa


class LogFormat(StrEnum):
    AUTO = "auto"
    CONSOLE = "console"
    JSON = "json"


class VictimKind(StrEnum):
    PROCESS = "process"
    PROCESS_GROUP = "process-group"
    CGROUP = "cgroup"


class PsiKind(StrEnum):
    SOME = "some"
    FULL = "full"


class PsiAction(StrEnum):
    WARN = "warn"
    TERM = "term"
    KILL = "kill"


class ScopeKind(StrEnum):
    SYSTEM = "system"
    CGROUP = "cgroup"


@dataclass(frozen=True, slots=True, kw_only=True)
class Amount:
    """A memory level given either in bytes or as a fraction of a total."""

    bytes: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.fraction is None):
            raise ValueError("an Amount is either bytes or a fraction")

    def resolve_bytes(self, total_bytes: int) -> int:
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        return int(total_bytes * self.fraction)

    def describe(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return f"{self.bytes}B"


@dataclass(frozen=True, slots=True, kw_only=True)
class Scope:
    """What a guard watches: the whole machine or one cgroup directory."""

    kind: ScopeKind
    cgroup_path: str | None = None  # absolute directory, e.g. /sys/fs/cgroup/memory/app

    def describe(self) -> str:
        return "system" if self.kind is ScopeKind.SYSTEM else f"cgroup:{self.cgroup_path}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PsiTriggerPlan:
    kind: PsiKind
    stall_us: int
    window_us: int
    sustain_s: float
    action: PsiAction
    gated: bool = True  # False: a backstop that acts whatever psi_refault_gate says (psi_mem_gate still holds)

    def describe(self) -> str:
        return f"{self.kind} {self.stall_us} {self.window_us}"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardPlan:
    name: str
    scope: Scope
    mem_available_term: Amount
    mem_available_kill: Amount
    swap_free_term: Amount
    swap_free_kill: Amount
    victim: VictimKind = VictimKind.PROCESS
    min_badness: int = 0
    ignore_positive_adj: bool = False
    psi_mem_gate: Amount = field(default_factory=lambda: Amount(fraction=0.2))
    # The warn level (above the term level): a record and a notice to the likely victim's owner,
    # no signal. None: no warn level. swap_free_warn None: memory alone decides the warning.
    mem_available_warn: Amount | None = None
    swap_free_warn: Amount | None = None
    # Gated PSI triggers act only while refaults come at least this fast, per second
    # (uoomd/thrash.py); 0 bytes: no refault gate.
    psi_refault_gate: Amount = field(default_factory=lambda: Amount(bytes=0))
    psi_refault_sustain_s: float = 0.0  # ... and have kept coming that fast this long
    # ... or this long where the count is every refault (MemoryReading.refaults_all).
    psi_refault_sustain_all_s: float = 0.0
    psi: tuple[PsiTriggerPlan, ...] = ()
    eta: EtaPlan | None = None  # mem_available_eta: act on the trend (uoomd/trend.py); None: levels only


class EtaAction(StrEnum):
    TERM = "term"
    KILL = "kill"


@dataclass(frozen=True, slots=True, kw_only=True)
class EtaPlan:
    """Act when the observed fall says the kill level is ``eta_s`` away, even above the term level."""

    eta_s: float
    min_fall: Amount  # per second, of the scope's memory total: a slower fall never acts
    sustain_s: float  # the projection must hold this long, at every reading
    action: EtaAction = EtaAction.TERM


@dataclass(frozen=True, slots=True, kw_only=True)
class MatchPlan:
    """All present keys must match. Regexes are searched, in linear time (uoomd/dfa.py); user and uid are exact."""

    name: Dfa | None = None
    cmdline: Dfa | None = None
    exe: Dfa | None = None
    cgroup: Dfa | None = None
    user: str | None = None
    uid: int | None = None

    def needs(self) -> frozenset[str]:
        """The expensive process details this match must read (cmdline, exe, cgroup, user)."""
        wanted = {k for k in ("cmdline", "exe", "cgroup") if getattr(self, k) is not None}
        if self.user is not None:
            wanted.add("user")
        return frozenset(wanted)


@dataclass(frozen=True, slots=True, kw_only=True)
class RulePlan:
    index: int  # position in the file, for messages: rule[index]
    label: str  # the rule's `name`, or "rule[index]"
    match: MatchPlan
    protect: bool = False
    adjust: int = 0
    guards: tuple[str, ...] = ()  # empty: applies to every guard


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonPlan:
    dry_run: bool = False
    poll_min_s: float = 0.02
    poll_max_s: float = 1.0
    log_format: LogFormat = LogFormat.AUTO
    state_file: str = "/run/uoomd/state.json"
    notify_desktop: bool = False
    metrics_file: str | None = None  # the node_exporter textfile (uoomd/metrics/textfile.py); None: not written
    metrics_listen: str | None = None  # "127.0.0.1:9595", "[::1]:9595" or a unix socket path; None: no listener
    metrics_interval_s: float = 5.0  # the textfile is rewritten at most this often
    # record_on_decision: the last record_window_s of readings and rankings kept in memory and
    # written as a trace into record_dir after each decision, the newest record_keep kept (uoomd/flight.py).
    record_on_decision: bool = False
    record_dir: str = "/var/lib/uoomd/traces"
    record_window_s: float = 120.0
    record_keep: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class EscalationPlan:
    term_timeout_s: float = 5.0
    kill_timeout_s: float = 3.0
    max_kills_per_minute: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class HooksPlan:
    after_kill: tuple[str, ...] = ()
    timeout_s: float = 10.0
    # Run when a SIGTERM victim is chosen; the SIGTERM waits until it exits or for
    # before_kill_timeout_s, whichever is first (uoomd/beforekill.py). Never at the kill level.
    before_kill: tuple[str, ...] = ()
    before_kill_timeout_s: float = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    source: str  # the file it came from
    daemon: DaemonPlan
    escalation: EscalationPlan
    guards: tuple[GuardPlan, ...]
    rules: tuple[RulePlan, ...] = ()
    hooks: HooksPlan = field(default_factory=HooksPlan)

    def guard(self, name: str) -> GuardPlan:
        for guard in self.guards:
            if guard.name == name:
                return guard
        raise KeyError(name)

    def rules_for(self, guard_name: str) -> tuple[RulePlan, ...]:
        return tuple(r for r in self.rules if not r.guards or guard_name in r.guards)

    def needed_details(self) -> frozenset[str]:
        """Union of the expensive process details the rules, or a cgroup victim, need."""
        needed: set[str] = set()
        for rule in self.rules:
            needed |= rule.match.needs()
        if any(g.victim is VictimKind.CGROUP for g in self.guards):
            needed.add("cgroup")  # the victim's cgroup is what gets signalled
        return frozenset(needed)
