"""`uoomd status`: the state file the daemon writes (uoomd/statusboard.py) read back, every field
checked, and shown to people, as JSON or as metrics."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeAlias, TypeVar

from uoomd.errors import ExitCode, PolicyError, SetupError
from uoomd.logs import escape
from uoomd.policy.file import open_regular
from uoomd.policy.paths import default_policy_path
from uoomd.readings import Pid, ProcessKey
from uoomd.sources.procfs import read_stat
from uoomd.statusboard import ReloadRecord
from uoomd.units import format_bytes

_T = TypeVar("_T")

# What the daemon writes is a few KiB (20 recent events and a line per guard): a file far
# larger is not ours, and is refused before json reads it into memory.
STATE_LIMIT_BYTES = 1 << 20
PID_MAX_LIMIT = 1 << 22  # include/linux/threads.h: no PID is above it
RECENT_SHOWN = 10
FACTS_SHOWN_CHARS = 200
# time.localtime() takes no later instant than year 9999: a larger time is no time of ours.
_LATEST_S = 253402300799.0

Scalar: TypeAlias = str | int | float | bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardState:
    """One guard's line in the state file."""

    name: str
    scope: str
    scope_gone: bool
    phase: str
    victim_pid: int | None
    victim_name: str | None
    total_bytes: int | None
    available_bytes: int | None
    psi: tuple[str | None, ...]  # each trigger's description; None for one not armed
    levels: str | None = None  # uoomd.startup.guard_levels()'s text; None from a uoomd before it
    refault_bytes_per_s: int | None = None  # None: not read (uoomd/thrash.py), or from a uoomd before it


@dataclass(frozen=True, slots=True, kw_only=True)
class RecentEvent:
    event: str
    at: float
    facts: tuple[tuple[str, Scalar], ...]  # lists and objects left out


@dataclass(frozen=True, slots=True, kw_only=True)
class StateFile:
    """The state file as the daemon wrote it (uoomd/statusboard.py status_document), checked."""

    pid: int
    policy: str
    dry_run: bool
    updated_at: float
    status: str
    guards: tuple[GuardState, ...]
    recent: tuple[RecentEvent, ...]
    # None from a uoomd that wrote neither (before issue 13): its pid cannot be told from a
    # newcomer's, and it reports no reload.
    starttime_ticks: int | None = None
    reports_reloads: bool = False
    reload: ReloadRecord | None = None

    @property
    def key(self) -> ProcessKey | None:
        if self.starttime_ticks is None:
            return None
        return ProcessKey(pid=Pid(self.pid), starttime_ticks=self.starttime_ticks)


