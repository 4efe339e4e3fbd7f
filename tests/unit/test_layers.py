"""The import layers hold: pure core without I/O or third-party code, pydantic and structlog in their rooms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from check_layers import violations  # noqa: E402


def test_import_layers_hold() -> None:
    assert violations() == []
