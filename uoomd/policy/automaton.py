"""Build the Dfa (uoomd/dfa.py) of a parsed regex: Thompson NFA, subset construction, minimization, table.

Why a DFA and not a backtracking-safe subset of ``re``: ``re.search`` restarts at every
position, so even one ``.*`` is quadratic (``.*foo.*bar`` is cubic: 4.1 s on a crafted 4 KiB
command line), and ``(a?){30}a{30}`` explodes with no unbounded repeat at all. The bound a
subset could promise depends on the pattern; a DFA's is ``len(text)`` steps for every pattern.
What a DFA costs, it costs here, once, in the checker: the subset construction, refused past
MAX_STATES states, MAX_CELLS table cells or MAX_WORK steps for the whole policy (so `uoomd
check` answers in well under a second): the subset construction of ``(a|b)*a(a|b){20}``
passes 4096 states, ``(a?){1000}a{1000}`` MAX_NODES.
"""

from __future__ import annotations

import bisect
import re

from uoomd.dfa import DEAD, MAX_CELLS, Dfa
from uoomd.policy.literals import literal_words, required_words
from uoomd.policy.regex import (
    CODE_POINTS,
    Alt,
    Anchor,
    Chars,
    Charset,
    Node,
    RegexRefusedError,
    Repeat,
    Seq,
    normalize,
    parse_regex,
)

MAX_NODES = 4000  # NFA nodes once the counted repeats are written out
MAX_STATES = 4096  # DFA states; MAX_CELLS (states x classes) usually binds first
MAX_CLASSES = 256  # character classes, the table's row width
MAX_WORK = 500_000  # steps building a policy's tables may take (RegexBudget): 0.25-0.45 s here
MAX_MINIMIZING = 500_000  # steps minimizing them may take: ~0.08 s here
SKIP_AFTER = 4  # self-loops in a row before a skip (see _Builder._table)


class RegexBudget:
    """The steps that building the tables of one policy's patterns may take together.

    Per policy, not per pattern: a file of a thousand patterns, each just under a limit of its
    own, would keep `uoomd check` (and a reload's checker) busy for minutes. A step is an NFA
    node visited or a table cell built (0.5-0.9 µs here, bench/regex.py); minimizing has a
    budget of its own (a step: a state moved between blocks), spent until it runs out: it only
    makes tables smaller, so running out never refuses a pattern."""

    def __init__(self, steps: int = MAX_WORK, minimizing_steps: int = MAX_MINIMIZING) -> None:
        self.left = steps
        self.minimizing_left = minimizing_steps

    def affords_minimizing(self, steps: int) -> bool:
        """Spend ``steps`` of the minimizing budget if that many are left."""
        if steps > self.minimizing_left:
            self.minimizing_left = 0  # a refinement cut short is wasted: so is the rest
            return False
        self.minimizing_left -= steps
        return True

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise RegexRefusedError(
                f"building the table would pass the {MAX_WORK} steps that the policy's patterns may take "
                "together: simplify this pattern (or the ones before it)"
            )


def compile_regex(pattern: str, budget: RegexBudget | None = None) -> Dfa:
    """The Dfa that answers ``re.search(pattern, text) is not None``; RegexRefusedError if it cannot.

    ``pattern`` is expected to compile with ``re`` (the policy model checks that first);
    ``budget``: shared by the patterns of one policy (default: a budget of its own)."""
    return _Builder(pattern, parse_regex(pattern), budget if budget is not None else RegexBudget()).build()


_CHAR, _SPLIT, _START, _END, _MATCH = range(5)  # NFA node kinds


def _size(node: Node) -> int:
    """NFA nodes once repeats are written out (saturating past MAX_NODES)."""
    match node:
        case Chars() | Anchor():
            return 1
        case Seq(items):
            return min(MAX_NODES + 1, sum(_size(i) for i in items))
        case Alt(options):
            return min(MAX_NODES + 1, sum(_size(o) for o in options) + 1)
        case Repeat(item, lo, hi):
            copies = lo + 1 if hi is None else hi
            return min(MAX_NODES + 1, _size(item) * copies + (hi or lo + 1) - lo + 1)
    raise AssertionError(node)


