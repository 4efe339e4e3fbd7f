"""Whether a path is root's alone: the file or directory and every directory above it.

Root trusts what it reads (the policy), runs (hooks) or writes into (the state file's
directory) only when no other user could have replaced it or anything on its way, like
sshd's StrictModes (issue 12: a symlink in a user's directory made root overwrite a file).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection


def untrusted_reason(path: str, *, owners: Collection[int] = (0,)) -> str | None:
    """Why another user may have a hand in ``path``, or None when it is ``owners``' alone.

    Every component, from ``path`` up to /, both as written and with symlinks resolved, must be
    owned by one of ``owners`` and writable by nobody else (group write counts unless the group
    is root's). A directory strictly above ``path`` may be sticky (/tmp): others can add to it
    but cannot rename or replace what is ours. A symlink as written must itself be ours."""
    absolute = os.path.abspath(path)
    # As written (a symlink must itself be ours; its target is judged by the resolved chain),
    # then with every symlink resolved.
    return _chain_problem(absolute, owners, os.lstat) or _chain_problem(os.path.realpath(absolute), owners, os.stat)


def prepare_directory(directory: str, *, mode: int = 0o755) -> str | None:
    """Why root must not write into ``directory`` (None: go ahead), creating it (with ``mode``)
    when missing, under a parent judged first so root never mkdirs where a user points it.
    The state file's directory (uoomd/statusboard.py) and record_dir (uoomd/tracefile.py)."""
    owners = {0, os.geteuid()}
    if not os.path.lexists(directory):
        existing = os.path.dirname(directory)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        refused = untrusted_reason(existing, owners=owners)
        if refused:
            return refused
        os.makedirs(directory, mode=mode, exist_ok=True)
    # Root writes here: a directory another user owns or can write (even a sticky /tmp) lets
    # them plant a symlink or a file under the name root is about to use (issue 12).
    return untrusted_reason(directory, owners=owners)


def _chain_problem(path: str, owners: Collection[int], stat_of: Callable[[str], os.stat_result]) -> str | None:
    for part in _chain(path):
        try:
            info = stat_of(part)
        except OSError as exc:
            return f"{part}: {exc.strerror}"
        if info.st_uid not in owners:
            return f"{part} is owned by uid {info.st_uid}"
        if stat.S_ISLNK(info.st_mode):
            continue
        problem = _writable_problem(part, info, is_target=part == path)
        if problem:
            return problem
    return None


def _chain(path: str) -> list[str]:
    """``path`` and each directory above it, up to /."""
    parts = [path]
    while (parent := os.path.dirname(parts[-1])) != parts[-1]:
        parts.append(parent)
    return parts


def _writable_problem(part: str, info: os.stat_result, *, is_target: bool) -> str | None:
    writable = info.st_mode & stat.S_IWOTH or (info.st_mode & stat.S_IWGRP and info.st_gid != 0)
    sticky_above = not is_target and stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if writable and not sticky_above:
        return f"{part} is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    return None
