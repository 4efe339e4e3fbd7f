"""The scope's thrash count: /proc/vmstat for the machine, memory.stat for a cgroup (uoomd/thrash.py).

What is counted is the refaults the kernel did not activate. mm/workingset.c
(workingset_refault(), classic LRU) compares each refault's distance with the size of the
working set: a page that would have stayed resident had the lists been balanced otherwise is
activated (workingset_activate_*), and the kernel's own rebalancing ends such a burst; a page
that could not have stayed resident even with all the memory given to the working set is
not. Those are a thrash: the working set no longer fits. Measured in the VM (issue 18, 1 GiB
RAM): a job growing into swap refaulted its hot set at up to 0.5 % of RAM/s for 8-10 s, and
88-99 % of those refaults were activations; a thrash's were 0-7 %.

The multi-gen LRU (/sys/kernel/mm/lru_gen/enabled) counts activations by generation instead
(lru_gen_refault(): a refault of a recently evicted page), which says nothing of whether the
working set fits; there every refault counts, as it does where no activation counter exists
(a v1 cgroup's memory.stat has none). Such a count cannot tell a growing job's burst from a
thrash except by how long it lasts: the reading says so (MemoryReading.refaults_all) and the
gate waits psi_refault_sustain_all. And before Linux 6.5 the multi-gen LRU counted a refault
only when the page came from the oldest generation (Kalesh Singh's "Fix workingset
accounting", 2023): in the VM (6.1) a thrash's workingset_refault_anon fell to 0 after
18-24 s while it went on swapping in 1.5-2 % of RAM a second. So /proc/vmstat's anon part is
its swap-ins there (pswpin + zswpin), which every kernel counts whatever its LRU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from uoomd.sources.seqfile import KeptFile

# Linux >= 5.9 counts anon and file apart (mm/vmstat.c vmstat_text); before, one counter each
# held the file pages alone (anon pages had no shadow entries then).
_REFAULTS = ("workingset_refault_anon", "workingset_refault_file")
_REFAULT = "workingset_refault"
_ACTIVATIONS = ("workingset_activate_anon", "workingset_activate_file")
_ACTIVATION = "workingset_activate"
_SWAPINS = ("pswpin", "zswpin")  # from a swap device (zram too), from zswap's pool (Linux >= 5.19)
_SPLIT = ("workingset_refault", "workingset_activate", *_SWAPINS)  # the lines parse_vmstat_refaults() reads
LRU_GEN_ENABLED = "/sys/kernel/mm/lru_gen/enabled"


def _counter(values: Mapping[str, int], split: tuple[str, ...], single: str, prefix: str) -> int | None:
    parts = [values.get(prefix + key) for key in split]
    if any(v is not None for v in parts):
        return sum(v for v in parts if v is not None)
    return values.get(prefix + single)


def refault_pages(values: Mapping[str, int], prefix: str = "", *, activations: bool = True) -> int | None:
    """Pages refaulted and not activated, from a flat ``key value`` file already parsed; None
    when it has no refault counter. ``prefix`` is ``total_`` for a v1 cgroup's hierarchical
    memory.stat lines; ``activations=False`` (the multi-gen LRU) counts every refault."""
    refaults = _counter(values, _REFAULTS, _REFAULT, prefix)
    if refaults is None or not activations:
        return refaults
    activated = _counter(values, _ACTIVATIONS, _ACTIVATION, prefix) or 0
    # Every activation follows a refault; a read that sums per-CPU counters apart may not.
    return max(0, refaults - activated)


def has_activation_counters(values: Mapping[str, int], prefix: str = "") -> bool:
    """Whether refault_pages() could subtract activations here (a v1 cgroup's memory.stat: no)."""
    return any(prefix + key in values for key in (*_ACTIVATIONS, _ACTIVATION))


def parse_vmstat_refaults(text: str, *, activations: bool = True) -> int | None:
    """refault_pages() of /proc/vmstat text; only the workingset and swap-in lines are split
    (~190 lines). ``activations=False`` (the multi-gen LRU): the anon part is the swap-ins."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(_SPLIT):
            key, _, value = line.partition(" ")
            try:
                values[key] = int(value)
            except ValueError:
                continue  # a line we cannot read counts as absent: the gate then stays open
    if not activations:
        swapins = [values[key] for key in _SWAPINS if key in values]
        file_refaults = values.get("workingset_refault_file")
        if swapins and file_refaults is not None:
            return sum(swapins) + file_refaults
    return refault_pages(values, activations=activations)


def parse_lru_gen_enabled(text: str) -> bool:
    """Whether the multi-gen LRU is on: bit 0 of the hex mask in LRU_GEN_ENABLED (mm/vmscan.c)."""
    try:
        return bool(int(text.strip(), 16) & 1)
    except ValueError:
        return False


def activations_tell_fit(path: str = LRU_GEN_ENABLED) -> bool:
    """Whether the kernel's activation counters mean "this refault fits the working set": the
    classic LRU's, not the multi-gen LRU's. Read once, when a reader opens; no file: classic."""
    try:
        with open(path, "rb") as f:
            return not parse_lru_gen_enabled(f.read(64).decode("ascii", errors="replace"))
    except OSError:
        return True


class VmstatReader(KeptFile):
    """/proc/vmstat kept open; read only for a guard with a refault gate (a pread and ~190 lines)."""

    def __init__(self, proc_root: str = "/proc") -> None:
        super().__init__(os.path.join(proc_root, "vmstat"))
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.activations = activations_tell_fit()

    def refault_bytes(self) -> int | None:
        text = self.read_bytes().decode("ascii", errors="replace")
        pages = parse_vmstat_refaults(text, activations=self.activations)
        return None if pages is None else pages * self.page_size
