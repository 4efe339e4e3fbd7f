"""Run the installed ``uoomd`` command as a subprocess and read its JSON log lines (for e2e tests)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOGS = ROOT / "tests" / "hogs.py"


def uoomd_command() -> list[str]:
    """The installed console script: next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "uoomd"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("uoomd")
    if found:
        return [found]
    pytest.fail("the uoomd command is not installed: run `python3 -m pip install -e '.[test]'` first")


class RunningDaemon:
    """``uoomd run`` with a policy written to a temp dir; stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        tmp_path: Path,
        policy: str,
        *args: str,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        """``command``: another way to run uoomd than the installed script (e.g. a venv's python -m uoomd)."""
        self.policy_path = tmp_path / "policy.toml"
        self.policy_path.write_text(policy)
        self.policy_path.chmod(0o644)
        self.log_path = tmp_path / "uoomd.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- closed in stop()
        full_env = {**os.environ, **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        if env and "NOTIFY_SOCKET" in env:
            full_env["NOTIFY_SOCKET"] = env["NOTIFY_SOCKET"]
        self.process = subprocess.Popen(
            [*(command or uoomd_command()), "run", "--policy", str(self.policy_path), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
        )

    def events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line being written right now
        return out

    def find(self, event: str, **facts: Any) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event and all(e.get(k) == v for k, v in facts.items())]

    def wait_for(self, event: str, timeout_s: float = 15.0, **facts: Any) -> dict[str, Any]:
        found: list[dict[str, Any]] = wait_until(lambda: self.find(event, **facts), timeout_s)
        if not found:
            raise AssertionError(f"no {event} {facts} within {timeout_s}s; log:\n{self.log_path.read_text()[-4000:]}")
        return found[0]

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def wait_until(condition: Callable[[], Any], timeout_s: float, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def read_record(path: Path) -> list[list[str]]:
    """A hog's record file as lists of words: ["START", t, pid], ["SIGTERM", t, mib], ..."""
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def hog_argv(record: Path, *extra: str) -> list[str]:
    return [sys.executable, str(HOGS), "--record", str(record), *extra]


def daemon_fixture(tmp_path: Path) -> Iterator[Callable[..., RunningDaemon]]:
    started: list[RunningDaemon] = []

    def start(
        policy: str, *args: str, env: dict[str, str] | None = None, command: list[str] | None = None
    ) -> RunningDaemon:
        daemon = RunningDaemon(tmp_path, policy, *args, env=env, command=command)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()
