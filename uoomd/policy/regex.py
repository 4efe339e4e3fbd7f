"""Parse a rule's regex into a tree of character sets, refusing what no linear-time search can match.

The language is Python's regex syntax, searched (``re.search``), less what is not regular or
would make the table large; each refusal names the construct and its position:

- literals, ``.``, classes ``[...]`` (ranges, negation, ``\\d \\w \\s`` and their negations),
  escapes (``\\.``, ``\\n``, ``\\x41``, ``\\u00e9``, ``\\N{...}``, ``\\0``);
- groups ``(...)``, ``(?:...)``, ``(?P<name>...)``; alternation ``|``;
- ``* + ? {m} {m,} {,n} {m,n}`` and their lazy forms (a search finds the same texts either
  way), counts up to MAX_REPEAT;
- ``^`` and ``\\A`` (the start), ``$`` (the end, or before a final newline) and ``\\Z`` (the end);
- the global flags ``(?a)``, ``(?s)`` and ``(?u)`` at the start.

Refused: backreferences (``\\1``, ``(?P=name)``) and conditionals, which are not regular and
are what makes backtracking exponential; lookarounds and ``\\b``; possessive quantifiers and
atomic groups, which change which texts match; ``(?i)`` (spell the cases out: ``[Jj]ava``),
``(?m)`` and ``(?x)``; a ``{`` that is no count, a ``[`` or a doubled ``-&~|`` inside a class
(Python may read them as nested sets one day); anything matched after ``$`` (write ``\\n``,
or ``\\Z`` for the very end), ``$`` and ``\\Z`` in one pattern, a repeated anchor. Every such
pattern is refused by ``uoomd check`` and at start or reload, with the rule and the key named.

uoomd/policy/automaton.py turns the tree into the Dfa that the daemon searches with.
"""

from __future__ import annotations

import array
import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import NoReturn

MAX_PATTERN_CHARS = 4096
MAX_DEPTH = 32  # nested groups: the parser recurses once per group
MAX_REPEAT = 1000  # the largest count in {m,n}
CODE_POINTS = 0x110000

Interval = tuple[int, int]  # [start, end) code points
Charset = tuple[Interval, ...]  # ascending, disjoint, not touching


class RegexRefusedError(ValueError):
    """A pattern outside the language that uoomd searches in linear time (the message says where)."""


@dataclass(frozen=True, slots=True)
class Chars:
    charset: Charset


@dataclass(frozen=True, slots=True)
class Seq:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Alt:
    options: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Repeat:
    item: Node
    lo: int
    hi: int | None  # None: unbounded


@dataclass(frozen=True, slots=True)
class Anchor:
    kind: str  # "start" (^, \A), "dollar" ($), "end" (\Z)


Node = Chars | Seq | Alt | Repeat | Anchor

_ALL: Charset = ((0, CODE_POINTS),)
_SIMPLE_ESCAPES = {"a": 7, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}
_ASCII_CATEGORIES: dict[str, Charset] = {
    "d": ((48, 58),),
    "w": ((48, 58), (65, 91), (95, 96), (97, 123)),
    "s": ((9, 14), (32, 33)),  # sre's ASCII whitespace: \t \n \v \f \r and space
}
_LOOKS = (
    ("?=", "a lookahead (?=...) is not supported"),
    ("?!", "a negative lookahead (?!...) is not supported"),
    ("?<=", "a lookbehind (?<=...) is not supported"),
    ("?<!", "a negative lookbehind (?<!...) is not supported"),
    ("?P=", "a backreference (?P=name) is not regular: no linear-time search can match it"),
    ("?>", "an atomic group (?>...) changes which texts match: not supported"),
    ("?#", "a comment (?#...) is not supported"),
    ("?(", "a conditional group (?(...)...) is not regular: not supported"),
)
_BRACE_RE = re.compile(r"\{(\d{0,4})(,?)(\d{0,4})\}")


