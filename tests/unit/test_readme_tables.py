"""The README's tables say what the code does: its events table names exactly the events the
code logs, and its command table exactly the parser's commands and options.

Both directions fail: an event logged but not documented, or documented but never logged; a
command or option the parser has and the table lacks, or the other way round."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from tests import readme
from uoomd import cli

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "uoomd"
LOG_METHODS = frozenset({"debug", "info", "warning", "error"})
EVENT_NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")  # snake_case, as STYLE.md names events


def _is_log_method(func: ast.expr) -> bool:
    """``log.info``, and ``(log.warning if failed else log.info)``."""
    if isinstance(func, ast.Attribute):
        return func.attr in LOG_METHODS
    if isinstance(func, ast.IfExp):
        return _is_log_method(func.body) and _is_log_method(func.orelse)
    return False


def logged_events(package: Path = PACKAGE) -> dict[str, list[str]]:
    """Every event name the code can log, with where: a string literal as the first argument
    of a logger method, or passed as ``event=`` (a decision Record, the rate-limited
    ``_log_error``, the warm ranking's ``on_error``), which the daemon logs by that name."""
    found: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            names: list[ast.expr] = []
            if _is_log_method(node.func) and node.args:
                names.append(node.args[0])
            names += [kw.value for kw in node.keywords if kw.arg == "event"]
            for name in names:
                if isinstance(name, ast.Constant) and isinstance(name.value, str) and EVENT_NAME.fullmatch(name.value):
                    found.setdefault(name.value, []).append(f"{path.relative_to(package.parent)}:{node.lineno}")
    return found


def documented_events() -> set[str]:
    rows = readme.table(readme.section(readme.README.read_text(), "Reading the logs"), "event")
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row[0])}


def test_the_event_scan_finds_the_events_it_should(tmp_path: Path) -> None:
    # The scan itself: a logger call, an IfExp of two, a Record's event=, and no message.
    (tmp_path / "probe.py").write_text(
        "log.info('started', pid=1)\n"
        "(log.warning if bad else log.info)('action_result')\n"
        "Record(event='victim_chosen')\n"
        "parser.error('--top must be at least 1')\n"
        "print('not_an_event')\n"
    )
    assert set(logged_events(tmp_path)) == {"started", "action_result", "victim_chosen"}


def test_every_logged_event_is_in_the_readme_and_every_documented_one_is_logged() -> None:
    logged = logged_events()
    documented = documented_events()
    undocumented = {name: where for name, where in logged.items() if name not in documented}
    assert undocumented == {}, "add these to the README's events table (Reading the logs)"
    assert documented - set(logged) == set(), "the README documents events no code logs"
    assert len(logged) >= 20  # the scan sees the daemon's events at all


# --- the command table ---------------------------------------------------------------------


def _parser_commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subparsers) == 1
    return dict(subparsers[0].choices)


def _visible(command: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in command._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _parser_usage(command: argparse.ArgumentParser) -> dict[str, tuple[bool, bool]]:
    """Each visible argument: its name (``--json``, or a positional's dest) -> (optional, takes a value)."""
    usage: dict[str, tuple[bool, bool]] = {}
    for action in _visible(command):
        if action.option_strings:
            name = max(action.option_strings, key=len)
            usage[name] = (not action.required, action.nargs != 0)
        else:
            usage[action.dest] = (action.nargs in ("?", "*"), True)
    return usage


def _readme_usage(synopsis: str) -> tuple[str, dict[str, tuple[bool, bool]]]:
    """``uoomd explain PID [--policy F] [--guard G]`` -> ("explain", {"pid": (False, True),
    "--policy": (True, True), "--guard": (True, True)})."""
    words = synopsis.strip("`").split()
    assert words[0] == "uoomd", synopsis
    usage: dict[str, tuple[bool, bool]] = {}
    for group in re.findall(r"\[[^\]]*\]|[^\s\[\]]+", " ".join(words[2:])):
        optional = group.startswith("[")
        parts = group.strip("[]").split()
        if parts[0].startswith("--"):
            usage[parts[0]] = (optional, len(parts) > 1)
        else:
            assert len(parts) == 1, group
            usage[parts[0].lower()] = (optional, True)
    return words[1], usage


def readme_commands() -> dict[str, dict[str, tuple[bool, bool]]]:
    rows = readme.table(readme.section(readme.README.read_text(), "Commands"), "command")
    return dict(_readme_usage(row[0]) for row in rows)


def test_the_readme_command_table_is_the_parser() -> None:
    ours = readme_commands()
    parsers = _parser_commands()
    assert sorted(ours) == sorted(parsers)
    for name, command in parsers.items():
        assert ours[name] == _parser_usage(command), f"uoomd {name}: the README's row differs from the parser"


def test_the_synopsis_reader_reads_options_values_and_positionals() -> None:
    assert _readme_usage("`uoomd explain PID [--policy F] [--guard G] [--json]`") == (
        "explain",
        {"pid": (False, True), "--policy": (True, True), "--guard": (True, True), "--json": (True, False)},
    )
    assert _readme_usage("`uoomd check [FILE]`") == ("check", {"file": (True, True)})
