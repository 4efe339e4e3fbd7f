"""Show a Plan as the effective policy: TOML text for people, a dict for --json (defaults filled in)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from uoomd.plan import Amount, GuardPlan, MatchPlan, Plan
from uoomd.units import format_bytes, format_duration

# guard name -> (memory total, swap total) in bytes, as this machine or the cgroup says
Totals = Mapping[str, tuple[int, int]]


def _amount(amount: Amount, total: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"value": amount.describe()}
    if total is not None:
        out["bytes"] = amount.resolve_bytes(total)
    return out


def _match(match: MatchPlan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("name", "cmdline", "exe", "cgroup"):
        pattern = getattr(match, key)
        if pattern is not None:
            out[key] = pattern.pattern
    if match.user is not None:
        out["user"] = match.user
    if match.uid is not None:
        out["uid"] = match.uid
    return out


def _guard(guard: GuardPlan, totals: Totals) -> dict[str, Any]:
    mem_total, swap_total = totals.get(guard.name, (None, None))
    return {
        "name": guard.name,
        "scope": guard.scope.describe(),
        "mem_available_term": _amount(guard.mem_available_term, mem_total),
        "mem_available_kill": _amount(guard.mem_available_kill, mem_total),
        "swap_free_term": _amount(guard.swap_free_term, swap_total),
        "swap_free_kill": _amount(guard.swap_free_kill, swap_total),
        "victim": str(guard.victim),
        "min_badness": guard.min_badness,
        "ignore_positive_adj": guard.ignore_positive_adj,
        "psi_mem_gate": _amount(guard.psi_mem_gate, mem_total),
        "mem_available_warn": None
        if guard.mem_available_warn is None
        else _amount(guard.mem_available_warn, mem_total),
        "swap_free_warn": None if guard.swap_free_warn is None else _amount(guard.swap_free_warn, swap_total),
        "psi_refault_gate_per_s": _amount(guard.psi_refault_gate, mem_total),
        "psi_refault_sustain_s": guard.psi_refault_sustain_s,
        "psi_refault_sustain_all_s": guard.psi_refault_sustain_all_s,
        "mem_available_eta": None
        if guard.eta is None
        else {
            "eta_s": guard.eta.eta_s,
            "min_fall_per_s": _amount(guard.eta.min_fall, mem_total),
            "sustain_s": guard.eta.sustain_s,
            "action": str(guard.eta.action),
        },
        "psi": [
            {
                "kind": str(t.kind),
                "stall_us": t.stall_us,
                "window_us": t.window_us,
                "sustain_s": t.sustain_s,
                "action": str(t.action),
                "gated": t.gated,
            }
            for t in guard.psi
        ],
        "memory_total_bytes": mem_total,
        "swap_total_bytes": swap_total,
    }


def plan_as_dict(plan: Plan, totals: Totals) -> dict[str, Any]:
    return {
        "source": plan.source,
        "daemon": {
            "dry_run": plan.daemon.dry_run,
            "poll_min_s": plan.daemon.poll_min_s,
            "poll_max_s": plan.daemon.poll_max_s,
            "log_format": str(plan.daemon.log_format),
            "state_file": plan.daemon.state_file,
            "notify_desktop": plan.daemon.notify_desktop,
            "metrics_file": plan.daemon.metrics_file,
            "metrics_listen": plan.daemon.metrics_listen,
            "metrics_interval_s": plan.daemon.metrics_interval_s,
            "record_on_decision": plan.daemon.record_on_decision,
            "record_dir": plan.daemon.record_dir,
            "record_window_s": plan.daemon.record_window_s,
            "record_keep": plan.daemon.record_keep,
        },
        "escalation": {
            "term_timeout_s": plan.escalation.term_timeout_s,
            "kill_timeout_s": plan.escalation.kill_timeout_s,
            "max_kills_per_minute": plan.escalation.max_kills_per_minute,
        },
        "guard": [_guard(g, totals) for g in plan.guards],
        "rule": [
            {
                "name": r.label,
                "match": _match(r.match),
                "protect": r.protect,
                "adjust": r.adjust,
                "guards": list(r.guards),
            }
            for r in plan.rules
        ],
        "hooks": {
            "after_kill": list(plan.hooks.after_kill),
            "timeout_s": plan.hooks.timeout_s,
            "before_kill": list(plan.hooks.before_kill),
            "before_kill_timeout_s": plan.hooks.before_kill_timeout_s,
        },
    }


def _toml_amount(key: str, amount: Amount, total: int | None) -> str:
    line = f"{key} = {json.dumps(amount.describe())}"
    if total is not None:
        resolved = amount.resolve_bytes(total)
        line += f"  # = {format_bytes(resolved)} of {format_bytes(total)}"
    return line


def _per_second(line: str) -> str:
    # Inside the comment _toml_amount may have begun: after the value, it would not parse.
    return line + (", per second" if "  # " in line else "  # per second")


def plan_as_toml(plan: Plan, totals: Totals) -> str:
    """The effective policy in the policy file's own syntax, sizes resolved in comments."""
    out = [f"# effective policy of {plan.source}", "", "[daemon]"]
    d = plan.daemon
    out += [
        f"dry_run = {str(d.dry_run).lower()}",
        f'poll_min = "{format_duration(d.poll_min_s)}"',
        f'poll_max = "{format_duration(d.poll_max_s)}"',
        f'log_format = "{d.log_format}"',
        f"state_file = {json.dumps(d.state_file)}",
        f"notify_desktop = {str(d.notify_desktop).lower()}",
        # TOML has no null: a key left out is none, and is shown as a comment.
        f"metrics_file = {json.dumps(d.metrics_file)}" if d.metrics_file else "# metrics_file: none",
        f"metrics_listen = {json.dumps(d.metrics_listen)}" if d.metrics_listen else "# metrics_listen: none",
        f'metrics_interval = "{format_duration(d.metrics_interval_s)}"',
        f"record_on_decision = {str(d.record_on_decision).lower()}",
        f"record_dir = {json.dumps(d.record_dir)}",
        f'record_window = "{format_duration(d.record_window_s)}"',
        f"record_keep = {d.record_keep}",
        "",
        "[escalation]",
        f'term_timeout = "{format_duration(plan.escalation.term_timeout_s)}"',
        f'kill_timeout = "{format_duration(plan.escalation.kill_timeout_s)}"',
        f"max_kills_per_minute = {plan.escalation.max_kills_per_minute}",
    ]
    for g in plan.guards:
        mem_total, swap_total = totals.get(g.name, (None, None))
        out += ["", "[[guard]]", f"name = {json.dumps(g.name)}", f"scope = {json.dumps(g.scope.describe())}"]
        out += [
            _toml_amount("mem_available_term", g.mem_available_term, mem_total),
            _toml_amount("mem_available_kill", g.mem_available_kill, mem_total),
            _toml_amount("swap_free_term", g.swap_free_term, swap_total or None),
            _toml_amount("swap_free_kill", g.swap_free_kill, swap_total or None),
            f'victim = "{g.victim}"',
            f"min_badness = {g.min_badness}",
            f"ignore_positive_adj = {str(g.ignore_positive_adj).lower()}",
            _toml_amount("psi_mem_gate", g.psi_mem_gate, mem_total),
            "# mem_available_warn: none (no warn level)"
            if g.mem_available_warn is None
            else _toml_amount("mem_available_warn", g.mem_available_warn, mem_total),
            *(
                [_toml_amount("swap_free_warn", g.swap_free_warn, swap_total or None)]
                if g.swap_free_warn is not None
                else []
            ),
            _per_second(_toml_amount("psi_refault_gate", g.psi_refault_gate, mem_total)),
            f'psi_refault_sustain = "{format_duration(g.psi_refault_sustain_s)}"',
            f'psi_refault_sustain_all = "{format_duration(g.psi_refault_sustain_all_s)}"',
        ]
        if g.eta is None:
            out.append("# mem_available_eta: none (levels only)")
        else:
            out += [
                f'mem_available_eta = "{format_duration(g.eta.eta_s)}"',
                _per_second(_toml_amount("mem_available_eta_min_fall", g.eta.min_fall, mem_total)),
                f'mem_available_eta_sustain = "{format_duration(g.eta.sustain_s)}"',
                f'mem_available_eta_action = "{g.eta.action}"',
            ]
        if swap_total == 0:
            out.append("# no swap: MemAvailable alone decides")
        for t in g.psi:
            out += [
                "  [[guard.psi]]",
                f'  kind = "{t.kind}"',
                f'  stall = "{format_duration(t.stall_us / 1e6)}"',
                f'  window = "{format_duration(t.window_us / 1e6)}"',
                f'  sustain = "{format_duration(t.sustain_s)}"',
                f'  action = "{t.action}"',
                f"  gated = {str(t.gated).lower()}",
            ]
    for r in plan.rules:
        out += ["", "[[rule]]", f"name = {json.dumps(r.label)}"]
        match = ", ".join(f"{k} = {json.dumps(v)}" for k, v in _match(r.match).items())
        out.append(f"match = {{ {match} }}")
        out.append("protect = true" if r.protect else f"adjust = {r.adjust}")
        if r.guards:
            out.append(f"guards = {json.dumps(list(r.guards))}")
    out += ["", "[hooks]", f"after_kill = {json.dumps(list(plan.hooks.after_kill))}"]
    out.append(f'timeout = "{format_duration(plan.hooks.timeout_s)}"')
    out.append(f"before_kill = {json.dumps(list(plan.hooks.before_kill))}")
    out.append(f'before_kill_timeout = "{format_duration(plan.hooks.before_kill_timeout_s)}"')
    return "\n".join(out) + "\n"


def render_plan(plan: Plan, *, as_json: bool, totals: Totals | None = None) -> dict[str, Any] | str:
    totals = totals or {}
    return plan_as_dict(plan, totals) if as_json else plan_as_toml(plan, totals)
