"""The import layers hold: pure core without I/O or third-party code, pydantic and structlog in their rooms."""

from __future__ import annotations

import pytest

from tests.check_layers import violations

pytestmark = pytest.mark.unit


def test_import_layers_hold() -> None:
    assert violations() == []


def test_the_daemon_process_imports_neither_pydantic_nor_psutil() -> None:
    # The loop's RSS is the product (issue 6: below nohang's): the policy is validated in a
    # child process (uoomd/policy/isolated.py) and nothing on the loop's path needs psutil.
    import subprocess
    import sys

    heavy = "('pydantic', 'psutil', 'structlog', 'asyncio')"
    code = f"import sys, uoomd.daemon, uoomd.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
