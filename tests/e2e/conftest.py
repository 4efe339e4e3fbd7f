"""Fixtures shared by the end-to-end tests: a 512 MiB test memory cgroup and `uoomd run` launchers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cgroups import TestCgroup, test_cgroup_or_skip
from tests.e2e.daemon_runner import RunningDaemon, daemon_fixture

MIB = 1 << 20
LIMIT = 512 * MIB


@pytest.fixture
def cgroup() -> Iterator[TestCgroup]:
    """A memory cgroup of LIMIT bytes, removed with its members after the test (skips with the reason)."""
    with test_cgroup_or_skip(limit_bytes=LIMIT) as cg:
        yield cg


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., RunningDaemon]]:
    """Start `uoomd run` on a policy text; every daemon started is stopped by PID after the test."""
    yield from daemon_fixture(tmp_path)
