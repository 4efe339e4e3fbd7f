"""Check the import layers of STYLE.md: the pure core imports no third-party code and no I/O modules.

Run by .ci/run and by tests/unit/test_layers.py. Prints each violation; exits 1 if any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "uoomd"

# module -> what it must not import (prefixes)
THIRD_PARTY = ("pydantic", "psutil", "structlog", "sdnotify")
IO_MODULES = (
    "os",
    "subprocess",
    "socket",
    "select",
    "signal",
    "io",
    "pathlib",
    "shutil",
    "ctypes",
    "threading",
    "time",
)
PURE = (
    "kernel",
    "scoring",
    "decision",
    "actions",
    "results",
    "pacing",
    "plan",
    "readings",
    "units",
    "errors",
    "dfa",
    "dbus",
    "rules",
    "startup",
    "metrics.registry",
    "metrics.exposition",
    "metrics.collector",
    "trace",
    "tracelines",
    "replay",
    "replayreport",
    "trend",
    "thrash",
    "beforekill",
)
RULES: dict[str, tuple[str, ...]] = dict.fromkeys(PURE, THIRD_PARTY + IO_MODULES)
# decision.py names signals by their constants (signal.SIGTERM); it never calls into the module.
RULES["decision"] = THIRD_PARTY + tuple(m for m in IO_MODULES if m != "signal")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations() -> list[str]:
    problems: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        module = ".".join(rel.parts)
        for lineno, name in _imports(path):
            top = name.split(".")[0]
            if module in RULES and top in RULES[module]:
                problems.append(f"uoomd/{rel}.py:{lineno}: the pure module {module!r} imports {name!r}")
            if top == "pydantic" and not module.startswith("policy."):
                problems.append(f"uoomd/{rel}.py:{lineno}: pydantic is allowed only under uoomd/policy/")
            if top == "structlog":
                problems.append(f"uoomd/{rel}.py:{lineno}: structlog costs the daemon 10 MiB RSS (uoomd/logs.py)")
    return problems


if __name__ == "__main__":
    found = violations()
    for line in found:
        print(line)
    sys.exit(1 if found else 0)
