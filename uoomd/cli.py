"""The ``uoomd`` command line: parse arguments, dispatch, map failures to exit codes (the only place that exits)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from uoomd import __version__
from uoomd.errors import ExitCode, PolicyError, SetupError
from uoomd.policy.paths import default_policy_path

if TYPE_CHECKING:
    import argparse


def _build_parser() -> argparse.ArgumentParser:
    import argparse  # noqa: PLC0415 -- the isolated daemon (run_isolated) never parses arguments

    parser = argparse.ArgumentParser(
        prog="uoomd",
        description="A policy-driven userspace OOM killer for Linux.",
        epilog="Exit codes: 0 ok, 1 bad policy, 2 bad usage, 3 setup problem, 4 no such process, 70 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"uoomd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="validate a policy file and print the effective policy")
    check.add_argument("file", nargs="?", help="policy file (default: $UOOMD_POLICY or the installed default)")
    check.add_argument("--json", action="store_true", help="print the effective policy as JSON")

    sub.add_parser("schema", help="print the policy's JSON Schema, for editors")

    cand = sub.add_parser("candidates", help="list the ranked victims, best first")
    cand.add_argument("--policy", help="policy file")
    cand.add_argument("--guard", help="guard name (default: the first guard)")
    cand.add_argument("--top", type=int, default=None, help="show only the first N")
    cand.add_argument("--json", action="store_true", help="print a JSON array")
    cand.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)

    explain = sub.add_parser("explain", help="explain why a process ranks where it does")
    explain.add_argument("pid", type=int)
    explain.add_argument("--policy", help="policy file")
    explain.add_argument("--guard", help="guard name (default: the first guard)")
    explain.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--policy", help="policy file")
    run.add_argument("--dry-run", action="store_true", help="decide and log, send no signal")

    status = sub.add_parser("status", help="show what the running daemon sees and did")
    status.add_argument("--state-file", help="the daemon's state file (default: from the policy)")
    status.add_argument("--policy", help="policy file")
    status.add_argument("--json", action="store_true")
    return parser


def _cmd_check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from uoomd.policy.load import check_plan  # noqa: PLC0415
    from uoomd.policy.render import render_plan  # noqa: PLC0415
    from uoomd.sources.scope import read_scope_memory  # noqa: PLC0415

    path = args.file or default_policy_path()
    plan, warnings = check_plan(path)
    # Warnings go to stderr and leave the exit code at 0: the policy loads and runs as
    # written; it only shields less than it seems to (uoomd/policy/identity.py).
    for warning in warnings:
        err.write(warning.render(path) + "\n")
    # Sizes resolved against this machine (or the cgroup's limit) as it is now.
    totals = {}
    for guard in plan.guards:
        reading = read_scope_memory(guard.scope)
        if reading is not None:
            totals[guard.name] = (reading.total_bytes, reading.swap_total_bytes)
    if args.json:
        out.write(json.dumps(render_plan(plan, as_json=True, totals=totals), indent=2) + "\n")
    else:
        out.write(str(render_plan(plan, as_json=False, totals=totals)))
        out.write(f"# {path}: ok\n")
    return ExitCode.OK


def _cmd_schema(_args: argparse.Namespace, out: TextIO, _err: TextIO) -> int:
    from uoomd.policy.model import policy_json_schema  # noqa: PLC0415

    out.write(json.dumps(policy_json_schema(), indent=2) + "\n")
    return ExitCode.OK


def _cmd_candidates(args: argparse.Namespace, out: TextIO, _err: TextIO) -> int:
    from uoomd.policy.load import load_plan  # noqa: PLC0415
    from uoomd.report import run_candidates  # noqa: PLC0415

    plan = load_plan(args.policy or default_policy_path())
    return run_candidates(
        plan, guard_name=args.guard, top=args.top, as_json=args.json, proc_root=args.proc_root, out=out
    )


def _cmd_explain(args: argparse.Namespace, out: TextIO, _err: TextIO) -> int:
    from uoomd.policy.load import load_plan  # noqa: PLC0415
    from uoomd.report import run_explain  # noqa: PLC0415

    plan = load_plan(args.policy or default_policy_path())
    return run_explain(plan, pid=args.pid, guard_name=args.guard, proc_root=args.proc_root, out=out)


# The daemon runs in an isolated interpreter (-I: no PYTHON* variables, no user site; -S: no
# site hooks). A root daemon should not execute whatever .pth files the host's site-packages
# carry, and it saves their memory for the daemon's whole life (5.1 MiB here: a .pth that
# imports certifi and importlib.resources). Only uoomd's own directory and sdnotify's join
# sys.path; the policy is validated in a normal child (uoomd/policy/isolated.py).
_ISOLATED_BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
    "from uoomd.cli import run_isolated; raise SystemExit(run_isolated(sys.argv[2], sys.argv[3] == 'dry-run'))"
)


def _reexec_isolated(policy_path: str, *, dry_run: bool) -> None:
    import sdnotify  # noqa: PLC0415

    import uoomd  # noqa: PLC0415

    paths = []
    for module_file in (uoomd.__file__, sdnotify.__file__):
        assert module_file is not None
        parent = os.path.dirname(os.path.dirname(os.path.abspath(module_file)))
        if parent not in paths:
            paths.append(parent)
    mode = "dry-run" if dry_run else "live"
    argv = [sys.executable, "-I", "-S", "-c", _ISOLATED_BOOT, json.dumps(paths), policy_path, mode]
    os.execv(sys.executable, argv)  # noqa: S606


def _cmd_run(args: argparse.Namespace, _out: TextIO, _err: TextIO) -> int:
    policy_path = os.path.abspath(args.policy or default_policy_path())
    if not os.environ.get("UOOMD_NO_REEXEC"):
        _reexec_isolated(policy_path, dry_run=args.dry_run)
    return _run_daemon(policy_path, dry_run=args.dry_run)


def _run_daemon(policy_path: str, *, dry_run: bool) -> int:
    from uoomd.daemon import run_daemon  # noqa: PLC0415

    return run_daemon(policy_path=policy_path, dry_run=dry_run)


def run_isolated(policy_path: str, dry_run: bool) -> int:
    """The daemon's entry in its isolated interpreter (see _ISOLATED_BOOT): no argument parsing."""
    return _guarded(lambda: _run_daemon(policy_path, dry_run=dry_run), sys.stderr)


