"""The node_exporter textfile: when to write it (a pure decision) and writing it atomically, never through a symlink.

node_exporter's textfile collector reads every ``*.prom`` file of its directory at each
scrape. The file is written as a temp file in the same directory, then renamed over the
old one: a reader sees the old file or the new one, never half of one. The temp name does
not end in ``.prom``, so the collector never reads a temp file either.

Not fsynced: the rename alone is what a reader needs, and what a crash could leave (an old
or empty file) says nothing worse than the file of a daemon that is gone, which the
heartbeat's mtime shows anyway. The fsync was half the CPU of a write (450 of 830 us on
ext4, best of 200, this machine) and, under memory pressure, a wait on writeback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass

from uoomd.atomicfile import replace_file
from uoomd.metrics.collector import Metrics

FILE_MODE = 0o644  # node_exporter runs as its own user, and the file holds no secret
DEFAULT_INTERVAL_S = 5.0  # Prometheus scrapes every 15-60 s: a fresher file shows nothing more
# Written this often even when nothing changed, and even while a guard acts: the file's
# mtime (node_textfile_mtime_seconds) then says the daemon is alive, and a guard stuck in a
# phase shows in the file at most this late.
DEFAULT_HEARTBEAT_S = 60.0


class TextfileRefused(Exception):
    """The path is not one uoomd writes: a symlink on the way, a target that is not a regular file."""


def write_due(
    now: float, *, last_attempt_at: float, changed: bool, busy: bool, interval_s: float, heartbeat_s: float
) -> bool:
    """Whether to write the file at ``now`` (pure).

    On change, at most every ``interval_s``; unchanged, every ``heartbeat_s``. While ``busy``
    (a guard is acting: its victim must not wait behind a file write, which under memory
    pressure can wait on reclaim and the journal for seconds), only the heartbeat writes."""
    elapsed_s = now - last_attempt_at
    if elapsed_s >= heartbeat_s:
        return True
    return changed and not busy and elapsed_s >= interval_s


def textfile_problem(path: str) -> str | None:
    """What is wrong with ``metrics_file`` as written, before any file is looked at (pure):
    the policy check says it with the line; the writer refuses the same."""
    if "\0" in path:
        return "a path cannot hold a NUL character"
    if not os.path.isabs(path):
        return f"{path!r} is not an absolute path"
    if not os.path.basename(path).endswith(".prom") or os.path.basename(path) == ".prom":
        return f"{path!r}: node_exporter's textfile collector reads only files named *.prom"
    return None


def _open_directory(directory: str) -> int:
    """An fd of ``directory`` reached from / one component at a time, each opened with O_NOFOLLOW.

    A symlink anywhere on the way is refused: root writing where a link points is how another
    user makes it write into /etc (issue 12, the state file). Opening by fd, each step
    relative to the last, leaves no window in which a component can be swapped for a link."""
    if not os.path.isabs(directory):
        raise TextfileRefused(f"{directory!r} is not an absolute path")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    walked = ""
    try:
        for part in [p for p in os.path.normpath(directory).split("/") if p]:
            walked += "/" + part
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                # O_NOFOLLOW on a symlink: ELOOP; O_DIRECTORY on anything else: ENOTDIR.
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise TextfileRefused(f"{walked} is a symlink or not a directory: give the real path") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_textfile(path: str, payload: bytes) -> None:
    """Replace ``path`` with ``payload``, mode 0644, atomically; raises TextfileRefused or OSError.

    The write itself is :func:`uoomd.atomicfile.replace_file` (nothing planted is ever opened,
    rename(2) never follows). A symlink at ``path`` is refused anyway (someone meant it, and the
    daemon would silently undo it)."""
    problem = textfile_problem(path)
    if problem is not None:
        raise TextfileRefused(problem)
    directory, name = os.path.split(os.path.normpath(path))
    dir_fd = _open_directory(directory)
    try:
        try:
            existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and not stat.S_ISREG(existing.st_mode):
            kind = "a symlink" if stat.S_ISLNK(existing.st_mode) else "not a regular file"
            raise TextfileRefused(f"{path} is {kind}")
        replace_file(dir_fd, name, payload, mode=FILE_MODE, exact_mode=True)  # not the daemon's umask
    finally:
        os.close(dir_fd)


def remove_textfile(path: str) -> None:
    """At a clean stop: no file, rather than one that goes on saying the last values
    (``absent(uoomd_build_info)`` then says uoomd is not running). A non-file is left alone."""
    directory, name = os.path.split(os.path.normpath(path))
    with contextlib.suppress(OSError, TextfileRefused):
        dir_fd = _open_directory(directory)
        try:
            if stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)


@dataclass(frozen=True, slots=True)
class WriteFailed:
    """Why a write did not happen; the daemon logs it (rate-limited) and tries again later."""

    path: str
    error: str
    refused: bool  # the path itself is wrong (a symlink, not .prom): a reload must fix it


class TextfileExporter:
    """Writes the daemon's metrics to ``path`` when :func:`write_due` says so."""

    def __init__(
        self, path: str, *, interval_s: float = DEFAULT_INTERVAL_S, heartbeat_s: float = DEFAULT_HEARTBEAT_S
    ) -> None:
        self.path = path
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s
        self._last_attempt_at = float("-inf")
        self._written_generation = -1

    def maybe_write(self, now: float, metrics: Metrics, *, busy: bool) -> WriteFailed | None:
        """At each tick: usually two comparisons; a render and a write when due."""
        changed = metrics.registry.generation != self._written_generation
        due = write_due(
            now,
            last_attempt_at=self._last_attempt_at,
            changed=changed,
            busy=busy,
            interval_s=self.interval_s,
            heartbeat_s=self.heartbeat_s,
        )
        if not due:
            return None
        self._last_attempt_at = now  # a failure is retried at the same pace, not at every tick
        generation = metrics.registry.generation
        try:
            write_textfile(self.path, metrics.exposition())
        except TextfileRefused as exc:
            return WriteFailed(path=self.path, error=str(exc), refused=True)
        except OSError as exc:
            return WriteFailed(path=self.path, error=exc.strerror or str(exc), refused=False)
        self._written_generation = generation
        return None

    def remove(self) -> None:
        """At a clean stop, or when a reload points the metrics elsewhere (:func:`remove_textfile`)."""
        remove_textfile(self.path)
