"""What every bench script shares: where the repository and docs/results.md are, and how a
section of it is rewritten. It imports no other module of bench/ (tests/test_bench_imports.py):
bench/'s imports point one way, from the scripts down to here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO_ROOT / "docs" / "results.md"
RESULTS_TITLE = "# Results\n"


def repo_relative(path: Path) -> str:
    """The path as docs show it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def replace_section(path: Path, name: str, body: str) -> None:
    """Put `body` between the `<!-- name:start/end -->` markers of `path`, keeping the rest of the file."""
    from core.layout import atomic_write_text

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.is_file() else RESULTS_TITLE
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def output_root(args: argparse.Namespace) -> Path:
    """The runs' root: --output, else the config's `output` (a relative one is the repository's)."""
    if args.output:
        root = Path(args.output)
    else:
        from pipeline.settings import load_config

        root = Path(load_config(args.config, list(args.overrides)).output)
    return root if root.is_absolute() else REPO_ROOT / root
