"""What one boot carries into the guest: its scenarios, in order, and the project files they use.

Everything the VM runs comes from this repository: uoomd itself is on the root disk (installed
by packaging/install-unit from the wheels built from this tree, vm/rootdisk.py); the boot brings
the scenarios (vm/scenarios), tests/hogs.py, the shipped policies, the live oom_score test.

Usage: ``python3 -m vm.payload SCENARIO [ARG...]`` boots once and prints where the results are.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vm.boot import Payload, boot
from vm.image import BuildFailed, Unavailable, cache_root
from vm.prepare import prepare

VM_DIR = Path(__file__).resolve().parent
REPO = VM_DIR.parent
SCENARIOS = VM_DIR / "scenarios"
GUEST_WORK = "/var/lib/uoomd-vmtest"  # where vm/guest/vmtest-runner unpacks the payload
# Project files the scenarios use, by repo-relative path (globs allowed).
REPO_FILES = (
    "pyproject.toml",  # the live oom_score test's pytest configuration
    "systemd/uoomd.service",
    "etc/uoomd.toml",
    "policies/*.toml",
    "packaging/*",
    "tests/*.py",  # hogs.py, and the helpers the live oom_score test imports
    "tests/integration/__init__.py",
    "tests/integration/test_oom_score_live.py",
)


def build_payload(scenario: str, *, args: tuple[str, ...] = ()) -> dict[str, Path | bytes]:
    """One scenario for one boot: its results land at the top of the results directory."""
    run = f'#!/bin/sh\nexec {_scenario_command(scenario, args)} "$1"{_argv(args)}\n'
    return _with_files(run)


def build_suite_payload(scenarios: Sequence[tuple[str, tuple[str, ...], float]]) -> dict[str, Path | bytes]:
    """Several scenarios (name, args, guest time limit in s) for one boot, one after another:
    each writes into results/NAME/ (with its own ``rc``; 124: over its limit), so one that
    fails or hangs costs only its own results. A boot costs ~30 s of emulated start-up."""
    names = [name for name, _, _ in scenarios]
    if len(set(names)) != len(names):
        raise ValueError(f"a scenario runs once per boot: {names}")
    lines = ["#!/bin/sh", "# vm/payload.py: the scenarios of this boot, in order", "out=$1", "rc=0"]
    for name, args, limit_s in scenarios:
        command = _scenario_command(name, args)
        lines += [
            f'mkdir -p "$out/{name}"',
            f'timeout --kill-after=5 {int(limit_s)} {command} "$out/{name}"{_argv(args)}',
            f'echo $? >"$out/{name}/rc"',
            f'[ "$(cat "$out/{name}/rc")" = 0 ] || rc=1',
        ]
    lines.append("exit $rc")
    return _with_files("\n".join(lines) + "\n")


def _scenario_command(scenario: str, args: tuple[str, ...]) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", scenario) or not (SCENARIOS / f"{scenario}.py").exists():
        raise ValueError(f"no scenario {scenario!r} in {SCENARIOS}")
    return f"python3 -X faulthandler {GUEST_WORK}/scenarios/{scenario}.py"


def _argv(args: tuple[str, ...]) -> str:
    return "".join(" " + shlex.quote(arg) for arg in args)


def _with_files(run: str) -> dict[str, Path | bytes]:
    payload: dict[str, Path | bytes] = {"run": run.encode()}
    for path in sorted(SCENARIOS.glob("*.py")):
        payload[f"scenarios/{path.name}"] = path
    for pattern in REPO_FILES:
        for path in sorted(REPO.glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                payload[f"repo/{path.relative_to(REPO).as_posix()}"] = path
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario")
    parser.add_argument("args", nargs="*")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM, MiB")
    opts = parser.parse_args(argv)
    try:
        prepared = prepare()
    except (Unavailable, BuildFailed) as exc:
        print(f"vm.payload: {exc}", file=sys.stderr)
        return 3
    out = opts.out or cache_root() / "runs" / f"{opts.scenario}-{int(time.time())}"
    payload: Payload = build_payload(opts.scenario, args=tuple(opts.args))
    result = boot(prepared.image, prepared.root, payload, out, timeout_s=opts.timeout, memory_mib=opts.memory)
    print(result.describe())
    print(result.results)
    return 0 if result.rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
