"""Open the memory reader of a guard's scope: /proc/meminfo for the system, the cgroup's files for a cgroup."""

from __future__ import annotations

from uoomd.errors import SetupError
from uoomd.plan import Scope, ScopeKind
from uoomd.readings import MemoryReading
from uoomd.sources import cgroup as cgroup_source
from uoomd.sources.meminfo import MeminfoError, MeminfoReader, read_meminfo_totals

MemoryReader = MeminfoReader | cgroup_source.CgroupMemoryReader


def open_memory_reader(scope: Scope, proc_root: str = "/proc", *, refaults: bool = False) -> MemoryReader:
    """Raises SetupError naming the scope when it cannot be read. ``refaults``: the readings
    carry the refault count (a cgroup's always do: its memory.stat is read anyway)."""
    if scope.kind is ScopeKind.SYSTEM:
        return MeminfoReader(proc_root, refaults=refaults)
    assert scope.cgroup_path is not None
    total_ram, total_swap = read_meminfo_totals(proc_root)
    try:
        return cgroup_source.CgroupMemoryReader(scope.cgroup_path, total_ram, total_swap)
    except (OSError, cgroup_source.CgroupError) as exc:
        raise SetupError(
            f"cannot read cgroup {scope.cgroup_path}: {exc}",
            hint="the scope must be a memory cgroup directory",
        ) from exc


def read_scope_memory(scope: Scope, proc_root: str = "/proc") -> MemoryReading | None:
    """One reading of a scope, or None when it cannot be read now (for reports)."""
    try:
        with open_memory_reader(scope, proc_root) as reader:
            return reader.read()
    except (SetupError, OSError, MeminfoError, cgroup_source.CgroupError):
        return None