class MalformedStateError(ValueError):
    """Where the state file departs from what the daemon writes (a key path) and how."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}" if where else problem)


def read_state(path: str) -> tuple[StateFile, dict[str, Any]]:
    """The checked state file at ``path`` and its JSON; SetupError for anything the daemon
    did not write: not there, not a regular file (a FIFO never blocks: uoomd/policy/file.py),
    a symlink (the daemon renames a regular file into place), too large, not JSON, or JSON
    of another shape."""
    shown = escape(path)
    if not os.path.lexists(path):
        raise SetupError(f"no state file at {shown}", hint="is `uoomd run` running with this policy?")
    try:
        fd, _info = open_regular(path, nofollow=True)
    except PolicyError as exc:
        reason = "; ".join(issue.message for issue in exc.issues)
        raise SetupError(f"cannot read the state file {shown}: {reason}") from None
    try:
        raw = os.read(fd, STATE_LIMIT_BYTES + 1)
    except OSError as exc:
        raise SetupError(f"cannot read the state file {shown}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > STATE_LIMIT_BYTES:
        raise SetupError(f"the state file {shown} is over {STATE_LIMIT_BYTES} bytes: not a uoomd state file")
    try:
        data = json.loads(raw.decode("utf-8"))
        return parse_state(data), data
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except RecursionError:
        problem = "nested too deeply"
    except MalformedStateError as exc:
        problem = str(exc)  # key paths are ours; the values in it are escaped by _kind
    except ValueError as exc:  # json.JSONDecodeError
        problem = f"not JSON ({escape(str(exc))})"
    raise SetupError(f"the state file {shown} is not a uoomd state file: {problem}")


def parse_state(data: object) -> StateFile:
    """A StateFile from the decoded JSON; MalformedStateError naming the first key that is off."""
    top = _object(data, "")
    return StateFile(
        pid=_pid(top, "pid", ""),
        policy=_typed(top, "policy", str, ""),
        dry_run=_typed(top, "dry_run", bool, ""),
        updated_at=_instant(top, "updated_at", ""),
        status=_typed(top, "status", str, ""),
        guards=tuple(_guard(item, f"guards[{i}]") for i, item in enumerate(_typed(top, "guards", list, ""))),
        recent=tuple(_recent(item, f"recent[{i}]") for i, item in enumerate(_typed(top, "recent", list, ""))),
        starttime_ticks=None if top.get("starttime_ticks") is None else _count(top, "starttime_ticks", ""),
        reports_reloads="reload" in top,
        reload=_reload(top.get("reload"), "reload"),
    )


def _reload(data: object, where: str) -> ReloadRecord | None:
    if data is None:
        return None
    record = _object(data, where)
    outcome = _typed(record, "outcome", str, where)
    if outcome not in ("applied", "refused"):
        raise MalformedStateError(_join(where, "outcome"), f"'applied' or 'refused' expected, not {_kind(outcome)}")
    error = _value(record, "error", where)
    if error is not None and not isinstance(error, str):
        raise MalformedStateError(_join(where, "error"), f"str or null expected, not {_kind(error)}")
    return ReloadRecord(
        started_at=_instant(record, "started_at", where),
        finished_at=_instant(record, "finished_at", where),
        outcome="applied" if outcome == "applied" else "refused",
        policy=_typed(record, "policy", str, where),
        error=error,
    )


def _guard(data: object, where: str) -> GuardState:
    guard = _object(data, where)
    victim = _optional_object(guard, "victim", where)
    memory = _optional_object(guard, "memory", where)
    psi: list[str | None] = []
    for index, trigger in enumerate(_typed(guard, "psi", list, where)):
        psi.append(
            None
            if trigger is None
            else _typed(_object(trigger, f"{where}.psi[{index}]"), "describe", str, f"{where}.psi[{index}]")
        )
    return GuardState(
        name=_typed(guard, "name", str, where),
        scope=_typed(guard, "scope", str, where),
        scope_gone=_typed(guard, "scope_gone", bool, where),
        phase=_typed(guard, "phase", str, where),
        victim_pid=None if victim is None else _pid(victim, "pid", f"{where}.victim"),
        victim_name=None if victim is None else _typed(victim, "name", str, f"{where}.victim"),
        total_bytes=None if memory is None else _bytes(memory, "total_bytes", f"{where}.memory"),
        available_bytes=None if memory is None else _bytes(memory, "available_bytes", f"{where}.memory"),
        psi=tuple(psi),
        levels=None if guard.get("levels") is None else _typed(guard, "levels", str, where),
        refault_bytes_per_s=None
        if memory is None or memory.get("refault_bytes_per_s") is None
        else _bytes(memory, "refault_bytes_per_s", f"{where}.memory"),
    )


def _recent(data: object, where: str) -> RecentEvent:
    event = _object(data, where)
    facts: list[tuple[str, Scalar]] = []
    for key, value in event.items():
        if key not in {"event", "at"} and (value is None or isinstance(value, str | int | float | bool)):
            facts.append((key, value))
    return RecentEvent(event=_typed(event, "event", str, where), at=_instant(event, "at", where), facts=tuple(facts))


def _object(data: object, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise MalformedStateError(where, f"an object expected, not {_kind(data)}")
    return data


def _optional_object(data: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = _value(data, key, where)
    return None if value is None else _object(value, _join(where, key))


def _value(data: dict[str, Any], key: str, where: str) -> object:
    if key not in data:
        raise MalformedStateError(_join(where, key), "missing")
    return data[key]


def _typed(data: dict[str, Any], key: str, kind: type[_T], where: str) -> _T:
    value = _value(data, key, where)
    # bool is an int to Python, never to the daemon: `"pid": true` is not a PID.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MalformedStateError(_join(where, key), f"{kind.__name__} expected, not {_kind(value)}")
    return value


def _pid(data: dict[str, Any], key: str, where: str) -> int:
    value = _typed(data, key, int, where)
    if not 0 < value <= PID_MAX_LIMIT:
        raise MalformedStateError(_join(where, key), f"{value} is not a PID")
    return value


def _bytes(data: dict[str, Any], key: str, where: str) -> int:
    value = _typed(data, key, int, where)
    if value < 0:
        raise MalformedStateError(_join(where, key), f"{value} is not a size")
    return value


def _count(data: dict[str, Any], key: str, where: str) -> int:
    value = _typed(data, key, int, where)
    if not 0 <= value < 1 << 64:  # a start time in clock ticks is an unsigned long long
        raise MalformedStateError(_join(where, key), f"{_kind(value)} is not a count")
    return value


def _instant(data: dict[str, Any], key: str, where: str) -> float:
    value = _value(data, key, where)
    # json reads NaN and Infinity; time.localtime() refuses them, and years past 9999.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= _LATEST_S:
        raise MalformedStateError(_join(where, key), f"a time in seconds expected, not {_kind(value)}")
    return float(value)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(value: object) -> str:
    if isinstance(value, str):
        return f"str '{escape(value[:40])}'"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{type(value).__name__} {str(value)[:40]}"
    return {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}.get(type(value), "?")


def is_running(state: StateFile, proc_root: str = "/proc") -> bool:
    """Whether the daemon that wrote ``state`` runs now: its PID is there, not a zombie, and has
    the start time the file names (a PID handed to another process since is not the daemon).
    A file from a uoomd too old to write the start time is judged by its PID alone."""
    stat = read_stat(proc_root, state.pid)
    if stat is None or stat.state in ("Z", "X"):
        return False
    return state.starttime_ticks is None or stat.starttime_ticks == state.starttime_ticks


def running_daemon(state_file: str, proc_root: str = "/proc") -> ProcessKey | None:
    """The (pid, starttime) of the daemon that writes ``state_file``, while it runs; None when
    there is no readable state file there, it names no start time, or its daemon is gone."""
    try:
        state, _data = read_state(state_file)
    except SetupError:
        return None
    key = state.key
    return key if key is not None and is_running(state, proc_root) else None


def state_file_of(policy_path: str | None) -> str:
    """The state file the policy names (``uoomd status``, ``uoomd reload`` without --state-file).

    Only the path is wanted: what depends on the machine (a cgroup that is gone while the daemon
    waits for it to come back) is not checked. PolicyError when the policy does not load."""
    from uoomd.policy.load import load_plan  # noqa: PLC0415 -- pydantic, for this command only

    return load_plan(policy_path or default_policy_path(), check_system=False).daemon.state_file


def format_age(seconds: float) -> str:
    """How long ago, for people: 4.2s, 12m 5s, 3h 12m, 2d 3h."""
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60}m"
    return f"{whole // 86400}d {whole % 86400 // 3600}h"


# Who and what first, so that the cut at FACTS_SHOWN_CHARS never takes the victim's name.
_LEADING_FACTS = ("guard", "action", "trigger", "outcome", "signal", "pid", "name")


def _facts_text(facts: Sequence[tuple[str, Scalar]]) -> str:
    """An event's facts as key=value pairs, the leading ones first and whole; the rest while they
    fit in FACTS_SHOWN_CHARS, then how many were left out (cut between pairs, never inside one)."""
    rank = {key: i for i, key in enumerate(_LEADING_FACTS)}
    ordered = sorted(facts, key=lambda kv: rank.get(kv[0], len(rank)))
    shown: list[str] = []
    used = 0
    for index, (key, value) in enumerate(ordered):
        pair = f"{escape(key)}={escape(str(value))}"
        if key not in rank and used + len(pair) > FACTS_SHOWN_CHARS:
            shown.append(f"(+{len(ordered) - index} more in --json)")
            break
        shown.append(pair)
        used += len(pair) + 1
    return " ".join(shown)


def render_status(state: StateFile, now: float | None = None, *, running: bool | None = None) -> str:
    """The state for people: every string from the file escaped (the daemon wrote process names
    into it, and a name with an ESC or a newline must not reach the terminal raw). ``running``:
    whether its daemon runs (None: is_running() is asked); a stopped one's last state follows a
    line that says so."""
    age = (time.time() if now is None else now) - state.updated_at
    if running is None:
        running = is_running(state)
    dry = " (dry-run)" if state.dry_run else ""
    if running:
        head = f"uoomd pid {state.pid} (running), policy {escape(state.policy)}{dry}, updated {age:.1f}s ago"
    else:
        head = (
            f"uoomd is not running (state file from pid {state.pid}, written {format_age(age)} ago); "
            f"its last state: policy {escape(state.policy)}{dry}"
        )
    lines = [head, f"  {escape(state.status)}"]
    for guard in state.guards:
        total, avail = guard.total_bytes or 0, guard.available_bytes or 0
        share = f"{avail / total * 100:.1f}%" if total else "?"
        line = f"guard {escape(guard.name)} [{escape(guard.scope)}]: {escape(guard.phase)}, available {share}"
        if guard.refault_bytes_per_s is not None:
            line += f", refaults {format_bytes(guard.refault_bytes_per_s)}/s"
        if guard.scope_gone:
            line += ", cgroup gone (guarded again once it is back)"
        if guard.victim_pid is not None:
            line += f", victim '{escape(guard.victim_name or '')}' ({guard.victim_pid})"
        lines.append(line)
        if guard.levels is not None:
            lines.append(f"  levels: {escape(guard.levels)}")
        lines += [f"  psi[{i}]: {escape(d)}" for i, d in enumerate(guard.psi) if d is not None]
    if state.reload is not None:
        record = state.reload
        when = time.strftime("%H:%M:%S", time.localtime(record.finished_at))
        line = f"last reload: {when} {record.outcome} {escape(record.policy)}"
        if record.error:
            line += f": {escape(record.error.splitlines()[0])}"
        lines.append(line)
    if state.recent:
        lines.append("recent:")
        for event in state.recent[-RECENT_SHOWN:]:
            when = time.strftime("%H:%M:%S", time.localtime(event.at))
            lines.append(f"  {when} {escape(event.event)} {_facts_text(event.facts)}")
    return "\n".join(lines) + "\n"


def render_metrics(data: dict[str, Any], path: str) -> str:
    """The Prometheus exposition of the metrics the daemon dumped into its state file; SetupError
    when there are none or they are malformed (every value is checked, and label values are
    escaped as the text format says: uoomd/metrics/exposition.py)."""
    from uoomd.metrics.collector import render_dumped  # noqa: PLC0415 -- only --metrics renders them

    if "metrics" not in data:
        raise SetupError(f"the state file {escape(path)} holds no metrics", hint="is the daemon older than this uoomd?")
    try:
        return render_dumped(data["metrics"])
    except ValueError as exc:
        raise SetupError(f"the state file {escape(path)} is not a uoomd state file: {escape(str(exc))}") from None


def run_status(
    *, state_file: str | None, policy_path: str | None, as_json: bool, out: TextIO, as_metrics: bool = False
) -> int:
    """`uoomd status`: exit 0 while the daemon runs, NOT_RUNNING (5) with its last state when it is gone."""
    path = state_file if state_file is not None else state_file_of(policy_path)
    state, data = read_state(path)
    running = is_running(state)
    code = ExitCode.OK if running else ExitCode.NOT_RUNNING
    if as_metrics:
        out.write(render_metrics(data, path))
        return code
    # json.dumps writes control characters as \uXXXX escapes: the JSON form needs no escaping.
    out.write(
        json.dumps({**data, "running": running}, indent=2) + "\n" if as_json else render_status(state, running=running)
    )
    return code
