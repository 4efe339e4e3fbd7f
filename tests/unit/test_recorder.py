"""The recorder's promises that need no machine: it cannot signal, and it lists what any policy could choose."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.builders import make_guard, make_plan, make_process, make_rule, make_snapshot
from uoomd.recorder import TOP, finalists
from uoomd.scoring import Candidate, rank

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "uoomd"
# What signals a victim, opens its pidfd or runs a hook: never reachable from the recorder. (The
# policy checker child that `uoomd record` starts, uoomd/policy/isolated.py, is its own child.)
ACTING = {"uoomd.executor", "uoomd.kill", "uoomd.hooks", "uoomd.desktop", "uoomd.daemon"}


def _uoomd_imports(module: str) -> set[str]:
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    if not path.exists():
        path = PACKAGE.joinpath(*module.split(".")[1:], "__init__.py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("uoomd"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if PACKAGE.joinpath(a.name + ".py").exists()}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("uoomd")}
    return {m for m in found if PACKAGE.joinpath(*m.split(".")[1:]).with_suffix(".py").exists() or m == "uoomd"}


def closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen or current == "uoomd":
            continue
        seen.add(current)
        todo += sorted(_uoomd_imports(current))
    return seen


@pytest.mark.parametrize("module", ["uoomd.recorder", "uoomd.replay", "uoomd.tracecmd"])
def test_nothing_the_recorder_or_the_replay_imports_can_send_a_signal(module: str) -> None:
    reached = closure(module)
    assert "uoomd.sources.watch" in reached or module != "uoomd.recorder"  # the walk does follow imports
    assert reached & ACTING == set()


def test_finalists_are_the_policys_best_then_the_kernels_own_picks() -> None:
    # The policy protects the biggest process and prefers a small one: a replay under a policy
    # without those rules must still find the big ones in the trace.
    processes = [
        make_process(10 + i, name=f"p{i}", rss_anon_bytes=(100 - i) << 20, mm_rss_pages=None) for i in range(12)
    ]
    processes[11] = make_process(21, name="small", rss_anon_bytes=1 << 20, mm_rss_pages=None)
    plan = make_plan(make_rule(0, protect=True, name="^p0$"), make_rule(1, adjust=900, name="^small$"))
    guard = plan.guards[0]
    ranking = rank(make_snapshot(*processes), plan, guard, totalpages=1_000_000)
    chosen = finalists(ranking)
    names = [r.process.name for r in chosen]
    assert names[0] == "small"  # the policy's best first
    assert names[:TOP] == [c.process.name for c in ranking.candidates[:TOP]]
    assert "p0" in names  # protected by this policy's rule: another policy may choose it
    assert not isinstance(chosen[names.index("p0")], Candidate)
    assert len(names) == len(set(names)) <= 2 * TOP


def test_finalists_leave_out_what_no_policy_may_choose() -> None:
    kthread = make_process(2, name="kworker", kthread=True, rss_anon_bytes=1 << 30)
    plan = make_plan(guards=(make_guard(),))
    ranking = rank(make_snapshot(kthread, make_process(50, rss_anon_bytes=1 << 20)), plan, plan.guards[0], totalpages=1)
    assert [r.process.name for r in finalists(ranking)] == ["proc50"]
