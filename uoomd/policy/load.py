"""Read a policy file and turn it into a Plan, or one PolicyError listing every mistake with its line."""

from __future__ import annotations

import difflib
import os
import re
import reprlib
import stat
import tomllib
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from uoomd.errors import PolicyError, PolicyIssue
from uoomd.plan import GuardPlan, Plan
from uoomd.policy.compile import compile_policy
from uoomd.policy.file import open_regular
from uoomd.policy.identity import identity_warnings
from uoomd.policy.locate import KeyPath, find_line, format_path, locate_lines
from uoomd.policy.model import PolicyModel
from uoomd.trust import untrusted_reason

# Shipped policies are 2-4 KiB; the cap keeps `uoomd check` of any file within a second.
MAX_POLICY_BYTES = 256 * 1024
# Deeper than any policy needs (they nest 3 levels): the line locator for a RecursionError.
_DEEP_NESTING = 64
_TOML_LINE_RE = re.compile(r"\(at line (\d+), column (\d+)\)")
# pydantic appends the tag of the union member or validator to a field's location
# ("mem_available_term.str", "...function-after[...]"): not keys the user wrote.
_TAG_RE = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-.*|literal\[.*\]|union\[.*\])$")


def load_plan(path: str, *, check_system: bool = True) -> Plan:
    """Load, validate and compile. check_system also checks what depends on this machine
    (cgroup scopes that exist are memory cgroups, hook programs exist, file ownership when running as root)."""
    text = _read_text(path, check_owner=check_system)
    return parse_plan(text, path, check_system=check_system)


def check_plan(path: str, *, check_system: bool = True) -> tuple[Plan, tuple[PolicyIssue, ...]]:
    """load_plan(), plus the warnings `uoomd check` prints: what loads but shields less
    than it seems to (a rule that protects by name alone: uoomd/policy/identity.py)."""
    text = _read_text(path, check_owner=check_system)
    plan = parse_plan(text, path, check_system=check_system)
    return plan, plan_warnings(plan, text, check_system=check_system)


def plan_warnings(plan: Plan, text: str, *, check_system: bool = False) -> tuple[PolicyIssue, ...]:
    """The warnings for a plan parsed from ``text``, located like errors; check_system adds
    what depends on this machine (a guarded cgroup that does not exist yet)."""
    found = identity_warnings(plan.rules) + (absent_scope_warnings(plan.guards) if check_system else [])
    if not found:
        return ()
    lines = locate_lines(text)
    return tuple(PolicyIssue(key=format_path(p), message=m, line=find_line(lines, p)) for p, m in found)


def absent_scope_warnings(guards: Iterable[GuardPlan]) -> list[tuple[KeyPath, str]]:
    """One warning per guard whose cgroup does not exist now: it is guarded once it appears,
    and a typo would guard nothing, so say it (the daemon logs scope_gone for it too)."""
    return [
        (
            ("guard", index, "scope"),
            f"warning: cgroup {guard.scope.cgroup_path!r} does not exist yet; the guard waits for it to appear",
        )
        for index, guard in enumerate(guards)
        if guard.scope.cgroup_path is not None and not os.path.lexists(guard.scope.cgroup_path)
    ]


def parse_plan(text: str, path: str = "<policy>", *, check_system: bool = False) -> Plan:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_LINE_RE.search(message)
        line = int(match.group(1)) if match else None
        message = _TOML_LINE_RE.sub("", message).strip()
        raise PolicyError(path, [PolicyIssue(key="", message=f"TOML syntax: {message}", line=line)]) from None
    except RecursionError:
        # tomllib recurses once per nested array or inline table: 1,000 deep raised
        # RecursionError, an internal error (issue 12).
        message = "TOML syntax: arrays or inline tables nested too deep"
        raise PolicyError(path, [PolicyIssue(key="", message=message, line=_deep_line(text))]) from None
    lines = locate_lines(text)
    try:
        model = PolicyModel.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(path, _issues_from_validation(exc, data, lines)) from None
    issues, plan = compile_policy(model, source=path, check_system=check_system)
    if issues:
        located = [PolicyIssue(key=format_path(p), message=m, line=find_line(lines, p)) for p, m in issues]
        raise PolicyError(path, located)
    assert plan is not None
    return plan


