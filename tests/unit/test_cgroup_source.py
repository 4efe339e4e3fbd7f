"""cgroup memory parsing and arithmetic on fixture trees: v1 captured here, v2 as the kernel writes it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uoomd.plan import Scope, ScopeKind
from uoomd.sources.cgroup import (
    CgroupError,
    CgroupMemoryReader,
    CgroupVersion,
    cgroup_exists,
    compute_cgroup_reading,
    detect_version,
    parse_limit_v1,
    parse_limit_v2,
    parse_memory_stat,
    parse_oom_kill_count_v1,
    parse_oom_kill_count_v2,
    pressure_path_for,
    read_members,
    read_oom_kill_count,
    reclaimable_file_bytes,
    supports_kill,
)

pytestmark = pytest.mark.unit

MIB = 1 << 20
GIB = 1 << 30
MACHINE_TOTAL = 24 * GIB

PAGE = os.sysconf("SC_PAGE_SIZE")

# A v1 memory cgroup captured on the development machine (64 MiB limit, a 20 MiB child);
# file counters edited up (total_*_file) so that reclaimable cache is not zero.
V1_FILES = {
    "cgroup.procs": "14674\n",
    "memory.usage_in_bytes": "28401664\n",
    "memory.limit_in_bytes": "67108864\n",
    "memory.memsw.usage_in_bytes": "28401664\n",
    "memory.memsw.limit_in_bytes": "67108864\n",
    "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    "memory.stat": (
        "cache 4096\nrss 28004352\nrss_huge 0\nshmem 0\nmapped_file 0\ndirty 0\nwriteback 0\n"
        "swap 0\ninactive_anon 27910144\nactive_anon 4096\ninactive_file 0\nactive_file 0\nunevictable 0\n"
        "hierarchical_memory_limit 67108864\nhierarchical_memsw_limit 67108864\n"
        "total_cache 8392704\ntotal_rss 28004352\ntotal_shmem 4194304\ntotal_swap 0\n"
        "total_inactive_anon 27910144\ntotal_active_anon 4096\n"
        "total_inactive_file 3145728\ntotal_active_file 1048576\ntotal_unevictable 0\n"
    ),
}

# What the v1 root shows on this machine when nothing is limited.
V1_UNLIMITED = "9223372036854771712\n"

# A v2 cgroup as Linux 6.x writes it (cgroup-v2.rst; memory.stat abridged).
V2_FILES = {
    "cgroup.procs": "101\n102\n",
    "cgroup.kill": "",
    "memory.current": f"{300 * MIB}\n",
    "memory.max": f"{512 * MIB}\n",
    "memory.swap.current": f"{16 * MIB}\n",
    "memory.swap.max": f"{64 * MIB}\n",
    "memory.pressure": (
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    ),
    "memory.events": "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n",
    "memory.stat": (
        f"anon {200 * MIB}\nfile {90 * MIB}\nkernel 1048576\nshmem {30 * MIB}\n"
        f"inactive_anon {150 * MIB}\nactive_anon {80 * MIB}\n"
        f"inactive_file {40 * MIB}\nactive_file {20 * MIB}\nunevictable 0\n"
        "workingset_refault_file 10\n"
    ),
}


def _tree(root: Path, files: dict[str, str]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return str(root)


def test_v1_captured_cgroup_reads_limit_minus_usage_plus_file_lru(tmp_path: Path) -> None:
    path = _tree(tmp_path / "cg", V1_FILES)
    with CgroupMemoryReader(path, MACHINE_TOTAL, 0) as reader:
        assert reader.version is CgroupVersion.V1
        reading = reader.read()
    assert reading.total_bytes == 64 * MIB
    # 64 MiB - 28401664 + (3 MiB inactive + 1 MiB active file); the 4 MiB shmem is not reclaimable
    assert reading.available_bytes == 64 * MIB - 28401664 + 4 * MIB
    assert reading.swap_total_bytes == 0
    assert reading.swap_free_bytes == 0


def test_v1_unlimited_cgroup_takes_the_machine_total(tmp_path: Path) -> None:
    files = dict(V1_FILES, **{"memory.limit_in_bytes": V1_UNLIMITED, "memory.memsw.limit_in_bytes": V1_UNLIMITED})
    with CgroupMemoryReader(_tree(tmp_path / "cg", files), MACHINE_TOTAL, 2 * GIB) as reader:
        reading = reader.read()
    assert reading.total_bytes == MACHINE_TOTAL
    assert reading.available_bytes == MACHINE_TOTAL - 28401664 + 4 * MIB
    assert reading.swap_total_bytes == 2 * GIB  # memsw unlimited: all of the machine's swap
    assert reading.swap_free_bytes == 2 * GIB


def test_v1_swap_allowance_is_memsw_minus_memory_limit(tmp_path: Path) -> None:
    files = dict(
        V1_FILES,
        **{"memory.memsw.limit_in_bytes": f"{96 * MIB}\n", "memory.memsw.usage_in_bytes": f"{28401664 + 8 * MIB}\n"},
    )
    with CgroupMemoryReader(_tree(tmp_path / "cg", files), MACHINE_TOTAL, 2 * GIB) as reader:
        reading = reader.read()
    assert reading.swap_total_bytes == 32 * MIB
    assert reading.swap_free_bytes == 24 * MIB


def test_v1_without_memsw_files_gets_the_machine_swap(tmp_path: Path) -> None:
    files = {k: v for k, v in V1_FILES.items() if "memsw" not in k}
    with CgroupMemoryReader(_tree(tmp_path / "cg", files), MACHINE_TOTAL, GIB) as reader:
        assert reader.read().swap_total_bytes == GIB


def test_v2_cgroup_reads_limits_swap_and_file_lru(tmp_path: Path) -> None:
    path = _tree(tmp_path / "cg", V2_FILES)
    with CgroupMemoryReader(path, MACHINE_TOTAL, GIB) as reader:
        assert reader.version is CgroupVersion.V2
        reading = reader.read()
    assert reading.total_bytes == 512 * MIB
    assert reading.available_bytes == (512 - 300 + 40 + 20) * MIB  # not "file", which counts shmem
    assert reading.swap_total_bytes == 64 * MIB
    assert reading.swap_free_bytes == 48 * MIB


def test_v2_max_means_the_machine(tmp_path: Path) -> None:
    files = dict(V2_FILES, **{"memory.max": "max\n", "memory.swap.max": "max\n"})
    with CgroupMemoryReader(_tree(tmp_path / "cg", files), MACHINE_TOTAL, GIB) as reader:
        reading = reader.read()
    assert reading.total_bytes == MACHINE_TOTAL
    assert reading.swap_total_bytes == GIB
    assert reading.swap_free_bytes == GIB - 16 * MIB


def test_reader_sees_new_values_on_the_kept_files(tmp_path: Path) -> None:
    path = _tree(tmp_path / "cg", V2_FILES)
    with CgroupMemoryReader(path, MACHINE_TOTAL, GIB) as reader:
        first = reader.read().available_bytes
        (tmp_path / "cg" / "memory.current").write_text(f"{400 * MIB}\n")
        assert reader.read().available_bytes == first - 100 * MIB


def test_a_limit_above_the_machine_is_the_machine() -> None:
    reading = compute_cgroup_reading(
        usage_bytes=GIB,
        limit_bytes=100 * GIB,
        reclaimable_bytes=0,
        swap_usage_bytes=0,
        swap_limit_bytes=0,
        machine_total_bytes=MACHINE_TOTAL,
        machine_swap_total_bytes=0,
    )
    assert reading.total_bytes == MACHINE_TOTAL
    assert reading.available_bytes == MACHINE_TOTAL - GIB


@pytest.mark.parametrize(
    ("usage", "reclaimable", "expected"),
    [(80 * MIB, 0, 0), (10 * MIB, 200 * MIB, 64 * MIB), (64 * MIB, 16 * MIB, 16 * MIB)],
    ids=["over-limit-clamps-to-zero", "cache-never-exceeds-total", "cache-counts"],
)
def test_available_is_clamped_between_zero_and_total(usage: int, reclaimable: int, expected: int) -> None:
    reading = compute_cgroup_reading(
        usage_bytes=usage,
        limit_bytes=64 * MIB,
        reclaimable_bytes=reclaimable,
        swap_usage_bytes=0,
        swap_limit_bytes=0,
        machine_total_bytes=MACHINE_TOTAL,
        machine_swap_total_bytes=0,
    )
    assert reading.available_bytes == expected


def test_swap_allowance_is_capped_by_the_machine_swap() -> None:
    reading = compute_cgroup_reading(
        usage_bytes=0,
        limit_bytes=GIB,
        reclaimable_bytes=0,
        swap_usage_bytes=MIB,
        swap_limit_bytes=8 * GIB,
        machine_total_bytes=MACHINE_TOTAL,
        machine_swap_total_bytes=2 * GIB,
    )
    assert reading.swap_total_bytes == 2 * GIB
    assert reading.swap_free_bytes == 2 * GIB - MIB


def test_limit_parsers_know_unlimited() -> None:
    assert parse_limit_v1(V1_UNLIMITED) is None
    assert parse_limit_v1("67108864\n") == 64 * MIB
    assert parse_limit_v2("max\n") is None
    assert parse_limit_v2("4096\n") == 4096


@pytest.mark.parametrize("text", ["", "lots\n", "-5\n", "12 34\n"])
def test_garbled_limit_is_refused(text: str) -> None:
    with pytest.raises(CgroupError):
        parse_limit_v2(text)


def test_reclaimable_uses_hierarchical_keys_on_v1_and_plain_keys_on_v2() -> None:
    v1 = parse_memory_stat(V1_FILES["memory.stat"])
    v2 = parse_memory_stat(V2_FILES["memory.stat"])
    assert reclaimable_file_bytes(v1, CgroupVersion.V1) == 4 * MIB
    assert reclaimable_file_bytes(v2, CgroupVersion.V2) == 60 * MIB


def test_reclaimable_needs_the_file_lru_keys() -> None:
    with pytest.raises(CgroupError, match="active_file"):
        reclaimable_file_bytes({"inactive_file": 1}, CgroupVersion.V2)


def test_garbled_memory_stat_line_is_refused() -> None:
    with pytest.raises(CgroupError, match=r"memory\.stat"):
        parse_memory_stat("anon 1\nfile\n")


def test_oom_kill_counts_are_read_from_both_versions(tmp_path: Path) -> None:
    assert parse_oom_kill_count_v1(V1_FILES["memory.oom_control"]) == 2
    assert parse_oom_kill_count_v2(V2_FILES["memory.events"]) == 1
    assert read_oom_kill_count(_tree(tmp_path / "v1", V1_FILES)) == 2
    assert read_oom_kill_count(_tree(tmp_path / "v2", V2_FILES)) == 1


def test_old_kernel_without_oom_kill_line_is_an_error() -> None:
    with pytest.raises(CgroupError, match=r"4\.13"):
        parse_oom_kill_count_v1("oom_kill_disable 0\nunder_oom 0\n")


def test_version_detection_and_not_a_memory_cgroup(tmp_path: Path) -> None:
    assert detect_version(_tree(tmp_path / "v1", V1_FILES)) is CgroupVersion.V1
    assert detect_version(_tree(tmp_path / "v2", V2_FILES)) is CgroupVersion.V2
    with pytest.raises(CgroupError, match="subtree_control"):
        detect_version(_tree(tmp_path / "nomem", {"cgroup.procs": ""}))
    with pytest.raises(CgroupError, match="no such cgroup"):
        detect_version(str(tmp_path / "absent"))


def test_members_include_all_descendants(tmp_path: Path) -> None:
    root = _tree(tmp_path / "cg", V2_FILES)
    _tree(tmp_path / "cg" / "a", {"cgroup.procs": "201\n"})
    _tree(tmp_path / "cg" / "a" / "b", {"cgroup.procs": "301\n302\n"})
    _tree(tmp_path / "cg" / "empty", {"cgroup.procs": ""})
    assert read_members(root) == frozenset({101, 102, 201, 301, 302})


def test_exists_and_kill_support(tmp_path: Path) -> None:
    v1 = _tree(tmp_path / "v1", V1_FILES)
    v2 = _tree(tmp_path / "v2", V2_FILES)
    assert cgroup_exists(v1)
    assert cgroup_exists(v2)
    assert not cgroup_exists(str(tmp_path / "absent"))
    assert supports_kill(v2)
    assert not supports_kill(v1)


def test_pressure_paths_per_scope(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "pressure").mkdir(parents=True)
    (proc / "pressure" / "memory").write_text(V2_FILES["memory.pressure"])
    v1 = _tree(tmp_path / "v1", V1_FILES)
    v2 = _tree(tmp_path / "v2", V2_FILES)
    assert pressure_path_for(Scope(kind=ScopeKind.SYSTEM), str(proc)) == str(proc / "pressure" / "memory")
    assert pressure_path_for(Scope(kind=ScopeKind.CGROUP, cgroup_path=v2)) == os.path.join(v2, "memory.pressure")
    assert pressure_path_for(Scope(kind=ScopeKind.CGROUP, cgroup_path=v1)) is None
    assert pressure_path_for(Scope(kind=ScopeKind.SYSTEM), str(tmp_path / "noproc")) is None


_HYBRID_MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
34 30 0:30 / /sys/fs/cgroup/memory rw,relatime shared:13 - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/cpu rw,relatime shared:14 - cgroup cgroup rw,cpu
40 30 0:36 / /sys/fs/cgroup/unified rw,relatime shared:19 - cgroup2 cgroup2 rw
"""


