"""The memory sources on the real machine: /proc/meminfo and a memory cgroup made for the test."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.cgroups import scratch_cgroup
from uoomd.plan import Scope, ScopeKind
from uoomd.sources.cgroup import (
    CgroupError,
    CgroupMemoryReader,
    cgroup_exists,
    pressure_path_for,
    read_members,
    read_oom_kill_count,
    supports_kill,
)
from uoomd.sources.meminfo import MeminfoReader, parse_meminfo

pytestmark = pytest.mark.integration

MIB = 1 << 20

# Allocates and touches argv[1] MiB of anonymous memory, says "ready", waits for a line.
_ALLOCATE = """
import sys
block = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
print("ready", flush=True)
sys.stdin.readline()
"""


def _machine() -> tuple[int, int]:
    with MeminfoReader() as reader:
        reading = reader.read()
    return reading.total_bytes, reading.swap_total_bytes


def test_real_meminfo_agrees_with_sysconf() -> None:
    with MeminfoReader() as reader:
        first = reader.read()
        second = reader.read()  # the same fd, read again
    assert first.total_bytes == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < first.available_bytes <= first.total_bytes
    assert second.total_bytes == first.total_bytes
    with open("/proc/meminfo") as f:
        assert parse_meminfo(f.read()).total_bytes == first.total_bytes


def test_cgroup_usage_grows_and_available_shrinks_when_a_child_allocates() -> None:
    machine_total, machine_swap = _machine()
    with (
        scratch_cgroup(limit_bytes=256 * MIB) as cg,
        CgroupMemoryReader(cg.memory_path, machine_total, machine_swap) as reader,
    ):
        child = cg.spawn(
            [sys.executable, "-c", _ALLOCATE, "100"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        after = reader.read()
        assert after.total_bytes == 256 * MIB
        assert after.swap_total_bytes == 0  # memsw limit = memory limit: no swap for it
        # A fresh interpreter alone is well under 100 MiB; with the block it is above.
        assert cg.usage_bytes() >= 100 * MIB
        assert after.available_bytes <= 256 * MIB - 100 * MIB
        assert read_members(cg.memory_path) == frozenset({child.pid})
        assert read_oom_kill_count(cg.memory_path) == 0
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(timeout=10) == 0
        freed = reader.read()
        assert freed.available_bytes >= after.available_bytes + 90 * MIB


def test_baseline_reading_before_allocation_is_near_the_limit() -> None:
    machine_total, machine_swap = _machine()
    with scratch_cgroup(limit_bytes=256 * MIB) as cg:
        with CgroupMemoryReader(cg.memory_path, machine_total, machine_swap) as reader:
            empty = reader.read()
        assert empty.total_bytes == 256 * MIB
        assert empty.available_bytes >= 250 * MIB  # nothing runs in it yet


def test_kernel_oom_kill_in_the_test_cgroup_is_counted() -> None:
    with scratch_cgroup(limit_bytes=64 * MIB) as cg:
        assert read_oom_kill_count(cg.memory_path) == 0
        # 128 MiB in a 64 MiB cgroup without swap: the memcg OOM killer can only pick this child.
        child = cg.spawn([sys.executable, "-c", _ALLOCATE, "128"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert child.wait(timeout=30) == -9
        deadline = time.monotonic() + 5
        while read_oom_kill_count(cg.memory_path) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_oom_kill_count(cg.memory_path) == 1
        assert cg.oom_kill_count() == 1


def test_cgroup_helpers_on_the_live_tree() -> None:
    with scratch_cgroup(limit_bytes=64 * MIB) as cg:
        assert cgroup_exists(cg.memory_path)
        child = cg.spawn(["sleep", "30"])
        assert read_members(cg.memory_path) == frozenset({child.pid})
        if cg.kind == "v1":
            assert not supports_kill(cg.memory_path)
            # A v1 memory cgroup's tasks stall in its v2 twin (same path on the unified mount).
            assert pressure_path_for(Scope(kind=ScopeKind.CGROUP, cgroup_path=cg.memory_path)) == cg.pressure_path
        if cg.pressure_cgroup_path is not None:
            scope = Scope(kind=ScopeKind.CGROUP, cgroup_path=cg.pressure_cgroup_path)
            assert pressure_path_for(scope) == os.path.join(cg.pressure_cgroup_path, "memory.pressure")
            assert read_members(cg.pressure_cgroup_path) == frozenset({child.pid})
        memory_path = cg.memory_path
    assert not cgroup_exists(memory_path)  # cleanup removed it
    assert child.returncode == -9  # and killed the member first


def test_reader_of_a_removed_cgroup_raises_cgroup_error() -> None:
    machine_total, machine_swap = _machine()
    with scratch_cgroup(limit_bytes=64 * MIB) as cg:
        reader = CgroupMemoryReader(cg.memory_path, machine_total, machine_swap)
        assert reader.read().total_bytes == 64 * MIB
    try:
        with pytest.raises(CgroupError, match="removed"):
            reader.read()
    finally:
        reader.close()
