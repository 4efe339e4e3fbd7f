"""The ``uoomd`` command line: parse arguments, dispatch, map failures to exit codes (the only place that exits)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from uoomd import __version__
from uoomd.errors import CommandError, ExitCode, PolicyError, SetupError
from uoomd.policy.paths import default_policy_path

if TYPE_CHECKING:
    import argparse

    from uoomd.service import Renaming


def _build_parser() -> argparse.ArgumentParser:
    import argparse  # noqa: PLC0415 -- the isolated daemon (run_isolated) never parses arguments

    parser = argparse.ArgumentParser(
        prog="uoomd",
        description="A policy-driven userspace OOM killer for Linux.",
        epilog=(
            "Exit codes: 0 ok, 1 bad policy (or a reload refused), 2 bad usage, 3 setup problem, "
            "4 no such process, 5 the daemon is not running, 6 no answer to a reload, 70 internal error."
        ),
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
    cand.add_argument("--top", type=_at_least_one, default=None, help="show only the first N")
    cand.add_argument("--all", action="store_true", help="list the excluded processes too, with the reason")
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
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true")
    shown.add_argument(
        "--metrics", action="store_true", help="print the daemon's metrics in the Prometheus text format"
    )
    reload = sub.add_parser("reload", help="make the running daemon reload its policy, and wait until it has")
    reload.add_argument(
        "--pid", type=_at_least_one, help="the daemon's PID (systemd's $MAINPID); checked against the state file"
    )
    reload.add_argument("--state-file", help="the daemon's state file (default: from the policy)")
    reload.add_argument("--policy", help="policy file")
    reload.add_argument(
        "--timeout", type=_duration, default="30s", help="how long to wait for the outcome (default 30s)"
    )
    _add_trace_commands(sub)
    return parser


def _add_trace_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``record`` and ``replay`` (issue 16; uoomd/tracecmd.py)."""
    record = sub.add_parser("record", help="record what every guard reads, as a trace to replay; never signals")
    record.add_argument("--policy", help="policy file: the guards, their pace and PSI triggers")
    record.add_argument(
        "-o", "--output", default="uoomd-trace.jsonl", help="trace file, - for stdout (default: %(default)s)"
    )
    record.add_argument("--duration", type=_duration, help="stop after this long, e.g. 60s or 2h (default: Ctrl-C)")
    record.add_argument(
        "--max-size", type=_size, default="64MiB", help="past this, FILE becomes FILE.1 and FILE starts anew"
    )
    record.add_argument(
        "--psi", action="store_true", help="read PSI at every poll (delays others' unprivileged PSI triggers)"
    )
    replay = sub.add_parser("replay", help="what a policy would have done on a trace; twice --policy: the difference")
    replay.add_argument("trace", nargs="+", help="trace files, oldest first (FILE.1 FILE), or oomstat output")
    replay.add_argument(
        "--policy", action="append", default=[], help="policy file; twice to compare two (default: the recorded one)"
    )
    replay.add_argument("--json", action="store_true", help="print JSON")
    replay.add_argument("--mem-total", type=_size, help="oomstat traces: the machine's MemTotal")
    replay.add_argument("--swap-total", type=_size, help="oomstat traces: the machine's SwapTotal")


def _size(text: str) -> int:
    """``--max-size 64MiB``: a size in bytes."""
    import argparse  # noqa: PLC0415

    from uoomd.units import parse_size_bytes  # noqa: PLC0415

    try:
        return parse_size_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    """A duration option (``--timeout 30s``): more than zero, at most what a policy duration may be (1 day)."""
    import argparse  # noqa: PLC0415

    from uoomd.units import parse_duration_s  # noqa: PLC0415

    try:
        seconds = parse_duration_s(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return seconds


def _at_least_one(text: str) -> int:
    """``--top N``: a count of rows, so 1 or more (-1 used to drop the last row silently)."""
    import argparse  # noqa: PLC0415

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


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
        plan,
        guard_name=args.guard,
        top=args.top,
        show_all=args.all,
        as_json=args.json,
        proc_root=args.proc_root,
        out=out,
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


def _run_daemon(policy_path: str, *, dry_run: bool, renaming: Renaming | None = None) -> int:
    from uoomd.daemon import run_daemon  # noqa: PLC0415

    return run_daemon(policy_path=policy_path, dry_run=dry_run, renaming=renaming)


def run_isolated(policy_path: str, dry_run: bool) -> int:
    """The daemon's entry in its isolated interpreter (see _ISOLATED_BOOT): no argument parsing.

    First it takes the name ``uoomd`` back from the interpreter (comm and command line), before
    the policy is loaded: ps, pgrep and the policy's own protect rule see the daemon as it is."""
    from uoomd.service import take_name  # noqa: PLC0415

    title = ["uoomd", "run", "--policy", policy_path, *(["--dry-run"] if dry_run else [])]
    renaming = take_name(title)
    return _guarded(lambda: _run_daemon(policy_path, dry_run=dry_run, renaming=renaming), sys.stderr)


def _cmd_status(args: argparse.Namespace, out: TextIO, _err: TextIO) -> int:
    from uoomd.status import run_status  # noqa: PLC0415

    return run_status(
        state_file=args.state_file, policy_path=args.policy, as_json=args.json, out=out, as_metrics=args.metrics
    )


def _cmd_reload(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from uoomd.reload_request import run_reload  # noqa: PLC0415

    return run_reload(
        pid=args.pid, state_file=args.state_file, policy_path=args.policy, timeout_s=args.timeout, out=out, err=err
    )


def _cmd_record(args: argparse.Namespace, _out: TextIO, _err: TextIO) -> int:
    from uoomd.tracecmd import run_record  # noqa: PLC0415

    return run_record(
        policy_path=os.path.abspath(args.policy or default_policy_path()),
        output=args.output,
        duration_s=args.duration,
        max_bytes=args.max_size,
        psi_every_poll=args.psi,
    )


def _cmd_replay(args: argparse.Namespace, out: TextIO, _err: TextIO) -> int:
    from uoomd.tracecmd import run_replay  # noqa: PLC0415

    return run_replay(
        traces=args.trace,
        policies=args.policy,
        as_json=args.json,
        mem_total=args.mem_total,
        swap_total=args.swap_total,
        out=out,
    )


_COMMANDS = {
    "record": _cmd_record,
    "replay": _cmd_replay,
    "check": _cmd_check,
    "schema": _cmd_schema,
    "candidates": _cmd_candidates,
    "explain": _cmd_explain,
    "run": _cmd_run,
    "status": _cmd_status,
    "reload": _cmd_reload,
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
    except CommandError as exc:
        err.write(f"uoomd: {exc.message}\n")
        if exc.hint:
            err.write(f"uoomd: hint: {exc.hint}\n")
        return exc.exit_code
    except BrokenPipeError:
        return ExitCode.OK
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug: say so loudly, with its own exit code (not 1, which means "bad policy")
        err.write("uoomd: internal error (a bug; please report it with this trace):\n")
        err.write(traceback.format_exc())
        return ExitCode.INTERNAL
