"""The daemon's state file: written atomically by the loop, read by ``uoomd status``."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, TextIO

from uoomd.errors import ExitCode, SetupError
from uoomd.logs import Log

WRITE_INTERVAL_S = 1.0  # the file is for people and scripts: once a second is plenty


class StatusBoard:
    """Writes what the daemon sees to a JSON file, at most once per WRITE_INTERVAL_S.

    Atomic (temp file + rename) so a reader never sees half a file; a directory that
    cannot be written is logged once and the daemon goes on guarding."""

    def __init__(self, path: str, log: Log) -> None:
        self.path = path
        self._log = log
        self._written_at = float("-inf")
        self._broken = False

    def maybe_write(self, now: float, data: dict[str, Any], *, force: bool = False) -> None:
        if self._broken or (not force and now - self._written_at < WRITE_INTERVAL_S):
            return
        self._written_at = now
        tmp = f"{self.path}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(tmp, "w") as handle:
                json.dump(data, handle, default=str)
            os.replace(tmp, self.path)
        except OSError as exc:
            self._broken = True
            self._log.warning("state_file_unwritable", path=self.path, error=exc.strerror or str(exc))
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def read_state(path: str) -> dict[str, Any]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise SetupError(f"no state file at {path}", hint="is `uoomd run` running with this policy?") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SetupError(f"cannot read the state file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SetupError(f"{path}: not a uoomd state file")
    return data


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render_status(data: dict[str, Any]) -> str:
    age = time.time() - float(data.get("updated_at", 0))
    running = _alive(data.get("pid"))
    lines = [
        f"uoomd pid {data.get('pid')} ({'running' if running else 'NOT running'}), "
        f"policy {data.get('policy')}{' (dry-run)' if data.get('dry_run') else ''}, updated {age:.1f}s ago",
        f"  {data.get('status', '')}",
    ]
    for guard in data.get("guards", []):
        memory = guard.get("memory") or {}
        total = memory.get("total_bytes") or 0
        avail = memory.get("available_bytes") or 0
        share = f"{avail / total * 100:.1f}%" if total else "?"
        line = f"guard {guard.get('name')} [{guard.get('scope')}]: {guard.get('phase')}, available {share}"
        if guard.get("scope_gone"):
            line += ", cgroup gone (guarded again once it is back)"
        if guard.get("victim"):
            line += f", victim {guard['victim'].get('name')!r} ({guard['victim'].get('pid')})"
        lines.append(line)
        for index, trigger in enumerate(guard.get("psi", [])):
            if trigger:
                lines.append(f"  psi[{index}]: {trigger.get('describe')}")
    recent = data.get("recent", [])
    if recent:
        lines.append("recent:")
        for event in recent[-10:]:
            when = time.strftime("%H:%M:%S", time.localtime(float(event.get("at", 0))))
            facts = " ".join(
                f"{k}={v}" for k, v in event.items() if k not in {"event", "at"} and not isinstance(v, list | dict)
            )
            lines.append(f"  {when} {event.get('event')} {facts[:200]}")
    return "\n".join(lines) + "\n"


def run_status(*, state_file: str | None, policy_path: str | None, as_json: bool, out: TextIO) -> int:
    path = state_file
    if path is None:
        from uoomd.cli import default_policy_path  # noqa: PLC0415
        from uoomd.policy.load import load_plan  # noqa: PLC0415

        path = load_plan(policy_path or default_policy_path()).daemon.state_file
    data = read_state(path)
    out.write(json.dumps(data, indent=2) + "\n" if as_json else render_status(data))
    return ExitCode.OK
