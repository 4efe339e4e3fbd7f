"""A rule's regex as a DFA table, searched in one table step per character of the text (pure, stdlib only).

Python's ``re`` backtracks: ``(a+)+$`` on 31 ``a`` and a ``!`` took > 20 s, ``.*java.*tomcat``
on ``java`` x 1024 seconds per process (issue 12), and every process name, command line, exe
and cgroup path is chosen by whoever starts the process. A DFA reads each character once and
never goes back, so a search costs at most ``len(text)`` steps whatever the pattern and the
text: bounded by construction, not by luck. uoomd/policy/automaton.py builds the table in the
policy checker (where the time and the memory to build it are spent once, and refused when
too large); the daemon only runs it. Texts are bounded too: a command line is read up to 4096
bytes (uoomd/sources/procfs.py), at most 16,384 characters once undecodable bytes become ``\\xNN``.

Why not RE2 (google-re2 1.1, measured here in ``python -I -S``, Python 3.11): importing it
adds 2.9 MiB of VmRSS to a daemon that idles at 15.7 MiB (BENCHMARKS.md; nohang: 17.2), and
its lazily built DFA cache grew by 130 MiB when 50 patterns were searched once each in
16 KiB of crafted text: memory the daemon mlocks. This table's size is fixed when the
policy is checked (at most ``MAX_CELLS`` entries a pattern) and never grows.
"""

from __future__ import annotations

import array
import bisect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


class _Cursor(Protocol):
    """CPython's str iterator: its pickle support (``__setstate__``) moves it to an index."""

    def __iter__(self) -> Iterator[str]: ...
    def __next__(self) -> str: ...
    def __length_hint__(self) -> int: ...
    def __setstate__(self, index: int) -> None: ...


DEAD = 0  # the offset of the state that never matches (an anchored pattern that failed)
MAX_CELLS = 1 << 16  # states x character classes, a pattern: 512 KiB of table at most


