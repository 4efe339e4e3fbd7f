"""Protection needs an identity: which match keys count, and the warning `uoomd check` gives without one."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from tests.builders import make_rule
from uoomd.cli import main
from uoomd.errors import ExitCode
from uoomd.policy.identity import identities, identity_warnings
from uoomd.policy.load import check_plan

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [ROOT / "etc" / "uoomd.toml", *sorted((ROOT / "policies").glob("*.toml"))]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shielding_rule_of_a_shipped_policy_has_an_identity(path: Path) -> None:
    plan, warnings = check_plan(str(path), check_system=False)
    assert warnings == ()
    shielding = [rule for rule in plan.rules if rule.protect or rule.adjust < 0]
    assert shielding, "a shipped policy protects something"
    for rule in shielding:
        assert identities(rule.match), rule.label


@pytest.mark.parametrize(
    ("match", "protect", "adjust", "warns"),
    [
        ({"name": "^sshd$"}, True, 0, True),
        ({"name": "^sshd$", "exe": "^/usr/sbin/sshd$"}, True, 0, True),  # a user namespace mounts any exe
        ({"cmdline": "postgres"}, True, 0, True),
        ({"name": "^nginx$"}, False, -500, True),  # a discount shields too
        ({"name": "^cc1$"}, False, 200, False),  # a user can only make their own process likelier
        ({"name": "^sshd$", "uid": 0}, True, 0, False),
        ({"name": "^postgres$", "user": "postgres"}, True, 0, False),
        ({"cgroup": "^/system\\.slice/ssh\\.service$"}, True, 0, False),
        ({"cgroup": "\\A/system\\.slice/ssh\\.service\\Z"}, True, 0, False),
        ({"name": "^sshd$", "cgroup": "ssh\\.service"}, True, 0, True),  # unanchored: systemd-run --user --unit=ssh
    ],
)
def test_a_rule_that_shields_by_hints_alone_warns(
    match: dict[str, Any], protect: bool, adjust: int, warns: bool
) -> None:
    rule = make_rule(3, protect=protect, adjust=adjust, **match)
    found = identity_warnings([rule])
    assert bool(found) == warns
    if warns:
        (path, message), *_ = found
        assert path == ("rule", 3)
        assert message.startswith("warning: ")
        assert "uid, user or a cgroup" in message


def test_check_prints_the_warning_with_file_line_and_rule_and_still_exits_0(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(
        '[[guard]]\nname = "system"\n\n'
        '[[rule]]\nname = "ok"\nmatch = { name = "^sshd$", uid = 0 }\nprotect = true\n\n'
        '[[rule]]\nname = "by-name"\nmatch = { name = "^sshd$", exe = "^/usr/sbin/sshd$" }\nprotect = true\n'
    )
    policy.chmod(0o644)
    out, err = io.StringIO(), io.StringIO()
    assert main(["check", str(policy)], out=out, err=err) == ExitCode.OK
    assert err.getvalue() == (
        f"{policy}:9: rule[1]: warning: protect rule 'by-name' matches on name and exe only, which any user can "
        "give their own process; add uid, user or a cgroup anchored at '^/' (docs/SECURITY.md)\n"
    )
    assert out.getvalue().endswith(f"# {policy}: ok\n")