def test_hybrid_mounts_are_found_in_mountinfo() -> None:
    from uoomd.sources.cgroup import parse_cgroup_mounts

    assert parse_cgroup_mounts(_HYBRID_MOUNTINFO) == (["/sys/fs/cgroup/memory"], "/sys/fs/cgroup/unified")


def test_v1_memory_cgroup_maps_to_its_v2_twin(tmp_path: Path) -> None:
    from uoomd.sources.cgroup import v2_twin_of

    v1 = tmp_path / "memory"
    v2 = tmp_path / "unified"
    (v1 / "app.slice").mkdir(parents=True)
    (v2 / "app.slice").mkdir(parents=True)
    mountinfo = f"34 30 0:30 / {v1} rw - cgroup cgroup rw,memory\n40 30 0:36 / {v2} rw - cgroup2 cgroup2 rw\n"
    assert v2_twin_of(str(v1 / "app.slice"), mountinfo) == str(v2 / "app.slice")
    assert v2_twin_of(str(v1 / "other"), mountinfo) is None  # no twin directory: no PSI
    assert v2_twin_of("/elsewhere/app", mountinfo) is None  # not under a v1 memory mount


# --- the refault count (sources/vmstat.py) ---------------------------------------------------------


def test_a_v2_cgroup_counts_the_refaults_it_did_not_activate(tmp_path: Path) -> None:
    stat = (
        V2_FILES["memory.stat"]
        + "workingset_refault_anon 90\nworkingset_activate_anon 60\nworkingset_activate_file 4\n"
    )
    with CgroupMemoryReader(
        _tree(tmp_path / "cg", dict(V2_FILES, **{"memory.stat": stat})), MACHINE_TOTAL, 0
    ) as reader:
        reader.activations = True  # the classic LRU (this reads the host's /sys/kernel/mm/lru_gen)
        reading = reader.read()
        assert (reading.refault_bytes, reading.refaults_all) == ((90 + 10 - 60 - 4) * PAGE, False)
        reader.activations = False  # the multi-gen LRU: every refault, and the reading says so
        reading = reader.read()
        assert (reading.refault_bytes, reading.refaults_all) == ((90 + 10) * PAGE, True)


def test_a_v1_cgroup_counts_every_refault_and_says_so(tmp_path: Path) -> None:
    stat = V1_FILES["memory.stat"] + "total_workingset_refault_anon 7\ntotal_workingset_refault_file 5\n"
    with CgroupMemoryReader(
        _tree(tmp_path / "cg", dict(V1_FILES, **{"memory.stat": stat})), MACHINE_TOTAL, 0
    ) as reader:
        reader.activations = True
        reading = reader.read()
    assert (reading.refault_bytes, reading.refaults_all) == (12 * PAGE, True)  # v1 has no activation counters
