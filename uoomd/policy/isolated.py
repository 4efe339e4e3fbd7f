"""Load a policy in a child process and hand back the Plan, so the daemon never imports pydantic.

pydantic costs the daemon ~11 MiB of RSS that it would carry for its whole life to
validate one file at start and at each reload (measured: VmRSS 23.7 -> 34.7 MiB on
importing uoomd.policy.load, Python 3.11, pydantic 2.13). The child validates and
compiles; the Plan is frozen stdlib dataclasses and crosses the pipe pickled. Only our
own child writes that pipe, from a policy file we were told to trust.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

from uoomd.errors import PolicyError, PolicyIssue, SetupError
from uoomd.plan import Plan

CHILD_TIMEOUT_S = 30.0


def load_plan_isolated(path: str) -> Plan:
    """Like ``uoomd.policy.load.load_plan``, run in ``python -m uoomd.policy.isolated``."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "uoomd.policy.isolated", path],
            capture_output=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"cannot run the policy checker: {exc}") from exc
    if done.returncode != 0 or not done.stdout:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise SetupError(f"the policy checker failed (exit {done.returncode}): {' | '.join(tail)}")
    kind, payload = pickle.loads(done.stdout)  # noqa: S301 -- our own child, see the module docstring
    if kind == "plan":
        assert isinstance(payload, Plan)
        return payload
    file, issues = payload
    raise PolicyError(file, [PolicyIssue(key=k, message=m, line=line) for k, m, line in issues])


def _child(path: str) -> int:
    from uoomd.policy.load import load_plan  # noqa: PLC0415 -- the import this process exists to hold

    try:
        result: tuple[str, object] = ("plan", load_plan(path))
    except PolicyError as exc:
        result = ("error", (exc.file, [(i.key, i.message, i.line) for i in exc.issues]))
    sys.stdout.buffer.write(pickle.dumps(result))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1]))
