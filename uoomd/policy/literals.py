"""The literal words a pattern's matches are made of: what Dfa.search checks before running the table, or instead of it.

An unanchored search reads the whole text; if every match must hold one of a few words,
``in`` finds out at C speed that none is there (:func:`required_words`). An anchored
pattern of finitely many literal words (``^(sshd|systemd)$``, most name rules) needs no
table at all: a startswith() and a set look-up (:func:`literal_words`).
"""

from __future__ import annotations

from uoomd.dfa import DEAD
from uoomd.policy.regex import Alt, Anchor, Chars, Node, Repeat, Seq

MAX_REQUIRED = 8  # words looked for before an unanchored search (see required_words)
MAX_WORDS = 256  # words an anchored pattern may spell out to be matched by set look-up (see literal_words)
MAX_WORD_CHARS = 256


def required_words(node: Node) -> frozenset[str] | None:
    """Words one of which every text with a match contains (None: no such words are known).

    By induction on the tree: a character set of one character needs it; a sequence needs
    whatever any of its items needs, and a run of such characters needs the whole run (the
    best of these is kept: the longest shortest word); an alternation needs one of what each
    option needs; a repeat of at least once needs what its item does."""
    match node:
        case Chars(charset):
            single = len(charset) == 1 and charset[0][1] == charset[0][0] + 1
            return frozenset({chr(charset[0][0])}) if single else None
        case Anchor():
            return None
        case Seq(items):
            candidates: list[frozenset[str]] = []
            run = ""
            for item in items:
                needed = required_words(item)
                if isinstance(item, Chars) and needed is not None:
                    run += next(iter(needed))
                    continue
                if run:
                    candidates.append(frozenset({run}))
                    run = ""
                if needed is not None:
                    candidates.append(needed)
            if run:
                candidates.append(frozenset({run}))
            return max(candidates, key=lambda words: (min(map(len, words)), -len(words)), default=None)
        case Alt(options):
            union: set[str] = set()
            for option in options:
                needed = required_words(option)
                if needed is None:
                    return None
                union |= needed
            # A word that holds another adds nothing: the other is in the text too.
            words = {w for w in union if not any(o != w and o in w for o in union)}
            return frozenset(words) if len(words) <= MAX_REQUIRED else None
        case Repeat(item, lo, _):
            return required_words(item) if lo > 0 else None
    raise AssertionError(node)


def literal_words(
    rows: list[list[int]], start_id: int, accepts_at_end: set[int], single: dict[int, str]
) -> tuple[set[str], set[str]] | None:
    """For an anchored pattern of finitely many literal words (``^(sshd|systemd)$``, most
    name rules): the prefixes that reach the accepting state, and the texts the end of
    which accepts, so Dfa.search is a startswith() and a set look-up. None otherwise:
    a loop, a class of more than one character, or more than MAX_WORDS words."""
    prefixes: set[str] = set()
    texts: set[str] = set()
    stack: list[tuple[int, str, frozenset[int]]] = [(start_id, "", frozenset({start_id}))]
    while stack:
        state, word, path = stack.pop()
        if state in accepts_at_end:
            texts.add(word)
        for c, target in enumerate(rows[state]):
            if target == DEAD:
                continue
            if c not in single or target in path or len(word) >= MAX_WORD_CHARS:
                return None
            if target == 1:
                prefixes.add(word + single[c])
            else:
                stack.append((target, word + single[c], path | {target}))
        if len(prefixes) + len(texts) + len(stack) > MAX_WORDS:
            return None
    return prefixes, texts
