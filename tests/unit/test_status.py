"""`uoomd status` (issue 12): every string from the state file printed escaped, and a state file
the daemon did not write refused with exit 3 and one clear line, never a traceback."""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from uoomd.cli import main
from uoomd.errors import ExitCode
from uoomd.status import STATE_LIMIT_BYTES, parse_state, render_status

pytestmark = pytest.mark.unit

INJECTION = "\x1b[31mX\nguard FA"


def good_state() -> dict[str, Any]:
    """What uoomd/status.py status_document() writes, for one guard with a victim and a PSI trigger."""
    return {
        "pid": os.getpid(),
        "policy": "/etc/uoomd/uoomd.toml",
        "dry_run": False,
        "updated_at": 1_700_000_000.0,
        "status": "mem 41% avail, last kill: none",
        "guards": [
            {
                "name": "system",
                "scope": "system",
                "scope_gone": False,
                "phase": "term_sent",
                "victim": {"pid": 4242, "name": "hog"},
                "memory": {
                    "total_bytes": 1000,
                    "available_bytes": 410,
                    "swap_total_bytes": 0,
                    "swap_free_bytes": 0,
                },
                "psi": [None, {"mode": "some", "describe": "some 10% over 2s"}],
            }
        ],
        "recent": [{"event": "victim_chosen", "at": 1_700_000_000.0, "pid": 4242, "name": "hog", "rules": []}],
    }


def run_status(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["status", "--state-file", str(path)], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def edited(edit: Callable[[dict[str, Any]], object]) -> bytes:
    state = good_state()
    edit(state)
    return json.dumps(state).encode()


def _set(path: tuple[str | int, ...], value: object) -> Callable[[dict[str, Any]], object]:
    def edit(state: dict[str, Any]) -> None:
        target: Any = state
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return edit


def _drop(path: tuple[str | int, ...]) -> Callable[[dict[str, Any]], object]:
    def edit(state: dict[str, Any]) -> None:
        target: Any = state
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return edit


GUARD = ("guards", 0)
# (id, the file's bytes, what the one error line says)
MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "not JSON"),
    ("not-json", b"pid 1\n", "not JSON"),
    ("truncated", json.dumps(good_state()).encode()[:-20], "not JSON"),
    ("array", b"[]", "an object expected, not an array"),
    ("string", b'"state"', "an object expected, not str"),
    ("empty-object", b"{}", "pid: missing"),
    ("pid-string", edited(_set(("pid",), "1")), "pid: int expected, not str '1'"),
    ("pid-bool", edited(_set(("pid",), True)), "pid: int expected, not a boolean"),
    ("pid-zero", edited(_set(("pid",), 0)), "pid: 0 is not a PID"),
    ("pid-huge", edited(_set(("pid",), 10**30)), "is not a PID"),
    ("pid-5000-digits", b'{"pid": ' + b"9" * 5000 + b"}", "not JSON"),
    ("updated-nan", edited(_set(("updated_at",), float("nan"))), "updated_at: a time in seconds expected"),
    ("updated-inf", edited(_set(("updated_at",), float("inf"))), "updated_at: a time in seconds expected"),
    ("updated-1e300", edited(_set(("updated_at",), 1e300)), "updated_at: a time in seconds expected"),
    ("updated-string", edited(_set(("updated_at",), "yesterday")), "updated_at: a time in seconds expected"),
    ("status-null", edited(_set(("status",), None)), "status: str expected, not null"),
    ("guards-object", edited(_set(("guards",), {})), "guards: list expected, not an object"),
    ("guard-number", edited(_set(("guards",), [1])), "guards[0]: an object expected, not int 1"),
    ("guard-no-name", edited(_drop((*GUARD, "name"))), "guards[0].name: missing"),
    ("victim-string", edited(_set((*GUARD, "victim"), "x")), "guards[0].victim: an object expected"),
    ("victim-no-pid", edited(_set((*GUARD, "victim"), {"name": "x"})), "guards[0].victim.pid: missing"),
    ("memory-negative", edited(_set((*GUARD, "memory", "total_bytes"), -1)), "total_bytes: -1 is not a size"),
    (
        "refault-rate-string",
        edited(_set((*GUARD, "memory", "refault_bytes_per_s"), "fast")),
        "guards[0].memory.refault_bytes_per_s: int expected, not str",
    ),
    ("psi-describe-number", edited(_set((*GUARD, "psi"), [{"describe": 1}])), "guards[0].psi[0].describe"),
    ("recent-event-number", edited(_set(("recent",), [{"event": 1, "at": 0}])), "recent[0].event: str expected"),
    ("recent-no-at", edited(_set(("recent",), [{"event": "x"}])), "recent[0].at: missing"),
    ("not-utf8", b'{"pid": "\xff"}', "not UTF-8 text"),
    ("nested-over-the-cap", b"[" * 600_000 + b"]" * 600_000, "over"),
    ("nested-deep", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("huge", b" " * STATE_LIMIT_BYTES + b"{}", f"over {STATE_LIMIT_BYTES} bytes"),
    ("escape-in-a-value", b'{"pid": "\\u001b[31mX\\nguard FA"}', "not str '\\x1b[31mX\\x0aguard FA'"),
]


