"""Where the project's own files are: in a checkout, or inside an installed wheel.

The bundled configs (configs/*.yaml, configs/paper/) name the prompt files by paths relative to
the project (data/prompts/...). A checkout (the repository, or an editable install of it) has
them at its root. An installed wheel has no checkout: pyproject.toml ships the same two folders
as package data under core/_project/, in the same layout, so the configs' relative paths read
the same in both. Nothing here imports anything of ours.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

# The repository this code runs from, or None for an installed wheel (whose code sits in
# site-packages, beside other distributions' packages: no place for runs or a model cache).
CHECKOUT: Path | None = (_ROOT if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "configs").is_dir()
                         else None)

# The root that configs/ and data/prompts/ are under: the checkout, or the wheel's copy.
PROJECT_FILES: Path = CHECKOUT if CHECKOUT is not None else Path(str(resources.files("core") / "_project"))


def default_cache() -> Path:
    """Where the embedded models are prepared when LARPO_CACHE does not say: the checkout's .cache
    (`make setup`), or for an installed wheel the user's cache (`larpo prepare-models`)."""
    if CHECKOUT is not None:
        return CHECKOUT / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "larpo"


def prepare_hint() -> str:
    """The command that prepares the embedded models in this layout."""
    return "run `make setup`" if CHECKOUT is not None else "run `larpo prepare-models` or set LARPO_CACHE"


def relative_base(key: str, base: Path) -> Path:
    """Where a config's relative value of path key `key` is read from: `base`, except that an
    installed wheel never writes into itself: a run root (`output`) that the defaults or a bundled
    config name relatively goes under the current directory, as a checkout's goes under its root."""
    if key == "output" and CHECKOUT is None and base.resolve().is_relative_to(PROJECT_FILES.resolve()):
        return Path.cwd()
    return base
