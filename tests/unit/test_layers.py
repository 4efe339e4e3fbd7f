"""The import layers hold: pure core without I/O or third-party code, pydantic and structlog in their rooms."""

from __future__ import annotations

import pytest

from tests.check_layers import violations

pytestmark = pytest.mark.unit


def test_import_layers_hold() -> None:
    assert violations() == []
