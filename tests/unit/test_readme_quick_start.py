"""The README's quick start is what CI runs: two one-line blocks, read out of README.md by
tests/readme.py, each an and-list that .ci/run runs command by command in a fresh venv."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from tests import readme

pytestmark = pytest.mark.unit

CI = Path(__file__).resolve().parents[2] / ".ci" / "run"


def test_the_quick_start_installs_into_a_venv_then_runs_a_dry_run_daemon_and_the_tests() -> None:
    install, tests = readme.quick_start(readme.README.read_text())
    # A venv in the command itself: Debian's and Ubuntu's system pip refuse to install.
    assert install[0] == tests[0] == "python3 -m venv .venv"
    assert install[1:] == [".venv/bin/pip install .", ".venv/bin/uoomd run --dry-run"]
    assert tests[1:] == [".venv/bin/pip install -e '.[test]'", ".venv/bin/python -m pytest"]


def test_ci_runs_the_readme_blocks_and_installs_nothing_else() -> None:
    code = [line for line in CI.read_text().splitlines() if not line.lstrip().startswith("#")]
    script = "\n".join(code)
    assert "python3 tests/readme.py quick-start" in script
    assert "readme_commands 1" in script
    assert "readme_commands 2" in script
    assert "pip install" not in script  # every install is the README's
    assert "rm -rf .venv" in script  # a fresh venv, even where one was left


def test_the_command_line_prints_a_block_one_command_a_line() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert readme.main(["quick-start", "2"]) == 0
    assert out.getvalue().splitlines() == readme.quick_start(readme.README.read_text())[1]
    assert readme.main(["quick-start", "9"]) == 1
    assert readme.main(["nonsense"]) == 2


@pytest.mark.parametrize(
    ("line", "commands"),
    [
        ("a && b", ["a", "b"]),
        ("pip install -e '.[test]' && pytest -q", ["pip install -e '.[test]'", "pytest -q"]),
        ("just one", ["just one"]),
    ],
)
def test_an_and_list_splits_into_its_commands(line: str, commands: list[str]) -> None:
    assert readme.split_and_list(line) == commands


@pytest.mark.parametrize("line", ["a; b", "a | b", "a || b", "a && ", "echo '&&' && b", "a 2>&1", "a &"])
def test_anything_but_a_plain_and_list_is_refused(line: str) -> None:
    with pytest.raises(ValueError, match="&&"):
        readme.split_and_list(line)


def test_a_quick_start_block_is_one_line() -> None:
    text = "## Quick start\n\n```sh\na && b\nc\n```\n\n## Next\n"
    with pytest.raises(ValueError, match="one line"):
        readme.quick_start(text)
