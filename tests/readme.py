"""The parts of README.md that code keeps in step with it: the quick-start commands and the tables.

.ci/run runs the quick start through this module (`python3 tests/readme.py quick-start N`
prints block N's commands, one a line), so CI runs the README's commands as written and
they cannot drift; tests/unit/test_readme_tables.py checks the tables against the code.
Stdlib only: .ci/run calls it with the bare system python3, before any venv exists.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section(text: str, title: str) -> str:
    """The body of the level-2 section ``## title``, up to the next level-2 heading."""
    lines = text.splitlines()
    heading = f"## {title}"
    if heading not in lines:
        raise ValueError(f"README has no {heading!r} section")
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def code_blocks(text: str, lang: str) -> list[str]:
    """The contents of the fenced blocks opened with ```lang, in order."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if current is None:
            if line.strip() == f"```{lang}":
                current = []
        elif line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        else:
            current.append(line)
    if current is not None:
        raise ValueError(f"an unclosed ```{lang} block")
    return blocks


def split_and_list(line: str) -> list[str]:
    """``a && b && c`` -> [a, b, c], each as written (quotes kept, for ``sh -c``).

    Only ``&&`` may join the commands: CI runs them one at a time (the daemon under a
    timeout), which means the same as the line only for an and-list. An ``&&`` inside
    quotes, or any other operator, is refused rather than split wrongly."""
    # posix=False keeps the quotes on a word, so a quoted '&&' is a word, not an operator.
    lexer = shlex.shlex(line, posix=False, punctuation_chars=True)
    operators = [token for token in lexer if token and all(ch in "();<>|&" for ch in token)]
    if any(op != "&&" for op in operators):
        raise ValueError(f"{line!r}: only && may join a quick-start line's commands, found {operators}")
    parts = [part.strip() for part in line.split("&&")]
    if len(parts) != len(operators) + 1 or not all(parts):
        raise ValueError(f"{line!r}: cannot split it on && as the shell would")
    return parts


def quick_start(text: str) -> list[list[str]]:
    """Each ```sh block of the Quick start: one line, an and-list of commands."""
    blocks = code_blocks(section(text, "Quick start"), "sh")
    commands: list[list[str]] = []
    for block in blocks:
        lines = [line for line in block.splitlines() if line.strip()]
        if len(lines) != 1:
            raise ValueError(f"a quick-start block is one line, to paste as it is: {block!r}")
        commands.append(split_and_list(lines[0]))
    return commands


def table(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the first Markdown table whose first header cell is ``first_header``."""
    rows: list[list[str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = _cells(line)
        if cells and cells[0] == first_header and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            for body in lines[i + 2 :]:
                if not body.startswith("|"):
                    break
                rows.append(_cells(body))
            return rows
    raise ValueError(f"no table with first header {first_header!r}")


def _cells(line: str) -> list[str]:
    if not line.startswith("|"):
        return []
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "quick-start" or not argv[1].isdigit():
        sys.stderr.write("usage: python3 tests/readme.py quick-start N  (the Nth block's commands, one a line)\n")
        return 2
    blocks = quick_start(README.read_text())
    number = int(argv[1])
    if not 1 <= number <= len(blocks):
        sys.stderr.write(f"README's Quick start has {len(blocks)} blocks, not {number}\n")
        return 1
    for command in blocks[number - 1]:
        shlex.split(command)  # refuses an unbalanced quote here, not halfway through CI
        sys.stdout.write(command + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
