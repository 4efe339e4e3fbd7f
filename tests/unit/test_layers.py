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


def test_the_readme_layout_table_names_each_module_once_and_only_modules_that_exist() -> None:
    # README.md, Development: "| `module.py` | its one job |". A module added without a row,
    # or a row left behind by a module that moved, fails here.
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    section = root.joinpath("README.md").read_text().split("## Development", 1)[1]
    rows = re.findall(r"^\| `([\w/]+\.py)` \|", section, re.MULTILINE)
    package = root / "uoomd"
    modules = sorted(
        str(path.relative_to(package))
        for folder in (package, package / "sources", package / "policy", package / "metrics")
        for path in folder.glob("*.py")
        if path.name not in {"__init__.py", "__main__.py"}
    )
    assert len(rows) == len(set(rows)), "a module with two rows"
    assert sorted(rows) == modules
