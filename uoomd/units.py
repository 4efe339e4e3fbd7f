"""Parse the human units of a policy file: sizes, percents and durations."""

from __future__ import annotations

import re

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
    return int(float(match["num"]) * _SIZE_UNITS[unit])


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
    return float(match["num"]) * _DURATION_UNITS[unit]


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
