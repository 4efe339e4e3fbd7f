"""Wheels of uoomd and its dependencies for the guest's Python, built on the host and cached.

The guest installs them offline (``pip install --no-index --find-links``), as an admin on a
machine without network would. pydantic_core is built per Python minor version, so the host
builds with a 3.11 interpreter: the one running this, or ``python3.11`` on PATH.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vm.image import GUEST_PYTHON, BuildFailed, Unavailable

REPO = Path(__file__).resolve().parents[1]
# What the uoomd wheel is made of (pyproject.toml force-includes etc/ and policies/), and what
# else the root disk built with these wheels takes from the tree (the unit, install-unit).
SOURCES = ("pyproject.toml", "README.md", "uoomd", "etc", "policies", "systemd", "packaging")
# The test extras: the repo's live oom_score test runs inside the guest under pytest (scenario
# cgroup), in a venv of TEST_REQUIREMENT (vm/rootdisk.py); hatchling is uoomd's build backend:
# packaging/install-unit builds uoomd from the source tree, offline.
EXTRA = ("hatchling",)


def source_key(repo: Path = REPO) -> str:
    digest = hashlib.sha256()
    for top in SOURCES:
        path = repo / top
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts:
                continue
            digest.update(file.relative_to(repo).as_posix().encode() + b"\0" + file.read_bytes())
    digest.update(" ".join(EXTRA).encode())
    return digest.hexdigest()[:16]


def guest_python() -> str:
    """A host interpreter of the guest's minor version, to build the wheels with."""
    if sys.version_info[:2] == GUEST_PYTHON:
        return sys.executable
    name = f"python{GUEST_PYTHON[0]}.{GUEST_PYTHON[1]}"
    found = shutil.which(name)
    if found is None:
        raise Unavailable(f"no {name} on the host: the guest's wheels (pydantic_core) must be built for it")
    return found


def are_built(cache: Path, repo: Path = REPO) -> bool:
    """Whether ``cache`` holds the wheels for today's sources."""
    return (cache / f"wheels-{source_key(repo)}").is_dir()


def ensure_wheels(cache: Path, repo: Path = REPO) -> Path:
    """The wheel directory for today's sources, built first if missing.

    Raises Unavailable (no interpreter to build with) or BuildFailed (the project's own
    build broke: a failure, not a skip)."""
    key = source_key(repo)
    final = cache / f"wheels-{key}"
    if final.is_dir():
        return final
    work = cache / f"wheels-{key}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = cache / f"wheels-{key}.log"
    with log.open("w") as log_file:
        pip_wheel = [guest_python(), "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "-w", str(work)]
        result = subprocess.run(
            [*pip_wheel, f"{repo}[test]", *EXTRA],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PIP_NO_INPUT="1"),
            check=False,
        )
    if result.returncode != 0 or not list(work.glob("uoomd-*.whl")):
        shutil.rmtree(work, ignore_errors=True)
        raise BuildFailed(f"pip wheel failed (rc {result.returncode}); log {log}:\n{log.read_text()[-2000:]}")
    os.rename(work, final)
    for old in cache.glob("wheels-*"):
        if old in (final, log) or old.name.endswith(".tmp"):
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return final
