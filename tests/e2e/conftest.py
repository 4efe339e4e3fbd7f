"""Fixtures of the end-to-end tests: `uoomd run` launchers (the test cgroup is tests/conftest.py's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon_runner import RunningDaemon, daemon_fixture


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., RunningDaemon]]:
    """Start `uoomd run` on a policy text; every daemon started is stopped by PID after the test."""
    yield from daemon_fixture(tmp_path)