@dataclass(frozen=True, slots=True, kw_only=True)
class Dfa:
    """``re.search(pattern, text) is not None``, as a table: see uoomd/policy/regex.py for the language.

    States are numbered by their offset in ``table`` (state id x ``classes``): 0 is the dead
    state and ``classes`` the accepting one, both absorbing (a search needs one match, so the
    first accepting step answers). A state whose self-loop covers most characters has a skip:
    once it has ignored SKIP_AFTER characters in a row (copies of its row count them), the
    table holds ``-offset - 1``, and ``skip[offset]`` (a one-class ``re`` pattern: one pass)
    finds the next character that leaves it, so the loop jumps over what a command line is
    mostly made of. ``required`` are words one of which every matching text holds: without
    one, the table is not run at all.
    """

    pattern: str  # the source text, for messages and the effective policy (uoomd/policy/render.py)
    classes: int  # character classes: the table's row width
    table: tuple[int, ...]  # next state (encoded as above) by state offset + class
    start: int  # the state before the first character (encoded)
    accepts_at_end: frozenset[int]  # offsets where the end of the text completes a match ($, \Z)
    dollar: bool  # the pattern uses $, which also matches before a final newline
    char_class: dict[str, int]  # class by character; others: default_class
    default_class: int  # -1: look the character up in bounds/bound_class
    bounds: tuple[int, ...] = ()  # first code point of each segment, ascending (bound_class[i] for it)
    bound_class: tuple[int, ...] = ()
    skip: dict[int, re.Pattern[str]] | None = None  # by offset: the characters that leave the state
    required: tuple[str, ...] = ()  # a text with a match holds one of these words (none: not known)
    # An anchored pattern of finitely many literal words: it matches a text that starts with
    # one of ``prefixes`` or is one of ``texts`` (None: run the table).
    prefixes: tuple[str, ...] | None = None
    texts: frozenset[str] = frozenset()

    def __hash__(self) -> int:
        # Equal tables come from equal patterns; the dict fields would make the generated hash fail.
        return hash(self.pattern)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # Pickled as a flat array: unpickled ints are separate objects (28 bytes each), the
        # restored table shares one per state (8 bytes a cell). The Plan crosses from the
        # checker to the daemon pickled (uoomd/policy/isolated.py).
        return (
            _restore,
            (
                self.pattern,
                self.classes,
                array.array("i", self.table).tobytes(),
                self.start,
                self.accepts_at_end,
                self.dollar,
                self.char_class,
                self.default_class,
                self.bounds,
                self.bound_class,
                None if self.skip is None else {k: v.pattern for k, v in self.skip.items()},
                self.required,
                self.prefixes,
                self.texts,
            ),
        )

    def search(self, text: str) -> bool:
        """Whether the pattern occurs in ``text``; at most ``len(text)`` table steps (twice with ``$``)."""
        if self.prefixes is not None:
            return (
                text.startswith(self.prefixes)
                or text in self.texts
                or (self.dollar and text.endswith("\n") and text[:-1] in self.texts)
            )
        required = self.required
        if required:
            # CPython's `in` is linear (two-way or a bloom-skipping scan; 55 µs for 16 Ki
            # characters crafted against it, here): most texts are refused at C speed.
            for word in required:
                if word in text:
                    break
            else:
                return False
        if self._scan(text):
            return True
        # `$` also matches just before a final newline; the compiler allows nothing to be
        # consumed after `$`, so such a match lies within text[:-1] and ends at its end.
        return self.dollar and text.endswith("\n") and self._scan(text[:-1])

    def _class_of(self, ch: str) -> int:
        return self.bound_class[bisect.bisect_right(self.bounds, ord(ch)) - 1]

    def _scan(self, text: str) -> bool:
        table, get, default, accept = self.table, self.char_class.get, self.default_class, self.classes
        state = self.start
        if state in (accept, DEAD):
            return state == accept
        # A for loop over one iterator costs ~90 ns a character here, an index loop ~230 ns
        # (Python 3.11, bench/regex.py's machine): a skip seeks the iterator instead.
        cursor: _Cursor = iter(text)  # type: ignore[assignment]  # a str iterator is one
        for ch in cursor:
            c = get(ch, default)
            if c < 0:
                c = self._class_of(ch)
            state = table[state + c]
            if state <= accept:
                if state == accept:
                    return True
                if state == DEAD:
                    return False
                # The state ignored the last SKIP_AFTER characters: jump to the next one it does not.
                state = -state - 1
                assert self.skip is not None
                found = self.skip[state].search(text, len(text) - cursor.__length_hint__())
                if found is None:
                    break
                cursor.__setstate__(found.start())
        return state in self.accepts_at_end


def _restore(  # noqa: PLR0917 -- pickle calls it with the tuple __reduce__ gives
    pattern: str,
    classes: int,
    raw_table: bytes,
    start: int,
    accepts_at_end: frozenset[int],
    dollar: bool,
    char_class: dict[str, int],
    default_class: int,
    bounds: tuple[int, ...],
    bound_class: tuple[int, ...],
    skip: dict[int, str] | None,
    required: tuple[str, ...],
    prefixes: tuple[str, ...] | None,
    texts: frozenset[str],
) -> Dfa:
    cells = array.array("i")
    cells.frombytes(raw_table)
    if len(cells) > MAX_CELLS:
        raise ValueError(f"a DFA of {len(cells)} cells, over {MAX_CELLS}")
    shared: dict[int, int] = {}
    return Dfa(
        pattern=pattern,
        classes=classes,
        table=tuple(shared.setdefault(v, v) for v in cells),
        start=start,
        accepts_at_end=accepts_at_end,
        dollar=dollar,
        char_class=char_class,
        default_class=default_class,
        bounds=bounds,
        bound_class=bound_class,
        skip=None if skip is None else {k: re.compile(v) for k, v in skip.items()},
        required=required,
        prefixes=prefixes,
        texts=texts,
    )
