"""`python -m pipeline export`: ranked lists as a preference dataset for TRL and other trainers.

Each list becomes one or more (prompt, chosen, rejected) rows in TRL's
conversational format: the prompt's messages, and the chosen and rejected
answers as one assistant message each, with their rewards and the round of
the list. `--format trl` writes one Parquet file (`datasets.load_dataset
("parquet", data_files=...)` reads it); `--format hf` a `save_to_disk` directory.

The command never deletes what it did not write: an existing `--out` is replaced
only if it is an earlier export of the same format (a Parquet file of these
columns; a directory holding EXPORT_MARKER), or with `--overwrite`, and never
when it holds a run, the source, or the current directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import PipelineError
from core.layout import read_parquet_dir, write_parquet
from core.schema import PROMPT


def best_worst(positives: list[dict], negatives: list[dict]) -> list[tuple[dict, dict]]:
    """The best positive against the worst negative: the pair iterative DPO trains on."""
    return [(max(positives, key=lambda item: item["reward"]), min(negatives, key=lambda item: item["reward"]))]


def every_pair(positives: list[dict], negatives: list[dict]) -> list[tuple[dict, dict]]:
    """Every positive against every negative of the list."""
    return [(positive, negative) for positive in positives for negative in negatives]


PAIRINGS = {"best-worst": best_worst, "all": every_pair}

PAIRS = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", PROMPT),
    ("chosen", PROMPT),
    ("rejected", PROMPT),
    ("chosen_reward", pa.float64()),
    ("rejected_reward", pa.float64()),
    ("round", pa.int64()),
])

ROUND_DIR = re.compile(r"round_(\d{3,})")


def round_dirs(source: Path) -> list[Path]:
    """The round directories with lists under `source`: itself if it is one, else its rounds."""
    if not source.is_dir():
        raise PipelineError(f"{source} is not a directory: give a round (runs/<run>/round_001) or a run (runs/<run>)")
    if ROUND_DIR.fullmatch(source.name):
        if not (source / "lists").is_dir():
            raise PipelineError(f"round directory {source} has no lists/ (its rerank stage has not finished)")
        return [source]
    rounds = sorted((p for p in source.iterdir() if ROUND_DIR.fullmatch(p.name) and (p / "lists").is_dir()),
                    key=lambda p: int(ROUND_DIR.fullmatch(p.name).group(1)))
    if not rounds:
        raise PipelineError(f"run directory {source} has no round with lists (round_NNN/lists)")
    return rounds


def preference_pairs(source: Path, pairing: str) -> pa.Table:
    """Every list of the round (or of each round of the run) as preference pairs, in round order."""
    choose = PAIRINGS[pairing]
    rows: list[dict[str, Any]] = []
    for round_dir in round_dirs(source):
        number = int(ROUND_DIR.fullmatch(round_dir.name).group(1))
        for row in read_parquet_dir(round_dir / "lists").to_pylist():
            for chosen, rejected in choose(row["positives"], row["negatives"]):
                rows.append({"prompt_id": row["prompt_id"], "prompt": row["prompt"],
                             "chosen": [{"role": "assistant", "content": chosen["response"]}],
                             "rejected": [{"role": "assistant", "content": rejected["response"]}],
                             "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"],
                             "round": number})
    return pa.Table.from_pylist(rows, schema=PAIRS)


# Written into every `--format hf` export: a directory holding it may be replaced by the next export.
EXPORT_MARKER = "larpo_export.json"


def is_earlier_export(out: Path, format_name: str) -> bool:
    """Whether `out` is what an earlier export of this format wrote (and so may be replaced)."""
    if format_name == "hf":
        return (out / EXPORT_MARKER).is_file()
    try:
        return pq.read_schema(out).names == PAIRS.names
    except (OSError, pa.ArrowException):
        return False


def holds_something_precious(out: Path, source: Path) -> str | None:
    """Why replacing directory `out` would lose what no export wrote, or None."""
    out, source, here = out.resolve(), source.resolve(), Path.cwd().resolve()
    if out == source or out in source.parents:
        return f"it holds the source {source}"
    if out == here or out in here.parents:
        return "it holds the current directory"
    if (out / "config.yaml").is_file() or any(ROUND_DIR.fullmatch(p.name) for p in out.iterdir()):
        return "it holds a run (config.yaml or round_NNN)"
    return None


def check_out(out: Path, source: Path, format_name: str, overwrite: bool, default: bool) -> None:
    """Refuse, in one line, an `--out` the export cannot write or must not replace."""
    shown = f"--out {out}" if not default else str(out)
    if out.name in ("", ".", ".."):
        raise PipelineError(f"{shown} names no file or directory to write; name one, e.g. {out / 'preferences'}")
    parent = out.resolve().parent
    if not default and not parent.is_dir():
        raise PipelineError(f"{shown}: directory {parent} does not exist (create it first)")
    if not out.exists() and not out.is_symlink():
        return
    if format_name == "trl" and out.is_dir():
        raise PipelineError(f"{shown} is a directory; --format trl writes one Parquet file "
                            f"(e.g. --out {out / 'preferences.parquet'})")
    if format_name == "hf" and not out.is_dir():
        raise PipelineError(f"{shown} is a file; --format hf writes a directory (datasets' save_to_disk)")
    if format_name == "hf":
        reason = holds_something_precious(out, source)
        if reason:
            raise PipelineError(f"{shown} will not be replaced: {reason}")
        if not any(out.iterdir()):
            return
    if not overwrite and not is_earlier_export(out, format_name):
        raise PipelineError(f"{shown} exists and is not an earlier {format_name} export: give another --out, "
                            "or --overwrite to replace it")


def write_export(table: pa.Table, out: Path, format_name: str, pairing: str = "best-worst") -> None:
    """Write the pairs in place of `out` without leaving a half-written export behind."""
    if format_name == "trl":
        write_parquet(table, out)
        return
    from datasets import Dataset

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        Dataset(table).save_to_disk(str(tmp))
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": format_name, "pairs": pairing}) + "\n")
        if out.is_dir():
            # Move the old export aside first: a failure now leaves it whole under its own name.
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(args) -> int:
    source = Path(args.source)
    table = preference_pairs(source, args.pairs)
    default_name = f"preferences-{args.pairs}" + (".parquet" if args.format == "trl" else "")
    out = Path(args.out) if args.out else source / "export" / default_name
    check_out(out, source, args.format, getattr(args, "overwrite", False), default=not args.out)
    try:
        if not args.out:
            out.parent.mkdir(exist_ok=True)
        write_export(table, out, args.format, args.pairs)
    except OSError as exc:
        raise PipelineError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"wrote {table.num_rows} preference pairs ({args.pairs}) to {out}")
    return 0
