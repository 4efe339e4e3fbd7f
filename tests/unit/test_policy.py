"""The policy loader: shipped policies load; every kind of mistake names its key and line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uoomd.errors import PolicyError
from uoomd.plan import Amount, PsiAction, ScopeKind, VictimKind
from uoomd.policy.load import load_plan, parse_plan
from uoomd.policy.locate import locate_lines

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
BAD = ROOT / "tests" / "fixtures" / "bad_policies"
SHIPPED = [ROOT / "etc" / "uoomd.toml", *sorted((ROOT / "policies").glob("*.toml"))]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_policy_loads(path: Path) -> None:
    plan = load_plan(str(path))
    assert plan.guards
    assert plan.source == str(path)


def test_shipped_policies_cover_the_three_uses() -> None:
    names = {p.name for p in SHIPPED}
    assert {"uoomd.toml", "desktop.toml", "server.toml", "audit.toml"} <= names
    assert load_plan(str(ROOT / "policies" / "audit.toml")).daemon.dry_run


@pytest.mark.parametrize("bad", sorted(BAD.glob("*.toml")), ids=lambda p: p.stem)
def test_bad_policy_gives_the_expected_message(bad: Path) -> None:
    expected = bad.with_suffix(".expected").read_text().strip()
    with pytest.raises(PolicyError) as caught:
        load_plan(str(bad))
    assert caught.value.file == str(bad)
    got = "\n".join(issue.render("bad.toml") for issue in caught.value.issues)
    assert got == expected
    # The rendered error names the real file first, compiler-style.
    assert caught.value.render().startswith(f"{bad}")


def test_defaults_are_filled_in() -> None:
    plan = parse_plan('[[guard]]\nname = "system"\n')
    guard = plan.guards[0]
    assert guard.scope.kind is ScopeKind.SYSTEM
    assert guard.mem_available_term == Amount(fraction=0.05)
    assert guard.mem_available_kill == Amount(fraction=0.025)
    assert guard.victim is VictimKind.PROCESS
    assert plan.escalation.term_timeout_s == 5.0
    assert plan.escalation.kill_timeout_s == 3.0
    assert plan.daemon.poll_min_s == pytest.approx(0.02)
    assert plan.daemon.dry_run is False


def test_interface_keys_from_the_issue_compile() -> None:
    text = """
[daemon]
dry_run = false
poll_min = "20ms"
poll_max = "1s"
log_format = "auto"
[escalation]
term_timeout = "5s"
kill_timeout = "3s"
max_kills_per_minute = 10
[[guard]]
name = "system"
scope = "system"
mem_available_term = "5%"
mem_available_kill = "512MiB"
swap_free_term = "10%"
swap_free_kill = "5%"
victim = "process-group"
min_badness = 100
ignore_positive_adj = true
psi_mem_gate = "100%"
  [[guard.psi]]
  kind = "some"
  stall = "150ms"
  window = "2s"
  sustain = "4s"
  action = "kill"
