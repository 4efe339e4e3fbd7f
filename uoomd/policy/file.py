"""Open a policy file without ever blocking: anything but a regular file is refused at once.

A FIFO at the policy path made open(2) wait for a writer: `uoomd check` hung, and a reload
blinded the daemon's loop until the checker's 30 s timeout (issue 11). A device may act on
open (a tape rewinds, a tty becomes the controlling terminal), so it is never opened at all.
"""

from __future__ import annotations

import os
import stat

from uoomd.errors import PolicyError, PolicyIssue

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def not_regular_issue(mode: int) -> PolicyIssue | None:
    """The issue for a file of this mode, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), f"mode {stat.S_IFMT(mode):o}")
    return PolicyIssue(key="", message=f"not a regular file ({kind})")


def refuse_not_regular(path: str) -> None:
    """PolicyError at once unless ``path`` is, or links to, a regular file: a stat, no open."""
    _stat_regular(path, nofollow=False)


def open_regular(path: str, *, nofollow: bool) -> tuple[int, os.stat_result]:
    """An fd on the regular file at ``path`` and its fstat; PolicyError for anything else.

    Looked at (stat) before the open so a device is never opened; opened O_NONBLOCK so a
    file swapped for a FIFO between the two cannot block either, then judged by fstat on
    the fd itself. O_NONBLOCK changes nothing for a regular file's reads (read(2))."""
    _stat_regular(path, nofollow=nofollow)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _cannot_open(path, exc) from None
    try:
        info = os.fstat(fd)
        _refuse(path, info.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _stat_regular(path: str, *, nofollow: bool) -> None:
    try:
        info = os.lstat(path) if nofollow else os.stat(path)
    except OSError as exc:
        raise _cannot_open(path, exc) from None
    _refuse(path, info.st_mode)


def _refuse(path: str, mode: int) -> None:
    issue = not_regular_issue(mode)
    if issue is not None:
        raise PolicyError(path, [issue])


def _cannot_open(path: str, exc: OSError) -> PolicyError:
    message = "no such file" if isinstance(exc, FileNotFoundError) else f"cannot open: {exc.strerror}"
    return PolicyError(path, [PolicyIssue(key="", message=message)])
