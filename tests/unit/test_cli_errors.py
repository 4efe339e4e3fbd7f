"""Issue 13's command-line errors and reports: usage errors exit 2, every error goes to stderr as
``uoomd: ...``, `candidates` lists candidates (excluded ones with --all), and a running daemon,
known by the pid and start time in its state file, is never a candidate of a report.

Runs on the recorded /proc of tests/fixtures/proc (--proc-root); nothing is signalled."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.builders import CHILDREN, recorded_children
from uoomd.cli import main
from uoomd.errors import ExitCode
from uoomd.report import REASON_DAEMON
from uoomd.sources.procfs import read_stat

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = str(ROOT / "etc" / "uoomd.toml")
HOG = 9999  # hog-adj-max in the recording: the first candidate
HOGS = frozenset(recorded_children(CHILDREN))


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def usage_error(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    """argparse's own exit 2; its message (on sys.stderr)."""
    with pytest.raises(SystemExit) as caught:
        run(*argv)
    assert caught.value.code == ExitCode.USAGE
    return capsys.readouterr().err


def policy(tmp_path: Path) -> Path:
    """One system guard; its state file (where a report looks for the running daemon) in tmp_path."""
    path = tmp_path / "policy.toml"
    path.write_text(f'[daemon]\nstate_file = "{tmp_path}/state.json"\n\n[[guard]]\nname = "system"\n')
    return path


def state_file(tmp_path: Path, *, pid: int, starttime_ticks: int | None) -> Path:
    """What the daemon writes, naming ``pid`` (and its start time) as the daemon's."""
    doc: dict[str, Any] = {
        "pid": pid,
        "starttime_ticks": starttime_ticks,
        "policy": "/etc/uoomd/uoomd.toml",
        "dry_run": False,
        "updated_at": 1_700_000_000.0,
        "status": "mem 41% avail, last kill: none",
        "guards": [],
        "recent": [],
        "reload": None,
    }
    path = tmp_path / "state.json"
    path.write_text(json.dumps(doc))
    return path


