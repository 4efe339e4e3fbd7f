"""The VM tier's fixtures: the image (built once, cached by its inputs), for tests/vm/tier.py's boots.

Every test here is marked ``vm``. ``UOOMD_VM`` says what to do with them:

- unset (or ``auto``): run them where the host can (x86_64 Linux, root, qemu-system-x86_64,
  mmdebstrap, mkfs.ext4, Debian apt lists, the Debian mirror reachable); elsewhere skip them
  with the reason, and the rest of the suite runs;
- ``require``: where the host cannot, fail instead of skipping (a CI that knows it can);
- ``skip``: skip them without looking (a quick run of the rest).

A failure of the project's own build (the wheels, install-unit, a build on a host that has
all it needs) fails the tests whatever the mode. Once collection shows that VM tests will
run, the image is built in a background thread (vm/prepare.py), while the tests before them
run; the first VM test waits for it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from tests.vm import tier
from tests.vm.tier import TIMINGS, VmEnv, session_runs
from vm.image import BuildFailed, Unavailable, cache_root, why_unavailable
from vm.prepare import Background

MODES = ("", "auto", "require", "skip")
_background: Background | None = None


def _mode() -> str:
    mode = os.environ.get("UOOMD_VM", "")
    if mode not in MODES:
        raise pytest.UsageError(f"UOOMD_VM={mode!r}: expected one of auto, require, skip (or unset)")
    return mode


def pytest_collection_finish(session: pytest.Session) -> None:
    global _background  # one build per session: started here, joined by vm_env
    selected = [item for item in session.items if item.get_closest_marker("vm") is not None]
    for item in selected:
        module = getattr(item, "module", None)
        tier.WANTED.update(getattr(module, "VM_SCENARIOS", ()))
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        return  # collection failed: pytest stops before any test, and would leave a build half done
    if selected and _mode() != "skip" and why_unavailable() is None and _background is None:
        _background = Background(cache_root())


@pytest.fixture(scope="session")
def vm_env() -> VmEnv:
    mode = _mode()
    if mode == "skip":
        pytest.skip("UOOMD_VM=skip")
    try:
        reason = why_unavailable()
        if reason:
            raise Unavailable(reason)
        waited = time.monotonic()
        prepared = (_background or Background(cache_root())).result()
        TIMINGS["waited_for_the_image_s"] = time.monotonic() - waited
    except Unavailable as exc:
        if mode == "require":
            pytest.fail(f"UOOMD_VM=require, but: {exc}")
        pytest.skip(f"VM tier unavailable: {exc}")
    except BuildFailed as exc:
        pytest.fail(str(exc))
    TIMINGS.update(prepared.timings)
    return VmEnv(image=prepared.image, root=prepared.root, runs=session_runs(cache_root() / "runs"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "VM tier timings")
        for key, value in TIMINGS.items():
            terminalreporter.write_line(f"{key}: {value:.1f}")
