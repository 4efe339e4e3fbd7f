"""User-facing failures and the exit-code table: one exception and one code per class."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar


class ExitCode(IntEnum):
    """Exit codes of the ``uoomd`` command; pinned by tests/unit/test_cli.py and the README."""

    OK = 0
    POLICY = 1  # the policy file is missing, unreadable or invalid
    USAGE = 2  # bad command line (argparse's own code)
    SETUP = 3  # the machine cannot run this policy (no /proc, scope gone, no permission)
    NOT_FOUND = 4  # `explain PID`: no such process
    NOT_RUNNING = 5  # `status`, `reload`: the daemon that wrote the state file is not running
    NO_ANSWER = 6  # `reload`: the daemon gave no answer within --timeout
    INTERNAL = 70  # a bug: EX_SOFTWARE


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One mistake in a policy file, located by key path and, where known, line."""

    key: str
    message: str
    line: int | None = None

    def render(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line is not None else file
        key = f"{self.key}: " if self.key else ""
        return f"{where}: {key}{self.message}"


class PolicyError(Exception):
    """A policy file could not be loaded; carries every issue found, compiler-style."""

    def __init__(self, file: str, issues: list[PolicyIssue]) -> None:
        self.file = file
        self.issues = tuple(issues)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(issue.render(self.file) for issue in self.issues)


class SetupError(Exception):
    """The machine cannot do what was asked; ``hint`` says what the user can do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} (hint: {hint})")


class CommandError(Exception):
    """A command could not do what was asked, for a reason the user can act on; each subclass
    is one class of failure with its own exit code (the CLI prints ``uoomd: message``)."""

    exit_code: ClassVar[ExitCode]

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} (hint: {hint})")


class UsageError(CommandError):
    """The command line names something that is not there (a guard the policy lacks)."""

    exit_code = ExitCode.USAGE


class NoSuchProcessError(CommandError):
    """`explain PID`: no such process."""

    exit_code = ExitCode.NOT_FOUND


class NotRunningError(CommandError):
    """The daemon the state file names is gone (its PID exited, or now belongs to another process)."""

    exit_code = ExitCode.NOT_RUNNING


class NoAnswerError(CommandError):
    """`reload`: the daemon did not report the outcome of a reload within the timeout."""

    exit_code = ExitCode.NO_ANSWER
