"""What the VM tier sends into the guest stays runnable there, checked on the host without a VM.

The scenarios run under the guest's own python3 (Debian 12, 3.11), outside any venv: they may
import the standard library and each other, nothing else (uoomd is not on that interpreter's
path; it is the thing under test, reached through its command). A boot's run script carries
each scenario's arguments through sh quoted, whatever they hold.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from vm.payload import SCENARIOS, build_payload, build_suite_payload


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.py")), ids=lambda p: p.name)
def test_a_guest_scenario_imports_only_the_stdlib_and_its_siblings(path: Path) -> None:
    siblings = {p.stem for p in SCENARIOS.glob("*.py")}
    foreign = _imports(path) - set(sys.stdlib_module_names) - siblings - {"__future__"}
    assert not foreign, f"{path.name} imports {sorted(foreign)}: the guest's python3 has only the stdlib"


def _run_lines(script: bytes | Path) -> list[str]:
    assert isinstance(script, bytes)
    return script.decode().splitlines()


def test_a_suite_boot_runs_each_scenario_into_its_own_directory_with_its_own_limit() -> None:
    payload = build_suite_payload([("service", (), 420), ("cgroup", ("uoomd",), 300)])
    lines = _run_lines(payload["run"])
    service = next(line for line in lines if "service.py" in line)
    cgroup = next(line for line in lines if "cgroup.py" in line)
    assert service.startswith("timeout --kill-after=5 420 python3 "), service
    assert service.endswith('"$out/service"'), service
    assert cgroup.startswith("timeout --kill-after=5 300 "), cgroup
    assert cgroup.endswith('"$out/cgroup" uoomd'), cgroup
    assert lines.index(service) < lines.index(cgroup)
    assert 'echo $? >"$out/cgroup/rc"' in lines
    assert "scenarios/guestlib.py" in payload
    assert "repo/tests/hogs.py" in payload


def test_a_scenario_argument_reaches_the_scenario_as_one_word(tmp_path: Path) -> None:
    hostile = 'a\'b; touch pwned $(id) "c"'
    run = _run_lines(build_payload("machine", args=("uoomd", hostile))["run"])[-1]
    assert run.startswith("exec python3 ")
    # The same line through a real sh, with python3 swapped for a printer of its argv.
    printer = tmp_path / "python3"
    printer.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    printer.chmod(0o755)
    script = tmp_path / "run"
    script.write_text("#!/bin/sh\n" + run.replace("exec python3", f"exec {printer}") + "\n")
    out = subprocess.run(["sh", str(script), "OUT"], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.splitlines()[-3:] == ["OUT", "uoomd", hostile]
    assert not (tmp_path / "pwned").exists()


def test_a_scenario_runs_once_per_boot_and_must_exist() -> None:
    with pytest.raises(ValueError, match="once per boot"):
        build_suite_payload([("service", (), 60), ("service", (), 60)])
    with pytest.raises(ValueError, match="no scenario"):
        build_payload("../../etc/passwd")
