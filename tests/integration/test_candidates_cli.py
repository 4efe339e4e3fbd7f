"""`python -m uoomd candidates --json` and `explain` against real children."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.children import start_children, stop_children
from uoomd.errors import ExitCode

pytestmark = pytest.mark.integration

try:
    import uoomd.policy.load  # noqa: F401
except ImportError:  # pragma: no cover - only while policy/ is being written
    pytest.skip("uoomd.policy.load does not exist yet", allow_module_level=True)

SPECS = ((120, 0, "uoomd-c-big"), (60, 1000, "uoomd-c-max"), (40, 0, "uoomd-c-keep"))
POLICY = """
[[guard]]
name = "system"
scope = "system"

[[rule]]
name = "keep"
match = { name = "^uoomd-c-keep$" }
protect = true
"""
REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def children() -> Iterator[dict[str, int]]:
    started = start_children(SPECS)
    try:
        yield {name: child.pid for (_mib, _adj, name), child in zip(SPECS, started, strict=True)}
    finally:
        stop_children(started)


def _uoomd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    return subprocess.run(
        [sys.executable, "-m", "uoomd", *args, "--policy", str(policy)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=60,
        check=False,
    )


def test_candidates_json_ranks_the_adj_1000_child_first(tmp_path: Path, children: dict[str, int]) -> None:
    result = _uoomd(tmp_path, "candidates", "--json", "--all")
    assert result.returncode == ExitCode.OK, result.stderr
    rows = json.loads(result.stdout)
    ours = [r for r in rows if r["pid"] in children.values()]
    ranked = [r for r in rows if not r["protected"]]
    assert ranked[0]["pid"] == children["uoomd-c-max"]
    assert ranked[0]["oom_score"] > 1000
    keep = next(r for r in ours if r["name"] == "uoomd-c-keep")
    assert keep["protected"] is True
    assert keep["reason"] == "protected by rule 'keep'"
    assert keep["rules"] == ["keep"]
    for key in ("pid", "name", "badness", "oom_score", "oom_score_adj", "protected", "rules", "reason"):
        assert key in keep


def test_candidates_json_without_all_lists_candidates_only(tmp_path: Path, children: dict[str, int]) -> None:
    result = _uoomd(tmp_path, "candidates", "--json")
    assert result.returncode == ExitCode.OK, result.stderr
    rows = json.loads(result.stdout)
    assert rows, "the children are candidates"
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert not any(r["protected"] for r in rows), "kernel threads and protected processes only with --all"
    assert children["uoomd-c-keep"] not in {r["pid"] for r in rows}


def test_candidates_table_escapes_and_lists_columns(tmp_path: Path, children: dict[str, int]) -> None:
    result = _uoomd(tmp_path, "candidates", "--top", "3")
    assert result.returncode == ExitCode.OK, result.stderr
    assert "OOM_SCORE" in result.stdout
    assert "uoomd-c-max" in result.stdout
    assert "protected by a rule" in result.stdout


def test_explain_shows_terms_rules_and_picks(tmp_path: Path, children: dict[str, int]) -> None:
    result = _uoomd(tmp_path, "explain", str(children["uoomd-c-keep"]))
    assert result.returncode == ExitCode.OK, result.stderr
    out = result.stdout
    assert "rss pages" in out
    assert "page-table pages" in out
    assert "keep: protect" in out
    assert "uoomd: excluded: protected by rule 'keep'" in out
    assert f"uoomd would pick it: no, it would pick {children['uoomd-c-max']}" in out


def test_explain_of_the_top_child_says_both_would_pick_it(tmp_path: Path, children: dict[str, int]) -> None:
    out = _uoomd(tmp_path, "explain", str(children["uoomd-c-max"])).stdout
    assert "uoomd would pick it: yes" in out
    # adj 1000 outweighs the 120 MiB child at adj 0 for the kernel too.
    assert "the kernel would pick it: yes" in out


def test_explain_of_a_missing_pid_exits_not_found(tmp_path: Path) -> None:
    result = _uoomd(tmp_path, "explain", "4194304")  # above pid_max's ceiling: never a PID
    assert (result.returncode, result.stdout) == (ExitCode.NOT_FOUND, "")
    assert result.stderr == "uoomd: no process 4194304\n"
