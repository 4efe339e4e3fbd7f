"""Fixtures for every tier of tests: a throwaway memory cgroup, removed with its members after the test.

Plain builders (plans, processes, readings, policy files) are in tests/builders.py: a
conftest is pytest's to load, not a module for tests to import from.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cgroups import CGROUP_LIMIT_BYTES, ScratchCgroup, scratch_cgroup


@pytest.fixture
def cgroup() -> Iterator[ScratchCgroup]:
    """A memory cgroup of CGROUP_LIMIT_BYTES (skips with the reason where none can be made)."""
    with scratch_cgroup(limit_bytes=CGROUP_LIMIT_BYTES) as cg:
        yield cg
