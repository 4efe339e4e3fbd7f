"""The scope's refault count: /proc/vmstat for the machine, memory.stat for a cgroup (uoomd/thrash.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from uoomd.sources.seqfile import KeptFile

# Linux >= 5.9 counts anon and file refaults apart (mm/vmstat.c vmstat_text); before, one
# counter held the file refaults alone (anon pages had no shadow entries then).
_SPLIT = ("workingset_refault_anon", "workingset_refault_file")
_SINGLE = "workingset_refault"


def refault_pages(values: Mapping[str, int], prefix: str = "") -> int | None:
    """Pages refaulted, from a flat ``key value`` file already parsed; None when it has no such
    counter. ``prefix`` is ``total_`` for a v1 cgroup's hierarchical memory.stat lines."""
    split = [values.get(prefix + key) for key in _SPLIT]
    if any(v is not None for v in split):
        return sum(v for v in split if v is not None)
    return values.get(prefix + _SINGLE)


def parse_vmstat_refaults(text: str) -> int | None:
    """The refault pages of /proc/vmstat text; only the refault lines are split (~190 lines)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("workingset_refault"):
            key, _, value = line.partition(" ")
            try:
                values[key] = int(value)
            except ValueError:
                continue  # a line we cannot read counts as absent: the gate then stays open
    return refault_pages(values)


class VmstatReader(KeptFile):
    """/proc/vmstat kept open; read only for a guard with a refault gate (a pread and ~190 lines)."""

    def __init__(self, proc_root: str = "/proc") -> None:
        super().__init__(os.path.join(proc_root, "vmstat"))
        self.page_size = os.sysconf("SC_PAGE_SIZE")

    def refault_bytes(self) -> int | None:
        pages = parse_vmstat_refaults(self.read_bytes().decode("ascii", errors="replace"))
        return None if pages is None else pages * self.page_size
