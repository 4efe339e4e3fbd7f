"""Where a policy file is found when none is named: $UOOMD_POLICY, /etc/uoomd/uoomd.toml, the packaged copy."""

from __future__ import annotations

import os

DEFAULT_POLICY_PATHS = ("/etc/uoomd/uoomd.toml",)


def default_policy_path() -> str:
    """``$UOOMD_POLICY``, then /etc/uoomd/uoomd.toml, then the copy shipped inside the package."""
    env = os.environ.get("UOOMD_POLICY")
    if env:
        return env
    for path in DEFAULT_POLICY_PATHS:
        if os.path.exists(path):
            return path
    return packaged_policy_path("uoomd.toml")


def packaged_policy_path(name: str) -> str:
    """The copy of etc/uoomd.toml (or policies/NAME) shipped inside the installed package."""
    from importlib import resources  # noqa: PLC0415 -- needed only when no policy file is named or installed

    base = resources.files("uoomd") / "data"
    candidate = base / name if name == "uoomd.toml" else base / "policies" / name
    path = str(candidate)
    if os.path.exists(path):
        return path
    # Running from a source checkout (editable install or tests): the repository's files.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, "etc", name) if name == "uoomd.toml" else os.path.join(repo, "policies", name)
