"""Compile a validated PolicyModel into a Plan, checking what needs the whole policy or the machine."""

from __future__ import annotations

import os

from uoomd.dfa import Dfa
from uoomd.plan import (
    Amount,
    DaemonPlan,
    EscalationPlan,
    EtaAction,
    EtaPlan,
    GuardPlan,
    HooksPlan,
    LogFormat,
    MatchPlan,
    Plan,
    PsiAction,
    PsiKind,
    PsiTriggerPlan,
    RulePlan,
    Scope,
    ScopeKind,
    VictimKind,
)
from uoomd.policy.automaton import RegexBudget, compile_regex
from uoomd.policy.locate import KeyPath
from uoomd.policy.model import GuardModel, MatchModel, PolicyModel, duration_s
from uoomd.policy.regex import RegexRefusedError
from uoomd.sources.scope import read_scope_memory
from uoomd.trust import untrusted_reason
from uoomd.units import format_bytes, parse_percent, parse_size_bytes

Issue = tuple[KeyPath, str]


def to_amount(value: str | int) -> Amount:
    if isinstance(value, int):
        return Amount(bytes=value)
    fraction = parse_percent(value)
    if fraction is not None:
        return Amount(fraction=fraction)
    return Amount(bytes=parse_size_bytes(value))


def compile_policy(model: PolicyModel, *, source: str, check_system: bool) -> tuple[list[Issue], Plan | None]:
    issues: list[Issue] = []
    names = [g.name for g in model.guard]
    for i, name in enumerate(names):
        if name in names[:i]:
            issues.append((("guard", i, "name"), f"guard {name!r} is defined twice: guard names must be unique"))
    guards = tuple(_compile_guard(i, g, issues, check_system=check_system) for i, g in enumerate(model.guard))
    rules: list[RulePlan] = []
    budget = RegexBudget()  # one for the whole file: see RegexBudget
    for i, rule in enumerate(model.rule):
        for j, guard_name in enumerate(rule.guards):
            if guard_name not in names:
                issues.append((("rule", i, "guards", j), f"no guard named {guard_name!r} (guards: {', '.join(names)})"))
        rules.append(
            RulePlan(
                index=i,
                label=rule.name or f"rule[{i}]",
                match=_compile_match(i, rule.match, issues, budget),
                protect=rule.protect,
                adjust=rule.adjust,
                guards=tuple(rule.guards),
            )
        )
    argv = tuple(model.hooks.after_kill)
    before = tuple(model.hooks.before_kill)
    for hook_key, hook_argv in (("after_kill", argv), ("before_kill", before)):
        problem = hook_program_problem(hook_argv[0]) if check_system and hook_argv else None
        if problem:
            issues.append((("hooks", hook_key), problem))
    if issues:
        return issues, None
    plan = Plan(
        source=source,
        daemon=DaemonPlan(
            dry_run=model.daemon.dry_run,
            poll_min_s=duration_s(model.daemon.poll_min),
            poll_max_s=duration_s(model.daemon.poll_max),
            log_format=LogFormat(model.daemon.log_format),
            state_file=model.daemon.state_file,
            notify_desktop=model.daemon.notify_desktop,
            metrics_file=model.daemon.metrics_file,
            metrics_listen=model.daemon.metrics_listen,
            metrics_interval_s=duration_s(model.daemon.metrics_interval),
            record_on_decision=model.daemon.record_on_decision,
            record_dir=os.path.normpath(model.daemon.record_dir),
            record_window_s=duration_s(model.daemon.record_window),
            record_keep=model.daemon.record_keep,
        ),
        escalation=EscalationPlan(
            term_timeout_s=duration_s(model.escalation.term_timeout),
            kill_timeout_s=duration_s(model.escalation.kill_timeout),
            max_kills_per_minute=model.escalation.max_kills_per_minute,
        ),
        guards=guards,
        rules=tuple(rules),
        hooks=HooksPlan(
            after_kill=argv,
            timeout_s=duration_s(model.hooks.timeout),
            before_kill=before,
            before_kill_timeout_s=duration_s(model.hooks.before_kill_timeout),
        ),
    )
    return [], plan