def parse_regex(pattern: str) -> Node:
    """The tree of ``pattern``, which ``re`` is expected to compile (the policy model checks that first)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RegexRefusedError(f"the pattern is {len(pattern)} characters long, over {MAX_PATTERN_CHARS}")
    return _Parser(pattern).parse()


# -- character sets -------------------------------------------------------------------------


def normalize(intervals: list[Interval]) -> Charset:
    out: list[Interval] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _complement(charset: Charset) -> Charset:
    out: list[Interval] = []
    at = 0
    for lo, hi in charset:
        if lo > at:
            out.append((at, lo))
        at = hi
    if at < CODE_POINTS:
        out.append((at, CODE_POINTS))
    return tuple(out)


@functools.cache
def _every_character() -> str:
    # chr(i) at index i, surrogates included (a str may hold them): 88 ms here, once a process.
    return array.array("I", range(CODE_POINTS)).tobytes().decode("utf-32-le", "surrogatepass")


@functools.cache
def _category(letter: str, ascii_only: bool) -> Charset:
    """``\\d \\w \\s`` (lower case) or their complements, exactly as ``re`` has them: the Unicode ones
    are read off ``re`` itself, run over every code point (~40 ms each here, once a process)."""
    base = letter.lower()
    if ascii_only:
        charset = _ASCII_CATEGORIES[base]
    else:
        found = re.compile(f"\\{base}+").finditer(_every_character())
        charset = tuple((m.start(), m.end()) for m in found)
    return _complement(charset) if letter.isupper() else charset


# -- the parser -----------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.ascii_only = False
        self.dotall = False

    def fail(self, message: str, at: int | None = None) -> NoReturn:
        where = self.pos if at is None else at
        raise RegexRefusedError(f"position {where}: {message}")

    def peek(self, ahead: int = 0) -> str:
        at = self.pos + ahead
        return self.text[at] if at < len(self.text) else ""

    def parse(self) -> Node:
        self._flags()
        tree = self._alternation(0)
        if self.pos < len(self.text):
            self.fail("unbalanced ')'")
        return tree

    def _flags(self) -> None:
        while self.text.startswith("(?", self.pos):
            end = self.pos + 2
            while end < len(self.text) and self.text[end].isalpha():
                end += 1
            letters = self.text[self.pos + 2 : end]
            if not letters or not self.text.startswith(")", end):
                return  # a group, not flags
            for letter in letters:
                if letter == "i":
                    self.fail("(?i) is not supported: spell the cases out, e.g. [Jj]ava")
                if letter == "m":
                    self.fail("(?m) is not supported: ^ and $ mean the start and the end of the text")
                if letter == "x":
                    self.fail("verbose patterns (?x) are not supported")
                if letter not in "asu":
                    self.fail(f"the flag {letter!r} is not supported")
                self.ascii_only = self.ascii_only or letter == "a"
                self.dotall = self.dotall or letter == "s"
            self.pos = end + 1

    def _alternation(self, depth: int) -> Node:
        options = [self._sequence(depth)]
        while self.peek() == "|":
            self.pos += 1
            options.append(self._sequence(depth))
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def _sequence(self, depth: int) -> Node:
        items: list[Node] = []
        while self.pos < len(self.text) and self.text[self.pos] not in "|)":
            items.append(self._quantified(self._atom(depth)))
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def _atom(self, depth: int) -> Node:
        ch = self.text[self.pos]
        if ch == "(":
            return self._group(depth)
        if ch == "[":
            return Chars(self._class())
        if ch == "\\":
            return self._escape()
        if ch in "*+?":
            self.fail(f"nothing to repeat before {ch!r}")
        if ch == "{":
            self.fail("a literal '{' must be written \\{")
        self.pos += 1
        if ch == ".":
            return Chars(_ALL if self.dotall else ((0, 10), (11, CODE_POINTS)))
        if ch == "^":
            return Anchor("start")
        if ch == "$":
            return Anchor("dollar")
        return Chars(((ord(ch), ord(ch) + 1),))

    def _group(self, depth: int) -> Node:
        if depth >= MAX_DEPTH:
            self.fail(f"groups nest deeper than {MAX_DEPTH}")
        start = self.pos
        self.pos += 1
        if self.peek() == "?":
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif self.text.startswith("?P<", self.pos):
                end = self.text.find(">", self.pos)
                if end < 0:
                    self.fail("unterminated group name")
                self.pos = end + 1
            else:
                for prefix, what in _LOOKS:
                    if self.text.startswith(prefix, self.pos):
                        self.fail(what, at=start)
                self.fail("inline flags are supported only at the start: (?a), (?s), (?u)", at=start)
        body = self._alternation(depth + 1)
        if self.peek() != ")":
            self.fail("missing ')'", at=start)
        self.pos += 1
        return body

    def _quantified(self, atom: Node) -> Node:
        ch = self.peek()
        start = self.pos
        if ch == "*":
            lo, hi = 0, None
            self.pos += 1
        elif ch == "+":
            lo, hi = 1, None
            self.pos += 1
        elif ch == "?":
            lo, hi = 0, 1
            self.pos += 1
        elif ch == "{":
            found = _BRACE_RE.match(self.text, self.pos)
            if found is None or not (found.group(1) or found.group(3)):
                self.fail("a '{' that is no count {m,n} must be written \\{")
            low, comma, high = found.groups()
            lo = int(low) if low else 0
            hi = (int(high) if high else None) if comma else lo
            if max(lo, hi or 0) > MAX_REPEAT:
                self.fail(f"a count over {MAX_REPEAT}")
            if hi is not None and hi < lo:
                self.fail("a count {m,n} with n below m")
            self.pos = found.end()
        else:
            return atom
        if isinstance(atom, Anchor):
            self.fail("nothing to repeat: an anchor matches no character", at=start)
        if self.peek() == "+":
            self.fail("a possessive quantifier changes which texts match: not supported")
        if self.peek() == "?":
            self.pos += 1  # lazy: the same texts contain a match
        if self.peek() in ("*", "+", "?", "{"):
            self.fail("multiple repeat")
        return Repeat(atom, lo, hi)

    def _escape(self) -> Node:
        letter = self.peek(1)
        if letter == "":
            self.fail("a trailing backslash")
        if letter == "A":
            self.pos += 2
            return Anchor("start")
        if letter == "Z":
            self.pos += 2
            return Anchor("end")
        if letter in "bB":
            self.fail(f"a word boundary \\{letter} is not supported")
        if letter in "dDsSwW":
            self.pos += 2
            return Chars(_category(letter, self.ascii_only))
        code = self._escaped_char(in_class=False)
        return Chars(((code, code + 1),))

    def _escaped_char(self, *, in_class: bool) -> int:
        """The code point of the escape at ``pos`` (a backslash), moving past it."""
        start = self.pos
        letter = self.peek(1)
        if letter in _SIMPLE_ESCAPES:
            self.pos += 2
            return _SIMPLE_ESCAPES[letter]
        if letter == "b" and in_class:
            self.pos += 2
            return 8
        if letter in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[letter]
            digits = self.text[self.pos + 2 : self.pos + 2 + width]
            if len(digits) != width or any(c not in "0123456789abcdefABCDEF" for c in digits):
                self.fail(f"a bad escape \\{letter}")
            code = int(digits, 16)
            if code >= CODE_POINTS:
                self.fail("an escape past the last code point")
            self.pos += 2 + width
            return code
        if letter == "N":
            end = self.text.find("}", self.pos)
            if not self.text.startswith("{", self.pos + 2) or end < 0:
                self.fail("a bad escape \\N")
            try:
                char = unicodedata.lookup(self.text[self.pos + 3 : end])
            except KeyError:
                self.fail("an unknown character name in \\N{...}")
            self.pos = end + 1
            return ord(char)
        if letter == "0":
            end = self.pos + 2
            while end < self.pos + 4 and self.peek(end - self.pos) in tuple("01234567"):
                end += 1
            self.pos = end
            return int(self.text[start + 1 : end], 8)
        if letter.isdigit():
            if in_class:
                self.fail("octal escapes other than \\0 are not supported (write \\x..)", at=start)
            self.fail(f"a backreference \\{letter} is not regular: no linear-time search can match it", at=start)
        if letter.isascii() and letter.isalpha():
            self.fail(f"an unknown escape \\{letter}", at=start)
        self.pos += 2
        return ord(letter)

    def _class(self) -> Charset:
        start = self.pos
        self.pos += 1
        negate = self.peek() == "^"
        if negate:
            self.pos += 1
        intervals: list[Interval] = []
        first = True
        while True:
            ch = self.peek()
            if ch == "":
                self.fail("a '[' without its ']'", at=start)
            if ch == "]" and not first:
                self.pos += 1
                break
            first = False
            if ch == "[":
                self.fail("a '[' inside a class must be written \\[ (Python may read it as a nested set)")
            if self.text.startswith(("--", "&&", "~~", "||"), self.pos):
                self.fail(
                    f"{self.text[self.pos : self.pos + 2]!r} inside a class must be escaped (a future set operation)"
                )
            if ch == "\\" and self.peek(1) in tuple("dDsSwW"):
                intervals.extend(_category(self.peek(1), self.ascii_only))
                self.pos += 2
                continue
            lo = self._class_char()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                if self.peek() == "\\" and self.peek(1) in tuple("dDsSwW"):
                    self.fail("a range cannot end in a category")
                hi = self._class_char()
                if hi < lo:
                    self.fail("a range that runs backwards")
                intervals.append((lo, hi + 1))
            else:
                intervals.append((lo, lo + 1))
        charset = normalize(intervals)
        return _complement(charset) if negate else charset

    def _class_char(self) -> int:
        ch = self.peek()
        if ch == "\\":
            return self._escaped_char(in_class=True)
        if ch == "[":
            self.fail("a '[' inside a class must be written \\[")
        self.pos += 1
        return ord(ch)
