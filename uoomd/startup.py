"""What the daemon states about itself: each guard's levels resolved against its scope, and whether it signals (pure).

Said once at start (the ``guard_levels`` and ``started`` events), and kept in the state file for
``uoomd status``: a healthy machine otherwise hears nothing from the daemon, and the levels in
a policy ("5%") mean nothing until they meet the scope's total.
"""

from __future__ import annotations

from typing import Any

from uoomd.decision import levels
from uoomd.plan import Amount, GuardPlan, PsiAction, PsiTriggerPlan
from uoomd.readings import MemoryReading
from uoomd.thrash import gate_bytes_per_s, has_refault_gate, refault_sustain_s
from uoomd.units import format_bytes, format_duration

SIGNALS_OFF = "dry-run: nothing will be signalled"
SIGNALS_ON = "on: a victim gets SIGTERM, then SIGKILL"


def signals_text(dry_run: bool) -> str:
    return SIGNALS_OFF if dry_run else SIGNALS_ON


def describe_stall(kind: str, stall_us: int, window_us: int) -> str:
    """A PSI threshold as people say it: ``full 200ms in 2s`` (the kernel's microseconds: 200000 2000000)."""
    return f"{kind} {format_duration(stall_us / 1e6)} in {format_duration(window_us / 1e6)}"


def _share(amount: Amount) -> str:
    """`` (5%)`` after a level given as a share of the total; nothing for one given in bytes."""
    return f" ({amount.describe()})" if amount.fraction is not None else ""


def _psi_text(index: int, trigger: PsiTriggerPlan, gate: str) -> str:
    text = f"psi[{index}] {describe_stall(str(trigger.kind), trigger.stall_us, trigger.window_us)}"
    if trigger.sustain_s:
        text += f" for {format_duration(trigger.sustain_s)}"
    # decision._detect_idle: term and kill act only through the gates, unless the trigger is
    # ungated (a backstop); warn always says so.
    if trigger.action is PsiAction.WARN:
        return f"{text}: {trigger.action}"
    return f"{text}: {trigger.action}" + (f" below {gate}" if trigger.gated else ", ungated")


def _refault_text(guard: GuardPlan, memory: MemoryReading | None) -> str:
    """`` and refaults above 41.0MiB/s`` where the guard has a refault gate (thrash.py)."""
    if not has_refault_gate(guard):
        return ""
    if memory is None:
        sustain = _sustain_text(guard.psi_refault_sustain_s)
        if guard.psi_refault_sustain_all_s != guard.psi_refault_sustain_s:
            every = _sustain_text(guard.psi_refault_sustain_all_s).strip() or "none"
            sustain += f" ({every} where every refault counts)"
        return f" and refaults above {guard.psi_refault_gate.describe()}/s{sustain}"
    # The reading says which count this scope has (sources/vmstat.py): only its sustain applies.
    sustain = _sustain_text(refault_sustain_s(guard, memory))
    if memory.refaults_all and memory.refault_bytes is not None:
        sustain += " (every refault counts here)"
    return f" and refaults above {format_bytes(gate_bytes_per_s(guard, memory.total_bytes))}/s{sustain}"


def _sustain_text(seconds: float) -> str:
    return f" for {format_duration(seconds)}" if seconds else ""


def _warn_text(guard: GuardPlan, memory: MemoryReading | None) -> str:
    """``warn below 4.0GiB (25%) available`` (and swap, where swap_free_warn counts): a notice, no signal."""
    warn, swap = guard.mem_available_warn, guard.swap_free_warn
    assert warn is not None
    if memory is None:
        return f"warn below {warn.describe()} available" + (f" and {swap.describe()} swap free" if swap else "")
    text = f"warn below {format_bytes(warn.resolve_bytes(memory.total_bytes))}{_share(warn)} available"
    if swap is not None and memory.swap_total_bytes:
        text += f" and {format_bytes(swap.resolve_bytes(memory.swap_total_bytes))}{_share(swap)} swap free"
    return text


def guard_levels(guard: GuardPlan, memory: MemoryReading | None) -> dict[str, Any]:
    """The facts of one guard's ``guard_levels`` event: the levels in bytes as uoomd.decision.levels()
    resolves them against ``memory`` (None: not read yet; the levels stay as the policy says them),
    and in ``levels`` the same for people, e.g. ``term below 1.2GiB (5%) of 23.5GiB available,
    kill below 600.0MiB (2.5%); no swap; psi[0] full 200ms in 2s for 2s: term below 4.7GiB available``."""
    facts: dict[str, Any] = {"guard": guard.name, "scope": guard.scope.describe()}
    term, kill = guard.mem_available_term, guard.mem_available_kill
    if memory is None:
        parts = [f"term below {term.describe()} available, kill below {kill.describe()}"]
        gate = f"{guard.psi_mem_gate.describe()} available{_refault_text(guard, None)}"
        facts.update(mem_total_bytes=None, mem_available_term_bytes=None, mem_available_kill_bytes=None)
    else:
        lv = levels(memory, guard)
        text = f"term below {format_bytes(lv.term_bytes)}{_share(term)} of {format_bytes(memory.total_bytes)} available"
        if memory.swap_total_bytes:
            # Both must be low to act (decision.levels()): say the swap level in the same clause.
            swap = format_bytes(memory.swap_total_bytes)
            text += f" and {format_bytes(lv.swap_term_bytes)}{_share(guard.swap_free_term)} of {swap} swap free"
            text += f", kill below {format_bytes(lv.kill_bytes)}{_share(kill)}"
            text += f" and {format_bytes(lv.swap_kill_bytes)}{_share(guard.swap_free_kill)} swap free"
        else:
            text += f", kill below {format_bytes(lv.kill_bytes)}{_share(kill)}; no swap"
        parts = [text]
        gate = f"{format_bytes(lv.gate_bytes)} available{_refault_text(guard, memory)}"
        facts.update(
            mem_total_bytes=memory.total_bytes,
            mem_available_term_bytes=lv.term_bytes,
            mem_available_kill_bytes=lv.kill_bytes,
            swap_total_bytes=memory.swap_total_bytes,
            swap_free_term_bytes=lv.swap_term_bytes if memory.swap_total_bytes else None,
            swap_free_kill_bytes=lv.swap_kill_bytes if memory.swap_total_bytes else None,
        )
    if guard.mem_available_warn is not None:
        parts.append(_warn_text(guard, memory))
    psi = [_psi_text(i, t, gate) for i, t in enumerate(guard.psi)]
    facts["levels"] = "; ".join(parts + psi)
    facts["psi"] = psi
    return facts