@pytest.mark.parametrize(("content", "message"), [(c, m) for _, c, m in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_a_malformed_state_file_is_one_clear_error_with_exit_3(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    code, out, err = run_status(path)
    assert (code, out) == (ExitCode.SETUP, "")
    assert err.startswith((f"uoomd: the state file {path} ", f"uoomd: cannot read the state file {path}"))
    assert message in err
    assert err.count("\n") == 1, "one line, no traceback"
    assert "\x1b" not in err


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _symlink(path: Path) -> None:
    target = path.with_name("real.json")
    target.write_text(json.dumps(good_state()))
    path.symlink_to(target)


def _directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    ("make", "message"),
    [(_fifo, "not a regular file (a FIFO)"), (_symlink, "a symbolic link"), (_directory, "a directory")],
    ids=["fifo", "symlink", "directory"],
)
def test_a_state_file_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path, make: Callable[[Path], None], message: str
) -> None:
    path = tmp_path / "state.json"
    make(path)
    code, out, err = run_status(path)
    assert (code, out) == (ExitCode.SETUP, "")
    assert message in err
    assert err.count("\n") == 1


def test_a_character_device_is_never_read() -> None:
    code, _, err = run_status(Path("/dev/zero"))
    assert code == ExitCode.SETUP
    assert "a character device" in err


def test_a_good_state_file_prints_its_guards_and_recent_events(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(good_state()))
    code, out, err = run_status(path)
    assert (code, err) == (ExitCode.OK, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"uoomd pid {os.getpid()} (running), policy /etc/uoomd/uoomd.toml, updated ")
    assert lines[2] == "guard system [system]: term_sent, available 41.0%, victim 'hog' (4242)"
    assert lines[3] == "  psi[1]: some 10% over 2s"
    assert lines[5].endswith(" victim_chosen pid=4242 name=hog")


def test_every_string_from_the_state_file_is_printed_escaped(tmp_path: Path) -> None:
    state = good_state()
    state["policy"] = INJECTION
    state["status"] = INJECTION
    guard = state["guards"][0]
    guard.update(name=INJECTION, scope=INJECTION, phase=INJECTION)
    guard["victim"]["name"] = INJECTION
    guard["psi"][1]["describe"] = INJECTION
    state["recent"] = [{"event": INJECTION, "at": 1_700_000_000.0, INJECTION: INJECTION}]
    path = tmp_path / "state.json"
    path.write_text(json.dumps(state))
    code, out, _ = run_status(path)
    assert code == ExitCode.OK
    assert "\x1b" not in out
    assert not any(line.startswith("guard FA") for line in out.splitlines()), "a forged line"
    assert out.count("\\x1b[31mX\\x0aguard FA") == 10
    assert len(out.splitlines()) == 6, "as many lines as for a plain state"
    code, as_json, _ = run_status_json(path)
    assert code == ExitCode.OK
    assert "\x1b" not in as_json
    assert json.loads(as_json) == {**state, "running": True}


def run_status_json(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["status", "--json", "--state-file", str(path)], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_a_dead_daemons_pid_reads_not_running() -> None:
    state = copy.deepcopy(good_state())
    state["pid"] = 4_194_304  # PID_MAX_LIMIT: never a live process here
    first = render_status(parse_state(state), now=1_700_000_001.0).splitlines()[0]
    assert first.startswith("uoomd is not running (state file from pid 4194304, written 1.0s ago)")


def test_the_refault_rate_is_shown_where_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(edited(_set((*GUARD, "memory", "refault_bytes_per_s"), 3 << 20)))
    code, out, _ = run_status(path)
    assert code in (0, 5)
    assert "available 41.0%, refaults 3.0MiB/s" in out
    path.write_bytes(edited(lambda state: None))  # no rate (a uoomd before it, or not read): no clause
    assert "refaults" not in run_status(path)[1]