def _compile_guard(index: int, guard: GuardModel, issues: list[Issue], *, check_system: bool) -> GuardPlan:
    here: KeyPath = ("guard", index)
    if guard.scope == "system":
        scope = Scope(kind=ScopeKind.SYSTEM)
    else:
        path = os.path.normpath(guard.scope.removeprefix("cgroup:"))
        scope = Scope(kind=ScopeKind.CGROUP, cgroup_path=path)
        if check_system:
            problem = cgroup_scope_problem(path)
            if problem:
                issues.append(((*here, "scope"), problem))
    amounts = {
        key: to_amount(getattr(guard, key))
        for key in (
            "mem_available_term",
            "mem_available_kill",
            "swap_free_term",
            "swap_free_kill",
            "psi_mem_gate",
            "psi_refault_gate",
        )
    }
    warn_keys = [k for k in ("mem_available_warn", "swap_free_warn") if getattr(guard, k) is not None]
    amounts |= {key: to_amount(getattr(guard, key)) for key in warn_keys}
    totals: tuple[int, int] | None = None  # (memory, swap) of the scope now, read once if needed
    for term_key, kill_key, which in (
        ("mem_available_term", "mem_available_kill", 0),
        ("swap_free_term", "swap_free_kill", 1),
        *((k, k.replace("_warn", "_term"), int(k.startswith("swap"))) for k in warn_keys),
    ):
        term, kill = amounts[term_key], amounts[kill_key]
        upper, lower = _level_name(term_key), _level_name(kill_key)
        if _below(term, kill):
            issues.append(
                (
                    (*here, term_key),
                    f"{term_key} ({term.describe()}) sits below {kill_key} ({kill.describe()}): "
                    f"the {upper} level must be at or above the {lower} level",
                )
            )
        elif check_system and (term.fraction is None) != (kill.fraction is None):
            # A percent against a size (`"1%"` and `"2GiB"` passed; issue 12) is judged on the
            # scope's total as it is now, the total the daemon starting here would resolve both
            # against. A file checked without the machine (check_system False) is not judged.
            if totals is None:
                totals = _scope_totals(scope)
            total = totals[which]
            term_bytes, kill_bytes = term.resolve_bytes(total), kill.resolve_bytes(total)
            if total > 0 and term_bytes < kill_bytes:
                issues.append(
                    (
                        (*here, term_key),
                        f"{term_key} ({term.describe()}, {format_bytes(term_bytes)} here) sits below "
                        f"{kill_key} ({kill.describe()}, {format_bytes(kill_bytes)} here) on this machine's "
                        f"{'memory' if which == 0 else 'swap'} total of {format_bytes(total)}: "
                        f"the {upper} level must be at or above the {lower} level",
                    )
                )
    triggers = tuple(
        PsiTriggerPlan(
            kind=PsiKind(t.kind),
            stall_us=round(duration_s(t.stall) * 1e6),
            window_us=round(duration_s(t.window) * 1e6),
            sustain_s=duration_s(t.sustain),
            action=PsiAction(t.action),
            gated=t.gated,
        )
        for t in guard.psi
    )
    return GuardPlan(
        name=guard.name,
        scope=scope,
        mem_available_term=amounts["mem_available_term"],
        mem_available_kill=amounts["mem_available_kill"],
        swap_free_term=amounts["swap_free_term"],
        swap_free_kill=amounts["swap_free_kill"],
        victim=VictimKind(guard.victim),
        min_badness=guard.min_badness,
        ignore_positive_adj=guard.ignore_positive_adj,
        psi_mem_gate=amounts["psi_mem_gate"],
        psi_refault_gate=amounts["psi_refault_gate"],
        psi_refault_sustain_s=duration_s(guard.psi_refault_sustain),
        psi_refault_sustain_all_s=duration_s(
            guard.psi_refault_sustain if guard.psi_refault_sustain_all is None else guard.psi_refault_sustain_all
        ),
        mem_available_warn=amounts.get("mem_available_warn"),
        swap_free_warn=amounts.get("swap_free_warn"),
        psi=triggers,
        eta=_compile_eta(guard),
    )


