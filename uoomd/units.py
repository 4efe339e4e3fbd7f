"""Parse the human units of a policy file: sizes, percents and durations."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
# Binary multiples even for "MB": memory is counted in pages, and every peer
# (earlyoom -M, nohang, systemd's MemoryMax=) reads "M" as MiB.

_DURATION_UNITS: dict[str, float] = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}

_NUMBER = r"(?P<num>[0-9]+(?:\.[0-9]+)?)"

# Bounds that every size and duration of a policy must keep (issue 12: a size of 400 digits
# raised OverflowError, `term_timeout = nan` never escalated, `stall = inf` crashed check).
# A size is a byte count the kernel could hold in a signed 64-bit field; no timeout, poll
# or sustain of an OOM killer means anything beyond a day.
MAX_SIZE_BYTES = 2**63 - 1
MAX_DURATION_S = 86_400.0
_MAX_DIGITS = 30  # longer than any bounded value can need: refused before float() sees it
_SIZE_RE = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>[a-zA-Z]*)\s*$")
_PERCENT_RE = re.compile(rf"^\s*{_NUMBER}\s*%\s*$")


def parse_size_bytes(text: str) -> int:
    """``"512MiB"`` -> 536870912. Raises ValueError naming what is accepted."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (use e.g. '512MiB', '2G' or '5%')")
    unit = match["unit"].lower()
    if unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r}: unknown size unit {match['unit']!r} (use B, KiB, MiB, GiB, TiB)")
    # Exact (a float rounds 2**63 - 1 up to 2**63); digits bounded first, so it stays cheap.
    value = Fraction(match["num"]) * _SIZE_UNITS[unit] if len(match["num"]) <= _MAX_DIGITS else math.inf
    if value > MAX_SIZE_BYTES:
        raise ValueError(f"{_short(text)}: a size must be below 2**63 bytes (8 EiB)")
    return int(value)


def parse_percent(text: str) -> float | None:
    """``"5%"`` -> 0.05; None when the text is not a percent at all."""
    match = _PERCENT_RE.match(text)
    if not match:
        return None
    value = float(match["num"])
    if value > 100:
        raise ValueError(f"{text!r}: a percent must be between 0% and 100%")
    return value / 100


def parse_duration_s(text: str) -> float:
    """``"200ms"`` -> 0.2. A bare number is seconds."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (use e.g. '200ms', '5s', '1m')")
    unit = match["unit"].lower() or "s"
    if unit not in _DURATION_UNITS:
        raise ValueError(f"{text!r}: unknown duration unit {match['unit']!r} (use ms, s, m)")
    seconds = float(match["num"]) * _DURATION_UNITS[unit] if len(match["num"]) <= _MAX_DIGITS else math.inf
    return check_duration_s(seconds, text)


def check_duration_s(seconds: float, text: object) -> float:
    """``seconds``, if finite and at most MAX_DURATION_S; ValueError naming ``text`` otherwise.
    nan compares false with everything, so it is tested by name, not by a range."""
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DURATION_S:
        raise ValueError(f"{_short(text)}: a duration must be a finite number of seconds from 0 to 1 day (86400s)")
    return seconds


def _short(value: object) -> str:
    # A 400-digit value is named by its start, not printed whole in every message.
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:32]}...({len(text)} characters)"


def format_bytes(n: int) -> str:
    """Human size for tables and logs: 1536 -> '1.5KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
