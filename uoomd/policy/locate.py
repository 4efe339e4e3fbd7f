"""Map a policy key path such as ("rule", 2, "match", "name") to its line in the TOML text.

tomllib keeps no positions for a valid document, so this is a small line scanner
that understands what policy files use: [table], [[array.of.tables]], key = value,
dotted keys and one-line inline tables. Where a path is not found exactly, the
longest located prefix answers (an error on a missing key points at its table).
"""

from __future__ import annotations

import re

KeyPath = tuple[str | int, ...]

# Both are matched on the line with its leading whitespace stripped, and neither has two
# neighbouring parts that can match the same characters: each runs in time linear in the
# line. The old `^\s*(...[ ]+?)\s*=` was cubic on a line of spaces (issue 12: 3,000 spaces
# took 19 s, 8,000 over 300 s, on every valid file); names are stripped after the match.
_HEADER_RE = re.compile(r"(\[\[?)([^\]]+)(\]\]?)[ \t]*(?:#.*)?")
_KEY_RE = re.compile(r"([A-Za-z0-9_.\"' -]+)=(.*)")
_INLINE_KEY_RE = re.compile(r"(?:^|[{,])\s*([A-Za-z0-9_-]+)\s*=")


def _split_dotted(key: str) -> list[str]:
    return [part.strip().strip("\"'") for part in key.split(".")]


def locate_lines(text: str) -> dict[KeyPath, int]:
    """Every key path the scanner recognises, with its 1-based line."""
    lines: dict[KeyPath, int] = {}
    counters: dict[KeyPath, int] = {}
    current: KeyPath = ()
    in_multiline: str | None = None
    bracket_depth = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if in_multiline is not None:
            if in_multiline in raw:
                in_multiline = None
            continue
        if bracket_depth > 0:
            bracket_depth += raw.count("[") - raw.count("]")
            continue
        stripped = raw.lstrip()
        header = _HEADER_RE.fullmatch(stripped.rstrip())
        if header and header.group(1) == header.group(3).replace("]", "[") and not stripped.startswith("[ "):
            names = _split_dotted(header.group(2).strip())
            path = _resolve_header(names, counters, array=header.group(1) == "[[")
            current = path
            lines.setdefault(path, lineno)
            continue
        key = _KEY_RE.match(stripped)
        if not key or not key.group(1).strip() or stripped.startswith("#"):
            continue
        path = current + tuple(_split_dotted(key.group(1).strip()))
        lines.setdefault(path, lineno)
        value = key.group(2).lstrip()
        for quote in ('"""', "'''"):
            if value.count(quote) == 1:
                in_multiline = quote
        if value.lstrip().startswith("{"):
            for inner in _INLINE_KEY_RE.findall(value):
                lines.setdefault((*path, inner), lineno)
        elif value.lstrip().startswith("["):
            bracket_depth = value.count("[") - value.count("]")
    return lines


def _resolve_header(names: list[str], counters: dict[KeyPath, int], *, array: bool) -> KeyPath:
    # Each [[a]] appends to array a; [[a.b]] appends to b inside the LAST element of a.
    path: KeyPath = ()
    for i, name in enumerate(names):
        path = (*path, name)
        last = i == len(names) - 1
        if last and array:
            index = counters.get(path, -1) + 1
            counters[path] = index
            # A new element of an outer array starts its inner arrays afresh.
            for other in [k for k in counters if len(k) > len(path) + 1 and k[: len(path)] == path]:
                del counters[other]
            path = (*path, index)
        elif path in counters:
            path = (*path, counters[path])
    return path


def find_line(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    for end in range(len(path), 0, -1):
        line = lines.get(path[:end])
        if line is not None:
            return line
    return None


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out
