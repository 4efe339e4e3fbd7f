"""The state file as the daemon keeps it: the status document built from each tick (and its
STATUS= line), written atomically at most once a second; ``uoomd status`` reads it (uoomd/status.py)."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from uoomd.atomicfile import replace_file
from uoomd.logs import Log, escape
from uoomd.readings import Pid, ProcessKey
from uoomd.sources.procfs import read_stat
from uoomd.startup import describe_stall, guard_levels
from uoomd.trust import prepare_directory

if TYPE_CHECKING:
    from uoomd.decision import State
    from uoomd.plan import Plan
    from uoomd.sources.watch import GuardWatch

WRITE_INTERVAL_S = 1.0  # the file is for people and scripts: once a second is plenty
RECENT_KEPT = 20  # decisions and action results the document lists (`uoomd status` shows RECENT_SHOWN)

# --- the document, as the daemon builds it --------------------------------------------------

ReloadOutcome: TypeAlias = Literal["applied", "refused"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadRecord:
    """How the last reload ended, as the state file says it at once (``uoomd reload`` waits for it).

    ``started_at`` is when its check started, on CLOCK_MONOTONIC (time.monotonic(), one clock for
    every process of the machine): a reload command that sent SIGHUP at t takes only a record with
    ``started_at >= t``, whose check read the policy file after that command began. A check already
    running at the SIGHUP may have read the file before the edit (uoomd/reload.py coalesces)."""

    started_at: float
    finished_at: float  # time.time(), for people
    outcome: ReloadOutcome
    policy: str
    error: str | None  # why it was refused: what `uoomd check` would print

    def as_json(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "outcome": self.outcome,
            "policy": self.policy,
            "error": self.error,
        }


_own_key: ProcessKey | None = None


def own_key(proc_root: str = "/proc") -> ProcessKey | None:
    """This process's identity, (pid, starttime), read once per process: the state file carries it
    so that a reader can tell the daemon from a process that was later given its PID."""
    global _own_key  # noqa: PLW0603 -- a fact of the process, read at its first state file
    pid = os.getpid()
    if _own_key is None or _own_key.pid != pid:
        stat = read_stat(proc_root, pid)
        if stat is None:
            return None
        _own_key = ProcessKey(pid=Pid(pid), starttime_ticks=stat.starttime_ticks)
    return _own_key


class Recent:
    """The latest decisions and action results, JSON-ready, as the document lists them."""

    def __init__(self) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=RECENT_KEPT)
        self.added = 0  # how many were ever added: a new one is written at once, quiet or not

    def add(self, event: str, facts: Mapping[str, Any]) -> None:
        self._events.append({"event": event, "at": time.time(), **_jsonable(facts)})
        self.added += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._events)


def _jsonable(facts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in facts.items():
        out[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
    return out


def status_line(watches: Sequence[GuardWatch], recent: Recent) -> str:
    """One line for systemd's STATUS=: what the daemon sees now, e.g.
    "mem 41% avail, swap 90% free, psi full 0.0, last kill: none" (guards named when several)."""
    parts: list[str] = []
    for watch in watches:
        m = watch.last
        if m is None:
            continue
        part = f"mem {m.available_fraction * 100:.0f}% avail"
        part += f", swap {m.swap_free_fraction * 100:.0f}% free" if m.swap_total_bytes else ", no swap"
        if watch.last_pressure is not None:
            part += f", psi full {watch.last_pressure.full_avg10:.1f}"
        parts.append(f"{watch.guard.name}: {part}" if len(watches) > 1 else part)
    kills = [r for r in recent if r.get("event") in {"victim_chosen", "victim_escalated"}]
    last = "last kill: none"
    if kills:
        # escape(): a name is attacker-controlled, and a newline in it would start a new
        # sd_notify assignment (a process named "x\nREADY=1" must not speak for us).
        dry = " (dry-run)" if str(kills[-1].get("action", "")).startswith("would") else ""
        last = f"last kill{dry}: {escape(str(kills[-1].get('name', '?')))} ({kills[-1].get('pid', '?')})"
    return "; ".join([*parts, last]) if len(watches) > 1 else ", ".join([*parts, last])


def status_document(
    *,
    plan: Plan,
    state: State,
    watches: Sequence[GuardWatch],
    recent: Recent,
    metrics: dict[str, list[list[object]]] | None = None,
    reload: ReloadRecord | None = None,
) -> dict[str, Any]:
    """The state file's content; uoomd/status.py parse_state reads it back. ``metrics``: Metrics.dump(),
    which ``uoomd status --metrics`` renders (uoomd/metrics/collector.py render_dumped).
    ``reload``: how the last reload ended (None: none yet; the key is there all the same, so that
    ``uoomd reload`` can tell a daemon with no reload yet from one too old to report it)."""
    guards: list[dict[str, Any]] = []
    for watch in watches:
        gs = state.guard(watch.guard.name)
        m = watch.last
        guards.append(
            {
                "name": watch.guard.name,
                "scope": watch.guard.scope.describe(),
                "scope_gone": watch.gone_at is not None,
                "phase": str(gs.phase),
                "victim": None if gs.victim is None else {"pid": gs.victim.process.pid, "name": gs.victim.process.name},
                "memory": None
                if m is None
                else {
                    "total_bytes": m.total_bytes,
                    "available_bytes": m.available_bytes,
                    "swap_total_bytes": m.swap_total_bytes,
                    "swap_free_bytes": m.swap_free_bytes,
                    # Where it is read (a cgroup, or a guard with psi_refault_gate): tuning the gate starts here.
                    "refault_bytes_per_s": None if watch.refaults.rate is None else int(watch.refaults.rate),
                },
                "levels": guard_levels(watch.guard, m)["levels"],
                "psi": [
                    None
                    if t is None
                    else {
                        "mode": str(t.mode),
                        "stall_us": t.stall_us,
                        "window_us": t.window_us,
                        "describe": f"{describe_stall(t.kind, t.stall_us, t.window_us)} ({t.mode}: {t.reason})",
                    }
                    for t in watch.triggers
                ],
            }
        )
    me = own_key()
    return {
        "pid": os.getpid(),
        "starttime_ticks": None if me is None else me.starttime_ticks,
        "policy": plan.source,
        "dry_run": plan.daemon.dry_run,
        "updated_at": time.time(),
        "status": status_line(watches, recent),
        "guards": guards,
        "recent": list(recent),
        "reload": None if reload is None else reload.as_json(),
        **({} if metrics is None else {"metrics": metrics}),
    }


# --- written by the daemon -------------------------------------------------------------------


class StatusBoard:
    """Writes what the daemon sees to a JSON file, at most once per WRITE_INTERVAL_S.

    Atomic (temp file + rename) so a reader never sees half a file; a directory that
    cannot be written, or that another user could tamper with, is logged once and the
    daemon goes on guarding without a state file."""

    def __init__(self, path: str, log: Log) -> None:
        self.path = path
        self._log = log
        self._written_at = float("-inf")
        self._broken = False

    def maybe_write(self, now: float, data: dict[str, Any], *, force: bool = False) -> None:
        if self._broken or (not force and now - self._written_at < WRITE_INTERVAL_S):
            return
        self._written_at = now
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            refused = prepare_directory(directory)
            if refused:
                self._broken = True
                self._log.warning("state_file_refused", path=self.path, reason=refused)
                return
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                payload = json.dumps(data, default=str).encode()
                replace_file(dir_fd, os.path.basename(self.path), payload, mode=0o644, exact_mode=False)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self._broken = True
            self._log.warning("state_file_unwritable", path=self.path, error=exc.strerror or str(exc))
