"""Fixtures for every tier of tests: a throwaway memory cgroup, removed with its members after the test.

Plain builders (plans, processes, readings, policy files) are in tests/builders.py: a
conftest is pytest's to load, not a module for tests to import from.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.cgroups import CGROUP_LIMIT_BYTES, ScratchCgroup, scratch_cgroup

# No per-example deadline anywhere: hypothesis's 200 ms measures how busy the machine is
# (two busy loops beside the suite broke it, issue 13), not what a test means. A property
# that must be fast says so by its own bound (in CPU time, or in work counted).
settings.register_profile("uoomd", deadline=None)
settings.load_profile("uoomd")


@pytest.fixture
def cgroup() -> Iterator[ScratchCgroup]:
    """A memory cgroup of CGROUP_LIMIT_BYTES (skips with the reason where none can be made)."""
    with scratch_cgroup(limit_bytes=CGROUP_LIMIT_BYTES) as cg:
        yield cg
