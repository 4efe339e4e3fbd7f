"""A PID + mount namespace for one benchmark scenario, driven from outside (the harness side of bench/pod.py).

Everything a scenario starts (daemon under test, hogs, idle processes) is a child of the
pod, PID 1 of a new PID namespace with its own /proc: the daemons see only the pod's
processes, and their kill() can reach nothing else. ``unshare --kill-child=SIGKILL`` ties
the pod's life to the unshare process this harness started; stopping that (by its PID)
ends the namespace and the kernel kills all that is left in it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Self

POD = Path(__file__).resolve().parent / "pod.py"


class PodError(RuntimeError):
    """The pod answered with an error or went away."""


class Pod:
    """``with Pod() as pod: pod.call("spawn", argv=[...])``; closed (and everything in it killed) on exit."""

    def __init__(self) -> None:
        unshare = shutil.which("unshare")
        if unshare is None:
            raise PodError("unshare(1) is missing (Debian package util-linux)")
        self.process = subprocess.Popen(
            [unshare, "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL", sys.executable, "-I", str(POD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C reaches the harness, which stops the pod in order
        )

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError as exc:
            raise PodError(f"pod gone (exit {self.process.poll()})") from exc
        line = self.process.stdout.readline()
        if not line:
            raise PodError(f"pod gone during {op} (exit {self.process.poll()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise PodError(f"{op}: {answer['error']}")
        return answer

    def spawn(
        self, argv: list[str], *, out: Path | None = None, env: dict[str, str] | None = None, adj: int | None = None
    ) -> int:
        """Start ``argv`` in the namespace; returns its PID as seen inside."""
        answer = self.call("spawn", argv=argv, out=None if out is None else str(out), env=env, adj=adj)
        return int(answer["pid"])

    def close(self) -> None:
        """Ask the pod to kill its children and exit; if it does not, SIGKILL our unshare by PID."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.process.stdin is not None
                self.process.stdin.close()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()  # --kill-child takes the pod, the namespace takes the rest
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