def _cmd_status(args: argparse.Namespace, out: TextIO, _err: TextIO) -> int:
    from uoomd.status import run_status  # noqa: PLC0415

    return run_status(state_file=args.state_file, policy_path=args.policy, as_json=args.json, out=out)


_COMMANDS = {
    "check": _cmd_check,
    "schema": _cmd_schema,
    "candidates": _cmd_candidates,
    "explain": _cmd_explain,
    "run": _cmd_run,
    "status": _cmd_status,
}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = _build_parser().parse_args(argv)
    return _guarded(lambda: _COMMANDS[args.command](args, out, err), err)


def _guarded(call: Callable[[], int], err: TextIO) -> int:
    """Run a command, mapping each failure class to its exit code (the table in uoomd/errors.py)."""
    try:
        return call()
    except PolicyError as exc:
        err.write(exc.render() + "\n")
        return ExitCode.POLICY
    except SetupError as exc:
        err.write(f"uoomd: {exc.message}\n")
        if exc.hint:
            err.write(f"uoomd: hint: {exc.hint}\n")
        return ExitCode.SETUP
    except BrokenPipeError:
        return ExitCode.OK
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug: say so loudly, with its own exit code (not 1, which means "bad policy")
        err.write("uoomd: internal error (a bug; please report it with this trace):\n")
        err.write(traceback.format_exc())
        return ExitCode.INTERNAL
