"""The README's worked replays ("Was my policy right?") are what `uoomd replay` prints on the shipped traces.

Each ``$ uoomd replay ...`` block there is run as written, from the repository's root, and
its output compared line for line: the example cannot drift from the code."""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest

from tests import readme
from uoomd.cli import main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# "$ uoomd replay ...", its continuation lines (ending in a backslash), then the output up to the fence.
BLOCK = re.compile(r"```\n\$ (uoomd replay (?:[^\n]*\\\n)*[^\n]*)\n(.*?)```", re.DOTALL)


def worked_replays() -> list[tuple[str, str]]:
    section = readme.section(readme.README.read_text(), "Was my policy right?")
    return [(command.replace("\\\n", " "), output) for command, output in BLOCK.findall(section)]


def test_the_readme_shows_two_worked_replays() -> None:
    assert [shlex.split(command)[-1] for command, _ in worked_replays()] == [
        "tests/fixtures/traces/two_hogs_live.toml",
        "tests/fixtures/traces/two_hogs_spare.toml",
    ]


@pytest.mark.parametrize(("command", "output"), worked_replays(), ids=lambda v: v[-40:])
def test_a_worked_replay_prints_what_the_readme_says(
    command: str, output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    argv = shlex.split(command)[1:]
    assert main(argv, out=out) == 0
    assert out.getvalue() == output
