"""Which code produced a round: the package version and, in a git checkout, the commit.

Stored in every round's metrics.json (`code`), so a result read months later, or
copied into docs/experiments/, still says what computed it.
"""

from __future__ import annotations

import subprocess
from functools import cache
from importlib import metadata
from typing import Any

from core.project_files import CHECKOUT


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


@cache
def code_version() -> dict[str, Any]:
    """{"version", "commit", "dirty"}; commit and dirty are None outside a git checkout (a wheel)."""
    try:
        version = metadata.version("larpo-pipeline")
    except metadata.PackageNotFoundError:
        version = None
    commit = _git("rev-parse", "HEAD") if CHECKOUT is not None and (CHECKOUT / ".git").exists() else None
    # Only tracked files count: runs/ and .cache/ are ignored, and an untracked scratch file changes no result.
    dirty = None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {"version": version, "commit": commit, "dirty": dirty}