def _compile_eta(guard: GuardModel) -> EtaPlan | None:
    if guard.mem_available_eta is None:
        return None
    return EtaPlan(
        eta_s=duration_s(guard.mem_available_eta),
        min_fall=to_amount(guard.mem_available_eta_min_fall),
        sustain_s=duration_s(guard.mem_available_eta_sustain),
        action=EtaAction(guard.mem_available_eta_action),
    )


def _level_name(key: str) -> str:
    """``mem_available_term`` -> ``term``: the level a key sets, for messages."""
    return key.rsplit("_", 1)[1]


def _scope_totals(scope: Scope) -> tuple[int, int]:
    """The scope's memory and swap totals now; (0, 0) when they cannot be read."""
    reading = read_scope_memory(scope)
    return (0, 0) if reading is None else (reading.total_bytes, reading.swap_total_bytes)


def _below(term: Amount, kill: Amount) -> bool:
    # Mixed units (a percent against a size) depend on the scope's total: judged by the
    # caller against the machine's, when the machine is checked.
    if term.fraction is not None and kill.fraction is not None:
        return term.fraction < kill.fraction
    if term.bytes is not None and kill.bytes is not None:
        return term.bytes < kill.bytes
    return False


def hook_program_problem(path: str) -> str | None:
    """Why a hook program must not run, or None. Running as root, uoomd runs it as root: a
    program (or a directory on its path) that others can write is as dangerous as a policy
    file they can write, so it is refused the same way (sshd's StrictModes)."""
    if not os.access(path, os.X_OK) or not os.path.isfile(path):
        return f"{path!r} is not an executable file"
    if os.geteuid() != 0:
        return None
    reason = untrusted_reason(path)
    return f"{path!r}: {reason} (hooks run as root)" if reason else None


def cgroup_scope_problem(path: str) -> str | None:
    """Why an existing cgroup scope cannot be guarded, or None. A cgroup that does not exist
    yet is no error (a service's cgroup appears when systemd starts it, which may be after
    uoomd): the guard waits for it, and `uoomd check` warns (load.plan_warnings)."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        return f"{path!r} is not a directory"
    if not os.path.exists(os.path.join(path, "cgroup.procs")):
        return f"{path!r} is not a cgroup directory (no cgroup.procs)"
    if not (
        os.path.exists(os.path.join(path, "memory.current"))
        or os.path.exists(os.path.join(path, "memory.usage_in_bytes"))
    ):
        return f"{path!r} has no memory controller (neither memory.current nor memory.usage_in_bytes)"
    return None


def _compile_match(index: int, match: MatchModel, issues: list[Issue], budget: RegexBudget) -> MatchPlan:
    # Each regex becomes a DFA here, in the checker, so the daemon searches every process
    # name, command line, exe and cgroup in one step per character (issue 12: Python's
    # backtracking `re` took > 20 s on `(a+)+$` and a 31-character command line). A pattern
    # outside that language is refused with its rule and key named.
    def rx(key: str, value: str | None) -> Dfa | None:
        if value is None:
            return None
        try:
            return compile_regex(value, budget)
        except RegexRefusedError as exc:
            issues.append((("rule", index, "match", key), f"{value!r}: {exc}"))
            return None

    return MatchPlan(
        name=rx("name", match.name),
        cmdline=rx("cmdline", match.cmdline),
        exe=rx("exe", match.exe),
        cgroup=rx("cgroup", match.cgroup),
        user=match.user,
        uid=match.uid,
    )
