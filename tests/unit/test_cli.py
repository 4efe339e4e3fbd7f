"""The command line: one exit code per failure class, pinned here and in the README."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from uoomd.cli import main
from uoomd.errors import ExitCode

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_exit_code_table_is_stable() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "POLICY": 1,
        "USAGE": 2,
        "SETUP": 3,
        "NOT_FOUND": 4,
        "NOT_RUNNING": 5,
        "NO_ANSWER": 6,
        "INTERNAL": 70,
    }


def test_check_good_policy_prints_effective_policy_and_exits_0() -> None:
    code, out, _ = run("check", str(ROOT / "policies" / "server.toml"))
    assert code == ExitCode.OK
    assert "[[guard]]" in out
    assert 'name = "databases"' in out
    assert out.rstrip().endswith(": ok")


def test_check_json_has_defaults_filled_in() -> None:
    code, out, _ = run("check", "--json", str(ROOT / "policies" / "audit.toml"))
    assert code == ExitCode.OK
    data = json.loads(out)
    assert data["daemon"]["dry_run"] is True
    assert data["hooks"]["timeout_s"] == 10.0
    assert data["guard"][0]["victim"] == "process"


def test_check_bad_policy_exits_1_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[guard]]\nname = "system"\nvictim = "all"\n')
    code, out, err = run("check", str(bad))
    assert code == ExitCode.POLICY
    assert out == ""
    assert err.startswith(f"{bad}:3: guard[0].victim: ")


def test_check_uses_uoomd_policy_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.toml"
    path.write_text('[[guard]]\nname = "from-env"\n')
    monkeypatch.setenv("UOOMD_POLICY", str(path))
    code, out, _ = run("check")
    assert code == ExitCode.OK
    assert 'name = "from-env"' in out


def test_check_without_file_uses_the_shipped_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UOOMD_POLICY", raising=False)
    code, out, _ = run("check")
    assert code == ExitCode.OK
    assert 'name = "system-core"' in out


def test_bad_usage_exits_2() -> None:
    with pytest.raises(SystemExit) as caught:
        run("frobnicate")
    assert caught.value.code == ExitCode.USAGE


def test_schema_is_json_schema_with_every_table() -> None:
    code, out, _ = run("schema")
    assert code == ExitCode.OK
    schema = json.loads(out)
    assert set(schema["properties"]) == {"daemon", "escalation", "guard", "rule", "hooks"}
    assert schema["additionalProperties"] is False
    assert "guard" in schema["required"]


def test_check_resolves_sizes_against_this_machine() -> None:
    code, out, _ = run("check", str(ROOT / "policies" / "desktop.toml"))
    assert code == ExitCode.OK
    with open("/proc/meminfo") as f:
        total_kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    line = next(x for x in out.splitlines() if x.startswith("mem_available_term"))
    # "6%" of MemTotal, shown next to the total it was resolved against.
    assert line.startswith('mem_available_term = "6%"  # = ')
    assert f"of {total_kib * 1024 / 1024**3:.1f}GiB" in line


def test_check_json_resolves_bytes() -> None:
    code, out, _ = run("check", "--json", str(ROOT / "etc" / "uoomd.toml"))
    assert code == ExitCode.OK
    guard = json.loads(out)["guard"][0]
    total = guard["memory_total_bytes"]
    assert total > 0
    assert guard["mem_available_term"]["bytes"] == int(total * 0.05)


def test_a_bug_exits_70_with_a_trace_not_1(monkeypatch: pytest.MonkeyPatch) -> None:
    import uoomd.policy.load

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(uoomd.policy.load, "check_plan", broken)
    code, _, err = run("check", str(ROOT / "etc" / "uoomd.toml"))
    assert code == ExitCode.INTERNAL
    assert "internal error" in err
    assert "RuntimeError: boom" in err


def test_explain_of_a_missing_pid_exits_4_saying_so_on_stderr() -> None:
    code, out, err = run("explain", "999999999", "--policy", str(ROOT / "etc" / "uoomd.toml"))
    assert (code, out, err) == (ExitCode.NOT_FOUND, "", "uoomd: no process 999999999\n")


def test_status_without_a_daemon_is_a_setup_error(tmp_path: Path) -> None:
    code, _, err = run("status", "--state-file", str(tmp_path / "none.json"))
    assert code == ExitCode.SETUP
    assert "no state file" in err
