"""What the reference log-probs are computed for, and the train shard they are stored in.

Shared by the reference stage as a stage of its own (stage.py, one Ray task) and
the train workers when they score the reference themselves (in_train_workers.py):
either way the same lists are scored and the same `train/part-00000.parquet`
(schema.TRAIN) is written before training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from core import schema, timing
from core.layout import EARLIER_ROUNDS, RoundLayout, RunLayout, read_parquet_dir, shard_name, write_parquet
from pools.logprobs import Response, response_to_score


def reference_inputs(run: RunLayout, round_layout: RoundLayout, replay: str) -> tuple[list[dict[str, Any]], int]:
    """The round's lists, then those of the earlier rounds `train.replay` names, each row marked
    with its round; and how many of them are the round's own."""
    with timing.timed("io"):
        rows = [{**row, "round": round_layout.number} for row in read_parquet_dir(round_layout.lists).to_pylist()]
        current = len(rows)
        # Scored under this round's reference, as the current lists are: the log-probs
        # stored with them in their own round were under that round's reference.
        for earlier in EARLIER_ROUNDS[replay](round_layout.number):
            rows += [{**row, "round": earlier} for row in read_parquet_dir(run.round(earlier).lists).to_pylist()]
    return rows, current


def items_to_score(rows: list[dict[str, Any]]) -> list[tuple[list[dict], list[Response]]]:
    """(prompt messages, responses as sampled) of each list: its positives, then its negatives."""
    return [(row["prompt"], [response_to_score(item) for item in row["positives"] + row["negatives"]])
            for row in rows]


def with_reference(rows: list[dict[str, Any]], logps: list[list[float]], reference: str) -> list[dict[str, Any]]:
    """The rows with each item's `ref_logp` (in items_to_score's order) and the reference's path."""
    scored = []
    for row, values in zip(rows, logps, strict=True):
        values = iter(values)
        scored.append({**row, "positives": [{**item, "ref_logp": next(values)} for item in row["positives"]],
                       "negatives": [{**item, "ref_logp": next(values)} for item in row["negatives"]],
                       "reference": reference})
    return scored


def write_train_shard(rows: list[dict[str, Any]], out_dir: Path) -> None:
    with timing.timed("io"):
        write_parquet(pa.Table.from_pylist(rows, schema=schema.TRAIN), out_dir / shard_name(0))


def reference_stats(rows: list[dict[str, Any]], current: int, reference: str) -> dict[str, Any]:
    return {"lists": len(rows), "lists_current": current, "lists_replayed": len(rows) - current,
            "items": sum(len(row["positives"]) + len(row["negatives"]) for row in rows), "reference": reference}