class _Builder:
    def __init__(self, pattern: str, tree: Node, budget: RegexBudget) -> None:
        self.pattern = pattern
        self.tree = tree
        self.kind: list[int] = []
        self.arg: list[int] = []  # _CHAR: the charset's index
        self.out: list[list[int]] = []
        self.charsets: dict[Charset, int] = {}
        self.dollar_nodes: list[int] = []
        self.end_nodes: list[int] = []
        self.budget = budget
        self.unanchored = False  # a search may start past the text's first character

    def _node(self, kind: int, out: list[int], arg: int = -1) -> int:
        self.kind.append(kind)
        self.out.append(out)
        self.arg.append(arg)
        return len(self.kind) - 1

    def _emit(self, node: Node, after: int) -> int:
        """The entry of ``node``'s fragment, which continues to ``after`` (built back to front)."""
        match node:
            case Chars(charset):
                index = self.charsets.setdefault(charset, len(self.charsets))
                return self._node(_CHAR, [after], index)
            case Seq(items):
                for item in reversed(items):
                    after = self._emit(item, after)
                return after
            case Alt(options):
                return self._node(_SPLIT, [self._emit(o, after) for o in options])
            case Anchor(kind):
                entry = self._node(_START if kind == "start" else _END, [after])
                if kind == "dollar":
                    self.dollar_nodes.append(entry)
                elif kind == "end":
                    self.end_nodes.append(entry)
                return entry
            case Repeat(item, lo, hi):
                if hi is None:
                    loop = self._node(_SPLIT, [])
                    self.out[loop] = [self._emit(item, loop), after]
                    tail = loop
                else:
                    tail = after
                    for _ in range(hi - lo):
                        tail = self._node(_SPLIT, [self._emit(item, tail), after])
                for _ in range(lo):
                    tail = self._emit(item, tail)
                return tail
        raise AssertionError(node)

    def _closure(self, seeds: list[int], *, at_start: bool, at_end: bool) -> tuple[frozenset[int], bool]:
        """The character nodes and pending end anchors reachable without reading, and whether MATCH is."""
        found: set[int] = set()
        seen: set[int] = set()
        stack = list(seeds)
        matched = False
        kind, out = self.kind, self.out
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            k = kind[i]
            if k == _CHAR:
                found.add(i)
            elif k == _SPLIT:
                stack.extend(out[i])
            elif k == _MATCH:
                matched = True
            elif k == _START:
                if at_start:
                    stack.append(out[i][0])
            elif at_end:
                stack.append(out[i][0])
            else:
                found.add(i)  # an end anchor, passable once the text ends
        self.budget.spend(len(seen))
        return frozenset(found), matched

    def build(self) -> Dfa:
        entry = self._nfa()
        classes, charset_classes, segments = self._classes()
        rows, start_id, accepts_at_end = self._subsets(entry, len(classes), charset_classes)
        rows, start_id, accepts_at_end = self._minimize(rows, start_id, accepts_at_end)
        return self._table(rows, start_id, accepts_at_end, classes, segments)

    def _nfa(self) -> int:
        """Build the NFA (Thompson's construction); its entry node."""
        if _size(self.tree) > MAX_NODES:
            raise RegexRefusedError(f"the pattern is too large once its counts are written out (over {MAX_NODES})")
        match_node = self._node(_MATCH, [])
        entry = self._emit(self.tree, match_node)
        if self.dollar_nodes and self.end_nodes:
            raise RegexRefusedError("use either $ or \\Z, not both")
        for node in self.dollar_nodes:
            # `$` matches before a final newline too; Dfa.search handles it by searching
            # text[:-1] again, which holds only when nothing is read after the `$`.
            after, _ = self._closure([self.out[node][0]], at_start=True, at_end=True)
            if any(self.kind[i] == _CHAR for i in after):
                raise RegexRefusedError(
                    "nothing may be matched after $ (write \\n for a newline, \\Z for the very end)"
                )
        return entry

    def _subsets(
        self, entry: int, nclasses: int, charset_classes: list[set[int]]
    ) -> tuple[list[list[int]], int, set[int]]:
        """The DFA of the NFA (the subset construction): rows of next states by class, the
        start state, and the states where the end of the text completes a match."""
        by_class: list[list[int]] = [[] for _ in range(nclasses)]
        for i, k in enumerate(self.kind):
            if k == _CHAR:
                for c in charset_classes[self.arg[i]]:
                    by_class[c].append(i)
        moves = [frozenset(nodes) for nodes in by_class]
        # A search restarts at every position: every state but the initial one holds the
        # restart nodes, so states are keyed by the rest (their core), which keeps the sets
        # that are hashed and intersected small.
        restart, _ = self._closure([entry], at_start=False, at_end=False)
        self.unanchored = bool(restart)
        initial, initial_matched = self._closure([entry], at_start=True, at_end=False)
        restart_targets = [frozenset(self.out[i][0] for i in restart & moves[c]) for c in range(nclasses)]
        # State ids: 0 dead, 1 accepting; keys: (nodes, is the text's start)
        ids: dict[tuple[frozenset[int], bool], int] = {}
        order: list[tuple[frozenset[int], bool]] = []
        rows: list[list[int]] = [[DEAD] * nclasses, [1] * nclasses]

        def state_id(core: frozenset[int], matched: bool, initial_state: bool) -> int:
            if matched:
                return 1
            if not core and not restart:
                return DEAD
            key = (core, initial_state)
            found = ids.get(key)
            if found is None:
                if len(ids) + 2 >= MAX_STATES or (len(ids) + 3) * nclasses > MAX_CELLS:
                    raise RegexRefusedError(
                        f"the pattern needs more than {len(ids) + 2} DFA states of {nclasses} character classes "
                        f"(at most {MAX_STATES} states and {MAX_CELLS} cells)"
                    )
                found = ids[key] = len(ids) + 2
                order.append(key)
            return found

        start_id = state_id(initial, initial_matched, True)
        closures: dict[frozenset[int], tuple[frozenset[int], bool]] = {}
        done = 0
        while done < len(order):
            core, _ = order[done]
            done += 1
            row: list[int] = []
            for c in range(nclasses):
                moved = core & moves[c]
                targets = restart_targets[c] | frozenset(self.out[i][0] for i in moved) if moved else restart_targets[c]
                result = closures.get(targets)
                if result is None:
                    reached, matched = self._closure(list(targets), at_start=False, at_end=False)
                    result = closures[targets] = (reached - restart, matched)
                row.append(state_id(result[0], result[1], False))
                self.budget.spend(1 + len(moved) + len(result[0]))
            rows.append(row)
        accepts_at_end = {1}
        for state, (core, initial_state) in enumerate(order, start=2):
            pending = [self.out[i][0] for i in core | restart if self.kind[i] == _END]
            if pending and self._closure(pending, at_start=initial_state, at_end=True)[1]:
                accepts_at_end.add(state)
        return rows, start_id, accepts_at_end

    def _minimize(
        self, rows: list[list[int]], start_id: int, accepts_at_end: set[int]
    ) -> tuple[list[list[int]], int, set[int]]:
        """Merge the states no text can tell apart (Hopcroft's partition refinement, k n log n).

        Not only smaller: after ``java`` was seen, ``.*java.*tomcat`` need not count another
        ``java``, so the merged state stays put on it and is skipped over (see _table)."""
        # Blocks start by whether the end of the text accepts there (the accepting state does)
        # and split by where each class leads. A state that can never match ends in the dead
        # one's block (0), one that has matched whatever follows in the accepting one's (1).
        nclasses = len(rows[0])
        inverse: list[list[list[int]]] = [[[] for _ in rows] for _ in range(nclasses)]
        for state, row in enumerate(rows):
            for c, target in enumerate(row):
                inverse[c][target].append(state)
        block_of = [1 if s in accepts_at_end else 0 for s in range(len(rows))]
        blocks: list[set[int]] = [{s for s in range(len(rows)) if not block_of[s]}, set(accepts_at_end)]
        pending = [0, 1]
        waiting = {0, 1}
        while pending:
            splitter = pending.pop()
            waiting.discard(splitter)
            members = list(blocks[splitter])
            for c in range(nclasses):
                into: dict[int, list[int]] = {}  # block -> its states that class c takes into the splitter
                for target in members:
                    for state in inverse[c][target]:
                        into.setdefault(block_of[state], []).append(state)
                if not self.budget.affords_minimizing(len(members) + sum(len(v) for v in into.values())):
                    return rows, start_id, accepts_at_end  # correct, only larger
                for old, inside in into.items():
                    if len(inside) == len(blocks[old]):
                        continue
                    new = len(blocks)
                    blocks.append(set(inside))
                    blocks[old] -= blocks[new]
                    for state in inside:
                        block_of[state] = new
                    if old in waiting or len(blocks[new]) <= len(blocks[old]):
                        pending.append(new)
                        waiting.add(new)
                    else:
                        pending.append(old)
                        waiting.add(old)
        number = {block_of[0]: 0, block_of[1]: 1}
        first: list[int] = []
        for s in range(2, len(rows)):
            if block_of[s] not in number:
                number[block_of[s]] = len(number)
                first.append(s)
        merged = [[0] * nclasses, [1] * nclasses] + [[number[block_of[t]] for t in rows[s]] for s in first]
        ends = {number[block_of[s]] for s in accepts_at_end}
        return merged, number[block_of[start_id]], ends

    def _classes(self) -> tuple[list[frozenset[int]], list[set[int]], list[tuple[int, int]]]:
        """Split the code points where the pattern's charsets begin and end: a class is the set
        of code points that every charset treats alike. Returns the classes (by the charsets
        that hold them), each charset's classes, and (segment start, class) pairs."""
        charsets = list(self.charsets)
        events: dict[int, list[tuple[int, bool]]] = {}
        for j, charset in enumerate(charsets):
            for lo, hi in charset:
                events.setdefault(lo, []).append((j, True))
                events.setdefault(hi, []).append((j, False))
        points = sorted({0, *events} - {CODE_POINTS})
        active: set[int] = set()
        signatures: dict[frozenset[int], int] = {}
        segments: list[tuple[int, int]] = []
        for p in points:  # a sweep: the charsets that hold each segment
            for j, enters in events.get(p, ()):
                if enters:
                    active.add(j)
                else:
                    active.discard(j)
            c = signatures.setdefault(frozenset(active), len(signatures))
            if c >= MAX_CLASSES:
                raise RegexRefusedError(f"the pattern needs more than {MAX_CLASSES} character classes")
            if not segments or segments[-1][1] != c:
                segments.append((p, c))
        classes = list(signatures)
        per_charset: list[set[int]] = [set() for _ in charsets]
        for c, held in enumerate(classes):
            for j in held:
                per_charset[j].add(c)
        return classes, per_charset, segments

    def _table(
        self,
        rows: list[list[int]],
        start_id: int,
        accepts_at_end: set[int],
        classes: list[frozenset[int]],
        segments: list[tuple[int, int]],
    ) -> Dfa:
        nclasses = len(classes)
        ends = [s for s, _ in segments[1:]] + [CODE_POINTS]
        sizes = [0] * nclasses
        printable = [0] * nclasses  # of the 95 printable ASCII characters
        for (lo, c), hi in zip(segments, ends, strict=True):
            sizes[c] += hi - lo
            printable[c] += max(0, min(hi, 127) - max(lo, 32))
        single = {c: chr(lo) for (lo, c), hi in zip(segments, ends, strict=True) if sizes[c] == 1 == hi - lo}
        words = literal_words(rows, start_id, accepts_at_end, single) if not self.unanchored else None
        # A state that most printable characters leave in place gets a skip: after SKIP_AFTER
        # self-loops in a row (counted by copies of its row, so the loop pays nothing for it),
        # one `re` search (a single class: one pass, no backtracking) jumps to the next
        # character that leaves it. A call costs ~1 µs, a table step ~80 ns here: text crafted
        # to leave the state after every SKIP_AFTER + 1 characters costs ~215 ns a character
        # (bench/regex.py; SKIP_AFTER 8 made that 150 but typical command lines 30% slower),
        # and a long run of what the state ignores costs one call.
        table = [row[:] for row in rows]
        skip_of: dict[tuple[int, int], int] = {}  # (row, class) -> the state to skip in
        skip: dict[int, re.Pattern[str]] = {}
        for state in range(2, len(rows)):
            loops = [c for c in range(nclasses) if rows[state][c] == state]
            if sum(printable[c] for c in loops) < 64 or (len(table) + SKIP_AFTER) * nclasses > MAX_CELLS:
                continue
            here = state
            for _ in range(SKIP_AFTER - 1):
                table.append(rows[state][:])
                for c in loops:
                    table[here][c] = len(table) - 1
                here = len(table) - 1
                if state in accepts_at_end:
                    accepts_at_end.add(here)
            for c in loops:
                skip_of[here, c] = state
            leave = [(lo, hi) for (lo, c), hi in zip(segments, ends, strict=True) if c not in loops]
            skip[state * nclasses] = re.compile(_class_source(normalize(leave)))
        cells = [
            -skip_of[s, c] * nclasses - 1 if (s, c) in skip_of else t * nclasses
            for s, row in enumerate(table)
            for c, t in enumerate(row)
        ]
        dominant = max(range(nclasses), key=sizes.__getitem__)
        if CODE_POINTS - sizes[dominant] <= 4096:
            char_class = {
                chr(p): c for (lo, c), hi in zip(segments, ends, strict=True) if c != dominant for p in range(lo, hi)
            }
            default_class = dominant
            bounds: tuple[int, ...] = ()
            bound_class: tuple[int, ...] = ()
        else:
            char_class = {chr(p): self._class_at(segments, p) for p in range(256)}
            default_class = -1
            bounds = tuple(lo for lo, _ in segments)
            bound_class = tuple(c for _, c in segments)
        return Dfa(
            pattern=self.pattern,
            classes=nclasses,
            table=tuple(cells),
            start=start_id * nclasses,
            accepts_at_end=frozenset(s * nclasses for s in accepts_at_end),
            dollar=bool(self.dollar_nodes),
            char_class=char_class,
            default_class=default_class,
            bounds=bounds,
            bound_class=bound_class,
            skip=skip or None,
            # Anchored patterns end at their first mismatch; an unanchored one reads the whole
            # text unless a word it needs is missing, which `in` finds at C speed.
            required=tuple(sorted(required_words(self.tree) or ())) if self.unanchored else (),
            prefixes=None if words is None else tuple(sorted(words[0])),
            texts=frozenset() if words is None else frozenset(words[1]),
        )

    @staticmethod
    def _class_at(segments: list[tuple[int, int]], point: int) -> int:
        return segments[bisect.bisect_right(segments, (point, MAX_CLASSES)) - 1][1]


def _class_source(charset: Charset) -> str:
    """A one-class ``re`` pattern for ``charset``: searched, it runs in one pass."""
    if not charset:
        return "[^\\x00-\\U0010ffff]"
    parts = [f"\\U{lo:08x}" if hi == lo + 1 else f"\\U{lo:08x}-\\U{hi - 1:08x}" for lo, hi in charset]
    return f"[{''.join(parts)}]"