[[rule]]
match = { name = "^(sshd|systemd)$" }
protect = true
[[rule]]
name = "tabs"
match = { cmdline = "--type=renderer", user = "alice", uid = 1000 }
adjust = 300
guards = ["system"]
[hooks]
after_kill = ["/bin/true", "-t", "uoomd"]
"""
    plan = parse_plan(text)
    guard = plan.guards[0]
    assert guard.mem_available_kill == Amount(bytes=512 * 1024**2)
    assert guard.victim is VictimKind.PROCESS_GROUP
    assert guard.psi[0].stall_us == 150_000
    assert guard.psi[0].window_us == 2_000_000
    assert guard.psi[0].action is PsiAction.KILL
    assert plan.rules[0].protect
    assert plan.rules[0].label == "rule[0]"
    assert plan.rules[1].label == "tabs"
    assert plan.rules[1].match.cmdline is not None
    assert plan.rules[1].match.cmdline.search("chrome --type=renderer --x")
    assert plan.needed_details() == frozenset({"cmdline", "user"})
    assert plan.hooks.after_kill == ("/bin/true", "-t", "uoomd")


def test_cgroup_scope_that_exists_compiles(tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").write_text("")
    (tmp_path / "memory.current").write_text("0\n")
    plan = parse_plan(f'[[guard]]\nname = "app"\nscope = "cgroup:{tmp_path}/"\n', check_system=True)
    assert plan.guards[0].scope.cgroup_path == str(tmp_path)


def test_directory_without_memory_controller_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").write_text("")
    with pytest.raises(PolicyError, match="no memory controller"):
        parse_plan(f'[[guard]]\nname = "app"\nscope = "cgroup:{tmp_path}"\n', check_system=True)


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file"):
        load_plan(str(tmp_path / "nope.toml"))


def test_binary_garbage_is_a_policy_error(tmp_path: Path) -> None:
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_plan(str(bad))


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks apply when uoomd runs as root")
def test_policy_writable_by_others_is_refused_as_root(tmp_path: Path) -> None:
    path = tmp_path / "open.toml"
    path.write_text('[[guard]]\nname = "system"\n')
    path.chmod(0o666)
    with pytest.raises(PolicyError, match="writable by others"):
        load_plan(str(path))
    path.chmod(0o644)
    assert load_plan(str(path)).guards


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks apply when uoomd runs as root")
def test_policy_owned_by_another_user_is_refused_as_root(tmp_path: Path) -> None:
    path = tmp_path / "theirs.toml"
    path.write_text('[[guard]]\nname = "system"\n')
    os.chown(path, 65534, 65534)
    with pytest.raises(PolicyError, match="owned by uid 65534"):
        load_plan(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_locator_tracks_nested_arrays_of_tables() -> None:
    text = (
        '[[guard]]\nname = "a"\n  [[guard.psi]]\n  kind = "full"\n'
        '[[guard]]\nname = "b"\n  [[guard.psi]]\n  kind = "x"\n'
    )
    lines = locate_lines(text)
    assert lines[("guard", 1, "psi", 0, "kind")] == 8
    assert lines[("guard", 0, "psi", 0, "kind")] == 4


# Random documents: anything TOML can hold, under keys a policy might use.
_KEYS = st.sampled_from(
    [
        "daemon",
        "guard",
        "rule",
        "hooks",
        "escalation",
        "name",
        "scope",
        "match",
        "protect",
        "adjust",
        "psi",
        "mem_available_term",
        "kind",
        "stall",
        "window",
        "dry_run",
        "poll_min",
        "after_kill",
        "x",
    ]
)
_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["5%", "512MiB", "2s", "200ms", "system", "cgroup:/x", "^a$", "(", "full", "-1%"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=12,
)


def _to_toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_to_toml(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{k} = {_to_toml(v)}" for k, v in value.items()) + "}"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=5))
def test_random_documents_load_or_raise_policy_error(doc: dict[str, object]) -> None:
    text = "\n".join(f"{k} = {_to_toml(v)}" for k, v in doc.items())
    try:
        parse_plan(text, "random.toml")
    except PolicyError as exc:
        assert exc.issues
        assert all(i.message for i in exc.issues)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_loads_or_raises_policy_error(text: str) -> None:
    try:
        parse_plan(text, "random.toml")
    except PolicyError as exc:
        assert exc.render().startswith("random.toml")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(SHIPPED[0].read_text()) - 1), st.characters())
def test_mutated_shipped_policy_loads_or_raises_policy_error(position: int, char: str) -> None:
    text = SHIPPED[0].read_text()
    mutated = text[:position] + char + text[position + 1 :]
    try:
        parse_plan(mutated, "mutated.toml")
    except PolicyError as exc:
        assert exc.issues


def test_a_cgroup_victim_makes_the_scan_read_each_process_cgroup() -> None:
    plan = parse_plan('[[guard]]\nname = "system"\nvictim = "cgroup"\n')
    assert plan.needed_details() == frozenset({"cgroup"})
    assert parse_plan('[[guard]]\nname = "system"\n').needed_details() == frozenset()


@pytest.mark.skipif(os.geteuid() != 0, reason="hook ownership is checked when uoomd runs as root")
def test_a_hook_program_others_can_write_is_refused_as_root(tmp_path: Path) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o777)
    text = f'[[guard]]\nname = "system"\n[hooks]\nafter_kill = ["{hook}"]\n'
    with pytest.raises(PolicyError, match="writable by others"):
        parse_plan(text, check_system=True)
    hook.chmod(0o755)
    assert parse_plan(text, check_system=True).hooks.after_kill == (str(hook),)
    os.chown(hook, 65534, 65534)
    with pytest.raises(PolicyError, match="owned by uid 65534"):
        parse_plan(text, check_system=True)