def candidates(tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    code, out, err = run("candidates", "--policy", str(policy(tmp_path)), "--proc-root", CHILDREN, "--json", *extra)
    assert (code, err) == (ExitCode.OK, "")
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


def starttime(pid: int) -> int:
    stat = read_stat(CHILDREN, pid)
    assert stat is not None
    return stat.starttime_ticks


# --- usage errors: exit 2 ------------------------------------------------------------------


@pytest.mark.parametrize("top", ["0", "-1", "x"])
def test_top_below_one_is_a_usage_error(top: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error("candidates", "--top", top, "--policy", SHIPPED, capsys=capsys)
    assert "argument --top:" in err


@pytest.mark.parametrize("command", ["candidates", "explain"])
def test_an_unknown_guard_is_a_usage_error_on_stderr(command: str) -> None:
    argv = [command, *(["1"] if command == "explain" else []), "--policy", SHIPPED, "--guard", "nope"]
    code, out, err = run(*argv)
    assert (code, out) == (ExitCode.USAGE, "")
    assert err.splitlines() == ["uoomd: no guard named 'nope'", "uoomd: hint: the policy's guards are: system"]


@pytest.mark.parametrize(("option", "value"), [("--timeout", "0s"), ("--timeout", "soon"), ("--pid", "0")])
def test_reload_refuses_a_bad_timeout_or_pid(option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error("reload", option, value, "--state-file", "/nonexistent", capsys=capsys)
    assert f"argument {option}:" in err


def test_explain_of_a_missing_pid_says_so_on_stderr_with_the_prefix(tmp_path: Path) -> None:
    code, out, err = run("explain", "999999", "--policy", str(policy(tmp_path)), "--proc-root", CHILDREN)
    assert (code, out, err) == (ExitCode.NOT_FOUND, "", "uoomd: no process 999999\n")


# --- candidates: candidates only, the excluded with --all ----------------------------------


def test_candidates_json_lists_candidates_only(tmp_path: Path) -> None:
    rows = candidates(tmp_path)
    assert rows
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert not any(r["protected"] for r in rows)
    assert rows[0]["pid"] == HOG


def test_candidates_all_adds_every_excluded_process_with_its_reason_kernel_threads_last(tmp_path: Path) -> None:
    ranked = candidates(tmp_path)
    rows = candidates(tmp_path, "--all")
    assert rows[: len(ranked)] == ranked
    excluded = rows[len(ranked) :]
    assert excluded
    assert all(r["protected"] and r["rank"] is None and r["reason"] for r in excluded)
    reasons = [r["reason"] for r in excluded]
    assert "kernel thread" in reasons
    assert "init" in reasons
    first_kthread = reasons.index("kernel thread")
    assert set(reasons[first_kthread:]) == {"kernel thread"}, "kernel threads come last"


def test_candidates_text_summarises_the_excluded_and_lists_them_with_all(tmp_path: Path) -> None:
    base = ["candidates", "--policy", str(policy(tmp_path)), "--proc-root", CHILDREN]
    _code, summary, _err = run(*base)
    assert summary.splitlines()[-1].startswith("# excluded: ")
    assert summary.splitlines()[-1].endswith("(--all lists them)")
    code, out, _err = run(*base, "--all")
    assert code == ExitCode.OK
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("# excluded: "))
    assert lines[header + 1].split() == ["PID", "USER", "NAME", "RSS", "ADJ", "REASON"]
    assert any(line.split()[0] == "1" and line.endswith("init") for line in lines[header + 2 :])


# --- the running daemon is no candidate of a report ------------------------------------------


def test_the_running_daemon_is_excluded_as_such(tmp_path: Path) -> None:
    state_file(tmp_path, pid=HOG, starttime_ticks=starttime(HOG))
    ranked = candidates(tmp_path)
    assert HOG not in {r["pid"] for r in ranked}
    [row] = [r for r in candidates(tmp_path, "--all") if r["pid"] == HOG]
    assert (row["reason"], row["rank"], row["protected"]) == (REASON_DAEMON, None, True)
    code, out, _err = run("explain", str(HOG), "--policy", str(policy(tmp_path)), "--proc-root", CHILDREN)
    assert code == ExitCode.OK
    assert f"uoomd: excluded: {REASON_DAEMON}\n" in out
    assert "uoomd would pick it: no" in out


@pytest.mark.parametrize(
    ("pid", "ticks"),
    [(HOG, 1), (HOG, None), (4_194_304, 66496)],
    ids=["recycled-pid", "no-starttime", "gone"],
)
def test_a_stale_state_file_excludes_nobody(tmp_path: Path, pid: int, ticks: int | None) -> None:
    # The PID is a newcomer's (another start time), the file too old to tell, or nobody's.
    state_file(tmp_path, pid=pid, starttime_ticks=ticks)
    assert candidates(tmp_path)[0]["pid"] == HOG
    assert REASON_DAEMON not in {r["reason"] for r in candidates(tmp_path, "--all")}


# --- status and reload of a daemon that is gone -----------------------------------------------


def test_status_of_a_stopped_daemon_exits_5_with_its_last_state(tmp_path: Path) -> None:
    path = state_file(tmp_path, pid=os.getpid(), starttime_ticks=1)  # our PID, not our start time
    code, out, err = run("status", "--state-file", str(path))
    assert (code, err) == (ExitCode.NOT_RUNNING, "")
    assert out.startswith(f"uoomd is not running (state file from pid {os.getpid()}, written ")
    code, out, _err = run("status", "--json", "--state-file", str(path))
    assert code == ExitCode.NOT_RUNNING
    assert json.loads(out)["running"] is False


def test_status_of_a_running_daemon_says_running_in_json(tmp_path: Path) -> None:
    mine = read_stat("/proc", os.getpid())
    assert mine is not None
    path = state_file(tmp_path, pid=os.getpid(), starttime_ticks=mine.starttime_ticks)
    code, out, _err = run("status", "--json", "--state-file", str(path))
    assert code == ExitCode.OK
    assert json.loads(out)["running"] is True


def test_reload_of_a_stopped_daemon_exits_5_and_signals_nothing(tmp_path: Path) -> None:
    path = state_file(tmp_path, pid=os.getpid(), starttime_ticks=1)  # a SIGHUP would reach us
    code, out, err = run("reload", "--state-file", str(path))
    assert (code, out) == (ExitCode.NOT_RUNNING, "")
    assert err.startswith(f"uoomd: the daemon is not running (state file from pid {os.getpid()}, written ")


def test_reload_checks_pid_against_the_state_file(tmp_path: Path) -> None:
    path = state_file(tmp_path, pid=4_194_304, starttime_ticks=1)
    code, _out, err = run("reload", "--pid", "4194303", "--state-file", str(path))
    assert code == ExitCode.SETUP
    assert err.startswith(f"uoomd: the state file {path} is from pid 4194304, not 4194303\n")


def test_reload_refuses_a_daemon_too_old_to_report_reloads(tmp_path: Path) -> None:
    path = state_file(tmp_path, pid=os.getpid(), starttime_ticks=None)
    doc = json.loads(path.read_text())
    del doc["reload"]
    path.write_text(json.dumps(doc))
    code, _out, err = run("reload", "--state-file", str(path))
    assert code == ExitCode.SETUP
    assert "does not report reloads" in err


def test_reload_without_a_state_file_is_a_setup_error(tmp_path: Path) -> None:
    code, _out, err = run("reload", "--state-file", str(tmp_path / "none.json"))
    assert code == ExitCode.SETUP
    assert err.startswith("uoomd: no state file at ")
