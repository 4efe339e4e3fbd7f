"""Everything a boot needs, built or taken from the cache: the base image, the wheels, the root disk.

The wheels (pip, PyPI) are built while mmdebstrap builds the base (the Debian mirror, dpkg):
both wait mostly on the network. ``start()`` does it all in a background thread, so that a
pytest session builds the image while the rest of the suite runs (tests/vm/conftest.py).

Usage (root): ``python3 -m vm.prepare`` builds what is missing and prints the root disk.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vm.image import (
    BuildFailed,
    Image,
    Unavailable,
    cache_root,
    check_mirror,
    ensure_image,
    is_built,
    why_unavailable,
)
from vm.rootdisk import ensure_root_disk
from vm.wheels import REPO, are_built, ensure_wheels, guest_python


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A bootable root disk (``root``) on ``image``'s kernel, and the seconds each part took."""

    image: Image
    root: Path
    timings: dict[str, float] = field(default_factory=dict)


def prepare(cache: Path | None = None, repo: Path = REPO) -> Prepared:
    """Build what is missing. Raises Unavailable (this host cannot) or BuildFailed (the project's build broke)."""
    reason = why_unavailable()
    if reason:
        raise Unavailable(reason)
    guest_python()  # raises Unavailable before any build starts
    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    if not (is_built(cache) and are_built(cache, repo)):
        # Both builds need the network: without it, skip now (pip alone retries for ~2 minutes).
        check_mirror()
    timings: dict[str, float] = {}
    started = time.monotonic()

    def timed_wheels() -> Path:
        t0 = time.monotonic()
        try:
            return ensure_wheels(cache, repo)
        finally:
            timings["wheels_s"] = time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=1) as pool:
        wheels_future = pool.submit(timed_wheels)
        try:
            image = ensure_image(cache)
        finally:
            # Wait for the wheels either way: a build left running would race the next one.
            wheels_error = wheels_future.exception()
        timings["image_build_s" if image.build_s is not None else "image_cached_s"] = time.monotonic() - started
        if wheels_error is not None:
            raise wheels_error
        wheels = wheels_future.result()
    t0 = time.monotonic()
    root = ensure_root_disk(image, wheels, repo)
    timings["root_disk_s"] = time.monotonic() - t0
    timings["prepare_s"] = time.monotonic() - started
    return Prepared(image=image, root=root, timings=timings)


class Background:
    """``prepare()`` in a daemon thread, started now; ``result()`` waits for it and re-raises."""

    def __init__(self, cache: Path | None = None, repo: Path = REPO) -> None:
        self._done: Prepared | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(cache, repo), name="vm-prepare", daemon=True)
        self._thread.start()

    def _run(self, cache: Path | None, repo: Path) -> None:
        try:
            self._done = prepare(cache, repo)
        except BaseException as exc:  # handed to result()'s caller, in its thread
            self._error = exc

    def result(self) -> Prepared:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._done is not None
        return self._done


def main() -> int:
    try:
        done = prepare()
    except (Unavailable, BuildFailed) as exc:
        print(f"vm.prepare: {exc}", file=sys.stderr)
        return 3
    print(done.root)
    for key, value in done.timings.items():
        print(f"{key}: {value:.1f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
