"""Whether a rule names its process by something the process cannot forge (issue 12).

A process chooses its own ``name`` (``prctl(PR_SET_NAME)``, or the file name it was
exec'd as), its own ``cmdline`` (argv, rewritable at will) and, in effect, its own
``exe``: an unprivileged user can mount any binary at ``/usr/sbin/sshd`` in a user
namespace of their own, or ``LD_PRELOAD`` their code into the real one. What they
cannot choose is their uid (the kernel's credentials; ``user`` is resolved from it
by uoomd) or a cgroup they have no write access to. Issue 12: every shipped policy
protected by name alone, and a python process named ``sshd`` was spared while an
innocent one was killed.
"""

from __future__ import annotations

from collections.abc import Iterable

from uoomd.plan import MatchPlan, RulePlan
from uoomd.policy.locate import KeyPath

# Keys read from what the kernel (or root) decides: the process cannot pick them.
IDENTITY_KEYS = ("uid", "user", "cgroup")
# Keys the process (its owner) controls: they narrow a match, they never prove who it is.
HINT_KEYS = ("name", "cmdline", "exe")


def identities(match: MatchPlan) -> tuple[str, ...]:
    """The identity keys a match uses. A cgroup pattern counts only when anchored at
    the root (``^/`` or ``\\A/``): searched unanchored, ``ssh\\.service`` also finds the
    ``.../user@1000.service/app.slice/ssh.service`` that ``systemd-run --user --unit=ssh``
    makes for any user."""
    found: list[str] = []
    if match.uid is not None:
        found.append("uid")
    if match.user is not None:
        found.append("user")
    if match.cgroup is not None and match.cgroup.pattern.startswith(("^/", "\\A/")):
        found.append("cgroup")
    return tuple(found)


def hints(match: MatchPlan) -> tuple[str, ...]:
    return tuple(key for key in HINT_KEYS if getattr(match, key) is not None)


def shields(rule: RulePlan) -> bool:
    """Whether the rule makes a process less likely to be chosen: a protection, or a
    negative adjust (adjust -500 spares anything using less than half the scope's memory)."""
    return rule.protect or rule.adjust < 0


def identity_warnings(rules: Iterable[RulePlan]) -> list[tuple[KeyPath, str]]:
    """One warning per shielding rule that any user could make match their own process.

    Warnings, not errors: the rule may be meant for a single-user machine, and refusing
    it would leave the machine with no uoomd at all. ``uoomd check`` prints them."""
    found: list[tuple[KeyPath, str]] = []
    for rule in rules:
        if not shields(rule) or identities(rule.match):
            continue
        what = f"protect rule {rule.label!r}" if rule.protect else f"rule {rule.label!r} (adjust {rule.adjust})"
        used = [*hints(rule.match), *(["cgroup"] if rule.match.cgroup is not None else [])]
        keys = " and ".join(used)
        unanchored = (
            "; its cgroup pattern is not anchored at '^/', so a cgroup any user can create matches too"
            if rule.match.cgroup is not None
            else ""
        )
        found.append(
            (
                ("rule", rule.index),
                f"warning: {what} matches on {keys} only, which any user can give their own process{unanchored}; "
                "add uid, user or a cgroup anchored at '^/' (docs/SECURITY.md)",
            )
        )
    return found
