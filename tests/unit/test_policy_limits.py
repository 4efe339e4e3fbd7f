"""Policy input that once crashed or hung `uoomd check` (issue 12) is refused, quickly, by line and key.

The causes that a fixture file can show are in tests/fixtures/bad_policies (size_huge,
duration_inf, duration_nan, nesting_deep, nul_in_path, long_blank_lines, protect_not_bool);
these are the ones that need a path, a size or the machine's total.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from uoomd.cli import main
from uoomd.errors import ExitCode, PolicyError
from uoomd.policy import compile as compile_module
from uoomd.policy.isolated import load_plan_isolated
from uoomd.policy.load import MAX_POLICY_BYTES, load_plan, parse_plan
from uoomd.policy.locate import locate_lines
from uoomd.units import MAX_SIZE_BYTES, parse_duration_s, parse_size_bytes

pytestmark = pytest.mark.unit

BAD = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "bad_policies"
GIB = 1 << 30


def _messages(caught: pytest.ExceptionInfo[PolicyError]) -> list[str]:
    return [issue.render("bad.toml") for issue in caught.value.issues]


def test_a_file_whose_read_fails_is_a_policy_error() -> None:
    # /proc/self/mem is a regular file; reading it at offset 0 fails with EIO.
    with pytest.raises(PolicyError) as caught:
        load_plan("/proc/self/mem")
    assert _messages(caught) == ["bad.toml: cannot read: Input/output error"]


def test_a_policy_over_the_size_cap_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_bytes(b'[[guard]]\nname = "system"\n' + b"#" * (50 << 20))
    start = time.monotonic()
    with pytest.raises(PolicyError) as caught:
        load_plan(str(path))
    assert time.monotonic() - start < 1.0
    assert _messages(caught) == ["bad.toml: refused: larger than 256 KiB (a policy is a few KiB)"]


def test_a_policy_at_the_size_cap_loads_within_a_second(tmp_path: Path) -> None:
    head = b'[[guard]]\nname = "system"\n'
    path = tmp_path / "full.toml"
    path.write_bytes(head + (b"# padding " * MAX_POLICY_BYTES)[: MAX_POLICY_BYTES - len(head) - 1] + b"\n")
    assert path.stat().st_size == MAX_POLICY_BYTES
    start = time.monotonic()
    load_plan(str(path))
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    "line", [" " * 100_000, "[" + " " * 100_000, "[[" + " " * 100_000 + "]", "a" + " " * 100_000, "{," * 50_000]
)
def test_the_key_locator_is_linear_in_the_line(line: str) -> None:
    # The old key regex took 19 s on 3,000 spaces and over 300 s on 8,000 (cubic).
    start = time.monotonic()
    locate_lines(f"[daemon]\n{line}\ndry_run = true\n")
    assert time.monotonic() - start < 0.5


def test_the_key_locator_still_finds_keys_around_spaces() -> None:
    lines = locate_lines('  [daemon]  # c\n   dry_run   =   true\n[[guard]]\n name="x"\n')
    assert lines[("daemon", "dry_run")] == 2
    assert lines[("guard", 0, "name")] == 4


def test_sizes_and_durations_are_bounded() -> None:
    assert parse_size_bytes("8TiB") == 8 << 40
    with pytest.raises(ValueError, match="below 2\\*\\*63"):
        parse_size_bytes("9" * 400)
    with pytest.raises(ValueError, match="below 2\\*\\*63"):
        parse_size_bytes(f"{MAX_SIZE_BYTES + 1}")
    assert parse_size_bytes(f"{MAX_SIZE_BYTES}") <= MAX_SIZE_BYTES
    assert parse_duration_s("1h") == 3600.0
    with pytest.raises(ValueError, match="finite"):
        parse_duration_s("25h")
    with pytest.raises(ValueError, match="finite"):
        parse_duration_s("9" * 400)


GUARD = '[[guard]]\nname = "system"\nmem_available_term = "{term}"\nmem_available_kill = "{kill}"\n'


def test_a_percent_term_level_below_a_size_kill_level_on_this_machine_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 12: "1%" against "2GiB" passed. Judged on the scope's total as it is now.
    monkeypatch.setattr(compile_module, "_scope_totals", lambda _scope: (16 * GIB, 0))
    with pytest.raises(PolicyError) as caught:
        parse_plan(GUARD.format(term="1%", kill="2GiB"), check_system=True)
    assert _messages(caught) == [
        "bad.toml:3: guard[0].mem_available_term: mem_available_term (1%, 163.8MiB here) sits below "
        "mem_available_kill (2147483648B, 2.0GiB here) on this machine's memory total of 16.0GiB: "
        "the term level must be at or above the kill level"
    ]
    # The same file on a machine big enough, or with the percent on the kill side, passes.
    parse_plan(GUARD.format(term="2GiB", kill="1%"), check_system=True)
    monkeypatch.setattr(compile_module, "_scope_totals", lambda _scope: (512 * GIB, 0))
    parse_plan(GUARD.format(term="1%", kill="2GiB"), check_system=True)


def test_mixed_units_are_not_judged_without_the_machine_or_without_swap(monkeypatch: pytest.MonkeyPatch) -> None:
    parse_plan(GUARD.format(term="1%", kill="2GiB"), check_system=False)
    monkeypatch.setattr(compile_module, "_scope_totals", lambda _scope: (16 * GIB, 0))
    text = GUARD.format(term="10%", kill="5%") + 'swap_free_term = "1%"\nswap_free_kill = "1GiB"\n'
    parse_plan(text, check_system=True)


@pytest.mark.parametrize("name", ["nul_in_path", "duration_nan", "size_huge", "nesting_deep"])
def test_the_daemon_start_refuses_what_check_refuses(name: str) -> None:
    # The daemon loads its policy through the checker child (uoomd/policy/isolated.py):
    # a NUL in state_file passed check once, then the daemon exited 70.
    with pytest.raises(PolicyError) as caught:
        load_plan_isolated(str(BAD / f"{name}.toml"))
    assert _messages(caught) == (BAD / f"{name}.expected").read_text().strip().splitlines()


def test_check_warns_of_a_guarded_cgroup_that_does_not_exist_yet_and_exits_0(tmp_path: Path) -> None:
    # A service's cgroup appears when systemd starts it, maybe after uoomd: no error (the
    # daemon waits for it), but a typo guards nothing, so check says so.
    absent = tmp_path / "no-such-cgroup"
    policy = tmp_path / "p.toml"
    policy.write_text(f'[[guard]]\nname = "app"\nscope = "cgroup:{absent}"\n')
    policy.chmod(0o644)
    out, err = io.StringIO(), io.StringIO()
    assert main(["check", str(policy)], out=out, err=err) == ExitCode.OK
    assert err.getvalue() == (
        f"{policy}:3: guard[0].scope: warning: cgroup '{absent}' does not exist yet; the guard waits for it to appear\n"
    )
    absent.mkdir()  # a directory that is not a cgroup is an error, not a wait
    assert main(["check", str(policy)], out=io.StringIO(), err=(err := io.StringIO())) == ExitCode.POLICY
    assert "is not a cgroup directory (no cgroup.procs)" in err.getvalue()