def _deep_line(text: str) -> int | None:
    """The first line where brackets and braces open deeper than any policy nests (a linear scan
    that ignores quoting: it only points at the line, tomllib has already refused the file)."""
    depth = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        for char in raw:
            depth += (char in "[{") - (char in "]}")
            if depth > _DEEP_NESTING:
                return lineno
    return None


def _read_text(path: str, *, check_owner: bool) -> str:
    as_root = check_owner and os.geteuid() == 0
    # Never a blocking open: a FIFO here hung `uoomd check` and the reload's checker (issue 11).
    fd, info = open_regular(path, nofollow=as_root)
    try:
        if as_root:
            _check_owner(path, info)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            # Bounded: a 50 MB policy took 101 s and 3 GB of RSS (issue 12). One byte more
            # than the cap tells "too big" from "exactly the cap" without trusting st_size,
            # which /proc files report as 0.
            raw = handle.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        # /proc/self/mem is a regular file whose read(2) fails with EIO.
        raise PolicyError(path, [PolicyIssue(key="", message=f"cannot read: {exc.strerror or exc}")]) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(
            path,
            [
                PolicyIssue(
                    key="", message=f"refused: larger than {MAX_POLICY_BYTES // 1024} KiB (a policy is a few KiB)"
                )
            ],
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            path, [PolicyIssue(key="", message=f"not UTF-8 text: {exc.reason} at byte {exc.start}")]
        ) from None


def _check_owner(path: str, info: os.stat_result) -> None:
    # A root daemon's policy decides what gets killed and which programs run as root:
    # anyone who can write it owns the machine (like sshd's StrictModes).
    if info.st_uid != 0:
        raise PolicyError(path, [PolicyIssue(key="", message=f"refused: owned by uid {info.st_uid}, not root")])
    if info.st_mode & stat.S_IWOTH or (info.st_mode & stat.S_IWGRP and info.st_gid != 0):
        raise PolicyError(
            path,
            [
                PolicyIssue(
                    key="",
                    message=f"refused: writable by others (mode {stat.S_IMODE(info.st_mode):o}); chmod go-w",
                )
            ],
        )
    # A directory above it that another user owns or can write lets them swap the file (issue 12).
    reason = untrusted_reason(path)
    if reason:
        message = f"refused: {reason}; the policy and every directory above it must be root's alone"
        raise PolicyError(path, [PolicyIssue(key="", message=message)])


def _issues_from_validation(exc: ValidationError, data: dict[str, Any], lines: dict[KeyPath, int]) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    seen: set[tuple[str, str]] = set()
    for error in exc.errors(include_url=False):
        path: KeyPath = tuple(p for p in error["loc"] if not (isinstance(p, str) and _TAG_RE.match(p)))
        message = _message(error, path)
        key = format_path(path)
        if (key, message) in seen:
            continue
        seen.add((key, message))
        issues.append(PolicyIssue(key=key, message=message, line=find_line(lines, path)))
    issues.sort(key=lambda i: (i.line or 0, i.key))
    return issues


def _message(error: Any, path: KeyPath) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        siblings = _fields_at(path[:-1])
        hint = difflib.get_close_matches(str(path[-1]), siblings, n=1, cutoff=0.6)
        known = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(siblings)})"
        return f"unknown key{known}"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind in {"literal_error", "enum"}:
        return f"{message}, got {error.get('input')!r}"
    if kind == "bool_type":
        # Strict: `protect = "yes"` and `protect = 1` were once taken as true (issue 12).
        return f"expected true or false, got {_short(error.get('input'))}"
    if kind.endswith("_type"):
        return f"{message}, got {_short(error.get('input'))}"
    return message


def _short(value: Any) -> str:
    # An input may be a 100 KB string or an array nested 500 deep: name its start only.
    text = reprlib.repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _fields_at(path: KeyPath) -> list[str]:
    model: type[BaseModel] = PolicyModel
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        inner = _model_of(field.annotation)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
