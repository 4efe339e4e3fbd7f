"""A throwaway memory cgroup for tests: create with a limit, run children inside, read OOM kills, clean up.

Usage (pytest)::

    with scratch_cgroup(limit_bytes=64 << 20) as cg:
        child = cg.spawn([sys.executable, "-c", "..."])
        ...                      # cg.memory_path, cg.pressure_path, cg.oom_kill_count()

Where the memory limit lives: a v2 cgroup when the v2 hierarchy has the memory controller
enabled for children (pure v2 hosts), else a v1 ``memory`` cgroup. Independently, when a
v2 hierarchy is mounted, a v2 cgroup is made too and children join it, because PSI
accounts a task's stalls to its v2 cgroup only (kernel/sched/psi.c task_psi_group()):
that cgroup's memory.pressure is the child's pressure even when the limit is v1.

Cleanup kills only our members: PIDs read from our own uniquely named cgroups, each
signalled through a pidfd opened while it was still listed there, so a recycled PID is
never hit. Then it waits for the cgroups to empty and removes them, also after a failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import pytest

# Joins the cgroups named by its arguments (cgroup.procs paths, up to "--"), then execs
# the command: the child is inside before its first instruction. No shell anywhere.
_LAUNCHER = """
import os, sys
sep = sys.argv.index("--")
for procs in sys.argv[1:sep]:
    fd = os.open(procs, os.O_WRONLY)
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)
os.execvp(sys.argv[sep + 1], sys.argv[sep + 1:])
"""

MemoryKind = Literal["v1", "v2"]
CGROUP_LIMIT_BYTES = 512 << 20  # the `cgroup` fixture's (tests/conftest.py)


class CgroupUnavailable(Exception):
    """No memory cgroup can be created here; the message says why (use it as a skip reason)."""


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) for each cgroup mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _source, super_opts = [*right.split(), "", "", ""][:3]
            if fstype in ("cgroup", "cgroup2"):
                out.append((left.split()[4], fstype, set(super_opts.split(","))))
    return out


def find_v1_memory_root() -> str | None:
    for point, fstype, opts in _mounts():
        if fstype == "cgroup" and "memory" in opts:
            return point
    return None


def find_v2_root() -> str | None:
    for point, fstype, _opts in _mounts():
        if fstype == "cgroup2":
            return point
    return None


def v2_has_memory_controller(v2_root: str) -> bool:
    """True when children of the v2 root get the memory controller (it is in subtree_control)."""
    try:
        with open(os.path.join(v2_root, "cgroup.subtree_control")) as f:
            return "memory" in f.read().split()
    except OSError:
        return False


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _procs(path: str) -> list[int]:
    try:
        return [int(tok) for tok in _read(os.path.join(path, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


class ScratchCgroup:
    """A memory cgroup named ``uoomd-test-<random>`` with a hard limit and no swap."""

    def __init__(
        self,
        *,
        limit_bytes: int,
        prefix: str = "uoomd-test",
        v1_root: str | None = None,
        v2_root: str | None = None,
        prefer: MemoryKind | None = None,
        with_pressure: bool = True,
    ) -> None:
        assert "uoomd" in prefix, "test cgroups carry 'uoomd' in their name"
        self.limit_bytes = limit_bytes
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        self._v1_root = v1_root if v1_root is not None else find_v1_memory_root()
        self._v2_root = v2_root if v2_root is not None else find_v2_root()
        self._prefer = prefer
        self._with_pressure = with_pressure
        self.kind: MemoryKind | None = None
        self.memory_path: str = ""
        self.pressure_cgroup_path: str | None = None  # v2 dir whose memory.pressure is the children's PSI
        self._created: list[str] = []
        self._children: list[subprocess.Popen[Any]] = []

    # ---- set-up ----------------------------------------------------------------------

    def create(self) -> Self:
        """Make the cgroup(s); raises CgroupUnavailable with a reason when impossible."""
        reasons: list[str] = []
        order: list[MemoryKind] = ["v2", "v1"]
        if self._prefer == "v1":
            order = ["v1", "v2"]
        try:
            for kind in order:
                reason = self._try_create(kind)
                if reason is None:
                    break
                reasons.append(reason)
            else:
                raise CgroupUnavailable("no memory cgroup can be created: " + "; ".join(reasons))
            if self._with_pressure and self.pressure_cgroup_path is None and self._v2_root is not None:
                path = os.path.join(self._v2_root, self.name)
                try:
                    os.mkdir(path)
                    self._created.append(path)
                    self.pressure_cgroup_path = path
                except OSError:
                    self.pressure_cgroup_path = None  # PSI tests check pressure_path and skip
        except BaseException:
            self.cleanup()
            raise
        return self

    def _try_create(self, kind: MemoryKind) -> str | None:
        if kind == "v2":
            if self._v2_root is None:
                return "no cgroup2 mount"
            if not v2_has_memory_controller(self._v2_root):
                return f"{self._v2_root}: memory controller not in cgroup.subtree_control"
            path = os.path.join(self._v2_root, self.name)
        else:
            if self._v1_root is None:
                return "no cgroup v1 memory mount"
            path = os.path.join(self._v1_root, self.name)
        try:
            os.mkdir(path)
        except OSError as exc:
            return f"mkdir {path}: {exc.strerror}"
        self._created.append(path)
        try:
            self._set_limit(kind, path)
            if kind == "v2":
                self.pressure_cgroup_path = path
        except OSError as exc:
            os.rmdir(path)
            self._created.remove(path)
            return f"cannot set a limit on {path}: {exc.strerror}"
        self.kind = kind
        self.memory_path = path
        return None

    def _set_limit(self, kind: MemoryKind, path: str) -> None:
        if kind == "v2":
            _write(os.path.join(path, "memory.max"), str(self.limit_bytes))
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                _write(os.path.join(path, "memory.swap.max"), "0")
        else:
            # The memory limit first: memsw may never be below it (mem_cgroup_resize_max()).
            _write(os.path.join(path, "memory.limit_in_bytes"), str(self.limit_bytes))
            memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                _write(memsw, str(self.limit_bytes))

    # ---- a service restart -------------------------------------------------------------

    def _restart_order(self) -> list[str]:
        """Our cgroups in the order systemd creates a unit's: the v2 (pressure) one, then the
        v1 memory one (cg_create_everywhere(): the unified hierarchy first). It removes them
        in the same order (cg_trim_everywhere())."""
        order = [p for p in (self.pressure_cgroup_path, self.memory_path) if p]
        return list(dict.fromkeys(order))

    def remove(self) -> None:
        """Kill the members and rmdir our cgroups, as stopping a service does; recreate() undoes it."""
        self.kill_members()
        for path in self._restart_order():
            _rmdir_when_empty(path)

    def recreate(self) -> None:
        """mkdir our cgroups again and set the limit again, as starting a service does."""
        assert self.kind is not None, "recreate() after create()"
        for path in self._restart_order():
            os.mkdir(path)
        self._set_limit(self.kind, self.memory_path)

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    # ---- use -------------------------------------------------------------------------

    @property
    def pressure_path(self) -> str | None:
        """The children's memory.pressure (a v2 file), or None where there is none."""
        if self.pressure_cgroup_path is None:
            return None
        path = os.path.join(self.pressure_cgroup_path, "memory.pressure")
        return path if os.path.exists(path) else None

    def procs_files(self) -> list[str]:
        files = [os.path.join(self.memory_path, "cgroup.procs")]
        if self.pressure_cgroup_path is not None and self.pressure_cgroup_path != self.memory_path:
            files.append(os.path.join(self.pressure_cgroup_path, "cgroup.procs"))
        return files

    def spawn(
        self, argv: Sequence[str], *, oom_score_adj: int | None = 1000, join_timeout_s: float = 10.0, **popen: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the cgroup(s) (no shell); returns once it is a member.

        ``oom_score_adj`` is set on the launcher before exec, so the command inherits it:
        a test hog is the kernel's first choice, never someone else's process.
        """
        if not self.memory_path:
            raise RuntimeError("ScratchCgroup.spawn() before create()")
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, *self.procs_files(), "--", *argv]
        preexec = None
        if oom_score_adj is not None:
            adj = str(oom_score_adj)

            def preexec() -> None:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(adj)

        child: subprocess.Popen[Any] = subprocess.Popen(launcher, preexec_fn=preexec, **popen)  # noqa: PLW1509
        self._children.append(child)
        deadline = time.monotonic() + join_timeout_s
        while child.pid not in _procs(self.memory_path):
            if child.poll() is not None:
                raise RuntimeError(f"child exited with {child.returncode} before joining {self.memory_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"child {child.pid} did not join {self.memory_path}")
            time.sleep(0.005)
        return child

    def members(self) -> frozenset[int]:
        """PIDs in our cgroups and their descendants."""
        pids: set[int] = set()
        for root in self._created:
            for dirpath, _dirs, _files in os.walk(root):
                pids.update(_procs(dirpath))
        return frozenset(pids)

    def oom_kill_count(self) -> int:
        """The kernel's OOM kills in the memory cgroup (v1 memory.oom_control, v2 memory.events)."""
        if self.kind == "v2":
            text, name = _read(os.path.join(self.memory_path, "memory.events")), "memory.events"
        else:
            text, name = _read(os.path.join(self.memory_path, "memory.oom_control")), "memory.oom_control"
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise RuntimeError(f"{name} has no oom_kill line")

    def usage_bytes(self) -> int:
        name = "memory.current" if self.kind == "v2" else "memory.usage_in_bytes"
        return int(_read(os.path.join(self.memory_path, name)))

    # ---- tear-down -------------------------------------------------------------------

    def kill_members(self, timeout_s: float = 10.0) -> None:
        """SIGKILL every member (through a pidfd), reap our children, wait until empty."""
        deadline = time.monotonic() + timeout_s
        while True:
            for cgroup in self._created:
                for dirpath, _dirs, _files in os.walk(cgroup):
                    for pid in _procs(dirpath):
                        self._kill_member(pid, dirpath)
            for child in self._children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=0.05)
            if not self.members():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"members of {self.name} survived SIGKILL: {sorted(self.members())}")
            time.sleep(0.02)

    @staticmethod
    def _kill_member(pid: int, cgroup_dir: str) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            # The pidfd pins this process: re-check it is still ours before signalling.
            if pid in _procs(cgroup_dir):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)

    def cleanup(self) -> None:
        """Kill our members, then remove our cgroups (deepest first). Safe to call twice."""
        errors: list[str] = []
        try:
            self.kill_members()
        except RuntimeError as exc:
            errors.append(str(exc))
        for child in self._children:
            if child.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=5)
        self._children.clear()
        for cgroup in reversed(self._created):
            subdirs = sorted((d for d, _s, _f in os.walk(cgroup)), key=len, reverse=True)
            for path in subdirs:
                try:
                    _rmdir_when_empty(path)
                except OSError as exc:
                    errors.append(f"rmdir {path}: {exc}")
        self._created.clear()
        if errors:
            raise RuntimeError("; ".join(errors))


def _rmdir_when_empty(path: str, timeout_s: float = 1.0) -> None:
    """rmdir, retried while the last member's exit completes (EBUSY); gone is fine."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)  # the last attempt raises what stops it


@contextlib.contextmanager
def scratch_cgroup(*, limit_bytes: int, **kwargs: Any) -> Iterator[ScratchCgroup]:
    """A created ScratchCgroup, or pytest.skip() with the reason none can be made here."""
    cgroup = ScratchCgroup(limit_bytes=limit_bytes, **kwargs)
    try:
        cgroup.create()
    except CgroupUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield cgroup
    finally:
        cgroup.cleanup()


@contextlib.contextmanager
def bare_cgroup(root: Path) -> Iterator[Path]:
    """A cgroup of no limit directly below ``root``, one hierarchy's (v1 memory, or v2 where
    cgroup.kill exists), for a test of how that hierarchy is signalled; the test joins its own
    children and kills them before the cgroup is removed. Skips where ``root`` is not writable."""
    if not (root / "cgroup.procs").is_file() or not os.access(root, os.W_OK):
        pytest.skip(f"{root} is not a writable cgroup hierarchy")
    path = root / f"uoomd-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        _rmdir_when_empty(str(path), timeout_s=10.0)
