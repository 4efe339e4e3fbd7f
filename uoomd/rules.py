"""Which of the policy's rules match a process (pure): every key searched by its DFA, each
distinct process matched once per ranking."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from uoomd.dfa import Dfa
from uoomd.plan import MatchPlan, Plan, RulePlan
from uoomd.readings import ProcessInfo

MatchKey = tuple[str, str | None, str | None, str | None, str | None, int]
"""What the rules can see of a process: name, cmdline, exe, cgroup, user, uid."""


class MissingDetailError(RuntimeError):
    """A programming error: the snapshot lacks a process detail the plan's rules match on,
    so a protect rule could silently miss. Read the snapshot with plan.needed_details()."""


def _search(pattern: Dfa | None, value: str | None) -> bool:
    if pattern is None:
        return True
    return value is not None and pattern.search(value)


def rule_matches(match: MatchPlan, process: ProcessInfo) -> bool:
    """All given keys must match; a detail that was not read (None) does not match."""
    return (
        _search(match.name, process.name)
        and _search(match.cmdline, process.cmdline)
        and _search(match.exe, process.exe)
        and _search(match.cgroup, process.cgroup)
        and (match.user is None or process.user == match.user)
        and (match.uid is None or process.uid == match.uid)
    )


def matching_rules(rules: Iterable[RulePlan], process: ProcessInfo) -> tuple[RulePlan, ...]:
    return tuple(rule for rule in rules if rule_matches(rule.match, process))


def match_key(process: ProcessInfo) -> MatchKey:
    return (process.name, process.cmdline, process.exe, process.cgroup, process.user, process.uid)


class Verdicts:
    """The rules each process matched, for one rank(): a process is matched once per distinct
    match_key(), and never when an earlier ranking with the same rules saw that key.

    Matching is linear in the text (uoomd/dfa.py), but a command line is up to 4 KiB read
    (16 Ki characters once undecodable bytes become ``\\xNN``), and a scan re-reads the details
    of every process whose memory moved: the rules' answer moves only with the name, the
    command line, the exe, the cgroup and the user. Keyed by them and not by (pid, starttime),
    1,000 identical workers cost one match. Holds the keys of one snapshot's processes only (it
    is built anew from the previous ranking's at every rank()), so it never outgrows the snapshot."""

    __slots__ = ("_known", "_rules", "found", "matched")

    def __init__(self, rules: tuple[RulePlan, ...], known: Mapping[MatchKey, tuple[RulePlan, ...]]) -> None:
        self._rules = rules
        self._known = known
        self.found: dict[MatchKey, tuple[RulePlan, ...]] = {}
        self.matched = 0  # processes matched here, not found in ``known``

    def rules_of(self, process: ProcessInfo) -> tuple[RulePlan, ...]:
        key = match_key(process)
        found = self.found.get(key)
        if found is None:
            found = self._known.get(key)
            if found is None:
                found = matching_rules(self._rules, process) if self._rules else ()
                self.matched += 1
            self.found[key] = found
        return found

    def keep(self, process: ProcessInfo) -> None:
        """Carry a known verdict over for a process scored in an earlier ranking (not matched now)."""
        key = match_key(process)
        found = self._known.get(key)
        if found is not None:
            self.found[key] = found


def check_details(snapshot_details: frozenset[str], plan: Plan) -> None:
    """Raise MissingDetailError if the plan's rules need details the snapshot did not read."""
    missing = plan.needed_details() - snapshot_details
    if missing:
        raise MissingDetailError(
            f"the snapshot lacks {sorted(missing)} that the policy's rules match on; "
            f"read it with details=plan.needed_details()"
        )
