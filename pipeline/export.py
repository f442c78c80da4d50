"""`python -m pipeline export`: ranked lists as a preference dataset for TRL and other trainers.

Each list becomes one or more (prompt, chosen, rejected) rows in TRL's
conversational format: the prompt's messages, and the chosen and rejected
answers as one assistant message each, with their rewards and the round of
the list. `--format trl` writes one Parquet file (`datasets.load_dataset
("parquet", data_files=...)` reads it); `--format hf` a `save_to_disk` directory.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.layout import read_parquet_dir, write_parquet
from pipeline.schema import PROMPT


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


def write_export(table: pa.Table, out: Path, format_name: str) -> None:
    """Write the pairs in place of `out` without leaving a half-written export behind."""
    if format_name == "trl":
        write_parquet(table, out)
        return
    from datasets import Dataset

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset(table).save_to_disk(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def main(args) -> int:
    source = Path(args.source)
    table = preference_pairs(source, args.pairs)
    default_name = f"preferences-{args.pairs}" + (".parquet" if args.format == "trl" else "")
    out = Path(args.out) if args.out else source / "export" / default_name
    write_export(table, out, args.format)
    print(f"wrote {table.num_rows} preference pairs ({args.pairs}) to {out}")
    return 0
